"""The model registry: versions, lineage, the states a version may move between, and its files' integrity."""

from __future__ import annotations

import numpy as np
import pytest

from consortium.errors import VerificationError
from consortium.lifecycle.registry import ModelRegistry, RegistryError


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"layer.weight": rng.standard_normal((4, 3)).astype(np.float32), "layer.bias": np.zeros(4, np.float32)}


@pytest.fixture
def registry(tmp_path):
    reg = ModelRegistry(tmp_path)
    reg.register(weights(1), parent=None, round=5, sites=["b", "a"], epsilon={"a": 1.0, "b": 1.0},
                 metrics={"accuracy": 0.9}, by="coordinator")
    reg.register(weights(2), parent="v1", round=10, sites=["a", "b"], epsilon={"a": 2.0, "b": 2.0},
                 metrics={"accuracy": 0.93}, by="coordinator")
    return reg


def test_versions_keep_their_lineage_and_survive_a_reopen(registry, tmp_path):
    again = ModelRegistry(tmp_path)
    assert [v.id for v in again.lineage("v2")] == ["v2", "v1"]
    v2 = again.get("v2")
    assert (v2.round, v2.sites, v2.epsilon, v2.metrics, v2.state) == (10, ["a", "b"], {"a": 2.0, "b": 2.0}, {"accuracy": 0.93}, "candidate")
    np.testing.assert_array_equal(again.tensors("v2")["layer.weight"], weights(2)["layer.weight"])
    assert not list((tmp_path / "registry").rglob("*.tmp"))  # atomic writes leave nothing behind


def test_the_path_to_production_and_back(registry):
    registry.transition("v1", "canary", reason="canary sites a, b", by="coordinator")
    registry.transition("v1", "production", reason="no metric regressed", by="coordinator")
    registry.transition("v2", "canary", reason="canary sites a, b", by="coordinator")
    registry.transition("v2", "production", reason="no metric regressed", by="coordinator")
    assert registry.production.id == "v2" and registry.get("v1").state == "retired"  # one production at a time
    assert registry.get("v1").history[-1].reason == "superseded by v2"
    registry.rollback("v1", reason="accuracy fell 4 points at site a", by="site-a")
    assert registry.production.id == "v1" and registry.get("v2").state == "rolled_back"
    assert [c.state for c in registry.get("v1").history] == ["candidate", "canary", "production", "retired", "production"]
    assert registry.get("v1").history[-1].reason == "rollback: accuracy fell 4 points at site a"


def test_moves_the_states_do_not_allow_are_refused(registry):
    with pytest.raises(RegistryError, match="candidate: it can move to canary, retired, not to production"):
        registry.transition("v1", "production", reason="skip the canary", by="coordinator")  # no canary stage skipped
    registry.transition("v1", "canary", reason="canary", by="coordinator")
    registry.transition("v1", "retired", reason="calibration error rose by 0.05 (tolerance 0.02)", by="coordinator")
    with pytest.raises(RegistryError, match="retired: bring it back with a rollback"):
        registry.transition("v1", "production", reason="try again", by="coordinator")
    with pytest.raises(RegistryError, match="never in production"):
        registry.rollback("v1", reason="it was rejected", by="coordinator")  # a rejected candidate is not a rollback target
    with pytest.raises(RegistryError, match="needs a reason"):
        registry.transition("v2", "canary", reason=" ", by="coordinator")
    with pytest.raises(RegistryError, match="no model version 'v9'"):
        registry.get("v9")
    with pytest.raises(RegistryError, match="no model version 'v7'"):
        registry.register(weights(3), parent="v7", round=1, sites=["a"], by="coordinator")


def test_a_swapped_model_file_is_refused(registry, tmp_path):
    target = tmp_path / "registry" / "versions" / "v1.safetensors"
    target.write_bytes((tmp_path / "registry" / "versions" / "v2.safetensors").read_bytes())
    with pytest.raises(VerificationError, match="does not match the hash registered for v1"):
        registry.tensors("v1")
    target.unlink()
    with pytest.raises(VerificationError, match="missing"):
        registry.tensors("v1")
    (tmp_path / "registry" / "registry.json").write_text("{not json")
    with pytest.raises(VerificationError, match="damaged"):
        ModelRegistry(tmp_path)
