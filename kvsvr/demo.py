"""`kvsvr-demo`: start the embedded default cluster (one group of 3 replicas, one per campus)
and run a messenger-like workload on it.

It registers accounts (compare-and-set create), delivers messages into inboxes (append) with
unread counters (incr), SIGKILLs one replica halfway while clients keep going (they fail over
to the other two), restarts it and watches it catch up, then checks that every acknowledged
write is there exactly once and syncs an inbox with `changes`. It ends with a summary (and
every replica's status) and exits non-zero if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvsvr.aio import AsyncClient
from kvsvr.client import Client
from kvsvr.errors import NotFound
from kvsvr.launcher import LocalCluster, write_default_config
from kvsvr.process import program_parser

CONCURRENCY = 32
VICTIM = "n1"            # the replica the demo kills halfway
DOWN_S = 2.0             # how long it stays down while the workload goes on


def _percentile(samples: list[float], q: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def prepare(directory: Path) -> Path:
    """A fresh demo directory with a config made from the embedded default on free ports."""
    if (directory / "cluster.toml").exists():
        shutil.rmtree(directory / "data", ignore_errors=True)  # only what the demo made
        shutil.rmtree(directory / "logs", ignore_errors=True)
    elif directory.exists() and any(directory.iterdir()):
        raise SystemExit(f"kvsvr-demo: {directory} exists and is not a demo directory")
    return write_default_config(directory)


async def workload(cluster: LocalCluster, users: int, messages: int, kill: bool,
                   latencies: dict[str, list[float]]) -> dict[str, object]:
    acked_inbox: dict[int, list[tuple[int, bytes]]] = {u: [] for u in range(users)}
    restart_s = 0.0
    async with AsyncClient(cluster.config, timeout=30.0, attempt_timeout=0.5) as client:

        async def timed(kind: str, call: Awaitable[Any]) -> Any:
            started = time.perf_counter()
            result = await call
            latencies.setdefault(kind, []).append(time.perf_counter() - started)
            return result

        with tqdm(total=users, desc="accounts ", unit="op", leave=True) as bar:
            async def register(u: int) -> None:
                await timed("put (CAS create)", client.put(
                    f"user:{u}:profile", f"name=user{u};campus=a", expected_version=0))
                bar.update(1)

            for start in range(0, users, CONCURRENCY):
                batch = range(start, min(users, start + CONCURRENCY))
                await asyncio.gather(*(register(u) for u in batch))

        rng = random.Random(7)
        plan = [(rng.randrange(users), f"msg {i} hello".encode()) for i in range(messages)]
        queue = list(reversed(plan))
        kill_at = messages // 2 if kill else -1
        sent = 0
        with tqdm(total=messages, desc="messages ", unit="msg", leave=True) as bar:
            async def deliver() -> None:
                nonlocal sent
                while queue:
                    user, body = queue.pop()
                    sent += 1
                    seq = await timed("append", client.append(f"user:{user}:inbox", body))
                    acked_inbox[user].append((seq, body))
                    await timed("incr", client.incr(f"user:{user}:unread"))
                    bar.update(1)

            async def killer() -> None:
                nonlocal restart_s
                while sent < kill_at:
                    await asyncio.sleep(0.01)
                bar.write(f"-- SIGKILL replica {VICTIM} after {sent} messages; the other two "
                          f"carry on (clients fail over), {VICTIM} stays down {DOWN_S:.0f} s")
                await asyncio.to_thread(cluster.kill, VICTIM)
                await asyncio.sleep(DOWN_S)
                started = time.perf_counter()
                await asyncio.to_thread(cluster.start, VICTIM)
                await asyncio.to_thread(_wait_caught_up, cluster, VICTIM)
                restart_s = time.perf_counter() - started
                bar.write(f"-- {VICTIM} restarted and caught up from its peers' binlogs in "
                          f"{restart_s:.2f} s; clients return to it")

            tasks = [deliver() for _ in range(CONCURRENCY)]
            if kill:
                tasks.append(killer())
            await asyncio.gather(*tasks)

    problems, sync_line = _verify(cluster, acked_inbox)
    return {"problems": problems, "restart_s": restart_s, "sync": sync_line,
            "messages": sum(len(v) for v in acked_inbox.values())}


def _verify(cluster: LocalCluster, acked_inbox: dict[int, list[tuple[int, bytes]]]
            ) -> tuple[list[str], str]:
    """With a fresh client: what was acknowledged is there, exactly once. Returns the
    problems found and a line about one user's sync."""
    users = len(acked_inbox)
    problems: list[str] = []
    with Client(cluster.config, timeout=10.0) as check:
        for u in tqdm(range(users), desc="verify   ", unit="user"):
            profile = check.get(f"user:{u}:profile")
            if profile.value != f"name=user{u};campus=a".encode():
                problems.append(f"user {u}: profile is {profile.value!r}")
            rows = []
            cursor: bytes | None = b""
            while cursor is not None:
                page = check.scan(f"user:{u}:inbox", cursor)
                rows.extend(page.rows)
                cursor = page.next_start
            stored = [(int.from_bytes(r.row, "big"), r.value) for r in rows]
            if stored != sorted(acked_inbox[u]):
                problems.append(f"user {u}: inbox has {len(stored)} rows, "
                                f"{len(acked_inbox[u])} acknowledged")
            unread = 0
            with contextlib.suppress(NotFound):
                unread = int(check.get(f"user:{u}:unread").value)
            if unread != len(acked_inbox[u]):
                problems.append(f"user {u}: unread counter {unread}, "
                                f"{len(acked_inbox[u])} messages")
        busiest = max(acked_inbox, key=lambda u: len(acked_inbox[u]))  # users >= 1
        changed = check.changes(f"user:{busiest}:inbox", since_version=0, limit=5)
        sync_line = (f"user {busiest}: inbox at version {changed.version}, first "
                     f"{len(changed.changes)} changes since version 0 synced")
    return problems, sync_line


