"""The model lifecycle as the transcript records it, replayed entry by entry under the registry's rules.

``replay`` is the one reading of the lifecycle entries: ``consortium verify``
runs it to check them, and the lifecycle manager runs it to know where things
stand (and to rebuild ``registry.json`` from it). Each entry must follow from
the ones before it:

- ``model_version``: the next id, a known parent; a version taken from the
  run is the run's final model (by the transcript's hash);
- ``model_state``: a move the registry allows (``registry.TRANSITIONS``);
  into production only after a canary evaluation of that version that passed,
  and never while a site's drift incident is open (a rollback may always
  happen: it is how a misbehaving model is taken back);
- ``model_evaluation``: its verdict is recomputed from the metrics it quotes
  and the agreement's tolerances, and those metrics must be the ones the
  coordinator's ``evaluation`` entries (secure sums) recorded for those models;
- ``deployment``: signed by the site; a version it accepts must be the one in
  production at that point;
- ``drift_incident`` / ``drift_resolved``: signed by the site, one open
  incident per site at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from consortium.errors import VerificationError
from consortium.governance.agreement import LIFECYCLE_METRICS, Agreement
from consortium.lifecycle.registry import Change, ModelRegistry, RegistryError, Version
from consortium.transcript.log import Entry, canonical

ROLLBACK_DOMAIN = "consortium/rollback-request/v1"
LIFECYCLE_KINDS = frozenset({"model_version", "model_state", "model_evaluation", "deployment", "drift_incident", "drift_resolved"})
#: How much worse than the baseline a metric may be before it counts, beyond its tolerance (float noise).
SLACK = 1e-9


def rollback_statement(version: str, reason: str, at_entry: int) -> bytes:
    """What a member signs to demand a rollback to ``version``: bound to the transcript entry it will be."""
    return canonical({"domain": ROLLBACK_DOMAIN, "version": version, "reason": reason, "entry": at_entry})


def version_body(version: Version, model_sha256: str, source: str) -> dict[str, Any]:
    """The ``model_version`` entry of a newly registered version. ``source``: ``run`` (the run's final model)
    or ``file`` (a model brought in by a member, trained from ``parent``)."""
    first = version.history[0]
    return {
        "version": version.id, "sha256": version.sha256, "model_sha256": model_sha256, "parent": version.parent,
        "round": version.round, "sites": version.sites, "epsilon": version.epsilon, "metrics": version.metrics,
        "source": source, "by": first.by, "at": first.at,
    }


def regressions(candidate: dict[str, Any], baseline: dict[str, Any] | None, tolerances: dict[str, float]) -> list[dict[str, Any]]:
    """Each declared metric on which ``candidate`` is worse than ``baseline`` by more than its tolerance.

    A metric the candidate lacks (not measured, or not finite) fails: nothing unmeasured is promoted.
    Without a baseline (no version in production yet) only that is checked.
    """
    failed = []
    for metric, tolerance in sorted(tolerances.items()):
        c = candidate.get(metric)
        b = None if baseline is None else baseline.get(metric)
        if c is None or not math.isfinite(c):
            failed.append({"metric": metric, "candidate": None, "baseline": b, "tolerance": tolerance, "worse_by": None})
            continue
        if b is None or not math.isfinite(b):
            continue
        worse = (b - c) if LIFECYCLE_METRICS[metric] == "higher" else (c - b)
        if worse > tolerance + SLACK:
            failed.append({"metric": metric, "candidate": c, "baseline": b, "tolerance": tolerance, "worse_by": worse})
    return failed


def describe_failures(failed: list[dict[str, Any]]) -> str:
    """The failed metrics in one line: 'accuracy 0.612 vs 0.931 (worse by 0.319, tolerance 0.02)'."""
    parts = []
    for f in failed:
        if f["candidate"] is None:
            parts.append(f"{f['metric']} not measured")
        else:
            parts.append(
                f"{f['metric']} {f['candidate']:.4g} vs {f['baseline']:.4g} "
                f"(worse by {f['worse_by']:.4g}, tolerance {f['tolerance']:g})"
            )
    return "; ".join(parts)


@dataclass
class Lineage:
    """Where the lifecycle stands after the transcript's entries."""

    registry: ModelRegistry
    deployed: dict[str, str | None]  # site -> the version it runs (None: none yet)
    open_incidents: dict[str, Entry] = field(default_factory=dict)  # site -> its open drift incident
    evaluations: list[Entry] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)  # deployments a site refused, and why

    @property
    def production(self) -> Version | None:
        return self.registry.production

    def to_json(self) -> dict[str, Any]:
        return {
            "versions": [
                {"id": v.id, "state": v.state, "parent": v.parent, "round": v.round, "sha256": v.sha256,
                 "history": [{"state": c.state, "reason": c.reason, "by": c.by} for c in v.history]}
                for v in self.registry.versions.values()
            ],
            "production": self.production.id if self.production is not None else None,
            "deployed": dict(self.deployed),
            "refused": self.refusals,
            "open_drift_incidents": {site: {"entry": e.index, "features": e.body.get("features", [])}
                                     for site, e in self.open_incidents.items()},
        }


