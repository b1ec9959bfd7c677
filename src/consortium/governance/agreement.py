"""The consortium agreement: what the institutions agreed to, as a YAML file code can enforce.

One closed pydantic model (unknown keys are errors, every error names the
file and line): the members and their roles, the exposure matrix (which
artefact may leave a site and which roles may see it), the minimum cohort,
the differential-privacy requirements, whether secure aggregation is
required, the model architectures allowed (by layout hash), the data schema
contract, the number of rounds, who must approve it and the quorum that may
resume a halted run. Its hash (SHA-256 of its RFC 8785 canonical JSON) is
what members sign; any change needs new signatures.

Artefacts that must never leave a site (raw rows, per-example outputs or
gradients, an unmasked update) are not in the vocabulary, so no agreement can
allow them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from consortium.config import SimulationConfig
from consortium.crypto import keys
from consortium.errors import ConfigError, ConsortiumError, VerificationError
from consortium.transcript.log import canonical
from consortium.yamlfile import duplicates, parse_yaml, read_text, validate

Role = Literal["coordinator", "site", "auditor", "observer"]
Artefact = Literal[
    "masked_update",  # a site's update, masked for secure aggregation
    "aggregate_update",  # the sum of the cohort's updates
    "aggregate_metrics",  # summed evaluation counts and the metrics computed from them
    "setup_statistics",  # summed row counts and feature moments
    "global_model",  # each model version
    "privacy_events",  # each round's DP event and each site's epsilon spent
    "transcript",  # the signed log itself
    "drift_incident",  # a site's signed report that its incoming data drifted, naming the features
]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
LayoutHash = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
PublicKey = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
SIGNATURE_DOMAIN = b"consortium/agreement/v1\x00"

#: What each artefact means, in the words ``explain`` gives a privacy officer.
ARTEFACT_TEXT: dict[str, str] = {
    "masked_update": "each site's model update, masked so that only the sum over the cohort can be read",
    "aggregate_update": "the sum of the cohort's model updates (never one site's update alone)",
    "aggregate_metrics": "evaluation results summed over the sites (accuracy, loss, calibration counts)",
    "setup_statistics": "the total row count and the feature means and variances, summed over the sites",
    "global_model": "every version of the jointly trained model",
    "privacy_events": "each round's differential-privacy parameters and the epsilon each site has spent",
    "transcript": "the signed record of every round: plans, decisions, commitments, hashes",
    "drift_incident": "a site's own report that its incoming data drifted from its training data, naming the features",
}
NEVER_LEAVES = "raw rows, per-example outputs or gradients, and any site's unmasked update"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Member(_Strict):
    name: Name
    role: Role
    approver: bool = True  # must sign the agreement before any run
    public_key: PublicKey | None = None  # Ed25519, hex: what its signatures are checked against


class Exposure(_Strict):
    artefact: Artefact
    to: list[Role] = Field(min_length=1)


class PrivacyRequirement(_Strict):
    level: Literal["record", "site"] = "record"
    max_epsilon: float = Field(gt=0, le=1000)  # per site, for the whole collaboration
    delta: float = Field(gt=0, lt=1)


class SchemaContract(_Strict):
    features: list[Name] = Field(min_length=1)
    classes: list[str] = Field(min_length=2)


#: The metrics a canary or a rollout stage compares, and which way is better.
LIFECYCLE_METRICS: dict[str, str] = {
    "accuracy": "higher",
    "auc": "higher",
    "loss": "lower",
    "ece": "lower",
    "demographic_parity_gap": "lower",
    "equalized_odds_gap": "lower",
    "shift_accuracy": "higher",
    "mse": "lower",  # a regression's
    "rmse": "lower",
    "mae": "lower",
    "r2": "higher",
}
#: The metrics only a regression measures (the rest only a classification).
REGRESSION_METRICS = frozenset({"mse", "rmse", "mae", "r2"})
LifecycleMetric = Literal[
    "accuracy", "auc", "loss", "ece", "demographic_parity_gap", "equalized_odds_gap", "shift_accuracy", "mse", "rmse", "mae", "r2",
]


class DriftTerms(_Strict):
    psi: float = Field(0.25, gt=0)  # a feature's population stability index above this is drift
    label_shift: float = Field(0.1, gt=0, le=1)  # total variation distance of the label rates above this is drift
    #: Fewer incoming records than this are not judged: the index of a small sample is mostly noise
    #: (about (bins - 1) / rows with no drift at all: 0.09 at 100 rows, 0.045 at 200).
    min_rows: int = Field(200, ge=20)


class LifecycleTerms(_Strict):
    """How a new model version reaches the sites: canary sites, tolerances, rollout stages, drift thresholds."""

    canary_sites: list[Name] = Field(min_length=1)  # evaluate each candidate first, on their validation data
    tolerances: dict[LifecycleMetric, Annotated[float, Field(ge=0)]] = Field(min_length=1)  # regression allowed
    rollout: list[Annotated[float, Field(gt=0, le=1)]] = [0.5, 1.0]  # share of sites running it after each stage
    drift: DriftTerms = DriftTerms()

    @field_validator("rollout")
    @classmethod
    def _stages(cls, stages: list[float]) -> list[float]:
        if not stages or stages[-1] != 1.0 or any(a >= b for a, b in zip(stages, stages[1:])):
            raise ValueError("rollout stages are increasing shares of the sites ending at 1.0, e.g. [0.5, 1.0]")
        return stages


class AcceptedTask(_Strict):
    """A study's task the consortium accepts: its code, by the hash ``consortium task hash`` prints."""

    name: str = Field(min_length=1, max_length=1000)  # how the config names it (for people: the hash is what counts)
    sha256: LayoutHash  # its package's files and imported distributions (consortium.learning.identity)


