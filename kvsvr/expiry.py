"""Keys and rows that expire: the pure parts (no LMDB, no sockets, the time passed in).

A client's put or row_put may carry a time to live: an expire op after it in the same batch,
whose value holds the ttl and an instant left 0. The node that takes the request sets the
instant (`stamp`, unix ms on its clock) before the write is planned or proposed, so the
instant is part of the value the version quorum chooses, and every replica applies, copies
and replays the same one. Reads compare the instant with their own clock: a value or row past
it reads as absent at once.

Removal is a mutation like any other: a purge op removes the value or row only if its recorded
instant is still at or before the purge's, so a re-put racing the purge keeps the new value.
`Purger` decides which of the due entries a node proposes to remove, and when: replica i of a
group waits until an entry is i * PURGE_STAGGER_S overdue, so one replica (the first one up)
removes it and the others find it gone, and a key proposed is not proposed again before
PURGE_RETRY_S.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvsvr import _core
from kvsvr.errors import InvalidArgument
from kvsvr.limits import OPS_PER_BATCH_MAX, PURGE_KEYS_MAX, PURGE_RETRY_S, TTL_S_MAX, TTL_S_MIN
from kvsvr.protocol import Op, expiry_of, purge_op, stamped_expiry

_EXPIRE = _core.OP_EXPIRE
_INCR = _core.OP_INCR
TTL_MS_MIN = TTL_S_MIN * 1000
TTL_MS_MAX = TTL_S_MAX * 1000


def needs_stamp(ops: list[Op]) -> bool:
    """Whether `stamp` has anything to do (cheap: a lone put, the common write, has not)."""
    return len(ops) > 1 or ops[0].kind == _INCR


def stamp(ops: list[Op], now_ms: int) -> None:
    """Set the instant of every expire op of a write taken at `now_ms` (unix ms), in place;
    an incr first removes a value that expired by then (a purge op ahead of the batch), so it
    counts from zero, as a get would show. An instant a client sent is replaced: the node's
    clock decides, never the caller's. Raises InvalidArgument naming `ttl` for a ttl out of
    range."""
    incr = False
    for op in ops:
        if op.kind == _EXPIRE:
            ttl_ms = expiry_of(op.value)[1]
            if not TTL_MS_MIN <= ttl_ms <= TTL_MS_MAX:
                raise InvalidArgument(f"ttl: {ttl_ms} ms, expected {TTL_MS_MIN}..{TTL_MS_MAX}",
                                      field="ttl")
            op.value = stamped_expiry(now_ms + ttl_ms, ttl_ms)
        elif op.kind == _INCR:
            incr = True
    if incr and ops[0].kind != _core.OP_PURGE:
        check_incr_room(ops)
        ops.insert(0, purge_op(now_ms))


def check_incr_room(ops: list[Op]) -> None:
    """A batch holding an incr leaves room for the purge op a node puts ahead of it (without
    it the incr would count from an expired value): at most OPS_PER_BATCH_MAX - 1 ops."""
    if len(ops) >= OPS_PER_BATCH_MAX and any(op.kind == _INCR for op in ops):
        raise InvalidArgument(f"ops: {len(ops)} operations with an incr, the limit is "
                              f"{OPS_PER_BATCH_MAX - 1} (a node adds one that removes an "
                              "expired value before the incr counts)", field="ops")


class Purger:
    """Which expired entries one node proposes to remove. `stagger_ms`: how long past its
    instant an entry must be before this node takes it (replica index times
    PURGE_STAGGER_S: 0 for a group of one)."""

    __slots__ = ("proposed", "stagger_ms")

    def __init__(self, stagger_ms: int = 0) -> None:
        self.stagger_ms = stagger_ms
        self.proposed: dict[bytes, float] = {}   # key -> when it may be proposed again (s)

    def through_ms(self, now_ms: int) -> int:
        """Entries due at or before this instant are this node's to remove now."""
        return now_ms - self.stagger_ms

    def choose(self, entries: Iterable[tuple[int, bytes, bytes]], now_ms: int,
               now: float) -> list[tuple[bytes, list[Op]]]:
        """The removals to propose, a mutation per key (at most PURGE_KEYS_MAX keys, each at
        most OPS_PER_BATCH_MAX rows), from the expiry index's `entries` (expires_ms, key,
        row) in instant order; `now` is the caller's monotonic clock (seconds)."""
        proposed = self.proposed
        for key in [k for k, until in proposed.items() if until <= now]:
            del proposed[key]
        through = self.through_ms(now_ms)
        by_key: dict[bytes, list[Op]] = {}
        for expires_ms, key, row in entries:
            if expires_ms > through:
                break
            if key in proposed:
                continue
            ops = by_key.get(key)
            if ops is None:
                if len(by_key) == PURGE_KEYS_MAX:
                    continue
                ops = by_key[key] = []
            if len(ops) < OPS_PER_BATCH_MAX and all(op.row != row for op in ops):
                ops.append(purge_op(now_ms, row))
        for key in by_key:
            proposed[key] = now + PURGE_RETRY_S
        return list(by_key.items())

    def done(self, key: bytes) -> None:
        """The key's removal was applied: it may be proposed again as soon as it is due."""
        self.proposed.pop(key, None)


__all__ = ["TTL_MS_MAX", "TTL_MS_MIN", "Purger", "check_incr_room", "needs_stamp", "stamp"]
