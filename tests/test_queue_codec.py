"""The queue's record codec (kvsvr/_qlog.pxi): round trips, and every damage is detected."""

from __future__ import annotations

import pytest

from kvsvr import _core

VALUES = [b"", b"a", b"hello world", bytes(range(256)) * 3]


def test_round_trip_keeps_every_field():
    """Encoding a batch and decoding it gives back offsets, ids, times and values."""
    data = _core.encode_queue_records(100, 7, 40, 123456, VALUES)
    decoded = _core.decode_queue_records(data)
    assert decoded == [(100 + i, 7, 40 + i, 123456, v) for i, v in enumerate(VALUES)]
    end, count, first, last, last_ms, stop, reason = _core.scan_queue_records(data)
    assert (end, count, first, last, last_ms, stop, reason) == (
        len(data), 4, 100, 103, 123456, _core.SCAN_END, None)


def test_every_flipped_byte_is_detected():
    """A single corrupted byte anywhere in a record makes the scan stop at that record."""
    data = _core.encode_queue_records(0, 1, 0, 5, [b"x" * 20, b"y" * 20])
    first_size = _core.QUEUE_RECORD_HEADER_BYTES + 20
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x5A
        end, count, *_rest, stop, reason = _core.scan_queue_records(bytes(damaged))
        expected_good = 0 if position < first_size else 1
        assert count == expected_good, position
        assert end == expected_good * first_size
        assert stop in (_core.SCAN_CORRUPT, _core.SCAN_TRUNCATED) and reason
        with pytest.raises(_core.QueueRecordError):
            _core.decode_queue_records(bytes(damaged))


def test_every_truncation_is_a_torn_tail():
    """Cutting the data at any point keeps the whole records before the cut and says why."""
    data = _core.encode_queue_records(0, 1, 0, 5, [b"abc", b"defgh", b"ij"])
    sizes = [_core.QUEUE_RECORD_HEADER_BYTES + n for n in (3, 5, 2)]
    bounds = [0, sizes[0], sizes[0] + sizes[1], len(data)]
    for cut in range(len(data)):
        end, count, *_rest, stop, reason = _core.scan_queue_records(data[:cut])
        whole = max(i for i, b in enumerate(bounds) if b <= cut)
        assert (end, count) == (bounds[whole], whole)
        if cut == bounds[whole]:
            assert stop == _core.SCAN_END
        else:
            assert stop == _core.SCAN_TRUNCATED and "truncated" in reason


def test_limits_and_seek():
    """Byte and record limits cut at record boundaries; seek finds offsets and times."""
    data = _core.encode_queue_records(10, 1, 0, 1000, [b"v" * 10] * 10)
    size = _core.QUEUE_RECORD_HEADER_BYTES + 10
    assert _core.scan_queue_records(data, 0, size * 3 + 1)[:2] == (size * 3, 3)
    assert _core.scan_queue_records(data, 0, 1)[:2] == (size, 1)   # at least one record
    assert _core.scan_queue_records(data, size, -1, 2)[:4] == (size * 3, 2, 11, 12)
    assert _core.seek_queue_records(data, 0, 15) == size * 5
    assert _core.seek_queue_records(data, 0, 99) == len(data)
    assert _core.seek_queue_records(data, 0, 0, 1001) == len(data)


def test_bad_input_names_the_field():
    """Oversize values, too many messages and non-bytes are refused with the field named."""
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        _core.encode_queue_records(0, 1, 0, 0, [b"", b"x" * (_core.QUEUE_MESSAGE_BYTES_MAX + 1)])
    with pytest.raises(ValueError, match="messages"):
        _core.encode_queue_records(0, 1, 0, 0, [b""] * (_core.QUEUE_BATCH_MESSAGES_MAX + 1))
    with pytest.raises(ValueError, match=r"messages\[0\]: expected bytes"):
        _core.encode_queue_records(0, 1, 0, 0, ["text"])