class Agreement(_Strict):
    version: Literal[1] = 1
    consortium: Name
    members: list[Member] = Field(min_length=2)
    exposure: list[Exposure]
    min_cohort: int = Field(ge=1)
    privacy: PrivacyRequirement
    secure_aggregation_required: bool = True
    allowed_layouts: list[LayoutHash] = []  # empty: any architecture the sites' policies accept
    tasks: list[AcceptedTask] = []  # study tasks accepted, by code hash; empty: the built-in tasks only
    data_schema: SchemaContract | None = None
    rounds: int = Field(ge=1, le=100_000)
    resume_quorum: int = Field(ge=1)  # approvers' signatures needed to resume a halted run
    lifecycle: LifecycleTerms | None = None  # omitted: no model version may be promoted under this agreement

    # Each rule is checked on the field it concerns, so an error names that field's line.
    @field_validator("members")
    @classmethod
    def _members(cls, members: list[Member]) -> list[Member]:
        twice = duplicates([m.name for m in members])
        if twice:
            raise ValueError(f"member names must be unique, '{twice[0]}' appears twice")
        if [m.role for m in members].count("coordinator") != 1:
            raise ValueError("exactly one member must have the role coordinator")
        return members

    @field_validator("exposure")
    @classmethod
    def _exposure(cls, exposure: list[Exposure]) -> list[Exposure]:
        twice = duplicates([e.artefact for e in exposure])
        if twice:
            raise ValueError(f"artefact '{twice[0]}' appears twice in the exposure matrix: list its roles once")
        for e in exposure:
            if e.artefact == "masked_update" and set(e.to) - {"coordinator"}:
                raise ValueError("masked updates may go to the coordinator only (it routes them; nobody reads them alone)")
        return exposure

    @field_validator("min_cohort")
    @classmethod
    def _cohort(cls, min_cohort: int, info: ValidationInfo) -> int:
        sites = [m for m in info.data.get("members", []) if m.role == "site"]
        if min_cohort > len(sites):
            raise ValueError(f"min_cohort {min_cohort} exceeds the {len(sites)} sites: no round could ever run")
        return min_cohort

    @field_validator("resume_quorum")
    @classmethod
    def _quorum(cls, quorum: int, info: ValidationInfo) -> int:
        approvers = sum(m.approver for m in info.data.get("members", []))
        if quorum > approvers:
            raise ValueError(f"resume_quorum {quorum} exceeds the {approvers} approvers")
        return quorum

    @field_validator("lifecycle")
    @classmethod
    def _lifecycle(cls, terms: LifecycleTerms | None, info: ValidationInfo) -> LifecycleTerms | None:
        if terms is None:
            return None
        sites = [m.name for m in info.data.get("members", []) if m.role == "site"]
        unknown = [s for s in terms.canary_sites if s not in sites]
        if unknown:
            raise ValueError(f"canary site '{unknown[0]}' is not a site of the agreement (its sites: {', '.join(sites)})")
        if duplicates(terms.canary_sites):
            raise ValueError(f"canary site '{duplicates(terms.canary_sites)[0]}' is listed twice")
        need = max(2, info.data.get("min_cohort", 1))
        if info.data.get("secure_aggregation_required", True) and len(terms.canary_sites) < need:
            raise ValueError(
                f"with secure aggregation required, name at least {need} canary sites (2, and the minimum cohort): "
                "their metrics are summed, and no site helps unmask a sum over fewer"
            )
        return terms

    def visible_to(self, artefact: str, role: str) -> bool:
        return any(e.artefact == artefact and role in e.to for e in self.exposure)

    def role_of(self, name: str) -> str | None:
        return next((m.role for m in self.members if m.name == name), None)

    def approvers(self) -> list[str]:
        return [m.name for m in self.members if m.approver]

    def sites(self) -> list[str]:
        """The site members, in the agreement's order."""
        return [m.name for m in self.members if m.role == "site"]


