"""End-to-end load generator for KVSvr, with same-run baselines and a peer system.

    python bench/load.py                       # puts then gets against a fresh local node
    python bench/load.py --mix ycsb-a --duration 20 --processes 4 --concurrency 32
    python bench/load.py --address tcp://127.0.0.1:7400 --mix get --no-baselines
    python bench/load.py --replicas 3 --groups 1 --peer etcd   # a local 3-replica group vs etcd
    python bench/load.py --replicas 3 --kill-halfway home --duration 20 --mix put

It starts its own node (fsync on) unless --address (one running node) or --config (a running
cluster) is given; with --replicas R [--groups G] it starts a local cluster of G groups of R
replicas and drives it through the cluster config, each key sent to its group's home replica.
Several client processes hold `--concurrency` requests in flight in all; it prints ops/s and
p50/p99/p99.9 latency. Puts are durable writes (answered after fsync, and after the group's
quorum when replicated); gets are linearizable reads (the protocol's default).

Beside them it measures, in the same run and with the same driver and concurrency: a raw
ZeroMQ echo server (the transport's ceiling) and raw LMDB doing the same puts (same batch
size, fsync on) and gets in one process (the storage's ceiling). With --peer etcd it starts a
3-member etcd cluster on loopback (bench/etcd_peer.py), runs the same workloads against it with
the same number of requests in flight and the same measuring code (bench/measure.py), and
prints KVSvr/etcd side by side. With --kill-halfway it SIGKILLs a replica halfway through each
workload, restarts it --restart-after seconds later, and prints (and plots) a per-second
timeline.

Drivers: `window` (default) keeps requests in flight with the wire protocol and no per-call
objects, measuring the node(s); `async` uses kvsvr.AsyncClient, measuring nodes + client
library (and its own failover when a replica dies).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import multiprocessing
import os
import queue
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import zmq
from measure import Recorder, disk_io, machine_busy_seconds, proc_cpu_seconds, summarise
from tqdm import tqdm

from kvsvr import _core, calls, protocol
from kvsvr.aio import AsyncClient
from kvsvr.client import Client
from kvsvr.config import address_problem, load
from kvsvr.errors import ERRORS_BY_CODE, ConfigError, KvError, NotFound, Timeout
from kvsvr.launcher import (
    LocalCluster,
    free_port,
    write_cluster_config,
    write_single_node_config,
)
from kvsvr.sharding import home_index, shard_of

MIXES = {"put": 0.0, "get": 1.0, "ycsb-a": 0.5, "ycsb-b": 0.95}  # share of reads
WARMUP_S = 0.5
DOWN_S = 1.0           # window driver: how long a replica that timed out is avoided ...
UNREACHABLE_S = 0.1    # ... and one with no live connection (probing it costs nothing)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def is_address(target: str) -> bool:
    """An address (tcp://, ipc://) rather than a cluster config path."""
    return address_problem(target) is None


# --- drivers (one per client process) ------------------------------------------------------
# Every driver has the signature (target, spec, window, seed, out, hello, ready, start): it
# connects, puts its seed on `hello`, waits for `ready`, runs from start.value - WARMUP_S to
# start.value + spec["duration"] with `window` requests in flight, recording with a Recorder
# (bench/measure.py), and puts Recorder.result() on `out`.

class _Routes:
    """Where the window driver sends key N: its group's home replica, or the next live one.

    `target` is one node's address, or a cluster config path: xxh64(key) -> shard -> group
    (kvsvr.sharding), and within the group the key's home replica first, then the others in
    ring order. A replica that timed out is avoided for DOWN_S, one with no live connection
    (ZeroMQ refuses the send at once) for UNREACHABLE_S."""

    def __init__(self, target: str, keys: int):
        if is_address(target):
            self.groups = [[target]]
            self.group = array("I", bytes(4 * keys))
            self.home = array("B", bytes(keys))
        else:
            config = load(target)
            owner = config.shard_table()
            self.groups = [[r.address for r in g.replicas] for g in config.groups]
            self.group = array("I")
            self.home = array("B")
            for i in range(keys):
                key = f"key:{i}".encode()
                g = owner[shard_of(key, config.virtual_shards)]
                self.group.append(g)
                self.home.append(home_index(key, len(self.groups[g])))
        self.addresses = [a for g in self.groups for a in g]
        self.down_until = dict.fromkeys(self.addresses, 0.0)

    def pick(self, key_index: int, now: float) -> str | None:
        replicas = self.groups[self.group[key_index]]
        home = self.home[key_index]
        n = len(replicas)
        for i in range(n):
            address = replicas[(home + i) % n]
            if self.down_until[address] <= now:
                return address
        return None


def _window_driver(target: str, spec: dict[str, Any], window: int, seed: int, out: Any,
                   hello: Any, ready: Any, start: Any) -> None:
    """Keep `window` requests in flight (one DEALER socket per replica); record completions."""
    rng = random.Random(seed)
    keys, read_share, homed = spec["keys"], spec["read_share"], spec["homed"]
    value = b"v" * spec["value_size"]
    request_timeout = spec["request_timeout"]
    budget_ms = max(1, int(request_timeout * 1000))
    client_id = secrets.randbits(62) | 1
    seq = 0
    routes = _Routes(target, keys)
    context = zmq.Context()
    sockets: dict[str, zmq.Socket] = {}
    poller = zmq.Poller()
    for address in routes.addresses:
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.IMMEDIATE, 1)  # no live connection: send fails, not queues
        socket.connect(address)
        sockets[address] = socket
        poller.register(socket, zmq.POLLIN)
    encode, encode_frame, decode_frames = protocol.encode, _core.encode_frame, _core.decode_frames
    response, not_found = _core.FRAME_RESPONSE, NotFound.code
    error_names = {code: cls.__name__ for code, cls in ERRORS_BY_CODE.items()}

    # Connected: every replica answers a ping (one that does not is probed by the load later).
    ping = encode(protocol.PingRequest())
    waiting = set(routes.addresses)
    deadline = time.monotonic() + 10.0
    while waiting and time.monotonic() < deadline:
        for address in waiting:
            with contextlib.suppress(zmq.Again):
                sockets[address].send(encode_frame(1, protocol.Method.PING, 0, 1000, ping),
                                      zmq.NOBLOCK)
        for socket, _ in poller.poll(100):
            while True:
                try:
                    socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                waiting.discard(next(a for a, s in sockets.items() if s is socket))
    hello.put(seed)
    ready.wait()
    recorder = Recorder(start.value, spec["duration"])
    end = recorder.end
    in_flight: dict[int, tuple[float, str]] = {}
    next_id = 1
    while True:
        now = time.perf_counter()
        recorder.cpu_mark(now)
        if now >= end:
            break
        while in_flight:  # oldest first (dicts keep insertion order)
            request_id = next(iter(in_flight))
            sent, address = in_flight[request_id]
            if now - sent < request_timeout:
                break
            del in_flight[request_id]
            recorder.timeout(now)
            routes.down_until[address] = now + DOWN_S
        batches: dict[str, list[bytes]] = {}
        ids: dict[str, list[int]] = {}
        blocked = False
        while len(in_flight) < window:
            index = rng.choice(homed) if homed else rng.randrange(keys)
            address = routes.pick(index, now)
            if address is None:
                blocked = True
                break
            key = f"key:{index}".encode()
            if rng.random() < read_share:
                frame = encode_frame(1, protocol.Method.GET, next_id, budget_ms,
                                     encode(protocol.GetRequest(key)))
            else:
                seq += 1
                frame = encode_frame(1, protocol.Method.MUTATE, next_id, budget_ms, encode(
                    protocol.MutateRequest(key, [protocol.Op(_core.OP_PUT, b"", value)], None,
                                           client_id, seq)))
            batches.setdefault(address, []).append(frame)
            ids.setdefault(address, []).append(next_id)
            in_flight[next_id] = (now, address)
            next_id += 1
        for address, frames in batches.items():
            try:
                sockets[address].send(b"".join(frames), zmq.NOBLOCK)
            except zmq.Again:  # no live connection (the replica is down): never sent, redraw
                routes.down_until[address] = now + UNREACHABLE_S
                for request_id in ids[address]:
                    del in_flight[request_id]
        if in_flight:
            oldest = in_flight[next(iter(in_flight))][0]
            wait_ms = max(1, min(1000, int((oldest + request_timeout - now) * 1000) + 1))
        else:
            wait_ms = 50 if blocked else 1
        if blocked:
            wait_ms = min(wait_ms, 50)
        for socket, _ in poller.poll(wait_ms):
            while True:
                try:
                    payload = socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                done = time.perf_counter()
                for kind, status, request_id, _budget, _body in decode_frames(payload)[0]:
                    entry = in_flight.pop(request_id, None)
                    if entry is None:
                        continue  # timed out already, or a ping's answer
                    # NotFound is an answer; the echo baseline returns our requests unchanged.
                    if kind == response and status not in (0, not_found):
                        recorder.error(done, error_names.get(status, f"status {status}"))
                    else:
                        recorder.done(entry[0], done)
    for socket in sockets.values():
        socket.close()
    context.term()
    out.put(recorder.result())


