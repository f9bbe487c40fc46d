"""The peer system for bench/load.py: a 3-member etcd cluster on loopback and a driver for it.

`EtcdCluster` starts `members` etcd processes on free loopback ports with their data in a
temporary directory (fsync on, etcd's default; a 4 GiB backend quota), waits until every member
reports healthy, and stops them. `etcd_driver` is the etcd twin of load.py's drivers: the same
Recorder (bench/measure.py), the same keys (`key:N`), 100-byte values by default, `window`
closed-loop requests in flight per process through the aetcd asyncio client. Puts are etcd
puts (a Raft commit fsynced on a majority before the answer: durable writes); gets are etcd's
default linearizable Range (serializable=False: a ReadIndex round with the leader). Each
closed-loop worker talks to one member, workers spread over the members round-robin, the way a
clientv3 client spreads over its endpoints; followers forward to the leader as etcd does.

Needs `etcd` on PATH (Debian package etcd-server) and the `aetcd` client (bash tools/bench
installs both when it can). Neither is a dependency of KVSvr.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from measure import Recorder

from kvsvr.launcher import free_port

QUOTA_BACKEND_BYTES = 4 << 30  # etcd's recommended ceiling is 8 GiB; the default is 2 GiB
PRELOAD_TXN_OPS = 128           # etcd's default --max-txn-ops


def missing() -> str | None:
    """Why the etcd comparison cannot run here, or None."""
    if shutil.which("etcd") is None:
        return ("etcd is not on PATH (Debian: apt-get install etcd-server; bash tools/bench "
                "installs it when run as root)")
    try:
        import aetcd  # noqa: F401
    except ImportError:
        return ("the aetcd client is not installed (bash tools/bench pip-installs it into "
                ".venv: .venv/bin/pip install aetcd)")
    return None


def version() -> str:
    try:
        text = subprocess.run(["etcd", "--version"], capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in text.splitlines():
        if line.lower().startswith("etcd version:"):
            return line.split(":", 1)[1].strip()
    return text.strip().splitlines()[0] if text.strip() else "unknown"


class EtcdCluster:
    """`members` etcd processes on loopback, data under `directory`."""

    def __init__(self, directory: str | Path, members: int = 3,
                 quota_bytes: int = QUOTA_BACKEND_BYTES):
        self.directory = Path(directory)
        self.members = members
        self.quota_bytes = quota_bytes
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.client_ports: dict[str, int] = {}
        self.peer_ports: dict[str, int] = {}

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", port) for port in self.client_ports.values()]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes.values()]

    def start(self, timeout: float = 60.0) -> None:
        names = [f"etcd{i + 1}" for i in range(self.members)]
        for name in names:
            self.client_ports[name] = free_port()
            self.peer_ports[name] = free_port()
        initial = ",".join(f"{n}=http://127.0.0.1:{self.peer_ports[n]}" for n in names)
        token = f"kvsvr-bench-{secrets.token_hex(4)}"
        logs = self.directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for name in names:
            client_url = f"http://127.0.0.1:{self.client_ports[name]}"
            peer_url = f"http://127.0.0.1:{self.peer_ports[name]}"
            command = ["etcd", "--name", name, "--data-dir", str(self.directory / name),
                       "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                       "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                       "--initial-cluster", initial, "--initial-cluster-state", "new",
                       "--initial-cluster-token", token,
                       "--quota-backend-bytes", str(self.quota_bytes),
                       "--logger", "zap", "--log-level", "warn"]
            with open(logs / f"{name}.log", "ab") as log:
                self.processes[name] = subprocess.Popen(command, stdout=log, stderr=log,
                                                        stdin=subprocess.DEVNULL)
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.processes)
        while pending:
            for name in sorted(pending):
                process = self.processes[name]
                if process.poll() is not None:
                    raise RuntimeError(f"etcd member {name} exited with status "
                                       f"{process.returncode}; see "
                                       f"{self.directory / 'logs' / (name + '.log')}")
                url = f"http://127.0.0.1:{self.client_ports[name]}/health"
                try:
                    with urllib.request.urlopen(url, timeout=1.0) as answer:
                        if json.loads(answer.read()).get("health") in (True, "true"):
                            pending.discard(name)
                except (OSError, ValueError):
                    pass
            if pending:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd members {sorted(pending)} not healthy in "
                                       f"{timeout} s; see {self.directory / 'logs'}")
                time.sleep(0.2)

    def metrics(self) -> dict[str, float]:
        """A few of the members' Prometheus counters: the leader's (proposals committed,
        leader changes seen) and the WAL fsyncs summed over members."""
        wanted = {"etcd_server_leader_changes_seen_total": "leader_changes",
                  "etcd_server_proposals_committed_total": "proposals_committed",
                  "etcd_disk_wal_fsync_duration_seconds_count": "wal_fsyncs",
                  "etcd_disk_wal_fsync_duration_seconds_sum": "wal_fsync_s"}
        summed = {"wal_fsyncs", "wal_fsync_s"}
        total: dict[str, float] = {}
        for port in self.client_ports.values():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=2.0) as answer:
                    text = answer.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                name, _, value = line.partition(" ")
                if name in wanted:
                    key = wanted[name]
                    number = float(value)
                    total[key] = (total.get(key, 0.0) + number if key in summed
                                  else max(total.get(key, 0.0), number))
        return total

    def stop(self, timeout: float = 10.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def preload(endpoints: list[tuple[str, int]], keys: int, value_size: int,
            concurrency: int = 8) -> None:
    """Write every key once (transactions of 128 puts, a few in flight)."""
    import aetcd

    async def run() -> None:
        clients = [aetcd.Client(host, port, timeout=60) for host, port in endpoints]
        value = b"v" * value_size
        batches = asyncio.Queue[range]()
        for first in range(0, keys, PRELOAD_TXN_OPS):
            batches.put_nowait(range(first, min(keys, first + PRELOAD_TXN_OPS)))

        async def worker(client: Any) -> None:
            while not batches.empty():
                batch = batches.get_nowait()
                await client.transaction(compare=[], failure=[], success=[
                    client.transactions.put(f"key:{i}".encode(), value) for i in batch])

        try:
            await asyncio.gather(*(worker(clients[i % len(clients)])
                                   for i in range(concurrency)))
        finally:
            for client in clients:
                await client.close()

    asyncio.run(run())


def etcd_driver(endpoints: list[tuple[str, int]], spec: dict[str, Any], window: int, seed: int,
                out: Any, hello: Any, ready: Any, start: Any) -> None:
    """One client process: `window` closed-loop workers, each on one member."""
    import aetcd

    async def run() -> dict[str, Any]:
        rng = random.Random(seed)
        value = b"v" * spec["value_size"]
        keys, read_share = spec["keys"], spec["read_share"]
        timeout = spec["request_timeout"]
        clients = [aetcd.Client(host, port, timeout=timeout) for host, port in endpoints]
        for client in clients:
            await client.get(b"key:0")  # connected and answering
        hello.put(seed)
        await asyncio.get_running_loop().run_in_executor(None, ready.wait)
        recorder = Recorder(start.value, spec["duration"])
        end = recorder.end

        async def worker(client: Any) -> None:
            while True:
                key = f"key:{rng.randrange(keys)}".encode()
                sent = time.perf_counter()
                recorder.cpu_mark(sent)
                if sent >= end:
                    return
                try:
                    if rng.random() < read_share:
                        await client.get(key)
                    else:
                        await client.put(key, value)
                except aetcd.ConnectionTimeoutError:
                    recorder.timeout(time.perf_counter())
                except aetcd.ClientError as e:
                    recorder.error(time.perf_counter(), type(e).__name__)
                else:
                    recorder.done(sent, time.perf_counter())

        try:
            await asyncio.gather(*(worker(clients[(seed + i) % len(clients)])
                                   for i in range(window)))
        finally:
            for client in clients:
                await client.close()
        return recorder.result()

    out.put(asyncio.run(run()))
