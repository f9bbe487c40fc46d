"""Request/response with queue servers over ZeroMQ DEALER sockets, using KVSvr's frames.

`call` is the blocking one-shot used by the CLI and admin helpers; `AsyncConnection` is one
server's socket for the asyncio producer, with any number of requests in flight (answers are
matched by request id).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import zmq
import zmq.asyncio

from kvsvr import _core
from kvsvr.errors import Internal, InvalidArgument, KvError, Timeout
from kvsvr.limits import MESSAGE_BYTES_MAX
from quorumq import protocol
from quorumq.limits import QUEUE_CLIENT_SOCKET_MESSAGES, REQUEST_TIMEOUT_S


def dealer(context: zmq.Context, address: str, *, immediate: bool = True) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, MESSAGE_BYTES_MAX)
    socket.setsockopt(zmq.SNDHWM, QUEUE_CLIENT_SOCKET_MESSAGES)
    socket.setsockopt(zmq.RCVHWM, QUEUE_CLIENT_SOCKET_MESSAGES)
    # Queue only to a connected server: a request to a dead one fails by timeout instead of
    # reaching its next life long after the caller gave up.
    # (A consumer's reads are harmless to queue: it does not set this.)
    socket.setsockopt(zmq.IMMEDIATE, 1 if immediate else 0)
    socket.connect(address)
    return socket


def request_frame(method: int, request_id: int, request: Any) -> bytes:
    return encode_request(method, request_id, protocol.encode(request))


def encode_request(method: int, request_id: int, body: bytes) -> bytes:
    """One request frame; InvalidArgument (field "request") if it is too large to send: a
    server's ZeroMQ socket silently drops a message over MAXMSGSIZE (the caller would only
    see a timeout), and a frame has its own bound."""
    try:
        message = _core.encode_frame(_core.FRAME_REQUEST, method, request_id, 0, body)
    except ValueError as e:
        raise InvalidArgument(f"request: {e}", field="request") from None
    if len(message) > MESSAGE_BYTES_MAX:
        raise InvalidArgument(f"request: {len(message)} bytes, the largest message a queue "
                              f"server takes is {MESSAGE_BYTES_MAX}", field="request")
    return message


def call(address: str, method: int, request: Any, *, timeout: float = REQUEST_TIMEOUT_S,
         context: zmq.Context | None = None) -> Any:
    """One request to one server; the parsed reply, or its typed error, or Timeout."""
    own = context is None
    context = context or zmq.Context()
    socket = dealer(context, address)
    try:
        frame = request_frame(method, 1, request)
        deadline = time.monotonic() + timeout
        # IMMEDIATE: a send blocks until the server is connected, so never block on it:
        # wait for POLLOUT only as long as the caller allows.
        while True:
            try:
                socket.send(frame, zmq.NOBLOCK)
                break
            except zmq.Again:
                left = deadline - time.monotonic()
                if left <= 0 or not socket.poll(int(left * 1000) + 1, zmq.POLLOUT):
                    raise Timeout(f"{address}: not connected in {timeout} s (down?)") from None
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not socket.poll(int(left * 1000) + 1):
                raise Timeout(f"{address}: no answer in {timeout} s")
            frames, error, _ = _core.decode_frames(socket.recv())
            if error is not None:
                raise Internal(f"{address}: bad answer ({error})")
            for _kind, status, request_id, _budget, body in frames:
                if request_id == 1:
                    return protocol.parse_reply(method, status, body)
    finally:
        socket.close(linger=0)
        if own:
            context.term()


class AsyncConnection:
    """One server, many requests in flight; `request` resolves with (status, body)."""

    def __init__(self, context: zmq.asyncio.Context, address: str):
        self.address = address
        self.socket = dealer(context, address)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def send(self, method: int, body: bytes) -> asyncio.Future[tuple[int, bytes]]:
        """Send now; the future resolves with the answer's (status, body) (or never: the
        caller keeps its own deadline and calls `forget`)."""
        request_id = next(self._ids)
        frame = encode_request(method, request_id, body)
        future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        future.request_id = request_id  # type: ignore[attr-defined]
        self._waiting[request_id] = future
        # Through the asyncio socket itself (a second view of it would steal the edge-
        # triggered wake-ups its reader waits for); NOBLOCK settles the send at once.
        sent: asyncio.Future[Any] = self.socket.send(frame, zmq.NOBLOCK)  # type: ignore[assignment]
        if sent.done() and sent.exception() is not None:
            # Not connected (IMMEDIATE) or queue full: fail now, the caller counts it.
            self._waiting.pop(request_id, None)
            future.set_result((Timeout.code, protocol.encode_error(
                Timeout(f"{self.address}: not connected ({sent.exception()})"))))
        elif not sent.done():
            sent.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    def writable(self) -> bool:
        """Connected to its server (IMMEDIATE: a socket takes messages only then), without
        sending anything."""
        events: int = self.socket.get(zmq.EVENTS)  # type: ignore[assignment]
        return bool(events & zmq.POLLOUT)

    def forget(self, future: asyncio.Future[tuple[int, bytes]]) -> None:
        self._waiting.pop(future.request_id, None)  # type: ignore[attr-defined]

    async def request(self, method: int, request: Any, timeout: float) -> Any:
        future = self.send(method, protocol.encode(request))
        try:
            status, body = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self.forget(future)
            raise Timeout(f"{self.address}: no answer in {timeout} s") from None
        return protocol.parse_reply(method, status, body)

    async def _read(self) -> None:
        waiting = self._waiting
        while True:
            try:
                payload = await self.socket.recv()  # type: ignore[misc]
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            frames, _error, _ = _core.decode_frames(payload)
            for _kind, status, request_id, _budget, body in frames:
                future = waiting.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result((status, bytes(body)))

    def close(self) -> None:
        self._reader.cancel()
        for future in self._waiting.values():
            if not future.done():
                future.cancel()
        self._waiting.clear()
        self.socket.close(linger=0)

    async def closed(self) -> None:
        """After close(): until the reader task has ended (a task left pending when its
        loop closes is reported as destroyed)."""
        await asyncio.gather(self._reader, return_exceptions=True)


def error_of(status: int, body: bytes, method: int) -> KvError | None:
    """The typed error an answer carries, or None if it is a success."""
    if status == protocol.OK:
        return None
    try:
        protocol.parse_reply(method, status, body)
    except KvError as e:
        return e
    return Internal(f"status {status}")
