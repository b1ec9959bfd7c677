"""A coordinator killed at any named crash point restarts and completes or cleanly aborts the round.

The loop runs the in-process consortium (the simulation's sites, which keep
their ledgers in the run folder as a site process keeps them in its state
folder) with the coordinator's state store and the same recovery code as
``serve --recover``: at each point of ``consortium.crashpoints`` the
coordinator "dies" (the hook raises instead of ``os._exit``), a new
coordinator object recovers the run folder, and the run must then verify,
keep every ledger under its cap, pay no round twice, and report an epsilon
bound no smaller than any ledger's. ``tests/test_deploy.py`` kills a real
``consortium serve`` process at a crash point and recovers it over HTTPS.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from sqlalchemy import create_engine, text

from consortium import crashpoints
from consortium.config import SimulationConfig
from consortium.crypto import keys
from consortium.deploy.state import CoordinatorState
from consortium.protocol.coordinator import COORDINATOR
from consortium.run.orchestrator import CoordinatorRun
from consortium.run.simulation import Simulation
from consortium.audit.verify import verify_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_KEYS: dict[str, object] = {}
CONFIG = {
    "data": {"dataset": "breast-cancer", "sites": 3},
    "rounds": 2,
    "participation": {"min_sites": 2},
    "model": {"kind": "logistic"},
    "privacy": {"test_seed": 7, "epsilon": 4.0, "noise_multiplier": 1.5},  # no calibration: a cheap run
    "baselines": {"local_only": False, "pooled": False},
}


class Crash(BaseException):
    """The coordinator's process ends here (a BaseException: nothing on the way up may catch it)."""


class Recoverable(Simulation):
    """The simulated consortium with the coordinator's state store, as ``serve`` keeps it; every coordinator
    object of one test signs with the same keys, as a restarted service reads them from its kit."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.state = CoordinatorState(f"sqlite:///{self.run_dir / 'coordinator.sqlite'}")

    def _member_keys(self, plan):
        return {n: _KEYS.setdefault(n, keys.generate_ed25519()[0]) for n in [*plan.names, COORDINATOR]}


def _crash_at(monkeypatch, point: str, nth: int) -> list[int]:
    seen = []

    def reached(name: str) -> None:
        if name == point:
            seen.append(1)
            if len(seen) == nth:
                raise Crash(name)

    monkeypatch.setattr(crashpoints, "reached", reached)
    return seen


def _ledgers(run_dir) -> dict[str, list[int]]:
    """Each site's ledger: the round of every row it paid."""
    out = {}
    for db in sorted(run_dir.glob("sites/*/budget.sqlite")):
        with create_engine(f"sqlite:///{db}").connect() as c:
            out[db.parent.name] = [r[0] for r in c.execute(text("SELECT round FROM spent ORDER BY id"))]
    return out


# Where in the run each point is hit: the round-level points in round 2, once round 1 is complete and paid.
WHEN = {"setup_committed": 1, "model_written": 1, "final_appended": 1}
# What recovery makes of round 2 at each point: completed from the committed record, or aborted (skipped);
# and whether the skipped round lists decisions the crash lost (its plan was out, under a co-signed head).
OUTCOME = {
    "setup_committed": ("ok", False), "plan_appended": ("skipped", False), "plan_cosigned": ("skipped", True),
    "decisions_appended": ("skipped", False), "round_archived": ("skipped", False), "round_committed": ("ok", False),
    "round_appending": ("ok", False), "round_appended": ("ok", False), "round_cosigned": ("ok", False),
    "model_written": ("ok", False), "final_appended": ("ok", False),
}


@pytest.mark.parametrize("point", list(crashpoints.CRASH_POINTS))
def test_a_coordinator_killed_at_each_crash_point_recovers(point, tmp_path, monkeypatch):
    config = SimulationConfig.model_validate(CONFIG)
    run_dir = tmp_path / "run"
    seen = _crash_at(monkeypatch, point, WHEN.get(point, 2))
    with pytest.raises(Crash):
        Recoverable(config, out=run_dir).run()
    monkeypatch.setattr(crashpoints, "reached", lambda name: None)
    assert seen, f"the run never reached {point}"

    result = Recoverable(config, out=run_dir, resume=True).run()
    summary = result.summary
    assert summary["status"] == "completed", summary.get("halt")
    report = verify_run(run_dir)
    assert report.status == "completed"
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(1, len(rounds) + 1))
    status, lost = OUTCOME[point]
    assert [r["status"] for r in rounds] == ["ok", status] and rounds[-1]["round"] == config.rounds
    entries = [json.loads(line) for line in (run_dir / "transcript.jsonl").read_text().splitlines()]
    unaccounted = [e["body"].get("unaccounted") for e in entries if e["kind"] == "aggregate" and e["round"] == 2]
    assert bool(unaccounted[0]) == lost, unaccounted
    plans = Counter(e["round"] for e in entries if e["kind"] == "round_plan")
    outcomes = Counter(e["round"] for e in entries if e["kind"] == "aggregate")
    assert plans == outcomes and set(plans.values()) == {1}  # one plan and one outcome per round, none twice
    cap = config.privacy.epsilon
    ledgers = _ledgers(run_dir)
    privacy = summary["privacy"]
    for site, paid in ledgers.items():
        assert len(paid) == len(set(paid)), f"{site} paid a round twice: {paid}"
        spent = privacy["epsilon_per_site"][site]
        assert 0 < spent <= cap + 1e-9
        assert privacy["epsilon_bound_per_site"][site] >= spent - 1e-9
        assert report.epsilon_per_site[site] == pytest.approx(spent)


def test_a_round_a_site_paid_for_counts_although_its_decision_was_lost(tmp_path):
    """site-1 accepts round 1's plan and pays for it, and its reply (its signed decision) never arrives. The
    epsilon the run can prove from signed events misses that round; the bound it reports does not."""
    config = SimulationConfig.model_validate(CONFIG)

    class Signed(Recoverable):
        _epsilon = CoordinatorRun._epsilon  # what a served run reports: the signed events, not the ledgers it cannot see

    run = Signed(config, out=tmp_path / "run")
    site = run.names[0]
    exchange = run.transport.exchange

    def lose_the_reply(request):
        reply = exchange(request)  # the site handles the request: it pays, trains and answers
        lost = request.recipient == site and request.round == 1 and request.message.kind == "fit_request"
        return None if lost else reply

    run.transport.exchange = lose_the_reply
    summary = run.run().summary
    assert summary["status"] == "completed" and verify_run(tmp_path / "run").status == "completed"
    paid = _ledgers(tmp_path / "run")[site]
    assert paid == [1, 2]
    spent = run._ledgers[site].spent()
    privacy = summary["privacy"]
    assert privacy["epsilon_per_site"][site] < spent - 1e-6  # one signed decision short
    assert privacy["epsilon_bound_per_site"][site] >= spent - 1e-9
    assert all(privacy["epsilon_bound_per_site"][s] == privacy["epsilon_per_site"][s] for s in run.names[1:])
