"""The clients' links to the nodes: DEALER sockets that queue only to a completed connection,
sends that say what went out, and the wait of a request that could not be sent.

Why ZMQ_IMMEDIATE: ZeroMQ otherwise queues a message for a connection that does not exist
yet and delivers it whenever one comes, seconds or minutes later. A client could then not
tell "not sent" from "sent, no answer": with it, a send fails at once (zmq.Again) unless the
message is on a live connection, so a call that could not be sent anywhere is an honest
Unavailable (nothing was changed), and Timeout keeps meaning "sent, no answer in time".
"""

from __future__ import annotations

import os

import zmq

from kvsvr import protocol as p
from kvsvr.errors import InvalidArgument, Unavailable
from kvsvr.limits import CLIENT_QUEUE_MESSAGES, CONNECT_FAILOVER_S


def close_sockets(context: zmq.Context, sockets: list[zmq.Socket], pid: int) -> None:
    """Close `sockets` (dropping what they queue), then `context`. A client registers this
    with weakref.finalize, so it also runs when the client is dropped without close(): the
    garbage collector calls it before any finalizer of the cycle the client was in, that is
    before ZeroMQ's Context.__del__, which would otherwise wait forever in zmq_ctx_term for
    sockets it could no longer see. Nothing is closed in a forked child."""
    if os.getpid() != pid:
        return
    for socket in sockets:
        socket.close(linger=0)
    sockets.clear()
    if not context.closed:
        context.term()


def connect(context: zmq.Context, address: str, register: list[zmq.Socket]) -> zmq.Socket:
    """A DEALER socket connected to `address`, registered before connecting so that close()
    always finds it; a bad address is an InvalidArgument, not a hang."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    # Queue only to a completed connection: a send with none fails at once (zmq.Again), so a
    # request is either on its way or provably not sent, never held for a later connection.
    socket.setsockopt(zmq.IMMEDIATE, 1)
    socket.setsockopt(zmq.SNDHWM, CLIENT_QUEUE_MESSAGES)
    socket.setsockopt(zmq.RCVHWM, CLIENT_QUEUE_MESSAGES)
    register.append(socket)
    try:
        socket.connect(address)
    except zmq.ZMQError as e:
        register.remove(socket)
        socket.close(linger=0)
        raise InvalidArgument(f"address: cannot connect to {address!r} ({e})",
                              field="address") from None
    return socket


def send_frames(socket: zmq.Socket, frames: list[bytes]) -> int:
    """Send frames in as few messages as the limits allow; never block. Returns how many
    frames (a prefix of `frames`) went out. The client's sockets queue only to a completed
    connection (ZMQ_IMMEDIATE), so the rest provably were not sent: no connection yet, one
    that broke, or a full queue."""
    messages = p.pack(frames)
    if len(messages) == 1:   # the common case
        try:
            socket.send(messages[0], zmq.NOBLOCK)
        except zmq.Again:
            return 0
        return len(frames)
    sent = 0
    for message in messages:
        try:
            socket.send(message, zmq.NOBLOCK)
        except zmq.Again:
            return sent
        sent = frames_through(frames, sent, message)
    return sent


def frames_through(frames: list[bytes], start: int, message: bytes) -> int:
    """Where the frames of `message`, packed from frames[start:] (see protocol.pack), end."""
    size = len(message)
    while size > 0:
        size -= len(frames[start])
        start += 1
    return start


class Parked:
    """A request that could not be sent: it waits for a connection to `first` (its first
    choice of replica), from `spread_at` on for one to any replica of its key, until
    `until`. `candidates`: every address it waited for (named if it fails)."""

    __slots__ = ("candidates", "first", "since", "spread_at", "until")

    def __init__(self, first: str, now: float, until: float):
        self.first = first
        self.since = now
        self.spread_at = now + CONNECT_FAILOVER_S
        self.until = until
        self.candidates: dict[str, None] = {first: None}

    def wake(self, now: float) -> float:
        return self.spread_at if now < self.spread_at < self.until else self.until


def unreachable(addresses: list[str], call: str, waited_s: float) -> Unavailable:
    """The error of a request that could not be sent anywhere; `call`: the client call's
    name (calls.call_name)."""
    return Unavailable(
        f"no node answered: no connection to {', '.join(addresses)} within {waited_s:.2g} s, "
        f"so the {call} was not sent (nothing was changed). Is the "
        "cluster running? Start it with `kvsvr-cluster --config FILE` (every node of a "
        "config on this machine) or `kvsvr-node --config FILE --node NAME`")


__all__ = ["Parked", "close_sockets", "connect", "frames_through", "send_frames",
           "unreachable"]
