"""Campus shielding with real processes: a KVSvr node keeps the switch, two `burn` instances
serve in campuses a and b, a caller in campus a sends a steady stream. `kvsvr-shield a on`
moves every call to b within 5 s, with no restart; `kvsvr-shield a off` brings them back
within 5 s; `status` says which campus is shielded."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvsvr.errors import KvError
from kvsvr.launcher import LocalCluster, write_single_node_config
from kvsvr.rpc import AsyncStub
from kvsvr.rpc.examples import WorkReply, WorkRequest, burn
from kvsvr.rpc.launcher import ServiceInstances, add_services

RATE_PER_S = 100


@pytest.fixture
def campus_pair(tmp_path: Path) -> Iterator[ServiceInstances]:
    path = add_services(write_single_node_config(tmp_path), {"burn": ["a", "b"]})
    cluster = LocalCluster(path, log_dir=tmp_path / "logs")
    cluster.start()
    instances = ServiceInstances(path, log_dir=tmp_path / "logs")
    instances.add("kvsvr.rpc.examples:burn", "burn")
    try:
        instances.start()
        yield instances
    finally:
        instances.stop()
        cluster.stop()


def shield(config: str, *args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "kvsvr.rpc.shield", "--config", config, *args],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_shielding_a_campus_moves_calls_away_and_back(campus_pair: ServiceInstances) -> None:
    config = campus_pair.config_path
    near_pid = campus_pair.processes["burn-1"].pid          # campus a
    answers: list[tuple[float, int | None]] = []           # (sent, pid or None: an error)
    switches: dict[str, float] = {}

    async def run() -> None:
        loop = asyncio.get_running_loop()
        async with AsyncStub(burn, config, campus="a", follow_shield=True) as stub:
            start = time.monotonic()

            async def one(sent: float) -> None:
                try:
                    reply: WorkReply = await stub.work(WorkRequest(cpu_us=0))
                    answers.append((sent, reply.pid))
                except KvError:
                    answers.append((sent, None))

            tasks = []
            plan = {1.0: ("a", "on"), 8.0: ("a", "off")}
            for index in range(int(14.0 * RATE_PER_S)):
                at = index / RATE_PER_S
                for when, (campus, action) in list(plan.items()):
                    if when <= at:
                        del plan[when]
                        await loop.run_in_executor(None, shield, config, campus, action)
                        switches[action] = time.monotonic() - start
                delay = start + at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(loop.create_task(one(time.monotonic() - start)))
            await asyncio.gather(*tasks)

    asyncio.run(run())
    assert all(pid is not None for _, pid in answers), "a call failed"
    on, off = switches["on"], switches["off"]
    assert all(pid == near_pid for sent, pid in answers if sent < on - 0.1)
    shielded = [pid for sent, pid in answers if on + 5.0 <= sent < off]
    assert shielded and near_pid not in shielded             # nothing reaches campus a
    released = [pid for sent, pid in answers if sent >= off + 5.0]
    assert released and all(pid == near_pid for pid in released)


def test_shield_status_and_bad_campus(campus_pair: ServiceInstances) -> None:
    config = campus_pair.config_path
    assert shield(config, "b", "on") == "b\tshielded\n"
    assert shield(config, "status") == "a\tserving\nb\tshielded\n"
    assert shield(config, "b", "off") == "b\tserving\n"
    run = subprocess.run([sys.executable, "-m", "kvsvr.rpc.shield", "--config", config, "z",
                          "on"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "campus: 'z' is not a campus of the config" in run.stderr
