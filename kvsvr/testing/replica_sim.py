"""A deterministic simulation of a whole replica group running the replica's own code.

Every replica of one group is a real `ReplicaNode` (kvsvr/replica/) in this process, on a
real LMDB store in a directory of its own; what a node does outside its round is faked
(kvsvr/testing/fakes.py): the network between replicas and clients (seeded drops,
duplicates, delays that reorder, cuts), the vote log's fdatasync (a frame is durable when the
simulation says so, and a crash loses the rest), the committer's thread (commits land after
simulated milliseconds, so keys freeze during a commit), and the clock (a fake `now` handed to
every round; nothing sleeps). Clients send real request frames with op ids and retry with the
same op id, possibly on another replica. Faults during a run: crashes (what SIGKILL does: the
open LMDB transaction is lost, the store reopened from its directory), clean stops (what
SIGTERM does), wipes (the directory deleted: a new
incarnation that rebuilds from its peers), partitions, slow commits.

After the run the faults heal and the group settles; then every seed is checked:
- every key's history of acknowledged operations is linearizable (final reads included);
- nothing acknowledged is lost: every replica holds every acknowledged write, and each key
  took exactly one version per applied write (an `incr` or `append` retried is applied once);
- every replica applied the same operation at each version of a key (read from each
  replica's binlog as its commits land: ground truth, not the replicas' claims);
- the replicas converge: the same version, value and rows per key on every replica;
- no replica logs an error.

    outcome = Simulation(seed, faults=Faults(crashes=3)).run()   # SimulationFailure if not

A seed replays exactly in the same process, and in any process under PYTHONHASHSEED=HASH_SEED
(the replica iterates sets of keys, whose order follows the hash seed): `run_seeds_replayable`
runs seeds in such a process, and a failure's message gives the command that replays it.
`Script` runs scenario scripts (tests/testdata/replica_sim/) step by step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kvsvr import _core, calls, protocol
from kvsvr.committer import Committer
from kvsvr.config import ClusterConfig, GroupConfig, MonitorConfig, ReplicaConfig, StorageConfig
from kvsvr.errors import InvalidArgument, KvError, NotFound, Timeout, Unavailable, VersionConflict
from kvsvr.limits import SCAN_ROWS_MAX
from kvsvr.protocol import Method
from kvsvr.replica import ReplicaNode
from kvsvr.replica.network import Network
from kvsvr.store import Store
from kvsvr.testing.fakes import (
    US_PER_MS,
    US_PER_S,
    FakeCommitter,
    FakeEdge,
    FakeNetwork,
    FakeVoteLog,
    LinkFaults,
    Scheduler,
)
from kvsvr.testing.linearizability import UNKNOWN, Op, check
from kvsvr.votelog import VoteLog

START_US = 1_000 * US_PER_S       # the fake clock's start (0 means "never" to a replica)
SIM_VOTE_LOG_BYTES = 256 << 10        # small, so the ring wraps and fills within a run
MAP_SIZE_MIB = 64                 # each replica's LMDB map
IDLE_ROUND_US = 20 * US_PER_MS    # a node with nothing due runs a round this often
ROUND_MESSAGES_MAX = 512          # what a round takes from each of its inboxes
ATTEMPT_TIMEOUT_US = 500 * US_PER_MS   # a client resends an unanswered request (same op id)
CALL_TIMEOUT_US = 4 * US_PER_S         # ... and gives up on it (outcome unknown) after this
RETRY_BACKOFF_US = (10 * US_PER_MS, 60 * US_PER_MS)  # after Unavailable / Timeout answers
THINK_US = (0, 60 * US_PER_MS)    # a client's pause between calls
RUN_S_MAX = 120.0                 # simulated time the clients get to finish their calls
SETTLE_S_MAX = 60.0               # ... and the group to settle once faults heal
SETTLE_POLL_US = 250 * US_PER_MS  # how often settling is looked at
TRACE_EVENTS_MAX = 30             # the last events shown in a failure message
HASH_SEED = "0"                   # PYTHONHASHSEED under which a seed replays across processes
REGISTERS = (b"r0", b"r1", b"r2")  # get, put, compare-and-set, incr
INBOXES = (b"i0",)                 # append, scan
KEYS = (*REGISTERS, *INBOXES)
CALL_KINDS = (("get", 25), ("put", 20), ("cas", 15), ("incr", 20), ("append", 15),
              ("scan", 5))         # what a client calls, and how often

# Errors a replica logs that duplicated messages cause on their own (ZeroMQ never delivers
# one twice): a PULL request delivered twice is answered twice under one tag, and when a
# checkpoint made more records durable in between, the answer that arrives second looks
# like a peer whose binlog moved back; the puller says so and reads that binlog again.
DUPLICATE_ONLY_ERRORS = ("is past its last lsn",)


class SimulationFailure(AssertionError):
    """A check failed; the message names the seed and the command that replays it."""


@dataclass
class Faults:
    """What goes wrong during a run (each seed draws its own times and victims)."""

    drop: float = 0.03              # chance a message is lost
    duplicate: float = 0.02         # chance a message is delivered twice
    delay_ms_min: float = 0.02      # a message takes at least this long ...
    delay_ms_max: float = 4.0       # ... and up to this (so messages reorder)
    vote_sync_ms: tuple[float, float] = (0.1, 3.0)   # a vote log fdatasync takes this long
    commit_ms: tuple[float, float] = (0.2, 4.0)      # an LMDB checkpoint commit
    slow_commit: float = 0.0        # chance a commit is slow ...
    slow_commit_ms: float = 150.0   # ... and takes this long
    crashes: int = 0                # replicas killed during the run (each restarts later)
    wipes: int = 0                  # of which this many lose their data directory
    stops: int = 0                  # replicas stopped cleanly (as by SIGTERM), restarted later
    partitions: int = 0             # links cut for a while
    down_ms: tuple[float, float] = (20.0, 1_500.0)        # how long a crashed replica is down
    partition_ms: tuple[float, float] = (100.0, 2_000.0)  # how long a cut lasts
    round_us: tuple[int, int] = (50, 400)   # a round's simulated cost (no round starts sooner)
    vote_sends: str = "either"      # votes leave from the vote log ("sync-thread"), from the
                                    # loop once durable ("loop"), or either, drawn per life
    unsafe_early_durable: bool = False  # a bug to catch: votes count durable before they are

    @classmethod
    def scripted(cls) -> Faults:
        """No fault and fixed timings: what a scenario script runs with (it makes its own
        faults, step by step)."""
        return cls(drop=0.0, duplicate=0.0, delay_ms_min=0.5, delay_ms_max=0.5,
                   vote_sync_ms=(1.0, 1.0), commit_ms=(2.0, 2.0), round_us=(100, 100),
                   vote_sends="sync-thread")


@dataclass
class Outcome:
    """What a run did: its history, what the simulation counted, and its faults."""

    seed: int
    history: list[Op]
    counters: dict[str, int] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)


class _ErrorLog(logging.Handler):
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


class _Host(Protocol):
    """Whatever a replica answers through its router: a client of some kind."""

    host: str

    def receive(self, payload: bytes) -> None: ...


# --- clients -------------------------------------------------------------------------------------
@dataclass
class _Call:
    """A client call in flight: its spec and its attempts so far."""

    spec: calls.CallSpec
    started_us: int
    done: Callable[[Any], None]
    request_ids: set[int] = field(default_factory=set)
    attempt: int = 0
    target: int = 0            # the replica asked last


class _Client:
    """One simulated client: one call at a time, resent to the next replica (same op id) when
    an attempt goes unanswered or is answered Unavailable or Timeout, as kvsvr.client does;
    after CALL_TIMEOUT_US its outcome is unknown."""

    def __init__(self, sim: Simulation, index: int, client_id: int):
        self.sim = sim
        self.index = index
        self.host = f"c{index}"
        self.identity = self.host.encode()
        self.client_id = client_id
        self.seq = 0
        self.request_id = 0
        self.call: _Call | None = None
        self.versions: dict[bytes, int] = {}   # the last version seen per key (for CAS)

    def op_id(self) -> tuple[int, int]:
        self.seq += 1
        return self.client_id, self.seq

    def start(self, call: _Call, target: int) -> None:
        self.call = call
        self._send(call, target)

    def _send(self, call: _Call, target: int) -> None:
        sim = self.sim
        remaining_us = call.started_us + CALL_TIMEOUT_US - sim.scheduler.now_us
        if remaining_us <= 0:
            self.call = None
            call.done(UNKNOWN)
            return
        call.attempt += 1
        call.target = target
        self.request_id += 1
        call.request_ids.add(self.request_id)
        sim.send_request(self, target, call.spec, self.request_id, remaining_us)
        attempt = call.attempt
        sim.scheduler.after(min(ATTEMPT_TIMEOUT_US, remaining_us),
                            lambda: self._attempt_timed_out(call, attempt))

    def _attempt_timed_out(self, call: _Call, attempt: int) -> None:
        if self.call is call and call.attempt == attempt:
            self._send(call, (call.target + 1) % self.sim.replica_count)

    def _retry_later(self, call: _Call) -> None:
        call.attempt += 1   # (the timer of the attempt answered is void)
        attempt = call.attempt

        def retry() -> None:
            if self.call is call and call.attempt == attempt:
                self._send(call, (call.target + 1) % self.sim.replica_count)

        self.sim.scheduler.after(self.sim.random_client.randint(*RETRY_BACKOFF_US), retry)

    def receive(self, payload: bytes) -> None:
        call = self.call
        if call is None:
            return
        for _kind, status, request_id, _budget, body in _core.decode_frames(payload)[0]:
            if request_id not in call.request_ids or self.call is not call:
                continue   # an answer to an earlier call, or a copy of one already taken
            try:
                result = protocol.parse_reply(call.spec.method, status, body)
            except (Unavailable, Timeout):
                self._retry_later(call)   # that replica cannot (or could not in time)
                continue
            except KvError as e:
                result = e
            self.call = None
            call.done(result)


class _Checker:
    """The simulation's own client for status and local reads: one replica per call, no
    resend, nothing recorded in the history."""

    host = "checker"
    identity = b"checker"

    def __init__(self, sim: Simulation):
        self.sim = sim
        self.request_id = 0
        self.waiting: dict[int, tuple[int, Callable[[Any], None]]] = {}

    def call(self, target: int, spec: calls.CallSpec, done: Callable[[Any], None]) -> None:
        self.request_id += 1
        request_id = self.request_id
        self.waiting[request_id] = (spec.method, done)
        self.sim.send_request(self, target, spec, request_id, CALL_TIMEOUT_US)

        def expire() -> None:
            entry = self.waiting.pop(request_id, None)
            if entry is not None:
                entry[1](Timeout("no answer"))

        self.sim.scheduler.after(ATTEMPT_TIMEOUT_US, expire)

    def receive(self, payload: bytes) -> None:
        for _kind, status, request_id, _budget, body in _core.decode_frames(payload)[0]:
            entry = self.waiting.pop(request_id, None)
            if entry is None:
                continue
            method, done = entry
            try:
                result = protocol.parse_reply(method, status, body)
            except KvError as e:
                result = e
            done(result)


# --- replicas ------------------------------------------------------------------------------------
class _Replica:
    """One replica's host: its node (None while down), its inboxes, and its lives."""

    def __init__(self, sim: Simulation, index: int, name: str, config: ClusterConfig):
        self.sim = sim
        self.index = index
        self.name = name
        self.host = name
        self.config = config
        self.data_dir = config.data_dir(config.replica(name)[1])
        self.node: SimReplicaNode | None = None
        self.votes: FakeVoteLog | None = None
        self.committer: FakeCommitter | None = None
        self.life = 0               # a new one at each start: events of an old one are void
        self.inbound: list[list[bytes]] = []           # [identity, payload] at its router
        self.replies: list[tuple[int, bytes]] = []     # (peer index, payload) from its links
        self.woken = False          # a sync or a commit ended since the last round
        self.busy = False           # the last round said more work is ready
        self.round_due_us: int | None = None
        self.next_free_us = 0       # when the last round's simulated cost is over
        self.identities: dict[bytes, Callable[[bytes], None]] = {}  # peers' links, by name
        self.role = "down"          # as of its last round
        self.rebuilding = False     # started on a wiped directory, not yet a voting replica
        self.stopped_cleanly = False   # its last life ended with a clean stop
        self.binlog_read = 0        # the simulation read this life's binlog through here
        self.sync_thread_sends = True   # this life's votes leave from the vote log

    @property
    def up(self) -> bool:
        return self.node is not None

    # --- the node's fakes ---------------------------------------------------------------------
    def make_vote_log(self, path: Path, nonce: int, *, sync: bool,
                      must_exist: bool) -> FakeVoteLog:
        sim = self.sim
        low, high = sim.faults.vote_sync_ms
        self.votes = FakeVoteLog(
            path, nonce, scheduler=sim.scheduler, rng=sim.random_disk,
            sync_us=(int(low * US_PER_MS), int(high * US_PER_MS)), wake=self.woke,
            send=lambda slot, data: self.send_peer(slot, [data], votes=True),
            size=SIM_VOTE_LOG_BYTES, sync=sync, must_exist=must_exist,
            unsafe_early_durable=sim.faults.unsafe_early_durable)
        return self.votes

    def make_committer(self, store: Store) -> FakeCommitter:
        self.committer = FakeCommitter(store, scheduler=self.sim.scheduler,
                                       commit_us=self.sim.commit_us, ended=self.woke,
                                       landed=lambda: self.sim.read_binlog(self, store))
        return self.committer

    # --- arrivals and rounds ------------------------------------------------------------------
    def receive(self, message: list[bytes]) -> None:
        if self.node is None:
            return   # nobody listens: lost
        self.inbound.append(message)
        self.wake()

    def receive_reply(self, peer: int, life: int, payload: bytes) -> None:
        if self.node is None or life != self.life:
            return   # an answer to a link of a life that is gone
        self.replies.append((peer, payload))
        self.wake()

    def woke(self) -> None:
        """A sync or a commit ended (the eventfd the real threads write)."""
        self.woken = True
        self.wake()

    def wake(self, delay_us: int = 0) -> None:
        """Run a round soon (not before the last one's simulated cost is over)."""
        if self.node is None:
            return
        due = max(self.sim.scheduler.now_us + delay_us, self.next_free_us)
        if self.round_due_us is not None and self.round_due_us <= due:
            return
        self.round_due_us = due
        life = self.life
        self.sim.scheduler.at(due, lambda: self._round(life, due))

    def _round(self, life: int, due: int) -> None:
        node = self.node
        if node is None or life != self.life or self.round_due_us != due:
            return
        self.round_due_us = None
        sim = self.sim
        now = sim.scheduler.now
        inbound, self.inbound = self.inbound[:ROUND_MESSAGES_MAX], \
            self.inbound[ROUND_MESSAGES_MAX:]
        replies, self.replies = self.replies[:ROUND_MESSAGES_MAX], \
            self.replies[ROUND_MESSAGES_MAX:]
        woken, self.woken = self.woken, False
        sim.count("rounds")
        try:
            self.busy = sim.driver.round(self, node, inbound, replies, woken, now)
        except SystemExit:
            sim.fail(f"{self.name} stopped itself (storage full?)")
        except Exception:
            sim.fail(f"{self.name}'s round raised:\n{traceback.format_exc()}")
        if sim.errors.messages:
            sim.fail(f"{self.name} logged an error: {sim.errors.messages[0]}")
        self._note_role(str(node.life.role))
        self.next_free_us = sim.scheduler.now_us + sim.random_rounds.randint(
            *sim.faults.round_us)
        if self.busy or self.inbound or self.replies or self.woken:
            self.wake()
        else:
            # As the serve loop's poll: until the open transaction is due to commit, at most.
            due_s = node.due()
            wait_us = IDLE_ROUND_US if due_s is None else \
                min(IDLE_ROUND_US, max(0, int((due_s - now) * US_PER_S)) + US_PER_MS)
            self.wake(wait_us)

    def _note_role(self, role: str) -> None:
        if role != self.role:
            self.sim.note(f"{self.name}: {self.role} -> {role}", fault=False)
            self.role = role
            if role == "replica":
                self.rebuilding = False

    # --- sends (the edge) ---------------------------------------------------------------------
    def send_peer(self, peer: int, payloads: list[bytes], votes: bool = False) -> None:
        """Requests to a peer's router, from this life's link to it (or the vote log's)."""
        sim = self.sim
        target = sim.replicas[peer]
        identity = f"{self.index}:{self.life}{':votes' if votes else ''}".encode()
        source, life = self.index, self.life

        def deliver_reply(payload: bytes) -> None:
            sim.replicas[source].receive_reply(peer, life, payload)

        # The peer answers through its router to this name: the answer comes back to this
        # link while this life lasts (ZeroMQ names each connection).
        target.identities[identity] = deliver_reply
        for payload in payloads:
            sim.network.send(self.host, target.host,
                             functools.partial(target.receive, [identity, payload]))

    def answer(self, identity: bytes, payload: bytes) -> None:
        """An answer through the router: to a client, or to a peer's link."""
        sim = self.sim
        client = sim.hosts_by_identity.get(identity)
        if client is not None:
            sim.network.send(self.host, client.host, functools.partial(client.receive, payload))
            return
        deliver = self.identities.get(identity)
        if deliver is None:
            return   # nobody by that name (a vote log's link, which takes no answers)
        peer = sim.replicas[int(identity.split(b":")[0])]
        sim.network.send(self.host, peer.host, functools.partial(deliver, payload))

    def describe(self, keys: list[bytes]) -> str:
        """Its role and its own copy of each key, read as the node reads (in its open
        transaction, else a read transaction; held key states from memory)."""
        node = self.node
        if node is None:
            return f"{self.name} down"
        checkpoints = node.checkpoints
        parts = [f"{self.name} {node.life.role}"]
        if checkpoints.committing is not None:
            frozen = " ".join(sorted(key.decode() for key in checkpoints.frozen))
            parts[0] += f" (a commit under way, frozen: {frozen or 'none'})"
        with checkpoints.view() as txn:
            for key in keys:
                copy: Any
                try:
                    if key in INBOXES:
                        copy = node.store.scan(txn, key, b"", None, SCAN_ROWS_MAX)
                    else:
                        copy = node.store.get(txn, key)
                except KvError as e:
                    copy = e
                parts.append(f"{key.decode()} {_describe_answer(copy)}")
        return ", ".join(parts)


