import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from consortium.errors import ModelError
from consortium.learning.adapter import ModelAdapter
from consortium.learning.models import build_model
from consortium.learning.specs import ModelSpec


def _model(kind="mlp", hidden=(16,), n_features=64, seed=0):
    return build_model(
        ModelSpec(kind=kind, hidden=hidden),
        n_features=n_features,
        n_classes=10,
        mean=np.zeros(n_features),
        scale=np.ones(n_features),
        image_shape=(1, 8, 8) if kind == "cnn" else None,
        seed=seed,
    )


@pytest.mark.parametrize("kind", ["logistic", "mlp", "cnn"])
def test_round_trip_is_exact(kind):
    a = ModelAdapter(_model(kind))
    v = a.get_vector()
    assert v.dtype == np.float32 and v.ndim == 1 and v.size == a.size
    rng = np.random.default_rng(1)
    w = rng.standard_normal(a.size).astype(np.float32)
    a.set_vector(w)
    assert np.array_equal(a.get_vector(), w)  # bit-exact, not approximately equal


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=8, max_size=8))
def test_round_trip_preserves_every_bit(values):
    a = ModelAdapter(torch.nn.Linear(3, 2))  # 8 parameters
    w = np.asarray(values, dtype=np.float32)
    a.set_vector(w)
    assert a.get_vector().tobytes() == w.tobytes()


def test_vector_is_a_copy():
    a = ModelAdapter(_model())
    v = a.get_vector()
    v[:] = 0
    assert np.any(a.get_vector() != 0)


def test_layout_hash_names_the_architecture():
    h1 = ModelAdapter(_model(hidden=(16,))).layout_hash
    assert h1 == ModelAdapter(_model(hidden=(16,), seed=5)).layout_hash  # weights do not matter
    assert h1 != ModelAdapter(_model(hidden=(17,))).layout_hash
    assert h1 != ModelAdapter(_model(kind="logistic")).layout_hash


def test_wrong_size_dtype_or_nan_is_refused():
    a = ModelAdapter(_model())
    good = a.get_vector()
    with pytest.raises(ModelError, match="another architecture"):
        a.set_vector(good[:-1])
    with pytest.raises(ModelError, match="float32"):
        a.set_vector(good.astype(np.float64))
    bad = good.copy()
    bad[3] = np.nan
    with pytest.raises(ModelError, match="NaN"):
        a.set_vector(bad)
    assert np.array_equal(a.get_vector(), good)  # nothing was half-loaded


def test_any_module_works_and_buffers_are_not_shared():
    m = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3), torch.nn.BatchNorm1d(3))
    a = ModelAdapter(m)
    assert a.size == sum(p.numel() for p in m.parameters())
    assert "1.running_mean" not in a.layout.names


def test_cnn_needs_images():
    with pytest.raises(ModelError, match="image"):
        build_model(ModelSpec(kind="cnn"), n_features=30, n_classes=2, mean=np.zeros(30), scale=np.ones(30))
