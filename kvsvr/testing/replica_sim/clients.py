"""The simulation's clients: the ones whose calls make the history (one call at a time,
resent with the same op id as kvsvr.client does, and a refusal that may not be final taken
as kvsvr.calls.refusal_outcome says) and the checker that reads each replica's status and
own copy; and how an answer reads in a script."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kvsvr import _core, calls, protocol
from kvsvr.errors import KvError, NotFound, Timeout, Unavailable, VersionConflict
from kvsvr.testing.linearizability import UNKNOWN
from kvsvr.testing.replica_sim.settings import (
    ATTEMPT_TIMEOUT_US,
    CALL_TIMEOUT_US,
    RETRY_BACKOFF_US,
)

if TYPE_CHECKING:
    from kvsvr.testing.replica_sim.simulation import Simulation


class Host(Protocol):
    """Whatever a replica answers through its router: a client of some kind."""

    host: str

    def receive(self, payload: bytes) -> None: ...


@dataclass
class Call:
    """A client call in flight: its spec and its attempts so far."""

    spec: calls.CallSpec
    started_us: int
    done: Callable[[Any], None]
    request_ids: dict[int, int] = field(default_factory=dict)   # request id -> replica asked
    declined: set[int] = field(default_factory=set)   # request ids answered Unavailable
    attempt: int = 0
    target: int = 0            # the replica asked last


class SimClient:
    """One simulated client: one call at a time, resent to the next replica (same op id) when
    an attempt goes unanswered or is answered Unavailable or Timeout, as kvsvr.client does;
    after CALL_TIMEOUT_US its outcome is unknown. So is the outcome of a refusal that may not
    be final while an attempt at another replica, not answered Unavailable, may still apply
    the write: kvsvr.client raises Timeout for it."""

    def __init__(self, sim: Simulation, index: int, client_id: int):
        self.sim = sim
        self.index = index
        self.host = f"c{index}"
        self.identity = self.host.encode()
        self.client_id = client_id
        self.seq = 0
        self.request_id = 0
        self.call: Call | None = None
        self.versions: dict[bytes, int] = {}   # the last version seen per key (for CAS)

    def op_id(self) -> tuple[int, int]:
        self.seq += 1
        return self.client_id, self.seq

    def start(self, call: Call, target: int) -> None:
        self.call = call
        self._send(call, target)

    def _send(self, call: Call, target: int) -> None:
        sim = self.sim
        remaining_us = call.started_us + CALL_TIMEOUT_US - sim.scheduler.now_us
        if remaining_us <= 0:
            self.call = None
            call.done(UNKNOWN)
            return
        call.attempt += 1
        call.target = target
        self.request_id += 1
        call.request_ids[self.request_id] = target
        sim.send_request(self, target, call.spec, self.request_id, remaining_us)
        attempt = call.attempt
        sim.scheduler.after(min(ATTEMPT_TIMEOUT_US, remaining_us),
                            lambda: self._attempt_timed_out(call, attempt))

    def _attempt_timed_out(self, call: Call, attempt: int) -> None:
        if self.call is call and call.attempt == attempt:
            self._send(call, (call.target + 1) % self.sim.replica_count)

    def _retry_later(self, call: Call) -> None:
        call.attempt += 1   # (the timer of the attempt answered is void)
        attempt = call.attempt

        def retry() -> None:
            if self.call is call and call.attempt == attempt:
                self._send(call, (call.target + 1) % self.sim.replica_count)

        self.sim.scheduler.after(self.sim.random_client.randint(*RETRY_BACKOFF_US), retry)

    def receive(self, payload: bytes) -> None:
        call = self.call
        if call is None:
            return
        for _kind, status, request_id, _budget, body in _core.decode_frames(payload)[0]:
            if request_id not in call.request_ids or self.call is not call:
                continue   # an answer to an earlier call, or a copy of one already taken
            try:
                result = protocol.parse_reply(call.spec.method, status, body)
            except (Unavailable, Timeout) as e:
                if isinstance(e, Unavailable):
                    call.declined.add(request_id)   # that attempt holds nothing
                self._retry_later(call)   # that replica cannot (or could not in time)
                continue
            except KvError as e:
                result = self._refusal(call, request_id, e)
            self.call = None
            call.done(result)

    def _refusal(self, call: Call, request_id: int, error: KvError) -> Any:
        """`error` as the call's outcome, or UNKNOWN where kvsvr.client raises Timeout."""
        target = call.request_ids[request_id]
        elsewhere = {self.sim.replicas[other].host: None
                     for rid, other in call.request_ids.items()
                     if other != target and rid not in call.declined}
        outcome = calls.refusal_outcome(call.spec, error, self.sim.replicas[target].host,
                                        list(elsewhere))
        return UNKNOWN if outcome is not error else error


class Checker:
    """The simulation's own client for status and local reads: one replica per call, no
    resend, nothing recorded in the history."""

    host = "checker"
    identity = b"checker"

    def __init__(self, sim: Simulation):
        self.sim = sim
        self.request_id = 0
        self.waiting: dict[int, tuple[int, Callable[[Any], None]]] = {}

    def call(self, target: int, spec: calls.CallSpec, done: Callable[[Any], None]) -> None:
        self.request_id += 1
        request_id = self.request_id
        self.waiting[request_id] = (spec.method, done)
        self.sim.send_request(self, target, spec, request_id, CALL_TIMEOUT_US)

        def expire() -> None:
            entry = self.waiting.pop(request_id, None)
            if entry is not None:
                entry[1](Timeout("no answer"))

        self.sim.scheduler.after(ATTEMPT_TIMEOUT_US, expire)

    def receive(self, payload: bytes) -> None:
        for _kind, status, request_id, _budget, body in _core.decode_frames(payload)[0]:
            entry = self.waiting.pop(request_id, None)
            if entry is None:
                continue
            method, done = entry
            try:
                result = protocol.parse_reply(method, status, body)
            except KvError as e:
                result = e
            done(result)


def describe_answer(answer: Any) -> str:
    """An answer (or a replica's own copy) as a script prints it."""
    if isinstance(answer, NotFound):
        return f"absent v{answer.version}"
    if isinstance(answer, VersionConflict):
        return f"conflict v{answer.version}"
    if isinstance(answer, KvError):
        return type(answer).__name__
    if isinstance(answer, protocol.MutateReply):
        result = answer.results[0] if answer.results else None
        return f"ok v{answer.version}" + (f" {result}" if result is not None else "")
    if isinstance(answer, protocol.Versioned):
        return f"v{answer.version} {answer.value.decode()}"
    if isinstance(answer, protocol.ScanPage):
        return f"v{answer.version} [{' '.join(r.value.decode() for r in answer.rows)}]"
    return repr(answer)

