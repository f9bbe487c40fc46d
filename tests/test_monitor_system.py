"""The monitoring system end to end, as real processes: counting processes, kvsvr-agent and
kvsvr-monitor over real ZeroMQ and HTTP, each side SIGKILLed and restarted mid-stream; a
stopped agent raising the "no data" alert; the page in a real headless chromium."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvsvr.launcher import free_port, write_single_node_config
from kvsvr.monitor.counters import open_counters
from kvsvr.monitor.registry import load_registry

HITS, HEARTBEAT, LEVEL = 1000, 1001, 1002
MACHINE = "m1"
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"

REGISTRY = """
[[ids]]
id = 1000
name = "test.hits"
description = "Adds by the test's writer processes"

[[ids]]
id = 1001
name = "test.heartbeat"
description = "Adds by the test's heartbeat process, ten a second"

[[ids]]
id = 1002
name = "test.level"
kind = "gauge"
description = "A level the heartbeat process holds at 500"
"""

RULES = """
[[rules]]
name = "heartbeat-absent"
id = "test.heartbeat"
kind = "absent"
scope = "machine"
for_s = 6

[[rules]]
name = "level-high"
id = "test.level"
kind = "threshold"
scope = "machine"
op = ">"
value = 100
window_s = 3
"""

HEARTBEAT_SCRIPT = """
import sys, time
from kvsvr.monitor.counters import open_counters
from kvsvr.monitor.registry import load_registry
counters = open_counters(sys.argv[1])
while True:
    counters.add(1001, 1)
    counters.set(1002, 500)
    time.sleep(0.1)
"""


class System:
    def __init__(self, directory: Path):
        self.directory = directory
        self.config = write_single_node_config(directory)
        (directory / "registry.toml").write_text(REGISTRY)
        (directory / "rules.toml").write_text(RULES)
        self.counters_path = directory / "counters"
        self.web_port = free_port()
        with open(self.config, "a") as f:
            f.write(f"""
[monitor]
counters_path = "{self.counters_path}"
window_s = 60
registry = ["registry.toml"]
center = "tcp://127.0.0.1:{free_port()}"
web = "127.0.0.1:{self.web_port}"
data_dir = "monitor-data"
rules = "rules.toml"
agent_period_s = 1
agent_state_dir = "agent-state"
machine = "{MACHINE}"
""")
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs = directory / "logs"
        self.logs.mkdir()

    def start(self, name: str) -> None:
        commands = {
            "center": [sys.executable, "-m", "kvsvr.monitor.center", "--config",
                       str(self.config)],
            "agent": [sys.executable, "-m", "kvsvr.monitor.agent", "--config", str(self.config)],
            "heartbeat": [sys.executable, "-c", HEARTBEAT_SCRIPT, str(self.counters_path)],
        }
        with open(self.logs / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(commands[name], stdout=log, stderr=log)

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def signal(self, name: str, signum: int) -> None:
        self.processes[name].send_signal(signum)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.signal(name, signal.SIGCONT)
            self.kill(name)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.web_port}{path}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=5) as answer:
            return json.load(answer)

    def wait_for(self, what: str, predicate: Any, timeout_s: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                result = predicate()
                if result:
                    return result
            except OSError as e:     # the center is restarting
                last_error = e
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.logs.iterdir())
        raise AssertionError(f"timed out waiting for {what} ({last_error})\n{logs}")

    def through(self) -> int:
        machines = self.get("/api/machines")["machines"]
        return machines.get(MACHINE, {}).get("through", 0)

    def firing(self) -> set[str]:
        return {a["rule"] for a in self.get("/api/alerts")["firing"]}


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    system = System(tmp_path_factory.mktemp("monitor"))
    # The counters file exists (with the test's ids) before anyone counts.
    open_counters(system.counters_path, max_ids=1024, window_s=60,
                  registry=load_registry([system.directory / "registry.toml"]))
    for name in ("center", "agent", "heartbeat"):
        system.start(name)
    try:
        system.wait_for("the center's first report", lambda: system.through() > 0)
        yield system
    finally:
        system.stop_all()


def _write(path: str, seconds: float, results: Any) -> None:
    counters = open_counters(path)
    added = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(200):
            counters.add(HITS, 1)
        added += 200
        time.sleep(0.002)
    results.put(added)


def test_agent_and_center_killed_mid_stream_lose_nothing_and_count_nothing_twice(system):
    """Four processes add to one id for 9 s while the agent is SIGKILLed and restarted, then
    the center is, then the center is SIGSTOPped for 2 s: afterwards the center's per-second
    values equal, second by second, what the counters file recorded, and their sum equals
    what the processes added."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    first = int(time.time())
    writers = [context.Process(target=_write, args=(str(system.counters_path), 9.0, results))
               for _ in range(4)]
    for w in writers:
        w.start()
    time.sleep(2.0)
    system.kill("agent")
    time.sleep(1.0)
    system.start("agent")
    time.sleep(1.5)
    system.kill("center")
    time.sleep(1.5)
    system.start("center")
    time.sleep(1.0)
    system.signal("center", signal.SIGSTOP)     # acks stop; the agent waits, then resends
    time.sleep(2.0)
    system.signal("center", signal.SIGCONT)
    added = sum(results.get(timeout=30) for _ in writers)
    for w in writers:
        w.join(10)
    last = int(time.time())
    counters = open_counters(system.counters_path)
    truth = [counters.value_at(HITS, s) for s in range(first - 1, last + 1)]
    assert sum(v or 0 for v in truth) == added > 0
    system.wait_for("the agent to ship the last second", lambda: system.through() >= last)
    answer = system.get(f"/api/series?id=test.hits&range=300&machine={MACHINE}")
    stored = {answer["first_second"] + i: v for i, v in enumerate(answer["values"])}
    assert [stored.get(s) for s in range(first - 1, last + 1)] == truth
    summed = system.get("/api/series?id=1000&range=300")
    assert sum(v or 0 for v in summed["values"]) == added


