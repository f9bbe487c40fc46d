"""FastReject under real overload: a `burn` instance (2 ms of CPU a call, about 500 calls/s
at best) offered three times that by an open-loop caller process, a fifth of the calls from
an important entry method. With FastReject the important calls all succeed within their
deadline and the instance keeps most of its capacity as goodput; with it off, the same run
collapses (every call waits past its deadline)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvsvr.launcher import write_single_node_config
from kvsvr.rpc.launcher import ServiceInstances, add_services

CPU_US = 2000
CAPACITY_PER_S = 1e6 / CPU_US       # at best; less when the machine is shared


def start_burn(directory: Path, fast_reject: bool) -> ServiceInstances:
    path = add_services(write_single_node_config(directory), {"burn": ["a"]},
                        fast_reject=fast_reject)
    instances = ServiceInstances(path, log_dir=directory / "logs")
    instances.add("kvsvr.rpc.examples:burn", "burn")
    instances.start()
    return instances


def offer(instances: ServiceInstances, rate: float, duration: float, skip: float
          ) -> dict[str, Any]:
    """Run the open-loop load generator in its own process; its JSON summary."""
    run = subprocess.run(
        [sys.executable, "-m", "kvsvr.rpc.loadgen", "--config", instances.config_path,
         "--rate", str(rate), "--duration", str(duration), "--skip", str(skip),
         "--cpu-us", str(CPU_US), "--high-share", "0.2", "--timeout", "1.0"],
        capture_output=True, text=True, timeout=duration + 60)
    assert run.returncode == 0, run.stderr
    result: dict[str, Any] = json.loads(run.stdout)
    return result


@pytest.fixture
def on(tmp_path: Path) -> Iterator[ServiceInstances]:
    instances = start_burn(tmp_path / "on", fast_reject=True)
    try:
        yield instances
    finally:
        instances.stop()


@pytest.fixture
def off(tmp_path: Path) -> Iterator[ServiceInstances]:
    instances = start_burn(tmp_path / "off", fast_reject=False)
    try:
        yield instances
    finally:
        instances.stop()


def test_three_times_capacity_keeps_important_calls_and_goodput(
        on: ServiceInstances, off: ServiceInstances) -> None:
    with_reject = offer(on, 3 * CAPACITY_PER_S, duration=7.0, skip=3.0)
    high = with_reject["high"]
    assert high["success"] >= 0.99, with_reject
    assert high["p99_ms"] < 1000, with_reject          # within the deadline, by far
    # the rest is refused at once, not left to time out
    low = with_reject["low"]
    assert low["overloaded"] > 0.5 * low["calls"], with_reject
    assert with_reject["goodput_per_s"] > 0.4 * CAPACITY_PER_S, with_reject

    without = offer(off, 3 * CAPACITY_PER_S, duration=5.0, skip=2.0)
    assert without["high"]["success"] < 0.5, without
    assert without["goodput_per_s"] < 0.5 * with_reject["goodput_per_s"], (without,
                                                                            with_reject)


@pytest.mark.soak
@pytest.mark.parametrize("times", [2, 3, 5])
def test_long_overload_runs(on: ServiceInstances, times: int) -> None:
    result = offer(on, times * CAPACITY_PER_S, duration=40.0, skip=10.0)
    assert result["high"]["success"] >= 0.99, result
    assert result["goodput_per_s"] > 0.5 * CAPACITY_PER_S, result
