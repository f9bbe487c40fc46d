"""A store's write transaction (`WriteBatch`): mutations, binlog records taken from peers,
the quorum's records, snapshot items and meta, all in one LMDB transaction.

A mutation is checked in full before anything is written (kvsvr/store/planner.py), so a
rejected one changes nothing; its data, change index, binlog record and op id are written in
the caller's one transaction, which is how many client operations share one durable commit
(group commit).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

import lmdb

from kvsvr import _core
from kvsvr._core import PersistRecord
from kvsvr.errors import StorageFull, VersionConflict
from kvsvr.limits import (
    BINLOG_TRIM_PER_WRITE,
    CLIENT_IDLE_EXPIRY_S,
    CLIENT_SWEEP_BATCH,
    STATE_CACHE_VALUE_BYTES,
)
from kvsvr.protocol import MutateReply, Op
from kvsvr.store.layout import (
    ROW_DELETED,
    ROW_EXPIRING,
    U64BE,
    KeyState,
    Meta,
    encode_row,
    expiry_entry,
    key_prefix,
    row_expires_ms,
)
from kvsvr.store.planner import RowTimes, plan
from kvsvr.store.snapshots import SnapshotItem

if TYPE_CHECKING:
    from kvsvr.store.engine import Store


class WriteBatch:
    """One write transaction of `store` (Store.write or Store.begin make them). It moves the
    store's first_lsn and last_lsn as it writes; abort() steps them back."""

    def __init__(self, store: Store):
        self.store = store
        self.txn = store.env.begin(write=True)
        # The store's parts, never replaced for the store's life.
        self._tables = store.tables
        self._states = store.states
        self._op_ids = store.op_ids
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
        store, meta = self.store, self._tables.meta
        self._sealed = True
        if store.first_lsn > self._first_lsn:
            self.txn.put(Meta.LAST_LSN, U64BE.pack(store.last_lsn), db=meta)
        if store.defers_key_states:
            self.txn.put(Meta.KEYS_REPLAY_FROM, U64BE.pack(store.replay_from()), db=meta)

    def abort(self) -> None:
        self.txn.abort()
        self.store.first_lsn = self._first_lsn
        self.store.last_lsn = self._last_lsn
        self.store.forget_states()

    # --- held key states (see kvsvr/store/states.py) ---------------------------------------
    def flush_key_states(self, share: float) -> int:
        """Write the next `share` of the flush cycle's held key states to LMDB, in key order
        (neighbours share leaf pages); a cycle starts with the keys held then, so each is
        written about once per 1 / share calls. Returns how many were written."""
        states = self._states
        keys, start, end = states.next_sweep(share)
        if start >= end:
            return 0
        applier = self.store.applier
        if applier is not None:
            return applier.write_held(self.txn, keys, start, end)
        written = 0
        for key in keys[start:end]:
            if key in states.held:
                states.write_held(self.txn, key, self._tables.keys)
                written += 1
        return written

    def flush_all_key_states(self) -> int:
        """Write every held key state to LMDB."""
        states = self._states
        keys = sorted(states.held)
        for key in keys:
            states.write_held(self.txn, key, self._tables.keys)
        return len(keys)

    def latest(self, key: bytes) -> KeyState:
        """Store.latest in this transaction (always current), kept in memory if read."""
        states = self._states
        state = states.kept.get(key)
        if state is None:
            state = KeyState.decode(self.txn.get(key, db=self._tables.keys))
            states.keep(key, state)
        return state

    # --- the version quorum, snapshots, meta -----------------------------------------------
    def persist_quorum(self, records: Sequence[PersistRecord]) -> None:
        """Make the version quorum's records durable with the rest of this transaction."""
        self.store.quorum_state.persist(self.txn, records)

    def set_incarnation(self, incarnation: int) -> None:
        self.store.quorum_state.set_incarnation(self.txn, incarnation)

    def forget_instance(self, key: bytes, version: int) -> None:
        """The version was applied: its acceptor state is no longer kept."""
        self.store.quorum_state.forget_instance(self.txn, key, version)

    def install(self, item: SnapshotItem, installing: bool,
                repair: set[bytes] | frozenset[bytes] = frozenset()) -> bool:
        """Take one snapshot item (see Store.snapshot_page): a key newer than ours replaces
        ours whole (its rows follow it); op ids and clients we lack are added. `installing`:
        whether the key of a row item is being replaced; returns it for the next item.
        `repair`: keys an interrupted copy left half installed, replaced even by their own
        version (a version is the same data on every replica)."""
        return self.store.snapshots.install(self.txn, item, installing, repair, self.latest)

    def set_meta_u64s(self, name: bytes, *values: int) -> None:
        self.txn.put(name, struct.pack(f">{len(values)}Q", *values), db=self._tables.meta)

    def set_meta(self, name: bytes, value: bytes | None) -> None:
        """Store `value` under `name` in meta (None: delete it)."""
        if value is None:
            self.txn.delete(name, db=self._tables.meta)
        else:
            self.txn.put(name, value, db=self._tables.meta)

    def forget_idle_clients(self, idle_s: float = CLIENT_IDLE_EXPIRY_S,
                            start: bytes = b"", limit: int = CLIENT_SWEEP_BATCH) -> bytes:
        """Drop clients silent for `idle_s` with their op ids, looking at `limit` clients from
        `start`; returns where the next sweep starts (b"" when it wrapped around)."""
        return self._op_ids.forget_idle_clients(self.txn, idle_s, start, limit)

    # --- the binlog and mutations ----------------------------------------------------------
    def trim_binlog_through(self, lsn: int, limit: int) -> int:
        """Drop binlog records up to `lsn` (every peer has them), at most `limit` of them."""
        store, binlog, trimmed = self.store, self._tables.binlog, 0
        if self._states.held:
            # Records a held key state still needs stay (the size bound alone forces them out,
            # writing the state: see _write); writing held states here, as peers' cursors
            # move on, would write them one by one and undo the point of holding them.
            lsn = min(lsn, store.replay_from() - 1)
        while store.first_lsn <= min(lsn, store.last_lsn) and trimmed < limit:
            self.txn.delete(U64BE.pack(store.first_lsn), db=binlog)
            store.first_lsn += 1
            trimmed += 1
        return trimmed

    def mutate(self, key: bytes, ops: list[Op], expected_version: int | None = None,
               client_id: int = 0, client_seq: int = 0) -> MutateReply:
        """Apply one atomic mutation of `key`, or raise a KvError having changed nothing."""
        op_tuples = [(op.kind, op.row, op.value) for op in ops]
        if client_id:
            remembered = self._op_ids.remembered(self.txn, key, op_tuples, client_id,
                                                 client_seq)
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
                        self._op_ids.remember_client(self.txn, client_id, client_seq)
                    self.applied += 1
                    return fast[0]
        except lmdb.MapFullError:
            raise StorageFull("the node's LMDB map is full (storage.map_size_mib)") from None
        new_state, row_writes, results, row_times = plan(state, ops)
        version = new_state.version
        reply = MutateReply(version, results)
        record = _core.encode_record(store.last_lsn + 1, version, client_id, client_seq,
                                     key, ops)
        try:
            if new_state.expires_ms != state.expires_ms:
                self._move_expiry(key, b"", state.expires_ms, new_state.expires_ms)
            self._write(key, new_state, row_writes, record, state.compacted_through, row_times)
            if client_id:
                self._op_ids.remember(self.txn, key, ops, client_id, client_seq, reply)
        except lmdb.MapFullError:
            raise StorageFull("the node's LMDB map is full (storage.map_size_mib)") from None
        self.applied += 1
        return reply

    def _move_expiry(self, key: bytes, row: bytes, old_ms: int, new_ms: int) -> None:
        """Keep the expiry index in step: the entry of `key`'s value or row moves from
        `old_ms` to `new_ms` (0: none)."""
        txn, expiry = self.txn, self._tables.expiry
        if old_ms:
            txn.delete(expiry_entry(old_ms, key, row), db=expiry)
        if new_ms:
            txn.put(expiry_entry(new_ms, key, row), b"", db=expiry)

    # long: the key state, each row with its change index and expiry, the binlog and its bound
    def _write(self, key: bytes, state: KeyState, row_writes: dict[bytes, bytes | None],
               record: bytes, compacted_before: int, row_times: RowTimes | None) -> None:
        store, txn, tables, states = self.store, self.txn, self._tables, self._states
        if row_times is not None:
            self._purge_rows(key, state.version, row_times.purges)
        if store.defers_key_states and state.version > 1 and not row_writes \
                and row_times is None \
                and state.compacted_through == compacted_before \
                and (state.value is None or len(state.value) <= STATE_CACHE_VALUE_BYTES):
            # Held in memory (see Store): the binlog record below is what LMDB gets now.
            # (A key's first write goes through, so every held key is in the keys table.)
            states.keep(key, state)
            states.held.setdefault(key, store.last_lsn + 1)
        else:
            txn.put(key, state.encode(), db=tables.keys)
            states.held.pop(key, None)
            states.keep(key, state)
        if state.compacted_through > compacted_before:
            self._drop_tombstones(key, compacted_before, state.compacted_through)
        if row_writes:
            prefix = key_prefix(key)
            stamp = U64BE.pack(state.version)
            rows, changes = tables.rows, tables.changes
            expiry = row_times.expiry if row_times is not None else {}
            for row, row_value in row_writes.items():
                row_key = prefix + row
                old = txn.get(row_key, db=rows)
                if old is None and row_value is None:
                    continue  # deleting a row that never existed leaves no tombstone
                expires_ms = expiry.get(row, 0)
                if old is not None:
                    old_stamp = old[:8][::-1]  # little-endian u64 -> big-endian index order
                    txn.delete(prefix + old_stamp + row, db=changes)
                    if old[8] == ROW_EXPIRING or expires_ms:
                        self._move_expiry(key, row, row_expires_ms(old), expires_ms)
                elif expires_ms:
                    self._move_expiry(key, row, 0, expires_ms)
                txn.put(row_key, encode_row(state.version, row_value, expires_ms), db=rows)
                txn.put(prefix + stamp + row, b"", db=changes)
        store.last_lsn += 1
        txn.put(U64BE.pack(store.last_lsn), record, db=tables.binlog, append=True)
        if states.held and store.last_lsn - states.deferred_records_max \
                >= states.first_held_lsn(store.last_lsn + 1):
            states.write_held_through(txn, store.last_lsn - states.deferred_records_max,
                                      tables.keys)
        # Bounded work per write; a lowered bound is reached over the following writes.
        trimmed = 0
        while (store.last_lsn - store.first_lsn + 1 > store.binlog_max_records
               and trimmed < BINLOG_TRIM_PER_WRITE):
            if states.held:
                states.write_held_through(txn, store.first_lsn, tables.keys)
            txn.delete(U64BE.pack(store.first_lsn), db=tables.binlog)
            store.first_lsn += 1
            trimmed += 1

    def _purge_rows(self, key: bytes, version: int, purges: dict[bytes, int]) -> None:
        """Rows whose recorded instant is still at or before their purge's become tombstones
        at `version` (so changes() reports them); a row put again since is left alone."""
        txn, rows, changes = self.txn, self._tables.rows, self._tables.changes
        prefix = key_prefix(key)
        for row, instant in purges.items():
            old = txn.get(prefix + row, db=rows)
            if old is None or old[8] != ROW_EXPIRING or row_expires_ms(old) > instant:
                continue
            txn.delete(prefix + old[:8][::-1] + row, db=changes)
            self._move_expiry(key, row, row_expires_ms(old), 0)
            txn.put(prefix + row, encode_row(version, None), db=rows)
            txn.put(prefix + U64BE.pack(version) + row, b"", db=changes)

    def _drop_tombstones(self, key: bytes, after: int, through: int) -> None:
        """Delete the tombstones of `key` last changed in versions (after, through]."""
        txn, rows, changes = self.txn, self._tables.rows, self._tables.changes
        prefix = key_prefix(key)
        end = prefix + U64BE.pack(through + 1)
        cursor = txn.cursor(db=changes)
        doomed = []
        if cursor.set_range(prefix + U64BE.pack(after + 1)):
            for index_key in cursor.iternext(keys=True, values=False):
                if index_key >= end:
                    break
                row_key = prefix + index_key[len(prefix) + 8:]
                raw = txn.get(row_key, db=rows)
                if raw is not None and raw[8] == ROW_DELETED:  # (live rows stay)
                    doomed.append((index_key, row_key))
        for index_key, row_key in doomed:
            txn.delete(index_key, db=changes)
            txn.delete(row_key, db=rows)


__all__ = ["WriteBatch"]
