"""The replica's ZeroMQ edge: its sockets and poller, the serve loop's waiting, receiving and
sending, the sockets handed to the vote log's sync thread, and the fault hook (messages to a
peer dropped or held back). The only module of the replica that touches ZeroMQ: the round
(kvsvr/replica/round.py) reaches the network through the `Network` interface
(kvsvr/replica/network.py), so a fake network can stand in for this class."""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import random
import time
from collections import Counter
from contextlib import suppress
from typing import Any, Protocol

import zmq

from kvsvr import protocol
from kvsvr.errors import InvalidArgument
from kvsvr.limits import IDLE_POLL_MS, ROUND_MESSAGES_MAX, WAKE_YIELDS
from kvsvr.monitor import registry as monitor_ids
from kvsvr.monitor.counters import CounterSink
from kvsvr.replica.network import Outbox
from kvsvr.replica.peers import Peer, Peers
from kvsvr.sockets import bind_router, libzmq_send, node_context, node_socket
from kvsvr.votelog import VoteLog

log = logging.getLogger("kvsvr.replica")


class Loop(Protocol):
    """What the serve loop drives (ReplicaNode)."""

    stopping: bool
    next_client_sweep: float

    def sweep_idle_clients(self) -> None: ...
    def due(self) -> float | None: ...
    def wrote_votes_lately(self) -> bool: ...
    def woken(self, now: float) -> None: ...
    def round_due(self, now: float) -> bool: ...
    def round(self, inbound: list[list[bytes]], replies: list[tuple[Peer, bytes]],
              now: float) -> bool: ...


