"""What idle watches cost a node: park N watches on one key of a real node (one message of
WATCH requests per 1,000, each waiting WATCH_WAIT_S_MAX), then read the node's resident
memory (/proc/PID/status VmRSS) and CPU time (/proc/PID/stat utime + stime) while they sit
parked, beside the same run's baseline: the same node idle with none. Prints the memory and
CPU per idle watch, then puts the key once and times how long waking all N takes.

    python bench/watch_idle.py --watches 5000 --seconds 5
    python bench/watch_idle.py --watches 5000 --seconds 5 --replicas 3   (on replica n1)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import zmq

from kvsvr import _core
from kvsvr import protocol as p
from kvsvr.client import Client
from kvsvr.launcher import LocalCluster, write_cluster_config, write_single_node_config
from kvsvr.limits import WATCH_WAIT_S_MAX, WATCHES_PARKED_MAX
from kvsvr.protocol import WatchRequest
from kvsvr.sharding import home_index

FRAMES_PER_SEND = 1_000
CLOCK_TICKS_S = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    # The fields after the command's closing parenthesis: utime and stime are 14 and 15.
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_S


def idle_cpu_s(pid: int, seconds: float) -> float:
    before = cpu_s(pid)
    time.sleep(seconds)
    return cpu_s(pid) - before


def park(address: str, key: bytes, count: int) -> zmq.Socket:
    """Send `count` watches of `key` (none due) on one socket; returns it, still open."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.connect(address)
    body = p.encode(WatchRequest(key, 1, b"", int(WATCH_WAIT_S_MAX * 1000)))
    for start in range(1, count + 1, FRAMES_PER_SEND):
        end = min(count + 1, start + FRAMES_PER_SEND)
        socket.send(b"".join(_core.encode_frame(_core.FRAME_REQUEST, p.Method.WATCH, rid, 0,
                                                body) for rid in range(start, end)))
    return socket


def receive(socket: zmq.Socket, count: int, timeout_s: float) -> int:
    got = 0
    deadline = time.monotonic() + timeout_s
    while got < count and time.monotonic() < deadline:
        if socket.poll(100):
            got += len(_core.decode_frames(socket.recv())[0])
    return got


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watches", type=int, default=5_000,
                        help=f"watches to park (at most {WATCHES_PARKED_MAX})")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="how long each idle measurement lasts")
    parser.add_argument("--replicas", type=int, choices=(1, 3), default=1)
    args = parser.parse_args(argv)
    if not 1 <= args.watches <= WATCHES_PARKED_MAX:
        parser.error(f"--watches: expected 1..{WATCHES_PARKED_MAX}")
    if args.seconds * 2 + 5 > WATCH_WAIT_S_MAX:
        parser.error(f"--seconds: the watches must stay parked ({WATCH_WAIT_S_MAX:g} s)")
    directory = Path(tempfile.mkdtemp(prefix="watch-idle-"))
    config = (write_single_node_config(directory) if args.replicas == 1
              else write_cluster_config(directory, replicas=3, sync=False))
    cluster = LocalCluster(config, log_dir=directory / "logs")
    cluster.start()
    try:
        node = cluster.nodes[0]
        for name in cluster.nodes:
            cluster.wait_joined(name)
        key = next(k for k in (f"watched{i}".encode() for i in range(1000))
                   if home_index(k, args.replicas) == 0)
        address = cluster.address(node)
        pid = cluster.processes[node].pid
        with Client(address=address) as client:
            client.put(key, "v1")
            time.sleep(1.0)   # the node settles after start
            rss_before = rss_bytes(pid)
            cpu_before = idle_cpu_s(pid, args.seconds)
            socket = park(address, key, args.watches)
            deadline = time.monotonic() + 10
            while client.status()["counters"].get("requests.watch", 0) < args.watches:
                if time.monotonic() > deadline:
                    raise RuntimeError("the node did not take every watch")
                time.sleep(0.05)
            time.sleep(0.5)
            rss_after = rss_bytes(pid)
            cpu_after = idle_cpu_s(pid, args.seconds)
            started = time.monotonic()
            client.put(key, "v2")
            woken = receive(socket, args.watches, 10)
            wake_s = time.monotonic() - started
            socket.close(linger=0)
        print(f"node {node} ({'single' if args.replicas == 1 else 'replica of 3'}), "
              f"{args.watches} idle watches, idle windows of {args.seconds:g} s")
        print(f"  RSS     {rss_before / 2**20:8.1f} MiB -> {rss_after / 2**20:8.1f} MiB: "
              f"{(rss_after - rss_before) / args.watches:,.0f} bytes per watch")
        print(f"  CPU     {cpu_before / args.seconds * 100:6.2f} % of a core idle without "
              f"watches, {cpu_after / args.seconds * 100:6.2f} % with them: "
              f"{(cpu_after - cpu_before) / args.seconds / args.watches * 1e6:+.3f} "
              "µs of CPU per second per watch")
        print(f"  wake    one put answered {woken} of {args.watches} watches in "
              f"{wake_s * 1000:.0f} ms")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
