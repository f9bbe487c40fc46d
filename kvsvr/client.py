"""The blocking client: `kvsvr.Client`.

Each call routes its key (xxh64 -> virtual shard -> group) to the group's replicas, the key's
home replica first (it commits writes on the fast path), and waits for the answer within a
deadline. A request unanswered after `attempt_timeout`, or answered Unavailable (or Timeout:
the replica could not finish it in time), is sent to the next replica of the key that is not
failing, with the same operation id: the replicas
dedupe by op id, so a write that was already applied is answered from the op-id table instead
of being applied twice, whichever replica the retry reaches. The client remembers which
replicas failed (kvsvr.health) and skips them until their back-off ends, then probes them
again. A refusal that may not be final (a compare-and-set expecting a version the key has not
reached, say) is raised as Timeout when another attempt of the request, unanswered at another
replica, may still apply it (kvsvr.calls.refusal_outcome). `pipeline()` sends many calls at
once, one message per replica; `batch(key)` commits several mutations of one key atomically
as one version.

A Client may be shared by threads (each thread gets its own sockets); create one per process
after fork.
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Self

import zmq

from kvsvr import _core, calls
from kvsvr import protocol as p
from kvsvr.calls import CallSpec
from kvsvr.config import ClusterConfig, check_client_address, load
from kvsvr.connecting import Parked, close_sockets, connect, send_frames, unreachable
from kvsvr.errors import Internal, InvalidArgument, KvError, Timeout, Unavailable
from kvsvr.health import HEALTHY, Health
from kvsvr.limits import (
    CLIENT_ATTEMPT_TIMEOUT_S,
    CONNECT_WAIT_S,
    LIST_KEYS_DEFAULT,
    SCAN_ROWS_DEFAULT,
    TIMEOUT_S_DEFAULT,
    WATCH_WAIT_S_DEFAULT,
)
from kvsvr.listing import KeyListing
from kvsvr.protocol import MutateReply
from kvsvr.sharding import Router
from kvsvr.typed import queued, returning
from kvsvr.watching import WatchEvent, watch_events

LINEARIZABLE = calls.LINEARIZABLE

_encode = p.encode
_encode_frame = _core.encode_frame
_decode_frames = _core.decode_frames
_REQUEST = _core.FRAME_REQUEST


def check_timeout(name: str, value: Any) -> float:
    if (not isinstance(value, int | float) or isinstance(value, bool) or value != value
            or not 0 < value <= 86_400):
        raise InvalidArgument(f"{name}: expected seconds in (0, 86400], got {value!r}",
                              field=name)
    return float(value)


def make_router(config: ClusterConfig | str | Path | None, address: str | None) -> Router:
    if address is not None:
        if not isinstance(address, str):
            raise InvalidArgument(f"address: expected a str like 'tcp://127.0.0.1:7400', got "
                                  f"{type(address).__name__}", field="address")
        check_client_address(address)
        return Router(address=address)
    if not isinstance(config, ClusterConfig | str | Path | None):
        raise InvalidArgument(f"config: expected a path, a ClusterConfig or None, got "
                              f"{type(config).__name__}", field="config")
    if not isinstance(config, ClusterConfig):
        config = load(config)
    return Router(config)


def first_client_seq() -> int:
    """Where a client's op sequence starts: the wall clock in microseconds, so a client id
    passed again to a later client (resuming it) continues past every op id of the earlier
    one (no client sends a million ops a second). Starting at 1 made the later client's
    incr and append calls answered from the earlier one's remembered replies, not applied."""
    return time.time_ns() // 1000


def client_id_or_new(client_id: Any) -> int:
    """The caller's client id, checked, or a new random one (op ids must never repeat)."""
    if client_id is None:
        return secrets.randbits(62) | 1
    if not isinstance(client_id, int) or isinstance(client_id, bool) \
            or not 1 <= client_id < 1 << 64:
        raise InvalidArgument(f"client_id: expected an int in 1..2**64-1 (or None for a new "
                              f"random one), got {client_id!r}", field="client_id")
    return client_id


