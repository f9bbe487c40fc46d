"""A real kvsvr-node process driven by real clients: every operation end to end, and the
durability promise under SIGKILL, SIGSTOP and SIGTERM: every acknowledged write is there
exactly once after a restart, and no multi-op batch is ever half applied."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import kvsvr
from kvsvr import AsyncClient, Client, NotFound, VersionConflict
from kvsvr.launcher import LocalCluster, write_single_node_config
from tests.histories import random_op


def test_every_operation_through_the_blocking_client(client: Client):
    assert client.put("k", "v1") == 1
    assert client.get("k") == kvsvr.Versioned(1, b"v1")
    assert client.put("k", "v2", expected_version=1) == 2
    with pytest.raises(VersionConflict) as conflict:
        client.put("k", "v3", expected_version=1)
    assert conflict.value.version == 2
    assert client.delete("k") == 3
    with pytest.raises(NotFound) as missing:
        client.get("k")
    assert missing.value.version == 3
    assert client.incr("n") == 1 and client.incr("n", 41) == 42
    assert [client.append("inbox", f"m{i}") for i in range(3)] == [0, 1, 2]
    page = client.scan("inbox")
    assert [kvsvr.seq_of_row(r.row) for r in page.rows] == [0, 1, 2]
    assert [r.value for r in page.rows] == [b"m0", b"m1", b"m2"]
    client.row_put("t", "a", "1")
    client.row_put("t", "b", "2")
    client.row_delete("t", "a")
    assert client.row_get("t", "b").value == b"2"
    with pytest.raises(NotFound):
        client.row_get("t", "a")
    changes = client.changes("t", 1)
    assert [(c.row, c.deleted) for c in changes.changes] == [(b"b", False), (b"a", True)]
    reply = client.batch("acct").put("7").incr(3).row_put("r", "x").append("e").commit()
    assert reply.version == 1 and reply.results == [None, 10, None, 0]
    pipeline = client.pipeline()
    pipeline.put("p", "1")
    pipeline.get("p")
    pipeline.get("absent")
    results = pipeline.execute()
    assert results[0] == 1 and results[1].value == b"1" and isinstance(results[2], NotFound)
    status = client.status()
    assert status["store"]["binlog_last_lsn"] >= 12 and status["node"] == "n1"


def test_asyncio_client_pipelines_many_concurrent_calls(cluster: LocalCluster):
    async def run() -> None:
        async with AsyncClient(cluster.config) as client:
            versions = await asyncio.gather(*(client.put(f"a{i}", str(i)) for i in range(3000)))
            assert versions == [1] * 3000
            values = await asyncio.gather(*(client.get(f"a{i}") for i in range(3000)))
            assert [v.value for v in values] == [str(i).encode() for i in range(3000)]
            counts = await asyncio.gather(*(client.incr("shared") for _ in range(500)))
            assert sorted(counts) == list(range(1, 501))
            with pytest.raises(NotFound):
                await client.get("nothing")

    asyncio.run(run())


def _worker(config_path: str, worker: int, seconds: float, results: multiprocessing.Queue):
    """Writes until told to stop; reports what was acknowledged and what stayed ambiguous."""
    acked_puts, acked_incrs, acked_appends, ambiguous = [], 0, [], 0
    deadline = time.monotonic() + seconds
    with Client(config_path, timeout=30.0, attempt_timeout=0.3) as client:
        i = 0
        while time.monotonic() < deadline:
            try:
                client.put(f"w{worker}:{i}", f"value-{worker}-{i}")
                acked_puts.append(i)
                client.incr("counter")
                acked_incrs += 1
                seq = client.append("inbox", f"{worker}:{i}")
                acked_appends.append((seq, f"{worker}:{i}"))
                client.batch(f"batch:{worker}:{i % 20}").put(str(i)).row_put("a", str(i)) \
                    .row_put("b", str(i)).commit()
            except kvsvr.Timeout:
                ambiguous += 1
            i += 1
    results.put((worker, acked_puts, acked_incrs, acked_appends, ambiguous))


def _check_acknowledged(client: Client, outcomes: list) -> None:
    total_incrs = sum(o[2] for o in outcomes)
    ambiguous = sum(o[4] for o in outcomes)
    for worker, puts, _incrs, _appends, _amb in outcomes:
        assert puts, f"worker {worker} got nothing acknowledged"
        for i in puts:
            assert client.get(f"w{worker}:{i}").value == f"value-{worker}-{i}".encode()
        for i in range(20):
            key = f"batch:{worker}:{i}"
            try:
                value = client.get(key).value
            except NotFound:
                continue
            # A batch is all or nothing: the value and both rows come from the same commit.
            assert client.row_get(key, "a").value == value == client.row_get(key, "b").value
    counter = int(client.get("counter").value)
    assert total_incrs <= counter <= total_incrs + ambiguous, "an incr was lost or doubled"
    rows = []
    start: bytes | None = b""
    while start is not None:
        page = client.scan("inbox", start)
        rows.extend(page.rows)
        start = page.next_start
    stored = {kvsvr.seq_of_row(r.row): r.value.decode() for r in rows}
    acked = {seq: body for o in outcomes for seq, body in o[3]}
    for seq, body in acked.items():
        assert stored.get(seq) == body, f"acknowledged append {seq} lost"
    assert len(stored) <= len(acked) + ambiguous, "an append was applied twice"
    assert len(set(stored.values())) == len(stored), "an append was applied twice"


def _start_workers(config: Path, seconds: float, processes: int) -> tuple[list, Any]:
    """`processes` spawned _worker processes and the queue their outcomes arrive on."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_worker, args=(str(config), w, seconds, results))
               for w in range(processes)]
    for w in workers:
        w.start()
    return workers, results


