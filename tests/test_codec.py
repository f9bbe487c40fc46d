"""The binlog record codec and the wire frame codec of the Cython core: round trips, and every
truncation or corruption detected with a reason, never silently misread."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsvr import _core
from kvsvr.limits import KEY_BYTES_MAX, OPS_PER_BATCH_MAX, ROW_KEY_BYTES_MAX

keys = st.binary(min_size=1, max_size=KEY_BYTES_MAX)
rows = st.binary(min_size=1, max_size=ROW_KEY_BYTES_MAX)
values = st.binary(max_size=300)
ops = st.one_of(
    st.tuples(st.just(_core.OP_PUT), st.just(b""), values),
    st.tuples(st.just(_core.OP_DELETE), st.just(b""), st.just(b"")),
    st.tuples(st.just(_core.OP_INCR), st.just(b""), st.binary(min_size=8, max_size=8)),
    st.tuples(st.just(_core.OP_ROW_PUT), rows, values),
    st.tuples(st.just(_core.OP_ROW_DELETE), rows, st.just(b"")),
    st.tuples(st.just(_core.OP_APPEND), st.just(b""), values),
    st.tuples(st.just(_core.OP_COMPACT), st.just(b""), st.binary(min_size=8, max_size=8)),
)
u64 = st.integers(0, 2**64 - 1)


@given(lsn=u64, version=st.integers(1, 2**64 - 1), client=u64, seq=u64, key=keys,
       op_list=st.lists(ops, min_size=1, max_size=8))
def test_record_round_trip(lsn, version, client, seq, key, op_list):
    """What is encoded decodes to the same fields, and the LSN can be read without decoding."""
    raw = _core.encode_record(lsn, version, client, seq, key, op_list)
    record = _core.decode_record(raw)
    assert (record.lsn, record.version, record.client_id, record.client_seq, record.key) == (
        lsn, version, client, seq, key)
    assert record.ops == op_list
    assert _core.record_lsn(raw) == lsn
    assert _core.record_invalid(raw) is None


def _sample_record() -> bytes:
    return _core.encode_record(7, 3, 11, 12, b"user:1",
                               [(_core.OP_ROW_PUT, b"row", b"value"), (_core.OP_APPEND, b"", b"m")])


def test_every_truncation_is_detected():
    """Each prefix of a record is rejected, with a reason."""
    raw = _sample_record()
    for length in range(len(raw)):
        reason = _core.record_invalid(raw[:length])
        assert reason, f"prefix of {length} bytes accepted"
        with pytest.raises(_core.RecordError):
            _core.decode_record(raw[:length])


def test_every_single_byte_corruption_is_detected():
    """Flipping any bit of any byte makes the record invalid (checksum or structure)."""
    raw = _sample_record()
    for position in range(len(raw)):
        for bit in (0x01, 0x80):
            damaged = bytearray(raw)
            damaged[position] ^= bit
            assert _core.record_invalid(bytes(damaged)), f"flip at byte {position} accepted"


class _State:
    def __init__(self, version: int):
        self.version = version


def test_applied_prefix_passes_only_versions_held_and_intact():
    """A pulled record is passed over only when the key's kept state is at least that new
    and the record checks out; anything else stops the scan for the caller to decode."""
    records = [_core.encode_record(lsn, version, 0, 0, key, [(_core.OP_PUT, b"", b"v")])
               for lsn, (key, version) in enumerate(
                   [(b"a", 1), (b"b", 2), (b"a", 2), (b"c", 5), (b"a", 3)], start=1)]
    states = {b"a": _State(2), b"b": _State(9), b"c": _State(5)}
    assert _core.applied_prefix(records, states) == 4          # a v3 is newer than a's v2
    assert _core.applied_prefix(records, states, 4) == 4
    assert _core.applied_prefix(records, states, 5) == 5      # past the end: none left
    assert _core.applied_prefix(records, {}) == 0               # no state kept: ask LMDB
    assert _core.applied_prefix([], states) == 0
    assert _core.applied_prefix(records, {**states, b"a": _State(3)}) == 5
    assert _core.applied_prefix(records, states, -3) == 4
    # Every single bit flipped in a passable record stops the scan at it.
    raw = records[1]
    for position in range(len(raw)):
        damaged = bytearray(raw)
        damaged[position] ^= 0x10
        got = _core.applied_prefix([records[0], bytes(damaged), records[2]], states)
        assert got <= 1, f"a flip at byte {position} was passed over"
    # Not a record at all, truncated, or not bytes: the caller decodes it and says why.
    for bad in (b"", raw[:40], raw[:-1], b"\0" * len(raw), bytearray(raw), None):
        assert _core.applied_prefix([records[0], bad], states) == 1


def test_trailing_bytes_and_foreign_data_are_rejected():
    raw = _sample_record()
    assert "length mismatch" in _core.record_invalid(raw + b"\0")
    assert "magic" in _core.record_invalid(b"\0" * 80)
    assert "truncated" in _core.record_invalid(b"")


@pytest.mark.parametrize("kwargs, message", [
    ({"key": b""}, "key"),
    ({"key": b"k" * (KEY_BYTES_MAX + 1)}, "key"),
    ({"ops": []}, "ops"),
    ({"ops": [(_core.OP_PUT, b"", b"v")] * (OPS_PER_BATCH_MAX + 1)}, "ops"),
    ({"ops": [(99, b"", b"")]}, "op.kind"),
    ({"ops": [(_core.OP_PUT, b"row", b"v")]}, "op.row"),
    ({"ops": [(_core.OP_ROW_PUT, b"", b"v")]}, "op.row"),
    ({"ops": [(_core.OP_INCR, b"", b"1")]}, "op.value"),
    ({"ops": [(_core.OP_DELETE, b"", b"x")]}, "op.value"),
    ({"ops": [(_core.OP_COMPACT, b"", b"1")]}, "op.value"),
    ({"version": 0}, "version"),
])
def test_encoder_refuses_bad_input_naming_the_field(kwargs, message):
    args = {"lsn": 1, "version": 1, "client_id": 0, "client_seq": 0, "key": b"k",
            "ops": [(_core.OP_PUT, b"", b"v")]}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        _core.encode_record(args["lsn"], args["version"], args["client_id"], args["client_seq"],
                            args["key"], args["ops"])


@given(frames=st.lists(st.tuples(st.sampled_from([1, 2]), st.integers(0, 0xFFFF), u64,
                                 st.integers(0, 2**32 - 1), st.binary(max_size=200)),
                       min_size=1, max_size=10))
def test_frames_round_trip_back_to_back(frames):
    message = b"".join(_core.encode_frame(*f) for f in frames)
    decoded, error, _ = _core.decode_frames(message)
    assert error is None
    assert [(k, c, r, b, bytes(body)) for k, c, r, b, body in decoded] == frames


@settings(max_examples=50)
@given(body=st.binary(max_size=64), cut=st.integers(0, 100))
def test_truncated_frame_reports_error_and_keeps_earlier_frames(body, cut):
    first = _core.encode_frame(1, 10, 1, 0, b"ok")
    second = _core.encode_frame(1, 10, 2, 0, body)
    cut = min(cut, len(second) - 1)
    decoded, error, error_request_id = _core.decode_frames(first + second[:cut])
    assert [f[2] for f in decoded] == [1]
    if cut == 0:
        assert error is None
    else:
        assert error and "frame" in error
        assert error_request_id in (0, 2)


@pytest.mark.parametrize("damage, reason", [
    (lambda f: b"XX" + f[2:], "frame.magic"),
    (lambda f: f[:2] + b"\x09" + f[3:], "frame.protocol"),
    (lambda f: f[:3] + b"\x07" + f[4:], "frame.kind"),
    (lambda f: f[:6] + b"\x01\x00" + f[8:], "frame.flags"),
    (lambda f: f[:20] + b"\xff\xff\xff\x00" + f[24:], "frame.body_len"),
    (lambda f: b"", "message: empty"),
])
def test_damaged_frame_headers_are_named(damage, reason):
    frame = _core.encode_frame(1, 10, 5, 0, b"body")
    decoded, error, _ = _core.decode_frames(damage(frame))
    assert decoded == []
    assert reason in error


def test_decode_frames_refuses_non_buffers():
    assert _core.decode_frames(12345)[1] == "message: not a contiguous byte buffer"