class ClientCalls(KeyListing):
    """The calls every client offers; subclasses say how a CallSpec is run."""

    def _run(self, spec: CallSpec) -> Any:
        raise NotImplementedError

    def _op_id(self) -> tuple[int, int]:
        raise NotImplementedError

    # Key-Value
    def get(self, key: Any, *, consistency: str = LINEARIZABLE) -> Any:
        """(version, value) of `key`; raises NotFound (with the key's version) if it has none.
        consistency="local" reads the replica's own copy without asking a majority (faster,
        possibly stale; the version says what was read)."""
        return self._run(calls.get(key, consistency))

    def put(self, key: Any, value: Any, *, expected_version: int | None = None,
            ttl: float | None = None) -> Any:
        """Store `value`; returns the key's new version. CAS if `expected_version` is given.
        `ttl`: seconds until it expires (reads as absent), else it never does."""
        return self._run(calls.put(key, value, expected_version, self._op_id(), ttl))

    def delete(self, key: Any, *, expected_version: int | None = None) -> Any:
        """Remove the value (the key keeps its version); returns the new version."""
        return self._run(calls.delete(key, expected_version, self._op_id()))

    def incr(self, key: Any, delta: int = 1, *, expected_version: int | None = None) -> Any:
        """Add `delta` to the decimal integer value (absent = 0); returns the new value."""
        return self._run(calls.incr(key, delta, expected_version, self._op_id()))

    # Key-Table
    def row_get(self, key: Any, row: Any, *, consistency: str = LINEARIZABLE) -> Any:
        return self._run(calls.row_get(key, row, consistency))

    def row_put(self, key: Any, row: Any, value: Any, *,
                expected_version: int | None = None, ttl: float | None = None) -> Any:
        return self._run(calls.row_put(key, row, value, expected_version, self._op_id(), ttl))

    def row_delete(self, key: Any, row: Any, *, expected_version: int | None = None) -> Any:
        return self._run(calls.row_delete(key, row, expected_version, self._op_id()))

    def scan(self, key: Any, start: Any = b"", end: Any = None,
             limit: int = SCAN_ROWS_DEFAULT, *, consistency: str = LINEARIZABLE) -> Any:
        """Rows with start <= row < end (end None: to the last row), at most `limit`."""
        return self._run(calls.scan(key, start, end, limit, consistency))

    def append(self, key: Any, value: Any) -> Any:
        """Add a row under the next sequence number of `key` (an inbox); returns the seq."""
        return self._run(calls.append(key, value, self._op_id()))

    def compact(self, key: Any, through_version: int) -> Any:
        """Drop the key's tombstones of versions up to `through_version` (a mutation: returns
        the new version). changes() from before it then raises Compacted: resync from 0."""
        return self._run(calls.compact(key, through_version, self._op_id()))

    def changes(self, key: Any, since_version: int, *, after_row: Any = b"",
                limit: int = SCAN_ROWS_DEFAULT, consistency: str = LINEARIZABLE) -> Any:
        """Rows changed or deleted after `since_version` (tombstones included)."""
        return self._run(calls.changes(key, since_version, after_row, limit, consistency))

    def batch(self, key: Any, *, expected_version: int | None = None) -> MutationBatch:
        """Collect mutations of one key; `commit()` applies them atomically as one version."""
        return Batch(self, key, expected_version)

    def ping(self, *, address: str | None = None) -> Any:
        """Any node that answers (or the node at `address`): {"node": name}."""
        return self._run(calls.ping(address))

    def status(self, *, address: str | None = None) -> Any:
        """A node's status dict: any node that answers, or the node at `address`."""
        return self._run(calls.status(address))

    def faults(self, address: str, *, peer: str = "", drop: float = 0.0,
               delay_ms: int = 0, commit_delay_ms: int = 0) -> Any:
        """Inject faults on the links from the replica at `address` to its peers (every peer,
        or the one named `peer`): drop messages with probability `drop`, delay the rest by up
        to `delay_ms` (reordering them). drop=0, delay_ms=0 heals the links.
        `commit_delay_ms`: the replica's disk turns slow, each checkpoint commit waiting that
        long first (0 heals)."""
        return self._run(calls.faults(address, peer, drop, delay_ms, commit_delay_ms))


