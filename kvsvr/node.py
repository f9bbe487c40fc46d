"""`kvsvr-node`: serve one storage node over ZeroMQ.

The loop: wait for requests; drain what has arrived (bounded); answer reads from one LMDB read
transaction; fold every mutation of the round into one durable write transaction (group
commit); then send each client message's answers together, in request order. A write is
answered only after its commit returned, so an acknowledged write survives SIGKILL.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import logging
import os
import sys
import threading
import time
from typing import Any

import lmdb
import zmq

from kvsvr import _core, protocol
from kvsvr.config import ClusterConfig, load
from kvsvr.errors import ConfigError, Internal, InvalidArgument, KvError, StorageFull
from kvsvr.limits import GROUP_COMMIT_MAX_OPS, MAX_MESSAGE_BYTES, NODE_QUEUE_MESSAGES
from kvsvr.monitor import registry as monitor_ids
from kvsvr.monitor.counters import counters_for
from kvsvr.process import add_log_level, on_stop_signals, setup_logging
from kvsvr.protocol import Method, MutateRequest
from kvsvr.sharding import shard_of
from kvsvr.store import Store, StoreLocked
from kvsvr.votelog import VoteLogDamaged

log = logging.getLogger("kvsvr.node")

POLL_INTERVAL_MS = 100           # how often an idle node looks at its stop flag
ROUND_MAX_MESSAGES = 256         # client messages drained before a round answers what it has
ROUND_MAX_BYTES = 32 << 20       # ... or this many bytes of them
CLIENT_SWEEP_INTERVAL_S = 60.0   # how often idle clients' op ids are looked for
IO_THREAD_SCHED_POLICY = os.SCHED_BATCH   # ZeroMQ's I/O thread (see node_context)

_encode = protocol.encode
_encode_frame = _core.encode_frame
_REQUEST = _core.FRAME_REQUEST
_RESPONSE = _core.FRAME_RESPONSE
_MUTATE = Method.MUTATE
_KEYED = frozenset({Method.MUTATE, Method.GET, Method.ROW_GET, Method.SCAN, Method.CHANGES})
_METHOD_COUNTER = {m.value: f"requests.{m.name.lower()}" for m in Method}


def _error_frame(request_id: int, error: KvError) -> bytes:
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
        self._next_client_sweep = time.monotonic() + CLIENT_SWEEP_INTERVAL_S
        self._client_sweep_from = b""
        store = self.store
        self._readers: dict[int, Any] = {
            Method.GET: lambda r, txn: store.get(txn, r.key),
            Method.ROW_GET: lambda r, txn: store.row_get(txn, r.key, r.row),
            Method.SCAN: lambda r, txn: store.scan(txn, r.key, r.start, r.end, r.limit),
            Method.CHANGES: lambda r, txn: store.changes(txn, r.key, r.since_version,
                                                         r.after_row, r.limit),
            Method.PING: lambda r, txn: {"node": self.name},
            Method.STATUS: lambda r, txn: self.status(),
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

    def handle_round(self, messages: list[list[bytes]]) -> list[list[bytes]]:
        """Answer one round of client messages ([identity, payload...] each): the messages
        to send back, [identity, payload] each, answers in request order."""
        answers: list[list[Any]] = []
        writes: list[tuple[list[Any], int, int, MutateRequest]] = []
        written: set[bytes] = set()
        deferred: list[tuple[list[Any], int, int, int, Any]] = []
        counters = self.counters
        self.round_requests = 0
        method_counter = _METHOD_COUNTER
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
                                writes.append((out, len(out), request_id, request))
                                written.add(request.key)
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
                            out.append(_error_frame(request_id, e))
                        except Exception:  # a bug must cost one request, never the node
                            log.exception("request %d (method %d) failed", request_id, method)
                            counters["errors.Internal"] += 1
                            self.monitor.add(monitor_ids.NODE_FAILURES, 1)
                            out.append(_error_frame(request_id, Internal("internal error")))
                    if error is not None:
                        counters["bad_frames"] += 1
                        self.monitor.add(monitor_ids.NODE_BAD_FRAMES, 1)
                        self.monitor.add(monitor_ids.NODE_FAILURES, 1)
                        out.append(_error_frame(error_request_id,
                                                InvalidArgument(error, field="frame")))
        finally:
            txn.abort()
        for start in range(0, len(writes), GROUP_COMMIT_MAX_OPS):
            self._commit(writes[start:start + GROUP_COMMIT_MAX_OPS])
        if deferred:
            self._answer_reads(deferred)
        # Answers go back in as many messages as the size limits need (a client takes any).
        return [[answer[0], message] for answer in answers
                for message in protocol.pack(answer[1])]

    def _answer_reads(self, reads: list[tuple[list[Any], int, int, int, Any]]) -> None:
        with self.store.read() as txn:
            for out, index, request_id, method, request in reads:
                try:
                    out[index] = _encode_frame(_RESPONSE, 0, request_id, 0,
                                               _encode(self._read(method, request, txn)))
                except KvError as e:
                    self.counters[f"errors.{type(e).__name__}"] += 1
                    out[index] = _error_frame(request_id, e)
                except Exception:  # as in handle_round: one request fails, not the node
                    log.exception("request %d (method %d) failed", request_id, method)
                    self.counters["errors.Internal"] += 1
                    out[index] = _error_frame(request_id, Internal("internal error"))

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
                        out[index] = _error_frame(request_id, e)
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
                out[index] = _error_frame(request_id, error)

    def observe_latency(self, seconds: float, requests: int = 1) -> None:
        """Count `requests` answered after `seconds` in their latency bucket id."""
        self.monitor.add(monitor_ids.latency_id(seconds), requests)

    def sweep_idle_clients(self) -> None:
        """Forget clients idle past CLIENT_IDLE_EXPIRY_S, a bounded batch at a time."""
        self._next_client_sweep = time.monotonic() + CLIENT_SWEEP_INTERVAL_S
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
        try:
            while not self.stopping:
                if time.monotonic() >= self._next_client_sweep:
                    self.sweep_idle_clients()
                if not socket.poll(POLL_INTERVAL_MS):
                    continue
                messages: list[list[bytes]] = []
                received = 0
                while received < ROUND_MAX_BYTES and len(messages) < ROUND_MAX_MESSAGES:
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
            socket.close()
            context.term()
            self.store.close()
            log.info("node %s stopped", self.name)


def node_context() -> zmq.Context:
    """The node's ZeroMQ context: one I/O thread, under SCHED_BATCH. A thread of that policy
    woken by the kernel does not preempt the one running on its core: the node's loop then
    finishes what it is doing (or yields, see the replica's serve) before the I/O thread
    moves the next message, instead of being cut off for each one. On 2 cores shared by
    three replicas and their clients: +8-11% replicated puts/s, p99 -10% (4 alternated
    pairs), gets +5-23%. Where a core is idle the I/O thread runs there at once as before.
    No privilege is needed for it."""
    context = zmq.Context(io_threads=1)
    if _may_schedule(IO_THREAD_SCHED_POLICY):
        context.set(zmq.THREAD_SCHED_POLICY, IO_THREAD_SCHED_POLICY)
        context.set(zmq.THREAD_PRIORITY, 0)   # (the only priority that policy takes)
    else:
        log.warning("scheduling policy %d refused here: ZeroMQ's I/O thread keeps the "
                    "default (slower under load on a busy machine)", IO_THREAD_SCHED_POLICY)
    return context


def _may_schedule(policy: int) -> bool:
    """Whether a thread of this process may take `policy` (tried on a thread of its own):
    libzmq aborts the process if setting its thread's policy fails."""
    allowed: list[bool] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))
            allowed.append(True)
        except (OSError, AttributeError):
            allowed.append(False)

    probe = threading.Thread(target=attempt, name="sched-probe")
    probe.start()
    probe.join()
    return allowed == [True]


