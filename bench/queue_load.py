"""Load generator for the quorum queue, with NATS JetStream as the peer system.

    python bench/queue_load.py                        # 1 queue group, then NATS if installed
    python bench/queue_load.py --producers 4 --batch 100 --in-flight 16 --duration 10
    python bench/queue_load.py --no-peer --json

It starts a local queue group of 3 servers on loopback (fdatasync on), creates a topic, and
runs `--producers` producer processes for `--duration` seconds, each with `--in-flight`
batches of `--batch` 100-byte messages outstanding (AsyncProducer). Figures: acknowledged
messages/s (a message counts when its batch has 2 fdatasynced acknowledgements) and p50/p99
acknowledgement latency (every message of a batch has its batch's latency). Then one consumer
(a consumer group, committing offsets) drains everything produced: consume messages/s.

Same-run baselines: raw fdatasyncs/s on the same disk (one appending file, one writer: what
one group commit costs) and, when `nats-server` is on PATH and nats-py is importable (tools/
bench-queue installs both), a 3-node JetStream cluster on loopback with a replicas=3 file
stream, driven by the same number of processes with `--nats-in-flight` publishes in flight
in all (each publish awaits its PubAck), then drained by a durable pull consumer (AckAll,
fetches of 1,000). JetStream acknowledges before fsync by default (sync_interval 2 min);
quorumq acknowledges after fdatasync on 2 servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from measure import percentiles

from kvsvr.launcher import free_port
from quorumq import AsyncProducer, Consumer
from quorumq.launcher import LocalQueueCluster, write_queue_config

MESSAGE = b"m" * 100
TOPIC = "bench"


# --- quorumq ----------------------------------------------------------------------------------
def _produce_worker(config: str, batch: int, in_flight: int, start: float, duration: float,
                    results: Any) -> None:
    async def run() -> tuple[int, list[float]]:
        latencies: list[float] = []
        acked = 0
        async with AsyncProducer(config, TOPIC, max_in_flight=in_flight) as producer:
            while time.time() < start:
                await asyncio.sleep(0.001)
            end = start + duration
            messages = [MESSAGE] * batch

            # `in_flight` loops each awaiting its batch, as the JetStream publishers do: a
            # batch's latency_s runs from its submit call, which never waits for a slot here.
            async def publisher() -> None:
                nonlocal acked
                while time.time() < end:
                    committed = await (await producer.submit(messages))
                    if time.time() < end:
                        acked += committed.count
                        latencies.extend([committed.latency_s] * committed.count)

            await asyncio.gather(*(publisher() for _ in range(in_flight)))
            await producer.flush()
        return acked, latencies

    acked, latencies = asyncio.run(run())
    results.put((acked, latencies[::10]))   # a tenth of the latencies is plenty for p99


def run_quorumq(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    config = write_queue_config(directory, ack_deadline_ms=5000)
    cluster = LocalQueueCluster(config, log_dir=directory / "logs")
    cluster.start()
    try:
        cluster.create_topic(TOPIC)
        results: Any = multiprocessing.Queue()
        start = time.time() + 2.0
        workers = [multiprocessing.Process(target=_produce_worker, args=(
            str(config), args.batch, args.in_flight, start, args.duration, results))
            for _ in range(args.producers)]
        for w in workers:
            w.start()
        outcomes = [results.get() for _ in workers]
        for w in workers:
            w.join()
        acked = sum(o[0] for o in outcomes)
        latencies = [x for o in outcomes for x in o[1]]
        produced = cluster.status("q1a")["topics"][TOPIC]["end_offset"]   # type: ignore[index]
        consumed = 0
        began = time.perf_counter()
        with Consumer(config, TOPIC, "bench", fetch_bytes=4 << 20) as consumer:
            while consumed < produced * 0.999 and time.perf_counter() - began < 120:
                batch = consumer.poll(0.5)
                consumed += len(batch)
                consumer.commit()
        elapsed = time.perf_counter() - began
        syncs = cluster.status("q1a")["counters"]
        return {"system": "quorumq", "acked_per_s": acked / args.duration,
                **percentiles(latencies), "consumed": consumed,
                "consume_per_s": consumed / elapsed, "server_counters": syncs}
    finally:
        cluster.stop()


def raw_fdatasync_rate(directory: Path, seconds: float = 2.0) -> float:
    """fdatasyncs/s of one file appended 100 records at a time (what a round costs)."""
    path = directory / "fdatasync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    count = 0
    end = time.perf_counter() + seconds
    try:
        while time.perf_counter() < end:
            os.write(fd, b"x" * 14_800)
            os.fdatasync(fd)
            count += 1
    finally:
        os.close(fd)
        path.unlink()
    return count / seconds


# --- NATS JetStream -----------------------------------------------------------------------------
def start_nats(directory: Path) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    directory.mkdir(parents=True, exist_ok=True)
    clients = [free_port() for _ in range(3)]
    routes = [free_port() for _ in range(3)]
    processes = []
    for i in range(3):
        conf = directory / f"nats{i}.conf"
        route_list = ", ".join(f"nats-route://127.0.0.1:{routes[j]}" for j in range(3) if j != i)
        conf.write_text(f"""
