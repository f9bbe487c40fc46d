"""Snapshots: a consistent copy of a node's data, paged, installed into another store."""

from __future__ import annotations

import random
from pathlib import Path

from kvsvr import _core
from kvsvr.protocol import Op
from kvsvr.store import Store


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
