"""A real kvsvr-monitor process against hostile input: reports whose values or sums break the
bounds, future-dated reports, bad catalog entries, bad HTTP queries and bad web addresses all
get a clear answer (400/404, InvalidArgument naming the field, a config error), store nothing
wrong and never stop the center. Plus the center's logic in process: an unexpected failure is
answered Internal, a failing task stops the process, removed rules' alerts clear."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from kvsvr import _core
from kvsvr.errors import Internal, InvalidArgument, Unavailable
from kvsvr.launcher import free_port
from kvsvr.monitor.center import CLOCK_SKEW_S_MAX, Center, watch_task
from kvsvr.monitor.registry import load_registry
from kvsvr.monitor.report import METHOD_REPORT, Report, encode_report
from kvsvr.monitor.rules import parse_rules
from kvsvr.monitor.series import SeriesStore

REGISTRY = """
[[ids]]
id = 1000
name = "test.hits"
description = "hits"
"""


class CenterProcess:
    def __init__(self, directory: Path):
        self.directory = directory
        (directory / "registry.toml").write_text(REGISTRY)
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.web_port = free_port()
        self.log = directory / "center.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kvsvr.monitor.center", "--listen", self.address,
                 "--web", f"127.0.0.1:{self.web_port}", "--data-dir", str(directory / "data"),
                 "--registry", str(directory / "registry.toml"), "--no-sync"],
                stdout=log, stderr=log)
        self.context = zmq.Context()
        deadline = time.monotonic() + 30
        while True:
            try:
                self.http("/api/machines")
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise AssertionError(
                        f"the center did not start:\n{self.log.read_text()}") from None
                time.sleep(0.2)

    def send(self, body: bytes) -> tuple[int, Any]:
        """One report frame; (status, decoded answer body). Fails if there is no answer."""
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.address)
        try:
            socket.send(_core.encode_frame(_core.FRAME_REQUEST, METHOD_REPORT, 7, 0, body))
            assert socket.poll(5000), f"no answer from the center:\n{self.log.read_text()}"
            _, status, _, _, answer = _core.decode_frame(socket.recv())
            return status, msgspec.msgpack.decode(answer)
        finally:
            socket.close()

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}{path}",
                                        timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.context.term()


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CenterProcess]:
    process = CenterProcess(tmp_path_factory.mktemp("center"))
    try:
        yield process
    finally:
        process.stop()


def _report(machine: str, second: int, pairs: list[tuple[int, int]], **extra: Any) -> bytes:
    return encode_report(Report(machine, second, second,
                                [(second, _core.encode_block(pairs))], **extra))


def _good_report_is_still_acked(center: CenterProcess, machine: str) -> None:
    second = int(time.time()) - 5
    status, answer = center.send(_report(machine, second, [(1000, 1)]))
    assert status == 0 and answer == {"through": second}
    assert center.process.poll() is None


def test_values_past_the_counters_range_are_refused_and_the_center_goes_on(center):
    """Two machines each sending 2**62 for one id used to overflow the sum and end the
    ingest task silently: now each value beyond the counters' +-2**43 is refused naming the
    entry, nothing is stored, and the next good report is acked."""
    second = int(time.time()) - 10
    for machine in ("big-a", "big-b"):
        status, answer = center.send(_report(machine, second, [(1000, 2**62 + 5)]))
        assert status == InvalidArgument.code
        assert "entry 0 (id 1000): value 4611686018427387909 is outside" in answer[0]
    _good_report_is_still_acked(center, "after-big")
    _, machines = center.http("/api/machines")
    assert not {"big-a", "big-b"} & set(json.loads(machines)["machines"])


def test_a_future_dated_report_is_refused_naming_the_skew(center):
    """A report covering seconds more than CLOCK_SKEW_S_MAX past the center's clock is
    refused (Unavailable: the agent retries) naming through_second; the views keep ending at
    the center's now."""
    future = int(time.time()) + CLOCK_SKEW_S_MAX + 3600
    status, answer = center.send(_report("ahead", future, [(1000, 7)]))
    assert status == Unavailable.code
    assert "report.through_second" in answer[0] and "ahead of the center's clock" in answer[0]
    _good_report_is_still_acked(center, "on-time")
    _, body = center.http("/api/series?id=1000&range=60")
    series = json.loads(body)
    assert series["first_second"] + len(series["values"]) - 1 <= time.time()
    assert "ahead" not in json.loads(center.http("/api/machines")[1])["machines"]


