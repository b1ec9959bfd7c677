"""The coordinator and site state machines over the in-process transport."""

import gc
import types

import numpy as np
import pytest

from consortium.config import SimulationConfig
from consortium.errors import ProtocolError, SchemaMismatchError
from consortium.learning.specs import ModelSpec, TrainSettings
from consortium.learning.strategies import FedAvg
from consortium.protocol import messages as m
from consortium.protocol.coordinator import Coordinator
from consortium.run.loop import RoundLoop
from consortium.protocol.site import Site
from consortium.run.simulation import run_simulation
from consortium.transport import InProcessTransport
from tests.conftest import make_splits

TRAIN = TrainSettings(epochs=1, batch_size=16, lr=0.1)


def _setup(rng, n_sites=3, rounds=2, strategy=None, dropout=0.0, **split_kw):
    sites = {f"s{i}": Site(f"s{i}", make_splits(rng, **split_kw), seed=i) for i in range(n_sites)}
    coord = Coordinator(
        list(sites), model=ModelSpec(kind="mlp", hidden=(8,)), train=TRAIN,
        strategy=strategy or FedAvg(), rounds=rounds, seed=0,
    )
    transport = InProcessTransport(sites, dropout=dropout, rng=np.random.default_rng(7))
    return sites, coord, transport


def _sim(tmp_path, **overrides):
    base = {
        "rounds": 3,
        "data": {"dataset": "breast-cancer", "sites": 3},
        "baselines": {"local_only": False, "pooled": False},
        "privacy": {"enabled": False},
    }
    for k, v in overrides.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return run_simulation(SimulationConfig.model_validate(base), out=tmp_path / "run")


def test_fedprox_with_mu_zero_equals_fedavg(tmp_path):
    a = _sim(tmp_path / "a", strategy={"name": "fedavg"})
    b = _sim(tmp_path / "b", strategy={"name": "fedprox", "mu": 0.0})
    c = _sim(tmp_path / "c", strategy={"name": "fedprox", "mu": 1.0})
    assert np.array_equal(a.params, b.params)
    assert not np.array_equal(a.params, c.params)  # the proximal term does reach the sites


def test_same_seed_same_run_and_another_seed_differs(tmp_path):
    a = _sim(tmp_path / "a")
    b = _sim(tmp_path / "b")
    c = _sim(tmp_path / "c", seed=1)
    assert np.array_equal(a.params, b.params)
    assert a.summary["federated"] == b.summary["federated"]
    assert not np.array_equal(a.params, c.params)


def test_coordinator_cannot_reach_any_site_data(rng):
    sites, coord, transport = _setup(rng)
    RoundLoop().run(coord, transport)
    private = []
    for site in sites.values():
        splits = site._Site__data
        private += [t.X for t in (splits.train, splits.validation, splits.test)]
        private += [t.y for t in (splits.train, splits.validation, splits.test)]
    # Walk everything reachable from the coordinator.
    seen, stack = set(), [coord]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        assert not isinstance(obj, (Site, InProcessTransport)), "the coordinator holds a site or the transport"
        if isinstance(obj, np.ndarray):
            assert not any(np.shares_memory(obj, p) for p in private), "a site's rows are reachable"
        if isinstance(obj, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)):
            continue  # code and modules, not state
        stack.extend(gc.get_referents(obj))
    assert len(seen) > 50  # the walk did explore the coordinator's state


def test_partial_participation_and_dropout_complete_with_those_who_answered(rng):
    sites, coord, transport = _setup(rng, n_sites=6, rounds=6, strategy=FedAvg(fraction=0.5), dropout=0.4)
    history = RoundLoop().run(coord, transport)
    assert len(history) == 6
    dropped_any = False
    for r in history:
        assert len(r.selected) == 3
        assert sorted(r.answered + r.dropped) == sorted(r.selected)
        dropped_any |= bool(r.dropped)
        assert r.status == ("ok" if r.answered else "skipped")
        assert r.evaluated_sites == 6  # every site evaluates the new model
    assert dropped_any


