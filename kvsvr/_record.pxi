# Binlog record codec: one committed mutation of one key.
#
# Layout, little-endian, layout version 1 (header asserted to be 56 bytes):
#
#   offset size field
#        0    8 checksum    xxh3_64 of bytes [8, end): everything after this field
#        8    4 magic       0x4C42564B (b"KVBL")
#       12    2 layout      1
#       14    2 op_count    1 .. OPS_PER_BATCH_MAX
#       16    8 lsn         binlog position of this record on the node that wrote it
#       24    8 version     the key's version after this mutation (>= 1)
#       32    8 client_id   operation id: client ...
#       40    8 client_seq  ... and its sequence (0, 0 = no id)
#       48    4 key_len     1 .. KEY_BYTES_MAX
#       52    4 body_len    bytes after the header; must equal len(record) - 56
#       56      key         key_len bytes
#               ops         op_count times: u8 kind, u32 row_len, u32 value_len, row, value
#
# Ops are logical (incr carries its delta, append its value): replaying the records of one
# key in version order from the same prior state gives the same result on every replica.

from libc.string cimport memcpy
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE

import sys as _sys
from xxhash import xxh3_64_intdigest as _xxh3_64

if _sys.byteorder != "little":
    raise ImportError("kvsvr._core: the record and frame layouts assume a little-endian host")


class RecordError(ValueError):
    """A binlog record is truncated, corrupted or not a record: never silently misread."""


