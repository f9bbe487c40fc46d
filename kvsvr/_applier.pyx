# cython: language_level=3
"""A replica's hot apply path, compiled: one plain chosen version into the open LMDB write
transaction (kvsvr/store/batch.py's WriteBatch._commit_mutation tries it first), and the
rolling flush of the key states a replica holds back (kvsvr/store/states.py).

Every replica applies every write, so this runs once per write on each of them, where the
general Python path (plan, encode, write, remember) spends most of its time outside LMDB.
This path takes only what that general path would do for a *plain* record: puts and deletes
of the key's value, no rows, no compaction, no expiry, on a key whose state is kept in
memory and held back from LMDB's keys table (Store's defer_key_states), with no bound of the
binlog or of the held states reached. It checks all of that before writing anything and
answers None when one does not hold, and the caller then takes the general path. What it
writes is byte for byte what the general path writes (tests/test_applier.py compares the
two).

Like the core, no threads and no clock; unlike it, it writes to LMDB (through py-lmdb).
"""

from libc.stdint cimport uint8_t, uint64_t
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.string cimport memcpy

import msgspec
from xxhash import xxh64_intdigest

from kvsvr._core import OP_DELETE, OP_EXPIRE, OP_PURGE, OP_PUT, encode_record
from kvsvr.limits import OPS_TRIM_STEP, STATE_CACHE_VALUE_BYTES
from kvsvr.protocol import MutateReply

_encoder = msgspec.msgpack.Encoder()

cdef int _PUT = OP_PUT
cdef int _DELETE = OP_DELETE
cdef int _EXPIRE = OP_EXPIRE
cdef int _PURGE = OP_PURGE
cdef bytes _ZERO_INSTANT = bytes(8)
cdef Py_ssize_t _VALUE_MAX = STATE_CACHE_VALUE_BYTES
cdef uint64_t _TRIM_STEP = OPS_TRIM_STEP


cdef object _digest(bytes key, ops):
    return xxh64_intdigest(_encoder.encode((key, ops)))


cdef bytes _remembered(digest, reply):
    return _encoder.encode((digest, reply))


def encode_state(state) -> bytes:
    """A key state as the keys table holds it (KeyState.encode): u64 version, u64 next_seq,
    u64 compacted_through, u8 flags (1: a value, 2: it expires), little-endian, then the
    u64 expiry instant of an expiring value, then the value."""
    return _encode_state(state)


def request_digest(bytes key, ops) -> int:
    """Identifies a request (its key and ops), so an op id reused for another one is caught.
    The ops table stores it: it must never change for data already written. The instants
    of expire and purge ops are left out: each node that takes a retry stamps its own, and
    the retry is still the same request (a lone op has none: puts are alone most often)."""
    if len(ops) > 1:
        ops = [(kind, row, _ZERO_INSTANT + value[8:]) if kind == _EXPIRE or kind == _PURGE
               else (kind, row, value) for kind, row, value in ops]
    return _digest(key, ops)


def remembered_value(digest, reply) -> bytes:
    """The ops table's value for an op id: the request's digest and its first answer."""
    return _remembered(digest, reply)


cdef inline void _store_be64(uint8_t* p, uint64_t v) noexcept:
    cdef int i
    for i in range(8):
        p[7 - i] = <uint8_t> (v & 0xFF)
        v >>= 8


cdef inline void _store_le64(uint8_t* p, uint64_t v) noexcept:
    cdef int i
    for i in range(8):
        p[i] = <uint8_t> (v & 0xFF)
        v >>= 8


cdef bytes _encode_state(state):
    value = state.value
    cdef bytes data = b"" if value is None else value   # (a checked cast: bytes or TypeError)
    cdef Py_ssize_t n = len(data)
    cdef uint64_t expires_ms = state.expires_ms if value is not None else 0
    cdef Py_ssize_t head = 33 if expires_ms else 25
    cdef bytes out = PyBytes_FromStringAndSize(NULL, head + n)
    cdef uint8_t* p = <uint8_t*> PyBytes_AS_STRING(out)
    _store_le64(p, state.version)
    _store_le64(p + 8, state.next_seq)
    _store_le64(p + 16, state.compacted_through)
    p[24] = (value is not None) | (2 if expires_ms else 0)
    if expires_ms:
        _store_le64(p + 25, expires_ms)
    if n:
        memcpy(p + head, PyBytes_AS_STRING(data), n)
    return out


