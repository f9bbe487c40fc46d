"""A round's votes to the vote log and its quorum messages to the peers: persist before send.
A vote may be revealed only once the vote log frame holding it is durable, so the messages
that carry votes wait for the frames written before them (on the sync thread, which sends
them as its fdatasync ends, or held here); a choice reveals no vote and leaves at once."""

from __future__ import annotations

import logging
from collections import Counter, deque
from typing import Any

from kvsvr import _core, protocol
from kvsvr._core import PersistRecord
from kvsvr.limits import QUORUM_FRAME_BYTES_MAX, QUORUM_FRAME_MESSAGES_MAX
from kvsvr.protocol import Method
from kvsvr.replica.checkpoints import Checkpoints
from kvsvr.replica.network import Network
from kvsvr.replica.peers import Peers
from kvsvr.store import Store
from kvsvr.votelog import VoteLog

log = logging.getLogger("kvsvr.replica")


class QuorumSender:
    """The vote log frames of this replica and the quorum messages that wait for them."""

    def __init__(self, name: str, peers: Peers, votes: VoteLog, checkpoints: Checkpoints,
                 edge: Network, store: Store, counters: Counter[str]):
        self._name = name
        self._peers = peers
        self._votes = votes
        self._checkpoints = checkpoints
        self._edge = edge
        self._store = store
        self._counters = counters
        # Quorum messages waiting for the vote log frames written before them to be durable:
        # (the last such frame, peer index, the messages' frames), in the order they were made.
        self.held: deque[tuple[int, int, list[bytes]]] = deque()
        self.gate = 0            # the last vote log frame holding votes: sends wait for it
        self.voted_at = -1.0     # when a round last wrote votes (see Edge.run)
        self._sync_wakes = True  # each finished sync wakes the loop (see wake_on_sync)

    def log_votes(self, records: list[PersistRecord], votes: bool, now: float) -> bool:
        """Write a round's records as one vote log frame, durable on the sync thread while
        the loop goes on (what reveals its votes waits for that). Learned choices ride along
        so that a restart applies them at once, but only votes (`votes`) make what is sent
        wait for a sync, and a frame of choices alone asks for none (the next vote's sync
        covers it). True if the frame does not fit even after a checkpoint and holds votes:
        LMDB must take them now."""
        log_ = self._votes
        frame = log_.frame(records)
        if not log_.fits(frame):
            self._checkpoints.checkpoint(durable=True)
        if log_.fits(frame):
            log_.write(frame, sync=votes)
            if votes:
                self.gate = log_.seq   # what is sent from now on waits for this frame
                self.voted_at = now
            return False
        return votes

    def send(self, messages: list[_core.Message], now: float) -> None:
        if _core.any_kind(messages, _core.MSG_STATE):
            # Stamp where our binlog stands: the rebuilding peer catches up to it.
            lsn = self._store.durable_last_lsn
            messages = [m if m.kind != _core.MSG_STATE else _core.Message(
                m.kind, m.source, m.target, m.incarnation, m.key, lsn,
                m.ballot, m.accepted_ballot, m.value) for m in messages]
        edge, by_index, replicas = self._edge, self._peers.by_index, self._peers.replicas
        # A CHOSEN message reveals no vote of ours: it goes now, not after the vote log sync
        # the others wait for (the follower applies the write a sync sooner).
        for index, (chosen, votes) in _core.group_quorum(messages).items():
            if not 0 <= index < replicas or by_index[index] is None:
                continue
            if chosen:
                edge.send_peer(index, self._frames(chosen), now)
            if votes:
                frames = self._frames(votes)
                if edge.send_after_sync(self.gate, index, frames):
                    continue
                if self.held or self._votes.synced < self.gate:
                    self.held.append((self.gate, index, frames))
                else:
                    edge.send_peer(index, frames, now)

    def _frames(self, messages: list[_core.Message]) -> list[bytes]:
        """One peer's messages in frames of at most QUORUM_FRAME_BYTES_MAX or
        QUORUM_FRAME_MESSAGES_MAX each (a state answer part in a frame of its own)."""
        frames: list[bytes] = []
        for chunk in _core.chunk_quorum(messages, QUORUM_FRAME_BYTES_MAX,
                                        QUORUM_FRAME_MESSAGES_MAX):
            try:
                frames.append(self._peers.frame(Method.QUORUM, 0,
                                                protocol.encode_quorum(chunk)))
            except ValueError as e:
                # Only a state answer part holding one huge record (a chosen 4 MiB batch not
                # yet applied) can outgrow a frame: the peer asks again, by when it is applied.
                self._counters["quorum_frames_too_large"] += 1
                log.error("node %s: %d quorum messages do not fit a frame (%s); not sent",
                          self._name, len(chunk), e)
        return frames

    def release(self, now: float) -> None:
        """Send the held quorum messages whose vote log frames are durable now."""
        held = self.held
        if not held:
            return
        synced = self._votes.synced
        if held[0][0] > synced:
            return
        # One message per peer for everything released (a send wakes ZeroMQ's I/O thread).
        ready: dict[int, list[bytes]] = {}
        while held and held[0][0] <= synced:
            _, index, frames = held.popleft()
            waiting = ready.get(index)
            if waiting is None:
                ready[index] = frames
            else:
                waiting.extend(frames)
        for index, frames in ready.items():
            self._edge.send_peer(index, frames, now)

    def status(self) -> dict[str, Any]:
        votes = self._votes
        return {
            "last_frame": votes.seq,
            "last_durable_frame": votes.synced,
            "messages_waiting_for_sync": len(self.held),
            "frames_since_checkpoint": votes.frames,
            "bytes_since_checkpoint": votes.used,
            "checkpoint_interval_ms": round(self._checkpoints.checkpoint_s * 1000),
        }

    def wake_on_sync(self, on: bool) -> None:
        """Whether a finished vote log sync wakes the loop: only while messages of its own
        wait for one (the sync thread sends the rest)."""
        if on != self._sync_wakes:
            self._sync_wakes = on
            self._votes.wake_on_sync(on)


__all__ = ["QuorumSender"]
