"""The producer against real servers: it never blocks in its constructor, a batch no group
can take fails fast, latency figures run from the publish call, and a failed batch retried
under its own ids (`retry_of`) is delivered exactly once, in order."""

from __future__ import annotations

import gc
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvsvr.errors import InvalidArgument, Unavailable
from quorumq import (
    Producer,
    PublishFailed,
    PublishUnavailable,
    Unacknowledged,
)
from quorumq.launcher import LocalQueueCluster, write_queue_config
from tests.queue_clusters import consume_topic, running_queue


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalQueueCluster]:
    """One queue group, the default 30 s batch lifetime (so failing fast is visible)."""
    with running_queue(tmp_path, ack_deadline_ms=2000, clock_skew_ms=200,
                       batch_lifetime_ms=30_000) as queue:
        yield queue


def test_the_constructor_does_not_block_and_a_publish_no_group_can_take_fails_fast(cluster):
    """Two of the group's three servers SIGKILLed: Producer() returns at once (it used to
    wait about 2 s for the servers), and a publish fails with Unavailable in about a second
    instead of being retried for the 30 s batch lifetime. The error names the batch's ids."""
    cluster.kill("q1a")
    cluster.kill("q1b")
    started = time.monotonic()
    producer = Producer(cluster.config_path, "t")
    assert time.monotonic() - started < 0.5
    try:
        started = time.monotonic()
        with pytest.raises(PublishUnavailable) as failed:
            producer.send_batch([b"x"])
        assert time.monotonic() - started < 3.0
        assert isinstance(failed.value, Unavailable)
        assert failed.value.unacknowledged == Unacknowledged(producer.producer_id, 0, 1)
        assert "NOT acknowledged" in str(failed.value)
    finally:
        producer.close()


def test_latency_runs_from_the_publish_call(cluster):
    """One batch in flight at a time; two servers SIGSTOPped for 1.5 s. The second batch
    (and a single message sent after it) waits for the first's slot the whole time: its
    latency covers that wait (it used to be measured from when it got the slot, ~0)."""
    producer = Producer(cluster.config_path, "t", max_in_flight=1)
    try:
        producer.send_batch([b"warm"])
        for node in ("q1a", "q1b"):
            cluster.signal(node, signal.SIGSTOP)
        first = producer.submit_batch([b"a"])
        second = producer.submit_batch([b"b"])
        single = producer.send(b"c")
        time.sleep(1.5)
        for node in ("q1a", "q1b"):
            cluster.signal(node, signal.SIGCONT)
        assert first.result(timeout=20).latency_s >= 1.4
        assert second.result(timeout=20).latency_s >= 1.4
        assert single.result(timeout=20).latency_s >= 1.4
    finally:
        producer.close()


def test_a_failed_publish_retried_under_its_ids_is_delivered_once_in_order(cluster):
    """A commits; with two servers SIGKILLed, B fails (Unavailable; its one live server may
    hold a copy); the servers restart, B is retried with retry_of and commits; C follows.
    The consumer sees A, B, C once each, in seq order, and a second retry of B, or a retry
    with other values, is refused."""
    producer = Producer(cluster.config_path, "t")
    try:
        producer.send_batch([b"a"])
        cluster.kill("q1a")
        cluster.kill("q1b")
        with pytest.raises(PublishFailed) as failed:
            producer.send_batch([b"b1", b"b2"])
        with pytest.raises(InvalidArgument, match="retry_of: the values"):
            producer.send_batch([b"b2", b"b1"], retry_of=failed.value)
        cluster.start("q1a")
        cluster.start("q1b")
        retried = producer.send_batch([b"b1", b"b2"], retry_of=failed.value)
        assert (retried.producer_id, retried.first_seq) == (producer.producer_id, 1)
        with pytest.raises(InvalidArgument, match="retry_of"):
            producer.send_batch([b"b1", b"b2"], retry_of=failed.value)
        producer.send_batch([b"c"])
    finally:
        producer.close()
    got = consume_topic(cluster.config_path)
    assert got == [(producer.producer_id, seq, value)
                   for seq, value in enumerate([b"a", b"b1", b"b2", b"c"])]


def test_a_retry_too_late_for_the_consumers_is_refused(tmp_path):
    """Once a later batch was sent more than a batch lifetime ago, consumers may have given
    the failed batch's seqs up: a retry under them is refused (it could be acknowledged and
    then dropped as a duplicate)."""
    config = write_queue_config(tmp_path, ack_deadline_ms=300, clock_skew_ms=0,
                                batch_lifetime_ms=600)
    with LocalQueueCluster(config, log_dir=tmp_path / "logs") as queue:
        queue.create_topic("t")
        producer = Producer(config, "t")
        try:
            producer.send_batch([b"a"])
            queue.kill("q1a")
            queue.kill("q1b")
            with pytest.raises(PublishFailed) as failed:
                producer.send_batch([b"b"])
            queue.start("q1a")
            queue.start("q1b")
            producer.send_batch([b"c"])
            time.sleep(0.8)
            with pytest.raises(InvalidArgument, match="too late"):
                producer.send_batch([b"b"], retry_of=failed.value)
        finally:
            producer.close()


def test_a_closed_producer_leaks_no_future(cluster, capfd, caplog):
    """send_batch(timeout=...) that times out, then close() failing the batch: nothing is
    reported as a future exception never retrieved or a task destroyed."""
    for node in cluster.nodes:
        cluster.signal(node, signal.SIGSTOP)
    producer = Producer(cluster.config_path, "t")
    with pytest.raises(Exception, match="not committed"):
        producer.send_batch([b"x"], timeout=0.3)
    producer.close(timeout=0.2)
    del producer
    gc.collect()
    threading.Event().wait(0.1)
    reported = capfd.readouterr().err + caplog.text
    assert "never retrieved" not in reported and "destroyed" not in reported
