"""The engine of one node's storage: `Store` opens the LMDB environment, reads, and hands
out write transactions (`WriteBatch`, kvsvr/store/batch.py)."""

from __future__ import annotations

import fcntl
import os
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb

from kvsvr import _core
from kvsvr._applier import Applier
from kvsvr._core import PersistRecord
from kvsvr.errors import Compacted, NotFound, StorageFull
from kvsvr.limits import (
    BINLOG_READ_RECORDS_DEFAULT,
    BINLOG_RECORDS_MAX,
    DISK_FULL_BELOW_BYTES,
    LMDB_READERS_MAX,
    PAGE_BYTES_MAX,
    SCAN_ENTRIES_VISITED_MAX,
    STORE_MAP_SIZE_MIB_DEFAULT,
)
from kvsvr.protocol import (
    Change,
    ChangesPage,
    KeysPage,
    MutateReply,
    Op,
    Row,
    RowValue,
    ScanPage,
    Versioned,
)
from kvsvr.store.batch import WriteBatch
from kvsvr.store.exactly_once import OpIds
from kvsvr.store.layout import (
    KEY_EXPIRES,
    KEY_STATE,
    KEY_STATE_HAS_VALUE_OFFSET,
    ROW_DELETED,
    ROW_EXPIRING,
    ROW_LIVE,
    ROW_META,
    SCHEMA,
    SCHEMA_UPGRADABLE,
    SCHEMA_VERSION,
    U64BE,
    U64LE,
    KeyState,
    Meta,
    Tables,
    key_prefix,
    row_expires_ms,
    row_value,
    split_expiry_entry,
)
from kvsvr.store.quorum import QuorumState
from kvsvr.store.snapshots import SnapshotItem, SnapshotPosition, Snapshots
from kvsvr.store.states import KeyStates, replay_into


def now_ms() -> int:
    """This node's wall clock in unix milliseconds: what expiry instants are compared with."""
    return int(time.time() * 1000)


def _live_row(cursor: Any, prefix: bytes, now: int) -> tuple[bool, int]:
    """Whether the key of `prefix` has a live row (a `rows` cursor), and how many rows were
    looked at to tell (tombstones and expired rows are passed over)."""
    looked = 0
    found = cursor.set_range(prefix)
    while found and cursor.key()[:len(prefix)] == prefix:
        looked += 1
        raw = cursor.value()
        if raw[8] == ROW_LIVE or (raw[8] == ROW_EXPIRING and row_expires_ms(raw) > now):
            return True, looked
        found = cursor.next()
    return False, looked


class StoreLocked(RuntimeError):
    """Another process already serves this data directory."""


