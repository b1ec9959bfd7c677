"""The closed, versioned schema of every message between coordinator and sites.

Bytes from another institution are parsed by these pydantic models and
nothing else: no pickle, no import-by-name. Unknown fields, unknown message
kinds and other schema versions are rejected with ``MessageRejected``.
Messages travel as frames of ``consortium.wire``: a JSON header plus raw
tensor bytes, each tensor checked against its SHA-256 on arrival.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, field_validator, model_validator

from consortium.learning.specs import ModelSpec, TrainSettings
from consortium.learning.strategies import Weighting
from consortium.privacy.events import PrivacyEvent
from consortium.secagg.encoding import SessionEncoding
from consortium.transcript.log import Entry, TreeHead
from consortium.secagg.messages import (
    ConsistencyAck,
    KeyAdvert,
    KeyRoster,
    MaskedInput,
    SessionParams,
    ShareBundle,
    ShareDelivery,
    SurvivorList,
    UnmaskReply,
    UnmaskRequest,
)
from consortium.wire import Frozen as _Frozen
from consortium.wire import B64, Tensor, decode_frame, encode_frame

SCHEMA_VERSION = 11  # 2: site-level privacy events and the noisy ring encoding; 3: a refusal names its rule; 4: co-signing;
# 5: a fit request may name by hash the model the site holds; 6: sites describe their data and endorse the manifest;
# 7: a fit request carries the round's L2 norm bound on each update; 8: an evaluate request says what to measure
# beyond accuracy (groups of a sensitive attribute, a distribution shift); 9: the model lifecycle (an evaluation's
# purpose, deploying a model version, a site's drift report); 10: SecAgg acknowledgements carry an HMAC tag per
# neighbour, and an unmask request the tags addressed to its site; 11: a share bundle maps each neighbour to its
# ciphertext and a delivery each sender to its (no object per share), and the tags cover the survivor list's SHA-256

#: The coordinator's name in every envelope; no site may take it.
COORDINATOR = "coordinator"

Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


Phase = Literal["setup", "fit", "evaluate"]


class _Contribution(_Frozen):
    """A reply whose summable vector travels in the clear, or (under secure aggregation) stays at the site."""

    contribution: Tensor | None = None

    @field_validator("contribution")
    @classmethod
    def _vector(cls, v: Tensor | None) -> Tensor | None:
        if v is not None and (v.dtype not in ("float32", "float64") or len(v.shape) != 1):
            raise ValueError("a contribution is a 1-D float vector")
        return v


class SetupRequest(_Frozen):
    """Asks a site for its schema and the sums of its training features (never rows)."""

    kind: Literal["setup_request"] = "setup_request"
    secure_aggregation: bool


class SetupReply(_Contribution):
    kind: Literal["setup_reply"] = "setup_reply"
    schema_fingerprint: str
    feature_names: tuple[str, ...]
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int] | None


class TaskSpec(_Frozen):
    """What every site must build: the task (by name: each site runs its own copy), the model and its
    input standardisation."""

    #: The task's name (``classification``, ``regression`` or a study's ``module:Class``).
    task: str = Field("classification", min_length=1, max_length=300)
    #: The SHA-256 of the task's code the manifest names (``learning.task.task_identity``): a site refuses
    #: a request for any code but the one it holds, approved.
    task_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    model: ModelSpec  # the built-in tasks' architecture
    n_features: int = Field(ge=1)
    n_classes: int = Field(ge=0)  # 0: regression
    classes: tuple[str, ...] = ()
    #: A regression target's mean and deviation over every site's training rows: the model predicts the
    #: standardised target; metrics are in the target's units.
    target_mean: float = 0.0
    target_scale: float = Field(1.0, gt=0)
    image_shape: tuple[int, int, int] | None = None
    mean: Tensor
    scale: Tensor
    layout_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class PlanProof(_Frozen):
    """The round's plan (or another entry a site acts on) as the transcript holds it, and the proof that
    it is in a head the sites co-signed.

    A site trains only on the model whose hash this plan names, so the
    coordinator cannot send one site a crafted model (Pasquini et al., CCS
    2022) without the site refusing and the transcript showing it.
    """

    entry: Entry
    head: TreeHead
    path: list[B64]


class FitRequest(_Frozen):
    kind: Literal["fit_request"] = "fit_request"
    task: TaskSpec
    #: The global model, or None to a site that holds it already (it evaluated it last round):
    #: then ``model_sha256`` names it. A site trains only on the model whose hash the plan names.
    params: Tensor | None
    model_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    train: TrainSettings
    proximal_mu: float = Field(0.0, ge=0)
    weighting: Weighting = "examples"
    #: The consortium's training rows (from setup); example weights are divided by it.
    weight_scale: float = Field(1.0, gt=0)
    secure_aggregation: bool
    update_clip: float | None = Field(None, gt=0)
    #: Robust aggregation: the site scales its update into the L2 ball of this radius before it leaves
    #: (and before quantisation); None: no bound. The round's plan in the transcript names the same bound.
    norm_bound: float | None = Field(None, gt=0)
    #: This round's differential privacy, as the site will record it in its ledger; None: no DP.
    #: Record level: DP-SGD in local training. Site level: clip the update (and add noise, if distributed).
    privacy: PrivacyEvent | None = None
    plan: PlanProof | None = None  # with a transcript: the plan this request must match

    @model_validator(mode="after")
    def _clip(self) -> "FitRequest":
        if self.secure_aggregation and self.update_clip is None:
            raise ValueError("secure aggregation needs an update_clip")
        if self.params is None and self.model_sha256 is None:
            raise ValueError("a fit request carries the model, or names by hash one the site holds")
        return self


class SiteDecision(_Frozen):
    """A site's signed answer to a round plan, for the transcript: the model it was sent, and yes or no.

    ``signature`` is the site's Ed25519 signature over the transcript's
    canonical bytes of a ``site_decision`` entry (``transcript.log``), so the
    coordinator can log it but not forge or alter it.
    """

    round: int = Field(ge=0)
    site: Name
    body: dict[str, Any]
    signature: B64


class FitReply(_Contribution):
    """Ready (secure aggregation) or the update in the clear: [w * delta, w, w * loss]."""

    kind: Literal["fit_reply"] = "fit_reply"
    decision: SiteDecision | None = None  # signed acceptance of the round plan, when the site has a key


class EvaluationSpec(_Frozen):
    """What a site measures beyond accuracy when it evaluates; every figure is summed, never one site's."""

    #: The sensitive attribute: the index of a feature of the schema; its groups are the records at or
    #: below ``sensitive_threshold`` and those above. None: no fairness gaps.
    sensitive_feature: int | None = Field(None, ge=0)
    sensitive_threshold: float | None = None
    positive_class: int = Field(1, ge=0)  # the favourable prediction the gaps compare
    #: Robustness: accuracy on the test records with Gaussian noise of this many feature standard deviations.
    shift_noise: float | None = Field(None, gt=0, le=100)