class MutationBatch:
    """Mutations of one key, committed atomically as one version by `commit()`."""

    def __init__(self, client: ClientCalls, key: Any, expected_version: int | None):
        self._client = client
        self._key = key
        self._expected_version = expected_version
        self.ops: list[p.Op] = []

    def put(self, value: Any, *, ttl: float | None = None) -> Self:
        self.ops.append(p.put_op(value))
        if ttl is not None:
            self.ops.append(p.expire_op(ttl))
        return self

    def delete(self) -> Self:
        self.ops.append(p.delete_op())
        return self

    def incr(self, delta: int = 1) -> Self:
        self.ops.append(p.incr_op(delta))
        return self

    def row_put(self, row: Any, value: Any, *, ttl: float | None = None) -> Self:
        self.ops.append(p.row_put_op(row, value))
        if ttl is not None:
            self.ops.append(p.expire_op(ttl, self.ops[-1].row))
        return self

    def row_delete(self, row: Any) -> Self:
        self.ops.append(p.row_delete_op(row))
        return self

    def append(self, value: Any) -> Self:
        self.ops.append(p.append_op(value))
        return self

    def compact(self, through_version: int) -> Self:
        self.ops.append(p.compact_op(through_version))
        return self

    def commit(self) -> Any:
        """MutateReply: the new version and per-op results (blocking client: the reply;
        asyncio client: an awaitable of it)."""
        spec = calls.mutate(self._key, list(self.ops), self._expected_version,
                            self._client._op_id())
        return self._client._run(spec)


class Batch(MutationBatch):
    """A batch of the blocking client: `commit()` returns the MutateReply."""

    if TYPE_CHECKING:   # (see kvsvr.typed)
        commit = returning(MutateReply)(MutationBatch.commit)