cdef bytes _be64(uint64_t v):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 8)
    _store_be64(<uint8_t*> PyBytes_AS_STRING(out), v)
    return out


cdef bytes _be64x2(uint64_t a, uint64_t b):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 16)
    _store_be64(<uint8_t*> PyBytes_AS_STRING(out), a)
    _store_be64(<uint8_t*> PyBytes_AS_STRING(out) + 8, b)
    return out


cdef class Applier:
    """Bound to one Store: its LMDB tables (store.tables) and its key-state cache's dicts
    and set (store.states), which the cache never replaces (it clears them); all resolved
    once, here, not per write."""

    cdef object store
    cdef dict states
    cdef dict held
    cdef object binlog_db, ops_db, clients_db, keys_db
    cdef set flushing
    cdef uint64_t deferred_records_max

    def __init__(self, store):
        tables, cache = store.tables, store.states
        self.store = store
        self.states = cache.kept
        self.held = cache.held
        self.binlog_db = tables.binlog
        self.ops_db = tables.ops
        self.clients_db = tables.clients
        self.keys_db = tables.keys
        self.flushing = cache.flushing
        self.deferred_records_max = cache.deferred_records_max

    def apply(self, txn, bytes key, state, list ops, uint64_t client_id,
              uint64_t client_seq):
        """Write the mutation `ops` of `key`, whose newest state is `state`, in `txn` if it is
        plain (see the module). Returns (its MutateReply, whether the client's entry must
        be written: its first op, or a trim step), or None having changed nothing."""
        store = self.store
        cdef uint64_t old_version = state.version
        if old_version < 1 or key not in self.states or state.expires_ms:
            # A first write goes through to the keys table; so does one replacing a value
            # that expires (its expiry table entry goes).
            return None
        cdef uint64_t version = old_version + 1
        value = state.value
        cdef int kind
        for op in ops:
            kind = op[0]
            if kind == _PUT:
                value = op[2]
            elif kind == _DELETE:
                value = None
            else:
                return None
        if value is not None and len(value) > _VALUE_MAX:
            return None
        cdef uint64_t lsn = store.last_lsn + 1
        cdef uint64_t first_lsn = store.first_lsn
        if lsn - first_lsn + 1 > <uint64_t> store.binlog_max_records:
            return None   # the binlog bound trims (and may write held states) first
        cdef uint64_t replay_from = lsn
        for held_from in self.held.values():
            replay_from = held_from
            break
        if lsn >= self.deferred_records_max and lsn - self.deferred_records_max >= replay_from:
            return None   # too many records to replay: held states are written first
        new_state = type(state)(version, state.next_seq, value, state.compacted_through)
        binlog_record = encode_record(lsn, version, client_id, client_seq, key, ops)
        reply = MutateReply(version, [None] * len(ops))
        # Written in the general path's order: key state, binlog, then the op id.
        self.states[key] = new_state
        self.held.setdefault(key, lsn)
        store.last_lsn = lsn
        txn.put(_be64(lsn), binlog_record, True, True, True, self.binlog_db)
        cdef bint client_due = False
        if client_id:
            txn.put(_be64x2(client_id, client_seq), _remembered(_digest(key, ops), reply),
                    True, True, False, self.ops_db)
            client_due = (client_seq % _TRIM_STEP == 0
                          or txn.get(_be64(client_id), None, self.clients_db) is None)
        return reply, client_due

    def write_held(self, txn, list keys not None, Py_ssize_t start, Py_ssize_t end):
        """Write the states of keys[start:end] still held back into `txn`'s keys table, as
        KeyStates.write_held does one by one (the rolling flush: about one a write).
        Returns how many were written."""
        cdef Py_ssize_t i, written = 0
        cdef dict held = self.held
        for i in range(max(start, 0), min(end, len(keys))):
            key = keys[i]
            if key in held:
                txn.put(key, _encode_state(self.states[key]), True, True, False, self.keys_db)
                del held[key]
                self.flushing.add(key)
                written += 1
        return written
