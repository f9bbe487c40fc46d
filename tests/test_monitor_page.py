"""The monitor page in real headless Chromium, against a real center fed by real agents of
two machines: axes with units, local date and time with the zone, one line per machine with
a legend, hover values, auto-refresh that fetches new data (and pauses), a range picker that
changes the range, every registered id listed, "no rules loaded" said as such and the default
rules loaded when the config names none. Screenshots are kept in a temp dir and
tests/artifacts/ for people to look at."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvsvr.launcher import free_port, write_single_node_config
from kvsvr.monitor.counters import open_counters
from kvsvr.monitor.registry import load_registry
from kvsvr.monitor.rules import configured_rules

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
MACHINES = ("m1", "m2")
ZONE = "Asia/Tokyo"           # the browser's zone in these tests (UTC+09:00, no DST)

REGISTRY = """
[[ids]]
id = 1000
name = "test.hits"
description = "Adds by the test's writers"
unit = "hits"

[[ids]]
id = 1001
name = "test.queue_depth"
kind = "gauge"
description = "A depth the writers set"
unit = "messages"

[[ids]]
id = 1500
name = "test.never_counted"
description = "Registered, never counted"
"""

WRITER = """
import sys, time
from kvsvr.monitor.counters import open_counters
counters = open_counters(sys.argv[1])
scale = int(sys.argv[2])
while True:
    counters.add(1000, scale * (1 + int(time.time()) % 5))
    counters.set(1001, scale * 10)
    time.sleep(0.05)
"""


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI must: apt-get install -y chromium)")
        pytest.skip("chromium is not installed here (apt-get install -y chromium)")
    return found


class Monitor:
    """A center (no rules) and one agent plus one writer process per machine."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.config = write_single_node_config(directory)
        (directory / "registry.toml").write_text(REGISTRY)
        self.web_port = free_port()
        self.center = f"tcp://127.0.0.1:{free_port()}"
        with open(self.config, "a") as f:
            f.write(f"""
[monitor]
window_s = 60
registry = ["registry.toml"]
center = "{self.center}"
web = "127.0.0.1:{self.web_port}"
data_dir = "monitor-data"
rules = "none"
agent_period_s = 1
""")
        self.logs = directory / "logs"
        self.logs.mkdir()
        self.processes: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, command: list[str]) -> None:
        with open(self.logs / f"{name}.log", "ab") as log:
            self.processes.append(subprocess.Popen(command, stdout=log, stderr=log))

    def start(self) -> None:
        registry = load_registry([self.directory / "registry.toml"])
        self.spawn("center", [sys.executable, "-m", "kvsvr.monitor.center", "--config",
                              str(self.config)])
        for scale, machine in enumerate(MACHINES, 1):
            path = self.directory / f"counters-{machine}"
            open_counters(path, window_s=60, registry=registry)
            self.spawn(f"writer-{machine}", [sys.executable, "-c", WRITER, str(path),
                                             str(scale)])
            self.spawn(f"agent-{machine}", [
                sys.executable, "-m", "kvsvr.monitor.agent", "--config", str(self.config),
                "--counters", str(path), "--machine", machine, "--state-dir",
                str(self.directory / f"agent-{machine}")])

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGKILL)
            process.wait()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.web_port}{path}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=5) as answer:
            return json.load(answer)

    def wait_for(self, what: str, predicate: Any, timeout_s: float = 40.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                result = predicate()
                if result:
                    return result
            except OSError:
                pass
            time.sleep(0.3)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in self.logs.iterdir())
        raise AssertionError(f"timed out waiting for {what}\n{logs}")


@pytest.fixture(scope="module")
def monitor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitor]:
    monitor = Monitor(tmp_path_factory.mktemp("page"))
    monitor.start()
    try:
        # Both machines shipped a few seconds of both ids.
        def shipped() -> bool:
            chart = monitor.get("/api/chart?id=test.hits&range=900")
            return all(sum(1 for v in chart["machines"].get(m, []) if v) >= 3
                       for m in MACHINES)

        monitor.wait_for("both machines' values", shipped)
        yield monitor
    finally:
        monitor.stop()


def _browse(profile: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", *arguments],
        capture_output=True, text=True, timeout=90, env={**os.environ, "TZ": ZONE})


def _dom(profile: Path, url: str, budget_ms: int = 3000) -> str:
    done = _browse(profile, f"--virtual-time-budget={budget_ms}", "--dump-dom", url)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _screenshot(profile: Path, url: str, name: str, tmp_path: Path) -> Path:
    shot = tmp_path / name
    done = _browse(profile, "--virtual-time-budget=3000", "--window-size=1280,1000",
                   "--hide-scrollbars", f"--screenshot={shot}", url)
    assert done.returncode == 0, done.stderr
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / name)
    return shot


def _section(dom: str, element_id: str) -> str:
    start = dom.index(f'id="{element_id}"')
    return dom[start:dom.index('class="tooltip"', start)]


