"""Worker processes for the queue fault tests: `python -m tests.queue_workers produce|consume`.

`produce` appends "producer_id first_seq count group t" to its output for every batch once it
committed (the acknowledged set); `consume` appends "producer_id seq group" for every message
delivered (plain at-least-once), or, with --kvsvr, applies each through ExactlyOnce as an
`append` of the seq to key eo:PRODUCER on a real KVSvr node.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

from quorumq import AsyncProducer, Committed, Consumer, ExactlyOnce


async def produce(args: argparse.Namespace) -> None:
    out = open(args.out, "a", buffering=1)   # noqa: SIM115 (lives as long as the process)
    async with AsyncProducer(args.config, args.topic, max_in_flight=args.in_flight,
                             first_group=args.first_group) as producer:
        pending: set[asyncio.Task[None]] = set()

        async def record(future: asyncio.Future[Committed]) -> None:
            committed = await future
            out.write(f"{committed.producer_id} {committed.first_seq} {committed.count} "
                      f"{committed.group} {time.time():.3f}\n")

        for start in range(0, args.count, args.batch):
            count = min(args.batch, args.count - start)
            messages = [f"{args.index}:{start + i}:".encode().ljust(100, b".")
                        for i in range(count)]
            future = await producer.submit(messages)   # waits while the window is full
            task = asyncio.get_running_loop().create_task(record(future))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(args.pause)
        await asyncio.gather(*pending)
    out.close()


async def gap_produce(args: argparse.Namespace) -> None:
    """The reviewer's gap scenario: batch Z (seq 0..9) and A (10..19) go to group q1 (the
    test has stopped it), Z moves to q2 after its deadline, then B (20..29) commits on q2;
    the file `b_committed` tells the test to pause this process. A's fate is then written:
    "committed ..." or "failed ..." (never acknowledged)."""
    from pathlib import Path

    from kvsvr.errors import Timeout

    out_dir = Path(args.out).parent
    out = open(args.out, "a", buffering=1)   # noqa: SIM115

    def line(c: Committed) -> str:
        return f"committed {c.producer_id} {c.first_seq} {c.count} {c.group}\n"

    async with AsyncProducer(args.config, args.topic, first_group=0, linger_ms=0,
                             max_in_flight=64) as producer:
        while not (out_dir / "go").exists():
            await asyncio.sleep(0.01)

        def batch(first: int) -> list[bytes]:
            return [f"{first + i}".encode() for i in range(10)]

        z = await producer.submit(batch(0))
        await asyncio.sleep(0.2)
        a = await producer.submit(batch(10))
        out.write(line(await z))
        b = await producer.submit(batch(20))
        out.write(line(await b))
        (out_dir / "b_committed").write_text("x")
        try:
            out.write(line(await a))
        except Timeout as e:
            out.write(f"failed 10 10 {e}\n")
    out.close()


def consume(args: argparse.Namespace) -> None:
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    out = open(args.out, "a", buffering=1)   # noqa: SIM115
    with Consumer(args.config, args.topic, args.group, wait_ms=100) as consumer:
        if args.kvsvr:
            from kvsvr.client import Client

            client = Client(args.kvsvr, timeout=10.0)
            exactly = ExactlyOnce(client, lambda d: f"eo:{d.producer_id}",
                                  lambda d, batch: batch.append(str(d.seq).encode()))

            def handler(d: object) -> None:
                exactly(d)   # type: ignore[arg-type]
                out.write(f"{d.producer_id} {d.seq} {d.group}\n")  # type: ignore[attr-defined]
        else:
            def handler(d: object) -> None:
                out.write(f"{d.producer_id} {d.seq} {d.group} "  # type: ignore[attr-defined]
                          f"{d.value.decode()}\n")  # type: ignore[attr-defined]
        consumer.run(handler, stop=lambda: stopping)
    out.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["produce", "consume", "gap_produce"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--topic", default="t")
    parser.add_argument("--out", required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--pause", type=float, default=0.04)
    parser.add_argument("--first-group", type=int, default=None)
    parser.add_argument("--group", default="cg")
    parser.add_argument("--kvsvr", default=None, help="KVSvr config: exactly-once handler")
    args = parser.parse_args()
    if args.role == "produce":
        asyncio.run(produce(args))
    elif args.role == "gap_produce":
        asyncio.run(gap_produce(args))
    else:
        consume(args)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
