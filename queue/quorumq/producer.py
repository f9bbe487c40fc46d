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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq.asyncio

from kvsvr.config import ClusterConfig, QueueGroupConfig, load
from kvsvr.errors import ConfigError, InvalidArgument, KvError, NotFound, Timeout
from kvsvr.protocol import as_bytes
from quorumq import protocol, quorum
from quorumq.limits import (
    GROUP_BACKOFF_S,
    GROUP_BACKOFF_S_MAX,
    PRODUCE_BATCH_BYTES_MAX,
    PRODUCER_BATCHES_IN_FLIGHT_MAX,
    PRODUCER_LINGER_MS,
    QUEUE_BATCH_MESSAGES_MAX,
    QUEUE_MESSAGE_BYTES_MAX,
    REQUEST_TIMEOUT_S,
)
from quorumq.protocol import QMethod
from quorumq.storage import now_ms
from quorumq.transport import AsyncConnection

CONNECT_WAIT_S = 2.0
ABANDONED = -1   # an attempt given up because another one found its group failed


@dataclass(frozen=True)
class Committed:
    """Where a batch committed: its message ids are (producer_id, first_seq + i)."""

    group: str
    producer_id: int
    first_seq: int
    count: int
    attempts: int
    latency_s: float


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
        self._linger: asyncio.TimerHandle | None = None
        self._open: set[asyncio.Task[Any]] = set()
        self._settings: protocol.CreateTopicRequest | None = None
        self.counters = {"batches": 0, "messages": 0, "retries": 0, "group_moves": 0,
                         "group_failures": 0}

    async def start(self) -> AsyncProducer:
        self._context = zmq.asyncio.Context()
        self._connections = [[AsyncConnection(self._context, s.address) for s in g.servers]
                             for g in self.groups]
        self._slots = asyncio.Semaphore(self.max_in_flight)
        loop = asyncio.get_running_loop()
        self._group_failed = [loop.create_future() for _ in self.groups]
        await self._connect()
        return self

    async def _connect(self) -> None:
        """Wait (up to CONNECT_WAIT_S) until 2 servers of every group answer, so the first
        batches do not fail on sockets still connecting; learn the topic's settings."""
        deadline = time.monotonic() + CONNECT_WAIT_S
        answered: set[tuple[int, int]] = set()
        while time.monotonic() < deadline:
            for g, connections in enumerate(self._connections):
                for s, connection in enumerate(connections):
                    if (g, s) in answered:
                        continue
                    try:
                        topics = await connection.request(QMethod.TOPICS,
                                                          protocol.TopicsRequest(), 0.5)
                    except KvError:
                        continue
                    answered.add((g, s))
                    for info in topics:
                        if info.topic == self.topic and self._settings is None:
                            self._settings = protocol.CreateTopicRequest(
                                self.topic, info.retention_bytes, info.retention_s)
            if all(sum((g, s) in answered for s in range(len(c))) >= quorum.WRITE_QUORUM
                   for g, c in enumerate(self._connections)):
                return
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> AsyncProducer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the API ------------------------------------------------------------------------------
    async def send_batch(self, values: Iterable[Any], *,
                         timeout: float | None = None) -> Committed:
        """Send one batch; returns once 2 servers of a group have it durably."""
        future = await self.submit(check_batch(values))
        if timeout is None:
            return await future
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise Timeout(f"batch not committed in {timeout} s (still being retried)") from None

    async def submit(self, messages: list[bytes]) -> asyncio.Future[Committed]:
        """Start a checked batch (waits for a free in-flight slot); the future resolves
        when it committed."""
        assert self._slots is not None, "start() the producer first"
        await self._slots.acquire()
        if self._next_seq + len(messages) > protocol.SEQ_LIMIT:
            self._slots.release()
            raise InvalidArgument("next_seq: this producer id has used every seq",
                                  field="next_seq")
        batch = _Batch(messages, self._next_seq)
        self._next_seq += len(messages)
        batch.future = asyncio.get_running_loop().create_future()
        batch.started = time.monotonic()
        batch.expires_at = batch.started + self.lifetime_ms / 1000
        batch.expires_ms = now_ms() + self.lifetime_ms
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._open.add(task)
        task.add_done_callback(self._open.discard)
        return batch.future

    async def send(self, value: Any) -> asyncio.Future[Committed]:
        """Queue one message; it leaves with others after linger_ms (or when a batch is
        full). The future resolves when its batch committed."""
        message = as_message(0, value)
        future: asyncio.Future[Committed] = asyncio.get_running_loop().create_future()
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
            if self._context is not None:
                self._context.term()
                self._context = None

    # --- the engine ---------------------------------------------------------------------------
    async def _flush_pending(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        pending, self._pending = self._pending, []
        while pending:
            size = 0
            end = 0
            while end < len(pending) and end < QUEUE_BATCH_MESSAGES_MAX and \
                    size + len(pending[end][0]) <= PRODUCE_BATCH_BYTES_MAX:
                size += len(pending[end][0])
                end += 1
            chunk, pending = pending[:end], pending[end:]
            batch_future = await self.submit([m for m, _ in chunk])
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

    def _pick_group(self) -> int:
        """The current group, unless it is in back-off: then the next one that is not (or
        the one whose back-off ends first)."""
        now = time.monotonic()
        count = len(self.groups)
        for step in range(count):
            index = (self.group_index + step) % count
            if self._backoff_until[index] <= now:
                if index != self.group_index:
                    self.group_index = index
                    self.counters["group_moves"] += 1
                return index
        return min(range(count), key=lambda i: self._backoff_until[i])

    def _expire(self, batch: _Batch) -> None:
        assert batch.future is not None
        if not batch.future.done():
            last = batch.first_seq + len(batch.messages) - 1
            batch.future.set_exception(Timeout(
                f"batch of producer {self.producer_id:016x} seq {batch.first_seq}..{last} not "
                f"committed within batch_lifetime_ms ({self.lifetime_ms}); NOT acknowledged "
                f"(after {batch.attempts} attempt(s); its messages may or may not be "
                "delivered)"))

    async def _run(self, batch: _Batch) -> None:
        assert batch.future is not None and self._slots is not None
        try:
            while True:
                group = self._pick_group()
                wait = min(self._backoff_until[group], batch.expires_at) - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
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
                    batch.future.set_exception(NotFound(
                        f"topic: {self.topic!r} does not exist in any queue group (create it "
                        "with `quorumq create-topic`)", field="topic"))
                    return
                if outcome == quorum.FAILED:
                    self._group_down(group)
        except asyncio.CancelledError:
            if not batch.future.done():   # close() gave up on it
                batch.future.set_exception(Timeout(
                    f"batch of producer {self.producer_id:016x} from seq {batch.first_seq}: "
                    "the producer was closed before it committed; NOT acknowledged"))
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

    def send_batch(self, values: Iterable[Any], *, timeout: float | None = None) -> Committed:
        messages = check_batch(values)
        return self._call(self._engine.send_batch(messages, timeout=timeout))

    def submit_batch(self, values: Iterable[Any]) -> concurrent.futures.Future[Committed]:
        """Start a batch without waiting for it; the future resolves when it committed."""
        messages = check_batch(values)

        async def start() -> Committed:
            return await (await self._engine.submit(messages))

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
