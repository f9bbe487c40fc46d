"""Version barriers for linearizable reads (and for writes that need to know this copy is
current): a majority's applied and open versions of each key asked about. A read is served
here once this replica has applied at least the highest version a majority applied, and no
higher version may have been chosen (an open one is finished first)."""

from __future__ import annotations

import itertools
from typing import Any

from kvsvr import protocol
from kvsvr.errors import Unavailable
from kvsvr.limits import BARRIER_KEYS_MAX, BARRIER_RESEND_S, REQUEST_WAIT_S_MAX
from kvsvr.protocol import KeyVersions, Method, VersionsReply, VersionsRequest
from kvsvr.replica.checkpoints import Checkpoints
from kvsvr.replica.lives import Life
from kvsvr.replica.network import Network
from kvsvr.replica.peers import Peer, Peers, request_id
from kvsvr.replica.work import Waiter, Work


class Barrier:
    __slots__ = ("answers", "created", "keys", "sent_at")

    def __init__(self, keys: list[bytes], sent_at: float):
        self.keys = keys
        self.created = sent_at
        self.sent_at = sent_at
        self.answers: dict[int, list[KeyVersions]] = {}   # replica index -> its versions


class Barriers:
    """The barriers asked and not yet answered by a majority, by id."""

    def __init__(self, name: str, peers: Peers, life: Life, checkpoints: Checkpoints,
                 work: Work, edge: Network):
        self._name = name
        self._peers = peers
        self._life = life
        self._checkpoints = checkpoints
        self._work = work
        self._edge = edge
        self.pending: dict[int, Barrier] = {}
        self._ids = itertools.count(1)

    def serve_versions(self, request: VersionsRequest, txn: Any) -> VersionsReply:
        """A peer's barrier: this replica's applied and highest open version of each key."""
        life = self._life
        quorum = life.quorum
        if quorum is None or not life.voting:
            raise Unavailable(f"node {self._name} is {life.role}: its versions do not count")
        applied = self._checkpoints.applied
        return VersionsReply([KeyVersions(applied(txn, key), quorum.highest_open(key))
                              for key in request.keys])

    def send(self, want: dict[bytes, list[Waiter]], now: float) -> None:
        """Ask for the keys that waiters want a barrier of (this replica answers first)."""
        keys = list(want)
        index = self._peers.index
        for start in range(0, len(keys), BARRIER_KEYS_MAX):
            chunk = keys[start:start + BARRIER_KEYS_MAX]
            barrier_id = next(self._ids) & 0xFFFFFFFF
            barrier = Barrier(chunk, now)
            quorum = self._life.quorum
            assert quorum is not None
            checkpoints = self._checkpoints
            with checkpoints.view() as txn:
                barrier.answers[index] = [
                    KeyVersions(checkpoints.applied(txn, key), quorum.highest_open(key))
                    for key in chunk]
            self.pending[barrier_id] = barrier
            for key in chunk:
                for waiter in want[key]:
                    waiter.barrier, waiter.target = barrier_id, -1
            self._ask(barrier_id, barrier, now)
            self._check(barrier_id, barrier)

    def _ask(self, barrier_id: int, barrier: Barrier, now: float) -> None:
        barrier.sent_at = now
        frame = self._peers.frame(Method.VERSIONS, request_id(Method.VERSIONS, barrier_id),
                                  protocol.encode(VersionsRequest(barrier.keys)))
        for peer in self._peers.linked:
            if peer.index not in barrier.answers:
                self._edge.send_peer(peer.index, [frame], now)

    def resend(self, now: float) -> None:
        for barrier_id, barrier in list(self.pending.items()):
            if now - barrier.created > REQUEST_WAIT_S_MAX:
                del self.pending[barrier_id]  # its waiters have been answered (expired)
                continue
            if now - barrier.sent_at >= BARRIER_RESEND_S:
                self._ask(barrier_id, barrier, now)

    def on_reply(self, peer: Peer, barrier_id: int, reply: VersionsReply) -> None:
        barrier = self.pending.get(barrier_id)
        if barrier is not None and len(reply.versions) == len(barrier.keys):
            barrier.answers[peer.index] = reply.versions
            self._check(barrier_id, barrier)

    def _check(self, barrier_id: int, barrier: Barrier) -> None:
        if len(barrier.answers) < self._peers.majority:
            return
        del self.pending[barrier_id]
        work = self._work
        for i, key in enumerate(barrier.keys):
            target = max(answer[i].applied for answer in barrier.answers.values())
            open_version = max(answer[i].open for answer in barrier.answers.values())
            waiting = work.keys.get(key)
            if waiting is None:
                continue
            for waiter in itertools.chain(waiting.reads, waiting.writes):
                if waiter.barrier == barrier_id:
                    waiter.barrier, waiter.target, waiter.open = 0, target, open_version
            work.dirty.add(key)


__all__ = ["Barrier", "Barriers"]
