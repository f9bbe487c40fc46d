"""kvsvr-node's built-in ids: real nodes count requests, failures, latency buckets, bytes,
group commits, quorum decisions and binlog lag into the machine's counters file, and a node
whose counters file is unusable still serves."""

from __future__ import annotations

import time
from pathlib import Path

import zmq

from kvsvr import _core
from kvsvr.launcher import LocalCluster, write_cluster_config
from kvsvr.limits import COUNTERS_FILE_IDS_DEFAULT
from kvsvr.monitor import registry as ids
from kvsvr.monitor.counters import open_counters

LATENCY_IDS = [ids.NODE_LATENCY_1MS, ids.NODE_LATENCY_5MS, ids.NODE_LATENCY_20MS,
               ids.NODE_LATENCY_100MS, ids.NODE_LATENCY_1S, ids.NODE_LATENCY_SLOWER]


def _config(directory: Path, replicas: int, counters_path: Path) -> Path:
    path = write_cluster_config(directory, replicas=replicas)
    with open(path, "a") as f:
        f.write(f'\n[monitor]\ncounters_path = "{counters_path}"\n')
    return path


def _totals(counters: _core.Counters, id_list: list[int]) -> dict[int, int]:
    now = counters.now_s()
    return {i: sum(counters.value_at(i, s) or 0 for s in range(now - 300, now + 1))
            for i in id_list}


def _settled(counters: _core.Counters, id_list: list[int]) -> dict[int, int]:
    """Totals once they stop moving (the node counts a round after answering it)."""
    previous = _totals(counters, id_list)
    for _ in range(50):
        time.sleep(0.3)
        current = _totals(counters, id_list)
        if current == previous:
            return current
        previous = current
    raise AssertionError(f"counters still moving after 15 s: {previous}")


def test_a_single_node_counts_requests_failures_latency_and_bytes(tmp_path):
    """Forty puts and gets, then three malformed messages: requests, failures, bad frames,
    group commits and mutations move by exactly that, and every request is in one latency
    bucket."""
    counters_path = tmp_path / "counters"
    with LocalCluster(_config(tmp_path, 1, counters_path), log_dir=tmp_path / "logs") as cluster:
        counters = open_counters(counters_path)
        watched = [ids.NODE_REQUESTS, ids.NODE_FAILURES, ids.NODE_BAD_FRAMES,
                   ids.NODE_GROUP_COMMITS, ids.NODE_MUTATIONS, ids.NODE_BYTES_IN,
                   ids.NODE_BYTES_OUT, *LATENCY_IDS]
        before = _settled(counters, watched)
        with cluster.client() as client:
            for i in range(20):
                client.put(f"k{i}", b"v")
                client.get(f"k{i}", consistency="local")
        context = zmq.Context()
        socket = context.socket(zmq.DEALER)
        socket.connect(cluster.address("n1"))
        for _ in range(3):
            socket.send(b"not a frame at all")
            assert socket.poll(5000)
            socket.recv()
        socket.close(0)
        context.term()
        after = _settled(counters, watched)
    moved = {i: after[i] - before[i] for i in watched}
    assert moved[ids.NODE_REQUESTS] == 40
    assert moved[ids.NODE_BAD_FRAMES] == 3
    assert moved[ids.NODE_FAILURES] == 3
    assert moved[ids.NODE_MUTATIONS] == 20
    assert 1 <= moved[ids.NODE_GROUP_COMMITS] <= 20
    assert sum(moved[i] for i in LATENCY_IDS) == 40 + 3
    assert moved[ids.NODE_BYTES_IN] > 40 * 24 and moved[ids.NODE_BYTES_OUT] > 40 * 24


