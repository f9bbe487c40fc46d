"""Monitor ids of a service, per method and for the instance as a whole, counted by the kit
so that a service writes no monitoring code.

A service owns a block of MONITOR_IDS_PER_SERVICE ids starting at its `monitor_ids_first`
(from the config; by default MONITOR_IDS_FIRST_DEFAULT + its index in [[services]] times the
block size). Inside it, method code c owns the ids first + c * MONITOR_IDS_PER_METHOD + k,
with k one of the offsets below; code 0 is the instance as a whole.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from kvsvr.monitor.counters import CounterSink, NullCounters
from kvsvr.monitor.registry import IDS_MAX, MonitorId
from kvsvr.rpc.limits import MONITOR_IDS_PER_METHOD, MONITOR_IDS_PER_SERVICE

if TYPE_CHECKING:
    from kvsvr.rpc.service import Service

# Offsets inside a method's block.
REQUESTS = 0
FAILURES = 1
REFUSALS = 2
DEADLINE_DROPS = 3
QUEUING_MS = 4                  # summed: divided by REQUESTS it is the average
LATENCY_FIRST = 5               # LATENCY_FIRST + i: answered within LATENCY_BOUNDS_S[i]
LATENCY_BOUNDS_S = (0.001, 0.005, 0.020, 0.100, 1.0)   # then one more: slower
LATENCY_NAMES = ("le_1ms", "le_5ms", "le_20ms", "le_100ms", "le_1s", "gt_1s")
# Offsets inside block 0 (the instance).
BAD_FRAMES = 0
ADMISSION_LEVEL = 1
IN_FLIGHT = 2
OVERLOADED_WINDOWS = 3

_METHOD_IDS: tuple[tuple[int, str, str, Any, str], ...] = (
    (REQUESTS, "requests", "Requests that reached the method (admitted or not)", "counter",
     "requests"),
    (FAILURES, "failures", "Requests answered with an error", "counter", "errors"),
    (REFUSALS, "overloaded", "Requests refused by FastReject (Overloaded)", "counter",
     "requests"),
    (DEADLINE_DROPS, "deadline_drops", "Requests dropped: their budget ran out in the queue",
     "counter", "requests"),
    (QUEUING_MS, "queuing_ms", "Queuing time (arrival to start), summed", "counter", "ms"),
)
_INSTANCE_IDS: tuple[tuple[int, str, str, Any, str], ...] = (
    (BAD_FRAMES, "bad_frames", "Malformed frames and messages received", "counter", "frames"),
    (ADMISSION_LEVEL, "admission_level",
     "FastReject admission level (compound priority admitted; 8191: all)", "gauge", "level"),
    (IN_FLIGHT, "in_flight", "Requests being handled", "gauge", "requests"),
    (OVERLOADED_WINDOWS, "overloaded_windows", "Windows whose queuing time said overloaded",
     "counter", "windows"),
)


def _word(text: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", text.lower())


def registry_entries(service: Service, first: int) -> list[MonitorId]:
    """The ids of `service` with names and descriptions (for a registry file)."""
    prefix = f"rpc.{_word(service.name)}"
    entries = [MonitorId(first + offset, f"{prefix}.{name}", f"{service.name}: {text}", kind,
                         unit) for offset, name, text, kind, unit in _INSTANCE_IDS]
    for method in sorted(service.by_code.values(), key=lambda m: m.code):
        base = first + method.code * MONITOR_IDS_PER_METHOD
        where = f"{prefix}.{_word(method.name)}"
        entries += [MonitorId(base + offset, f"{where}.{name}", f"{method.full_name}: {text}",
                              kind, unit) for offset, name, text, kind, unit in _METHOD_IDS]
        lower = "0"
        for index, name in enumerate(LATENCY_NAMES):
            upper = (f"{LATENCY_BOUNDS_S[index] * 1000:g} ms" if index < len(LATENCY_BOUNDS_S)
                     else "")
            text = f"answered in {lower}-{upper}" if upper else f"answered after {lower}"
            entries.append(MonitorId(base + LATENCY_FIRST + index, f"{where}.latency.{name}",
                                     f"{method.full_name}: {text}", "counter", "requests"))
            lower = upper
    return entries


def registry_toml(service: Service, first: int) -> str:
    """A registry file (kvsvr.monitor.registry) naming the ids of `service`."""
    lines = []
    for entry in registry_entries(service, first):
        lines += ["[[ids]]", f"id = {entry.id}", f'name = "{entry.name}"',
                  f'kind = "{entry.kind}"', f'description = "{entry.description}"',
                  f'unit = "{entry.unit}"', ""]
    return "\n".join(lines)


class ServiceMetrics:
    """Where an instance counts (a CounterSink: the machine's counters file, or nothing)."""

    def __init__(self, counters: CounterSink, first: int):
        self.counters = counters
        self.first = first
        assert first == 0 or first + MONITOR_IDS_PER_SERVICE - 1 <= IDS_MAX

    @classmethod
    def off(cls) -> ServiceMetrics:
        return cls(NullCounters(), 0)

    def method_base(self, code: int) -> int:
        return self.first + code * MONITOR_IDS_PER_METHOD

    def latency_offset(self, seconds: float) -> int:
        for index, bound in enumerate(LATENCY_BOUNDS_S):
            if seconds <= bound:
                return LATENCY_FIRST + index
        return LATENCY_FIRST + len(LATENCY_BOUNDS_S)


__all__ = ["ServiceMetrics", "registry_entries", "registry_toml"]