class SimReplicaNode(ReplicaNode):
    """A ReplicaNode whose vote log, committer, network and clock are the simulation's."""

    def __init__(self, host: _Replica):
        self.host = host
        self.clock = host.sim.clock   # (before the parts are built: they take it)
        super().__init__(host.config, host.name)

    def make_vote_log(self, path: Path, nonce: int, *, sync: bool,
                      must_exist: bool) -> VoteLog:
        return self.host.make_vote_log(path, nonce, sync=sync, must_exist=must_exist)

    def make_committer(self, store: Store, name: str) -> Committer:
        return self.host.make_committer(store)

    def make_edge(self) -> Network:
        host = self.host
        return FakeEdge(self.votes, [p.index for p in self.peers.linked], host.send_peer,
                        host.answer, lambda: host.sync_thread_sends)


class ReplicaDriver:
    """Starts, runs and kills a replica's node on the fakes, as its serve loop would."""

    def __init__(self, sim: Simulation):
        self.sim = sim

    def start(self, replica: _Replica) -> None:
        sim = self.sim
        replica.life += 1
        replica.binlog_read = 0
        replica.inbound, replica.replies, replica.woken = [], [], False
        replica.round_due_us = None
        # Votes sent by the sync thread (the path with libzmq found) or by the loop.
        sends = sim.faults.vote_sends
        replica.sync_thread_sends = sends == "sync-thread" or (
            sends == "either" and sim.random_disk.random() < 0.5)
        node = SimReplicaNode(replica)
        if replica.stopped_cleanly and node.counters["votes_replayed"]:
            # A clean stop that found no open transaction (a commit was under way) leaves
            # the votes logged since that commit began to be replayed: harmless, counted.
            sim.count("replays_after_clean_stop")
        replica.stopped_cleanly = False
        # What serve() does before its loop.
        node.stream.repair_half_installed()
        node.votes.start(-1)
        # The first sweep of idle clients within the run (then every CLIENT_SWEEP_INTERVAL_S),
        # so that its writes into the open transaction run too.
        node.next_client_sweep = sim.scheduler.now + sim.random_rounds.uniform(0, 3)
        replica.node = node
        replica.wake()

    def round(self, replica: _Replica, node: SimReplicaNode, inbound: list[list[bytes]],
              replies: list[tuple[int, bytes]], woken: bool, now: float) -> bool:
        """What the serve loop does once it has taken what arrived: True if busy."""
        if now >= node.next_client_sweep:
            node.sweep_idle_clients()
        if woken:
            node.woken(now)
            if not inbound and not replies and not replica.busy and not node.round_due(now):
                return False   # a sync ended and its messages went out: nothing else to do
        by_index = node.peers.by_index
        peers = []
        for index, payload in replies:
            peer = by_index[index]
            assert peer is not None
            peers.append((peer, payload))
        return node.round(inbound, peers, now)

    def crash(self, replica: _Replica) -> None:
        """What SIGKILL does: nothing of the node runs again; what LMDB committed stays (the
        commit under way landed or not), the open transaction is lost, and the vote log
        keeps its durable frames only."""
        node, replica.node = replica.node, None
        assert node is not None and replica.committer is not None and replica.votes is not None
        self._count(node)
        replica.committer.crash(self.sim.random_disk)
        replica.votes.crash()
        node.store.close()
        replica.identities.clear()
        replica._note_role("down")

    def stop(self, replica: _Replica) -> None:
        """What a clean stop (SIGTERM) does: the end of serve(), then the store closes."""
        node = replica.node
        assert node is not None
        node.stop_serving(clean=True)
        self._count(node)
        replica.node = None
        node.store.close()
        replica.identities.clear()
        replica.stopped_cleanly = True
        replica._note_role("down")

    def _count(self, node: SimReplicaNode) -> None:
        for name, value in node.counters.items():   # what paths the run took
            if not name.endswith("_us"):             # (not how long they took: wall time)
                self.sim.count(f"node.{name}", value)


