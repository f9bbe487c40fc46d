"""A client's watch of a key: long polls (WATCH) that resume where the last answer left off.

Each poll asks a replica of the key to answer once the key is applied past the watcher's
version, or after a wait with "no change yet"; the next poll starts from the answer's
version, on whichever replica the client's failover picks (kvsvr.health), so a replica that
is behind parks the poll until it catches up, and nothing is seen twice or out of order.

What an event holds (`WatchEvent`):

- `version`: how far the watcher got: every row change up to it has been yielded. Versions
  strictly increase from one event to the next.
- `changes`: the rows changed after the previous event, through `version`, in (version, row)
  order, deletions as tombstones: every row change once, as CHANGES reports them (a row
  changed twice between two polls is reported once, at its newest version).
- `value`: the key's value at `version` (None: it holds none, deleted or never put) on an
  event that ends a poll (`complete`). Versions a value went through between two polls are
  not reported (coalesced, as Consul's blocking queries do); the version says how far.

An answer too big for one page is cut at a row (`resume`); the rows of the versions before
the cut are yielded at once as an event that is not `complete` (its value None), the rows of
the cut's version wait for the next page, so `version` still strictly increases. A watch from
before the key's compaction horizon raises Compacted: deletions in between are gone, and the
watcher restarts from 0 (a full resync).

`WatchCursor` is the pure part (answers in, events and the next request's position out);
`watch_events` and `watch_events_async` drive it with a client's call path.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from msgspec import Struct

from kvsvr import calls
from kvsvr.calls import CallSpec
from kvsvr.errors import InvalidArgument
from kvsvr.limits import WATCH_REPLY_GRACE_S, WATCH_WAIT_S_DEFAULT, WATCH_WAIT_S_MAX
from kvsvr.protocol import Change, WatchReply


class WatchEvent(Struct, array_like=True):
    """What a watch yields: see the module docstring."""

    version: int
    value: bytes | None
    changes: list[Change]
    complete: bool


class WatchCursor:
    """Where a watcher stands: the position its next poll asks from, and the rows of a
    version cut by a page, held until that version is whole."""

    __slots__ = ("after_row", "held", "since", "yielded")

    def __init__(self, since_version: int):
        self.since = since_version     # the next poll asks for changes after ...
        self.after_row = b""           # ... (since, after_row)
        self.yielded = since_version   # the version of the last event
        self.held: list[Change] = []   # rows of version `since` a page cut, not yielded yet

    @property
    def cut(self) -> bool:
        """A page was cut: the next poll continues it at once (no wait)."""
        return bool(self.after_row)

    def on_reply(self, reply: WatchReply) -> WatchEvent | None:
        """The event an answer brings, if any, and the position of the next poll."""
        if not reply.changed:
            return None
        changes = self.held + reply.changes if self.held else reply.changes
        if reply.resume is None:
            if reply.version <= self.yielded:
                return None   # (a replica never answers so; nothing is yielded twice)
            self.since, self.after_row, self.yielded = reply.version, b"", reply.version
            self.held = []
            return WatchEvent(reply.version, reply.value, changes, True)
        cut_version, cut_row = reply.resume
        whole = [c for c in changes if c.version < cut_version]
        self.held = [c for c in changes if c.version >= cut_version]
        self.since, self.after_row = cut_version, cut_row
        if not whole or whole[-1].version <= self.yielded:
            return None
        self.yielded = whole[-1].version
        return WatchEvent(self.yielded, None, whole, False)


def check_seconds(name: str, value: Any, most: float) -> float:
    """`value` as seconds in (0, most], else InvalidArgument naming `name`."""
    if (isinstance(value, bool) or not isinstance(value, int | float) or value != value
            or not 0 < value <= most):
        raise InvalidArgument(f"{name}: expected seconds in (0, {most:g}], got {value!r}",
                              field=name)
    return float(value)


class _Polls:
    """The arguments of a watch, checked when it is made (not at its first step), and each
    next poll's call."""

    def __init__(self, key: Any, since_version: Any, timeout: Any, wait: Any,
                 call_timeout: float):
        first = calls.watch(key, since_version)     # checks key and since_version
        self.key = first.key
        self.wait = check_seconds("wait", wait, WATCH_WAIT_S_MAX)
        self.deadline = None if timeout is None else \
            time.monotonic() + check_seconds("timeout", timeout, 86_400.0)
        self.call_timeout = call_timeout
        self.cursor = WatchCursor(first.request.since_version)

    def next_call(self) -> tuple[CallSpec, float] | None:
        """The next poll and its deadline, or None once the watch's own timeout passed."""
        wait = self.wait
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                return None
            wait = min(wait, left)
        cursor = self.cursor
        spec = calls.watch(self.key, cursor.since, cursor.after_row,
                           0.0 if cursor.cut else round(wait, 3))
        return spec, wait + WATCH_REPLY_GRACE_S + self.call_timeout


def watch_events(run: Callable[[CallSpec, float], Any], key: Any, since_version: Any = 0, *,
                 timeout: Any = None, wait: Any = WATCH_WAIT_S_DEFAULT,
                 call_timeout: float) -> Iterator[WatchEvent]:
    """Events of `key` after `since_version` (see the module docstring), polled through
    `run(spec, timeout)` (a client's call path, failover included). `timeout`: seconds after
    which the iteration ends (None: never); `wait`: how long each poll waits on the replica;
    `call_timeout`: how long a poll may take beyond its wait (failover included) before its
    Timeout or Unavailable is raised."""
    polls = _Polls(key, since_version, timeout, wait, call_timeout)
    return _iterate(run, polls)


def _iterate(run: Callable[[CallSpec, float], Any], polls: _Polls) -> Iterator[WatchEvent]:
    cursor = polls.cursor
    while True:
        call = polls.next_call()
        if call is None:
            return
        event = cursor.on_reply(run(*call))
        if event is not None:
            yield event


def watch_events_async(run: Callable[[CallSpec, float], Awaitable[Any]], key: Any,
                       since_version: Any = 0, *, timeout: Any = None,
                       wait: Any = WATCH_WAIT_S_DEFAULT,
                       call_timeout: float) -> AsyncIterator[WatchEvent]:
    """watch_events for the asyncio client: `run` returns an awaitable of the answer."""
    polls = _Polls(key, since_version, timeout, wait, call_timeout)
    return _iterate_async(run, polls)


async def _iterate_async(run: Callable[[CallSpec, float], Awaitable[Any]],
                         polls: _Polls) -> AsyncIterator[WatchEvent]:
    cursor = polls.cursor
    while True:
        call = polls.next_call()
        if call is None:
            return
        event = cursor.on_reply(await run(*call))
        if event is not None:
            yield event


__all__ = ["WatchCursor", "WatchEvent", "check_seconds", "watch_events", "watch_events_async"]