def test_sigkill_mid_workload_loses_nothing_acknowledged(tmp_path: Path):
    config = write_single_node_config(tmp_path)
    cluster = LocalCluster(config, log_dir=tmp_path / "logs")
    cluster.start()
    workers, results = _start_workers(config, 6.0, 3)
    # Threads in this process too: a Client is shared by threads.
    thread_outcomes: list = []

    def thread_worker(worker: int) -> None:
        q: multiprocessing.Queue = multiprocessing.Queue()
        _worker(str(config), worker, 6.0, q)
        thread_outcomes.append(q.get())

    threads = [threading.Thread(target=thread_worker, args=(10 + t,)) for t in range(2)]
    try:
        for t in threads:
            t.start()
        time.sleep(2.0)
        cluster.kill("n1")                      # mid-workload, no warning
        time.sleep(0.5)
        cluster.start("n1")
        time.sleep(1.0)
        cluster.kill("n1")                      # and once more
        cluster.start("n1")
        outcomes = [results.get(timeout=60) for _ in workers]
        for w in workers:
            w.join(timeout=10)
        for t in threads:
            t.join(timeout=60)
        outcomes += thread_outcomes
        assert len(outcomes) == 5
        cluster.kill("n1")                      # a final crash with nothing in flight
        cluster.start("n1")
        with cluster.client(timeout=10.0) as client:
            _check_acknowledged(client, outcomes)
    finally:
        cluster.stop()


def test_sigstop_pauses_the_node_and_clients_carry_on(tmp_path: Path):
    config = write_single_node_config(tmp_path)
    cluster = LocalCluster(config, log_dir=tmp_path / "logs")
    cluster.start()
    workers, results = _start_workers(config, 5.0, 2)
    try:
        time.sleep(1.5)
        cluster.signal("n1", signal.SIGSTOP)
        time.sleep(2.0)                         # clients time out attempts and resend
        cluster.signal("n1", signal.SIGCONT)
        outcomes = [results.get(timeout=60) for _ in workers]
        with cluster.client(timeout=10.0) as client:
            _check_acknowledged(client, outcomes)
            status = client.status()
        # Resent requests that were answered from the op-id table did not apply twice.
        assert status["counters"].get("mutations", 0) >= 1
    finally:
        cluster.stop()


def test_sigterm_stops_cleanly_and_data_survives(tmp_path: Path):
    cluster = LocalCluster(write_single_node_config(tmp_path), log_dir=tmp_path / "logs")
    cluster.start()
    with cluster.client() as client:
        client.put("durable", "yes")
    assert cluster.stop() == {"n1": 0}
    assert "stopped" in (tmp_path / "logs" / "n1.log").read_text()
    cluster.start()
    try:
        with cluster.client() as client:
            assert client.get("durable").value == b"yes"
    finally:
        cluster.stop()


