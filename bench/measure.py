"""The measuring code every load driver shares (KVSvr's and the peer system's alike).

A driver records each completed request with `Recorder.done(sent, done)` (or `.error(...)`,
`.timeout(...)`) and ships `Recorder.result()` to the parent, which merges them with
`summarise`: ops/s, p50/p99/p99.9 latency and a per-second timeline (ops, errors, timeouts,
p99). Only requests that complete inside the measured window [start, start + duration) count.
"""

from __future__ import annotations

import os
import resource
from typing import Any


def percentiles(latencies: list[float]) -> dict[str, float]:
    """p50/p99/p99.9 of latencies in seconds, as milliseconds (nearest rank, lower side)."""
    ordered = sorted(latencies)
    if not ordered:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "p999_ms": 0.0}

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3
    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "p999_ms": at(0.999)}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Recorder:
    """Per-second latencies, errors and timeouts of one client process."""

    def __init__(self, start: float, duration: float):
        self.start = start
        self.end = start + duration
        self.seconds = max(1, int(duration + 0.999))
        self.latencies: list[list[float]] = [[] for _ in range(self.seconds)]
        self.errors = [0] * self.seconds
        self.timeouts = [0] * self.seconds
        self.error_kinds: dict[str, int] = {}
        self._cpu_from: float | None = None
        self._cpu = 0.0

    def measuring(self, now: float) -> bool:
        return self.start <= now < self.end

    def cpu_mark(self, now: float) -> None:
        """Call often from the driver's loop: CPU time is taken inside the window only."""
        if self._cpu_from is None and now >= self.start:
            self._cpu_from = _cpu_seconds()
        elif self._cpu_from is not None and now >= self.end and not self._cpu:
            self._cpu = _cpu_seconds() - self._cpu_from

    def done(self, sent: float, done: float) -> None:
        if self.start <= done < self.end:
            self.latencies[int(done - self.start)].append(done - sent)

    def error(self, done: float, kind: str) -> None:
        if self.start <= done < self.end:
            self.errors[int(done - self.start)] += 1
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def timeout(self, done: float) -> None:
        if self.start <= done < self.end:
            self.timeouts[int(done - self.start)] += 1

    def result(self) -> dict[str, Any]:
        if self._cpu_from is not None and not self._cpu:
            self._cpu = _cpu_seconds() - self._cpu_from
        return {"latencies": self.latencies, "errors": self.errors, "timeouts": self.timeouts,
                "error_kinds": self.error_kinds, "cpu_s": self._cpu}


def summarise(label: str, results: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    """Merge the client processes' Recorder results into one workload's figures."""
    seconds = max((len(r["latencies"]) for r in results), default=0)
    per_second: list[list[float]] = [[] for _ in range(seconds)]
    errors = [0] * seconds
    timeouts = [0] * seconds
    kinds: dict[str, int] = {}
    for r in results:
        for s, values in enumerate(r["latencies"]):
            per_second[s].extend(values)
        for s, n in enumerate(r["errors"]):
            errors[s] += n
        for s, n in enumerate(r["timeouts"]):
            timeouts[s] += n
        for kind, n in r["error_kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + n
    latencies = [x for values in per_second for x in values]
    return {
        "label": label,
        "ops": len(latencies),
        "ops_per_s": len(latencies) / duration,
        "errors": sum(errors),
        "timeouts": sum(timeouts),
        "error_kinds": kinds,
        **percentiles(latencies),
        "timeline": [len(values) for values in per_second],
        "timeline_errors": errors,
        "timeline_timeouts": timeouts,
        "timeline_p99_ms": [percentiles(values)["p99_ms"] for values in per_second],
        "client_cpu_s": sum(r["cpu_s"] for r in results),
    }


def proc_cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes, from /proc (0 if gone)."""
    ticks = float(os.sysconf("SC_CLK_TCK"))
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            continue
    return total


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores; not idle, not iowait)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest time is already inside user time
    return (sum(fields[:8]) - idle) / float(os.sysconf("SC_CLK_TCK"))


def disk_io() -> tuple[int, int, int]:
    """(write requests, bytes written, cache flushes) completed so far by the machine's whole
    disks (partitions and virtual devices left out: they would count the same I/O twice),
    from /proc/diskstats; zeros where it is not readable. Flushes are counted by kernels
    from 5.5 on (0 before)."""
    writes = written = flushes = 0
    try:
        with open("/proc/diskstats") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0, 0, 0
    for line in lines:
        fields = line.split()
        if len(fields) < 14:
            continue
        name = fields[2]
        if name.startswith(("loop", "ram", "dm-", "zram", "md")) \
                or not os.path.exists(f"/sys/block/{name}/device"):
            continue
        writes += int(fields[7])
        written += int(fields[9]) * 512   # sectors of 512 bytes, whatever the device's size
        if len(fields) >= 20:
            flushes += int(fields[18])
    return writes, written, flushes