def test_a_stopped_agent_raises_no_data_and_clears_when_it_resumes(system):
    """SIGSTOP the agent: the heartbeat id's values stop arriving and the absent rule fires
    (for machine m1); SIGCONT: they arrive again and it clears; the history has both."""
    system.wait_for("the heartbeat to be flowing",
                    lambda: "heartbeat-absent" not in system.firing())
    system.signal("agent", signal.SIGSTOP)
    try:
        system.wait_for("the no-data alert", lambda: "heartbeat-absent" in system.firing())
    finally:
        system.signal("agent", signal.SIGCONT)
    system.wait_for("the alert to clear", lambda: "heartbeat-absent" not in system.firing())
    history = [(a["rule"], a["machine"], a["state"])
               for a in reversed(system.get("/api/alerts")["history"])]
    fired = history.index(("heartbeat-absent", MACHINE, "firing"))
    assert ("heartbeat-absent", MACHINE, "cleared") in history[fired + 1:]


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI must: apt-get install -y chromium)")
        pytest.skip("chromium is not installed here (apt-get install -y chromium)")
    return found


def _browse(chromium: str, profile: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", *arguments],
        capture_output=True, text=True, timeout=90)


def test_the_page_in_headless_chromium_shows_curves_and_the_firing_alert(system, tmp_path):
    """Real chromium loads the ids page and an id's page: the heartbeat counter (incremented by
    a test process) has a drawn curve, the level-high alert is shown firing, and a screenshot
    is kept (tmp dir and tests/artifacts/)."""
    chromium = _chromium()
    assert chromium is not None
    system.wait_for("level-high to fire", lambda: "level-high" in system.firing())
    index = _browse(chromium, tmp_path / "profile", "--dump-dom", system.url("/"))
    assert index.returncode == 0, index.stderr
    dom = index.stdout
    assert "id=\"firing\"" in dom and "level-high" in dom
    assert "test.heartbeat" in dom and "<polyline" in dom
    page = _browse(chromium, tmp_path / "profile", "--virtual-time-budget=3000", "--dump-dom",
                   system.url("/id/test.heartbeat?range=300"))
    assert page.returncode == 0, page.stderr
    chart = page.stdout.split('id="sum"', 1)[1].split("</svg>", 1)[0]
    points = chart.split('points="', 1)[1].split('"', 1)[0].split()
    assert len(points) >= 5, "the heartbeat curve has too few points"
    machines = page.stdout.split('id="machines"', 1)[1]
    assert f'data-series="{MACHINE}"' in machines
    screenshot = tmp_path / "monitor-id-page.png"
    shot = _browse(chromium, tmp_path / "profile", "--virtual-time-budget=3000",
                   f"--screenshot={screenshot}",
                   "--window-size=1100,900", system.url("/id/test.heartbeat?range=300"))
    assert shot.returncode == 0, shot.stderr
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(screenshot, ARTIFACTS / screenshot.name)
