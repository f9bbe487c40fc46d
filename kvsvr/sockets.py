"""The ZeroMQ context and sockets of a node (single or replica), and of other servers that
listen like one (the monitor center)."""

from __future__ import annotations

import ctypes
import logging
import os
import threading

import zmq

from kvsvr.limits import IO_THREAD_SCHED_POLICY, MESSAGE_BYTES_MAX, NODE_QUEUE_MESSAGES

log = logging.getLogger("kvsvr.node")


def node_context() -> zmq.Context:
    """The node's ZeroMQ context: one I/O thread, under SCHED_BATCH. A thread of that policy
    woken by the kernel does not preempt the one running on its core: the node's loop then
    finishes what it is doing (or yields, see the replica's edge) before the I/O thread moves
    the next message, instead of being cut off for each one. Where a core is idle the I/O
    thread runs there at once as before. No privilege is needed for it."""
    context = zmq.Context(io_threads=1)
    if may_schedule(IO_THREAD_SCHED_POLICY):
        context.set(zmq.THREAD_SCHED_POLICY, IO_THREAD_SCHED_POLICY)
        context.set(zmq.THREAD_PRIORITY, 0)   # (the only priority that policy takes)
    else:
        log.warning("scheduling policy %d refused here: ZeroMQ's I/O thread keeps the "
                    "default (slower under load on a busy machine)", IO_THREAD_SCHED_POLICY)
    return context


def may_schedule(policy: int) -> bool:
    """Whether a thread of this process may take `policy` (tried on a thread of its own):
    libzmq aborts the process if setting its thread's policy fails."""
    allowed: list[bool] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))
            allowed.append(True)
        except (OSError, AttributeError):
            allowed.append(False)

    probe = threading.Thread(target=attempt, name="sched-probe")
    probe.start()
    probe.join()
    return allowed == [True]


def node_socket(context: zmq.Context, kind: int) -> zmq.Socket:
    """A node's socket: no linger; a larger message than MESSAGE_BYTES_MAX drops the sender,
    so memory per peer is bounded by the queue length times that."""
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, MESSAGE_BYTES_MAX)
    socket.setsockopt(zmq.SNDHWM, NODE_QUEUE_MESSAGES)
    socket.setsockopt(zmq.RCVHWM, NODE_QUEUE_MESSAGES)
    return socket


def libzmq_send() -> int:
    """The address of zmq_send in the libzmq pyzmq runs on (0 if it cannot be found): what a
    native thread calls to send on a socket handed to it (see kvsvr/_syncer.pyx)."""
    try:
        from zmq.backend.cython import _zmq  # (dlsym through it finds its libzmq)

        return ctypes.cast(ctypes.CDLL(_zmq.__file__).zmq_send, ctypes.c_void_p).value or 0
    except (ImportError, OSError, AttributeError):
        return 0   # another pyzmq backend: the loop sends everything itself


def bind_router(context: zmq.Context, address: str) -> zmq.Socket:
    """The node's ROUTER bound at `address`; OSError naming the address if it cannot be."""
    socket = node_socket(context, zmq.ROUTER)
    try:
        socket.bind(address)
    except zmq.ZMQError as e:
        socket.close()
        context.term()
        raise OSError(f"cannot listen on {address}: {e}") from None
    return socket


__all__ = ["bind_router", "libzmq_send", "may_schedule", "node_context", "node_socket"]
