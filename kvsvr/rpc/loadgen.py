"""An open-loop load generator for a service: calls arrive on a Poisson schedule whatever
the service's answers (a closed loop would slow down with the service and hide its
overload), each from its own task, with a business priority drawn per call and a user id
drawn from a population. Used by the overload tests and `tools/bench-rpc`.

    python -m kvsvr.rpc.loadgen --config C --rate 1500 --duration 8 --cpu-us 2000 \\
        --high-share 0.2 --skip 3

prints one JSON object: per business class, the calls, the successes within their deadline,
Overloaded, Timeout and other errors, and latency percentiles of the successes, for the calls
started after `--skip` seconds (the level has settled by then).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from typing import Any

from kvsvr.errors import KvError, Timeout
from kvsvr.rpc.context import priority_var
from kvsvr.rpc.errors import Overloaded
from kvsvr.rpc.examples import WorkRequest, burn
from kvsvr.rpc.stub import AsyncStub

HIGH_BUSINESS = 1       # the important entry method's business priority in these runs
LOW_BUSINESS = 40       # the rest
USERS = 10_000          # the population the user ids are drawn from


class ClassStats:
    def __init__(self) -> None:
        self.calls = 0
        self.ok = 0
        self.overloaded = 0
        self.timeout = 0
        self.other = 0
        self.latencies: list[float] = []

    def summary(self) -> dict[str, Any]:
        latencies = sorted(self.latencies)

        def percentile(q: float) -> float | None:
            return (round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 2)
                    if latencies else None)
        return {"calls": self.calls, "ok": self.ok, "overloaded": self.overloaded,
                "timeout": self.timeout, "other": self.other,
                "success": round(self.ok / self.calls, 4) if self.calls else None,
                "p50_ms": percentile(0.5), "p99_ms": percentile(0.99)}


async def _one(stub: AsyncStub, request: WorkRequest, business: int, user: int,
               timeout: float, stats: ClassStats | None) -> None:
    from kvsvr.rpc.admission import user_priority

    # An entry call of that business priority, as if a handler of that method made it.
    priority_var.set((business, user_priority(user, time.time())))
    start = time.monotonic()
    try:
        await stub.work(request, timeout=timeout)
        elapsed = time.monotonic() - start
        if stats is not None:
            if elapsed <= timeout:
                stats.ok += 1
                stats.latencies.append(elapsed)
            else:
                stats.timeout += 1
    except Overloaded:
        if stats is not None:
            stats.overloaded += 1
    except Timeout:
        if stats is not None:
            stats.timeout += 1
    except KvError:
        if stats is not None:
            stats.other += 1


async def run(config: str, *, rate: float, duration: float, cpu_us: int, high_share: float,
              timeout: float, skip: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    stats = {"high": ClassStats(), "low": ClassStats()}
    tasks: set[asyncio.Task[None]] = set()
    async with AsyncStub(burn, config, follow_shield=False, attempt_timeout=timeout) as stub:
        start = time.monotonic()
        next_at = start
        request = WorkRequest(cpu_us=cpu_us)
        while True:
            next_at += rng.expovariate(rate)
            if next_at - start >= duration:
                break
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            high = rng.random() < high_share
            counted = stats["high" if high else "low"] if next_at - start >= skip else None
            if counted is not None:
                counted.calls += 1
            task = asyncio.get_running_loop().create_task(_one(
                stub, request, HIGH_BUSINESS if high else LOW_BUSINESS,
                rng.randrange(USERS), timeout, counted))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)
    measured = duration - skip
    result: dict[str, Any] = {name: value.summary() for name, value in stats.items()}
    result["goodput_per_s"] = round(
        (stats["high"].ok + stats["low"].ok) / measured, 1) if measured > 0 else None
    everything = ClassStats()
    everything.latencies = stats["high"].latencies + stats["low"].latencies
    everything.calls = 1
    result["p99_ms"] = everything.summary()["p99_ms"]   # of the calls that succeeded
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvsvr.rpc.loadgen",
                                     description="Open-loop load on the burn service.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--rate", type=float, required=True, help="calls per second")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--cpu-us", type=int, default=2000, help="CPU per call (µs)")
    parser.add_argument("--high-share", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=1.0, help="each call's deadline")
    parser.add_argument("--skip", type=float, default=3.0, help="seconds not counted")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.config, rate=args.rate, duration=args.duration,
                             cpu_us=args.cpu_us, high_share=args.high_share,
                             timeout=args.timeout, skip=args.skip, seed=args.seed))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
