"""Running seeds, in this process or in one whose hash seed replays them anywhere, and the
command line (`python -m kvsvr.testing.replica_sim`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvsvr.testing.replica_sim.script import Script
from kvsvr.testing.replica_sim.settings import HASH_SEED, Faults
from kvsvr.testing.replica_sim.simulation import Simulation, SimulationFailure


def run_seeds(seeds: list[int], options: dict[str, Any] | None = None,
              duration_s: float = 3.0) -> dict[int, str]:
    """Run each seed with `options` (Simulation's keyword arguments, `faults` as a dict) in
    this process; the failures' messages, by seed."""
    options = dict(options or {})
    fields: dict[str, Any] = {name: tuple(value) if isinstance(value, list) else value
                              for name, value in options.pop("faults", {}).items()}
    failures = {}
    for seed in seeds:
        try:
            Simulation(seed, faults=Faults(**fields), **options).run(duration_s)
        except SimulationFailure as e:
            failures[seed] = str(e)
    return failures


def run_seeds_replayable(seeds: list[int], options: dict[str, Any] | None = None,
                         duration_s: float = 3.0) -> dict[int, str]:
    """run_seeds in a process whose PYTHONHASHSEED is HASH_SEED (this one if it is), so that
    each seed runs as it will when its failure is replayed in another process."""
    if os.environ.get("PYTHONHASHSEED") == HASH_SEED:
        return run_seeds(seeds, options, duration_s)
    command = [sys.executable, "-m", "kvsvr.testing.replica_sim", "--json",
               "--seeds", ",".join(map(str, seeds)), "--duration", str(duration_s),
               "--options", json.dumps(options or {})]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONHASHSEED": HASH_SEED})
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return {int(seed): message for seed, message in json.loads(done.stdout).items()}


def _seed_list(text: str) -> list[int]:
    """"3", "0-99" or "1,5,7-9" as a list of seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds.extend(range(int(low), int(high or low) + 1))
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvsvr.testing.replica_sim",
        description="Run the replica group simulation for some seeds (a failure's message "
                    "gives the command that replays it), or a scenario script.")
    parser.add_argument("--seeds", type=_seed_list, default=[0], help='e.g. "5" or "0-99"')
    parser.add_argument("--options", type=json.loads, default={},
                        help="Simulation's keyword arguments as JSON (faults as an object)")
    parser.add_argument("--duration", type=float, default=3.0,
                        help="simulated seconds the clients call for")
    parser.add_argument("--script", help="run a scenario script and print it with what its "
                                         "commands print now")
    parser.add_argument("--json", action="store_true",
                        help="print the failures as a JSON object by seed")
    args = parser.parse_args(argv)
    if not args.json:
        logging.basicConfig(level=logging.WARNING)
    if args.script:
        print(Script(Path(args.script).read_text()).run(), end="")
        return 0
    failures = run_seeds(args.seeds, args.options, args.duration)
    if args.json:
        print(json.dumps(failures))
    else:
        for seed in args.seeds:
            print(failures.get(seed, f"seed {seed}: ok"))
    return 1 if failures else 0

