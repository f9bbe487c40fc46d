"""A replica's life: its incarnation, the HELLO exchange of a new data directory, the rebuild
of a life whose disk was lost, and its role, which this module alone writes.

A node whose data directory is new asks every peer what it knows of it (HELLO) before it
votes: if some peer heard from an earlier life, the disk was lost, so this is a new
incarnation that rebuilds (the core gathers every peer's acceptor state, and the data comes
from a snapshot of every peer and its binlog up to where that peer stood when it answered)
before it may vote.
"""

from __future__ import annotations

import enum
import logging
import secrets
from typing import Any

import msgspec

from kvsvr import _core, protocol
from kvsvr.errors import InvalidArgument
from kvsvr.limits import HELLO_RESEND_S, JOINING_LOG_INTERVAL_S
from kvsvr.protocol import HelloReply, HelloRequest, Method
from kvsvr.replica.network import Network
from kvsvr.replica.peers import Peer, Peers, request_id
from kvsvr.store import Meta, Store

log = logging.getLogger("kvsvr.replica")


class Role(enum.StrEnum):
    JOINING = "joining"          # a new data directory asks its peers whether it lived before
    REBUILDING = "rebuilding"    # a new life gathers every peer's acceptor state
    CATCHING_UP = "catching-up"  # a rebuilt life without its peers' data yet, or a copy runs
    REPLICA = "replica"          # votes and serves