class Client(ClientCalls):
    if TYPE_CHECKING:   # what each call gives (see kvsvr.typed)
        get = returning(p.Versioned)(ClientCalls.get)
        put = returning(int)(ClientCalls.put)
        delete = returning(int)(ClientCalls.delete)
        incr = returning(int)(ClientCalls.incr)
        row_get = returning(p.RowValue)(ClientCalls.row_get)
        row_put = returning(int)(ClientCalls.row_put)
        row_delete = returning(int)(ClientCalls.row_delete)
        scan = returning(p.ScanPage)(ClientCalls.scan)
        append = returning(int)(ClientCalls.append)
        compact = returning(int)(ClientCalls.compact)
        changes = returning(p.ChangesPage)(ClientCalls.changes)
        ping = returning(dict)(ClientCalls.ping)
        status = returning(dict)(ClientCalls.status)
        faults = returning(dict)(ClientCalls.faults)
        batch = returning(Batch)(ClientCalls.batch)
        list_keys = returning(p.KeysPage)(KeyListing.list_keys)
    def __init__(self, config: ClusterConfig | str | Path | None = None, *,
                 address: str | None = None, timeout: float = TIMEOUT_S_DEFAULT,
                 attempt_timeout: float = CLIENT_ATTEMPT_TIMEOUT_S,
                 client_id: int | None = None):
        """Connect to the cluster of `config` (a path, a ClusterConfig, or None for the
        embedded default), or to the single node at `address`."""
        self._router = make_router(config, address)
        self.timeout = check_timeout("timeout", timeout)
        self.attempt_timeout = check_timeout("attempt_timeout", attempt_timeout)
        # Random per client instance: op ids (client_id, seq) must never repeat. Pass one only
        # to resume a client (its sequence goes on past the earlier one's: first_client_seq),
        # never to share it between live clients.
        self.client_id = client_id_or_new(client_id)
        self.health = Health()  # which replicas this client saw failing, shared by its threads
        self._seq = itertools.count(first_client_seq())
        self._context = zmq.Context()
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._finalizer = weakref.finalize(self, close_sockets, self._context, self._sockets,
                                           self._pid)

    def _op_id(self) -> tuple[int, int]:
        return self.client_id, next(self._seq)

    def _run(self, spec: CallSpec, timeout: float | None = None) -> Any:
        result = _Exchange(self, [spec], timeout).run()[0]
        if isinstance(result, KvError):
            try:
                raise result
            finally:
                del result   # no cycle error -> traceback -> this frame -> error (see close)
        return result

    def replicas_for(self, spec: CallSpec) -> tuple[str, ...]:
        """Where `spec` may go, in order of preference (the health decides among them)."""
        if spec.address is not None:
            return (spec.address,)
        return self._router.replicas_for(spec.key)

    def watch(self, key: Any, since_version: int = 0, *, timeout: float | None = None,
              wait: float = WATCH_WAIT_S_DEFAULT) -> Iterator[WatchEvent]:
        """Changes of `key` after `since_version` as they are applied, one WatchEvent per
        poll (version, value, changed rows; see kvsvr.watching), failing over between the
        key's replicas without losing or repeating one. Each poll waits up to `wait` seconds
        on a replica; the iteration ends after `timeout` seconds (None: never). Raises
        Compacted if `since_version` is before the key's compaction horizon (start again
        from 0), and Timeout or Unavailable if no replica answers a poll in time."""
        return watch_events(self._run, key, since_version, timeout=timeout, wait=wait,
                            call_timeout=self.timeout)

    def pipeline(self) -> Pipeline:
        """Queue calls and send them together: `p = c.pipeline(); p.get(k); p.execute()`."""
        return Pipeline(self)

    def close(self) -> None:
        """Close every socket, then the ZeroMQ context (also done when a client is dropped
        without close(): see close_sockets)."""
        with self._lock:
            self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport -------------------------------------------------------------------------
    def _drop_socket(self, address: str) -> None:
        """Close this thread's socket to `address` with whatever it still queues (the next
        call opens a new one)."""
        sockets = getattr(self._local, "sockets", None)
        entry = sockets.pop(address, None) if sockets else None
        if entry is not None:
            with self._lock:
                self._sockets.remove(entry[0])
            entry[0].close(linger=0)

    def _socket(self, address: str) -> tuple[zmq.Socket, list[int]]:
        """This thread's socket to `address` and its next request id (ids are per socket)."""
        if os.getpid() != self._pid:
            raise RuntimeError("a kvsvr.Client cannot be used across fork: create one per process")
        sockets = getattr(self._local, "sockets", None)
        if sockets is None:
            sockets = self._local.sockets = {}
        entry = sockets.get(address)
        if entry is None:
            with self._lock:
                socket = connect(self._context, address, self._sockets)
            entry = sockets[address] = (socket, [1])
        return entry


class _Attempt:
    """Requests sent to one replica in one message, and when they count as unanswered."""

    __slots__ = ("address", "end", "first_id", "indexes")

    def __init__(self, address: str, end: float, indexes: list[int], first_id: int):
        self.address = address
        self.end = end
        self.indexes = indexes      # indexes[k] went with request id first_id + k
        self.first_id = first_id


