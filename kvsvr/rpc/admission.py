"""FastReject: admission control by queuing time and compound priority, after WeChat's DAGOR.

Pure logic: the time comes in as arguments (`now`, seconds on a monotonic clock; the user hash
takes wall-clock seconds so every caller agrees on the hour), decisions come out. The server
asks `admit(priority)` on arrival (a counter bump and a comparison), reports `started(...)`
when a handler begins, and the window logic below moves the level.

Priorities. Every request carries a compound priority `business * USER_PRIORITY_LEVELS +
user`, lower meaning more important: the business priority comes from the entry method (the
config's table) and is inherited by every downstream call; the user priority is one of 128
levels from a hash of the user id whose seed changes every hour, so no user is always last.

Windows. A window ends after WINDOW_S or WINDOW_REQUESTS_MAX started requests. Its average
queuing time (arrival to the start of handling) above `queuing_ms_max` means overloaded. The
histogram counts every arrival by priority, admitted or not, so that both directions can be
planned from it:

    overloaded: the level moves down until the requests at or under it are at most
                (1 - shed) of those admitted in the window. DAGOR sheds a fixed 5%; here
                shed is at least SHED_FRACTION (5%) and at least what brings the admitted
                down to what the instance ran in the window less 5%, at most
                SHED_FRACTION_MAX. Near capacity that is DAGOR's step; at three times
                capacity a fixed 5% per one-second window would need some twenty windows,
                every one spent queuing requests past their deadline;
    calm:       it moves up until they are at least (1 + restore) of them (at least one
                more), where restore is RESTORE_FRACTION (DAGOR's 1%) times the threshold
                over the window's queuing time, at most RESTORE_FRACTION_MAX: an instance
                far below its threshold has room, and creeping up 1% a second would leave it
                idle for a minute after an overshoot. If the window holds no request above
                the level, every priority is admitted.

A request whose priority is above the level is refused at once (`Overloaded`); every response
carries the level so callers refuse locally what this instance would refuse.
"""

from __future__ import annotations

import xxhash

from kvsvr.rpc.limits import (
    ADMIT_ALL,
    BUSINESS_PRIORITY_LEVELS,
    PRIORITY_LEVELS,
    QUEUING_THRESHOLD_MS_DEFAULT,
    RESTORE_FRACTION,
    RESTORE_FRACTION_MAX,
    RETRY_BUDGET_RATIO,
    RETRY_TOKENS_MAX,
    SHED_FRACTION,
    SHED_FRACTION_MAX,
    USER_HASH_ROTATE_S,
    USER_PRIORITY_LEVELS,
    WINDOW_REQUESTS_MAX,
    WINDOW_S,
)


