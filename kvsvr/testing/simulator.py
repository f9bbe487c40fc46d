"""A deterministic simulation of one replica group's version quorum.

All replicas run in one process on a fake clock; a seeded random source drives a network
that drops, duplicates, delays and reorders messages, and crashes (losing everything not
persisted) and disk wipes. The same seed replays the same run exactly.

Safety is checked against ground truth, not the replicas' own claims: every acceptance a
replica persists is logged, and a value counts as chosen for (key, version) when a majority
accepted it at one ballot. Two different chosen values for one (key, version), or a replica
deciding a value that was not chosen, is a violation.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from kvsvr import _core
from kvsvr._core import (
    FENCE,
    INSTANCE,
    REBUILT,
    FenceRecord,
    InstanceRecord,
    PersistRecord,
    RebuiltRecord,
)
from kvsvr.protocol import decode_quorum, encode_quorum


@dataclass
class Faults:
    drop: float = 0.1          # chance a message is lost
    duplicate: float = 0.05    # chance a message is delivered twice
    max_delay: int = 20        # ticks; delays differ, so messages reorder
    min_delay: int = 0         # ticks every message takes at least (a slow network or node)
    crash: float = 0.002       # chance per tick that an up replica crashes (keeps its disk)
    wipe: float = 0.0005       # chance per tick that a crash also loses the disk
    restart: float = 0.05      # chance per tick that a down replica comes back
    propose: float = 0.3       # chance per tick that some replica starts a proposal


@dataclass
class _Node:
    index: int
    replica: _core.QuorumReplica
    # What the replica persisted, by record identity: (INSTANCE, key, version), (FENCE, peer),
    # (REBUILT or VERIFIED, incarnation).
    disk: dict[tuple, PersistRecord] = field(default_factory=dict)
    up: bool = True
    wiped: bool = False        # lost its disk; comes back as a new incarnation that rebuilds
    incarnation: int = 1
    known_version: dict[bytes, int] = field(default_factory=dict)  # highest decided version
    counter: int = 0
    applied: dict[bytes, int] = field(default_factory=dict)  # floors (apply mode; on disk)
    rebuild_floors: dict[bytes, int] = field(default_factory=dict)  # peers' floors when they
    # answered this rebuilding life's state requests (apply mode; the node's catch-up target)


class Violation(AssertionError):
    pass


class Simulation:
    def __init__(self, seed: int, replicas: int = 3, keys: int = 3, faults: Faults | None = None,
                 unsafe_amnesia: bool = False, wire: bool = False, apply: bool = False,
                 unsafe_floor: bool = False):
        """`wire`: every message goes through the QUORUM wire codec on its way, and proposed
        values are real binlog records (as the replicated node will send them).
        `apply`: replicas apply chosen versions in order and forget them, as the node does,
        and every message is stepped with the key's floor (the applied version); a replica
        that lags learns missing versions from a peer that applied them (the binlog stream's
        job in the node). A wiped replica takes every peer's floors before it may vote (the
        node's data catch-up before voting). `unsafe_floor`: step with floor 0 anyway (the
        bug to catch: an acceptor votes again on an instance it forgot)."""
        self.seed = seed
        self.random = random.Random(seed)
        self.replicas = replicas
        self.keys = [f"key{i}".encode() for i in range(keys)]
        self.faults = faults or Faults()
        self.unsafe_amnesia = unsafe_amnesia  # a wiped replica votes at once (the bug to catch)
        self.wire = wire
        self.apply = apply
        self.unsafe_floor = unsafe_floor
        self.applied_values: dict[tuple[bytes, int], object] = {}  # what any replica applied
        self.state_floors: list[dict[bytes, int]] = []  # a STATE answer's sender's floors
        self.now = 0   # the fake clock: ticks of one millisecond, the core's time unit
        # Its own random source, so the fault schedule of a seed is the same as before parts.
        self.lives = random.Random(seed * 7919 + 1)
        # Most seeds cut state answers into parts of a record or a few (out of order, lost,
        # duplicated, mixed with older answers by the faults); some keep them whole.
        self.state_part_bytes = self.lives.choice([1, 300, _core.STATE_PART_BYTES])
        self.nodes = [_Node(i, self._replica(i, 1)) for i in range(replicas)]
        self.in_flight: list[tuple[int, int, _core.Message]] = []
        self.sequence = 0
        # ground truth: (key, version, ballot) -> value and the nodes that accepted it
        self.accepts: dict[tuple[bytes, int, int], tuple[object, set[int]]] = {}
        self.chosen: dict[tuple[bytes, int], object] = {}
        self.decided: list[tuple[int, bytes, int, object]] = []
        self.messages_sent = 0

    # --- plumbing: persist, then send ------------------------------------------------------
    def _drain(self, node: _Node) -> None:
        """Persist, then send, and log the acceptances this step made (the ground truth).

        An acceptance is evidenced by the acceptor itself: an ACCEPTED reply it emitted (even
        if the network then loses it), or a proposer accepting its own proposal, which shows
        as a persisted accepted ballot of its own current life. Records a rebuild copied from
        peers are not acceptances.
        """
        ready = node.replica.ready()
        for learned in node.replica.take_learned():
            # (Not put on the node's disk: the node logs these too, but the protocol must
            # not need them, so a restart here forgets them.)
            self._check_learned(node.index, learned.key, learned.version, learned.chosen_value)
        for record in ready.persist:
            if isinstance(record, FenceRecord):
                node.disk[(FENCE, record.peer)] = record
                continue
            if not isinstance(record, InstanceRecord):
                node.disk[(record.kind, record.incarnation)] = record   # REBUILT, VERIFIED
                continue
            key, version = record.key, record.version
            node.disk[(INSTANCE, key, version)] = record
            if record.chosen_value is not None:
                self._check_learned(node.index, key, version, record.chosen_value)
            ballot = record.accepted_ballot
            if (ballot and _core.ballot_node(ballot) == node.index
                    and _core.ballot_incarnation(ballot) == node.incarnation):
                self._record_accept(node.index, key, version, ballot, record.accepted_value)
        node.replica.advance(ready)
        for message in ready.send:
            if self.apply and message.kind == _core.MSG_STATE:
                # As the node stamps its binlog position on a STATE answer: the rebuilding
                # replica will hold this sender's data as of now before it votes.
                self.state_floors.append(dict(node.applied))
                message = _core.Message(message.kind, message.source, message.target,
                                        message.incarnation, message.key,
                                        len(self.state_floors) - 1, message.ballot,
                                        message.accepted_ballot, message.value)
            if message.kind == _core.MSG_ACCEPTED:
                accepted = node.disk[(INSTANCE, message.key, message.version)]
                assert isinstance(accepted, InstanceRecord)
                assert accepted.accepted_ballot == message.ballot, \
                    "ACCEPTED without the acceptance persisted"
                self._record_accept(node.index, message.key, message.version, message.ballot,
                                    accepted.accepted_value)
            self._send(message)
        for decided in ready.decided:
            key, version, value = decided.key, decided.version, decided.value
            if value is None:
                continue  # taken (BEHIND) or a recovery that found nothing: no claim made
            self.decided.append((node.index, key, version, value))
            truth = self.chosen.get((key, version))
            if truth is None or truth != value:
                raise Violation(f"seed {self.seed}: node {node.index} decided {value!r} for "
                                f"{key!r} v{version}, chosen is {truth!r}")
            node.known_version[key] = max(node.known_version.get(key, 0), version)
        if self.apply:
            self._apply_chosen(node)

    def _apply_chosen(self, node: _Node) -> None:
        """Apply, in version order, what this replica knows chosen, and forget it."""
        for key in self.keys:
            while True:
                version = node.applied.get(key, 0) + 1
                value = node.replica.chosen_value(key, version)
                if value is None:
                    break
                self._check_learned(node.index, key, version, value)
                node.applied[key] = version
                self.applied_values[(key, version)] = value
                node.known_version[key] = max(node.known_version.get(key, 0), version)
                node.replica.forget(key, version, value)
                node.disk.pop((INSTANCE, key, version), None)

    def _catch_up(self, node: _Node, key: bytes) -> None:
        """The binlog stream: a version some peer applied is applied here too, in order."""
        while (key, node.applied.get(key, 0) + 1) in self.applied_values:
            version = node.applied.get(key, 0) + 1
            value = self.applied_values[(key, version)]
            node.applied[key] = version
            node.known_version[key] = max(node.known_version.get(key, 0), version)
            node.replica.forget(key, version, value)
            node.disk.pop((INSTANCE, key, version), None)
        self._drain(node)

    def _step(self, node: _Node, message: _core.Message) -> None:
        floor = node.applied.get(message.key, 0) if self.apply and not self.unsafe_floor else 0
        rebuilding = node.replica.rebuilding
        if self.apply and rebuilding and message.kind == _core.MSG_STATE:
            for key, version in self.state_floors[message.version].items():
                node.rebuild_floors[key] = max(node.rebuild_floors.get(key, 0), version)
        node.replica.step(message, float(self.now), floor)
        if self.apply and rebuilding and not node.replica.rebuilding:
            # Rebuilt: the data of every peer as of its answer is here before any vote.
            for key, version in node.rebuild_floors.items():
                node.applied[key] = max(node.applied.get(key, 0), version)
                for dropped in node.replica.forget_through(key, node.applied[key]):
                    node.disk.pop((INSTANCE, key, dropped), None)
            node.rebuild_floors.clear()
        self._drain(node)
        if self.apply and message.kind == _core.MSG_BEHIND:
            self._catch_up(node, message.key)

    def _check_learned(self, node: int, key: bytes, version: int, value: object) -> None:
        """A value a replica records as chosen (from its own proposal, a CHOSEN message or a
        rebuild) must be the value that really was chosen."""
        truth = self.chosen.get((key, version))
        if truth != value:
            raise Violation(f"seed {self.seed}: node {node} learned {value!r} for {key!r} "
                            f"v{version}, chosen is {truth!r}")

    def _record_accept(self, node: int, key: bytes, version: int, ballot: int,
                       value: object) -> None:
        entry = self.accepts.get((key, version, ballot))
        if entry is None:
            entry = self.accepts[(key, version, ballot)] = (value, set())
        elif entry[0] != value:
            raise Violation(f"seed {self.seed}: two values at one ballot {ballot} for "
                            f"{key!r} v{version}: {entry[0]!r} and {value!r}")
        entry[1].add(node)
        if len(entry[1]) >= _core.majority(self.replicas):
            earlier = self.chosen.setdefault((key, version), value)
            if earlier != value:
                raise Violation(f"seed {self.seed}: {key!r} v{version} chose {earlier!r} and "
                                f"{value!r}")

    def _send(self, message: _core.Message) -> None:
        self.messages_sent += 1
        if self.wire:
            message = decode_quorum(encode_quorum([message]))[0]
        faults = self.faults
        if self.random.random() < faults.drop:
            return
        copies = 2 if self.random.random() < faults.duplicate else 1
        for _ in range(copies):
            self.sequence += 1
            deliver_at = self.now + 1 + faults.min_delay + self.random.randrange(
                max(1, faults.max_delay - faults.min_delay))
            self.in_flight.append((deliver_at, self.sequence, message))

    # --- faults ---------------------------------------------------------------------------
    def crash(self, index: int, wipe: bool = False) -> None:
        node = self.nodes[index]
        node.up = False
        node.rebuild_floors.clear()
        if wipe:
            node.wiped = True
            node.disk.clear()
            node.known_version.clear()
            node.applied.clear()

    def _replica(self, index: int, incarnation: int,
                 rebuilding: bool = False) -> _core.QuorumReplica:
        return _core.QuorumReplica(index, self.replicas, incarnation, rebuilding=rebuilding,
                                   state_part_bytes=self.state_part_bytes,
                                   answer_base=self.lives.getrandbits(32))

    def restart(self, index: int) -> None:
        """Bring a replica back: from its disk, or, if the disk was wiped, as a new life.
        (An empty disk that was never wiped is a replica that never voted: no past to fear.)"""
        node = self.nodes[index]
        wiped, node.wiped = node.wiped, False
        if wiped:
            node.incarnation += 1
            node.replica = self._replica(index, node.incarnation,
                                         rebuilding=not self.unsafe_amnesia)
            if self.unsafe_amnesia:  # the bug to catch: vote at once, as if never wiped
                node.replica.restore([RebuiltRecord(REBUILT, node.incarnation)])
        else:
            node.replica = self._replica(index, node.incarnation)
            node.replica.restore(list(node.disk.values()))
        node.up = True
        self._drain(node)

    def propose(self, index: int, key: bytes, value: object | None = None,
                version: int | None = None) -> bool:
        node = self.nodes[index]
        if not node.up:
            return False
        node.counter += 1
        value = value if value is not None else f"n{index}i{node.incarnation}c{node.counter}"
        if self.apply:
            version = version or node.applied.get(key, 0) + 1
            if node.replica.proposing(key, version):
                return False
        version = version or node.known_version.get(key, 0) + 1
        if self.wire and isinstance(value, str):
            value = _core.encode_record(0, version, index + 1, node.counter, key,
                                        [(_core.OP_PUT, b"", value.encode())])
        started = node.replica.propose(key, version, value, self.now)
        self._drain(node)
        return bool(started)

    # --- scripted control (for scenario tests) --------------------------------------------
    def pending(self) -> list[_core.Message]:
        return [m for _at, _seq, m in sorted(self.in_flight, key=lambda m: (m[0], m[1]))]

    def deliver_where(self, predicate: Callable[[_core.Message], bool]) -> int:
        """Deliver, now and in order, every in-flight message matching `predicate`."""
        chosen = [m for m in sorted(self.in_flight, key=lambda m: (m[0], m[1]))
                  if predicate(m[2])]
        self.in_flight = [m for m in self.in_flight if m not in chosen]
        for _at, _seq, message in chosen:
            node = self.nodes[message.target]
            if node.up:
                self._step(node, message)
        return len(chosen)

    def drop_where(self, predicate: Callable[[_core.Message], bool]) -> int:
        before = len(self.in_flight)
        self.in_flight = [m for m in self.in_flight if not predicate(m[2])]
        return before - len(self.in_flight)

    # --- the clock --------------------------------------------------------------------------
    def deliver_due(self) -> None:
        due = [m for m in self.in_flight if m[0] <= self.now]
        if not due:
            return
        self.in_flight = [m for m in self.in_flight if m[0] > self.now]
        for _at, _seq, message in sorted(due, key=lambda m: (m[0], m[1])):
            node = self.nodes[message.target]
            if node.up:
                self._step(node, message)

    def tick(self, faults: bool = True) -> None:
        self.now += 1
        f = self.faults
        if faults:
            for node in self.nodes:
                if node.up and self.random.random() < f.crash:
                    # The promise is to survive the loss of any ONE replica's disk: wipe only
                    # while every other replica is up, has its disk and has rebuilt.
                    others_whole = all(o.up and not o.wiped and not o.replica.rebuilding
                                       for o in self.nodes if o is not node)
                    wipe = others_whole and self.random.random() < f.wipe / f.crash
                    self.crash(node.index, wipe=wipe)
                elif not node.up and self.random.random() < f.restart:
                    self.restart(node.index)
            if self.random.random() < f.propose:
                self.propose(self.random.randrange(self.replicas), self.random.choice(self.keys))
        self.deliver_due()
        for node in self.nodes:
            if node.up:
                node.replica.tick(float(self.now))
                self._drain(node)

    def heal(self) -> None:
        """Stop faults: every replica up, nothing dropped or duplicated from now on."""
        self.faults = Faults(drop=0.0, duplicate=0.0, max_delay=self.faults.max_delay,
                             min_delay=self.faults.min_delay, crash=0.0, wipe=0.0,
                             restart=0.0, propose=0.0)
        for node in self.nodes:
            if not node.up:
                self.restart(node.index)

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            self.tick()

    def settle(self, max_ticks: int = 20_000) -> None:
        """After heal(): run until no proposal is in flight; a live protocol must get there."""
        for _ in range(max_ticks):
            if not any(n.replica.proposals_in_flight for n in self.nodes) and not self.in_flight:
                return
            self.tick(faults=False)
        stuck = {n.index: n.replica.proposals_in_flight for n in self.nodes}
        raise Violation(f"seed {self.seed}: not settled after {max_ticks} ticks: {stuck}")

    def summary(self) -> dict[str, int]:
        by_key: dict[bytes, int] = defaultdict(int)
        for key, _version in self.chosen:
            by_key[key] += 1
        return {"chosen": len(self.chosen), "decided": len(self.decided),
                "messages": self.messages_sent, "ticks": self.now}
