"""The QUORUM wire codec: whole simulated groups run with every message encoded and decoded,
and malformed or hostile messages are refused naming the field."""

from __future__ import annotations

import contextlib
import random

import msgspec
import pytest

from kvsvr import _core, protocol
from kvsvr.errors import InvalidArgument
from kvsvr.testing.simulator import Simulation

RECORD = _core.encode_record(0, 1, 0, 0, b"k", [(_core.OP_PUT, b"", b"v")])


@pytest.mark.parametrize("seed", range(8))
def test_simulated_group_over_the_wire_codec(seed):
    sim = Simulation(seed, wire=True)
    sim.run(2000)
    sim.heal()
    sim.settle()
    assert sim.chosen and all(isinstance(v, bytes) for v in sim.chosen.values())


def test_every_kind_round_trips():
    messages = [
        _core.Message(_core.MSG_PREPARE, 0, 1, 1, b"k", 1, 300),
        _core.Message(_core.MSG_PROMISE, 1, 0, 1, b"k", 1, 300, 5, RECORD),
        _core.Message(_core.MSG_PROMISE, 1, 0, 1, b"k", 1, 300, 0, None),
        _core.Message(_core.MSG_ACCEPT, 0, 2, 1, b"k", 1, 300, 0, RECORD),
        _core.Message(_core.MSG_ACCEPTED, 2, 0, 1, b"k", 1, 300),
        _core.Message(_core.MSG_REJECT, 2, 0, 1, b"k", 1, 300, 999),
        _core.Message(_core.MSG_CHOSEN, 0, 1, 1, b"k", 1, 0, 0, RECORD),
        _core.Message(_core.MSG_STATE_REQUEST, 1, 2, 7, b"", 0),
        _core.Message(_core.MSG_STATE, 2, 1, 1, b"", 0, 7, 0,
                      [_core.InstanceRecord(_core.INSTANCE, b"k", 1, 300, 300, RECORD, RECORD)]),
    ]
    decoded = protocol.decode_quorum(protocol.encode_quorum(messages))
    fields = ("kind", "source", "target", "incarnation", "key", "version", "ballot",
              "accepted_ballot", "value")
    for before, after in zip(messages, decoded, strict=True):
        assert [getattr(before, f) for f in fields] == [getattr(after, f) for f in fields]


def test_a_state_answer_travels_as_the_msgpack_arrays_it_always_did():
    """A STATE message carries instance records as arrays without their kind; decoded, they
    are the core's named records again."""
    record = _core.InstanceRecord(_core.INSTANCE, b"k", 1, 300, 257, RECORD, None)
    state = _core.Message(_core.MSG_STATE, 2, 1, 3, b"", 41, 3, 1 << 16 | 1, [record])
    body = protocol.encode_quorum([state])
    assert body == msgspec.msgpack.encode(
        [[_core.MSG_STATE, 2, 1, 3, b"", 41, 3, 1 << 16 | 1, [[b"k", 1, 300, 257, RECORD, None]]]])
    decoded = protocol.decode_quorum(body)[0].value
    assert decoded == [record] and type(decoded[0]) is _core.InstanceRecord


@pytest.mark.parametrize("body, field", [
    ([[3, 0, 9, 1, b"k", 1, 5, 0, RECORD]], "messages[0].target"),
    ([[3, 0, 1, 0, b"k", 1, 5, 0, RECORD]], "messages[0].incarnation"),
    ([[99, 0, 1, 1, b"k", 1, 5, 0, RECORD]], "messages[0].kind"),
    ([[3, 0, 1, 1, b"", 1, 5, 0, RECORD]], "key"),
    ([[3, 0, 1, 1, b"k", 2, 5, 0, RECORD]], "messages[0].value"),       # record of v1, not v2
    ([[3, 0, 1, 1, b"x", 1, 5, 0, RECORD]], "messages[0].value"),       # record of another key
    ([[3, 0, 1, 1, b"k", 1, 5, 0, RECORD[:-1]]], "messages[0].value"),  # truncated
    ([[6, 0, 1, 1, b"k", 1, 0, 0, RECORD[:20] + b"\xff" + RECORD[21:]]], "messages[0].value"),
    ([[8, 0, 1, 1, b"", 0, 0, 0, None]], "value"),
    ([[3, 0, 1, 1, b"k", 1, 5, 0, [[b"k", 1, 1, 1, None, None]]]], "value"),
    ([[8, 0, 1, 1, b"", 0, 1, 0, [[b"k", 2, 1, 1, RECORD, None]]]],
     "messages[0].value[0].accepted_value"),
    ("not a list", None),
])
def test_bad_quorum_messages_are_refused_naming_the_field(body, field):
    with pytest.raises(InvalidArgument) as error:
        protocol.decode_quorum(msgspec.msgpack.encode(body))
    assert error.value.field == field


