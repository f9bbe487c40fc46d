"""The queue's pure logic: quorum arithmetic tables and per-producer ordering."""

from __future__ import annotations

import random

import pytest

from quorumq import quorum
from quorumq.ordering import ProducerOrder


@pytest.mark.parametrize("acks, failures, outcome", [
    (0, 0, quorum.PENDING), (1, 0, quorum.PENDING), (2, 0, quorum.COMMITTED),
    (3, 0, quorum.COMMITTED), (1, 1, quorum.PENDING), (2, 1, quorum.COMMITTED),
    (0, 1, quorum.PENDING), (0, 2, quorum.FAILED), (1, 2, quorum.FAILED),
])
def test_batch_outcome(acks, failures, outcome):
    """A batch commits with 2 acknowledgements of 3 and fails once 2 are out of reach."""
    assert quorum.batch_outcome(acks, failures) == outcome


@pytest.mark.parametrize("current, backoff_until, now, picked", [
    (0, (0.0, 0.0), 5.0, 0),            # no back-off: stay
    (0, (9.0, 0.0), 5.0, 1),            # current backs off: the next one
    (1, (0.0, 9.0), 5.0, 0),            # ... wrapping around
    (0, (9.0, 7.0), 5.0, 1),            # every group backs off: the one that ends first
    (2, (9.0, 9.0, 8.0), 5.0, 2),
])
def test_pick_group(current, backoff_until, now, picked):
    assert quorum.pick_group(current, backoff_until, now) == picked


@pytest.mark.parametrize("picked, backoff_until, reachable, connecting, chosen", [
    (0, (0.0, 0.0), (True, True), False, 0),
    (0, (0.0, 0.0), (False, True), False, 1),            # move to a group that can take it
    (0, (9.0, 9.0), (False, False), False, quorum.NO_GROUP),   # nobody: fail fast
    (0, (0.0,), (False,), True, quorum.WAIT_CONNECTING),       # sockets may still connect
    (0, (0.0, 0.0), (False, True), True, quorum.WAIT_CONNECTING),
    (0, (9.0, 9.0, 7.0), (False, True, True), False, 2),  # the one out of back-off first
    (1, (9.0, 9.0, 9.0, 9.0), (True, False, True, True), False, 2),   # nearest after picked
])
def test_choose_group(picked, backoff_until, reachable, connecting, chosen):
    """A batch goes where 2 servers are connected; none such: NO_GROUP (Unavailable at
    once) unless the producer's sockets may still be connecting."""
    assert quorum.choose_group(picked, backoff_until, reachable, 5.0, connecting) == chosen


@pytest.mark.parametrize("up, whole, chosen, safe", [
    ((True, True, True), (True, True, True), [0, 1], True),
    ((False, True, True), (True, True, True), [1, 2], True),
    ((True, True, True), (True, False, True), [0, 2], True),
    ((True, True, True), (False, False, True), [0, 1, 2], True),    # read all three
    ((True, True, False), (True, False, True), [0, 1], False),     # new disk + one down
    ((True, False, False), (True, True, True), [0], False),
    ((False, False, False), (True, True, True), [], False),
])
def test_read_set(up, whole, chosen, safe):
    """Two whole servers suffice; a new incarnation only counts when all three are read."""
    assert quorum.read_set(up, whole) == (chosen, safe)


@pytest.mark.parametrize("positions, cutoffs, whole", [
    ((10, 20), (10, 20), True),
    ((11, 25), (10, 20), True),
    ((9, 20), (10, 20), False),
    ((None, 20), (10, 20), False),     # a server down: cannot vouch
    ((10, 20), (10, None), False),     # a cutoff time not yet passed there
])
def test_whole_again(positions, cutoffs, whole):
    """A new incarnation is whole once every other server was consumed past its cutoff."""
    assert quorum.whole_again(positions, cutoffs) is whole


