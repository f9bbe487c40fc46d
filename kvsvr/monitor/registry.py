"""Monitor ids: the numbers code counts under, each registered once with a name, a kind and a
description.

Code refers to an id by an int constant (`NODE_REQUESTS`), never by a name looked up on the hot
path. The names and descriptions are for people (the agent ships them to the center, which
shows them). Ids 1..999 belong to KVSvr itself (defined here); a program adds its own, 1000 and
up, in a registry file:

    [[ids]]
    id = 1000
    name = "chat.messages_sent"
    kind = "counter"            # "counter": add(id, delta); "gauge": set(id, value)
    description = "Messages accepted from clients"
    unit = "messages"           # optional: what is counted (charts say "messages/s")
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import msgspec

from kvsvr import _core
from kvsvr.config import decode_toml
from kvsvr.errors import ConfigError
from kvsvr.limits import MONITOR_FIRST_USER_ID

NAME_BYTES_MAX = _core.MONITOR_NAME_BYTES_MAX
DESCRIPTION_BYTES_MAX = _core.MONITOR_DESCRIPTION_BYTES_MAX
IDS_MAX = _core.MONITOR_IDS_MAX
UNIT_BYTES_MAX = 32
FIRST_USER_ID = MONITOR_FIRST_USER_ID   # ids below belong to KVSvr's own programs
KINDS = {"counter": _core.KIND_COUNTER, "gauge": _core.KIND_GAUGE}
KIND_NAMES = {v: k for k, v in KINDS.items()}
_NAME = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")

Kind = Literal["counter", "gauge"]


class MonitorId(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: int
    name: str
    description: str
    kind: Kind = "counter"
    unit: str = ""          # what one count is ("requests", "bytes"); "" says "count"

    @property
    def kind_code(self) -> int:
        return KINDS[self.kind]


def id_problem(entry: MonitorId, *, builtin: bool = False) -> str | None:
    """Why `entry` cannot be registered (the field first), or None."""
    low = 1 if builtin else FIRST_USER_ID
    high = FIRST_USER_ID - 1 if builtin else IDS_MAX
    if entry.id == 0:
        return f"id: 0 is reserved (ids start at 1), expected {low}..{high}"
    if not builtin and 1 <= entry.id < FIRST_USER_ID:
        return (f"id: {entry.id} is in KVSvr's own range 1..{FIRST_USER_ID - 1}, expected "
                f"{low}..{high}")
    if not low <= entry.id <= high:
        return f"id: {entry.id} is outside the id range, expected {low}..{high}"
    name_bytes = len(entry.name.encode())
    if not 1 <= name_bytes <= NAME_BYTES_MAX:
        return f"name: {name_bytes} bytes, expected 1..{NAME_BYTES_MAX}"
    if not _NAME.match(entry.name):
        return (f"name: {entry.name!r}, expected lowercase words of [a-z0-9_] joined by dots "
                "(e.g. chat.messages_sent)")
    description_bytes = len(entry.description.encode())
    if not 1 <= description_bytes <= DESCRIPTION_BYTES_MAX:
        return f"description: {description_bytes} bytes, expected 1..{DESCRIPTION_BYTES_MAX}"
    if len(entry.unit.encode()) > UNIT_BYTES_MAX or not entry.unit.isprintable():
        return f"unit: {entry.unit!r}, expected at most {UNIT_BYTES_MAX} printable bytes"
    if entry.kind not in KINDS:
        return f"kind: {entry.kind!r}, expected one of {sorted(KINDS)}"
    return None


class Registry:
    """Every monitor id known here, by id and by name; refuses clashes."""

    def __init__(self, entries: Iterable[MonitorId] = ()):
        self.by_id: dict[int, MonitorId] = {}
        self.by_name: dict[str, MonitorId] = {}
        for entry in entries:
            self.add(entry)

    def add(self, entry: MonitorId, *, field: str = "id", builtin: bool = False) -> None:
        problem = id_problem(entry, builtin=builtin)
        if problem:
            raise ConfigError(f"{field}.{problem}")
        existing = self.by_id.get(entry.id)
        if existing is not None and existing != entry:
            raise ConfigError(f"{field}.id: {entry.id} is already registered as "
                              f"{existing.name!r}")
        named = self.by_name.get(entry.name)
        if named is not None and named.id != entry.id:
            raise ConfigError(f"{field}.name: {entry.name!r} is already id {named.id}")
        self.by_id[entry.id] = entry
        self.by_name[entry.name] = entry

    def list(self) -> list[MonitorId]:
        return [self.by_id[i] for i in sorted(self.by_id)]

    def __contains__(self, id: int) -> bool:
        return id in self.by_id

    def __len__(self) -> int:
        return len(self.by_id)


class _RegistryFile(msgspec.Struct, forbid_unknown_fields=True):
    ids: list[MonitorId] = []


def parse_registry(text: str | bytes, *, source: str = "registry") -> list[MonitorId]:
    """The entries of a registry file; ConfigError naming the field if one is wrong."""
    document = decode_toml(text, _RegistryFile, source)
    registry = builtin_registry()
    for index, entry in enumerate(document.ids):
        try:
            registry.add(entry, field=f"ids[{index}]")
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return document.ids


def load_registry(paths: Iterable[str | Path] = ()) -> Registry:
    """The built-in ids plus those of the given registry files."""
    registry = builtin_registry()
    for path in paths:
        try:
            text = Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
        for index, entry in enumerate(parse_registry(text, source=str(path))):
            try:
                registry.add(entry, field=f"ids[{index}]")
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    return registry


# --- KVSvr's own ids (kvsvr-node) -----------------------------------------------------------
NODE_REQUESTS = 1
NODE_FAILURES = 2
NODE_BYTES_IN = 3
NODE_BYTES_OUT = 4
NODE_GROUP_COMMITS = 5
NODE_MUTATIONS = 6
NODE_QUORUM_RETRIES = 7
NODE_BINLOG_LAG = 8
NODE_BAD_FRAMES = 9
NODE_LATENCY_1MS = 10
NODE_LATENCY_5MS = 11
NODE_LATENCY_20MS = 12
NODE_LATENCY_100MS = 13
NODE_LATENCY_1S = 14
NODE_LATENCY_SLOWER = 15

# (upper bound in seconds, id): a request answered in t seconds counts in the first bucket
# whose bound is >= t.
LATENCY_BUCKETS = ((0.001, NODE_LATENCY_1MS), (0.005, NODE_LATENCY_5MS),
                   (0.020, NODE_LATENCY_20MS), (0.100, NODE_LATENCY_100MS),
                   (1.0, NODE_LATENCY_1S))


def latency_id(seconds: float) -> int:
    """The latency bucket id of a request answered after `seconds`."""
    for bound, id in LATENCY_BUCKETS:
        if seconds <= bound:
            return id
    return NODE_LATENCY_SLOWER


BUILTIN = (
    MonitorId(NODE_REQUESTS, "node.requests", "Requests received by kvsvr-node (all methods)",
              unit="requests"),
    MonitorId(NODE_FAILURES, "node.failures", "Requests answered with an error",
              unit="errors"),
    MonitorId(NODE_BYTES_IN, "node.bytes_in", "Bytes of client and peer messages received",
              unit="bytes"),
    MonitorId(NODE_BYTES_OUT, "node.bytes_out", "Bytes of answers sent to clients",
              unit="bytes"),
    MonitorId(NODE_GROUP_COMMITS, "node.group_commits", "Durable LMDB commits (group commits)",
              unit="commits"),
    MonitorId(NODE_MUTATIONS, "node.mutations", "Mutations applied by group commits",
              unit="mutations"),
    MonitorId(NODE_QUORUM_RETRIES, "node.quorum_retries",
              "Versions another proposer took: the write is retried at the next version",
              unit="retries"),
    MonitorId(NODE_BINLOG_LAG, "node.binlog_lag",
              "Binlog records the most-behind peer stream still has to pull (gauge)", "gauge",
              unit="records"),
    MonitorId(NODE_BAD_FRAMES, "node.bad_frames", "Malformed frames received", unit="frames"),
    MonitorId(NODE_LATENCY_1MS, "node.latency.le_1ms", "Requests answered within 1 ms",
              unit="requests"),
    MonitorId(NODE_LATENCY_5MS, "node.latency.le_5ms", "Requests answered in 1-5 ms",
              unit="requests"),
    MonitorId(NODE_LATENCY_20MS, "node.latency.le_20ms", "Requests answered in 5-20 ms",
              unit="requests"),
    MonitorId(NODE_LATENCY_100MS, "node.latency.le_100ms", "Requests answered in 20-100 ms",
              unit="requests"),
    MonitorId(NODE_LATENCY_1S, "node.latency.le_1s", "Requests answered in 100 ms-1 s",
              unit="requests"),
    MonitorId(NODE_LATENCY_SLOWER, "node.latency.gt_1s", "Requests answered after 1 s",
              unit="requests"),
)


def builtin_registry() -> Registry:
    registry = Registry()
    for entry in BUILTIN:
        registry.add(entry, field="builtin", builtin=True)
    return registry


__all__ = [
    "BUILTIN",
    "MonitorId",
    "Registry",
    "builtin_registry",
    "latency_id",
    "load_registry",
    "parse_registry",
]
