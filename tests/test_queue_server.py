"""A real queue server process: bad input is refused clearly and changes nothing, damaged
segments are detected on restart and reported, retention drops old segments, a wiped disk
comes back as a new incarnation."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from kvsvr import _core
from kvsvr.errors import InvalidArgument, NotFound, Timeout, Unavailable, UnknownMethod
from quorumq import protocol
from quorumq.launcher import LocalQueueCluster, write_queue_config
from quorumq.protocol import QMethod
from quorumq.storage import now_ms
from quorumq.transport import call

NODE = "q1a"


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[LocalQueueCluster]:
    """One queue group of 3 servers (only q1a started unless a test starts more)."""
    cluster = LocalQueueCluster(write_queue_config(tmp_path, segment_mib=1),
                                log_dir=tmp_path / "logs")
    cluster.start(NODE)
    try:
        yield cluster
    finally:
        cluster.stop()


def produce(cluster: LocalQueueCluster, topic: str, producer: int, first_seq: int,
            messages: list[bytes], node: str = NODE, expires_ms: int | None = None) -> int:
    if expires_ms is None:
        expires_ms = now_ms() + 60_000
    reply = call(cluster.address(node), QMethod.PRODUCE,
                 protocol.ProduceRequest(topic, producer, first_seq, messages, expires_ms))
    return int(reply.first_offset)


def fetch_all(cluster: LocalQueueCluster, topic: str, node: str = NODE) -> list[tuple]:
    out: list[tuple] = []
    offset = 0
    while True:
        reply = call(cluster.address(node), QMethod.FETCH,
                     protocol.FetchRequest(topic, offset, 1 << 20))
        out += _core.decode_queue_records(reply.records)
        if reply.next_offset >= reply.end_offset:
            return out
        offset = reply.next_offset


def raw(cluster: LocalQueueCluster, payload: bytes) -> list[tuple]:
    """Send raw bytes as one message; the decoded answer frames."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(cluster.address(NODE))
    try:
        socket.send(payload)
        assert socket.poll(5000), "no answer to a malformed message"
        frames, error, _ = _core.decode_frames(socket.recv())
        assert error is None
        return frames
    finally:
        socket.close()
        context.term()


def test_bad_input_gets_clear_errors_and_changes_nothing(queue):
    """Unknown topic, oversize batch, bad names, unknown methods and malformed frames each
    get an error naming the field; the server keeps serving and its log is unchanged."""
    queue.create_topic("t")
    produce(queue, "t", 1, 0, [b"a", b"b"])
    with pytest.raises(NotFound) as e:
        produce(queue, "nope", 1, 0, [b"x"])
    assert e.value.field == "topic"
    too_big = [b"x" * (1 << 20)] * 4 + [b"yy"]   # over the batch bound, within a frame
    with pytest.raises(InvalidArgument, match="messages") as e:
        produce(queue, "t", 1, 2, too_big)
    with pytest.raises(InvalidArgument) as e:
        produce(queue, "bad/name", 1, 0, [b"x"])
    assert e.value.field == "topic"
    with pytest.raises(InvalidArgument) as e:
        produce(queue, "t", 0, 0, [b"x"])
    assert e.value.field == "producer_id"
    with pytest.raises(InvalidArgument) as e:
        call(queue.address(NODE), QMethod.FETCH, protocol.FetchRequest("t", 0, 10**9))
    assert e.value.field == "max_bytes"
    with pytest.raises(UnknownMethod):
        call(queue.address(NODE), 20, protocol.StatusRequest())   # a KVSvr method
    for name in (".", "..", ".hidden"):   # "." and ".." would be the topics directory itself
        with pytest.raises(InvalidArgument) as e:
            call(queue.address(NODE), QMethod.CREATE_TOPIC, protocol.CreateTopicRequest(name))
        assert e.value.field == "topic"
        with pytest.raises(InvalidArgument) as e:
            produce(queue, name, 3, 0, [b"x"])
        assert e.value.field == "topic"
    with pytest.raises(InvalidArgument) as e:   # seqs past 2**64 would wrap on disk
        produce(queue, "t", 7, 2**64 - 1, [b"x", b"y"])
    assert e.value.field == "first_seq"
    with pytest.raises(Timeout) as e:           # past its expiry: never appended
        produce(queue, "t", 8, 0, [b"late"], expires_ms=now_ms() - 1)
    assert e.value.field == "expires_ms"
    with pytest.raises(InvalidArgument) as e:   # a request the server would silently drop
        produce(queue, "t", 9, 0, [b"x" * (1 << 20)] * 20)
    assert e.value.field == "request"
    incarnation = queue.status(NODE)["incarnation"]
    with pytest.raises(InvalidArgument) as e:
        call(queue.address(NODE), QMethod.COMMIT,
             protocol.CommitRequest("t", "g", incarnation, 10**12, True, b""))
    assert e.value.field == "offset"
    assert not call(queue.address(NODE), QMethod.OFFSETS,
                    protocol.OffsetsRequest("t", "g")).found
    good = _core.encode_frame(_core.FRAME_REQUEST, QMethod.STATUS, 5, 0,
                              protocol.encode(protocol.StatusRequest()))
    for payload in (b"", b"garbage", good[:20], good + b"\x01\x02",
                    _core.encode_frame(_core.FRAME_REQUEST, QMethod.PRODUCE, 6, 0, b"\xc1"),
                    _core.encode_frame(_core.FRAME_RESPONSE, QMethod.STATUS, 7, 0, b"\x90")):
        frames = raw(queue, payload)
        assert frames and frames[-1][1] == InvalidArgument.code
    assert [m[4] for m in fetch_all(queue, "t")] == [b"a", b"b"]
    assert sorted(os.listdir(queue.data_dir(NODE) / "topics")) == ["t"]
    status = queue.status(NODE)
    assert status["counters"]["bad_frames"] >= 4
    assert queue.processes[NODE].poll() is None


