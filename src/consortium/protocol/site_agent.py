"""A site's lifecycle agent: which model version it runs (deploy), and whether the records arriving
since training have drifted from them (monitor). Its state is its own, in one JSON file; a drift
report leaves the site only where the agreement lets it, signed by the site.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from consortium.data import Records, Table
from consortium.errors import ConfigError, ProtocolError
from consortium.governance.agreement import Agreement
from consortium.governance.guard import Refused
from consortium.governance.policy import SitePolicy
from consortium.learning.adapter import ModelAdapter
from consortium.learning.drift import DriftReport, check_drift
from consortium.protocol import messages as m
from consortium.protocol.site_training import model_sha256
from consortium.protocol.site_witness import Witness
from consortium.runs import write_atomic
from consortium.wire import Tensor


class SiteLifecycle:
    """A site's own lifecycle state, in one JSON file written atomically: the model version it runs,
    whether it has a drift incident open, and its last drift check (the check stays here)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state: dict[str, object] = {"version": None, "model_sha256": None, "incident_open": False, "drift": None}
        if path.exists():
            try:
                self.state.update(json.loads(path.read_text()))
            except ValueError:
                raise ConfigError(f"{path} is damaged: restore it from a backup") from None

    @property
    def version(self) -> str | None:
        return self.state["version"]  # type: ignore[return-value]

    @property
    def incident_open(self) -> bool:
        return bool(self.state["incident_open"])

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self.state, indent=1).encode())

    def deploy(self, version: str, model_sha256: str) -> None:
        self.state.update(version=version, model_sha256=model_sha256)
        self._save()

    def set_incident(self, open_: bool) -> None:
        self.state["incident_open"] = open_
        self._save()

    def note_drift(self, report: DriftReport) -> None:
        self.state["drift"] = {"psi": report.psi, "label_shift": report.label_shift, "breached": report.breached}
        self._save()


#: At most this many training rows, and this many of their values (256 MB of float32), are read to measure
#: drift against: a sample beyond that.
DRIFT_REFERENCE_ROWS = 50_000
DRIFT_REFERENCE_VALUES = 1 << 26


