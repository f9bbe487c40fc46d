"""Monitoring micro-benchmarks: the cost of `add`/`set` from Python beside prometheus_client's
`Counter.inc()` in its normal and its multiprocess mode (measured in the same run), and the
center's ingest rate in id-values per second (durable LMDB commits).

Each timed call does LOOP calls, so the benchmark's own per-call overhead does not hide a
35 ns operation; the table at the end prints each mean beside its group's baseline.

Run: bash tools/bench   (or: .venv/bin/python -m pytest bench/test_bench_monitor.py -s)
prometheus_client is a benchmark-only dependency (tools/bench installs it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from kvsvr import _core
from kvsvr.monitor.counters import open_counters
from kvsvr.monitor.registry import MonitorId, builtin_registry
from kvsvr.monitor.report import Report, decode_report, encode_report
from kvsvr.monitor.series import SeriesStore

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import values as prometheus_values  # noqa: E402

LOOP = range(1000)
HITS, LEVEL = 1000, 1001


@pytest.fixture(scope="module")
def counters(tmp_path_factory: pytest.TempPathFactory) -> Any:
    registry = builtin_registry()
    registry.add(MonitorId(HITS, "bench.hits", "hits"))
    registry.add(MonitorId(LEVEL, "bench.level", "level", "gauge"))
    return open_counters(tmp_path_factory.mktemp("counters") / "counters", max_ids=1024,
                         window_s=600, registry=registry)


def _normal_counter() -> Any:
    registry = prometheus_client.CollectorRegistry()
    return prometheus_client.Counter("bench_hits", "hits", registry=registry)


def _multiprocess_counter(directory: Path) -> Any:
    """A Counter whose value lives in prometheus_client's mmap files (what it does when
    PROMETHEUS_MULTIPROC_DIR is set before import), made in this process for the same run."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    saved = prometheus_values.ValueClass
    prometheus_values.ValueClass = prometheus_values.MultiProcessValue()
    try:
        registry = prometheus_client.CollectorRegistry()
        return prometheus_client.Counter("bench_hits_mp", "hits", registry=registry)
    finally:
        prometheus_values.ValueClass = saved
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]


def _loop_of(call: Any, *args: Any) -> Any:
    def run() -> None:
        for _ in LOOP:
            call(*args)
    return run


@pytest.mark.benchmark(group="add vs prom normal")
def test_kvsvr_add(timed, counters):
    timed(_loop_of(counters.add, HITS, 1))


@pytest.mark.benchmark(group="add vs prom normal")
def test_kvsvr_set(timed, counters):
    timed(_loop_of(counters.set, LEVEL, 42))


@pytest.mark.benchmark(group="add vs prom normal")
def test_prometheus_inc_normal_baseline(timed):
    timed(_loop_of(_normal_counter().inc))


@pytest.mark.benchmark(group="add vs prom mp")
def test_kvsvr_add_(timed, counters):
    timed(_loop_of(counters.add, HITS, 1))


@pytest.mark.benchmark(group="add vs prom mp")
def test_kvsvr_set_(timed, counters):
    timed(_loop_of(counters.set, LEVEL, 42))


@pytest.mark.benchmark(group="add vs prom mp")
def test_prometheus_inc_multiprocess_baseline(timed, tmp_path):
    timed(_loop_of(_multiprocess_counter(tmp_path).inc))


@pytest.mark.benchmark(group="add vs prom mp")
def test_empty_loop(timed):
    timed(_loop_of(lambda: None))


# --- center ingest ------------------------------------------------------------------------
IDS_PER_SECOND = 1000
SECONDS_PER_REPORT = 60       # one agent period at the default


def _report(machine: str, first: int) -> bytes:
    blocks = [(first + s, _core.encode_block([(i, s * i) for i in range(1, IDS_PER_SECOND + 1)]))
              for s in range(SECONDS_PER_REPORT)]
    return encode_report(Report(machine, first, first + SECONDS_PER_REPORT - 1, blocks))


@pytest.mark.parametrize("machines", [1, 4])
def test_center_ingest_rate(tmp_path, machines):
    """Reports of 60 s x 1,000 ids from `machines` machines, decoded and stored durably (one
    fsynced LMDB transaction per report, sums rebuilt): id-values per CPU second."""
    store = SeriesStore(tmp_path / "center", sync=True)
    base = 1_700_000_000
    reports = [_report(f"m{m}", base + r * SECONDS_PER_REPORT)
               for r in range(10) for m in range(machines)]
    values = len(reports) * SECONDS_PER_REPORT * IDS_PER_SECOND
    wall, cpu = time.perf_counter(), time.process_time()
    for body in reports:
        store.ingest(decode_report(body), 0.0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert store.value_count() == values
    print(f"\ncenter ingest, {machines} machine(s): {values:,} id-values in {wall:.3f} s wall, "
          f"{cpu:.3f} s CPU: {values / wall:,.0f} id-values/s, {values / cpu:,.0f} per CPU "
          f"second (target 1,000,000)")
    store.close()