class Edge:
    """The sockets of one replica: a ROUTER for clients and peers' requests, a DEALER to each
    peer for our requests and quorum messages (and one more per peer for the sync thread)."""

    def __init__(self, name: str, address: str, peers: Peers, votes: VoteLog,
                 counters: Counter[str], monitor: CounterSink):
        self._name = name
        self._address = address
        self._peers = peers
        self._votes = votes
        self._counters = counters
        self._monitor = monitor
        self._outbox = Outbox()   # answers to send at the round's end
        replicas = peers.replicas
        # The fault hook, per link: the chance a message is lost, and the most it is held
        # back (uniform, so reordered).
        self._drop = [0.0] * replicas
        self._delay_ms = [0] * replicas
        self._random = random.Random()
        self._delayed: list[tuple[float, int, int, list[bytes]]] = []
        self._delayed_seq = itertools.count()
        self._sockets: list[Any] = [None] * replicas
        self._vote_sockets: list[Any] = [None] * replicas  # the sync thread's link to a peer
        self._vote_slots = [-1] * replicas   # ... and its slot there (-1: sent from the loop)
        self._context: Any = None
        self._router: Any = None
        self._poller: Any = None
        self.wake_fd = -1   # an eventfd written when a sync or a commit ends

    # --- opening and closing ------------------------------------------------------------------
    def open(self) -> None:
        """Bind (OSError naming the address if it cannot be) and connect to every peer."""
        self._context = context = node_context()
        self._router = bind_router(context, self._address)
        self._poller = poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        for peer in self._peers.linked:
            socket = node_socket(context, zmq.DEALER)
            socket.connect(peer.address)
            self._sockets[peer.index] = socket
            poller.register(socket, zmq.POLLIN)
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        poller.register(self.wake_fd, zmq.POLLIN)

    def hand_vote_sockets(self) -> None:
        """A socket to each peer of the sync thread's own (once it runs): the quorum messages
        that wait for a vote log sync leave from it the moment the sync ends (see
        kvsvr/_syncer.pyx)."""
        send_fn = libzmq_send()
        if not send_fn:
            return
        for peer in self._peers.linked:
            socket = node_socket(self._context, zmq.DEALER)
            socket.connect(peer.address)
            slot = self._votes.add_sender(send_fn, socket.underlying)
            if slot is None:
                socket.close()
                continue
            self._vote_sockets[peer.index], self._vote_slots[peer.index] = socket, slot

    def close(self) -> None:
        """After the vote log closed (its sync thread uses the vote sockets until then)."""
        if self.wake_fd >= 0:
            os.close(self.wake_fd)
            self.wake_fd = -1
        for socket in self._sockets + self._vote_sockets:
            if socket is not None:
                socket.close()
        self._router.close()
        self._context.term()

    # --- the serve loop -----------------------------------------------------------------------
    def run(self, loop: Loop) -> None:
        """Wait for messages (or what is due), take what arrived, and run a round, until the
        loop is stopping. Kept in one piece: it runs once a round."""
        poller, router, wake = self._poller, self._router, self.wake_fd
        linked = [(self._sockets[p.index], p) for p in self._peers.linked]
        busy = False
        while not loop.stopping:
            if time.monotonic() >= loop.next_client_sweep:
                loop.sweep_idle_clients()
            timeout = 0 if busy else self._poll_timeout_ms(loop.due())
            events = dict(poller.poll(timeout))
            if events and not busy and loop.wrote_votes_lately():
                # Woken while writes are in flight: the threads already waiting for this
                # core (ZeroMQ's I/O thread, the sync thread, the other nodes) go first,
                # and what they deliver meanwhile joins this round (fewer rounds and syncs
                # per write). Not for reads alone: each round is cheap there.
                for _ in range(WAKE_YIELDS):
                    os.sched_yield()
                events = dict(poller.poll(0))
            if wake in events:   # a sync or a commit ended (or failed: the node stops)
                with suppress(BlockingIOError):
                    os.eventfd_read(wake)
                loop.woken(time.monotonic())
            inbound: list[list[bytes]] = []
            replies: list[tuple[Peer, bytes]] = []
            if router in events:
                while len(inbound) < ROUND_MESSAGES_MAX:
                    try:
                        inbound.append(router.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            for socket, peer in linked:
                if socket in events:
                    while len(replies) < ROUND_MESSAGES_MAX:
                        try:
                            replies.extend((peer, part) for part in
                                           socket.recv_multipart(zmq.NOBLOCK))
                        except zmq.Again:
                            break
            now = time.monotonic()
            if not busy and not inbound and not replies and len(events) == 1 \
                    and wake in events and not loop.round_due(now):
                continue   # a sync ended and its messages went out: nothing else to do
            busy = loop.round(inbound, replies, now)

    def _poll_timeout_ms(self, due: float | None) -> int:
        if self._delayed:
            held = self._delayed[0][0]
            due = held if due is None else min(due, held)
        if due is None:
            return IDLE_POLL_MS
        return max(0, min(IDLE_POLL_MS, int((due - time.monotonic()) * 1000) + 1))

    # --- sending ------------------------------------------------------------------------------
    def send_peer(self, index: int, frames: list[bytes], now: float) -> None:
        """Frames to peer `index` through the fault hook: dropped, held back, or sent now."""
        drop = self._drop[index]
        if drop and self._random.random() < drop:
            self._counters["fault_dropped"] += 1
            return
        delay_ms = self._delay_ms[index]
        if delay_ms:
            due = now + self._random.uniform(0, delay_ms / 1000)
            heapq.heappush(self._delayed, (due, next(self._delayed_seq), index, frames))
            return
        self._send_now(index, frames)

    def _send_now(self, index: int, frames: list[bytes]) -> None:
        socket = self._sockets[index]
        for message in protocol.pack(frames):
            try:
                socket.send(message, zmq.NOBLOCK)
            except zmq.Again:
                self._counters["peer_sends_dropped"] += 1  # its queue is full: it is behind

    def send_after_sync(self, seq: int, index: int, frames: list[bytes]) -> bool:
        """Have the sync thread send `frames` to peer `index` the moment vote log frames up
        to `seq` are durable (the loop may be mid-round then). False if it cannot (no sync
        thread, or a fault on the link): the caller holds them until then."""
        slot = self._vote_slots[index]
        if slot < 0 or self._drop[index] or self._delay_ms[index]:
            return False
        send_after = self._votes.send_after
        for message in protocol.pack(frames):
            send_after(seq, slot, message)
        return True

    def release_delayed(self, now: float) -> None:
        """Send what the fault hook held back and is now due."""
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            _, _, index, frames = heapq.heappop(delayed)
            self._send_now(index, frames)

    def answer(self, identity: bytes, frame: bytes) -> None:
        """A response to a client or a peer's request, sent with the round's others."""
        self._outbox.add(identity, frame)

    @property
    def answering(self) -> bool:
        return bool(self._outbox)

    def flush(self) -> None:
        """Send the answers to clients and to peers' requests."""
        for identity, message in self._outbox.take():
            self._monitor.add(monitor_ids.NODE_BYTES_OUT, len(message))
            try:
                self._router.send_multipart([identity, message], zmq.NOBLOCK)
            except zmq.Again:
                self._counters["replies_dropped"] += 1

    # --- the fault hook -----------------------------------------------------------------------
    def set_faults(self, peer: str, drop: float, delay_ms: int) -> dict[str, Any]:
        targets = [p for p in self._peers.linked if not peer or p.name == peer]
        if peer and not targets:
            raise InvalidArgument(f"peer: {peer!r} is not a peer of {self._name}",
                                  field="peer")
        for target in targets:
            self._drop[target.index], self._delay_ms[target.index] = drop, delay_ms
        log.warning("node %s: faults on links to %s: drop %.2f, delay up to %d ms", self._name,
                    peer or "every peer", drop, delay_ms)
        return {p.name: {"drop": self._drop[p.index], "delay_ms": self._delay_ms[p.index]}
                for p in self._peers.linked}

    def faults(self) -> dict[int, tuple[float, int]]:
        """(drop, delay_ms) of each peer's link, by index."""
        return {p.index: (self._drop[p.index], self._delay_ms[p.index])
                for p in self._peers.linked}


__all__ = ["Edge", "Loop"]
