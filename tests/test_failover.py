"""Client-side replica selection and failover: home first, the next replica when the home is
silent or Unavailable, failing replicas skipped during their back-off and probed after it,
the same op id on every replica, and the read consistency option on the wire.

The replicas here are real ZeroMQ ROUTER sockets in this process (FakeReplica) that speak the
frame protocol and record what they receive; they can answer, stay silent, answer late, answer
Unavailable or a final error, or forward to a real kvsvr-node (the exactly-once test). The
clients under test are the real ones, unmodified.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import zmq

from kvsvr import (
    AsyncClient,
    Client,
    InvalidArgument,
    NotFound,
    Timeout,
    VersionConflict,
    _core,
    cli,
)
from kvsvr import protocol as p
from kvsvr.config import ClusterConfig, load
from kvsvr.errors import KvError, Unavailable
from kvsvr.health import FAILING, HEALTHY, PROBE_DUE, PROBING, Health, backoff_s
from kvsvr.launcher import LocalCluster, write_cluster_config, write_single_node_config
from kvsvr.limits import BACKOFF_FIRST_S, BACKOFF_S_MAX
from kvsvr.sharding import Router, home_index

ATTEMPT_S = 0.2
SLACK_S = 0.25   # scheduling and first-connection latency on a loaded CI machine


class Received(NamedTuple):
    at: float
    method: int
    request: Any


class FakeReplica:
    """A replica's address served by a thread of this process. `mode`: "answer" (with a
    reply naming this replica, or the backend's reply), "silent", "unavailable", "swallow"
    (forward to the backend, drop its answer: the write happens, its answer is lost), or a
    KvError instance to answer every request with."""

    def __init__(self, name: str, address: str, backend: str | None = None):
        self.name = name
        self.address = address
        self.backend = backend
        self.mode: str | KvError = "answer"
        self.delay_s = 0.0
        self.received: list[Received] = []
        self.messages = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"fake-{name}", daemon=True)
        self._thread.start()
        assert self._ready.wait(5)

    def requests(self, method: int | None = None) -> list[Any]:
        return [r.request for r in list(self.received) if method in (None, r.method)]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _serve(self) -> None:
        context = zmq.Context()
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(self.address)
        backend = None
        if self.backend:
            backend = context.socket(zmq.DEALER)
            backend.setsockopt(zmq.LINGER, 0)
            backend.connect(self.backend)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not router.poll(20):
                    continue
                identity, *payloads = router.recv_multipart()
                self.messages += 1
                mode = self.mode
                for payload in payloads:
                    frames = _core.decode_frames(payload)[0]
                    for _kind, method, _rid, _budget, body in frames:
                        self.received.append(Received(time.monotonic(), method,
                                                      p.decode_request(method, body)))
                    if mode == "silent":
                        continue
                    if self.delay_s:
                        time.sleep(self.delay_s)
                    if backend is not None and mode in ("answer", "swallow"):
                        backend.send(payload)
                        if backend.poll(5000):
                            answer = backend.recv()
                            if mode == "answer":
                                router.send_multipart([identity, answer])
                        continue
                    router.send_multipart([identity, b"".join(
                        self._answer(mode, method, rid) for _, method, rid, _, _ in frames)])
        finally:
            router.close()
            if backend is not None:
                backend.close()
            context.term()

    def _answer(self, mode: str | KvError, method: int, request_id: int) -> bytes:
        if isinstance(mode, KvError) or mode == "unavailable":
            error = mode if isinstance(mode, KvError) else Unavailable("replica not ready")
            return _core.encode_frame(_core.FRAME_RESPONSE, error.code, request_id, 0,
                                      p.encode_error(error))
        name = self.name.encode()
        reply: Any = {
            p.Method.PING: {"node": self.name},
            p.Method.STATUS: {"node": self.name, "group": "g1", "role": "replica",
                              "store": {"binlog_last_lsn": 7}, "health": "ok",
                              "peers": {"n9": {"lag_records": 3, "up": False}}},
            # the version is a serial: which request of this replica's was answered
            p.Method.GET: p.Versioned(len(self.received), name),
            p.Method.ROW_GET: p.RowValue(1, 1, name),
            p.Method.SCAN: p.ScanPage(1, [p.Row(b"r", 1, name)], None),
            p.Method.CHANGES: p.ChangesPage(1, [], None),
            p.Method.MUTATE: p.MutateReply(1, [None]),
        }[method]
        return _core.encode_frame(_core.FRAME_RESPONSE, p.OK, request_id, 0, p.encode(reply))


class Group(NamedTuple):
    config: ClusterConfig
    path: Path
    replicas: list[FakeReplica]

    def key(self, home: int, tag: str = "k") -> str:
        return key_with_home(home, tag)


def key_with_home(home: int, tag: str = "k") -> str:
    """A key whose home is replica `home` of a group of 3."""
    return next(key for key in (f"{tag}{i}" for i in range(1000))
                if home_index(key.encode(), 3) == home)


@contextlib.contextmanager
def _group(directory: Path, backend: str | None = None) -> Iterator[Group]:
    path = write_cluster_config(directory, replicas=3, sync=False)
    config = load(path)
    replicas = [FakeReplica(r.node, r.address, backend) for r in config.groups[0].replicas]
    try:
        yield Group(config, path, replicas)
    finally:
        for replica in replicas:
            replica.stop()


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    with _group(tmp_path) as fakes:
        yield fakes


@pytest.fixture
def client(group: Group) -> Iterator[Client]:
    with Client(group.config, timeout=2.0, attempt_timeout=ATTEMPT_S) as c:
        yield c


def _timed(call: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = call(*args, **kwargs)
    return result, time.monotonic() - started


# --- pure units ---------------------------------------------------------------------------
def test_health_state_machine_by_table():
    """Every transition of kvsvr.health: a failure starts a back-off, more failures in the same
    episode change nothing, a due probe claims the address for one window, a failed probe
    doubles the back-off, any answer heals; choice is the first usable candidate, else the one
    whose back-off ends first."""
    health = Health()
    window = 0.25
    # now, event, state of "a" after it, choose(["a", "b"], now) after it
    table: list[tuple[float, str, str, tuple[str, float]]] = [
        (0.0, "", HEALTHY, ("a", 0.0)),
        (0.0, "fail a", FAILING, ("b", 0.0)),          # back-off until 0.5
        (0.25, "fail a", FAILING, ("b", 0.25)),        # same episode: still until 0.5
        (0.5, "", PROBE_DUE, ("a", 0.5)),              # back-off over: the next call probes
        (0.5, "send a", PROBING, ("b", 0.5)),          # probe out until 0.75: others skip a
        (0.625, "fail a", FAILING, ("b", 0.625)),      # probe failed: 1 s, until 1.625
        (1.5, "fail b", FAILING, ("a", 1.625)),        # all failing: a's back-off ends first
        (1.625, "", PROBE_DUE, ("a", 1.625)),
        (1.625, "send a", PROBING, ("a", 1.875)),      # a's probe window ends before b (2.0)
        (1.875, "fail a", FAILING, ("b", 2.0)),        # third failure: 2 s, until 3.875
        (2.0, "", FAILING, ("b", 2.0)),                # b's probe is due
        (2.0, "ok a", HEALTHY, ("a", 2.0)),            # any answer heals
        (2.0, "send a", HEALTHY, ("a", 2.0)),          # sending to a healthy one: no change
    ]
    for now, event, state, choice in table:
        if event:
            action, address = event.split()
            if action == "fail":
                health.failed(address, now)
            elif action == "send":
                health.sending(address, now, window)
            else:
                health.succeeded(address)
        assert (health.state("a", now), health.choose(["a", "b"], now)) == (state, choice), \
            (now, event)
    assert health.choose(["a", "b"], 2.0, exclude="a") == ("b", 2.0)   # b's probe, excluded a
    assert health.choose(["a"], 2.0, exclude="a") == ("a", 2.0)        # the only one: used
    assert [backoff_s(n) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert backoff_s(10**6) == BACKOFF_S_MAX and BACKOFF_FIRST_S == 0.5


def test_router_lists_the_group_home_first_then_ring_order(group: Group):
    """replicas_for(key) is the key's group starting at its home, then home+1, home+2 mod n;
    None (ping, status) lists every address; a one-address router only has that address."""
    router = Router(group.config)
    addresses = [r.address for r in group.config.groups[0].replicas]
    for home in range(3):
        key = group.key(home).encode()
        assert list(router.replicas_for(key)) == [addresses[(home + i) % 3] for i in range(3)]
        assert router.address_for(key) == addresses[home]
    assert list(router.replicas_for(None)) == addresses == router.addresses
    single = Router(address="tcp://127.0.0.1:9")
    assert list(single.replicas_for(b"k")) == ["tcp://127.0.0.1:9"] == single.addresses


# --- the blocking client ------------------------------------------------------------------
def test_calls_go_to_the_home_and_a_pipeline_sends_one_message_per_replica(
        group: Group, client: Client):
    """Each key's call is answered by its home replica; a pipeline of writes for many keys
    reaches each replica as one message holding exactly the keys it is home of."""
    for home in range(3):
        assert client.get(group.key(home)).value == group.replicas[home].name.encode()
    before = [r.messages for r in group.replicas]
    keys = [f"user:{i}" for i in range(60)]
    pipeline = client.pipeline()
    for key in keys:
        pipeline.put(key, "v")
    assert pipeline.execute(raise_errors=True) == [1] * 60
    for index, replica in enumerate(group.replicas):
        assert replica.messages == before[index] + 1
        got = {r.key.decode() for r in replica.requests(p.Method.MUTATE)}
        assert got == {k for k in keys if home_index(k.encode(), 3) == index} != set()


def test_a_silent_home_fails_over_with_the_same_op_id_and_is_skipped_until_probed(
        group: Group, client: Client):
    """A silent home costs one attempt_timeout: the write is resent to the next replica with
    the same op id and succeeds there. Later calls skip the home (it sees no traffic) during
    its back-off; once the back-off ends and it answers again, calls go back to it."""
    home, nxt, third = group.replicas
    key = group.key(0)
    home.mode = "silent"
    version, elapsed = _timed(client.put, key, "v")
    assert version == 1 and ATTEMPT_S * 0.9 <= elapsed < ATTEMPT_S + SLACK_S
    [first] = home.requests(p.Method.MUTATE)
    [resent] = nxt.requests(p.Method.MUTATE)
    assert (resent.client_id, resent.client_seq) == (first.client_id, first.client_seq)
    assert resent == first and third.received == []
    failed_at = time.monotonic()

    seen = len(home.received)
    for _ in range(5):
        value, elapsed = _timed(client.get, key)
        assert value.value == b"n2" and elapsed < ATTEMPT_S  # no attempt wasted
    assert len(home.received) == seen                     # skipped: no traffic at all
    assert client.health.state(home.address, time.monotonic()) == FAILING

    home.mode = "answer"
    time.sleep(max(0.0, failed_at + BACKOFF_FIRST_S - time.monotonic()) + 0.05)
    assert client.get(key).value == b"n1"                  # the probe: home is back
    assert client.health.state(home.address, time.monotonic()) == HEALTHY
    assert client.get(key).value == b"n1"


def test_unavailable_and_timeout_answers_move_on_and_final_errors_do_not(
        group: Group, client: Client):
    """An Unavailable answer, or a Timeout answer (the replica could not finish in time), is
    retried on the next replica without waiting for an attempt timeout; NotFound,
    VersionConflict and InvalidArgument are answers: raised, never retried."""
    home, nxt, third = group.replicas
    key = group.key(0)
    home.mode = "unavailable"
    value, elapsed = _timed(client.get, key)
    assert value.value == b"n2" and elapsed < ATTEMPT_S
    assert len(home.received) == 1 and client.health.state(home.address,
                                                           time.monotonic()) == FAILING
    third.mode = Timeout("node n3: the write was not confirmed by a majority in time")
    version, elapsed = _timed(client.put, group.key(2), "v")   # n3, n1 failing, so n2
    assert version == 1 and elapsed < ATTEMPT_S
    assert nxt.requests(p.Method.MUTATE) == third.requests(p.Method.MUTATE)
    assert client.health.state(third.address, time.monotonic()) == FAILING
    other = group.key(1, tag="other")                      # home n2: not failing
    for error in (NotFound("no value", version=4), VersionConflict("moved", version=9),
                  InvalidArgument("value: too big", field="value")):
        nxt.mode = error
        seen = [len(r.received) for r in group.replicas]
        with pytest.raises(type(error)) as raised:
            client.put(other, "v")
        assert raised.value.version == error.version and raised.value.field == error.field
        assert [len(r.received) for r in group.replicas] == [seen[0], seen[1] + 1, seen[2]]
    assert client.health.state(nxt.address, time.monotonic()) == HEALTHY


def test_unavailable_is_retried_after_the_back_off_and_is_what_a_refusal_ends_in(
        group: Group):
    """A replica that answers Unavailable is asked again when its back-off ends, not in a
    loop. A call that every replica refused ends in that Unavailable as soon as none can be
    asked again in time (blocking and asyncio clients); one that also met silence ends in
    Timeout at its deadline (the silent one may have applied it)."""
    replica = group.replicas[0]
    replica.mode = "unavailable"
    threading.Timer(0.2, setattr, (replica, "mode", "answer")).start()
    with Client(address=replica.address, timeout=2.0, attempt_timeout=ATTEMPT_S) as client:
        value, elapsed = _timed(client.get, "k")
        assert value.value == b"n1" and len(replica.received) == 2
        assert BACKOFF_FIRST_S * 0.9 <= elapsed < BACKOFF_FIRST_S + SLACK_S

    replica.mode = "unavailable"
    started = time.monotonic()
    with (Client(address=replica.address, timeout=1.0, attempt_timeout=ATTEMPT_S) as client,
          pytest.raises(Unavailable, match="replica not ready")):
        client.put("k", "v")   # asked at 0 and 0.5 s; the next would be at 1.5 s: too late
    assert len(replica.received) == 4 and time.monotonic() - started < 0.5 + SLACK_S

    async def refused() -> None:
        async with AsyncClient(address=replica.address, timeout=1.0,
                               attempt_timeout=ATTEMPT_S) as async_client:
            with pytest.raises(Unavailable, match="replica not ready"):
                await async_client.get("k")

    asyncio.run(refused())
    assert len(replica.received) == 6

    home, nxt, third = group.replicas
    home.mode = "silent"
    nxt.mode = third.mode = "unavailable"
    with (Client(group.config, timeout=1.0, attempt_timeout=ATTEMPT_S) as client,
          pytest.raises(Timeout, match="last answer: replica not ready")):
        client.put(group.key(0), "v")


def test_threads_sharing_a_client_share_what_it_learned(group: Group, client: Client):
    """Threads of one client fail over together: the home's failure seen by one is skipped
    by all until its back-off ends, and every call gets exactly one result."""
    home = group.replicas[0]
    key = group.key(0)
    home.mode = "silent"
    results: list[bytes] = []

    def work() -> None:
        for _ in range(10):
            results.append(client.get(key).value)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [b"n2"] * 40
    assert len(home.received) <= 4   # at most each thread's first call before it was known


def test_every_replica_silent_is_a_timeout_after_trying_each_with_one_op_id(group: Group):
    """With no replica answering, each is tried in turn with the same op id, and the call
    raises Timeout at its deadline naming them."""
    for replica in group.replicas:
        replica.mode = "silent"
    with Client(group.config, timeout=0.7, attempt_timeout=ATTEMPT_S) as client:
        started = time.monotonic()
        with pytest.raises(Timeout) as timeout:
            client.incr(group.key(0))
        assert 0.7 <= time.monotonic() - started < 0.7 + SLACK_S
    ops = {(r.client_id, r.client_seq) for replica in group.replicas
           for r in replica.requests(p.Method.MUTATE)}
    assert len(ops) == 1 and all(r.received for r in group.replicas)
    message = str(timeout.value)
    assert all(r.address in message for r in group.replicas) and "(mutate;" in message


def test_an_answer_to_an_earlier_attempt_is_taken_once(group: Group, client: Client):
    """A home that answers after the resend went out: its late answer is the call's result
    (the same operation either way), delivered once; the later stray answers on the sockets
    are ignored by the calls after it."""
    home, nxt, _ = group.replicas
    key = group.key(0)
    home.delay_s = ATTEMPT_S * 1.5
    nxt.mode = "silent"
    value, elapsed = _timed(client.get, key)
    assert value.value == b"n1" and elapsed < ATTEMPT_S * 2 + SLACK_S
    assert len(nxt.requests(p.Method.GET)) == 1
    home.delay_s = ATTEMPT_S * 2       # now only ever late: answers pile up as strays
    nxt.mode = "answer"
    assert client.get(key).value == b"n2"
    pipeline = client.pipeline()
    for home_of_key in range(3):
        pipeline.get(group.key(home_of_key))
    assert [r.value for r in pipeline.execute(raise_errors=True)] == [b"n2", b"n2", b"n3"]
    home.delay_s = 0.0
    time.sleep(BACKOFF_FIRST_S + 0.1)   # the home's stray answer is waiting on its socket
    answer = client.get(key)
    assert (answer.value, answer.version) == (b"n1", len(home.received))   # not the stray

def test_a_resend_to_another_replica_applies_once_on_a_real_node(tmp_path: Path):
    """Three replica addresses forward to one real kvsvr-node; the home applies an incr and
    an append but loses their answers, the client resends them to the next replica with the
    same op ids, and the node answers from its op-id table: each applied exactly once."""
    node_config = write_single_node_config(tmp_path / "node")
    node_config.write_text(node_config.read_text().replace("sync = true", "sync = false"))
    node = LocalCluster(node_config, log_dir=tmp_path / "logs")
    node.start()
    try:
        with _group(tmp_path / "client", backend=node.address("n1")) as group:
            home, nxt, _ = group.replicas
            key, inbox = group.key(0), group.key(0, tag="inbox")
            # A longer attempt here: a resend past a slow answer would reach the node a
            # third time (harmless, it dedupes) and blur the count below.
            with Client(group.config, timeout=5.0, attempt_timeout=0.5) as client:
                home.mode = "swallow"
                pipeline = client.pipeline()
                pipeline.incr(key, 5)
                pipeline.append(inbox, "hello")
                assert pipeline.execute(raise_errors=True) == [5, 0]
                assert home.requests(p.Method.MUTATE) == nxt.requests(p.Method.MUTATE)
                home.mode = "answer"
                assert client.get(key).value == b"5"
                assert client.incr(key) == 6
            with Client(address=node.address("n1")) as direct:
                assert direct.get(key).value == b"6"
                assert [r.value for r in direct.scan(inbox).rows] == [b"hello"]
                status = direct.status()
        # 5 requests reached the node (incr and append twice each, one more incr); 3 applied
        assert status["counters"]["requests.mutate"] >= 5
        assert status["counters"]["mutations"] == 3 == status["store"]["binlog_last_lsn"]
    finally:
        node.stop()


def test_a_real_group_of_three_fails_over_from_a_stopped_home_exactly_once(tmp_path: Path):
    """Three real kvsvr-node replicas: with the key's home stopped (SIGSTOP) an incr and a
    pipeline of appends succeed on the next replica, the first within about one attempt and
    the rest without waiting; when the home resumes it meets the stale copy of the incr (same
    op id) and does not apply it again, and after its back-off it serves the key again."""
    config = write_cluster_config(tmp_path, replicas=3, sync=False)
    cluster = LocalCluster(config, log_dir=tmp_path / "logs")
    cluster.start()
    try:
        with Client(cluster.config, timeout=5.0, attempt_timeout=0.3) as client:
            # Answering pings is not enough: every replica must have joined (a joining one
            # does not count towards a majority, and stopping the home would leave none).
            deadline = time.monotonic() + 20
            while {client.status(address=cluster.address(n)).get("role")
                   for n in cluster.nodes} != {"replica"}:
                assert time.monotonic() < deadline, "the group never finished joining"
                time.sleep(0.05)
            key, inbox = key_with_home(0), key_with_home(0, tag="inbox")
            client.put(key + ":warm", "x")            # connections up before the clock runs
            cluster.signal("n1", signal.SIGSTOP)
            value, elapsed = _timed(client.incr, key)
            assert value == 1 and elapsed < 0.3 + SLACK_S
            pipeline = client.pipeline()
            for i in range(5):
                pipeline.append(inbox, f"m{i}")
            seqs, elapsed = _timed(pipeline.execute, raise_errors=True)
            assert seqs == [0, 1, 2, 3, 4] and elapsed < 0.3
            home = cluster.address("n1")
            assert client.health.state(home, time.monotonic()) == FAILING
            cluster.signal("n1", signal.SIGCONT)
            time.sleep(BACKOFF_FIRST_S + 0.1)
            with Client(address=home, timeout=5.0) as direct:
                before = direct.status()["counters"].get("requests.get", 0)
                assert client.get(key).value == b"1"   # the stale incr was not applied again
                assert direct.status()["counters"].get("requests.get", 0) == before + 1
            assert client.health.state(home, time.monotonic()) == HEALTHY
            assert [r.value for r in client.scan(inbox).rows] == [f"m{i}".encode()
                                                                  for i in range(5)]
            assert client.incr(key) == 2
    finally:
        cluster.stop()


# --- the asyncio client -------------------------------------------------------------------
def test_asyncio_client_fails_over_skips_and_returns_the_same_way(group: Group):
    """The asyncio client: silent home -> the next replica within about one attempt, with the
    same op id; then the home is skipped during its back-off; Unavailable moves on at once;
    NotFound is final; after the back-off the home serves again."""
    home, nxt, third = group.replicas
    key = group.key(0)

    async def run() -> None:
        async with AsyncClient(group.config, timeout=2.0, attempt_timeout=ATTEMPT_S) as client:
            assert (await client.get(key)).value == b"n1"
            home.mode = "silent"
            started = time.monotonic()
            versions = await asyncio.gather(*(client.put(f"{key}", str(i)) for i in range(3)))
            assert versions == [1, 1, 1]
            assert time.monotonic() - started < ATTEMPT_S + SLACK_S
            sent = sorted((r.client_id, r.client_seq) for r in home.requests(p.Method.MUTATE))
            resent = sorted((r.client_id, r.client_seq) for r in nxt.requests(p.Method.MUTATE))
            assert sent == resent and len(sent) == 3
            failed_at = time.monotonic()
            seen = len(home.received)
            values = await asyncio.gather(*(client.get(key) for _ in range(10)))
            assert {v.value for v in values} == {b"n2"} and len(home.received) == seen

            nxt.mode = "unavailable"
            started = time.monotonic()
            assert (await client.get(key)).value == b"n3"      # home failing, n2 Unavailable
            assert time.monotonic() - started < ATTEMPT_S
            third.mode = NotFound("nothing", version=2)
            seen = [len(r.received) for r in group.replicas]
            with pytest.raises(NotFound) as missing:
                await client.get(group.key(2, tag="nf"))
            assert missing.value.version == 2
            assert [len(r.received) for r in group.replicas] == [seen[0], seen[1], seen[2] + 1]
            third.mode = "answer"

            home.mode = "answer"
            await asyncio.sleep(max(0.0, failed_at + BACKOFF_FIRST_S - time.monotonic()) + 0.1)
            assert (await client.get(key)).value == b"n1"
            assert client.health.state(home.address, time.monotonic()) == HEALTHY

    asyncio.run(run())


def test_asyncio_client_times_out_when_every_replica_is_silent(group: Group):
    """No replica answers: each is tried, with one op id, and the call fails with Timeout."""
    for replica in group.replicas:
        replica.mode = "silent"

    async def run() -> None:
        async with AsyncClient(group.config, timeout=0.8, attempt_timeout=ATTEMPT_S) as client:
            with pytest.raises(Timeout):
                await client.append(group.key(2), "m")

    asyncio.run(run())
    ops = {(r.client_id, r.client_seq) for replica in group.replicas
           for r in replica.requests(p.Method.MUTATE)}
    assert len(ops) == 1 and all(r.received for r in group.replicas)


# --- read consistency ---------------------------------------------------------------------
def test_read_consistency_reaches_the_wire(group: Group, client: Client,
                                           capsys: pytest.CaptureFixture[str]):
    """consistency="local" travels as 1 in get, row_get, scan and changes (client, pipeline,
    asyncio client and `kvsvr ... --local`); the default is linearizable (0); anything else
    is an InvalidArgument naming the field."""
    home = group.replicas[0]
    key = group.key(0)
    client.get(key)
    client.get(key, consistency="local")
    client.row_get(key, "r", consistency="local")
    client.scan(key, consistency="local")
    client.changes(key, 0, consistency="local")
    client.scan(key, limit=5)
    pipeline = client.pipeline()
    pipeline.get(key, consistency="local")
    pipeline.changes(key, 3)
    pipeline.execute(raise_errors=True)

    async def run() -> None:
        async with AsyncClient(group.config, timeout=2.0) as async_client:
            await async_client.get(key, consistency="local")
            await async_client.row_get(key, "r")

    asyncio.run(run())
    assert cli.main(["--config", str(group.path), "get", key, "--local"]) == 0
    assert cli.main(["--config", str(group.path), "scan", key, "--local"]) == 0
    # (get writes the value's bytes alone: no newline when not on a terminal)
    assert capsys.readouterr().out == "n1" + "r\t1\tn1\n"
    assert [(r.method, r.request.consistency) for r in home.received] == [
        (p.Method.GET, 0), (p.Method.GET, 1), (p.Method.ROW_GET, 1), (p.Method.SCAN, 1),
        (p.Method.CHANGES, 1), (p.Method.SCAN, 0), (p.Method.GET, 1), (p.Method.CHANGES, 0),
        (p.Method.GET, 1), (p.Method.ROW_GET, 0), (p.Method.GET, 1), (p.Method.SCAN, 1)]
    for bad in ("strong", None, 1):
        with pytest.raises(InvalidArgument) as invalid:
            client.get(key, consistency=bad)  # type: ignore[arg-type]
        assert invalid.value.field == "consistency"
    with pytest.raises(InvalidArgument):
        client.changes(key, 0, consistency="eventual")


def test_cli_status_asks_every_replica_at_once(group: Group, capsys: pytest.CaptureFixture[str]):
    """`kvsvr status` asks all replicas together: one line each with the node's details
    (role, binlog position, peers, health), a silent one is "down" and the exit status is 4,
    and waiting for it costs one short timeout, not one per node."""
    group.replicas[1].mode = "silent"
    started = time.monotonic()
    code = cli.main(["--config", str(group.path), "--timeout", "0.4", "status"])
    assert code == 4 and time.monotonic() - started < 0.4 + SLACK_S
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [line[:5] for line in lines] == [
        [r.name, "g1", campus, r.address, state]
        for r, campus, state in zip(group.replicas, "abc", ["up", "down", "up"], strict=True)]
    assert lines[0][5] == "role=replica lsn=7 peers=n9:down,lag=3 health=ok"
    assert "no answer" in lines[1][5]
    group.replicas[1].mode = "answer"
    assert cli.main(["--config", str(group.path), "--json", "status"]) == 0
    rows = capsys.readouterr().out
    assert [(r["node"], r["campus"], r["up"]) for r in json.loads(rows)] == [
        ("n1", "a", True), ("n2", "b", True), ("n3", "c", True)]


def test_a_call_whose_deadline_is_its_attempt_timeout_still_steers_the_next_away(group: Group):
    """timeout == attempt_timeout: a call to a silent home ends in Timeout without a second
    attempt, but the silence still counts against the home, so the next call (blocking or
    asyncio) goes to the next replica instead of timing out on the same silent one."""
    home = group.replicas[0]
    key = group.key(0)
    home.mode = "silent"
    with Client(group.config, timeout=ATTEMPT_S, attempt_timeout=ATTEMPT_S) as client:
        with pytest.raises(Timeout):
            client.get(key)
        assert client.health.state(home.address, time.monotonic()) == FAILING
        assert client.get(key).value == b"n2"

    async def run() -> None:
        async with AsyncClient(group.config, timeout=ATTEMPT_S,
                               attempt_timeout=ATTEMPT_S) as client:
            with pytest.raises(Timeout):
                await client.get(key)
            assert client.health.state(home.address, time.monotonic()) == FAILING
            assert (await client.get(key)).value == b"n2"

    asyncio.run(run())