# --- the simulation ------------------------------------------------------------------------------
class Simulation:
    """One seeded run of a replica group under faults (see the module docstring).

    `replicas` in the group (3 or 5, say); `clients` calling at once on the keys REGISTERS
    and INBOXES; `faults`; the replicas' `checkpoint_interval_ms`; `cas_ahead`: a
    compare-and-set may expect the version after the one its client last saw (off by
    default: see the known issue in tests/testdata/replica_sim/); `directory` for the
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
        self.replicas: list[_Replica] = []
        self.clients: list[_Client] = []
        self.checker = _Checker(self)
        self.hosts_by_identity: dict[bytes, _Host] = {self.checker.identity: self.checker}
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
        self.errors = _ErrorLog(DUPLICATE_ONLY_ERRORS if faults.duplicate else ())
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

    def read_binlog(self, replica: _Replica, store: Store) -> None:
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

    def send_request(self, client: _Host, target: int, spec: calls.CallSpec,
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

    def replica(self, name: str) -> _Replica:
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
                client = _Client(self, i, self.random_client.getrandbits(62) | 1)
                self.clients.append(client)
                self.hosts_by_identity[client.identity] = client
                self._next_call(client)
            self._plan_faults()
            self.run_until(lambda: self.scheduler.now_us >= self.calls_end_us, RUN_S_MAX,
                           "the run stopped")
            self._heal()
            self.run_until(lambda: all(c.call is None for c in self.clients), RUN_S_MAX,
                           "the clients did not finish their calls")
            self._settle()
            self._final_reads()
            self._check()
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
                self.replicas = [_Replica(self, i, r.node, config)
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
    def _next_call(self, client: _Client) -> None:
        self.scheduler.after(self.random_client.randint(*THINK_US),
                             lambda: self._start_call(client))

    def _start_call(self, client: _Client) -> None:
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
            self._record(client, op, result)
            self._next_call(client)

        client.start(_Call(spec, self.scheduler.now_us, done),
                     rng.randrange(self.replica_count))

    def _record(self, client: _Client, op: Op, result: Any) -> None:
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

    def _restart(self, replica: _Replica) -> None:
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

    # --- settling and the checks --------------------------------------------------------------
    def _settle(self) -> None:
        """Run until every replica votes with nothing open above what it applied, nothing
        in flight or waiting, and every replica's own copy of every key is the same."""
        self.scheduler.after(SETTLE_POLL_US, self._look)
        end_us = self.scheduler.now_us + int(SETTLE_S_MAX * US_PER_S)
        while not self.settled:
            due = self.scheduler.next_due_us()
            if due is None or due > end_us:
                looks = dict(zip([r.name for r in self.replicas], self.copies, strict=False))
                self.fail(f"the group did not settle within {SETTLE_S_MAX:g} s after the "
                          f"faults healed; last look: {looks}")
            self.scheduler.run_next()

    def _look(self) -> None:
        """Ask every replica its status, each key's versions (applied, highest open) and its
        own copy of every key (local reads); once every answer is in, the group has settled
        or is looked at again later."""
        specs: list[tuple[Any, calls.CallSpec]] = [
            ("status", calls.status()),
            ("versions", calls.CallSpec(None, Method.VERSIONS,
                                        protocol.VersionsRequest(list(KEYS)), _same))]
        specs += [(key, calls.get(key, consistency="local")) for key in REGISTERS]
        specs += [(key, calls.scan(key, b"", None, SCAN_ROWS_MAX, consistency="local"))
                  for key in INBOXES]
        answers: list[dict[Any, Any]] = [{} for _ in self.replicas]
        pending = [len(specs) * len(self.replicas)]

        def collected() -> None:
            self.copies = []
            for got in answers:
                copy: dict[Any, Any] = {key: _copy_of(got[key]) for key in KEYS}
                busy = _busy(got["status"], got["versions"])
                if busy:
                    copy["busy"] = busy
                self.copies.append(copy)
            if all(copy == self.copies[0] and "busy" not in copy for copy in self.copies):
                self.settled = True
            else:
                self.scheduler.after(SETTLE_POLL_US, self._look)

        for replica in self.replicas:
            for what, spec in specs:
                def done(result: Any, into: dict[Any, Any] = answers[replica.index],
                         what: Any = what) -> None:
                    into[what] = result
                    pending[0] -= 1
                    if not pending[0]:
                        collected()

                self.checker.call(replica.index, spec, done)

    def _final_reads(self) -> None:
        """A linearizable read of every key through every replica, part of the history: a
        write acknowledged and then lost would make these reads fail the check."""
        client = _Client(self, len(self.clients), self.random_client.getrandbits(62) | 1)
        self.hosts_by_identity[client.identity] = client
        plan = [(key, replica) for key in KEYS for replica in self.replicas]

        def next_read() -> None:
            if not plan:
                return
            key, replica = plan.pop(0)
            scan = key in INBOXES
            spec = calls.scan(key, b"", None, SCAN_ROWS_MAX) if scan else calls.get(key)
            op = Op(client.index, "scan" if scan else "get", key, None, UNKNOWN,
                    self.scheduler.now)
            self.history.append(op)

            def done(result: Any) -> None:
                if result is UNKNOWN:
                    self.fail(f"a final read of {key!r} through {replica.name} went "
                              "unanswered after the group settled")
                self._record(client, op, result)
                next_read()

            client.start(_Call(spec, self.scheduler.now_us, done), replica.index)

        next_read()
        self.run_until(lambda: not plan and client.call is None, RUN_S_MAX,
                       "the final reads did not finish")

    def _check(self) -> None:
        ok, problem = check(self.history)
        if not ok:
            self.fail(f"not linearizable: {problem}")
        for replica, copy in zip(self.replicas, self.copies, strict=True):
            for key in KEYS:
                self._check_acknowledged(replica.name, key, copy[key])
        self.count("history_ops", len(self.history))

    def _check_acknowledged(self, name: str, key: bytes, held: tuple[int, Any]) -> None:
        """Every acknowledged write of `key` is in this replica's copy, and the key's version
        counts exactly the writes applied: at least those acknowledged, at most those and
        the ones whose outcome is unknown."""
        version = held[0]
        writes = [op for op in self.history if op.key == key and op.kind not in ("get", "scan")]
        applied = [op for op in writes if op.result is not UNKNOWN and op.result[0] == "ok"]
        unknown = [op for op in writes if op.result is UNKNOWN]
        if not len(applied) <= version <= len(applied) + len(unknown):
            self.fail(f"{name} holds {key!r} at version {version}, but {len(applied)} writes "
                      f"were acknowledged and {len(unknown)} may have applied: a write was "
                      "lost or applied twice")
        top = max((self.acknowledged[id(op)] for op in applied), default=0)
        if version < top:
            self.fail(f"{name} holds {key!r} at version {version}, below the acknowledged "
                      f"version {top}")
        if key in INBOXES:
            rows = held[1]
            for op in applied:
                seq = op.result[1]
                if seq >= len(rows) or rows[seq] != op.argument:
                    self.fail(f"{name}: append {op.argument!r} acknowledged at seq {seq} is "
                              f"not there (rows {rows!r})")
            if len(set(rows)) != len(rows):
                self.fail(f"{name}: an append was applied twice: {rows!r}")


