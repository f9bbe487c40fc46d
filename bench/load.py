"""End-to-end load generator for KVSvr, with same-run baselines.

    python bench/load.py                       # puts then gets against a fresh local node
    python bench/load.py --mix ycsb-a --duration 20 --processes 4 --concurrency 32
    python bench/load.py --address tcp://127.0.0.1:7400 --mix get --no-baselines

It starts its own node (fsync on) unless --address is given, drives it from several client
processes holding `--concurrency` requests in flight in all, and prints ops/s and latency
percentiles. Beside them it measures, in the same run and with the same driver and
concurrency: a raw ZeroMQ echo server (the transport's ceiling) and raw LMDB doing the same
puts (same batch size, fsync on) and gets in one process (the storage's ceiling).

Drivers: `window` (default) keeps requests in flight with the wire protocol and no per-call
objects, measuring the node; `async` uses kvsvr.AsyncClient, measuring node + client library.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lmdb
import zmq
from tqdm import tqdm

from kvsvr import _core, calls, protocol
from kvsvr.aio import AsyncClient
from kvsvr.client import Client
from kvsvr.errors import KvError, NotFound
from kvsvr.launcher import LocalCluster, free_port, write_single_node_config

MIXES = {"put": 0.0, "get": 1.0, "ycsb-a": 0.5, "ycsb-b": 0.95}  # share of reads
WARMUP_S = 0.5


def _percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    if not ordered:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "p999_ms": 0.0}

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3
    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "p999_ms": at(0.999)}


# --- drivers (one per client process) ------------------------------------------------------
def _window_driver(address: str, read_share: float, value_size: int, window: int,
                   duration: float, keys: int, seed: int, out: Any, ready: Any) -> None:
    """Keep `window` requests in flight on one socket; report completions and latencies."""
    rng = random.Random(seed)
    value = b"v" * value_size
    client_id = secrets.randbits(62) | 1
    seq = 0
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    in_flight: dict[int, float] = {}
    next_id = 1
    latencies: list[float] = []
    per_second: dict[int, int] = {}
    errors = 0
    encode, encode_frame = protocol.encode, _core.encode_frame
    ready.wait()
    started = time.perf_counter()
    measure_from = started + WARMUP_S
    end = measure_from + duration
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        frames = []
        while len(in_flight) < window:
            key = f"key:{rng.randrange(keys)}".encode()
            if rng.random() < read_share:
                frame = encode_frame(1, protocol.Method.GET, next_id, 5000,
                                     encode(protocol.GetRequest(key)))
            else:
                seq += 1
                frame = encode_frame(1, protocol.Method.MUTATE, next_id, 5000, encode(
                    protocol.MutateRequest(key, [protocol.Op(_core.OP_PUT, b"", value)], None,
                                           client_id, seq)))
            frames.append(frame)
            in_flight[next_id] = now
            next_id += 1
        if frames:
            socket.send(b"".join(frames))
        if not socket.poll(1000):
            continue
        while True:
            try:
                payload = socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            done = time.perf_counter()
            for kind, status, request_id, _budget, _body in _core.decode_frames(payload)[0]:
                sent = in_flight.pop(request_id, None)
                if sent is None:
                    continue
                # NotFound is an answer; the echo baseline returns our requests unchanged.
                if kind == _core.FRAME_RESPONSE and status not in (0, NotFound.code):
                    errors += 1
                if done >= measure_from:
                    latencies.append(done - sent)
                    second = int(done - measure_from)
                    per_second[second] = per_second.get(second, 0) + 1
    socket.close()
    context.term()
    out.put({"latencies": latencies, "per_second": per_second, "errors": errors})


def _async_driver(address: str, read_share: float, value_size: int, window: int,
                  duration: float, keys: int, seed: int, out: Any, ready: Any) -> None:
    async def run() -> dict[str, Any]:
        rng = random.Random(seed)
        value = b"v" * value_size
        latencies: list[float] = []
        per_second: dict[int, int] = {}
        errors = 0
        async with AsyncClient(address=address, timeout=10.0) as client:
            await client.ping()
            ready.wait()
            measure_from = time.perf_counter() + WARMUP_S
            end = measure_from + duration

            async def worker() -> None:
                nonlocal errors
                while True:
                    key = f"key:{rng.randrange(keys)}"
                    sent = time.perf_counter()
                    if sent >= end:
                        return
                    try:
                        if rng.random() < read_share:
                            await client.get(key)
                        else:
                            await client.put(key, value)
                    except NotFound:
                        pass
                    except KvError:
                        errors += 1
                    done = time.perf_counter()
                    if done >= measure_from:
                        latencies.append(done - sent)
                        second = int(done - measure_from)
                        per_second[second] = per_second.get(second, 0) + 1

            await asyncio.gather(*(worker() for _ in range(window)))
        return {"latencies": latencies, "per_second": per_second, "errors": errors}

    out.put(asyncio.run(run()))


def drive(address: str, *, read_share: float, value_size: int, concurrency: int,
          processes: int, duration: float, keys: int, driver: str, label: str,
          show_progress: bool = True) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    ready = context.Event()
    target = _window_driver if driver == "window" else _async_driver
    windows = [concurrency // processes + (1 if i < concurrency % processes else 0)
               for i in range(processes)]
    workers = [context.Process(target=target, args=(address, read_share, value_size, w,
                                                     duration, keys, 1000 + i, out, ready))
               for i, w in enumerate(windows) if w > 0]
    for w in workers:
        w.start()
    time.sleep(0.5)
    ready.set()
    with tqdm(total=round(duration + WARMUP_S, 1), desc=f"{label:28s}", unit="s",
              disable=not show_progress, bar_format="{desc} {bar} {n:.0f}/{total:.0f} s") as bar:
        started = time.monotonic()
        while any(w.is_alive() for w in workers) and out.qsize() < len(workers):
            time.sleep(0.25)
            bar.n = min(bar.total, time.monotonic() - started)
            bar.refresh()
    results = [out.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    latencies = [x for r in results for x in r["latencies"]]
    timeline: dict[int, int] = {}
    for r in results:
        for second, count in r["per_second"].items():
            timeline[int(second)] = timeline.get(int(second), 0) + count
    return {"label": label, "ops": len(latencies), "ops_per_s": len(latencies) / duration,
            "errors": sum(r["errors"] for r in results),
            "timeline": [timeline.get(s, 0) for s in range(int(duration))],
            **_percentiles(latencies)}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="an already running node (default: start one)")
    parser.add_argument("--mix", action="append", choices=sorted(MIXES),
                        help="workload(s) to run, in order (default: put, get)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per workload")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight in all")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--driver", choices=["window", "async"], default="window")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    mixes = args.mix or ["put", "get"]
    results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
                               "workloads": []}
    run = dict(value_size=args.value_size, concurrency=args.concurrency,
               processes=args.processes, duration=args.duration, keys=args.keys,
               driver=args.driver)

    print(f"KVSvr load: {args.concurrency} requests in flight from {args.processes} processes, "
          f"{args.value_size}-byte values, {args.keys} keys, driver={args.driver}, "
          f"{os.cpu_count()} cores")
    cluster = None
    work_dir = None
    address = args.address
    if address is None:
        work_dir = tempfile.mkdtemp(prefix="kvsvr-bench-", dir=os.getcwd())
        cluster = LocalCluster(write_single_node_config(work_dir), log_dir=Path(work_dir) / "logs")
        cluster.start()
        address = cluster.address("n1")
        with Client(address=address, timeout=30.0) as client:  # load every key once
            pipeline = client.pipeline()
            for i in range(args.keys):
                pipeline._run(calls.put(f"key:{i}", b"v" * args.value_size, None,
                                        client._op_id()))
                if len(pipeline) == 1000:
                    pipeline.execute(raise_errors=True)
            pipeline.execute(raise_errors=True)
    def counters() -> dict[str, int]:
        with Client(address=address) as client:
            return dict(client.status()["counters"])

    try:
        for mix in mixes:
            before = counters()
            outcome = drive(address, read_share=MIXES[mix], label=f"kvsvr {mix}", **run)
            after = counters()
            commits = after.get("group_commits", 0) - before.get("group_commits", 0)
            if commits:
                outcome["mutations_per_commit"] = (
                    after.get("mutations", 0) - before.get("mutations", 0)) / commits
                outcome["commit_ms"] = (after.get("group_commit_us", 0)
                                        - before.get("group_commit_us", 0)) / commits / 1e3
            results["workloads"].append(outcome)
    finally:
        if cluster is not None:
            cluster.stop()
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)

    if not args.no_baselines:
        echo = f"tcp://127.0.0.1:{free_port()}"
        stop = multiprocessing.get_context("spawn").Event()
        server = multiprocessing.get_context("spawn").Process(target=_echo_server,
                                                              args=(echo, stop))
        server.start()
        try:
            results["zmq_echo"] = drive(echo, read_share=1.0, label="raw zeromq echo", **run)
        finally:
            stop.set()
            server.join(timeout=10)
        results["raw_lmdb"] = raw_lmdb(args.value_size, args.concurrency, args.keys)

    print()
    print(f"{'workload':18s} {'ops/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s} {'p99.9 ms':>9s} "
          f"{'errors':>7s}   ratio")
    echo_rate = results.get("zmq_echo", {}).get("ops_per_s")
    lmdb_rates = results.get("raw_lmdb", {})
    for w in results["workloads"] + ([results["zmq_echo"]] if echo_rate else []):
        ratio = ""
        if echo_rate and w is not results.get("zmq_echo"):
            ratio = f"{w['ops_per_s'] / echo_rate:5.2f}x zmq echo"
            mix = w["label"].split()[-1]
            if mix in ("put", "get") and lmdb_rates:
                ratio += f", {w['ops_per_s'] / lmdb_rates[mix + '_ops_per_s']:5.3f}x raw lmdb {mix}"
        print(f"{w['label']:18s} {w['ops_per_s']:10,.0f} {w['p50_ms']:8.2f} {w['p99_ms']:8.2f} "
              f"{w['p999_ms']:9.2f} {w['errors']:7d}   {ratio}")
    if lmdb_rates:
        print(f"{'raw lmdb put':18s} {lmdb_rates['put_ops_per_s']:10,.0f}   "
              f"(batches of {args.concurrency} per fsynced commit, one process)")
        print(f"{'raw lmdb get':18s} {lmdb_rates['get_ops_per_s']:10,.0f}   (one process)")
    for w in results["workloads"]:
        if "mutations_per_commit" in w:
            print(f"{w['label']}: {w['mutations_per_commit']:.1f} mutations per durable "
                  f"group commit on the node, {w['commit_ms']:.2f} ms per commit "
                  "(apply + fsync)")
    for w in results["workloads"]:
        print(f"timeline {w['label']}: {w['timeline']} ops per second")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
