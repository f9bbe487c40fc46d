"""Producers: `AsyncProducer` (asyncio) and `Producer` (blocking, the same engine on a thread).

A batch goes to the 3 servers of the producer's current group at once and is committed when
2 of them have acknowledged it (each server acknowledges only after fdatasync). An
acknowledgement counts only if it arrives within `ack_deadline` of sending (the consumers'
rule for servers with a new disk relies on that bound). A batch that cannot get 2 in time
(servers down, stopped or refusing) is sent again, with the same message ids, to the next
group not in back-off, and the producer moves there; its earlier copy, if it did commit after
all, is a duplicate that consumers drop by id. The first attempt to fail on a group puts the
group in back-off and sends every other batch in flight there on at once (a stopped group
costs one ack deadline, not one per batch in flight). Many batches are in flight at once
(`max_in_flight`); `send` gathers single messages into batches for `linger_ms`.

Message ids are (producer_id, seq): producer_id is random (62 bits) for each producer
object, seq counts from 0 without gaps. A restarted process is a new producer with a new id
(reusing an id with seq 0 again would make consumers drop its new messages as duplicates); to
resume an id, pass both `producer_id` and `next_seq` (a seq above every one it ever sent).

A batch lives `batch_lifetime_ms` (config [queue]) from `submit`: every attempt carries the
absolute expiry, servers refuse to append or acknowledge it after that, and the producer
fails it with Timeout (NOT acknowledged: its messages may or may not be delivered). Until
then it is retried. Consumers rely on that bound to give up gaps and to count a new disk
whole again (consumer.py). `send_batch` returns when it committed (or raises after
`timeout`, while the retrying goes on); `close(timeout)` fails what is still open.

The producer connects in the background: a batch waits up to PRODUCER_CONNECT_GRACE_S after
the start for 2 servers of a group to connect; after that, a batch that no group can take
(each has fewer than 2 servers connected) fails at once with Unavailable, not after its
lifetime. (A server that is connected but does not answer, stopped say, is only found out
by its ack deadline.)

**Retry under the same ids.** A failed batch raises a `PublishFailed` (PublishTimeout,
PublishUnavailable or PublishNotFound) whose `unacknowledged` names its (producer_id,
first_seq, count). `send_batch(values, retry_of=error)` on the same producer sends the same
values again under those ids, with a new lifetime: if the first try did commit after all,
consumers drop the retry as a duplicate, so the message is delivered once, in its place in
the producer's order. The retry must reach the servers before consumers may give the gap up:
once a later batch of the producer was submitted, its lifetime is capped at that submit +
batch lifetime (the instant from which consumers count; consumer.py, 5), and past that the
retry is refused (send the values as new messages then). A batch that never had a later one
can be retried at any time.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq.asyncio

from kvsvr.config import ClusterConfig, QueueGroupConfig, load
from kvsvr.errors import ConfigError, InvalidArgument, KvError, NotFound, Timeout, Unavailable
from kvsvr.protocol import as_bytes
from quorumq import protocol, quorum
from quorumq.limits import (
    GROUP_BACKOFF_S,
    GROUP_BACKOFF_S_MAX,
    PRODUCE_BATCH_BYTES_MAX,
    PRODUCER_BATCHES_IN_FLIGHT_MAX,
    PRODUCER_CONNECT_GRACE_S,
    PRODUCER_CONNECT_POLL_S,
    PRODUCER_LINGER_MS,
    PRODUCER_RETRYABLE_BATCHES_MAX,
    QUEUE_BATCH_MESSAGES_MAX,
    QUEUE_MESSAGE_BYTES_MAX,
    REQUEST_TIMEOUT_S,
)
from quorumq.protocol import QMethod
from quorumq.storage import now_ms
from quorumq.transport import AsyncConnection

ABANDONED = -1   # an attempt given up because another one found its group failed


@dataclass(frozen=True)
class Committed:
    """Where a batch committed: its message ids are (producer_id, first_seq + i);
    `latency_s` runs from the publish call (send_batch, or a message's send) to the
    acknowledgement, waits for a free in-flight slot and retries included."""

    group: str
    producer_id: int
    first_seq: int
    count: int
    attempts: int
    latency_s: float


@dataclass(frozen=True)
class Unacknowledged:
    """The ids of a batch that failed: (producer_id, first_seq + i) for i < count."""

    producer_id: int
    first_seq: int
    count: int


class PublishFailed(KvError):
    """A batch was NOT acknowledged (its messages may or may not be delivered);
    `unacknowledged` names its ids, for `send_batch(values, retry_of=error)`."""

    def __init__(self, message: str, unacknowledged: Unacknowledged, *,
                 field: str | None = None):
        super().__init__(message, field=field)
        self.unacknowledged = unacknowledged


class PublishTimeout(Timeout, PublishFailed):
    """Not committed within its lifetime (or the producer was closed first)."""


class PublishUnavailable(Unavailable, PublishFailed):
    """No queue group could take it: each has fewer than 2 servers connected."""


class PublishNotFound(NotFound, PublishFailed):
    """The topic exists in no queue group."""


def messages_digest(messages: list[bytes]) -> bytes:
    """What a retry is checked against: the same values, in the same order."""
    digest = hashlib.blake2b(digest_size=16)
    for message in messages:
        digest.update(len(message).to_bytes(8, "little"))
        digest.update(message)
    return digest.digest()


def as_message(index: int, value: Any) -> bytes:
    return as_bytes(f"messages[{index}]", value, max_length=QUEUE_MESSAGE_BYTES_MAX)


def check_batch(values: Iterable[Any]) -> list[bytes]:
    messages = [as_message(i, v) for i, v in enumerate(values)]
    if not 1 <= len(messages) <= QUEUE_BATCH_MESSAGES_MAX:
        raise InvalidArgument(f"messages: {len(messages)} in one batch, expected "
                              f"1..{QUEUE_BATCH_MESSAGES_MAX}", field="messages")
    total = sum(len(m) for m in messages)
    if total > PRODUCE_BATCH_BYTES_MAX:
        raise InvalidArgument(f"messages: {total} bytes in one batch, the limit is "
                              f"{PRODUCE_BATCH_BYTES_MAX}", field="messages")
    return messages


def queue_groups(config: ClusterConfig | str | Path | None) -> tuple[ClusterConfig,
                                                                     list[QueueGroupConfig]]:
    if not isinstance(config, ClusterConfig):
        config = load(config)
    if not config.queue_groups:
        raise ConfigError("queue_groups: the config has no queue groups")
    return config, list(config.queue_groups)


@dataclass
class _Batch:
    messages: list[bytes]
    first_seq: int
    body_by_group: dict[int, bytes] = field(default_factory=dict)
    future: asyncio.Future[Committed] | None = None
    started: float = 0.0
    attempts: int = 0
    not_found_groups: set[int] = field(default_factory=set)
    expires_ms: int = 0            # wall clock, sent with every attempt
    expires_at: float = 0.0        # the same instant on this process's monotonic clock
    # Wall-clock ms when the producer's next batch (a higher seq) was submitted: consumers
    # may give this batch's seqs up from then + lifetime, so a retry must be done by then.
    later_ms: int | None = None
    digest: bytes = b""            # of the messages, kept once the batch failed


class AsyncProducer:
    """Produce to one topic of a queue cluster. Use `async with AsyncProducer(...) as p`."""

    def __init__(self, config: ClusterConfig | str | Path | None, topic: str, *,
                 producer_id: int | None = None, max_in_flight: int =
                 PRODUCER_BATCHES_IN_FLIGHT_MAX, linger_ms: float = PRODUCER_LINGER_MS,
                 ack_deadline: float | None = None, first_group: int | None = None,
                 next_seq: int | None = None):
        self.config, self.groups = queue_groups(config)
        self.topic = protocol.check_topic(topic)
        if (producer_id is None) != (next_seq is None):
            raise InvalidArgument("producer_id: resuming a producer id needs next_seq too (a "
                                  "seq above every one sent under it); leave both out for a "
                                  "new id", field="producer_id")
        if producer_id is not None and not 1 <= producer_id < 1 << 63:
            raise InvalidArgument("producer_id: expected 1..2**63-1", field="producer_id")
        if next_seq is not None and not 0 <= next_seq < protocol.SEQ_LIMIT:
            raise InvalidArgument("next_seq: expected 0..2**64-1", field="next_seq")
        self.producer_id = producer_id or (secrets.randbits(62) | 1)
        if not 1 <= max_in_flight <= 65536:
            raise InvalidArgument("max_in_flight: expected 1..65536", field="max_in_flight")
        self.max_in_flight = max_in_flight
        self.linger_s = linger_ms / 1000
        configured = self.config.queue.ack_deadline_ms / 1000
        if ack_deadline is not None and not 0 < ack_deadline <= configured:
            raise InvalidArgument(f"ack_deadline: expected 0 < seconds <= {configured} (the "
                                  "config's queue.ack_deadline_ms)", field="ack_deadline")
        self.ack_deadline = ack_deadline or configured
        self.lifetime_ms = self.config.queue.batch_lifetime_ms
        self._next_seq = next_seq or 0
        # Which group new batches go to: spread producers over groups by their id.
        self.group_index = (first_group if first_group is not None
                            else self.producer_id % len(self.groups))
        self._backoff_until = [0.0] * len(self.groups)
        self._backoff = [GROUP_BACKOFF_S] * len(self.groups)
        # Per group: resolved when an attempt there fails, so every other attempt in flight
        # on that group stops waiting out its own deadline and moves on at once.
        self._group_failed: list[asyncio.Future[None]] = []
        self._context: zmq.asyncio.Context | None = None
        self._connections: list[list[AsyncConnection]] = []
        self._slots: asyncio.Semaphore | None = None
        self._pending: list[tuple[bytes, asyncio.Future[Committed]]] = []
        self._pending_since = 0.0   # the send() call of the first message pending
        self._linger: asyncio.TimerHandle | None = None
        self._open: set[asyncio.Task[Any]] = set()
        self._settings: protocol.CreateTopicRequest | None = None
        self._grace_until = 0.0
        # Batches without a later one yet (the last submitted, retries of such batches).
        self._awaiting_later: list[_Batch] = []
        # Failed batches that may be retried under their ids, by first seq (oldest first).
        self._failed: collections.OrderedDict[int, _Batch] = collections.OrderedDict()
        self.counters = {"batches": 0, "messages": 0, "retries": 0, "group_moves": 0,
                         "group_failures": 0}

    async def start(self) -> AsyncProducer:
        """Open the sockets; they connect in the background (nothing here waits for a
        server: the first batches do, up to PRODUCER_CONNECT_GRACE_S)."""
        self._context = zmq.asyncio.Context()
        self._connections = [[AsyncConnection(self._context, s.address) for s in g.servers]
                             for g in self.groups]
        self._slots = asyncio.Semaphore(self.max_in_flight)
        loop = asyncio.get_running_loop()
        self._group_failed = [loop.create_future() for _ in self.groups]
        self._grace_until = time.monotonic() + PRODUCER_CONNECT_GRACE_S
        return self

    async def __aenter__(self) -> AsyncProducer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the API ------------------------------------------------------------------------------
    async def send_batch(self, values: Iterable[Any], *, timeout: float | None = None,
                         retry_of: PublishFailed | Unacknowledged | None = None,
                         called: float | None = None) -> Committed:
        """Send one batch; returns once 2 servers of a group have it durably. `retry_of`:
        a failed batch of this producer, sent again under its ids (the same values).
        `called`: the monotonic time of the publish call, if it was before this one."""
        called = time.monotonic() if called is None else called
        future = await self.submit(check_batch(values), retry_of=retry_of, called=called)
        if timeout is None:
            return await future
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            # It goes on; whatever it ends with is taken here, never left unretrieved.
            future.add_done_callback(_retrieve)
            raise Timeout(f"batch not committed in {timeout} s (still being retried)") from None

    async def submit(self, messages: list[bytes], *,
                     retry_of: PublishFailed | Unacknowledged | None = None,
                     called: float | None = None) -> asyncio.Future[Committed]:
        """Start a checked batch (waits for a free in-flight slot); the future resolves
        when it committed."""
        assert self._slots is not None, "start() the producer first"
        called = time.monotonic() if called is None else called
        retried = None if retry_of is None else self._retried(messages, retry_of)
        await self._slots.acquire()
        wall = now_ms()
        if retried is not None:
            try:
                batch = self._retry_batch(retried, messages, wall)
            except InvalidArgument:
                self._slots.release()
                raise
        else:
            if self._next_seq + len(messages) > protocol.SEQ_LIMIT:
                self._slots.release()
                raise InvalidArgument("next_seq: this producer id has used every seq",
                                      field="next_seq")
            batch = _Batch(messages, self._next_seq)
            self._next_seq += len(messages)
            batch.expires_ms = wall + self.lifetime_ms
            for earlier in self._awaiting_later:
                earlier.later_ms = wall
            self._awaiting_later = [batch]
        batch.future = asyncio.get_running_loop().create_future()
        batch.started = called
        batch.expires_at = time.monotonic() + (batch.expires_ms - wall) / 1000
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._open.add(task)
        task.add_done_callback(self._open.discard)
        return batch.future

    async def send(self, value: Any) -> asyncio.Future[Committed]:
        """Queue one message; it leaves with others after linger_ms (or when a batch is
        full). The future resolves when its batch committed."""
        message = as_message(0, value)
        future: asyncio.Future[Committed] = asyncio.get_running_loop().create_future()
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append((message, future))
        if len(self._pending) >= QUEUE_BATCH_MESSAGES_MAX or \
                sum(len(m) for m, _ in self._pending) >= PRODUCE_BATCH_BYTES_MAX // 2:
            await self._flush_pending()
        elif self._linger is None:
            loop = asyncio.get_running_loop()
            self._linger = loop.call_later(
                self.linger_s, lambda: loop.create_task(self._flush_pending()))
        return future

    async def flush(self) -> None:
        """Until every message sent so far has committed."""
        await self._flush_pending()
        while self._open:
            await asyncio.gather(*list(self._open), return_exceptions=True)

    async def close(self, timeout: float | None = None) -> None:
        """Flush (at most `timeout` seconds; without one, until every batch committed or
        expired), then fail whatever is still open (Timeout: not acknowledged) and close."""
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), timeout)
            for task in list(self._open):
                task.cancel()
            if self._open:
                await asyncio.gather(*list(self._open), return_exceptions=True)
        finally:
            for connections in self._connections:
                for connection in connections:
                    connection.close()
            for connections in self._connections:
                for connection in connections:
                    await connection.closed()
            if self._context is not None:
                self._context.term()
                self._context = None

    # --- the engine ---------------------------------------------------------------------------
    async def _flush_pending(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        pending, self._pending = self._pending, []
        since = self._pending_since
        while pending:
            size = 0
            end = 0
            while end < len(pending) and end < QUEUE_BATCH_MESSAGES_MAX and \
                    size + len(pending[end][0]) <= PRODUCE_BATCH_BYTES_MAX:
                size += len(pending[end][0])
                end += 1
            chunk, pending = pending[:end], pending[end:]
            batch_future = await self.submit([m for m, _ in chunk], called=since)
            futures = [f for _, f in chunk]

            def fan_out(done: asyncio.Future[Committed],
                        futures: list[asyncio.Future[Committed]] = futures) -> None:
                for f in futures:
                    if f.done():
                        continue
                    if done.cancelled():
                        f.cancel()
                    elif done.exception() is not None:
                        f.set_exception(done.exception())  # type: ignore[arg-type]
                    else:
                        f.set_result(done.result())

            batch_future.add_done_callback(fan_out)

    def _reachable(self, group: int) -> bool:
        return sum(c.writable() for c in self._connections[group]) >= quorum.WRITE_QUORUM

    async def _choose_group(self) -> int:
        """The group for the next attempt (quorum.pick_group, then choose_group), or
        quorum.NO_GROUP. Connections are looked at only while they may still be connecting
        or when the group is in back-off: the common case costs nothing."""
        while True:
            now = time.monotonic()
            picked = quorum.pick_group(self.group_index, self._backoff_until, now)
            connecting = now < self._grace_until
            if connecting or self._backoff_until[picked] > now:
                reachable = [self._reachable(g) for g in range(len(self.groups))]
                picked = quorum.choose_group(picked, self._backoff_until, reachable, now,
                                             connecting)
                if picked == quorum.WAIT_CONNECTING:
                    await asyncio.sleep(PRODUCER_CONNECT_POLL_S)
                    continue
            if picked >= 0 and picked != self.group_index:
                self.group_index = picked
                self.counters["group_moves"] += 1
            return picked

    def _fail(self, batch: _Batch, error_class: type[PublishFailed], reason: str, *,
              field: str | None = None) -> None:
        """Fail the batch (NOT acknowledged) and remember it for a retry under its ids."""
        assert batch.future is not None
        if batch.future.done():
            return
        count = len(batch.messages)
        batch.future.set_exception(error_class(
            f"batch of producer {self.producer_id:016x} seq {batch.first_seq}.."
            f"{batch.first_seq + count - 1}: {reason}; NOT acknowledged (after "
            f"{batch.attempts} attempt(s); its messages may or may not be delivered: retry "
            "with retry_of to keep their ids)",
            Unacknowledged(self.producer_id, batch.first_seq, count), field=field))
        batch.digest = messages_digest(batch.messages)
        batch.messages = [b""] * count   # only their number and digest are kept
        batch.body_by_group = {}
        self._failed.pop(batch.first_seq, None)
        self._failed[batch.first_seq] = batch
        while len(self._failed) > PRODUCER_RETRYABLE_BATCHES_MAX:
            self._failed.popitem(last=False)

    def _retried(self, messages: list[bytes],
                 retry_of: PublishFailed | Unacknowledged) -> _Batch:
        """The failed batch `retry_of` names, checked: this producer's, remembered, and
        with these values."""
        ids = retry_of.unacknowledged if isinstance(retry_of, PublishFailed) else retry_of
        if not isinstance(ids, Unacknowledged):
            raise InvalidArgument("retry_of: expected the PublishFailed error of a failed "
                                  "batch (or its .unacknowledged)", field="retry_of")
        if ids.producer_id != self.producer_id:
            raise InvalidArgument(f"retry_of: a batch of producer {ids.producer_id:016x}; "
                                  f"this producer is {self.producer_id:016x} (retry through "
                                  "the producer that sent it)", field="retry_of")
        failed = self._failed.get(ids.first_seq)
        if failed is None or len(failed.messages) != ids.count:
            raise InvalidArgument(f"retry_of: seq {ids.first_seq} is not a failed batch this "
                                  "producer can retry (it committed on a retry already, is "
                                  "being retried, or is older than the last "
                                  f"{PRODUCER_RETRYABLE_BATCHES_MAX} failures)",
                                  field="retry_of")
        if messages_digest(messages) != failed.digest:
            raise InvalidArgument(f"retry_of: the values are not the failed batch's "
                                  f"({ids.count} message(s), in the same order)",
                                  field="retry_of")
        return failed

    def _retry_batch(self, failed: _Batch, messages: list[bytes], wall: int) -> _Batch:
        """A new attempt of `failed` under its ids; its lifetime ends where consumers may
        start giving its seqs up (the next batch's submit + lifetime), if sooner."""
        if self._failed.get(failed.first_seq) is not failed:
            raise InvalidArgument(f"retry_of: seq {failed.first_seq} is already being "
                                  "retried", field="retry_of")
        expires_ms = wall + self.lifetime_ms
        if failed.later_ms is not None:
            expires_ms = min(expires_ms, failed.later_ms + self.lifetime_ms)
        if expires_ms <= wall:
            raise InvalidArgument(
                f"retry_of: too late to retry seq {failed.first_seq} under its ids: this "
                "producer sent a later batch more than batch_lifetime_ms ago, so consumers "
                "may have given these seqs up; send the values as new messages",
                field="retry_of")
        del self._failed[failed.first_seq]
        batch = _Batch(messages, failed.first_seq, later_ms=failed.later_ms)
        batch.expires_ms = expires_ms
        if batch.later_ms is None:
            self._awaiting_later.append(batch)
        return batch

    def _expire(self, batch: _Batch) -> None:
        self._fail(batch, PublishTimeout,
                   f"not committed within batch_lifetime_ms ({self.lifetime_ms})")

    async def _run(self, batch: _Batch) -> None:
        assert batch.future is not None and self._slots is not None
        try:
            while True:
                group = await self._choose_group()
                if group == quorum.NO_GROUP:
                    self._fail(batch, PublishUnavailable, "no queue group can take it (each "
                               "has fewer than 2 servers connected)")
                    return
                wait = min(self._backoff_until[group], batch.expires_at) - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    if time.monotonic() < batch.expires_at:
                        continue   # choose again: the group may have gone meanwhile
                if time.monotonic() >= batch.expires_at:
                    self._expire(batch)
                    return
                batch.attempts += 1
                outcome = await self._attempt(batch, group)
                if outcome == quorum.COMMITTED:
                    self._backoff[group] = GROUP_BACKOFF_S
                    self.counters["batches"] += 1
                    self.counters["messages"] += len(batch.messages)
                    if not batch.future.done():
                        batch.future.set_result(Committed(
                            self.groups[group].name, self.producer_id, batch.first_seq,
                            len(batch.messages), batch.attempts,
                            time.monotonic() - batch.started))
                    return
                self.counters["retries"] += 1
                if len(batch.not_found_groups) == len(self.groups):
                    self._fail(batch, PublishNotFound, f"topic: {self.topic!r} does not exist "
                               "in any queue group (create it with `quorumq create-topic`)",
                               field="topic")
                    return
                if outcome == quorum.FAILED:
                    self._group_down(group)
        except asyncio.CancelledError:
            # close() gave up on it
            self._fail(batch, PublishTimeout, "the producer was closed before it committed")
            raise
        except Exception as e:   # a bug must fail this batch's caller, not hang it
            if not batch.future.done():
                batch.future.set_exception(e)
        finally:
            self._slots.release()

    def _group_down(self, group: int) -> None:
        """An attempt on `group` failed (overdue or refused): avoid the group for a while,
        doubling, and wake every other attempt in flight there so it goes to the next group
        now rather than one ack deadline after it was sent (a stopped group would otherwise
        hold each of them, and the window, that long). Their copies, should they commit after
        all, are duplicates by message id. Attempts failing together back off once."""
        now = time.monotonic()
        if self._backoff_until[group] > now:
            return
        self._backoff_until[group] = now + self._backoff[group]
        self._backoff[group] = min(self._backoff[group] * 2, GROUP_BACKOFF_S_MAX)
        self.counters["group_failures"] += 1
        failed = self._group_failed[group]
        self._group_failed[group] = asyncio.get_running_loop().create_future()
        failed.set_result(None)

    async def _attempt(self, batch: _Batch, group: int) -> int:
        """COMMITTED, FAILED (refused, or overdue), or ABANDONED (another attempt found
        the group failed meanwhile)."""
        body = batch.body_by_group.get(group)
        if body is None:
            body = protocol.encode(protocol.ProduceRequest(
                self.topic, self.producer_id, batch.first_seq, batch.messages,
                batch.expires_ms))
            batch.body_by_group = {group: body}
        connections = self._connections[group]
        futures = [c.send(QMethod.PRODUCE, body) for c in connections]
        acks = failures = not_found = 0
        # An acknowledgement counts within the attempt's deadline and the batch's life.
        deadline = min(time.monotonic() + self.ack_deadline, batch.expires_at)
        group_failed = self._group_failed[group]
        pending: set[asyncio.Future[Any]] = {*futures, group_failed}
        outcome = quorum.PENDING
        while outcome == quorum.PENDING:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            done, pending = await asyncio.wait(pending, timeout=left,
                                               return_when=asyncio.FIRST_COMPLETED)
            abandon = group_failed in done
            done.discard(group_failed)
            for future in done:
                status, _body = future.result()
                if status == protocol.OK:
                    acks += 1
                else:
                    failures += 1
                    if status == NotFound.code:
                        not_found += 1
                        self._recreate(connections[futures.index(future)])
            outcome = quorum.batch_outcome(acks, failures, len(connections))
            if abandon and outcome == quorum.PENDING:
                outcome = ABANDONED
        for future, connection in zip(futures, connections, strict=True):
            if not future.done():
                connection.forget(future)  # a late answer no longer counts
        if not_found >= quorum.WRITE_QUORUM:
            batch.not_found_groups.add(group)
        return quorum.FAILED if outcome == quorum.PENDING else outcome

    def _recreate(self, connection: AsyncConnection) -> None:
        """A server without the topic (a new disk): create it there again, with the
        settings another server of the cluster has, so its next batches are taken."""
        async def recreate() -> None:
            try:
                if self._settings is None:
                    self._settings = await self._topic_settings()
                if self._settings is not None:
                    await connection.request(QMethod.CREATE_TOPIC, self._settings,
                                             REQUEST_TIMEOUT_S)
            except KvError:
                pass   # the next batch tries again

        task = asyncio.get_running_loop().create_task(recreate())
        self._open.add(task)
        task.add_done_callback(self._open.discard)

    async def _topic_settings(self) -> protocol.CreateTopicRequest | None:
        for connections in self._connections:
            for connection in connections:
                try:
                    topics = await connection.request(QMethod.TOPICS, protocol.TopicsRequest(),
                                                      1.0)
                except KvError:
                    continue
                for info in topics:
                    if info.topic == self.topic:
                        return protocol.CreateTopicRequest(self.topic, info.retention_bytes,
                                                           info.retention_s)
        return None


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Take a future's outcome (nobody else will) so it is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()


class Producer:
    """The blocking producer: an AsyncProducer on its own event-loop thread.

    `send_batch(values)` blocks until committed; `send(value)` returns a
    concurrent.futures.Future; `flush()`, `close()` (or use it as a context manager)."""

    def __init__(self, config: ClusterConfig | str | Path | None, topic: str,
                 **options: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="quorumq-producer",
                                        daemon=True)
        self._thread.start()
        try:
            self._engine = self._call(self._make(config, topic, options))
        except BaseException:
            self._stop_loop()
            raise
        self.producer_id = self._engine.producer_id

    @staticmethod
    async def _make(config: Any, topic: str, options: dict[str, Any]) -> AsyncProducer:
        return await AsyncProducer(config, topic, **options).start()

    def _call(self, coroutine: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    @property
    def counters(self) -> dict[str, int]:
        return dict(self._engine.counters)

    @property
    def group(self) -> str:
        return self._engine.groups[self._engine.group_index].name

    def send_batch(self, values: Iterable[Any], *, timeout: float | None = None,
                   retry_of: PublishFailed | Unacknowledged | None = None) -> Committed:
        """Blocks until committed; raises a PublishFailed (not acknowledged: retry it with
        `retry_of=error` to keep its ids), or Timeout after `timeout`."""
        called = time.monotonic()
        messages = check_batch(values)
        return self._call(self._engine.send_batch(messages, timeout=timeout,
                                                  retry_of=retry_of, called=called))

    def submit_batch(self, values: Iterable[Any], *,
                     retry_of: PublishFailed | Unacknowledged | None = None
                     ) -> concurrent.futures.Future[Committed]:
        """Start a batch without waiting for it; the future resolves when it committed."""
        called = time.monotonic()
        messages = check_batch(values)

        async def start() -> Committed:
            return await (await self._engine.submit(messages, retry_of=retry_of,
                                                    called=called))

        return asyncio.run_coroutine_threadsafe(start(), self._loop)

    def send(self, value: Any) -> concurrent.futures.Future[Committed]:
        message = as_message(0, value)

        async def start() -> Committed:
            return await (await self._engine.send(message))

        return asyncio.run_coroutine_threadsafe(start(), self._loop)

    def flush(self, timeout: float | None = None) -> None:
        self._call(self._engine.flush(), timeout)

    def close(self, timeout: float | None = None) -> None:
        """See AsyncProducer.close: at most `timeout` s (else until every batch committed or
        expired); batches still open fail with Timeout (not acknowledged)."""
        try:
            self._call(self._engine.close(timeout))
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