def _same(reply: Any) -> Any:
    return reply


def _busy(status: Any, versions: Any) -> str:
    """What keeps a replica from counting as settled ("" if nothing): not voting, proposals
    in flight, requests waiting, or a value accepted above the version it applied (an
    instance still to finish). Instances at or below it are not counted: a rebuilt life can
    keep some in memory (state answers of instances it then copied past)."""
    if not isinstance(status, dict):
        return f"no status ({status!r})"
    busy = []
    if status["role"] != "replica":
        busy.append(status["role"])
    if status["quorum"]["proposals_in_flight"]:
        busy.append(f"{status['quorum']['proposals_in_flight']} proposals in flight")
    if status["waiting"]["keys"]:
        busy.append(f"{status['waiting']['keys']} keys with waiting requests")
    if not isinstance(versions, protocol.VersionsReply):
        busy.append(f"no versions ({versions!r})")
    elif any(v.open > v.applied for v in versions.versions):
        busy.append("instances open above the applied version")
    return ", ".join(busy)


def _copy_of(answer: Any) -> Any:
    """A local read's answer as a comparable value: (version, value) or (version, rows)."""
    if isinstance(answer, NotFound):
        return (answer.version, None)
    if isinstance(answer, protocol.Versioned):
        return (answer.version, answer.value)
    if isinstance(answer, protocol.ScanPage):
        return (answer.version, tuple(row.value for row in answer.rows))
    return ("error", repr(answer))


