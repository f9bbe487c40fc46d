"""The blocking client: `kvsvr.Client`.

Each call routes its key (xxh64 -> virtual shard -> group), sends one request and waits for
the answer within a deadline. A request unanswered after `attempt_timeout` is sent again
with the same request id and operation id, so a node restart or a lost message costs a retry,
and a write that was already applied is answered from the node's op-id table instead of being
applied twice. `pipeline()` sends many calls in one message; `batch(key)` commits several
mutations of one key atomically as one version.

A Client may be shared by threads (each thread gets its own socket); create one per process
after fork.
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from kvsvr import _core, calls
from kvsvr import protocol as p
from kvsvr.calls import CallSpec
from kvsvr.config import ClusterConfig, check_client_address, load
from kvsvr.errors import Internal, InvalidArgument, KvError, Timeout
from kvsvr.limits import (
    CLIENT_ATTEMPT_TIMEOUT_S,
    CLIENT_QUEUE_MESSAGES,
    DEFAULT_SCAN_ROWS,
    DEFAULT_TIMEOUT_S,
)
from kvsvr.protocol import MutateReply
from kvsvr.sharding import Router

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
        check_client_address(address)
        return Router(address=address)
    if not isinstance(config, ClusterConfig):
        config = load(config)
    return Router(config)


class _Api:
    """The calls every client offers; subclasses say how a CallSpec is run."""

    def _run(self, spec: CallSpec) -> Any:
        raise NotImplementedError

    def _op_id(self) -> tuple[int, int]:
        raise NotImplementedError

    # Key-Value
    def get(self, key: Any) -> Any:
        """(version, value) of `key`; raises NotFound (with the key's version) if it has none."""
        return self._run(calls.get(key))

    def put(self, key: Any, value: Any, *, expected_version: int | None = None) -> Any:
        """Store `value`; returns the key's new version. CAS if `expected_version` is given."""
        return self._run(calls.put(key, value, expected_version, self._op_id()))

    def delete(self, key: Any, *, expected_version: int | None = None) -> Any:
        """Remove the value (the key keeps its version); returns the new version."""
        return self._run(calls.delete(key, expected_version, self._op_id()))

    def incr(self, key: Any, delta: int = 1, *, expected_version: int | None = None) -> Any:
        """Add `delta` to the decimal integer value (absent = 0); returns the new value."""
        return self._run(calls.incr(key, delta, expected_version, self._op_id()))

    # Key-Table
    def row_get(self, key: Any, row: Any) -> Any:
        return self._run(calls.row_get(key, row))

    def row_put(self, key: Any, row: Any, value: Any, *,
                expected_version: int | None = None) -> Any:
        return self._run(calls.row_put(key, row, value, expected_version, self._op_id()))

    def row_delete(self, key: Any, row: Any, *, expected_version: int | None = None) -> Any:
        return self._run(calls.row_delete(key, row, expected_version, self._op_id()))

    def scan(self, key: Any, start: Any = b"", end: Any = None,
             limit: int = DEFAULT_SCAN_ROWS) -> Any:
        """Rows with start <= row < end (end None: to the last row), at most `limit`."""
        return self._run(calls.scan(key, start, end, limit))

    def append(self, key: Any, value: Any) -> Any:
        """Add a row under the next sequence number of `key` (an inbox); returns the seq."""
        return self._run(calls.append(key, value, self._op_id()))

    def changes(self, key: Any, since_version: int, *, after_row: Any = b"",
                limit: int = DEFAULT_SCAN_ROWS) -> Any:
        """Rows changed or deleted after `since_version` (tombstones included)."""
        return self._run(calls.changes(key, since_version, after_row, limit))

    def batch(self, key: Any, *, expected_version: int | None = None) -> Batch:
        """Collect mutations of one key; `commit()` applies them atomically as one version."""
        return Batch(self, key, expected_version)

    def ping(self) -> Any:
        return self._run(calls.ping())

    def status(self) -> Any:
        return self._run(calls.status())


class Batch:
    """Mutations of one key, committed atomically as one version by `commit()`."""

    def __init__(self, client: _Api, key: Any, expected_version: int | None):
        self._client = client
        self._key = key
        self._expected_version = expected_version
        self.ops: list[p.Op] = []

    def put(self, value: Any) -> Batch:
        self.ops.append(p.put_op(value))
        return self

    def delete(self) -> Batch:
        self.ops.append(p.delete_op())
        return self

    def incr(self, delta: int = 1) -> Batch:
        self.ops.append(p.incr_op(delta))
        return self

    def row_put(self, row: Any, value: Any) -> Batch:
        self.ops.append(p.row_put_op(row, value))
        return self

    def row_delete(self, row: Any) -> Batch:
        self.ops.append(p.row_delete_op(row))
        return self

    def append(self, value: Any) -> Batch:
        self.ops.append(p.append_op(value))
        return self

    def commit(self) -> Any:
        """MutateReply: the new version and per-op results (blocking client: the reply;
        asyncio client: an awaitable of it)."""
        spec = calls.mutate(self._key, list(self.ops), self._expected_version,
                            self._client._op_id())
        return self._client._run(spec)


class Client(_Api):
    def __init__(self, config: ClusterConfig | str | Path | None = None, *,
                 address: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 attempt_timeout: float = CLIENT_ATTEMPT_TIMEOUT_S,
                 client_id: int | None = None):
        """Connect to the cluster of `config` (a path, a ClusterConfig, or None for the
        embedded default), or to the single node at `address`."""
        self._router = make_router(config, address)
        self.timeout = check_timeout("timeout", timeout)
        self.attempt_timeout = check_timeout("attempt_timeout", attempt_timeout)
        # Random per client instance: op ids (client_id, seq) must never repeat. Pass one only
        # to resume a client's own sequence, never to share it between live clients.
        self.client_id = client_id or (secrets.randbits(62) | 1)
        self._seq = itertools.count(1)
        self._context = zmq.Context()
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _op_id(self) -> tuple[int, int]:
        return self.client_id, next(self._seq)

    def _run(self, spec: CallSpec, timeout: float | None = None) -> Any:
        result = self._exchange(self._router.address_for(spec.key), [spec], timeout)[0]
        if isinstance(result, KvError):
            raise result
        return result

    def pipeline(self) -> Pipeline:
        """Queue calls and send them together: `p = c.pipeline(); p.get(k); p.execute()`."""
        return Pipeline(self)

    def close(self) -> None:
        with self._lock:
            for socket in self._sockets:
                socket.close(linger=0)
            self._sockets.clear()
        self._context.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport -------------------------------------------------------------------------
    def _socket(self, address: str) -> tuple[zmq.Socket, list[int]]:
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

    def _exchange(self, address: str, specs: list[CallSpec],
                  timeout: float | None = None) -> list[Any]:
        """Send `specs` to one node in one message; results in order (errors as values)."""
        socket, next_id = self._socket(address)
        timeout = self.timeout if timeout is None else timeout
        now = time.monotonic()
        deadline = now + timeout
        budget_ms = min(int(timeout * 1000), 0xFFFFFFFF)
        frames: dict[int, bytes] = {}
        pending: dict[int, int] = {}
        request_id = next_id[0]
        for index, spec in enumerate(specs):
            frames[request_id] = _encode_frame(_REQUEST, spec.method, request_id, budget_ms,
                                               _encode(spec.request))
            pending[request_id] = index
            request_id += 1
        next_id[0] = request_id
        results: list[Any] = [None] * len(specs)
        send_frames(socket, list(frames.values()))
        attempt_deadline = min(deadline, now + self.attempt_timeout)
        while pending:
            now = time.monotonic()
            if now >= attempt_deadline:
                if now >= deadline:
                    for index in pending.values():
                        results[index] = Timeout(
                            f"no answer from {address} within {timeout:.3g} s "
                            f"({p.Method(specs[index].method).name.lower()})")
                    break
                send_frames(socket, [frames[rid] for rid in pending])  # same ids: retries dedupe
                attempt_deadline = min(deadline, now + self.attempt_timeout)
                continue
            if not socket.poll(int((attempt_deadline - now) * 1000) + 1):
                continue
            while pending:
                try:
                    payload = socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                # A damaged answer is dropped: its request is resent or times out.
                for _kind, status, rid, _budget, body in _decode_frames(payload)[0]:
                    index = pending.pop(rid, -1)
                    if index < 0:
                        continue  # answer to an earlier attempt or an abandoned call
                    spec = specs[index]
                    try:
                        results[index] = spec.finish(p.parse_reply(spec.method, status, body))
                    except KvError as e:
                        results[index] = e
                    except Exception as e:  # an answer that does not fit its call
                        results[index] = Internal(f"unreadable answer: {e!r}")
        return results


def send_frames(socket: zmq.Socket, frames: list[bytes]) -> None:
    """Send frames in as few messages as the limits allow; never block."""
    for message in p.pack(frames):
        try:
            socket.send(message, zmq.NOBLOCK)
        except zmq.Again:
            return  # queue full or no peer yet: the attempt timer resends


def connect(context: zmq.Context, address: str, register: list[zmq.Socket]) -> zmq.Socket:
    """A DEALER socket connected to `address`, registered before connecting so that close()
    always finds it; a bad address is an InvalidArgument, not a hang."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, CLIENT_QUEUE_MESSAGES)
    socket.setsockopt(zmq.RCVHWM, CLIENT_QUEUE_MESSAGES)
    register.append(socket)
    try:
        socket.connect(address)
    except zmq.ZMQError as e:
        register.remove(socket)
        socket.close(linger=0)
        raise InvalidArgument(f"address: cannot connect to {address!r} ({e})",
                              field="address") from None
    return socket


class Pipeline(_Api):
    """Calls queued and sent together per node; `execute()` returns results in call order,
    each a result or the KvError it raised (or raises the first with raise_errors=True)."""

    def __init__(self, client: Client):
        self._client = client
        self._specs: list[CallSpec] = []

    def _run(self, spec: CallSpec) -> None:
        self._specs.append(spec)

    def _op_id(self) -> tuple[int, int]:
        return self._client._op_id()

    def __len__(self) -> int:
        return len(self._specs)

    def execute(self, *, raise_errors: bool = False, timeout: float | None = None) -> list[Any]:
        specs, self._specs = self._specs, []
        by_address: dict[str, list[int]] = {}
        for index, spec in enumerate(specs):
            by_address.setdefault(self._client._router.address_for(spec.key), []).append(index)
        results: list[Any] = [None] * len(specs)
        for address, indexes in by_address.items():
            answers = self._client._exchange(address, [specs[i] for i in indexes], timeout)
            for index, answer in zip(indexes, answers, strict=True):
                results[index] = answer
        if raise_errors:
            for result in results:
                if isinstance(result, KvError):
                    raise result
        return results


__all__ = ["Batch", "Client", "MutateReply", "Pipeline"]
