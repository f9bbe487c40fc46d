"""The asyncio client: `kvsvr.AsyncClient`, the same calls as `Client`, awaited.

Requests issued in one turn of the event loop leave in one ZeroMQ message per replica (so many
concurrent tasks pipeline for free); one reader task per replica resolves answers by request
id; one sweeper resends requests unanswered for `attempt_timeout` to the next replica of their
key that is not failing (same op ids, so writes apply once), resends those answered
Unavailable (or Timeout) once a back-off allows, and fails those past their deadline. Replica
choice and health are the blocking client's (kvsvr.health): home first, failing ones skipped;
a refusal that may not be final is raised as Timeout on the same rule
(kvsvr.calls.refusal_outcome).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from kvsvr import _core, calls
from kvsvr import protocol as p
from kvsvr.calls import CallSpec
from kvsvr.client import (
    ClientCalls,
    MutationBatch,
    check_timeout,
    client_id_or_new,
    first_client_seq,
    make_router,
)
from kvsvr.config import ClusterConfig
from kvsvr.connecting import Parked, close_sockets, connect, frames_through, unreachable
from kvsvr.errors import Internal, KvError, Timeout, Unavailable
from kvsvr.health import HEALTHY, Health
from kvsvr.limits import (
    ASYNC_CLIENT_SWEEP_INTERVAL_S,
    CLIENT_ATTEMPT_TIMEOUT_S,
    CONNECT_CHECK_S,
    CONNECT_WAIT_S,
    TIMEOUT_S_DEFAULT,
    WATCH_WAIT_S_DEFAULT,
)
from kvsvr.listing import KeyListing
from kvsvr.typed import awaiting
from kvsvr.watching import WatchEvent, watch_events_async

_encode = p.encode
_encode_frame = _core.encode_frame
_decode_frames = _core.decode_frames
_REQUEST = _core.FRAME_REQUEST


def attempt_s(spec: CallSpec, default: float) -> float:
    """How long an attempt of `spec` may go unanswered: a long poll's own, else `default`."""
    own = spec.attempt_timeout
    return default if own is None or own < default else own


class _Call:
    """One call in flight: its current attempt (address, request_id; address None while it
    waits for a back-off to end) and its deadlines. Earlier attempts stay in their
    connection's table until the call is done, so a late answer to one still counts. It ends
    without an answer, or with a refusal that may not be final, as the blocking client's do
    (see kvsvr.client._Exchange)."""

    __slots__ = ("address", "attempt_deadline", "body", "deadline", "exclude", "future",
                 "loose", "park", "refusal", "request_id", "resend_at", "route", "spec",
                 "timeout", "tried", "unanswered")

    def __init__(self, spec: CallSpec, route: tuple[str, ...], future: asyncio.Future[Any],
                 now: float, timeout: float):
        self.spec = spec
        self.body = _encode(spec.request)
        self.route = route
        self.future = future
        self.timeout = timeout
        self.deadline = now + timeout
        self.attempt_deadline = self.deadline
        self.address: str | None = None
        self.request_id = 0
        self.park: Parked | None = None   # its last wait for a connection (see connecting)
        self.resend_at = 0.0
        self.exclude: str | None = None
        self.tried: list[str] = []
        self.unanswered = False           # met silence or a Timeout answer: ambiguous
        self.refusal: KvError | None = None   # the last Unavailable or Timeout answer
        # Attempts no longer current that may still apply it (address, request id): silent
        # past their attempt timeout, or answered Timeout.
        self.loose: list[tuple[str, int]] | None = None

    def set_loose(self) -> None:
        """The current attempt is given up on without an answer that says it holds nothing."""
        assert self.address is not None
        if self.loose is None:
            self.loose = []
        self.loose.append((self.address, self.request_id))

    def refused(self, error: KvError, address: str, request_id: int) -> KvError:
        """What the call raises for `error`, the answer of `address` to its attempt
        `request_id`: Timeout if another attempt, at another replica and out or loose, may
        still apply the write and the refusal may not be final, else `error`."""
        if self.loose is None and self.address == address and self.request_id == request_id:
            return error   # its only attempt (the common case)
        elsewhere = {other: None for other, _ in self.loose or () if other != address}
        if self.address is not None and self.address != address:   # a later attempt is out
            elsewhere[self.address] = None
        return calls.refusal_outcome(self.spec, error, address, list(elsewhere))

    def expired(self) -> KvError:
        """The error of a call out of time: the last Unavailable if every attempt was
        answered so, else Timeout (a write may or may not have been applied)."""
        if self.refusal is not None and not self.unanswered and self.address is None:
            return self.refusal
        tried = ", ".join(dict.fromkeys(self.tried)) or "no replica"
        return Timeout(f"no answer within {self.timeout:.3g} s "
                       f"({p.Method(self.spec.method).name.lower()}; tried {tried}"
                       + (f"; last answer: {self.refusal}" if self.refusal else "") + ")")