def _describe_answer(answer: Any) -> str:
    """An answer (or a replica's own copy) as a script prints it."""
    if isinstance(answer, NotFound):
        return f"absent v{answer.version}"
    if isinstance(answer, VersionConflict):
        return f"conflict v{answer.version}"
    if isinstance(answer, KvError):
        return type(answer).__name__
    if isinstance(answer, protocol.MutateReply):
        result = answer.results[0] if answer.results else None
        return f"ok v{answer.version}" + (f" {result}" if result is not None else "")
    if isinstance(answer, protocol.Versioned):
        return f"v{answer.version} {answer.value.decode()}"
    if isinstance(answer, protocol.ScanPage):
        return f"v{answer.version} [{' '.join(r.value.decode() for r in answer.rows)}]"
    return repr(answer)


# --- scenario scripts ----------------------------------------------------------------------------
class Script:
    """A scenario script in the etcd-io/raft testdata style: blocks of a command, a line
    "----" and what the command printed, separated by blank lines ("#" lines are comments).
    `Script(text).run()` runs the commands on a simulated group (fixed timings, no random
    fault: the script makes its own) and gives the text back with what they print now.

        group [replicas=3] [checkpoint_ms=50]   start the group (each replica says its role)
        put|cas|incr|append|get|scan CLIENT NODE KEY [ARG] [expected=V] [local]
                                     send a call (a new op id); answers print in `run`
        retry CLIENT NODE            send the client's last call again (same op id) to NODE
        run MS                       let MS simulated milliseconds pass: what was answered
                                     (with how long after its send) and role changes
        crash|wipe|restart NODE      kill (the directory kept or deleted) or start a replica
        cut A B | mend A B | isolate NODE | heal     links between hosts (replicas, clients)
        commits MS                   later checkpoint commits take MS milliseconds
        state NODE KEY...            the node's role and its own copy of each key
        counters NODE NAME...        some of the node's counters
    """

    def __init__(self, text: str):
        self.text = text
        self.sim: Simulation | None = None
        self.out: list[str] = []
        self.clients: dict[str, _ScriptClient] = {}
        self._stack = contextlib.ExitStack()

    def run(self) -> str:
        blocks = []
        with self._stack:
            for comments, command in _script_blocks(self.text):
                self.out = []
                try:
                    self._do(command.split())
                except SimulationFailure as e:
                    self.out.append(f"failed: {str(e).splitlines()[0]}")
                blocks.append("\n".join([*comments, command, "----", *(self.out or ["ok"])]))
        return "\n\n".join(blocks) + "\n"

    def _group(self, words: list[str]) -> Simulation:
        options = dict(word.split("=") for word in words[1:])
        sim = Simulation(int(options.get("seed", 0)), replicas=int(options.get("replicas", 3)),
                         faults=Faults.scripted(),
                         checkpoint_interval_ms=int(options.get("checkpoint_ms", 50)))
        sim.listener = self.out.append
        self._stack.enter_context(sim.group())
        sim.run_until(lambda: all(r.role == "replica" for r in sim.replicas), 10.0,
                      "the group did not start")
        return sim

    def _do(self, words: list[str]) -> None:
        kind, args = words[0], words[1:]
        if kind == "group":
            self.sim = self._group(words)
            return
        sim = self.sim
        if sim is None:
            raise ValueError("a script starts with `group`")
        sim.listener = self.out.append
        if kind in ("put", "cas", "incr", "append", "get", "scan", "retry"):
            client = self.clients.get(args[0])
            if client is None:
                client = self.clients[args[0]] = _ScriptClient(sim, args[0])
            client.call(kind, args[1:])
        elif kind == "run":
            sim.scheduler.run_until(sim.scheduler.now_us + int(float(args[0]) * US_PER_MS))
        elif kind in ("crash", "wipe", "restart"):
            self._life(sim, kind, sim.replica(args[0]))
        elif kind in ("cut", "mend"):
            getattr(sim.network, kind)(args[0], args[1])
        elif kind == "isolate":
            for host in [r.host for r in sim.replicas] + sorted(self.clients):
                if host != args[0]:
                    sim.network.cut(args[0], host)
        elif kind == "heal":
            sim.network.heal()
        elif kind == "commits":
            sim.faults.commit_ms = (float(args[0]), float(args[0]))
        elif kind == "state":
            self.out.append(sim.replica(args[0]).describe([a.encode() for a in args[1:]]))
        elif kind == "counters":
            node = sim.replica(args[0]).node
            counters = node.counters if node is not None else {}
            self.out.append(", ".join(f"{name} {counters.get(name, 0)}" for name in args[1:]))
        else:
            raise ValueError(f"unknown command {kind!r}")

    @staticmethod
    def _life(sim: Simulation, kind: str, replica: _Replica) -> None:
        if kind == "restart":
            sim.driver.start(replica)
            return
        sim.driver.crash(replica)
        if kind == "wipe":
            shutil.rmtree(replica.data_dir)


