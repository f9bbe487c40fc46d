"""A local queue cluster: every queue server of a config as its own process, on loopback.

Used by the tests, the benchmark and by hand (`quorumq-cluster --config cluster.toml`).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from kvsvr.config import ClusterConfig, load
from kvsvr.errors import ConfigError, KvError
from kvsvr.launcher import ChildProcesses, free_port, stop_requested
from kvsvr.process import add_config_argument, program_parser
from quorumq import protocol
from quorumq.limits import SERVER_READY_TIMEOUT_S
from quorumq.protocol import QMethod
from quorumq.transport import call


def write_queue_config(directory: str | Path, *, groups: int = 1, sync: bool = True,
                       ack_deadline_ms: int = 2000, clock_skew_ms: int = 200,
                       segment_mib: int = 64, batch_lifetime_ms: int | None = None,
                       kv_group: bool = True) -> Path:
    """`directory/cluster.toml`: a one-node KVSvr group (unless `kv_group` is false: a
    queue-only config) and `groups` queue groups of 3 servers (campuses a, b, c) on free
    loopback ports, data under `directory/data/NODE`. A batch lives 3 ack deadlines unless
    `batch_lifetime_ms` says."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = ['name = "local"', ""]
    if kv_group:
        lines += ["[[groups]]", 'name = "g1"', 'shards = ["0-4095"]', "",
                  "[[groups.replicas]]", 'node = "n1"', 'campus = "a"',
                  f'address = "tcp://127.0.0.1:{free_port()}"', 'data_dir = "data/n1"', ""]
    lines += ["[queue]", f"sync = {'true' if sync else 'false'}",
              f"ack_deadline_ms = {ack_deadline_ms}", f"clock_skew_ms = {clock_skew_ms}",
              f"batch_lifetime_ms = {batch_lifetime_ms or 3 * ack_deadline_ms}",
              f"segment_mib = {segment_mib}", ""]
    for g in range(groups):
        lines += ["[[queue_groups]]", f'name = "q{g + 1}"', ""]
        for s in range(3):
            node = f"q{g + 1}{chr(97 + s)}"
            lines += ["[[queue_groups.servers]]", f'node = "{node}"',
                      f'campus = "{chr(97 + s)}"',
                      f'address = "tcp://127.0.0.1:{free_port()}"',
                      f'data_dir = "data/{node}"', ""]
    path = directory / "cluster.toml"
    path.write_text("\n".join(lines))
    return path


class LocalQueueCluster(ChildProcesses):
    """The queue servers of `config_path` as child processes."""

    def __init__(self, config_path: str | Path, *, log_dir: str | Path | None = None):
        super().__init__(log_dir)
        self.config_path = str(config_path)
        self.config: ClusterConfig = load(config_path)
        self.config.require_queue_groups()

    @property
    def nodes(self) -> list[str]:
        return [s.node for g in self.config.queue_groups for s in g.servers]

    def group_nodes(self, group: str) -> list[str]:
        return [s.node for g in self.config.queue_groups if g.name == group for s in g.servers]

    def address(self, node: str) -> str:
        return self.config.queue_server(node)[1].address

    def data_dir(self, node: str) -> Path:
        return self.config.data_dir(self.config.queue_server(node)[1])

    def start(self, node: str | None = None, *, wait: bool = True) -> None:
        names = [node] if node else self.nodes
        for name in names:
            self._spawn(name, [sys.executable, "-m", "quorumq.server", "--config",
                               self.config_path, "--node", name], dict(os.environ))
        if wait:
            for name in names:
                self.wait_ready(name)

    def wait_ready(self, node: str, timeout: float = SERVER_READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(node, "queue server")
            try:
                self.status(node, timeout=0.5)
                return
            except KvError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"queue server {node} not ready in {timeout} s") from None

    def status(self, node: str, timeout: float = 2.0) -> dict[str, object]:
        status: dict[str, object] = call(self.address(node), QMethod.STATUS,
                                         protocol.StatusRequest(), timeout=timeout)
        return status

    def create_topic(self, topic: str, *, retention_bytes: int = 0, retention_s: int = 0) -> None:
        """Create `topic` on every server that is up (idempotent)."""
        for node in self.nodes:
            if node in self.processes:
                call(self.address(node), QMethod.CREATE_TOPIC, protocol.CreateTopicRequest(
                    topic, retention_bytes, retention_s))

    def wipe(self, node: str) -> None:
        """SIGKILL and delete the server's data directory (a lost disk)."""
        if node in self.processes:
            self.kill(node)
        shutil.rmtree(self.data_dir(node), ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = program_parser("quorumq-cluster", "Run every queue server of a config locally.")
    add_config_argument(parser, "cluster TOML with [[queue_groups]]")
    args = parser.parse_args(argv)
    try:
        cluster = LocalQueueCluster(args.config)
    except ConfigError as e:
        print(f"quorumq-cluster: config error: {e}", file=sys.stderr)
        return 2
    stopping = stop_requested()
    try:
        cluster.start()
    except RuntimeError as e:
        print(f"quorumq-cluster: {e}", file=sys.stderr)
        cluster.stop()
        return 1
    print("quorumq-cluster: " + ", ".join(f"{n} {cluster.address(n)}" for n in cluster.nodes),
          flush=True)
    while not stopping.is_set():
        time.sleep(0.2)
    cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
