"""The simulation harness: one seeded run of a replica group, its clients' calls and its
faults; the checks that end a run are in checks.py."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvsvr import _core, calls, protocol
from kvsvr.config import ClusterConfig, GroupConfig, MonitorConfig, ReplicaConfig, StorageConfig
from kvsvr.errors import InvalidArgument, KvError, NotFound, VersionConflict
from kvsvr.limits import SCAN_ROWS_MAX
from kvsvr.store import Store
from kvsvr.testing.fakes import US_PER_MS, US_PER_S, FakeNetwork, LinkFaults, Scheduler
from kvsvr.testing.linearizability import UNKNOWN, Op
from kvsvr.testing.replica_sim.checks import check_outcome, final_reads, settle
from kvsvr.testing.replica_sim.clients import Call, Checker, Host, SimClient
from kvsvr.testing.replica_sim.replicas import ReplicaDriver, ReplicaHost
from kvsvr.testing.replica_sim.settings import (
    CALL_KINDS,
    DUPLICATE_ONLY_ERRORS,
    HASH_SEED,
    INBOXES,
    MAP_SIZE_MIB,
    REGISTERS,
    RUN_S_MAX,
    START_US,
    THINK_US,
    TRACE_EVENTS_MAX,
    Faults,
)


class SimulationFailure(AssertionError):
    """A check failed; the message names the seed and the command that replays it."""


@dataclass
class Outcome:
    """What a run did: its history, what the simulation counted, and its faults."""

    seed: int
    history: list[Op]
    counters: dict[str, int] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)


class ErrorLog(logging.Handler):
    """Keeps what the replicas log as errors: under the faults simulated (a crash loses only
    what was not durable, a wipe one replica's disk at a time) none should happen."""

    def __init__(self, tolerated: tuple[str, ...]) -> None:
        super().__init__(logging.ERROR)
        self.tolerated = tolerated
        self.messages: list[str] = []
        self.tolerated_count = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(part in message for part in self.tolerated):
            self.tolerated_count += 1
        else:
            self.messages.append(message)


class Simulation:
    """One seeded run of a replica group under faults (see the package's docstring).

    `replicas` in the group (3 or 5, say); `clients` calling at once on the keys REGISTERS
    and INBOXES; `faults`; the replicas' `checkpoint_interval_ms`; `cas_ahead`: a
    compare-and-set may expect the version after the one its client last saw (off by
    default, so the default seeds keep their draws; it exercises the refusals that may not be
    final, which the clients report as Timeout); `directory` for the
    replicas' data (default: a new one in /dev/shm, removed after)."""

    def __init__(self, seed: int, *, replicas: int = 3, clients: int = 4,
                 faults: Faults | None = None, checkpoint_interval_ms: int = 50,
                 cas_ahead: bool = False, directory: str | Path | None = None):
        self.seed = seed
        self.replica_count = replicas
        self.client_count = clients
        self.faults = faults = faults or Faults()
        self.checkpoint_interval_ms = checkpoint_interval_ms
        self.cas_ahead = cas_ahead
        self.directory = directory
        # A stream per part, so that one part's draws do not shift another's.
        self.random_network = random.Random(f"{seed}:network")
        self.random_faults = random.Random(f"{seed}:faults")
        self.random_client = random.Random(f"{seed}:clients")
        self.random_disk = random.Random(f"{seed}:disk")
        self.random_rounds = random.Random(f"{seed}:rounds")
        self.scheduler = Scheduler(START_US)
        self.link_faults = LinkFaults(faults.drop, faults.duplicate,
                                      int(faults.delay_ms_min * US_PER_MS),
                                      int(faults.delay_ms_max * US_PER_MS))
        self.network = FakeNetwork(self.scheduler, self.random_network, self.link_faults)
        self.driver = ReplicaDriver(self)
        self.replicas: list[ReplicaHost] = []
        self.clients: list[SimClient] = []
        self.checker = Checker(self)
        self.hosts_by_identity: dict[bytes, Host] = {self.checker.identity: self.checker}
        self.history: list[Op] = []
        self.acknowledged: dict[int, int] = {}   # id of a write's history entry -> its version
        # (key, version) -> (the first replica that applied it, what it applied)
        self.applied: dict[tuple[bytes, int], tuple[str, Any]] = {}
        self.copies: list[dict[Any, Any]] = []   # every replica's own copy, once settled
        self.settled = False
        self.counters: dict[str, int] = {}
        self.events: list[str] = []              # every fault, for a failure's message
        self.trace: deque[str] = deque(maxlen=TRACE_EVENTS_MAX)
        self.listener: Callable[[str], None] | None = None   # told every note (scripts)
        self.errors = ErrorLog(DUPLICATE_ONLY_ERRORS if faults.duplicate else ())
        self.slow_commits = faults.slow_commit
        self.duration_s = 0.0
        self.calls_end_us = START_US

    # --- what the parts call ------------------------------------------------------------------
    def clock(self) -> float:
        """The fake clock, as the replica's parts read it between rounds."""
        return self.scheduler.now

    def commit_us(self) -> int:
        """How long the next checkpoint commit takes."""
        rng = self.random_disk
        if self.slow_commits and rng.random() < self.slow_commits:
            self.count("slow_commits")
            return int(self.faults.slow_commit_ms * US_PER_MS)
        low, high = self.faults.commit_ms
        return int(rng.uniform(low, high) * US_PER_MS)

    def read_binlog(self, replica: ReplicaHost, store: Store) -> None:
        """Take the records a commit added to a replica's binlog: every replica must apply
        the same operation at each version of a key."""
        if replica.binlog_read >= store.last_lsn:
            return
        for record in store.binlog(replica.binlog_read + 1, store.last_lsn):
            identity = (record.client_id, record.client_seq, tuple(record.ops))
            first = self.applied.setdefault((record.key, record.version),
                                            (replica.name, identity))
            if first[1] != identity:
                self.fail(f"{replica.name} applied {identity} at {record.key!r} "
                          f"v{record.version}, {first[0]} applied {first[1]} there")
        replica.binlog_read = store.last_lsn

    def send_request(self, client: Host, target: int, spec: calls.CallSpec,
                     request_id: int, budget_us: int) -> None:
        """A request frame as a client builds it, sent to replica `target`."""
        replica = self.replicas[target]
        frame = _core.encode_frame(_core.FRAME_REQUEST, spec.method, request_id,
                                   max(1, budget_us // US_PER_MS),
                                   protocol.encode(spec.request))
        identity = client.host.encode()
        for payload in protocol.pack([frame]):
            self.network.send(client.host, replica.host,
                              functools.partial(replica.receive, [identity, payload]))

    def replica(self, name: str) -> ReplicaHost:
        for replica in self.replicas:
            if replica.name == name:
                return replica
        raise ValueError(f"no replica {name!r}")

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + amount

    def note(self, event: str, fault: bool = True) -> None:
        line = f"{self.scheduler.now - START_US / US_PER_S:.3f} {event}"
        if fault:
            self.events.append(line)
        self.trace.append(line)
        if self.listener is not None:
            self.listener(event)

    # --- failures -----------------------------------------------------------------------------
    def fail(self, problem: str) -> None:
        raise SimulationFailure(self.describe(problem))

    def options(self) -> dict[str, Any]:
        """The keyword arguments this simulation was made with (JSON-able)."""
        return {"replicas": self.replica_count, "clients": self.client_count,
                "faults": asdict(self.faults),
                "checkpoint_interval_ms": self.checkpoint_interval_ms,
                "cas_ahead": self.cas_ahead}

    def describe(self, problem: str) -> str:
        return (f"seed {self.seed}: {problem}\n  replay: PYTHONHASHSEED={HASH_SEED} python -m "
                f"kvsvr.testing.replica_sim --seeds {self.seed} --duration {self.duration_s}"
                f" --options '{json.dumps(self.options())}'"
                f"\n  (this run's PYTHONHASHSEED: {os.environ.get('PYTHONHASHSEED', 'random')})"
                "\n  faults: " + ("; ".join(self.events) or "none")
                + "\n  last events: " + "; ".join(self.trace))

    # --- the run ------------------------------------------------------------------------------
    def run(self, duration_s: float = 3.0) -> Outcome:
        """Clients call for `duration_s` of simulated time while the faults strike; then the
        faults heal, the calls still out finish, the group settles and the checks run."""
        self.duration_s = duration_s
        self.calls_end_us = START_US + int(duration_s * US_PER_S)
        with self.group():
            for i in range(self.client_count):
                client = SimClient(self, i, self.random_client.getrandbits(62) | 1)
                self.clients.append(client)
                self.hosts_by_identity[client.identity] = client
                self._next_call(client)
            self._plan_faults()
            self.run_until(lambda: self.scheduler.now_us >= self.calls_end_us, RUN_S_MAX,
                           "the run stopped")
            self._heal()
            self.run_until(lambda: all(c.call is None for c in self.clients), RUN_S_MAX,
                           "the clients did not finish their calls")
            settle(self)
            final_reads(self)
            check_outcome(self)
        return Outcome(self.seed, self.history, dict(sorted(self.counters.items())),
                       list(self.events))

    @contextlib.contextmanager
    def group(self) -> Iterator[Simulation]:
        """The group's replicas started in a directory of their own (removed after), with
        what they log as errors watched; every replica stopped at the end."""
        logger = logging.getLogger("kvsvr")
        level = logger.level
        logger.addHandler(self.errors)
        if logger.getEffectiveLevel() > logging.ERROR:
            logger.setLevel(logging.ERROR)   # (what is logged as an error must reach it)
        try:
            with self._directory() as root:
                config = self._config(root)
                self.replicas = [ReplicaHost(self, i, r.node, config)
                                 for i, r in enumerate(config.groups[0].replicas)]
                try:
                    for replica in self.replicas:
                        self.driver.start(replica)
                    yield self
                finally:
                    for replica in self.replicas:
                        if replica.up:
                            self.driver.crash(replica)   # (the directory goes too)
        finally:
            logger.removeHandler(self.errors)
            logger.setLevel(level)
        if self.errors.tolerated_count:
            self.count("errors_from_duplicates", self.errors.tolerated_count)

    @contextlib.contextmanager
    def _directory(self) -> Iterator[Path]:
        if self.directory is not None:
            yield Path(self.directory)
            return
        # tmpfs where there is one: LMDB's and the vote log's fsyncs then cost nothing.
        parent = "/dev/shm" if os.path.isdir("/dev/shm") else None
        root = tempfile.mkdtemp(prefix="kvsvr-sim-", dir=parent)
        try:
            yield Path(root)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def _config(self, root: Path) -> ClusterConfig:
        replicas = [ReplicaConfig(f"n{i + 1}", chr(ord("a") + i), f"sim://n{i + 1}",
                                  str(root / f"n{i + 1}")) for i in range(self.replica_count)]
        return ClusterConfig(
            [GroupConfig("g1", ["0-4095"], replicas)], base_dir=str(root),
            storage=StorageConfig(map_size_mib=MAP_SIZE_MIB, sync=True,
                                  checkpoint_interval_ms=self.checkpoint_interval_ms),
            monitor=MonitorConfig(enabled=False))

    def run_until(self, condition: Callable[[], bool], limit_s: float, problem: str) -> None:
        """Run events until `condition` holds; a failure if it does not within `limit_s`."""
        end_us = self.scheduler.now_us + int(limit_s * US_PER_S)
        scheduler = self.scheduler
        while not condition():
            due = scheduler.next_due_us()
            if due is None or due > end_us:
                self.fail(f"{problem} within {limit_s:g} s of simulated time")
            scheduler.run_next()

    # --- the clients' calls -------------------------------------------------------------------
    def _next_call(self, client: SimClient) -> None:
        self.scheduler.after(self.random_client.randint(*THINK_US),
                             lambda: self._start_call(client))

    def _start_call(self, client: SimClient) -> None:
        if self.scheduler.now_us >= self.calls_end_us:
            return
        rng = self.random_client
        kind = rng.choices([k for k, _ in CALL_KINDS], [w for _, w in CALL_KINDS])[0]
        key = rng.choice(INBOXES) if kind in ("append", "scan") else rng.choice(REGISTERS)
        op_id = client.op_id()
        argument: Any = None
        if kind == "get":
            spec = calls.get(key)
        elif kind == "scan":
            spec = calls.scan(key, b"", None, SCAN_ROWS_MAX)
        elif kind in ("put", "cas"):
            value = str((client.index + 1) * 100_000 + op_id[1]).encode()  # unique, numeric
            expected = None
            if kind == "cas":
                # The version last seen (or one before: a sure conflict); one after only
                # with cas_ahead.
                shifts = (0, 0, 0, -1, 1) if self.cas_ahead else (0, 0, 0, -1)
                expected = max(client.versions.get(key, 0) + rng.choice(shifts), 0)
            spec, argument = calls.put(key, value, expected, op_id), (value, expected)
        elif kind == "incr":
            argument = rng.randint(1, 3)
            spec = calls.incr(key, argument, None, op_id)
        else:
            argument = f"m{client.index}-{op_id[1]}".encode()
            spec = calls.append(key, argument, op_id)
        op = Op(client.index, "put" if kind == "cas" else kind, key, argument, UNKNOWN,
                self.scheduler.now)
        self.history.append(op)

        def done(result: Any) -> None:
            self.record(client, op, result)
            self._next_call(client)

        client.start(Call(spec, self.scheduler.now_us, done),
                     rng.randrange(self.replica_count))

    def record(self, client: SimClient, op: Op, result: Any) -> None:
        """The call's outcome in its history entry, as the checker's model has it."""
        if result is UNKNOWN:
            self.note(f"{client.host} {op.kind} {op.key.decode()}: unknown", fault=False)
            self.count("calls_unknown")
            return   # (op.result stays UNKNOWN, op.ret infinite: it may or may not apply)
        op.ret = self.scheduler.now
        if isinstance(result, NotFound):
            op.result = ("not_found", result.version)
        elif isinstance(result, VersionConflict):
            op.result = ("conflict", result.version)
        elif isinstance(result, InvalidArgument):
            op.result = ("invalid",)
        elif isinstance(result, KvError):
            self.fail(f"{client.host}: {op.kind} {op.key!r} answered {result!r}")
        elif op.kind == "get":
            op.result = ("ok", (result.version, result.value))
        elif op.kind == "scan":
            if result.next_start is not None:
                self.fail("an inbox outgrew one scan page: a shorter run")
            op.result = ("ok", tuple(row.value for row in result.rows))
        else:
            op.result = ("ok", result.version if op.kind == "put" else result.results[0])
            self.acknowledged[id(op)] = result.version
        version = getattr(result, "version", None)
        if isinstance(version, int):
            client.versions[op.key] = version
        self.note(f"{client.host} {op.kind} {op.key.decode()} {op.argument!r}: {op.result}",
                  fault=False)
        self.count("calls_answered")

    # --- faults -------------------------------------------------------------------------------
    def _plan_faults(self) -> None:
        """Draw the run's faults up front, each at a time while the clients call."""
        faults, rng = self.faults, self.random_faults
        span_us = self.calls_end_us - START_US
        for i in range(faults.crashes + faults.stops):
            at = START_US + rng.randint(100 * US_PER_MS, span_us)
            how = "wipe" if i < faults.wipes else "crash" if i < faults.crashes else "stop"
            self.scheduler.at(at, functools.partial(self._take_down, how))
        for _ in range(faults.partitions):
            self.scheduler.at(START_US + rng.randint(50 * US_PER_MS, span_us), self._partition)
        if faults.slow_commit:
            self.scheduler.at(self.calls_end_us, self._end_slow_commits)

    def _take_down(self, how: str) -> None:
        """A replica crashes, loses its disk too ("wipe") or stops cleanly; it restarts
        after a while."""
        rng = self.random_faults
        up = [r for r in self.replicas if r.up]
        if not up:
            return
        if how == "wipe" and any(r.rebuilding for r in self.replicas):
            # One lost disk at a time: a second before the first rebuilt is more than a
            # group is built to survive.
            how = "crash"
        victim = up[rng.randrange(len(up))]
        self.note(f"{how} {victim.name}")
        if how == "stop":
            self.driver.stop(victim)
        else:
            self.driver.crash(victim)
        if how == "wipe":
            shutil.rmtree(victim.data_dir)
            victim.rebuilding = True
        down_us = int(rng.uniform(*self.faults.down_ms) * US_PER_MS)
        self.scheduler.after(down_us, lambda: self._restart(victim))

    def _restart(self, replica: ReplicaHost) -> None:
        if not replica.up:
            self.note(f"restart {replica.name}{' (new disk)' if replica.rebuilding else ''}")
            self.driver.start(replica)

    def _partition(self) -> None:
        rng = self.random_faults
        hosts = [r.host for r in self.replicas]
        victim = rng.choice(hosts)
        shape = rng.choice(("from peers", "from everyone", "one link"))
        if shape == "one link":
            cut = [(victim, rng.choice([h for h in hosts if h != victim]))]
        else:
            cut = [(victim, h) for h in hosts if h != victim]
            if shape == "from everyone":
                cut += [(victim, c.host) for c in self.clients]
        self.note(f"cut {victim} {shape}")
        for a, b in cut:
            self.network.cut(a, b)

        def mend() -> None:
            self.note(f"mend {victim} {shape}")
            for a, b in cut:
                self.network.mend(a, b)

        self.scheduler.after(int(rng.uniform(*self.faults.partition_ms) * US_PER_MS), mend)

    def _end_slow_commits(self) -> None:
        self.slow_commits = 0.0

    def _heal(self) -> None:
        """Every fault ends: links mend and stop losing messages, replicas come back."""
        self.note("heal")
        self.network.heal()
        self.link_faults.drop = self.link_faults.duplicate = 0.0
        self.slow_commits = 0.0
        for replica in self.replicas:
            self._restart(replica)

