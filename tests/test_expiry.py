"""Keys and rows that expire (TTL): a value or row past its instant reads as absent at once on
every replica (local reads included), across restarts and SIGKILL; the background removal
replicates as a new version; a re-put racing the removal keeps the new value; the instant is
chosen once (a retry elsewhere is the same request); a version-2 store opens and is upgraded.
Real processes, real LMDB."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvsvr import Client, InvalidArgument, NotFound, _core, expiry, protocol
from kvsvr.launcher import LocalCluster, write_cluster_config
from kvsvr.protocol import expire_op, purge_op, put_op, row_put_op
from kvsvr.store import SCHEMA_VERSION, Meta, Store
from kvsvr.store.layout import SCHEMA

TESTDATA = Path(__file__).parent / "testdata"


def now_ms() -> int:
    return int(time.time() * 1000)


def stamped(ops: list[protocol.Op], at_ms: int) -> list[protocol.Op]:
    expiry.stamp(ops, at_ms)
    return ops


def wait_for(condition: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not reached in {timeout} s")


def absent_version(client: Client, key: bytes, **options: Any) -> int | None:
    """The key's version if its value reads as absent, None if it is there."""
    try:
        client.get(key, **options)
    except NotFound as e:
        return e.version
    return None


# --- the store alone ----------------------------------------------------------------------
def test_a_value_and_a_row_read_absent_once_their_instant_passed(tmp_path: Path) -> None:
    """Reads compare the recorded instant with the clock: before it, there; after, absent in
    get, row_get, scan, and as deleted in changes; rows without a ttl are untouched."""
    store = Store(tmp_path / "s")
    at = now_ms() + 400
    with store.write() as batch:
        batch.mutate(b"k", stamped([put_op(b"v"), expire_op(1)], at - 1000))
        batch.mutate(b"t", stamped([row_put_op(b"r", b"x"), expire_op(1, b"r"),
                                    row_put_op(b"s", b"y")], at - 1000))
    with store.read() as txn:
        assert store.get(txn, b"k").value == b"v"
        assert [r.row for r in store.scan(txn, b"t", b"", None, 10).rows] == [b"r", b"s"]
        assert store.expiring(txn, at, 10) == [(at, b"k", b""), (at, b"t", b"r")]
    time.sleep(max(0.0, (at - now_ms()) / 1000) + 0.05)
    with store.read() as txn:
        with pytest.raises(NotFound):
            store.get(txn, b"k")
        with pytest.raises(NotFound):
            store.row_get(txn, b"t", b"r")
        assert [r.row for r in store.scan(txn, b"t", b"", None, 10).rows] == [b"s"]
        changes = {c.row: c.deleted for c in store.changes(txn, b"t", 0, b"", 10).changes}
        assert changes == {b"r": True, b"s": False}
    store.close()


def test_a_purge_removes_only_what_is_still_expired(tmp_path: Path) -> None:
    """A re-put (with a later ttl, or none) racing a purge keeps the new value: the purge
    compares its instant with the instant recorded now, not the one it was chosen for. The
    purge is a version of its own, and the expiry index follows every change."""
    store = Store(tmp_path / "s")
    t = now_ms() - 10_000
    with store.write() as batch:
        batch.mutate(b"a", stamped([put_op(b"old"), expire_op(1)], t))          # due t+1000
        batch.mutate(b"b", stamped([put_op(b"old"), expire_op(1)], t))
        batch.mutate(b"t", stamped([row_put_op(b"r", b"old"), expire_op(1, b"r")], t))
        # The re-puts land first: a's with a later instant, b's without one, r's row plain.
        batch.mutate(b"a", stamped([put_op(b"new"), expire_op(3600)], t))
        batch.mutate(b"b", [put_op(b"new")])
        batch.mutate(b"t", [row_put_op(b"r", b"new")])
        purge_at = t + 1000   # what a purger saw due
        for key, row in ((b"a", b""), (b"b", b""), (b"t", b"r")):
            reply = batch.mutate(key, [purge_op(purge_at, row)])
            assert reply.version == 3   # a version of its own, which changes nothing
    with store.read() as txn:
        assert store.get(txn, b"a").value == b"new"
        assert store.get(txn, b"b").value == b"new"
        assert store.row_get(txn, b"t", b"r").value == b"new"
        assert store.expiring(txn, 2**63, 10) == [(t + 3_600_000, b"a", b"")]
    with store.write() as batch:   # a purge of what did expire removes it
        batch.mutate(b"c", stamped([put_op(b"v"), expire_op(1)], t))
        batch.mutate(b"t", stamped([row_put_op(b"q", b"v"), expire_op(1, b"q")], t))
        assert batch.mutate(b"c", [purge_op(t + 1000)]).version == 2
        batch.mutate(b"t", [purge_op(t + 1000, b"q")])
    with store.read() as txn:
        with pytest.raises(NotFound) as absent:
            store.get(txn, b"c")
        assert absent.value.version == 2
        assert store.key_state(txn, b"c").value is None
        gone = [c for c in store.changes(txn, b"t", 3, b"", 10).changes]
        assert [(c.row, c.deleted) for c in gone] == [(b"q", True)]
        assert store.expiring(txn, 2**63, 10) == [(t + 3_600_000, b"a", b"")]
    store.close()


