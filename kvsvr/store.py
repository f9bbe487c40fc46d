"""The storage engine of one node: Key-Value and Key-Table data on LMDB.

One LMDB environment per node, with sub-databases:

  keys     key -> u64 version, u64 next_seq, u64 compacted_through, u8 has_value, value
  rows     u16be len(key) key row -> u64 version, u8 deleted, value   (tombstones kept)
  changes  u16be len(key) key u64be version row -> ""    one entry per row: its last change
  binlog   u64be lsn -> record (kvsvr._core record codec, xxh3-checksummed)
  ops      u64be client_id u64be seq -> msgpack [request digest, MutateReply]  (exactly-once)
  clients  u64be client_id -> u64 horizon (older seqs are refused), u64 last active (unix s)
  paxos    u16be len(key) key u64be version -> msgpack [promised, accepted_ballot,
           accepted_value, chosen_value]                             (version quorum acceptor)
  meta     b"schema" -> u32; b"quorum/incarnation" -> u64; b"quorum/fence/" u8 peer -> u64;
           b"quorum/rebuilt", b"quorum/verified" -> u64 incarnation

A mutation is checked in full before anything is written, so a rejected one changes nothing;
its data, change index, binlog record and op id are written in the caller's one transaction,
which is how many client operations share one durable commit (group commit).
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import msgspec

from kvsvr import _core
from kvsvr._applier import Applier, encode_state, remembered_value, request_digest
from kvsvr.errors import Compacted, InvalidArgument, NotFound, StorageFull, VersionConflict
from kvsvr.limits import (
    BINLOG_MAX_RECORDS,
    BINLOG_TRIM_PER_WRITE,
    CLIENT_IDLE_EXPIRY_S,
    CLIENT_SWEEP_BATCH,
    DEFERRED_RECORDS_MAX,
    DISK_FULL_BELOW_BYTES,
    OPS_REMEMBERED_PER_CLIENT,
    OPS_TRIM_STEP,
    PAGE_MAX_BYTES,
    SCAN_MAX_ENTRIES_VISITED,
    STATE_CACHE_KEYS,
    STATE_CACHE_VALUE_BYTES,
)
from kvsvr.protocol import (
    I64_MAX,
    I64_MIN,
    Change,
    ChangesPage,
    MutateReply,
    Op,
    Row,
    RowValue,
    ScanPage,
    Versioned,
    decode_delta,
    decode_version,
)

SCHEMA_VERSION = 2
_KEY_META = struct.Struct("<QQQB")  # version, next_seq, compacted_through, has_value
_HAS_VALUE = 24                     # offset of has_value in a key record
_ROW_META = struct.Struct("<QB")  # version, deleted
_U64BE = struct.Struct(">Q")
_U16BE = struct.Struct(">H")
_OP_ID = struct.Struct(">QQ")
_CLIENT = struct.Struct("<QQ")  # horizon seq, last active (unix seconds)
_DECIMAL = re.compile(rb"-?[0-9]{1,19}")
_remembered_decoder = msgspec.msgpack.Decoder(tuple[int, MutateReply])
_paxos_encoder = msgspec.msgpack.Encoder()
_paxos_decoder = msgspec.msgpack.Decoder(tuple[int, int, bytes | None, bytes | None])


SnapshotItem = tuple[int, bytes, bytes | None, bytes]      # db, key, row, raw
SnapshotPosition = tuple[int, bytes | None, bytes | None]  # db, key, row


def seq_row(seq: int) -> bytes:
    """The row key `append` gives to sequence number `seq` (sorts in sequence order)."""
    return _U64BE.pack(seq)


def seq_of_row(row: bytes) -> int:
    """The sequence number of a row key made by `append`."""
    if len(row) != 8:
        raise ValueError(f"row: {len(row)} bytes, an appended row key is 8")
    return int(_U64BE.unpack(row)[0])


def _prefix(key: bytes) -> bytes:
    return _U16BE.pack(len(key)) + key


def _plan(state: KeyState, ops: list[tuple[int, bytes, bytes]]
          ) -> tuple[KeyState, dict[bytes, bytes | None], list[int | None]]:
    """What `ops` do to a key in `state`: (its next state, row writes, per-op results).

    Pure: it checks everything and raises a KvError before anything is written.
    """
    value, next_seq, compacted = state.value, state.next_seq, state.compacted_through
    row_writes: dict[bytes, bytes | None] = {}
    results: list[int | None] = []
    for kind, row, operand in ops:
        result = None
        if kind == _core.OP_PUT:
            value = operand
        elif kind == _core.OP_DELETE:
            value = None
        elif kind == _core.OP_INCR:
            current = 0
            if value is not None:
                if not _DECIMAL.fullmatch(value):
                    raise InvalidArgument("incr: the key's value is not a decimal integer",
                                          field="key", version=state.version)
                current = int(value)
            result = current + decode_delta(operand)
            if not I64_MIN <= result <= I64_MAX:
                raise InvalidArgument("incr: the result overflows a signed 64-bit integer",
                                      field="delta", version=state.version)
            value = str(result).encode()
        elif kind == _core.OP_ROW_PUT:
            row_writes[row] = operand
        elif kind == _core.OP_ROW_DELETE:
            row_writes[row] = None
        elif kind == _core.OP_APPEND:
            row_writes[seq_row(next_seq)] = operand
            result = next_seq
            next_seq += 1
        elif kind == _core.OP_COMPACT:
            through = decode_version(operand)
            if through > state.version:
                raise InvalidArgument(
                    f"through_version: {through}, the key is only at {state.version}",
                    field="through_version", version=state.version)
            compacted = max(compacted, through)
        else:  # decode_request validated kinds already; a new kind must be handled here
            raise InvalidArgument(f"ops: kind {kind} is not applied by this node", field="ops")
        results.append(result)
    return KeyState(state.version + 1, next_seq, value, compacted), row_writes, results


class StoreLocked(RuntimeError):
    """Another process already serves this data directory."""


class KeyState(msgspec.Struct, gc=False):
    """What a key is at its latest version. Not tracked by the cyclic garbage collector (it
    holds no containers): a store keeps up to STATE_CACHE_KEYS of them, and as plain objects
    each full collection walked them all (32 ms per 100,000 on this machine, a write pause
    of up to 150 ms while a node's cache filled)."""

    version: int = 0
    next_seq: int = 0
    value: bytes | None = None
    compacted_through: int = 0   # tombstones up to here are gone

    @classmethod
    def decode(cls, raw: bytes | None) -> KeyState:
        if raw is None:
            return cls()
        version, next_seq, compacted_through, has_value = _KEY_META.unpack_from(raw)
        return cls(version, next_seq, raw[_KEY_META.size:] if has_value else None,
                   compacted_through)

    def encode(self) -> bytes:
        return encode_state(self)   # (one encoder: the compiled path writes states too)


class Store:
    def __init__(self, path: str | Path, *, map_size_mib: int = 1024 * 1024, sync: bool = True,
                 binlog_max_records: int = BINLOG_MAX_RECORDS, defer_meta_sync: bool = False,
                 defer_key_states: bool = False):
        """`defer_meta_sync` (a replica, whose vote log holds what a lost commit had): each
        commit fsyncs its pages but not its meta page, which the next commit's fsync (or
        sync()) makes durable; the `durable_*` LSNs follow one commit behind. This is LMDB's
        MDB_NOMETASYNC: a power cut may undo the last commit but never corrupts the file.
        It saves one of the two fsyncs of every commit: +8% replicated puts, p99 -10%, on
        this machine's shared disk (bench/load.py, three alternated pairs).

        `defer_key_states` (a replica): a write that changes no row leaves the key's new
        state in memory, and a rolling sweep (WriteBatch.flush_key_states) writes the held
        states a key range at a time, each about once per flush cycle, instead of every
        checkpoint rewriting a random leaf page per written key: most of what a checkpoint
        wrote (23.7 KiB per replicated put on this machine, 7 KiB without key states). The
        binlog records are committed as before; a restart (or an aborted transaction)
        replays them from `keys/replay_from`, the first record a held state has that LMDB
        lacks, and the binlog is never trimmed past it. Only keys already in LMDB are held
        (their first write goes through), so a snapshot read sees every key and swaps in
        the held state."""
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        # LMDB itself allows many writer processes; two nodes on one directory would still
        # interleave LSNs kept in memory, so one process owns a data directory.
        self._lock_file = open(self.path / "LOCK", "a+")  # noqa: SIM115 (held for life)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StoreLocked(f"{self.path}: another process holds this data directory") from None
        self.binlog_max_records = binlog_max_records
        self.defers_meta_sync = sync and defer_meta_sync
        self.env = lmdb.open(
            str(self.path), map_size=map_size_mib << 20, max_dbs=8, sync=sync,
            metasync=sync and not defer_meta_sync, readahead=False, max_readers=256,
        )
        if self.defers_meta_sync:
            # What the last run committed may still be in the page cache only (a killed
            # process leaves it there): durable before anything is said about it.
            self.env.sync(True)
        self._keys = self.env.open_db(b"keys")
        self._rows = self.env.open_db(b"rows")
        self._changes = self.env.open_db(b"changes")
        self._binlog = self.env.open_db(b"binlog")
        self._ops = self.env.open_db(b"ops")
        self._paxos = self.env.open_db(b"paxos")
        self._clients = self.env.open_db(b"clients")
        self._meta = self.env.open_db(b"meta")
        with self.env.begin(write=True) as txn:
            schema = txn.get(b"schema", db=self._meta)
            if schema is None:
                txn.put(b"schema", struct.pack("<I", SCHEMA_VERSION), db=self._meta)
            elif struct.unpack("<I", schema)[0] != SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: schema {struct.unpack('<I', schema)[0]}, "
                                   f"this build reads {SCHEMA_VERSION}")
            cursor = txn.cursor(db=self._binlog)
            self.first_lsn = _U64BE.unpack(cursor.key())[0] if cursor.first() else 1
            self.last_lsn = _U64BE.unpack(cursor.key())[0] if cursor.last() else 0
            if self.last_lsn == 0:
                # An empty binlog continues after the last LSN ever used, not at 1.
                saved = txn.get(b"last_lsn", db=self._meta)
                self.last_lsn = _U64BE.unpack(saved)[0] if saved else 0
                self.first_lsn = self.last_lsn + 1
        # What readers outside the write transaction see (pulls, snapshots): first_lsn and
        # last_lsn run ahead while a transaction kept open across rounds is not committed.
        self.durable_first_lsn, self.durable_last_lsn = self.first_lsn, self.last_lsn
        # With defer_meta_sync: the LSNs of the last commit, durable from the next one on.
        self._undurable: tuple[int, int] | None = None
        # The newest state of recently written or looked-up keys (see latest()).
        self._states: dict[bytes, KeyState] = {}
        # With defer_key_states: the keys whose newest state is held in memory (in _states,
        # never evicted) -> the LSN of the first binlog record LMDB's keys table lacks. A key
        # enters at the end when its first held write is applied, so LSNs ascend: the first
        # entry is where a replay starts.
        self.defers_key_states = defer_key_states
        self._deferred: dict[bytes, int] = {}
        # Held states written into a transaction whose commit the owner has not seen end:
        # still read from memory (a read transaction begun before the end sees the old one).
        self._flushing: set[bytes] = set()
        self._sweep: list[bytes] = []   # the flush cycle under way: its keys in key order
        self._sweep_at = 0
        # Binlog records a restart may replay (read once: a test lowers the bound).
        self.deferred_max = DEFERRED_RECORDS_MAX
        # Plain writes' compiled path (see _commit_mutation): only held states make it pay.
        self.applier: Applier | None = Applier(self) if defer_key_states else None
        self._replay_deferred()
        if self._deferred and not defer_key_states:
            # Held by a replica that ran on this directory: written out now, and the marker
            # dropped (this store trims its binlog without regard to it).
            with self.write() as batch:
                batch.flush_all_key_states()
                batch.set_meta(b"keys/replay_from", None)

    def close(self) -> None:
        self.sync()
        self.env.close()
        self._lock_file.close()

    @property
    def meta_sync_pending(self) -> bool:
        """Whether the last commit waits for the next one (or sync()) to be durable."""
        return self._undurable is not None

    def sync(self) -> None:
        """Make every commit so far durable (with defer_meta_sync, the last one is not)."""
        if self._undurable is None:
            return
        self.env.sync(True)
        self.durable_first_lsn, self.durable_last_lsn = self._undurable
        self._undurable = None

    # --- reads -----------------------------------------------------------------------------
    def read(self) -> lmdb.Transaction:
        return self.env.begin()

    def key_state(self, txn: lmdb.Transaction, key: bytes) -> KeyState:
        if self._held(key):
            return self._states[key]
        return KeyState.decode(txn.get(key, db=self._keys))

    def _held(self, key: bytes) -> bool:
        """Whether the key's newest state is to be read from memory, not LMDB."""
        return key in self._deferred or key in self._flushing

    def commit_seen(self) -> None:
        """The owner saw the last commit end: held states it wrote are readable in LMDB."""
        self._flushing.clear()

    @property
    def deferred_keys(self) -> int:
        """Keys whose newest state is held in memory, not yet in LMDB's keys table."""
        return len(self._deferred)

    def replay_from(self) -> int:
        """The first binlog record a held key state has that LMDB's keys table lacks."""
        for lsn in self._deferred.values():
            return lsn
        return self.last_lsn + 1

    def _replay_deferred(self) -> None:
        """Rebuild the held key states from the committed binlog (at open, and after an
        aborted transaction dropped what memory had)."""
        with self.env.begin() as txn:
            raw = txn.get(b"keys/replay_from", db=self._meta)
            start = _U64BE.unpack(raw)[0] if raw else self.last_lsn + 1
            if start > self.last_lsn:
                return
            if start < self.first_lsn:
                raise RuntimeError(
                    f"{self.path}: the binlog starts at lsn {self.first_lsn}, but key states "
                    f"held in memory at the last commit need it from lsn {start}")
            cursor = txn.cursor(db=self._binlog)
            found = cursor.set_range(_U64BE.pack(start))
            while found:
                lsn = _U64BE.unpack(cursor.key())[0]
                record = _core.decode_record(cursor.value())
                key = record.key
                state = self._states.get(key)
                if state is None:
                    state = KeyState.decode(txn.get(key, db=self._keys))
                if record.version > state.version + 1 or (
                        record.version == state.version + 1 and state.version == 0):
                    raise RuntimeError(
                        f"{self.path}: binlog lsn {lsn} has {key!r} v{record.version}, the "
                        f"keys table v{state.version}: a held state is missing")
                if record.version == state.version + 1:
                    new_state, row_writes, _ = _plan(state, record.ops)
                    if row_writes or new_state.compacted_through != state.compacted_through:
                        raise RuntimeError(
                            f"{self.path}: binlog lsn {lsn} ({key!r} v{record.version}) "
                            "changes rows, yet the keys table does not have it")
                    self._states[key] = new_state
                    self._deferred.setdefault(key, lsn)
                found = cursor.next()

    def latest(self, txn: lmdb.Transaction, key: bytes) -> KeyState:
        """The key's newest state, written by this store's open or committing transaction or
        before: from memory when it is kept there (an LMDB lookup costs a B-tree descent),
        else read in `txn`, which must then be current for the key. Never modify it."""
        state = self._states.get(key)
        return KeyState.decode(txn.get(key, db=self._keys)) if state is None else state

    @property
    def kept_states(self) -> dict[bytes, KeyState]:
        """The key states kept in memory (see latest), by key: to be read, never changed."""
        return self._states

    def cached_state(self, key: bytes) -> KeyState | None:
        """The key's newest state if it is kept in memory (see latest), else None."""
        return self._states.get(key)

    def _keep(self, key: bytes, state: KeyState) -> None:
        states = self._states
        if state.value is not None and len(state.value) > STATE_CACHE_VALUE_BYTES:
            states.pop(key, None)   # big values stay in LMDB only
            return
        states[key] = state
        if len(states) > STATE_CACHE_KEYS:
            # The oldest kept, a slice at a time, passing over held states (the only copy):
            # the scan goes on until the slice is full, so it runs once per slice of inserts
            # whatever the held ones' places (at most DEFERRED_RECORDS_MAX < STATE_CACHE_KEYS).
            held, doomed = self._held, []
            for old in states:
                if not held(old):
                    doomed.append(old)
                    if len(doomed) >= STATE_CACHE_KEYS // 16:
                        break
            for old in doomed:
                del states[old]

    def forget_states(self) -> None:
        """A write transaction was aborted: what it wrote never happened (held key states
        are rebuilt from what was committed)."""
        self._states.clear()
        self._flushing.clear()
        self._deferred.clear()
        self._sweep, self._sweep_at = [], 0
        self._replay_deferred()

    def get(self, txn: lmdb.Transaction, key: bytes) -> Versioned:
        if self._held(key):
            state = self._states[key]
            if state.value is None:
                raise NotFound("key holds no value", field="key", version=state.version)
            return Versioned(state.version, state.value)
        raw = txn.get(key, db=self._keys)
        if raw is None or not raw[_HAS_VALUE]:
            version = _KEY_META.unpack_from(raw)[0] if raw is not None else 0
            raise NotFound("key holds no value", field="key", version=version)
        return Versioned(_KEY_META.unpack_from(raw)[0], raw[_KEY_META.size:])

    def row_get(self, txn: lmdb.Transaction, key: bytes, row: bytes) -> RowValue:
        state = self.key_state(txn, key)
        raw = txn.get(_prefix(key) + row, db=self._rows)
        if raw is None or raw[8]:
            raise NotFound("row holds no value", field="row", version=state.version)
        return RowValue(state.version, _ROW_META.unpack_from(raw)[0], raw[_ROW_META.size:])

    def scan(self, txn: lmdb.Transaction, key: bytes, start: bytes, end: bytes | None,
             limit: int) -> ScanPage:
        prefix = _prefix(key)
        stop = prefix + end if end is not None else None
        rows: list[Row] = []
        next_start = None
        visited = 0
        size = 0
        cursor = txn.cursor(db=self._rows)
        if cursor.set_range(prefix + start):
            for raw_key, raw in cursor:
                if not raw_key.startswith(prefix) or (stop is not None and raw_key >= stop):
                    break
                row = raw_key[len(prefix):]
                if (len(rows) == limit or visited == SCAN_MAX_ENTRIES_VISITED
                        or size > PAGE_MAX_BYTES):
                    next_start = row  # more remain: continue from here
                    break
                visited += 1
                if not raw[8]:
                    rows.append(Row(row, _ROW_META.unpack_from(raw)[0], raw[_ROW_META.size:]))
                    size += len(raw_key) + len(raw)
        return ScanPage(self.key_state(txn, key).version, rows, next_start)

    def changes(self, txn: lmdb.Transaction, key: bytes, since_version: int, after_row: bytes,
                limit: int) -> ChangesPage:
        """Rows changed after (since_version, after_row), tombstones included, version order.

        From 0 (a full sync) always; from below the key's compaction horizon never, as the
        deletions in between are gone: that raises Compacted, and the caller resyncs from 0.
        """
        prefix = _prefix(key)
        if since_version:
            state = self.key_state(txn, key)
            if since_version < state.compacted_through:
                raise Compacted(
                    f"since_version: {since_version} is before the compaction horizon "
                    f"{state.compacted_through}; resync from version 0",
                    field="since_version", version=state.compacted_through)
        if after_row:
            start = prefix + _U64BE.pack(since_version) + after_row + b"\x00"
        elif since_version >= 2**64 - 1:
            return ChangesPage(self.key_state(txn, key).version, [], None)
        else:
            start = prefix + _U64BE.pack(since_version + 1)
        changes: list[Change] = []
        resume = None
        size = 0
        cursor = txn.cursor(db=self._changes)
        if cursor.set_range(start):
            for index_key in cursor.iternext(keys=True, values=False):
                if not index_key.startswith(prefix):
                    break
                version = _U64BE.unpack_from(index_key, len(prefix))[0]
                row = index_key[len(prefix) + 8:]
                if len(changes) == limit or size > PAGE_MAX_BYTES:
                    last = changes[-1]
                    resume = (last.version, last.row)
                    break
                raw = txn.get(prefix + row, db=self._rows)
                assert raw is not None and _ROW_META.unpack_from(raw)[0] == version, \
                    "change index out of step with rows"
                changes.append(Change(row, version, bool(raw[8]), raw[_ROW_META.size:]))
                size += len(index_key) + len(raw)
        return ChangesPage(self.key_state(txn, key).version, changes, resume)

    def binlog(self, from_lsn: int = 0, limit: int = 1000) -> list[_core.Record]:
        """Decoded binlog records from `from_lsn` (verifies each checksum)."""
        records = []
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._binlog)
            if cursor.set_range(_U64BE.pack(from_lsn)):
                for _, raw in cursor:
                    records.append(_core.decode_record(raw))
                    if len(records) == limit:
                        break
        return records

    def binlog_raw(self, from_lsn: int, max_records: int, max_bytes: int) -> list[bytes]:
        """Raw records from `from_lsn` on, none skipped, within the two bounds (at least one
        record when any is there)."""
        records: list[bytes] = []
        size = 0
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._binlog)
            if cursor.set_key(_U64BE.pack(max(from_lsn, 1))):
                for raw in cursor.iternext(keys=False, values=True):
                    if records and size + len(raw) > max_bytes:
                        break
                    records.append(raw)
                    size += len(raw)
                    if len(records) == max_records:
                        break
        return records

    # --- snapshots (a replica that lost its disk, or fell behind a trimmed binlog) -----------
    def snapshot_lsn(self, txn: lmdb.Transaction) -> int:
        """The last LSN applied as of `txn`: a snapshot read in `txn` holds everything up to
        it, and the binlog after it is the tail to apply on top."""
        cursor = txn.cursor(db=self._binlog)
        if cursor.last():
            return int(_U64BE.unpack(cursor.key())[0])
        saved = txn.get(b"last_lsn", db=self._meta)
        return int(_U64BE.unpack(saved)[0]) if saved else 0

    def snapshot_page(self, txn: lmdb.Transaction, position: SnapshotPosition | None,
                      max_bytes: int) -> tuple[list[SnapshotItem], SnapshotPosition | None]:
        """One page of a consistent copy read in `txn`: items strictly after `position`
        (None: from the start), and the position of the last one, or None when the copy is
        complete. An item is (db, key, row, raw): db 0 the keys, each followed by its rows
        (row None: the key's own record), db 1 the op ids, db 2 the clients."""
        items: list[SnapshotItem] = []
        size = 0
        for item in self._snapshot_items(txn, position or (0, None, None)):
            item_bytes = len(item[1]) + len(item[2] or b"") + len(item[3]) + 16
            if items and size + item_bytes > max_bytes:
                last = items[-1]
                return items, (last[0], last[1], last[2])
            items.append(item)
            size += item_bytes
        return items, None

    def _snapshot_items(self, txn: lmdb.Transaction,
                        position: tuple[int, bytes | None, bytes | None]
                        ) -> Iterator[SnapshotItem]:
        db, after_key, after_row = position
        dbs = (self._keys, self._ops, self._clients)
        while db < len(dbs):
            cursor = txn.cursor(db=dbs[db])
            if after_key is None:
                found = cursor.first()
            else:
                if db == 0:
                    yield from self._row_items(txn, after_key, after_row)
                found = cursor.set_range(after_key)
                if found and cursor.key() == after_key:
                    found = cursor.next()
            while found:
                key = bytes(cursor.key())
                if db == 0 and self._held(key):
                    # Newer than this view perhaps: the binlog after it has what the state
                    # holds, and a copy skips records it is past.
                    yield (db, key, None, self._states[key].encode())
                else:
                    yield (db, key, None, bytes(cursor.value()))
                if db == 0:
                    yield from self._row_items(txn, key, None)
                found = cursor.next()
            db, after_key, after_row = db + 1, None, None

    def _row_items(self, txn: lmdb.Transaction, key: bytes,
                   after_row: bytes | None) -> Iterator[SnapshotItem]:
        prefix = _prefix(key)
        cursor = txn.cursor(db=self._rows)
        found = cursor.set_range(prefix + (after_row or b""))
        if found and after_row is not None and cursor.key() == prefix + after_row:
            found = cursor.next()
        while found and cursor.key()[:len(prefix)] == prefix:
            yield (0, key, bytes(cursor.key()[len(prefix):]), bytes(cursor.value()))
            found = cursor.next()

    def remembered(self, txn: lmdb.Transaction, key: bytes, ops: list[Op], client_id: int,
                   client_seq: int) -> MutateReply | None:
        """The first answer to this op id if it was applied (see WriteBatch.mutate)."""
        return _remembered(self, txn, key, [(op.kind, op.row, op.value) for op in ops],
                           client_id, client_seq)

    def meta_u64s(self, prefix: bytes) -> dict[bytes, tuple[int, ...]]:
        """Meta entries under `prefix` (name suffix -> the u64s stored)."""
        return {name: struct.unpack(f">{len(raw) // 8}Q", raw)
                for name, raw in self.meta_raw(prefix).items()}

    def meta_raw(self, prefix: bytes) -> dict[bytes, bytes]:
        """Meta entries under `prefix` (name suffix -> the bytes stored)."""
        out: dict[bytes, bytes] = {}
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._meta)
            if cursor.set_range(prefix):
                for name, raw in cursor:
                    if not name.startswith(prefix):
                        break
                    out[bytes(name[len(prefix):])] = bytes(raw)
        return out

    def quorum_records(self) -> list[tuple[Any, ...]]:
        """Every persisted record of the version quorum, in the form QuorumReplica.restore
        takes (see _quorum.pxi)."""
        records: list[tuple[Any, ...]] = []
        with self.env.begin() as txn:
            for raw_key, raw in txn.cursor(db=self._paxos):
                key_len = _U16BE.unpack_from(raw_key)[0]
                key = raw_key[2:2 + key_len]
                version = _U64BE.unpack_from(raw_key, 2 + key_len)[0]
                promised, accepted_ballot, accepted_value, chosen_value = \
                    _paxos_decoder.decode(raw)
                records.append(("instance", key, version, promised, accepted_ballot,
                                accepted_value, chosen_value))
            cursor = txn.cursor(db=self._meta)
            if cursor.set_range(b"quorum/"):
                for name, raw in cursor:
                    if not name.startswith(b"quorum/"):
                        break
                    value = _U64BE.unpack(raw)[0]
                    if name.startswith(b"quorum/fence/"):
                        records.append(("fence", name[len(b"quorum/fence/")], value))
                    elif name in (b"quorum/rebuilt", b"quorum/verified"):
                        records.append((name[len(b"quorum/"):].decode(), value))
        return records

    @property
    def incarnation(self) -> int:
        """This node's life: 0 until a quorum member first sets it."""
        with self.env.begin() as txn:
            raw = txn.get(b"quorum/incarnation", db=self._meta)
        return _U64BE.unpack(raw)[0] if raw else 0

    def stats(self) -> dict[str, Any]:
        with self.env.begin() as txn:
            info = self.env.info()
            return {
                "keys": txn.stat(self._keys)["entries"],
                "keys_deferred": len(self._deferred),
                "rows": txn.stat(self._rows)["entries"],
                "binlog_first_lsn": self.first_lsn,
                "binlog_last_lsn": self.last_lsn,
                # What a power cut cannot undo (what peers may pull): behind last_lsn while a
                # write transaction is open, and by one commit with defer_meta_sync.
                "binlog_durable_last_lsn": self.durable_last_lsn,
                "remembered_op_ids": txn.stat(self._ops)["entries"],
                "clients": txn.stat(self._clients)["entries"],
                "map_used_bytes": (info["last_pgno"] + 1) * self.env.stat()["psize"],
                "map_size_bytes": info["map_size"],
            }

    # --- writes ----------------------------------------------------------------------------
    @contextmanager
    def write(self) -> Iterator[WriteBatch]:
        """One durable transaction for many mutations; on any error nothing of it is kept."""
        batch = WriteBatch(self)
        try:
            yield batch
        except BaseException:
            batch.abort()
            raise
        self.commit(batch)
        self.commit_seen()
        self.sync()

    def begin(self) -> WriteBatch:
        """A write transaction the caller keeps open (across rounds) and ends with commit()
        or abort(); while it is open no other write transaction may begin in this process."""
        return WriteBatch(self)

    def commit(self, batch: WriteBatch) -> None:
        """Commit `batch` durably (fsync unless storage.sync is off; with defer_meta_sync,
        durable once the next commit or sync() has ended); on an error nothing of it is kept
        and the error says why (StorageFull for a full map or disk)."""
        try:
            batch.commit()
        except lmdb.MapFullError:
            batch.abort()
            raise StorageFull("the node's LMDB map is full (storage.map_size_mib)") from None
        except lmdb.Error:
            batch.abort()  # nothing was kept, so the LSNs step back too
            # LMDB reports a full disk as EIO; tell it apart by what is left on the disk.
            stat = os.statvfs(self.path)
            if stat.f_bavail * stat.f_frsize < DISK_FULL_BELOW_BYTES:
                raise StorageFull(f"the disk holding {self.path} is full") from None
            raise
        except BaseException:
            batch.abort()
            raise
        if not self.defers_meta_sync:
            self.durable_first_lsn, self.durable_last_lsn = self.first_lsn, self.last_lsn
            return
        # This commit's fsync made the previous commit's meta page durable, not its own.
        if self._undurable is not None:
            self.durable_first_lsn, self.durable_last_lsn = self._undurable
        self._undurable = (self.first_lsn, self.last_lsn)


