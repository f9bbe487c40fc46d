"""The agent -> center report: round trips, every kind of malformed report refused with the
reason, and the center storing nothing of a refused report (resends overwrite, never add)."""

from __future__ import annotations

import struct

import msgspec
import pytest
from xxhash import xxh3_64_intdigest

from kvsvr import _core
from kvsvr.errors import InvalidArgument
from kvsvr.monitor.center import Center
from kvsvr.monitor.registry import builtin_registry
from kvsvr.monitor.report import (
    BLOCK_HEADER,
    HEADER,
    METHOD_REPORT,
    Ack,
    Report,
    ReportError,
    decode_report,
    encode_report,
)
from kvsvr.monitor.series import SeriesStore

BASE = 1_700_000_000


def _report(machine: str = "m1", seconds: int = 3) -> Report:
    blocks = [(BASE + s, _core.encode_block([(1, s + 1), (7, -s), (1000, 10 * s)]))
              for s in range(seconds)]
    return Report(machine, BASE, BASE + seconds, blocks,
                  catalog=[(1000, 1, "app.hits", "hits")], gaps=[(BASE - 100, BASE - 50)])


def _reseal(body: bytearray) -> bytes:
    """A report whose checksum is right again after a change (to reach the deeper checks)."""
    body[0:8] = struct.pack("<Q", xxh3_64_intdigest(bytes(body[8:])))
    return bytes(body)


def test_a_report_round_trips():
    """Encode then decode gives back machine, span, blocks, catalog and gaps."""
    report = _report()
    decoded = decode_report(encode_report(report))
    assert decoded == report
    assert decoded.values == 9


def _patch(offset: int, fmt: str, value: int):
    def change(body: bytearray) -> bytes:
        struct.pack_into(fmt, body, offset, value)
        return _reseal(body)
    return change




@pytest.mark.parametrize(("mutate", "message"), [
    (lambda b: bytes(b[:20]), "truncated: 20 bytes"),
    (lambda b: bytes(b[:-3]), "checksum"),
    (lambda b: bytes(b[:8]) + b"\x00" + bytes(b[9:]), "magic"),
    (lambda b: bytes(b) + b"xx", "checksum"),
    (lambda b: _reseal(b + b"xx"), "2 trailing bytes"),
    (_patch(12, "<H", 2), "layout: 2"),
    (_patch(14, "<H", 1), "flags"),
    (_patch(24, "<Q", BASE - 1), "seconds: first"),
    (_patch(32, "<I", 50), "block_count: 50 for 4 seconds"),
    (_patch(36, "<I", 0), "machine_len: 0"),
    (_patch(36, "<I", 65), "machine_len: 65"),
    (_patch(40, "<I", 1 << 30), "meta_len"),
    (_patch(40, "<I", 3), "meta"),
])
def test_malformed_reports_are_refused_with_the_reason(mutate, message):
    """Truncation, corruption, bad magic/layout/flags, spans, lengths and meta each raise a
    ReportError that says which field."""
    body = bytearray(encode_report(_report()))
    with pytest.raises(ReportError, match=message):
        decode_report(mutate(body))


def _block_offset(body: bytes) -> int:
    machine_len, meta_len = struct.unpack_from("<II", body, 36)
    return HEADER.size + machine_len + meta_len


@pytest.mark.parametrize(("field", "value", "message"), [
    (0, BASE + 99, r"blocks\[0\].second"),
    (8, 5, "byte_len: 5|not a whole number"),
    (8, 1 << 31, "byte_len"),
    (12, 1, "reserved"),
])
def test_malformed_blocks_are_refused(field, value, message):
    """A block out of the span, of a bad length, or with reserved bits set is refused."""
    body = bytearray(encode_report(_report()))
    offset = _block_offset(bytes(body))
    struct.pack_into("<Q" if field == 0 else "<I", body, offset + field, value)
    with pytest.raises(ReportError, match=message):
        decode_report(_reseal(body))


