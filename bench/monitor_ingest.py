"""End-to-end ingest rate of the monitor center: a real `kvsvr-monitor` process takes agent
reports over ZeroMQ (each acknowledged after its durable LMDB commit) from N agent-like
senders, and this prints id-values per second of wall time and per CPU second of the center
process (its own utime + stime from /proc), beside the same run's baseline: the same reports
decoded and stored in this process with no socket (bench/test_bench_monitor.py's path).

    python bench/monitor_ingest.py --machines 4 --reports 20 --ids 1000 --seconds 60
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

from kvsvr import _core
from kvsvr.launcher import free_port
from kvsvr.monitor.report import METHOD_REPORT, Report, decode_report, encode_report
from kvsvr.monitor.series import SeriesStore

BASE_SECOND = 1_700_000_000


def make_reports(machine: str, reports: int, ids: int, seconds: int) -> list[bytes]:
    out = []
    for r in range(reports):
        first = BASE_SECOND + r * seconds
        blocks = [(first + s, _core.encode_block([(i, s + i) for i in range(1, ids + 1)]))
                  for s in range(seconds)]
        out.append(encode_report(Report(machine, first, first + seconds - 1, blocks)))
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send_all(address: str, bodies: list[bytes], errors: list[str]) -> None:
    context = zmq.Context.instance()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    for request_id, body in enumerate(bodies, 1):
        socket.send(_core.encode_frame(_core.FRAME_REQUEST, METHOD_REPORT, request_id, 0, body))
        if not socket.poll(30_000):
            errors.append("no ack within 30 s")
            break
        _, status, answered, _, _ = _core.decode_frame(socket.recv())
        if status != 0 or answered != request_id:
            errors.append(f"bad answer: status {status}, request {answered}")
            break
    socket.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=4, help="concurrent agent senders")
    parser.add_argument("--reports", type=int, default=20, help="reports per machine")
    parser.add_argument("--ids", type=int, default=1000, help="ids per second")
    parser.add_argument("--seconds", type=int, default=60, help="seconds per report")
    args = parser.parse_args()
    per_machine = {f"m{m}": make_reports(f"m{m}", args.reports, args.ids, args.seconds)
                   for m in range(args.machines)}
    values = args.machines * args.reports * args.seconds * args.ids

    with tempfile.TemporaryDirectory() as directory:
        # Baseline: decode + store in this process, no socket, same reports, same fsyncs.
        store = SeriesStore(Path(directory) / "baseline", sync=True)
        wall, cpu = time.perf_counter(), time.process_time()
        for r in range(args.reports):
            for bodies in per_machine.values():
                store.ingest(decode_report(bodies[r]), 0.0)
        base_wall, base_cpu = time.perf_counter() - wall, time.process_time() - cpu
        store.close()

        address = f"tcp://127.0.0.1:{free_port()}"
        center = subprocess.Popen(
            [sys.executable, "-m", "kvsvr.monitor.center", "--listen", address,
             "--web", f"127.0.0.1:{free_port()}", "--data-dir", str(Path(directory) / "center"),
             "--log-level", "WARNING"])
        try:
            time.sleep(1.5)
            cpu_before = cpu_seconds(center.pid)
            errors: list[str] = []
            threads = [threading.Thread(target=send_all, args=(address, bodies, errors))
                       for bodies in per_machine.values()]
            wall = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            center_wall = time.perf_counter() - wall
            center_cpu = cpu_seconds(center.pid) - cpu_before
        finally:
            center.terminate()
            center.wait(10)
    if errors:
        print("FAILED:", errors[0])
        return 1
    print(f"{values:,} id-values: {args.machines} machines x {args.reports} reports x "
          f"{args.seconds} s x {args.ids} ids, durable (fsync per report)")
    print(f"  center over ZeroMQ : {values / center_wall:12,.0f} id-values/s wall, "
          f"{values / max(center_cpu, 1e-9):12,.0f} per center CPU second")
    print(f"  in-process baseline: {values / base_wall:12,.0f} id-values/s wall, "
          f"{values / max(base_cpu, 1e-9):12,.0f} per CPU second")
    print(f"  ratio (center / baseline), wall: {base_wall / center_wall:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