class EvaluateRequest(_Frozen):
    kind: Literal["evaluate_request"] = "evaluate_request"
    task: TaskSpec
    params: Tensor
    secure_aggregation: bool
    evaluation: EvaluationSpec = EvaluationSpec()
    #: round: the round's model on the test split; canary: a candidate version on the validation split;
    #: monitor: a version being rolled out, on the test split (the records the site holds out).
    purpose: Literal["round", "canary", "monitor"] = "round"


class DeployRequest(_Frozen):
    """The model lifecycle: run model version ``version`` from now on (a rollout stage, or a rollback)."""

    kind: Literal["deploy_request"] = "deploy_request"
    version: str = Field(pattern=r"^v[1-9][0-9]*$")
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # the transcript's hash of the model the params must be
    task: TaskSpec
    params: Tensor
    reason: Literal["rollout", "rollback"]
    stage: int = Field(ge=0)  # the rollout stage (0 for a rollback)
    #: The transcript's word for it, in the last head the site co-signed: the version's registration
    #: (which binds the version to the model's hash) and the entry that put it in production.
    registered: PlanProof | None = None
    promoted: PlanProof | None = None


class DeployReply(_Frozen):
    """The site's signed receipt (a ``deployment`` entry): the version it now runs, or why it refused."""

    kind: Literal["deploy_reply"] = "deploy_reply"
    receipt: SiteDecision


class MonitorRequest(_Frozen):
    """Between rounds: has the site's incoming data drifted from its training data?"""

    kind: Literal["monitor_request"] = "monitor_request"


class MonitorReply(_Frozen):
    """A signed ``drift_incident`` or ``drift_resolved`` entry, or nothing to disclose."""

    kind: Literal["monitor_reply"] = "monitor_reply"
    entry_kind: Literal["drift_incident", "drift_resolved"] | None = None
    report: SiteDecision | None = None

    @model_validator(mode="after")
    def _pair(self) -> "MonitorReply":
        if (self.entry_kind is None) != (self.report is None):
            raise ValueError("a drift report names its kind, and only a report does")
        return self


class EvaluateReply(_Contribution):
    """Ready (secure aggregation) or the evaluation sums in the clear."""

    kind: Literal["evaluate_reply"] = "evaluate_reply"


# -- secure aggregation stages, one request and one reply kind each ---------------


