"""A site's training part: setup statistics, fit (local training, the round's norm bound, site-level DP)
and evaluation, each answered with one summable vector (kept for secure aggregation, or sent plain).

The local training itself goes through the site's ``LocalTrainer`` (``consortium.protocol.trainer``),
called by the site's ``_local_update`` hook; what is done with the delta afterwards stays here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from consortium.data import Records, Splits
from consortium.errors import ModelError, ProtocolError
from consortium.governance.guard import Refused, SiteGuard
from consortium.learning.adapter import ModelAdapter
from consortium.learning.robust import bound_norm
from consortium.learning.task import EvalOptions, Task, evaluate_records
from consortium.learning.training import Groups
from consortium.privacy.events import SiteLevelEvent
from consortium.protocol import contributions as c
from consortium.protocol import messages as m
from consortium.protocol.task import build_model, data_shape
from consortium.transcript.log import vector_sha256
from consortium.wire import Tensor

if TYPE_CHECKING:
    from consortium.protocol.site_sessions import SecAggSessions
    from consortium.protocol.site_witness import Witness

#: (round, phase, vector, secure) -> what the reply carries: the site's ``_contribute`` hook.
Contribute = Callable[[int, str, np.ndarray, bool], "Tensor | None"]
#: (round, request, module, adapter, global parameters) -> (delta, loss): the site's ``_local_update`` hook.
LocalUpdate = Callable[[int, m.FitRequest, torch.nn.Module, ModelAdapter, np.ndarray], tuple[np.ndarray, float]]


def table_fingerprint(table: Records) -> str:
    """SHA-256 of what must agree across sites: feature names, classes, image shape, the features that may
    be missing (a regression's classes are empty)."""
    layout: dict[str, object] = {
        "features": list(table.feature_names), "classes": list(table.classes), "image_shape": table.image_shape,
    }
    if table.imputed:  # only where declared, so that a table without missing values keeps its fingerprint
        layout["imputed"] = list(table.imputed)
    canonical = json.dumps(
        layout,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def model_sha256(params: Tensor) -> str:
    """A received model's transcript hash: float32 bytes, whose SHA-256 the wire already checked on arrival."""
    return params.sha256 if params.dtype == "float32" else vector_sha256(params.to_numpy())


class EvaluationJournal:
    """A site's own record of how each round's model did on its test split: kept by the site, never sent.

    One JSON line per evaluated round, appended and flushed to disk; a torn
    last line (a crash mid-write) is skipped by whoever reads it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, rnd: int, n: int, metrics: dict[str, float]) -> None:
        finite = {k: (float(v) if math.isfinite(v) else None) for k, v in metrics.items()}
        line = json.dumps({"round": rnd, "n": n, **finite}, allow_nan=False)
        with open(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a") as f:  # the site's own: 0600
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


class Training:
    """Setup, fit and evaluate for one site (see the module docstring).

    The splits are held in name-mangled attributes and nothing here returns them; the training
    split's rows reach only the site's ``local_update`` hook, which holds them itself.
    """

    def __init__(
        self,
        data: Splits,
        *,
        task: Task,
        task_sha256: str,
        guard: SiteGuard,
        witness: Witness,
        sessions: SecAggSessions,
        journal: EvaluationJournal | None,
        strict: bool,
        local_update: LocalUpdate,
        contribute: Contribute,
        rng: Callable[[int, str], np.random.Generator],
    ) -> None:
        self.__train = data.train
        self.__valid = data.validation
        self.__test = data.test
        self._task = task
        self._task_sha256 = task_sha256
        self._guard = guard
        self._witness = witness
        self._sessions = sessions
        self._journal = journal
        self._strict = strict
        self._local_update = local_update
        self._contribute = contribute
        self._rng = rng
        self.model: tuple[m.TaskSpec, torch.nn.Module, ModelAdapter] | None = None
        self.held: tuple[str, Tensor] | None = None  # the last model received, by its hash

    def setup(self, rnd: int, msg: m.SetupRequest) -> m.SetupReply:
        train = self.__train
        return m.SetupReply(
            schema_fingerprint=table_fingerprint(train),
            feature_names=train.feature_names,
            classes=train.classes,
            image_shape=train.image_shape,
            contribution=self._contribute(rnd, "setup", c.setup_sums(train), msg.secure_aggregation),
        )

    def model_for(self, task: m.TaskSpec, params: Tensor) -> tuple[torch.nn.Module, ModelAdapter, np.ndarray]:
        """The task's model, built once (its layout checked against the task's), loaded with ``params``."""
        if task.task_sha256 is None and task.task != self._task.name:  # by name only when no hash is given
            raise Refused(
                "task", f"the request is for task '{task.task}', and this site runs '{self._task.name}': "
                "a site runs only the task it holds and approved"
            )
        if task.task_sha256 is not None and task.task_sha256 != self._task_sha256:
            raise Refused(
                "task", f"the request is for task code {task.task_sha256[:16]}..., and this site runs "
                f"{self._task_sha256[:16]}...: a site runs only the code it holds and approved"
            )
        if self.model is None or self.model[0] != task:
            module = build_model(self._task, task, 0)
            adapter = ModelAdapter(module)
            if adapter.layout_hash != task.layout_hash:
                raise ModelError(
                    f"the task's layout hash {task.layout_hash[:12]} does not match the model this site builds "
                    f"({adapter.layout_hash[:12]}): refusing an architecture the task does not describe"
                )
            self.model = (task, module, adapter)
        module, adapter = self.model[1], self.model[2]
        vector = params.to_numpy()
        adapter.set_vector(vector)
        return module, adapter, vector

    def received_model(self, msg: m.FitRequest) -> tuple[str, Tensor]:
        """The model a fit request sends, or names by hash among what this site holds, with its hash."""
        if msg.params is None:
            assert msg.model_sha256 is not None
            if self.held is None or self.held[0] != msg.model_sha256:
                raise ProtocolError(f"this site does not hold model {msg.model_sha256[:12]}...: send it")
            return self.held
        sent = model_sha256(msg.params)
        if msg.model_sha256 is not None and msg.model_sha256 != sent:
            raise Refused(
                "model_hash", f"the model sent (sha256 {sent[:12]}...) is not the one the request names ({msg.model_sha256[:12]}...)"
            )
        return sent, msg.params

    def fit(self, rnd: int, msg: m.FitRequest) -> m.FitReply:
        sha, params = self.received_model(msg)
        if self._strict:
            self._witness.check_plan(rnd, msg, sha)
        self._guard.check_plan(
            rnd,
            cohort=msg.plan.entry.body.get("cohort") if msg.plan is not None else None,
            layout_hash=msg.task.layout_hash,
            secure_aggregation=msg.secure_aggregation,
            privacy=msg.privacy,
            run=self._witness.run_id,
        )
        module, adapter, global_params = self.model_for(msg.task, params)
        self.held = (sha, params)
        delta, loss = self._local_update(rnd, msg, module, adapter, global_params)
        rows = float(self.__train.n_rows) if msg.weighting == "examples" else 1.0
        if isinstance(msg.privacy, SiteLevelEvent):
            return self._fit_site_level(rnd, msg, msg.privacy, bound_norm(delta, msg.norm_bound))
        weight = min(rows / msg.weight_scale, 1.0) if msg.secure_aggregation else rows
        # The round's norm bound (robust aggregation) is applied here, before quantisation and masking.
        if msg.secure_aggregation:
            vector = c.fit_vector(delta, weight, loss, msg.update_clip, msg.norm_bound)
        else:  # in the clear, float32 like the update itself: half the traffic of float64
            vector = c.fit_vector(delta, weight, loss, None, msg.norm_bound).astype(np.float32)
        return m.FitReply(contribution=self._contribute(rnd, "fit", vector, msg.secure_aggregation))

    def _fit_site_level(self, rnd: int, msg: m.FitRequest, event: SiteLevelEvent, delta: np.ndarray) -> m.FitReply:
        """DP-FedAvg: the update clipped to L2 norm ``event.clip``; distributed noise joins it in the ring."""
        if event.ddg is not None:
            if not msg.secure_aggregation:
                raise ProtocolError("distributed noise needs secure aggregation, and this round has none")
            self._sessions.expect_noise(rnd, event)
        vector = c.site_dp_vector(delta, event.clip, event.adaptive)
        return m.FitReply(contribution=self._contribute(rnd, "fit", vector, msg.secure_aggregation))

    def evaluate(self, rnd: int, msg: m.EvaluateRequest) -> m.EvaluateReply:
        module, _, _ = self.model_for(msg.task, msg.params)
        self.held = (model_sha256(msg.params), msg.params)  # the next fit request may name it instead of resending it
        records = self.__valid if msg.purpose == "canary" else self.__test
        spec = msg.evaluation
        groups = None
        if spec.sensitive_feature is not None:
            if spec.sensitive_threshold is None or spec.sensitive_feature >= records.n_features:
                raise ProtocolError("the evaluation names a sensitive feature without a threshold, or one the data lacks")
            groups = Groups(spec.sensitive_feature, spec.sensitive_threshold, spec.positive_class)
        draw = self._rng(rnd, "evaluate")  # the shift is the site's own draw: deterministic per round, never sent

        def options(X: torch.Tensor) -> EvalOptions:
            if spec.shift_noise is None:
                return EvalOptions(groups=groups)
            noise = draw.standard_normal(X.shape) * spec.shift_noise * msg.task.scale.to_numpy()
            return EvalOptions(groups=groups, shifted=X + torch.from_numpy(noise.astype(np.float32)))

        shape = data_shape(msg.task)
        vector = evaluate_records(self._task, module, records, shape, options)
        n = records.n_rows
        if self._journal is not None and n and msg.purpose == "round":
            self._journal.append(rnd, n, self._task.summarise(vector, shape).metrics)
        return m.EvaluateReply(
            contribution=self._contribute(rnd, "evaluate", np.asarray(vector, dtype=np.float64), msg.secure_aggregation)
        )
