"""Unary echo through Svrkit beside raw pyzmq and grpcio's asyncio stack, in the same run.

    python bench/rpc_echo.py                          # 3 rounds of 3 s each, 1 and 256 in flight
    python bench/rpc_echo.py --rounds 5 --seconds 5 --in-flight 1 64 256 --json

Three servers, each its own process on loopback: a `kvsvr-service` instance of the echo
service (kvsvr.rpc.examples:echo), a raw pyzmq ROUTER that sends every message back (the
floor: no frame decoding, no typed body, no coroutine per call), and a grpcio asyncio server
with one generic unary method whose bodies are the same msgspec struct (so both typed stacks
encode and decode the same thing). Each measurement is a client process of its own keeping
N calls in flight for the round's seconds (N coroutines each awaiting one call after
another); rounds alternate the systems, so a noisy moment costs all three alike. Figures:
calls/s and p50/p99 latency per system and in-flight level, the median over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import percentiles

GRPC_METHOD = "/bench.Echo/Say"


def free_port() -> int:
    from kvsvr.launcher import free_port as kvsvr_free_port

    return kvsvr_free_port()


# --- servers ------------------------------------------------------------------------------
def serve_raw(port: int) -> None:
    import zmq

    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.bind(f"tcp://127.0.0.1:{port}")
    while True:
        socket.send_multipart(socket.recv_multipart())


def serve_grpc(port: int) -> None:
    import grpc

    from kvsvr.rpc.examples import SayReply, SayRequest

    decode = msgspec.msgpack.Decoder(SayRequest).decode
    encode = msgspec.msgpack.encode

    async def say(request: SayRequest, _context: Any) -> SayReply:
        return SayReply(request.text)

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(
            say, request_deserializer=decode, response_serializer=encode)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("bench.Echo", {"Say": handler}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


# --- clients ------------------------------------------------------------------------------
async def drive(call: Any, in_flight: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    end = time.monotonic() + seconds

    async def worker() -> None:
        while True:
            start = time.monotonic()
            if start >= end:
                return
            await call()
            latencies.append(time.monotonic() - start)

    begin = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.monotonic() - begin
    return {"calls_per_s": len(latencies) / elapsed, **percentiles(latencies)}


async def client_kvsvr(config: str, in_flight: int, seconds: float) -> dict[str, Any]:
    from kvsvr.rpc import AsyncStub
    from kvsvr.rpc.examples import SayRequest, echo

    async with AsyncStub(echo, config, follow_shield=False) as stub:
        request = SayRequest("hello")
        for _ in range(100):
            await stub.say(request)
        return await drive(lambda: stub.say(request), in_flight, seconds)


async def client_raw(address: str, in_flight: int, seconds: float) -> dict[str, Any]:
    import zmq
    import zmq.asyncio

    from kvsvr.rpc.examples import SayRequest

    context = zmq.asyncio.Context()
    socket = context.socket(zmq.DEALER)
    socket.connect(address)
    pending: dict[int, asyncio.Future[bytes]] = {}
    body = msgspec.msgpack.encode(SayRequest("hello"))
    next_id = [0]

    async def reader() -> None:
        while True:
            message = await socket.recv()
            future = pending.pop(int.from_bytes(message[:8], "little"), None)
            if future is not None:
                future.set_result(message)

    task = asyncio.get_running_loop().create_task(reader())

    async def call() -> None:
        next_id[0] += 1
        request_id = next_id[0]
        future = asyncio.get_running_loop().create_future()
        pending[request_id] = future
        await socket.send(request_id.to_bytes(8, "little") + body)
        await future

    for _ in range(100):
        await call()
    result = await drive(call, in_flight, seconds)
    task.cancel()
    socket.close(0)
    context.term()
    return result


async def client_grpc(address: str, in_flight: int, seconds: float) -> dict[str, Any]:
    import grpc

    from kvsvr.rpc.examples import SayReply, SayRequest

    async with grpc.aio.insecure_channel(address) as channel:
        say = channel.unary_unary(GRPC_METHOD, request_serializer=msgspec.msgpack.encode,
                                  response_deserializer=msgspec.msgpack.Decoder(SayReply)
                                  .decode)
        request = SayRequest("hello")
        for _ in range(100):
            await say(request)
        return await drive(lambda: say(request), in_flight, seconds)


# --- the run ------------------------------------------------------------------------------
def start(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, *args], **kwargs)


def measure(system: str, target: str, in_flight: int, seconds: float) -> dict[str, Any]:
    run = subprocess.run([sys.executable, __file__, "--client", system, target,
                          str(in_flight), str(seconds)], capture_output=True, text=True,
                         timeout=seconds + 120)
    if run.returncode != 0:
        raise RuntimeError(f"{system} client failed: {run.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(run.stdout)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--client", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--server", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.server:
        {"raw": serve_raw, "grpc": serve_grpc}[args.server[0]](int(args.server[1]))
        return 0
    if args.client:
        system, target, in_flight, seconds = args.client
        client = {"kvsvr": client_kvsvr, "raw": client_raw, "grpc": client_grpc}[system]
        print(json.dumps(asyncio.run(client(target, int(in_flight), float(seconds)))))
        return 0
    from kvsvr.launcher import write_single_node_config
    from kvsvr.rpc.launcher import ServiceInstances, add_services, wait_serving

    directory = Path(tempfile.mkdtemp(prefix="bench-rpc-"))
    config = add_services(write_single_node_config(directory), {"echo": ["a"]})
    instances = ServiceInstances(config, log_dir=directory / "logs")
    instances.add("kvsvr.rpc.examples:echo", "echo")
    raw_port, grpc_port = free_port(), free_port()
    servers = [start(["--server", "raw", str(raw_port)]),
               start(["--server", "grpc", str(grpc_port)])]
    targets = {"kvsvr": str(config), "raw": f"tcp://127.0.0.1:{raw_port}",
               "grpc": f"127.0.0.1:{grpc_port}"}
    results: dict[str, dict[int, list[dict[str, Any]]]] = {s: {} for s in targets}
    try:
        instances.start()
        wait_serving(f"tcp://127.0.0.1:{raw_port}")
        time.sleep(1.0)   # the grpc server's start
        for round_index in range(args.rounds):
            for in_flight in args.in_flight:
                for system, target in targets.items():
                    figures = measure(system, target, in_flight, args.seconds)
                    results[system].setdefault(in_flight, []).append(figures)
                    if not args.json:
                        print(f"round {round_index + 1} {system:>5} in flight {in_flight:>4}: "
                              f"{figures['calls_per_s']:>9.0f} calls/s  p50 "
                              f"{figures['p50_ms']:.3f} ms  p99 {figures['p99_ms']:.3f} ms",
                              flush=True)
    finally:
        instances.stop()
        for server in servers:
            server.kill()
            server.wait()
    summary = {system: {str(n): {key: statistics.median(r[key] for r in rounds)
                                 for key in ("calls_per_s", "p50_ms", "p99_ms")}
                        for n, rounds in by_level.items()}
               for system, by_level in results.items()}
    summary["cpu_count"] = os.cpu_count()   # type: ignore[assignment]
    if args.json:
        print(json.dumps(summary))
    else:
        print("\nmedian over rounds:")
        for in_flight in args.in_flight:
            for system in targets:
                f = summary[system][str(in_flight)]
                print(f"  {system:>5} in flight {in_flight:>4}: {f['calls_per_s']:>9.0f} calls/s"
                      f"  p50 {f['p50_ms']:.3f} ms  p99 {f['p99_ms']:.3f} ms")
            ours, grpc = summary["kvsvr"][str(in_flight)], summary["grpc"][str(in_flight)]
            print(f"  kvsvr/grpc-aio at {in_flight} in flight: "
                  f"{ours['calls_per_s'] / grpc['calls_per_s']:.2f}x calls/s, p99 "
                  f"{ours['p99_ms']:.3f} vs {grpc['p99_ms']:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
