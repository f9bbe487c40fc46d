"""Regression tests for the quorum queue review, each on real server
processes: a batch's whole life is bounded (the gap rule never drops an acknowledged
message), producer ids are not reused, a handler error loses nothing, a dead server never
hangs the CLI or the launcher, and closing a producer with a stuck batch returns."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvsvr.errors import InvalidArgument, Timeout
from quorumq import Consumer, Producer
from quorumq.launcher import LocalQueueCluster, write_queue_config
from tests.queue_clusters import consume_topic, running_queue

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalQueueCluster]:
    """One queue group (3 servers) with short deadlines, topic "t"."""
    with running_queue(tmp_path, ack_deadline_ms=500, clock_skew_ms=0,
                       batch_lifetime_ms=1500) as queue:
        yield queue


def test_a_batch_retried_past_the_gap_rule_is_never_acknowledged(tmp_path):
    """The reviewer's counterexample: batch A (seq 10..19) is stuck on group q1 (SIGSTOPped)
    while Z (0..9, moved to q2) and B (20..29) commit; the producer process is then paused
    and q1 is SIGKILLed and restarted. The consumer gives the gap up after batch_lifetime;
    when the producer resumes, A must not be acknowledged any more (it expired: the caller
    gets Timeout). Every acknowledged message is consumed, with its own value."""
    config = write_queue_config(tmp_path, groups=2, ack_deadline_ms=500, clock_skew_ms=0,
                                batch_lifetime_ms=1500)
    queue = LocalQueueCluster(config, log_dir=tmp_path / "logs")
    queue.start()
    queue.create_topic("t")
    consumed = tmp_path / "consumed.txt"
    produced = tmp_path / "produced.txt"

    def spawn(*args: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{args[0]}.log", "ab")  # noqa: SIM115
        try:
            return subprocess.Popen([sys.executable, "-m", "tests.queue_workers", *args,
                                     "--config", str(config)], cwd=ROOT, stdout=log,
                                    stderr=log)
        finally:
            log.close()

    consumer = spawn("consume", "--out", str(consumed))
    producer = spawn("gap_produce", "--out", str(produced))
    try:
        time.sleep(2.0)
        for node in queue.group_nodes("q1"):
            queue.signal(node, signal.SIGSTOP)
        (tmp_path / "go").write_text("x")
        deadline = time.monotonic() + 30
        while not (tmp_path / "b_committed").exists():
            assert time.monotonic() < deadline, "B never committed"
            assert producer.poll() is None, "the producer died"
            time.sleep(0.005)
        producer.send_signal(signal.SIGSTOP)   # a paused producer (GC, VM steal, SIGSTOP)
        for node in queue.group_nodes("q1"):
            queue.kill(node)
        for node in queue.group_nodes("q1"):
            queue.start(node)
        time.sleep(4.0)   # > batch_lifetime: the consumer may give the gap up
        producer.send_signal(signal.SIGCONT)
        assert producer.wait(30) == 0
        acked: set[int] = set()
        outcome = []
        for line in produced.read_text().splitlines():
            fields = line.split()
            if fields[0] == "committed":
                acked.update(range(int(fields[2]), int(fields[2]) + int(fields[3])))
                producer_id = int(fields[1])
            else:
                outcome.append(line)
        assert set(range(0, 10)) | set(range(20, 30)) <= acked
        assert outcome or set(range(10, 20)) <= acked
        if outcome:
            assert "NOT acknowledged" in outcome[0]
        deadline = time.monotonic() + 20
        while True:
            got = {}
            for line in consumed.read_text().splitlines() if consumed.exists() else []:
                p, seq, _group, value = line.split()
                got.setdefault(int(seq), []).append(value)
                assert int(p) == producer_id
            if acked <= set(got) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert acked <= set(got), f"acknowledged, never consumed: {sorted(acked - set(got))}"
        assert all(values == [str(seq)] for seq, values in got.items())
    finally:
        producer.kill()
        consumer.send_signal(signal.SIGTERM)
        try:
            consumer.wait(10)
        except subprocess.TimeoutExpired:
            consumer.kill()
        queue.stop()


def test_producer_ids_are_never_reused_by_accident(cluster):
    """A configured producer id restarting at seq 0 would have its new messages dropped
    as duplicates: a bare producer_id is refused (naming the field), two producer lives get
    different ids, and resuming an id with an explicit next_seq delivers everything."""
    config = cluster.config_path
    with pytest.raises(InvalidArgument) as e:
        Producer(config, "t", producer_id=42)
    assert e.value.field == "producer_id"
    ids = []
    for life in range(2):
        with Producer(config, "t") as producer:
            producer.send_batch([f"life{life}-{i}" for i in range(3)])
            ids.append(producer.producer_id)
    assert ids[0] != ids[1]
    with Producer(config, "t", producer_id=ids[0], next_seq=3) as producer:
        assert producer.send_batch([b"resumed"]).first_seq == 3
    got = consume_topic(config)
    assert sorted(got) == sorted(
        [(ids[0], i, f"life0-{i}".encode()) for i in range(3)] + [(ids[0], 3, b"resumed")]
        + [(ids[1], i, f"life1-{i}".encode()) for i in range(3)])


def test_a_handler_error_loses_nothing(cluster):
    """The handler raises on message 3; the application calls run() again on the same
    consumer: every message is handled (3..9 after the error), and a fresh consumer of the
    group has nothing left that was not handled."""
    config = cluster.config_path
    with Producer(config, "t") as producer:
        producer.send_batch([f"m{i}" for i in range(10)])
    handled: list[int] = []
    failed = []

    def flaky(d) -> None:
        if d.seq == 3 and not failed:
            failed.append(d.seq)
            raise RuntimeError("transient failure")
        handled.append(d.seq)

    with Consumer(config, "t", "cg", wait_ms=100) as consumer:
        with pytest.raises(RuntimeError):
            consumer.run(flaky, idle_timeout=1.0)
        consumer.run(flaky, idle_timeout=1.0)
    assert failed == [3]
    assert sorted(set(handled)) == list(range(10))
    after = handled[3:]   # from the last commit on, in order, through to the end
    assert after[0] <= 3 and after == list(range(after[0], 10))
    assert consume_topic(config, idle=1.0) == []


def test_a_down_server_never_hangs_the_cli_or_the_launcher(tmp_path):
    """With no server running, `quorumq --timeout 1 status` returns promptly, reports
    every server DOWN and exits 4 (the group is unavailable), and
    LocalQueueCluster.wait_ready gives up on a server that is not there instead of blocking
    on the send."""
    config = write_queue_config(tmp_path)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "quorumq.cli", "--config", str(config),
                             "--timeout", "1", "status"], capture_output=True, text=True,
                            timeout=30, cwd=ROOT)
    assert result.returncode == 4, result.stderr
    assert result.stdout.count("DOWN") == 3
    assert time.monotonic() - started < 10   # three servers, 1 s each, plus start-up
    queue = LocalQueueCluster(config)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="not ready"):
        queue.wait_ready("q1a", timeout=1.0)
    assert time.monotonic() - started < 5


def test_close_returns_when_a_batch_cannot_commit(cluster):
    """Every server stopped (SIGSTOP: connected, never answering): a batch cannot commit.
    close(timeout) returns, and the batch's caller gets Timeout saying it was NOT
    acknowledged; without a timeout, close() still returns once the batch's lifetime is
    over. (Killed servers would fail the batch at once with Unavailable instead.)"""
    config = cluster.config_path
    producer = Producer(config, "t")
    other = Producer(config, "t")
    producer.send_batch([b"connected"])
    other.send_batch([b"connected"])
    for node in cluster.nodes:
        cluster.signal(node, signal.SIGSTOP)
    with pytest.raises(Timeout):
        producer.send_batch([b"x"], timeout=0.5)
    pending = producer.submit_batch([b"y"])
    started = time.monotonic()
    producer.close(timeout=0.5)
    bounded = time.monotonic() - started
    with pytest.raises(Timeout, match="NOT acknowledged"):
        pending.result(timeout=1)
    stuck = other.submit_batch([b"z"])
    started = time.monotonic()
    other.close()   # bounded by batch_lifetime_ms (1.5 s here)
    unbounded = time.monotonic() - started
    with pytest.raises(Timeout, match="NOT acknowledged"):
        stuck.result(timeout=1)
    # The timeout was honoured: close(timeout=0.5) did not wait out the batch's lifetime
    # (1.5 s) as close() did; compared with each other, not with a wall-clock bound.
    assert bounded * 2 < unbounded, (bounded, unbounded)


def test_a_stopped_group_costs_one_ack_deadline_not_one_per_batch(tmp_path):
    """Known limit 14 of the review, fixed: all of group q1 SIGSTOPped (sends still succeed,
    nothing answers) while one producer submits a batch every 50 ms. The first overdue batch
    marks q1 failed and every other batch in flight there moves to q2 at once, so every batch
    submitted in the outage's first ack deadline has committed one ack deadline (plus slack)
    after the stop, instead of each waiting out its own deadline there (the last of them up
    to two deadlines after the stop). After SIGCONT, q1 appends the abandoned copies that
    have not expired: the consumer still gets every message exactly once, in seq order."""
    deadline_ms = 1500
    config = write_queue_config(tmp_path, groups=2, ack_deadline_ms=deadline_ms,
                                clock_skew_ms=0, batch_lifetime_ms=3 * deadline_ms)
    queue = LocalQueueCluster(config, log_dir=tmp_path / "logs")
    queue.start()
    queue.create_topic("t")
    deadline_s = deadline_ms / 1000
    slack_s = 0.6
    try:
        submitted: list[tuple[float, list[bytes], Any]] = []
        committed_at: dict[int, float] = {}

        def submit(producer: Producer, i: int) -> None:
            values = [f"b{i}-{k}".encode() for k in range(10)]
            future = producer.submit_batch(values)
            future.add_done_callback(lambda f, i=i: committed_at.__setitem__(
                i, time.monotonic()))
            submitted.append((time.monotonic(), values, future))

        with Producer(config, "t", first_group=0, linger_ms=0, max_in_flight=256) as producer:
            for i in range(10):
                submit(producer, i)
                time.sleep(0.05)
            for node in queue.group_nodes("q1"):
                queue.signal(node, signal.SIGSTOP)
            stopped = time.monotonic()
            i = 10
            while time.monotonic() < stopped + 2 * deadline_s:
                submit(producer, i)
                i += 1
                time.sleep(0.05)
            results = [future.result(timeout=3 * deadline_s) for _, _, future in submitted]
            assert producer.counters["group_failures"] >= 1
        assert any(r.group == "q1" for r in results), "nothing committed before the stop"
        onset = [n for n, (at, _, _) in enumerate(submitted)
                 if stopped - 0.05 <= at < stopped + deadline_s]
        assert len(onset) >= 20
        late = {n: round(committed_at[n] - stopped, 2) for n in onset
                if committed_at[n] > stopped + deadline_s + slack_s}
        assert not late, f"batches held on the stopped group past one deadline: {late}"
        latencies = sorted(r.latency_s for r in results)
        assert latencies[-1] < deadline_s + slack_s
        for node in queue.group_nodes("q1"):
            queue.signal(node, signal.SIGCONT)
        got = consume_topic(config)
        expected = sorted((results[0].producer_id, r.first_seq + k, values[k])
                    for (_, values, _), r in zip(submitted, results, strict=True)
                    for k in range(len(values)))
        assert got == expected, "lost, duplicated, reordered or wrong values"
    finally:
        queue.stop()