def test_the_nodes_zeromq_io_thread_never_preempts_its_loop(cluster: LocalCluster):
    """SCHED_BATCH (see kvsvr.sockets.node_context): woken, it waits for the core it wants."""
    with Client(address=cluster.address(cluster.nodes[0]), timeout=5.0) as client:
        client.put(b"warm", b"x")   # (the I/O thread exists from the first socket on)
    pid = cluster.processes[cluster.nodes[0]].pid
    policies = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = (task / "comm").read_text().strip()
        policies.setdefault(name, set()).add(os.sched_getscheduler(int(task.name)))
    assert policies.get("ZMQbg/IO/0") == {os.SCHED_BATCH}, policies
    others = {name: p for name, p in policies.items() if not name.startswith("ZMQbg")}
    assert others and all(os.SCHED_BATCH not in p for p in others.values()), policies


def test_a_scheduling_policy_the_process_may_not_take_is_not_asked_of_zeromq():
    """libzmq aborts the process if it cannot set its thread's policy: probed first."""
    from kvsvr.sockets import may_schedule
    assert may_schedule(os.SCHED_BATCH)
    assert not may_schedule(12345)   # no such policy: refused, and nothing else happens


def test_a_second_node_on_the_same_data_dir_is_refused(cluster: LocalCluster):
    result = subprocess.run(
        [sys.executable, "-m", "kvsvr.node", "--config", cluster.config_path, "--node", "n1"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "another process holds this data directory" in result.stderr


def _same_address_config(cluster: LocalCluster, tmp_path: Path) -> Path:
    """The cluster's config with its node's data elsewhere: a second node on the address."""
    text = Path(cluster.config_path).read_text().replace('data_dir = "data/n1"',
                                                         f'data_dir = "{tmp_path / "other"}"')
    config = tmp_path / "busy.toml"
    config.write_text(text)
    return config


def test_a_busy_address_is_a_clear_error(cluster: LocalCluster, tmp_path: Path):
    config = _same_address_config(cluster, tmp_path)
    result = subprocess.run([sys.executable, "-m", "kvsvr.node", "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "cannot listen on tcp://127.0.0.1:" in result.stderr


def test_kvsvr_cluster_on_busy_addresses_fails_instead_of_reporting_them_up(
        cluster: LocalCluster, tmp_path: Path):
    """Another node already answers on the address: kvsvr-cluster used to take its answer for
    its own node's, print "1 node(s) up", and run on with no node. Now it exits 1 naming
    the node whose process exited."""
    config = _same_address_config(cluster, tmp_path)
    result = subprocess.run([sys.executable, "-m", "kvsvr.launcher", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "node n1 exited" in result.stderr and "up:" not in result.stdout
    with cluster.client(timeout=5.0) as client:   # the node that was there serves on
        client.put("k", "v")


def test_a_write_that_timed_out_on_a_dead_node_is_not_applied_when_it_comes_back(
        cluster: LocalCluster):
    """The client's socket to a node that is down queues what it sends (ZeroMQ keeps it for
    the reconnect). A call that reported Timeout left its request there, and the restarted
    node applied it seconds or minutes after the caller gave up (and maybe wrote again).
    The socket of a replica that left an attempt unanswered is now closed with its queue,
    by the blocking and the asyncio client; and a client sends only on a live connection, so
    once it has seen the node go it answers Unavailable (nothing sent) instead."""
    with Client(cluster.config, timeout=1.5, attempt_timeout=0.5) as client:
        client.append("inbox", "before")
        cluster.kill("n1")
        for i in range(3):
            with pytest.raises((kvsvr.Timeout, kvsvr.Unavailable)):
                client.append("inbox", f"timed out {i}")

        async def timed_out_async() -> None:
            async with AsyncClient(cluster.config, timeout=1.5, attempt_timeout=0.5) as aio:
                for i in range(3):
                    with pytest.raises((kvsvr.Timeout, kvsvr.Unavailable)):
                        await aio.append("inbox", f"timed out async {i}")
                cluster.start("n1")
                await asyncio.sleep(1.0)   # (the client and its sockets still live)

        asyncio.run(timed_out_async())
        time.sleep(0.5)
        with Client(cluster.config, timeout=10.0) as reader:
            rows = [r.value for r in reader.scan("inbox").rows]
        assert rows == [b"before"], rows


def test_bad_config_exits_2_naming_the_field(tmp_path: Path):
    config = tmp_path / "bad.toml"
    config.write_text('[[groups]]\nname = "g"\nshards = ["0-4095"]\n'
                      '[[groups.replicas]]\nnode = "n1"\ncampus = "a"\n'
                      'address = "localhost:1"\ndata_dir = "d"\n')
    result = subprocess.run([sys.executable, "-m", "kvsvr.node", "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "groups[0].replicas[0].address" in result.stderr


def test_a_lone_replica_of_a_group_never_serves_alone(tmp_path: Path):
    """One replica of a 3-replica group started without its peers cannot learn whether it
    had an earlier life (a lost disk) nor reach a majority: it answers pings, refuses data
    calls with Unavailable naming its role, and stops cleanly on SIGTERM."""
    from kvsvr.launcher import write_cluster_config

    config = write_cluster_config(tmp_path, replicas=3)
    cluster = LocalCluster(config, log_dir=tmp_path / "logs")
    cluster.start("n1")
    try:
        with Client(address=cluster.address("n1"), timeout=1.0) as client:
            assert client.ping()["node"] == "n1"
            assert client.status()["role"] == "joining"
            with pytest.raises(kvsvr.Unavailable, match="joining"):
                client.put("k", "v")
            with pytest.raises(kvsvr.Unavailable):
                client.get("k", consistency="local")
    finally:
        assert cluster.stop() == {"n1": 0}


def test_history_across_sigkills_is_linearizable(tmp_path: Path):
    """Threads hammer a few hot keys (get, put, compare-and-set, incr, append, scan) while the
    node is SIGKILLed and restarted twice; the recorded history must linearize per key."""
    from kvsvr.testing.linearizability import Op, check

    cluster = LocalCluster(write_single_node_config(tmp_path), log_dir=tmp_path / "logs")
    cluster.start()
    history: list[Op] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(process: int) -> None:
        rng = random.Random(process)
        with cluster.client(timeout=8.0, attempt_timeout=0.3) as client:
            while not stop.is_set():
                op, _ = random_op(client, rng, process)
                with lock:
                    history.append(op)

    threads = [threading.Thread(target=worker, args=(p,)) for p in range(6)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)
        cluster.kill("n1")
        cluster.start("n1")
        time.sleep(1.5)
        cluster.kill("n1")
        time.sleep(0.3)
        cluster.start("n1")
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        stop.set()
        cluster.stop()
    assert len(history) > 300
    ok, problem = check(history)
    assert ok, problem


def test_two_groups_split_the_keys_by_shard(tmp_path: Path):
    """A cluster of two single-replica groups: the client routes each key to its shard's
    group, both nodes hold some of the keys, and every key reads back."""
    from kvsvr.launcher import free_port
    from kvsvr.sharding import ShardMap

    config = tmp_path / "two.toml"
    config.write_text("".join(f'''
[[groups]]
name = "g{g}"
shards = ["{first}-{last}"]
[[groups.replicas]]
node = "n{g}"
campus = "a"
address = "tcp://127.0.0.1:{free_port()}"
data_dir = "data/n{g}"
''' for g, (first, last) in enumerate([(0, 2047), (2048, 4095)])))
    cluster = LocalCluster(config, log_dir=tmp_path / "logs")
    cluster.start()
    try:
        with cluster.client() as client:
            pipeline = client.pipeline()
            for i in range(200):
                pipeline.put(f"user:{i}", f"v{i}")
            assert pipeline.execute(raise_errors=True) == [1] * 200
            for i in range(200):
                assert client.get(f"user:{i}").value == f"v{i}".encode()
            shards = ShardMap(cluster.config)
            expected = {"g0": 0, "g1": 0}
            for i in range(200):
                expected[shards.group_of(f"user:{i}".encode()).name] += 1
        for g in (0, 1):
            with Client(address=cluster.address(f"n{g}")) as node_client:
                assert node_client.status()["store"]["keys"] == expected[f"g{g}"] > 0
        # A key sent straight to a node of the other group is refused, not stored there
        # (it was acknowledged, and every routed read then asked its real owner).
        foreign = next(f"user:{i}" for i in range(200)
                       if shards.group_of(f"user:{i}".encode()).name == "g1")
        with Client(address=cluster.address("n0")) as node_client:
            for call in (lambda: node_client.put(foreign, "x"),
                         lambda: node_client.get(foreign, consistency="local")):
                with pytest.raises(kvsvr.InvalidArgument, match="group 'g1' owns") as error:
                    call()
                assert error.value.field == "key"
            assert node_client.status()["store"]["keys"] == expected["g0"]
    finally:
        cluster.stop()