def _binary(message: _core.Message) -> bytearray:
    body = protocol.encode_quorum([message])
    assert body[0] == _core.QWIRE_MAGIC   # instance kinds travel in the core's binary layout
    return bytearray(body)


ACCEPT = _core.Message(_core.MSG_ACCEPT, 0, 1, 1, b"k", 1, 300, 0, RECORD)


def _patched(offset: int, data: bytes, base: _core.Message = ACCEPT) -> bytes:
    body = _binary(base)
    body[offset:offset + len(data)] = data
    return bytes(body)


# Offsets into a one-message binary body: 4-byte header, then the 36-byte message header
# (kind, source, target, has_value, incarnation u16, key_len u16, version, ballot,
# accepted_ballot, value_len u32), the key, the value.
@pytest.mark.parametrize("body, field", [
    (_patched(4, b"\x63"), "messages[0].kind"),
    (_patched(4, bytes([_core.MSG_STATE])), "messages[0].kind"),    # state answers: msgpack
    (_patched(5, b"\x09"), "messages[0].source"),
    (_patched(6, b"\x07"), "messages[0].target"),
    (_patched(8, b"\x00\x00"), "messages[0].incarnation"),
    (_patched(7, b"\x02"), "messages[0].value"),                  # has_value neither 0 nor 1
    (_patched(12, (2).to_bytes(8, "little")), "messages[0].value"),  # record of v1, not v2
    (_patched(40, b"x"), "messages[0].value"),                     # record of another key
    (_patched(41 + 30, b"\xff"), "messages[0].value"),             # checksum mismatch
    (_patched(10, (241).to_bytes(2, "little")), "messages[0].key"),
    (_patched(10, b"\x00\x00"), "messages[0].key"),                # an instance needs a key
    (_patched(2, b"\x00\x00"), "messages"),
    (_patched(2, b"\x02\x00"), "body"),                            # one message, two counted
    (_binary(ACCEPT)[:-1], "body"),                                # truncated
    (bytes(_binary(ACCEPT)) + b"\x00", "body"),                     # trailing bytes
    (_patched(1, b"\x02"), "body"),                                 # a layout of the future
])
def test_bad_binary_quorum_bodies_are_refused_naming_the_field(body, field):
    with pytest.raises(InvalidArgument) as error:
        protocol.decode_quorum(bytes(body))
    assert error.value.field == field


def test_the_binary_layout_refuses_to_encode_what_it_cannot_carry():
    with pytest.raises(ValueError, match="incarnation"):
        _core.encode_quorum_messages([_core.Message(_core.MSG_ACCEPTED, 0, 1, 70000, b"k", 1)])
    with pytest.raises(ValueError, match="target"):
        _core.encode_quorum_messages([_core.Message(_core.MSG_ACCEPTED, 0, 9, 1, b"k", 1)])
    with pytest.raises(ValueError, match="messages"):
        _core.encode_quorum_messages([])
    with pytest.raises(ValueError, match="key: required"):   # its peer would refuse the frame
        _core.encode_quorum_messages([_core.Message(_core.MSG_ACCEPTED, 0, 1, 1, b"", 1)])


