"""Start a whole local cluster from one config: every node as its own process, on loopback.

Used by the demo, the tests and the benchmarks (`LocalCluster`), and by hand:
`kvsvr-cluster --config cluster.toml` runs every node until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from kvsvr.client import Client
from kvsvr.config import ClusterConfig, default_text, load
from kvsvr.errors import ConfigError, KvError
from kvsvr.limits import NODE_READY_TIMEOUT_S
from kvsvr.process import add_config_argument, on_stop_signals, program_parser

_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now, and that this process has
    not handed out before: the kernel may give a port it just gave again once the probe
    socket is closed, and a config with one address twice is refused (a CI run hit that)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def write_single_node_config(directory: str | Path, port: int | None = None) -> Path:
    """`directory/cluster.toml`: one group of one replica on a free port (or `port`), data
    under `directory/data/n1`."""
    path = write_cluster_config(directory, replicas=1)
    if port is not None:
        text = re.sub(r"tcp://127\.0\.0\.1:\d+", f"tcp://127.0.0.1:{port}", path.read_text())
        path.write_text(text)
    return path


def write_default_config(directory: str | Path) -> Path:
    """`directory/cluster.toml`: the embedded default (3 replicas, campuses a, b, c) on free
    ports, data under `directory/data`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = default_text().replace('data_dir = "kvsvr-data/', 'data_dir = "data/')
    for port in sorted(set(re.findall(r"tcp://127\.0\.0\.1:(\d+)", text))):
        text = text.replace(f"tcp://127.0.0.1:{port}\"", f"tcp://127.0.0.1:{free_port()}\"")
    path = directory / "cluster.toml"
    path.write_text(text)
    return path


def write_cluster_config(directory: str | Path, *, groups: int = 1, replicas: int = 3,
                         sync: bool = True, virtual_shards: int = 4096,
                         binlog_max_records: int | None = None,
                         peer_secret: str | None = None) -> Path:
    """`directory/cluster.toml`: `groups` groups of `replicas` replicas (campuses a, b, c, ...)
    on free loopback ports, shards split evenly, data under `directory/data/NODE`."""
    if not 1 <= groups <= virtual_shards or not 1 <= replicas <= 7:
        raise ValueError(f"groups: {groups}, replicas: {replicas}: expected 1..shards, 1..7")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = ['name = "local"', f"virtual_shards = {virtual_shards}", "",
             "[storage]", f"sync = {'true' if sync else 'false'}"]
    if binlog_max_records is not None:
        lines.append(f"binlog_max_records = {binlog_max_records}")
    lines.append("")
    if peer_secret is not None:
        lines += ["[security]", f"peer_secret = {json.dumps(peer_secret)}", ""]
    per_group = virtual_shards // groups
    for g in range(groups):
        first = g * per_group
        last = virtual_shards - 1 if g == groups - 1 else first + per_group - 1
        lines += ["[[groups]]", f'name = "g{g + 1}"', f'shards = ["{first}-{last}"]', ""]
        for r in range(replicas):
            node = f"n{g * replicas + r + 1}"
            lines += ["[[groups.replicas]]", f'node = "{node}"', f'campus = "{chr(97 + r)}"',
                      f'address = "tcp://127.0.0.1:{free_port()}"',
                      f'data_dir = "data/{node}"', ""]
    path = directory / "cluster.toml"
    path.write_text("\n".join(lines))
    return path


class ChildProcesses:
    """Named child processes with a log file each: what both local launchers (KVSvr nodes and
    queue servers) start, signal, kill and stop."""

    def __init__(self, log_dir: str | Path | None = None):
        self.log_dir = Path(log_dir) if log_dir else None
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, command: list[str], env: dict[str, str],
               cwd: str | None = None) -> None:
        output = None
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115
        self.processes[name] = subprocess.Popen(command, stdout=output, stderr=output, env=env,
                                                cwd=cwd)
        if output:
            output.close()

    def _check_alive(self, name: str, what: str) -> None:
        """Raise if the process of `name` has exited (pointing at its log)."""
        process = self.processes.get(name)
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} {name} exited with status {process.returncode}"
                               + (f"; see {self.log_dir}/{name}.log" if self.log_dir else ""))

    def start(self, node: str | None = None, *, wait: bool = True) -> None:
        raise NotImplementedError

    def signal(self, node: str, signum: int) -> None:
        self.processes[node].send_signal(signum)

    def kill(self, node: str) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        process = self.processes.pop(node)
        process.kill()
        process.wait()

    def stop(self, node: str | None = None, timeout: float = 10.0) -> dict[str, int]:
        """SIGTERM and wait; returns each stopped process's exit status."""
        names = [node] if node else list(self.processes)
        for name in names:
            process = self.processes.get(name)
            if process and process.poll() is None:
                process.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
                process.terminate()
        statuses = {}
        for name in names:
            process = self.processes.pop(name, None)
            if process is None:
                continue
            try:
                statuses[name] = process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                statuses[name] = process.wait()
        return statuses

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def stop_requested() -> threading.Event:
    """An event set by SIGTERM or SIGINT: a launcher's main loop runs until it is set."""
    stopping = threading.Event()
    on_stop_signals(stopping.set)
    return stopping