class LifecycleAgent:
    """Deploy and monitor for the site ``name`` (see the module docstring).

    ``train`` is the site's training split (what drift is measured against); ``model_for`` loads a
    model into the site's architecture, refusing one the task does not describe.
    """

    def __init__(
        self,
        name: str,
        train: Records,
        *,
        lifecycle: SiteLifecycle | None,
        agreement: Agreement | None,
        policy: SitePolicy | None,
        strict: bool,
        witness: Witness,
        model_for: Callable[[m.TaskSpec, Tensor], tuple[torch.nn.Module, ModelAdapter, np.ndarray]],
    ) -> None:
        self.name = name
        self.__train = train
        self.__reference: Table | None = None  # what drift is measured against: the training rows, or a sample
        self.__incoming: Table | None = None  # the records arriving since training, for the drift check
        self.lifecycle = lifecycle
        self._agreement = agreement
        self._policy = policy
        self._strict = strict
        self._witness = witness
        self._model_for = model_for

    def observe(self, incoming: Table) -> None:
        """The records that arrived since training (the hospital's feed): what the drift check compares."""
        if incoming.feature_names != self.__train.feature_names:
            raise ConfigError(f"{self.name}'s incoming data has other features than its training data: same schema only")
        self.__incoming = incoming

    def _reference(self) -> Table:
        """The training rows drift is measured against: all of them when they fit ``DRIFT_REFERENCE_VALUES``
        (and ``DRIFT_REFERENCE_ROWS``), else a fixed uniform sample of as many rows as fit (a streamed table
        larger than memory), whose deciles and label shares estimate the whole's."""
        if self.__reference is None:
            train = self.__train
            limit = min(DRIFT_REFERENCE_ROWS, max(1_000, DRIFT_REFERENCE_VALUES // max(train.n_features, 1)))
            if train.n_rows <= limit:
                self.__reference = train.to_table()
            else:
                rows = np.random.default_rng(0).choice(train.n_rows, limit, replace=False)
                self.__reference = train.take(np.sort(rows))
        return self.__reference

    def deploy(self, rnd: int, msg: m.DeployRequest) -> m.DeployReply:
        """Run ``msg.version`` from now on, unless this site's policy pins another; sign the receipt either way."""
        if self.lifecycle is None:
            raise ProtocolError("this site keeps no lifecycle state: it cannot run a model version")
        if model_sha256(msg.params) != msg.model_sha256:
            raise Refused("model_hash", f"the model sent is not version {msg.version} ({msg.model_sha256[:12]}...) as requested")
        if self._strict:
            self._check_promoted(msg)
        self._model_for(msg.task, msg.params)  # the architecture must be the one the task describes
        pin = self._policy.pin_model if self._policy is not None else None
        refused = pin is not None and msg.version != pin
        if not refused:
            self.lifecycle.deploy(msg.version, msg.model_sha256)
        return m.DeployReply(receipt=self._witness.signed("deployment", rnd, {
            "version": msg.version,
            "model_sha256": msg.model_sha256,
            "reason": msg.reason,
            "stage": msg.stage,
            "accepted": not refused,
            "rule": "pinned_model" if refused else "",
            "detail": f"this site's policy pins model {pin}: it runs no other version" if refused else "",
            "running": self.lifecycle.version,
        }))

    def _check_promoted(self, msg: m.DeployRequest) -> None:
        """A site runs only a version the transcript registered with this very model and put in production."""
        proven = self._witness.proven
        registered = proven(msg.registered, "model_version", f"version {msg.version}'s registration", "deploy_proof")
        if registered.body.get("version") != msg.version or registered.body.get("model_sha256") != msg.model_sha256:
            raise Refused("deploy_proof", f"the transcript registered another model as {registered.body.get('version')}, not this one")
        promoted = proven(msg.promoted, "model_state", f"version {msg.version}'s promotion", "deploy_proof")
        body = promoted.body
        if body.get("version") != msg.version or body.get("to") != "production" or promoted.index < registered.index:
            raise Refused("deploy_proof", f"the transcript does not put version {msg.version} in production: refusing to run it")

    def monitor(self, rnd: int, msg: m.MonitorRequest) -> m.MonitorReply:
        """Check the incoming records against the training records; disclose a breach only where the agreement
        lets this artefact out, and say when a breach it disclosed has ended."""
        if self.lifecycle is None or self.__incoming is None or self._agreement is None or self._agreement.lifecycle is None:
            return m.MonitorReply()
        incoming, terms = self.__incoming, self._agreement.lifecycle.drift
        if incoming.n_rows < terms.min_rows:  # too few to tell drift from noise: nothing is judged, nothing said
            return m.MonitorReply()
        train = self._reference()
        report = check_drift(
            train.X, train.y, incoming.X, incoming.y, feature_names=train.feature_names,
            n_classes=len(train.classes), psi_threshold=terms.psi, label_threshold=terms.label_shift,
        )
        self.lifecycle.note_drift(report)
        if not self._agreement.visible_to("drift_incident", "coordinator"):
            return m.MonitorReply()  # kept here: the agreement does not let this report leave the site
        if report.breached and not self.lifecycle.incident_open:
            self.lifecycle.set_incident(True)
            return m.MonitorReply(entry_kind="drift_incident", report=self._witness.signed("drift_incident", rnd, {
                "site": self.name,
                "features": report.drifting_features,
                "psi": {f: round(report.psi[f], 6) for f in report.drifting_features},
                "label_shift": round(report.label_shift, 6),
                "thresholds": {"psi": terms.psi, "label_shift": terms.label_shift},
                "rows": incoming.n_rows,
            }))
        if not report.breached and self.lifecycle.incident_open:
            self.lifecycle.set_incident(False)
            return m.MonitorReply(entry_kind="drift_resolved", report=self._witness.signed("drift_resolved", rnd, {
                "site": self.name, "rows": incoming.n_rows,
            }))
        return m.MonitorReply()