def _segments(cluster: LocalQueueCluster, topic: str) -> list[Path]:
    return sorted((cluster.data_dir(NODE) / "topics" / topic).glob("*.qlog"))


@pytest.mark.parametrize("damage", ["truncate", "flip_tail", "flip_middle"])
def test_damaged_segments_are_reported_and_the_rest_served(queue, damage):
    """A torn or corrupted record is found on restart by its checksum: the bytes from it on
    are quarantined, the status reports it, the records before it (and later segments)
    are served, and new appends continue after it. Only a torn tail of the last segment
    keeps the incarnation: a cut of complete (so maybe acknowledged) records starts a new
    one, and stored consumer offsets no longer count the server whole."""
    queue.create_topic("t")
    values = [f"{i:08d}".encode() * 10 for i in range(30000)]   # 3.84 MB: 3+ segments
    for start in range(0, len(values), 1000):
        produce(queue, "t", 1, start, values[start:start + 1000])
    incarnation = queue.status(NODE)["incarnation"]
    call(queue.address(NODE), QMethod.COMMIT,
         protocol.CommitRequest("t", "cg", incarnation, len(values), True, b""))
    queue.kill(NODE)
    segments = _segments(queue, "t")
    assert len(segments) >= 3
    target = segments[-1] if damage != "flip_middle" else segments[0]
    size = target.stat().st_size
    record = _core.QUEUE_RECORD_HEADER_BYTES + len(values[0])
    cut = size - record // 2 if damage == "truncate" else size - 3 * record
    with open(target, "r+b") as f:
        if damage == "truncate":
            f.truncate(cut)
        else:
            f.seek(cut + 60)
            byte = f.read(1)
            f.seek(cut + 60)
            f.write(bytes([byte[0] ^ 0xFF]))
    queue.start(NODE)
    status = queue.status(NODE)
    report = status["recovery"][0]
    assert len(status["recovery"]) == (1 if damage == "truncate" else 2)
    assert (status["incarnation"] == incarnation) == (damage == "truncate")
    offsets_reply = call(queue.address(NODE), QMethod.OFFSETS,
                         protocol.OffsetsRequest("t", "cg"))
    assert offsets_reply.found and offsets_reply.whole == (damage == "truncate")
    assert report["segment"] == target.name and report["byte"] == cut - cut % record
    assert ("truncated" in report["reason"]) == (damage == "truncate")
    assert Path(report["quarantined_to"]).exists()
    served = fetch_all(queue, "t")
    lost = 1 if damage == "truncate" else 3
    assert len(served) == len(values) - lost
    offsets = [m[0] for m in served]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert all(m[4] == values[m[2]] for m in served)
    first = produce(queue, "t", 2, 0, [b"after"])
    assert first >= len(values)   # no offset the damaged bytes may have used is reused
    assert fetch_all(queue, "t")[-1][4] == b"after"


