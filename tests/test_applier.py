"""The compiled apply path for plain writes (kvsvr/_applier.pyx) writes exactly what the
general Python path writes: same LMDB tables byte for byte, same replies, same key states held
in memory; and it steps aside whenever a write is not plain or a bound is reached."""

from __future__ import annotations

import random

import pytest

from kvsvr import _core
from kvsvr.errors import KvError, StorageFull
from kvsvr.limits import OPS_TRIM_STEP
from kvsvr.protocol import Op, stamped_expiry
from kvsvr.store import Store
from kvsvr.store import states as states_module

TABLES = ("keys", "rows", "changes", "binlog", "ops", "clients", "meta", "expiry")
# An expiry instant far ahead: a value that expires takes the general path, and so does the
# plain put that replaces it (its expiry table entry goes).
LATER_MS = 2**62


def _tables(store: Store) -> dict[str, list[tuple[bytes, bytes]]]:
    with store.env.begin() as txn:
        return {name: [(bytes(k), bytes(v))
                       for k, v in txn.cursor(db=getattr(store.tables, name))]
                for name in TABLES}


def _random_ops(rng: random.Random) -> list[tuple[int, bytes, bytes]]:
    roll = rng.random()
    if roll < 0.55:
        return [(_core.OP_PUT, b"", b"v" * rng.choice([0, 1, 100, 512]))]
    if roll < 0.65:
        return [(_core.OP_DELETE, b"", b"")]
    if roll < 0.75:   # several plain ops in one write
        return [(_core.OP_PUT, b"", b"a"), (_core.OP_DELETE, b"", b""),
                (_core.OP_PUT, b"", b"b" * rng.randrange(1, 40))][:rng.randrange(1, 4)]
    if roll < 0.82:   # too big to hold: the general path
        return [(_core.OP_PUT, b"", b"w" * 513)]
    if roll < 0.88:
        return [(_core.OP_INCR, b"", (rng.randrange(-5, 5)).to_bytes(8, "little", signed=True))]
    if roll < 0.92:
        return [(_core.OP_ROW_PUT, b"r%d" % rng.randrange(3), b"x")]
    if roll < 0.96:
        return [(_core.OP_PUT, b"", b"e"),
                (_core.OP_EXPIRE, b"", stamped_expiry(LATER_MS + rng.randrange(3), 1000))]
    return [(_core.OP_APPEND, b"", b"y")]


@pytest.mark.parametrize("seed", range(6))
def test_plain_writes_land_byte_for_byte_as_the_general_path_writes_them(tmp_path, seed,
                                                                        monkeypatch):
    rng = random.Random(seed)
    # Small bounds so that the binlog bound, the replay bound and trim steps all come up.
    deferred_bound, binlog_bound = [(1 << 17, 1_000_000), (40, 30), (7, 1_000_000)][seed % 3]
    monkeypatch.setattr(states_module, "DEFERRED_RECORDS_MAX", deferred_bound)
    fast = Store(tmp_path / "fast", map_size_mib=64, sync=False, defer_key_states=True,
                 binlog_max_records=binlog_bound)
    general = Store(tmp_path / "general", map_size_mib=64, sync=False, defer_key_states=True,
                    binlog_max_records=binlog_bound)
    general.applier = None
    applier = fast.applier

    class Counting:   # the real compiled path, counted
        taken = 0

        def apply(self, *args):
            done = applier.apply(*args)
            Counting.taken += done is not None
            return done

        def write_held(self, *args):
            return applier.write_held(*args)

    fast.applier = Counting()
    keys = [b"k%d" % i for i in range(12)]
    seqs = {7: 0, 8: OPS_TRIM_STEP - 3}   # client 8 crosses a trim step
    try:
        for _ in range(40):   # transactions
            batches = [s.begin() for s in (fast, general)]
            aborted = rng.random() < 0.1
            for _ in range(rng.randrange(1, 20)):
                key = rng.choice(keys)
                ops = _random_ops(rng)
                client_id = rng.choice([0, 7, 8])
                seq = 0
                if client_id:
                    seqs[client_id] += 1
                    seq = seqs[client_id]
                outcomes = []
                for batch in batches:
                    try:
                        outcomes.append(("ok", batch.mutate(
                            key, [Op(*op) for op in ops], None, client_id, seq)))
                    except KvError as e:
                        outcomes.append(("error", type(e), str(e)))
                assert outcomes[0] == outcomes[1]
                assert fast.states.kept == general.states.kept
                assert fast.states.held == general.states.held
                assert (fast.first_lsn, fast.last_lsn) == (general.first_lsn, general.last_lsn)
            if rng.random() < 0.3:
                for batch in batches:
                    batch.flush_key_states(0.5)
            for store, batch in zip((fast, general), batches, strict=True):
                if aborted:
                    batch.abort()
                else:
                    store.commit(batch)
            assert _tables(fast) == _tables(general)
            assert fast.states.kept == general.states.kept
            assert fast.states.held == general.states.held
    finally:
        fast.close()
        general.close()
    assert Counting.taken >= 5   # the compiled path did run


def test_a_full_map_is_storage_full_on_the_compiled_path_too(tmp_path):
    store = Store(tmp_path, map_size_mib=1, sync=False, defer_key_states=True)
    with store.write() as batch:
        batch.mutate(b"k", [Op(_core.OP_PUT, b"", b"v")])
    batch = store.begin()
    with pytest.raises(StorageFull):
        for seq in range(1, 100_000):
            batch.mutate(b"k", [Op(_core.OP_PUT, b"", b"v" * 500)], None, 9, seq)
    batch.abort()
    store.close()


def test_the_op_id_digest_is_the_one_on_disk(tmp_path):
    """The ops table keeps a digest of each request: changing how it is computed would make
    every retry of an op applied before an upgrade look like a reused id."""
    from kvsvr._applier import request_digest
    ops = [(_core.OP_PUT, b"", b"value")]
    # xxh64 of msgpack([b"key", [[1, b"", b"value"]]]), as written since schema 2.
    assert request_digest(b"key", ops) == request_digest(b"key", [list(ops[0])])
    from xxhash import xxh64_intdigest
    packed = (b"\x92\xc4\x03key\x91\x93\x01\xc4\x00\xc4\x05value")
    assert request_digest(b"key", ops) == xxh64_intdigest(packed)


def test_a_key_state_encodes_to_the_layout_the_keys_table_reads():
    import struct

    from kvsvr.store import KeyState
    for state in (KeyState(), KeyState(1, 0, b"", 0), KeyState(7, 3, b"value", 2),
                  KeyState(2**64 - 1, 2**64 - 1, None, 2**64 - 1)):
        raw = state.encode()
        assert raw[:25] == struct.pack("<QQQB", state.version, state.next_seq,
                                       state.compacted_through, state.value is not None)
        assert raw[25:] == (state.value or b"")
        assert KeyState.decode(raw) == state
    with pytest.raises(TypeError):
        KeyState(1, 0, "not bytes", 0).encode()
    expiring = KeyState(3, 0, b"value", 0, 1_700_000_000_000)
    raw = expiring.encode()
    assert raw[24] == 3 and struct.unpack_from("<Q", raw, 25)[0] == expiring.expires_ms
    assert raw[33:] == b"value" and KeyState.decode(raw) == expiring
    # No value, no expiry: an instant left on a state without a value is not written.
    assert KeyState.decode(KeyState(3, 0, None, 0, 5).encode()) == KeyState(3, 0, None, 0)
