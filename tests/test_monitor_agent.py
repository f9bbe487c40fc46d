"""The agent's reading side: which seconds it ships, the gap when it was down longer than the
window, reports split to fit a frame, the catalog split to fit reports, its durable cursor,
the rewind after a clock step; a real agent process against a center answering malformed
acks and refusals, started before the counters file exists; and the [monitor] config
checks."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from kvsvr import _core, protocol
from kvsvr.config import parse
from kvsvr.errors import ConfigError, InvalidArgument
from kvsvr.launcher import free_port
from kvsvr.monitor.agent import (
    GRACE_S,
    CenterLink,
    build_reports,
    readable_span,
    rewound_cursor,
    split_catalog,
)
from kvsvr.monitor.counters import open_counters
from kvsvr.monitor.registry import MonitorId, builtin_registry, load_registry
from kvsvr.monitor.report import (
    META_BYTES_MAX,
    REPORT_BYTES_MAX,
    Report,
    decode_report,
    encode_report,
)

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


def test_a_new_file_is_shipped_from_its_creation():
    """A file made 5 s ago is shipped from then, not from the start of its window (those
    seconds were never counted; shipped as empty they made absent rules fire at start)."""
    created = int(NOW) - 5
    assert readable_span(0, NOW, 60, created) == (created, int(NOW) - GRACE_S, None)
    assert readable_span(0, NOW, 60, int(NOW) - 500)[0] == int(NOW) - 60 + GRACE_S
    assert readable_span(0, NOW, 60, int(NOW) + 30)[0] == int(NOW) - 60 + GRACE_S  # clock
    assert readable_span(1_700_000_090, NOW, 60, int(NOW))[0] == 1_700_000_091  # has cursor


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
        assert len(body) <= REPORT_BYTES_MAX
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
    ('web = "127.0.0.1:99999"', "monitor.web: '127.0.0.1:99999': port out of range"),
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


def _big_catalog(count: int) -> list[tuple[int, int, str, str]]:
    """`count` legal entries of the longest names and descriptions."""
    return [(1000 + i, 1, f"app.{i:06d}." + "n" * 53, "d" * 256) for i in range(count)]


def test_a_catalog_over_the_meta_limit_ships_in_parts(tmp_path):
    """4,000 legal entries of maximal size (well over a report's 1 MiB meta) used to crash
    the agent: now they go in parts, one per report, each report encodes, and together they
    carry every entry once."""
    catalog = _big_catalog(4000)
    parts = split_catalog(catalog)
    assert len(parts) >= 2 and [e for p in parts for e in p] == catalog
    counters = _counters(tmp_path)
    second = int(NOW)
    for s in range(second - 30, second):
        counters.add_at(1, 1, s)
    reports = build_reports(counters, "m1", second - 31, NOW, catalog)
    assert len(reports) >= len(parts)
    shipped = []
    for report in reports:
        body = encode_report(report)
        assert len(body) <= REPORT_BYTES_MAX
        shipped.extend(decode_report(body).catalog)
    assert shipped == catalog
    assert all(len(msgspec.msgpack.encode(p)) < META_BYTES_MAX for p in parts)


@pytest.mark.parametrize(("cursor", "now", "expected"), [
    (1_700_000_050, 1_700_000_100.5, None),                  # clock ahead of the cursor
    (1_700_000_098, 1_700_000_100.5, None),
    (1_700_000_200, 1_700_000_100.5, 1_700_000_100 - 20 - GRACE_S - 1),   # stepped back
    (1_700_009_000, 1_700_000_100.5, 1_700_000_100 - 20 - GRACE_S - 1),
])
def test_a_clock_step_back_rewinds_the_cursor(cursor, now, expected):
    """When the newest complete second is behind the cursor the clock went back: resend from
    two periods (10 s here) before now, never before the window."""
    assert rewound_cursor(cursor, now, 10, 60) == expected
    assert rewound_cursor(1_700_000_200, 1_700_000_100.5, 100, 60) == \
        1_700_000_100 - 60 + GRACE_S - 1


def test_after_a_rewind_the_merged_seconds_are_shipped_again(tmp_path):
    """Seconds shipped, then counted into again after a clock step back: the rewound cursor
    makes the agent read and send them again with their full values."""
    counters = _counters(tmp_path)
    second = int(NOW)
    counters.add_at(1, 5, second - 5)
    first_round = build_reports(counters, "m1", second - 10, NOW, [])
    assert first_round[-1].through_second == second - GRACE_S
    counters.add_at(1, 2, second - 5)         # counted again after the step back
    cursor = rewound_cursor(second + 30, NOW, 5, counters.window_s)
    assert cursor is not None
    blocks = dict(b for r in build_reports(counters, "m1", cursor, NOW, []) for b in r.blocks)
    assert _core.decode_block(blocks[second - 5]) == {1: 7}


class FakeCenter:
    """A ROUTER socket in a thread that answers reports by a script, recording them."""

    def __init__(self, script: list[str]):
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.script = script
        self.reports: list[Report] = []
        self.answers: list[str] = []
        self.stopping = False
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.bind(self.address)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            if not self.socket.poll(100):
                continue
            peer, payload = self.socket.recv_multipart()
            frames, _, _ = _core.decode_frames(payload)
            for _kind, _method, request_id, _budget, body in frames:
                report = decode_report(body)
                self.reports.append(report)
                step = self.script.pop(0) if self.script else "ack"
                self.answers.append(step)
                if step == "garbage-ack":
                    status, answer = 0, b"\xc1"
                elif step == "ack-with-more":
                    status, answer = 0, msgspec.msgpack.encode(
                        {"through": report.through_second, "newer_field": [1, 2]})
                elif step == "refuse":
                    status, answer = InvalidArgument.code, protocol.encode_error(
                        InvalidArgument("report: blocks[0]: refused by the test"))
                else:
                    status, answer = 0, msgspec.msgpack.encode(
                        {"through": report.through_second})
                self.socket.send_multipart([peer, _core.encode_frame(
                    _core.FRAME_RESPONSE, status, request_id, 0, answer)])

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.socket.close(0)
        self.context.term()


def _wait(what: str, predicate: Any, log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


def test_a_real_agent_survives_bad_acks_and_refusals_and_waits_for_its_file(tmp_path):
    """kvsvr-agent started before the counters file exists waits (and says so) without
    creating it; once a counting process creates it (with its own sizing) the agent ships a
    catalog over the meta limit in parts to a center that answers an unreadable ack, then an
    ack with a field it does not know, then refuses a report as invalid: the agent stays up,
    retries the first, skips the refused one and reports its seconds as a gap, and every
    catalog entry arrives."""
    catalog = _big_catalog(4000)
    registry_path = tmp_path / "registry.toml"
    registry_path.write_text("".join(
        f'[[ids]]\nid = {i}\nname = "{name}"\ndescription = "{description}"\n\n'
        for i, _, name, description in catalog))
    counters_path = tmp_path / "counters"
    center = FakeCenter(["garbage-ack", "ack-with-more", "refuse"])
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "kvsvr.monitor.agent", "--center", center.address,
             "--counters", str(counters_path), "--machine", "m1", "--period", "1",
             "--state-dir", str(tmp_path / "state"), "--registry", str(registry_path)],
            stdout=out, stderr=out)
    try:
        _wait("the agent to say it waits", lambda: "waiting for a node" in log.read_text(),
              log)
        time.sleep(0.5)
        assert not counters_path.exists() and agent.poll() is None
        counters = open_counters(counters_path, max_ids=8192, window_s=60,
                                 registry=load_registry([registry_path]))
        for s in range(counters.now_s() - 50, counters.now_s() + 1):
            counters.add_at(1000, 1, s)
        _wait("every catalog entry to arrive",
              lambda: {e for r in center.reports for e in r.catalog} >= set(catalog)
              and len(center.reports) >= 5, log)
        assert agent.poll() is None, log.read_text()
    finally:
        agent.terminate()
        agent.wait(10)
        center.close()
    reports, answers = center.reports, center.answers
    assert answers[:3] == ["garbage-ack", "ack-with-more", "refuse"]
    # Resent after the unreadable ack (its first second may have left the window since).
    assert reports[1].first_second <= reports[0].first_second + 2
    assert [b for b in reports[0].blocks if b[0] >= reports[1].first_second] == \
        [b for b in reports[1].blocks if b[0] <= reports[0].through_second]
    refused = reports[2]
    later_gaps = [g for r in reports[3:] for g in r.gaps]
    assert (refused.first_second, refused.through_second) in later_gaps
    text = log.read_text()
    assert "unreadable ack" in text and "REFUSED the report" in text
    assert "Traceback" not in text


@pytest.mark.parametrize("period", ["0", "-1", "nan", "x", "3601"])
def test_a_bad_period_is_refused_at_once_naming_it(tmp_path, period):
    """--period 0 was taken as "not given" (the config's period was used) and any other
    bad one was refused only once the counters file appeared; now at once, exit 2."""
    result = subprocess.run(
        [sys.executable, "-m", "kvsvr.monitor.agent", "--center", "tcp://127.0.0.1:9",
         "--counters", str(tmp_path / "absent"), "--period", period,
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--period" in result.stderr, result.stderr
    assert "1..3600" in result.stderr