class WriteBatch:
    def __init__(self, store: Store):
        self.store = store
        self.txn = store.env.begin(write=True)
        self._sealed = False
        self._first_lsn = store.first_lsn
        self._last_lsn = store.last_lsn
        self.applied = 0

    def commit(self) -> None:
        if not self._sealed:
            self.seal()
        self.txn.commit()

    def seal(self) -> None:
        """What a commit records about the store; called by commit() unless the caller did
        (a commit on another thread must not read the store while the caller writes on)."""
        store = self.store
        self._sealed = True
        if store.first_lsn > self._first_lsn:
            self.txn.put(b"last_lsn", _U64BE.pack(store.last_lsn), db=store._meta)
        if store.defers_key_states:
            self.txn.put(b"keys/replay_from", _U64BE.pack(store.replay_from()),
                         db=store._meta)

    def flush_key_states(self, share: float) -> int:
        """Write the next `share` of the flush cycle's held key states to LMDB, in key order
        (neighbours share leaf pages); a cycle starts with the keys held then, so each is
        written about once per 1 / share calls. Returns how many were written."""
        store = self.store
        if store._sweep_at >= len(store._sweep):
            if not store._deferred:
                return 0
            store._sweep, store._sweep_at = sorted(store._deferred), 0
        end = min(len(store._sweep), store._sweep_at + math.ceil(len(store._sweep) * share))
        if store.applier is not None:
            written = store.applier.write_held(self.txn, store._sweep, store._sweep_at, end)
        else:
            written = 0
            for key in store._sweep[store._sweep_at:end]:
                if key in store._deferred:
                    self._write_held(key)
                    written += 1
        store._sweep_at = end
        return written

    def flush_all_key_states(self) -> int:
        """Write every held key state to LMDB."""
        keys = sorted(self.store._deferred)
        for key in keys:
            self._write_held(key)
        return len(keys)

    def _write_held(self, key: bytes) -> None:
        store = self.store
        self.txn.put(key, store._states[key].encode(), db=store._keys)
        del store._deferred[key]
        store._flushing.add(key)

    def _write_held_through(self, lsn: int) -> None:
        """Write the held states that need binlog records up to `lsn` (about to be trimmed,
        or too many for a restart to replay)."""
        deferred = self.store._deferred
        while deferred:
            key, first = next(iter(deferred.items()))
            if first > lsn:
                return
            self._write_held(key)

    def latest(self, key: bytes) -> KeyState:
        """Store.latest in this transaction (always current), kept in memory if read."""
        store = self.store
        state = store._states.get(key)
        if state is None:
            state = KeyState.decode(self.txn.get(key, db=store._keys))
            store._keep(key, state)
        return state

    def abort(self) -> None:
        self.txn.abort()
        self.store.first_lsn = self._first_lsn
        self.store.last_lsn = self._last_lsn
        self.store.forget_states()

    def persist_quorum(self, records: list[tuple[Any, ...]]) -> None:
        """Make the version quorum's records durable with the rest of this transaction."""
        store, txn = self.store, self.txn
        for record in records:
            kind = record[0]
            if kind == "instance":
                _, key, version, promised, accepted_ballot, accepted_value, chosen = record
                txn.put(_prefix(key) + _U64BE.pack(version),
                        _paxos_encoder.encode([promised, accepted_ballot, accepted_value,
                                               chosen]), db=store._paxos)
            elif kind == "fence":
                txn.put(b"quorum/fence/" + bytes([record[1]]), _U64BE.pack(record[2]),
                        db=store._meta)
            elif kind in ("rebuilt", "verified"):
                txn.put(b"quorum/" + kind.encode(), _U64BE.pack(record[1]), db=store._meta)
            else:
                raise ValueError(f"record: unknown quorum record kind {kind!r}")

    def set_incarnation(self, incarnation: int) -> None:
        self.txn.put(b"quorum/incarnation", _U64BE.pack(incarnation), db=self.store._meta)

    def forget_instance(self, key: bytes, version: int) -> None:
        """The version was applied: its acceptor state is no longer kept."""
        self.txn.delete(_prefix(key) + _U64BE.pack(version), db=self.store._paxos)

    def install(self, item: SnapshotItem, installing: bool,
                repair: set[bytes] | frozenset[bytes] = frozenset()) -> bool:
        """Take one snapshot item (see Store.snapshot_page): a key newer than ours replaces
        ours whole (its rows follow it); op ids and clients we lack are added. `installing`:
        whether the key of a row item is being replaced; returns it for the next item.
        `repair`: keys an interrupted copy left half installed, replaced even by their own
        version (a version is the same data on every replica)."""
        store, txn = self.store, self.txn
        db, key, row, raw = item
        if db != 0:
            txn.put(key, raw, db=store._ops if db == 1 else store._clients, overwrite=False)
            return False
        prefix = _prefix(key)
        if row is not None:
            if installing:
                txn.put(prefix + row, raw, db=store._rows)
                txn.put(prefix + raw[:8][::-1] + row, b"", db=store._changes)
            return installing
        theirs = KeyState.decode(raw)
        ours = self.latest(key).version
        if theirs.version < ours or (theirs.version == ours and key not in repair):
            return False  # ours is as new: keep it
        for db_handle in (store._rows, store._changes):
            cursor = txn.cursor(db=db_handle)
            found = cursor.set_range(prefix)
            while found and cursor.key()[:len(prefix)] == prefix:
                found = cursor.delete()
        txn.put(key, raw, db=store._keys)
        store._deferred.pop(key, None)
        store._keep(key, theirs)
        return True

    def set_meta_u64s(self, name: bytes, *values: int) -> None:
        self.txn.put(name, struct.pack(f">{len(values)}Q", *values), db=self.store._meta)

    def set_meta(self, name: bytes, value: bytes | None) -> None:
        """Store `value` under `name` in meta (None: delete it)."""
        if value is None:
            self.txn.delete(name, db=self.store._meta)
        else:
            self.txn.put(name, value, db=self.store._meta)

    def trim_binlog_through(self, lsn: int, limit: int) -> int:
        """Drop binlog records up to `lsn` (every peer has them), at most `limit` of them."""
        store, trimmed = self.store, 0
        if store._deferred:
            # Records a held key state still needs stay (the size bound alone forces them out,
            # writing the state: see _write); writing held states here, as peers' cursors
            # move on, would write them one by one and undo the point of holding them.
            lsn = min(lsn, store.replay_from() - 1)
        while store.first_lsn <= min(lsn, store.last_lsn) and trimmed < limit:
            self.txn.delete(_U64BE.pack(store.first_lsn), db=store._binlog)
            store.first_lsn += 1
            trimmed += 1
        return trimmed

    def mutate(self, key: bytes, ops: list[Op], expected_version: int | None = None,
               client_id: int = 0, client_seq: int = 0) -> MutateReply:
        """Apply one atomic mutation of `key`, or raise a KvError having changed nothing."""
        op_tuples = [(op.kind, op.row, op.value) for op in ops]
        if client_id:
            remembered = self._remembered(key, op_tuples, client_id, client_seq)
            if remembered is not None:
                return remembered  # a retry: answer as the first time
        state = self.latest(key)
        if expected_version is not None and expected_version != state.version:
            raise VersionConflict(
                f"expected version {expected_version}, the key is at {state.version}",
                field="expected_version", version=state.version)
        return self._commit_mutation(key, state, op_tuples, client_id, client_seq)

    def apply_record(self, record: _core.Record) -> MutateReply:
        """Apply a binlog record taken from a peer's (or a replayed) binlog.

        The record must be the key's next version: records of one key apply in version order,
        which is what makes logical ops (incr, append) give the same result everywhere.
        """
        state = self.latest(record.key)
        if record.version != state.version + 1:
            raise ValueError(f"record of {record.key!r} at version {record.version}, "
                             f"the key is at {state.version}: out of order")
        return self._commit_mutation(record.key, state, record.ops, record.client_id,
                                     record.client_seq)

    def _commit_mutation(self, key: bytes, state: KeyState,
                         ops: list[tuple[int, bytes, bytes]], client_id: int,
                         client_seq: int) -> MutateReply:
        store = self.store
        try:
            if store.applier is not None:
                # A plain write (most of a replica's) takes the compiled path, which writes
                # exactly what the lines below would.
                fast = store.applier.apply(self.txn, key, state, ops, client_id, client_seq)
                if fast is not None:
                    if fast[1]:
                        _remember_client(store, self.txn, client_id, client_seq)
                    self.applied += 1
                    return fast[0]
        except lmdb.MapFullError:
            raise StorageFull("the node's LMDB map is full (storage.map_size_mib)") from None
        new_state, row_writes, results = _plan(state, ops)
        version = new_state.version
        reply = MutateReply(version, results)
        record = _core.encode_record(store.last_lsn + 1, version, client_id, client_seq,
                                     key, ops)
        try:
            self._write(key, new_state, row_writes, record, state.compacted_through)
            if client_id:
                self._remember(key, ops, client_id, client_seq, reply)
        except lmdb.MapFullError:
            raise StorageFull("the node's LMDB map is full (storage.map_size_mib)") from None
        self.applied += 1
        return reply

    def _write(self, key: bytes, state: KeyState, row_writes: dict[bytes, bytes | None],
               record: bytes, compacted_before: int) -> None:
        store, txn = self.store, self.txn
        if store.defers_key_states and state.version > 1 and not row_writes \
                and state.compacted_through == compacted_before \
                and (state.value is None or len(state.value) <= STATE_CACHE_VALUE_BYTES):
            # Held in memory (see Store): the binlog record below is what LMDB gets now.
            # (A key's first write goes through, so every held key is in the keys table.)
            store._keep(key, state)
            store._deferred.setdefault(key, store.last_lsn + 1)
        else:
            txn.put(key, state.encode(), db=store._keys)
            store._deferred.pop(key, None)
            store._keep(key, state)
        if state.compacted_through > compacted_before:
            self._drop_tombstones(key, compacted_before, state.compacted_through)
        if row_writes:
            prefix = _prefix(key)
            stamp = _U64BE.pack(state.version)
            for row, row_value in row_writes.items():
                row_key = prefix + row
                old = txn.get(row_key, db=store._rows)
                if old is None and row_value is None:
                    continue  # deleting a row that never existed leaves no tombstone
                if old is not None:
                    old_stamp = old[:8][::-1]  # little-endian u64 -> big-endian index order
                    txn.delete(prefix + old_stamp + row, db=store._changes)
                deleted = row_value is None
                txn.put(row_key, _ROW_META.pack(state.version, deleted) + (row_value or b""),
                        db=store._rows)
                txn.put(prefix + stamp + row, b"", db=store._changes)
        store.last_lsn += 1
        txn.put(_U64BE.pack(store.last_lsn), record, db=store._binlog, append=True)
        if store._deferred and store.last_lsn - store.deferred_max >= store.replay_from():
            self._write_held_through(store.last_lsn - store.deferred_max)
        # Bounded work per write; a lowered bound is reached over the following writes.
        trimmed = 0
        while (store.last_lsn - store.first_lsn + 1 > store.binlog_max_records
               and trimmed < BINLOG_TRIM_PER_WRITE):
            if store._deferred:
                self._write_held_through(store.first_lsn)
            txn.delete(_U64BE.pack(store.first_lsn), db=store._binlog)
            store.first_lsn += 1
            trimmed += 1

    def _drop_tombstones(self, key: bytes, after: int, through: int) -> None:
        """Delete the tombstones of `key` last changed in versions (after, through]."""
        store, txn = self.store, self.txn
        prefix = _prefix(key)
        end = prefix + _U64BE.pack(through + 1)
        cursor = txn.cursor(db=store._changes)
        doomed = []
        if cursor.set_range(prefix + _U64BE.pack(after + 1)):
            for index_key in cursor.iternext(keys=True, values=False):
                if index_key >= end:
                    break
                row_key = prefix + index_key[len(prefix) + 8:]
                raw = txn.get(row_key, db=store._rows)
                if raw is not None and raw[8]:  # a tombstone (live rows stay)
                    doomed.append((index_key, row_key))
        for index_key, row_key in doomed:
            txn.delete(index_key, db=store._changes)
            txn.delete(row_key, db=store._rows)

    def _remembered(self, key: bytes, ops: list[tuple[int, bytes, bytes]], client_id: int,
                    client_seq: int) -> MutateReply | None:
        return _remembered(self.store, self.txn, key, ops, client_id, client_seq)

    def _remember(self, key: bytes, ops: list[tuple[int, bytes, bytes]], client_id: int,
                  client_seq: int, reply: MutateReply) -> None:
        _remember(self.store, self.txn, key, ops, client_id, client_seq, reply)

    def forget_idle_clients(self, idle_s: float = CLIENT_IDLE_EXPIRY_S,
                            start: bytes = b"", limit: int = CLIENT_SWEEP_BATCH) -> bytes:
        """Drop clients silent for `idle_s` with their op ids, looking at `limit` clients from
        `start`; returns where the next sweep starts (b"" when it wrapped around)."""
        store, txn = self.store, self.txn
        cutoff = time.time() - idle_s
        cursor = txn.cursor(db=store._clients)
        if not cursor.set_range(start):
            return b""
        next_start = b""
        expired = []
        for seen, (client_key, raw) in enumerate(cursor):
            if seen == limit:
                next_start = bytes(client_key)
                break
            if _CLIENT.unpack(raw)[1] < cutoff:
                expired.append(bytes(client_key))
        for client_key in expired:
            txn.delete(client_key, db=store._clients)
            ops = txn.cursor(db=store._ops)
            if ops.set_range(client_key):
                while ops.key()[:8] == client_key:
                    if not ops.delete():
                        break
        return next_start