def test_a_retry_stamped_elsewhere_is_the_same_request(tmp_path: Path) -> None:
    """Each node that takes a write sets its instant; a retry of the op id stamped at another
    moment (another replica) is answered as the first time, not refused as another request."""
    store = Store(tmp_path / "s")
    with store.write() as batch:
        first = batch.mutate(b"k", stamped([put_op(b"v"), expire_op(60)], now_ms()),
                             client_id=9, client_seq=1)
        again = batch.mutate(b"k", stamped([put_op(b"v"), expire_op(60)], now_ms() + 500),
                             client_id=9, client_seq=1)
        assert again == first
        with pytest.raises(InvalidArgument):   # another ttl is another request
            batch.mutate(b"k", stamped([put_op(b"v"), expire_op(61)], now_ms()),
                         client_id=9, client_seq=1)
    store.close()


def test_incr_of_an_expired_value_counts_from_zero(tmp_path: Path) -> None:
    """An incr is stamped with a purge ahead of it: the expired value is gone first, as a get
    shows, and the incr's result stays the first result."""
    store = Store(tmp_path / "s")
    t = now_ms() - 5000
    with store.write() as batch:
        batch.mutate(b"n", stamped([put_op(b"41"), expire_op(1)], t))
        assert batch.mutate(b"n", stamped([protocol.incr_op(1)], now_ms())).results == [1]
        batch.mutate(b"m", stamped([put_op(b"41"), expire_op(60)], now_ms()))
        assert batch.mutate(b"m", stamped([protocol.incr_op(1)], now_ms())).results == [42]
    with store.read() as txn:
        assert store.key_state(txn, b"m").expires_ms > now_ms()   # incr keeps the ttl
    store.close()


