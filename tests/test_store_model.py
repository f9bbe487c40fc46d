"""The LMDB engine against a plain-Python model: random sequences of Key-Value and Key-Table
mutations (CAS, incr, deletes, appends, multi-op batches, expiry and purges), reads, paged
scans and paged `changes(since)`, retried op ids and store reopens, checked after every step.
Expiry instants are far in the past (expired) or far in the future, purges at the present, so
the model needs no clock."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field

import lmdb
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvsvr import _core
from kvsvr.errors import Compacted, InvalidArgument, KvError, NotFound, VersionConflict
from kvsvr.protocol import Op, decode_delta, decode_instant, encode_delta, purge_op, stamped_expiry
from kvsvr.store import KeyState, Meta, Store, seq_row
from kvsvr.store import states as states_module

KEYS = [b"alice", b"bob", b"k\x00\xff"]
ROWS = [b"a", b"b", b"b\x00", b"zz"]
DECIMAL = re.compile(rb"-?[0-9]{1,19}")

NOW_MS = int(time.time() * 1000)          # purges happen now ...
PAST_MS, FUTURE_MS = NOW_MS - 10**7, NOW_MS + 10**11   # ... what expired long ago or never will
values = st.sampled_from([b"", b"1", b"-7", b"x", b"hello", b"9223372036854775806"])
op_strategy = st.one_of(
    st.builds(lambda v: Op(_core.OP_PUT, b"", v), values),
    st.just(Op(_core.OP_DELETE)),
    st.builds(lambda d: Op(_core.OP_INCR, b"", encode_delta(d)),
              st.sampled_from([1, -1, 5, 2**62])),
    st.builds(lambda r, v: Op(_core.OP_ROW_PUT, r, v), st.sampled_from(ROWS), values),
    st.builds(lambda r: Op(_core.OP_ROW_DELETE, r), st.sampled_from(ROWS)),
    st.builds(lambda v: Op(_core.OP_APPEND, b"", v), values),
    st.builds(lambda t: Op(_core.OP_COMPACT, b"", t.to_bytes(8, "little")), st.integers(0, 10)),
    st.builds(lambda r, at: Op(_core.OP_EXPIRE, r, stamped_expiry(at, 1000)),
              st.sampled_from([b"", *ROWS]), st.sampled_from([PAST_MS, FUTURE_MS])),
    st.builds(lambda r: purge_op(NOW_MS, r), st.sampled_from([b"", *ROWS])),
)


@dataclass
class ModelKey:
    version: int = 0
    next_seq: int = 0
    value: bytes | None = None
    rows: dict[bytes, tuple[int, bytes | None]] = field(default_factory=dict)  # None: tombstone
    compacted_through: int = 0
    expires: int = 0        # the value's instant (0: none)
    row_expiry: dict[bytes, int] = field(default_factory=dict)   # live rows' instants

    def value_now(self) -> bytes | None:
        return None if self.expires and self.expires <= NOW_MS else self.value

    def row_now(self, row: bytes) -> tuple[int, bytes | None] | None:
        """The row as reads see it: an expired row is a deletion."""
        entry = self.rows.get(row)
        if entry is not None and entry[1] is not None and 0 < self.row_expiry.get(row, 0) <= NOW_MS:
            return entry[0], None
        return entry


def model_mutate(state: ModelKey, ops: list[Op], expected: int | None):
    """The reference semantics: returns (new state, reply results) or raises the error type."""
    if expected is not None and expected != state.version:
        raise VersionConflict("")
    value, next_seq, writes, results = state.value, state.next_seq, {}, []
    compacted = state.compacted_through
    expires, value_set, expiry, purges = state.expires, False, {}, {}
    for op in ops:
        result = None
        if op.kind == _core.OP_PUT:
            value, expires, value_set = op.value, 0, True
        elif op.kind == _core.OP_DELETE:
            value, expires, value_set = None, 0, False
        elif op.kind == _core.OP_EXPIRE:
            if (not op.row and not value_set) or (op.row and writes.get(op.row) is None):
                raise InvalidArgument("")
            if op.row:
                expiry[op.row] = decode_instant(op.value)
            else:
                expires = decode_instant(op.value)
        elif op.kind == _core.OP_PURGE:
            instant = decode_instant(op.value)
            if not op.row:
                if value is not None and 0 < expires <= instant:
                    value, expires, value_set = None, 0, False
            elif op.row in writes:
                if writes[op.row] is not None and 0 < expiry.get(op.row, 0) <= instant:
                    writes[op.row] = None
                    expiry.pop(op.row)
            else:
                purges[op.row] = instant
            continue   # a purge has no result
        elif op.kind == _core.OP_INCR:
            if value is not None and not DECIMAL.fullmatch(value):
                raise InvalidArgument("")
            result = int(value or b"0") + decode_delta(op.value)
            if not -(2**63) <= result < 2**63:
                raise InvalidArgument("")
            value, value_set = str(result).encode(), True
        elif op.kind in (_core.OP_ROW_PUT, _core.OP_ROW_DELETE):
            writes[op.row] = op.value if op.kind == _core.OP_ROW_PUT else None
            expiry.pop(op.row, None)
            purges.pop(op.row, None)
        elif op.kind == _core.OP_APPEND:
            writes[seq_row(next_seq)] = op.value
            result = next_seq
            next_seq += 1
        elif op.kind == _core.OP_COMPACT:
            through = int.from_bytes(op.value, "little")
            if through > state.version:
                raise InvalidArgument("")
            compacted = max(compacted, through)
        results.append(result)
    version = state.version + 1
    rows = dict(state.rows)
    row_expiry = dict(state.row_expiry)
    for row, instant in purges.items():
        entry = rows.get(row)
        if entry is not None and entry[1] is not None and 0 < row_expiry.get(row, 0) <= instant:
            rows[row] = (version, None)
            del row_expiry[row]
    for row, row_value in writes.items():
        if row not in rows and row_value is None:
            continue
        rows[row] = (version, row_value)
        row_expiry.pop(row, None)
        if expiry.get(row):
            row_expiry[row] = expiry[row]
    rows = {r: (v, val) for r, (v, val) in rows.items() if val is not None or v > compacted}
    return ModelKey(version, next_seq, value, rows, compacted,
                    expires if value is not None else 0, row_expiry), results


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="kvsvr-model-")
        self.store = Store(self.directory, map_size_mib=64, sync=False)
        self.model: dict[bytes, ModelKey] = {k: ModelKey() for k in KEYS}
        self.client_seq = 0
        self.last_success: tuple | None = None

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    @rule(key=st.sampled_from(KEYS), ops=st.lists(op_strategy, min_size=1, max_size=4),
          expect=st.sampled_from([None, None, 0, -1, 1]))
    def mutate(self, key, ops, expect):
        self._mutate(key, ops, expect)

    @rule(key=st.sampled_from(KEYS), row=st.sampled_from([b"", *ROWS]), value=values,
          at=st.sampled_from([PAST_MS, FUTURE_MS]), purge=st.booleans())
    def put_with_expiry(self, key, row, value, at, purge):
        """A put or row_put with its expire op (long expired, or far ahead), then perhaps
        its purge (what a replica proposes once it is due)."""
        first = Op(_core.OP_ROW_PUT, row, value) if row else Op(_core.OP_PUT, b"", value)
        self._mutate(key, [first, Op(_core.OP_EXPIRE, row, stamped_expiry(at, 1000))], None)
        if purge:
            self._mutate(key, [purge_op(NOW_MS, row)], None)

    def _mutate(self, key, ops, expect):
        state = self.model[key]
        expected = None if expect is None else max(0, state.version + expect)
        self.client_seq += 1
        try:
            new_state, results = model_mutate(state, ops, expected)
        except KvError as e:
            with self.store.write() as batch:
                try:
                    batch.mutate(key, ops, expected, 42, self.client_seq)
                    raise AssertionError(f"store accepted what the model refused ({e!r})")
                except KvError as got:
                    assert type(got) is type(e)
            return
        with self.store.write() as batch:
            reply = batch.mutate(key, ops, expected, 42, self.client_seq)
        assert reply.version == new_state.version
        assert reply.results == results
        self.model[key] = new_state
        self.last_success = (key, ops, expected, self.client_seq, reply)

    @precondition(lambda self: self.last_success is not None)
    @rule()
    def retry_last_op_id(self):
        """A retried op id answers as the first time and changes nothing (exactly once)."""
        key, ops, expected, seq, reply = self.last_success
        with self.store.write() as batch:
            assert batch.mutate(key, ops, expected, 42, seq) == reply

    @rule()
    def reopen(self):
        self.store.close()
        self.store = Store(self.directory, map_size_mib=64, sync=False)

    @rule(key=st.sampled_from(KEYS), limit=st.integers(1, 3), start=st.sampled_from([b"", *ROWS]))
    def paged_scan(self, key, limit, start):
        got = []
        cursor = start
        with self.store.read() as txn:
            while cursor is not None:
                page = self.store.scan(txn, key, cursor, None, limit)
                assert len(page.rows) <= limit
                got.extend((r.row, r.version, r.value) for r in page.rows)
                cursor = page.next_start
        model = self.model[key]
        rows = {r: model.row_now(r) for r in model.rows}
        expected = sorted((r, v, val) for r, (v, val) in rows.items()
                          if val is not None and r >= start)
        assert got == expected

    @rule(key=st.sampled_from(KEYS), since=st.integers(0, 12), limit=st.integers(1, 3))
    def paged_changes(self, key, since, limit):
        got = []
        if 0 < since < self.model[key].compacted_through:
            with self.store.read() as txn, pytest.raises(Compacted):
                self.store.changes(txn, key, since, b"", limit)
            return
        with self.store.read() as txn:
            page = self.store.changes(txn, key, since, b"", limit)
            got.extend(page.changes)
            while page.resume is not None:
                page = self.store.changes(txn, key, page.resume[0], page.resume[1], limit)
                got.extend(page.changes)
        model = self.model[key]
        rows = {r: model.row_now(r) for r in model.rows}
        expected = sorted((v, r) for r, (v, _) in rows.items() if v > since)
        assert [(c.version, c.row) for c in got] == expected
        for c in got:
            assert c.deleted == (rows[c.row][1] is None)
            assert c.value == (rows[c.row][1] or b"")

    @invariant()
    def reads_match_model(self):
        with self.store.read() as txn:
            for key, state in self.model.items():
                try:
                    got = self.store.get(txn, key)
                    assert (got.version, got.value) == (state.version, state.value_now())
                except NotFound as e:
                    assert state.value_now() is None and e.version == state.version
                for row in ROWS:
                    entry = state.row_now(row)
                    try:
                        got_row = self.store.row_get(txn, key, row)
                        assert entry is not None and entry[1] is not None
                        assert (got_row.row_version, got_row.value) == entry
                        assert got_row.key_version == state.version
                    except NotFound:
                        assert entry is None or entry[1] is None

    @invariant()
    def binlog_is_one_record_per_mutation(self):
        total = sum(s.version for s in self.model.values())
        assert self.store.last_lsn == total


StoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                          deadline=None)
TestStoreModel = StoreMachine.TestCase


class DeferredStoreMachine(StoreMachine):
    """The same model against a replica's store, which holds key states in memory (see
    Store's defer_key_states): reopening drops what memory held and replays the binlog, the
    sweep writes held states at random points, aborted transactions rebuild them, a tiny
    binlog bound and replay bound force writes, and a snapshot read must show every key at
    its newest state."""

    def __init__(self) -> None:
        self._bound = states_module.DEFERRED_RECORDS_MAX
        states_module.DEFERRED_RECORDS_MAX = 12
        super().__init__()
        self.store.close()
        self.store = self._open()

    def _open(self, binlog_bound: int = 20) -> Store:
        return Store(self.directory, map_size_mib=64, sync=False,
                     binlog_max_records=binlog_bound, defer_key_states=True)

    def teardown(self) -> None:
        states_module.DEFERRED_RECORDS_MAX = self._bound
        super().teardown()

    @rule(binlog_bound=st.sampled_from([5, 20]))
    def reopen(self, binlog_bound):
        # Close as a killed process would leave it: nothing held is written first. (A binlog
        # bound under the replay bound makes trimming write held states.)
        self.store.close()
        self.store = self._open(binlog_bound)

    @rule(key=st.sampled_from(KEYS), count=st.integers(1, 8))
    def put_burst(self, key, count):
        """Plain puts (held after a key's first write) that grow the binlog past its bounds."""
        with self.store.write() as batch:
            for i in range(count):
                reply = batch.mutate(key, [Op(_core.OP_PUT, b"", b"burst%d" % i)])
                state = self.model[key]
                self.model[key] = ModelKey(state.version + 1, state.next_seq,
                                           b"burst%d" % i, state.rows, state.compacted_through,
                                           0, state.row_expiry)
                assert reply.version == self.model[key].version

    @rule(share=st.sampled_from([0.1, 0.5, 1.0]))
    def sweep(self, share):
        with self.store.write() as batch:
            batch.flush_key_states(share)

    @rule(key=st.sampled_from(KEYS), value=values)
    def aborted_write(self, key, value):
        batch = self.store.begin()
        batch.mutate(key, [Op(_core.OP_PUT, b"", value)])
        batch.abort()

    @invariant()
    def snapshot_shows_newest_states(self):
        txn = self.store.read()
        try:
            items, _ = self.store.snapshot_page(txn, None, 1 << 20)
        finally:
            txn.abort()
        seen = {item[1]: KeyState.decode(item[3]) for item in items
                if item[0] == 0 and item[2] is None}
        for key, state in self.model.items():
            if state.version:
                got = seen[key]
                assert (got.version, got.value, got.next_seq) == \
                    (state.version, state.value, state.next_seq)

    @invariant()
    def held_states_are_bounded_and_replayable(self):
        store = self.store
        assert store.first_lsn <= store.replay_from()
        assert store.last_lsn + 1 - store.replay_from() <= states_module.DEFERRED_RECORDS_MAX


DeferredStoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                                  deadline=None)
TestDeferredStoreModel = DeferredStoreMachine.TestCase


