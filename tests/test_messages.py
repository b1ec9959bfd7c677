import json

import numpy as np
import pytest

from consortium.errors import MessageRejected
from consortium.protocol import messages as m


def _fit_reply(vec):
    return m.make_envelope(
        "site-1", "coordinator", 3, m.FitReply(weight=2.0, weighted_update=m.Tensor.from_numpy(vec), num_examples=2, train_loss_sum=1.0)
    )


def test_round_trip_through_bytes():
    vec = np.arange(10, dtype=np.float32) / 3
    env = m.decode(m.encode(_fit_reply(vec)))
    assert isinstance(env.message, m.FitReply)
    assert env.round == 3 and env.sender == "site-1"
    assert np.array_equal(env.message.weighted_update.to_numpy(), vec)


def _tamper(raw: bytes, fn) -> bytes:
    obj = json.loads(raw)
    fn(obj)
    return json.dumps(obj).encode()


def test_unknown_kind_is_rejected():
    raw = _tamper(m.encode(_fit_reply(np.zeros(2, np.float32))), lambda o: o["message"].update(kind="pickle_blob"))
    with pytest.raises(MessageRejected, match="message"):
        m.decode(raw)


def test_other_schema_version_is_rejected_with_the_fix():
    raw = _tamper(m.encode(_fit_reply(np.zeros(2, np.float32))), lambda o: o.update(schema_version=2))
    with pytest.raises(MessageRejected, match="same Consortium release"):
        m.decode(raw)


def test_unknown_field_is_rejected():
    raw = _tamper(m.encode(_fit_reply(np.zeros(2, np.float32))), lambda o: o["message"].update(extra="x"))
    with pytest.raises(MessageRejected, match="extra"):
        m.decode(raw)


def test_tensor_with_wrong_length_or_hash_is_rejected():
    raw = m.encode(_fit_reply(np.arange(4, dtype=np.float32)))

    def bad_shape(o):
        o["message"]["weighted_update"]["shape"] = [5]

    def bad_bytes(o):
        t = o["message"]["weighted_update"]
        other = m.Tensor.from_numpy(np.arange(1, 5, dtype=np.float32))
        t["data"] = other.data  # same length, different values, old hash

    with pytest.raises(MessageRejected, match="needs 20 bytes"):
        m.decode(_tamper(raw, bad_shape))
    with pytest.raises(MessageRejected, match="SHA-256"):
        m.decode(_tamper(raw, bad_bytes))


def test_garbage_is_rejected():
    for raw in (b"", b"\x80\x04\x95", b"[]", b"{}"):
        with pytest.raises(MessageRejected):
            m.decode(raw)


def test_bad_site_names_are_rejected():
    with pytest.raises(Exception):
        m.make_envelope("../etc", "coordinator", 0, m.SetupRequest())
