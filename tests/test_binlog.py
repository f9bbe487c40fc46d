"""The binlog: written in the same transaction as the data, complete enough to rebuild a
store from nothing, bounded by trimming, and checked against a plain-Python model of its
record layout."""

from __future__ import annotations

import lmdb
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsvr import _core
from kvsvr.errors import KvError
from kvsvr.protocol import Op, encode_delta
from kvsvr.store import Store

from . import reference_record
from .test_codec import keys, ops, u64
from .test_store_model import op_strategy


def _dump(store: Store) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every entry of the data sub-databases, to compare two stores byte for byte."""
    with store.env.begin() as txn:
        return {name: list(txn.cursor(db=db))
                for name, db in (("keys", store.tables.keys), ("rows", store.tables.rows),
                                 ("changes", store.tables.changes), ("ops", store.tables.ops))}


@settings(max_examples=40, deadline=None)
@given(mutations=st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c"]),
                                    st.lists(op_strategy, min_size=1, max_size=3)),
                          min_size=1, max_size=40))
def test_replaying_the_binlog_rebuilds_the_store_exactly(tmp_path_factory, mutations):
    source = Store(tmp_path_factory.mktemp("source"), map_size_mib=64, sync=False)
    replica = Store(tmp_path_factory.mktemp("replica"), map_size_mib=64, sync=False)
    try:
        for seq, (key, op_list) in enumerate(mutations, start=1):
            try:
                with source.write() as batch:
                    batch.mutate(key, op_list, None, 5, seq)
            except KvError:
                pass  # refused mutations leave no record
        records = source.binlog(0, limit=10_000)
        assert [r.lsn for r in records] == list(range(1, source.last_lsn + 1))
        with replica.write() as batch:
            for record in records:
                batch.apply_record(record)
        assert _dump(replica) == _dump(source)
        assert [(r.key, r.version, r.ops) for r in replica.binlog(0, 10_000)] == \
               [(r.key, r.version, r.ops) for r in records]
    finally:
        source.close()
        replica.close()


def test_out_of_order_record_is_refused(tmp_path):
    store = Store(tmp_path, map_size_mib=64, sync=False)
    try:
        record = _core.decode_record(_core.encode_record(1, 2, 0, 0, b"k",
                                                         [(_core.OP_PUT, b"", b"v")]))
        with pytest.raises(ValueError, match="out of order"), store.write() as batch:
            batch.apply_record(record)
        assert store.last_lsn == 0
    finally:
        store.close()


def test_binlog_is_trimmed_to_its_bound_and_positions_survive_reopen(tmp_path):
    store = Store(tmp_path, map_size_mib=64, sync=True, binlog_max_records=10)
    for i in range(25):
        with store.write() as batch:
            batch.mutate(b"counter", [Op(_core.OP_INCR, b"", encode_delta(1))], None, 9, i + 1)
    assert (store.first_lsn, store.last_lsn) == (16, 25)
    assert [r.lsn for r in store.binlog(0, 100)] == list(range(16, 26))
    store.close()
    store = Store(tmp_path, map_size_mib=64, sync=True, binlog_max_records=10)
    try:
        assert (store.first_lsn, store.last_lsn) == (16, 25)
        with store.write() as batch:
            batch.mutate(b"counter", [Op(_core.OP_INCR, b"", encode_delta(1))])
        assert store.last_lsn == 26
        with store.read() as txn:
            assert store.get(txn, b"counter").value == b"26"
    finally:
        store.close()


def test_a_corrupted_binlog_record_is_reported_not_misread(tmp_path):
    store = Store(tmp_path, map_size_mib=64, sync=False)
    try:
        with store.write() as batch:
            batch.mutate(b"k", [Op(_core.OP_PUT, b"", b"value")])
        with store.env.begin(write=True) as txn:
            raw = bytearray(txn.get(b"\0" * 7 + b"\1", db=store.tables.binlog))
            raw[-1] ^= 0xFF
            txn.put(b"\0" * 7 + b"\1", bytes(raw), db=store.tables.binlog)
        with pytest.raises(_core.RecordError, match="checksum"):
            store.binlog(0)
    finally:
        store.close()


def test_a_failed_commit_keeps_nothing_of_the_batch(tmp_path):
    """A transaction that dies (here: the map fills up) leaves no data and no binlog."""
    store = Store(tmp_path, map_size_mib=16, sync=False)
    try:
        with store.write() as batch:
            batch.mutate(b"before", [Op(_core.OP_PUT, b"", b"x")])
        lsn = store.last_lsn
        with pytest.raises((KvError, lmdb.Error)), store.write() as batch:
            for i in range(100):
                batch.mutate(f"big{i}".encode(), [Op(_core.OP_PUT, b"", b"v" * 1_000_000)])
        assert store.last_lsn == lsn
        with store.read() as txn:
            assert store.key_state(txn, b"big0").version == 0
            assert store.get(txn, b"before").value == b"x"
    finally:
        store.close()


@given(lsn=u64, version=st.integers(1, 2**64 - 1), client=u64, seq=u64, key=keys,
       op_list=st.lists(ops, min_size=1, max_size=6))
def test_compiled_codec_matches_the_reference_model(lsn, version, client, seq, key, op_list):
    compiled = _core.encode_record(lsn, version, client, seq, key, op_list)
    assert compiled == reference_record.encode(lsn, version, client, seq, key, op_list)
    assert reference_record.decode(compiled) == (lsn, version, client, seq, key, op_list)


def test_quorum_records_are_stored_as_the_plain_tuples_were(tmp_path):
    """The store writes a named record's fields where and as the plain tuple's went (a paxos
    row: msgpack [promised, accepted_ballot, accepted_value, chosen_value] under the key's
    length, the key and the version; meta quorum/ names: the incarnation), and reads back the
    named records; a plain tuple is refused (the kind alone does not make a record)."""
    named = [_core.InstanceRecord(_core.INSTANCE, b"key", 3, 300, 257, b"accepted", None),
             _core.InstanceRecord(_core.INSTANCE, b"key", 4, 9, 9, b"x", b"x"),
             _core.FenceRecord(_core.FENCE, 2, 5), _core.RebuiltRecord(_core.REBUILT, 4),
             _core.VerifiedRecord(_core.VERIFIED, 6)]
    expected = {
        "paxos": {b"\x00\x03key" + (3).to_bytes(8, "big"): msgspec.msgpack.encode(
                      [300, 257, b"accepted", None]),
                  b"\x00\x03key" + (4).to_bytes(8, "big"): msgspec.msgpack.encode(
                      [9, 9, b"x", b"x"])},
        "meta": {b"quorum/fence/\x02": (5).to_bytes(8, "big"),
                 b"quorum/rebuilt": (4).to_bytes(8, "big"),
                 b"quorum/verified": (6).to_bytes(8, "big")},
    }
    for records, where in ((named, "named"),):
        store = Store(tmp_path / where, map_size_mib=64, sync=True)
        try:
            with store.write() as batch:
                batch.persist_quorum(records)
            with store.env.begin() as txn:
                stored = {
                    "paxos": dict(txn.cursor(db=store.tables.paxos)),
                    "meta": {name: raw for name, raw in txn.cursor(db=store.tables.meta)
                             if name.startswith(b"quorum/")}}
            assert stored == expected, where
            back = store.quorum_records()
            assert back == named and [type(r) for r in back] == [type(r) for r in named]
            with pytest.raises(ValueError, match="unknown quorum record"), \
                    store.write() as batch:
                batch.persist_quorum([tuple(named[0])])   # type: ignore[list-item]
        finally:
            store.close()


def test_quorum_records_survive_a_reopen_and_restore_a_replica(tmp_path):
    """What the version quorum persists comes back as it was, and a replica restored from it
    answers as the one that wrote it (same promises, same accepted values)."""
    replica = _core.QuorumReplica(0, 3)
    home_key = next(k for k in (b"k%d" % i for i in range(100)) if replica.home(k) == 0)
    replica.propose(home_key, 1, b"record-bytes", 0.0)         # home fast path: self-accept
    replica.step(_core.Message(_core.MSG_PREPARE, 1, 0, 1, b"j", 4,
                               _core.make_ballot(3, 1)), 0.0)
    replica.step(_core.Message(_core.MSG_CHOSEN, 2, 0, 4, b"c", 2, 0, 0, b"chosen"), 0.0)
    persist, _send, _decided = replica.ready()
    persist += replica.take_learned()   # (not a vote, but the node logs it to re-apply it)
    markers = [_core.RebuiltRecord(_core.REBUILT, 4), _core.VerifiedRecord(_core.VERIFIED, 4)]
    store = Store(tmp_path, map_size_mib=64, sync=True)
    with store.write() as batch:
        batch.persist_quorum([*persist, *markers])
        batch.set_incarnation(4)
    store.close()
    store = Store(tmp_path, map_size_mib=64, sync=True)
    try:
        records = store.quorum_records()
        assert sorted(map(repr, records)) == sorted(map(repr, [*persist, *markers]))
        assert store.incarnation == 4
        restored = _core.QuorumReplica(0, 3)
        restored.restore(records)
        for key, version in ((home_key, 1), (b"j", 4), (b"c", 2)):
            assert restored.acceptor_state(key, version) == replica.acceptor_state(key, version)
        # the peer that moved to incarnation 4 stays fenced: its incarnation-3 life is ignored
        restored.step(_core.Message(_core.MSG_PREPARE, 2, 0, 3, b"z", 1,
                                    _core.make_ballot(1, 2, 3)), 0.0)
        assert restored.ready()[1] == []
        with pytest.raises(ValueError, match="unknown quorum record"), store.write() as batch:
            batch.persist_quorum([("bogus", 1)])
    finally:
        store.close()


def test_idle_clients_are_forgotten_with_their_op_ids(tmp_path):
    """Short-lived clients (every CLI call is one) must not pile up in the op-id table."""
    store = Store(tmp_path, map_size_mib=64, sync=False)
    put = [Op(_core.OP_PUT, b"", b"v")]
    try:
        for client in range(1, 31):
            with store.write() as batch:
                batch.mutate(b"k", put, None, client, 1)
                batch.mutate(b"k", put, None, client, 2)
        assert store.stats()["clients"] == 30 and store.stats()["remembered_op_ids"] == 60
        with store.write() as batch:   # nobody is idle yet: nothing goes
            assert batch.forget_idle_clients(idle_s=3600, limit=100) == b""
        assert store.stats()["clients"] == 30
        start, rounds = b"", 0
        while True:                     # everyone counts as idle: swept in bounded batches
            with store.write() as batch:
                start = batch.forget_idle_clients(idle_s=-1, start=start, limit=7)
            rounds += 1
            if not start:
                break
        assert rounds == 5
        assert store.stats()["clients"] == 0 and store.stats()["remembered_op_ids"] == 0
    finally:
        store.close()


def test_the_newest_key_states_kept_in_memory_follow_writes_and_aborts(tmp_path):
    """Store.latest answers from memory what the open transaction wrote (a read transaction
    does not see it yet); an abort forgets it, and a big value is always read from LMDB."""
    store = Store(tmp_path, map_size_mib=64, sync=False)
    try:
        batch = store.begin()
        batch.mutate(b"k", [Op(_core.OP_PUT, b"", b"one")])
        batch.mutate(b"big", [Op(_core.OP_PUT, b"", b"x" * 100_000)])
        with store.read() as txn:
            assert store.key_state(txn, b"k").version == 0        # not committed
            assert store.latest(txn, b"k").version == 1           # but written
            assert store.latest(txn, b"k").value == b"one"
            assert store.latest(txn, b"big").version == 0        # not kept: read in txn
        assert store.latest(batch.txn, b"big").value == b"x" * 100_000
        assert batch.latest(b"big").value == b"x" * 100_000
        batch.abort()
        with store.read() as txn:
            assert store.latest(txn, b"k").version == 0           # the abort forgot it
        with store.write() as batch:
            batch.mutate(b"k", [Op(_core.OP_INCR, b"", encode_delta(5))])
            batch.mutate(b"k", [Op(_core.OP_INCR, b"", encode_delta(2))])
        with store.read() as txn:
            assert store.latest(txn, b"k").value == b"7"
            assert store.get(txn, b"k").version == 2
    finally:
        store.close()
