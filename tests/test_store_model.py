"""The LMDB engine against a plain-Python model: random sequences of Key-Value and Key-Table
mutations (CAS, incr, deletes, appends, multi-op batches), reads, paged scans and paged
`changes(since)`, retried op ids and store reopens, checked after every step."""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvsvr import _core
from kvsvr.errors import Compacted, InvalidArgument, KvError, NotFound, VersionConflict
from kvsvr.protocol import Op, decode_delta, encode_delta
from kvsvr.store import Store, seq_row

KEYS = [b"alice", b"bob", b"k\x00\xff"]
ROWS = [b"a", b"b", b"b\x00", b"zz"]
DECIMAL = re.compile(rb"-?[0-9]{1,19}")

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
)


@dataclass
class ModelKey:
    version: int = 0
    next_seq: int = 0
    value: bytes | None = None
    rows: dict[bytes, tuple[int, bytes | None]] = field(default_factory=dict)  # None: tombstone
    compacted_through: int = 0


def model_mutate(state: ModelKey, ops: list[Op], expected: int | None):
    """The reference semantics: returns (new state, reply results) or raises the error type."""
    if expected is not None and expected != state.version:
        raise VersionConflict("")
    value, next_seq, writes, results = state.value, state.next_seq, {}, []
    compacted = state.compacted_through
    for op in ops:
        result = None
        if op.kind == _core.OP_PUT:
            value = op.value
        elif op.kind == _core.OP_DELETE:
            value = None
        elif op.kind == _core.OP_INCR:
            if value is not None and not DECIMAL.fullmatch(value):
                raise InvalidArgument("")
            result = int(value or b"0") + decode_delta(op.value)
            if not -(2**63) <= result < 2**63:
                raise InvalidArgument("")
            value = str(result).encode()
        elif op.kind == _core.OP_ROW_PUT:
            writes[op.row] = op.value
        elif op.kind == _core.OP_ROW_DELETE:
            writes[op.row] = None
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
    for row, row_value in writes.items():
        if row not in rows and row_value is None:
            continue
        rows[row] = (version, row_value)
    rows = {r: (v, val) for r, (v, val) in rows.items() if val is not None or v > compacted}
    return ModelKey(version, next_seq, value, rows, compacted), results


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
        rows = self.model[key].rows
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
        rows = self.model[key].rows
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
                    assert (got.version, got.value) == (state.version, state.value)
                except NotFound as e:
                    assert state.value is None and e.version == state.version
                for row in ROWS:
                    entry = state.rows.get(row)
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


def test_key_states_are_invisible_to_the_cyclic_collector(tmp_path):
    """A node keeps up to STATE_CACHE_KEYS key states: as objects the collector tracks, each of
    its full passes walked them all (a write pause of up to 150 ms while a cache filled)."""
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
