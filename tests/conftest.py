import numpy as np
import pytest
from hypothesis import settings

from consortium.data import Splits, Table


def make_table(rng: np.random.Generator, n: int, d: int = 6, names: tuple[str, ...] | None = None) -> Table:
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = (X[:, 0] - X[:, 1] + 0.3 * rng.standard_normal(n) > 0).astype(np.int64)
    return Table(X=X, y=y, feature_names=names or tuple(f"f{i}" for i in range(d)), classes=("no", "yes"))


def make_splits(rng: np.random.Generator, n: int = 80, **kw) -> Splits:
    return Splits(make_table(rng, n, **kw), make_table(rng, 10, **kw), make_table(rng, 30, **kw))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# Property tests draw the same examples on every run: a failure is reproducible, never flaky.
settings.register_profile("consortium", derandomize=True, deadline=None)
settings.load_profile("consortium")