class _Connection:
    def __init__(self, client: AsyncClient, address: str):
        self.client = client
        self.address = address
        # an asyncio socket: its recv() is awaited
        self.socket: Any = connect(client._context, address, client._sockets)
        self.pending: dict[int, _Call] = {}
        self.outbox: list[bytes] = []
        self.outbox_ids: list[int] = []   # the request id of each frame in the outbox
        self.next_id = 1
        self.loop = asyncio.get_running_loop()
        self.reader = self.loop.create_task(self._read())

    def send(self, call: _Call, now: float) -> None:
        """Start an attempt of `call` here (it leaves with this loop turn's other requests)."""
        request_id = self.next_id
        self.next_id += 1
        budget_ms = max(1, min(int((call.deadline - now) * 1000), 0xFFFFFFFF))
        frame = _encode_frame(_REQUEST, call.spec.method, request_id, budget_ms, call.body)
        self.pending[request_id] = call
        call.address = self.address
        call.request_id = request_id
        call.attempt_deadline = min(call.deadline,
                                    now + attempt_s(call.spec, self.client.attempt_timeout))
        call.tried.append(self.address)
        if not self.outbox:
            self.loop.call_soon(self._flush)
        self.outbox.append(frame)
        self.outbox_ids.append(request_id)

    def _flush(self) -> None:
        frames, self.outbox = self.outbox, []
        ids, self.outbox_ids = self.outbox_ids, []
        sent = 0
        for message in p.pack(frames):
            # The asyncio socket answers a send that cannot go out now with a failed future,
            # not an exception: zmq.Again, nothing sent (see kvsvr.connecting).
            if self.socket.send(message, zmq.NOBLOCK).exception() is not None:
                self.client._unsent(self, ids[sent:])
                return
            sent = frames_through(frames, sent, message)

    def sweep(self, now: float, unanswered: list[_Call]) -> bool:
        """Drop finished calls, fail those past their deadline, and collect in `unanswered`
        the calls whose current attempt is this connection's and has timed out. True if a
        call ended with its attempt here unanswered."""
        address = self.address
        silent = False
        for request_id, call in list(self.pending.items()):
            if call.future.done():
                del self.pending[request_id]
            elif now >= call.deadline:
                del self.pending[request_id]
                if call.address == address and call.request_id == request_id:
                    # Unanswered to the end: it counts against this replica as a timed-out
                    # attempt does (else a deadline equal to the attempt timeout never would).
                    self.client.health.failed(address, now)
                    silent = True
                call.future.set_exception(call.expired())
            elif (now >= call.attempt_deadline and call.request_id == request_id
                  and call.address == address):
                unanswered.append(call)
        return silent

    async def _read(self) -> None:
        recv = self.socket.recv
        pending = self.pending
        address = self.address
        client = self.client
        health = client.health
        while True:
            try:
                payload = await recv()
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            # A damaged answer is dropped: its request is resent or times out.
            for _kind, status, request_id, _budget, body in _decode_frames(payload)[0]:
                call = pending.pop(request_id, None)
                if call is None or call.future.done():
                    continue
                spec = call.spec
                try:
                    result = spec.finish(p.parse_reply(spec.method, status, body))
                except (Unavailable, Timeout) as e:  # as in the blocking client's _answer
                    now = time.monotonic()
                    health.failed(address, now)
                    if isinstance(e, Timeout):
                        call.unanswered = True
                    if call.address == address and call.request_id == request_id:
                        call.refusal = e
                        if isinstance(e, Timeout):
                            call.set_loose()
                        client._route(call, now, address, paced=True)
                    elif (isinstance(e, Unavailable) and call.loose
                          and (address, request_id) in call.loose):
                        call.loose.remove((address, request_id))   # it holds nothing after all
                    continue  # else a later attempt of the call is out: it answers
                except KvError as e:
                    health.succeeded(address)
                    call.future.set_exception(call.refused(e, address, request_id))
                    continue
                except Exception as e:  # one bad answer fails its call, not the reader
                    health.succeeded(address)
                    call.future.set_exception(Internal(f"unreadable answer: {e!r}"))
                    continue
                health.succeeded(address)
                call.future.set_result(result)

    def close(self) -> None:
        self.reader.cancel()
        for call in self.pending.values():
            if not call.future.done():
                call.future.set_exception(Unavailable("client closed"))
        self.pending.clear()
        self.socket.close(linger=0)

    def retire(self) -> list[_Call]:
        """Close the socket with what it still queues (see AsyncClient._sweep_at); returns
        the calls whose current attempt was here, for the caller to send elsewhere."""
        self.reader.cancel()
        current = [call for request_id, call in self.pending.items()
                   if not call.future.done() and call.address == self.address
                   and call.request_id == request_id]
        self.pending.clear()
        if self.socket in self.client._sockets:
            self.client._sockets.remove(self.socket)
        self.socket.close(linger=0)
        return current