class _ScriptClient:
    """A client of a script: each call has an op id of its own; `retry` sends the last one
    again (same op id, new request id); answers are noted as they arrive."""

    def __init__(self, sim: Simulation, name: str):
        self.sim = sim
        self.name = self.host = name
        self.identity = name.encode()
        self.client_id = 1000 + len(sim.hosts_by_identity)
        self.seq = 0
        self.request_id = 0
        self.last: tuple[calls.CallSpec, str] | None = None
        self.sent: dict[int, tuple[calls.CallSpec, str, str, int]] = {}
        sim.hosts_by_identity[self.identity] = self

    def call(self, kind: str, args: list[str]) -> None:
        if kind == "retry":
            if self.last is None:
                raise ValueError(f"{self.name} has no call to retry")
            self._send(*self.last, args[0])
            return
        node, key = args[0], args[1].encode()
        values = [a for a in args[2:] if "=" not in a and a != "local"]
        expected = next((int(a.split("=")[1]) for a in args if a.startswith("expected=")),
                        None)
        consistency = "local" if "local" in args else "linearizable"
        self.seq += 1
        op_id = (self.client_id, self.seq)
        if kind in ("put", "cas"):
            spec = calls.put(key, values[0].encode(), expected, op_id)
        elif kind == "incr":
            spec = calls.incr(key, int(values[0]) if values else 1, expected, op_id)
        elif kind == "append":
            spec = calls.append(key, values[0].encode(), op_id)
        elif kind == "get":
            spec = calls.get(key, consistency)
        else:
            spec = calls.scan(key, b"", None, SCAN_ROWS_MAX, consistency)
        self.last = (spec, " ".join([kind, *args[1:]]))
        self._send(*self.last, node)

    def _send(self, spec: calls.CallSpec, what: str, node: str) -> None:
        sim = self.sim
        self.request_id += 1
        self.sent[self.request_id] = (spec, what, node, sim.scheduler.now_us)
        sim.send_request(self, sim.replica(node).index, spec, self.request_id, CALL_TIMEOUT_US)

    def receive(self, payload: bytes) -> None:
        for _kind, status, request_id, _budget, body in _core.decode_frames(payload)[0]:
            sent = self.sent.pop(request_id, None)
            if sent is None:
                continue
            spec, what, node, at_us = sent
            try:
                answer = _describe_answer(protocol.parse_reply(spec.method, status, body))
            except KvError as e:
                answer = _describe_answer(e)
            took_ms = (self.sim.scheduler.now_us - at_us) / US_PER_MS
            self.sim.note(f"{self.name} {what} at {node}: {answer} (+{took_ms:.1f}ms)",
                          fault=False)