def _async_driver(target: str, spec: dict[str, Any], window: int, seed: int, out: Any,
                  hello: Any, ready: Any, start: Any) -> None:
    """`window` concurrent calls through kvsvr.AsyncClient (routing and failover its own)."""
    async def run() -> dict[str, Any]:
        rng = random.Random(seed)
        value = b"v" * spec["value_size"]
        keys, read_share, homed = spec["keys"], spec["read_share"], spec["homed"]
        options: dict[str, Any] = {"timeout": spec["request_timeout"]}
        if is_address(target):
            client = AsyncClient(address=target, **options)
        else:
            client = AsyncClient(target, **options)
        async with client:
            await client.ping()
            hello.put(seed)
            await asyncio.get_running_loop().run_in_executor(None, ready.wait)
            recorder = Recorder(start.value, spec["duration"])
            end = recorder.end

            async def worker() -> None:
                while True:
                    key = f"key:{rng.choice(homed) if homed else rng.randrange(keys)}"
                    sent = time.perf_counter()
                    recorder.cpu_mark(sent)
                    if sent >= end:
                        return
                    try:
                        if rng.random() < read_share:
                            await client.get(key)
                        else:
                            await client.put(key, value)
                    except NotFound:
                        recorder.done(sent, time.perf_counter())
                    except Timeout:
                        recorder.timeout(time.perf_counter())
                    except KvError as e:
                        recorder.error(time.perf_counter(), type(e).__name__)
                    else:
                        recorder.done(sent, time.perf_counter())

            await asyncio.gather(*(worker() for _ in range(window)))
        return recorder.result()

    out.put(asyncio.run(run()))


Event = tuple[float, Callable[[float], None]]  # (s into the window, action(window start))