def agreement_hash(agreement: Agreement) -> str:
    """What members sign: SHA-256 of the agreement's canonical JSON (RFC 8785)."""
    return hashlib.sha256(canonical(agreement.model_dump(mode="json"))).hexdigest()


def signatures_path(path: Path) -> Path:
    """Where an agreement's signatures live: beside it, one JSON object (member -> signature, hex)."""
    return path.with_name(path.name + ".signatures.json")


def sign_agreement(agreement: Agreement, member: str, key: Ed25519PrivateKey) -> str:
    """``member``'s signature over the agreement's hash, after checking the key is the one the agreement names."""
    named = next((m for m in agreement.members if m.name == member), None)
    if named is None:
        raise ConfigError(f"'{member}' is not a member of this agreement: check the name")
    if named.public_key is None:
        raise ConfigError(f"the agreement names no public key for '{member}': add its public_key, then sign")
    if keys.ed25519_public_bytes(key.public_key()).hex() != named.public_key:
        raise ConfigError(f"this key is not the one the agreement names for '{member}': use that member's own key file")
    return keys.sign(key, SIGNATURE_DOMAIN + bytes.fromhex(agreement_hash(agreement))).hex()


def load_member_key(agreement: Agreement, keys_dir: Path | None, member: str, *, file: Path | None = None) -> Ed25519PrivateKey:
    """``member``'s identity key from ``keys_dir/<member>.key`` (or ``file``: a kit's identity.key),
    checked against the key the agreement names."""
    from consortium.crypto.keyfile import load_identity_key

    named = next((m.public_key for m in agreement.members if m.name == member), None)
    key = load_identity_key(file if file is not None else Path(str(keys_dir)) / f"{member}.key")
    if keys.ed25519_public_bytes(key.public_key()).hex() != named:
        raise ConfigError(f"the key file of '{member}' is not the key the agreement names for it: use that member's own key")
    return key


def approval(agreement: Agreement, signatures: dict[str, str]) -> tuple[list[str], list[str]]:
    """(approvers whose signature on this very agreement verifies, approvers who have not signed it).

    A signature that does not verify, over an earlier version say, raises: it
    is either stale (re-sign) or forged.
    """
    digest = SIGNATURE_DOMAIN + bytes.fromhex(agreement_hash(agreement))
    signed, missing = [], []
    for m in agreement.members:
        if not m.approver:
            continue
        sig = signatures.get(m.name)
        if sig is None or m.public_key is None:
            missing.append(m.name)
            continue
        try:
            keys.verify(bytes.fromhex(m.public_key), bytes.fromhex(sig), digest)
        except (ConsortiumError, ValueError):
            raise VerificationError(
                f"the signature of '{m.name}' does not verify for this agreement: it was changed since, "
                "or the signature is forged; every approver must sign the current version"
            ) from None
        signed.append(m.name)
    return signed, missing


def require_approval(agreement: Agreement, signatures: dict[str, str]) -> list[str]:
    """The approvers, once every one has signed this version; otherwise the error that says who has not."""
    signed, missing = approval(agreement, signatures)
    if missing:
        raise ConfigError(
            f"the agreement is not approved: {', '.join(repr(m) for m in missing)} "
            f"{'has' if len(missing) == 1 else 'have'} not signed it (consortium agreement sign; then consortium "
            "agreement collect DIR puts every signature in every kit); no run may start"
        )
    return signed


#: What a run releases outside the differential-privacy guarantee: said wherever the guarantee is stated.
DP_DOES_NOT_COVER = (
    "What the epsilon does **not** cover: the setup statistics (each site's number of training records and, per "
    "feature, the sum, the sum of squares and the count of values present; a regression target's sum and sum of "
    "squares) and every evaluation's counts (records, correct predictions, score and calibration histograms, the "
    "labels' counts) are exact sums, released without noise to whoever may see them: under secure aggregation only "
    "their total over the round's cohort, never one site's alone. The transcript also records which sites took part in each round "
    "and each site's record count and data hash. The epsilon bounds what the model updates reveal, nothing else."
)


