"""The asyncio client: `kvsvr.AsyncClient`, the same calls as `Client`, awaited.

Requests issued in one turn of the event loop leave in one ZeroMQ message (so many
concurrent tasks pipeline for free); one reader task per node resolves answers by request id;
one sweeper resends requests unanswered for `attempt_timeout` (same ids, so writes apply once)
and fails those past their deadline with Timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from kvsvr import _core
from kvsvr import protocol as p
from kvsvr.calls import CallSpec
from kvsvr.client import _Api, check_timeout, connect, make_router, send_frames
from kvsvr.config import ClusterConfig
from kvsvr.errors import Internal, KvError, Timeout, Unavailable
from kvsvr.limits import CLIENT_ATTEMPT_TIMEOUT_S, DEFAULT_TIMEOUT_S

_encode = p.encode
_encode_frame = _core.encode_frame
_decode_frames = _core.decode_frames
_REQUEST = _core.FRAME_REQUEST
SWEEP_INTERVAL_S = 0.05


class _Pending:
    __slots__ = ("attempt_deadline", "deadline", "frame", "future", "spec")

    def __init__(self, spec: CallSpec, frame: bytes, future: asyncio.Future[Any],
                 attempt_deadline: float, deadline: float):
        self.spec = spec
        self.frame = frame
        self.future = future
        self.attempt_deadline = attempt_deadline
        self.deadline = deadline


class _Connection:
    def __init__(self, client: AsyncClient, address: str):
        self.client = client
        self.address = address
        # an asyncio socket: its recv() is awaited
        self.socket: Any = connect(client._context, address, client._sockets)
        self.pending: dict[int, _Pending] = {}
        self.outbox: list[bytes] = []
        self.next_id = 1
        self.loop = asyncio.get_running_loop()
        self.reader = self.loop.create_task(self._read())

    def submit(self, spec: CallSpec, timeout: float) -> asyncio.Future[Any]:
        now = time.monotonic()
        request_id = self.next_id
        self.next_id += 1
        frame = _encode_frame(_REQUEST, spec.method, request_id, min(int(timeout * 1000),
                              0xFFFFFFFF), _encode(spec.request))
        future = self.loop.create_future()
        self.pending[request_id] = _Pending(
            spec, frame, future, now + min(timeout, self.client.attempt_timeout), now + timeout)
        if not self.outbox:
            self.loop.call_soon(self._flush)
        self.outbox.append(frame)
        return future

    def _flush(self) -> None:
        frames, self.outbox = self.outbox, []
        send_frames(self.socket, frames)  # what does not fit now, the sweeper resends

    def sweep(self, now: float) -> None:
        resend = []
        for request_id, entry in list(self.pending.items()):
            if entry.future.done():
                del self.pending[request_id]
            elif now >= entry.deadline:
                del self.pending[request_id]
                entry.future.set_exception(Timeout(
                    f"no answer from {self.address} "
                    f"({p.Method(entry.spec.method).name.lower()})"))
            elif now >= entry.attempt_deadline:
                entry.attempt_deadline = min(entry.deadline, now + self.client.attempt_timeout)
                resend.append(entry.frame)
        if resend:
            if not self.outbox:
                self.loop.call_soon(self._flush)
            self.outbox.extend(resend)

    async def _read(self) -> None:
        recv = self.socket.recv
        pending = self.pending
        while True:
            try:
                payload = await recv()
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            # A damaged answer is dropped: its request is resent or times out.
            for _kind, status, request_id, _budget, body in _decode_frames(payload)[0]:
                entry = pending.pop(request_id, None)
                if entry is None or entry.future.done():
                    continue
                spec = entry.spec
                try:
                    entry.future.set_result(spec.finish(p.parse_reply(spec.method, status, body)))
                except KvError as e:
                    entry.future.set_exception(e)
                except Exception as e:  # one bad answer fails its call, not the reader
                    entry.future.set_exception(Internal(f"unreadable answer: {e!r}"))

    def close(self) -> None:
        self.reader.cancel()
        for entry in self.pending.values():
            if not entry.future.done():
                entry.future.set_exception(Unavailable("client closed"))
        self.pending.clear()
        self.socket.close(linger=0)


class AsyncClient(_Api):
    def __init__(self, config: ClusterConfig | str | Path | None = None, *,
                 address: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 attempt_timeout: float = CLIENT_ATTEMPT_TIMEOUT_S,
                 client_id: int | None = None):
        self._router = make_router(config, address)
        self.timeout = check_timeout("timeout", timeout)
        self.attempt_timeout = check_timeout("attempt_timeout", attempt_timeout)
        self.client_id = client_id or (secrets.randbits(62) | 1)
        self._seq = itertools.count(1)
        self._context = zmq.asyncio.Context()
        self._connections: dict[str, _Connection] = {}
        self._sockets: list[zmq.Socket] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

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

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            for connection in list(self._connections.values()):
                connection.sweep(now)

    def _run(self, spec: CallSpec, timeout: float | None = None) -> asyncio.Future[Any]:
        connection = self._connection(self._router.address_for(spec.key))
        return connection.submit(spec, self.timeout if timeout is None else timeout)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()
        self._context.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AsyncClient"]
