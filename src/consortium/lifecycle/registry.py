"""The model registry: every global model version, where it came from, and its state.

A version holds the model's tensors (``versions/<id>.safetensors``) and its
metadata in ``registry.json``: the SHA-256 of the tensor file, the parent
version, the round and the sites that produced it, its privacy cost (each
site's epsilon), its evaluation results, and its state. Both are written
atomically; the tensor file is checked against its hash whenever it is read,
so a swapped or damaged file is refused, never served.

States and the moves between them (anything else is refused):

- ``candidate`` -> ``canary`` (its canary evaluation starts) or ``retired``;
- ``canary`` -> ``production`` (no declared metric regressed) or ``retired``
  (rejected, with the numbers that failed);
- ``production`` -> ``retired`` (a newer version is promoted) or
  ``rolled_back`` (it misbehaved);
- ``retired`` -> ``production`` only by a rollback to it.

At most one version is in ``production``: promoting one retires the
previous, rolling back restores the named earlier version. Every change
keeps its reason, who made it and when, in the version's history.

The transcript is the record: every registration and every state change is
an entry there first (``consortium.run.lifecycle``), and ``registry.json``
is the index rebuilt from it (``consortium.lifecycle.lineage``), which
``consortium verify`` checks against it. The same class, kept in memory
(``folder=None``), is how ``verify`` replays the entries: one set of rules.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save as safetensors_save

from consortium.errors import ConfigError, VerificationError
from consortium.runs import dumps, write_atomic

State = Literal["candidate", "canary", "production", "retired", "rolled_back"]

#: The moves the registry allows; ``retired -> production`` only as a rollback.
TRANSITIONS: dict[str, frozenset[str]] = {
    "candidate": frozenset({"canary", "retired"}),
    "canary": frozenset({"production", "retired"}),
    "production": frozenset({"retired", "rolled_back"}),
    "retired": frozenset({"production"}),
    "rolled_back": frozenset(),
}
REGISTRY_DIR = "registry"


class RegistryError(ConfigError):
    """A registry operation that cannot be done: an unknown version, a move its state does not allow."""


@dataclass(frozen=True)
class Change:
    """One state change: from, to, why, by whom, when (UTC, ISO 8601)."""

    state: str
    previous: str | None
    reason: str
    by: str
    at: str


@dataclass
class Version:
    id: str  # v1, v2, ... in registration order
    sha256: str  # of the tensor file's bytes
    parent: str | None  # the version it was trained from; None for the first
    round: int  # the round that produced it
    sites: list[str]  # the sites whose updates it sums
    epsilon: dict[str, float]  # each site's epsilon spent up to this version (empty without DP)
    metrics: dict[str, float | None]  # its evaluation results
    state: str = "candidate"
    history: list[Change] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Version:
        return cls(**{**d, "history": [Change(**c) for c in d.get("history", [])]})


def now() -> str:
    """UTC, ISO 8601, to the second: when a state change happened."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ModelRegistry:
    """The versions kept in ``folder/registry`` (a run folder, or a coordinator's store); in memory only
    when ``folder`` is None."""

    def __init__(self, folder: Path | None) -> None:
        self.path = Path(folder) / REGISTRY_DIR if folder is not None else None
        self._index = self.path / "registry.json" if self.path is not None else None
        self.versions: dict[str, Version] = {}
        if self._index is not None and self._index.exists():
            try:
                raw = json.loads(self._index.read_text())
                self.versions = {v["id"]: Version.from_json(v) for v in raw["versions"]}
            except (ValueError, KeyError, TypeError) as exc:
                raise VerificationError(f"{self._index} is damaged ({exc}): restore it from a backup") from None

    def index_json(self) -> dict[str, Any]:
        return {"versions": [v.to_json() for v in self.versions.values()]}

    def _save(self) -> None:
        if self._index is not None:
            write_atomic(self._index, dumps(self.index_json()).encode())

    def rebuild(self, versions: dict[str, Version]) -> None:
        """Replace the index with ``versions`` (as the transcript has them) and write it."""
        self.versions = {k: Version.from_json(v.to_json()) for k, v in versions.items()}
        self._save()

    @property
    def next_id(self) -> str:
        return f"v{len(self.versions) + 1}"

    def tensor_path(self, version: str) -> Path:
        if self.path is None:
            raise RegistryError("an in-memory registry holds no tensor files")
        return self.path / "versions" / f"{version}.safetensors"

    def store_tensors(self, version: str, tensors: dict[str, np.ndarray]) -> str:
        """Write a version's tensor file (before anything names it); its SHA-256."""
        blob = safetensors_save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
        write_atomic(self.tensor_path(version), blob)
        return hashlib.sha256(blob).hexdigest()

    def add(self, version: Version) -> Version:
        """Add a registered version: the next id, a known parent, state candidate."""
        if version.id != self.next_id:
            raise RegistryError(f"version {version.id} registered where {self.next_id} comes next")
        if version.parent is not None:
            self.get(version.parent)
        self.versions[version.id] = version
        self._save()
        return version

    def get(self, version: str) -> Version:
        if version not in self.versions:
            known = ", ".join(self.versions) or "none yet"
            raise RegistryError(f"no model version '{version}' in {self.path}: the versions are {known}")
        return self.versions[version]

    def register(
        self, tensors: dict[str, np.ndarray], *, parent: str | None, round: int, sites: list[str],
        epsilon: dict[str, float] | None = None, metrics: dict[str, float | None] | None = None, by: str,
    ) -> Version:
        """Store a new candidate version; its tensors first, then the index that names them."""
        if parent is not None:
            self.get(parent)
        vid = self.next_id
        return self.add(Version(
            id=vid, sha256=self.store_tensors(vid, tensors), parent=parent, round=round, sites=sorted(sites),
            epsilon=dict(epsilon or {}), metrics=dict(metrics or {}),
            history=[Change("candidate", None, "registered", by, now())],
        ))

    def tensors(self, version: str) -> dict[str, np.ndarray]:
        """The version's tensors, refused unless the file's bytes still hash to what was registered."""
        v = self.get(version)
        path = self.tensor_path(version)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise VerificationError(f"{path} is missing: version {version} cannot be served") from None
        if hashlib.sha256(blob).hexdigest() != v.sha256:
            raise VerificationError(f"{path} does not match the hash registered for {version}: refusing a swapped or damaged model")
        try:
            return safetensors_load(blob)
        except SafetensorError as exc:
            raise VerificationError(f"{path} is not a safetensors file ({exc})") from None

    @property
    def production(self) -> Version | None:
        return next((v for v in self.versions.values() if v.state == "production"), None)

    def lineage(self, version: str) -> list[Version]:
        """The version, its parent, its parent's parent, ... back to the first."""
        out, current = [], self.get(version)
        while True:
            out.append(current)
            if current.parent is None:
                return out
            current = self.get(current.parent)

    def _move(self, v: Version, to: str, reason: str, by: str, at: str | None) -> None:
        if to not in TRANSITIONS[v.state]:
            allowed = ", ".join(sorted(TRANSITIONS[v.state])) or "nothing"
            raise RegistryError(f"version {v.id} is {v.state}: it can move to {allowed}, not to {to}")
        v.history.append(Change(to, v.state, reason, by, at or now()))
        v.state = to

    def transition(self, version: str, to: State, *, reason: str, by: str, at: str | None = None) -> Version:
        """Move ``version`` to state ``to``. Into production: the current production version is retired.
        A retired version returns to production only through ``rollback``."""
        v = self.get(version)
        if not reason.strip():
            raise RegistryError("a state change needs a reason: say why, it is kept with the version")
        if v.state == "retired" and to == "production":
            raise RegistryError(f"version {v.id} is retired: bring it back with a rollback, which records why")
        current = self.production
        self._move(v, to, reason, by, at)
        if to == "production" and current is not None:
            self._move(current, "retired", f"superseded by {v.id}", by, at)
        self._save()
        return v

    def rollback(self, to: str, *, reason: str, by: str, at: str | None = None) -> Version:
        """Restore ``to`` (an earlier production version, now retired); the current one is rolled back."""
        target = self.get(to)
        current = self.production
        if target.state != "retired" or not any(c.state == "production" for c in target.history):
            raise RegistryError(f"version {to} is {target.state} and was never in production: roll back only to a former production version")
        if not reason.strip():
            raise RegistryError("a rollback needs a reason: say why, it is kept with both versions")
        if current is not None:
            self._move(current, "rolled_back", reason, by, at)
        self._move(target, "production", f"rollback: {reason}", by, at)
        self._save()
        return target