def replay(entries: list[Entry], agreement: Agreement | None, sites: list[str]) -> Lineage:
    """Replay every lifecycle entry; the first that does not follow raises ``VerificationError`` naming it."""
    lineage = Lineage(ModelRegistry(None), {s: None for s in sites})
    final_model = None
    model_hash: dict[str, str] = {}  # version -> the transcript's hash of its parameters
    evaluated: dict[int, Entry] = {}  # the coordinator's evaluation entries, by index
    passed_canary: set[str] = set()
    for e in entries:
        if e.kind == "final_model":
            final_model = e.body["model_sha256"]
        elif e.kind == "evaluation":
            evaluated[e.index] = e
        if e.kind not in LIFECYCLE_KINDS:
            continue
        if final_model is None:
            raise VerificationError(f"entry {e.index}: a {e.kind} entry before the run's final model")
        if agreement is None or agreement.lifecycle is None:
            raise VerificationError(f"entry {e.index}: a {e.kind} entry in a run whose agreement has no lifecycle terms")
        try:
            _step(e, lineage, agreement, final_model, model_hash, evaluated, passed_canary)
        except RegistryError as exc:
            raise VerificationError(f"entry {e.index} ({e.kind}): {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise VerificationError(f"entry {e.index} ({e.kind}): malformed body ({type(exc).__name__}: {exc})") from None
    return lineage


def _step(
    e: Entry, lineage: Lineage, agreement: Agreement, final_model: str, model_hash: dict[str, str],
    evaluated: dict[int, Entry], passed_canary: set[str],
) -> None:
    b, registry = e.body, lineage.registry
    assert agreement.lifecycle is not None
    if e.kind == "model_version":
        if b["source"] == "run" and b["model_sha256"] != final_model:
            raise VerificationError(f"entry {e.index}: version {b['version']} is said to be the run's model, and is not")
        registry.add(Version(
            id=b["version"], sha256=b["sha256"], parent=b["parent"], round=int(b["round"]), sites=list(b["sites"]),
            epsilon=dict(b["epsilon"]), metrics=dict(b["metrics"]),
            history=[Change("candidate", None, "registered", b["by"], b["at"])],
        ))
        model_hash[b["version"]] = b["model_sha256"]
    elif e.kind == "model_evaluation":
        _check_evaluation(e, agreement, model_hash, evaluated)
        if b["purpose"] == "canary" and b["passed"]:
            passed_canary.add(b["version"])
        lineage.evaluations.append(e)
    elif e.kind == "model_state":
        if b.get("rollback"):
            registry.rollback(b["version"], reason=b["reason"], by=b["by"], at=b["at"])
        else:
            if b["to"] == "production":
                if b["version"] not in passed_canary:
                    raise VerificationError(f"entry {e.index}: version {b['version']} enters production without passing its canary")
                if lineage.open_incidents:
                    site, incident = next(iter(lineage.open_incidents.items()))
                    raise VerificationError(
                        f"entry {e.index}: version {b['version']} promoted while the drift incident of {site} "
                        f"(entry {incident.index}) is open"
                    )
            if b["to"] == "canary":
                passed_canary.discard(b["version"])
            registry.transition(b["version"], b["to"], reason=b["reason"], by=b["by"], at=b["at"])
    elif e.kind == "deployment":
        if e.author not in lineage.deployed:
            raise VerificationError(f"entry {e.index}: '{e.author}' is not a site of this run")
        version = registry.get(b["version"])
        if b["model_sha256"] != model_hash[version.id]:
            raise VerificationError(f"entry {e.index}: {e.author} received a model other than version {version.id}")
        if b["accepted"]:
            if version.state != "production":
                raise VerificationError(f"entry {e.index}: {e.author} was given version {version.id}, which is {version.state}")
            lineage.deployed[e.author] = version.id
        else:
            lineage.refusals.append({"entry": e.index, "site": e.author, "version": version.id, "rule": b["rule"], "detail": b["detail"]})
    elif e.kind == "drift_incident":
        if e.author in lineage.open_incidents:
            raise VerificationError(f"entry {e.index}: {e.author} already has a drift incident open")
        lineage.open_incidents[e.author] = e
    elif e.kind == "drift_resolved":
        if lineage.open_incidents.pop(e.author, None) is None:
            raise VerificationError(f"entry {e.index}: {e.author} resolves a drift incident it never reported")


def _check_evaluation(e: Entry, agreement: Agreement, model_hash: dict[str, str], evaluated: dict[int, Entry]) -> None:
    """The verdict follows from the quoted metrics and the agreement's tolerances; the metrics are the
    ones the coordinator's secure-sum evaluation entries recorded for those very models."""
    assert agreement.lifecycle is not None
    b = e.body
    tolerances = dict(agreement.lifecycle.tolerances)
    if b["tolerances"] != tolerances:
        raise VerificationError(f"entry {e.index}: judged with tolerances {b['tolerances']}, the agreement's are {tolerances}")
    for side, version in (("candidate", b["version"]), ("baseline", b["baseline"])):
        if version is None:
            continue
        source = evaluated.get(b[f"{side}_entry"])
        if (
            source is None or source.index > e.index or source.body.get("model_sha256") != model_hash[version]
            or source.body.get("purpose") != b["purpose"] or sorted(source.body.get("sites", [])) != sorted(b["sites"])
        ):
            raise VerificationError(f"entry {e.index}: the {side}'s figures do not come from an evaluation of version {version} by its sites")
        if source.body["metrics"] != b[f"{side}_metrics"]:
            raise VerificationError(f"entry {e.index}: the {side}'s metrics are not the ones its evaluation (entry {source.index}) recorded")
    failed = regressions(b["candidate_metrics"], b["baseline_metrics"] if b["baseline"] else None, tolerances)
    if failed != b["failed"] or (not failed) != b["passed"]:
        raise VerificationError(
            f"entry {e.index}: the verdict on version {b['version']} does not follow from its metrics "
            f"(recomputed: {'passed' if not failed else 'failed: ' + describe_failures(failed)})"
        )
