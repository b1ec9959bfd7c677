"""Federated rounds under secure aggregation: the coordinator reads sums only, and accuracy is kept."""

import numpy as np
import pytest

from consortium.config import SimulationConfig
from consortium.crypto import keys
from consortium.learning.specs import ModelSpec, TrainSettings
from consortium.learning.strategies import FedAvg
from consortium.protocol import messages as m
from consortium.protocol.coordinator import COORDINATOR, Coordinator, SecureAggregation
from consortium.run.loop import RoundLoop
from consortium.protocol.site import Site
from consortium.run.simulation import run_simulation
from consortium.transport import InProcessTransport
from tests.conftest import make_splits

# Simulations of tiny models: one torch thread is fastest (see conftest); their accuracies are the same with
# one thread or two, and each comparison here is between two runs in this process.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RecordingTransport(InProcessTransport):
    """Keeps every reply the coordinator receives: its whole view of the sites."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: list[m.Envelope] = []

    def exchange(self, request):
        reply = super().exchange(request)
        if reply is not None:
            self.seen.append(reply)
        return reply


def _secure_setup(rng, n_sites=4, rounds=2, dropout=0.0, corruption_rate=0.1, **strategy):
    names = [f"s{i}" for i in range(n_sites)]
    ids = {u: keys.generate_ed25519()[0] for u in [*names, COORDINATOR]}
    directory = {u: keys.ed25519_public_bytes(k.public_key()) for u, k in ids.items()}
    sites = {u: Site(u, make_splits(rng), seed=i, identity=ids[u], directory=directory) for i, u in enumerate(names)}
    coord = Coordinator(
        names, model=ModelSpec(kind="mlp", hidden=(8,)), train=TrainSettings(lr=0.1, batch_size=16),
        strategy=FedAvg(**strategy), rounds=rounds, seed=0,
        secure=SecureAggregation(identity=ids[COORDINATOR], directory=directory, corruption_rate=corruption_rate),
    )
    return sites, coord, RecordingTransport(sites, dropout=dropout, rng=np.random.default_rng(3))


def test_the_coordinator_never_receives_a_vector_in_the_clear(rng):
    sites, coord, transport = _secure_setup(rng)
    history = RoundLoop().run(coord, transport)
    assert all(r.status == "ok" for r in history) and history[-1].metrics["accuracy"] > 0
    kinds = {e.message.kind for e in transport.seen}
    assert {"setup_reply", "fit_reply", "evaluate_reply", "secagg_masked", "secagg_reveal"} <= kinds
    for e in transport.seen:
        if isinstance(e.message, (m.SetupReply, m.FitReply, m.EvaluateReply)):
            assert e.message.contribution is None, f"{e.sender} sent its {e.message.kind} vector in the clear"


def test_a_vector_sent_in_the_clear_is_refused_under_secure_aggregation(rng):
    sites, coord, transport = _secure_setup(rng)
    loop = RoundLoop()
    while coord.stage != "fit:request":
        loop.step(coord, transport)
    requests = coord.requests()
    leak = m.FitReply(contribution=m.Tensor.from_numpy(np.zeros(coord.params.size + 2, np.float32)))
    coord.receive(m.make_envelope(requests[0].recipient, COORDINATOR, coord.round, leak))
    assert "in the clear" in coord._state.refused[requests[0].recipient]


@pytest.mark.parametrize("dataset,sites", [("breast-cancer", 3), ("digits", 5)])
def test_secure_aggregation_keeps_accuracy_within_half_a_point(tmp_path, dataset, sites):
    def run(enabled):
        cfg = SimulationConfig.model_validate({
            "data": {"dataset": dataset, "sites": sites},
            "secure_aggregation": {"enabled": enabled},
            "privacy": {"enabled": False},  # compares aggregation alone: DP noise would differ run to run
            "baselines": {"local_only": False, "pooled": False},
        })
        return run_simulation(cfg, out=tmp_path / str(enabled)).summary

    secure, plain = run(True), run(False)
    assert secure["secure_aggregation"]["enabled"] and not plain["secure_aggregation"]["enabled"]
    assert abs(secure["federated"]["accuracy"] - plain["federated"]["accuracy"]) <= 0.005


def test_rounds_complete_with_the_sites_that_stay(rng):
    sites, coord, transport = _secure_setup(rng, n_sites=8, rounds=6, dropout=0.25)
    history = RoundLoop().run(coord, transport)
    included = [r.secure["fit_included"] for r in history]
    assert any(0 < k < 8 for k in included)  # some rounds lost sites and still summed the rest
    for r in history:
        if r.status == "ok":
            assert r.secure["fit_included"] == len(r.answered) and not set(r.answered) & set(r.dropped)
        assert r.evaluated_sites == 8


def test_a_site_without_an_identity_cannot_join(rng):
    site = Site("s0", make_splits(rng), seed=0)
    reply = site.handle(m.make_envelope(COORDINATOR, "s0", 0, m.SetupRequest(secure_aggregation=True)))
    assert reply.message.contribution is None  # held back, not sent
    params_msg = m.SecAggStart.model_construct(kind="secagg_start", phase="setup", params=None, encoding=None)
    out = site.handle(m.make_envelope(COORDINATOR, "s0", 0, params_msg))
    assert isinstance(out.message, m.Refusal) and "identity" in out.message.reason


def test_a_session_id_is_never_reused(rng):
    sites, coord, transport = _secure_setup(rng)
    loop = RoundLoop()
    loop.step(coord, transport)  # setup: request
    [start, *_] = coord.requests()  # setup: advertise_keys
    site = sites[start.recipient]
    assert isinstance(site.handle(start).message, m.SecAggAdvert)
    # The same start again (a replay, or a coordinator reusing masks) is refused.
    again = site.handle(start)
    assert isinstance(again.message, m.Refusal) and "already used" in again.message.reason


class DropAt(RecordingTransport):
    """A site vanishes at one SecAgg+ stage of the fit phase (its request is never answered)."""

    def __init__(self, *a, site: str, kind: str, **kw):
        super().__init__(*a, **kw)
        self.site, self.kind = site, kind
        self.fit_session = False

    def exchange(self, request):
        msg = request.message
        if isinstance(msg, m.SecAggStart):
            self.fit_session = msg.phase == "fit"
        if self.fit_session and request.recipient == self.site and msg.kind == self.kind:
            return None
        return super().exchange(request)


@pytest.mark.parametrize(
    "kind,in_sum", [("secagg_roster", False), ("secagg_deliver", False), ("secagg_survivors", True), ("secagg_unmask", True)]
)
def test_a_site_lost_mid_session_is_removed_exactly(kind, in_sum):
    sites, coord, _ = _secure_setup(np.random.default_rng(99), n_sites=6, rounds=1)
    [record] = RoundLoop().run(coord, DropAt(sites, site="s2", kind=kind))
    assert record.status == "ok", record.reason
    assert ("s2" in record.answered) == in_sum
    assert record.secure["fit_included"] == (6 if in_sum else 5)
    # The same sites and seeds in plain mode, with s2's update lost or kept the same way.
    plain_sites = {}
    data_rng = np.random.default_rng(99)
    for i, u in enumerate(sites):
        plain_sites[u] = Site(u, make_splits(data_rng), seed=i)
    plain = Coordinator(
        list(sites), model=coord.model_spec, train=coord.train, strategy=FedAvg(), rounds=1, seed=0
    )

    class LoseS2(InProcessTransport):
        def exchange(self, request):
            if not in_sum and request.recipient == "s2" and isinstance(request.message, m.FitRequest):
                return None
            return super().exchange(request)

    RoundLoop().run(plain, LoseS2(plain_sites))
    assert np.max(np.abs(coord.params - plain.params)) < 1e-5  # only quantisation separates them


# Three sites, threshold 2, one lost at each stage after its keys were shared. Where it had sent its masked
# input (consistency check, unmask) it stays in the sum: its self mask is rebuilt from the two others' shares.
# A survivor's own self mask needs two shares with one neighbour left: its own (every site keeps a share of
# its seed) and that neighbour's. Lost before it acknowledged the survivor list (deliver, consistency check),
# it leaves each survivor one neighbour to acknowledge: each must count its own signature, which is safe
# only if no site is assumed to collude (corruption_rate 0). Assuming one of three may, a coordinator could
# show the two survivors different lists and unmask one of them: those rounds abort, as they must.
@pytest.mark.parametrize("corruption_rate", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["secagg_deliver", "secagg_survivors", "secagg_unmask"])
def test_three_sites_at_threshold_two_lose_one_at_each_stage(kind, corruption_rate):
    sites, coord, _ = _secure_setup(np.random.default_rng(5), n_sites=3, rounds=1, corruption_rate=corruption_rate,
                                    min_sites=2)
    [record] = RoundLoop().run(coord, DropAt(sites, site="s2", kind=kind))
    fit = next(p for p in coord.secure_plans if p["phase"] == "fit")
    assert fit["threshold"] == 2 and fit["graph"] == "complete"
    if kind != "secagg_unmask" and corruption_rate > 0:
        assert record.status == "skipped" and "unmask" in record.reason, record.reason
        assert all("acknowledged the survivor list" in why for why in record.refused.values()) and record.refused
        return
    assert record.status == "ok", record.reason
    assert record.answered == (["s0", "s1"] if kind == "secagg_deliver" else ["s0", "s1", "s2"])
    assert record.secure["fit_included"] == len(record.answered)