class SecAggStart(_Frozen):
    """advertise_keys: the session over the sites that are ready, and how to encode."""

    kind: Literal["secagg_start"] = "secagg_start"
    phase: Phase
    params: SessionParams
    encoding: SessionEncoding


class SecAggAdvert(_Frozen):
    kind: Literal["secagg_advert"] = "secagg_advert"
    advert: KeyAdvert


class SecAggRoster(_Frozen):
    kind: Literal["secagg_roster"] = "secagg_roster"
    session_id: str
    roster: KeyRoster


class SecAggShares(_Frozen):
    kind: Literal["secagg_shares"] = "secagg_shares"
    bundle: ShareBundle


class SecAggDeliver(_Frozen):
    kind: Literal["secagg_deliver"] = "secagg_deliver"
    session_id: str
    delivery: ShareDelivery


class SecAggMasked(_Frozen):
    kind: Literal["secagg_masked"] = "secagg_masked"
    masked: MaskedInput


class SecAggSurvivors(_Frozen):
    kind: Literal["secagg_survivors"] = "secagg_survivors"
    session_id: str
    survivors: SurvivorList


class SecAggAck(_Frozen):
    kind: Literal["secagg_ack"] = "secagg_ack"
    ack: ConsistencyAck


class SecAggUnmask(_Frozen):
    kind: Literal["secagg_unmask"] = "secagg_unmask"
    session_id: str
    request: UnmaskRequest


class SecAggReveal(_Frozen):
    kind: Literal["secagg_reveal"] = "secagg_reveal"
    reply: UnmaskReply


class DescribeRequest(_Frozen):
    """The coordinator asks a site for what the manifest records of its data (no data itself)."""

    kind: Literal["describe_request"] = "describe_request"


class DataFingerprint(_Frozen):
    schema_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rows: int = Field(ge=0)
    content_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # salted with a secret the site keeps


class Description(_Frozen):
    kind: Literal["description"] = "description"
    fingerprint: DataFingerprint


class EndorseRequest(_Frozen):
    """The coordinator asks a site to endorse the run's manifest (transcript entry 0) before anything runs."""

    kind: Literal["endorse_request"] = "endorse_request"
    manifest: dict[str, Any]


class Endorsement(_Frozen):
    kind: Literal["endorsement"] = "endorsement"
    signature: B64


class CosignRequest(_Frozen):
    """The coordinator asks a site to co-sign a transcript head, with the proof that it extends the last one."""

    kind: Literal["cosign_request"] = "cosign_request"
    head: TreeHead
    proof: list[B64] = Field(max_length=64)  # a consistency proof has at most log2(size) hashes


class Cosignature(_Frozen):
    """A site's co-signature on the head it was asked about."""

    kind: Literal["cosignature"] = "cosignature"
    signature: B64


class Refusal(_Frozen):
    """A site declines a request and says why."""

    kind: Literal["refusal"] = "refusal"
    reason: str = Field(min_length=1, max_length=2000)
    rule: str = Field("protocol", pattern=r"^[a-z_]{1,40}$")  # the guard's rule that refused, or "protocol"
    decision: SiteDecision | None = None  # signed, when it declines a round plan


Message = Annotated[
    Union[
        SetupRequest,
        SetupReply,
        FitRequest,
        FitReply,
        EvaluateRequest,
        EvaluateReply,
        SecAggStart,
        SecAggAdvert,
        SecAggRoster,
        SecAggShares,
        SecAggDeliver,
        SecAggMasked,
        SecAggSurvivors,
        SecAggAck,
        SecAggUnmask,
        SecAggReveal,
        DescribeRequest,
        Description,
        EndorseRequest,
        Endorsement,
        CosignRequest,
        Cosignature,
        Refusal,
        DeployRequest,
        DeployReply,
        MonitorRequest,
        MonitorReply,
    ],
    Field(discriminator="kind"),
]


class Envelope(_Frozen):
    """Who sends what to whom, for which round."""

    schema_version: int
    sender: Name
    recipient: Name
    round: int = Field(ge=0)
    message: Message

    @field_validator("schema_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(
                f"schema version {v} is not spoken here (this build speaks {SCHEMA_VERSION}): "
                "run the same Consortium release on both sides"
            )
        return v


def make_envelope(sender: str, recipient: str, rnd: int, message: BaseModel) -> Envelope:
    return Envelope(schema_version=SCHEMA_VERSION, sender=sender, recipient=recipient, round=rnd, message=message)


def encode(envelope: Envelope) -> bytes:
    return encode_frame(envelope)


def decode(data: bytes) -> Envelope:
    """Parse one frame into an Envelope, or raise MessageRejected naming the first problem."""
    return decode_frame(Envelope, data)
