"""`Node`: a node whose group has one replica, and the base every node builds on (a replica
keeps its request reading, ownership check, counters and status).

The loop: wait for requests; drain what has arrived (bounded); answer reads from one LMDB read
transaction; fold every mutation of the round into one durable write transaction (group
commit); then send each client message's answers together, in request order. A write is
answered only after its commit returned, so an acknowledged write survives SIGKILL.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import lmdb
import zmq

from kvsvr import _core, protocol
from kvsvr.config import ClusterConfig
from kvsvr.errors import (
    ConfigError,
    Internal,
    InvalidArgument,
    KvError,
    StorageFull,
    Unavailable,
)
from kvsvr.expiry import Purger, needs_stamp, stamp
from kvsvr.limits import (
    CLIENT_SWEEP_INTERVAL_S,
    GROUP_COMMIT_OPS_MAX,
    NODE_POLL_INTERVAL_MS,
    NODE_ROUND_BYTES_MAX,
    NODE_ROUND_MESSAGES_MAX,
    PURGE_ENTRIES_READ_MAX,
    PURGE_INTERVAL_S,
)
from kvsvr.monitor import registry as monitor_ids
from kvsvr.monitor.counters import counters_for
from kvsvr.monitor.node_metrics import NodeMetrics, node_labels, started
from kvsvr.protocol import Method, MutateRequest
from kvsvr.sharding import shard_of
from kvsvr.sockets import bind_router, node_context
from kvsvr.store import Store
from kvsvr.watches import ParkedWatch, Watches, due, read_watch, unchanged

log = logging.getLogger("kvsvr.node")

_encode = protocol.encode
_encode_frame = _core.encode_frame
_REQUEST = _core.FRAME_REQUEST
_RESPONSE = _core.FRAME_RESPONSE
_MUTATE = Method.MUTATE
_KEYED = frozenset({Method.MUTATE, Method.GET, Method.ROW_GET, Method.SCAN, Method.CHANGES,
                    Method.WATCH})
_WATCH = Method.WATCH
# A watch answered later, or read once the round's writes committed: (answers of its message,
# its index there, request id, request, the client's identity).
PendingWatch = tuple[list[Any], int, int, Any, bytes]
# The counter of each method's requests.
METHOD_COUNTER = {m.value: f"requests.{m.name.lower()}" for m in Method}


def error_frame(request_id: int, error: KvError) -> bytes:
    """The response frame that answers request `request_id` with `error`."""
    return _encode_frame(_RESPONSE, error.code, request_id, 0, protocol.encode_error(error))


class Node:
    def __init__(self, config: ClusterConfig, name: str, *, replicated: bool = False):
        self.config = config
        self.name = name
        self.group, self.replica = config.replica(name)
        if len(self.group.replicas) > 1 and not replicated:
            # Serving one replica of a larger group alone would let replicas diverge.
            raise ConfigError(
                f"groups: group {self.group.name!r} has {len(self.group.replicas)} replicas; "
                "its nodes run as replicas (kvsvr.replica.ReplicaNode, which main() picks)")
        self.store = Store(config.data_dir(self.replica),
                           map_size_mib=config.storage.map_size_mib,
                           sync=config.storage.sync,
                           binlog_max_records=config.storage.binlog_max_records,
                           defer_meta_sync=replicated, defer_key_states=replicated)
        # Which keys are this group's: a key of another group's shards is refused, never
        # stored here (it would be acknowledged, yet every routed read asks its real owner).
        self._shard_owner = config.shard_table() if len(config.groups) > 1 else None
        self._group_index = config.groups.index(self.group)
        self.started = time.time()
        self.stopping = False
        self.counters: collections.Counter[str] = collections.Counter()
        self.monitor = counters_for(config)   # the machine's shared-memory counters
        self.round_requests = 0               # frames in the round being answered
        self.next_client_sweep = time.monotonic() + CLIENT_SWEEP_INTERVAL_S
        self._client_sweep_from = b""
        self.watches = Watches()   # parked WATCH requests (kvsvr/watches.py)
        self.metrics: NodeMetrics | None = None   # its own /metrics, once serving
        self.purger = Purger()     # which expired entries to remove (kvsvr/expiry.py)
        self.next_purge = 0.0
        store = self.store
        self._readers: dict[int, Any] = {
            Method.GET: lambda r, txn: store.get(txn, r.key),
            Method.ROW_GET: lambda r, txn: store.row_get(txn, r.key, r.row),
            Method.SCAN: lambda r, txn: store.scan(txn, r.key, r.start, r.end, r.limit),
            Method.CHANGES: lambda r, txn: store.changes(txn, r.key, r.since_version,
                                                         r.after_row, r.limit),
            Method.PING: lambda r, txn: {"node": self.name},
            Method.STATUS: lambda r, txn: self.status(),
            Method.LIST: self._list_keys,
        }

    # --- request handling (no sockets here) ------------------------------------------------
    def check_owned(self, key: bytes) -> None:
        """InvalidArgument naming the owner if `key` is in another group's shards."""
        owner = self._shard_owner
        if owner is None:
            return
        shard = shard_of(key, len(owner))
        if owner[shard] != self._group_index:
            group = self.config.groups[owner[shard]]
            raise InvalidArgument(
                f"key: {key!r} is in shard {shard}, which group {group.name!r} owns "
                f"({', '.join(r.node for r in group.replicas)}), not this node's group "
                f"{self.group.name!r}: send it there (a client with the cluster config routes "
                "it)", field="key")

    def _read(self, method: int, request: Any, txn: lmdb.Transaction) -> Any:
        reader = self._readers.get(method)
        if reader is None:
            raise InvalidArgument(f"method: {Method(method).name.lower()} is not served by a "
                                  "single-replica node", field="method")
        return reader(request, txn)

    # long: one pass over a round's frames keeps the per-request cost of the hot path low
    def handle_round(self, messages: list[list[bytes]]) -> list[list[bytes]]:
        """Answer one round of client messages ([identity, payload...] each): the messages
        to send back, [identity, payload] each, answers in request order."""
        answers: list[list[Any]] = []
        writes: list[tuple[list[Any], int, int, MutateRequest]] = []
        written: set[bytes] = set()
        deferred: list[tuple[list[Any], int, int, int, Any]] = []
        watches: list[PendingWatch] = []
        counters = self.counters
        self.round_requests = 0
        method_counter = METHOD_COUNTER
        decode_request = protocol.decode_request
        read = self._read
        txn = self.store.read()
        try:
            for parts in messages:
                out: list[Any] = []
                answers.append([parts[0], out])
                for payload in parts[1:]:
                    frames, error, error_request_id = _core.decode_frames(payload)
                    self.round_requests += len(frames) + (error is not None)
                    for kind, method, request_id, _budget_ms, body in frames:
                        try:
                            if kind != _REQUEST:
                                raise InvalidArgument("frame.kind: a node only takes requests",
                                                      field="frame.kind")
                            request = decode_request(method, body)
                            counters[method_counter[method]] += 1
                            self.monitor.add(monitor_ids.NODE_REQUESTS, 1)
                            if method in _KEYED:
                                self.check_owned(request.key)
                            if method == _MUTATE:
                                self.stamp_write(request)
                                writes.append((out, len(out), request_id, request))
                                written.add(request.key)
                                out.append(None)
                                continue
                            if method == _WATCH:   # read once the round's writes committed
                                watches.append((out, len(out), request_id, request, parts[0]))
                                out.append(None)
                                continue
                            if written and getattr(request, "key", None) in written:
                                # Keep pipeline order: read after this round's writes commit.
                                deferred.append((out, len(out), request_id, method, request))
                                out.append(None)
                                continue
                            out.append(_encode_frame(_RESPONSE, 0, request_id, 0,
                                                     _encode(read(method, request, txn))))
                        except KvError as e:
                            counters[f"errors.{type(e).__name__}"] += 1
                            self.monitor.add(monitor_ids.NODE_FAILURES, 1)
                            out.append(error_frame(request_id, e))
                        except Exception:  # a bug must cost one request, never the node
                            log.exception("request %d (method %d) failed", request_id, method)
                            counters["errors.Internal"] += 1
                            self.monitor.add(monitor_ids.NODE_FAILURES, 1)
                            out.append(error_frame(request_id, Internal("internal error")))
                    if error is not None:
                        counters["bad_frames"] += 1
                        self.monitor.add(monitor_ids.NODE_BAD_FRAMES, 1)
                        self.monitor.add(monitor_ids.NODE_FAILURES, 1)
                        out.append(error_frame(error_request_id,
                                                InvalidArgument(error, field="frame")))
        finally:
            txn.abort()
        for start in range(0, len(writes), GROUP_COMMIT_OPS_MAX):
            self._commit(writes[start:start + GROUP_COMMIT_OPS_MAX])
        if deferred:
            self._answer_reads(deferred)
        woken = self._serve_watches(watches, written) if watches or self.watches.count else []
        if watches:   # a parked watch is answered later, in a message of its own
            for answer in answers:
                answer[1] = [frame for frame in answer[1] if frame is not None]
        # Answers go back in as many messages as the size limits need (a client takes any).
        return [[answer[0], message] for answer in answers
                for message in protocol.pack(answer[1]) if answer[1]] + woken

    # --- watches (kvsvr/watches.py) ----------------------------------------------------------
    def _serve_watches(self, pending: list[PendingWatch],
                       written: set[bytes]) -> list[list[bytes]]:
        """Wake the parked watches of the keys this round wrote (their answers, each a
        message of its own, are returned), then answer this round's watches that are due
        and park the others."""
        store, watches = self.store, self.watches
        woken: dict[bytes, list[bytes]] = {}
        now = time.monotonic()
        with store.read() as txn:
            for key in watches.watching(written):
                for watch in watches.take(key, store.latest(txn, key).version):
                    woken.setdefault(watch.identity, []).append(
                        self._watch_answer(watch, txn, None))
            for out, index, request_id, request, identity in pending:
                try:
                    version = store.latest(txn, request.key).version
                    if due(request, version) or not request.wait_ms:
                        out[index] = self._watch_frame(request_id, request, txn, version)
                    else:
                        watches.park(ParkedWatch(identity, request_id, request,
                                                 now + request.wait_ms / 1000, now))
                except KvError as e:
                    self.counters[f"errors.{type(e).__name__}"] += 1
                    out[index] = error_frame(request_id, e)
        return _packed(woken)

    def _watch_frame(self, request_id: int, request: Any, txn: lmdb.Transaction,
                     version: int) -> bytes:
        """The answer of a watch: what changed if the key at `version` is past it, else "no
        change yet"."""
        reply = read_watch(self.store, txn, request) if due(request, version) \
            else unchanged(version)
        return _encode_frame(_RESPONSE, 0, request_id, 0, _encode(reply))

    def _watch_answer(self, watch: ParkedWatch, txn: lmdb.Transaction,
                      error: KvError | None) -> bytes:
        try:
            if error is not None:
                raise error
            version = self.store.latest(txn, watch.request.key).version
            return self._watch_frame(watch.request_id, watch.request, txn, version)
        except KvError as e:
            self.counters[f"errors.{type(e).__name__}"] += 1
            return error_frame(watch.request_id, e)
        except Exception:  # as for any request: a bug costs one watch, never the node
            log.exception("watch %d failed", watch.request_id)
            return error_frame(watch.request_id, Internal("internal error"))

    def expire_watches(self, now: float) -> list[list[bytes]]:
        """The answers of the watches whose wait ended ("no change yet"), [identity, frame]."""
        expired = self.watches.expired(now)
        if not expired:
            return []
        answers: dict[bytes, list[bytes]] = {}
        with self.store.read() as txn:
            for watch in expired:
                answers.setdefault(watch.identity, []).append(
                    self._watch_answer(watch, txn, None))
        return _packed(answers)

    def stop_watches(self) -> list[list[bytes]]:
        """A stopping node answers its parked watches Unavailable: the client asks another
        replica, or this one once it is back."""
        error = Unavailable(f"node {self.name} is stopping; watch again", field="node")
        answers: dict[bytes, list[bytes]] = {}
        for watch in self.watches.take_all():
            answers.setdefault(watch.identity, []).append(
                self._watch_answer(watch, None, error))
        return _packed(answers)

    def _answer_reads(self, reads: list[tuple[list[Any], int, int, int, Any]]) -> None:
        with self.store.read() as txn:
            for out, index, request_id, method, request in reads:
                try:
                    out[index] = _encode_frame(_RESPONSE, 0, request_id, 0,
                                               _encode(self._read(method, request, txn)))
                except KvError as e:
                    self.counters[f"errors.{type(e).__name__}"] += 1
                    out[index] = error_frame(request_id, e)
                except Exception:  # as in handle_round: one request fails, not the node
                    log.exception("request %d (method %d) failed", request_id, method)
                    self.counters["errors.Internal"] += 1
                    out[index] = error_frame(request_id, Internal("internal error"))

    def _commit(self, writes: list[tuple[list[Any], int, int, MutateRequest]]) -> None:
        counters = self.counters
        started = time.perf_counter()
        try:
            with self.store.write() as batch:
                for out, index, request_id, request in writes:
                    try:
                        reply = batch.mutate(request.key, request.ops, request.expected_version,
                                             request.client_id, request.client_seq)
                        out[index] = _encode_frame(_RESPONSE, 0, request_id, 0, _encode(reply))
                    except StorageFull:
                        raise
                    except KvError as e:
                        counters[f"errors.{type(e).__name__}"] += 1
                        out[index] = error_frame(request_id, e)
            counters["group_commits"] += 1
            counters["mutations"] += batch.applied
            self.monitor.add(monitor_ids.NODE_GROUP_COMMITS, 1)
            self.monitor.add(monitor_ids.NODE_MUTATIONS, batch.applied)
            counters["group_commit_us"] += int((time.perf_counter() - started) * 1e6)
        except Exception as e:
            # Nothing of the transaction was kept: every write of the round is answered with
            # the error, including those that had looked successful before the abort.
            error = e if isinstance(e, KvError) else Internal(f"commit failed: {e}")
            if not isinstance(e, KvError):
                log.exception("group commit of %d writes failed", len(writes))
            counters[f"errors.{type(error).__name__}"] += len(writes)
            self.monitor.add(monitor_ids.NODE_FAILURES, len(writes))
            for out, index, request_id, _ in writes:
                out[index] = error_frame(request_id, error)

    def _list_keys(self, request: Any, txn: lmdb.Transaction) -> Any:
        """LIST: this group's keys from this node's applied state (as a local read is)."""
        life = getattr(self, "life", None)   # a replica's: only one that votes has every key
        if life is not None and not life.voting:
            raise Unavailable(f"node {self.name} is {life.role}; try another replica",
                              field="node")
        return self.store.list_keys(txn, request.prefix, request.after, request.limit)

    # --- expiry (kvsvr/expiry.py) ------------------------------------------------------------
    # Expiry instants are unix time (replicas compare them with their own wall clocks).
    wall_clock: Callable[[], float] = time.time

    def stamp_write(self, request: MutateRequest) -> None:
        """A write's TTLs become instants on this node's wall clock before it is planned or
        proposed: the instant is part of what every replica applies."""
        if needs_stamp(request.ops):
            stamp(request.ops, int(self.wall_clock() * 1000))

    def purge_expired(self) -> list[list[bytes]]:
        """Remove expired values and rows, a bounded batch of keys per PURGE_INTERVAL_S, in a
        transaction of their own; the answers of the watches the removals woke."""
        now = time.monotonic()
        self.next_purge = now + PURGE_INTERVAL_S
        now_ms = int(self.wall_clock() * 1000)
        store, purger = self.store, self.purger
        try:
            with store.read() as txn:
                entries = store.expiring(txn, purger.through_ms(now_ms), PURGE_ENTRIES_READ_MAX)
            chosen = purger.choose(entries, now_ms, now)
            if not chosen:
                return []
            with store.write() as batch:
                for key, ops in chosen:
                    batch.mutate(key, ops)
        except Exception:  # housekeeping must never take the node down (retried later)
            log.exception("removing expired entries failed")
            return []
        for key, _ in chosen:
            purger.done(key)
        self.counters["purges"] += len(chosen)
        self.counters["mutations"] += len(chosen)
        return self._serve_watches([], {key for key, _ in chosen})

    def observe_latency(self, seconds: float, requests: int = 1) -> None:
        """Count `requests` answered after `seconds` in their latency bucket id."""
        self.monitor.add(monitor_ids.latency_id(seconds), requests)

    def sweep_idle_clients(self) -> None:
        """Forget clients idle past CLIENT_IDLE_EXPIRY_S, a bounded batch at a time."""
        self.next_client_sweep = time.monotonic() + CLIENT_SWEEP_INTERVAL_S
        try:
            with self.store.write() as batch:
                self._client_sweep_from = batch.forget_idle_clients(
                    start=self._client_sweep_from)
        except Exception:  # housekeeping must never take the node down
            log.exception("sweeping idle clients failed")

    def status(self) -> dict[str, Any]:
        return {
            "node": self.name,
            "group": self.group.name,
            "campus": self.replica.campus,
            "address": self.replica.address,
            "role": "single",
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            "data_dir": str(self.store.path),
            "sync": self.config.storage.sync,
            "counters": dict(self.counters),
            "store": self.store.stats(),
            "version": _package_version(),
        }

    # --- the I/O edge ----------------------------------------------------------------------
    def serve(self) -> None:
        context = node_context()
        socket = bind_router(context, self.replica.address)
        log.info("node %s (group %s, campus %s) serving on %s, data %s, binlog lsn %d..%d",
                 self.name, self.group.name, self.replica.campus, self.replica.address,
                 self.store.path, self.store.first_lsn, self.store.last_lsn)
        recv, send, again = socket.recv_multipart, socket.send_multipart, zmq.Again
        self.start_metrics()
        try:
            while not self.stopping:
                if time.monotonic() >= self.next_client_sweep:
                    self.sweep_idle_clients()
                self.publish_metrics(time.monotonic())
                if time.monotonic() >= self.next_purge:
                    for answer in self.purge_expired():   # (watches the removals woke)
                        with contextlib.suppress(again):
                            send(answer, zmq.NOBLOCK)
                if self.watches.count:
                    for answer in self.expire_watches(time.monotonic()):
                        with contextlib.suppress(again):   # the client is not reading
                            send(answer, zmq.NOBLOCK)
                if not socket.poll(self._poll_ms()):
                    continue
                messages: list[list[bytes]] = []
                received = 0
                while received < NODE_ROUND_BYTES_MAX \
                        and len(messages) < NODE_ROUND_MESSAGES_MAX:
                    try:
                        parts = recv(zmq.NOBLOCK)
                    except again:
                        break
                    messages.append(parts)
                    received += sum(len(part) for part in parts)
                started = time.perf_counter()
                sent = 0
                for answer in self.handle_round(messages):
                    try:
                        send(answer, zmq.NOBLOCK)
                        sent += len(answer[1])
                    except again:
                        self.counters["replies_dropped"] += 1  # the client is not reading
                self.monitor.add(monitor_ids.NODE_BYTES_IN, received)
                self.monitor.add(monitor_ids.NODE_BYTES_OUT, sent)
                self.observe_latency(time.perf_counter() - started, self.round_requests)
        finally:
            for answer in self.stop_watches():
                with contextlib.suppress(zmq.ZMQError):
                    send(answer, zmq.NOBLOCK)
            socket.close()
            context.term()
            self.stop_metrics()
            self.store.close()
            log.info("node %s stopped", self.name)

    def start_metrics(self) -> None:
        """Serve this node's own /metrics if its config names an address for it."""
        if self.replica.metrics:
            self.metrics = started(self.replica.metrics,
                                   node_labels(self.config, self.replica.campus, self.name))

    def publish_metrics(self, now: float) -> None:
        """Hand the metrics endpoint a status snapshot, at most once a second."""
        metrics = self.metrics
        if metrics is not None and metrics.due(now):
            metrics.publish(self.status(), now)

    def stop_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def _poll_ms(self) -> int:
        """How long the serve loop waits for requests: until the next watch's wait ends."""
        deadline = self.watches.next_deadline() if self.watches.count else None
        if deadline is None:
            return NODE_POLL_INTERVAL_MS
        wait_ms = int((deadline - time.monotonic()) * 1000) + 1
        return max(0, min(NODE_POLL_INTERVAL_MS, wait_ms))


def _packed(answers: dict[bytes, list[bytes]]) -> list[list[bytes]]:
    """Answer frames by client as [identity, message], as few messages as the limits allow
    (thousands of watches of one client woken at once must not overflow its queue)."""
    return [[identity, message] for identity, frames in answers.items()
            for message in protocol.pack(frames)]


def _package_version() -> str:
    from kvsvr import __version__

    return __version__


__all__ = ["METHOD_COUNTER", "Node", "error_frame"]