def test_a_killed_replica_store_replays_the_key_states_it_held(tmp_path):
    """SIGKILL a process writing through a store that holds key states (real fsyncs): every
    committed write is back after reopening, and the keys table alone was behind."""
    script = textwrap.dedent(f"""
        import sys
        from kvsvr import _core
        from kvsvr.protocol import Op
        from kvsvr.store import Store
        store = Store({str(tmp_path)!r}, map_size_mib=64, defer_key_states=True)
        with store.write() as batch:
            for i in range(200):
                batch.mutate(b"k%d" % i, [Op(_core.OP_PUT, b"", b"v0")])
        n = 0
        while True:
            n += 1
            with store.write() as batch:
                for i in range(200):
                    batch.mutate(b"k%d" % i, [Op(_core.OP_PUT, b"", b"v%d" % n)])
                if n % 3 == 0:
                    batch.flush_key_states(0.25)
            print(n, flush=True)   # committed (fsync) before this line
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout is not None
    committed = 0
    for line in process.stdout:
        committed = int(line)
        if committed >= 12:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    with lmdb.open(str(tmp_path), max_dbs=8, readonly=True, lock=False) as env:
        keys = env.open_db(b"keys", create=False)
        with env.begin() as txn:
            behind = sum(KeyState.decode(txn.get(b"k%d" % i, db=keys)).version <= committed
                         for i in range(200))
    assert behind > 0   # held states were lost with the process ...
    for defer in (True, False):
        # ... and replayed (a store that does not hold states writes them out, once).
        store = Store(tmp_path, map_size_mib=64, defer_key_states=defer)
        try:
            assert store.deferred_keys >= behind if defer else store.deferred_keys == 0
            with store.read() as txn:
                for i in range(200):
                    got = store.get(txn, b"k%d" % i)
                    # Every write reported committed is there.
                    assert got.version >= committed + 1
                    assert got.value == b"v%d" % (got.version - 1)
        finally:
            store.close()
    with lmdb.open(str(tmp_path), max_dbs=8, readonly=True, lock=False) as env:
        keys, meta = env.open_db(b"keys", create=False), env.open_db(b"meta", create=False)
        with env.begin() as txn:
            assert txn.get(Meta.KEYS_REPLAY_FROM, db=meta) is None
            assert all(KeyState.decode(txn.get(b"k%d" % i, db=keys)).version > committed
                       for i in range(200))


def test_held_key_states_are_never_evicted_from_the_state_cache(tmp_path, monkeypatch):
    """The state cache evicts its oldest entries; a held state is the only copy of the key's
    newest version, so eviction passes over it, however old its place."""
    monkeypatch.setattr(states_module, "STATE_CACHE_KEYS", 32)
    store = Store(tmp_path, sync=False, defer_key_states=True)
    try:
        with store.write() as batch:
            for i in range(20):
                batch.mutate(b"held%d" % i, [Op(_core.OP_PUT, b"", b"old")])
        with store.write() as batch:
            for i in range(20):
                batch.mutate(b"held%d" % i, [Op(_core.OP_PUT, b"", b"new")])
        assert store.deferred_keys == 20
        with store.write() as batch:
            for i in range(200):   # other keys through the cache, many times its size
                batch.mutate(b"other%d" % i, [Op(_core.OP_PUT, b"", b"x")])
        assert len(store.states.kept) <= 32 + 20
        with store.read() as txn:
            for i in range(20):
                assert store.get(txn, b"held%d" % i).value == b"new"
    finally:
        store.close()


def test_key_states_are_invisible_to_the_cyclic_collector(tmp_path):
    """A node keeps up to STATE_CACHE_KEYS key states: as objects the collector tracks, each of
    its full passes walked them all (a write pause while a cache filled)."""
    import gc

    store = Store(tmp_path, sync=False)
    try:
        with store.write() as batch:
            for i in range(100):
                batch.mutate(b"k%d" % i, [Op(_core.OP_PUT, b"", b"v")])
            batch.mutate(b"t", [Op(_core.OP_APPEND, b"", b"row")])
        txn = store.read()
        try:
            states = [store.latest(txn, b"k%d" % i) for i in range(100)]
            states.append(store.latest(txn, b"t"))
        finally:
            txn.abort()
        assert [s.version for s in states] == [1] * 101
        assert states[-1].next_seq == 1
        assert not any(gc.is_tracked(s) for s in states)
    finally:
        store.close()


def test_every_meta_name_a_store_writes_is_in_the_registry(tmp_path):
    """Meta names are part of the on-disk format: each one a store writes is a name of
    kvsvr.store.Meta (or one of its per-peer prefixes), spelt as stores already hold it."""
    assert (Meta.SCHEMA, Meta.LAST_LSN, Meta.KEYS_REPLAY_FROM, Meta.QUORUM_INCARNATION,
            Meta.QUORUM_FENCE_PREFIX, Meta.CURSOR_PREFIX, Meta.COPY_INSTALLING_PREFIX,
            Meta.VOTES_THROUGH) == (b"schema", b"last_lsn", b"keys/replay_from",
                                    b"quorum/incarnation", b"quorum/fence/", b"cursor/",
                                    b"copy/installing/", b"votes/through")
    names = {value for name, value in vars(Meta).items() if name.isupper()}
    peer_prefixes = {Meta.QUORUM_FENCE_PREFIX, Meta.CURSOR_PREFIX, Meta.REBUILD_TARGET_PREFIX,
                     Meta.COPY_INSTALLING_PREFIX}
    store = Store(tmp_path, map_size_mib=64, sync=False, binlog_max_records=2,
                  defer_key_states=True)
    try:
        with store.write() as batch:
            for version in range(4):
                batch.mutate(b"k", [Op(_core.OP_PUT, b"", b"v%d" % version)])
            batch.persist_quorum([_core.FenceRecord(_core.FENCE, 2, 5),
                                  _core.RebuiltRecord(_core.REBUILT, 3),
                                  _core.VerifiedRecord(_core.VERIFIED, 3)])
            batch.set_incarnation(3)
        written = set(store.meta_raw(b""))
    finally:
        store.close()
    assert {b"schema", b"last_lsn", b"keys/replay_from", b"quorum/fence/\x02"} <= written
    for name in written:
        assert name in names or name[:-1] in peer_prefixes, name


def test_a_flushed_key_that_takes_a_big_value_reads_back_in_the_same_transaction(tmp_path):
    """A held key state written by the rolling flush is read from memory until the commit is
    seen; a value too big to keep in memory then replaces it in LMDB, and reads must go there
    (they raised KeyError: the key was still marked as being flushed, with nothing kept)."""
    store = Store(tmp_path, sync=False, defer_key_states=True)
    try:
        with store.write() as batch:
            batch.mutate(b"k", [Op(_core.OP_PUT, b"", b"small")])
        with store.write() as batch:
            batch.mutate(b"k", [Op(_core.OP_PUT, b"", b"small again")])
        assert store.deferred_keys == 1
        big = b"x" * 600
        with store.write() as batch:
            assert batch.flush_key_states(1.0) == 1
            batch.mutate(b"k", [Op(_core.OP_PUT, b"", big)])
            got = store.get(batch.txn, b"k")
            assert (got.version, got.value) == (3, big)
            assert store.key_state(batch.txn, b"k").version == 3
        store.commit_seen()
        with store.read() as txn:
            got = store.get(txn, b"k")
            assert (got.version, got.value) == (3, big)
    finally:
        store.close()
