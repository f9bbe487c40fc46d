"""Snapshots: a consistent copy of a node's data, paged, installed into another store."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from kvsvr import _core
from kvsvr.protocol import Op
from kvsvr.store import KeyState, SnapshotItem, Store
from kvsvr.store.layout import OP_ID


def _fill(store: Store, seed: int, keys: int = 40) -> None:
    rng = random.Random(seed)
    seq = 0
    for _ in range(6):
        with store.write() as batch:
            for _ in range(60):
                key = f"k{rng.randrange(keys)}".encode()
                seq += 1
                kind = rng.choice(["put", "append", "row_put", "row_delete", "incr"])
                if kind == "put":
                    ops = [Op(_core.OP_PUT, b"", rng.randbytes(rng.randrange(1, 300)))]
                elif kind == "append":
                    ops = [Op(_core.OP_APPEND, b"", rng.randbytes(rng.randrange(1, 300)))]
                elif kind == "row_put":
                    ops = [Op(_core.OP_ROW_PUT, f"r{rng.randrange(9)}".encode(), b"v" * 50)]
                elif kind == "row_delete":
                    ops = [Op(_core.OP_ROW_DELETE, f"r{rng.randrange(9)}".encode())]
                else:
                    key = b"counter:" + key
                    ops = [Op(_core.OP_INCR, b"", (1).to_bytes(8, "little", signed=True))]
                batch.mutate(key, ops, None, 7, seq)


def _dump(store: Store) -> dict[str, list[tuple[bytes, bytes]]]:
    with store.read() as txn:
        return {name: [(bytes(k), bytes(v))
                       for k, v in txn.cursor(db=getattr(store.tables, name))]
                for name in ("keys", "rows", "changes", "ops", "clients")}


def _copy(source: Store, target: Store, max_bytes: int) -> int:
    pages = 0
    position = None
    installing = False
    with source.read() as txn:
        while True:
            items, position = source.snapshot_page(txn, position, max_bytes)
            pages += 1
            with target.write() as batch:
                for item in items:
                    installing = batch.install(item, installing)
            if position is None:
                return pages


def test_a_paged_snapshot_installed_into_an_empty_store_is_an_exact_copy(tmp_path: Path):
    """Pages as small as one item or as big as everything give the same, exact copy: keys,
    rows with tombstones, the change index, op ids and clients."""
    source = Store(tmp_path / "source", sync=False)
    _fill(source, 1)
    for max_bytes in (1, 700, 1 << 20):
        target = Store(tmp_path / f"target{max_bytes}", sync=False)
        pages = _copy(source, target, max_bytes)
        assert _dump(target) == _dump(source)
        if max_bytes == 1:
            assert pages > 100
        target.close()
    source.close()


def test_installing_keeps_what_is_newer_here_and_takes_what_is_newer_there(tmp_path: Path):
    """A key is replaced whole (rows too) only by a newer copy; older copies are ignored, and
    rows of a replaced key that the copy lacks are gone."""
    ahead = Store(tmp_path / "ahead", sync=False)
    behind = Store(tmp_path / "behind", sync=False)
    with behind.write() as batch:
        batch.mutate(b"a", [Op(_core.OP_ROW_PUT, b"stale-row", b"x")])
        for _ in range(5):
            batch.mutate(b"b", [Op(_core.OP_PUT, b"", b"behind-is-newer")])
    with ahead.write() as batch:
        batch.mutate(b"a", [Op(_core.OP_ROW_PUT, b"r1", b"1")])
        batch.mutate(b"a", [Op(_core.OP_ROW_PUT, b"r2", b"2")])
        batch.mutate(b"b", [Op(_core.OP_PUT, b"", b"older")])
    _copy(ahead, behind, 64)
    with behind.read() as txn:
        assert behind.get(txn, b"b").value == b"behind-is-newer"
        assert behind.key_state(txn, b"a").version == 2
        rows = [r.row for r in behind.scan(txn, b"a", b"", None, 100).rows]
        assert rows == [b"r1", b"r2"]
        changes = behind.changes(txn, b"a", 0, b"", 100).changes
        assert [c.row for c in changes] == [b"r1", b"r2"]
    ahead.close()
    behind.close()


def _page_through(store: Store, txn: Any, max_bytes: int,
                  held: dict[bytes, KeyState] | None) -> list[SnapshotItem]:
    items: list[SnapshotItem] = []
    position = None
    while True:
        page, position = store.snapshot_page(txn, position, max_bytes, held)
        items += page
        if position is None:
            return items


def test_a_held_key_state_is_copied_as_the_read_transaction_has_it(tmp_path: Path):
    """A replica's store holds key states in memory; a key written again in the open write
    transaction, after a copy's read transaction began, is copied as that transaction has it
    (version and value), matching the op ids and LSN the copy takes from it, in pages read
    while the write transaction is open and after it committed and wrote the held states."""
    store = Store(tmp_path / "replica", sync=False, defer_key_states=True)
    incr = [Op(_core.OP_INCR, b"", (5).to_bytes(8, "little", signed=True))]
    with store.write() as batch:
        batch.mutate(b"k", [Op(_core.OP_PUT, b"", b"first")], None, 7, 1)   # into LMDB
        batch.mutate(b"n", incr, None, 7, 2)
    with store.write() as batch:
        batch.mutate(b"k", [Op(_core.OP_PUT, b"", b"second")], None, 7, 3)  # held
        batch.mutate(b"n", incr, None, 7, 4)
    assert store.deferred_keys == 2
    txn = store.read()
    view = {key: store.key_state(txn, key) for key in (b"k", b"n")}
    assert view[b"k"] == KeyState(2, 0, b"second") and view[b"n"].version == 2
    lsn = store.snapshot_lsn(txn)
    held = store.snapshot_states(txn)
    assert held == view

    batch = store.begin()
    batch.mutate(b"k", [Op(_core.OP_PUT, b"", b"third")], None, 7, 5)   # held, newer
    batch.mutate(b"n", incr, None, 7, 6)
    assert store.cached_state(b"k") == KeyState(3, 0, b"third")

    def check(items: list[SnapshotItem]) -> None:
        keys = {item[1]: KeyState.decode(item[3]) for item in items
                if item[0] == 0 and item[2] is None}
        assert keys == view
        seqs = sorted(OP_ID.unpack(item[1])[1] for item in items if item[0] == 1)
        assert seqs == [1, 2, 3, 4]   # each key's version is its writes among these
        assert store.snapshot_lsn(txn) == lsn == 4

    for max_bytes in (1, 1 << 20):
        check(_page_through(store, txn, max_bytes, held))
        check(_page_through(store, txn, max_bytes, None))
    batch.flush_all_key_states()
    store.commit(batch)
    store.commit_seen()
    assert store.deferred_keys == 0   # now in the keys table, newer than the read's
    check(_page_through(store, txn, 1, held))
    check(_page_through(store, txn, 1, None))
    txn.abort()
    store.close()