class Life:
    """This node's incarnation and role, and what decides them."""

    def __init__(self, name: str, group: str, index: int, store: Store, peers: Peers,
                 edge: Network):
        self._name, self._group, self._index = name, group, index
        self._store, self._peers, self._edge = store, peers, edge
        self.incarnation = store.incarnation
        self.quorum: _core.QuorumReplica | None = None   # once the life is known
        self.role = Role.JOINING    # written by update_role alone
        self.voting = False         # ... which sets it: the role is REPLICA
        self._hello_sent = 0.0
        self._joining_since = 0.0
        self._joining_logged = 0.0
        # peer -> its last LSN when it sent its acceptor state to this rebuilding life
        self.rebuild_targets = {
            int(k[0]): v[0] for k, v in store.meta_u64s(Meta.REBUILD_TARGET_PREFIX).items() if k}
        self.rebuild_done = bool(store.meta_u64s(Meta.REBUILD_DONE))
        # Keys a copy was installing when the node stopped (a page can end inside a key's
        # rows, and a checkpoint can make that half durable): copied again from that peer,
        # those keys replaced even by their own version, before anything else.
        self.half_installed = {int(k[0]): set(msgspec.msgpack.decode(v, type=list[bytes]))
                               for k, v in store.meta_raw(Meta.COPY_INSTALLING_PREFIX).items() if k}

    def start_quorum(self, rebuilding: bool) -> _core.QuorumReplica:
        """The acceptor of this life (its state restored by the caller)."""
        self.quorum = _core.QuorumReplica(self._index, self._peers.replicas, self.incarnation,
                                          rebuilding=rebuilding,
                                          answer_base=secrets.randbits(32))
        return self.quorum

    def update_role(self, copying: bool) -> None:
        """The one writer of the role. `copying`: a snapshot copy is under way."""
        before = self.role
        if self.quorum is None:
            self.role = Role.JOINING
        elif self.quorum.rebuilding:
            self.role = Role.REBUILDING
        elif not self.data_rebuilt() or copying:
            self.role = Role.CATCHING_UP
        else:
            self.role = Role.REPLICA
        self.voting = self.role is Role.REPLICA
        if self.role != before:
            log.info("node %s: %s -> %s", self._name, before, self.role)

    def data_rebuilt(self) -> bool:
        """A rebuilt life votes only once it holds every peer's data as of its answer."""
        if self.incarnation <= 1 or self.rebuild_done or not self.rebuild_targets:
            return self.incarnation <= 1 or self.rebuild_done
        for index, target in self.rebuild_targets.items():
            peer = self._peers.by_index[index]
            if peer is None or peer.cursor < target:
                return False
        return len(self.rebuild_targets) >= self._peers.replicas - 1

    @property
    def rebuild_pending(self) -> bool:
        """A rebuilt life whose data is not yet known complete (progress is saved)."""
        return self.quorum is not None and self.incarnation > 1 and not self.rebuild_done

    def note_rebuild_target(self, source: int, lsn: int) -> None:
        """A peer's state answer says where its binlog stood: data to catch up to. The
        highest answer counts: a duplicate or reordered older one must not lower the target
        below what a merged answer's sender had forgotten."""
        self.rebuild_targets[source] = max(lsn, self.rebuild_targets.get(source, 0))

    def save_rebuild_progress(self, batch: Any) -> None:
        for index, target in self.rebuild_targets.items():
            batch.set_meta_u64s(Meta.REBUILD_TARGET_PREFIX + bytes([index]), target)
        if self.quorum is not None and not self.quorum.rebuilding and self.data_rebuilt():
            batch.set_meta_u64s(Meta.REBUILD_DONE, self.incarnation)
            self.rebuild_done = True
            log.info("node %s: rebuilt life %d holds every peer's data: voting", self._name,
                     self.incarnation)

    # --- HELLO: a new data directory asks whether it lived before ----------------------------
    def hello(self, now: float) -> None:
        """Ask the peers that have not answered yet (again every HELLO_RESEND_S)."""
        if now - self._hello_sent < HELLO_RESEND_S:
            return
        if not self._hello_sent:
            self._joining_since = self._joining_logged = now
        self._hello_sent = now
        silent = [p.name for p in self._peers.linked if p.hello is None]
        if now - self._joining_logged >= JOINING_LOG_INTERVAL_S:
            self._joining_logged = now
            log.warning("node %s: joining group %s: a new data directory votes only after "
                        "every peer has said whether it knew an earlier life of it; waiting "
                        "for %s (%.0f s so far)", self._name, self._group,
                        ", ".join(silent), now - self._joining_since)
        for peer in self._peers.linked:
            if peer.hello is None:
                self._edge.send_peer(peer.index, [self._peers.frame(
                    Method.HELLO, request_id(Method.HELLO),
                    protocol.encode(HelloRequest(self._index)))], now)

    def on_hello_reply(self, peer: Peer, reply: HelloReply) -> int | None:
        """Take a peer's answer. Once every peer has answered a node not yet in a life: the
        highest life of this node any of them knew (0: none), else None."""
        peer.hello = reply
        if self.quorum is not None:
            return None
        if any(p.hello is None for p in self._peers.linked):
            return None
        return max(p.hello.knew_you for p in self._peers.linked if p.hello is not None)

    def begin(self, knew: int) -> None:
        """Start the life after the one the peers knew (0: none knew one), durably."""
        wiped = knew > 0
        self.incarnation = knew + 1 if wiped else 1
        with self._store.write() as batch:
            batch.set_incarnation(self.incarnation)
        if wiped:
            log.warning("node %s: peers knew life %d of this node and its data directory is "
                        "new: the disk was lost; rebuilding as life %d", self._name, knew,
                        self.incarnation)

    def answer_hello(self, request: HelloRequest) -> HelloReply:
        """What this node knows of the asking peer's lives, and its own binlog's bounds."""
        if not 0 <= request.source < self._peers.replicas or request.source == self._index:
            raise InvalidArgument(f"source: {request.source} is not a peer of this node",
                                  field="source")
        store = self._store
        return HelloReply(self.incarnation, self.fence_of(request.source),
                          store.durable_first_lsn, store.durable_last_lsn)

    def fence_of(self, peer: int) -> int:
        """The highest life of `peer` this node has heard from (persisted as fences)."""
        fences = self._store.meta_u64s(Meta.QUORUM_FENCE_PREFIX + bytes([peer]))
        return max((v[0] for v in fences.values()), default=0)


__all__ = ["Life", "Role"]
