# Quorum-queue log records: one message in a topic's segment file (queue/quorumq).
#
# A segment file is these records back to back, nothing else: a server recovers a topic by
# walking its segments record by record and stops at the first one that does not verify.
# Layout, little-endian, layout 1 (header asserted to be 48 bytes):
#
#   offset size field
#        0    8 checksum     xxh3_64 of bytes [8, end): everything after this field
#        8    4 magic        0x31524D51 (b"QMR1": the layout is part of the magic)
#       12    4 value_len    0 .. QUEUE_MESSAGE_BYTES_MAX
#       16    8 offset       position of the message in this server's log of the topic
#       24    8 producer_id  message id: the producer ...
#       32    8 seq          ... and its sequence number (contiguous from 0 per producer)
#       40    8 append_ms    the server's clock when it appended the message (retention by
#                            age, and the consumers' rule for servers with a new disk)
#       48      value        value_len bytes
#
# These constants belong to this file alone (not _consts.pxi) so that the queue's part of the
# core stays one include: the KVSvr core does not use them.

cdef enum:
    _QREC_MAGIC = 0x31524D51
    _QREC_HEADER_BYTES = 48
    _QUEUE_MESSAGE_BYTES_MAX = 1048576      # one message value: 1 MiB
    _QUEUE_BATCH_MESSAGES_MAX = 4096        # messages in one produce batch

QUEUE_RECORD_HEADER_BYTES = _QREC_HEADER_BYTES
QUEUE_MESSAGE_BYTES_MAX = _QUEUE_MESSAGE_BYTES_MAX
QUEUE_BATCH_MESSAGES_MAX = _QUEUE_BATCH_MESSAGES_MAX

# What stopped a scan (scan_queue_records' `stop`).
SCAN_END = 0          # the buffer ended exactly at a record boundary, or a limit was reached
SCAN_TRUNCATED = 1    # the buffer ends inside a record (a torn tail, or a read cut short)
SCAN_CORRUPT = 2      # a record fails its checks: bad magic, length or checksum


class QueueRecordError(ValueError):
    """A queue record is truncated, corrupted or not a record."""


def encode_queue_records(uint64_t first_offset, uint64_t producer_id, uint64_t first_seq,
                         uint64_t append_ms, list values not None) -> bytes:
    """Records for `values`, offsets first_offset.. and seqs first_seq.., back to back, in
    one allocation. ValueError naming the field on bad input."""
    cdef Py_ssize_t count = len(values)
    cdef Py_ssize_t total = 0
    cdef Py_ssize_t i, n
    if count > _QUEUE_BATCH_MESSAGES_MAX:
        raise ValueError(f"messages: {count}, a batch holds at most {_QUEUE_BATCH_MESSAGES_MAX}")
    for i in range(count):
        value = values[i]
        if not isinstance(value, bytes):
            raise ValueError(f"messages[{i}]: expected bytes, got {type(value).__name__}")
        n = PyBytes_GET_SIZE(value)
        if n > _QUEUE_MESSAGE_BYTES_MAX:
            raise ValueError(f"messages[{i}]: {n} bytes, the limit is {_QUEUE_MESSAGE_BYTES_MAX}")
        total += _QREC_HEADER_BYTES + n
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t* p = <uint8_t*> PyBytes_AS_STRING(out)
    mv = memoryview(out)
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t start
    for i in range(count):
        value = values[i]
        n = PyBytes_GET_SIZE(value)
        start = pos
        _store32(p + pos + 8, _QREC_MAGIC)
        _store32(p + pos + 12, <uint32_t> n)
        _store64(p + pos + 16, first_offset + <uint64_t> i)
        _store64(p + pos + 24, producer_id)
        _store64(p + pos + 32, first_seq + <uint64_t> i)
        _store64(p + pos + 40, append_ms)
        pos += _QREC_HEADER_BYTES
        if n:
            memcpy(p + pos, PyBytes_AS_STRING(value), n)
        pos += n
        _store64(p + start, _xxh3_64(mv[start + 8:pos]))
    assert pos == total
    return out


cdef str _qrec_invalid(const uint8_t* p, Py_ssize_t available, object mv, Py_ssize_t pos,
                       bint verify):
    """Why the record at p is bad (None if good); `available` bytes from p on."""
    cdef uint32_t value_len = _load32(p + 12)
    if _load32(p + 8) != _QREC_MAGIC:
        return "bad magic: not a queue record"
    if value_len > _QUEUE_MESSAGE_BYTES_MAX:
        return f"bad value length {value_len}"
    if verify and _load64(p) != <uint64_t> _xxh3_64(
            mv[pos + 8:pos + _QREC_HEADER_BYTES + value_len]):
        return "checksum mismatch: record corrupted"
    return None