class _Exchange:
    """One call or pipeline in flight on the calling thread: send each request to the first
    usable replica of its key, then resend what a replica leaves unanswered for
    `attempt_timeout` (or answers Unavailable or Timeout) to the next one, until every request
    has its answer or the deadline passes. A request keeps its op id on every replica; its
    request id is new on each socket, and the answer of any of its attempts that comes first
    is the one (a late one from an earlier attempt is as good as the latest: same operation).

    How a request ends without an answer: if every attempt was answered Unavailable, with the
    last Unavailable, as soon as no replica can be asked again before the deadline (the
    replicas said no; nothing is left in flight); if any attempt went unanswered or was
    answered Timeout, with Timeout at the deadline (that replica may have applied a write).
    If no attempt could be sent at all (no replica of the key had a connection within
    CONNECT_WAIT_S: see Parked), with Unavailable naming the replicas tried, as soon as that
    wait ends. A refusal that holds only at the key's present version is raised as Timeout
    if an attempt at another replica that went unanswered, or was answered Timeout, may
    still apply the write once the key moves on (kvsvr.calls.refusal_outcome)."""

    def __init__(self, client: Client, specs: list[CallSpec], timeout: float | None):
        self.client = client
        self.health = client.health
        self.specs = specs
        self.timeout = client.timeout if timeout is None else timeout
        self.deadline = time.monotonic() + self.timeout
        count = len(specs)
        self.results: list[Any] = [None] * count
        self.done = [False] * count
        self.remaining = count
        self.bodies = [_encode(spec.request) for spec in specs]
        self.routes = [client.replicas_for(spec) for spec in specs]
        # The attempt now responsible for each request: (address, request id), or None while
        # the request waits for a replica's back-off to end (it answered Unavailable/Timeout).
        self.current: list[tuple[str, int] | None] = [None] * count
        self.attempts: list[_Attempt] = []          # in flight, timer running
        self.tried: list[_Attempt] = []             # every attempt, for the Timeout message
        self.waiting: dict[int, tuple[float, str]] = {}   # index -> (resend at, excluded)
        self.refusals: dict[int, KvError] = {}      # index -> its last Unavailable/Timeout
        self.unanswered: set[int] = set()           # indexes that met silence or a Timeout
        # index -> its attempts no longer responsible for it that may still apply it: silent
        # past their timer, or answered Timeout (address, request id)
        self.loose: dict[int, list[tuple[str, int]]] = {}
        # address -> (socket, request id -> index): ids of every attempt of this exchange
        self.sockets: dict[str, tuple[zmq.Socket, dict[int, int]]] = {}
        self.poller: zmq.Poller | None = None
        self.silent: set[str] = set()   # addresses that left an attempt unanswered
        self.parked: dict[int, Parked] = {}   # index -> its wait for a connection

    def run(self) -> list[Any]:
        now = time.monotonic()
        self._route(range(len(self.specs)), now, None, paced=False)
        while self.remaining:
            now = time.monotonic()
            if now >= self.deadline:
                self._expire()
                break
            self._check_timers(now)
            wake = self.deadline
            for attempt in self.attempts:
                wake = min(wake, attempt.end)
            for at, _ in self.waiting.values():
                wake = min(wake, at)
            for park in self.parked.values():
                wake = min(wake, park.wake(now))
            self._wait(wake - now)
            self._receive()
            if self.parked:
                self._unpark(time.monotonic())
        for address in self.silent:
            # What this exchange sent there may still sit in the socket's queue (a replica
            # that is down: ZeroMQ holds it for the reconnect). It was answered elsewhere or
            # reported a Timeout; delivered when the replica comes back, seconds or minutes
            # later, a write would be applied long after its caller gave up on it.
            self.client._drop_socket(address)
        return self.results

    # --- sending ---------------------------------------------------------------------------
    def _route(self, indexes: Any, now: float, exclude: str | None, *, paced: bool) -> None:
        """Send `indexes` to their best replica now, grouped per replica (one message each).
        paced: after an Unavailable/Timeout answer, a failing replica is not asked before its
        back-off ends (a silent replica already cost a whole attempt; this one answered at
        once, and asking again at once would spin)."""
        by_address: dict[str, list[int]] = {}
        choose = self.health.choose
        for index in indexes:
            address, ready_at = choose(self.routes[index], now, exclude)
            if paced and ready_at > now:
                if ready_at >= self.deadline and index not in self.unanswered:
                    self._finish(index, self.refusals[index])
                else:
                    self.waiting[index] = (ready_at, exclude or "")
                continue
            by_address.setdefault(address, []).append(index)
        for address, group in by_address.items():
            self._send(address, group, now)

    def _send(self, address: str, indexes: list[int], now: float) -> None:
        client = self.client
        entry = self.sockets.get(address)
        socket, next_id = client._socket(address)
        if entry is None:
            entry = self.sockets[address] = (socket, {})
            if len(self.sockets) == 2:  # more than one replica: poll them together
                self.poller = zmq.Poller()
                for registered, _ in self.sockets.values():
                    self.poller.register(registered, zmq.POLLIN)
            elif self.poller is not None:
                self.poller.register(socket, zmq.POLLIN)
        ids = entry[1]
        budget_ms = max(1, min(int((self.deadline - now) * 1000), 0xFFFFFFFF))
        frames = []
        first_id = request_id = next_id[0]
        specs, bodies = self.specs, self.bodies
        for index in indexes:
            frames.append(_encode_frame(_REQUEST, specs[index].method, request_id, budget_ms,
                                        bodies[index]))
            request_id += 1
        next_id[0] = request_id
        sent = send_frames(socket, frames)
        if sent < len(frames):   # provably not sent (see send_frames): wait for a connection
            self._park(indexes[sent:], address, now)
            if not sent:
                return
            indexes = indexes[:sent]
        current = self.current
        for k, index in enumerate(indexes):
            ids[first_id + k] = index
            current[index] = (address, first_id + k)
        attempt_s = client.attempt_timeout
        for index in indexes:   # a long poll waits longer than the client's usual attempt
            own = specs[index].attempt_timeout
            if own is not None and own > attempt_s:
                attempt_s = own
        attempt = _Attempt(address, min(self.deadline, now + attempt_s), indexes, first_id)
        self.attempts.append(attempt)
        self.tried.append(attempt)
        self.health.sending(address, now, attempt_s)

    # --- connecting ------------------------------------------------------------------------
    def _park(self, indexes: list[int], address: str, now: float) -> None:
        """`indexes` could not be sent to `address` (no connection there yet, or it broke):
        they wait for one, and after CONNECT_FAILOVER_S for any replica of their key."""
        for index in indexes:
            park = self.parked.get(index)
            if park is None:
                park = self.parked[index] = Parked(address, now,
                                                    min(self.deadline, now + CONNECT_WAIT_S))
            park.candidates[address] = None

    def _writable(self, address: str) -> bool:
        events = int(self.client._socket(address)[0].get(zmq.EVENTS))
        return bool(events & zmq.POLLOUT)

    def _unpark(self, now: float) -> None:
        """Send each parked request to a replica of its key that has a connection now: its
        first choice, or after CONNECT_FAILOVER_S any (healthy ones first); a request none
        connected to within CONNECT_WAIT_S fails Unavailable (see _unreachable)."""
        by_address: dict[str, list[int]] = {}
        for index, park in list(self.parked.items()):
            if self.done[index]:
                del self.parked[index]
                continue
            choice = park.first if self._writable(park.first) else None
            if choice is None and now >= park.spread_at:
                route = self.routes[index]
                park.candidates.update(dict.fromkeys(route))
                ready = [a for a in route if self._writable(a)]
                healthy = [a for a in ready if self.health.state(a, now) == HEALTHY]
                choice = (healthy or ready)[0] if ready else None
                if choice is not None:
                    self.health.failed(park.first, now)
            if choice is not None:
                del self.parked[index]
                by_address.setdefault(choice, []).append(index)
            elif now >= park.until:
                del self.parked[index]
                self._unreachable(index, park, now)
        for address, group in by_address.items():
            self._send(address, group, now)

    def _unreachable(self, index: int, park: Parked, now: float) -> None:
        """No replica of the request's key took a connection in time. Unless an earlier
        attempt of it may still be applied somewhere (then it ends as Timeout at the
        deadline), it fails now as Unavailable: nothing of it was sent."""
        for address in park.candidates:
            self.health.failed(address, now)
        if index not in self.unanswered:
            self._finish(index, unreachable(
                list(park.candidates), calls.call_name(self.specs[index]),
                now - park.since))

    def _wait_connecting(self, timeout_ms: int) -> None:
        """Poll for answers and for the connections parked requests wait for."""
        poller = zmq.Poller()
        flags: dict[zmq.Socket, int] = {socket: zmq.POLLIN
                                        for socket, _ in self.sockets.values()}
        for park in self.parked.values():
            for address in park.candidates:
                socket = self.client._socket(address)[0]
                flags[socket] = flags.get(socket, 0) | zmq.POLLOUT
        for socket, flag in flags.items():
            poller.register(socket, flag)
        poller.poll(timeout_ms)

    def _check_timers(self, now: float) -> None:
        if self.waiting:
            due = [index for index, (at, _) in self.waiting.items() if now >= at]
            for index in due:
                _, exclude = self.waiting.pop(index)
                if not self.done[index]:
                    self._route([index], now, exclude or None, paced=True)
        expired = [a for a in self.attempts if now >= a.end]
        for attempt in expired:
            self.attempts.remove(attempt)
            address = attempt.address
            current = self.current
            # Only requests this attempt is still responsible for: not those answered, nor
            # those already sent elsewhere (or again) after an Unavailable/Timeout answer.
            unanswered = [i for k, i in enumerate(attempt.indexes)
                          if current[i] == (address, attempt.first_id + k)]
            if unanswered:
                self.unanswered.update(unanswered)
                loose = self.loose
                for index in unanswered:
                    timed_out = current[index]
                    assert timed_out is not None   # (address, its request id): see above
                    loose.setdefault(index, []).append(timed_out)
                self.silent.add(address)
                self.health.failed(address, now)
                self._route(unanswered, now, address, paced=False)

    # --- receiving -------------------------------------------------------------------------
    def _wait(self, seconds: float) -> None:
        timeout_ms = max(0, int(seconds * 1000)) + 1
        if self.parked:
            self._wait_connecting(timeout_ms)
        elif self.poller is not None:
            self.poller.poll(timeout_ms)
        else:
            next(iter(self.sockets.values()))[0].poll(timeout_ms)

    def _receive(self) -> None:
        # A list: answering may open a socket to another replica (an Unavailable answer).
        for address, (socket, ids) in list(self.sockets.items()):
            while self.remaining:
                try:
                    payload = socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                # A damaged answer is dropped: its request is resent or times out.
                for _kind, status, request_id, _budget, body in _decode_frames(payload)[0]:
                    index = ids.pop(request_id, -1)
                    if index >= 0 and not self.done[index]:
                        self._answer(index, address, request_id, status, body)

    def _answer(self, index: int, address: str, request_id: int, status: int,
                body: Any) -> None:
        spec = self.specs[index]
        try:
            result = spec.finish(p.parse_reply(spec.method, status, body))
        except (Unavailable, Timeout) as e:
            # The replica could not serve it (now, or in time): another one may. A Timeout
            # answer means the write may be under way there, so the request is ambiguous.
            now = time.monotonic()
            self.health.failed(address, now)
            if isinstance(e, Timeout):
                self.unanswered.add(index)
            if self.current[index] == (address, request_id):  # else: a later attempt is out
                self.current[index] = None
                self.refusals[index] = e
                if isinstance(e, Timeout):
                    self.loose.setdefault(index, []).append((address, request_id))
                self._route([index], now, address, paced=True)
            elif isinstance(e, Unavailable):   # a loose attempt that holds nothing after all
                loose = self.loose.get(index)
                if loose and (address, request_id) in loose:
                    loose.remove((address, request_id))
            return
        except KvError as e:
            result = e
            if index in self.loose or self.current[index] != (address, request_id):
                result = self._refusal(index, address, e)
        except Exception as e:  # an answer that does not fit its call
            result = Internal(f"unreadable answer: {e!r}")
        self.health.succeeded(address)
        self._finish(index, result)

    def _refusal(self, index: int, address: str, error: KvError) -> KvError:
        """What a call raises for `error` from `address` while other attempts of it are out
        or loose: Timeout if one of those, at another replica, may still apply the write and
        the refusal may not be final (kvsvr.calls.refusal_outcome), else `error`."""
        elsewhere = {other: None for other, _ in self.loose.get(index, ()) if other != address}
        current = self.current[index]
        if current is not None and current[0] != address:   # a later attempt is out there
            elsewhere[current[0]] = None
        return calls.refusal_outcome(self.specs[index], error, address, list(elsewhere))

    def _finish(self, index: int, result: Any) -> None:
        self.results[index] = result
        self.done[index] = True
        self.remaining -= 1

    def _expire(self) -> None:
        # An attempt still unanswered at the deadline counts against its replica too, or a
        # call whose deadline equals its attempt timeout would never steer the next one away.
        now = time.monotonic()
        for attempt in self.attempts:
            if any(not self.done[i] and self.current[i] == (attempt.address, attempt.first_id + k)
                   for k, i in enumerate(attempt.indexes)):
                self.silent.add(attempt.address)
                self.health.failed(attempt.address, now)
        tried: dict[int, dict[str, None]] = {}
        for attempt in self.tried:
            for index in attempt.indexes:
                tried.setdefault(index, {})[attempt.address] = None
        for index, done in enumerate(self.done):
            if done:
                continue
            reason = self.refusals.get(index)
            park = self.parked.get(index)
            if park is not None and index not in self.unanswered:   # never sent anywhere
                self.results[index] = unreachable(list(park.candidates),
                                                  calls.call_name(self.specs[index]),
                                                  now - park.since)
                continue
            if (reason is not None and index not in self.unanswered
                    and self.current[index] is None):
                self.results[index] = reason   # every attempt answered: Unavailable
                continue
            self.results[index] = Timeout(
                f"no answer within {self.timeout:.3g} s "
                f"({p.Method(self.specs[index].method).name.lower()}; tried "
                f"{', '.join(tried.get(index, ())) or 'no replica'}"
                + (f"; last answer: {reason}" if reason else "") + ")")