def drive(target: Any, *, driver: Callable[..., None], spec: dict[str, Any], concurrency: int,
          processes: int, label: str, events: list[Event] | None = None,
          server_pids: Callable[[], list[int]] | None = None,
          show_progress: bool = True) -> dict[str, Any]:
    """Run one workload from `processes` client processes, `concurrency` in flight in all;
    `events` run in this process at their offsets into the measured window."""
    context = multiprocessing.get_context("spawn")
    out, hello = context.Queue(), context.Queue()
    ready = context.Event()
    start = context.Value("d", 0.0)
    windows = [concurrency // processes + (1 if i < concurrency % processes else 0)
               for i in range(processes)]
    workers = [context.Process(target=driver, daemon=True,
                               args=(target, spec, w, 1000 + i, out, hello, ready, start))
               for i, w in enumerate(windows) if w > 0]
    for w in workers:
        w.start()

    def check_workers() -> None:
        failed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
        if failed:
            for w in workers:
                if w.is_alive():
                    w.kill()
            raise RuntimeError(f"{label}: a client process failed (exit status {failed[0]})")

    deadline = time.monotonic() + 120
    for _ in workers:
        while True:
            try:
                hello.get(timeout=0.25)
                break
            except queue.Empty:
                check_workers()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: client processes not ready in 120 s") from None
    duration = spec["duration"]
    start.value = time.perf_counter() + WARMUP_S
    ready.set()
    cpu: list[tuple[float, float]] = []
    disk: list[tuple[int, int, int]] = []

    def sample(_start: float) -> None:  # CPU used by the servers and the whole machine
        cpu.append((proc_cpu_seconds(server_pids()) if server_pids else 0.0,
                    machine_busy_seconds()))
        disk.append(disk_io())
    pending = sorted([*(events or []), (0.0, sample), (duration, sample)], key=lambda e: e[0])
    results: list[dict[str, Any]] = []
    shown = 0.0
    with tqdm(total=round(duration + WARMUP_S, 1), desc=f"{label:28s}", unit="s",
              disable=not show_progress or not sys.stderr.isatty(),
              bar_format="{desc} {bar} {n:.0f}/{total:.0f} s") as bar:
        while len(results) < len(workers):
            now = time.perf_counter()
            while pending and now >= start.value + pending[0][0]:
                pending.pop(0)[1](start.value)
            try:
                results.append(out.get(timeout=0.05))
            except queue.Empty:
                check_workers()
                if now > start.value + duration + 120:
                    raise RuntimeError(f"{label}: client processes gave no results") from None
            if now - shown >= 0.25:
                shown = now
                bar.n = min(bar.total, now - start.value + WARMUP_S)
                bar.refresh()
    for _at, action in pending:  # anything the run outlasted (e.g. a restart after the end)
        action(start.value)
    for w in workers:
        w.join(timeout=30)
    outcome = summarise(label, results, duration)
    outcome["in_flight"] = sum(windows)
    outcome["client_processes"] = len(workers)
    if len(disk) == 2 and disk[1][0] > disk[0][0]:
        # The machine's disks, whoever wrote: the systems compared never run at once.
        outcome["disk_writes"], outcome["disk_bytes"], outcome["disk_flushes"] = (
            after - before for before, after in zip(disk[0], disk[1], strict=True))
    if len(cpu) == 2:
        if server_pids is not None:
            outcome["server_cpu_s"] = cpu[1][0] - cpu[0][0]
        # everything else the machine did meanwhile (other work on a shared machine skews)
        outcome["other_cpu_s"] = max(0.0, cpu[1][1] - cpu[0][1] - outcome["client_cpu_s"]
                                     - outcome.get("server_cpu_s", 0.0))
    return outcome


# --- baselines ------------------------------------------------------------------------------
def _echo_server(address: str, stop: Any) -> None:
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.bind(address)
    while not stop.is_set():
        if socket.poll(100):
            while True:
                try:
                    message = socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                socket.send_multipart(message)
    socket.close()
    context.term()


def raw_lmdb(value_size: int, batch: int, keys: int, seconds: float = 2.0) -> dict[str, float]:
    """The same LMDB work as the node's puts (batch per fsynced commit) and gets."""
    directory = tempfile.mkdtemp(prefix="kvsvr-bench-lmdb-", dir=os.getcwd())
    try:
        env = lmdb.open(directory, map_size=1 << 30, sync=True)
        value = b"v" * value_size
        names = [f"key:{i}".encode() for i in range(keys)]
        with env.begin(write=True) as txn:
            for name in names:
                txn.put(name, value)
        rng = random.Random(1)
        done, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            with env.begin(write=True) as txn:
                for _ in range(batch):
                    txn.put(names[rng.randrange(keys)], value)
            done += batch
        puts = done / seconds
        done, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            with env.begin() as txn:
                for _ in range(100):
                    txn.get(names[rng.randrange(keys)])
            done += 100
        env.close()
        return {"put_ops_per_s": puts, "get_ops_per_s": done / seconds}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- the KVSvr side -------------------------------------------------------------------------
def _preload(target: str, keys: int, value_size: int) -> None:
    """Write every key once, through the client (routed like any call)."""
    client = Client(address=target, timeout=60.0) if is_address(target) else Client(
        target, timeout=60.0)
    with client:
        pipeline = client.pipeline()
        for i in range(keys):
            pipeline._run(calls.put(f"key:{i}", b"v" * value_size, None, client._op_id()))
            if len(pipeline) == 1000:
                pipeline.execute(raise_errors=True)
        pipeline.execute(raise_errors=True)


def _counters(addresses: list[str]) -> dict[str, int]:
    """The nodes' counters, summed (a node that does not answer counts nothing)."""
    total: dict[str, int] = {}
    for address in addresses:
        try:
            with Client(address=address, timeout=2.0) as client:
                counters = dict(client.status()["counters"])
        except KvError:
            continue
        for name, value in counters.items():
            if isinstance(value, int):
                total[name] = total.get(name, 0) + value
    return total


def _kill_target(choice: str, config_path: str, keys: int) -> str:
    """NODE, `home` (the first group's replica that is home to most of the benchmark's keys)
    or `any` (a replica of the first group at random)."""
    config = load(config_path)
    group = config.groups[0]
    names = [r.node for r in group.replicas]
    if choice == "any":
        return random.SystemRandom().choice(names)
    if choice == "home":
        owner = config.shard_table()
        homes = [0] * len(names)
        for i in range(keys):
            key = f"key:{i}".encode()
            if owner[shard_of(key, config.virtual_shards)] == 0:
                homes[home_index(key, len(names))] += 1
        return names[max(range(len(names)), key=lambda r: homes[r])]
    config.replica(choice)  # ConfigError naming the known nodes if it is not one
    return choice


class _Killer:
    """SIGKILL `node` at `at` s into the window, restart it `restart_after` s later, and note
    when it answers again; the marks go on the timeline."""

    def __init__(self, cluster: LocalCluster, node: str, at: float, restart_after: float):
        self.cluster, self.node = cluster, node
        self.at, self.restart_after = at, restart_after
        self.marks: list[tuple[float, str]] = []
        self.t0 = 0.0
        self.waiter: threading.Thread | None = None

    def events(self) -> list[Event]:
        def kill(start: float) -> None:
            self.t0 = start
            self.cluster.kill(self.node)
            self.marks.append((time.perf_counter() - self.t0, f"SIGKILL {self.node}"))

        def restart(start: float) -> None:
            self.t0 = start
            self.cluster.start(self.node, wait=False)
            self.marks.append((time.perf_counter() - self.t0, f"restart {self.node}"))

            def wait() -> None:
                try:
                    self.cluster.wait_ready(self.node, timeout=60.0)
                    self.marks.append((time.perf_counter() - self.t0, f"{self.node} answers"))
                except RuntimeError as e:
                    self.marks.append((time.perf_counter() - self.t0, f"{self.node}: {e}"))

            self.waiter = threading.Thread(target=wait, daemon=True)
            self.waiter.start()

        return [(self.at, kill), (self.at + self.restart_after, restart)]

    def settle(self) -> None:
        if self.node not in self.cluster.processes:
            self.cluster.start(self.node, wait=False)
            self.marks.append((math.nan, f"restart {self.node} (after the run)"))
        if self.waiter is not None:
            self.waiter.join(timeout=70)
        self.cluster.wait_ready(self.node, timeout=60.0)


