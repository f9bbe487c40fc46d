"""Cluster configuration: one TOML file describes groups, replicas, campuses and storage.

Decoding is strict (unknown fields are refused, so a typo is an error, not a silent default)
and every error names the field, e.g. `groups[0].replicas[1].address: expected tcp://HOST:PORT`.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, TypeVar

import msgspec
from msgspec import Meta, Struct

from kvsvr import _core
from kvsvr.errors import ConfigError, InvalidArgument
from kvsvr.limits import BINLOG_RECORDS_MAX, COUNTERS_FILE_IDS_DEFAULT, PEER_SECRET_BYTES_MIN

Name = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
_ADDRESS = re.compile(r"^(tcp://[A-Za-z0-9.\-\[\]:]+:(\d{1,5})|ipc://.+)$")


def address_problem(address: str) -> str | None:
    """Why `address` cannot be both bound by a node and connected to by a client, or None."""
    match = _ADDRESS.match(address)
    if not match:
        return f"{address!r}, expected tcp://HOST:PORT or ipc://PATH"
    if match.group(2) is not None and not 1 <= int(match.group(2)) <= 65535:
        return f"{address!r}: port out of range 1..65535"
    return None


_THIS_HOST = frozenset({"localhost", "0.0.0.0", "*", "[::]", "[::1]", "ip6-localhost"})


def _same_socket_key(address: str) -> str:
    """One spelling for every address that reaches the same listening socket on this host
    (tcp://localhost:P, tcp://0.0.0.0:P and tcp://127.0.0.1:P are one port), so a config
    cannot name one replica twice under two spellings: the node would count itself as its
    own peer, and its own answer as a second vote."""
    match = _ADDRESS.match(address)
    if not match or match.group(2) is None:
        return address
    host = address[len("tcp://"):address.rindex(":")].lower()
    if host in _THIS_HOST or host.startswith("127."):
        host = "this-host"
    return f"tcp://{host}:{int(match.group(2))}"


_WEB_ADDRESS = re.compile(r"^([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})$")


def web_address_problem(address: str) -> str | None:
    """Why `address` is not a HOST:PORT an HTTP server can listen on, or None."""
    match = _WEB_ADDRESS.match(address)
    if not match:
        return f"{address!r}, expected HOST:PORT (e.g. 127.0.0.1:7580)"
    if not 1 <= int(match.group(2)) <= 65535:
        return f"{address!r}: port out of range 1..65535"
    return None


def check_client_address(address: str) -> None:
    problem = address_problem(address)
    if problem:
        raise InvalidArgument(f"address: {problem}", field="address")
_T = TypeVar("_T")
_SHARD_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


class StorageConfig(Struct, forbid_unknown_fields=True):
    # Address space only (the data file grows as data is written): big by default, so the
    # disk, not the map, is what limits a node.
    map_size_mib: Annotated[int, Meta(ge=16, le=16 * 1024 * 1024)] = 1024 * 1024
    sync: bool = True
    binlog_max_records: Annotated[int, Meta(ge=1000)] = BINLOG_RECORDS_MAX
    # A replica's LMDB transaction commits (a checkpoint) this often; between checkpoints its
    # votes are durable in the vote log. Longer: fewer page writes per write, more to replay.
    # 50: the same write throughput as 100 here, with a p99 about a fifth lower (each
    # commit's page writes delay the vote log's fdatasyncs less; bench/RESULTS.md, 2026-12-01).
    checkpoint_interval_ms: Annotated[int, Meta(ge=1, le=600_000)] = 50


class MonitorConfig(Struct, forbid_unknown_fields=True):
    """[monitor]: the machine's counters file, its agent and the monitor center."""

    enabled: bool = True            # false: nodes count nothing (NullCounters)
    # "": /dev/shm/kvsvr-counters-<user>-<cluster name>-<hash of its node addresses>, one
    # file per machine and cluster (kvsvr.monitor.counters.cluster_counters_path)
    counters_path: str = ""
    # ids 1..max_ids have a slot; the default holds every id (the file is sparse)
    max_ids: Annotated[int, Meta(ge=1, le=_core.MONITOR_IDS_MAX)] = COUNTERS_FILE_IDS_DEFAULT
    window_s: Annotated[int, Meta(ge=_core.WINDOW_S_MIN,
                                  le=_core.WINDOW_S_MAX)] = _core.WINDOW_S_DEFAULT
    registry: list[str] = []        # id registry files (relative to the config file)
    center: str = "tcp://127.0.0.1:7500"   # where agents send and the center listens
    web: str = "127.0.0.1:7580"     # HOST:PORT of the center's page (checked in validate)
    data_dir: Annotated[str, Meta(min_length=1)] = "kvsvr-data/monitor"
    rules: str = ""                 # alert rules file ("": the default rules, "none": none)
    agent_period_s: Annotated[int, Meta(ge=1, le=3600)] = 60
    agent_state_dir: Annotated[str, Meta(min_length=1)] = "kvsvr-data/agent"
    machine: Annotated[str, Meta(max_length=64)] = ""   # "": the host name
    # Labels of the Prometheus exposition (/metrics): "" for datacenter is the cluster's
    # name; "" for campus is the campus of this machine's replicas when they share one, else
    # "unknown".
    datacenter: Annotated[str, Meta(max_length=64)] = ""
    campus: Annotated[str, Meta(max_length=64)] = ""
    # HOST:PORT where kvsvr-agent serves this machine's counters as /metrics ("": off)
    agent_metrics: str = ""


class SecurityConfig(Struct, forbid_unknown_fields=True):
    """[security]: what replicas share so that each knows a peer message comes from a peer."""

    # "": peer messages are not authenticated (anyone who reaches a replica's port can send
    # votes). Else every peer request carries a MAC keyed with it (kvsvr/peerauth.py), and
    # one without a valid MAC is refused; every replica of the cluster needs the same one.
    peer_secret: Annotated[str, Meta(max_length=1024)] = ""


class ReplicaConfig(Struct, forbid_unknown_fields=True):
    node: Name
    campus: Name
    address: str
    data_dir: Annotated[str, Meta(min_length=1)]
    metrics: str = ""    # HOST:PORT where the node serves its own /metrics ("": off)


class GroupConfig(Struct, forbid_unknown_fields=True):
    name: Name
    shards: Annotated[list[str], Meta(min_length=1)]
    replicas: Annotated[list[ReplicaConfig], Meta(min_length=1, max_length=7)]


class QueueServerConfig(Struct, forbid_unknown_fields=True):
    """One log server of a quorum-queue group (queue/quorumq)."""

    node: Name
    campus: Name
    address: str
    data_dir: Annotated[str, Meta(min_length=1)]


class QueueGroupConfig(Struct, forbid_unknown_fields=True):
    """Three log servers that never talk to each other; a write commits on two of them."""

    name: Name
    servers: Annotated[list[QueueServerConfig], Meta(min_length=3, max_length=3)]


class QueueSettings(Struct, forbid_unknown_fields=True):
    sync: bool = True                   # fdatasync every group commit (off: tests of speed only)
    segment_mib: Annotated[int, Meta(ge=1, le=4096)] = 64   # a topic's segment file rolls here
    # A producer counts a server's acknowledgement only within this many ms of sending the
    # batch; consumers use the same bound to decide when a server with a new disk holds
    # everything (queue/quorumq/consumer.py explains why).
    ack_deadline_ms: Annotated[int, Meta(ge=100, le=600_000)] = 5000
    clock_skew_ms: Annotated[int, Meta(ge=0, le=600_000)] = 1000   # between any two clocks
    # A batch's whole life, from submit over every retry: each attempt carries the absolute
    # expiry (submit + this), servers refuse to append or acknowledge it later, and the
    # producer fails it (not acknowledged). Consumers wait this long (+ clock skew) before
    # giving up a gap or counting a new disk whole again, so it must be >= ack_deadline_ms.
    batch_lifetime_ms: Annotated[int, Meta(ge=100, le=3_600_000)] = 30_000


class ServiceInstanceConfig(Struct, forbid_unknown_fields=True):
    """One instance of an RPC service (kvsvr.rpc): where it listens and in which campus."""

    node: Name
    campus: Name
    address: str


class ServiceConfig(Struct, forbid_unknown_fields=True):
    """[[services]]: an RPC service (kvsvr.rpc) and its instances; callers find them here."""

    name: Name
    instances: Annotated[list[ServiceInstanceConfig], Meta(min_length=1, max_length=1024)]
    # FastReject: refuse by priority when the average queuing time of a window is above
    # queuing_ms_max (false: admit everything; the level is still measured)
    fast_reject: bool = True
    queuing_ms_max: Annotated[int, Meta(ge=1, le=60_000)] = 20
    # The first of the service's block of monitor ids (kvsvr.rpc.metrics); 0: the default
    # block for its place in [[services]]
    monitor_ids_first: Annotated[int, Meta(ge=0, le=65_535)] = 0


# Business priorities (kvsvr.rpc): 0 is the most important; the table maps an entry method,
# "service.method", to one (checked in _check_services, so that the error names the method).
BUSINESS_PRIORITY_MAX = 63


def _check_services(config: ClusterConfig, seen: dict[str, dict[str, str]]) -> None:
    """Service names used once; instances with valid addresses used nowhere else in the
    config; the business-priority table naming methods as service.method."""
    names: set[str] = set()
    for s_index, entry in enumerate(config.services):
        field = f"services[{s_index}]"
        if entry.name in names:
            raise ConfigError(f"{field}.name: {entry.name!r} is used twice")
        names.add(entry.name)
        for index, instance in enumerate(entry.instances):
            where = f"{field}.instances[{index}]"
            problem = address_problem(instance.address)
            if problem:
                raise ConfigError(f"{where}.address: {problem}")
            for attribute, value, same in (
                    ("node", instance.node, instance.node),
                    ("address", instance.address, _same_socket_key(instance.address))):
                if same in seen[attribute]:
                    raise ConfigError(f"{where}.{attribute}: {value!r} is already used by "
                                      f"{seen[attribute][same]}")
                seen[attribute][same] = where
    for method, priority in config.business_priorities.items():
        service, dot, name = method.partition(".")
        if not dot or not service or not name:
            raise ConfigError(f"business_priorities.{method}: expected a method named "
                              "SERVICE.METHOD (e.g. \"account.login\")")
        if not 0 <= priority <= BUSINESS_PRIORITY_MAX:
            raise ConfigError(f"business_priorities.{method}: {priority}, expected 0 (most "
                              f"important) .. {BUSINESS_PRIORITY_MAX}")


class ClusterConfig(Struct, forbid_unknown_fields=True):
    # KV groups, queue groups, or both: a queue-only cluster has no [[groups]].
    groups: list[GroupConfig] = msgspec.field(default_factory=list)
    name: Name = "local"
    virtual_shards: Annotated[int, Meta(ge=1, le=1 << 20)] = 4096
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    monitor: MonitorConfig = msgspec.field(default_factory=MonitorConfig)
    queue_groups: list[QueueGroupConfig] = msgspec.field(default_factory=list)
    queue: QueueSettings = msgspec.field(default_factory=QueueSettings)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    # RPC services (kvsvr.rpc) and the business priority of each entry method
    services: list[ServiceConfig] = msgspec.field(default_factory=list)
    business_priorities: dict[str, int] = msgspec.field(default_factory=dict)
    # Where the file was read from; relative data_dirs resolve against `base_dir`.
    base_dir: str = "."

    def require_kv_groups(self) -> None:
        """ConfigError unless the config has KV groups (a KV program given a queue-only one)."""
        if not self.groups:
            raise ConfigError("groups: the config has no KV groups ([[groups]]), only queue "
                              "groups; a KV program needs a config with [[groups]]")

    def require_queue_groups(self) -> None:
        """ConfigError unless the config has queue groups (a queue program given a KV-only
        one, such as the embedded default)."""
        if not self.queue_groups:
            raise ConfigError("queue_groups: the config has no queue groups "
                              "([[queue_groups]]); a queue program needs a config with them")

    def replica(self, node: str) -> tuple[GroupConfig, ReplicaConfig]:
        self.require_kv_groups()
        for group in self.groups:
            for replica in group.replicas:
                if replica.node == node:
                    return group, replica
        known = ", ".join(r.node for g in self.groups for r in g.replicas)
        raise ConfigError(f"node: {node!r} is not in the config (nodes: {known})")

    def queue_server(self, node: str) -> tuple[QueueGroupConfig, QueueServerConfig]:
        for group in self.queue_groups:
            for server in group.servers:
                if server.node == node:
                    return group, server
        known = ", ".join(s.node for g in self.queue_groups for s in g.servers) or "none"
        raise ConfigError(f"node: {node!r} is not a queue server of the config (queue "
                          f"servers: {known})")

    def data_dir(self, replica: ReplicaConfig | QueueServerConfig) -> Path:
        return self.path(replica.data_dir)

    def path(self, text: str) -> Path:
        """A path of the config, relative ones resolved against the config file's directory."""
        path = Path(text)
        return path if path.is_absolute() else Path(self.base_dir) / path

    def shard_table(self) -> list[int]:
        """shard -> index of the group that owns it (validated to cover every shard once)."""
        self.require_kv_groups()
        owner = [-1] * self.virtual_shards
        for g_index, group in enumerate(self.groups):
            for r_index, text in enumerate(group.shards):
                field = f"groups[{g_index}].shards[{r_index}]"
                match = _SHARD_RANGE.match(text.strip())
                if not match:
                    raise ConfigError(f"{field}: {text!r}, expected 'N' or 'FIRST-LAST'")
                first = int(match.group(1))
                last = int(match.group(2) or first)
                if not first <= last < self.virtual_shards:
                    raise ConfigError(
                        f"{field}: {text!r} is outside 0-{self.virtual_shards - 1} or reversed"
                    )
                for shard in range(first, last + 1):
                    if owner[shard] != -1:
                        raise ConfigError(
                            f"{field}: shard {shard} is already owned by group "
                            f"{self.groups[owner[shard]].name!r}"
                        )
                    owner[shard] = g_index
        if -1 in owner:
            raise ConfigError(f"groups: shard {owner.index(-1)} is owned by no group")
        return owner


def _check_members(config: ClusterConfig, field: str,
                   members: Sequence[ReplicaConfig | QueueServerConfig], group: str,
                   member: str, seen: dict[str, dict[str, str]]) -> None:
    """The replicas of a group (or servers of a queue group): valid addresses, one per campus,
    and node names, addresses and data dirs used nowhere else in the config."""
    campuses: set[str] = set()
    for index, config_member in enumerate(members):
        where = f"{field}[{index}]"
        problem = address_problem(config_member.address)
        if problem:
            raise ConfigError(f"{where}.address: {problem}")
        if config_member.campus in campuses:
            raise ConfigError(
                f"{where}.campus: {group} has two {member}s in campus "
                f"{config_member.campus!r}; each {member} of a group must be in its own campus")
        campuses.add(config_member.campus)
        data_dir = str(config.data_dir(config_member).resolve())
        for attribute, value, same in (
                ("node", config_member.node, config_member.node),
                ("address", config_member.address, _same_socket_key(config_member.address)),
                ("data_dir", data_dir, data_dir)):
            if same in seen[attribute]:
                raise ConfigError(f"{where}.{attribute}: {value!r} is already used by "
                                  f"{seen[attribute][same]}")
            seen[attribute][same] = where


def _validate(config: ClusterConfig) -> ClusterConfig:
    seen: dict[str, dict[str, str]] = {"node": {}, "address": {}, "data_dir": {}}
    group_names: set[str] = set()
    for g_index, group in enumerate(config.groups):
        if group.name in group_names:
            raise ConfigError(f"groups[{g_index}].name: {group.name!r} is used twice")
        group_names.add(group.name)
        _check_members(config, f"groups[{g_index}].replicas", group.replicas,
                       f"group {group.name!r}", "replica", seen)
    _check_services(config, seen)
    if config.queue.batch_lifetime_ms < config.queue.ack_deadline_ms:
        raise ConfigError(f"queue.batch_lifetime_ms: {config.queue.batch_lifetime_ms} is "
                          f"shorter than queue.ack_deadline_ms ({config.queue.ack_deadline_ms});"
                          " a batch must live at least one attempt")
    for g_index, queue_group in enumerate(config.queue_groups):
        if queue_group.name in group_names:
            raise ConfigError(f"queue_groups[{g_index}].name: {queue_group.name!r} is used "
                              "twice (group and queue group names share one space)")
        group_names.add(queue_group.name)
        _check_members(config, f"queue_groups[{g_index}].servers", queue_group.servers,
                       f"queue group {queue_group.name!r}", "server", seen)
    if not config.groups and not config.queue_groups:
        raise ConfigError("groups: the config has neither KV groups ([[groups]]) nor queue "
                          "groups ([[queue_groups]]); expected at least one of them")
    if config.groups:
        config.shard_table()
    secret = config.security.peer_secret
    if secret and len(secret.encode()) < PEER_SECRET_BYTES_MIN:
        raise ConfigError(f"security.peer_secret: {len(secret.encode())} bytes, expected at "
                          f"least {PEER_SECRET_BYTES_MIN} (or \"\" for none)")
    monitor = config.monitor
    problem = address_problem(monitor.center)
    if problem:
        raise ConfigError(f"monitor.center: {problem}")
    center = _same_socket_key(monitor.center)
    if monitor.enabled and center in seen["address"]:
        raise ConfigError(f"monitor.center: {monitor.center!r} is already used by "
                          f"{seen['address'][center]} (set [monitor] center to a free "
                          "address, or enabled = false)")
    problem = web_address_problem(monitor.web)
    if problem:
        raise ConfigError(f"monitor.web: {problem}")
    problem = monitor.agent_metrics and web_address_problem(monitor.agent_metrics)
    if problem:
        raise ConfigError(f"monitor.agent_metrics: {problem} (or \"\" for none)")
    metrics_users: dict[str, str] = {}
    if monitor.agent_metrics:
        metrics_users[monitor.agent_metrics] = "monitor.agent_metrics"
    metrics_users[monitor.web] = "monitor.web"
    for g_index, group in enumerate(config.groups):
        for r_index, replica in enumerate(group.replicas):
            if not replica.metrics:
                continue
            field = f"groups[{g_index}].replicas[{r_index}].metrics"
            problem = web_address_problem(replica.metrics)
            if problem:
                raise ConfigError(f"{field}: {problem} (or \"\" for none)")
            if replica.metrics in metrics_users:
                raise ConfigError(f"{field}: {replica.metrics!r} is already used by "
                                  f"{metrics_users[replica.metrics]}")
            metrics_users[replica.metrics] = field
    # The agent must find a second still in the window after a failed send and a retry.
    if monitor.window_s < 2 * monitor.agent_period_s + 10:
        raise ConfigError(
            f"monitor.window_s: {monitor.window_s} s does not cover two agent periods "
            f"(monitor.agent_period_s = {monitor.agent_period_s}) plus 10 s; "
            f"expected >= {2 * monitor.agent_period_s + 10}")
    return config


def decode_toml(text: str | bytes, type_: type[_T], source: str) -> _T:
    """`text` decoded as a `type_`; a ConfigError saying which field (or that it is not TOML)
    otherwise. One wording for every TOML file KVSvr reads."""
    try:
        return msgspec.toml.decode(text, type=type_)
    except msgspec.ValidationError as e:
        message, _, path = str(e).rpartition(" - at `")
        field = path.rstrip("`").removeprefix("$.").removeprefix("$") if message else ""
        raise ConfigError(f"{source}: {field + ': ' if field else ''}{message or e}") from None
    except (msgspec.DecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: not valid TOML ({e})") from None


def parse(text: str | bytes, *, base_dir: str | Path = ".",
          source: str = "config") -> ClusterConfig:
    """Decode and validate a cluster config; raises ConfigError naming the field."""
    try:
        if b"base_dir" in (text.encode() if isinstance(text, str) else text):
            document = tomllib.loads(text if isinstance(text, str) else text.decode())
            if "base_dir" in document:
                raise ConfigError(f"{source}: base_dir: not a config field (data dirs are "
                                  "relative to the config file)")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: not valid TOML ({e})") from None
    config = decode_toml(text, ClusterConfig, source)
    config.base_dir = str(base_dir)
    try:
        return _validate(config)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load(path: str | Path | None) -> ClusterConfig:
    """Load a config file, or the embedded default (data dirs under the current directory)."""
    if path is None:
        return default()
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    return parse(text, base_dir=path.resolve().parent, source=str(path))


def default_text() -> str:
    return (Path(__file__).parent / "default_cluster.toml").read_text()


def default() -> ClusterConfig:
    return parse(default_text(), base_dir=Path.cwd(), source="embedded default config")
