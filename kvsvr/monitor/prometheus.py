"""The Prometheus text exposition format (version 0.0.4) of monitor ids: pure functions from
ids, labels and values to the text a scraper reads.

Every id becomes one metric family named `kvsvr_` + its dotted name with `_` for `.` (a
counter also ends in `_total`, as Prometheus names counters): `node.requests` is
`kvsvr_node_requests_total`. A counter's sample is the running total of the per-second values
since the exporter started (a restart is a counter reset, which `rate()` handles); a gauge's
is its newest value. Every family has its HELP (the id's description, with its number) and
TYPE lines, also when no sample is known yet.

    # HELP kvsvr_node_requests_total Requests received by kvsvr-node (all methods) (id 1)
    # TYPE kvsvr_node_requests_total counter
    kvsvr_node_requests_total{cluster="local",datacenter="local",campus="a",machine="m1"} 42
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "kvsvr_"
LABEL_NAMES = ("cluster", "datacenter", "campus", "machine")
CAMPUS_UNKNOWN = "unknown"


@dataclass(frozen=True)
class Family:
    """One id: its metric name, kind and help, and its samples (labels -> value)."""

    id: int | None             # None: an exporter's own metric, not a monitor id
    name: str                  # the id's dotted name
    kind: str                  # "counter" | "gauge"
    description: str
    samples: Mapping[tuple[str, ...], int | float]
    label_names: tuple[str, ...] = LABEL_NAMES


def metric_name(name: str, kind: str) -> str:
    """`node.requests`, counter -> `kvsvr_node_requests_total` (ids are [a-z0-9_.])."""
    base = PREFIX + name.replace(".", "_")
    if kind == "counter" and not base.endswith("_total"):
        base += "_total"
    return base


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: int | float) -> str:
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def labels_text(names: Iterable[str], values: Iterable[str]) -> str:
    pairs = [f'{n}="{escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    return "{" + ",".join(pairs) + "}" if pairs else ""


def render(families: Iterable[Family]) -> str:
    """The exposition text of `families` (each family once, samples sorted by labels)."""
    lines: list[str] = []
    seen: set[str] = set()
    for family in families:
        name = metric_name(family.name, family.kind)
        if name in seen:      # two ids whose names differ only by '.' vs '_': keep the first
            continue
        seen.add(name)
        kind = "counter" if family.kind == "counter" else "gauge"
        number = "" if family.id is None else f" (id {family.id})"
        lines.append(f"# HELP {name} {escape_help(family.description)}{number}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in sorted(family.samples.items()):
            lines.append(f"{name}{labels_text(family.label_names, labels)} {_number(value)}")
    return "\n".join(lines) + "\n"


__all__ = ["CAMPUS_UNKNOWN", "CONTENT_TYPE", "LABEL_NAMES", "Family", "escape_help",
           "escape_label", "labels_text", "metric_name", "render"]
