"""FastReject's admission logic, the caller's retry budget and the failover policy, as pure
units driven by tables of events (no sockets, no clock)."""

from __future__ import annotations

import pytest

from kvsvr.rpc.admission import (
    Admission,
    RetryBudget,
    compound,
    lowered_level,
    raised_level,
    split,
    user_priority,
)
from kvsvr.rpc.failover import EXHAUSTED, OVERLOADED, SAMPLED, SHIELDED, Failover, eject_s
from kvsvr.rpc.limits import (
    ADMIT_ALL,
    EJECT_FIRST_S,
    EJECT_S_MAX,
    LEVEL_CACHE_S,
    PRIORITY_LEVELS,
    SAMPLE_EVERY,
    USER_PRIORITY_LEVELS,
)


def histogram(counts: dict[int, int]) -> list[int]:
    table = [0] * PRIORITY_LEVELS
    for priority, count in counts.items():
        table[priority] = count
    return table


@pytest.mark.parametrize("counts, level, shed, expected", [
    # 100 admitted over 10 priorities of 10: shedding 5% drops the last priority (10%).
    ({p: 10 for p in range(10)}, ADMIT_ALL, 0.05, 8),
    # shedding 25%: three priorities go (30% <= 25%? no: 20% kept 80 > 75, so 3 go: 70)
    ({p: 10 for p in range(10)}, ADMIT_ALL, 0.25, 6),
    # the arrivals above the level do not count as admitted
    ({0: 50, 1: 50, 5: 1000}, 1, 0.05, 0),
    # nothing admitted in the window: the level stays
    ({9: 10}, 5, 0.05, 5),
    # one priority only: shedding any of it refuses it all
    ({7: 100}, ADMIT_ALL, 0.05, 6),
    # the most important priority can be shed too: nothing admitted (-1)
    ({0: 100}, 0, 0.05, -1),
])
def test_lowered_level_sheds_about_the_fraction(counts: dict[int, int], level: int,
                                                shed: float, expected: int) -> None:
    assert lowered_level(histogram(counts), level, shed) == expected


@pytest.mark.parametrize("counts, level, expected", [
    # 1% more of 100 admitted is 101: the next priority with arrivals (3) is taken
    ({0: 100, 3: 5, 9: 50}, 0, 3),
    # nothing above the level arrived: admit everything
    ({0: 100}, 0, ADMIT_ALL),
    # from nothing admitted (-1): the first priority with arrivals
    ({4: 10, 6: 10}, -1, 4),
    # 1% of 1000 is 10: two priorities of 5 are needed
    ({0: 1000, 1: 5, 2: 5, 3: 5}, 0, 2),
])
def test_raised_level_admits_about_one_percent_more(counts: dict[int, int], level: int,
                                                    expected: int) -> None:
    assert raised_level(histogram(counts), level) == expected


def run_window(admission: Admission, arrivals: dict[int, int], queuing_ms: float,
               now: float) -> list[bool]:
    """Arrivals by priority; each admitted one starts after `queuing_ms`; then the window
    closes at `now`. Returns the admit decisions."""
    decisions = []
    for priority, count in sorted(arrivals.items()):
        for _ in range(count):
            admitted = admission.admit(priority)
            decisions.append(admitted)
            if admitted:
                admission.started(queuing_ms / 1000, now - 0.5)
    admission.tick(now)
    return decisions


