"""A site's own policy: local, never shared, and never looser than the agreement.

The agreement is what every institution signed; a site may hold itself to
more: a lower epsilon cap, a larger minimum cohort, model architectures it
refuses, hours in which it will not train (its clinical systems' busy hours,
say). The file is checked against the agreement when it is loaded: a policy
that would loosen any term is an error naming the file, the line and the fix.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from consortium.errors import ConfigError
from consortium.governance.agreement import Agreement, LayoutHash, Name
from consortium.governance.approval import TaskApproval
from consortium.yamlfile import line_of, parse_yaml, read_text, validate

_HOURS = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
HourRange = Annotated[str, Field(pattern=_HOURS.pattern)]  # "HH:MM-HH:MM", may wrap past midnight


class SitePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    site: Name
    max_epsilon: float | None = Field(None, gt=0)  # this site's own cap for the whole collaboration
    min_cohort: int | None = Field(None, ge=1)  # no round with fewer sites than this
    refused_layouts: list[LayoutHash] = []  # model architectures (layout hashes) this site will not train
    quiet_hours: list[HourRange] = []  # local times at which this site does not train
    timezone: str = "UTC"
    pin_model: str | None = Field(None, pattern=r"^v[1-9][0-9]*$")  # run only this model version: refuse any other
    #: The study tasks this site runs, each its own signed approval of exact code (``consortium task approve``);
    #: empty: none (the built-in tasks only). Only tasks the agreement accepts may be approved.
    approved_tasks: list[TaskApproval] = []

    @field_validator("timezone")
    @classmethod
    def _zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{name!r} is not a known time zone (an IANA name such as Europe/Zurich)") from None
        return name

    @field_validator("quiet_hours")
    @classmethod
    def _ranges(cls, ranges: list[str]) -> list[str]:
        for r in ranges:
            start, end = r.split("-")
            if start == end:
                raise ValueError(f"the range {r} is empty: give a start and an end that differ")
        return ranges

    def quiet_at(self, when: dt.datetime) -> str | None:
        """The quiet range ``when`` falls in (local to this site's time zone), or None."""
        local = when.astimezone(ZoneInfo(self.timezone)).strftime("%H:%M")
        for r in self.quiet_hours:
            start, end = r.split("-")
            inside = start <= local < end if start < end else (local >= start or local < end)
            if inside:
                return r
        return None


def _stricter(policy: SitePolicy, agreement: Agreement) -> tuple[str, str] | None:
    """(field, problem) for the first term of the policy that would loosen the agreement."""
    sites = agreement.sites()
    if policy.site not in sites:
        return "site", f"'{policy.site}' is not a site of the {agreement.consortium} agreement (its sites: {', '.join(sites)})"
    if policy.max_epsilon is not None and policy.max_epsilon > agreement.privacy.max_epsilon:
        return "max_epsilon", (
            f"{policy.max_epsilon:g} is looser than the agreement's {agreement.privacy.max_epsilon:g}: "
            "a site policy may only be stricter; lower it or remove it"
        )
    if policy.min_cohort is not None and policy.min_cohort < agreement.min_cohort:
        return "min_cohort", (
            f"{policy.min_cohort} is looser than the agreement's minimum cohort of {agreement.min_cohort}: "
            "a site policy may only be stricter; raise it or remove it"
        )
    if policy.min_cohort is not None and policy.min_cohort > len(sites):
        return "min_cohort", f"{policy.min_cohort} exceeds the agreement's {len(sites)} sites: this site could never train"
    accepted = {t.sha256 for t in agreement.tasks}
    key = next(m.public_key for m in agreement.members if m.name == policy.site)
    for approval in policy.approved_tasks:
        if approval.site != policy.site:
            return "approved_tasks", f"the approval of {approval.task} is {approval.site}'s, not {policy.site}'s: remove it"
        if approval.sha256 not in accepted:
            return "approved_tasks", (
                f"{approval.task} (sha256 {approval.sha256[:16]}...) is not among the agreement's tasks: a site may "
                "approve only tasks the consortium accepts; remove it, or have the agreement amended"
            )
        problem = approval.check(key) if key is not None else "the agreement names no public key for this site"
        if problem is not None:
            return "approved_tasks", f"the approval of {approval.task}: {problem}; approve it again"
    return None


def parse_policy(text: str, agreement: Agreement, source: str = "<site policy>") -> SitePolicy:
    tree, raw = parse_yaml(text, source, ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a site policy is a mapping of settings: start from 'consortium policy init'")
    policy = validate(SitePolicy, raw, tree, source, ConfigError, "fix that value in the site policy")
    looser = _stricter(policy, agreement)
    if looser is not None:
        field, problem = looser
        raise ConfigError(f"{source} line {line_of(tree, (field,))}: {field}: {problem}")
    return policy


def load_policy(path: str | Path, agreement: Agreement) -> SitePolicy:
    return parse_policy(read_text(path, ConfigError, "site policy"), agreement, source=str(path))


def add_approval(path: Path, approval: TaskApproval, agreement: Agreement) -> SitePolicy:
    """Write ``approval`` into the site policy at ``path`` (a new one from ``template`` if there is none),
    replacing any earlier approval of the same code; the file's leading comments are kept, and the new
    policy is checked against the agreement before it replaces the old one (atomically).

    Raises:
        ConfigError: the policy or the approval does not hold against the agreement (the line and the fix).
    """
    from consortium.runs import write_atomic

    text = read_text(path, ConfigError, "site policy") if path.exists() else template(approval.site, agreement)
    _, raw = parse_yaml(text, str(path), ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a site policy is a mapping of settings: start from 'consortium policy init'")
    kept = [a for a in raw.get("approved_tasks") or [] if not (isinstance(a, dict) and a.get("sha256") == approval.sha256)]
    raw["approved_tasks"] = [*kept, approval.model_dump(mode="json")]
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    new = header + yaml.safe_dump(raw, sort_keys=False, width=1000)
    policy = parse_policy(new, agreement, source=str(path))
    write_atomic(path, new.encode())
    return policy


def template(site: str, agreement: Agreement) -> str:
    """A starting policy for ``site``: the agreement's own terms, to be tightened."""
    body = {
        "version": 1,
        "site": site,
        "max_epsilon": agreement.privacy.max_epsilon,
        "min_cohort": agreement.min_cohort,
        "refused_layouts": [],
        "quiet_hours": [],
        "timezone": "UTC",
        "pin_model": None,
        "approved_tasks": [],
    }
    return (
        f"# {site}'s own policy: kept at the site, never shared. It may only be stricter than the\n"
        f"# {agreement.consortium} agreement: a lower max_epsilon, a larger min_cohort, layouts refused,\n"
        "# quiet_hours (local times, e.g. 07:00-19:00 or 22:00-06:00) in which this site does not train,\n"
        "# pin_model (a version, e.g. v3): the only model version this site runs; it refuses any rollout of another.\n"
        "# approved_tasks: the study tasks this site runs, each approved by exact code (consortium task approve);\n"
        "# none: the built-in tasks only.\n"
        + yaml.safe_dump(body, sort_keys=False)
    )