def user_priority(user: str | int | bytes, wall_s: float) -> int:
    """The user priority (0..127) of `user` in the hour holding `wall_s` (time.time())."""
    hour = int(wall_s // USER_HASH_ROTATE_S)
    text = user if isinstance(user, bytes) else str(user).encode()
    return xxhash.xxh64_intdigest(text, seed=hour) % USER_PRIORITY_LEVELS


def compound(business: int, user: int) -> int:
    """One integer ordering (business, user) priorities: lower is more important."""
    assert 0 <= business < BUSINESS_PRIORITY_LEVELS and 0 <= user < USER_PRIORITY_LEVELS
    return business * USER_PRIORITY_LEVELS + user


def split(priority: int) -> tuple[int, int]:
    """(business, user) of a compound priority."""
    return divmod(priority, USER_PRIORITY_LEVELS)


def lowered_level(histogram: list[int], level: int, shed: float = SHED_FRACTION) -> int:
    """The level that sheds about `shed` of what `level` admitted (the arrivals of
    `histogram` at or under it). Unchanged when it admitted nothing."""
    admitted = sum(histogram[:level + 1])
    if admitted == 0:
        return level
    target = admitted * (1.0 - shed)
    kept = admitted
    while level >= 0 and kept > target:
        kept -= histogram[level]
        level -= 1
    return max(level, -1)


def raised_level(histogram: list[int], level: int, restore: float = RESTORE_FRACTION) -> int:
    """The level that admits about `restore` more than `level` did (at least one request
    more); ADMIT_ALL when the arrivals above it are fewer than that."""
    admitted = sum(histogram[:level + 1]) if level >= 0 else 0
    target = max(admitted * (1.0 + restore), admitted + 1)
    kept = admitted
    while level < ADMIT_ALL:
        level += 1
        kept += histogram[level]
        if kept >= target:
            return level
    return ADMIT_ALL


class Window:
    """What one closed window saw (for monitoring and tests)."""

    __slots__ = ("level", "overloaded", "queuing_ms_average", "started")

    def __init__(self, started: int, queuing_ms_average: float, overloaded: bool, level: int):
        self.started = started
        self.queuing_ms_average = queuing_ms_average
        self.overloaded = overloaded
        self.level = level     # the level after this window

    def __repr__(self) -> str:
        return (f"Window(started={self.started}, queuing_ms_average="
                f"{self.queuing_ms_average:.2f}, overloaded={self.overloaded}, "
                f"level={self.level})")


class Admission:
    """One service instance's admission level (see the module docstring).

    `level` is the least important compound priority admitted: ADMIT_ALL admits everything,
    -1 nothing. With `enabled` false nothing is refused, but windows are still measured.
    """

    def __init__(self, *, queuing_ms_max: float = QUEUING_THRESHOLD_MS_DEFAULT,
                 enabled: bool = True, window_s: float = WINDOW_S,
                 window_requests_max: int = WINDOW_REQUESTS_MAX, now: float = 0.0):
        if queuing_ms_max <= 0:
            raise ValueError(f"queuing_ms_max: {queuing_ms_max}, expected > 0")
        self.queuing_s_max = queuing_ms_max / 1000.0
        self.enabled = enabled
        self.window_s = window_s
        self.window_requests_max = window_requests_max
        self.level = ADMIT_ALL
        self.histogram = [0] * PRIORITY_LEVELS
        self.window_start = now
        self.queuing_s_sum = 0.0
        self.started_count = 0
        self.ran_count = 0
        self.last: Window | None = None

    def admit(self, priority: int, weight: int = 1) -> bool:
        """A request of `priority` arrived, standing for `weight` calls (a caller's sample of
        those it dropped locally): True to run it, False to refuse it (Overloaded)."""
        self.histogram[priority] += weight
        return priority <= self.level or not self.enabled

    def started(self, queuing_s: float, now: float, ran: bool = True) -> Window | None:
        """A request began after queuing `queuing_s` (`ran`: it was handled, not dropped for
        its budget); the window it closed, if any."""
        self.queuing_s_sum += queuing_s
        self.started_count += 1
        self.ran_count += ran
        if (self.started_count >= self.window_requests_max
                or now - self.window_start >= self.window_s):
            return self.close(now)
        return None

    def tick(self, now: float) -> Window | None:
        """Close the window if its time is up (an idle or fully refusing instance starts
        nothing, yet its level must still move)."""
        if now - self.window_start >= self.window_s:
            return self.close(now)
        return None

    def close(self, now: float) -> Window:
        count = self.started_count
        average_s = self.queuing_s_sum / count if count else 0.0
        overloaded = average_s > self.queuing_s_max
        if overloaded:
            admitted = sum(self.histogram[:self.level + 1])
            over = 1.0 - self.ran_count * (1.0 - SHED_FRACTION) / admitted if admitted else 0.0
            shed = min(SHED_FRACTION_MAX, max(SHED_FRACTION, over))
            self.level = lowered_level(self.histogram, self.level, shed)
        elif self.level < ADMIT_ALL:
            headroom = self.queuing_s_max / max(average_s, 1e-9)
            restore = min(RESTORE_FRACTION_MAX, RESTORE_FRACTION * headroom)
            self.level = raised_level(self.histogram, self.level, restore)
        self.last = Window(count, average_s * 1000.0, overloaded, self.level)
        self.histogram = [0] * PRIORITY_LEVELS
        self.window_start = now
        self.queuing_s_sum = 0.0
        self.started_count = 0
        self.ran_count = 0
        return self.last


class RetryBudget:
    """A caller's retries stay within RETRY_BUDGET_RATIO of its calls: each call earns that
    fraction of a token, a retry spends one, and at most RETRY_TOKENS_MAX are saved, so an
    overloaded service never sees its load multiplied by retries."""

    def __init__(self, ratio: float = RETRY_BUDGET_RATIO, tokens_max: float = RETRY_TOKENS_MAX):
        self.ratio = ratio
        self.tokens_max = tokens_max
        self.tokens = tokens_max

    def called(self) -> None:
        self.tokens = min(self.tokens_max, self.tokens + self.ratio)

    def spend(self) -> bool:
        """True (and a token spent) if a retry may go out now."""
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


__all__ = [
    "Admission",
    "RetryBudget",
    "Window",
    "compound",
    "lowered_level",
    "raised_level",
    "split",
    "user_priority",
]
