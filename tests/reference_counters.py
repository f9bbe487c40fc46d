"""A plain-Python model of the counters' bucket words in kvsvr/_counters.pxi, written from its
layout docstring, to run the same cases against the compiled core (STYLE 9): which second a
bucket holds, when a write claims it, when it is refused, and the exact 8-byte word left."""

from __future__ import annotations

VALUE_BITS = 44
STAMP_MODULUS = (1 << 20) - 1
VALUE_MAX = (1 << (VALUE_BITS - 1)) - 1
VALUE_MIN = -(1 << (VALUE_BITS - 1))


class LeftWindow(Exception):
    """The bucket holds a later second (add_at/set_at refuse)."""


class Overflow(Exception):
    """The second's value would leave the 44-bit range."""


def stamp(second: int, window_s: int) -> int:
    return (second // window_s) % STAMP_MODULUS + 1


def word(stamp_value: int, value: int) -> int:
    return (stamp_value << VALUE_BITS) | (value & ((1 << VALUE_BITS) - 1))


class Slot:
    """One id's buckets: bucket i holds (second, value) or None (never written)."""

    def __init__(self, window_s: int):
        self.window_s = window_s
        self.buckets: list[tuple[int, int] | None] = [None] * window_s

    def write(self, second: int, amount: int, *, is_set: bool, at_clock: bool) -> None:
        """add (is_set False) or set at `second`; `at_clock`: add()/set(), which claim a
        bucket even from a later second (the clock went back), where add_at/set_at refuse."""
        index = second % self.window_s
        held = self.buckets[index]
        if held is not None and held[0] == second:
            value = amount if is_set else held[1] + amount
        elif held is None or held[0] < second or at_clock:
            value = amount
        else:
            raise LeftWindow(second)
        if not VALUE_MIN <= value <= VALUE_MAX:
            raise Overflow(second)
        self.buckets[index] = (second, value)

    def value_at(self, second: int) -> int | None:
        held = self.buckets[second % self.window_s]
        return held[1] if held is not None and held[0] == second else None

    def words(self) -> list[int]:
        return [0 if held is None else word(stamp(held[0], self.window_s), held[1])
                for held in self.buckets]