def test_block_entries_must_be_ascending_known_ids():
    """A value block with a repeated, descending or zero id is refused."""
    assert _core.block_invalid(_core.encode_block([(1, 5), (2, 6)])) is None
    swapped = struct.pack("<IqIq", 2, 1, 1, 1)
    assert "strictly ascending" in _core.block_invalid(swapped)
    assert "id 0" in _core.block_invalid(struct.pack("<Iq", 0, 1))
    assert "whole number" in _core.block_invalid(b"\x01" * 13)
    report = _report(seconds=1)
    report.blocks = [(BASE, swapped)]
    with pytest.raises(ReportError, match="strictly ascending"):
        decode_report(encode_report(report))


def test_encoding_refuses_what_decoding_would():
    """Bad machine names, spans and block order are refused before anything is sent."""
    with pytest.raises(ValueError, match="machine: 65 bytes"):
        encode_report(Report("m" * 65, BASE, BASE, []))
    with pytest.raises(ValueError, match="'/'"):
        encode_report(Report("a/b", BASE, BASE, []))
    with pytest.raises(ValueError, match="first"):
        encode_report(Report("m", BASE + 1, BASE, []))
    with pytest.raises(ValueError, match="out of order"):
        encode_report(Report("m", BASE, BASE + 5, [(BASE + 2, b""), (BASE + 1, b"")]))


def _frame(body: bytes, request_id: int = 1, code: int = METHOD_REPORT) -> bytes:
    return _core.encode_frame(_core.FRAME_REQUEST, code, request_id, 0, body)


def test_the_center_stores_nothing_of_a_refused_report_and_resends_overwrite(tmp_path):
    """A corrupted report is answered InvalidArgument with the reason and nothing is stored;
    the good report is acked, and sending it again leaves every stored value as it was."""
    store = SeriesStore(tmp_path / "center", sync=False)
    center = Center(store, [], builtin_registry())
    good = encode_report(_report())
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    for message, reason in ((_frame(bytes(bad)), "report: checksum"),
                            (b"garbage", "frame: truncated"),
                            (_frame(good, code=1), "takes only report requests"),
                            (_frame(good)[:-5], "frame.body_len")):
        answers = center.handle(message, 0.0)
        assert answers
        for answer in answers:
            _, status, _, _, body = _core.decode_frame(answer)
            assert status == InvalidArgument.code
            assert reason in msgspec.msgpack.decode(body)[0]
        assert reason in center.last_rejection
        assert store.machines() == {} and store.stats()["value_blocks"] == 0
    for _ in range(2):
        (answer,) = center.handle(_frame(good), BASE + 10.0)
        _, status, _, _, body = _core.decode_frame(answer)
        assert status == 0
        assert msgspec.msgpack.decode(body, type=Ack).through == BASE + 3
        assert store.series(1000, BASE, BASE + 3) == [0, 10, 20, None]
        assert store.series(1, BASE, BASE + 3, "m1") == [1, 2, 3, None]
        assert store.value_count() == 9
    assert store.gaps() == [("m1", BASE - 100, BASE - 50)]
    assert store.catalog()[1000] == (1, "app.hits", "hits")


def test_the_sum_across_machines_is_rebuilt_not_added(tmp_path):
    """Two machines' reports sum per id per second; a resend of one machine's report does
    not change the sum."""
    store = SeriesStore(tmp_path / "center", sync=False)
    first, second = _report("m1"), _report("m2")
    for report in (first, second, first, second, first):
        store.ingest(decode_report(encode_report(report)), 0.0)
    assert store.series(1, BASE, BASE + 2) == [2, 4, 6]
    assert store.series(7, BASE, BASE + 2) == [0, -2, -4]
    assert store.series(1, BASE, BASE + 2, "m2") == [1, 2, 3]
    assert BLOCK_HEADER.size == 16
