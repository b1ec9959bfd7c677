import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

from consortium.data import Splits, Table
from tests import forkserver


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that train many tiny models: one thread is fastest, and on a busy 2-core machine a
    second one spin-waits (20-50 times slower). Module by module, never for the whole session: a test
    that compares a run bit for bit with one in another process needs the same thread count as that process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_table(rng: np.random.Generator, n: int, d: int = 6, names: tuple[str, ...] | None = None) -> Table:
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = (X[:, 0] - X[:, 1] + 0.3 * rng.standard_normal(n) > 0).astype(np.int64)
    return Table(X=X, y=y, feature_names=names or tuple(f"f{i}" for i in range(d)), classes=("no", "yes"))


def make_splits(rng: np.random.Generator, n: int = 80, **kw) -> Splits:
    return Splits(make_table(rng, n, **kw), make_table(rng, 10, **kw), make_table(rng, 30, **kw))


def signed_agreement(folder: Path, text: str, members: list[str], signers: list[str] | None = None) -> Path:
    """Key files for ``members`` under folder/keys, their public keys put in the agreement ``text``, and the
    signatures of ``signers`` (default: every approver) beside it."""
    from consortium.crypto import keys
    from consortium.crypto.keyfile import load_identity_key, save_identity_key
    from consortium.governance.agreement import load_agreement, sign_agreement, signatures_path

    for name in members:
        private, public = keys.generate_ed25519()
        save_identity_key(folder / "keys" / f"{name}.key", private)
        text = text.replace(f"{{name: {name},", f"{{name: {name}, public_key: {keys.ed25519_public_bytes(public).hex()},")
    path = folder / "agreement.yaml"
    path.write_text(text)
    agreement = load_agreement(path)
    who = agreement.approvers() if signers is None else signers
    sigs = {n: sign_agreement(agreement, n, load_identity_key(folder / "keys" / f"{n}.key")) for n in who}
    signatures_path(path).write_text(json.dumps(sigs))
    return path


def cli_side_by_side(*commands: list[str] | tuple[str, ...], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """``consortium`` run once per command, all started at once (independent commands: two cores)."""
    started = [forkserver.popen([*forkserver.CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for args in commands]
    try:
        outputs = [p.communicate(timeout=timeout) for p in started]
        return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(started, outputs)]
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()


@pytest.fixture(autouse=True)
def forked_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """The processes ``consortium.deploy.local`` starts (the coordinator's service, the sites' agents) come
    from this worker's fork server (``tests/forkserver.py``), as every CLI process a test starts does."""
    from consortium.deploy import local

    monkeypatch.setattr(local, "_spawn", lambda args, **kwargs: forkserver.popen([*forkserver.CLI, *args], **kwargs))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# Property tests draw the same examples on every run: a failure is reproducible, never flaky.
settings.register_profile("consortium", derandomize=True, deadline=None)
settings.load_profile("consortium")


#: The test files that take longest (``pytest --durations=0``, summed per file), longest first. They are
#: handed to the two workers first (``make test`` runs ``--dist loadfile``): the short files then fill in
#: around them, and both workers finish together instead of one waiting on a long file started last.
LONGEST_FIRST = (
    "test_cli.py", "test_deploy.py", "test_lifecycle.py", "test_membership.py", "test_governance.py", "test_ray_backend.py",
    "test_examples.py", "test_tasks.py", "test_deploy_tasks.py", "test_report.py", "test_https.py", "test_anchors.py",
    "test_dp_recipe.py", "test_deploy_readme.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