def test_windows_move_the_level_down_when_queuing_and_up_when_calm() -> None:
    """A table of windows: queuing time and priority mix in, level and decisions out."""
    admission = Admission(queuing_ms_max=20, now=0.0)
    mix = {compound(b, u): 20 for b in (0, 1, 2) for u in (0, 64, 127)}   # 180 a window
    # window (average queuing ms, expected level after it)
    table = [
        (5, ADMIT_ALL),                     # calm: everything stays admitted
        (25, compound(2, 64)),              # 1.25x over: shed 6.25% -> the last priority
        (25, compound(2, 0)),               # still over: one more
        (10, compound(2, 64)),              # calm: 1% more -> the next priority back
        (10, compound(2, 127)),
        (10, ADMIT_ALL),                    # nothing above it arrives: admit everything
    ]
    def highest_admitted(level: int) -> int:
        """The level as the mix sees it (levels between two of its priorities are one)."""
        return level if level == ADMIT_ALL else max(p for p in mix if p <= level)

    before = ADMIT_ALL
    for index, (queuing_ms, expected) in enumerate(table, start=1):
        decisions = run_window(admission, mix, queuing_ms, float(index))
        assert highest_admitted(admission.level) == expected, (index, admission.last)
        assert decisions.count(False) == sum(c for p, c in mix.items() if p > before)
        before = admission.level
    # at three times capacity (a third of what was admitted ran, the rest was dropped for
    # its budget) one window sheds down to what ran, less 5%, not 5% at a time
    for priority, count in mix.items():
        for index in range(count):
            assert admission.admit(priority)
            admission.started(0.5, 6.5, ran=index % 3 == 0)
    admission.tick(7.0)
    admitted = sum(c for p, c in mix.items() if p <= admission.level)
    assert 60 * 0.95 - 20 <= admitted <= 60 * 0.95   # to the nearest priority (20 calls)
    # and the shed is at most SHED_FRACTION_MAX (80%) of what a window admitted
    admission = Admission(queuing_ms_max=20, now=0.0)
    for priority, count in mix.items():
        for _ in range(count):
            admission.admit(priority)
            admission.started(0.5, 0.5, ran=False)
    admission.tick(1.0)
    assert sum(c for p, c in mix.items() if p <= admission.level) >= 180 * 0.2 - 20


def test_samples_stand_for_the_calls_their_caller_dropped() -> None:
    """A caller that dropped calls above the level locally sends one in SAMPLE_EVERY as a
    sample of weight SAMPLE_EVERY: the calm window then plans its raise on the demand."""
    admission = Admission(queuing_ms_max=20, now=0.0)
    admission.level = compound(1, 127)
    for _ in range(100):
        admission.admit(compound(1, 0))
        admission.started(0.001, 0.1)
    assert not admission.admit(compound(2, 0), weight=16)    # refused, but counted as 16
    admission.tick(1.0)
    assert admission.level == compound(2, 0)               # 10% more than 100 admitted


def test_a_window_ends_after_its_request_count() -> None:
    admission = Admission(queuing_ms_max=20, window_requests_max=100, now=0.0)
    for _ in range(99):
        assert admission.started(0.050, 0.001) is None
    window = admission.started(0.050, 0.001)
    assert window is not None and window.overloaded and window.started == 100


def test_disabled_admission_refuses_nothing_but_still_measures() -> None:
    admission = Admission(queuing_ms_max=20, enabled=False, now=0.0)
    for second in range(1, 5):
        assert all(run_window(admission, {compound(5, 5): 100}, 100, float(second)))
    assert admission.last is not None and admission.last.overloaded


def test_user_priority_is_stable_within_an_hour_and_rotates() -> None:
    hour = 3600.0 * 500_000
    users = [f"user{i}" for i in range(500)]
    first = [user_priority(u, hour + 10) for u in users]
    assert first == [user_priority(u, hour + 3599) for u in users]
    assert all(0 <= p < USER_PRIORITY_LEVELS for p in first)
    assert len(set(first)) > 100                   # spread over the levels
    later = [user_priority(u, hour + 3600) for u in users]
    assert sum(a != b for a, b in zip(first, later, strict=True)) > 400
    assert split(compound(3, 77)) == (3, 77)


def test_retry_budget_allows_about_a_tenth_of_calls() -> None:
    budget = RetryBudget(ratio=0.1, tokens_max=10)
    assert sum(budget.spend() for _ in range(100)) == 10    # the saved burst
    retries = 0
    for _ in range(1000):
        budget.called()
        retries += budget.spend()
    assert 99 <= retries <= 100


A, B, C = "tcp://a:1", "tcp://b:1", "tcp://c:1"


def test_own_campus_first_then_the_others() -> None:
    failover = Failover([(A, "a"), (B, "b"), (C, "c")], campus="b")
    assert {failover.choose(0.0)[0].address for _ in range(5)} == {B}  # type: ignore[union-attr]
    chosen, _ = failover.choose(0.0, exclude=[B])
    assert chosen is not None and chosen.address in (A, C)