def _script_blocks(text: str) -> Iterator[tuple[list[str], str]]:
    """(comment lines, command) of each block of a script (what it printed is dropped)."""
    for block in text.strip().split("\n\n"):
        lines = block.strip().splitlines()
        commands = [line for line in lines if not line.startswith("#")]
        if commands:
            yield [line for line in lines if line.startswith("#")], commands[0]


# --- running seeds -------------------------------------------------------------------------------
def run_seeds(seeds: list[int], options: dict[str, Any] | None = None,
              duration_s: float = 3.0) -> dict[int, str]:
    """Run each seed with `options` (Simulation's keyword arguments, `faults` as a dict) in
    this process; the failures' messages, by seed."""
    options = dict(options or {})
    fields: dict[str, Any] = {name: tuple(value) if isinstance(value, list) else value
                              for name, value in options.pop("faults", {}).items()}
    failures = {}
    for seed in seeds:
        try:
            Simulation(seed, faults=Faults(**fields), **options).run(duration_s)
        except SimulationFailure as e:
            failures[seed] = str(e)
    return failures


def run_seeds_replayable(seeds: list[int], options: dict[str, Any] | None = None,
                         duration_s: float = 3.0) -> dict[int, str]:
    """run_seeds in a process whose PYTHONHASHSEED is HASH_SEED (this one if it is), so that
    each seed runs as it will when its failure is replayed in another process."""
    if os.environ.get("PYTHONHASHSEED") == HASH_SEED:
        return run_seeds(seeds, options, duration_s)
    command = [sys.executable, "-m", "kvsvr.testing.replica_sim", "--json",
               "--seeds", ",".join(map(str, seeds)), "--duration", str(duration_s),
               "--options", json.dumps(options or {})]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONHASHSEED": HASH_SEED})
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return {int(seed): message for seed, message in json.loads(done.stdout).items()}


