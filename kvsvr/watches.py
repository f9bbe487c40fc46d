"""Watches parked on a node: pure state, no I/O and no clock of its own.

A WATCH request is answered at once when the key's applied version is past the request's
`since_version` (or, continuing a page cut at that version, has reached it); otherwise it is
parked here until an apply moves the key past it or its wait ends. The node's loop (the
single node's serve loop, a replica's round) tells `Watches` which keys it applied and what
time it is; `Watches` hands back the watches to look at, and the loop reads and answers them.

The cost of a parked watch is one small object in a dict of key -> watches and one entry in
a heap of deadlines: an apply looks only at the watches of the keys it touched, and the time
only at the heap's top, so a round costs nothing per idle watch. The heap drops a watch
answered early lazily (it is marked done and skipped when its deadline comes up), and is
rebuilt when such dead entries outnumber the live ones, so it stays within twice the parked
count.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from typing import Any

from kvsvr.errors import NotFound, ResourceExhausted
from kvsvr.limits import WATCHES_PARKED_MAX
from kvsvr.protocol import WatchReply, WatchRequest


class ParkedWatch:
    """A WATCH request waiting on a node: who asked, which request, until when."""

    __slots__ = ("deadline", "done", "identity", "received", "request", "request_id")

    def __init__(self, identity: bytes, request_id: int, request: WatchRequest,
                 deadline: float, received: float):
        self.identity = identity
        self.request_id = request_id
        self.request = request
        self.deadline = deadline
        self.received = received
        self.done = False


def due(request: WatchRequest, version: int) -> bool:
    """Whether a watch at `request`'s position is answered by a key at `version`: the key is
    past since_version, or at it while a page cut at that version is continued."""
    since = request.since_version
    return version > since or (version == since and bool(request.after_row))


def read_watch(store: Any, txn: Any, request: WatchRequest) -> WatchReply:
    """The answer of a watch that is due, read in `txn` (current for the key): the key's
    version and value and the rows changed after the request's position (a CHANGES page,
    Compacted when since_version is before the key's compaction horizon)."""
    page = store.changes(txn, request.key, request.since_version, request.after_row,
                         request.limit)
    try:
        value: bytes | None = store.get(txn, request.key).value
    except NotFound:
        value = None
    return WatchReply(page.version, True, value, page.changes, page.resume)


def unchanged(version: int) -> WatchReply:
    """The answer of a watch whose wait ended first: the key is still at `version`."""
    return WatchReply(version, False, None, [], None)


class Watches:
    """The watches parked on one node, by key and by deadline."""

    def __init__(self, limit: int = WATCHES_PARKED_MAX):
        self.limit = limit
        self.by_key: dict[bytes, list[ParkedWatch]] = {}
        self.count = 0
        self._deadlines: list[tuple[float, int, ParkedWatch]] = []
        self._order = itertools.count()

    def park(self, watch: ParkedWatch) -> None:
        """Hold `watch` until its key moves or its deadline; ResourceExhausted when the node
        holds its limit already (nothing is parked then)."""
        if self.count >= self.limit:
            raise ResourceExhausted(
                f"watch: this node holds {self.count} parked watches, its limit; retry "
                "later or on another replica", field="watch")
        self.by_key.setdefault(watch.request.key, []).append(watch)
        self.count += 1
        heapq.heappush(self._deadlines, (watch.deadline, next(self._order), watch))

    def watching(self, keys: Iterable[bytes]) -> list[bytes]:
        """Those of `keys` some watch waits on."""
        by_key = self.by_key
        return [key for key in keys if key in by_key]

    def take(self, key: bytes, version: int) -> list[ParkedWatch]:
        """The watches of `key` that a key at `version` answers, no longer parked."""
        waiting = self.by_key.get(key)
        if not waiting:
            return []
        ready = [w for w in waiting if due(w.request, version)]
        if ready:
            kept = [w for w in waiting if not w.done and not due(w.request, version)]
            if kept:
                self.by_key[key] = kept
            else:
                del self.by_key[key]
            self._remove(ready)
        return ready

    def next_deadline(self) -> float | None:
        self._drop_dead_top()
        return self._deadlines[0][0] if self._deadlines else None

    def expired(self, now: float) -> list[ParkedWatch]:
        """The watches whose wait ended by `now`, no longer parked."""
        deadlines = self._deadlines
        out: list[ParkedWatch] = []
        while deadlines and deadlines[0][0] <= now:
            watch = heapq.heappop(deadlines)[2]
            if watch.done:
                continue
            watch.done = True
            out.append(watch)
        if out:
            self.count -= len(out)
            by_key = self.by_key
            for key in {watch.request.key for watch in out}:   # each key's list once
                kept = [w for w in by_key[key] if not w.done]
                if kept:
                    by_key[key] = kept
                else:
                    del by_key[key]
        return out

    def take_all(self) -> list[ParkedWatch]:
        """Every parked watch (the node is stopping), no longer parked."""
        out = [w for waiting in self.by_key.values() for w in waiting]
        for watch in out:
            watch.done = True
        self.by_key.clear()
        self._deadlines.clear()
        self.count = 0
        return out

    def _remove(self, watches: list[ParkedWatch]) -> None:
        for watch in watches:
            watch.done = True
        self.count -= len(watches)
        if len(self._deadlines) > 2 * self.count + 64:
            self._deadlines = [entry for entry in self._deadlines if not entry[2].done]
            heapq.heapify(self._deadlines)

    def _drop_dead_top(self) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].done:
            heapq.heappop(deadlines)


__all__ = ["ParkedWatch", "Watches", "due", "read_watch", "unchanged"]
