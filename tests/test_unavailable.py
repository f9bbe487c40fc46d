"""Honest unavailability through real nodes and sockets: a call no node can take fails fast
as Unavailable naming the addresses tried (and was provably not sent: a node started later
never applies it); a node that is connected but does not answer (SIGSTOPped) is a Timeout;
a killed home is passed over at once instead of after an attempt timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvsvr import AsyncClient, Client, NotFound, Timeout, Unavailable
from kvsvr.config import load
from kvsvr.launcher import LocalCluster, write_cluster_config, write_single_node_config
from kvsvr.limits import CONNECT_WAIT_S

FAST_S = CONNECT_WAIT_S + 0.8   # the connect wait, plus scheduling on a loaded machine


def _addresses(config: Path) -> list[str]:
    return [r.address for g in load(config).groups for r in g.replicas]


def test_a_stopped_cluster_is_unavailable_at_once_and_nothing_is_queued(tmp_path: Path):
    """Blocking client, pipeline and asyncio client: Unavailable within about a second,
    naming every replica of the key's group; the put is not delivered when the cluster
    comes up afterwards (ZeroMQ held nothing for a later connection)."""
    config = write_cluster_config(tmp_path, replicas=3)
    addresses = _addresses(config)
    with Client(config, timeout=5.0) as client:
        for call in (lambda: client.get("k"), lambda: client.put("k", "lost")):
            started = time.monotonic()
            with pytest.raises(Unavailable) as raised:
                call()
            assert time.monotonic() - started < FAST_S
            assert all(address in str(raised.value) for address in addresses)
            assert "kvsvr-cluster --config" in str(raised.value)
        pipeline = client.pipeline()
        pipeline.put("a", "lost")
        pipeline.get("b")
        started = time.monotonic()
        results = pipeline.execute()
        assert time.monotonic() - started < FAST_S
        assert [type(r) for r in results] == [Unavailable, Unavailable]

        async def asynchronous() -> None:
            async with AsyncClient(config, timeout=5.0) as async_client:
                started = time.monotonic()
                with pytest.raises(Unavailable, match="no node answered"):
                    await async_client.put("k", "lost")
                assert time.monotonic() - started < FAST_S

        asyncio.run(asynchronous())
        cluster = LocalCluster(config, log_dir=tmp_path / "logs")
        cluster.start()
        try:
            time.sleep(0.5)   # a queued request would be delivered on the first connection
            for key in ("k", "a"):
                with pytest.raises(NotFound) as missing:
                    client.get(key)
                assert missing.value.version == 0
            assert client.put("k", "kept") == 1
        finally:
            cluster.stop()


def test_the_cli_says_no_node_answered_and_how_to_start_one(tmp_path: Path):
    config = write_single_node_config(tmp_path)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "kvsvr.cli", "--config", str(config),
                             "get", "k"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 4
    assert time.monotonic() - started < FAST_S + 1   # (an interpreter's start included)
    assert "no node answered" in result.stderr and _addresses(config)[0] in result.stderr
    assert "kvsvr-cluster --config" in result.stderr


def test_unavailable_names_the_call_the_user_made(tmp_path: Path):
    """The message names `put`, `row_put`, `list_keys` or `batch`, not the wire method
    (MUTATE, LIST) that would have carried it; blocking and asyncio clients alike."""
    config = write_single_node_config(tmp_path)
    with Client(config, timeout=5.0) as client:
        calls = {"put": lambda: client.put("k", "v", ttl=60),
                 "row_put": lambda: client.row_put("k", "r", "v"),
                 "incr": lambda: client.incr("k", 1),
                 "list_keys": lambda: client.list_keys(""),
                 "batch": lambda: client.batch("k").put(b"v").incr(1).commit(),
                 "get": lambda: client.get("k")}
        for name, call in calls.items():
            with pytest.raises(Unavailable) as raised:
                call()
            assert f"so the {name} was not sent" in str(raised.value), (name, raised.value)

    async def asynchronous() -> None:
        async with AsyncClient(config, timeout=5.0) as async_client:
            with pytest.raises(Unavailable, match="so the append was not sent"):
                await async_client.append("k", "v")

    asyncio.run(asynchronous())


def test_a_connected_node_that_does_not_answer_is_a_timeout(tmp_path: Path):
    """SIGSTOPped after the client connected: the request left, so the answer is Timeout
    ("may or may not have been applied"), for the blocking and the asyncio client."""
    cluster = LocalCluster(write_single_node_config(tmp_path), log_dir=tmp_path / "logs")
    cluster.start()
    pid = cluster.processes["n1"].pid
    try:
        with Client(cluster.config_path, timeout=1.0, attempt_timeout=0.5) as client:
            assert client.put("k", "v") == 1

            async def asynchronous() -> None:
                async with AsyncClient(cluster.config_path, timeout=1.0,
                                       attempt_timeout=0.5) as async_client:
                    assert (await async_client.get("k")).value == b"v"
                    os.kill(pid, signal.SIGSTOP)
                    with pytest.raises(Timeout):
                        client.put("k", "w")
                    with pytest.raises(Timeout):
                        await async_client.put("k", "w")

            try:
                asyncio.run(asynchronous())
            finally:
                os.kill(pid, signal.SIGCONT)
    finally:
        cluster.stop()


def test_a_killed_home_is_passed_over_without_an_attempt_timeout(tmp_path: Path):
    """The connection to a SIGKILLed home is gone, so a request cannot be sent there and goes
    to another replica after the short connect preference, not after attempt_timeout."""
    config = write_cluster_config(tmp_path, replicas=3, sync=False)
    cluster = LocalCluster(config, log_dir=tmp_path / "logs")
    cluster.start()
    try:
        with Client(config, timeout=10.0, attempt_timeout=3.0) as client:
            home = client.replicas_for(_spec("k"))[0]
            assert client.put("k", "v") == 1
            cluster.kill(next(r.node for g in load(config).groups for r in g.replicas
                              if r.address == home))
            time.sleep(0.2)   # the node's end of the TCP connection is gone
            started = time.monotonic()
            assert client.put("k", "w") == 2
            assert time.monotonic() - started < 2.0   # not the 3 s attempt timeout
    finally:
        cluster.stop()


def _spec(key: str):   # type: ignore[no-untyped-def]
    from kvsvr import calls

    return calls.get(key)
