"""The linearizability checker: it accepts what is linearizable and, just as important,
rejects what is not (stale reads, lost or doubled increments, duplicate appends)."""

from __future__ import annotations

import random

from kvsvr.testing.linearizability import UNKNOWN, Op, check


def op(process, kind, argument, result, call, ret, key=b"k"):
    return Op(process, kind, key, argument, result, call, ret)


def test_concurrent_writes_and_reads_that_linearize():
    history = [
        op(1, "put", (b"a", None), ("ok", 1), 0, 10),
        op(2, "put", (b"b", None), ("ok", 2), 1, 9),
        op(3, "get", None, ("ok", (1, b"a")), 2, 3),       # between the two puts
        op(3, "get", None, ("ok", (2, b"b")), 11, 12),
    ]
    assert check(history) == (True, None)


def test_a_stale_read_is_caught():
    history = [
        op(1, "put", (b"a", None), ("ok", 1), 0, 1),
        op(1, "put", (b"b", None), ("ok", 2), 2, 3),
        op(2, "get", None, ("ok", (1, b"a")), 4, 5),       # the put of b finished before
    ]
    ok, problem = check(history)
    assert not ok and "key b'k'" in problem


def test_a_lost_increment_and_a_doubled_append_are_caught():
    lost = [op(1, "incr", 1, ("ok", 1), 0, 5), op(2, "incr", 1, ("ok", 1), 1, 6),
            op(3, "get", None, ("ok", (2, b"1")), 7, 8)]
    assert not check(lost)[0]
    doubled = [op(1, "append", b"m", ("ok", 0), 0, 2),
               op(2, "scan", None, ("ok", (b"m", b"m")), 3, 4)]
    assert not check(doubled)[0]


def test_a_timed_out_write_may_or_may_not_have_happened():
    applied = [op(1, "put", (b"a", None), UNKNOWN, 0, float("inf")),
               op(2, "get", None, ("ok", (1, b"a")), 5, 6)]
    not_applied = [op(1, "put", (b"a", None), UNKNOWN, 0, float("inf")),
                   op(2, "get", None, ("not_found", 0), 5, 6)]
    assert check(applied)[0] and check(not_applied)[0]
    # ... but not before it was called
    early = [op(2, "get", None, ("ok", (1, b"a")), 0, 1),
             op(1, "put", (b"a", None), UNKNOWN, 2, float("inf"))]
    assert not check(early)[0]


def test_compare_and_set_conflicts_are_part_of_the_model():
    history = [op(1, "put", (b"a", 0), ("ok", 1), 0, 1),
               op(2, "put", (b"b", 0), ("conflict", 1), 2, 3),
               op(3, "put", (b"c", 1), ("ok", 2), 4, 5)]
    assert check(history)[0]
    wrong = [op(1, "put", (b"a", 0), ("ok", 1), 0, 1),
             op(2, "put", (b"b", 0), ("ok", 2), 2, 3)]
    assert not check(wrong)[0]


def test_keys_are_checked_separately_and_a_long_history_is_fast():
    rng = random.Random(5)
    history, now = [], 0.0
    values = {b"x": (0, None), b"y": (0, None)}
    for i in range(600):   # a sequential run, with overlaps added by stretching intervals
        key = rng.choice([b"x", b"y"])
        version, value = values[key]
        if rng.random() < 0.5:
            new = f"v{i}".encode()
            values[key] = (version + 1, new)
            history.append(Op(i % 8, "put", key, (new, None), ("ok", version + 1), now,
                              now + 1.5))
        else:
            result = ("ok", (version, value)) if value is not None else ("not_found", version)
            history.append(Op(i % 8, "get", key, None, result, now - 0.4, now + 0.4))
        now += 1.0
    assert check(history) == (True, None)
