"""The wire format shared by every protocol: frames of a JSON header plus raw tensor bytes.

One frame per message::

    b"CSM1" | u32 big-endian header length | header (UTF-8 JSON) | tensor bytes

The header is a pydantic model as JSON; each :class:`Tensor` in it carries its
dtype, shape, SHA-256, offset and length into the bytes that follow, which
hold the raw little-endian arrays back to back with nothing left over. Every
tensor's length and hash are checked on arrival, so a signature over the
header covers the tensors too. Nothing here unpickles or imports by name.
"""

from __future__ import annotations

import binascii
import hashlib
import struct
from typing import Annotated, Literal, TypeVar

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializationInfo,
    ValidationError,
    ValidationInfo,
    model_serializer,
    model_validator,
)

from consortium.errors import MessageRejected

_DTYPES = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int64": np.dtype("<i8"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
}

Model = TypeVar("Model", bound=BaseModel)


def _bytes_in(value: object) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):  # how JSON carries it: base64.b64decode(value, validate=True), without its wrapper
        try:
            return binascii.a2b_base64(value, strict_mode=True)
        except (binascii.Error, ValueError):  # not the alphabet, bad padding, or not ASCII at all
            raise ValueError("not valid base64") from None
    raise ValueError(f"expected bytes, got {type(value).__name__}")


#: Short byte strings (keys, signatures, ciphertexts of shares): raw in Python, base64 in JSON.
B64 = Annotated[
    bytes,
    BeforeValidator(_bytes_in),
    PlainSerializer(lambda b: binascii.b2a_base64(b, newline=False).decode("ascii"), return_type=str, when_used="json"),
]


class Frozen(BaseModel):
    """Base of every wire model: immutable, and unknown fields are errors."""

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


class Tensor(Frozen):
    """An n-dimensional array as raw little-endian bytes."""

    dtype: Literal["float32", "float64", "int64", "uint32", "uint64"]
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
    def _check_bytes(self) -> Tensor:
        expected = int(np.prod(self.shape, dtype=np.int64)) * _DTYPES[self.dtype].itemsize
        if len(self.raw) != expected:
            raise ValueError(f"tensor of shape {list(self.shape)} and dtype {self.dtype} needs {expected} bytes, got {len(self.raw)}")
        if not self._hashed() and hashlib.sha256(self.raw).hexdigest() != self.sha256:
            raise ValueError("tensor bytes do not match their SHA-256: the message was corrupted or tampered with")
        self._mark_hashed()
        return self

    # pydantic re-runs the check above each time a Tensor instance is put into a message model, which
    # re-hashed the same bytes (4 MB: 2 ms) just hashed by from_numpy or checked on arrival. A tensor
    # remembers the very bytes and digest objects it has hashed (immutable, compared by identity, so a
    # model_copy with other bytes or digest is hashed again) and checks each pair once. The note lives
    # in __dict__ outside the fields: pydantic leaves it out of equality, repr and serialisation.
    def _hashed(self) -> bool:
        note = self.__dict__.get("_sha256_checked")
        return note is not None and note[0] is self.raw and note[1] is self.sha256

    def _mark_hashed(self) -> None:
        self.__dict__["_sha256_checked"] = (self.raw, self.sha256)

    @model_serializer(mode="plain")
    def _to_frame(self, info: SerializationInfo) -> dict[str, object]:
        blobs = (info.context or {}).get("blobs")
        if blobs is None:
            raise ValueError("tensors are serialised by consortium.protocol.messages.encode only")
        offset = blobs.write(self.raw)
        return {"dtype": self.dtype, "shape": list(self.shape), "sha256": self.sha256, "offset": offset, "nbytes": len(self.raw)}

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> Tensor:
        dtype = str(array.dtype)
        if dtype not in _DTYPES:
            raise ValueError(f"tensors of dtype {dtype} cannot be sent: use float32, float64, int64, uint32 or uint64")
        wire = np.ascontiguousarray(array, dtype=_DTYPES[dtype])
        owner = wire.base
        while isinstance(owner, np.ndarray):
            owner = owner.base
        if (  # a view of a whole bytes object (np.frombuffer): immutable already, so share it rather than copy
            type(owner) is bytes
            and 0 < wire.nbytes == len(owner)
            and wire.ctypes.data == np.frombuffer(owner, dtype=np.uint8).ctypes.data
        ):
            raw = owner
        else:
            raw = wire.tobytes()
        tensor = cls.model_construct(
            dtype=dtype, shape=tuple(int(s) for s in array.shape), sha256=hashlib.sha256(raw).hexdigest(), raw=raw
        )
        tensor._mark_hashed()
        return tensor

    def to_numpy(self) -> np.ndarray:
        """A fresh, writable, native-endian copy of the array."""
        dtype = _DTYPES[self.dtype]
        return np.frombuffer(self.raw, dtype=dtype).reshape(self.shape).astype(dtype.newbyteorder("="), copy=True)


MAGIC = b"CSM1"
_LEN = struct.Struct(">I")
MAX_HEADER = 16 * 1024 * 1024


def encode_frame(message: BaseModel) -> bytes:
    """One frame: magic, header length, JSON header, then every tensor's bytes."""
    blobs = _Blobs()
    header = message.model_dump_json(context={"blobs": blobs}).encode("utf-8")
    return b"".join([MAGIC, _LEN.pack(len(header)), header, *blobs.parts])


def decode_frame(model: type[Model], data: bytes) -> Model:
    """Parse one frame as ``model``, or raise MessageRejected naming the first problem."""
    view = memoryview(data)
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise MessageRejected("rejected message: not a Consortium frame (bad magic): the sender speaks another protocol")
    (header_len,) = _LEN.unpack(view[4:8])
    if header_len > MAX_HEADER or 8 + header_len > len(view):
        raise MessageRejected(f"rejected message: header length {header_len} exceeds the frame of {len(view)} bytes")
    payload = view[8 + header_len :]
    blobs = _Blobs(payload)
    try:
        message = model.model_validate_json(bytes(view[8 : 8 + header_len]), context={"blobs": blobs})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        msg = first["msg"].removeprefix("Value error, ")
        raise MessageRejected(f"rejected message: {where}: {msg} ({exc.error_count()} problem(s))") from None
    if blobs.cursor != len(payload):
        raise MessageRejected(
            f"rejected message: {len(payload) - blobs.cursor} bytes after the last tensor: the frame was altered"
        )
    return message