def test_consecutive_failures_eject_with_back_off_and_probe() -> None:
    failover = Failover([(A, "a"), (B, "a")], campus="a")
    # (event, address, now) -> state of A afterwards
    table = [
        ("failed", A, 0.0, "healthy"),
        ("failed", A, 0.1, "healthy"),
        ("succeeded", A, 0.2, "healthy"),      # a success resets the count
        ("failed", A, 0.3, "healthy"),
        ("failed", A, 0.4, "healthy"),
        ("failed", A, 0.5, "ejected"),         # third in a row
        ("failed", A, 0.6, "ejected"),         # same episode: the back-off does not grow
    ]
    for event, address, now, state in table:
        getattr(failover, event)(address, now)
        assert failover.state(A, now) == state, (event, now)
    for _ in range(4):                           # ejected: B only
        assert failover.choose(0.7)[0].address == B  # type: ignore[union-attr]
    due = 0.5 + EJECT_FIRST_S
    probe = None
    for _ in range(2):
        chosen, _ = failover.choose(due)
        if chosen is not None and chosen.address == A:
            probe = chosen
    assert probe is not None                     # the back-off ended: A is probed
    failover.sent(probe, due, 1.0)
    assert all(failover.choose(due + 0.1)[0].address == B for _ in range(4))  # type: ignore[union-attr]
    failover.failed(A, due + 1.0)                # the probe failed: twice as long
    assert failover.state(A, due + 1.0) == "ejected"
    assert failover.state(A, due + 1.0 + 2 * EJECT_FIRST_S) == "probe due"
    failover.succeeded(A, due + 2.5)
    assert failover.state(A, due + 2.5) == "healthy"
    assert eject_s(100) == EJECT_S_MAX


def test_every_instance_ejected_still_tries_the_one_back_soonest() -> None:
    failover = Failover([(A, "a"), (B, "b")])
    for now in (0.0, 0.1, 0.2):
        failover.failed(A, now)
    for now in (0.05, 0.15, 0.25):
        failover.failed(B, now)
    chosen, why = failover.choose(0.3)
    assert chosen is not None and chosen.address == A and why == ""


def test_shielded_campus_is_skipped_and_comes_back_on_release() -> None:
    failover = Failover([(A, "a"), (B, "b")], campus="a")
    failover.shield(frozenset({"a"}))
    assert all(failover.choose(0.0)[0].address == B for _ in range(4))  # type: ignore[union-attr]
    failover.shield(frozenset({"a", "b"}))
    assert failover.choose(0.0) == (None, SHIELDED)
    failover.shield(frozenset())
    assert failover.choose(0.0)[0].address == A  # type: ignore[union-attr]


def test_reported_level_drops_calls_locally_until_it_expires() -> None:
    failover = Failover([(A, "a")])
    low, high = compound(1, 0), compound(9, 0)
    failover.failed(A, 0.0, level=compound(5, 0))       # Overloaded, level 5/0
    assert failover.choose(0.1, low)[0] is not None
    assert failover.choose(0.1, high) == (None, OVERLOADED)
    # one refused call in SAMPLE_EVERY goes out anyway, as a sample
    outcomes = [failover.choose(0.1, high)[1] for _ in range(SAMPLE_EVERY * 3)]
    assert outcomes.count(SAMPLED) == 3 and outcomes.count(OVERLOADED) == 3 * SAMPLE_EVERY - 3
    assert failover.choose(LEVEL_CACHE_S + 0.01, high)[0] is not None   # asks again
    failover.succeeded(A, 2.0, level=ADMIT_ALL)
    assert failover.choose(2.0, high)[0] is not None
    assert failover.choose(2.0, exclude=[A]) == (None, EXHAUSTED)


def test_shielded_health_skips_shielded_replicas_unless_all_are() -> None:
    """The storage client's Health with shields (for it to adopt): a key's replicas in a
    shielded campus are skipped, all of them kept when every one is shielded."""
    from kvsvr.rpc.shield import ShieldedHealth

    health = ShieldedHealth({A: "a", B: "b", C: "c"})
    assert health.choose([A, B, C], 0.0) == (A, 0.0)
    health.shield(frozenset({"a"}))
    assert health.choose([A, B, C], 0.0) == (B, 0.0)
    health.shield(frozenset({"a", "b", "c"}))
    assert health.choose([A, B, C], 0.0) == (A, 0.0)
    health.shield(frozenset({"a"}))
    health.failed(B, 0.0)
    assert health.choose([A, B, C], 0.1) == (C, 0.1)
