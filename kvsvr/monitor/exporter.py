"""An agent's own Prometheus endpoint: this machine's counters file as /metrics, for a
scraper on the machine (opt-in: `[monitor] agent_metrics = "HOST:PORT"`).

A counter's sample is the total of its complete seconds (ended GRACE_S ago, like the agent
ships them) since the agent started; a gauge's is its newest value in the counters window.
A scrape reads the seconds since the last one from the shared-memory file (every second is
read once); if scrapes are further apart than the counters window, the seconds that left it
are not counted (the totals lag; they never go back). Served by a small thread of its own, so
a slow scraper never delays shipping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from http.server import ThreadingHTTPServer

from kvsvr import _core
from kvsvr.monitor import prometheus
from kvsvr.monitor.counters import CountersReader
from kvsvr.monitor.metrics_http import serve_metrics
from kvsvr.monitor.registry import Registry

log = logging.getLogger("kvsvr.agent")

GRACE_S = 2                    # as the agent: a second is complete this long after it ended


class RunningTotals:
    """Per-id totals of a counters file's complete seconds, advanced by scrapes (pure over
    the reader: the caller passes the clock)."""

    def __init__(self, start_second: int):
        self.through = start_second      # the newest second counted
        self.totals: dict[int, int] = {}

    def advance(self, reader: CountersReader, now: float) -> None:
        second = int(now)
        through = second - GRACE_S
        oldest = second - reader.window_s + GRACE_S
        value_at = reader.counters.value_at
        counters = [id for id, kind in reader.ids if kind == _core.KIND_COUNTER]
        for s in range(max(self.through + 1, oldest), through + 1):
            for id in counters:
                value = value_at(id, s)
                if value:
                    self.totals[id] = self.totals.get(id, 0) + value
        self.through = max(self.through, through)


def newest_gauges(reader: CountersReader, now: float) -> dict[int, int]:
    """Each gauge's newest value within the counters window (absent if never set there)."""
    second = int(now)
    out: dict[int, int] = {}
    value_at = reader.counters.value_at
    for id, kind in reader.ids:
        if kind != _core.KIND_GAUGE:
            continue
        for s in range(second, second - reader.window_s + GRACE_S, -1):
            value = value_at(id, s)
            if value is not None:
                out[id] = value
                break
    return out


def families(reader: CountersReader, registry: Registry, totals: Mapping[int, int],
             gauges: Mapping[int, int], labels: tuple[str, ...]) -> list[prometheus.Family]:
    """One family per registered id of the file (named by the registry, else id.N)."""
    out = []
    for id, kind in reader.ids:
        entry = registry.by_id.get(id)
        name = entry.name if entry is not None else f"id.{id}"
        description = entry.description if entry is not None else "(no registry entry)"
        if kind == _core.KIND_GAUGE:
            samples = {labels: gauges[id]} if id in gauges else {}
            out.append(prometheus.Family(id, name, "gauge", description, samples))
        else:
            out.append(prometheus.Family(id, name, "counter", description,
                                         {labels: totals.get(id, 0)}))
    return out


class MetricsExporter:
    def __init__(self, reader: CountersReader, registry: Registry, labels: tuple[str, ...]):
        self.reader = reader
        self.registry = registry
        self.labels = labels
        self.totals = RunningTotals(int(time.time()) - GRACE_S)
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def text(self, now: float) -> str:
        with self.lock:
            self.reader.refresh()
            self.totals.advance(self.reader, now)
            return prometheus.render(families(self.reader, self.registry, self.totals.totals,
                                              newest_gauges(self.reader, now), self.labels))

    def serve(self, address: str) -> None:
        """Listen on HOST:PORT in a daemon thread (OSError if the port cannot be bound)."""
        self.server = serve_metrics(address, lambda: self.text(time.time()), "this agent")
        log.info("this machine's counters as Prometheus text on http://%s/metrics", address)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


__all__ = ["MetricsExporter", "RunningTotals", "families", "newest_gauges"]
