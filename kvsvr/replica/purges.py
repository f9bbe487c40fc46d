"""A replica's background removal of expired values and rows: what `kvsvr.expiry.Purger`
chooses from the expiry index is proposed as the keys' next versions, through the version
quorum like a client's write (so it is applied, copied and replayed everywhere, and its new
version wakes watchers). Replica i of a group takes an entry only once it is i *
PURGE_STAGGER_S overdue, so normally the first replica up removes it and the others find the
entry gone; a purge that lost a race is harmless (it removes only what is still expired).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvsvr.errors import KvError
from kvsvr.limits import (
    PURGE_ENTRIES_READ_MAX,
    PURGE_INTERVAL_S,
    PURGE_STAGGER_S,
    REQUEST_WAIT_S_MAX,
)
from kvsvr.protocol import Method, MutateRequest

if TYPE_CHECKING:
    from kvsvr.replica.round import ReplicaNode

# Where the answers to a replica's own purges go: no client has this identity (ZeroMQ's are
# five bytes starting with a zero byte), so the ROUTER drops them.
PURGE_IDENTITY = b"kvsvr-purge"


def propose_purges(node: ReplicaNode, now: float) -> None:
    """Every PURGE_INTERVAL_S of the round's clock (`now`): propose the removals due, while
    this replica votes and hears a majority."""
    if now < node.next_purge:
        return
    node.next_purge = now + PURGE_INTERVAL_S
    if node.life.quorum is None or not node.life.voting:
        return
    purger = node.purger
    purger.stagger_ms = int(node.index * PURGE_STAGGER_S * 1000)
    now_ms = int(node.wall_clock() * 1000)
    work = node.work
    with node.checkpoints.view() as txn:
        entries = node.store.expiring(txn, purger.through_ms(now_ms), PURGE_ENTRIES_READ_MAX)
        if not entries:
            return
        for key, ops in purger.choose(entries, now_ms, now):
            try:
                work.client_request(PURGE_IDENTITY, 0, Method.MUTATE,
                                    MutateRequest(key, ops, None, 0, 0),
                                    now + REQUEST_WAIT_S_MAX, txn, now)
            except KvError:   # no majority now, or no longer voting: later
                purger.done(key)
                return
            node.counters["purges_proposed"] += 1


__all__ = ["PURGE_IDENTITY", "propose_purges"]
