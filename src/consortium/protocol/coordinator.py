"""The coordinator runtime: an I/O-free state machine that runs the rounds.

It emits request envelopes for the current stage, takes replies, and closes
the stage when the round loop says time is up: whoever has not answered by
then has dropped out. It never holds a site object or a site's data, and it
only ever reads sums.

Each round has phases, each ending in one sum over the sites that took part:
``setup`` (once: schema agreement and feature moments), then per round
``fit`` and ``evaluate``. In plain mode a phase is one stage: the request,
whose replies carry the vectors. Under secure aggregation the replies only
say "ready", and the phase continues through the SecAgg+ stages
(``advertise_keys``, ``share_keys``, ``collect_masked``,
``consistency_check``, ``unmask``) until the sum alone is unmasked.

The parts live beside it: the round records and the phase state in
``coordinator_rounds``, the setup phase's schema check and task in
``coordinator_setup``, the SecAgg+ sessions in ``coordinator_sessions``,
and the ordered steps that turn a fit sum into the next model (norm bound,
site-level DP release, secure sum, robust rule, monitor, strategy) in
``coordinator_pipeline``. Their names stay importable from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Literal

import numpy as np

from consortium.errors import ConfigError, ProtocolError
from consortium.governance.guard import INTEGRITY_RULES
from consortium.governance.incident import Incident, NormMonitor, RunHalted
from consortium.learning.robust import RobustAggregation
from consortium.learning.specs import ModelSpec, TrainSettings
from consortium.learning.strategies import Strategy
from consortium.learning.task import Task, load_task
from consortium.privacy.events import RecordLevelEvent
from consortium.protocol.sitedp import SiteLevelDP
from consortium.protocol import contributions as c
from consortium.protocol import coordinator_sessions as sessions
from consortium.protocol import messages as m
from consortium.protocol.coordinator_pipeline import UpdatePipeline
from consortium.protocol.coordinator_rounds import Phase, PhaseResult, PhaseState, RoundRecord, SecureAggregation
from consortium.protocol.coordinator_setup import initial_task, read_setup
from consortium.protocol.task import data_shape
from consortium.runs import MaskedSpool
from consortium.transcript.log import vector_sha256
from consortium.transcript.records import LogRecord, SessionArchive

__all__ = ["COORDINATOR", "Coordinator", "Phase", "RoundRecord", "SecureAggregation", "UpdatePipeline"]

COORDINATOR = m.COORDINATOR


class Coordinator:
    """Runs ``rounds`` rounds of ``strategy`` over the named sites."""

    def __init__(
        self,
        sites: list[str],
        *,
        model: ModelSpec,
        train: TrainSettings,
        strategy: Strategy,
        rounds: int,
        seed: int,
        secure: SecureAggregation | None = None,
        privacy: RecordLevelEvent | SiteLevelDP | None = None,
        task: Task | None = None,
        monitor: NormMonitor | None = None,
        robust: RobustAggregation | None = None,
        evaluation: m.EvaluationSpec = m.EvaluationSpec(),
    ) -> None:
        if len(set(sites)) != len(sites) or not sites:
            raise ProtocolError("site names must be unique and there must be at least one site")
        if COORDINATOR in sites:
            raise ProtocolError(f"'{COORDINATOR}' is reserved for the coordinator: rename that site")
        if secure is not None:
            missing = [s for s in [*sites, COORDINATOR] if s not in secure.directory]
            if missing:
                raise ConfigError(f"secure aggregation needs every member's public key; '{missing[0]}' has none")
        self.sites = list(sites)
        self.model_spec = model
        self.train = train
        self.strategy = strategy
        self.rounds = rounds
        self.secure = secure
        # Record level: the DP-SGD each round asks of the sites. Site level: the clip, noise and
        # release of DP-FedAvg. Either way the sites check each round's event against their budgets.
        self.privacy = privacy
        self.site_dp = privacy if isinstance(privacy, SiteLevelDP) else None
        if self.site_dp is not None and self.site_dp.distributed and secure is None:
            raise ConfigError("distributed noise is added inside secure aggregation: turn it on, or choose central noise")
        self.evaluation = evaluation
        self.robust = robust
        # Incident response: anomalous updates (``monitor``) and sites' integrity refusals halt the run.
        self.monitor = monitor
        self.update_pipeline().check(len(self.sites))  # the robust rule's tolerance, before any state
        self._rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC00D]))
        self._init_seed = seed
        self.task_def = task if task is not None else load_task("classification", model)
        self.round = 0
        self.members: list[str] = []  # sites that passed setup
        self.excluded: dict[str, str] = {}
        self.task: m.TaskSpec | None = None
        self.params: np.ndarray | None = None
        self.total_rows = 1.0
        self.history: list[RoundRecord] = []
        self.secure_plans: list[dict[str, object]] = []
        self._outstanding: set[str] = set()
        self._record: RoundRecord | None = None
        self._state: PhaseState | None = PhaseState("setup", list(self.sites))
        self._setup_replies: dict[str, m.SetupReply] = {}
        self._log: list[LogRecord] = []
        self._plan_proof: m.PlanProof | None = None
        self._tensor_cache: tuple[np.ndarray, m.Tensor] | None = None
        self._archives: list[SessionArchive] = []
        # Where a fit session's masked inputs go as they arrive (the run's evidence folder), so the coordinator
        # holds their sum alone; None keeps them in memory until the archive is taken.
        self.evidence_spool: Callable[[int, str], MaskedSpool] | None = None
        self._holds: dict[str, str] = {}  # site -> hash of the model it last received and answered
        self.incident: Incident | None = None
        self._purpose: Literal["round", "canary", "monitor"] = "round"

    def update_pipeline(self) -> UpdatePipeline:
        """The ordered steps that make a fit sum the next model, over this coordinator's settings.

        Built from the attributes each time, so that the settings have one home (the drivers read
        ``strategy``, ``monitor`` and the others here) and the pipeline never holds a stale copy."""
        return UpdatePipeline(
            strategy=self.strategy, secure=self.secure, privacy=self.privacy, robust=self.robust, monitor=self.monitor
        )

    @property
    def done(self) -> bool:
        return self._state is None

    @property
    def stage(self) -> str:
        return "done" if self._state is None else f"{self._state.phase}:{self._state.stage}"

    def drain_log(self, *, through: int | None = None, only: str | None = None) -> list[LogRecord]:
        """The transcript entries produced since they were last taken, in order (the driver writes them).

        ``through``: only those of rounds up to this one (a round's plan for the next round stays for
        later); ``only``: only those of this kind. What is not taken stays, in its order, for the next call.
        """
        take = [(through is None or r.round <= through) and (only is None or r.kind == only) for r in self._log]
        out = [r for r, t in zip(self._log, take) if t]
        self._log = [r for r, t in zip(self._log, take) if not t]
        return out

    def drain_archives(self) -> list[SessionArchive]:
        """The fit sessions finished since the last call, for the run's evidence folder."""
        out, self._archives = self._archives, []
        return out

    # -- the three calls the round loop makes -------------------------------------

    def requests(self) -> list[m.Envelope]:
        """Requests for the current stage; each addressee is then expected to answer."""
        st = self._state
        if st is None:
            return []
        if st.stage == "request":
            msg = self._phase_request(st)
            outgoing = {t: msg for t in st.targets}
            if isinstance(msg, m.FitRequest):  # a site that holds this model (it evaluated it) is not sent it again
                light = msg.model_copy(update={"params": None})
                held = self._model_sha256()
                outgoing = {t: light if self._holds.get(t) == held else msg for t in st.targets}
        else:
            outgoing = st.outgoing
        self._outstanding = set(outgoing)
        return [m.make_envelope(COORDINATOR, t, self.round, msg) for t, msg in outgoing.items()]

    def receive(self, envelope: m.Envelope) -> None:
        """Take one reply. A reply that breaks the protocol is recorded as a refusal and not used."""
        st, sender, msg = self._state, envelope.sender, envelope.message
        if st is None or sender not in self._outstanding:
            raise ProtocolError(f"unexpected message from '{sender}' at {self.stage}: it was not asked")
        self._outstanding.discard(sender)
        try:
            if envelope.recipient != COORDINATOR or envelope.round != self.round:
                raise ProtocolError(f"reply for round {envelope.round} to '{envelope.recipient}' rejected")
            if st.phase == "fit" and st.stage == "request":
                self._log_decision(sender, msg)
            if st.stage == "request" and st.phase != "setup":  # which model each site holds: it answered a request with it
                if isinstance(msg, (m.FitReply, m.EvaluateReply)):
                    self._holds[sender] = self._model_sha256()
                else:
                    self._holds.pop(sender, None)
            if isinstance(msg, m.Refusal) and msg.rule in INTEGRITY_RULES and self.incident is None:
                self.incident = Incident(msg.rule, msg.reason, self.round, raised_by=sender, site=sender)
            if isinstance(msg, m.Refusal):
                raise ProtocolError(msg.reason)
            if st.stage == "request":
                self._take_phase_reply(st, sender, msg)
            else:
                sessions.take_reply(st, sender, msg)
        except ProtocolError as exc:
            st.refused[sender] = str(exc)

    def close_stage(self) -> RoundRecord | None:
        """End the current stage with the replies received; returns a record when a round ends."""
        st = self._state
        if st is None:
            return None
        if self.incident is not None:
            self._halt(st)
        result = self._advance(st)
        if result is None:
            return None  # the phase goes on (secure aggregation)
        return self._finish_phase(st, result)

    def _log_decision(self, sender: str, msg: m.BaseModel) -> None:
        decision = getattr(msg, "decision", None)
        if decision is None:
            return
        if decision.site != sender or decision.round != self.round:
            raise ProtocolError(f"a decision signed for '{decision.site}' in round {decision.round} does not fit this reply")
        self._log.append(LogRecord("site_decision", self.round, sender, dict(decision.body), decision.signature))

    # -- phases -------------------------------------------------------------------

    def _phase_request(self, st: PhaseState) -> m.BaseModel:
        secure = self.secure is not None
        if st.phase == "setup":
            return m.SetupRequest(secure_aggregation=secure)
        if st.phase == "fit":
            site_dp = self.site_dp
            return m.FitRequest(
                task=self._task(),
                params=self._params_tensor(),
                model_sha256=self._model_sha256(),
                train=self.train,
                proximal_mu=self.strategy.proximal_mu,
                weighting="uniform" if site_dp else self.strategy.weighting,
                weight_scale=self.total_rows if secure else 1.0,
                secure_aggregation=secure,
                update_clip=self.secure.update_clip if self.secure else None,
                norm_bound=self.robust.norm_bound if self.robust else None,
                privacy=st.event,
                plan=self._plan_proof,
            )
        return m.EvaluateRequest(
            task=self._task(), params=self._params_tensor(), secure_aggregation=secure, evaluation=self._evaluation_spec(),
            purpose=self._purpose,
        )

    def _evaluation_spec(self) -> m.EvaluationSpec:
        """What the sites measure; the sensitive groups split at the consortium's mean unless a threshold was set."""
        ev = self.evaluation
        if ev.sensitive_feature is None or ev.sensitive_threshold is not None:
            return ev
        mean = self._task().mean.to_numpy()
        if ev.sensitive_feature >= mean.shape[0]:
            raise ConfigError(f"the sensitive feature's index {ev.sensitive_feature} is beyond the data's {mean.shape[0]} features")
        return ev.model_copy(update={"sensitive_threshold": float(mean[ev.sensitive_feature])})

    def _expected_length(self, phase: Phase) -> int | None:
        if phase == "fit":
            n_params = self._params().shape[0]
            return self.site_dp.vector_length(n_params) if self.site_dp else n_params + 2
        if phase == "evaluate":
            return self.task_def.statistics_length(data_shape(self._task()))
        return None  # setup: known from the schema, checked in _finish_setup

    def _take_phase_reply(self, st: PhaseState, sender: str, msg: m.BaseModel) -> None:
        expected = {"setup": m.SetupReply, "fit": m.FitReply, "evaluate": m.EvaluateReply}[st.phase]
        if not isinstance(msg, expected):
            raise ProtocolError(f"sent '{msg.kind}' where '{expected.__name__}' was expected")
        if isinstance(msg, m.SetupReply):
            self._setup_replies[sender] = msg
        if self.secure is not None:
            if msg.contribution is not None:
                raise ProtocolError("sent its vector in the clear although secure aggregation is on")
        else:
            if msg.contribution is None:
                raise ProtocolError("sent no vector")
            vector = msg.contribution.to_numpy().astype(np.float64)
            length = self._expected_length(st.phase)
            if length is not None and vector.shape != (length,):
                raise ProtocolError(f"a vector of {vector.shape[0]} values where {length} were expected")
            if not np.all(np.isfinite(vector)):
                raise ProtocolError("its vector contains NaN or infinity")
            st.plain[sender] = vector
        st.ready.append(sender)

    def _advance(self, st: PhaseState) -> PhaseResult | None:
        """Close one stage; a result when the phase's sum is known (or the phase failed)."""
        if self.secure is None:
            if not st.plain:
                return PhaseResult(None, [], "no site answered")
            if len({v.shape for v in st.plain.values()}) > 1:
                return PhaseResult(None, [], "the sites' vectors differ in length")
            return PhaseResult(sum(st.plain.values()), list(st.plain))
        return sessions.close_stage(
            st, self.secure, rnd=self.round, site_dp=self.site_dp, length=lambda: self._session_length(st),
            log=self._log, archives=self._archives, plans=self.secure_plans, spool=self.evidence_spool,
        )

    def _session_length(self, st: PhaseState) -> int:
        """The length of the vectors a phase's secure session sums (setup: from the first ready site's schema)."""
        length = self._expected_length(st.phase)
        if length is not None:  # fit and evaluate
            return length
        first = self._setup_replies[sorted(st.ready)[0]]
        return c.setup_length(len(first.feature_names), regression=not first.classes)

    def _finish_phase(self, st: PhaseState, result: PhaseResult) -> RoundRecord | None:
        if st.phase == "setup":
            self._finish_setup(st, result)
            self._open_fit(1)
            return None
        record = self._record
        assert record is not None
        if self.secure is not None:
            record.secure = record.secure or {}
            record.secure[f"{st.phase}_included"] = len(result.included)
        if st.phase == "fit":
            self._finish_fit(st, result, record)
            if self.incident is not None:
                self._halt(st)
            self._state = PhaseState("evaluate", list(self.members))
            return None
        self._finish_evaluate(result, record)
        self.history.append(record)
        if self.round >= self.rounds or self._purpose != "round":
            self._state = None
        else:
            self._open_fit(self.round + 1)
        return record

    def open_evaluation(
        self, task: m.TaskSpec, params: np.ndarray, sites: list[str], *, rnd: int, purpose: Literal["canary", "monitor"]
    ) -> None:
        """An evaluation outside the rounds (the model lifecycle): ``params`` evaluated by ``sites``, on their
        validation splits (``canary``) or test splits (``monitor``), summed as any round's evaluation is.
        The round loop runs it; its record is then the last in ``history`` and the coordinator is done."""
        self.task, self.params, self.members, self.round = task, params, sorted(sites), rnd
        self._purpose = purpose
        self._record = RoundRecord(round=rnd, selected=sorted(sites))
        self._state = PhaseState("evaluate", sorted(sites))

    def _halt(self, st: PhaseState) -> None:
        """Stop on the incident: end the run here and raise it for the driver."""
        assert self.incident is not None
        if st.phase == "fit" and self._record is not None and self._record not in self.history:
            self._record.status, self._record.reason = "halted", f"halted: {self.incident.cause}"
            self._record.refused = dict(st.refused)
            self.history.append(self._record)
        self._state = None  # the driver records the halt in the transcript, with the model it stopped at
        raise RunHalted(self.incident)

    def _open_fit(self, rnd: int) -> None:
        """Plan round ``rnd``: its cohort and privacy event, logged before any request goes out."""
        self.round = rnd
        st = PhaseState("fit", self.strategy.select(rnd, self.members, self._rng))
        st.event = self.site_dp.event() if self.site_dp else self._record_event(len(st.targets))
        self._state, self._plan_proof = st, None
        self._record = RoundRecord(round=rnd, selected=list(st.targets))
        self._log.append(LogRecord("round_plan", rnd, COORDINATOR, {
            "model_sha256": self._model_sha256(),
            "cohort": sorted(st.targets),
            "privacy_event": st.event.model_dump(mode="json") if st.event is not None else None,
            "secure_aggregation": self.secure is not None,
            "strategy": self.strategy.describe(),
            "robust": self.robust.describe() if self.robust is not None else None,
        }))

    # -- checkpoints ------------------------------------------------------------

    def checkpoint(self) -> tuple[dict[str, object], dict[str, np.ndarray]]:
        """Everything the coordinator carries between rounds: plain JSON, and arrays (for safetensors)."""
        task = self._task()
        meta = {
            "round": self.round,
            "members": self.members,
            "excluded": self.excluded,
            "total_rows": self.total_rows,
            "task": task.model_dump(mode="json", exclude={"mean", "scale"}),
            "history": [
                {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.to_json().items()}
                for r in self.history
            ],
            "secure_plans": self.secure_plans,
            "monitor": self.monitor.state() if self.monitor is not None else None,
            "site_dp_clip": self.site_dp.clip if self.site_dp is not None else None,
        }
        arrays = {
            "params": self._params(),
            "task.mean": task.mean.to_numpy(),
            "task.scale": task.scale.to_numpy(),
            **{f"strategy.{k}": v for k, v in self.strategy.state().items()},
        }
        return meta, arrays

    def restore(self, meta: dict[str, object], arrays: dict[str, np.ndarray], *, open_next: bool = True) -> None:
        """Continue from ``checkpoint()``'s output: the next round is planned (and logged) at once,
        unless ``open_next`` is False (then ``open_next()`` does it)."""
        self.round = int(meta["round"])  # type: ignore[call-overload]
        self.members = list(meta["members"])  # type: ignore[call-overload]
        self.excluded = dict(meta["excluded"])  # type: ignore[call-overload]
        self.total_rows = float(meta["total_rows"])  # type: ignore[arg-type]
        self.task = m.TaskSpec.model_validate({
            **meta["task"],  # type: ignore[dict-item]
            "mean": m.Tensor.from_numpy(arrays["task.mean"]),
            "scale": m.Tensor.from_numpy(arrays["task.scale"]),
        })
        self.params = arrays["params"]
        self.history = [RoundRecord.from_json(r) for r in meta["history"]]  # type: ignore[union-attr]
        self.secure_plans = list(meta["secure_plans"])  # type: ignore[call-overload]
        if self.monitor is not None and meta["monitor"] is not None:
            self.monitor.load_state(meta["monitor"])  # type: ignore[arg-type]
        if self.site_dp is not None and meta["site_dp_clip"] is not None:
            self.site_dp.clip = float(meta["site_dp_clip"])  # type: ignore[arg-type]
        self.strategy.load_state({k.removeprefix("strategy."): v for k, v in arrays.items() if k.startswith("strategy.")})
        self._setup_replies, self.incident, self._state = {}, None, None
        if open_next:
            self.open_next()

    def open_next(self) -> None:
        """Between rounds: plan the next round, or end the run after the last."""
        if self.round >= self.rounds:
            self._state = None
        else:
            self._open_fit(self.round + 1)

    def skip_interrupted(self, reason: str, cohort: list[str], unaccounted: dict[str, object] | None = None) -> RoundRecord:
        """Between rounds, after a restart: the next round, whose plan went out to ``cohort`` before the
        coordinator stopped, ends skipped and logged as such, with the model unchanged. ``unaccounted``:
        the planned privacy event of each site whose decision the crash lost (it may have paid it)."""
        rnd = self.round + 1
        record = RoundRecord(round=rnd, selected=sorted(cohort), dropped=sorted(cohort), status="skipped", reason=reason)
        model = self._model_sha256()
        self._log.append(LogRecord("aggregate", rnd, COORDINATOR, {
            "status": record.status,
            "reason": reason,
            "included": [],
            "dropped": record.dropped,
            "refused": [],
            "sum_sha256": None,
            "parent_model_sha256": model,
            "model_sha256": model,
            "privacy": None,
            **({"unaccounted": unaccounted} if unaccounted else {}),
        }))
        self.history.append(record)
        self.round = rnd
        return record

    @property
    def plan_proven(self) -> bool:
        return self._plan_proof is not None

    def attach_plan_proof(self, proof: m.PlanProof, cosigners: Collection[str] | None = None) -> None:
        """The transcript's proof of this round's plan, which every fit request then carries.

        ``cosigners``: the sites that co-signed the head it is proven against. A site of the cohort that did
        not (it was away then) holds an older head, so it could not check the plan: it is not asked this round,
        and sits it out as a dropped site that paid nothing, instead of refusing the proof as a breach."""
        if self.stage != "fit:request" or proof.entry.round != self.round or proof.entry.kind != "round_plan":
            raise ProtocolError(f"a plan proof for round {proof.entry.round} does not fit {self.stage} of round {self.round}")
        self._plan_proof = proof
        if cosigners is not None:
            assert self._state is not None
            self._state.targets = [t for t in self._state.targets if t in cosigners]

    def _finish_setup(self, st: PhaseState, result: PhaseResult) -> None:
        for site in self.sites:
            if site not in result.included:
                self.excluded[site] = st.refused.get(site, "did not answer setup")
        sums = read_setup({s: self._setup_replies[s] for s in st.ready}, result)
        self.members, self.total_rows = sums.members, sums.total_rows
        self.task, self.params = initial_task(sums, self.model_spec, self.task_def, self._init_seed)

    def _finish_fit(self, st: PhaseState, result: PhaseResult, record: RoundRecord) -> None:
        parent = self._model_sha256()
        outcome = self.update_pipeline().run(st, result, record, self._params(), self.round)
        if outcome.params is not None:
            self.params = outcome.params
        if outcome.incident is not None:
            self.incident = outcome.incident
        self._log.append(LogRecord("aggregate", self.round, COORDINATOR, {
            "status": record.status,
            "reason": record.reason,
            "included": record.answered,
            "dropped": record.dropped,
            "refused": sorted(record.refused),
            "sum_sha256": None if result.total is None else vector_sha256(result.total),
            "parent_model_sha256": parent,
            "model_sha256": self._model_sha256(),
            "privacy": record.privacy,
            "robust": record.robust,
            **self._unaccounted(st),
        }))

    @staticmethod
    def _unaccounted(st: PhaseState) -> dict[str, object]:
        """The planned event of each site asked that never answered the request: it may have paid it (a site
        pays before it trains) with its signed decision lost on the way, so the run's epsilon bound counts it."""
        silent = sorted(set(st.targets) - set(st.ready) - set(st.refused))  # asked, never answered
        if st.event is None or not silent:
            return {}
        return {"unaccounted": {s: st.event.model_dump(mode="json") for s in silent}}

    def _finish_evaluate(self, result: PhaseResult, record: RoundRecord) -> None:
        record.evaluated_sites = len(result.included)
        if result.total is None:
            record.evaluation_note = result.reason
        else:
            ev = self.evaluation
            summed = self.task_def.summarise(
                result.total, data_shape(self._task()),
                groups=ev.sensitive_feature is not None, shift=ev.shift_noise is not None,
            )
            record.metrics = summed.metrics
            record.evaluation = dict(summed.details)
        self._log.append(LogRecord("evaluation", self.round, COORDINATOR, {
            "model_sha256": self._model_sha256(),
            "evaluated_sites": record.evaluated_sites,
            "note": record.evaluation_note,
            "metrics": {k: (v if math.isfinite(v) else None) for k, v in record.metrics.items()},
            **({"purpose": self._purpose, "sites": sorted(result.included)} if self._purpose != "round" else {}),
        }))

    # -- helpers ------------------------------------------------------------------

    def _record_event(self, cohort: int) -> RecordLevelEvent | None:
        if not isinstance(self.privacy, RecordLevelEvent):
            return None
        return self.privacy.model_copy(update={"cohort": cohort})

    def _task(self) -> m.TaskSpec:
        if self.task is None:
            raise ProtocolError("the task is not set up yet: run the setup stage first")
        return self.task

    def _params_tensor(self) -> m.Tensor:
        """The global model as sent, built (and hashed) once per model version."""
        params = self._params()
        if self._tensor_cache is None or self._tensor_cache[0] is not params:
            self._tensor_cache = (params, m.Tensor.from_numpy(np.asarray(params, dtype=np.float32)))
        return self._tensor_cache[1]

    def _model_sha256(self) -> str:
        """The model's hash in the transcript: SHA-256 of its float32 bytes, as its tensor carries it."""
        return self._params_tensor().sha256

    def _params(self) -> np.ndarray:
        if self.params is None:
            raise ProtocolError("no global model yet: run the setup stage first")
        return self.params
