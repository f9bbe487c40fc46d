"""The outbox both of the replica's networks (the ZeroMQ edge, the simulation's) answer from."""

from __future__ import annotations

from kvsvr.limits import FRAMES_PER_MESSAGE_MAX
from kvsvr.replica.network import Outbox


def test_answers_leave_packed_per_destination_in_order_and_only_once():
    """A round's answers to one destination go out as few messages, in the order they were
    made, each destination's apart; taking them empties the outbox."""
    outbox = Outbox()
    assert not outbox and outbox.take() == []
    outbox.add(b"client-a", b"1")
    outbox.add(b"client-b", b"x")
    outbox.add(b"client-a", b"2")
    assert outbox
    assert outbox.take() == [(b"client-a", b"12"), (b"client-b", b"x")]
    assert not outbox and outbox.take() == []


def test_more_answers_than_a_message_holds_take_several_messages():
    """Past FRAMES_PER_MESSAGE_MAX frames the answers to one destination are split, never
    a frame cut, nothing lost."""
    outbox = Outbox()
    frames = [b"%06d" % i for i in range(FRAMES_PER_MESSAGE_MAX + 3)]
    for frame in frames:
        outbox.add(b"peer", frame)
    taken = outbox.take()
    assert [identity for identity, _ in taken] == [b"peer", b"peer"]
    assert b"".join(message for _, message in taken) == b"".join(frames)
    assert len(taken[0][1]) == 6 * FRAMES_PER_MESSAGE_MAX
