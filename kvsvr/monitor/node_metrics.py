"""A node's own /metrics: what `kvsvr status` says of one node, in Prometheus' text format,
on the HTTP address its config names (`metrics` of its replica entry; off by default).

The machine's counters (kvsvr/monitor/exporter.py) are per machine; these are per node
process: its requests by method, its errors by type, its role and health, its store, its
peers' lag, its parked watches and entries waiting to expire. The node's loop publishes a
status snapshot at most once a second (`NodeMetrics.due`, then `publish`); the HTTP thread
renders the newest snapshot, so a scrape never touches the loop's state.

    kvsvr_node_process_requests_total{cluster="local",datacenter="local",campus="a",
                                      node="n1",method="get"} 42     (on one line)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from http.server import ThreadingHTTPServer
from typing import Any

from kvsvr.config import ClusterConfig
from kvsvr.monitor import prometheus
from kvsvr.monitor.metrics_http import serve_metrics
from kvsvr.monitor.prometheus import Family

log = logging.getLogger("kvsvr.metrics")

PUBLISH_INTERVAL_S = 1.0     # how stale a scrape may be: one status snapshot a second at most
NODE_LABEL_NAMES = ("cluster", "datacenter", "campus", "node")
_UNSAFE = re.compile(r"[^a-z0-9_]")

# Parts of the status that are numbers of one node, exposed as gauges named for their path.
_GAUGE_SECTIONS = ("store", "quorum", "waiting", "vote_log", "checkpoint")
_PEER_GAUGES = {"up": "whether the peer answers (1) or not (0)",
                "last_heard_s": "seconds since the peer was last heard",
                "lag_records": "the peer's binlog records this node has yet to read",
                "incarnation": "the peer's life (a new one after a lost disk)"}


def _name(text: str) -> str:
    return _UNSAFE.sub("_", text.lower())


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    return None


# long: one table of the status' parts, each a few lines; split, it reads worse
def node_families(status: Mapping[str, Any], labels: tuple[str, ...]) -> list[Family]:
    """The metric families of one node's status (`Node.status()`), `labels` being its
    cluster, datacenter, campus and node."""
    families: list[Family] = []

    def gauge(name: str, description: str, value: Any) -> None:
        number = _number(value)
        if number is not None:
            families.append(Family(None, name, "gauge", description, {labels: number},
                                   NODE_LABEL_NAMES))

    gauge("node.process.up", "1 while the node serves", 1)
    gauge("node.process.uptime_seconds", "seconds since the node started",
          status.get("uptime_s"))
    gauge("node.process.incarnation", "this node's life (a new one after a lost disk)",
          status.get("incarnation"))
    for name, key in (("role", "role"), ("health", "health")):
        if isinstance(status.get(key), str):
            families.append(Family(None, f"node.process.{name}", "gauge",
                                   f"1 for the node's present {name}",
                                   {(*labels, status[key]): 1}, (*NODE_LABEL_NAMES, name)))
    requests: dict[tuple[str, ...], int] = {}
    errors: dict[tuple[str, ...], int] = {}
    for key, value in sorted(status.get("counters", {}).items()):
        if _number(value) is None:
            continue
        kind, _, rest = key.partition(".")
        if kind == "requests" and rest:
            requests[(*labels, rest)] = value
        elif kind == "errors" and rest:
            errors[(*labels, rest)] = value
        else:
            families.append(Family(None, f"node.process.{_name(key)}", "counter",
                                   f"the node's {key} counter since it started",
                                   {labels: value}, NODE_LABEL_NAMES))
    families.append(Family(None, "node.process.requests", "counter",
                           "requests the node answered since it started, by method",
                           requests, (*NODE_LABEL_NAMES, "method")))
    families.append(Family(None, "node.process.errors", "counter",
                           "error answers since the node started, by error", errors,
                           (*NODE_LABEL_NAMES, "error")))
    for section in _GAUGE_SECTIONS:
        for key, value in sorted((status.get(section) or {}).items()):
            gauge(f"node.{section}.{_name(key)}", f"status {section}.{key}", value)
    peers = status.get("peers") or {}
    for key, description in _PEER_GAUGES.items():
        samples = {(*labels, peer): number for peer, state in sorted(peers.items())
                   if (number := _number(state.get(key))) is not None}
        if samples:
            families.append(Family(None, f"node.peer.{_name(key)}", "gauge", description,
                                   samples, (*NODE_LABEL_NAMES, "peer")))
    return families


def node_labels(config: ClusterConfig, campus: str, node: str) -> tuple[str, ...]:
    """(cluster, datacenter, campus, node) of a node of `config`."""
    return (config.name, config.monitor.datacenter or config.name, campus, node)


class NodeMetrics:
    """The /metrics endpoint of one node: `due(now)` and `publish(status)` from the node's
    loop, the HTTP server in a daemon thread."""

    def __init__(self, labels: tuple[str, ...]):
        self.labels = labels
        self._next_publish = 0.0
        self._text = prometheus.render(node_families({}, labels))
        self._server: ThreadingHTTPServer | None = None

    def due(self, now: float) -> bool:
        return now >= self._next_publish

    def publish(self, status: Mapping[str, Any], now: float) -> None:
        """Render `status` (a snapshot the loop made) for the next scrapes."""
        self._next_publish = now + PUBLISH_INTERVAL_S
        try:
            self._text = prometheus.render(node_families(status, self.labels))
        except Exception:   # a bug must cost a scrape's freshness, never the node
            log.exception("rendering /metrics failed")

    def text(self) -> str:
        return self._text

    def serve(self, address: str) -> None:
        """Listen on HOST:PORT in a daemon thread (OSError if the port cannot be bound)."""
        self._server = serve_metrics(address, self.text, "a node")
        log.info("this node's metrics on http://%s/metrics", address)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def started(address: str, labels: tuple[str, ...]) -> NodeMetrics | None:
    """A serving NodeMetrics, or None (logged) when `address` cannot be bound: metrics never
    keep a node from serving."""
    metrics = NodeMetrics(labels)
    try:
        metrics.serve(address)
    except OSError as e:
        log.error("cannot serve /metrics on %s (%s): running without it", address, e)
        return None
    return metrics


__all__ = ["NODE_LABEL_NAMES", "PUBLISH_INTERVAL_S", "NodeMetrics", "node_families",
           "node_labels", "started"]
