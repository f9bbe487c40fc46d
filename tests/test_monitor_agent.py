"""The agent's reading side: which seconds it ships, the gap when it was down longer than the
window, reports split to fit a frame, its durable cursor; and the [monitor] config checks."""

from __future__ import annotations

import pytest
import zmq

from kvsvr import _core
from kvsvr.config import parse
from kvsvr.errors import ConfigError
from kvsvr.monitor.agent import GRACE_S, CenterLink, build_reports, readable_span
from kvsvr.monitor.counters import open_counters
from kvsvr.monitor.registry import MonitorId, builtin_registry
from kvsvr.monitor.report import MAX_REPORT_BYTES, decode_report, encode_report

NOW = 1_700_000_100.5


@pytest.mark.parametrize(("cursor", "window", "expected"), [
    (0, 60, (1_700_000_100 - 60 + GRACE_S, 1_700_000_100 - GRACE_S, None)),
    (1_700_000_090, 60, (1_700_000_091, 1_700_000_098, None)),
    (1_700_000_098, 60, (1_700_000_099, 1_700_000_098, None)),        # nothing new yet
    (1_700_000_000, 60, (1_700_000_042, 1_700_000_098, (1_700_000_001, 1_700_000_041))),
])
def test_readable_span(cursor, window, expected):
    """From the second after the cursor to the newest complete one; what left the window
    since the cursor is a gap."""
    assert readable_span(cursor, NOW, window) == expected


def _counters(tmp_path, ids: int = 1024):
    registry = builtin_registry()
    for i in range(1000, ids + 1):
        registry.add(MonitorId(i, f"bench.id_{i}", "an id"))
    return open_counters(tmp_path / "counters", max_ids=ids, window_s=600, registry=registry)


def test_reports_carry_every_value_once_and_fit_a_frame(tmp_path):
    """600 seconds of 1,000 ids do not fit one frame: the reports split on second boundaries,
    cover the span without overlap, each encodes under the frame limit, and together they
    carry every value written."""
    counters = _counters(tmp_path, ids=2000)
    second = int(NOW)
    written = 0
    for s in range(second - 590, second - GRACE_S + 1):
        for i in range(1000, 2000):
            counters.add_at(i, s - i, s)
            written += 1
    reports = build_reports(counters, "m1", 0, NOW, [(1000, 1, "x.y", "d")])
    assert len(reports) > 1
    assert reports[0].catalog and not reports[1].catalog
    previous = reports[0].first_second - 1
    values = 0
    for report in reports:
        body = encode_report(report)
        assert len(body) <= MAX_REPORT_BYTES
        decoded = decode_report(body)
        assert decoded.first_second == previous + 1
        previous = decoded.through_second
        for s, block in decoded.blocks:
            assert _core.decode_block(block) == {i: s - i for i in range(1000, 2000)}
            values += len(block) // _core.VALUE_ENTRY_BYTES
    assert previous == second - GRACE_S
    assert values == written


def test_a_gap_is_reported_once_in_the_first_report(tmp_path):
    """An agent back after more than the window reports the seconds it lost as a gap."""
    counters = _counters(tmp_path)
    reports = build_reports(counters, "m1", int(NOW) - 2000, NOW, [])
    assert reports[0].gaps == [(int(NOW) - 1999, int(NOW) - 600 + GRACE_S - 1)]
    assert all(not r.gaps for r in reports[1:])


def test_the_cursor_survives_and_a_foreign_cursor_file_is_refused(tmp_path):
    """The cursor written after an ack is what a new agent process starts from; a cursor file
    of another center is an error, not a silent restart from zero."""
    context = zmq.Context()
    try:
        link = CenterLink(context, "tcp://127.0.0.1:1", tmp_path, "m1")
        assert link.cursor == 0
        link.save_cursor(1_700_000_123)
        assert CenterLink(context, "tcp://127.0.0.1:1", tmp_path, "m1").cursor == 1_700_000_123
        link.cursor_path.write_text("tcp://elsewhere:2 5\n")
        with pytest.raises(ConfigError, match="not a cursor file"):
            CenterLink(context, "tcp://127.0.0.1:1", tmp_path, "m1")
    finally:
        context.term()


GROUPS = """
[[groups]]
name = "g1"
shards = ["0-4095"]
[[groups.replicas]]
node = "n1"
campus = "a"
address = "tcp://127.0.0.1:7400"
data_dir = "d"
"""


@pytest.mark.parametrize(("monitor", "message"), [
    ("window_s = 100", "monitor.window_s: 100 s does not cover two agent periods"),
    ("window_s = 4", "window_s"),
    ("max_ids = 0", "max_ids"),
    ("max_ids = 100000", "max_ids"),
    ("agent_period_s = 0", "agent_period_s"),
    ('center = "http://x"', "monitor.center"),
    ('web = "no port"', "web"),
    ("colour = 1", "colour"),
])
def test_bad_monitor_config_is_refused_naming_the_field(monitor, message):
    """[monitor] is validated with the rest of the cluster config."""
    with pytest.raises(ConfigError, match=message):
        parse(GROUPS + "\n[monitor]\n" + monitor + "\n")


def test_monitor_config_defaults():
    """Without [monitor], monitoring is on with the per-machine default file."""
    config = parse(GROUPS)
    assert config.monitor.enabled and config.monitor.counters_path == ""
    assert config.monitor.window_s == 600 and config.monitor.agent_period_s == 60
