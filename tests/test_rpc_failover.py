"""Caller-side failover with real processes: two instances of `burn` in campuses a and b,
a caller in campus a sending a steady stream of calls. SIGSTOP or SIGKILL the instance of
campus a: within 2 s the caller stops waiting on it and its calls are answered by b; every
call ends with an answer or a typed error; once the instance is back, probes find it and
the caller's own campus gets its traffic again."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvsvr.errors import KvError
from kvsvr.launcher import write_single_node_config
from kvsvr.rpc import AsyncStub
from kvsvr.rpc.examples import WorkReply, WorkRequest, burn
from kvsvr.rpc.launcher import ServiceInstances, add_services

RATE_PER_S = 200


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[ServiceInstances]:
    path = add_services(write_single_node_config(tmp_path), {"burn": ["a", "b"]})
    instances = ServiceInstances(path, log_dir=tmp_path / "logs")
    instances.add("kvsvr.rpc.examples:burn", "burn")
    instances.start()
    try:
        yield instances
    finally:
        instances.stop()


class Outcome:
    def __init__(self, sent: float, answered: float, result: WorkReply | KvError):
        self.sent = sent
        self.answered = answered
        self.result = result

    @property
    def pid(self) -> int | None:
        return self.result.pid if isinstance(self.result, WorkReply) else None


async def stream(stub: AsyncStub, seconds: float, events: dict[float, object]) -> list[Outcome]:
    """Calls at RATE_PER_S for `seconds`; `events` maps a time (s from the start) to a
    function run then (a signal, a restart). Returns every call's outcome."""
    outcomes: list[Outcome] = []
    start = time.monotonic()

    async def one(sent: float) -> None:
        try:
            result: WorkReply | KvError = await stub.work(WorkRequest(cpu_us=0))
        except KvError as e:
            result = e
        outcomes.append(Outcome(sent, time.monotonic() - start, result))

    tasks = []
    pending = sorted(events.items())
    for index in range(int(seconds * RATE_PER_S)):
        at = index / RATE_PER_S
        while pending and pending[0][0] <= at:
            action = pending.pop(0)[1]
            await asyncio.get_running_loop().run_in_executor(None, action)  # type: ignore[arg-type]
        delay = start + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.get_running_loop().create_task(one(at)))
    await asyncio.gather(*tasks)
    return outcomes


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_failing_instance_is_left_within_two_seconds_and_used_again(
        pair: ServiceInstances, fault: str) -> None:
    near, far = "burn-1", "burn-2"            # campus a (the caller's) and campus b
    near_pid, far_pid = pair.processes[near].pid, pair.processes[far].pid
    fault_at, recover_at = 1.0, 4.0

    def fail() -> None:
        if fault == "SIGSTOP":
            pair.signal(near, signal.SIGSTOP)
        else:
            pair.kill(near)

    def recover() -> None:
        if fault == "SIGSTOP":
            pair.signal(near, signal.SIGCONT)
        else:
            pair.start(near)

    async def run() -> list[Outcome]:
        async with AsyncStub(burn, pair.config_path, campus="a", timeout=3.0,
                             attempt_timeout=0.3, follow_shield=False) as stub:
            return await stream(stub, 14.0, {fault_at: fail, recover_at: recover})

    outcomes = asyncio.run(run())
    # nothing lost: every call ended, with an answer or a typed error
    assert len(outcomes) == int(14.0 * RATE_PER_S)
    errors = [o for o in outcomes if not isinstance(o.result, WorkReply)]
    assert len(errors) <= 0.02 * len(outcomes), [repr(o.result) for o in errors[:5]]
    new_near = pair.processes[near].pid
    before = [o for o in outcomes if o.sent < fault_at - 0.1]
    assert before and all(o.pid == near_pid for o in before)     # own campus first
    # from 2 s after the fault until the recovery, calls are answered by b without waiting
    # on a (only a probe now and then pays an attempt timeout)
    left = [o for o in outcomes if fault_at + 2.0 <= o.sent < recover_at]
    assert left and all(o.pid == far_pid for o in left if o.pid)
    slow = [o for o in left if o.answered - o.sent > 0.25]
    assert len(slow) <= 0.05 * len(left), len(slow)
    # after the recovery, probes bring a back: the last calls are answered by it
    last = [o for o in outcomes if o.sent >= 12.0]
    assert last and sum(o.pid == new_near for o in last) >= 0.9 * len(last)


def test_a_stopping_instance_finishes_its_work_and_loses_no_call(
        pair: ServiceInstances) -> None:
    """SIGTERM under load: running calls finish, queued ones are answered Unavailable and
    go to the other instance at once; no call fails and the instance exits 0."""
    burn_cpu_us = 3000      # enough that a queue forms behind the running call

    async def run() -> list[WorkReply | BaseException]:
        async with AsyncStub(burn, pair.config_path, campus="a", timeout=5.0,
                             attempt_timeout=3.0, follow_shield=False) as stub:
            calls = [asyncio.get_running_loop().create_task(
                stub.work(WorkRequest(cpu_us=burn_cpu_us))) for _ in range(200)]
            await asyncio.sleep(0.1)
            pair.signal("burn-1", signal.SIGTERM)
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(r, WorkReply) for r in results), [
        r for r in results if not isinstance(r, WorkReply)][:3]
    pids = {r.pid for r in results if isinstance(r, WorkReply)}
    assert len(pids) == 2          # both instances answered: the queue moved over
    assert pair.processes["burn-1"].wait(10) == 0


@pytest.mark.soak
def test_repeated_faults_on_both_instances_lose_no_call(pair: ServiceInstances) -> None:
    """A minute of SIGSTOP/SIGCONT and SIGKILL/restart cycles on either instance in turn:
    every call ends, almost all of them answered."""
    events: dict[float, object] = {}
    for cycle in range(6):
        node = ("burn-1", "burn-2")[cycle % 2]
        at = 2.0 + 10.0 * cycle
        if cycle % 4 < 2:
            events[at] = lambda node=node: pair.signal(node, signal.SIGSTOP)
            events[at + 3.0] = lambda node=node: pair.signal(node, signal.SIGCONT)
        else:
            events[at] = lambda node=node: pair.kill(node)
            events[at + 3.0] = lambda node=node: pair.start(node)

    async def run() -> list[Outcome]:
        async with AsyncStub(burn, pair.config_path, campus="a", timeout=3.0,
                             attempt_timeout=0.3, follow_shield=False) as stub:
            return await stream(stub, 64.0, events)

    outcomes = asyncio.run(run())
    assert len(outcomes) == int(64.0 * RATE_PER_S)
    errors = [o for o in outcomes if not isinstance(o.result, WorkReply)]
    assert len(errors) <= 0.02 * len(outcomes), [repr(o.result) for o in errors[:5]]