def test_catalog_entries_are_validated_and_the_centers_registry_wins(center):
    """An agent's catalog entry with a bad name, or one renaming an id the center's registry
    defines, is not taken (logged); the values still are; a good new entry is taken."""
    second = int(time.time()) - 5
    catalog = [(1000, 1, "evil.rename", "not the registry's"),
               (2000, 1, "<script>x", "bad name"),
               (2001, 1, "app.fine", "a good entry")]
    status, _ = center.send(_report("cataloged", second, [(1000, 3), (2000, 4), (2001, 5)],
                                    catalog=catalog))
    assert status == 0
    ids = {entry["id"]: entry["name"]
           for entry in json.loads(center.http("/api/ids")[1])["ids"]}
    assert ids[1000] == "test.hits" and ids[2001] == "app.fine"
    assert ids.get(2000, "id.2000") == "id.2000"
    log = center.log.read_text()
    assert "catalog entry of id 2000 from cataloged not taken: name" in log
    assert "catalog entry of id 1000 from cataloged not taken: the center's registry" in log


@pytest.mark.parametrize(("path", "status", "says"), [
    ("/id/99999999999", 404, "is not a known id"),
    ("/id/%C2%B2", 404, "is not a known id"),
    ("/id/70000", 404, "is not a known id"),
    ("/id/no.such.name", 404, "is not a known id"),
    ("/api/series?id=99999999999", 404, "is not a known id"),
    ("/api/series?id=%C2%B2", 404, "is not a known id"),
    ("/api/series", 400, "id: missing"),
    ("/api/series?id=1000&range=%C2%B2", 400, "range:"),
    ("/api/series?id=1000&range=5", 400, "range:"),
    ("/api/series?id=1000&end=abc", 400, "end:"),
    ("/api/series?id=1000&end=99999999999", 400, "end:"),
    ("/api/series?id=1000&machine=nobody", 404, "machine:"),
    ("/id/1000?range=%C2%B2", 400, "range:"),
    ("/api/chart", 400, "id: missing"),
    ("/api/chart?id=99999999999", 404, "is not a known id"),
    ("/api/chart?id=1000&range=5", 400, "range:"),
    ("/api/chart?id=1000&end=abc", 400, "end:"),
])
def test_bad_http_queries_get_400_or_404_with_the_reason(center, path, status, says):
    """Malformed parameters are 400 naming the parameter; unknown ids and machines are 404;
    none of them is a 500, and the center keeps serving."""
    answer_status, body = center.http(path)
    assert (answer_status, says in body) == (status, True), body
    assert center.http("/api/machines")[0] == 200


def test_end_reaches_older_data(center):
    """end= moves the view back in time: values there are returned, the curve page too."""
    second = int(time.time()) - 200
    assert center.send(_report("old", second, [(1000, 42)]))[0] == 0
    _, body = center.http(f"/api/series?id=1000&range=10&end={second + 5}&machine=old")
    series = json.loads(body)
    assert series["first_second"] == second - 4 and series["values"][4] == 42
    status, page = center.http(f"/id/1000?range=60&end={second + 5}")
    assert status == 200 and "earlier" in page


