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
                      [("instance", b"k", 1, 300, 300, RECORD, RECORD)]),
    ]
    decoded = protocol.decode_quorum(protocol.encode_quorum(messages))
    fields = ("kind", "source", "target", "incarnation", "key", "version", "ballot",
              "accepted_ballot", "value")
    for before, after in zip(messages, decoded, strict=True):
        assert [getattr(before, f) for f in fields] == [getattr(after, f) for f in fields]


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