def test_retention_by_size_and_age(queue):
    """Old segments go once the topic is over its byte bound or its age bound."""
    queue.create_topic("sized", retention_bytes=2 << 20)
    queue.create_topic("aged", retention_s=1)
    value = b"v" * 1000
    for start in range(0, 5000, 500):
        produce(queue, "sized", 1, start, [value] * 500)
        produce(queue, "aged", 1, start, [value] * 500)
    time.sleep(3.5)
    produce(queue, "aged", 1, 5000, [b"new"])
    topics = queue.status(NODE)["topics"]
    assert topics["sized"]["bytes"] <= (2 << 20) + (1 << 20) + 4096
    assert topics["sized"]["start_offset"] > 0 and topics["sized"]["end_offset"] == 5000
    served = fetch_all(queue, "aged")
    assert [m[4] for m in served] == [b"new"] and topics["aged"]["end_offset"] == 5001


def test_a_wiped_server_is_a_new_incarnation(queue):
    """Losing the data directory gives a new incarnation id and birth time; a restart
    without losing it keeps the incarnation and the data."""
    queue.create_topic("t")
    produce(queue, "t", 1, 0, [b"x"])
    before = queue.status(NODE)
    queue.kill(NODE)
    queue.start(NODE)
    again = queue.status(NODE)
    assert again["incarnation"] == before["incarnation"] and again["topics"]["t"]["end_offset"] == 1
    queue.wipe(NODE)
    queue.start(NODE)
    after = queue.status(NODE)
    assert after["incarnation"] != before["incarnation"]
    assert after["born_ms"] > before["born_ms"] and after["topics"] == {}


def test_commit_for_another_incarnation_is_refused(queue):
    """An offset commit names the server life it is for; a stale one changes nothing."""
    queue.create_topic("t")
    produce(queue, "t", 1, 0, [b"m"] * 5)
    incarnation = queue.status(NODE)["incarnation"]
    call(queue.address(NODE), QMethod.COMMIT,
         protocol.CommitRequest("t", "cg", incarnation, 5, True, b""))
    with pytest.raises(InvalidArgument) as e:
        call(queue.address(NODE), QMethod.COMMIT,
             protocol.CommitRequest("t", "cg", incarnation + 2, 9, True, b""))
    assert e.value.field == "incarnation"
    queue.kill(NODE)
    queue.start(NODE)
    reply = call(queue.address(NODE), QMethod.OFFSETS, protocol.OffsetsRequest("t", "cg"))
    assert (reply.found, reply.offset, reply.whole) == (True, 5, True)
    assert os.path.exists(queue.data_dir(NODE) / "offsets.log")


def test_a_burst_of_fetches_in_one_message_is_bounded(queue):
    """300 fetch frames of 4 MiB each packed in one small message (the client never reads):
    the server answers at most REQUESTS_PER_MESSAGE_MAX of them, fetch replies stay within
    the per-client round budget, the rest get a clear error, and its memory stays bounded."""
    from kvsvr.protocol import pack
    from quorumq.limits import CLIENT_ROUND_REPLY_BYTES, REQUESTS_PER_MESSAGE_MAX

    queue.create_topic("t")
    for start in range(0, 5000, 1000):
        produce(queue, "t", 1, start, [b"x" * 1000] * 1000)

    def rss_kib() -> int:
        pid = queue.processes[NODE].pid
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    before = rss_kib()
    frames = [_core.encode_frame(_core.FRAME_REQUEST, QMethod.FETCH, i, 0, protocol.encode(
        protocol.FetchRequest("t", 0, 4 << 20))) for i in range(300)]
    messages = list(pack(frames))
    assert len(messages) == 1 and len(messages[0]) < 20_000
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(queue.address(NODE))
    try:
        socket.send(messages[0])
        answers = []
        while socket.poll(3000):
            answers += _core.decode_frames(socket.recv())[0]
    finally:
        socket.close()
        context.term()
    assert len(answers) == 300
    ok = [a for a in answers if a[1] == 0]
    refused = [a for a in answers if a[1] != 0]
    assert sum(len(bytes(a[4])) for a in ok) <= CLIENT_ROUND_REPLY_BYTES + (64 << 10)
    too_many = [a for a in refused if b"too many requests in one message" in bytes(a[4])]
    assert len(too_many) == 300 - REQUESTS_PER_MESSAGE_MAX
    assert any(a[1] == Unavailable.code for a in refused)
    assert rss_kib() - before < 64 << 10, "the server buffered far more than its budget"
    assert queue.processes[NODE].poll() is None