def test_curve_page_has_axes_with_units_local_time_with_zone_and_a_legend(monitor, tmp_path):
    """The id page, after its script ran in Chromium (zone Asia/Tokyo): the y axis says the
    unit per second, the x axis says local time and names the zone with its offset, ticks are
    local HH:MM with the date, and the per-machine chart has one line and one legend entry per
    machine; the range picker shows the range asked for."""
    dom = _dom(tmp_path / "profile", monitor.url("/id/test.hits?range=900"))
    total, machines = _section(dom, "sum"), _section(dom, "machines")
    zone = f"Local time: {ZONE} (UTC+09:00)"
    for chart in (total, machines):
        assert re.search(r'class="yaxis"[^>]*>hits/s<', chart), chart[:2000]
        assert zone in chart
        ticks = re.findall(r'class="xtick"[^>]*>(\d\d:\d\d)<', chart)
        assert len(ticks) >= 3, ticks
        assert re.search(r'class="xdate"[^>]*>\d{4}-\d\d-\d\d<', chart)
        assert len(re.findall(r'class="ytick"', chart)) >= 3
    # The ticks are Tokyo's clock: the first one is within the range of the view.
    first = int(re.search(r'data-first="(\d+)"', dom).group(1))
    tokyo_hours = time.gmtime(first + 9 * 3600).tm_hour
    hours = {int(t[:2]) for t in re.findall(r'class="xtick"[^>]*>(\d\d):\d\d<', total)}
    assert hours & {tokyo_hours, (tokyo_hours + 1) % 24}, (hours, tokyo_hours)
    for machine in MACHINES:
        assert f'data-series="{machine}"' in machines
        assert re.search(rf'class="entry" data-series="{machine}">.*?{machine}: [\d.k]+ hits/s',
                         machines)
    assert 'data-series="sum of all machines"' in total
    assert re.search(r'class="active" data-range="900"|data-range="900" class="active"', dom) \
        or re.search(r'<button[^>]*data-range="900"[^>]*class="active"', dom)
    assert int(re.search(r'data-range="(\d+)"', dom.split("<body", 1)[1]).group(1)) == 900
    gauge = _dom(tmp_path / "profile", monitor.url("/id/test.queue_depth?range=900"))
    assert re.search(r'class="yaxis"[^>]*>messages<', gauge)


def test_ids_page_lists_every_registered_id_and_says_no_rules_are_loaded(monitor, tmp_path):
    """Every registered id is a row, those with values with a small chart with axes and the
    unit, the one never counted too (saying it has no values); with no rule loaded the page says so
    and shows no green all-clear."""
    dom = _dom(tmp_path / "profile", monitor.url("/"))
    registry = load_registry([monitor.directory / "registry.toml"])
    for entry in registry.list():
        assert f'data-id="{entry.id}"' in dom, entry.name
    never = dom.split('data-id="1500"', 1)[1].split("</tr>", 1)[0]
    assert "no values in the last 10 min" in never and "<polyline" not in never
    hits = dom.split('data-id="1000"', 1)[1].split("</tr>", 1)[0]
    assert 'class="ymax"' in hits and ">now<" in hits and ">hits/s<" in hits
    assert "No alert rules are loaded" in dom and "No alert firing" not in dom
    assert "(UTC+09:00)" in dom          # the header names the zone times are shown in


def test_hover_shows_the_values_under_the_pointer(monitor, tmp_path):
    """Moving the pointer over the per-machine chart shows a tooltip with the local time and
    each machine's value with the unit."""
    async def scenario(page: Page) -> None:
        await page.open(monitor.url("/id/test.hits?range=60"))
        await page.until("drawn", "document.body.dataset.fetches >= 1")
        box = await page.value("""(() => { const r = document.querySelector(
            '#machines .hover').getBoundingClientRect();
            return [r.left + r.width * 0.9, r.top + r.height / 2]; })()""")
        await page.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": box[0],
                                                      "y": box[1]})
        tip = await page.value("document.querySelector('#machines .tooltip').innerText")
        shown = await page.value("getComputedStyle(document.querySelector("
                                 "'#machines .tooltip')).display")
        assert shown == "block"
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", tip), tip
        for machine in MACHINES:
            assert re.search(rf"{machine}: [\d.k]+ hits/s", tip), tip

    run_in_browser(tmp_path, scenario)


