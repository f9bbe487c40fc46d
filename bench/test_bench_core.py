"""Micro-benchmarks: the Cython codecs, and the store's get/put/append against raw py-lmdb
doing the same LMDB work in the same run (the ratio is the engine's overhead).

Run: bash tools/bench   (or: .venv/bin/python -m pytest bench/test_bench_core.py)
"""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import lmdb
import pytest

from kvsvr import _core, protocol
from kvsvr.store import Store

VALUE = b"v" * 100
KEYS = [f"user:{i}:profile".encode() for i in range(10_000)]
OPS = [(_core.OP_ROW_PUT, b"row-1", VALUE)]
RECORD = _core.encode_record(1, 2, 3, 4, KEYS[0], OPS)
BATCH = 32  # puts per durable commit: the load generator's concurrency


@pytest.mark.benchmark(group="record codec")
def test_encode_record(timed):
    timed(_core.encode_record, 1, 2, 3, 4, KEYS[0], OPS)


@pytest.mark.benchmark(group="record codec")
def test_decode_record(timed):
    timed(_core.decode_record, RECORD)


@pytest.mark.benchmark(group="record codec")
def test_struct_pack_baseline(timed):
    layout = struct.Struct("<QIHHQQQQII")
    timed(lambda: layout.pack(0, 1, 1, 1, 1, 2, 3, 4, 5, 6) + KEYS[0] + b"\0" * 9 + b"row-1"
          + VALUE)


FRAME = _core.encode_frame(1, 10, 7, 0, protocol.encode(protocol.GetRequest(KEYS[0])))
MESSAGE = FRAME * 32


@pytest.mark.benchmark(group="frame codec")
def test_encode_frame(timed):
    timed(_core.encode_frame, 1, 10, 7, 0, b"x" * 40)


@pytest.mark.benchmark(group="frame codec")
def test_decode_32_frames(timed):
    timed(_core.decode_frames, MESSAGE)


# A replicated write's quorum messages, 16 to a frame as under load: the binary layout the
# nodes send (decoded and checked in the core) against msgpack with the same checks.
QUORUM = [_core.Message(_core.MSG_ACCEPT, 0, 1, 1, KEYS[i], 5, 300, 0,
                        _core.encode_record(0, 5, 9, i, KEYS[i], [(_core.OP_PUT, b"", VALUE)]))
          for i in range(16)]
QUORUM_MSGPACK = protocol.encode([[m.kind, m.source, m.target, m.incarnation, m.key, m.version,
                                   m.ballot, m.accepted_ballot, m.value] for m in QUORUM])


@pytest.mark.benchmark(group="quorum codec")
def test_decode_16_quorum_messages(timed):
    body = protocol.encode_quorum(QUORUM)
    assert body[0] == _core.QWIRE_MAGIC
    timed(protocol.decode_quorum, body)


@pytest.mark.benchmark(group="quorum codec")
def test_decode_16_quorum_messages_msgpack_baseline(timed):
    timed(protocol.decode_quorum, QUORUM_MSGPACK)


@pytest.mark.benchmark(group="quorum codec")
def test_encode_16_quorum_messages(timed):
    timed(protocol.encode_quorum, QUORUM)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    s = Store(tmp_path_factory.mktemp("store"), map_size_mib=1024, sync=True)
    with s.write() as batch:
        for key in KEYS:
            batch.mutate(key, [protocol.put_op(VALUE)])
    yield s
    s.close()


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory):
    env = lmdb.open(str(tmp_path_factory.mktemp("raw")), map_size=1 << 30, sync=True)
    with env.begin(write=True) as txn:
        for key in KEYS:
            txn.put(key, VALUE)
    yield env
    env.close()


@pytest.mark.benchmark(group="get")
def test_store_get(timed, store):
    keys = itertools.cycle(KEYS)

    def get():
        with store.read() as txn:
            return store.get(txn, next(keys))
    timed(get)


@pytest.mark.benchmark(group="get")
def test_raw_lmdb_get_baseline(timed, raw):
    keys = itertools.cycle(KEYS)

    def get():
        with raw.begin() as txn:
            return txn.get(next(keys))
    timed(get)


