"""The SVG charts: long ranges keep their spikes, missing seconds break the line."""

from __future__ import annotations

from kvsvr.monitor.charts import curve, downsample, sparkline


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
    assert curve([5, None, None, 7, 8], 1_700_000_000, title="x").count("<polyline") == 2
    assert "no data" in curve([None, None], 1_700_000_000, title="x")
    assert "<polyline" not in curve([None, None], 1_700_000_000, title="x")
