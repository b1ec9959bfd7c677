import json
import struct

import numpy as np
import pytest

from consortium.errors import MessageRejected
from consortium.protocol import messages as m
from consortium.wire import MAGIC


def _fit_reply(vec):
    return m.make_envelope(
        "site-1", "coordinator", 3, m.FitReply(contribution=m.Tensor.from_numpy(vec))
    )


def test_round_trip_through_bytes():
    vec = np.arange(10, dtype=np.float32) / 3
    env = m.decode(m.encode(_fit_reply(vec)))
    assert isinstance(env.message, m.FitReply)
    assert env.round == 3 and env.sender == "site-1"
    assert np.array_equal(env.message.contribution.to_numpy(), vec)


def _tamper(raw: bytes, fn, payload_fn=lambda p: p) -> bytes:
    """Edit a frame's JSON header (and optionally its tensor bytes), keeping the frame well-formed."""
    n = struct.unpack(">I", raw[4:8])[0]
    obj = json.loads(raw[8 : 8 + n])
    fn(obj)
    header = json.dumps(obj).encode()
    return raw[:4] + struct.pack(">I", len(header)) + header + payload_fn(raw[8 + n :])


def test_unknown_kind_is_rejected():
    raw = _tamper(m.encode(_fit_reply(np.zeros(2, np.float32))), lambda o: o["message"].update(kind="pickle_blob"))
    with pytest.raises(MessageRejected, match="message"):
        m.decode(raw)


def test_other_schema_version_is_rejected_with_the_fix():
    raw = _tamper(m.encode(_fit_reply(np.zeros(2, np.float32))), lambda o: o.update(schema_version=m.SCHEMA_VERSION + 1))
    with pytest.raises(MessageRejected, match="same Consortium release"):
        m.decode(raw)


def test_unknown_field_is_rejected():
    raw = _tamper(m.encode(_fit_reply(np.zeros(2, np.float32))), lambda o: o["message"].update(extra="x"))
    with pytest.raises(MessageRejected, match="extra"):
        m.decode(raw)


def test_tensor_with_wrong_length_hash_or_layout_is_rejected():
    raw = m.encode(_fit_reply(np.arange(4, dtype=np.float32)))

    def bad_shape(o):
        o["message"]["contribution"]["shape"] = [5]

    def flip_byte(p):
        return p[:3] + bytes([p[3] ^ 1]) + p[4:]

    def bad_offset(o):
        o["message"]["contribution"]["offset"] = 4

    def inline_bytes(o):
        t = o["message"]["contribution"]
        t["raw"] = "AAAA"

    with pytest.raises(MessageRejected, match="needs 20 bytes"):
        m.decode(_tamper(raw, bad_shape, lambda p: p + bytes(4)))
    with pytest.raises(MessageRejected, match="SHA-256"):
        m.decode(_tamper(raw, lambda o: None, flip_byte))
    with pytest.raises(MessageRejected, match="out of order"):
        m.decode(_tamper(raw, bad_offset))
    with pytest.raises(MessageRejected, match="exactly dtype"):
        m.decode(_tamper(raw, inline_bytes))
    with pytest.raises(MessageRejected, match="after the last tensor"):
        m.decode(raw + b"\x00")
    with pytest.raises(MessageRejected, match="exceeds the frame"):
        m.decode(raw[:20])


def test_garbage_is_rejected():
    for raw in (b"", b"\x80\x04\x95", b"[]", b"{}", MAGIC + b"\x00\x00\x00\x02{}", MAGIC + b"\x00\x00\x00\x02[]"):
        with pytest.raises(MessageRejected):
            m.decode(raw)


def test_bad_site_names_are_rejected():
    with pytest.raises(Exception):
        m.make_envelope("../etc", "coordinator", 0, m.SetupRequest())