def test_random_messages_round_trip_through_the_binary_layout():
    rng = random.Random(5)
    kinds = [k for k in range(_core.MSG_PREPARE, _core.MSG_BEHIND + 1) if k != _core.MSG_STATE]
    for _ in range(200):
        messages = []
        for _ in range(rng.randint(1, 40)):
            kind = rng.choice(kinds)
            key = b"" if kind == _core.MSG_STATE_REQUEST else rng.randbytes(rng.randint(1, 240))
            version = rng.randint(1, 2**64 - 1)
            value = None
            if kind != _core.MSG_STATE_REQUEST and rng.random() < 0.5:
                value = _core.encode_record(0, version, 0, 0, key,
                                            [(_core.OP_PUT, b"", rng.randbytes(100))])
            messages.append(_core.Message(kind, rng.randrange(7), rng.randrange(7),
                                          rng.randint(1, 65535), key, version,
                                          rng.randint(0, 2**64 - 1), rng.randint(0, 2**64 - 1),
                                          value))
        decoded = protocol.decode_quorum(protocol.encode_quorum(messages))
        assert [repr(m) for m in decoded] == [repr(m) for m in messages]


def test_messages_grouped_by_target_and_chunked_into_frames_keep_their_order():
    rng = random.Random(9)
    kinds = [k for k in range(_core.MSG_PREPARE, _core.MSG_BEHIND + 1)
             if k not in (_core.MSG_STATE, _core.MSG_STATE_REQUEST)]
    for _ in range(100):
        messages = []
        for _ in range(rng.randint(0, 60)):
            kind = rng.choice(kinds)
            key = rng.randbytes(rng.randint(1, 20))
            value = _core.encode_record(0, 1, 0, 0, key, [(_core.OP_PUT, b"", b"v" * 200)]) \
                if rng.random() < 0.5 else None
            messages.append(_core.Message(kind, 0, rng.randrange(3), 1, key, 1, 5, 0, value))
        groups = _core.group_quorum(messages)
        for target, (chosen, others) in groups.items():
            mine = [m for m in messages if m.target == target]
            assert chosen == [m for m in mine if m.kind == _core.MSG_CHOSEN]
            assert others == [m for m in mine if m.kind != _core.MSG_CHOSEN]
        assert sum(len(c) + len(o) for c, o in groups.values()) == len(messages)
        if not messages:
            assert _core.chunk_quorum(messages, 1000, 7) == []
            continue
        max_bytes, max_messages = rng.choice([(1 << 20, 1024), (1000, 7), (1, 1000)])
        chunks = _core.chunk_quorum(messages, max_bytes, max_messages)
        # Each chunk is one frame: encoded and decoded, they give the messages back in order.
        decoded = [protocol.decode_quorum(protocol.encode_quorum(chunk)) for chunk in chunks]
        assert [repr(m) for chunk in decoded for m in chunk] == [repr(m) for m in messages]
        for chunk in chunks[:-1]:   # each frame but the last is full, by count or by size
            size = sum(96 + len(m.value or b"") for m in chunk)
            assert len(chunk) == max_messages or size >= max_bytes
            assert len(chunk) <= max_messages
            assert size - 96 - len(chunk[-1].value or b"") < max_bytes
    # A state answer part goes in a frame of its own, wherever it comes.
    state = _core.Message(_core.MSG_STATE, 0, 1, 1, b"", 0, 0, 0, [])
    accept = _core.Message(_core.MSG_ACCEPT, 0, 1, 1, b"k", 1, 5, 0, None)
    assert _core.chunk_quorum([accept, state, accept, accept], 1 << 20, 1024) == \
        [[accept], [state], [accept, accept]]
    assert _core.chunk_quorum([state, state], 1 << 20, 1024) == [[state], [state]]
    with pytest.raises(TypeError):
        _core.group_quorum([object()])
    with pytest.raises(TypeError):
        _core.chunk_quorum([object()], 1 << 20, 1024)


def test_random_bytes_never_escape_as_anything_but_invalid_argument():
    rng = random.Random(11)
    valid = protocol.encode_quorum([_core.Message(_core.MSG_ACCEPT, 0, 1, 1, b"k", 1, 300,
                                                  0, RECORD)])
    for _ in range(2000):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        with contextlib.suppress(InvalidArgument):
            protocol.decode_quorum(bytes(data[:rng.randint(0, len(data))]))