def _wait_caught_up(cluster: LocalCluster, node: str, timeout: float = 60.0) -> None:
    """Until `node` votes again and has pulled everything its peers had."""
    deadline = time.monotonic() + timeout
    with Client(address=cluster.address(node), timeout=1.0) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                status = client.status()
                if status.get("role") == "replica" and all(
                        p["lag_records"] == 0 for p in status.get("peers", {}).values()):
                    return
            time.sleep(0.05)


def _replica_lines(cluster: LocalCluster) -> list[str]:
    lines = []
    for node in cluster.nodes:
        try:
            with Client(address=cluster.address(node), timeout=2.0) as client:
                s = client.status()
        except Exception as e:  # a summary line, not a crash
            lines.append(f"  {node:4s} unreachable ({e})")
            continue
        peers = ", ".join(f"{name} {'up' if p['up'] else 'DOWN'} lag {p['lag_records']}"
                          for name, p in s.get("peers", {}).items())
        store = s["store"]
        lines.append(f"  {node:4s} campus {s['campus']}  {s['role']:8s} life "
                     f"{s.get('incarnation', 1)}  binlog lsn {store['binlog_first_lsn']}.."
                     f"{store['binlog_last_lsn']}  {store['keys']} keys  peers: {peers}")
    return lines


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {minimum}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = program_parser("kvsvr-demo", __doc__.splitlines()[0])
    parser.add_argument("--dir", default="kvsvr-demo", help="demo directory (default %(default)s)")
    parser.add_argument("--users", type=_at_least(1), default=2000)
    parser.add_argument("--messages", type=_at_least(0), default=20000)
    parser.add_argument("--no-kill", action="store_true",
                        help=f"skip the SIGKILL/restart of replica {VICTIM}")
    args = parser.parse_args(argv)
    directory = Path(args.dir).resolve()
    config = prepare(directory)
    print(f"kvsvr-demo: the embedded default cluster (one group of 3 replicas, campuses a, b, "
          f"c) on loopback; files in {directory}")
    cluster = LocalCluster(config, log_dir=directory / "logs")
    cluster.start()
    latencies: dict[str, list[float]] = {}
    started = time.perf_counter()
    try:
        outcome = asyncio.run(workload(cluster, args.users, args.messages, not args.no_kill,
                                       latencies))
        elapsed = time.perf_counter() - started
        status = Client(config).status()
        replicas = _replica_lines(cluster)
    finally:
        cluster.stop()
    problems: list[str] = outcome["problems"]  # type: ignore[assignment]
    operations = sum(len(v) for v in latencies.values())
    print("\nsummary")
    print(f"  operations      {operations} acknowledged in {elapsed:.1f} s "
          f"({operations / elapsed:,.0f}/s with {CONCURRENCY} in flight, fsync on)")
    for kind, samples in latencies.items():
        print(f"  {kind:16s}{len(samples):7d}  p50 {_percentile(samples, 0.5) * 1e3:6.2f} ms"
              f"  p99 {_percentile(samples, 0.99) * 1e3:7.2f} ms")
    if not args.no_kill:
        print(f"  SIGKILL         {VICTIM} down {DOWN_S:.0f} s mid-workload; after restart it "
              f"caught up in {outcome['restart_s']:.2f} s")
    store = status["store"]
    print(f"  storage         {store['keys']} keys, {store['rows']} rows, binlog lsn "
          f"{store['binlog_first_lsn']}..{store['binlog_last_lsn']}")
    print(f"  sync            {outcome['sync']}")
    print("  replicas")
    for line in replicas:
        print(f"  {line}")
    if problems:
        print(f"  verification    FAILED: {len(problems)} problems")
        for line in problems[:20]:
            print(f"    {line}")
        return 1
    print(f"  verification    OK: {args.users} profiles, {outcome['messages']} messages in "
          "inboxes exactly once, unread counters exact")
    kvsvr = Path(sys.executable).parent / "kvsvr"
    print(f"\nThe data stays in {directory / 'data'} (the group is stopped); to serve it "
          f"again: {Path(sys.executable).parent / 'kvsvr-cluster'} --config {config}, then "
          f"{kvsvr} --config {config} status")
    return 0


if __name__ == "__main__":
    sys.exit(main())