@pytest.mark.benchmark(group="put x32 fsync")
def test_store_put_32_per_commit(timed, store):
    keys = itertools.cycle(KEYS)
    seq = itertools.count(1)

    def put():
        with store.write() as batch:
            for _ in range(BATCH):
                batch.mutate(next(keys), [protocol.put_op(VALUE)], None, 99, next(seq))
    timed(put)


@pytest.mark.benchmark(group="put x32 fsync")
def test_store_append_32_per_commit(timed, store):
    seq = itertools.count(1)
    inboxes = itertools.cycle(KEYS[:100])

    def append():
        with store.write() as batch:
            for _ in range(BATCH):
                batch.mutate(next(inboxes), [protocol.append_op(VALUE)], None, 98, next(seq))
    timed(append)


@pytest.mark.benchmark(group="put x32 fsync")
def test_raw_lmdb_put_32_per_commit_baseline(timed, raw):
    keys = itertools.cycle(KEYS)

    def put():
        with raw.begin(write=True) as txn:
            for _ in range(BATCH):
                txn.put(next(keys), VALUE)
    timed(put)


def _replica_store(path: Path, compiled: bool) -> Store:
    """A replica's store (key states held in memory), its keys written once, sync off: the
    group measures the write path's CPU, not the disk."""
    s = Store(path, map_size_mib=1024, sync=False, defer_key_states=True)
    if not compiled:
        s.applier = None
    with s.write() as batch:
        for key in KEYS:
            batch.mutate(key, [protocol.put_op(VALUE)])
    return s


@pytest.fixture(scope="module")
def replica_compiled(tmp_path_factory: pytest.TempPathFactory):
    s = _replica_store(tmp_path_factory.mktemp("replica-compiled"), True)
    yield s
    s.close()


@pytest.fixture(scope="module")
def replica_general(tmp_path_factory: pytest.TempPathFactory):
    s = _replica_store(tmp_path_factory.mktemp("replica-general"), False)
    yield s
    s.close()


def _replica_puts(store: Store, client: int):
    keys = itertools.cycle(KEYS)
    seq = itertools.count(1)

    def put():
        with store.write() as batch:
            for _ in range(BATCH):
                batch.mutate(next(keys), [protocol.put_op(VALUE)], None, client, next(seq))
    return put


@pytest.mark.benchmark(group="replica put x32")
def test_replica_put_32_compiled(timed, replica_compiled):
    """A replica's plain puts on held keys: kvsvr/_applier.pyx."""
    timed(_replica_puts(replica_compiled, 97))


@pytest.mark.benchmark(group="replica put x32")
def test_replica_put_32_python(timed, replica_general):
    """The same puts through the general Python path (the compiled one switched off)."""
    timed(_replica_puts(replica_general, 97))


@pytest.mark.benchmark(group="replica put x32")
def test_raw_lmdb_replica_writes_32_baseline(timed, tmp_path):
    """What LMDB must do for each such put (a binlog record appended, an op id written, the
    client's entry read), in one transaction of 32, sync off like the two above."""
    env = lmdb.open(str(tmp_path), map_size=1 << 30, sync=False, max_dbs=4)
    binlog, ops, clients = (env.open_db(name) for name in (b"binlog", b"ops", b"clients"))
    with env.begin(write=True) as txn:
        txn.put(struct.pack(">Q", 96), b"c" * 16, db=clients)
    lsn = itertools.count(1)
    record = _core.encode_record(1, 2, 96, 1, KEYS[0], [(_core.OP_PUT, b"", VALUE)])

    def write():
        with env.begin(write=True) as txn:
            for _ in range(BATCH):
                n = next(lsn)
                txn.put(struct.pack(">Q", n), record, db=binlog, append=True)
                txn.put(struct.pack(">QQ", 96, n), b"r" * 12, db=ops)
                txn.get(struct.pack(">Q", 96), db=clients)
    timed(write)
    env.close()


def test_benchmarks_wrote_real_files(store, raw):
    """Guard: the store under test is on disk and durable (sync on), not a tmpfs toy."""
    assert Path(store.path, "data.mdb").stat().st_size > 1_000_000
    assert store.env.flags()["sync"] is True