def node_socket(context: zmq.Context, kind: int) -> zmq.Socket:
    """A node's socket: no linger; a larger message than MAX_MESSAGE_BYTES drops the sender,
    so memory per peer is bounded by the queue length times that."""
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    socket.setsockopt(zmq.SNDHWM, NODE_QUEUE_MESSAGES)
    socket.setsockopt(zmq.RCVHWM, NODE_QUEUE_MESSAGES)
    return socket


def libzmq_send() -> int:
    """The address of zmq_send in the libzmq pyzmq runs on (0 if it cannot be found): what a
    native thread calls to send on a socket handed to it (see kvsvr/_syncer.pyx)."""
    try:
        from zmq.backend.cython import _zmq  # (dlsym through it finds its libzmq)

        return ctypes.cast(ctypes.CDLL(_zmq.__file__).zmq_send, ctypes.c_void_p).value or 0
    except (ImportError, OSError, AttributeError):
        return 0   # another pyzmq backend: the loop sends everything itself


def bind_router(context: zmq.Context, address: str) -> zmq.Socket:
    """The node's ROUTER bound at `address`; OSError naming the address if it cannot be."""
    socket = node_socket(context, zmq.ROUTER)
    try:
        socket.bind(address)
    except zmq.ZMQError as e:
        socket.close()
        context.term()
        raise OSError(f"cannot listen on {address}: {e}") from None
    return socket


def _package_version() -> str:
    from kvsvr import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvsvr-node", description="Serve one KVSvr node.")
    parser.add_argument("--config", help="cluster TOML (default: the embedded config: one "
                                         "group of 3 replicas)")
    parser.add_argument("--node", help="node name in the config (default: the first node)")
    add_log_level(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = load(args.config)
        name = args.node or config.groups[0].replicas[0].node
        group, _ = config.replica(name)
        if len(group.replicas) > 1:
            from kvsvr.replica import ReplicaNode

            node: Node = ReplicaNode(config, name)
        else:
            node = Node(config, name)
    except ConfigError as e:
        print(f"kvsvr-node: config error: {e}", file=sys.stderr)
        return 2
    except (StoreLocked, VoteLogDamaged, lmdb.Error, OSError) as e:
        print(f"kvsvr-node: cannot open storage: {e}", file=sys.stderr)
        return 1

    def stop() -> None:
        node.stopping = True

    on_stop_signals(stop, log)
    # What start-up made (modules, config, the open store) lives as long as the node: kept out
    # of the cyclic collector's full passes, which walked it on every one (those passes
    # paused a node filling with new keys for up to 150 ms; 9-13 ms after this).
    gc.freeze()
    try:
        node.serve()
    except OSError as e:
        print(f"kvsvr-node: {e}", file=sys.stderr)
        node.store.close()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
