"""Svrkit end to end with real processes: a `kvsvr-service` instance, stubs calling it over
ZeroMQ, typed errors, deadlines, a thousand calls in flight, bad input sent as raw frames,
and the per-method monitor ids."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq

from kvsvr import _core
from kvsvr.config import parse
from kvsvr.errors import (
    ConfigError,
    Internal,
    InvalidArgument,
    Timeout,
    Unavailable,
    UnknownMethod,
)
from kvsvr.launcher import write_single_node_config
from kvsvr.limits import FRAME_BYTES_MAX, MESSAGE_BYTES_MAX
from kvsvr.monitor.counters import open_counters
from kvsvr.monitor.registry import load_registry
from kvsvr.rpc import AsyncStub, Overloaded, Stub
from kvsvr.rpc import metrics as m
from kvsvr.rpc.examples import (
    NapRequest,
    SayReply,
    SayRequest,
    WorkReply,
    WorkRequest,
    burn,
    echo,
    relay,
)
from kvsvr.rpc.instance import monitor_ids_first
from kvsvr.rpc.launcher import ServiceInstances, add_services
from kvsvr.rpc.service import REQUEST_PREFIX, RESPONSE_PREFIX

RESPONSE_ERROR = msgspec.msgpack.Decoder()


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceInstances]:
    """echo, burn and relay instances (one each, campus a), running for the module."""
    directory = tmp_path_factory.mktemp("rpc")
    path = add_services(write_single_node_config(directory),
                        {"echo": ["a"], "burn": ["a"], "relay": ["a"]},
                        business_priorities={"burn.work": 3, "relay.forward": 7})
    instances = ServiceInstances(path, log_dir=directory / "logs")
    for target, name in (("kvsvr.rpc.examples:echo", "echo"),
                         ("kvsvr.rpc.examples:burn", "burn"),
                         ("kvsvr.rpc.examples:relay", "relay")):
        instances.add(target, name)
    instances.start()
    try:
        yield instances
    finally:
        instances.stop()


class Raw:
    """A DEALER socket sending hand-made frames to an instance."""

    def __init__(self, address: str):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def ask(self, message: bytes, timeout_ms: int = 3000) -> tuple[int, int, int, bytes]:
        """Send one message; (status, request_id, level, error-or-response body) of the
        answer."""
        self.socket.send(message)
        assert self.socket.poll(timeout_ms), "no answer"
        _kind, status, request_id, _budget, body = _core.decode_frame(self.socket.recv())
        level = RESPONSE_PREFIX.unpack_from(body)[0]
        return status, request_id, level, bytes(body[8:])

    def close(self) -> None:
        self.socket.close()
        self.context.term()


def request_frame(code: int, body: object, *, tag: int = echo.tag, request_id: int = 7,
                  budget_ms: int = 5000, business: int = 0, user: int = 0) -> bytes:
    payload = REQUEST_PREFIX.pack(tag, business, user, 0) + msgspec.msgpack.encode(body)
    return _core.encode_frame(_core.FRAME_REQUEST, code, request_id, budget_ms, payload)


def test_typed_calls_through_both_stubs(services: ServiceInstances) -> None:
    with Stub(echo, services.config_path, follow_shield=False) as stub:
        assert stub.say(SayRequest("hello")) == SayReply("hello")
        with pytest.raises(InvalidArgument) as refused:
            stub.say(SayReply("a response, not a request"))
        assert refused.value.field == "request"
        with pytest.raises(InvalidArgument) as oversize:
            stub.say(SayRequest("x" * FRAME_BYTES_MAX))
        assert oversize.value.field == "body"

    async def run() -> SayReply:
        async with AsyncStub(echo, services.config_path, follow_shield=False) as stub:
            reply: SayReply = await stub.say(SayRequest("async"))
            return reply
    assert asyncio.run(run()) == SayReply("async")


def test_handler_errors_are_typed_and_a_raising_handler_is_logged_once(
        services: ServiceInstances) -> None:
    with Stub(echo, services.config_path, follow_shield=False) as stub:
        with pytest.raises(InvalidArgument) as invalid:
            stub.fail(SayRequest("invalid"))
        assert invalid.value.field == "text"
        for _ in range(5):
            with pytest.raises(Internal, match=r"echo\.fail: the handler raised RuntimeError"):
                stub.fail(SayRequest("boom"))
        assert stub.say(SayRequest("still serving")) == SayReply("still serving")
        # a downstream refusal passed up by the handler is final, and not held against the
        # instance: it stays healthy (a refusal of its own would eject it after three)
        for _ in range(5):
            with pytest.raises(Overloaded, match="downstream"):
                stub.fail(SayRequest("overloaded"))
        assert stub.failover.state(services.address("echo-1"), time.monotonic()) == "healthy"
    log = (Path(services.log_dir or ".") / "echo-1.log").read_text()
    assert log.count("RuntimeError: a handler bug: boom") == 1


def test_a_thousand_calls_in_flight_on_one_instance(services: ServiceInstances) -> None:
    async def run() -> tuple[float, set[int]]:
        async with AsyncStub(echo, services.config_path, follow_shield=False) as stub:
            await stub.say(SayRequest("warm up"))
            start = time.monotonic()
            replies = await asyncio.gather(*(stub.nap(NapRequest(500)) for _ in range(1500)))
            return time.monotonic() - start, {reply.pid for reply in replies}
    elapsed, pids = asyncio.run(run())
    # 1,500 naps of half a second each, all at once: about half a second, not 750.
    assert elapsed < 2.5
    assert len(pids) == 1


def test_a_call_past_its_deadline_is_a_timeout_not_a_hang(services: ServiceInstances) -> None:
    with Stub(echo, services.config_path, follow_shield=False) as stub:
        start = time.monotonic()
        with pytest.raises(Timeout, match=r"echo\.nap"):
            stub.nap(NapRequest(3000), timeout=0.3)
        assert time.monotonic() - start < 1.0


def test_downstream_calls_inherit_the_budget_and_business_priority(
        services: ServiceInstances) -> None:
    with Stub(relay, services.config_path, follow_shield=False) as stub:
        reply: WorkReply = stub.forward(WorkRequest(cpu_us=0, tag="down"), timeout=2.0)
    # burn saw what relay had left of the caller's 2 s, not its own default of 5 s, and the
    # business priority of the entry method (relay.forward: 7), not its own row (3)
    assert reply.tag == "down" and 1000 < reply.remaining_ms <= 2000
    assert reply.business == 7
    with Stub(burn, services.config_path, follow_shield=False) as stub:
        assert stub.work(WorkRequest(cpu_us=0)).business == 3      # an entry call itself


def test_work_whose_budget_ran_out_in_the_queue_is_dropped(services: ServiceInstances) -> None:
    raw = Raw(services.address("burn-1"))
    try:
        # 400 ms of CPU first, then a request with 50 ms of budget queued behind it
        raw.socket.send(request_frame(1, WorkRequest(cpu_us=400_000), tag=burn.tag,
                                      request_id=1))
        raw.socket.send(request_frame(1, WorkRequest(cpu_us=0), tag=burn.tag, request_id=2,
                                      budget_ms=50))
        answers: dict[int, tuple[int, bytes]] = {}
        while 2 not in answers:
            assert raw.socket.poll(3000), "no answer"
            for _, status, request_id, _, payload in _core.decode_frames(raw.socket.recv())[0]:
                answers[request_id] = (status, bytes(payload[8:]))
        status, body = answers[2]
        assert status == Timeout.code
        assert b"not started" in body
    finally:
        raw.close()


@pytest.mark.parametrize("message, status, field", [
    (b"", InvalidArgument.code, "message"),
    (b"GET / HTTP/1.1\r\n\r\n" + b"x" * 10, InvalidArgument.code, "frame.magic"),
    (request_frame(1, SayRequest("x"))[:30], InvalidArgument.code, "frame.body_len"),
    (request_frame(1, {"text": 5}), InvalidArgument.code, "request.text"),
    (request_frame(1, [1, 2, 3]), InvalidArgument.code, "request"),
    (_core.encode_frame(_core.FRAME_REQUEST, 1, 7, 5000, REQUEST_PREFIX.pack(echo.tag, 0, 0, 0)
                        + b"\xc1"), InvalidArgument.code, "request"),
    (request_frame(1, SayRequest("x"), business=200), InvalidArgument.code, "priority"),
    (request_frame(63, SayRequest("x")), UnknownMethod.code, "method"),
    (request_frame(1, SayRequest("x"), tag=burn.tag), UnknownMethod.code, "service"),
    (_core.encode_frame(_core.FRAME_REQUEST, 1, 7, 0, b"abc"), InvalidArgument.code, "body"),
    (_core.encode_frame(_core.FRAME_RESPONSE, 0, 7, 0, b""), InvalidArgument.code,
     "frame.kind"),
])
def test_bad_input_gets_a_clear_error_naming_the_field(
        services: ServiceInstances, message: bytes, status: int, field: str) -> None:
    raw = Raw(services.address("echo-1"))
    try:
        if message[:2] != b"KV" or len(message) < 16:
            raw.socket.send(message)
            assert raw.socket.poll(3000)
            frame = _core.decode_frame(raw.socket.recv())
            got_status, body = frame[1], bytes(frame[4][8:])
        else:
            got_status, _, _, body = raw.ask(message)
        error = RESPONSE_ERROR.decode(body)
        assert got_status == status, error
        assert error[1] == field and error[0].startswith(field), error
    finally:
        raw.close()


def test_garbage_floods_and_oversize_messages_change_nothing(
        services: ServiceInstances) -> None:
    raw = Raw(services.address("echo-1"))
    try:
        for index in range(5000):
            raw.socket.send(bytes([index % 256]) * (1 + index % 40))
        # bigger than a message may be: ZeroMQ drops that connection, the instance lives on
        big = Raw(services.address("echo-1"))
        big.socket.send(b"\0" * (MESSAGE_BYTES_MAX + 1))
        big.close()
    finally:
        raw.close()
    with Stub(echo, services.config_path, follow_shield=False) as stub:
        assert stub.say(SayRequest("after the flood")) == SayReply("after the flood")
    assert services.processes["echo-1"].poll() is None


def test_each_method_counts_in_its_monitor_ids(services: ServiceInstances) -> None:
    first = monitor_ids_first(services.config, "echo")
    base = first + 1 * m.MONITOR_IDS_PER_METHOD      # say is code 1
    counters = open_counters(config=services.config_path)

    def total(offset: int) -> int:
        now = counters.now_s()
        return sum(counters.value_at(base + offset, s) or 0 for s in range(now - 60, now + 1))

    before = total(m.REQUESTS)
    with Stub(echo, services.config_path, follow_shield=False) as stub:
        for _ in range(20):
            stub.say(SayRequest("count me"))
    assert total(m.REQUESTS) - before == 20
    assert sum(total(m.LATENCY_FIRST + i) for i in range(6)) >= 20
    assert counters.kind(first + m.ADMISSION_LEVEL) == _core.KIND_GAUGE


def test_the_printed_registry_names_every_id_of_the_service(
        services: ServiceInstances, tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "kvsvr.rpc.instance", "--config",
                          services.config_path, "--print-registry", "kvsvr.rpc.examples:echo"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    (tmp_path / "echo.toml").write_text(run.stdout)
    registry = load_registry([tmp_path / "echo.toml"])
    first = monitor_ids_first(services.config, "echo")
    say = first + 1 * m.MONITOR_IDS_PER_METHOD
    assert registry.by_id[say + m.REQUESTS].name == "rpc.echo.say.requests"
    assert registry.by_id[say + m.LATENCY_FIRST].name == "rpc.echo.say.latency.le_1ms"
    assert registry.by_id[first + m.ADMISSION_LEVEL].kind == "gauge"


def test_config_and_program_errors_name_the_field(tmp_path: Path) -> None:
    path = add_services(write_single_node_config(tmp_path), {"echo": ["a"]},
                        business_priorities={"echo.say": 1})
    text = path.read_text()
    with pytest.raises(ConfigError, match=r"business_priorities\.echo\.say"):
        parse(text.replace('"echo.say" = 1', '"echo.say" = 99'))
    with pytest.raises(ConfigError, match=r"business_priorities\.nodot"):
        parse(text.replace('"echo.say" = 1', '"nodot" = 1'))
    with pytest.raises(ConfigError, match=r"services\[0\]\.instances\[0\]\.address"):
        parse(text.replace('address = "tcp://127.0.0.1:', 'address = "tcp://x:99999', 2)
              .replace('tcp://x:99999', 'tcp://127.0.0.1:', 1))
    with pytest.raises(ConfigError, match=r"services\[0\]\.monitor_ids_first: the block "
                                          r"500\.\.1523 is outside"):
        monitor_ids_first(parse(text.replace('name = "echo"', 'name = "echo"\n'
                                             'monitor_ids_first = 500')), "echo")
    two = add_services(write_single_node_config(tmp_path / "two"), {"a": ["x"], "b": ["x"]})
    overlapping = two.read_text().replace('name = "b"', 'name = "b"\nmonitor_ids_first = 16400')
    with pytest.raises(ConfigError, match=r"services\[1\]\.monitor_ids_first: .* overlaps "
                                          r"that of services\[0\]"):
        monitor_ids_first(parse(overlapping), "b")
    run = subprocess.run([sys.executable, "-m", "kvsvr.rpc.instance", "--config", str(path),
                          "--node", "nope", "kvsvr.rpc.examples:echo"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "node: 'nope' is not an instance" in run.stderr
    run = subprocess.run([sys.executable, "-m", "kvsvr.rpc.instance", "--config", str(path),
                          "--node", "echo-1", "kvsvr.rpc.examples:nothing"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "is not a kvsvr.rpc.Service" in run.stderr


def test_mutated_frames_are_answered_or_dropped_and_the_instance_serves_on(
        services: ServiceInstances) -> None:
    """Random byte flips in valid requests (header, prefix or body): each message gets at
    most two answers (a shortened body_len leaves a second, bad frame behind the first), the
    instance never stops, and a clean call works after."""
    import random

    rng = random.Random(23)
    valid = request_frame(1, SayRequest("mutate me"), request_id=99)
    raw = Raw(services.address("echo-1"))
    try:
        sent = 0
        for _ in range(2000):
            message = bytearray(valid)
            for _ in range(rng.randint(1, 4)):
                message[rng.randrange(len(message))] = rng.randrange(256)
            raw.socket.send(bytes(message))
            sent += 1
        answers = 0
        while raw.socket.poll(500):
            frames, _, _ = _core.decode_frames(raw.socket.recv())
            answers += len(frames)
        assert 0 < answers <= 2 * sent
    finally:
        raw.close()
    with Stub(echo, services.config_path, follow_shield=False) as stub:
        assert stub.say(SayRequest("after")) == SayReply("after")
    assert services.processes["echo-1"].poll() is None


def test_a_service_with_no_instance_up_fails_fast_as_unavailable(tmp_path: Path) -> None:
    """Nothing listens: the call is refused in about a second (the connect wait), not at its
    deadline, as Unavailable saying nothing was sent."""
    path = add_services(write_single_node_config(tmp_path), {"echo": ["a", "b"]})
    with Stub(echo, path, follow_shield=False, timeout=10.0) as stub:
        start = time.monotonic()
        with pytest.raises(Unavailable, match="nothing was sent"):
            stub.say(SayRequest("anyone?"))
        assert time.monotonic() - start < 2.0
