"""The closed, versioned schema of every message between coordinator and sites.

Bytes from another institution are parsed by these pydantic models and
nothing else: no pickle, no import-by-name. Unknown fields, unknown message
kinds and other schema versions are rejected with ``MessageRejected``.
Wire format (one frame per message)::

    b"CSM1" | u32 big-endian header length | header (UTF-8 JSON) | tensor bytes

The header is the envelope as JSON; each tensor in it carries its dtype,
shape, SHA-256, offset and length into the bytes that follow, which hold the
raw little-endian arrays back to back with nothing left over. Every tensor's
length and hash are checked on arrival, so signing the header (a later layer)
covers the tensors too.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from consortium.errors import MessageRejected
from consortium.learning.models import ModelSpec
from consortium.learning.strategies import Weighting
from consortium.learning.training import AUC_BINS, TrainSettings

SCHEMA_VERSION = 1

_DTYPES = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8")}

Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Blobs:
    """Tensor bytes of one frame, written (encode) or read (decode) in header order."""

    def __init__(self, payload: memoryview | None = None) -> None:
        self.parts: list[bytes] = []
        self.payload = payload
        self.cursor = 0

    def write(self, raw: bytes) -> int:
        offset = self.cursor
        self.parts.append(raw)
        self.cursor += len(raw)
        return offset

    def read(self, offset: int, nbytes: int) -> bytes:
        assert self.payload is not None
        if offset != self.cursor or nbytes < 0 or offset + nbytes > len(self.payload):
            raise ValueError(
                f"tensor bytes at offset {offset} (+{nbytes}) are out of order or beyond the frame's "
                f"{len(self.payload)} bytes"
            )
        self.cursor += nbytes
        return bytes(self.payload[offset : offset + nbytes])


class Tensor(_Frozen):
    """An n-dimensional array as raw little-endian bytes."""

    dtype: Literal["float32", "int64"]
    shape: tuple[Annotated[int, Field(ge=0)], ...]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    raw: bytes = Field(repr=False)

    @model_validator(mode="before")
    @classmethod
    def _from_frame(cls, data: object, info: ValidationInfo) -> object:
        """On the wire a tensor names its bytes by offset and length; never inline."""
        blobs = (info.context or {}).get("blobs")
        if blobs is None or not isinstance(data, dict):
            return data
        if set(data) != {"dtype", "shape", "sha256", "offset", "nbytes"}:
            raise ValueError("a tensor header has exactly dtype, shape, sha256, offset and nbytes")
        offset, nbytes = data["offset"], data["nbytes"]
        if not (isinstance(offset, int) and isinstance(nbytes, int)):
            raise ValueError("tensor offset and nbytes must be integers")
        rest = {k: v for k, v in data.items() if k not in ("offset", "nbytes")}
        return {**rest, "raw": blobs.read(offset, nbytes)}

    @model_validator(mode="after")
    def _check_bytes(self) -> "Tensor":
        expected = int(np.prod(self.shape, dtype=np.int64)) * _DTYPES[self.dtype].itemsize
        if len(self.raw) != expected:
            raise ValueError(f"tensor of shape {list(self.shape)} and dtype {self.dtype} needs {expected} bytes, got {len(self.raw)}")
        if hashlib.sha256(self.raw).hexdigest() != self.sha256:
            raise ValueError("tensor bytes do not match their SHA-256: the message was corrupted or tampered with")
        return self

    @model_serializer(mode="plain")
    def _to_frame(self, info: SerializationInfo) -> dict[str, object]:
        blobs = (info.context or {}).get("blobs")
        if blobs is None:
            raise ValueError("tensors are serialised by consortium.protocol.messages.encode only")
        offset = blobs.write(self.raw)
        return {"dtype": self.dtype, "shape": list(self.shape), "sha256": self.sha256, "offset": offset, "nbytes": len(self.raw)}

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "Tensor":
        dtype = str(array.dtype)
        if dtype not in _DTYPES:
            raise ValueError(f"tensors of dtype {dtype} cannot be sent: use float32 or int64")
        raw = np.ascontiguousarray(array, dtype=_DTYPES[dtype]).tobytes()
        return cls.model_construct(
            dtype=dtype, shape=tuple(int(s) for s in array.shape), sha256=hashlib.sha256(raw).hexdigest(), raw=raw
        )

    def to_numpy(self) -> np.ndarray:
        """A fresh, writable, native-endian copy of the array."""
        dtype = _DTYPES[self.dtype]
        return np.frombuffer(self.raw, dtype=dtype).reshape(self.shape).astype(dtype.newbyteorder("="), copy=True)


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


MAGIC = b"CSM1"
_LEN = struct.Struct(">I")
MAX_HEADER = 16 * 1024 * 1024


def encode(envelope: Envelope) -> bytes:
    """One frame: magic, header length, JSON header, then every tensor's bytes."""
    blobs = _Blobs()
    header = envelope.model_dump_json(context={"blobs": blobs}).encode("utf-8")
    return b"".join([MAGIC, _LEN.pack(len(header)), header, *blobs.parts])


def decode(data: bytes) -> Envelope:
    """Parse one frame into an Envelope, or raise MessageRejected naming the first problem."""
    view = memoryview(data)
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise MessageRejected("rejected message: not a Consortium frame (bad magic): the sender speaks another protocol")
    (header_len,) = _LEN.unpack(view[4:8])
    if header_len > MAX_HEADER or 8 + header_len > len(view):
        raise MessageRejected(f"rejected message: header length {header_len} exceeds the frame of {len(view)} bytes")
    blobs = _Blobs(view[8 + header_len :])
    try:
        envelope = Envelope.model_validate_json(bytes(view[8 : 8 + header_len]), context={"blobs": blobs})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        msg = first["msg"].removeprefix("Value error, ")
        raise MessageRejected(f"rejected message: {where}: {msg} ({exc.error_count()} problem(s))") from None
    if blobs.cursor != len(blobs.payload):  # type: ignore[arg-type]
        raise MessageRejected(
            f"rejected message: {len(blobs.payload) - blobs.cursor} bytes after the last tensor: the frame was altered"  # type: ignore[arg-type]
        )
    return envelope
