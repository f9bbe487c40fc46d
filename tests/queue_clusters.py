"""What the queue tests share: one queue group with topic "t", and reading it all back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from quorumq import Consumer
from quorumq.launcher import LocalQueueCluster, write_queue_config


@contextlib.contextmanager
def running_queue(directory: Path, *, ack_deadline_ms: int, clock_skew_ms: int,
                  batch_lifetime_ms: int) -> Iterator[LocalQueueCluster]:
    """One queue group (3 servers) with these deadlines, topic "t", stopped at the end."""
    config = write_queue_config(directory, ack_deadline_ms=ack_deadline_ms,
                                clock_skew_ms=clock_skew_ms,
                                batch_lifetime_ms=batch_lifetime_ms)
    queue = LocalQueueCluster(config, log_dir=directory / "logs")
    queue.start()
    queue.create_topic("t")
    try:
        yield queue
    finally:
        queue.stop()


def consume_topic(config: str, idle: float = 1.5) -> list[tuple[int, int, bytes]]:
    """Every message of topic "t" for consumer group "cg": (producer id, seq, value)."""
    got: list[tuple[int, int, bytes]] = []
    with Consumer(config, "t", "cg", wait_ms=100) as consumer:
        consumer.run(lambda d: got.append((d.producer_id, d.seq, d.value)), idle_timeout=idle)
    return got
