"""Least privilege, in one place: which role may perform which operation, and see which artefact.

Sites, the simulation, ``consortium verify`` and the command line all ask
here; nothing else decides who may do what. Without an agreement the roles
come from the run's manifest (one coordinator, the sites); with one, from
the agreement, whose exposure matrix also says who may see which artefact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from consortium.errors import ConsortiumError

#: Each operation and the roles that may perform it.
OPERATIONS: dict[str, frozenset[str]] = {
    "plan_round": frozenset({"coordinator"}),  # send round plans and every protocol request to sites
    "sign_tree_head": frozenset({"coordinator"}),  # sign transcript heads and the coordinator's entries
    "train": frozenset({"site"}),  # hold data, train, answer a plan with a signed decision
    "cosign_tree_head": frozenset({"site"}),
    "halt": frozenset({"coordinator", "site", "auditor"}),  # stop a run; an observer only watches
    "rollback": frozenset({"coordinator", "site", "auditor"}),  # demand the previous production model back
    "deploy_model": frozenset({"site"}),  # run a model version (or refuse it) and sign the receipt
    "report_drift": frozenset({"site"}),  # a site's signed report on its own incoming data
    "verify": frozenset({"coordinator", "site", "auditor"}),  # read the whole transcript
    "view_aggregates": frozenset({"coordinator", "site", "auditor", "observer"}),
}

#: What a transcript entry's author must be allowed to do to have written it.
ENTRY_OPERATION: dict[str, str] = {
    "site_decision": "train", "halt": "halt", "deployment": "deploy_model",
    "drift_incident": "report_drift", "drift_resolved": "report_drift",
}


class PermissionDenied(ConsortiumError):
    """A member tried an operation its role does not allow."""

    rule = "role"  # the rule a site names when it refuses such a request


class Roles:
    """The role of every member, and the checks built on it."""

    def __init__(self, roles: Mapping[str, str], exposure: Mapping[str, list[str]] | None = None) -> None:
        self.roles = dict(roles)
        self.exposure = None if exposure is None else {k: list(v) for k, v in exposure.items()}

    @classmethod
    def of_agreement(cls, agreement: Any) -> Roles:
        return cls({m.name: m.role for m in agreement.members}, {e.artefact: list(e.to) for e in agreement.exposure})

    @classmethod
    def of_manifest(cls, manifest: Mapping[str, Any]) -> Roles:
        return cls({name: m["role"] for name, m in manifest["members"].items()})

    def role(self, member: str) -> str | None:
        return self.roles.get(member)

    def allowed(self, member: str, operation: str) -> bool:
        return self.roles.get(member) in OPERATIONS[operation]

    def authorize(self, member: str, operation: str) -> None:
        """Raise unless ``member`` holds a role that may perform ``operation``."""
        role = self.roles.get(member)
        if role is None:
            raise PermissionDenied(f"'{member}' is not a member of this consortium: it may not {operation.replace('_', ' ')}")
        if role not in OPERATIONS[operation]:
            allowed = ", ".join(sorted(OPERATIONS[operation]))
            raise PermissionDenied(
                f"'{member}' is a {role}: only a {allowed} may {operation.replace('_', ' ')}"
            )

    def may_see(self, member: str, artefact: str) -> bool:
        """Under an agreement, its exposure matrix decides; without one, every member sees every artefact."""
        role = self.roles.get(member)
        if role is None:
            return False
        if self.exposure is None:
            return True
        return role in self.exposure.get(artefact, [])

    def view(self, member: str, summary: dict[str, Any]) -> dict[str, Any]:
        """A run's summary as ``member`` may see it: each part shown only to the roles its artefact is
        exposed to; a part this table does not know is the coordinator's alone (deny by default)."""
        self.authorize(member, "view_aggregates")
        out: dict[str, Any] = {}
        for key, value in summary.items():
            artefact = SUMMARY_ARTEFACTS.get(key)
            if artefact == "run_metadata" or (artefact is not None and self.may_see(member, artefact)):
                out[key] = value
            elif artefact is None and self.roles.get(member) == "coordinator":
                out[key] = value
        out["hidden_from_you"] = sorted(set(summary) - set(out))
        return out


#: Which artefact each part of a run summary reveals. ``run_metadata`` (what ran, and whether it
#: halted) every member sees; parts not listed, such as the simulation-only baselines that need every
#: site's data in one place (per-site local accuracies, pooled training), only the coordinator.
SUMMARY_ARTEFACTS: dict[str, str] = {
    **{key: "run_metadata" for key in (
        "run_dir", "status", "halt", "dataset", "sites", "site_names", "rounds", "seed", "strategy",
        "partition", "warnings", "excluded_at_setup", "elapsed_s", "backend",
    )},
    "federated": "aggregate_metrics",
    "privacy": "privacy_events",
    "model": "global_model",
    "transcript": "transcript",
    "secure_aggregation": "transcript",
    "traffic_bytes": "transcript",
}
