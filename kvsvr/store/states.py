"""The key states a store keeps in memory, and the ones it holds back from LMDB.

Kept: the newest state of recently written or looked-up keys, so a write need not descend
LMDB's B-tree to learn a key's version. Held (a replica's store, `defer_key_states`): a plain
write's new state stays here, and only its binlog record goes to LMDB at once; a rolling sweep
writes the held states a key range at a time, each about once per flush cycle, instead of
every checkpoint rewriting a random leaf page per written key. A restart (or an aborted
transaction) rebuilds the held states by replaying the binlog from the first record one of
them needs (meta's keys/replay_from), so the binlog is never trimmed past it; a snapshot
rebuilds the same way the states held as of its read transaction (`replay_into`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kvsvr import _core
from kvsvr.limits import (
    DEFERRED_RECORDS_MAX,
    STATE_CACHE_EVICT_SLICES,
    STATE_CACHE_KEYS,
    STATE_CACHE_VALUE_BYTES,
)
from kvsvr.store.layout import U64BE, KeyState, Table, Tables
from kvsvr.store.planner import plan


class KeyStates:
    """The state cache of one store. Its dict and set are never replaced, only changed and
    cleared: the compiled path (kvsvr._applier.Applier) holds them from its start."""

    __slots__ = ("_sweep", "_sweep_at", "deferred_records_max", "flushing", "held", "kept")

    def __init__(self) -> None:
        # The newest state of recently written or looked-up keys, oldest first.
        self.kept: dict[bytes, KeyState] = {}
        # The keys whose newest state is held (in `kept`, never evicted) -> the LSN of the
        # first binlog record LMDB's keys table lacks. A key enters at the end when its first
        # held write is applied, so LSNs ascend: the first entry is where a replay starts.
        self.held: dict[bytes, int] = {}
        # Held states written into a transaction whose commit the owner has not seen end:
        # still read from memory (a read transaction begun before the end sees the old one).
        self.flushing: set[bytes] = set()
        # Binlog records a restart may replay (read once: a test lowers the bound).
        self.deferred_records_max = DEFERRED_RECORDS_MAX
        self._sweep: list[bytes] = []   # the flush cycle under way: its keys in key order
        self._sweep_at = 0

    def held_or_flushing(self, key: bytes) -> bool:
        """Whether the key's newest state is to be read from memory, not LMDB."""
        return key in self.held or key in self.flushing

    def first_held_lsn(self, default: int) -> int:
        """The first binlog record a held state has that LMDB's keys table lacks (`default`
        when none is held)."""
        for lsn in self.held.values():
            return lsn
        return default

    def keep(self, key: bytes, state: KeyState) -> None:
        """Keep `state` as the key's newest, evicting the oldest kept ones past the bound."""
        states = self.kept
        if state.value is not None and len(state.value) > STATE_CACHE_VALUE_BYTES:
            states.pop(key, None)   # big values stay in LMDB only ...
            self.flushing.discard(key)   # ... so reads of the key go there, not to memory
            return
        states[key] = state
        if len(states) > STATE_CACHE_KEYS:
            # The oldest kept, a slice at a time, passing over held states (the only copy):
            # the scan goes on until the slice is full, so it runs once per slice of inserts
            # whatever the held ones' places (at most DEFERRED_RECORDS_MAX < STATE_CACHE_KEYS).
            held, doomed = self.held_or_flushing, []
            for old in states:
                if not held(old):
                    doomed.append(old)
                    if len(doomed) >= STATE_CACHE_KEYS // STATE_CACHE_EVICT_SLICES:
                        break
            for old in doomed:
                del states[old]

    def forget(self) -> None:
        """Drop everything (a write transaction was aborted: see Store.forget_states)."""
        self.kept.clear()
        self.flushing.clear()
        self.held.clear()
        self._sweep, self._sweep_at = [], 0

    def write_held(self, txn: Any, key: bytes, keys_table: Table) -> None:
        """Write the key's held state into `txn`'s keys table (read from memory until the
        owner saw that transaction's commit end)."""
        txn.put(key, self.kept[key].encode(), db=keys_table)
        del self.held[key]
        self.flushing.add(key)

    def write_held_through(self, txn: Any, lsn: int, keys_table: Table) -> None:
        """Write the held states that need binlog records up to `lsn` (about to be trimmed,
        or too many for a restart to replay)."""
        held = self.held
        while held:
            key, first = next(iter(held.items()))
            if first > lsn:
                return
            self.write_held(txn, key, keys_table)

    def next_sweep(self, share: float) -> tuple[list[bytes], int, int]:
        """The next `share` of the flush cycle, as (keys in key order, start, end): those of
        keys[start:end] still held are to be written. A cycle starts with the keys held
        then, so each is written about once per 1 / share calls."""
        if self._sweep_at >= len(self._sweep):
            if not self.held:
                return [], 0, 0
            self._sweep, self._sweep_at = sorted(self.held), 0
        sweep, start = self._sweep, self._sweep_at
        self._sweep_at = min(len(sweep), start + math.ceil(len(sweep) * share))
        return sweep, start, self._sweep_at

    def replay(self, txn: Any, tables: Tables, start: int, where: Path) -> None:
        """Rebuild the held states from the committed binlog records from `start` on, read
        in `txn` (`where` names the store in errors)."""
        replay_into(self.kept, self.held, txn, tables, start, where)


def replay_into(kept: dict[bytes, KeyState], held: dict[bytes, int], txn: Any,
                tables: Tables, start: int, where: Path) -> None:
    """Replay into `kept` the binlog records from `start` on, read in `txn`, that the keys
    table lacks: a key's state is taken from `kept`, else from `txn`'s keys table, and `held`
    gets the LSN of each replayed key's first such record. From meta's keys/replay_from in a
    committed `txn`, this rebuilds the states held as of that commit (`where` names the store
    in errors)."""
    cursor = txn.cursor(db=tables.binlog)
    found = cursor.set_range(U64BE.pack(start))
    while found:
        lsn = U64BE.unpack(cursor.key())[0]
        record = _core.decode_record(cursor.value())
        key = record.key
        state = kept.get(key)
        if state is None:
            state = KeyState.decode(txn.get(key, db=tables.keys))
        if record.version > state.version + 1 or (
                record.version == state.version + 1 and state.version == 0):
            raise RuntimeError(
                f"{where}: binlog lsn {lsn} has {key!r} v{record.version}, the "
                f"keys table v{state.version}: a held state is missing")
        if record.version == state.version + 1:
            new_state, row_writes, _, row_times = plan(state, record.ops)
            if row_writes or row_times is not None \
                    or new_state.compacted_through != state.compacted_through:
                raise RuntimeError(
                    f"{where}: binlog lsn {lsn} ({key!r} v{record.version}) "
                    "changes rows, yet the keys table does not have it")
            kept[key] = new_state
            held.setdefault(key, lsn)
        found = cursor.next()


__all__ = ["KeyStates", "replay_into"]
