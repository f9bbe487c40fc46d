"""Service instances as local child processes (for tests, benchmarks and demos), and a
helper that adds [[services]] entries on free loopback ports to a cluster config."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import zmq

from kvsvr import _core
from kvsvr.config import ClusterConfig, load
from kvsvr.launcher import ChildProcesses, free_port
from kvsvr.rpc.instance import instance_config, service_config


def add_services(path: str | Path, services: dict[str, Sequence[str]], *,
                 fast_reject: bool = True, queuing_ms_max: int | None = None,
                 business_priorities: dict[str, int] | None = None) -> Path:
    """Append to the config at `path` a [[services]] entry per name, with an instance in each
    listed campus (nodes NAME-1, NAME-2, ... on free ports); returns `path`."""
    lines = ["", "# RPC services (kvsvr.rpc)"]
    for name, campuses in services.items():
        lines += ["[[services]]", f'name = "{name}"',
                  f"fast_reject = {'true' if fast_reject else 'false'}"]
        if queuing_ms_max is not None:
            lines.append(f"queuing_ms_max = {queuing_ms_max}")
        lines.append("")
        for index, campus in enumerate(campuses, start=1):
            lines += ["[[services.instances]]", f'node = "{name}-{index}"',
                      f'campus = "{campus}"', f'address = "tcp://127.0.0.1:{free_port()}"', ""]
    if business_priorities:
        lines.append("[business_priorities]")
        lines += [f'"{method}" = {value}' for method, value in business_priorities.items()]
        lines.append("")
    path = Path(path)
    with path.open("a") as out:
        out.write("\n".join(lines))
    return path


def wait_serving(address: str, timeout: float = 20.0) -> None:
    """Until something at `address` answers an RPC frame (any answer will do: an empty
    request is refused with InvalidArgument); TimeoutError if nothing does."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            socket.send(_core.encode_frame(_core.FRAME_REQUEST, 0, 1, 1000, b""))
            if socket.poll(200):
                socket.recv()
                return
        raise TimeoutError(f"nothing answered at {address} within {timeout} s")
    finally:
        socket.close()
        context.term()


class ServiceInstances(ChildProcesses):
    """Instances of services of a config, each a `kvsvr-service` child process."""

    def __init__(self, config_path: str | Path, *, log_dir: str | Path | None = None,
                 extra_env: dict[str, str] | None = None):
        super().__init__(log_dir)
        self.config_path = str(config_path)
        self.config: ClusterConfig = load(config_path)
        self.env = {**os.environ, "KVSVR_CONFIG": self.config_path, **(extra_env or {})}
        self.targets: dict[str, tuple[str, str]] = {}   # node -> (MODULE:ATTRIBUTE, address)

    def add(self, target: str, service_name: str) -> list[str]:
        """Know every instance of `service_name` as running `target`; returns their nodes."""
        _, entry = service_config(self.config, service_name)
        for instance in entry.instances:
            self.targets[instance.node] = (target, instance.address)
        return [instance.node for instance in entry.instances]

    def address(self, node: str) -> str:
        return self.targets[node][1]

    def start(self, node: str | None = None, *, wait: bool = True) -> None:
        names = [node] if node else list(self.targets)
        for name in names:
            target, _ = self.targets[name]
            self._spawn(name, [sys.executable, "-m", "kvsvr.rpc.instance", "--config",
                               self.config_path, "--node", name, target], self.env)
        if wait:
            for name in names:
                self.wait_ready(name)

    def wait_ready(self, node: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(node, "service instance")
            try:
                wait_serving(self.address(node), min(1.0, max(0.1, deadline - time.monotonic())))
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise


__all__ = ["ServiceInstances", "add_services", "instance_config", "wait_serving"]