class AsyncBatch(MutationBatch):
    """A batch of the asyncio client: `await batch.commit()`."""

    if TYPE_CHECKING:   # (see kvsvr.typed)
        commit = awaiting(p.MutateReply)(MutationBatch.commit)


class AsyncClient(ClientCalls):
    if TYPE_CHECKING:   # each call gives an awaitable of the blocking client's result
        get = awaiting(p.Versioned)(ClientCalls.get)
        put = awaiting(int)(ClientCalls.put)
        delete = awaiting(int)(ClientCalls.delete)
        incr = awaiting(int)(ClientCalls.incr)
        row_get = awaiting(p.RowValue)(ClientCalls.row_get)
        row_put = awaiting(int)(ClientCalls.row_put)
        row_delete = awaiting(int)(ClientCalls.row_delete)
        scan = awaiting(p.ScanPage)(ClientCalls.scan)
        append = awaiting(int)(ClientCalls.append)
        compact = awaiting(int)(ClientCalls.compact)
        changes = awaiting(p.ChangesPage)(ClientCalls.changes)
        ping = awaiting(dict)(ClientCalls.ping)
        status = awaiting(dict)(ClientCalls.status)
        faults = awaiting(dict)(ClientCalls.faults)
        list_keys = awaiting(p.KeysPage)(KeyListing.list_keys)

    def batch(self, key: Any, *, expected_version: int | None = None) -> AsyncBatch:
        """Collect mutations of one key; `await commit()` applies them atomically."""
        return AsyncBatch(self, key, expected_version)

    def __init__(self, config: ClusterConfig | str | Path | None = None, *,
                 address: str | None = None, timeout: float = TIMEOUT_S_DEFAULT,
                 attempt_timeout: float = CLIENT_ATTEMPT_TIMEOUT_S,
                 client_id: int | None = None):
        self._router = make_router(config, address)
        self.timeout = check_timeout("timeout", timeout)
        self.attempt_timeout = check_timeout("attempt_timeout", attempt_timeout)
        self.client_id = client_id_or_new(client_id)
        self.health = Health()  # which replicas this client saw failing
        self._seq = itertools.count(first_client_seq())
        self._context = zmq.asyncio.Context()
        self._connections: dict[str, _Connection] = {}
        self._sockets: list[zmq.Socket] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._waiting: list[_Call] = []  # refused; resent when a back-off ends
        self._parked: list[_Call] = []   # not sent: waiting for a connection
        self._unpark_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, close_sockets, self._context, self._sockets,
                                           os.getpid())

    def _op_id(self) -> tuple[int, int]:
        return self.client_id, next(self._seq)

    def _connection(self, address: str) -> _Connection:
        if self._closed:
            raise Unavailable("client closed")
        connection = self._connections.get(address)
        if connection is None:
            connection = self._connections[address] = _Connection(self, address)
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return connection

    def replicas_for(self, spec: CallSpec) -> tuple[str, ...]:
        """Where `spec` may go, in order of preference (the health decides among them)."""
        if spec.address is not None:
            return (spec.address,)
        return self._router.replicas_for(spec.key)

    def _route(self, call: _Call, now: float, exclude: str | None, *, paced: bool) -> None:
        """Start the next attempt of `call` on its best replica (as the blocking client's
        _Exchange._route: paced after an Unavailable answer)."""
        address, ready_at = self.health.choose(call.route, now, exclude)
        if paced and ready_at > now:
            call.address = None
            if ready_at >= call.deadline and not call.unanswered:
                call.future.set_exception(call.expired())   # no replica left to ask in time
                return
            call.resend_at = ready_at
            call.exclude = exclude
            self._waiting.append(call)
            return
        self._connection(address).send(call, now)
        self.health.sending(address, now, attempt_s(call.spec, self.attempt_timeout))

    def _unsent(self, connection: _Connection, ids: list[int]) -> None:
        """The attempts `ids` could not leave `connection`: their calls wait for one."""
        now = time.monotonic()
        address = connection.address
        for request_id in ids:
            call = connection.pending.pop(request_id, None)
            if call is None or call.future.done() or call.address != address \
                    or call.request_id != request_id:
                continue
            call.address = None
            if call.park is None or now >= call.park.until:
                call.park = Parked(address, now, min(call.deadline, now + CONNECT_WAIT_S))
            call.park.candidates[address] = None
            self._parked.append(call)
        if self._parked and self._unpark_timer is None:
            self._unpark_timer = connection.loop.call_later(CONNECT_CHECK_S, self._unpark)

    def _writable(self, address: str) -> bool:
        # (the asyncio socket's get(EVENTS) also wakes its reader if an answer is waiting)
        connection = self._connection(address)
        return bool(int(connection.socket.get(zmq.EVENTS)) & zmq.POLLOUT)

    def _unpark(self) -> None:
        """As the blocking client's _Exchange._unpark: send each parked call to its first
        choice once connected, after CONNECT_FAILOVER_S to any replica of its key that is;
        a call none connected to in time fails Unavailable (nothing of it was sent), unless
        an earlier attempt may still apply it (then Timeout at its deadline)."""
        self._unpark_timer = None
        if self._closed:
            return
        now = time.monotonic()
        parked, self._parked = self._parked, []
        for call in parked:
            park = call.park
            if call.future.done() or park is None:
                continue
            choice = park.first if self._writable(park.first) else None
            if choice is None and now >= park.spread_at:
                park.candidates.update(dict.fromkeys(call.route))
                ready = [a for a in call.route if self._writable(a)]
                healthy = [a for a in ready if self.health.state(a, now) == HEALTHY]
                choice = (healthy or ready)[0] if ready else None
                if choice is not None:
                    self.health.failed(park.first, now)
            if choice is not None:
                self._connection(choice).send(call, now)
                self.health.sending(choice, now, attempt_s(call.spec, self.attempt_timeout))
            elif now >= park.until:
                for address in park.candidates:
                    self.health.failed(address, now)
                if call.unanswered:   # an earlier attempt may still apply it
                    call.resend_at = call.deadline
                    call.exclude = None
                    self._waiting.append(call)
                else:
                    call.future.set_exception(unreachable(
                        list(park.candidates), calls.call_name(call.spec), now - park.since))
            else:
                self._parked.append(call)
        if self._parked:
            self._unpark_timer = asyncio.get_running_loop().call_later(CONNECT_CHECK_S,
                                                                       self._unpark)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(ASYNC_CLIENT_SWEEP_INTERVAL_S)
            if not self._closed:
                self._sweep_at(time.monotonic())

    def _sweep_at(self, now: float) -> None:
        unanswered: list[_Call] = []
        failed = set()
        for connection in list(self._connections.values()):
            if connection.sweep(now, unanswered):
                failed.add(connection.address)
        for call in unanswered:
            address = call.address
            assert address is not None  # a current attempt has an address
            if address not in failed:   # one failure per replica and sweep: same episode
                failed.add(address)
                self.health.failed(address, now)
        # A replica that left an attempt unanswered may be down, and ZeroMQ keeps what was
        # sent to it for the reconnect: delivered when it comes back, a write that had been
        # reported Timeout would be applied long after. Its connection is closed with its
        # queue, and every call whose attempt was there goes on elsewhere (same op id).
        moved = {id(call) for call in unanswered}
        for address in failed:
            if address in self._connections:
                for call in self._connections.pop(address).retire():
                    if id(call) not in moved:
                        moved.add(id(call))
                        unanswered.append(call)
        for call in unanswered:
            call.unanswered = True
            call.set_loose()
            self._route(call, now, call.address, paced=False)
        if self._waiting:
            waiting, self._waiting = self._waiting, []
            for call in waiting:
                if call.future.done():
                    continue
                if now >= call.deadline:
                    call.future.set_exception(call.expired())
                elif now >= call.resend_at:
                    self._route(call, now, call.exclude, paced=True)
                else:
                    self._waiting.append(call)

    def _run(self, spec: CallSpec, timeout: float | None = None) -> asyncio.Future[Any]:
        if self._closed:
            raise Unavailable("client closed")
        now = time.monotonic()
        call = _Call(spec, self.replicas_for(spec), asyncio.get_running_loop().create_future(),
                     now, self.timeout if timeout is None else timeout)
        self._route(call, now, None, paced=False)
        return call.future

    def watch(self, key: Any, since_version: int = 0, *, timeout: float | None = None,
              wait: float = WATCH_WAIT_S_DEFAULT) -> AsyncIterator[WatchEvent]:
        """`async for event in client.watch(key)`: as Client.watch, awaited."""
        return watch_events_async(self._run, key, since_version, timeout=timeout, wait=wait,
                                  call_timeout=self.timeout)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()
        if self._unpark_timer is not None:
            self._unpark_timer.cancel()
        for call in self._waiting + self._parked:
            if not call.future.done():
                call.future.set_exception(Unavailable("client closed"))
        self._waiting.clear()
        self._parked.clear()
        self._finalizer()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AsyncClient"]