cdef inline uint16_t _load16(const uint8_t* p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v

cdef inline uint32_t _load32(const uint8_t* p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v

cdef inline uint64_t _load64(const uint8_t* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v

cdef inline void _store16(uint8_t* p, uint16_t v) noexcept nogil:
    memcpy(p, &v, 2)

cdef inline void _store32(uint8_t* p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)

cdef inline void _store64(uint8_t* p, uint64_t v) noexcept nogil:
    memcpy(p, &v, 8)


cpdef check_op(int kind, bytes row, bytes value):
    """Raise ValueError naming the field if (kind, row, value) is not a well-formed op."""
    if kind < 1 or kind > _OP_KIND_MAX:
        raise ValueError(f"op.kind: unknown operation kind {kind}, expected 1..{_OP_KIND_MAX}")
    if len(row) > _ROW_KEY_BYTES_MAX:
        raise ValueError(f"op.row: {len(row)} bytes, the limit is {_ROW_KEY_BYTES_MAX}")
    if len(value) > _VALUE_BYTES_MAX:
        raise ValueError(f"op.value: {len(value)} bytes, the limit is {_VALUE_BYTES_MAX}")
    if kind == OP_ROW_PUT or kind == OP_ROW_DELETE:
        if len(row) == 0:
            raise ValueError(f"op.row: {OP_NAMES[kind]} needs a non-empty row key")
    elif len(row) != 0 and kind != OP_EXPIRE and kind != OP_PURGE:
        raise ValueError(f"op.row: {OP_NAMES[kind]} takes no row key")
    if kind == OP_INCR and len(value) != 8:
        raise ValueError("op.value: incr carries an 8-byte signed delta")
    if kind == OP_COMPACT and len(value) != 8:
        raise ValueError("op.value: compact carries an 8-byte version")
    if kind == OP_EXPIRE and len(value) != _EXPIRE_VALUE_BYTES:
        raise ValueError("op.value: expire carries a u64 instant and a u64 ttl (16 bytes)")
    if kind == OP_PURGE and len(value) != 8:
        raise ValueError("op.value: purge carries an 8-byte instant")
    if (kind == OP_DELETE or kind == OP_ROW_DELETE) and len(value) != 0:
        raise ValueError(f"op.value: {OP_NAMES[kind]} takes no value")


cdef class Record:
    """A decoded binlog record. `ops` is a list of (kind, row, value) tuples."""
    cdef readonly uint64_t lsn
    cdef readonly uint64_t version
    cdef readonly uint64_t client_id
    cdef readonly uint64_t client_seq
    cdef readonly bytes key
    cdef readonly list ops

    def __repr__(self):
        return (f"Record(lsn={self.lsn}, version={self.version}, key={self.key!r}, "
                f"op_id=({self.client_id}, {self.client_seq}), ops={self.ops!r})")

    def __eq__(self, other):
        if not isinstance(other, Record):
            return NotImplemented
        cdef Record o = other
        return (self.lsn == o.lsn and self.version == o.version and self.key == o.key
                and self.client_id == o.client_id and self.client_seq == o.client_seq
                and self.ops == o.ops)


def encode_record(uint64_t lsn, uint64_t version, uint64_t client_id, uint64_t client_seq,
                  bytes key not None, list ops not None) -> bytes:
    """Encode one mutation as a checksummed binlog record. Raises ValueError on bad input."""
    cdef Py_ssize_t key_len = len(key)
    cdef Py_ssize_t n_ops = len(ops)
    cdef Py_ssize_t total = _RECORD_HEADER_BYTES + key_len
    cdef Py_ssize_t payload = 0
    cdef int kind
    cdef bytes row, value
    if key_len < 1 or key_len > _KEY_BYTES_MAX:
        raise ValueError(f"key: {key_len} bytes, expected 1..{_KEY_BYTES_MAX}")
    if n_ops < 1 or n_ops > _OPS_PER_BATCH_MAX:
        raise ValueError(f"ops: {n_ops} operations, expected 1..{_OPS_PER_BATCH_MAX}")
    if version < 1:
        raise ValueError("version: a committed mutation has version >= 1")
    for op in ops:
        kind, row, value = op
        check_op(kind, row, value)
        total += _OP_HEADER_BYTES + len(row) + len(value)
        payload += len(row) + len(value)
    if payload > _BATCH_BYTES_MAX:
        raise ValueError(
            f"ops: {payload} bytes of rows and values, the limit is {_BATCH_BYTES_MAX}")

    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t* p = <uint8_t*> PyBytes_AS_STRING(out)
    _store32(p + 8, _RECORD_MAGIC)
    _store16(p + 12, _RECORD_LAYOUT)
    _store16(p + 14, <uint16_t> n_ops)
    _store64(p + 16, lsn)
    _store64(p + 24, version)
    _store64(p + 32, client_id)
    _store64(p + 40, client_seq)
    _store32(p + 48, <uint32_t> key_len)
    _store32(p + 52, <uint32_t> (total - _RECORD_HEADER_BYTES))
    cdef Py_ssize_t pos = _RECORD_HEADER_BYTES
    memcpy(p + pos, PyBytes_AS_STRING(key), key_len)
    pos += key_len
    for op in ops:
        kind, row, value = op
        p[pos] = <uint8_t> kind
        _store32(p + pos + 1, <uint32_t> len(row))
        _store32(p + pos + 5, <uint32_t> len(value))
        pos += _OP_HEADER_BYTES
        memcpy(p + pos, PyBytes_AS_STRING(row), len(row))
        pos += len(row)
        memcpy(p + pos, PyBytes_AS_STRING(value), len(value))
        pos += len(value)
    assert pos == total
    _store64(p, _xxh3_64(memoryview(out)[8:]))
    return out


cdef Record _decode(const uint8_t[::1] view):
    cdef Py_ssize_t n = view.shape[0]
    if n < _RECORD_HEADER_BYTES:
        raise RecordError(f"truncated: {n} bytes, a record header is {_RECORD_HEADER_BYTES}")
    cdef const uint8_t* p = &view[0]
    if _load32(p + 8) != _RECORD_MAGIC:
        raise RecordError("bad magic: not a KVSvr binlog record")
    if _load16(p + 12) != _RECORD_LAYOUT:
        raise RecordError(
            f"unknown record layout {_load16(p + 12)}, this build reads {_RECORD_LAYOUT}")
    cdef uint32_t body_len = _load32(p + 52)
    if <Py_ssize_t> body_len != n - _RECORD_HEADER_BYTES:
        raise RecordError(f"length mismatch: header says {body_len} body bytes, "
                          f"{n - _RECORD_HEADER_BYTES} present (truncated or padded)")
    cdef uint64_t stored = _load64(p)
    if stored != <uint64_t> _xxh3_64(view[8:]):
        raise RecordError("checksum mismatch: record corrupted")
    # The checksum passed; the checks below still guard against a buggy or hostile writer.
    cdef uint16_t n_ops = _load16(p + 14)
    cdef uint32_t key_len = _load32(p + 48)
    if key_len < 1 or key_len > _KEY_BYTES_MAX or key_len > body_len:
        raise RecordError(f"bad key length {key_len}")
    if n_ops < 1 or n_ops > _OPS_PER_BATCH_MAX:
        raise RecordError(f"bad op count {n_ops}")
    cdef Record r = Record.__new__(Record)
    r.lsn = _load64(p + 16)
    r.version = _load64(p + 24)
    r.client_id = _load64(p + 32)
    r.client_seq = _load64(p + 40)
    if r.version < 1:
        raise RecordError("bad version 0")
    cdef Py_ssize_t pos = _RECORD_HEADER_BYTES
    r.key = PyBytes_FromStringAndSize(<const char*> (p + pos), key_len)
    pos += key_len
    cdef list ops = []
    cdef uint32_t row_len, value_len
    cdef int kind
    cdef Py_ssize_t i
    for i in range(n_ops):
        if pos + _OP_HEADER_BYTES > n:
            raise RecordError(f"op {i}: header runs past the end")
        kind = p[pos]
        row_len = _load32(p + pos + 1)
        value_len = _load32(p + pos + 5)
        pos += _OP_HEADER_BYTES
        if <Py_ssize_t> row_len > n - pos or <Py_ssize_t> value_len > n - pos - row_len:
            raise RecordError(f"op {i}: row/value run past the end")
        row = PyBytes_FromStringAndSize(<const char*> (p + pos), row_len)
        pos += row_len
        value = PyBytes_FromStringAndSize(<const char*> (p + pos), value_len)
        pos += value_len
        try:
            check_op(kind, row, value)
        except ValueError as e:
            raise RecordError(f"op {i}: {e}") from None
        ops.append((kind, row, value))
    if pos != n:
        raise RecordError(f"{n - pos} trailing bytes after the last op")
    r.ops = ops
    return r


def decode_record(buf) -> Record:
    """Decode and verify a binlog record; raises RecordError saying what is wrong."""
    return _decode(buf)


def applied_prefix(list records not None, dict states not None, Py_ssize_t start=0):
    """The index of the first of `records` (raw binlog records), from `start` on, that is not
    known applied here: its key has no state in `states` (key -> a state with .version: the
    key states a store keeps in memory), that state is older than the record's version, or
    the record does not check out (the caller decodes it and says why). len(records) when
    none is.

    A pull's answer is mostly versions the quorum brought already (each replica applies
    every write): this passes over them with no Record built, checksum still checked (a
    damaged header must not hide a version this replica lacks)."""
    cdef Py_ssize_t i, size, n = len(records)
    cdef const uint8_t* p
    cdef uint32_t key_len
    cdef object raw, state
    for i in range(max(start, 0), n):
        raw = records[i]
        if type(raw) is not bytes:
            return i
        size = PyBytes_GET_SIZE(raw)
        if size < _RECORD_HEADER_BYTES:
            return i
        p = <const uint8_t*> PyBytes_AS_STRING(raw)
        key_len = _load32(p + 48)
        if (_load32(p + 8) != _RECORD_MAGIC or _load16(p + 12) != _RECORD_LAYOUT
                or <Py_ssize_t> _load32(p + 52) != size - _RECORD_HEADER_BYTES
                or key_len < 1 or key_len > _KEY_BYTES_MAX
                or <Py_ssize_t> key_len > size - _RECORD_HEADER_BYTES):
            return i
        state = states.get(PyBytes_FromStringAndSize(<const char*> (p + _RECORD_HEADER_BYTES),
                                                     key_len))
        if state is None or _load64(p + 24) == 0 \
                or _load64(p + 24) > <uint64_t> state.version:
            return i
        if _load64(p) != <uint64_t> _xxh3_64(raw[8:]):
            return i
    return n


def record_invalid(buf):
    """The reason `buf` is not a valid record, or None if it is one."""
    try:
        _decode(buf)
    except RecordError as e:
        return str(e)
    return None


def record_lsn(buf) -> int:
    """The LSN of a record without decoding the rest (the caller verified it already)."""
    cdef const uint8_t[::1] view = buf
    if view.shape[0] < _RECORD_HEADER_BYTES:
        raise RecordError("truncated record header")
    return _load64(&view[16])