port: {clients[i]}
host: 127.0.0.1
server_name: n{i}
jetstream {{ store_dir: "{directory}/js{i}" }}
cluster {{ name: bench, listen: 127.0.0.1:{routes[i]}, routes: [{route_list}] }}
""")
        log = open(directory / f"nats{i}.log", "ab")  # noqa: SIM115
        processes.append(subprocess.Popen(["nats-server", "-c", str(conf)], stdout=log,
                                          stderr=log))
        log.close()
    return processes, [f"nats://127.0.0.1:{p}" for p in clients]


async def _nats_connect(servers: list[str]) -> Any:
    import nats

    async def quiet(_error: Exception) -> None:   # connection refused while it starts
        return None

    return await nats.connect(servers=servers, max_reconnect_attempts=-1, error_cb=quiet)


def _nats_worker(servers: list[str], in_flight: int, start: float, duration: float,
                 results: Any) -> None:
    async def run() -> tuple[int, list[float]]:
        nc = await _nats_connect(servers)
        js = nc.jetstream()
        latencies: list[float] = []
        acked = 0
        end = start + duration
        while time.time() < start:
            await asyncio.sleep(0.001)

        async def publisher() -> None:
            nonlocal acked
            while time.time() < end:
                sent = time.perf_counter()
                await js.publish("bench", MESSAGE)
                if time.time() < end:
                    acked += 1
                    latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(publisher() for _ in range(in_flight)))
        await nc.close()
        return acked, latencies

    acked, latencies = asyncio.run(run())
    results.put((acked, latencies[::10]))


def run_nats(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    processes, servers = start_nats(directory)
    try:
        async def setup() -> None:
            deadline = time.monotonic() + 30
            while True:
                try:
                    nc = await _nats_connect(servers)
                    js = nc.jetstream()
                    await js.add_stream(name="BENCH", subjects=["bench"], num_replicas=3,
                                        storage="file")
                    await nc.close()
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)

        asyncio.run(setup())
        results: Any = multiprocessing.Queue()
        start = time.time() + 2.0
        per_process = max(1, args.nats_in_flight // args.producers)
        workers = [multiprocessing.Process(target=_nats_worker, args=(
            servers, per_process, start, args.duration, results))
            for _ in range(args.producers)]
        for w in workers:
            w.start()
        outcomes = [results.get() for _ in workers]
        for w in workers:
            w.join()
        acked = sum(o[0] for o in outcomes)
        latencies = [x for o in outcomes for x in o[1]]

        async def drain() -> tuple[int, float]:
            from nats.js.api import AckPolicy, ConsumerConfig

            nc = await _nats_connect(servers)
            js = nc.jetstream()
            info = await js.stream_info("BENCH")
            total = info.state.messages
            sub = await js.pull_subscribe("bench", durable="drain",
                                          config=ConsumerConfig(ack_policy=AckPolicy.ALL))
            consumed = 0
            began = time.perf_counter()
            while consumed < total * 0.999 and time.perf_counter() - began < 120:
                try:
                    msgs = await sub.fetch(1000, timeout=2)
                except Exception:
                    continue
                consumed += len(msgs)
                await msgs[-1].ack()
            elapsed = time.perf_counter() - began
            await nc.close()
            return consumed, elapsed

        consumed, elapsed = asyncio.run(drain())
        return {"system": "nats", "acked_per_s": acked / args.duration,
                **percentiles(latencies), "consumed": consumed,
                "consume_per_s": consumed / elapsed}
    finally:
        for p in processes:
            p.send_signal(signal.SIGTERM)
        for p in processes:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def nats_available() -> str | None:
    """Why the NATS comparison cannot run, or None."""
    if shutil.which("nats-server") is None:
        return "nats-server is not on PATH (bash tools/bench-queue installs it)"
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py is not installed (bash tools/bench-queue installs it)"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--producers", type=int, default=4, help="producer processes")
    parser.add_argument("--batch", type=int, default=200, help="messages per batch")
    parser.add_argument("--in-flight", type=int, default=4, help="batches per producer")
    parser.add_argument("--nats-in-flight", type=int, default=256,
                        help="NATS publishes in flight, over all processes")
    parser.add_argument("--no-peer", action="store_true", help="skip NATS")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dir", help="where to put data (default: a temporary directory)")
    args = parser.parse_args()
    directory = Path(args.dir or tempfile.mkdtemp(prefix="quorumq-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"config": vars(args),
                              "raw_fdatasync_per_s": raw_fdatasync_rate(directory)}
    try:
        report["quorumq"] = run_quorumq(args, directory / "quorumq")
        why_not = None if not args.no_peer else "--no-peer"
        why_not = why_not or nats_available()
        if why_not is None:
            report["nats"] = run_nats(args, directory / "nats")
        else:
            report["nats_skipped"] = why_not
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    q = report["quorumq"]
    print(f"same-run baseline: raw fdatasync {report['raw_fdatasync_per_s']:,.0f}/s on this disk")
    print(f"{args.producers} producer processes, batches of {args.batch} x 100-byte messages, "
          f"{args.in_flight} batches in flight each; {args.duration:.0f} s")
    header = f"{'system':<10}{'acked msg/s':>14}{'p50 ms':>9}{'p99 ms':>9}{'consume msg/s':>16}"
    print(header)
    for row in [q] + ([report["nats"]] if "nats" in report else []):
        print(f"{row['system']:<10}{row['acked_per_s']:>14,.0f}{row['p50_ms']:>9.2f}"
              f"{row['p99_ms']:>9.2f}{row['consume_per_s']:>16,.0f}")
    if "nats" in report:
        n = report["nats"]
        print(f"quorumq / NATS: acked throughput {q['acked_per_s'] / n['acked_per_s']:.2f}x, "
              f"p99 {q['p99_ms'] / n['p99_ms']:.2f}x, consume "
              f"{q['consume_per_s'] / n['consume_per_s']:.2f}x "
              f"(NATS with {args.nats_in_flight} publishes in flight; it acknowledges before "
              "fsync, quorumq after fdatasync on 2 servers)")
    else:
        print(f"(NATS comparison skipped: {report['nats_skipped']})")
    counters = q["server_counters"]
    if counters.get("syncs"):
        print(f"server q1a: {counters.get('messages', 0) / counters['syncs']:.0f} messages per "
              f"fdatasync, mean fdatasync {counters['sync_us'] / counters['syncs'] / 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