def test_a_full_batch_with_an_incr_is_refused_not_counted_from_an_expired_value(
        cluster: LocalCluster, client: Client) -> None:
    """A node puts a purge ahead of an incr; a batch of OPS_PER_BATCH_MAX ops had no room
    for it, so its incr counted from the expired value (and the result, keeping the old
    instant, read absent). Such a batch is refused naming ops, by the client and by the
    node's stamp, nothing written; one op fewer counts from zero."""
    ops_max = _core.OPS_PER_BATCH_MAX
    client.put(b"full", b"100", ttl=1)
    time.sleep(1.1)
    with pytest.raises(InvalidArgument) as refused:
        batch = client.batch(b"full")
        for i in range(ops_max - 1):
            batch.row_put(b"r%d" % i, b"x")
        batch.incr(1).commit()
    assert refused.value.field == "ops" and str(ops_max - 1) in str(refused.value)
    ops = [row_put_op(b"r%d" % i, b"x") for i in range(ops_max - 1)] + [protocol.incr_op(1)]
    with pytest.raises(InvalidArgument) as refused:
        expiry.stamp(ops, now_ms())
    assert refused.value.field == "ops" and len(ops) == ops_max
    version = absent_version(client, b"full")
    assert version is not None and not client.scan(b"full").rows
    batch = client.batch(b"full")
    for i in range(ops_max - 2):
        batch.row_put(b"r%d" % i, b"x")
    assert batch.incr(1).commit().results[-1] == 1
    assert client.get(b"full").value == b"1"
    batch = client.batch(b"ttls")   # each ttl is an op of its own: the refusal says so
    for i in range(ops_max // 2 + 1):
        batch.row_put(b"r%d" % i, b"x", ttl=60)
    with pytest.raises(InvalidArgument) as refused:
        batch.commit()
    assert refused.value.field == "ops" and "each ttl counts as an operation" in str(
        refused.value)
    batch = client.batch(b"rows")   # a full batch without an incr still goes through
    for i in range(ops_max):
        batch.row_put(b"r%d" % i, b"x")
    batch.commit()
    assert len(client.scan(b"rows").rows) == ops_max


def test_bad_expire_ops_are_refused_naming_the_field(tmp_path: Path) -> None:
    """An expire with no put before it, a ttl out of range, an unstamped expire: refused
    with the field named, nothing written."""
    for ttl in (0, -1, 0.5, 10 * 365 * 86_400 + 1, "60", True, None, float("nan")):
        with pytest.raises(InvalidArgument) as refused:
            expire_op(ttl)
        assert refused.value.field == "ttl"
    store = Store(tmp_path / "s")
    with store.write() as batch:
        for ops in ([expire_op(5)], [row_put_op(b"r", b"v"), expire_op(5, b"other")],
                    [protocol.delete_op(), expire_op(5)]):
            with pytest.raises(InvalidArgument) as refused:
                batch.mutate(b"k", stamped(ops, now_ms()))
            assert refused.value.field == "ops"
        with pytest.raises(InvalidArgument) as refused:   # no node set its instant
            batch.mutate(b"k", [put_op(b"v"), expire_op(5)])
        assert refused.value.field == "ops"
    # The node's clock decides the instant, never the caller's.
    chosen = stamped([put_op(b"v"), protocol.Op(_core.OP_EXPIRE, b"",
                                                 protocol.stamped_expiry(1, 60_000))], 5_000)
    assert protocol.expiry_of(chosen[1].value) == (65_000, 60_000)
    bad = [put_op(b"v"), protocol.Op(_core.OP_EXPIRE, b"", (0).to_bytes(8, "little") * 2)]
    with pytest.raises(InvalidArgument) as refused:
        expiry.stamp(bad, now_ms())
    assert refused.value.field == "ttl"
    with store.read() as txn:
        assert store.key_state(txn, b"k").version == 0
    store.close()


def test_a_snapshot_copy_carries_the_instants_and_rebuilds_the_index(tmp_path: Path) -> None:
    """A replica that copies a peer's store gets the same instants and an expiry index in
    step with them (the one it had for the replaced keys goes)."""
    source, target = Store(tmp_path / "a"), Store(tmp_path / "b")
    t = now_ms()
    with source.write() as batch:
        batch.mutate(b"k", stamped([put_op(b"v"), expire_op(60)], t))
        batch.mutate(b"t", stamped([row_put_op(b"r", b"v"), expire_op(30, b"r")], t))
        batch.mutate(b"k", stamped([put_op(b"w"), expire_op(90)], t))
    with target.write() as batch:
        batch.mutate(b"k", stamped([put_op(b"mine"), expire_op(10)], t))
    with source.read() as txn:
        items, position = source.snapshot_page(txn, None, 1 << 20)
    assert position is None
    with target.write() as batch:
        installing = False
        for item in items:
            installing = batch.install(item, installing)
    with target.read() as txn:
        assert target.expiring(txn, 2**63, 10) == [(t + 30_000, b"t", b"r"),
                                                    (t + 90_000, b"k", b"")]
        assert target.get(txn, b"k").value == b"w"
    source.close()
    target.close()


def test_a_version_2_store_is_upgraded_in_place(tmp_path: Path) -> None:
    """A store written by the code before expiry (schema 2, no expiry table) opens: its data
    reads as before, the schema becomes 3, and ttls work on it."""
    path = tmp_path / "v2"
    shutil.copytree(TESTDATA / "store_v2", path)
    store = Store(path)
    with store.read() as txn:
        assert SCHEMA.unpack(txn.get(Meta.SCHEMA, db=store.tables.meta))[0] == SCHEMA_VERSION
        assert store.get(txn, b"plain").value == b"v1"
        assert [r.row for r in store.scan(txn, b"table", b"", None, 10).rows] == [b"r1"]
        with pytest.raises(NotFound):
            store.get(txn, b"gone")
        assert store.expiring(txn, 2**63, 10) == []
    with store.write() as batch:
        batch.mutate(b"plain", stamped([put_op(b"v2"), expire_op(60)], now_ms()))
    with store.read() as txn:
        assert store.get(txn, b"plain") == protocol.Versioned(2, b"v2")
        assert len(store.expiring(txn, 2**63, 10)) == 1
    store.close()


def test_the_purger_staggers_replicas_and_skips_keys_in_flight() -> None:
    """Replica i takes an entry only i staggers past its instant; a key proposed is not
    proposed again until the retry time, or until its removal was applied."""
    entries = [(1000, b"a", b""), (1000, b"t", b"r1"), (1000, b"t", b"r2"), (5000, b"b", b"")]
    first, second = expiry.Purger(0), expiry.Purger(2000)
    chosen = first.choose(entries, 4000, now=0.0)
    assert [(key, [op.row for op in ops]) for key, ops in chosen] == \
        [(b"a", [b""]), (b"t", [b"r1", b"r2"])]
    assert all(op.kind == _core.OP_PURGE for _, ops in chosen for op in ops)
    assert first.choose(entries, 4000, now=1.0) == []          # in flight
    assert second.choose(entries, 2500, now=0.0) == []         # not overdue enough for it
    assert [key for key, _ in second.choose(entries, 3000, now=0.0)] == [b"a", b"t"]
    first.done(b"a")
    assert [key for key, _ in first.choose(entries, 4000, now=2.0)] == [b"a"]
    assert [key for key, _ in first.choose(entries, 9000, now=100.0)] == [b"a", b"t", b"b"]


# --- real processes -----------------------------------------------------------------------
@pytest.fixture
def group(tmp_path: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(write_cluster_config(tmp_path, replicas=3), log_dir=tmp_path / "logs")
    local.start()
    try:
        yield local
    finally:
        local.stop()


def replica_client(group: LocalCluster, node: str) -> Client:
    return Client(address=group.address(node), timeout=5.0)


def local_absent(group: LocalCluster, node: str, key: bytes) -> int | None:
    with replica_client(group, node) as c:
        return absent_version(c, key, consistency="local")


def test_ttl_through_the_client_on_one_node_then_removed(cluster: LocalCluster,
                                                         client: Client) -> None:
    """A single node: put and row_put with a ttl read back, then read absent; the removal
    comes as the next version; a put without ttl clears an earlier one; bad ttls refused."""
    v = client.put(b"k", b"v", ttl=1)
    client.row_put(b"t", b"r", b"x", ttl=1)
    client.row_put(b"t", b"s", b"y")
    client.put(b"kept", b"v", ttl=1)
    client.put(b"kept", b"again")            # no ttl: it no longer expires
    client.batch(b"b").put(b"v", ttl=1).commit()
    assert client.get(b"k").value == b"v"
    assert client.row_get(b"t", b"r").value == b"x"
    for ttl in (0, -5, 10**10, "x"):
        with pytest.raises(InvalidArgument) as refused:
            client.put(b"k", b"other", ttl=ttl)
        assert refused.value.field == "ttl"
    time.sleep(1.2)
    assert absent_version(client, b"k") is not None
    assert absent_version(client, b"b") is not None
    assert [r.row for r in client.scan(b"t").rows] == [b"s"]
    assert client.get(b"kept").value == b"again"
    wait_for(lambda: absent_version(client, b"k") == v + 1, what="the removal's version")
    wait_for(lambda: client.status()["store"]["expiring"] == 0, what="the index emptied")
    changes = client.changes(b"t", 0).changes
    assert [(c.row, c.deleted) for c in changes] == [(b"s", False), (b"r", True)]


def test_ttl_through_the_cli(cluster: LocalCluster) -> None:
    """`kvsvr put KEY VALUE --ttl S` and `row-put ... --ttl S`; a bad --ttl exits non-zero
    naming ttl."""
    def kv(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvsvr.cli", "--config",
                               str(cluster.config_path), *args],
                              capture_output=True, text=True, timeout=30)

    assert kv("put", "k", "v", "--ttl", "1").returncode == 0
    assert kv("row-put", "t", "r", "x", "--ttl", "1").returncode == 0
    assert kv("get", "k").stdout.strip() == "v"
    refused = kv("put", "k", "w", "--ttl", "0")
    assert refused.returncode != 0 and "ttl" in refused.stderr
    time.sleep(1.2)
    assert kv("get", "k").returncode != 0
    assert kv("row-get", "t", "r").returncode != 0


def test_expiry_on_every_replica_across_sigkill_and_restart(group: LocalCluster) -> None:
    """A group of 3: the value and row expire on every replica's own copy; one replica
    SIGKILLed before the instant and started after it never reads them back; the removal is
    one replicated version that every replica applies."""
    nodes = group.nodes
    with group.client(timeout=10.0) as client:
        version = client.put(b"k", b"v", ttl=2)
        client.row_put(b"t", b"r", b"x", ttl=2)
        client.put(b"forever", b"v")
        wait_for(lambda: all(local_absent(group, n, b"k") is None for n in nodes),
                 what="every replica has the value")
        group.kill(nodes[2])
        wait_for(lambda: all(local_absent(group, n, b"k") is not None for n in nodes[:2]),
                 timeout=10.0, what="expired on the live replicas")
        for node in nodes[:2]:
            with replica_client(group, node) as c, pytest.raises(NotFound):
                c.row_get(b"t", b"r", consistency="local")
        group.start(nodes[2])
        assert local_absent(group, nodes[2], b"k") is not None   # never back, even stale
        wait_for(lambda: all(local_absent(group, n, b"k") == version + 1 for n in nodes),
                 what="the removal applied everywhere")
        for node in nodes:
            with replica_client(group, node) as c:
                assert c.get(b"forever", consistency="local").value == b"v"
                assert [r.row for r in c.scan(b"t", consistency="local").rows] == []
        wait_for(lambda: all(replica_client(group, n).status()["store"]["expiring"] == 0
                             for n in nodes), what="every index emptied")
        assert client.put(b"k", b"back") == version + 2   # a re-put after it is plain
        assert client.get(b"k").value == b"back"


def test_a_re_put_racing_the_removal_and_a_stopped_first_purger(group: LocalCluster) -> None:
    """A group of 3 with its first replica (the first to remove) SIGSTOPped: the next one
    removes what expired once its stagger passed. A key put again and again, with a ttl and
    without, while the removals run keeps its newest value on every replica (the rule that a
    removal takes only what is still expired is tested on the store above)."""
    nodes = group.nodes
    with group.client(timeout=10.0) as client:
        gone = client.put(b"gone", b"v", ttl=1)
        client.put(b"raced", b"v0", ttl=1)
        group.signal(nodes[0], signal.SIGSTOP)
        try:
            last = b"v0"
            deadline = time.monotonic() + 4.5   # past the instant and two staggers
            i = 0
            while time.monotonic() < deadline:
                i += 1
                last = b"v%d" % i
                client.put(b"raced", last, ttl=1 if i % 2 else None)
                time.sleep(0.05)
            wait_for(lambda: all(local_absent(group, n, b"gone") == gone + 1
                                 for n in nodes[1:]), what="removed without the first")
            if i % 2:   # the last put expires: it may read absent already, never older
                client.put(b"raced", last)
        finally:
            group.signal(nodes[0], signal.SIGCONT)
        wait_for(lambda: local_absent(group, nodes[0], b"gone") == gone + 1,
                 what="the stopped replica catches up")
        time.sleep(1.5)   # any removal still under way lands
        for node in nodes:
            with replica_client(group, node) as c:
                assert c.get(b"raced", consistency="local").value == last


def test_instants_survive_a_sigkill_of_a_single_node(cluster: LocalCluster) -> None:
    """What a SIGKILLed node acknowledged keeps its instant: a value still live comes back
    live and then expires on time; one expired reads absent from the restart on."""
    with cluster.client(timeout=10.0) as client:
        client.put(b"short", b"v", ttl=1)
        client.put(b"long", b"v", ttl=3)
        client.row_put(b"t", b"r", b"v", ttl=3)
        started = time.monotonic()
    cluster.kill("n1")
    time.sleep(1.1)
    cluster.start("n1")
    with cluster.client(timeout=10.0) as client:
        assert absent_version(client, b"short") is not None
        assert client.get(b"long").value == b"v"
        assert client.row_get(b"t", b"r").value == b"v"
        time.sleep(max(0.0, started + 3.1 - time.monotonic()))
        assert absent_version(client, b"long") is not None
        with pytest.raises(NotFound):
            client.row_get(b"t", b"r")


def test_a_watcher_sees_the_removal_as_a_version(cluster: LocalCluster,
                                                 client: Client) -> None:
    """The background removal is a new version of the key: a watch parked on the node wakes
    with it (the value gone), and a table's watcher gets the row as deleted."""
    version = client.put(b"w", b"v", ttl=1)
    table = client.row_put(b"wt", b"r", b"v", ttl=1)
    started = time.monotonic()
    event = next(client.watch(b"w", version, timeout=10.0, wait=5.0))
    assert event.version == version + 1 and event.value is None
    assert time.monotonic() - started < 4.0   # woken by the removal, not its poll's end
    row_event = next(client.watch(b"wt", table, timeout=10.0, wait=5.0))
    assert [(c.row, c.deleted) for c in row_event.changes] == [(b"r", True)]
