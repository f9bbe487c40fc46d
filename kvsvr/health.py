"""Which replicas a client believes are failing, and when it tries them again.

Pure logic: every method takes the time (`now`, seconds on a monotonic clock) from its caller,
so a test drives it with a table of events. One instance per client, shared by the client's
threads (each method holds a lock for a few dictionary operations) or by its asyncio tasks.

The states of an address, all transitions in this class:

    healthy    no failure since its last answer: calls use it in their key's order
    failing    an attempt timed out or answered Unavailable: calls skip it until its
               back-off ends (BACKOFF_FIRST_S, doubling per consecutive failure, at most
               BACKOFF_S_MAX)
    probe due  the back-off ended: the next call that picks it is the probe
    probing    a probe is in flight: other calls skip it for one attempt (the probe window)

A success (any answer but Unavailable, errors included: the replica is serving) makes an
address healthy. A failure of a healthy address starts a back-off; a failure of a probe
doubles it; further failures while failing are the same episode (many requests were in flight
when the replica stopped answering) and change nothing. When every candidate is failing, the
one whose back-off ends first is used anyway: a call never refuses to try.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from kvsvr.limits import BACKOFF_FIRST_S, BACKOFF_S_MAX

# Client-side tunables, kept here rather than in kvsvr/limits.py (the node's side owns that
# file): how long a failing replica is skipped after its first failure, and the ceiling of the
# doubling back-off. Short enough that a restarted replica gets its traffic back within
# seconds; long enough that a dead one costs a timed-out attempt only now and then.
_BACKOFF_DOUBLINGS_MAX = 16   # 0.5 s * 2^16 is far past the ceiling: no huge powers of two

HEALTHY = "healthy"
FAILING = "failing"
PROBE_DUE = "probe due"
PROBING = "probing"


def backoff_s(failures: int) -> float:
    """The back-off after `failures` consecutive failures (failures >= 1)."""
    return min(BACKOFF_S_MAX,
               BACKOFF_FIRST_S * 2.0 ** min(failures - 1, _BACKOFF_DOUBLINGS_MAX))


class _Failing:
    __slots__ = ("failures", "probing", "until")

    def __init__(self, failures: int, until: float):
        self.failures = failures    # consecutive failures, >= 1
        self.until = until          # end of the back-off, or of the probe window
        self.probing = False


class Health:
    """Per-address failure state of one client (see the module docstring)."""

    def __init__(self) -> None:
        # Only addresses that failed are here (healthy is the absence of an entry), so the
        # table is bounded by the addresses a client talks to and empties as they recover.
        self._failing: dict[str, _Failing] = {}
        self._lock = threading.Lock()

    def state(self, address: str, now: float) -> str:
        with self._lock:
            return _state(self._failing.get(address), now)

    def choose(self, candidates: Sequence[str], now: float,
               exclude: str | None = None) -> tuple[str, float]:
        """(address, ready_at): the first usable candidate in order (ready now), else the one
        whose back-off ends first (and when). `exclude` (the address that just failed this
        request) is skipped unless it is the only candidate."""
        failing = self._failing
        if not failing and exclude is None:  # the common case: nothing is failing
            return candidates[0], now
        with self._lock:
            best = ""
            best_until = 0.0
            for address in candidates:
                if address == exclude and len(candidates) > 1:
                    continue
                entry = failing.get(address)
                if _usable(entry, now):
                    return address, now
                assert entry is not None
                if not best or entry.until < best_until:
                    best, best_until = address, entry.until
            return best, best_until

    def sending(self, address: str, now: float, window_s: float) -> None:
        """A request is going to `address` now; if its probe is due, this one is the probe and
        other calls skip the address for `window_s` (the attempt timeout)."""
        if not self._failing:
            return
        with self._lock:
            entry = self._failing.get(address)
            if entry is not None and now >= entry.until:
                entry.probing = True
                entry.until = now + window_s

    def failed(self, address: str, now: float) -> None:
        """An attempt to `address` timed out or was answered Unavailable."""
        with self._lock:
            entry = self._failing.get(address)
            if entry is None:
                self._failing[address] = _Failing(1, now + backoff_s(1))
            elif entry.probing or now >= entry.until:
                entry.failures += 1
                entry.until = now + backoff_s(entry.failures)
                entry.probing = False
            # else: failing already, and this is the same episode

    def succeeded(self, address: str) -> None:
        """`address` answered (anything but Unavailable): it is healthy."""
        if address in self._failing:
            with self._lock:
                self._failing.pop(address, None)


def _state(entry: _Failing | None, now: float) -> str:
    if entry is None:
        return HEALTHY
    if now >= entry.until:
        return PROBE_DUE
    return PROBING if entry.probing else FAILING


def _usable(entry: _Failing | None, now: float) -> bool:
    return entry is None or now >= entry.until


__all__ = ["FAILING", "HEALTHY", "PROBE_DUE", "PROBING", "Health", "backoff_s"]