def _seed_list(text: str) -> list[int]:
    """"3", "0-99" or "1,5,7-9" as a list of seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds.extend(range(int(low), int(high or low) + 1))
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvsvr.testing.replica_sim",
        description="Run the replica group simulation for some seeds (a failure's message "
                    "gives the command that replays it), or a scenario script.")
    parser.add_argument("--seeds", type=_seed_list, default=[0], help='e.g. "5" or "0-99"')
    parser.add_argument("--options", type=json.loads, default={},
                        help="Simulation's keyword arguments as JSON (faults as an object)")
    parser.add_argument("--duration", type=float, default=3.0,
                        help="simulated seconds the clients call for")
    parser.add_argument("--script", help="run a scenario script and print it with what its "
                                         "commands print now")
    parser.add_argument("--json", action="store_true",
                        help="print the failures as a JSON object by seed")
    args = parser.parse_args(argv)
    if not args.json:
        logging.basicConfig(level=logging.WARNING)
    if args.script:
        print(Script(Path(args.script).read_text()).run(), end="")
        return 0
    failures = run_seeds(args.seeds, args.options, args.duration)
    if args.json:
        print(json.dumps(failures))
    else:
        for seed in args.seeds:
            print(failures.get(seed, f"seed {seed}: ok"))
    return 1 if failures else 0


__all__ = ["Faults", "Outcome", "Script", "Simulation", "SimulationFailure", "run_seeds",
           "run_seeds_replayable"]


if __name__ == "__main__":
    sys.exit(main())
