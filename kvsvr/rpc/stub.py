"""Callers of a service: `AsyncStub` (`await stub.say(request)`) and `Stub`, its blocking
twin for scripts and command lines.

A call picks an instance with the caller's Failover (own campus first, ejected and shielded
ones skipped, and those whose last reported admission level would refuse the call), sends one
frame carrying the remaining budget and the call's priority, and waits at most an attempt
timeout. A refusal that did no work goes to another instance: Overloaded while the retry
budget allows, Unavailable (a stopping instance) always, once per instance; a timed-out
attempt does so only for an idempotent method, within the budget. Every
call ends with its response or a typed error: Timeout, Overloaded, Unavailable, or the
error the handler raised.

Inside a handler, a call inherits the deadline and the priority of the request being
served (kvsvr.rpc.context); an entry call takes its business priority from the config's
table (`business_priorities`, by "service.method") and its user priority from `user=`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgspec
import zmq

from kvsvr import _core
from kvsvr import config as config_module
from kvsvr.config import ClusterConfig
from kvsvr.connecting import send_frames
from kvsvr.errors import (
    Internal,
    InvalidArgument,
    KvError,
    Timeout,
    Unavailable,
    UnknownMethod,
)
from kvsvr.limits import CONNECT_WAIT_S, MESSAGE_BYTES_MAX
from kvsvr.protocol import ErrorReply
from kvsvr.rpc.admission import RetryBudget, compound, user_priority
from kvsvr.rpc.context import deadline_var, priority_var
from kvsvr.rpc.errors import RPC_ERRORS_BY_CODE, Overloaded
from kvsvr.rpc.failover import OVERLOADED, SAMPLED, SHIELDED, Failover
from kvsvr.rpc.limits import (
    ATTEMPT_TIMEOUT_S_DEFAULT,
    BUSINESS_PRIORITY_DEFAULT,
    CALL_TIMEOUT_S_DEFAULT,
    CALLER_QUEUE_MESSAGES,
    CONNECT_RETRY_S,
    RPC_PREFIX_BYTES,
    SHIELD_POLL_S,
    USER_PRIORITY_LEVELS,
)
from kvsvr.rpc.service import (
    FLAG_FROM_HANDLER,
    FLAG_SAMPLE,
    REQUEST_PREFIX,
    RESPONSE_PREFIX,
    Method,
    Service,
    encode_body,
)

log = logging.getLogger("kvsvr.rpc.stub")

_REQUEST = _core.FRAME_REQUEST
_encode_frame = _core.encode_frame
_decode_frames = _core.decode_frames
_unpack_response = RESPONSE_PREFIX.unpack_from
_EVENTS = int(zmq.EVENTS)   # plain ints: pyzmq's enums make each `&` a Python call
_POLLIN = int(zmq.POLLIN)
_LEVEL_NONE = 0xFFFF                 # an instance that admits nothing reports this
_error_decoder = msgspec.msgpack.Decoder(ErrorReply)
_TIMED_OUT: Any = object()           # an attempt's future result: no answer in time
_UNSENT: Any = object()              # ... not sent: no connection to the instance (yet)


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(_TIMED_OUT)


class _Link:
    """The socket to one instance and its calls awaiting an answer."""

    def __init__(self, context: zmq.Context[Any], address: str,
                 loop: asyncio.AbstractEventLoop):
        socket = self.socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, MESSAGE_BYTES_MAX)
        socket.setsockopt(zmq.SNDHWM, CALLER_QUEUE_MESSAGES)
        socket.setsockopt(zmq.RCVHWM, CALLER_QUEUE_MESSAGES)
        # Queue only to a live connection: a call to a dead instance is refused at once (and
        # goes elsewhere) instead of waiting in ZeroMQ's pipe to reach its next life, budget
        # intact, long after its caller gave up.
        socket.setsockopt(zmq.IMMEDIATE, 1)
        socket.connect(address)
        self.created = time.monotonic()
        self.address = address
        self.loop = loop
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.outbox: list[bytes] = []
        self.outbox_ids: list[int] = []   # the request id of each frame in the outbox
        self.drain_scheduled = False
        self.fd = socket.getsockopt(zmq.FD)
        loop.add_reader(self.fd, self.drain)

    def send(self, request_id: int, frame: bytes) -> None:
        self.outbox.append(frame)
        self.outbox_ids.append(request_id)
        # Alone in flight: out now (a loop turn saved). Else with this turn's others, in one
        # message.
        if len(self.outbox) == 1:
            if len(self.pending) == 1:
                self.flush()
            else:
                self.loop.call_soon(self.flush)

    def flush(self) -> None:
        frames, self.outbox = self.outbox, []
        ids, self.outbox_ids = self.outbox_ids, []
        if self.socket.closed:
            return
        try:
            sent = send_frames(self.socket, frames)
        except zmq.ZMQError:
            sent = 0
        # What did not go out (no connection, or a full queue) is answered so at once.
        for request_id in ids[sent:]:
            future = self.pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(_UNSENT)
        if int(self.socket.getsockopt(_EVENTS)) & _POLLIN:
            self.schedule_drain()

    def schedule_drain(self) -> None:
        # The descriptor is edge-triggered: look again rather than wait for the next edge.
        if not self.drain_scheduled:
            self.drain_scheduled = True
            self.loop.call_soon(self.drain)

    def drain(self) -> None:
        self.drain_scheduled = False
        socket = self.socket
        if socket.closed:
            return
        pending = self.pending
        events: Callable[[int], int] = socket.getsockopt
        for _ in range(512):
            # Asking first is cheaper than the exception an empty socket's recv raises.
            if not events(_EVENTS) & _POLLIN:
                return
            try:
                payload = socket.recv(zmq.NOBLOCK, copy=True)
            except zmq.ZMQError:
                return
            # A damaged answer is dropped: its call times out.
            for _kind, status, request_id, _budget, body in _decode_frames(payload)[0]:
                future = pending.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result((status, body))
        self.schedule_drain()

    def close(self) -> None:
        if not self.socket.closed:
            self.loop.remove_reader(self.fd)
            self.socket.close()
        for future in self.pending.values():
            if not future.done():
                future.set_result(_TIMED_OUT)
        self.pending.clear()


def _instances_of(service: Service, config: ClusterConfig) -> list[tuple[str, str]]:
    found = [entry for entry in config.services if entry.name == service.name]
    if not found:
        known = ", ".join(entry.name for entry in config.services) or "none"
        raise InvalidArgument(f"service: {service.name!r} is not in the config's [[services]] "
                              f"(services: {known})", field="service")
    return [(instance.address, instance.campus) for instance in found[0].instances]


def _method_caller(stub: Any, name: str) -> Callable[..., Any]:
    """`stub.NAME(request, timeout=, user=)` for a method of the stub's service (both stubs'
    `__getattr__`): `stub.call` with that method."""
    service: Service = stub.service
    method = service.by_name.get(name) if not name.startswith("_") else None
    if method is None:
        raise AttributeError(f"{service.name} has no method {name!r} (it has "
                             f"{sorted(service.by_name)})")

    def call(request: Any, *, timeout: float | None = None,
             user: str | int | bytes | None = None) -> Any:
        return stub.call(method, request, timeout=timeout, user=user)
    return call


class AsyncStub:
    """Calls `service` (see the module docstring). `config` (a ClusterConfig, a path, or
    None for instances given as (address, campus) pairs) lists its instances and the
    business priorities; with KV groups in it, the stub also follows campus shielding.
    Its sockets are made on its first call and belong to that call's event loop: one stub
    per loop (a Stub runs its own)."""

    def __init__(self, service: Service, config: ClusterConfig | str | Path | None = None, *,
                 instances: Sequence[tuple[str, str]] | None = None, campus: str | None = None,
                 timeout: float = CALL_TIMEOUT_S_DEFAULT,
                 attempt_timeout: float = ATTEMPT_TIMEOUT_S_DEFAULT,
                 business_priorities: dict[str, int] | None = None,
                 follow_shield: bool = True):
        if isinstance(config, str | Path):
            config = config_module.load(config)
        self.service = service
        self.config = config
        if instances is None:
            if config is None:
                raise InvalidArgument("instances: give a config with [[services]] or "
                                      "(address, campus) pairs", field="instances")
            instances = _instances_of(service, config)
        priorities = dict(config.business_priorities) if config is not None else {}
        priorities.update(business_priorities or {})
        self.business_priorities = priorities
        for name, value in (("timeout", timeout), ("attempt_timeout", attempt_timeout)):
            if not (isinstance(value, int | float) and value > 0):
                raise InvalidArgument(f"{name}: {value!r}, expected seconds > 0", field=name)
        self.timeout = float(timeout)
        self.attempt_timeout = float(attempt_timeout)
        self.failover = Failover(list(instances), campus)
        self.retry_budget = RetryBudget()
        self.follow_shield = follow_shield
        self._encoder = msgspec.msgpack.Encoder()
        self._links: dict[str, _Link] = {}
        self._context: zmq.Context[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_id = 1
        self._poller: asyncio.Task[None] | None = None
        self._closed = False

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return _method_caller(self, name)

    def _start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        context = self._context = zmq.Context()
        for address in self.failover.instances:
            self._links[address] = _Link(context, address, loop)
        if (self.follow_shield and self.config is not None and self.config.groups):
            self._poller = loop.create_task(self._follow_shield(self.config))

    async def _follow_shield(self, config: ClusterConfig) -> None:
        from kvsvr.aio import AsyncClient
        from kvsvr.rpc.shield import read_shielded

        campuses = sorted({i.campus for i in self.failover.instances.values()})
        client = AsyncClient(config, timeout=SHIELD_POLL_S, attempt_timeout=SHIELD_POLL_S / 2)
        complained = False
        try:
            while True:
                try:
                    self.failover.shield(await read_shielded(client, campuses))
                    complained = False
                except KvError as e:
                    if not complained:
                        log.warning("%s: cannot read the campus shield switches (%s); "
                                    "keeping the last ones read", self.service.name, e)
                        complained = True
                await asyncio.sleep(SHIELD_POLL_S)
        finally:
            await client.close()

    async def close(self) -> None:
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._poller
        for link in self._links.values():
            link.close()
        self._links.clear()
        if self._context is not None:
            self._context.term()
            self._context = None

    async def __aenter__(self) -> AsyncStub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _priority(self, method: Method[Any, Any], user: str | int | bytes | None
                  ) -> tuple[int, int]:
        inherited = priority_var.get()
        if inherited is not None:
            business, user_level = inherited
            if user is not None:
                user_level = user_priority(user, time.time())
            return business, user_level
        # A call naming no user gets a random user priority: anonymous traffic is then shed
        # a slice at a time, not all at once as one priority would be.
        return (self.business_priorities.get(method.full_name, BUSINESS_PRIORITY_DEFAULT),
                random.randrange(USER_PRIORITY_LEVELS) if user is None
                else user_priority(user, time.time()))

    # long: one call's attempts and the decision after each answer, in one loop for reading
    async def call(self, method: Method[Any, Any] | str, request: Any, *,
                   timeout: float | None = None,
                   user: str | int | bytes | None = None) -> Any:
        """The response of `method` to `request`, or a typed error (module docstring)."""
        if isinstance(method, str):
            found = self.service.by_name.get(method)
            if found is None:
                raise UnknownMethod(f"method: {self.service.name} has no method {method!r}",
                                    field="method")
            method = found
        if type(request) is not method.request_type:
            raise InvalidArgument(f"request: {type(request).__name__}, {method.full_name} "
                                  f"takes {method.request_type.__name__}", field="request")
        if self._closed:
            raise Unavailable(f"{self.service.name}: the stub is closed")
        if self._loop is None:
            self._start()
        loop = self._loop
        assert loop is not None
        now = time.monotonic()
        deadline = now + (self.timeout if timeout is None else timeout)
        inherited = deadline_var.get()
        if inherited is not None and inherited < deadline:
            deadline = inherited
        business, user_level = self._priority(method, user)
        priority = compound(business, user_level)
        body = encode_body(REQUEST_PREFIX.pack(self.service.tag, business, user_level, 0),
                           request, self._encoder)
        self.retry_budget.called()
        failover = self.failover
        started = now
        unsent: list[str] = []   # tried, but nothing could be sent there
        tried: list[str] = []
        last: KvError | None = None
        while True:
            if now >= deadline:
                raise last if isinstance(last, Overloaded | Unavailable) else Timeout(
                    f"{method.full_name}: no answer within its budget (tried "
                    f"{', '.join(tried) or 'no instance'})")
            instance, why = failover.choose(now, priority, tried)
            if instance is None and unsent and now - started < CONNECT_WAIT_S:
                # Connections may still be coming up: try those instances again shortly.
                await asyncio.sleep(CONNECT_RETRY_S)
                now = time.monotonic()
                tried = [address for address in tried if address not in unsent]
                unsent.clear()
                continue
            if why == SAMPLED:
                sample_body = bytearray(body)
                sample_body[6] = FLAG_SAMPLE   # the flags' low byte (see kvsvr.rpc.service)
                frame_body: bytes | bytearray = sample_body
            else:
                frame_body = body
            if instance is None:
                if last is not None:
                    raise last
                if why == OVERLOADED:
                    raise Overloaded(f"{method.full_name}: refused here, every instance "
                                     f"reported an admission level below priority "
                                     f"{business}/{user_level}")
                raise Unavailable(f"{method.full_name}: no instance to send to" + (
                    " (every one is in a shielded campus)" if why == SHIELDED else ""))
            address = instance.address
            attempt_s = min(deadline - now, self.attempt_timeout)
            failover.sent(instance, now, attempt_s)
            request_id = self._next_id
            self._next_id += 1
            future = loop.create_future()
            link = self._links[address]
            link.pending[request_id] = future
            budget_ms = max(1, min(int((deadline - now) * 1000), 0xFFFFFFFF))
            link.send(request_id,
                      _encode_frame(_REQUEST, method.code, request_id, budget_ms, frame_body))
            timer = loop.call_later(attempt_s, _expire, future)
            answer = await future
            timer.cancel()
            now = time.monotonic()
            tried.append(address)
            if answer is _UNSENT:
                # Nothing was sent: the next instance, outside the retry budget. A link
                # younger than CONNECT_WAIT_S may still be connecting: no failure counted.
                if now - link.created >= CONNECT_WAIT_S:
                    failover.failed(address, now)
                unsent.append(address)
                last = Unavailable(f"{method.full_name}: no connection to {address}; "
                                   "nothing was sent")
                continue
            if answer is _TIMED_OUT:
                link.pending.pop(request_id, None)
                failover.failed(address, now)
                last = Timeout(f"{method.full_name}: {address} did not answer within "
                               f"{attempt_s:.3g} s")
                if not method.idempotent or now >= deadline or not self.retry_budget.spend():
                    raise last
                continue
            status, payload = answer
            level = _LEVEL_NONE
            flags = 0
            if len(payload) >= RPC_PREFIX_BYTES:
                level, flags, _ = _unpack_response(payload)
            level = -1 if level == _LEVEL_NONE else level
            if status == 0:
                failover.succeeded(address, now, level)
                try:
                    return method.decode_response(payload[RPC_PREFIX_BYTES:])
                except InvalidArgument as e:
                    raise Internal(f"{method.full_name}: unreadable response from {address}: "
                                  f"{e}") from None
            error = _error(status, payload)
            if flags & FLAG_FROM_HANDLER:   # the handler's (a downstream refusal): final
                failover.succeeded(address, now, level)
                raise error
            if isinstance(error, Overloaded):
                failover.failed(address, now, level)
            elif isinstance(error, Unavailable):
                failover.failed(address, now)
            else:
                failover.succeeded(address, now, level)
                raise error
            last = error
            # Unavailable (the instance took nothing: stopping) goes to the next instance
            # without spending the budget: it adds no load, and each instance is tried once.
            if isinstance(error, Overloaded) and not self.retry_budget.spend():
                raise error


def _error(status: int, payload: Any) -> KvError:
    cls = RPC_ERRORS_BY_CODE.get(status, KvError)
    try:
        reply = _error_decoder.decode(payload[RPC_PREFIX_BYTES:])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return cls(f"status {status} with an unreadable body")
    return cls(reply.message, field=reply.field, version=reply.version)


class Stub:
    """The blocking twin of AsyncStub: `stub.say(request)` returns the response. Its calls
    run on an event loop of its own in a background thread; any thread may call."""

    def __init__(self, service: Service, config: ClusterConfig | str | Path | None = None,
                 **options: Any):
        self.service = service
        self._async = AsyncStub(service, config, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name=f"kvsvr-rpc-{service.name}", daemon=True)
        self._thread.start()

    @property
    def failover(self) -> Failover:
        return self._async.failover

    def call(self, method: Method[Any, Any] | str, request: Any, *,
             timeout: float | None = None, user: str | int | bytes | None = None) -> Any:
        if self._loop.is_closed():
            raise Unavailable(f"{self.service.name}: the stub is closed")
        future: Future[Any] = asyncio.run_coroutine_threadsafe(
            self._async.call(method, request, timeout=timeout, user=user), self._loop)
        return future.result()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return _method_caller(self, name)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._async.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Stub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AsyncStub", "Stub"]
