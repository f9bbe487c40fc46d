"""Per-producer order and duplicate removal for a consumer, as a pure state machine.

Messages come from several servers of several groups, each server's log in offset order.
Every message has an id (producer, seq); a producer numbers its messages 0, 1, 2, ... with
no gap, and every copy of a message (on the servers of a group, or on another group after a
retry) carries the same id. So: a message whose seq is the producer's next is delivered; a
lower one is a duplicate and dropped; a higher one is held until the gap before it fills (from
another server, another group, or a later fetch) or is given up (`skip_gap`, decided by the
consumer under the rule in quorum.gap_may_be_skipped).

Each server's commit position is the offset of its earliest message that was read but not
yet delivered (held), else its read position: everything before it is delivered or a
duplicate of a delivered message.
"""

from __future__ import annotations

from collections.abc import Hashable

from quorumq.limits import CONSUMER_TRACKED_PRODUCERS_MAX

Message = tuple[int, int, int, int, bytes]   # offset, producer_id, seq, append_ms, value
Out = list[tuple[Hashable, Message]]         # (server it was read from, message)


class ProducerOrder:
    def __init__(self, next_seq: dict[int, int] | None = None):
        self.next_seq: dict[int, int] = dict(next_seq or {})
        # producer -> seq -> (message, [(server, offset), ...] where copies were read)
        self.held: dict[int, dict[int, tuple[Message, list[tuple[Hashable, int]]]]] = {}
        self.held_count = 0
        self._held_offsets: dict[Hashable, dict[int, None]] = {}   # per server, ordered
        self.held_since: dict[int, float] = {}                     # producer -> first hold
        self.duplicates = 0
        self.skipped = 0

    def offer(self, server: Hashable, message: Message, now: float,
              out: Out) -> None:
        """One message read from `server`; deliverable messages are appended to `out`."""
        offset, producer, seq = message[0], message[1], message[2]
        expected = self.next_seq.get(producer, 0)
        if seq < expected:
            self.duplicates += 1
            return
        if seq > expected:
            held = self.held.setdefault(producer, {})
            entry = held.get(seq)
            if entry is None:
                held[seq] = (message, [(server, offset)])
                self.held_count += 1
                self.held_since.setdefault(producer, now)
            else:
                entry[1].append((server, offset))
                self.duplicates += 1
            self._held_offsets.setdefault(server, {})[offset] = None
            return
        out.append((server, message))
        self._advance(producer, seq + 1, out)

    def _advance(self, producer: int, next_seq: int, out: Out) -> None:
        held = self.held.get(producer)
        while held:
            entry = held.pop(next_seq, None)
            if entry is None:
                break
            self._release(entry[1])
            out.append((entry[1][0][0], entry[0]))
            next_seq += 1
        self.next_seq[producer] = next_seq
        if held is not None and not held:
            del self.held[producer]
            self.held_since.pop(producer, None)
        elif held:
            # Anything held below next_seq is a duplicate of what was just delivered.
            for seq in [s for s in held if s < next_seq]:
                self._release(held.pop(seq)[1])
        if len(self.next_seq) > CONSUMER_TRACKED_PRODUCERS_MAX:
            self._forget_oldest()

    def _release(self, copies: list[tuple[Hashable, int]]) -> None:
        self.held_count -= 1
        for server, offset in copies:
            offsets = self._held_offsets.get(server)
            if offsets is not None:
                offsets.pop(offset, None)

    def _forget_oldest(self) -> None:
        """Bound the table: producers with nothing held, oldest first (dict order is the
        order they first appeared). A forgotten producer's late duplicate would be
        delivered again: at-least-once still holds."""
        for producer in list(self.next_seq):
            if len(self.next_seq) <= CONSUMER_TRACKED_PRODUCERS_MAX:
                return
            if producer not in self.held:
                del self.next_seq[producer]

    def raise_to(self, producer: int, next_seq: int, now: float, out: Out) -> None:
        """Everything of `producer` below `next_seq` was delivered before (a server's stored
        positions say so): drop what is held below it and deliver what now follows."""
        if next_seq <= self.next_seq.get(producer, 0):
            return
        held = self.held.get(producer)
        if held:
            for seq in [s for s in held if s < next_seq]:
                self._release(held.pop(seq)[1])
                self.duplicates += 1
            self.held_since.pop(producer, None)
        self._advance(producer, next_seq, out)
        if self.held.get(producer):
            self.held_since[producer] = now   # a gap above the new position: wait anew

    def gaps(self) -> dict[int, float]:
        """Producers waiting for a missing seq, with when the wait began."""
        return dict(self.held_since)

    def skip_gap(self, producer: int, now: float, out: Out) -> None:
        """Give up the missing seqs before the producer's lowest held one."""
        held = self.held.get(producer)
        if not held:
            return
        lowest = min(held)
        self.skipped += lowest - self.next_seq.get(producer, 0)
        self.held_since.pop(producer, None)
        self._advance(producer, lowest, out)
        if producer in self.held:
            self.held_since[producer] = now   # a further gap: its wait starts now

    def commit_position(self, server: Hashable, read_position: int) -> int:
        offsets = self._held_offsets.get(server)
        if offsets:
            return min(min(offsets), read_position)
        return read_position
