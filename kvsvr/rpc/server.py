"""An instance of a service: a ROUTER socket at its address, each request a coroutine.

The socket is read from the event loop's reader callback, which drains up to
INSTANCE_ROUND_MESSAGES_MAX messages a turn, stamping their arrival; for each request it
decides at once what needs no handler (a bad frame or prefix, an unknown method, a refusal by
FastReject) and otherwise queues it. A dispatcher starts queued requests as tasks, a few per
loop turn: as many as keep a turn near TURN_S_TARGET, so that the socket is read every few
milliseconds even while handlers burn CPU. Were every request started at once, a busy
instance would read its socket only after running all of them, the real queue would sit
unseen in ZeroMQ's buffers, and queuing time would read low exactly when it is high.

A task's first step measures the request's queuing time (arrival to start), drops it if its
budget ran out meanwhile, decodes the body and runs the handler with the request's deadline
and priority in context (kvsvr.rpc.context). Answers leave in one send per caller per loop
turn, each carrying the admission level.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from kvsvr import _core
from kvsvr.errors import (
    Internal,
    InvalidArgument,
    KvError,
    Timeout,
    Unavailable,
    UnknownMethod,
)
from kvsvr.limits import MESSAGE_BYTES_MAX
from kvsvr.protocol import ErrorReply, pack
from kvsvr.rpc import metrics as m
from kvsvr.rpc.admission import Admission, compound, split
from kvsvr.rpc.context import deadline_var, priority_var
from kvsvr.rpc.errors import Overloaded
from kvsvr.rpc.limits import (
    ADMIT_ALL,
    BUSINESS_PRIORITY_LEVELS,
    IN_FLIGHT_MAX,
    INSTANCE_QUEUE_MESSAGES,
    INSTANCE_ROUND_MESSAGES_MAX,
    RPC_PREFIX_BYTES,
    SAMPLE_EVERY,
    STARTS_PER_TURN_MAX,
    STOP_WAIT_S,
    TURN_S_TARGET,
    USER_PRIORITY_LEVELS,
)
from kvsvr.rpc.metrics import ServiceMetrics
from kvsvr.rpc.service import (
    FLAG_FROM_HANDLER,
    FLAG_SAMPLE,
    REQUEST_PREFIX,
    RESPONSE_PREFIX,
    Method,
    Service,
    encode_body,
)

log = logging.getLogger("kvsvr.rpc.server")

_REQUEST = _core.FRAME_REQUEST
_RESPONSE = _core.FRAME_RESPONSE
_encode_frame = _core.encode_frame
_decode_frames = _core.decode_frames
_unpack_request = REQUEST_PREFIX.unpack_from
_pack_response = RESPONSE_PREFIX.pack
_EVENTS = int(zmq.EVENTS)   # plain ints: pyzmq's enums make each `&` a Python call
_POLLIN = int(zmq.POLLIN)
_TICK_S = 0.1   # how often an idle instance closes its admission window and sets its gauges


class Server:
    """Serves `service` at `address` (see the module docstring). `await serve()` runs until
    `stop()`; `bound` is set once the socket listens."""

    def __init__(self, service: Service, address: str, *, admission: Admission | None = None,
                 metrics: ServiceMetrics | None = None, in_flight_max: int = IN_FLIGHT_MAX):
        self.service = service
        self.address = address
        self.admission = admission or Admission(now=time.monotonic())
        self.metrics = metrics or ServiceMetrics.off()
        self.in_flight_max = in_flight_max
        self.in_flight = 0
        self.bound = asyncio.Event()
        self._stopped: asyncio.Future[None] | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._outbox: dict[bytes, list[bytes]] = {}
        self._logged: set[tuple[str, str, str]] = set()   # tracebacks logged once each
        self._context: zmq.Context[Any] | None = None
        self._socket: zmq.Socket[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        # Admitted, not started: a heap by (priority, arrival order), so that the most
        # important start first and a backlog of the least important rots (and is dropped
        # when its budget ends) rather than delaying everything behind it.
        self._queue: list[tuple[int, int, tuple[Any, ...]]] = []
        self._queued = 0
        self._dispatch_scheduled = False
        self._stopping = False
        self._starts_per_turn = 1   # doubles each quick turn
        self._last_dispatch = 0.0

    async def serve(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        context = self._context = zmq.Context()
        socket = self._socket = context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, MESSAGE_BYTES_MAX)
        socket.setsockopt(zmq.SNDHWM, INSTANCE_QUEUE_MESSAGES)
        socket.setsockopt(zmq.RCVHWM, INSTANCE_QUEUE_MESSAGES)
        try:
            socket.bind(self.address)
        except zmq.ZMQError as e:
            socket.close()
            context.term()
            raise OSError(f"cannot listen on {self.address}: {e}") from None
        fd: int = socket.getsockopt(zmq.FD)  # type: ignore[assignment]
        loop.add_reader(fd, self._drain)
        ticker = loop.create_task(self._tick())
        self.bound.set()
        self._drain()   # what arrived before the reader was added
        try:
            await self._stopped
            self._stopping = True
            loop.remove_reader(fd)
            await self._finish()
        finally:
            ticker.cancel()
            loop.remove_reader(fd)
            for task in list(self._tasks):
                task.cancel()
            socket.close()
            context.term()

    async def _finish(self) -> None:
        """Stopping: what waits is answered Unavailable (nothing was done, so its callers
        go to another instance at once), what runs gets STOP_WAIT_S to finish, and the
        answers leave before the socket closes."""
        for _, _, entry in self._queue:
            peer, method, request_id = entry[0], entry[1], entry[2]
            self.in_flight -= 1
            self._answer_error(peer, request_id, Unavailable(
                f"{method.full_name}: the instance is stopping; not started"))
        self._queue = []
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STOP_WAIT_S)
        self._flush()

    def stop(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    async def _tick(self) -> None:
        counters = self.metrics.counters
        base = self.metrics.first
        while True:
            await asyncio.sleep(_TICK_S)
            window = self.admission.tick(time.monotonic())
            if window is not None and window.overloaded:
                self._overloaded_window()
            counters.set(base + m.ADMISSION_LEVEL, max(self.admission.level, 0))
            counters.set(base + m.IN_FLIGHT, self.in_flight)

    # --- reading -----------------------------------------------------------------------
    def _drain(self) -> None:
        """Take what the socket holds (at most a round's worth, then yield to handlers)."""
        self._drain_scheduled = False
        socket = self._socket
        if socket is None or socket.closed or self._stopping:
            return
        arrival = time.monotonic()
        events: Callable[[int], int] = socket.getsockopt  # type: ignore[assignment]
        for _ in range(INSTANCE_ROUND_MESSAGES_MAX):
            # Asking first is cheaper than the exception an empty socket's recv raises.
            if not events(_EVENTS) & _POLLIN:
                return
            try:
                parts = socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.ZMQError:
                return
            if len(parts) != 2:
                self.metrics.counters.add(self.metrics.first + m.BAD_FRAMES, 1)
                continue
            self._message(parts[0], parts[1], arrival)
        self._schedule_drain()

    def _schedule_drain(self) -> None:
        # ZeroMQ's descriptor is edge-triggered: what is left (or arrived while we sent) must
        # be looked for again, not waited for.
        if not self._drain_scheduled and self._loop is not None:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _message(self, peer: bytes, payload: bytes, arrival: float) -> None:
        frames, error, error_request_id = _decode_frames(payload)
        for kind, code, request_id, budget_ms, body in frames:
            if kind != _REQUEST:
                self._bad(peer, request_id, "frame.kind: a response sent to a server")
                continue
            self._request(peer, code, request_id, budget_ms, body, arrival)
        if error is not None:
            self._bad(peer, error_request_id, error)

    def _bad(self, peer: bytes, request_id: int, why: str) -> None:
        self.metrics.counters.add(self.metrics.first + m.BAD_FRAMES, 1)
        field = why.partition(":")[0]
        self._answer_error(peer, request_id, InvalidArgument(why, field=field))

    # long: the arrival checks of one request in order (prefix, method, priority, admission),
    # each answering at once; split up, the hot path would pay for extra calls
    def _request(self, peer: bytes, code: int, request_id: int, budget_ms: int,
                 body: memoryview, arrival: float) -> None:
        if len(body) < RPC_PREFIX_BYTES:
            self._bad(peer, request_id, f"body: {len(body)} bytes, an RPC body starts with "
                      f"a {RPC_PREFIX_BYTES}-byte prefix")
            return
        tag, business, user, flags = _unpack_request(body)
        if tag != self.service.tag:
            self._answer_error(peer, request_id, UnknownMethod(
                f"service: this instance serves {self.service.name!r} (tag {self.service.tag})"
                f", not tag {tag}", field="service"))
            return
        method = self.service.by_code.get(code)
        if method is None:
            self._answer_error(peer, request_id, UnknownMethod(
                f"method: {self.service.name} has no method {code} (it has "
                f"{sorted(self.service.by_code)})", field="method"))
            return
        if business >= BUSINESS_PRIORITY_LEVELS or user >= USER_PRIORITY_LEVELS or flags > 1:
            self._bad(peer, request_id, f"priority: business {business}, user {user}, "
                      f"flags {flags}; expected < {BUSINESS_PRIORITY_LEVELS}, < "
                      f"{USER_PRIORITY_LEVELS}, 0 or {FLAG_SAMPLE}")
            return
        counters = self.metrics.counters
        base = self.metrics.first + code * m.MONITOR_IDS_PER_METHOD
        counters.add(base + m.REQUESTS, 1)
        priority = compound(business, user)
        if not self.admission.admit(priority, SAMPLE_EVERY if flags else 1):
            counters.add(base + m.REFUSALS, 1)
            self._answer_error(peer, request_id, Overloaded(
                f"{method.full_name}: over capacity; priority {business}/{user} is below the "
                f"admission level {'/'.join(map(str, split(max(self.admission.level, 0))))}"))
            return
        if self.in_flight >= self.in_flight_max:
            counters.add(base + m.REFUSALS, 1)
            self._answer_error(peer, request_id, Overloaded(
                f"{method.full_name}: {self.in_flight} requests held, the most an instance "
                "holds"))
            return
        deadline = arrival + budget_ms / 1000.0 if budget_ms else None
        self.in_flight += 1
        if self.in_flight == 1:   # nothing else waits or runs: start it without a turn
            task = self._loop.create_task(self._run(  # type: ignore[union-attr]
                peer, method, request_id, body[RPC_PREFIX_BYTES:], arrival, deadline,
                (business, user), base))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._queued += 1
        # FastReject off: first come, first served (priority orders nothing)
        heapq.heappush(self._queue, (priority if self.admission.enabled else 0, self._queued, (
            peer, method, request_id, body[RPC_PREFIX_BYTES:], arrival, deadline,
            (business, user), base)))
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            self._last_dispatch = time.monotonic()
            self._loop.call_soon(self._dispatch)  # type: ignore[union-attr]

    def _overloaded_window(self) -> None:
        """The level went down: what waits above it was admitted by an older level that the
        instance could not keep; it is refused now (Overloaded, at once) rather than left to
        queue until its budget ends and keep the next window overloaded."""
        self.metrics.counters.add(self.metrics.first + m.OVERLOADED_WINDOWS, 1)
        level = self.admission.level
        if not self.admission.enabled or not self._queue:
            return
        keep = []
        counters = self.metrics.counters
        for entry in self._queue:
            if entry[0] <= level:
                keep.append(entry)
                continue
            peer, method, request_id, _, _, _, _, base = entry[2]
            self.in_flight -= 1
            counters.add(base + m.REFUSALS, 1)
            self._answer_error(peer, request_id, Overloaded(
                f"{method.full_name}: over capacity; refused while queued (the admission "
                "level went down)"))
        heapq.heapify(keep)
        self._queue = keep

    def _dispatch(self) -> None:
        """Start some queued requests: fewer when the last turn ran long (handlers burning
        CPU), more when it was quick, so the socket is read again soon either way."""
        now = time.monotonic()
        turn_s = now - self._last_dispatch
        self._last_dispatch = now
        starts = self._starts_per_turn
        if turn_s > TURN_S_TARGET:
            starts = max(1, starts // 2)
        elif turn_s < TURN_S_TARGET / 2:
            starts = min(STARTS_PER_TURN_MAX, starts * 2)
        self._starts_per_turn = starts
        queue = self._queue
        loop = self._loop
        assert loop is not None
        tasks = self._tasks
        for _ in range(min(starts, len(queue))):
            task = loop.create_task(self._run(*heapq.heappop(queue)[2]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if queue:
            loop.call_soon(self._dispatch)
        else:
            self._dispatch_scheduled = False

    # --- running -----------------------------------------------------------------------
    async def _run(self, peer: bytes, method: Method[Any, Any], request_id: int,
                   body: memoryview, arrival: float, deadline: float | None,
                   priority: tuple[int, int], base: int) -> None:
        counters = self.metrics.counters
        try:
            start = time.monotonic()
            queuing_s = start - arrival
            expired = deadline is not None and start >= deadline
            window = self.admission.started(queuing_s, start, ran=not expired)
            if window is not None and window.overloaded:
                self._overloaded_window()
            counters.add(base + m.QUEUING_MS, int(queuing_s * 1000))
            if expired:
                counters.add(base + m.DEADLINE_DROPS, 1)
                self._answer_error(peer, request_id, Timeout(
                    f"{method.full_name}: the call's budget ran out after {queuing_s * 1000:.0f}"
                    " ms in the instance's queue; not started"))
                return
            try:
                request = method.decode_request(body)
                deadline_var.set(deadline)
                priority_var.set(priority)
                response = await method.handler(request)
                if type(response) is not method.response_type:
                    raise TypeError(f"{method.full_name} returned {type(response).__name__}, "
                                    f"declared {method.response_type.__name__}")
                payload = encode_body(_pack_response(self._level(), 0, 0), response,
                                      self._encoder)
            except KvError as e:
                counters.add(base + m.FAILURES, 1)
                # Flagged: a downstream Overloaded or Unavailable passed up by the handler
                # says nothing about this instance, which its callers must not eject.
                self._answer_error(peer, request_id, e, FLAG_FROM_HANDLER)
                return
            except Exception as e:
                counters.add(base + m.FAILURES, 1)
                self._internal(method, e)
                self._answer_error(peer, request_id, Internal(
                    f"{method.full_name}: the handler raised {type(e).__name__}"))
                return
            counters.add(base + self.metrics.latency_offset(time.monotonic() - arrival), 1)
            self._send(peer, _encode_frame(_RESPONSE, 0, request_id, 0, payload))
        finally:
            self.in_flight -= 1

    def _internal(self, method: Method[Any, Any], error: Exception) -> None:
        """Log a handler's exception with its traceback once per (method, type, place)."""
        trace = error.__traceback__
        while trace is not None and trace.tb_next is not None:
            trace = trace.tb_next
        place = f"{trace.tb_frame.f_code.co_filename}:{trace.tb_lineno}" if trace else ""
        key = (method.full_name, type(error).__name__, place)
        if key in self._logged:
            return
        if len(self._logged) < 1000:
            self._logged.add(key)
        log.error("%s: the handler raised (answered Internal; later ones like it are only "
                  "counted)", method.full_name, exc_info=error)

    def _level(self) -> int:
        if not self.admission.enabled:
            return ADMIT_ALL   # callers must not drop locally what this instance takes
        level = self.admission.level
        return level if level >= 0 else 0xFFFF

    # --- answering ---------------------------------------------------------------------
    def _answer_error(self, peer: bytes, request_id: int, error: KvError,
                      flags: int = 0) -> None:
        body = encode_body(_pack_response(self._level(), flags, 0),
                           ErrorReply(error.message, error.field, error.version), self._encoder)
        self._send(peer, _encode_frame(_RESPONSE, error.code, request_id, 0, body))

    def _send(self, peer: bytes, frame: bytes) -> None:
        outbox = self._outbox
        if not outbox:
            if self.in_flight <= 1 and not self._queue:   # alone: out now, a turn saved
                outbox[peer] = [frame]
                self._flush()
                return
            self._loop.call_soon(self._flush)  # type: ignore[union-attr]
        queued = outbox.get(peer)
        if queued is None:
            outbox[peer] = [frame]
        else:
            queued.append(frame)

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        socket = self._socket
        if socket is None or socket.closed:
            return
        for peer, frames in outbox.items():
            for message in pack(frames):
                try:
                    socket.send_multipart((peer, message), zmq.NOBLOCK)
                except zmq.ZMQError:
                    # A caller that left, or one whose queue is full: its calls time out.
                    break
        if int(socket.getsockopt(_EVENTS)) & _POLLIN:
            self._schedule_drain()


__all__ = ["Server"]