class LocalCluster(ChildProcesses):
    """The nodes of `config_path` (or the embedded default) as child processes."""

    def __init__(self, config_path: str | Path | None = None, *, log_dir: str | Path | None = None,
                 extra_env: dict[str, str] | None = None):
        super().__init__(log_dir)
        self.config_path = str(config_path) if config_path is not None else None
        self.config: ClusterConfig = load(config_path)
        self.env = {**os.environ, **(extra_env or {})}

    @property
    def nodes(self) -> list[str]:
        return [r.node for g in self.config.groups for r in g.replicas]

    def address(self, node: str) -> str:
        return self.config.replica(node)[1].address

    def start(self, node: str | None = None, *, wait: bool = True) -> None:
        for name in [node] if node else self.nodes:
            command = [sys.executable, "-m", "kvsvr.node", "--node", name]
            if self.config_path:
                command += ["--config", self.config_path]
            self._spawn(name, command, self.env,
                        cwd=self.config.base_dir if not self.config_path else None)
        if wait:
            for name in [node] if node else self.nodes:
                self.wait_ready(name)
            if node is None:
                for name in self.nodes:
                    self.wait_joined(name)

    def wait_joined(self, node: str, timeout: float = NODE_READY_TIMEOUT_S) -> None:
        """Until a replica has joined its group (a new one learns from every peer whether it
        had an earlier life; that needs them all up, so a whole cluster start waits here)."""
        deadline = time.monotonic() + timeout
        with Client(address=self.address(node), timeout=0.5, attempt_timeout=0.25) as client:
            while True:
                try:
                    if client.status().get("role") != "joining":
                        return
                except KvError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {node} did not join its group in {timeout} s")
                time.sleep(0.02)

    def wait_ready(self, node: str, timeout: float = NODE_READY_TIMEOUT_S) -> None:
        """Until the node answers on its address. The answer must come from our process:
        another one already on that port (an earlier cluster left running) answers too, and
        ours then exits on the address in use, which _check_alive reports."""
        deadline = time.monotonic() + timeout
        pid = self.processes[node].pid
        with Client(address=self.address(node), timeout=0.5, attempt_timeout=0.25) as client:
            while True:
                self._check_alive(node, "node")
                try:
                    if client.status().get("pid") == pid:
                        return
                    time.sleep(0.05)   # someone else's node: ours is failing to bind
                except KvError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {node} not ready in {timeout} s")

    def client(self, **options: object) -> Client:
        return Client(self.config, **options)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = program_parser("kvsvr-cluster", "Run every node of a cluster config locally.")
    add_config_argument(parser, "cluster TOML")
    parser.add_argument("--monitor", action="store_true",
                        help="also run the monitor center (kvsvr-monitor) and this machine's "
                             "agent (kvsvr-agent) from the config's [monitor] section")
    args = parser.parse_args(argv)
    try:
        cluster = LocalCluster(args.config)
        cluster.config.require_kv_groups()
    except ConfigError as e:
        print(f"kvsvr-cluster: config error: {e}", file=sys.stderr)
        return 2
    stopping = stop_requested()
    try:
        cluster.start()
    except RuntimeError as e:
        print(f"kvsvr-cluster: {e}", file=sys.stderr)
        cluster.stop()
        return 1
    print(f"kvsvr-cluster: {len(cluster.nodes)} node(s) up: "
          + ", ".join(f"{n} {cluster.address(n)}" for n in cluster.nodes), flush=True)
    helpers: dict[str, subprocess.Popen[bytes]] = {}
    if args.monitor:
        config_args = ["--config", args.config] if args.config else []
        for name, module in (("monitor", "kvsvr.monitor.center"),
                             ("agent", "kvsvr.monitor.agent")):
            helpers[name] = subprocess.Popen([sys.executable, "-m", module, *config_args])
        print(f"kvsvr-cluster: monitor page on http://{cluster.config.monitor.web}/", flush=True)
    status = 0
    while not stopping.is_set():
        for name, process in list(cluster.processes.items()):
            if process.poll() is not None:
                print(f"kvsvr-cluster: node {name} exited ({process.returncode})", flush=True)
                del cluster.processes[name]
        if not cluster.processes:
            print("kvsvr-cluster: every node has exited; stopping", file=sys.stderr)
            status = 1
            break
        time.sleep(0.2)
    for process in helpers.values():
        process.terminate()
    for process in helpers.values():
        process.wait(10)
    cluster.stop()
    return status


if __name__ == "__main__":
    sys.exit(main())
