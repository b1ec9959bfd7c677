"""The closed, versioned schema of every message between coordinator and sites.

Bytes from another institution are parsed by these pydantic models and
nothing else: no pickle, no import-by-name. Unknown fields, unknown message
kinds and other schema versions are rejected with ``MessageRejected``.
Messages travel as frames of ``consortium.wire``: a JSON header plus raw
tensor bytes, each tensor checked against its SHA-256 on arrival.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, Field, field_validator, model_validator

from consortium.learning.models import ModelSpec
from consortium.learning.strategies import Weighting
from consortium.learning.training import AUC_BINS, TrainSettings
from consortium.wire import Frozen as _Frozen
from consortium.wire import Tensor, decode_frame, encode_frame

SCHEMA_VERSION = 1

Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class SetupRequest(_Frozen):
    """Asks a site for its data's shape and feature statistics (sums, never rows)."""

    kind: Literal["setup_request"] = "setup_request"


class SetupReply(_Frozen):
    kind: Literal["setup_reply"] = "setup_reply"
    schema_fingerprint: str
    feature_names: tuple[str, ...]
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int] | None
    n_train: int = Field(ge=1)
    feature_sum: Tensor
    feature_sumsq: Tensor


class TaskSpec(_Frozen):
    """What every site must build: the model and its input standardisation."""

    model: ModelSpec
    n_features: int = Field(ge=1)
    n_classes: int = Field(ge=2)
    image_shape: tuple[int, int, int] | None = None
    mean: Tensor
    scale: Tensor
    layout_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class FitRequest(_Frozen):
    kind: Literal["fit_request"] = "fit_request"
    task: TaskSpec
    params: Tensor
    train: TrainSettings
    proximal_mu: float = Field(0.0, ge=0)
    weighting: Weighting = "examples"


class FitReply(_Frozen):
    """A site's update, already multiplied by its weight: the coordinator only needs sums."""

    kind: Literal["fit_reply"] = "fit_reply"
    weight: float = Field(gt=0)
    weighted_update: Tensor
    num_examples: int = Field(ge=1)
    train_loss_sum: float


class EvaluateRequest(_Frozen):
    kind: Literal["evaluate_request"] = "evaluate_request"
    task: TaskSpec
    params: Tensor


class EvaluateReply(_Frozen):
    kind: Literal["evaluate_reply"] = "evaluate_reply"
    n: int = Field(ge=0)
    correct: int = Field(ge=0)
    loss_sum: float = Field(ge=0)
    score_hist: Tensor | None = None

    @field_validator("score_hist")
    @classmethod
    def _hist_shape(cls, v: Tensor | None) -> Tensor | None:
        if v is not None and (v.dtype != "int64" or v.shape != (2, AUC_BINS)):
            raise ValueError(f"score_hist must be int64 of shape (2, {AUC_BINS})")
        return v

    @model_validator(mode="after")
    def _counts(self) -> "EvaluateReply":
        if self.correct > self.n:
            raise ValueError(f"correct ({self.correct}) cannot exceed n ({self.n})")
        return self


class Refusal(_Frozen):
    """A site declines a request and says why."""

    kind: Literal["refusal"] = "refusal"
    reason: str = Field(min_length=1, max_length=2000)


Message = Annotated[
    Union[SetupRequest, SetupReply, FitRequest, FitReply, EvaluateRequest, EvaluateReply, Refusal],
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