def _remembered(store: Store, txn: lmdb.Transaction, key: bytes,
                ops: list[tuple[int, bytes, bytes]], client_id: int,
                client_seq: int) -> MutateReply | None:
    """The first answer to this op id, if it was applied; raises if the id is unusable."""
    raw = txn.get(_OP_ID.pack(client_id, client_seq), db=store._ops)
    if raw is not None:
        digest, reply = _remembered_decoder.decode(raw)
        if digest != request_digest(key, ops):
            raise InvalidArgument(
                f"client_seq: operation id ({client_id}, {client_seq}) was already used "
                "for a different request; a client id must never be reused",
                field="client_seq")
        return reply
    client = txn.get(_U64BE.pack(client_id), db=store._clients)
    if client is not None and client_seq < _CLIENT.unpack(client)[0]:
        raise InvalidArgument(
            f"client_seq: operation ({client_id}, {client_seq}) is older than the "
            f"exactly-once window of {OPS_REMEMBERED_PER_CLIENT} operations; whether it "
            "was applied is unknown, so it is not applied now", field="client_seq")
    return None


def _remember(store: Store, txn: lmdb.Transaction, key: bytes,
              ops: list[tuple[int, bytes, bytes]], client_id: int, client_seq: int,
              reply: MutateReply) -> None:
    txn.put(_OP_ID.pack(client_id, client_seq),
            remembered_value(request_digest(key, ops), reply), db=store._ops)
    # The clients entry is written on a client's first write and at each trim step, so
    # most writes pay nothing for it; it says when the client was last active and below
    # which seq retries are refused (their answers were trimmed).
    if client_seq % OPS_TRIM_STEP and txn.get(_U64BE.pack(client_id), db=store._clients):
        return
    _remember_client(store, txn, client_id, client_seq)


def _remember_client(store: Store, txn: lmdb.Transaction, client_id: int,
                     client_seq: int) -> None:
    """Write the client's entry, dropping the op ids that fell out of its window."""
    client_key = _U64BE.pack(client_id)
    horizon = 0
    if client_seq > OPS_REMEMBERED_PER_CLIENT:
        horizon = client_seq - OPS_REMEMBERED_PER_CLIENT
        end = _OP_ID.pack(client_id, horizon)
        cursor = txn.cursor(db=store._ops)
        if cursor.set_range(_OP_ID.pack(client_id, 0)):
            while cursor.key() < end and cursor.key()[:8] == client_key:
                if not cursor.delete():
                    break
    txn.put(client_key, _CLIENT.pack(horizon, int(time.time())), db=store._clients)


__all__ = ["KeyState", "Store", "StoreLocked", "WriteBatch", "seq_of_row", "seq_row"]
