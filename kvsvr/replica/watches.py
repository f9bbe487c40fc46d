"""Watches on a replica: a WATCH request is answered from this replica's applied state, at
once when the key is past the watcher's version, else parked (kvsvr/watches.py) until the
round applies the key past it, whatever brought the version (the quorum, a peer's binlog, a
snapshot), or until its wait ends.

A watch is served by a replica that votes (its data is whole) and hears a majority: one cut
off from its group learns nothing more, so it refuses new watches and answers a parked one
whose wait ended Unavailable, sending the watcher to another replica instead of leaving it
on a copy that cannot move. Keys frozen by the checkpoint commit under way are read once it
ended (a read transaction does not see them yet). Parked replies leave from the loop, like
every answer: the round is never held by a watch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from kvsvr import _core, protocol
from kvsvr.errors import Internal, KvError, Unavailable
from kvsvr.limits import PEER_DOWN_AFTER_S
from kvsvr.protocol import WatchRequest
from kvsvr.replica.checkpoints import Checkpoints
from kvsvr.replica.lives import Life
from kvsvr.replica.network import Network
from kvsvr.replica.peers import Peers
from kvsvr.single import error_frame
from kvsvr.store import Store
from kvsvr.watches import ParkedWatch, Watches, due, read_watch, unchanged

log = logging.getLogger("kvsvr.replica")

_RESPONSE = _core.FRAME_RESPONSE
_encode = protocol.encode
_encode_frame = _core.encode_frame


class ReplicaWatches:
    """The replica's side of watches: taking requests, waking on applies, expiring."""

    def __init__(self, name: str, group: str, store: Store, peers: Peers, life: Life,
                 checkpoints: Checkpoints, edge: Network, counters: Counter[str],
                 watches: Watches, *, check_owned: Callable[[bytes], None]):
        self._name = name
        self._group = group
        self._store = store
        self._peers = peers
        self._life = life
        self._checkpoints = checkpoints
        self._edge = edge
        self._counters = counters
        self._check_owned = check_owned
        self.parked = watches
        self.recheck: set[bytes] = set()   # keys to look at once the commit under way ends

    def request(self, identity: bytes, request_id: int, request: WatchRequest, txn: Any,
                now: float) -> None:
        """A client's WATCH: answered now if the key is past it (or asked not to wait),
        else parked. Raises what the caller answers as an error."""
        self._check_owned(request.key)
        self._check_serving(now)
        key = request.key
        frozen = key in self._checkpoints.frozen
        version = self._checkpoints.applied(txn, key)
        if not frozen and (due(request, version) or not request.wait_ms):
            self._answer(identity, request_id, request, txn, version)
            return
        self.parked.park(ParkedWatch(identity, request_id, request,
                                     now + request.wait_ms / 1000, now))
        if frozen:
            self.recheck.add(key)   # its newest version is in the commit under way

    def applied(self, keys: Iterable[bytes]) -> None:
        """The round applied `keys`: answer the watches they moved past their version."""
        watched = self.parked.watching(keys)
        if watched:
            self._wake(watched)

    def tick(self, now: float) -> None:
        """Each round: keys a commit held are looked at once it ended, and watches whose
        wait ended are answered (the heap's top only, when nothing is due)."""
        if self.recheck and self._checkpoints.committing is None:
            keys, self.recheck = self.recheck, set()
            self._wake(self.parked.watching(keys))
        deadline = self.parked.next_deadline()
        if deadline is None or deadline > now:
            return
        expired = self.parked.expired(now)
        try:
            self._check_serving(now)
        except Unavailable as e:
            for watch in expired:
                self._edge.answer(watch.identity, error_frame(watch.request_id, e))
            return
        checkpoints = self._checkpoints
        frozen = checkpoints.frozen
        with checkpoints.view() as txn:
            for watch in expired:
                key = watch.request.key
                if key in frozen:   # (the view does not show it: the next poll will)
                    self._edge.answer(watch.identity, _encode_frame(
                        _RESPONSE, 0, watch.request_id, 0,
                        _encode(unchanged(watch.request.since_version))))
                    continue
                # Due after all when an apply this round did not report moved the key.
                self._answer(watch.identity, watch.request_id, watch.request, txn,
                             checkpoints.applied(txn, key))

    def stop(self) -> None:
        """The node stops: parked watches are answered Unavailable (watch again)."""
        error = Unavailable(f"node {self._name} is stopping; watch again", field="node")
        for watch in self.parked.take_all():
            self._edge.answer(watch.identity, error_frame(watch.request_id, error))

    def _wake(self, keys: list[bytes]) -> None:
        checkpoints = self._checkpoints
        frozen = checkpoints.frozen
        with checkpoints.view() as txn:
            for key in keys:
                if key in frozen:
                    self.recheck.add(key)
                    continue
                version = checkpoints.applied(txn, key)
                for watch in self.parked.take(key, version):
                    self._answer(watch.identity, watch.request_id, watch.request, txn,
                                 version)

    def _answer(self, identity: bytes, request_id: int, request: WatchRequest, txn: Any,
                version: int) -> None:
        try:
            reply = read_watch(self._store, txn, request) if due(request, version) \
                else unchanged(version)
            frame = _encode_frame(_RESPONSE, 0, request_id, 0, _encode(reply))
        except KvError as e:
            self._counters[f"errors.{type(e).__name__}"] += 1
            frame = error_frame(request_id, e)
        except Exception:  # as for any request: a bug costs one watch, never the node
            log.exception("watch %d failed", request_id)
            self._counters["errors.Internal"] += 1
            frame = error_frame(request_id, Internal("internal error"))
        self._edge.answer(identity, frame)

    def _check_serving(self, now: float) -> None:
        life = self._life
        if not life.voting:
            raise Unavailable(f"node {self._name} is {life.role}; watch on another replica",
                              field="node")
        if not self._peers.majority_heard(now):
            raise Unavailable(
                f"node {self._name}: no majority of group {self._group} is reachable "
                f"({', '.join(self._peers.silent(now))} silent for over "
                f"{PEER_DOWN_AFTER_S:g} s): its copy may not move; watch on another replica",
                field="node")


__all__ = ["ReplicaWatches"]
