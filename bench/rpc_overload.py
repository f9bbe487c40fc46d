"""Svrkit's overload curve: goodput and p99 with FastReject on and off, offered 0.5x to 5x
the measured capacity of a CPU-bound service, open-loop.

    python bench/rpc_overload.py                      # 0.5 1 2 3 5 x, 12 s each, plot file
    python bench/rpc_overload.py --multiples 1 3 --seconds 6 --svg /tmp/curve.svg --json

Two `burn` instances (kvsvr.rpc.examples:burn, --cpu-us of CPU per call), one with
FastReject, one without (first come, first served). Capacity is measured first: a closed
loop of 16 calls in flight on the instance without FastReject, calls/s. Then, for each
multiple, alternating on and off, `python -m kvsvr.rpc.loadgen` offers Poisson arrivals at
that multiple of the capacity (a fifth from an important entry method, each call with a 1 s
deadline) and counts, after the first --skip seconds (the level settles): goodput (calls
answered within their deadline per second), the p99 of those calls, and the important
calls' success rate. The curve is written as an SVG file (no plotting library needed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def capacity(config: str, cpu_us: int, seconds: float = 3.0) -> float:
    from kvsvr.rpc import AsyncStub
    from kvsvr.rpc.examples import WorkRequest, burn

    async def run() -> float:
        async with AsyncStub(burn, config, follow_shield=False) as stub:
            request = WorkRequest(cpu_us=cpu_us)
            end = time.monotonic() + seconds
            done = 0

            async def worker() -> None:
                nonlocal done
                while time.monotonic() < end:
                    await stub.work(request)
                    done += 1
            begin = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(16)))
            return done / (time.monotonic() - begin)
    return asyncio.run(run())


def offer(config: str, rate: float, seconds: float, skip: float, cpu_us: int
          ) -> dict[str, Any]:
    run = subprocess.run([sys.executable, "-m", "kvsvr.rpc.loadgen", "--config", config,
                          "--rate", f"{rate:.1f}", "--duration", str(seconds), "--skip",
                          str(skip), "--cpu-us", str(cpu_us)],
                         capture_output=True, text=True, timeout=seconds + 120)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-2000:])
    result: dict[str, Any] = json.loads(run.stdout)
    return result


def svg(curve: list[dict[str, Any]], capacity_per_s: float) -> str:
    """Two panels (goodput/s and p99 ms against the offered multiple), on and off."""
    width, height, pad = 460, 300, 50
    multiples = sorted({point["multiple"] for point in curve})
    x_max = max(multiples)

    def panel(left: int, key: str, title: str, unit: str) -> list[str]:
        values = [point[key] or 0.0 for point in curve]
        y_max = max([*values, capacity_per_s if key == "goodput_per_s" else 1.0]) * 1.1

        def xy(multiple: float, value: float) -> tuple[float, float]:
            return (left + pad + multiple / x_max * (width - 2 * pad),
                    height - pad - value / y_max * (height - 2 * pad))
        out = [f'<text x="{left + width / 2}" y="20" text-anchor="middle" '
               f'font-size="14">{title}</text>',
               f'<line x1="{left + pad}" y1="{height - pad}" x2="{left + width - pad}" '
               f'y2="{height - pad}" stroke="black"/>',
               f'<line x1="{left + pad}" y1="{pad}" x2="{left + pad}" y2="{height - pad}" '
               'stroke="black"/>',
               f'<text x="{left + width / 2}" y="{height - 10}" text-anchor="middle" '
               'font-size="12">offered load (x measured capacity)</text>',
               f'<text x="{left + 12}" y="{height / 2}" font-size="12" transform="rotate(-90 '
               f'{left + 12} {height / 2})" text-anchor="middle">{unit}</text>']
        for multiple in multiples:
            x, _ = xy(multiple, 0)
            out.append(f'<text x="{x}" y="{height - pad + 15}" font-size="11" '
                       f'text-anchor="middle">{multiple:g}</text>')
        for fraction in (0.0, 0.5, 1.0):
            _, y = xy(0, y_max / 1.1 * fraction)
            out.append(f'<text x="{left + pad - 5}" y="{y + 4}" font-size="11" '
                       f'text-anchor="end">{y_max / 1.1 * fraction:.0f}</text>')
        if key == "goodput_per_s":   # the measured capacity, dashed
            x0, y = xy(0, capacity_per_s)
            x1, _ = xy(x_max, capacity_per_s)
            out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="gray" '
                       'stroke-dasharray="4 4"/>')
            out.append(f'<text x="{x1}" y="{y - 4:.1f}" font-size="11" text-anchor="end" '
                       'fill="gray">measured capacity</text>')
        for mode, color in (("on", "#1f77b4"), ("off", "#d62728")):
            points = sorted((p["multiple"], p[key] or 0.0) for p in curve if p["mode"] == mode)
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(m, v) for m, v in points))
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                       f'points="{path}"/>')
            for m, v in points:
                x, y = xy(m, v)
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
        return out

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width}" height="{height}" '
             'font-family="sans-serif">', '<rect width="100%" height="100%" fill="white"/>']
    parts += panel(0, "goodput_per_s", "Goodput (answers within deadline)", "calls/s")
    parts += panel(width, "p99_ms", "p99 of answered calls", "ms")
    parts += ['<text x="60" y="40" fill="#1f77b4" font-size="12">FastReject on</text>',
              '<text x="60" y="56" fill="#d62728" font-size="12">FastReject off</text>',
              "</svg>"]
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--multiples", type=float, nargs="+", default=[0.5, 1, 2, 3, 5])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--skip", type=float, default=4.0)
    parser.add_argument("--cpu-us", type=int, default=2000)
    parser.add_argument("--svg", default="bench/rpc_overload.svg")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from kvsvr.launcher import write_single_node_config
    from kvsvr.rpc.launcher import ServiceInstances, add_services

    directory = Path(tempfile.mkdtemp(prefix="bench-rpc-overload-"))
    groups = {}
    for mode in ("on", "off"):
        path = add_services(write_single_node_config(directory / mode), {"burn": ["a"]},
                            fast_reject=mode == "on")
        instances = ServiceInstances(path, log_dir=directory / mode / "logs")
        instances.add("kvsvr.rpc.examples:burn", "burn")
        groups[mode] = instances
    curve: list[dict[str, Any]] = []
    try:
        for instances in groups.values():
            instances.start()
        measured = capacity(groups["off"].config_path, args.cpu_us)
        if not args.json:
            print(f"capacity: {measured:.0f} calls/s ({args.cpu_us} µs of CPU a call)",
                  flush=True)
        for multiple in args.multiples:
            for mode in ("on", "off"):
                result = offer(groups[mode].config_path, multiple * measured, args.seconds,
                               args.skip, args.cpu_us)
                point = {"multiple": multiple, "mode": mode,
                         "goodput_per_s": result["goodput_per_s"], "p99_ms": result["p99_ms"],
                         "high_success": result["high"]["success"],
                         "goodput_of_capacity": round(result["goodput_per_s"] / measured, 3)}
                curve.append(point)
                if not args.json:
                    print(f"{multiple:>4g}x FastReject {mode:>3}: goodput "
                          f"{point['goodput_per_s']:>7.1f}/s ({point['goodput_of_capacity']:.0%}"
                          f" of capacity), p99 {point['p99_ms']} ms, important calls "
                          f"{point['high_success']:.1%} ok", flush=True)
    finally:
        for instances in groups.values():
            instances.stop()
    Path(args.svg).write_text(svg(curve, measured))
    if args.json:
        print(json.dumps({"capacity_per_s": measured, "curve": curve, "svg": args.svg}))
    else:
        print(f"plot: {args.svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
