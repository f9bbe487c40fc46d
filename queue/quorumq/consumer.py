"""Consumers: a consumer group reads a topic from every queue group, losing nothing.

Delivery is at-least-once, in per-producer order, with duplicates removed by message id.
Offsets are durable and kept on the servers themselves: per server, per topic, per consumer
group, with the group's per-producer positions (the next seq expected of each producer).
One consumer runs per (topic, consumer group) at a time.

Why no committed message is missed (the argument)
-------------------------------------------------
1. A committed message m is durable on at least 2 of the 3 servers of its group G (each
   acknowledgement is sent after fdatasync; the producer needs two). Every attempt of m's
   batch carries its expiry E = submit + `batch_lifetime` (the producer's clock), and a
   server neither appends nor acknowledges it once its own clock + the skew bound reaches
   E: so whatever retries, back-off, group moves or producer pauses happen, every copy of
   m that is acknowledged was durable on its server within `batch_lifetime` of m's submit.
2. Call a server *whole* when it still holds every message it ever acknowledged. Any two
   whole servers of G hold every committed message between them: m's two holders and the
   two servers read are both 2-of-3 sets, so they share a server, which (being whole) still
   holds m. So reading 2 whole servers of G is *safe*; so is reading all 3.
3. A server that restarts keeps its disk and stays whole. A server that lost its disk comes
   back as a new incarnation W (a new random id and birth time `born_ms`, stored with its
   data) and is not whole: the messages of its earlier life are gone. When is W whole again
   for a consumer group? Every message W lacks was submitted before W was born. Such a
   message m, if committed, was acknowledged by servers that made it durable before its
   expiry (1.), so it was appended on each of its other holders X before born_ms +
   batch_lifetime (+ the bound on clock skew: born_ms and append times come from different
   clocks). So once the group's position on *every* other server X is past X's cutoff
   (X's first offset appended at or after that time, and that time has passed on X), every
   message W may lack was already delivered from X: W is whole for this consumer group,
   which records that on W with its next offset commit. Messages expired by retention
   need nothing: X's log starts past them, and so does the position.
   Until then W is read (when it is up) but does not count: with one other server down the
   group's read set is unsafe.
4. Per-producer order without loss: a producer numbers its messages 0, 1, 2, ... A message
   is delivered only when its seq is the producer's next; a higher one is held until the gap
   fills (ordering.py). So a message is only ever dropped as a duplicate of one already
   delivered, whatever the order in which servers, groups and retries show it. Reading an
   unsafe set is therefore harmless: it never skips anything. The servers not read keep
   their own committed offsets, so whatever is only on them is read when they are.
5. A gap can be permanent (a batch that never committed, from a producer that died or
   gave up). It is skipped only when it cannot hide a committed message: every group was
   read to its end, through a safe read set, by fetches sent at least batch_lifetime +
   clock skew after the gap was seen (quorum.gap_may_be_skipped). Any message with a
   missing seq was submitted before the held one was (seqs are assigned at submit), so by
   1. every acknowledged copy of it was durable by then and would have been found; a copy
   appended later is refused or unacknowledged, so the batch was not committed (its
   producer reports it as failed). While any group is down or unsafe, gaps wait (other
   producers' messages keep flowing). The ack deadline bounds one attempt only; it plays
   no part in this argument.
6. Offsets: a server's committed offset is the offset of its earliest message read but not
   yet delivered (held), else its read position (ordering.commit_position), and it is
   committed only after the handler returned for everything delivered before it, together
   with the per-producer positions. After a crash, reading resumes from the committed
   offsets; the positions (the highest over the servers: each was written after its
   deliveries) drop what was already delivered; what was delivered after the last commit is
   delivered again (at-least-once; `ExactlyOnce` makes a KVSvr handler exactly-once).
7. The poll()/commit() contract: commit() records everything poll() returned so far as
   handled. If the caller cannot handle some of it (the handler raised), it must call
   rewind() instead: the consumer forgets what it read and resumes from the offsets last
   committed, so nothing unhandled is committed past. run() does that itself when the
   handler raises, before the exception propagates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from kvsvr import _core
from kvsvr.config import ClusterConfig
from kvsvr.errors import InvalidArgument, KvError
from quorumq import protocol, quorum
from quorumq.limits import (
    CONSUMER_COMMIT_INTERVAL_S,
    FETCH_BYTES_DEFAULT,
    FETCH_BYTES_MAX,
    FETCH_WAIT_MS_MAX,
    GROUP_BACKOFF_S,
    GROUP_BACKOFF_S_MAX,
)
from quorumq.ordering import ProducerOrder
from quorumq.producer import queue_groups
from quorumq.protocol import QMethod
from quorumq.transport import dealer, request_frame

log = logging.getLogger("quorumq.consumer")

ATTEMPT_GRACE_S = 1.0          # a request unanswered this long past its wait: server down
WHOLE_CHECK_INTERVAL_S = 0.5   # how often cutoffs are asked for, while a server is not whole


@dataclass(frozen=True)
class Delivery:
    """One message handed to the handler."""

    producer_id: int
    seq: int
    value: bytes
    group: str
    append_ms: int

    @property
    def message_id(self) -> tuple[int, int]:
        return self.producer_id, self.seq


class _Server:
    def __init__(self, group: int, index: int, node: str, address: str, socket: zmq.Socket):
        self.group = group
        self.index = index
        self.node = node
        self.address = address
        self.socket = socket
        self.key = (group, index)
        self.loaded = False             # its committed offset has been read
        self.incarnation = 0
        self.born_ms = 0
        self.position = 0               # next offset to read
        self.whole = False
        self.whole_recorded = False     # `whole` was committed on this incarnation
        self.down_until = 0.0
        self.backoff = GROUP_BACKOFF_S
        self.requests: dict[int, tuple[str, float, Any]] = {}   # id -> (kind, sent, extra)
        self.next_id = 1
        self.fetching = False
        self.caught_up_at: float | None = None
        self.end_offset = 0
        self.cutoffs: dict[int, int] = {}   # other server index -> cutoff offset (for whole)
        self.next_whole_check = 0.0

    @property
    def up(self) -> bool:
        return self.loaded and self.down_until <= time.monotonic()

    def send(self, kind: str, method: int, request: Any, now: float, extra: Any = None) -> None:
        request_id = self.next_id
        self.next_id += 1
        try:
            self.socket.send(request_frame(method, request_id, request), zmq.NOBLOCK)
        except zmq.Again:
            self.fail(now, "not connected")
            return
        self.requests[request_id] = (kind, now, extra)
        if kind == "fetch":
            self.fetching = True

    def fail(self, now: float, why: str) -> None:
        if self.down_until <= now:
            log.info("queue server %s (%s): %s; reading others for %.1f s", self.node,
                     self.address, why, self.backoff)
        self.down_until = now + self.backoff
        self.backoff = min(self.backoff * 2, GROUP_BACKOFF_S_MAX)
        self.requests.clear()
        self.fetching = False
        self.caught_up_at = None


class Consumer:
    """Consume `topic` as consumer group `group`: `run(handler)` or `poll()` + `commit()`."""

    def __init__(self, config: ClusterConfig | str | Path | None, topic: str, group: str, *,
                 fetch_bytes: int = FETCH_BYTES_DEFAULT, wait_ms: int = 200):
        self.config, self.groups = queue_groups(config)
        self.topic = protocol.check_topic(topic)
        self.group = protocol.check_group(group)
        if not 1 <= fetch_bytes <= FETCH_BYTES_MAX:
            raise InvalidArgument(f"fetch_bytes: expected 1..{FETCH_BYTES_MAX}",
                                  field="fetch_bytes")
        if not isinstance(wait_ms, int) or not 0 <= wait_ms <= FETCH_WAIT_MS_MAX:
            raise InvalidArgument(f"wait_ms: expected 0..{FETCH_WAIT_MS_MAX} (ms), got "
                                  f"{wait_ms!r}", field="wait_ms")
        self.fetch_bytes = fetch_bytes
        self.wait_ms = wait_ms
        settings = self.config.queue
        # The time bound of the argument above: a batch's life plus the clock skew.
        self.margin_ms = settings.batch_lifetime_ms + settings.clock_skew_ms
        self.margin_s = self.margin_ms / 1000
        self._context = zmq.Context()
        self.servers = [[_Server(g, i, s.node, s.address, dealer(self._context, s.address,
                                                                immediate=False))
                         for i, s in enumerate(group_config.servers)]
                        for g, group_config in enumerate(self.groups)]
        self._poller = zmq.Poller()
        self._by_socket: dict[Any, _Server] = {}
        for servers in self.servers:
            for server in servers:
                self._poller.register(server.socket, zmq.POLLIN)
                self._by_socket[server.socket] = server
        self.order = ProducerOrder()
        self._carry: list[Any] = []    # read while commit() waited: the next poll's
        self._next_commit = 0.0
        self._dirty = False
        self.delivered = 0

    # --- the API ------------------------------------------------------------------------------
    def run(self, handler: Callable[[Delivery], Any], *, max_messages: int | None = None,
            stop: Callable[[], bool] | None = None, idle_timeout: float | None = None) -> int:
        """Deliver messages to `handler` until `max_messages`, `stop()` or `idle_timeout`
        seconds without a message; offsets are committed after the handler returned. If the
        handler raises, the consumer rewinds to the last commit (everything after it is
        delivered again, by this consumer or the next one of the group) and the exception
        propagates."""
        handled = 0
        last = time.monotonic()
        while max_messages is None or handled < max_messages:
            if stop is not None and stop():
                break
            batch = self.poll(0.1)
            try:
                for delivery in batch:
                    handler(delivery)
                    handled += 1
            except BaseException:
                self.rewind()
                raise
            if batch:
                last = time.monotonic()
            elif idle_timeout is not None and time.monotonic() - last > idle_timeout:
                break
            self.commit()
        self.commit(force=True)
        return handled

    def poll(self, timeout: float = 0.1) -> list[Delivery]:
        """Messages now deliverable, in per-producer order (empty after `timeout`). The
        caller handles them, then calls commit()."""
        out, self._carry = self._carry, []
        deadline = time.monotonic() + timeout
        while not out:
            now = time.monotonic()
            self._request(now)
            wait = max(0.0, min(deadline - now, 0.05))
            for socket, _ in self._poller.poll(int(wait * 1000)):
                self._receive(self._by_socket[socket], out)
            now = time.monotonic()
            self._expire(now)
            self._skip_gaps(now, out)
            if now >= deadline:
                break
        deliveries = []
        for (group, _index), message in out:
            deliveries.append(Delivery(message[1], message[2], message[4],
                                       self.groups[group].name, message[3]))
        self.delivered += len(deliveries)
        if deliveries:
            self._dirty = True
        return deliveries

    def commit(self, *, force: bool = False) -> None:
        """Commit every server's position (everything delivered so far counts as handled)."""
        now = time.monotonic()
        if not force and now < self._next_commit:
            return
        self._next_commit = now + CONSUMER_COMMIT_INTERVAL_S
        producers = protocol.encode_producers(self.order.next_seq)
        for servers in self.servers:
            for server in servers:
                if not server.up or not server.incarnation:
                    continue
                if not (self._dirty or server.whole != server.whole_recorded or force):
                    continue
                server.send("commit", QMethod.COMMIT, protocol.CommitRequest(
                    self.topic, self.group, server.incarnation,
                    self.order.commit_position(server.key, server.position), server.whole,
                    producers), now, server.whole)
        self._dirty = False
        if force:   # on the way out: give the commits a moment to land
            end = time.monotonic() + 1.0
            while time.monotonic() < end and any(
                    kind == "commit" for servers in self.servers for s in servers
                    for kind, _, _ in s.requests.values()):
                for socket, _ in self._poller.poll(50):
                    # Anything read here is delivered by the next poll, never dropped.
                    self._receive(self._by_socket[socket], self._carry)

    def rewind(self) -> None:
        """Forget everything read since the last commit: reading resumes from the offsets
        and producer positions committed on the servers. Call it instead of commit() when
        some of what poll() returned was not handled."""
        self.order = ProducerOrder()
        self._carry = []
        self._dirty = False
        for servers in self.servers:
            for server in servers:
                server.loaded = False
                server.position = 0
                server.whole = server.whole_recorded = False
                server.requests.clear()    # late answers to these are ignored
                server.fetching = False
                server.caught_up_at = None
                server.cutoffs.clear()
                server.next_whole_check = 0.0

    def status(self) -> dict[str, Any]:
        """What this consumer reads and why, per server."""
        out = []
        for servers in self.servers:
            up = [s.up for s in servers]
            whole = [s.whole for s in servers]
            chosen, safe = quorum.read_set(up, whole)
            for server in servers:
                out.append({"group": self.groups[server.group].name, "node": server.node,
                            "up": server.up, "whole": server.whole,
                            "reading": server.index in chosen, "safe": safe,
                            "incarnation": server.incarnation, "position": server.position,
                            "end_offset": server.end_offset})
        return {"servers": out, "delivered": self.delivered,
                "held": self.order.held_count, "duplicates": self.order.duplicates,
                "skipped": self.order.skipped}

    def close(self) -> None:
        for servers in self.servers:
            for server in servers:
                server.socket.close(linger=0)
        self._context.term()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the engine ---------------------------------------------------------------------------
    def _request(self, now: float) -> None:
        for servers in self.servers:
            for server in servers:
                if server.down_until > now or (server.requests and not server.loaded):
                    continue
                if not server.loaded:
                    server.send("offsets", QMethod.OFFSETS,
                                protocol.OffsetsRequest(self.topic, self.group), now)
            up = [s.up for s in servers]
            chosen, _safe = quorum.read_set(up, [s.whole for s in servers])
            for index in chosen:
                server = servers[index]
                if not server.fetching:
                    server.send("fetch", QMethod.FETCH, protocol.FetchRequest(
                        self.topic, server.position, self.fetch_bytes, self.wait_ms), now)
            for server in servers:
                if server.up and not server.whole and now >= server.next_whole_check:
                    server.next_whole_check = now + WHOLE_CHECK_INTERVAL_S
                    self._check_whole(server, servers, now)

    def _check_whole(self, server: _Server, servers: list[_Server], now: float) -> None:
        """Ask the others for their cutoffs (once each), then apply quorum.whole_again."""
        positions: list[int | None] = []
        cutoffs: list[int | None] = []
        for other in servers:
            if other is server:
                continue
            if other.index not in server.cutoffs and other.up and not any(
                    kind == "time" and extra == server.index
                    for kind, _, extra in other.requests.values()):
                other.send("time", QMethod.TIME_OFFSET, protocol.TimeOffsetRequest(
                    self.topic, server.born_ms + self.margin_ms), now, server.index)
            positions.append(self.order.commit_position(other.key, other.position)
                             if other.up else None)
            cutoffs.append(server.cutoffs.get(other.index))
        if quorum.whole_again(positions, cutoffs):
            server.whole = True
            log.info("queue server %s: incarnation %016x holds everything for consumer group "
                     "%s (counts toward the read set again)", server.node, server.incarnation,
                     self.group)

    def _receive(self, server: _Server, out: list[Any]) -> None:
        while True:
            try:
                payload = server.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            frames, _error, _ = _core.decode_frames(payload)
            for _kind, status, request_id, _budget, body in frames:
                entry = server.requests.pop(request_id, None)
                if entry is None:
                    continue   # an answer to a request given up on
                kind, sent, extra = entry
                try:
                    reply = protocol.parse_reply(_METHODS[kind], status, body)
                except KvError as e:
                    if kind == "fetch":
                        server.fetching = False
                    server.fail(time.monotonic(), f"{kind}: {e}")
                    continue
                if kind == "offsets":
                    self._loaded(server, reply, out)
                elif kind == "fetch":
                    server.fetching = False
                    self._fetched(server, reply, sent, out)
                elif kind == "time":
                    self._cutoff(server, extra, reply)
                elif kind == "commit":
                    server.whole_recorded = bool(extra)

    def _loaded(self, server: _Server, reply: protocol.OffsetsReply, out: list[Any]) -> None:
        server.loaded = True
        server.backoff = GROUP_BACKOFF_S
        if reply.incarnation != server.incarnation:
            self._new_life(server, reply.incarnation, reply.born_ms)
        if reply.found:
            server.position = reply.offset
            server.whole = server.whole_recorded = reply.whole
            # A late-loaded server may know later positions: raise them, releasing (or
            # dropping as duplicates) what is held, never just overwriting next_seq.
            now = time.monotonic()
            for producer, next_seq in protocol.decode_producers(reply.producers).items():
                self.order.raise_to(producer, next_seq, now, out)

    def _new_life(self, server: _Server, incarnation: int, born_ms: int) -> None:
        if server.incarnation:
            log.warning("queue server %s has a new incarnation %016x (its disk was replaced): "
                        "it does not count toward the read set until it holds everything",
                        server.node, incarnation)
        server.incarnation = incarnation
        server.born_ms = born_ms
        server.position = 0
        server.whole = server.whole_recorded = False
        server.cutoffs.clear()
        server.caught_up_at = None
        # Others' cutoffs that were measured against this server are still valid (they are
        # about the other server's life); cutoffs *on* this server for others are not.
        for other in self.servers[server.group]:
            other.cutoffs.pop(server.index, None)

    def _fetched(self, server: _Server, reply: protocol.FetchReply, sent: float,
                 out: list[Any]) -> None:
        server.backoff = GROUP_BACKOFF_S
        if reply.incarnation != server.incarnation:
            self._new_life(server, reply.incarnation, reply.born_ms)
            return
        server.end_offset = reply.end_offset
        if reply.records:
            try:
                messages = _core.decode_queue_records(reply.records)
            except _core.QueueRecordError as e:
                server.fail(time.monotonic(), f"corrupt fetch reply ({e})")
                return
            now = time.monotonic()
            offer = self.order.offer
            key = server.key
            for message in messages:
                offer(key, message, now, out)
        server.position = max(server.position, reply.next_offset)
        if server.position >= reply.end_offset:
            server.caught_up_at = sent

    def _cutoff(self, other: _Server, index: int, reply: protocol.TimeOffsetReply) -> None:
        if reply.complete:
            self.servers[other.group][index].cutoffs[other.index] = reply.offset

    def _expire(self, now: float) -> None:
        grace = self.wait_ms / 1000 + ATTEMPT_GRACE_S
        for servers in self.servers:
            for server in servers:
                for kind, sent, _ in list(server.requests.values()):
                    if now - sent > grace:
                        server.fail(now, f"{kind} unanswered for {now - sent:.1f} s")
                        break

    def _skip_gaps(self, now: float, out: list[Any]) -> None:
        gaps = self.order.gaps()
        if not gaps:
            return
        caught_up: list[float | None] = []
        for servers in self.servers:
            chosen, safe = quorum.read_set([s.up for s in servers], [s.whole for s in servers])
            if not safe:
                return
            caught_up.extend(servers[i].caught_up_at for i in chosen)
        for producer, since in gaps.items():
            if quorum.gap_may_be_skipped(since, self.margin_s, caught_up):
                log.warning("producer %016x: giving up missing messages before seq %d (never "
                            "committed: every group was read to its end since)", producer,
                            min(self.order.held[producer]))
                self.order.skip_gap(producer, now, out)


_METHODS = {"offsets": QMethod.OFFSETS, "fetch": QMethod.FETCH, "time": QMethod.TIME_OFFSET,
            "commit": QMethod.COMMIT}
