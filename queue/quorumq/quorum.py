"""The queue's quorum arithmetic, as pure functions (no I/O, no clock): tested by tables.

- `batch_outcome`: a produce batch sent to the 3 servers of a group is committed once 2 have
  acknowledged it (fdatasynced) and failed once 2 cannot anymore.
- `read_set`: which servers of a group a consumer reads. Any 2 servers of a group share every
  committed message *if both still hold everything they acknowledged*; a server with a new
  disk (a new incarnation) may not, so it counts only once it is `whole` again.
- `whole_again`: when a new incarnation holds everything it should (see consumer.py for the
  argument).
"""

from __future__ import annotations

from collections.abc import Sequence

SERVERS_PER_GROUP = 3
WRITE_QUORUM = 2

PENDING = 0
COMMITTED = 1
FAILED = 2


def batch_outcome(acks: int, failures: int, servers: int = SERVERS_PER_GROUP) -> int:
    """COMMITTED with WRITE_QUORUM acknowledgements, FAILED once that is out of reach."""
    if acks >= WRITE_QUORUM:
        return COMMITTED
    if servers - failures < WRITE_QUORUM:
        return FAILED
    return PENDING


def read_set(up: Sequence[bool], whole: Sequence[bool]) -> tuple[list[int], bool]:
    """(servers to read, safe). Safe: every committed message of the group is on at least
    one of them, so a message not found there was not committed in this group.

    Two whole servers are enough (a committed message is on 2 of 3, and a whole server
    holds everything it acknowledged); if fewer than two whole servers are up, read every
    server that is up (safe only when that is all three). Unsafe reads still deliver what
    they find; they only stop the consumer from concluding that something does not exist."""
    candidates = [i for i in range(len(up)) if up[i] and whole[i]]
    if len(candidates) >= WRITE_QUORUM:
        return candidates[:WRITE_QUORUM], True
    every = [i for i in range(len(up)) if up[i]]
    return every, len(every) == len(up)


def whole_again(positions: Sequence[int | None], cutoffs: Sequence[int | None]) -> bool:
    """A new incarnation W is whole for a consumer group once, on every other server X of
    the group, the group's position is at or past X's cutoff: the first offset X appended
    at or after W's birth + the acknowledgement deadline + the clock skew bound.

    positions[i]/cutoffs[i] describe the other servers; None means unknown (the server is
    down, or the cutoff time has not passed there yet), which keeps W from being whole."""
    for position, cutoff in zip(positions, cutoffs, strict=True):
        if position is None or cutoff is None or position < cutoff:
            return False
    return True


def gap_may_be_skipped(held_since: float, margin_s: float,
                       caught_up_at: Sequence[float | None]) -> bool:
    """A producer's missing sequence number may be given up (it was never committed) only
    once every group was read to its end, through a safe read set, by fetches sent after the
    gap was seen + the acknowledgement deadline + clock skew: a committed message with that
    sequence number would have been acknowledged by then, so it would have been found."""
    if not caught_up_at:
        return False
    limit = held_since + margin_s
    return all(at is not None and at >= limit for at in caught_up_at)


NO_GROUP = -1          # choose_group: no group can take a batch now
WAIT_CONNECTING = -2   # choose_group: sockets may still be connecting: look again shortly


def pick_group(current: int, backoff_until: Sequence[float], now: float) -> int:
    """The producer's group for the next attempt by back-off alone: `current` unless it is in
    back-off, then the next one (in order) that is not, else the one whose back-off ends
    first."""
    count = len(backoff_until)
    for step in range(count):
        index = (current + step) % count
        if backoff_until[index] <= now:
            return index
    return min(range(count), key=lambda i: backoff_until[i])


def choose_group(picked: int, backoff_until: Sequence[float], reachable: Sequence[bool],
                 now: float, connecting: bool) -> int:
    """`picked` (pick_group's answer) if at least 2 of its servers are connected
    (`reachable`); while the producer's sockets may still be connecting, WAIT_CONNECTING;
    else the reachable group that is out of back-off (or leaves it first), nearest after
    `picked`; NO_GROUP when no group is reachable (the batch fails fast: retrying it for
    its whole lifetime would only hide the outage)."""
    if reachable[picked]:
        return picked
    if connecting:
        return WAIT_CONNECTING
    count = len(reachable)
    others = [g for g in range(count) if reachable[g]]
    if not others:
        return NO_GROUP
    return min(others, key=lambda g: (max(backoff_until[g] - now, 0.0), (g - picked) % count))
