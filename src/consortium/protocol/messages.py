"""The closed, versioned schema of every message between coordinator and sites.

Bytes from another institution are parsed by these pydantic models and
nothing else: no pickle, no import-by-name. Unknown fields, unknown message
kinds and other schema versions are rejected with ``MessageRejected``.
Tensors travel as raw little-endian bytes (base64 inside JSON) with their
dtype, shape and SHA-256, checked on arrival.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from consortium.errors import MessageRejected
from consortium.learning.models import ModelSpec
from consortium.learning.strategies import Weighting
from consortium.learning.training import AUC_BINS, TrainSettings

SCHEMA_VERSION = 1

_DTYPES = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8")}

Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tensor(_Frozen):
    """An n-dimensional array as raw little-endian bytes."""

    dtype: Literal["float32", "int64"]
    shape: tuple[Annotated[int, Field(ge=0)], ...]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    data: str  # base64 of the raw bytes

    _raw: bytes = PrivateAttr(b"")

    @model_validator(mode="after")
    def _check_bytes(self) -> "Tensor":
        """Checked once, on arrival: valid base64, the right length, the declared hash."""
        try:
            raw = base64.b64decode(self.data, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"tensor data is not valid base64 ({exc})") from None
        expected = int(np.prod(self.shape, dtype=np.int64)) * _DTYPES[self.dtype].itemsize
        if len(raw) != expected:
            raise ValueError(f"tensor of shape {list(self.shape)} and dtype {self.dtype} needs {expected} bytes, got {len(raw)}")
        if hashlib.sha256(raw).hexdigest() != self.sha256:
            raise ValueError("tensor bytes do not match their SHA-256: the message was corrupted or tampered with")
        self._raw = raw
        return self

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "Tensor":
        dtype = str(array.dtype)
        if dtype not in _DTYPES:
            raise ValueError(f"tensors of dtype {dtype} cannot be sent: use float32 or int64")
        raw = np.ascontiguousarray(array, dtype=_DTYPES[dtype]).tobytes()
        tensor = cls.model_construct(
            dtype=dtype,
            shape=tuple(int(s) for s in array.shape),
            sha256=hashlib.sha256(raw).hexdigest(),
            data=base64.b64encode(raw).decode("ascii"),
        )
        tensor._raw = raw
        return tensor

    def to_numpy(self) -> np.ndarray:
        """A fresh, writable, native-endian copy of the array."""
        dtype = _DTYPES[self.dtype]
        return np.frombuffer(self._raw, dtype=dtype).reshape(self.shape).astype(dtype.newbyteorder("="), copy=True)


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
    return envelope.model_dump_json().encode("utf-8")


def decode(data: bytes) -> Envelope:
    """Parse bytes into an Envelope, or raise MessageRejected naming the first problem."""
    try:
        return Envelope.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise MessageRejected(
            f"rejected message: {where}: {first['msg']} ({exc.error_count()} problem(s))"
        ) from None
