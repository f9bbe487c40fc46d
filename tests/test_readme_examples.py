"""The README's shell examples run as written.

Convention: every ```sh, ```bash or ```console block of README.md is run in order, one
command at a time, with bash, in a temporary directory that holds `cluster.toml`: a real
3-replica cluster (nodes n1, n2, n3) started for the test, which $KVSVR_CONFIG names, so the
`kvsvr` commands need no --config. A block whose fence comes right after a line
`<!-- not run: REASON -->` is not run: one that starts a long-running program (kvsvr-cluster,
kvsvr-node, kvsvr-monitor, quorumq-cluster, tools/demo, tools/test, a benchmark) or needs
something the test does not start. Every command must exit 0, and one ending in
`# -> OUTPUT` must print exactly OUTPUT (a trailing newline aside). A line ending in a
backslash goes on with the next; lines holding only a comment are skipped; in a ```console
block only the lines starting with "$ " are commands.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from kvsvr.launcher import LocalCluster, write_cluster_config

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not run:.*-->\s*$")
EXPECTED = re.compile(r"#\s*->\s*(.*?)\s*$")
SERVERS = ("kvsvr-cluster", "kvsvr-node", "kvsvr-monitor", "quorumq-cluster",
           "quorumq-server", "bash tools/")


class Block(NamedTuple):
    line: int        # where its fence is in README.md (1-based)
    run: bool
    commands: list[tuple[int, str]]   # (README line, command)


def shell_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        start, kind = index, fence.group(1)
        index += 1
        body: list[tuple[int, str]] = []
        while index < len(lines) and not lines[index].startswith("```"):
            body.append((index + 1, lines[index]))
            index += 1
        index += 1
        if kind in ("sh", "bash", "console"):
            skipped = start > 0 and NOT_RUN.match(lines[start - 1]) is not None
            blocks.append(Block(start + 1, not skipped, _commands(body, kind == "console")))
    return blocks


def _commands(body: list[tuple[int, str]], console: bool) -> list[tuple[int, str]]:
    commands: list[tuple[int, str]] = []
    pending = ""
    first = 0
    for number, line in body:
        if console:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not pending:
            first = number
            if not line.strip() or line.lstrip().startswith("#"):
                continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append((first, pending + line))
        pending = ""
    return commands


def test_the_convention_is_followed():
    """Blocks that start servers are the ones marked, and what runs includes the CLI tour."""
    blocks = shell_blocks(README.read_text())
    for block in blocks:
        if block.run:
            starts = [c for _, c in block.commands if c.lstrip().startswith(SERVERS)]
            assert not starts, f"README.md:{block.line}: mark it <!-- not run: ... -->"
    ran = [c for b in blocks if b.run for _, c in b.commands]
    assert any(c.startswith("kvsvr put") for c in ran)
    assert any(EXPECTED.search(c) for c in ran)


def test_readme_shell_examples_run_as_written(tmp_path: Path):
    config = write_cluster_config(tmp_path, replicas=3, sync=False)
    cluster = LocalCluster(config, log_dir=tmp_path / "logs")
    cluster.start()
    env = {k: v for k, v in os.environ.items() if k != "KVSVR_ADDRESS"}
    env["KVSVR_CONFIG"] = str(config)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    try:
        for block in shell_blocks(README.read_text()):
            if not block.run:
                continue
            for number, command in block.commands:
                result = subprocess.run(["bash", "-o", "pipefail", "-c", command],
                                        cwd=tmp_path, env=env, capture_output=True,
                                        timeout=120)
                where = f"README.md:{number}: {command}"
                assert result.returncode == 0, f"{where}\n{result.stderr.decode()}"
                expected = EXPECTED.search(command)
                if expected:
                    out = result.stdout.decode(errors="replace").removesuffix("\n")
                    assert out == expected.group(1), f"{where}\nprinted {out!r}"
    finally:
        cluster.stop()
