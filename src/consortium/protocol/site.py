"""The site runtime: an I/O-free state machine that answers the coordinator.

A site holds its own train / validation / test splits and never hands any
of them out: what leaves is an update vector (weighted), feature sums for
standardisation, and evaluation sums. The splits live in a name-mangled
attribute and nothing in the protocol returns them.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from consortium.data import Splits, Table
from consortium.errors import MessageRejected, ModelError
from consortium.learning.adapter import ModelAdapter
from consortium.learning.training import evaluate, train_local
from consortium.protocol import messages as m
from consortium.protocol.task import ModelBuilder, build_task_model


def table_fingerprint(table: Table) -> str:
    """SHA-256 of what must agree across sites: feature names, classes, image shape."""
    canonical = json.dumps(
        {"features": list(table.feature_names), "classes": list(table.classes), "image_shape": table.image_shape},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class Site:
    """One institution's agent in the protocol."""

    def __init__(self, name: str, data: Splits, *, seed: int, model_builder: ModelBuilder = build_task_model) -> None:
        self.name = name
        self.__data = data
        self.__train = (torch.from_numpy(data.train.X), torch.from_numpy(data.train.y))
        self.__test = (torch.from_numpy(data.test.X), torch.from_numpy(data.test.y))
        self._seed = seed
        self._build = model_builder
        self._model: tuple[m.TaskSpec, torch.nn.Module, ModelAdapter] | None = None

    # -- transport entry points ------------------------------------------------

    def handle_bytes(self, raw: bytes) -> bytes:
        """Parse a request, answer it, and encode the reply."""
        try:
            request = m.decode(raw)
        except MessageRejected as exc:
            return m.encode(m.make_envelope(self.name, "coordinator", 0, m.Refusal(reason=str(exc))))
        return m.encode(self.handle(request))

    def handle(self, request: m.Envelope) -> m.Envelope:
        msg = request.message
        if request.recipient != self.name:
            reply: m.BaseModel = m.Refusal(reason=f"message addressed to '{request.recipient}', not to this site")
        elif isinstance(msg, m.SetupRequest):
            reply = self._setup()
        elif isinstance(msg, m.FitRequest):
            reply = self._fit(request.round, msg)
        elif isinstance(msg, m.EvaluateRequest):
            reply = self._evaluate(msg)
        else:
            reply = m.Refusal(reason=f"a site does not answer '{msg.kind}' messages")
        return m.make_envelope(self.name, request.sender, request.round, reply)

    # -- handlers --------------------------------------------------------------

    def _setup(self) -> m.SetupReply:
        train = self.__data.train
        X = train.X.astype(np.float64)
        return m.SetupReply(
            schema_fingerprint=table_fingerprint(train),
            feature_names=train.feature_names,
            classes=train.classes,
            image_shape=train.image_shape,
            n_train=train.n_rows,
            feature_sum=m.Tensor.from_numpy(X.sum(axis=0).astype(np.float32)),
            feature_sumsq=m.Tensor.from_numpy((X * X).sum(axis=0).astype(np.float32)),
        )

    def _model_for(self, task: m.TaskSpec) -> tuple[torch.nn.Module, ModelAdapter]:
        if self._model is None or self._model[0] != task:
            module = self._build(task, 0)
            adapter = ModelAdapter(module)
            if adapter.layout_hash != task.layout_hash:
                raise ModelError(
                    f"the task's layout hash {task.layout_hash[:12]} does not match the model this site builds "
                    f"({adapter.layout_hash[:12]}): refusing an architecture the task does not describe"
                )
            self._model = (task, module, adapter)
        return self._model[1], self._model[2]

    def _fit(self, rnd: int, msg: m.FitRequest) -> m.BaseModel:
        try:
            module, adapter = self._model_for(msg.task)
            global_params = msg.params.to_numpy()
            adapter.set_vector(global_params)
        except ModelError as exc:
            return m.Refusal(reason=str(exc))
        center = [p.detach().clone() for p in module.parameters()] if msg.proximal_mu > 0 else None
        seed = int(np.random.SeedSequence([self._seed, rnd]).generate_state(1)[0])
        X, y = self.__train
        loss = train_local(
            module, X, y, msg.train, seed=seed, proximal_mu=msg.proximal_mu, proximal_center=center
        )
        delta = adapter.get_vector() - global_params
        n = int(X.shape[0])
        weight = float(n) if msg.weighting == "examples" else 1.0
        return m.FitReply(
            weight=weight,
            weighted_update=m.Tensor.from_numpy((delta * np.float32(weight)).astype(np.float32)),
            num_examples=n,
            train_loss_sum=loss * n,
        )

    def _evaluate(self, msg: m.EvaluateRequest) -> m.BaseModel:
        try:
            module, adapter = self._model_for(msg.task)
            adapter.set_vector(msg.params.to_numpy())
        except ModelError as exc:
            return m.Refusal(reason=str(exc))
        X, y = self.__test
        stats = evaluate(module, X, y, msg.task.n_classes)
        return m.EvaluateReply(
            n=stats.n,
            correct=stats.correct,
            loss_sum=stats.loss_sum,
            score_hist=None if stats.score_hist is None else m.Tensor.from_numpy(stats.score_hist),
        )
