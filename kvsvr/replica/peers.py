"""The other replicas of the group as this node knows them: a `Peer` per link (where its
binlog stream stands, what it last said, when it was last heard) and `Peers`, the links by
index with what is asked of them together (who is heard, how our requests to them are framed).
The sockets of a link are the edge's (kvsvr/replica/edge.py)."""

from __future__ import annotations

import logging
from typing import Any

from kvsvr import _core
from kvsvr.config import GroupConfig
from kvsvr.limits import PEER_DOWN_AFTER_S, PULL_IDLE_INTERVAL_S, PULL_TIMEOUT_S
from kvsvr.peerauth import PeerAuth
from kvsvr.protocol import HelloReply

log = logging.getLogger("kvsvr.replica")

_REQUEST = _core.FRAME_REQUEST
_encode_frame = _core.encode_frame


class Peer:
    """This node's link to one other replica of its group."""

    __slots__ = ("address", "cursor", "durable", "first_lsn", "gap_since", "has_through",
                 "heard_at", "hello", "incarnation", "index", "last_lsn", "name", "next_pull",
                 "pull_from", "pull_idle_s", "pull_sent_at", "pull_tag", "pull_timeout_s",
                 "pulled", "saved", "snapshot", "snapshots_taken", "trimmed_past_us", "up")

    def __init__(self, index: int, name: str, address: str):
        self.index = index
        self.name = name
        self.address = address
        self.incarnation = 0      # the peer's life whose binlog `cursor` points into
        self.cursor = 0           # we applied or skipped every record of its binlog up to here
        self.saved = (0, 0)       # (incarnation, cursor) last put in the open transaction
        self.durable = (0, 0)     # ... and in the last checkpoint: what a crash goes back to
        self.pull_sent_at = 0.0   # 0: no pull in flight
        self.pull_timeout_s = PULL_TIMEOUT_S   # until it is sent again (see Stream.pull)
        self.pull_tag = 0         # the pull (or snapshot page) in flight: older answers are stale
        self.pull_from = 1        # the first LSN the pull in flight asked for
        self.next_pull = 0.0
        self.pull_idle_s = PULL_IDLE_INTERVAL_S  # the wait after an empty answer (see Stream)
        self.first_lsn = 0
        self.last_lsn = 0
        self.pulled = False       # it has answered a pull (its last_lsn is known)
        self.has_through = 0      # what the peer says it pulled of ours (trimming)
        self.up = False           # as last logged
        self.gap_since = 0.0      # its stream has stopped at a gap since then (0: it has not)
        self.heard_at = 0.0
        self.hello: HelloReply | None = None
        self.trimmed_past_us = False  # its binlog no longer has what we need: snapshot
        self.snapshot: dict[str, Any] | None = None  # a copy from it under way
        self.snapshots_taken = 0


def request_id(method: int, tag: int = 0) -> int:
    """Our requests to peers carry their method in the id's high half, so an answer says what
    it answers (a tag, e.g. the barrier, in the low half)."""
    return (method << 32) | tag


class Peers:
    """The group's other replicas, by index (`by_index` holds None at this node's own)."""

    def __init__(self, group: GroupConfig, index: int,
                 saved_cursors: dict[int, tuple[int, ...]], peer_secret: str | None):
        self.index = index
        self.replicas = len(group.replicas)
        self.majority = _core.majority(self.replicas)
        self.by_index: list[Peer | None] = [None] * self.replicas
        for i, replica in enumerate(group.replicas):
            if i == index:
                continue
            peer = Peer(i, replica.node, replica.address)
            saved = saved_cursors.get(i)
            if saved:
                peer.incarnation, peer.cursor = saved[0], saved[1]
                peer.saved = peer.durable = (saved[0], saved[1])
            self.by_index[i] = peer
        self.linked: list[Peer] = [p for p in self.by_index if p is not None]
        self.auth = PeerAuth(peer_secret) if peer_secret else None   # [security] peer_secret

    def frame(self, method: int, request_id: int, body: bytes) -> bytes:
        """A request frame to a peer, sealed with the peer secret if there is one."""
        if self.auth is not None:
            body = self.auth.seal(method, request_id, body)
        return _encode_frame(_REQUEST, method, request_id, 0, body)

    def majority_heard(self, now: float) -> bool:
        """This replica and the peers heard from within PEER_DOWN_AFTER_S are a majority
        (checked for every client request: no list built)."""
        heard = 1
        for p in self.linked:
            if p.heard_at and now - p.heard_at < PEER_DOWN_AFTER_S:
                heard += 1
        return heard >= self.majority

    def silent(self, now: float) -> list[str]:
        """The peers not heard from within PEER_DOWN_AFTER_S."""
        return [p.name for p in self.linked
                if not (p.heard_at and now - p.heard_at < PEER_DOWN_AFTER_S)]

    def lag(self) -> int:
        """The most records a stream from a peer that answered a pull is behind."""
        return max((p.last_lsn - p.cursor for p in self.linked if p.pulled), default=0)

    def watch(self, node: str, now: float) -> None:
        """Log each peer going silent and coming back (what an operator looks for first)."""
        for peer in self.linked:
            up = bool(peer.heard_at) and now - peer.heard_at < PEER_DOWN_AFTER_S
            if up != peer.up:
                peer.up = up
                if up:
                    log.info("node %s: peer %s (%s) is up", node, peer.name, peer.address)
                else:
                    log.warning("node %s: peer %s (%s) silent for %.1f s: down", node,
                                peer.name, peer.address, now - peer.heard_at)

    def status(self, now: float, faults: dict[int, tuple[float, int]]) -> dict[str, Any]:
        """Each peer as `kvsvr status` shows it; `faults`: (drop, delay_ms) by peer index."""
        peers = {}
        for peer in self.linked:
            up = bool(peer.heard_at) and now - peer.heard_at < PEER_DOWN_AFTER_S
            drop, delay_ms = faults[peer.index]
            peers[peer.name] = {
                "index": peer.index,
                "address": peer.address,
                "up": up,
                "last_heard_s": round(now - peer.heard_at, 3) if peer.heard_at else None,
                "incarnation": peer.incarnation,
                "pulled_through_lsn": peer.cursor,
                "peer_last_lsn": peer.last_lsn,
                # None until the peer has answered a pull: no lag can be claimed unseen
                "lag_records": max(0, peer.last_lsn - peer.cursor) if peer.pulled else None,
                "has_our_binlog_through": peer.has_through,
                "pull_timeout_s": peer.pull_timeout_s,
                "needs_snapshot": peer.trimmed_past_us,
                "snapshots_taken": peer.snapshots_taken,
                "faults": {"drop": drop, "delay_ms": delay_ms},
            }
        return peers


__all__ = ["Peer", "Peers", "request_id"]