class Pipeline(ClientCalls):
    """Calls queued and sent together per replica; `execute()` returns results in call order,
    each a result or the KvError it raised (or raises the first with raise_errors=True)."""

    def __init__(self, client: Client):
        self._client = client
        self._specs: list[CallSpec] = []

    def _run(self, spec: CallSpec) -> None:
        self._specs.append(spec)

    if TYPE_CHECKING:   # each call is queued: its result comes from execute() (kvsvr.typed)
        get = queued(ClientCalls.get)
        put = queued(ClientCalls.put)
        delete = queued(ClientCalls.delete)
        incr = queued(ClientCalls.incr)
        row_get = queued(ClientCalls.row_get)
        row_put = queued(ClientCalls.row_put)
        row_delete = queued(ClientCalls.row_delete)
        scan = queued(ClientCalls.scan)
        append = queued(ClientCalls.append)
        compact = queued(ClientCalls.compact)
        changes = queued(ClientCalls.changes)
        ping = queued(ClientCalls.ping)
        status = queued(ClientCalls.status)
        faults = queued(ClientCalls.faults)

    def _op_id(self) -> tuple[int, int]:
        return self._client._op_id()

    def list_keys(self, prefix: Any = b"", *, after: Any = None,
                  limit: int = LIST_KEYS_DEFAULT) -> NoReturn:
        """Not in a pipeline: a listing asks every group and merges their pages, which is
        not one queued call."""
        raise InvalidArgument("list_keys: not available in a pipeline (it asks every group "
                              "and merges the pages); call it on the client", field="list_keys")

    def __len__(self) -> int:
        return len(self._specs)

    def execute(self, *, raise_errors: bool = False, timeout: float | None = None) -> list[Any]:
        """Send every queued call (one message per replica, all replicas at once) and wait
        for all the answers, failing over per call as a single call does."""
        if timeout is not None:
            timeout = check_timeout("timeout", timeout)
        specs, self._specs = self._specs, []
        results = _Exchange(self._client, specs, timeout).run() if specs else []
        if raise_errors:
            error = next((r for r in results if isinstance(r, KvError)), None)
            if error is not None:
                del results
                try:
                    raise error
                finally:
                    del error   # (as in Client._run)
        return results


__all__ = ["Batch", "Client", "ClientCalls", "MutateReply", "MutationBatch", "Pipeline"]