def with_agreed_terms(config: SimulationConfig, agreement: Agreement) -> SimulationConfig:
    """``config`` with what it leaves unsaid taken from ``agreement``'s terms: the rounds (the agreed
    number), ``participation.min_sites`` (the minimum cohort), the privacy level, epsilon (the agreed
    cap) and delta. A value the config sets is kept, and ``check_run`` still refuses one the agreement
    does not allow: the agreement fills gaps, it never loosens a term."""
    update: dict[str, object] = {}
    if "rounds" not in config.model_fields_set:
        update["rounds"] = agreement.rounds
    if "min_sites" not in config.participation.model_fields_set:
        update["participation"] = config.participation.model_copy(update={"min_sites": agreement.min_cohort})
    p, req = config.privacy, agreement.privacy
    privacy = {k: v for k, v in (("level", req.level), ("epsilon", req.max_epsilon), ("delta", req.delta))
               if k not in p.model_fields_set}
    if privacy:
        update["privacy"] = p.model_copy(update=privacy)
    return config.model_copy(update=update) if update else config


def check_run(
    agreement: Agreement, config: SimulationConfig, sites: list[str], layout_hash: str, task: dict[str, str] | None = None,
) -> None:
    """Refuse a run whose configuration (and ``task``, its identity as the manifest will name it) the
    agreement does not allow; the error names the rule and the fix."""
    agreed_sites = sorted(agreement.sites())
    if sorted(sites) != agreed_sites:
        raise ConfigError(f"the run's sites {sorted(sites)} are not the agreement's {agreed_sites}")
    if agreement.secure_aggregation_required and not config.secure_aggregation.enabled:
        raise ConfigError("the agreement requires secure aggregation: turn secure_aggregation.enabled back on")
    p, req = config.privacy, agreement.privacy
    if not p.enabled or p.level != req.level:
        raise ConfigError(f"the agreement requires {req.level}-level differential privacy: set privacy.enabled and privacy.level: {req.level}")
    caps = [p.epsilon, *p.site_epsilon_caps.values()]
    if max(caps) > req.max_epsilon or p.delta > req.delta:
        raise ConfigError(
            f"the agreement allows at most epsilon {req.max_epsilon:g} at delta {req.delta:g} per site: "
            f"lower privacy.epsilon (and any site cap) to {req.max_epsilon:g} and privacy.delta to {req.delta:g}"
        )
    if config.participation.min_sites < agreement.min_cohort:
        raise ConfigError(
            f"the agreement's minimum cohort is {agreement.min_cohort}: set participation.min_sites to at least that"
        )
    if config.rounds > agreement.rounds:
        raise ConfigError(f"the agreement allows {agreement.rounds} rounds: set rounds to at most that")
    if agreement.allowed_layouts and layout_hash not in agreement.allowed_layouts:
        raise ConfigError(
            f"the configured model (layout hash {layout_hash}) is not among the agreement's allowed_layouts: "
            "choose an allowed model, or amend the agreement (and have it signed again)"
        )
    if task is not None and task.get("code") != "framework" and task["sha256"] not in {t.sha256 for t in agreement.tasks}:
        raise ConfigError(
            f"the agreement does not accept task {task['name']} (sha256 {task['sha256'][:16]}...): add it to the "
            "agreement's tasks (consortium task hash prints the entry), and have the agreement signed again"
        )


def read_signatures(path: Path) -> dict[str, str]:
    """The signatures beside the agreement at ``path`` (none yet: empty)."""
    sig_path = signatures_path(path)
    if not sig_path.exists():
        return {}
    return read_signature_file(sig_path)


