"""Hostile input straight onto a node's socket: random bytes, mutated valid frames, wrong
body shapes, unknown methods, response frames, oversize messages. The node answers what it
can with an error naming the problem, never crashes, and the data is unchanged."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq

from kvsvr import _core, protocol
from kvsvr.client import Client
from kvsvr.launcher import LocalCluster, write_cluster_config
from kvsvr.limits import MESSAGE_BYTES_MAX
from kvsvr.protocol import Method

SEED = 20261121


def _socket(context: zmq.Context, address: str) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 3000)
    socket.connect(address)
    return socket


def _valid_frames(rng: random.Random) -> list[bytes]:
    kind = rng.randrange(1, 10)
    quorum = [_core.Message(kind, rng.randrange(3), 0, 1, b"fuzzq", rng.randrange(1, 5),
                            rng.randrange(2**40), 0, [] if kind == _core.MSG_STATE else None)]
    bodies = [
        (Method.GET, protocol.GetRequest(b"sentinel")),
        (Method.SCAN, protocol.ScanRequest(b"table", b"", None, 10)),
        (Method.MUTATE, protocol.MutateRequest(b"fuzz", [protocol.put_op(b"x")], None, 0, 0)),
        (Method.CHANGES, protocol.ChangesRequest(b"table", 0, b"", 5)),
        (Method.STATUS, protocol.StatusRequest()),
        # replica-to-replica methods: a node must survive these from anyone too
        (Method.VERSIONS, protocol.VersionsRequest([b"sentinel", b"table"])),
        (Method.PULL, protocol.PullRequest(1, rng.randrange(5), 1, 16)),
        (Method.HELLO, protocol.HelloRequest(2)),
        (Method.FAULTS, protocol.FaultsRequest("nobody", 0.5, 10)),
    ]
    frames = [_core.encode_frame(1, m, rng.randrange(1, 2**63), 1000, protocol.encode(b))
              for m, b in bodies]
    frames.append(_core.encode_frame(1, Method.QUORUM, 0, 0, protocol.encode_quorum(quorum)))
    return frames


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    choice = rng.randrange(5)
    if choice == 0 and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif choice == 1:
        data = data[:rng.randrange(len(data) + 1)]
    elif choice == 2:
        data += rng.randbytes(rng.randint(1, 40))
    elif choice == 3:  # a valid header over a random body
        body = rng.randbytes(rng.randint(0, 64))
        data = bytearray(_core.encode_frame(1, rng.choice([1, 2, 3, 10, 11, 12, 13, 20, 30, 31,
                                                           32, 33, 34, 77]),
                                            rng.randrange(2**63), 0, body))
    else:  # a valid header over well-formed msgpack of the wrong shape
        shape = rng.choice([[], [1, 2, 3], {"key": "x"}, [b"k", [[1]], "v", -1, None],
                            [b"", [[4, b"", b"v"]], None, 0, 0], [b"k" * 999], None, 7])
        data = bytearray(_core.encode_frame(1, rng.choice([3, 10, 11, 12, 13, 20, 30, 31, 32,
                                                           33, 34]),
                                            rng.randrange(2**63), 0, msgspec.msgpack.encode(shape)))
    return bytes(data)


@pytest.fixture(params=["single", "replicated"])
def fuzzed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    """A one-node cluster, or a group of 3 replicas (the fuzz goes to n1 of it)."""
    replicas = 1 if request.param == "single" else 3
    local = LocalCluster(write_cluster_config(tmp_path, replicas=replicas),
                         log_dir=tmp_path / "logs")
    local.start()
    try:
        yield local
    finally:
        local.stop()


def test_node_survives_random_and_mutated_frames(fuzzed: LocalCluster):
    """Prints its seed; every readable reply is a well-formed response frame; a replicated
    group keeps its data and every replica keeps running."""
    cluster = fuzzed
    with cluster.client(timeout=10.0, attempt_timeout=0.5) as client:
        _fuzz(cluster, client)
        for node in cluster.nodes:
            assert cluster.processes[node].poll() is None, f"{node} died"


def _fuzz(cluster: LocalCluster, client: Client) -> None:
    print(f"fuzz seed {SEED}")
    rng = random.Random(SEED)
    client.put("sentinel", "untouched")
    client.row_put("table", "r", "v")
    context = zmq.Context()
    socket = _socket(context, cluster.address("n1"))
    replies = 0
    try:
        for round_number in range(400):
            kind = rng.randrange(4)
            if kind == 0:
                message = [rng.randbytes(rng.randint(0, 200))]
            elif kind == 1:
                message = [_mutate(rng, rng.choice(_valid_frames(rng)))]
            elif kind == 2:  # several frames back to back, one of them damaged
                frames = _valid_frames(rng)
                frames[rng.randrange(len(frames))] = _mutate(rng, frames[0])
                message = [b"".join(frames)]
            else:  # extra ZeroMQ parts, some empty
                message = [rng.randbytes(rng.randint(0, 30)) for _ in range(rng.randint(2, 4))]
            socket.send_multipart(message)
            if round_number % 20 == 19:
                assert client.ping()["node"] in cluster.nodes, \
                    f"node stopped answering (seed {SEED})"
            while socket.poll(0 if round_number % 20 else 200):
                for part in socket.recv_multipart():
                    frames, error, _ = _core.decode_frames(part)
                    assert error is None, f"node sent a malformed reply: {error}"
                    for reply_kind, status, _rid, _budget, body in frames:
                        assert reply_kind == _core.FRAME_RESPONSE
                        if status:
                            reply = msgspec.msgpack.decode(body, type=protocol.ErrorReply)
                            assert reply.message
                        replies += 1
        assert replies > 300
        assert client.get("sentinel").value == b"untouched"
        assert client.row_get("table", "r").value == b"v"
        assert cluster.processes["n1"].poll() is None
    finally:
        socket.close()
        context.term()


def test_error_replies_name_the_field(cluster: LocalCluster):
    context = zmq.Context()
    socket = _socket(context, cluster.address("n1"))
    cases = [
        (Method.GET, [b"k" * 241], "key"),
        (Method.GET, [b""], "key"),
        (Method.SCAN, [b"k", b"", None, 0], "limit"),
        (Method.SCAN, [b"k", b"", None, 10**6], "limit"),
        (Method.MUTATE, [b"k", [[1, b"", b"v" * (2**20 + 1)]], None, 0, 0], "ops[0].value"),
        (Method.MUTATE, [b"k", [[4, b"", b"v"]], None, 0, 0], "ops[0]"),
        (Method.MUTATE, [b"k", [[9, b"", b""]], None, 0, 0], "ops[0].kind"),
        (Method.MUTATE, [b"k", [], None, 0, 0], "ops"),
        (Method.MUTATE, [b"k", [[1, b"", b"v"]], "seven", 0, 0], "expected_version"),
        (Method.MUTATE, [b"k", [[1, b"", b"v"]], -1, 0, 0], "expected_version"),
        (Method.CHANGES, [b"k", -5, b"", 10], "since_version"),
        (77, [], "method"),
    ]
    try:
        for request_id, (method, body, field) in enumerate(cases, start=1):
            socket.send(_core.encode_frame(1, method, request_id, 0, msgspec.msgpack.encode(body)))
            _kind, status, rid, _b, reply_body = _core.decode_frame(socket.recv())
            reply = msgspec.msgpack.decode(reply_body, type=protocol.ErrorReply)
            assert rid == request_id and status != 0
            assert reply.field == field, (method, body, reply)
        socket.send(b"\x00" * 10)
        _kind, status, rid, _b, reply_body = _core.decode_frame(socket.recv())
        assert "truncated" in msgspec.msgpack.decode(reply_body, type=protocol.ErrorReply).message
    finally:
        socket.close()
        context.term()


def test_oversize_message_drops_the_sender_not_the_node(cluster: LocalCluster, client: Client):
    context = zmq.Context()
    socket = _socket(context, cluster.address("n1"))
    try:
        socket.send(b"\x00" * (MESSAGE_BYTES_MAX + 1))
        assert client.ping() == {"node": "n1"}
        assert cluster.processes["n1"].poll() is None
    finally:
        socket.close()
        context.term()
