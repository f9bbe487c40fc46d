"""The "whole again" rule on real server processes: a server with a wiped disk (a new
incarnation) does not count toward a consumer's read set until it holds everything, so a
consumer that can only reach it and one old server waits instead of giving a gap up."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvsvr.errors import KvError
from quorumq import Consumer, Delivery, Producer, protocol
from quorumq.launcher import LocalQueueCluster
from quorumq.protocol import QMethod
from quorumq.transport import call
from tests.queue_clusters import running_queue

ACK_DEADLINE_MS = 500
BATCH_LIFETIME_MS = 1500
CLOCK_SKEW_MS = 100
MARGIN_S = (BATCH_LIFETIME_MS + CLOCK_SKEW_MS) / 1000
BATCH = 20


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalQueueCluster]:
    """One queue group q1 (q1a, q1b, q1c) with short deadlines, topic "t"."""
    with running_queue(tmp_path, ack_deadline_ms=ACK_DEADLINE_MS,
                       clock_skew_ms=CLOCK_SKEW_MS, batch_lifetime_ms=BATCH_LIFETIME_MS) as queue:
        yield queue


def produce(producer: Producer, tag: str, batches: int) -> list[int]:
    """`batches` acknowledged batches whose values name their seq; the seqs committed."""
    seqs: list[int] = []
    for b in range(batches):
        committed = producer.send_batch([f"{tag}-{b}-{i}" for i in range(BATCH)], timeout=10)
        assert committed.group == "q1" and committed.count == BATCH
        seqs += range(committed.first_seq, committed.first_seq + BATCH)
    return seqs


def server_of(consumer: Consumer, node: str) -> dict:
    return next(s for s in consumer.status()["servers"] if s["node"] == node)


def test_a_new_incarnation_and_one_old_server_never_skip_a_gap(cluster):
    """Set 1 is committed on all three servers; with q1b SIGSTOPped, set 2 is acknowledged
    by q1a and q1c only; q1c's disk is then wiped and it restarts (a new incarnation, not
    whole); set 3 is acknowledged by q1a and the new q1c; q1a is SIGKILLed and q1b resumed.
    The only copies of set 2 are on the dead q1a, so a consumer reading q1b (set 1) and q1c
    (set 3) sees a gap before set 3 that it must not give up, however long past the margin it
    waits: the read set is unsafe (q1c does not count). Once q1a restarts, every acknowledged
    message is delivered exactly once, in seq order, with its own value, nothing skipped; and
    q1c, caught up past its cutoffs, becomes whole again."""
    config = cluster.config_path
    with Producer(config, "t", linger_ms=0) as producer:
        producer_id = producer.producer_id
        set1 = produce(producer, "one", 3)
        cluster.signal("q1b", signal.SIGSTOP)
        set2 = produce(producer, "two", 3)            # on q1a and q1c only
        cluster.wipe("q1c")
        cluster.start("q1c")
        call(cluster.address("q1c"), QMethod.CREATE_TOPIC,
             protocol.CreateTopicRequest("t", 0, 0))
        # The producer's socket reconnects on its own (ZeroMQ retries every 100 ms); a
        # batch sent before that finds one server (q1b stopped) and would expire unacked.
        time.sleep(0.5)
        set3 = produce(producer, "three", 3)          # on q1a and the new q1c only
        last_sent = time.monotonic()
    values = {seq: f"{tag}-{(seq - seqs[0]) // BATCH}-{(seq - seqs[0]) % BATCH}".encode()
              for tag, seqs in (("one", set1), ("two", set2), ("three", set3))
              for seq in seqs}
    assert set1 + set2 + set3 == list(range(len(values)))
    born = cluster.status("q1c")["incarnation"]
    cluster.kill("q1a")
    # Sets 2 and 3 wait in q1b's socket: past their expiry it must refuse them, so that set 2
    # really is only on the dead q1a (and the wiped q1c's earlier life).
    time.sleep(max(0.0, last_sent + MARGIN_S + 0.2 - time.monotonic()))
    cluster.signal("q1b", signal.SIGCONT)
    deadline = time.monotonic() + 5
    while True:
        try:
            q1b_end = cluster.status("q1b", timeout=0.5)["topics"]["t"]["end_offset"]
            break
        except KvError:
            assert time.monotonic() < deadline, "q1b never answered after SIGCONT"
    assert q1b_end == len(set1), "q1b appended expired batches"

    got: list[Delivery] = []
    with Consumer(config, "t", "cg", wait_ms=100) as consumer:
        # Long enough past the margin that a gap rule counting q1c (or reading an unsafe
        # set as safe) would have given set 2 up and delivered set 3.
        deadline = time.monotonic() + MARGIN_S + 2.5
        while time.monotonic() < deadline:
            got += consumer.poll(0.1)
            consumer.commit()
        status = consumer.status()
        assert [d.seq for d in got] == set1, "delivered past a gap only q1a could fill"
        assert status["skipped"] == 0
        assert status["held"] == len(set3)
        q1c = server_of(consumer, "q1c")
        assert q1c["up"] and not q1c["whole"] and not q1c["safe"]
        assert q1c["incarnation"] == born
        assert not server_of(consumer, "q1a")["up"]
        assert cluster.status("q1b")["topics"]["t"]["end_offset"] == len(set1)

        cluster.start("q1a")
        deadline = time.monotonic() + 20
        while len(got) < len(values) and time.monotonic() < deadline:
            got += consumer.poll(0.1)
            consumer.commit()
        # Anything further would be a duplicate: read on a little.
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            got += consumer.poll(0.1)
        assert [d.seq for d in got] == sorted(values), "lost, duplicated or out of order"
        assert all(d.producer_id == producer_id and d.value == values[d.seq] for d in got)
        assert consumer.status()["skipped"] == 0

        # q1c was born more than a margin ago and the group is read to the end of q1a and
        # q1b: the new incarnation must count again.
        deadline = time.monotonic() + 10
        while not server_of(consumer, "q1c")["whole"] and time.monotonic() < deadline:
            consumer.poll(0.1)
            consumer.commit()
        status = consumer.status()
        assert server_of(consumer, "q1c")["whole"], status
        assert all(s["safe"] for s in status["servers"])
        consumer.commit(force=True)
    # The consumer recorded it on q1c: a fresh consumer of the group starts with q1c whole.
    with Consumer(config, "t", "cg", wait_ms=100) as again:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not server_of(again, "q1c")["whole"]:
            assert again.poll(0.1) == [], "redelivered after a committed, complete read"
        assert server_of(again, "q1c")["whole"]