def read_signature_file(sig_path: Path) -> dict[str, str]:
    """A signatures file (member -> signature, hex), wherever it lies."""
    try:
        data = json.loads(sig_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{sig_path} line {exc.lineno}: not JSON: restore it or sign again") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ConfigError(f"{sig_path}: expected an object of member name to signature")
    return data


def parse_agreement(text: str, source: str = "<agreement>") -> Agreement:
    tree, raw = parse_yaml(text, source, ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: an agreement is a mapping of settings: start from 'consortium agreement init'")
    return validate(Agreement, raw, tree, source, ConfigError, "fix that value in the agreement")


def load_agreement(path: str | Path) -> Agreement:
    return parse_agreement(read_text(path, ConfigError, "agreement file"), source=str(path))


def template(consortium: str, sites: list[str], coordinator: str = "coordinator") -> str:
    """A starting agreement: every protection on, aggregates only, each member an approver."""
    members = "\n".join([f"  - {{name: {coordinator}, role: coordinator}}", *(f"  - {{name: {s}, role: site}}" for s in sites)])
    return f"""# The consortium agreement: every member the file names as approver must sign its hash
# (consortium agreement sign) before a run starts. Any change needs new signatures.
# Each member creates its key (consortium key new FILE) and sends the public key it prints,
# which goes in its entry here as public_key: <hex>.
version: 1
consortium: {consortium}
members:
{members}
# Which artefacts may leave a site, and who may see them. Raw rows, per-example outputs or
# gradients and unmasked updates are not artefacts: no agreement can let them out.
exposure:
  - {{artefact: masked_update, to: [coordinator]}}
  - {{artefact: aggregate_update, to: [coordinator]}}
  - {{artefact: aggregate_metrics, to: [coordinator, site, auditor, observer]}}
  - {{artefact: setup_statistics, to: [coordinator]}}
  - {{artefact: global_model, to: [coordinator, site]}}
  - {{artefact: privacy_events, to: [coordinator, site, auditor]}}
  - {{artefact: transcript, to: [coordinator, site, auditor]}}
  - {{artefact: drift_incident, to: [coordinator, site, auditor]}}
min_cohort: {min(3, max(1, len(sites)))}
privacy:
  level: record       # record: each patient | site: each institution's whole contribution
  max_epsilon: 8.0    # per site, for the whole collaboration; sites may keep a stricter cap
  delta: 1.0e-5
secure_aggregation_required: true
allowed_layouts: []   # model layout hashes allowed; empty: any the sites' policies accept
tasks: []             # study tasks accepted, by code hash (consortium task hash PATH); empty: built-in tasks only
rounds: 20
resume_quorum: {max(1, (len(sites) + 1) // 2 + 1)}
{_lifecycle_template(sites)}"""


def _lifecycle_template(sites: list[str]) -> str:
    canary = sites[: max(2, min(3, len(sites)))]  # as many as the minimum cohort the template sets
    if len(sites) < 2:
        return "# lifecycle: needs at least 2 canary sites under secure aggregation\n"
    return f"""# How a new model version reaches the sites: evaluated first by the canary sites on their own
# validation data (summed securely), promoted only if no metric below regresses by more than its
# tolerance against the production version, then rolled out to a growing share of the sites,
# and rolled back automatically if it regresses there. A site whose incoming data drifts past the
# thresholds files a signed incident (the drift_incident artefact) and promotion pauses.
lifecycle:
  canary_sites: [{", ".join(canary)}]
  tolerances: {{accuracy: 0.02, ece: 0.05}}
  rollout: [0.5, 1.0]
  drift: {{psi: 0.25, label_shift: 0.1, min_rows: 200}}
"""


def explain(agreement: Agreement) -> str:
    """The agreement in plain language, as Markdown, for a privacy officer."""
    lines = [f"# What the {agreement.consortium} agreement promises", ""]
    sites = agreement.sites()
    lines += [
        f"**Members.** {len(agreement.members)} members: "
        + ", ".join(f"{m.name} ({m.role}{', approver' if m.approver else ''})" for m in agreement.members)
        + ".",
        "",
        "## What may leave a site, and who sees it",
        "",
        "| artefact | what it is | who may see it |",
        "|---|---|---|",
    ]
    for e in agreement.exposure:
        lines.append(f"| {e.artefact} | {ARTEFACT_TEXT[e.artefact]} | {', '.join(e.to)} |")
    listed = {e.artefact for e in agreement.exposure}
    for artefact, text in ARTEFACT_TEXT.items():
        if artefact not in listed:
            lines.append(f"| {artefact} | {text} | nobody: it never leaves a site |")
    lines += ["", f"Never leaves a site, whatever the agreement says: {NEVER_LEAVES}.", "", "## Privacy promises", ""]
    p = agreement.privacy
    who = "any one patient's records" if p.level == "record" else "any one institution's whole contribution"
    lines.append(
        f"- Differential privacy at **{p.level} level**: what anyone can learn about {who} from the model "
        f"updates released is bounded by epsilon **{p.max_epsilon:g}** at delta {p.delta:g} per site, for the whole "
        "collaboration. Each site keeps its own budget and refuses a round that would exceed it."
    )
    lines.append(f"- {DP_DOES_NOT_COVER}")
    if agreement.secure_aggregation_required:
        lines.append("- **Secure aggregation is required**: the coordinator only ever learns sums over the cohort.")
    else:
        lines.append("- Secure aggregation is **not** required: the coordinator may see individual sites' updates.")
    lines.append(f"- No round runs with fewer than **{agreement.min_cohort}** of the {len(sites)} sites.")
    if agreement.allowed_layouts:
        lines.append(f"- Only {len(agreement.allowed_layouts)} model architecture(s), named by layout hash, may be trained.")
    if agreement.tasks:
        lines.append(
            f"- Only {len(agreement.tasks)} study task(s) may run, each named by the hash of its exact code and of the "
            "libraries it imports: " + ", ".join(f"{t.name} (`{t.sha256[:16]}…`)" for t in agreement.tasks)
            + ". Each site runs only those it approved itself, from its own copy, and refuses any changed byte."
        )
    else:
        lines.append("- Only the framework's built-in tasks may run: no study code.")
    lines.append(
        f"- At most {agreement.rounds} rounds. A halted run resumes only with {agreement.resume_quorum} approvers' signatures."
    )
    if agreement.lifecycle is not None:
        lc = agreement.lifecycle
        tolerances = ", ".join(f"{k} by more than {v:g}" for k, v in lc.tolerances.items())
        stages = ", ".join(f"{share:.0%}" for share in lc.rollout)
        lines += [
            "", "## How a new model version reaches the sites", "",
            f"- Every new version is first evaluated by the canary sites ({', '.join(lc.canary_sites)}) on their own "
            "validation records, summed securely, beside the version in production.",
            f"- It is promoted only if it is not worse on {tolerances}; otherwise it is rejected, with the numbers in the transcript.",
            f"- It then reaches the sites in stages ({stages}); each site may pin a version by its own policy. After each stage "
            "the sites running it compare it with the previous version, and any regression rolls it back everywhere.",
            f"- Each site checks its incoming records for drift (a feature's stability index above {lc.drift.psi:g}, or "
            f"label rates shifted by more than {lc.drift.label_shift:g}, over at least {lc.drift.min_rows} records). "
            + ("A breach is reported, signed, naming the site and the features (drift_incident), and no version is "
               "promoted until it is resolved." if any(e.artefact == "drift_incident" for e in agreement.exposure)
               else "The agreement does not let drift reports leave a site: each site keeps its own."),
        ]
    lines.append(f"- Agreement hash (what each approver signs): `{agreement_hash(agreement)}`.")
    return "\n".join(lines) + "\n"


def collect_signatures(agreement_file: Path, copies: list[Path], extra: list[Path] | None = None) -> tuple[list[str], list[str]]:
    """Gather every signature on the agreement at ``agreement_file`` from beside it, beside each of its
    ``copies`` (the kits') and from the ``extra`` signatures files, check each one, and write them all
    beside the agreement and every copy: one step instead of copying files into each kit by hand.

    Returns:
        (approvers who have signed, approvers still to sign).

    Raises:
        ConfigError: a copy is not the same agreement, a file is unreadable, or a signature names no
            member or does not verify for this version (the file and the member are named).
    """
    from consortium.runs import write_atomic

    agreement = load_agreement(agreement_file)
    digest = agreement_hash(agreement)
    for copy in copies:
        if agreement_hash(load_agreement(copy)) != digest:
            raise ConfigError(
                f"{copy} is not the agreement {agreement_file} (another hash): give every member the same version"
            )
    members = {m.name for m in agreement.members}
    sources = [signatures_path(p) for p in (agreement_file, *copies)] + list(extra or [])
    merged: dict[str, str] = {}
    for source in sources:
        if not source.exists():
            if source in (extra or []):
                raise ConfigError(f"signatures file {source} does not exist: give the file a member sent")
            continue
        for member, signature in read_signature_file(source).items():
            if member not in members:
                raise ConfigError(f"{source}: '{member}' is not a member of this agreement: remove that line")
            try:
                approval(agreement, {member: signature})
            except VerificationError:
                raise ConfigError(
                    f"{source}: the signature of '{member}' does not verify for this agreement (another version, "
                    "or forged): have that member sign this version again"
                ) from None
            merged[member] = signature
    text = (json.dumps(merged, indent=1, sort_keys=True) + "\n").encode()
    for path in (agreement_file, *copies):
        write_atomic(signatures_path(path), text)
    return approval(agreement, merged)