def test_auto_refresh_fetches_new_data_pauses_and_the_range_picker_changes_the_range(
        monitor, tmp_path):
    """In real time: the id page fetches again by itself and the newest second it shows moves
    on (the agents keep shipping); unticking auto-refresh stops the fetches; clicking "1 h"
    fetches and draws an hour, and puts it in the address; "earlier" and "newest" move it."""
    async def scenario(page: Page) -> None:
        await page.open(monitor.url("/id/test.hits?range=900"))
        await page.until("the first drawing", "document.body.dataset.fetches >= 1")
        last = int(await page.value("document.body.dataset.last"))
        await page.until("an automatic refresh with newer data",
                         f"document.body.dataset.fetches >= 2 && "
                         f"Number(document.body.dataset.last) > {last}", timeout_s=20)
        assert await page.value("document.getElementById('autorefresh').checked") is True
        await page.value("document.getElementById('autorefresh').click()")
        paused = int(await page.value("document.body.dataset.fetches"))
        await asyncio.sleep(6.5)
        assert int(await page.value("document.body.dataset.fetches")) == paused
        await page.value("document.querySelector('button[data-range=\"3600\"]').click()")
        await page.until("the 1 h range", "document.body.dataset.range == '3600'")
        assert "range=3600" in await page.value("location.href")
        assert await page.value("document.querySelector('button.active').dataset.range") \
            == "3600"
        first = int(await page.value("document.body.dataset.first"))
        last = int(await page.value("document.body.dataset.last"))
        assert last - first + 1 == 3600
        # "earlier" shows the hour before, "newest" comes back.
        await page.value("document.getElementById('earlier').click()")
        await page.until("the hour before", f"document.body.dataset.last == '{first - 1}'")
        assert f"end={first - 1}" in await page.value("location.href")
        assert await page.value("document.body.dataset.range") == "3600"
        await page.value("document.getElementById('newest').click()")
        await page.until("the newest hour", f"Number(document.body.dataset.last) >= {last}")

    run_in_browser(tmp_path, scenario)


def test_screenshots_of_the_pages(monitor, tmp_path):
    """Screenshots of the ids page and an id's page (kept for people to look at)."""
    for name, path in (("monitor-ids.png", "/"), ("monitor-curve.png", "/id/test.hits"),
                       ("monitor-gauge.png", "/id/test.queue_depth?range=3600")):
        _screenshot(tmp_path / "profile", monitor.url(path), name, tmp_path)


def test_the_default_rules_are_loaded_unless_the_config_names_others(tmp_path):
    """An empty [monitor] rules loads the shipped rules for KVSvr's own ids (a replica down,
    binlog lag, failures rising, frames rejected), and the page says they are watching;
    "none" loads none."""
    from kvsvr.monitor.registry import builtin_registry

    rules, source = configured_rules("", builtin_registry())
    assert {r.rule.name: r.id_name for r in rules} == {
        "replica-down": "node.bytes_in", "binlog-lag": "node.binlog_lag",
        "failures-rising": "node.failures", "frames-rejected": "node.bad_frames"}
    assert source == "the default rules"
    assert configured_rules("none", builtin_registry())[0] == []
    config = write_single_node_config(tmp_path)
    port = free_port()
    with open(config, "a") as f:
        f.write(f'\n[monitor]\ncenter = "tcp://127.0.0.1:{free_port()}"\n'
                f'web = "127.0.0.1:{port}"\ndata_dir = "monitor-data"\n')
    center = subprocess.Popen([sys.executable, "-m", "kvsvr.monitor.center", "--config",
                               str(config)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/alerts", timeout=5) as a:
                    page = a.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "the center did not serve"
                time.sleep(0.2)
        assert "4 rules watching (the default rules)" in page
        for name in ("replica-down", "binlog-lag", "failures-rising", "frames-rejected"):
            assert f"<td>{name}</td>" in page
    finally:
        center.send_signal(signal.SIGKILL)
        center.wait()


# --- a small DevTools-protocol client (real time, real pointer events) ---------------------
class Page:
    def __init__(self, socket: Any):
        self.socket = socket
        self.next_id = 0

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self.next_id += 1
        call = self.next_id
        await self.socket.send_json({"id": call, "method": method, "params": params or {}})
        while True:
            message = await self.socket.receive_json(timeout=30)
            if message.get("id") == call:
                assert "error" not in message, message
                return message.get("result")

    async def value(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", {"expression": expression,
                                                      "returnByValue": True})
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def open(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})

    async def until(self, what: str, expression: str, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if await self.value(f"!!({expression})"):
                    return
            except AssertionError:
                pass           # the page is still loading
            await asyncio.sleep(0.2)
        raise AssertionError(f"the page never showed {what}")


def run_in_browser(tmp_path: Path, scenario: Any) -> None:
    """Run `scenario(page)` in a real headless Chromium driven over its DevTools socket."""
    import aiohttp

    port = free_port()
    browser = subprocess.Popen(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", f"--remote-debugging-port={port}",
         f"--user-data-dir={tmp_path / 'cdp-profile'}", "--window-size=1280,1000",
         "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TZ": ZONE})

    async def drive() -> None:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/json/list") as answer:
                        pages = [p for p in await answer.json() if p["type"] == "page"]
                    if pages:
                        break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "chromium's DevTools never answered"
                await asyncio.sleep(0.2)
            async with session.ws_connect(pages[0]["webSocketDebuggerUrl"],
                                          max_msg_size=0) as socket:
                await scenario(Page(socket))

    try:
        result: list[BaseException] = []
        # asyncio.run in a thread of its own: pytest may already run a loop in this one.
        thread = threading.Thread(target=lambda: _capture(result, lambda: asyncio.run(drive())))
        thread.start()
        thread.join(120)
        if result:
            raise result[0]
    finally:
        browser.send_signal(signal.SIGKILL)
        browser.wait()


def _capture(result: list[BaseException], call: Any) -> None:
    try:
        call()
    except BaseException as e:
        result.append(e)
