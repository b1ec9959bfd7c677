"""The coordinator runtime: an I/O-free state machine that runs the rounds.

It emits request envelopes for the current stage, takes replies, and closes
the stage when the round loop says time is up: whoever has not answered by
then has dropped out. It never holds a site object or a site's data; what it
learns is what the replies carry, and it only uses their sums.

Stages: ``setup`` (feature statistics, schema agreement), then for each round
``fit`` and ``evaluate``, then ``done``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from consortium.errors import ProtocolError, RoundFailed, SchemaMismatchError
from consortium.learning.adapter import ModelAdapter
from consortium.learning.models import ModelSpec
from consortium.learning.strategies import FedAvg
from consortium.learning.training import EvalStats, TrainSettings
from consortium.protocol import messages as m
from consortium.protocol.task import ModelBuilder, build_task_model

COORDINATOR = "coordinator"

Stage = Literal["setup", "fit", "evaluate", "done"]


@dataclass
class RoundRecord:
    """What happened in one round, as the coordinator saw it."""

    round: int
    selected: list[str]
    answered: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    status: Literal["ok", "skipped"] = "ok"
    reason: str = ""
    train_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    evaluated_sites: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "round": self.round,
            "status": self.status,
            "reason": self.reason,
            "selected": self.selected,
            "answered": self.answered,
            "dropped": self.dropped,
            "refused": self.refused,
            "train_loss": self.train_loss,
            "evaluated_sites": self.evaluated_sites,
            **self.metrics,
        }


class Coordinator:
    """Runs ``rounds`` rounds of ``strategy`` over the named sites."""

    def __init__(
        self,
        sites: list[str],
        *,
        model: ModelSpec,
        train: TrainSettings,
        strategy: FedAvg,
        rounds: int,
        seed: int,
        model_builder: ModelBuilder = build_task_model,
    ) -> None:
        if len(set(sites)) != len(sites) or not sites:
            raise ProtocolError("site names must be unique and there must be at least one site")
        if COORDINATOR in sites:
            raise ProtocolError(f"'{COORDINATOR}' is reserved for the coordinator: rename that site")
        self.sites = list(sites)
        self.model_spec = model
        self.train = train
        self.strategy = strategy
        self.rounds = rounds
        self._rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC00D]))
        self._init_seed = seed
        self._build = model_builder
        self.stage: Stage = "setup"
        self.round = 0
        self.members: list[str] = []  # sites that passed setup
        self.excluded: dict[str, str] = {}
        self.task: m.TaskSpec | None = None
        self.params: np.ndarray | None = None
        self.history: list[RoundRecord] = []
        self._outstanding: set[str] = set()
        self._replies: dict[str, m.BaseModel] = {}
        self._updates: dict[str, np.ndarray] = {}
        self._record: RoundRecord | None = None

    @property
    def done(self) -> bool:
        return self.stage == "done"

    # -- the three calls the round loop makes -------------------------------------

    def requests(self) -> list[m.Envelope]:
        """Requests for the current stage; each addressee is then expected to answer."""
        if self.stage == "setup":
            targets, msg = self.sites, m.SetupRequest()
        elif self.stage == "fit":
            targets = self.strategy.select(self.round, self.members, self._rng)
            self._record = RoundRecord(round=self.round, selected=list(targets))
            msg = m.FitRequest(
                task=self._task(),
                params=m.Tensor.from_numpy(self._params()),
                train=self.train,
                proximal_mu=self.strategy.proximal_mu,
                weighting=self.strategy.weighting,
            )
        elif self.stage == "evaluate":
            targets = self.members
            msg = m.EvaluateRequest(task=self._task(), params=m.Tensor.from_numpy(self._params()))
        else:
            return []
        self._outstanding = set(targets)
        self._replies = {}
        self._updates = {}
        return [m.make_envelope(COORDINATOR, t, self.round, msg) for t in targets]

    def receive(self, envelope: m.Envelope) -> None:
        """Take one reply. A reply that breaks the protocol is recorded as a refusal and not used."""
        sender = envelope.sender
        if sender not in self._outstanding:
            raise ProtocolError(f"unexpected message from '{sender}' in stage {self.stage}: it was not asked")
        self._outstanding.discard(sender)
        msg = envelope.message
        expected = {"setup": m.SetupReply, "fit": m.FitReply, "evaluate": m.EvaluateReply}[self.stage]
        if envelope.recipient != COORDINATOR or envelope.round != self.round:
            msg = m.Refusal(reason=f"reply for round {envelope.round} to '{envelope.recipient}' rejected")
        elif isinstance(msg, m.FitReply):
            try:
                self._updates[sender] = self._decode_update(msg)
            except ProtocolError as exc:
                msg = m.Refusal(reason=f"update rejected: {exc}")
        elif not isinstance(msg, (expected, m.Refusal)):
            msg = m.Refusal(reason=f"sent '{msg.kind}' where '{expected.__name__}' was expected")
        self._replies[sender] = msg

    def close_stage(self) -> RoundRecord | None:
        """End the current stage with the replies received; returns a record when a round ends."""
        if self.stage == "setup":
            self._close_setup()
            self.stage, self.round = "fit", 1
            return None
        if self.stage == "fit":
            self._close_fit()
            self.stage = "evaluate"
            return None
        if self.stage == "evaluate":
            record = self._close_evaluate()
            self.history.append(record)
            if self.round >= self.rounds:
                self.stage = "done"
            else:
                self.stage, self.round = "fit", self.round + 1
            return record
        return None

    # -- stage logic --------------------------------------------------------------

    def _close_setup(self) -> None:
        replies = {s: r for s, r in self._replies.items() if isinstance(r, m.SetupReply)}
        for site in self.sites:
            if site not in replies:
                r = self._replies.get(site)
                self.excluded[site] = r.reason if isinstance(r, m.Refusal) else "did not answer setup"
        if not replies:
            raise RoundFailed("no site answered setup: check that the sites are running and reachable")
        first_site, first = next(iter(replies.items()))
        for site, r in replies.items():
            if r.schema_fingerprint != first.schema_fingerprint:
                diff = sorted(set(r.feature_names) ^ set(first.feature_names)) or ["classes"]
                raise SchemaMismatchError(
                    f"site '{site}' disagrees with '{first_site}' on its data schema (first difference: "
                    f"'{diff[0]}'): every site must declare the same schema"
                )
        self.members = list(replies)
        n = sum(r.n_train for r in replies.values())
        total = sum(r.feature_sum.to_numpy().astype(np.float64) for r in replies.values())
        total_sq = sum(r.feature_sumsq.to_numpy().astype(np.float64) for r in replies.values())
        mean = total / n
        var = np.maximum(total_sq / n - mean * mean, 0.0)
        scale = np.sqrt(var)
        scale[scale < 1e-6] = 1.0  # constant features pass through unscaled
        provisional = m.TaskSpec(
            model=self.model_spec,
            n_features=len(first.feature_names),
            n_classes=len(first.classes),
            image_shape=first.image_shape,
            mean=m.Tensor.from_numpy(mean.astype(np.float32)),
            scale=m.Tensor.from_numpy(scale.astype(np.float32)),
            layout_hash="0" * 64,
        )
        adapter = ModelAdapter(self._build(provisional, self._init_seed))
        self.task = provisional.model_copy(update={"layout_hash": adapter.layout_hash})
        self.params = adapter.get_vector()

    def _decode_update(self, msg: m.FitReply) -> np.ndarray:
        size = self._params().shape[0]
        if msg.weighted_update.dtype != "float32" or msg.weighted_update.shape != (size,):
            raise ProtocolError(
                f"shape {list(msg.weighted_update.shape)} ({msg.weighted_update.dtype}) does not match "
                f"the model's {size} float32 parameters"
            )
        vec = msg.weighted_update.to_numpy()
        if not np.all(np.isfinite(vec)):
            raise ProtocolError("it contains NaN or infinity")
        return vec

    def _close_fit(self) -> None:
        record = self._record
        assert record is not None
        updates: list[m.FitReply] = []
        for site in record.selected:
            r = self._replies.get(site)
            if isinstance(r, m.FitReply):
                record.answered.append(site)
                updates.append(r)
            elif isinstance(r, m.Refusal):
                record.refused[site] = r.reason
            else:
                record.dropped.append(site)
        if len(updates) < self.strategy.min_sites:
            record.status = "skipped"
            record.reason = (
                f"only {len(updates)} of {len(record.selected)} sites returned an update "
                f"(min_sites={self.strategy.min_sites}): the model is unchanged this round"
            )
            return
        total = np.zeros(self._params().shape[0], dtype=np.float64)
        for site in record.answered:
            total += self._updates[site]
        weight = sum(r.weight for r in updates)
        record.train_loss = sum(r.train_loss_sum for r in updates) / sum(r.num_examples for r in updates)
        mean_update = (total / weight).astype(np.float32)
        self.params = self.strategy.apply(self.round, self._params(), mean_update)

    def _close_evaluate(self) -> RoundRecord:
        record = self._record
        assert record is not None
        stats: EvalStats | None = None
        for site in self.members:
            r = self._replies.get(site)
            if isinstance(r, m.EvaluateReply):
                hist = None if r.score_hist is None else r.score_hist.to_numpy()
                s = EvalStats(r.n, r.correct, r.loss_sum, hist)
                stats = s if stats is None else stats + s
                record.evaluated_sites += 1
        if stats is not None:
            record.metrics = stats.metrics()
        return record

    # -- helpers ------------------------------------------------------------------

    def _task(self) -> m.TaskSpec:
        if self.task is None:
            raise ProtocolError("the task is not set up yet: run the setup stage first")
        return self.task

    def _params(self) -> np.ndarray:
        if self.params is None:
            raise ProtocolError("no global model yet: run the setup stage first")
        return self.params
