"""The SVG charts: long ranges keep their spikes, missing seconds break the line, a lone
second is a dot, and a counter's covered second without a value is drawn as 0."""

from __future__ import annotations

import pytest

from kvsvr.monitor.charts import curve, downsample, fill_covered, sparkline


def test_long_curves_keep_each_spike():
    """A day of seconds is drawn as at most 3,600 points, each the maximum of its run, so a
    single-second spike is still on the curve; short ranges keep every second."""
    day = [0] * 86_400
    day[50_000] = 99
    points, step = downsample(day)
    assert step == 24 and len(points) == 3_600 and max(points) == 99
    assert downsample([1, None, 3]) == ([1, None, 3], 1)
    assert downsample([None] * 10, 5) == ([None] * 5, 2)
    assert "max of each 24 s" in curve(day, 1_700_000_000, title="t")


def test_missing_seconds_break_the_line_and_no_data_says_so():
    """Each run of present values is its own polyline; an empty series says "no data"."""
    assert sparkline([1, 2, None, 3, 4]).count("<polyline") == 2
    drawn = curve([5, None, None, 7, 8], 1_700_000_000, title="x")
    assert drawn.count("<polyline") == 1 and drawn.count("<circle") == 1
    assert "no data" in curve([None, None], 1_700_000_000, title="x")
    assert "<polyline" not in curve([None, None], 1_700_000_000, title="x")


def test_a_lone_second_is_drawn_as_a_dot():
    """A value with no neighbour (a sparse counter's one event) is a circle, not an invisible
    one-point polyline."""
    for drawn in (curve([None, 4, None], 1_700_000_000, title="x"), sparkline([None, 4, None])):
        assert drawn.count("<circle") == 1 and "<polyline" not in drawn


B = 1_700_000_000


@pytest.mark.parametrize(("values", "covered", "gaps", "counter", "expected"), [
    # A counter: covered seconds without a value are 0; uncovered ones unknown.
    ([None, 3, None, None, None], (B, B + 3), [], True, [0, 3, 0, 0, None]),
    ([None, 3, None, None, None], (B + 1, B + 4), [], True, [None, 3, 0, 0, 0]),
    # A gap (seconds lost) is unknown, not 0.
    ([1, None, None, 1], (B, B + 3), [(B + 1, B + 2)], True, [1, None, None, 1]),
    # A gauge is only what was set.
    ([None, 3, None], (B, B + 2), [], False, [None, 3, None]),
    # Nothing covered (the sum before any machine is complete): nothing drawn.
    ([5, 6], (B, B - 1), [], True, [None, None]),
])
def test_fill_covered(values, covered, gaps, counter, expected):
    """What a curve draws from stored values, the scope's covered span and its gaps."""
    assert fill_covered(values, B, *covered, gaps, counter=counter) == expected


def test_a_sparse_counter_is_drawn_as_a_line_of_zeros_with_its_events():
    """One event in 300 covered seconds: before the fix only an invisible single point was
    drawn; now a line along 0 with the event on it."""
    values = [None] * 300
    values[150] = 1
    drawn = curve(fill_covered(values, B, B, B + 299, counter=True), B, title="x")
    assert drawn.count("<polyline") == 1 and "no data" not in drawn
    assert len(drawn.split('points="', 1)[1].split('"', 1)[0].split()) == 300


def test_gaps_are_shaded():
    """A lost span is drawn as a shaded band (with its seconds in a tooltip)."""
    drawn = curve([1, None, None, 1], B, title="x", gaps=[(B + 1, B + 2)])
    assert drawn.count('class="gap"') == 1 and f"seconds {B + 1}..{B + 2} lost" in drawn