# --- timelines and plots --------------------------------------------------------------------
def print_timeline(w: dict[str, Any]) -> None:
    marks = w.get("kill", {}).get("marks", [])
    print(f"\ntimeline {w['label']} (per second of the measured window; "
          f"{w['in_flight']} requests in flight):")
    print(f"{'second':>6s} {'ops/s':>9s} {'errors':>7s} {'timeouts':>8s} {'p99 ms':>8s}  events")
    for s, ops in enumerate(w["timeline"]):
        events = ", ".join(f"{text} at {t:.2f} s" for t, text in marks
                           if not math.isnan(t) and s <= t < s + 1)
        print(f"{s:6d} {ops:9,d} {w['timeline_errors'][s]:7d} {w['timeline_timeouts'][s]:8d} "
              f"{w['timeline_p99_ms'][s]:8.2f}  {events}")


def _svg_timeline(w: dict[str, Any], title: str) -> str:
    """Three panels (ops/s; errors + timeouts per s; p99 ms) and the kill/restart marks,
    drawn by hand (no plotting library needed)."""
    width, left, right, top, panel_h, gap = 860, 70, 20, 40, 130, 40
    height = top + 3 * panel_h + 2 * gap + 50
    n = max(1, len(w["timeline"]))
    x_of = lambda s: left + (width - left - right) * s / n  # noqa: E731
    failures = [e + t for e, t in zip(w["timeline_errors"], w["timeline_timeouts"], strict=True)]
    # p99 of a second with no completed request is undefined: leave a gap in that line
    p99 = [v if ops else None for v, ops in zip(w["timeline_p99_ms"], w["timeline"], strict=True)]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="22" font-size="14">{_xml(title)}</text>']

    def panel(y0: float, values: list[float | None], colour: str, name: str) -> None:
        peak = max([v for v in values if v is not None] + [1e-9])
        scale = 10 ** math.floor(math.log10(peak))
        peak = math.ceil(peak / scale) * scale
        y_of = lambda v: y0 + panel_h - panel_h * v / peak  # noqa: E731
        parts.append(f'<rect x="{left}" y="{y0}" width="{width - left - right}" '
                     f'height="{panel_h}" fill="none" stroke="#999"/>')
        for i in range(5):
            v = peak * i / 4
            text = f"{v:,.0f}" if peak >= 100 else f"{v:.3g}"
            parts.append(f'<text x="{left - 6}" y="{y_of(v) + 4:.1f}" text-anchor="end">'
                         f"{text}</text>")
        segment: list[str] = []
        for s, v in [*enumerate(values), (n, None)]:
            if v is not None:
                segment.append(f"{x_of(s + 0.5):.1f},{y_of(v):.1f}")
                parts.append(f'<circle cx="{x_of(s + 0.5):.1f}" cy="{y_of(v):.1f}" r="2.5" '
                             f'fill="{colour}"/>')
            elif segment:
                parts.append(f'<polyline points="{" ".join(segment)}" fill="none" '
                             f'stroke="{colour}" stroke-width="2"/>')
                segment = []
        parts.append(f'<text x="{left + 8}" y="{y0 + 16}" fill="{colour}">{_xml(name)}</text>')

    rows = [(w["timeline"], "#1f77b4", "completed requests per second"),
            (failures, "#d62728", "errors + timeouts per second"),
            (p99, "#ff7f0e", "p99 latency per second (ms)")]
    for k, (values, colour, name) in enumerate(rows):
        panel(top + k * (panel_h + gap), values, colour, name)
    bottom = top + 3 * panel_h + 2 * gap
    for s in range(0, n + 1, max(1, n // 10)):
        parts.append(f'<text x="{x_of(s):.1f}" y="{bottom + 16}" text-anchor="middle">'
                     f"{s}</text>")
    parts.append(f'<text x="{(width + left) / 2}" y="{bottom + 34}" text-anchor="middle">'
                 "seconds into the measured window</text>")
    marks = [(t, text) for t, text in w.get("kill", {}).get("marks", []) if not math.isnan(t)]
    for k, (t, text) in enumerate(marks):
        x = x_of(t)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" '
                     'stroke="#555" stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{x + 3:.1f}" y="{top + panel_h + 14 + 13 * k}" '
                     f'fill="#555" font-size="11">{_xml(f"{text} ({t:.2f} s)")}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def plot_timeline(w: dict[str, Any], title: str, stem: Path) -> list[str]:
    """Write stem.svg (always, drawn by hand) and stem.png (if matplotlib is importable)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    svg = stem.with_suffix(".svg")
    svg.write_text(_svg_timeline(w, title))
    written.append(str(svg))
    if importlib.util.find_spec("matplotlib") is None:
        print("plot: matplotlib is not importable: PNG skipped (the SVG is drawn by hand)")
        return written
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seconds = [s + 0.5 for s in range(len(w["timeline"]))]
    figure, axes = plt.subplots(3, 1, sharex=True, figsize=(9, 7))
    failures = [e + t for e, t in zip(w["timeline_errors"], w["timeline_timeouts"], strict=True)]
    p99 = [v if ops else math.nan for v, ops in zip(w["timeline_p99_ms"], w["timeline"],
                                                   strict=True)]
    for axis, values, colour, name in (
            (axes[0], w["timeline"], "tab:blue", "ops/s"),
            (axes[1], failures, "tab:red", "errors +\ntimeouts /s"),
            (axes[2], p99, "tab:orange", "p99 ms")):
        axis.plot(seconds, values, color=colour, marker=".")
        axis.set_ylabel(name)
        axis.set_ylim(bottom=0)
    axes[2].set_xlabel("seconds into the measured window")
    for k, (t, text) in enumerate(w.get("kill", {}).get("marks", [])):
        if not math.isnan(t):
            for axis in axes:
                axis.axvline(t, color="grey", linestyle="--")
            axes[0].text(t, 0.05 + 0.15 * (k % 3), f" {text}", fontsize=8, color="dimgrey",
                         transform=axes[0].get_xaxis_transform())
    figure.suptitle(title)
    png = stem.with_suffix(".png")
    figure.savefig(png, dpi=100)
    plt.close(figure)
    written.append(str(png))
    return written


# --- main -----------------------------------------------------------------------------------
def _row(w: dict[str, Any] | None) -> str:
    if w is None:
        return f"{'-':>10s} {'':8s} {'':8s} {'':9s}"
    return (f"{w['ops_per_s']:10,.0f} {w['p50_ms']:8.2f} {w['p99_ms']:8.2f} "
            f"{w['p999_ms']:9.2f}")


def _cores(w: dict[str, Any], duration: float) -> str:
    text = f"clients {w['client_cpu_s'] / duration:.2f}"
    if "server_cpu_s" in w:
        text += f", servers {w['server_cpu_s'] / duration:.2f}"
    text += " cores busy"
    if w["ops"]:
        text += f" ({w['client_cpu_s'] / w['ops'] * 1e6:.0f} us client CPU per request)"
    other = w.get("other_cpu_s", 0.0) / duration
    if w.get("external_servers"):
        text += f"; the nodes (not started here) and any other processes: {other:.2f} cores"
    elif other >= 0.1:
        text += f"; other processes: {other:.2f} cores (skews the figures)"
    return text


def _disk(w: dict[str, Any], duration: float) -> str:
    """The device writes of a workload, per second and per request ('' if not measured)."""
    if "disk_writes" not in w or not w["ops"]:
        return ""
    text = (f"disk {w['disk_writes'] / duration:,.0f} writes/s, "
            f"{w['disk_bytes'] / duration / 1e6:.1f} MB/s")
    if w["disk_flushes"]:
        text += f", {w['disk_flushes'] / duration:,.0f} cache flushes/s"
    text += f" ({w['disk_bytes'] / w['ops'] / 1024:.1f} KiB written per request"
    if w["disk_flushes"]:
        text += f", {w['disk_flushes'] / w['ops']:.2f} flushes"
    return text + ")"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--address", help="an already running node (default: start one)")
    where.add_argument("--config", help="an already running cluster's config file")
    where.add_argument("--replicas", type=int,
                       help="start a local cluster of --groups groups of this many replicas")
    parser.add_argument("--groups", type=int, default=1,
                        help="groups of the local cluster (with --replicas; default 1)")
    parser.add_argument("--mix", action="append", choices=sorted(MIXES),
                        help="workload(s) to run, in order (default: put, get)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per workload")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight in all")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--driver", choices=["window", "async"], default="window")
    parser.add_argument("--request-timeout", type=float,
                        help="seconds before a request counts as a timeout and its replica "
                             "is avoided for a while (default 5; 1 with --kill-halfway)")
    parser.add_argument("--kill-halfway", metavar="NODE|home|any",
                        help="SIGKILL this replica of the local cluster halfway through each "
                             "workload (home: the first group's replica that is home to most "
                             "keys; any: one at random), restart it --restart-after s later")
    parser.add_argument("--restart-after", type=float, default=3.0,
                        help="seconds between the SIGKILL and the restart (default 3)")
    parser.add_argument("--plot-dir", default=str(RESULTS_DIR),
                        help="where --kill-halfway timelines are plotted (default bench/results)")
    parser.add_argument("--timeline", action="store_true",
                        help="print the per-second table for every workload")
    parser.add_argument("--peer", choices=["etcd"],
                        help="also run the same workloads against a 3-member etcd on loopback")
    parser.add_argument("--peer-only", action="store_true",
                        help="with --peer: measure only the peer (no KVSvr run)")
    parser.add_argument("--rounds", type=int, default=1, metavar="N",
                        help="with --peer: run both systems N times, the order alternating "
                             "(KVSvr first, then etcd first, ...), and judge the target on the "
                             "median of the N same-round ratios: this machine's speed drifts "
                             "by +-20%% within minutes, and one run's ratio moves with it")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--counters", action="store_true",
                        help="print the rate of every node counter that moved (all nodes)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--one-home", type=int, metavar="N", default=None,
                        help="diagnostic, not the comparison workload: draw only keys whose home "
                             "is replica N of a group of --replicas (every write through one "
                             "replica, as etcd sends every write through its leader)")
    args = parser.parse_args(argv)
    if args.one_home is not None and not (args.replicas and 0 <= args.one_home < args.replicas
                                          and args.groups == 1):
        parser.error("--one-home N needs one local group (--replicas R) and 0 <= N < R")
    if args.groups != 1 and args.replicas is None:
        parser.error("--groups needs --replicas (a local cluster)")
    if args.kill_halfway and (args.replicas is None or args.peer_only):
        parser.error("--kill-halfway needs a local cluster: --replicas R")
    if args.peer_only and not args.peer:
        parser.error("--peer-only needs --peer")
    if args.rounds < 1:
        parser.error(f"--rounds: {args.rounds}; expected 1 or more")
    if args.rounds > 1 and (not args.peer or args.peer_only or args.kill_halfway):
        parser.error("--rounds N > 1 compares both systems: it needs --peer, and neither "
                     "--peer-only nor --kill-halfway")
    if args.request_timeout is None:
        args.request_timeout = 1.0 if args.kill_halfway else 5.0
    mixes = args.mix or ["put", "get"]
    results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
                               "cores": os.cpu_count(), "workloads": []}
    homed = None if args.one_home is None else [
        i for i in range(args.keys)
        if home_index(f"key:{i}".encode(), args.replicas) == args.one_home]
    spec = {"value_size": args.value_size, "keys": args.keys, "duration": args.duration,
            "request_timeout": args.request_timeout, "homed": homed}
    run = {"concurrency": args.concurrency, "processes": args.processes}
    kvsvr_driver = _window_driver if args.driver == "window" else _async_driver

    cores = os.cpu_count() or 1
    if args.replicas is not None:
        shape = (f"a local cluster of {args.groups} group(s) of {args.replicas} replica(s) "
                 f"({args.groups * args.replicas} node processes)")
    elif args.config:
        shape = f"the cluster of {args.config}"
    else:
        shape = f"the node at {args.address}" if args.address else "a local single node"
    if args.peer_only:
        shape = f"not run (--peer-only), only {args.peer}"
    print(f"KVSvr load: {shape}; {args.concurrency} requests in flight from {args.processes} "
          f"processes, {args.value_size}-byte values, {args.keys} keys, driver={args.driver}, "
          f"{cores} cores")
    if homed is not None:
        print(f"note: --one-home {args.one_home}: only the {len(homed)} keys homed at replica "
              f"{args.one_home} (a diagnostic of batching, not the comparison workload)")
    if cores <= 2 and (args.replicas or 1) * args.groups + args.processes > cores:
        print(f"note: {cores} cores shared by every node process and the {args.processes} client "
              "processes (and by etcd's members with --peer; the systems run one after the other, "
              "never at once): the figures are what this machine gives, CPU-bound on both sides")

    if args.rounds > 1:
        return run_rounds(args, mixes, spec, run, kvsvr_driver, results)

    if not args.peer_only:
        status = run_kvsvr(args, mixes, spec, run, kvsvr_driver, results)
        if status:
            return status

    if args.peer == "etcd":
        run_etcd(args, mixes, spec, run, results)

    if not args.no_baselines and not args.peer_only:
        echo = f"tcp://127.0.0.1:{free_port()}"
        stop = multiprocessing.get_context("spawn").Event()
        server = multiprocessing.get_context("spawn").Process(target=_echo_server,
                                                              args=(echo, stop))
        server.start()
        try:
            results["zmq_echo"] = drive(echo, driver=_window_driver,
                                        spec={**spec, "read_share": 1.0},
                                        label="raw zeromq echo", **run)
        finally:
            stop.set()
            server.join(timeout=10)
        results["raw_lmdb"] = raw_lmdb(args.value_size, args.concurrency, args.keys)

    report(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"results written to {args.json}")
    return 0


def run_rounds(args: argparse.Namespace, mixes: list[str], spec: dict[str, Any],
               run: dict[str, Any], driver: Callable[..., None], results: dict[str, Any]) -> int:
    """--rounds N: both systems N times, alternating which goes first; each round reported
    in full, then the median ratios (what the target is judged on)."""
    rounds: list[dict[str, Any]] = []
    for number in range(1, args.rounds + 1):
        one: dict[str, Any] = {**results, "workloads": []}
        order = ("kvsvr", "etcd") if number % 2 else ("etcd", "kvsvr")
        print(f"\n=== round {number} of {args.rounds}: {order[0]} first ===")
        for system in order:
            if system == "kvsvr":
                status = run_kvsvr(args, mixes, spec, run, driver, one)
                if status:
                    return status
            else:
                run_etcd(args, mixes, spec, run, one)
        report(args, one)
        rounds.append(one)
        if one.get("peer", {}).get("skipped"):
            break   # no etcd here: nothing to compare, once is enough
    results["rounds"] = rounds
    report_rounds(rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"results written to {args.json}")
    return 0


def round_ratios(one: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Per mix, (KVSvr/etcd throughput, KVSvr/etcd p99) of one round."""
    etcd = {w["mix"]: w for w in one.get("peer", {}).get("workloads", [])}
    ratios = {}
    for k in one["workloads"]:
        e = etcd.get(k["mix"])
        if e and e["ops_per_s"] and e["p99_ms"]:
            ratios[k["mix"]] = (k["ops_per_s"] / e["ops_per_s"], k["p99_ms"] / e["p99_ms"])
    return ratios


def report_rounds(rounds: list[dict[str, Any]]) -> None:
    per_round = [round_ratios(one) for one in rounds]
    mixes = [w["mix"] for w in rounds[0]["workloads"] if w["mix"] in per_round[0]]
    if not mixes:
        return
    print(f"\nKVSvr/etcd over {len(rounds)} rounds (the order alternating; throughput ratio "
          "and p99 ratio of each round, then their medians):")
    for mix in mixes:
        pairs = [r[mix] for r in per_round if mix in r]
        cells = "  ".join(f"{x:4.2f}x/{p:4.2f}x" for x, p in pairs)
        median_x = statistics.median(x for x, _ in pairs)
        median_p = statistics.median(p for _, p in pairs)
        print(f"  {mix:8s} {cells}  | median {median_x:4.2f}x, p99 {median_p:4.2f}x")
    verdicts = []
    for mix, name in (("put", "durable writes"), ("get", "linearizable reads")):
        pairs = [r[mix] for r in per_round if mix in r]
        if pairs:
            median_x = statistics.median(x for x, _ in pairs)
            median_p = statistics.median(p for _, p in pairs)
            met = median_x >= 2.0 and median_p <= 1.0
            verdicts.append(f"{name} {median_x:.2f}x with p99 {median_p:.2f}x etcd's: "
                            f"{'met' if met else 'not met'}")
    if verdicts:
        print("  the target (>= 2x etcd's throughput, p99 no worse), on the medians: "
              + "; ".join(verdicts))


def run_kvsvr(args: argparse.Namespace, mixes: list[str], spec: dict[str, Any],
              run: dict[str, Any], driver: Callable[..., None], results: dict[str, Any]) -> int:
    cluster: LocalCluster | None = None
    work_dir = None
    target = args.address or args.config
    try:
        if target is None:
            work_dir = tempfile.mkdtemp(prefix="kvsvr-bench-", dir=os.getcwd())
            if args.replicas is not None:
                config_path = write_cluster_config(work_dir, groups=args.groups,
                                                   replicas=args.replicas)
                target = str(config_path)
            else:
                config_path = write_single_node_config(work_dir)
            cluster = LocalCluster(config_path, log_dir=Path(work_dir) / "logs")
            try:
                cluster.start()
            except RuntimeError as e:
                print(f"load: the local cluster did not start: {e}", file=sys.stderr)
                for log in sorted((Path(work_dir) / "logs").glob("*.log")):
                    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                    for line in tail:
                        print(f"  {log.name}: {line}", file=sys.stderr)
                return 2
            if target is None:
                target = cluster.address(cluster.nodes[0])
            results["cluster"] = {"groups": args.groups, "replicas": args.replicas or 1,
                                  "nodes": cluster.nodes}
            _preload(target, args.keys, args.value_size)
        addresses = ([target] if is_address(target)
                     else [r.address for g in load(target).groups for r in g.replicas])

        def server_pids() -> list[int]:
            return [p.pid for p in cluster.processes.values()] if cluster else []

        victim = None
        if args.kill_halfway:
            assert cluster is not None and args.replicas is not None
            try:
                victim = _kill_target(args.kill_halfway, target, args.keys)
            except ConfigError as e:
                print(f"load: --kill-halfway: {e}", file=sys.stderr)
                return 2
            if args.replicas < 3:
                print(f"note: killing {victim} of a {args.replicas}-replica group: no majority "
                      "is left, so the group is unavailable until it is back (with 3 replicas "
                      "the other two carry on)")
        for mix in mixes:
            killer = None
            events: list[Event] = []
            if victim is not None and cluster is not None:
                killer = _Killer(cluster, victim, args.duration / 2, args.restart_after)
                events = killer.events()
            before = _counters(addresses) if killer is None else {}
            outcome = drive(target, driver=driver, spec={**spec, "read_share": MIXES[mix]},
                            label=f"kvsvr {mix}", events=events,
                            server_pids=server_pids if cluster else None, **run)
            if killer is not None:
                killer.settle()
                outcome["kill"] = {"node": victim, "at_s": args.duration / 2,
                                   "restart_after_s": args.restart_after,
                                   "marks": sorted(killer.marks)}
                outcome.pop("server_cpu_s", None)  # a killed process's CPU is lost
                outcome.pop("other_cpu_s", None)
            else:
                after = _counters(addresses)
                commits = after.get("group_commits", 0) - before.get("group_commits", 0)
                # a single node counts "mutations"; a replica "applied" (its own and pulled)
                applied = "mutations" if "mutations" in after else "applied"
                if commits:
                    outcome["mutations_per_commit"] = (
                        after.get(applied, 0) - before.get(applied, 0)) / commits
                    outcome["commit_ms"] = (after.get("group_commit_us", 0)
                                            - before.get("group_commit_us", 0)) / commits / 1e3
                syncs = after.get("vote_log_syncs", 0) - before.get("vote_log_syncs", 0)
                if syncs:   # a replica: votes fsynced per round, LMDB committed per checkpoint
                    outcome["vote_syncs_per_s"] = syncs / len(addresses) / args.duration
                    outcome["vote_sync_ms"] = (after.get("vote_log_sync_us", 0)
                                               - before.get("vote_log_sync_us", 0)) / syncs / 1e3
                if args.counters:
                    for name in sorted(after):
                        delta = after[name] - before.get(name, 0)
                        if delta:
                            print(f"  counter {name}: {delta / args.duration:,.1f}/s")
            outcome["mix"] = mix
            if cluster is None:
                outcome["external_servers"] = True
            results["workloads"].append(outcome)
    finally:
        if cluster is not None:
            cluster.stop()
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)
    return 0


def run_etcd(args: argparse.Namespace, mixes: list[str], spec: dict[str, Any],
             run: dict[str, Any], results: dict[str, Any]) -> None:
    import etcd_peer
    reason = etcd_peer.missing()
    if reason:
        print(f"peer etcd: skipped: {reason}")
        results["peer"] = {"system": "etcd", "skipped": reason}
        return
    work_dir = tempfile.mkdtemp(prefix="kvsvr-bench-etcd-", dir=os.getcwd())
    etcd = etcd_peer.EtcdCluster(work_dir, members=3)
    peer: dict[str, Any] = {"system": "etcd", "version": etcd_peer.version(), "members": 3,
                            "quota_backend_bytes": etcd.quota_bytes, "workloads": []}
    results["peer"] = peer
    try:
        try:
            etcd.start()
        except RuntimeError as e:
            print(f"peer etcd: skipped: {e}")
            peer["skipped"] = str(e)
            return
        etcd_peer.preload(etcd.endpoints, args.keys, args.value_size)
        for mix in mixes:
            before = etcd.metrics()
            outcome = drive(etcd.endpoints, driver=etcd_peer.etcd_driver,
                            spec={**spec, "read_share": MIXES[mix]}, label=f"etcd {mix}",
                            server_pids=lambda: etcd.pids, **run)
            after = etcd.metrics()
            outcome["etcd"] = {k: after[k] - before.get(k, 0.0) for k in after}
            outcome["mix"] = mix
            peer["workloads"].append(outcome)
    finally:
        etcd.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


def report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    if not args.peer_only:
        report_kvsvr(args, results)
    peer = results.get("peer")
    if peer and peer.get("workloads"):
        report_peer(args, results, peer)
    elif peer and peer.get("skipped"):
        print(f"\npeer {peer['system']}: skipped: {peer['skipped']}")


def report_kvsvr(args: argparse.Namespace, results: dict[str, Any]) -> None:
    duration = args.duration
    print()
    print(f"{'workload':18s} {'ops/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s} {'p99.9 ms':>9s} "
          f"{'errors':>7s} {'timeouts':>8s}   ratio")
    echo_rate = results.get("zmq_echo", {}).get("ops_per_s")
    lmdb_rates = results.get("raw_lmdb", {})
    for w in results["workloads"] + ([results["zmq_echo"]] if echo_rate else []):
        ratio = ""
        if echo_rate and w is not results.get("zmq_echo"):
            ratio = f"{w['ops_per_s'] / echo_rate:5.2f}x zmq echo"
            mix = w["mix"]
            if mix in ("put", "get") and lmdb_rates:
                ratio += f", {w['ops_per_s'] / lmdb_rates[mix + '_ops_per_s']:5.3f}x raw lmdb {mix}"
        print(f"{w['label']:18s} {_row(w)} {w['errors']:7d} {w['timeouts']:8d}   {ratio}")
    if lmdb_rates:
        print(f"{'raw lmdb put':18s} {lmdb_rates['put_ops_per_s']:10,.0f}   "
              f"(batches of {args.concurrency} per fsynced commit, one process)")
        print(f"{'raw lmdb get':18s} {lmdb_rates['get_ops_per_s']:10,.0f}   (one process)")
    for w in results["workloads"]:
        if "mutations_per_commit" in w:
            kind = "LMDB checkpoint" if "vote_sync_ms" in w else "durable group commit"
            print(f"{w['label']}: {w['mutations_per_commit']:.1f} mutations applied per {kind} "
                  f"(all nodes), {w['commit_ms']:.2f} ms per commit (fsync)")
        if "vote_sync_ms" in w:
            print(f"{w['label']}: {w['vote_syncs_per_s']:,.0f} vote log fdatasyncs/s per node, "
                  f"{w['vote_sync_ms']:.2f} ms each")
    for w in results["workloads"]:
        print(f"{w['label']}: {_cores(w, duration)}"
              + (f"; errors {w['error_kinds']}" if w["error_kinds"] else ""))
        if disk := _disk(w, duration):
            print(f"{w['label']}: {disk}")
        if args.timeline or "kill" in w:
            print_timeline(w)
        else:
            print(f"timeline {w['label']}: {w['timeline']} ops per second")
        if "kill" in w:
            title = (f"KVSvr {w['mix']}: SIGKILL {w['kill']['node']} at "
                     f"{w['kill']['at_s']:g} s, restart {w['kill']['restart_after_s']:g} s later "
                     f"({w['in_flight']} in flight, driver={args.driver})")
            written = plot_timeline(w, title, Path(args.plot_dir) / f"kill-timeline-{w['mix']}")
            w["kill"]["plots"] = written
            print("plot: " + ", ".join(written))


def report_peer(args: argparse.Namespace, results: dict[str, Any], peer: dict[str, Any]) -> None:
    duration = args.duration
    ours = {w["mix"]: w for w in results["workloads"]}
    cluster = results.get("cluster")
    if args.peer_only:
        kvsvr_shape = "not run: --peer-only"
    elif cluster:
        kvsvr_shape = (f"{cluster['groups']} group(s) of {cluster['replicas']} replica(s)")
    elif args.config:
        kvsvr_shape = f"the cluster of {args.config}"
    else:
        kvsvr_shape = "one node" if args.address else "a single node (1 replica)"
    etcd_w = peer["workloads"]
    per_process = f"{args.processes} processes x ~{args.concurrency // args.processes}"
    print()
    print(f"KVSvr ({kvsvr_shape}) vs etcd {peer['version']} ({peer['members']} members on "
          f"loopback, fsync on), {args.value_size}-byte values, {args.keys} keys, "
          f"{duration:g} s per workload")
    print(f"  in flight: KVSvr {args.concurrency} ({per_process}, driver={args.driver}: "
          + ("pipelined on one ZeroMQ socket per replica per process"
             if args.driver == "window" else "concurrent calls through AsyncClient")
          + f"); etcd {args.concurrency} ({per_process} closed-loop aetcd/gRPC workers, "
          "spread over the 3 members)")
    print("  puts: durable writes on both (etcd: Raft majority + fsync); "
          "gets: linearizable reads on both (etcd: Range with serializable=false)")
    if cluster and cluster["replicas"] != 3:
        print(f"  note: KVSvr ran {cluster['replicas']} replica(s) per group, etcd 3 members: "
              "not the like-for-like comparison (that is --replicas 3)")
    if any("kill" in w for w in results["workloads"]):
        print("  note: the KVSvr runs had a replica killed halfway; etcd's did not")
    print(f"{'workload':10s} | {'KVSvr ops/s':>11s} {'p50':>7s} {'p99':>7s} {'p99.9':>7s} | "
          f"{'etcd ops/s':>10s} {'p50':>7s} {'p99':>7s} {'p99.9':>7s} | "
          f"{'ops x':>6s} {'p99 x':>6s}")
    for e in etcd_w:
        k = ours.get(e["mix"])
        def cols(w: dict[str, Any] | None, width: int) -> str:
            if w is None:
                return f"{'-':>{width}s} {'':7s} {'':7s} {'':7s}"
            return (f"{w['ops_per_s']:{width},.0f} {w['p50_ms']:7.2f} {w['p99_ms']:7.2f} "
                    f"{w['p999_ms']:7.2f}")
        ratio = p99_ratio = "-"
        if k and e["ops_per_s"]:
            ratio = f"{k['ops_per_s'] / e['ops_per_s']:5.2f}x"
        if k and e["p99_ms"]:
            p99_ratio = f"{k['p99_ms'] / e['p99_ms']:5.2f}x"
        print(f"{e['mix']:10s} | {cols(k, 11)} | {cols(e, 10)} | {ratio:>6s} {p99_ratio:>6s}")
    print("  (latencies in ms; ops x = KVSvr/etcd throughput, p99 x = KVSvr/etcd p99: "
          "<= 1 is no worse)")
    for e in etcd_w:
        extra = f" {e['error_kinds']}" if e["error_kinds"] else ""
        m = e.get("etcd", {})
        if m.get("wal_fsyncs"):
            extra += (f"; {m['wal_fsyncs'] / peer['members'] / duration:,.0f} WAL fsyncs/s per "
                      f"member ({m['wal_fsync_s'] / m['wal_fsyncs'] * 1e3:.2f} ms each)")
        if "leader_changes" in m:
            extra += f"; {m['leader_changes']:.0f} leader changes"
        print(f"  {e['label']}: {e['errors']} errors, {e['timeouts']} timeouts{extra}")
        print(f"  {'':{len(e['label'])}s}  {_cores(e, duration)}")
        if disk := _disk(e, duration):
            print(f"  {'':{len(e['label'])}s}  {disk}")
    ours_cpu = sum(w["client_cpu_s"] for w in results["workloads"])
    ours_ops = sum(w["ops"] for w in results["workloads"])
    etcd_cpu = sum(w["client_cpu_s"] for w in etcd_w)
    etcd_ops = sum(w["ops"] for w in etcd_w)
    if ours_ops and etcd_ops:
        print(f"  client CPU per request: KVSvr {ours_cpu / ours_ops * 1e6:.0f} us, etcd "
              f"{etcd_cpu / etcd_ops * 1e6:.0f} us (aetcd over gRPC); each side's clients share "
              f"the {os.cpu_count()} cores with its own servers, so a costlier client also "
              "slows its servers")
    verdicts = []
    for mix, name in (("put", "durable writes"), ("get", "linearizable reads")):
        k = ours.get(mix)
        e = next((w for w in etcd_w if w["mix"] == mix), None)
        if k and e and e["ops_per_s"] and e["p99_ms"]:
            x = k["ops_per_s"] / e["ops_per_s"]
            met = x >= 2.0 and k["p99_ms"] <= e["p99_ms"]
            verdicts.append(f"{name} {x:.2f}x with p99 {k['p99_ms']:.2f} vs "
                            f"{e['p99_ms']:.2f} ms: {'met' if met else 'not met'}")
    if verdicts:
        print("  the target (>= 2x etcd's throughput, p99 no worse), measured here: "
              + "; ".join(verdicts))


if __name__ == "__main__":
    sys.exit(main())