def scan_queue_records(buf, Py_ssize_t pos=0, Py_ssize_t max_bytes=-1,
                       Py_ssize_t max_records=-1, bint verify=True):
    """Walk whole records from `pos`: stop at the end of `buf`, at the first record that
    would pass `max_bytes` (after at least one) or `max_records`, or at a bad or torn one.

    Returns (end_pos, count, first_offset, last_offset, last_append_ms, stop, reason):
    [pos, end_pos) holds `count` good records; `stop` is SCAN_END, SCAN_TRUNCATED or
    SCAN_CORRUPT, with `reason` saying what was wrong (None at SCAN_END)."""
    cdef const uint8_t[::1] view = buf
    cdef Py_ssize_t n = view.shape[0]
    cdef Py_ssize_t start = pos
    cdef Py_ssize_t count = 0
    cdef uint64_t first_offset = 0, last_offset = 0, last_ms = 0
    cdef uint32_t value_len
    cdef Py_ssize_t size
    cdef str reason
    if pos < 0 or pos > n:
        raise ValueError(f"pos: {pos} is outside 0..{n}")
    mv = memoryview(buf)
    cdef const uint8_t* p = &view[0] if n else NULL
    while pos < n:
        if max_records >= 0 and count >= max_records:
            break
        if n - pos < _QREC_HEADER_BYTES:
            return (pos, count, first_offset, last_offset, last_ms, SCAN_TRUNCATED,
                    f"truncated: {n - pos} bytes left, a record header is {_QREC_HEADER_BYTES}")
        value_len = _load32(p + pos + 12)
        size = _QREC_HEADER_BYTES + <Py_ssize_t> value_len
        if _load32(p + pos + 8) == _QREC_MAGIC and value_len <= _QUEUE_MESSAGE_BYTES_MAX \
                and size > n - pos:
            return (pos, count, first_offset, last_offset, last_ms, SCAN_TRUNCATED,
                    f"truncated: record needs {size} bytes, {n - pos} left")
        reason = _qrec_invalid(p + pos, n - pos, mv, pos, verify)
        if reason is not None:
            return (pos, count, first_offset, last_offset, last_ms, SCAN_CORRUPT, reason)
        if max_bytes >= 0 and count > 0 and pos + size - start > max_bytes:
            break
        if count == 0:
            first_offset = _load64(p + pos + 16)
        last_offset = _load64(p + pos + 16)
        last_ms = _load64(p + pos + 40)
        count += 1
        pos += size
    return pos, count, first_offset, last_offset, last_ms, SCAN_END, None


def seek_queue_records(buf, Py_ssize_t pos, uint64_t offset, uint64_t append_ms=0):
    """Position of the first record at or after `pos` whose offset >= `offset` and whose
    append_ms >= `append_ms` (len(buf), or the first torn record, if none). The records were
    verified when written or recovered, so only their lengths are read here."""
    cdef const uint8_t[::1] view = buf
    cdef Py_ssize_t n = view.shape[0]
    cdef const uint8_t* p = &view[0] if n else NULL
    cdef Py_ssize_t size
    while pos + _QREC_HEADER_BYTES <= n:
        if _load64(p + pos + 16) >= offset and _load64(p + pos + 40) >= append_ms:
            return pos
        size = _QREC_HEADER_BYTES + <Py_ssize_t> _load32(p + pos + 12)
        if size > n - pos:
            break
        pos += size
    return pos


def decode_queue_records(buf):
    """Every record of `buf` as (offset, producer_id, seq, append_ms, value), each verified;
    QueueRecordError saying what is wrong with the first bad or torn one."""
    cdef const uint8_t[::1] view = buf
    cdef Py_ssize_t n = view.shape[0]
    cdef Py_ssize_t pos = 0
    cdef uint32_t value_len
    cdef str reason
    cdef list out = []
    if n == 0:
        return out
    mv = memoryview(buf)
    cdef const uint8_t* p = &view[0]
    while pos < n:
        if n - pos < _QREC_HEADER_BYTES:
            raise QueueRecordError(f"record at byte {pos}: truncated header")
        value_len = _load32(p + pos + 12)
        if value_len > _QUEUE_MESSAGE_BYTES_MAX \
                or _QREC_HEADER_BYTES + <Py_ssize_t> value_len > n - pos:
            raise QueueRecordError(f"record at byte {pos}: value runs past the end")
        reason = _qrec_invalid(p + pos, n - pos, mv, pos, True)
        if reason is not None:
            raise QueueRecordError(f"record at byte {pos}: {reason}")
        out.append((_load64(p + pos + 16), _load64(p + pos + 24), _load64(p + pos + 32),
                    _load64(p + pos + 40),
                    PyBytes_FromStringAndSize(<const char*> (p + pos + _QREC_HEADER_BYTES),
                                              value_len)))
        pos += _QREC_HEADER_BYTES + value_len
    return out
