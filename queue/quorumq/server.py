"""`quorumq-server`: one log server of a quorum-queue group, over ZeroMQ.

The loop drains whatever requests have arrived (bounded), appends every produce batch and
offset commit of the round to its files, and hands the round to the sync thread, which
fdatasyncs each file the round touched once (group commit: one fdatasync per file per round,
whatever the number of producers). While it syncs, the loop keeps receiving and writing the
next round. A produce or commit is answered only after the sync that covers it returned, so
an acknowledged batch survives SIGKILL and power loss on this server; reads (fetches) only
ever see synced records. The servers of a group never talk to each other.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import sys
import threading
import time
from typing import Any

import zmq

from kvsvr import _core
from kvsvr.config import ClusterConfig, load
from kvsvr.errors import (
    ConfigError,
    Internal,
    InvalidArgument,
    KvError,
    NotFound,
    StorageFull,
    Timeout,
    Unavailable,
)
from kvsvr.process import (
    add_config_argument,
    add_log_level,
    on_stop_signals,
    program_parser,
    setup_logging,
)
from kvsvr.protocol import pack
from quorumq import protocol
from quorumq.limits import (
    CLIENT_ROUND_REPLY_BYTES,
    PARKED_FETCHES_MAX,
    REQUESTS_PER_MESSAGE_MAX,
    RETENTION_CHECK_S,
    SERVER_QUEUE_MESSAGES,
    SERVER_ROUND_BYTES_MAX,
    SERVER_ROUND_MESSAGES_MAX,
)
from quorumq.protocol import QMethod
from quorumq.storage import OffsetCommit, ServerStore, SyncItem, TopicSettings, now_ms

log = logging.getLogger("quorumq.server")

POLL_INTERVAL_MS = 100
_RESPONSE = _core.FRAME_RESPONSE
_REQUEST = _core.FRAME_REQUEST
_encode = protocol.encode
_encode_frame = _core.encode_frame


def _error_frame(request_id: int, error: KvError) -> bytes:
    return _encode_frame(_RESPONSE, error.code, request_id, 0, protocol.encode_error(error))


def _ok_frame(request_id: int, reply: Any) -> bytes:
    return _encode_frame(_RESPONSE, 0, request_id, 0, _encode(reply))


class _Round:
    """Writes of one group commit: what to sync, and the answers waiting for it."""

    __slots__ = ("answers", "items")

    def __init__(self) -> None:
        # (identity, frame, request id, the batch's expires_ms or 0 for an offset commit)
        self.answers: list[tuple[bytes, bytes, int, int]] = []
        self.items: list[SyncItem] = []


class QueueServer:
    def __init__(self, config: ClusterConfig, name: str):
        self.config = config
        self.name = name
        self.group, self.server = config.queue_server(name)
        self.settings = config.queue
        self.store = ServerStore(config.data_dir(self.server),
                                 segment_bytes=config.queue.segment_mib << 20)
        self.started = time.time()
        self.stopping = False
        self.counters: collections.Counter[str] = collections.Counter()
        self._round = _Round()
        self._syncing: _Round | None = None
        self._sync_error: BaseException | None = None
        # Long-poll fetches: topic -> [(deadline, identity, request_id, request)]
        self._parked: dict[str, list[tuple[float, bytes, int, Any]]] = {}
        self._parked_count = 0
        self._next_retention = 0.0
        # Fetch reply bytes each client may still ask for in this round (bounds what one
        # small message can make the server buffer).
        self._reply_budget: dict[bytes, int] = {}
        self._handlers: dict[int, Any] = {
            QMethod.STATUS: self._status,
            QMethod.CREATE_TOPIC: self._create_topic,
            QMethod.UPDATE_TOPIC: functools.partial(self._create_topic, update=True),
            QMethod.OFFSETS: self._offsets,
            QMethod.TIME_OFFSET: self._time_offset,
            QMethod.TOPICS: self._topics,
        }

    # --- requests (no sockets here) -----------------------------------------------------------
    def handle_message(self, identity: bytes, payload: bytes, now: float,
                       out: list[tuple[bytes, bytes]]) -> None:
        """Handle one client message: immediate answers go to `out`; produce and commit
        answers wait in the current round; fetches with nothing to read may park."""
        frames, error, error_request_id = _core.decode_frames(payload)
        for number, (kind, method, request_id, _budget_ms, body) in enumerate(frames):
            try:
                if number >= REQUESTS_PER_MESSAGE_MAX:
                    raise InvalidArgument(
                        f"frame: too many requests in one message ({len(frames)}, the limit "
                        f"is {REQUESTS_PER_MESSAGE_MAX}); request {request_id} was not "
                        "handled", field="frame")
                if kind != _REQUEST:
                    raise InvalidArgument("frame.kind: a server only takes requests",
                                          field="frame.kind")
                request = protocol.decode_request(method, body)
                self.counters[f"requests.{QMethod(method).name.lower()}"] += 1
                if method == QMethod.PRODUCE:
                    self._produce(identity, request_id, request)
                elif method == QMethod.COMMIT:
                    self._commit(identity, request_id, request)
                elif method == QMethod.FETCH:
                    self._fetch(identity, request_id, request, now, out)
                else:
                    out.append((identity, _ok_frame(request_id,
                                                    self._handlers[method](request))))
            except KvError as e:
                self.counters[f"errors.{type(e).__name__}"] += 1
                out.append((identity, _error_frame(request_id, e)))
            except Exception:  # a bug costs one request, never the server
                log.exception("request %d (method %d) failed", request_id, method)
                self.counters["errors.Internal"] += 1
                out.append((identity, _error_frame(request_id, Internal("internal error"))))
        if error is not None:
            self.counters["bad_frames"] += 1
            out.append((identity, _error_frame(error_request_id,
                                               InvalidArgument(error, field="frame"))))

    def _topic(self, name: str) -> Any:
        topic = self.store.topics.get(name)
        if topic is None:
            raise NotFound(f"topic: {name!r} does not exist on this server (create it with "
                           "`quorumq create-topic`)", field="topic")
        return topic

    def _expired(self, expires_ms: int) -> bool:
        """Past the batch's expiry on any clock within the skew bound of ours."""
        return now_ms() + self.settings.clock_skew_ms >= expires_ms

    def _produce(self, identity: bytes, request_id: int, request: Any) -> None:
        topic = self._topic(request.topic)
        if self._expired(request.expires_ms):
            raise Timeout(f"expires_ms: the batch expired at {request.expires_ms} (now "
                          f"{now_ms()}, clock skew bound {self.settings.clock_skew_ms} ms); "
                          "not appended", field="expires_ms")
        try:
            first, _segment = topic.append(request.producer_id, request.first_seq,
                                           request.messages, now_ms())
        except OSError as e:
            error: KvError = StorageFull(f"append failed: {e}") if e.errno == 28 \
                else Internal(f"append failed: {e}")
            raise error from None
        self.counters["messages"] += len(request.messages)
        self._round.answers.append(
            (identity, _ok_frame(request_id, protocol.ProduceReply(
                self.store.incarnation.id, first)), request_id, request.expires_ms))

    def _commit(self, identity: bytes, request_id: int, request: Any) -> None:
        topic = self._topic(request.topic)
        if request.incarnation != self.store.incarnation.id:
            raise InvalidArgument(
                f"incarnation: the offset is for life {request.incarnation:x} of this server, "
                f"it is now {self.store.incarnation.id:x}", field="incarnation")
        if request.offset > topic.end_offset:
            raise InvalidArgument(f"offset: {request.offset} is past the end of topic "
                                  f"{request.topic!r} on this server ({topic.end_offset})",
                                  field="offset")
        self.store.commit_offset(OffsetCommit(request.topic, request.group, request.offset,
                                              request.whole, request.producers))
        self._round.answers.append((identity, _ok_frame(request_id, {}), request_id, 0))

    def _fetch(self, identity: bytes, request_id: int, request: Any, now: float,
               out: list[tuple[bytes, bytes]]) -> None:
        topic = self._topic(request.topic)
        budget = self._reply_budget.get(identity, CLIENT_ROUND_REPLY_BYTES)
        if budget <= 0:
            raise Unavailable(f"max_bytes: this client asked for more than "
                              f"{CLIENT_ROUND_REPLY_BYTES} fetch bytes at once; send fewer "
                              "fetches at a time", field="max_bytes")
        if request.max_bytes > budget:
            request.max_bytes = budget
        self._reply_budget[identity] = budget - request.max_bytes
        if request.wait_ms and request.offset >= topic.durable_end_offset and \
                self._parked_count < PARKED_FETCHES_MAX:
            self._parked.setdefault(request.topic, []).append(
                (now + request.wait_ms / 1000, identity, request_id, request))
            self._parked_count += 1
            return
        out.append((identity, self._fetch_frame(request_id, request)))

    def _fetch_frame(self, request_id: int, request: Any) -> bytes:
        topic = self.store.topics.get(request.topic)
        if topic is None:
            return _error_frame(request_id, NotFound(f"topic: {request.topic!r} is gone",
                                                     field="topic"))
        records, next_offset = topic.read(request.offset, request.max_bytes)
        self.counters["fetched_bytes"] += len(records)
        incarnation = self.store.incarnation
        return _ok_frame(request_id, protocol.FetchReply(
            incarnation.id, incarnation.born_ms, topic.start_offset, topic.durable_end_offset,
            next_offset, records))

    def _status(self, _request: Any) -> dict[str, Any]:
        incarnation = self.store.incarnation
        syncs = self.counters["syncs"]
        return {
            "node": self.name,
            "group": self.group.name,
            "campus": self.server.campus,
            "address": self.server.address,
            "pid": os.getpid(),
            "incarnation": incarnation.id,
            "born_ms": incarnation.born_ms,
            "now_ms": now_ms(),
            "uptime_s": round(time.time() - self.started, 3),
            "data_dir": str(self.store.path),
            "sync": self.settings.sync,
            "topics": {name: {"start_offset": t.start_offset,
                              "end_offset": t.durable_end_offset,
                              "bytes": t.bytes(), "segments": len(t.segments),
                              "retention_bytes": t.settings.retention_bytes,
                              "retention_s": t.settings.retention_s}
                       for name, t in self.store.topics.items()},
            "offsets": [{"topic": c.topic, "group": c.group, "offset": c.offset,
                         "whole": c.whole} for c in self.store.offsets.values()],
            "recovery": list(self.store.recovery),
            "counters": dict(self.counters),
            "sync_mean_us": round(self.counters["sync_us"] / syncs) if syncs else 0,
        }

    def _create_topic(self, request: Any, *, update: bool = False) -> protocol.TopicInfo:
        try:
            topic = self.store.create_topic(request.topic, TopicSettings(
                request.retention_bytes, request.retention_s), update=update)
        except ValueError as e:
            raise InvalidArgument(str(e), field="topic") from None
        return self._topic_info(request.topic, topic)

    @staticmethod
    def _topic_info(name: str, topic: Any) -> protocol.TopicInfo:
        return protocol.TopicInfo(name, topic.settings.retention_bytes,
                                  topic.settings.retention_s, topic.start_offset,
                                  topic.durable_end_offset, topic.bytes())

    def _topics(self, _request: Any) -> list[protocol.TopicInfo]:
        return [self._topic_info(n, t) for n, t in self.store.topics.items()]

    def _offsets(self, request: Any) -> protocol.OffsetsReply:
        self._topic(request.topic)
        incarnation = self.store.incarnation
        commit = self.store.offsets.get((request.topic, request.group))
        if commit is None:
            return protocol.OffsetsReply(incarnation.id, incarnation.born_ms, False, 0,
                                         False, b"")
        return protocol.OffsetsReply(incarnation.id, incarnation.born_ms, True, commit.offset,
                                     commit.whole, commit.producers)

    def _time_offset(self, request: Any) -> protocol.TimeOffsetReply:
        topic = self._topic(request.topic)
        # Complete only once the time has passed here and every write before it is durable.
        complete = request.append_ms < now_ms() and topic.end_offset == \
            topic.durable_end_offset
        return protocol.TimeOffsetReply(topic.time_offset(request.append_ms), complete,
                                        topic.start_offset)

    # --- group commit ---------------------------------------------------------------------------
    def start_round(self) -> _Round | None:
        """The round to sync now (None if nothing to do); writing goes on in a new one."""
        round_ = self._round
        round_.items = self.store.dirty()
        if not round_.items and not round_.answers:
            return None
        self._round = _Round()
        return round_

    def finish_round(self, round_: _Round, out: list[tuple[bytes, bytes]], now: float) -> None:
        self.store.mark_durable(round_.items)
        for identity, frame, request_id, expires_ms in round_.answers:
            if expires_ms and self._expired(expires_ms):
                # Durable, but too late to count: a consumer may already have given up its
                # seqs (consumer.py); unacknowledged, it is only a droppable duplicate.
                self.counters["expired_before_durable"] += 1
                frame = _error_frame(request_id, Timeout(
                    f"expires_ms: the batch expired at {expires_ms} before it was durable "
                    "here; not acknowledged", field="expires_ms"))
            out.append((identity, frame))
        self._answer_parked(now, out, only_ready=True)

    def _answer_parked(self, now: float, out: list[tuple[bytes, bytes]], *,
                       only_ready: bool) -> None:
        for name in list(self._parked):
            waiting = self._parked[name]
            topic = self.store.topics.get(name)
            end = topic.durable_end_offset if topic is not None else 0
            keep = []
            for entry in waiting:
                deadline, identity, request_id, request = entry
                if topic is None or request.offset < end or deadline <= now or not only_ready:
                    out.append((identity, self._fetch_frame(request_id, request)))
                else:
                    keep.append(entry)
            self._parked_count -= len(waiting) - len(keep)
            if keep:
                self._parked[name] = keep
            else:
                del self._parked[name]

    def housekeeping(self, now: float, out: list[tuple[bytes, bytes]]) -> None:
        self._answer_parked(now, out, only_ready=True)
        if now < self._next_retention:
            return
        self._next_retention = now + RETENTION_CHECK_S
        wall = now_ms()
        for name, topic in self.store.topics.items():
            for segment in topic.enforce_retention(wall):
                self.counters["segments_dropped"] += 1
                log.info("topic %s: retention dropped segment %s", name, segment.path.name)
        if self._syncing is None:
            self.store.maybe_compact_offsets()

    # --- the I/O edge ----------------------------------------------------------------------
    def _listen(self, context: zmq.Context) -> zmq.Socket:
        socket = context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, _core.MESSAGE_BYTES_MAX)
        socket.setsockopt(zmq.SNDHWM, SERVER_QUEUE_MESSAGES)
        socket.setsockopt(zmq.RCVHWM, SERVER_QUEUE_MESSAGES)
        try:
            socket.bind(self.server.address)
        except zmq.ZMQError as e:
            socket.close()
            context.term()
            raise OSError(f"cannot listen on {self.server.address}: {e}") from None
        return socket

    def serve(self) -> None:
        context = zmq.Context(io_threads=1)
        socket = self._listen(context)
        # The sync thread tells the loop a round is durable through this pair.
        done_rx = context.socket(zmq.PAIR)
        done_rx.bind(f"inproc://sync-done-{id(self)}")
        done_tx = context.socket(zmq.PAIR)
        done_tx.connect(f"inproc://sync-done-{id(self)}")
        work: collections.deque[_Round] = collections.deque()
        wake = threading.Condition()
        thread = threading.Thread(target=self._sync_loop, args=(work, wake, done_tx),
                                  name="sync", daemon=True)
        thread.start()
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(done_rx, zmq.POLLIN)
        incarnation = self.store.incarnation
        log.info("queue server %s (group %s, campus %s) serving on %s, data %s, incarnation "
                 "%016x, %d topic(s)%s", self.name, self.group.name, self.server.campus,
                 self.server.address, self.store.path, incarnation.id, len(self.store.topics),
                 f", {len(self.store.recovery)} recovery report(s)" if self.store.recovery
                 else "")
        recv, send, again = socket.recv_multipart, socket.send_multipart, zmq.Again
        try:
            while not (self.stopping and self._syncing is None):
                events = dict(poller.poll(POLL_INTERVAL_MS if not self._parked else 10))
                now = time.monotonic()
                out: list[tuple[bytes, bytes]] = []
                self._reply_budget.clear()
                if done_rx in events:
                    done_rx.recv()
                    if self._sync_error is not None:
                        # A failed fdatasync leaves the file's state unknown (the kernel may
                        # have dropped the dirty pages): stop rather than acknowledge anything.
                        log.critical("fdatasync failed (%s): stopping", self._sync_error)
                        raise SystemExit(3)
                    assert self._syncing is not None
                    self.finish_round(self._syncing, out, now)
                    self._syncing = None
                if socket in events and not self.stopping:
                    received = 0
                    for _ in range(SERVER_ROUND_MESSAGES_MAX):
                        try:
                            parts = recv(zmq.NOBLOCK)
                        except again:
                            break
                        received += sum(len(p) for p in parts)
                        if len(parts) < 2:
                            self.counters["bad_frames"] += 1
                            continue
                        for payload in parts[1:]:
                            self.handle_message(parts[0], payload, now, out)
                        if received >= SERVER_ROUND_BYTES_MAX:
                            break
                self.housekeeping(now, out)
                if self._syncing is None:
                    round_ = self.start_round()
                    if round_ is not None:
                        self._syncing = round_
                        with wake:
                            work.append(round_)
                            wake.notify()
                self._send(out, send, again)
        finally:
            with wake:
                work.append(_Round())   # an empty round with no items: the thread's signal
                self.stopping = True
                wake.notify()
            thread.join(timeout=5)
            for s in (socket, done_rx, done_tx):
                s.close()
            context.term()
            self.store.close()
            log.info("queue server %s stopped", self.name)

    def _send(self, out: list[tuple[bytes, bytes]], send: Any, again: Any) -> None:
        if not out:
            return
        by_peer: dict[bytes, list[bytes]] = {}
        for identity, frame in out:
            by_peer.setdefault(identity, []).append(frame)
        for identity, frames in by_peer.items():
            for message in pack(frames):
                try:
                    send([identity, message], zmq.NOBLOCK)
                except again:
                    self.counters["replies_dropped"] += 1   # that client is not reading

    def _sync_loop(self, work: collections.deque[_Round], wake: threading.Condition,
                   done: zmq.Socket) -> None:
        sync = self.settings.sync
        while True:
            with wake:
                while not work:
                    wake.wait()
                round_ = work.popleft()
            if self.stopping and not round_.items and not round_.answers:
                return
            started = time.perf_counter()
            try:
                ServerStore.sync(round_.items, sync)
            except OSError as e:
                self._sync_error = e
            self.counters["syncs"] += 1
            self.counters["sync_us"] += int((time.perf_counter() - started) * 1e6)
            done.send(b"")


def main(argv: list[str] | None = None) -> int:
    parser = program_parser("quorumq-server", "Serve one log server of a queue group.")
    add_config_argument(parser, "cluster TOML with [[queue_groups]]")
    parser.add_argument("--node", required=True, help="queue server name in the config")
    add_log_level(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = load(args.config)
        config.require_queue_groups()
        server = QueueServer(config, args.node)
    except ConfigError as e:
        print(f"quorumq-server: config error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"quorumq-server: cannot open storage: {e}", file=sys.stderr)
        return 1

    def stop() -> None:
        server.stopping = True

    on_stop_signals(stop, log)
    try:
        server.serve()
    except OSError as e:
        print(f"quorumq-server: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