class Store:
    """One node's storage in one LMDB environment, owned by one process. Its parts:
    `tables` (the LMDB handles), `states` (the key-state cache), `op_ids`, `quorum_state`,
    `snapshots`, and `applier` (the compiled path of plain writes, None unless it holds key
    states); `first_lsn` and `last_lsn` bound its binlog as the open transaction sees it."""

    def __init__(self, path: str | Path, *, map_size_mib: int = STORE_MAP_SIZE_MIB_DEFAULT,
                 sync: bool = True, binlog_max_records: int = BINLOG_RECORDS_MAX,
                 defer_meta_sync: bool = False, defer_key_states: bool = False):
        """`defer_meta_sync` (a replica, whose vote log holds what a lost commit had): each
        commit fsyncs its pages but not its meta page, which the next commit's fsync (or
        sync()) makes durable; the `durable_*` LSNs follow one commit behind. This is LMDB's
        MDB_NOMETASYNC: a power cut may undo the last commit but never corrupts the file.
        It saves one of the two fsyncs of every commit.

        `defer_key_states` (a replica): a write that changes no row leaves the key's new
        state in memory, and a rolling sweep (WriteBatch.flush_key_states) writes the held
        states a key range at a time (see kvsvr/store/states.py): most of what a checkpoint
        wrote was key states, one random leaf page per written key. The binlog records are
        committed as before; a restart (or an aborted transaction) replays them from
        `keys/replay_from`, the first record a held state has that LMDB lacks, and the binlog
        is never trimmed past it. Only keys already in LMDB are held (their first write goes
        through), so a snapshot read sees every key and swaps in the state held as of its
        read (see snapshot_states)."""
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
            str(self.path), map_size=map_size_mib << 20, max_dbs=len(Tables.NAMES), sync=sync,
            metasync=sync and not defer_meta_sync, readahead=False,
            max_readers=LMDB_READERS_MAX,
        )
        if self.defers_meta_sync:
            # What the last run committed may still be in the page cache only (a killed
            # process leaves it there): durable before anything is said about it.
            self.env.sync(True)
        self.tables = Tables(self.env)
        self.first_lsn, self.last_lsn = self._open_schema_and_binlog()
        # What readers outside the write transaction see (pulls, snapshots): first_lsn and
        # last_lsn run ahead while a transaction kept open across rounds is not committed.
        self.durable_first_lsn, self.durable_last_lsn = self.first_lsn, self.last_lsn
        # With defer_meta_sync: the LSNs of the last commit, durable from the next one on.
        self._undurable: tuple[int, int] | None = None
        self.defers_key_states = defer_key_states
        self.states = KeyStates()
        self.op_ids = OpIds(self.tables)
        self.quorum_state = QuorumState(self.tables)
        self.snapshots = Snapshots(self.tables, self.states)
        # Plain writes' compiled path (see WriteBatch.mutate): only held states make it pay.
        self.applier: Applier | None = Applier(self) if defer_key_states else None
        self._replay_held()
        if self.states.held and not defer_key_states:
            # Held by a replica that ran on this directory: written out now, and the marker
            # dropped (this store trims its binlog without regard to it).
            with self.write() as batch:
                batch.flush_all_key_states()
                batch.set_meta(Meta.KEYS_REPLAY_FROM, None)

    def _open_schema_and_binlog(self) -> tuple[int, int]:
        """Mark a new store with SCHEMA_VERSION (refuse another's); the binlog's first and
        last LSN."""
        meta = self.tables.meta
        with self.env.begin(write=True) as txn:
            schema = txn.get(Meta.SCHEMA, db=meta)
            if schema is None or SCHEMA.unpack(schema)[0] in SCHEMA_UPGRADABLE:
                # New, or of a version this one only adds to: version 2 lacks the expiry
                # table, made (empty: nothing expires in it) when the tables were opened.
                txn.put(Meta.SCHEMA, SCHEMA.pack(SCHEMA_VERSION), db=meta)
            elif SCHEMA.unpack(schema)[0] != SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: schema {SCHEMA.unpack(schema)[0]}, "
                                   f"this build reads {SCHEMA_VERSION}")
            cursor = txn.cursor(db=self.tables.binlog)
            first_lsn = U64BE.unpack(cursor.key())[0] if cursor.first() else 1
            last_lsn = U64BE.unpack(cursor.key())[0] if cursor.last() else 0
            if last_lsn == 0:
                # An empty binlog continues after the last LSN ever used, not at 1.
                saved = txn.get(Meta.LAST_LSN, db=meta)
                last_lsn = U64BE.unpack(saved)[0] if saved else 0
                first_lsn = last_lsn + 1
        return first_lsn, last_lsn

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

    # --- key states (see kvsvr/store/states.py) ------------------------------------------
    def key_state(self, txn: lmdb.Transaction, key: bytes) -> KeyState:
        states = self.states
        if states.held_or_flushing(key):
            return states.kept[key]
        return KeyState.decode(txn.get(key, db=self.tables.keys))

    def latest(self, txn: lmdb.Transaction, key: bytes) -> KeyState:
        """The key's newest state, written by this store's open or committing transaction or
        before: from memory when it is kept there (an LMDB lookup costs a B-tree descent),
        else read in `txn`, which must then be current for the key. Never modify it."""
        state = self.states.kept.get(key)
        return KeyState.decode(txn.get(key, db=self.tables.keys)) if state is None else state

    @property
    def kept_states(self) -> dict[bytes, KeyState]:
        """The key states kept in memory (see latest), by key: to be read, never changed."""
        return self.states.kept

    def cached_state(self, key: bytes) -> KeyState | None:
        """The key's newest state if it is kept in memory (see latest), else None."""
        return self.states.kept.get(key)

    def commit_seen(self) -> None:
        """The owner saw the last commit end: held states it wrote are readable in LMDB."""
        self.states.flushing.clear()

    @property
    def deferred_keys(self) -> int:
        """Keys whose newest state is held in memory, not yet in LMDB's keys table."""
        return len(self.states.held)

    def replay_from(self) -> int:
        """The first binlog record a held key state has that LMDB's keys table lacks."""
        return self.states.first_held_lsn(self.last_lsn + 1)

    def forget_states(self) -> None:
        """A write transaction was aborted: what it wrote never happened (held key states
        are rebuilt from what was committed)."""
        self.states.forget()
        self._replay_held()

    def _replay_held(self) -> None:
        """Rebuild the held key states from the committed binlog (at open, and after an
        aborted transaction dropped what memory had)."""
        with self.env.begin() as txn:
            start = self._replay_start(txn, self.first_lsn, self.last_lsn)
            if start is not None:
                self.states.replay(txn, self.tables, start, self.path)

    def _replay_start(self, txn: lmdb.Transaction, first_lsn: int, last_lsn: int) -> int | None:
        """Where the key states held as of `txn` (a committed one, whose binlog spans
        `first_lsn` to `last_lsn`) are replayed from: its keys/replay_from, None when it
        holds none."""
        raw = txn.get(Meta.KEYS_REPLAY_FROM, db=self.tables.meta)
        start = U64BE.unpack(raw)[0] if raw else last_lsn + 1
        if start > last_lsn:
            return None
        if start < first_lsn:
            raise RuntimeError(
                f"{self.path}: the binlog starts at lsn {first_lsn}, but key states "
                f"held in memory at the last commit need it from lsn {start}")
        return int(start)

    # --- reads -----------------------------------------------------------------------------
    def read(self) -> lmdb.Transaction:
        return self.env.begin()

    def get(self, txn: lmdb.Transaction, key: bytes) -> Versioned:
        """The key's value; NotFound if it holds none, or the value expired by this node's
        clock."""
        states = self.states
        if states.held_or_flushing(key):
            state = states.kept[key]
            if state.value is None or (state.expires_ms and state.expires_ms <= now_ms()):
                raise NotFound("key holds no value", field="key", version=state.version)
            return Versioned(state.version, state.value)
        raw = txn.get(key, db=self.tables.keys)
        if raw is None or not raw[KEY_STATE_HAS_VALUE_OFFSET]:
            version = KEY_STATE.unpack_from(raw)[0] if raw is not None else 0
            raise NotFound("key holds no value", field="key", version=version)
        if raw[KEY_STATE_HAS_VALUE_OFFSET] & KEY_EXPIRES:
            if U64LE.unpack_from(raw, KEY_STATE.size)[0] <= now_ms():
                raise NotFound("key holds no value", field="key",
                               version=KEY_STATE.unpack_from(raw)[0])
            return Versioned(KEY_STATE.unpack_from(raw)[0], raw[KEY_STATE.size + 8:])
        return Versioned(KEY_STATE.unpack_from(raw)[0], raw[KEY_STATE.size:])

    def row_get(self, txn: lmdb.Transaction, key: bytes, row: bytes) -> RowValue:
        state = self.key_state(txn, key)
        raw = txn.get(key_prefix(key) + row, db=self.tables.rows)
        if raw is None or raw[8] == ROW_DELETED \
                or (raw[8] == ROW_EXPIRING and row_expires_ms(raw) <= now_ms()):
            raise NotFound("row holds no value", field="row", version=state.version)
        return RowValue(state.version, ROW_META.unpack_from(raw)[0], row_value(raw))

    def scan(self, txn: lmdb.Transaction, key: bytes, start: bytes, end: bytes | None,
             limit: int) -> ScanPage:
        prefix = key_prefix(key)
        stop = prefix + end if end is not None else None
        rows: list[Row] = []
        next_start = None
        visited = 0
        size = 0
        now = now_ms()
        cursor = txn.cursor(db=self.tables.rows)
        if cursor.set_range(prefix + start):
            for raw_key, raw in cursor:
                if not raw_key.startswith(prefix) or (stop is not None and raw_key >= stop):
                    break
                row = raw_key[len(prefix):]
                if (len(rows) == limit or visited == SCAN_ENTRIES_VISITED_MAX
                        or size > PAGE_BYTES_MAX):
                    next_start = row  # more remain: continue from here
                    break
                visited += 1
                state = raw[8]
                if state == ROW_LIVE or (state == ROW_EXPIRING and row_expires_ms(raw) > now):
                    rows.append(Row(row, ROW_META.unpack_from(raw)[0], row_value(raw)))
                    size += len(raw_key) + len(raw)
        return ScanPage(self.key_state(txn, key).version, rows, next_start)

    def list_keys(self, txn: lmdb.Transaction, prefix: bytes, after: bytes | None,
                  limit: int) -> KeysPage:
        """Keys starting with `prefix`, after `after`, that hold a value or a live row (not
        expired by this node's clock), in key order, at most `limit`; `next_after` is where
        to go on (the last key looked at) while some may remain. Bounded work: at most
        SCAN_ENTRIES_VISITED_MAX keys and rows are looked at."""
        now = now_ms()
        start = prefix if after is None or after < prefix else after + b"\x00"
        keys: list[bytes] = []
        visited = 0
        last = None
        cursor = txn.cursor(db=self.tables.keys)
        rows = txn.cursor(db=self.tables.rows)
        found = cursor.set_range(start)
        while found:
            key = cursor.key()
            if not key.startswith(prefix):
                return KeysPage(keys, None)
            if len(keys) == limit or visited >= SCAN_ENTRIES_VISITED_MAX:
                return KeysPage(keys, last)
            state = self.key_state(txn, key)
            visited += 1
            if state.value is not None and (not state.expires_ms or state.expires_ms > now):
                keys.append(key)
            else:
                live, looked = _live_row(rows, key_prefix(key), now)
                visited += looked
                if live:
                    keys.append(key)
            last = key
            found = cursor.next()
        return KeysPage(keys, None)

    def changes(self, txn: lmdb.Transaction, key: bytes, since_version: int, after_row: bytes,
                limit: int) -> ChangesPage:
        """Rows changed after (since_version, after_row), tombstones included, version order.

        From 0 (a full sync) always; from below the key's compaction horizon never, as the
        deletions in between are gone: that raises Compacted, and the caller resyncs from 0.
        """
        prefix = key_prefix(key)
        if since_version:
            state = self.key_state(txn, key)
            if since_version < state.compacted_through:
                raise Compacted(
                    f"since_version: {since_version} is before the compaction horizon "
                    f"{state.compacted_through}; resync from version 0",
                    field="since_version", version=state.compacted_through)
        if after_row:
            start = prefix + U64BE.pack(since_version) + after_row + b"\x00"
        elif since_version >= 2**64 - 1:
            return ChangesPage(self.key_state(txn, key).version, [], None)
        else:
            start = prefix + U64BE.pack(since_version + 1)
        changes: list[Change] = []
        resume = None
        size = 0
        now = now_ms()
        rows = self.tables.rows
        cursor = txn.cursor(db=self.tables.changes)
        if cursor.set_range(start):
            for index_key in cursor.iternext(keys=True, values=False):
                if not index_key.startswith(prefix):
                    break
                version = U64BE.unpack_from(index_key, len(prefix))[0]
                row = index_key[len(prefix) + 8:]
                if len(changes) == limit or size > PAGE_BYTES_MAX:
                    last = changes[-1]
                    resume = (last.version, last.row)
                    break
                raw = txn.get(prefix + row, db=rows)
                assert raw is not None and ROW_META.unpack_from(raw)[0] == version, \
                    "change index out of step with rows"
                if raw[8] == ROW_EXPIRING and row_expires_ms(raw) <= now:
                    changes.append(Change(row, version, True, b""))   # expired: as deleted
                else:
                    changes.append(Change(row, version, raw[8] == ROW_DELETED, row_value(raw)))
                size += len(index_key) + len(raw)
        return ChangesPage(self.key_state(txn, key).version, changes, resume)

    def binlog(self, from_lsn: int = 0,
               limit: int = BINLOG_READ_RECORDS_DEFAULT) -> list[_core.Record]:
        """Decoded binlog records from `from_lsn` (verifies each checksum)."""
        records = []
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.tables.binlog)
            if cursor.set_range(U64BE.pack(from_lsn)):
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
            cursor = txn.cursor(db=self.tables.binlog)
            if cursor.set_key(U64BE.pack(max(from_lsn, 1))):
                for raw in cursor.iternext(keys=False, values=True):
                    if records and size + len(raw) > max_bytes:
                        break
                    records.append(raw)
                    size += len(raw)
                    if len(records) == max_records:
                        break
        return records

    def expiring(self, txn: lmdb.Transaction, through_ms: int,
                 limit: int) -> list[tuple[int, bytes, bytes]]:
        """Entries of the expiry index due at or before `through_ms`, in instant order, at
        most `limit`: (expires_ms, key, row), row empty for the key's value."""
        entries: list[tuple[int, bytes, bytes]] = []
        cursor = txn.cursor(db=self.tables.expiry)
        if cursor.first():
            for entry in cursor.iternext(keys=True, values=False):
                due = split_expiry_entry(entry)
                if due[0] > through_ms or len(entries) == limit:
                    break
                entries.append(due)
        return entries

    def remembered(self, txn: lmdb.Transaction, key: bytes, ops: list[Op], client_id: int,
                   client_seq: int) -> MutateReply | None:
        """The first answer to this op id if it was applied (see WriteBatch.mutate)."""
        return self.op_ids.remembered(txn, key, [(op.kind, op.row, op.value) for op in ops],
                                      client_id, client_seq)

    # --- snapshots (see kvsvr/store/snapshots.py) --------------------------------------------
    def snapshot_lsn(self, txn: lmdb.Transaction) -> int:
        """The last LSN applied as of `txn`: a snapshot read in `txn` holds everything up to
        it, and the binlog after it is the tail to apply on top."""
        return self.snapshots.lsn(txn)

    def snapshot_states(self, txn: lmdb.Transaction) -> dict[bytes, KeyState]:
        """The key states held as of `txn`, a read transaction, by key (any other key's state
        is `txn`'s keys table entry): what a restart from `txn`'s commit would rebuild. A
        snapshot copies these, never the held states in memory: those may be newer than
        `txn` (a later commit, or the open write transaction), and the copy's op ids and LSN
        are `txn`'s, so its reader would skip the newer write's record and never learn its
        op id. At most DEFERRED_RECORDS_MAX records are replayed."""
        last_lsn = self.snapshots.lsn(txn)
        cursor = txn.cursor(db=self.tables.binlog)
        first_lsn = U64BE.unpack(cursor.key())[0] if cursor.first() else last_lsn + 1
        held: dict[bytes, KeyState] = {}
        start = self._replay_start(txn, first_lsn, last_lsn)
        if start is not None:
            replay_into(held, {}, txn, self.tables, start, self.path)
        return held

    def snapshot_page(self, txn: lmdb.Transaction, position: SnapshotPosition | None,
                      max_bytes: int, held: dict[bytes, KeyState] | None = None,
                      ) -> tuple[list[SnapshotItem], SnapshotPosition | None]:
        """One page of a consistent copy read in `txn`: items strictly after `position`
        (None: from the start), and the position of the last one, or None when the copy is
        complete. An item is (db, key, row, raw): db 0 the keys, each followed by its rows
        (row None: the key's own record), db 1 the op ids, db 2 the clients. `held`:
        snapshot_states(txn), which a copy read in pages rebuilds once (None: rebuilt for
        this page)."""
        if held is None:
            held = self.snapshot_states(txn)
        return self.snapshots.page(txn, position, max_bytes, held)

    # --- meta and the version quorum's state -----------------------------------------------
    def meta_u64s(self, prefix: bytes) -> dict[bytes, tuple[int, ...]]:
        """Meta entries under `prefix` (name suffix -> the u64s stored)."""
        return {name: struct.unpack(f">{len(raw) // 8}Q", raw)
                for name, raw in self.meta_raw(prefix).items()}

    def meta_raw(self, prefix: bytes) -> dict[bytes, bytes]:
        """Meta entries under `prefix` (name suffix -> the bytes stored)."""
        out: dict[bytes, bytes] = {}
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.tables.meta)
            if cursor.set_range(prefix):
                for name, raw in cursor:
                    if not name.startswith(prefix):
                        break
                    out[bytes(name[len(prefix):])] = bytes(raw)
        return out

    def quorum_records(self) -> list[PersistRecord]:
        """Every persisted record of the version quorum, in the form QuorumReplica.restore
        takes (see _quorum.pxi)."""
        with self.env.begin() as txn:
            return self.quorum_state.records(txn)

    @property
    def incarnation(self) -> int:
        """This node's life: 0 until a quorum member first sets it."""
        with self.env.begin() as txn:
            return self.quorum_state.incarnation(txn)

    def stats(self) -> dict[str, Any]:
        tables = self.tables
        with self.env.begin() as txn:
            info = self.env.info()
            return {
                "keys": txn.stat(tables.keys)["entries"],
                "keys_deferred": len(self.states.held),
                "rows": txn.stat(tables.rows)["entries"],
                "expiring": txn.stat(tables.expiry)["entries"],
                "binlog_first_lsn": self.first_lsn,
                "binlog_last_lsn": self.last_lsn,
                # What a power cut cannot undo (what peers may pull): behind last_lsn while a
                # write transaction is open, and by one commit with defer_meta_sync.
                "binlog_durable_last_lsn": self.durable_last_lsn,
                "remembered_op_ids": txn.stat(tables.ops)["entries"],
                "clients": txn.stat(tables.clients)["entries"],
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


__all__ = ["Store", "StoreLocked"]
