"""Snapshots: a consistent copy of a store, read in pages and installed into another one (a
replica that lost its disk, or fell behind a peer's trimmed binlog, copies a peer's).

A copy is a sequence of items (db, key, row, raw), read in one read transaction: db 0 the
keys, each key's own record (row None: its keys record) followed by its rows (rows records);
db 1 the op ids (ops records), db 2 the clients (clients records); raw is the record as the
table holds it (see layout); a key whose state was held back from the keys table is copied
as it was held as of that transaction (Store.snapshot_states). The binlog after the
transaction's last LSN is the tail to apply on top.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from kvsvr.store.layout import (
    ROW_EXPIRING,
    U64BE,
    KeyState,
    Meta,
    Tables,
    expiry_entry,
    key_prefix,
    row_expires_ms,
)
from kvsvr.store.states import KeyStates

SnapshotItem = tuple[int, bytes, bytes | None, bytes]      # db, key, row, raw
SnapshotPosition = tuple[int, bytes | None, bytes | None]  # db, key, row


class Snapshots:
    """Reads a store's copy in pages, and installs a copy's items into it."""

    __slots__ = ("_states", "_tables")

    def __init__(self, tables: Tables, states: KeyStates) -> None:
        self._tables = tables
        self._states = states

    def lsn(self, txn: Any) -> int:
        """The last LSN applied as of `txn`: a snapshot read in `txn` holds everything up to
        it, and the binlog after it is the tail to apply on top."""
        cursor = txn.cursor(db=self._tables.binlog)
        if cursor.last():
            return int(U64BE.unpack(cursor.key())[0])
        saved = txn.get(Meta.LAST_LSN, db=self._tables.meta)
        return int(U64BE.unpack(saved)[0]) if saved else 0

    def page(self, txn: Any, position: SnapshotPosition | None, max_bytes: int,
             held: dict[bytes, KeyState]) -> tuple[list[SnapshotItem], SnapshotPosition | None]:
        """Items strictly after `position` (None: from the start) up to about `max_bytes`,
        and the position of the last one, or None when the copy is complete; `held`: the key
        states held as of `txn` (Store.snapshot_states)."""
        items: list[SnapshotItem] = []
        size = 0
        for item in self._items(txn, position or (0, None, None), held):
            item_bytes = len(item[1]) + len(item[2] or b"") + len(item[3]) + 16
            if items and size + item_bytes > max_bytes:
                last = items[-1]
                return items, (last[0], last[1], last[2])
            items.append(item)
            size += item_bytes
        return items, None

    def _items(self, txn: Any, position: SnapshotPosition,
               held: dict[bytes, KeyState]) -> Iterator[SnapshotItem]:
        db, after_key, after_row = position
        tables = self._tables
        dbs = (tables.keys, tables.ops, tables.clients)
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
                if db == 0 and key in held:
                    # Held as of this view (its keys table entry is older): never the state
                    # in memory, which may be newer than the view the op ids come from.
                    yield (db, key, None, held[key].encode())
                else:
                    yield (db, key, None, bytes(cursor.value()))
                if db == 0:
                    yield from self._row_items(txn, key, None)
                found = cursor.next()
            db, after_key, after_row = db + 1, None, None

    def _row_items(self, txn: Any, key: bytes,
                   after_row: bytes | None) -> Iterator[SnapshotItem]:
        prefix = key_prefix(key)
        cursor = txn.cursor(db=self._tables.rows)
        found = cursor.set_range(prefix + (after_row or b""))
        if found and after_row is not None and cursor.key() == prefix + after_row:
            found = cursor.next()
        while found and cursor.key()[:len(prefix)] == prefix:
            yield (0, key, bytes(cursor.key()[len(prefix):]), bytes(cursor.value()))
            found = cursor.next()

    def install(self, txn: Any, item: SnapshotItem, installing: bool,
                repair: set[bytes] | frozenset[bytes],
                latest: Callable[[bytes], KeyState]) -> bool:
        """Take one item in `txn` (see WriteBatch.install); `latest` is the transaction's
        newest state of a key."""
        tables = self._tables
        db, key, row, raw = item
        if db != 0:
            txn.put(key, raw, db=tables.ops if db == 1 else tables.clients, overwrite=False)
            return False
        prefix = key_prefix(key)
        if row is not None:
            if installing:
                txn.put(prefix + row, raw, db=tables.rows)
                txn.put(prefix + raw[:8][::-1] + row, b"", db=tables.changes)
                if raw[8] == ROW_EXPIRING:
                    txn.put(expiry_entry(row_expires_ms(raw), key, row), b"", db=tables.expiry)
            return installing
        theirs = KeyState.decode(raw)
        ours = latest(key)
        if theirs.version < ours.version or (theirs.version == ours.version
                                             and key not in repair):
            return False  # ours is as new: keep it
        # Ours goes whole, with its entries in the expiry index; theirs come with the items.
        if ours.expires_ms:
            txn.delete(expiry_entry(ours.expires_ms, key, b""), db=tables.expiry)
        if theirs.expires_ms:
            txn.put(expiry_entry(theirs.expires_ms, key, b""), b"", db=tables.expiry)
        for db_handle in (tables.rows, tables.changes):
            cursor = txn.cursor(db=db_handle)
            found = cursor.set_range(prefix)
            while found and cursor.key()[:len(prefix)] == prefix:
                if db_handle is tables.rows and cursor.value()[8] == ROW_EXPIRING:
                    txn.delete(expiry_entry(row_expires_ms(cursor.value()), key,
                                            bytes(cursor.key()[len(prefix):])),
                               db=tables.expiry)
                found = cursor.delete()
        txn.put(key, raw, db=tables.keys)
        self._states.held.pop(key, None)
        self._states.keep(key, theirs)
        return True


__all__ = ["SnapshotItem", "SnapshotPosition", "Snapshots"]
