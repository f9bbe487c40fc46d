"""Client work waiting in a replica, per key: writes are proposed as the key's next version
one at a time, in arrival order, and answered once chosen; a linearizable read waits for a
version barrier (a majority's applied and open versions of the key, kvsvr/replica/barriers.py)
and is answered from local LMDB once this replica is at least that new.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import msgspec

from kvsvr import _core, protocol
from kvsvr._core import Decided
from kvsvr.errors import (
    Internal,
    InvalidArgument,
    KvError,
    Timeout,
    Unavailable,
    VersionConflict,
)
from kvsvr.limits import PEER_DOWN_AFTER_S
from kvsvr.monitor import registry as monitor_ids
from kvsvr.monitor.counters import CounterSink
from kvsvr.protocol import CONSISTENCY_LOCAL, Method, MutateReply, MutateRequest
from kvsvr.replica.checkpoints import Checkpoints, LocalRead
from kvsvr.replica.lives import Life
from kvsvr.replica.network import Network
from kvsvr.replica.peers import Peers
from kvsvr.replica.stream import Stream
from kvsvr.single import error_frame
from kvsvr.store import Store, plan

log = logging.getLogger("kvsvr.replica")

_RESPONSE = _core.FRAME_RESPONSE
_encode = protocol.encode
_encode_frame = _core.encode_frame
_READS = frozenset({Method.GET, Method.ROW_GET, Method.SCAN, Method.CHANGES})
_MUTATE = Method.MUTATE

_arrivals = itertools.count(1)


class Waiter:
    """A client request this replica cannot answer yet."""

    __slots__ = ("arrival", "barrier", "confirmed", "deadline", "identity", "method", "open",
                 "proposed", "received", "reply", "request", "request_id", "target")

    def __init__(self, identity: bytes, request_id: int, method: int, request: Any,
                 deadline: float, received: float):
        self.identity = identity
        self.request_id = request_id
        self.method = method
        self.request = request
        self.deadline = deadline
        self.barrier = 0          # the version barrier it waits for (0: none)
        self.target = -1          # ... whose result: the majority's highest applied version
        self.open = 0             # ... and highest open (maybe chosen) version
        self.confirmed = False    # a barrier found this replica current for the key
        self.proposed = 0         # version a write was proposed at (0: not in flight)
        self.reply: Any = None    # ... and its answer if that proposal is chosen
        self.arrival = next(_arrivals)  # a read waits for the writes of its key before it
        self.received = received  # for the latency bucket ids


class KeyWork:
    __slots__ = ("need_floor", "reads", "writes")

    def __init__(self) -> None:
        self.writes: deque[Waiter] = deque()
        self.reads: list[Waiter] = []
        self.need_floor = 0       # a peer applied this far (BEHIND): catch up before proposing


class Work:
    """The waiting client requests by key, and the keys whose work must be looked at."""

    def __init__(self, name: str, group: str, store: Store, peers: Peers, life: Life,
                 checkpoints: Checkpoints, stream: Stream, edge: Network,
                 counters: Counter[str], monitor: CounterSink, *,
                 read: Callable[[int, Any, Any], Any], check_owned: Callable[[bytes], None],
                 observe_latency: Callable[[float], None], clock: Callable[[], float]):
        self._name = name
        self._group = group
        self._store = store
        self._peers = peers
        self._life = life
        self._checkpoints = checkpoints
        self._stream = stream
        self._edge = edge
        self._answer = edge.answer
        self._counters = counters
        self._monitor = monitor
        self._read = read
        self._check_owned = check_owned
        self._observe_latency = observe_latency
        self._clock = clock
        self.keys: dict[bytes, KeyWork] = {}
        self.dirty: set[bytes] = set()   # keys whose work the next round looks at
        self.want_barrier: dict[bytes, list[Waiter]] = {}   # waiters a barrier is asked for
        self._anonymous_client = secrets.randbits(62) | 2  # op ids for requests without one
        self._anonymous_seq = itertools.count(1)

    # --- taking requests ----------------------------------------------------------------------
    def client_request(self, identity: bytes, request_id: int, method: int, request: Any,
                       deadline: float, txn: Any, now: float) -> None:
        """A client's keyed request: answered now (a local read), or waiting here."""
        key = request.key
        self._check_owned(key)
        life = self._life
        if not life.voting:
            raise Unavailable(f"node {self._name} is {life.role}; try another replica",
                              field="node")
        if (method == _MUTATE or request.consistency != CONSISTENCY_LOCAL) \
                and not self._peers.majority_heard(now):
            # Said at once, and true (nothing was proposed): waiting out the deadline ended
            # in an ambiguous Timeout, and the write went on once the peers came back.
            raise Unavailable(
                f"node {self._name}: no majority of group {self._group} is reachable "
                f"({', '.join(self._peers.silent(now))} silent for over "
                f"{PEER_DOWN_AFTER_S:g} s)", field="node")
        if method in _READS:
            if request.consistency == CONSISTENCY_LOCAL:
                if key in self._checkpoints.frozen:
                    # Its newest version is in the commit under way: answered when it ends,
                    # so a local read never goes back behind one this node gave before.
                    self._checkpoints.local_later.append((identity, request_id, method,
                                                          request))
                    return
                self._answer(identity, _encode_frame(_RESPONSE, 0, request_id, 0,
                                                     _encode(self._read(method, request, txn))))
                return
            waiter = Waiter(identity, request_id, method, request, deadline, now)
            work = self.keys.get(key)
            if work is None:
                work = self.keys[key] = KeyWork()
            work.reads.append(waiter)
            self.await_barrier(key, waiter)
            return
        if method != _MUTATE:
            raise InvalidArgument(f"method: {method} is not served here", field="method")
        if not request.client_id:
            request = msgspec.structs.replace(request, client_id=self._anonymous_client,
                                              client_seq=next(self._anonymous_seq))
        work = self.keys.get(key)
        if work is None:
            work = self.keys[key] = KeyWork()
        work.writes.append(Waiter(identity, request_id, method, request, deadline, now))
        self.dirty.add(key)

    def behind(self, key: bytes, floor: int) -> None:
        """A peer applied the key up to `floor` (BEHIND): catch up before proposing."""
        work = self.keys.get(key)
        if work is not None:
            work.need_floor = max(work.need_floor, floor)
            self.dirty.add(key)

    # --- moving work on -----------------------------------------------------------------------
    def progress(self, now_ms: float) -> None:
        """Move on the work of the keys marked dirty (`now_ms`: the round's time for the
        quorum core, in milliseconds)."""
        if not self.dirty:
            return
        dirty, self.dirty = self.dirty, set()
        checkpoints = self._checkpoints
        frozen, later = checkpoints.frozen, checkpoints.apply_later
        keys = self.keys
        counters = self._counters
        with checkpoints.view() as txn:
            for key in dirty:
                work = keys.get(key)
                if work is None:
                    continue
                if not work.writes and not work.reads:
                    del keys[key]
                    continue
                if key in later:
                    checkpoints.thaw.add(key)   # its chosen versions wait for the commit
                    counters["work_held_by_checkpoint"] += 1
                    continue
                if key in frozen:
                    # Its state is in the commit under way: reads wait for it, writes go on
                    # from the state kept in memory when that is safe.
                    writable = bool(work.writes) and self._writable_frozen(key, work)
                    if work.reads or not writable:
                        checkpoints.thaw.add(key)
                    if not writable:
                        counters["work_held_by_checkpoint"] += 1
                        continue
                    counters["writes_through_checkpoint"] += 1
                    self._progress_write(key, work, frozen[key], txn, now_ms)
                    if not work.writes and not work.reads:
                        del keys[key]
                    continue
                floor = checkpoints.latest(txn, key).version
                if work.writes:
                    self._progress_write(key, work, floor, txn, now_ms)
                if work.reads:
                    self._progress_reads(key, work, floor, now_ms)
                if not work.writes and not work.reads:
                    del keys[key]

    def _writable_frozen(self, key: bytes, work: KeyWork) -> bool:
        """Whether writes to a key the commit under way holds can be proposed now: its newest
        state is kept in memory (a read transaction has an older one), and no waiting write
        is a retry of an op the commit holds (its first answer is in there)."""
        state = self._store.cached_state(key)
        ops = self._checkpoints.frozen_ops
        if state is None or state.version != self._checkpoints.frozen[key] or ops is None:
            return False
        return not any((w.request.client_id, w.request.client_seq) in ops
                       for w in work.writes)

    def _progress_reads(self, key: bytes, work: KeyWork, floor: int, now_ms: float) -> None:
        """Reads whose barrier answered: serve, catch up, or finish an open instance."""
        quorum = self._life.quorum
        assert quorum is not None
        waiting = []
        answer = []
        # A read waits for writes to its key that arrived before it (pipelined after them),
        # so a client sees its own writes in the order it sent them.
        write_arrival = work.writes[0].arrival if work.writes else 0
        for waiter in work.reads:
            if write_arrival and write_arrival < waiter.arrival:
                waiting.append(waiter)
            elif waiter.barrier or waiter.target < 0:
                waiting.append(waiter)          # its barrier has not answered yet
            elif floor < waiter.target:
                waiting.append(waiter)          # a majority applied more: the stream brings it
                self._stream.pull_soon()
            elif waiter.open > floor:
                # Maybe chosen, not applied anywhere we asked: finish it, then ask again.
                waiting.append(waiter)
                if not quorum.proposing(key, floor + 1) and not work.writes:
                    quorum.propose(key, floor + 1, None, now_ms, recover=True)
                    self._counters["read_recoveries"] += 1
                self.await_barrier(key, waiter)
            else:
                answer.append(waiter)
        work.reads = waiting
        if answer:
            with self._checkpoints.view() as txn:
                for waiter in answer:
                    try:
                        self.answer_ok(waiter, self._read(waiter.method, waiter.request, txn))
                    except KvError as e:
                        self.answer_error(waiter.identity, waiter.request_id, e)

    def _progress_write(self, key: bytes, work: KeyWork, floor: int, txn: Any,
                        now_ms: float) -> None:
        """The head write of a key: answer it if it is done or doomed, else propose it."""
        quorum = self._life.quorum
        assert quorum is not None
        while work.writes:
            waiter = work.writes[0]
            request: MutateRequest = waiter.request
            if waiter.proposed:
                return  # in flight, or decided and not yet applied (see decided)
            try:
                reply = self._store.remembered(txn, key, request.ops, request.client_id,
                                               request.client_seq)
                if reply is not None:
                    work.writes.popleft()
                    self.answer_ok(waiter, reply)
                    self._counters["mutations_acknowledged"] += 1
                    continue
                if floor < work.need_floor:
                    self._stream.pull_soon()
                    return  # a peer is ahead: catch up before proposing
                if waiter.barrier:
                    return  # a barrier is wanted or under way
                if waiter.target >= 0 and not self._barrier_settled(key, waiter, floor,
                                                                     now_ms):
                    return
                state = self._checkpoints.latest(txn, key)
                expected = request.expected_version
                if expected is not None and expected != state.version:
                    # A conflict is sure once the key is past `expected`, but the version it
                    # reports must be current too: so only after a barrier.
                    if waiter.confirmed:
                        raise VersionConflict(
                            f"expected version {expected}, the key is at {state.version}",
                            field="expected_version", version=state.version)
                    self.await_barrier(key, waiter)
                    return
                ops = [(op.kind, op.row, op.value) for op in request.ops]
                try:
                    results = plan(state, ops)[2]
                except KvError:
                    if waiter.confirmed:
                        raise
                    self.await_barrier(key, waiter)  # perhaps only this copy is stale
                    return
                value = _core.encode_record(0, state.version + 1, request.client_id,
                                            request.client_seq, key, ops)
                if quorum.proposing(key, state.version + 1):
                    return  # a recovery of that version runs: wait for it
                if not quorum.propose(key, state.version + 1, value, now_ms):
                    raise Unavailable(f"node {self._name} cannot propose now "
                                      f"({self._life.role}, {quorum.proposals_in_flight} "
                                      "proposals in flight)")
                waiter.proposed = state.version + 1
                # Chosen at this version, it applies to exactly this state: the answer is known.
                waiter.reply = MutateReply(state.version + 1, results)
                self._counters["proposals"] += 1
                return
            except KvError as e:
                work.writes.popleft()
                self.answer_error(waiter.identity, waiter.request_id, e)

    def _barrier_settled(self, key: bytes, waiter: Waiter, floor: int,
                         now_ms: float) -> bool:
        """For a write that waited on a barrier: is this replica current for the key now?"""
        quorum = self._life.quorum
        assert quorum is not None
        if floor < waiter.target:
            self._stream.pull_soon()
            return False
        if waiter.open > floor:
            if not quorum.proposing(key, floor + 1):
                quorum.propose(key, floor + 1, None, now_ms, recover=True)
            self.await_barrier(key, waiter)
            return False
        waiter.confirmed = True
        waiter.target = -1
        return True

    def await_barrier(self, key: bytes, waiter: Waiter) -> None:
        waiter.barrier, waiter.target = -1, -1
        self.want_barrier.setdefault(key, []).append(waiter)

    def take_want_barrier(self) -> dict[bytes, list[Waiter]]:
        """The waiters a barrier is to be asked for, by key (the next ones start afresh)."""
        want, self.want_barrier = self.want_barrier, {}
        return want

    # --- what the quorum decided --------------------------------------------------------------
    def answer_chosen(self, decided: list[Decided]) -> None:
        """Writes of ours that were chosen are answered now, before they are applied here: a
        majority holds them durably already, and the answer was computed when proposed. This
        keeps the local apply's fsync off the write's latency."""
        answered = False
        for decision in decided:
            if not decision.own_value_chosen:
                continue
            work = self.keys.get(decision.key)
            if work is None or not work.writes:
                continue
            head = work.writes[0]
            if head.proposed == decision.version and head.reply is not None:
                work.writes.popleft()
                self.answer_ok(head, head.reply)
                self._counters["mutations_acknowledged"] += 1
                answered = True
        if answered:
            self._edge.flush()

    def decided(self, decided: list[Decided]) -> None:
        """Count what was decided; a write of ours decided at its version is applied if it
        was chosen, so the op-id table answers it from now on."""
        counters = self._counters
        monitor = self._monitor
        for decision in decided:
            own = decision.own_value_chosen
            counters["decided_own" if own else "decided_taken" if decision.value is None
                     else "decided_other"] += 1
            monitor.add(monitor_ids.NODE_QUORUM_RETRIES, int(not own))
            key = decision.key
            work = self.keys.get(key)
            if work is not None and work.writes and work.writes[0].proposed == decision.version:
                work.writes[0].proposed = 0
            self.dirty.add(key)

    # --- answering ----------------------------------------------------------------------------
    def answer_ok(self, waiter: Waiter, result: Any) -> None:
        self._observe_latency(self._clock() - waiter.received)
        self._answer(waiter.identity,
                     _encode_frame(_RESPONSE, 0, waiter.request_id, 0, _encode(result)))

    def answer_error(self, identity: bytes, request_id: int, error: KvError) -> None:
        self._counters[f"errors.{type(error).__name__}"] += 1
        self._monitor.add(monitor_ids.NODE_FAILURES, 1)
        self._answer(identity, error_frame(request_id, error))

    def commit_ended(self, thaw: set[bytes], later: list[LocalRead]) -> None:
        """A checkpoint's commit ended: the work that waited for it goes on, and the local
        reads of its keys are answered."""
        self.dirty |= thaw
        if not later:
            return
        with self._checkpoints.view() as txn:
            for identity, request_id, method, request in later:
                try:
                    self._answer(identity, _encode_frame(
                        _RESPONSE, 0, request_id, 0, _encode(self._read(method, request, txn))))
                except KvError as e:
                    self.answer_error(identity, request_id, e)
                except Exception:  # as for any request: a bug costs one request
                    log.exception("request %d (method %d) failed", request_id, method)
                    self.answer_error(identity, request_id, Internal("internal error"))

    def expire(self, now: float) -> None:
        for key, work in list(self.keys.items()):
            for waiter in [w for w in work.reads if now >= w.deadline]:
                work.reads.remove(waiter)
                self.answer_error(waiter.identity, waiter.request_id, Unavailable(
                    f"node {self._name}: no majority of group {self._group} confirmed "
                    "the key's version in time; try another replica", field="node"))
            while work.writes and now >= work.writes[0].deadline:
                waiter = work.writes.popleft()
                if waiter.proposed:
                    # Its proposal goes on in the core and may still be chosen: say so.
                    error: KvError = Timeout(
                        f"node {self._name}: the write was not confirmed by a majority in "
                        "time; it may or may not be applied (retry with the same op id)")
                else:
                    error = Unavailable(f"node {self._name}: the write could not start in "
                                        "time; it was not applied", field="node")
                self.answer_error(waiter.identity, waiter.request_id, error)
                self.dirty.add(key)
            if not work.writes and not work.reads:
                del self.keys[key]
        for key, waiters in list(self.want_barrier.items()):
            kept = [w for w in waiters if now < w.deadline]  # the expired were answered above
            if kept:
                self.want_barrier[key] = kept
            else:
                del self.want_barrier[key]

    def answer_waiting_on_stop(self) -> None:
        """A stopping node answers what waits instead of leaving callers to time out. A write
        may be under way (proposed, or chosen and not yet answered): Timeout, which is
        ambiguous and sends the client to another replica with the same op id. A read:
        Unavailable."""
        for work in self.keys.values():
            for waiter in work.writes:
                self.answer_error(waiter.identity, waiter.request_id, Timeout(
                    f"node {self._name} stopped with the write waiting; it may or may not be "
                    "applied (retry with the same op id)"))
            for waiter in work.reads:
                self.answer_error(waiter.identity, waiter.request_id, Unavailable(
                    f"node {self._name} is stopping; try another replica", field="node"))
        self.keys.clear()

    def fail_all_writes(self, error: KvError) -> None:
        for work in self.keys.values():
            for waiter in work.writes:
                self.answer_error(waiter.identity, waiter.request_id, error)
            work.writes.clear()
        self._edge.flush()


__all__ = ["KeyWork", "Waiter", "Work"]