def test_gap_skip_needs_every_group_read_after_the_margin():
    """A gap is given up only after fetches sent past held_since + margin reached the end."""
    assert quorum.gap_may_be_skipped(10.0, 2.0, [12.5, 13.0])
    assert not quorum.gap_may_be_skipped(10.0, 2.0, [12.5, 11.9])
    assert not quorum.gap_may_be_skipped(10.0, 2.0, [12.5, None])
    assert not quorum.gap_may_be_skipped(10.0, 2.0, [])


def _deliver(order, server, messages, out):
    for m in messages:
        order.offer(server, m, 0.0, out)


def _msg(offset, producer, seq):
    return (offset, producer, seq, 0, f"{producer}:{seq}".encode())


def test_two_servers_merge_in_order_without_duplicates():
    """Copies from two servers, each missing different messages, give each message once,
    in seq order, and the held ones block their server's commit position."""
    order = ProducerOrder()
    out: list = []
    # Server A missed seq 1 (it was down); server B has everything but is behind.
    _deliver(order, "A", [_msg(0, 5, 0), _msg(1, 5, 2), _msg(2, 5, 3)], out)
    assert [m[2] for _, m in out] == [0]
    assert order.commit_position("A", 3) == 1       # seq 2 at offset 1 is held
    _deliver(order, "B", [_msg(0, 5, 0), _msg(1, 5, 1)], out)
    assert [m[2] for _, m in out] == [0, 1, 2, 3]
    assert order.commit_position("A", 3) == 3
    _deliver(order, "B", [_msg(2, 5, 2), _msg(3, 5, 3)], out)
    assert len(out) == 4 and order.duplicates == 3


def test_random_interleavings_deliver_each_message_once_in_order():
    """Any interleaving of three servers' logs (each a subsequence of the producers'
    sends, together holding everything) delivers every message exactly once in order."""
    rng = random.Random(7)
    for _round in range(200):
        sends = [(p, s) for p in (1, 2) for s in range(30)]
        rng.shuffle(sends)
        sends.sort(key=lambda ps: ps[1])   # each producer's own sends stay in seq order
        logs = {name: [] for name in "ABC"}
        for p, s in sends:
            holders = rng.sample("ABC", 2)
            for name in "ABC":
                if name in holders or rng.random() < 0.3:
                    logs[name].append((len(logs[name]), p, s, 0, b""))
        order = ProducerOrder()
        out: list = []
        cursors = dict.fromkeys("ABC", 0)
        while any(cursors[n] < len(logs[n]) for n in "ABC"):
            name = rng.choice([n for n in "ABC" if cursors[n] < len(logs[n])])
            order.offer(name, logs[name][cursors[name]], 0.0, out)
            cursors[name] += 1
        for p in (1, 2):
            assert [m[2] for _, m in out if m[1] == p] == list(range(30))
        assert order.held_count == 0


def test_skip_gap_delivers_what_was_held():
    """Giving up a gap delivers the held messages after it, and a new gap waits again."""
    order = ProducerOrder({9: 3})
    out: list = []
    _deliver(order, "A", [_msg(0, 9, 5), _msg(1, 9, 6), _msg(2, 9, 9)], out)
    assert out == [] and order.gaps() == {9: 0.0}
    order.skip_gap(9, 4.0, out)
    assert [m[2] for _, m in out] == [5, 6] and order.gaps() == {9: 4.0}
    assert order.skipped == 2 and order.next_seq[9] == 7


def test_raise_to_releases_what_is_held():
    """A late-loaded server's position (next seq 6) drops the held copy below it as a
    duplicate, delivers what now follows in order, and the gap above it waits anew."""
    order = ProducerOrder({9: 3})
    out: list = []
    _deliver(order, "A", [_msg(0, 9, 5), _msg(1, 9, 6), _msg(2, 9, 9)], out)
    order.raise_to(9, 6, 7.0, out)
    assert [m[2] for _, m in out] == [6]
    assert order.next_seq[9] == 7 and order.gaps() == {9: 7.0}
    assert order.held_count == 1 and order.skipped == 0
    assert order.commit_position("A", 3) == 2   # only seq 9 is still held, at offset 2
    order.raise_to(9, 4, 8.0, out)               # lower than where it is: nothing changes
    assert order.next_seq[9] == 7 and len(out) == 1