def test_the_log_is_taken_by_round_and_kind_and_what_is_left_keeps_its_order(rng):
    """The session takes a round's entries while the next round's plan waits (the write-ahead record
    commits round by round), and the sites' decisions ahead of the round's outcome."""
    sites, coord, transport = _setup(rng, rounds=3)
    loop = RoundLoop()
    while loop.step(coord, transport) is None:  # setup and round 1; round 2 is planned
        pass
    assert [(r.kind, r.round) for r in coord.drain_log(only="evaluation")] == [("evaluation", 1)]
    assert [(r.kind, r.round) for r in coord.drain_log(through=1)] == [("round_plan", 1), ("aggregate", 1)]
    assert [(r.kind, r.round) for r in coord.drain_log()] == [("round_plan", 2)]
    assert coord.drain_log() == []


def test_round_with_too_few_answers_is_skipped_and_keeps_the_model(rng):
    sites, coord, transport = _setup(rng, n_sites=4, rounds=4, strategy=FedAvg(min_sites=4), dropout=0.5)
    loop = RoundLoop()
    loop.step(coord, transport)  # setup
    skipped = 0
    for _ in range(4):
        before = coord.params.copy()
        loop.step(coord, transport)  # fit
        record = loop.step(coord, transport)  # evaluate
        if record.status == "skipped":
            skipped += 1
            assert np.array_equal(before, coord.params)
            assert "min_sites=4" in record.reason
        else:
            assert not np.array_equal(before, coord.params)
    assert skipped > 0


def test_site_refuses_a_model_its_task_does_not_describe(rng):
    sites, coord, transport = _setup(rng)
    loop = RoundLoop()
    loop.step(coord, transport)
    [req, *_] = coord.requests()
    forged_task = req.message.task.model_copy(update={"layout_hash": "ab" * 32})
    forged = m.make_envelope("coordinator", req.recipient, req.round, req.message.model_copy(update={"task": forged_task}))
    reply = sites[req.recipient].handle(forged)
    assert isinstance(reply.message, m.Refusal) and "layout hash" in reply.message.reason


def test_unsolicited_or_malformed_replies_are_not_used(rng):
    sites, coord, transport = _setup(rng)
    loop = RoundLoop()
    loop.step(coord, transport)
    requests = coord.requests()
    with pytest.raises(ProtocolError, match="not asked"):
        coord.receive(m.make_envelope("intruder", "coordinator", 1, m.Refusal(reason="x")))
    size = coord.params.size
    bad = m.FitReply(contribution=m.Tensor.from_numpy(np.ones(size + 1, np.float32)))
    coord.receive(m.make_envelope(requests[0].recipient, "coordinator", 1, bad))
    for req in requests[1:]:
        coord.receive(transport.exchange(req))
    record = coord._record
    coord.close_stage()
    assert requests[0].recipient in record.refused and "where" in record.refused[requests[0].recipient]
    assert record.answered == [r.recipient for r in requests[1:]]


def test_sites_with_different_schemas_are_refused_at_setup(rng):
    sites = {
        "a": Site("a", make_splits(rng), seed=0),
        "b": Site("b", make_splits(rng, names=("f0", "f1", "f2", "f3", "f4", "age")), seed=1),
    }
    coord = Coordinator(list(sites), model=ModelSpec(kind="logistic"), train=TRAIN, strategy=FedAvg(), rounds=1, seed=0)
    with pytest.raises(SchemaMismatchError, match="site 'b'.*'(age|f5)'"):
        RoundLoop().run(coord, InProcessTransport(sites))


def test_every_message_crosses_as_bytes(rng):
    sites, coord, transport = _setup(rng, rounds=1)
    RoundLoop().run(coord, transport)
    assert transport.bytes_sent > 0 and transport.bytes_received > 0