def test_replicas_count_group_commits_client_requests_and_binlog_lag(tmp_path):
    """A 3-replica group under writes: group commits and applied mutations on the machine
    (3 replicas x 10 writes), the clients' requests (not the replicas' traffic between
    themselves), and the binlog lag gauge showing the streams behind while writes flow."""
    counters_path = tmp_path / "counters"
    with LocalCluster(_config(tmp_path, 3, counters_path), log_dir=tmp_path / "logs") as cluster:
        counters = open_counters(counters_path)
        watched = [ids.NODE_MUTATIONS, ids.NODE_GROUP_COMMITS, ids.NODE_REQUESTS]
        before = _settled(counters, watched)
        with cluster.client() as client:
            for i in range(10):
                client.put(f"key-{i}", b"v")
        time.sleep(1.5)
        after = _settled(counters, watched)
        # While writes flow, every replica's streams have records to pull: the gauge holds
        # the most a stream was behind in each second (a point sample would read 0).
        first = counters.now_s()
        with cluster.client() as client:
            deadline, n = time.monotonic() + 2.5, 0
            while time.monotonic() < deadline:
                client.put(f"lag-{n}", b"v")
                n += 1
        time.sleep(1.2)
        lag = [counters.value_at(ids.NODE_BINLOG_LAG, s)
               for s in range(first, counters.now_s() + 1)]
    assert after[ids.NODE_MUTATIONS] - before[ids.NODE_MUTATIONS] == 30
    assert after[ids.NODE_GROUP_COMMITS] > before[ids.NODE_GROUP_COMMITS]
    # Clients' requests only: the replicas' own pulls and barriers between them are not.
    assert after[ids.NODE_REQUESTS] - before[ids.NODE_REQUESTS] == 10
    assert counters.kind(ids.NODE_QUORUM_RETRIES) == _core.KIND_COUNTER
    assert any(v is not None and v > 0 for v in lag), lag


def test_a_node_with_an_unusable_counters_file_still_serves(tmp_path):
    """A counters file that is not one (garbage) turns monitoring off for the node, says so
    in its log, and the node serves as ever; the file is left untouched."""
    counters_path = tmp_path / "counters"
    counters_path.write_bytes(b"garbage" * 100)
    cluster = LocalCluster(_config(tmp_path, 1, counters_path), log_dir=tmp_path / "logs")
    with cluster, cluster.client() as client:
        client.put("k", b"v")
        assert client.get("k").value == b"v"
    assert counters_path.read_bytes() == b"garbage" * 100
    log = (tmp_path / "logs" / "n1.log").read_text()
    assert "monitoring is off for this process" in log and "magic" in log


def test_a_node_keeps_serving_and_counting_after_the_clock_went_back(tmp_path):
    """Every bucket of every built-in id holds a second a whole window ahead (what a clock
    stepped back by more than the window leaves): the node used to fail each request on its
    first add() and then exit. Now it serves every request and counts them at its clock."""
    counters_path = tmp_path / "counters"
    counters = open_counters(counters_path, max_ids=COUNTERS_FILE_IDS_DEFAULT,
                             window_s=_core.WINDOW_S_DEFAULT, registry=ids.builtin_registry())
    window = counters.window_s
    ahead = counters.now_s() + window + 5
    for entry in ids.BUILTIN:
        write = counters.set_at if entry.kind == "gauge" else counters.add_at
        for second in range(ahead, ahead + window):
            write(entry.id, 1000, second)
    cluster = LocalCluster(_config(tmp_path, 1, counters_path), log_dir=tmp_path / "logs")
    with cluster, cluster.client() as client:
        before = _settled(counters, [ids.NODE_REQUESTS])[ids.NODE_REQUESTS]
        for i in range(20):
            client.put(f"k{i}", b"v")
            assert client.get(f"k{i}", consistency="local").value == b"v"
        after = _settled(counters, [ids.NODE_REQUESTS])[ids.NODE_REQUESTS]
        assert cluster.processes["n1"].poll() is None
    assert after - before == 40
    assert "monitoring is off" not in (tmp_path / "logs" / "n1.log").read_text()