@pytest.mark.parametrize("web", ["127.0.0.1:99999", "nonsense", "127.0.0.1:0"])
def test_a_bad_web_address_is_a_config_error(tmp_path, web):
    """--web with a port out of range or no port: exit 2 naming --web, no traceback."""
    done = subprocess.run([sys.executable, "-m", "kvsvr.monitor.center", "--web", web,
                           "--data-dir", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "config error: --web:" in done.stderr and "Traceback" not in done.stderr


def test_an_unexpected_failure_is_answered_internal_not_raised(tmp_path):
    """A storage failure while storing a report (here: the LMDB environment is gone) is
    logged and answered Internal; handle() returns normally, so the ingest loop goes on."""
    store = SeriesStore(tmp_path / "data", sync=False)
    center = Center(store, [], load_registry())
    store.env.close()
    body = _report("m1", int(time.time()) - 5, [(1000, 1)])
    (answer,) = center.handle(_core.encode_frame(_core.FRAME_REQUEST, METHOD_REPORT, 3, 0,
                                                 body), time.time())
    _, status, request_id, _, reply = _core.decode_frame(answer)
    assert (status, request_id) == (Internal.code, 3)
    assert "failed to store the report" in msgspec.msgpack.decode(reply)[0]
    assert center.counters["internal_errors"] == 1


def test_a_task_that_ends_stops_the_center():
    """watch_task: a task that fails (or returns) sets the stop event and records why; a
    cancelled one (shutdown) does not."""
    async def run() -> tuple[bool, list[str], bool]:
        stop = asyncio.Event()
        failed: list[str] = []

        async def boom() -> None:
            raise RuntimeError("boom")

        task = asyncio.create_task(boom(), name="ingest")
        task.add_done_callback(lambda t: watch_task(t, stop, failed))
        await asyncio.sleep(0.01)
        quiet_stop = asyncio.Event()
        sleeper = asyncio.create_task(asyncio.sleep(10), name="rules")
        sleeper.add_done_callback(lambda t: watch_task(t, quiet_stop, []))
        sleeper.cancel()
        await asyncio.sleep(0.01)
        return stop.is_set(), failed, quiet_stop.is_set()

    stopped, failed, cancelled_stops = asyncio.run(run())
    assert stopped and failed == ["ingest: RuntimeError: boom"] and not cancelled_stops


def test_alerts_of_removed_rules_clear_at_startup(tmp_path):
    """A rule firing when the center stopped, then removed from the config: at the next
    start its alert is cleared (history says why) instead of firing forever."""
    registry = load_registry([_write(tmp_path / "registry.toml", REGISTRY)])
    rules = parse_rules('[[rules]]\nname = "gone"\nid = "test.hits"\nkind = "absent"\n'
                        'scope = "sum"\nfor_s = 5\n', registry)
    store = SeriesStore(tmp_path / "data", sync=False)
    Center(store, rules, registry).evaluate_rules(time.time())
    assert set(store.firing()) == {("gone", "")}
    center = Center(store, [], registry)
    assert center.firing == {} and store.firing() == {}
    assert store.alerts(1)[0].message == "gone: the rule is no longer configured"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _metric(center: CenterProcess, name: str, machine: str) -> float | None:
    status, text = center.http("/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + "{") and f'machine="{machine}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_totals_count_each_second_once(center):
    """A counter's /metrics total adds each second a machine reports once: a resent report
    (the agent's retry after a lost ack) adds nothing, the next seconds add theirs, and the
    campus a report carries becomes the machine's label."""
    second = int(time.time()) - 100
    machine = "totals"
    assert center.send(_report(machine, second, [(1000, 5)], campus="c9"))[0] == 0
    assert _metric(center, "kvsvr_test_hits_total", machine) == 5
    assert center.send(_report(machine, second, [(1000, 5)], campus="c9"))[0] == 0
    assert _metric(center, "kvsvr_test_hits_total", machine) == 5
    assert center.send(_report(machine, second + 1, [(1000, 7)], campus="c9"))[0] == 0
    assert _metric(center, "kvsvr_test_hits_total", machine) == 12
    assert 'campus="c9"' in center.http("/metrics")[1]
