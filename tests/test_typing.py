"""A user's program type-checks against the clients: mypy --strict infers what each call gives
(the blocking client's results, the asyncio client's awaitables of them, a pipeline's queued
calls) and refuses a result used as the wrong type."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = '''
import asyncio

from kvsvr import AsyncClient, Client


def blocking(kv: Client) -> None:
    reveal_type(kv.get("k"))
    reveal_type(kv.put("k", b"v", expected_version=1))
    reveal_type(kv.incr("n", 2))
    reveal_type(kv.row_get("t", "r"))
    reveal_type(kv.scan("t", limit=5))
    reveal_type(kv.changes("t", 0))
    reveal_type(kv.append("inbox", b"m"))
    reveal_type(kv.batch("k").put(b"v").incr(1).commit())
    pipeline = kv.pipeline()
    reveal_type(pipeline.get("k"))
    reveal_type(pipeline.execute())
    version: str = kv.put("k", b"v")   # the one error this program must get


async def asynchronous(kv: AsyncClient) -> None:
    reveal_type(await kv.get("k"))
    reveal_type(await kv.put("k", b"v"))
    reveal_type(await kv.batch("k").append(b"m").commit())


with Client() as kv:
    blocking(kv)
asyncio.run(asynchronous(AsyncClient()))
'''

EXPECTED = [
    "kvsvr.protocol.Versioned", "int", "int", "kvsvr.protocol.RowValue",
    "kvsvr.protocol.ScanPage", "kvsvr.protocol.ChangesPage", "int",
    "kvsvr.protocol.MutateReply", "None", "list[Any]",
    "kvsvr.protocol.Versioned", "int", "kvsvr.protocol.MutateReply",
]


def test_mypy_strict_infers_what_the_client_calls_give(tmp_path: Path):
    (tmp_path / "program.py").write_text(PROGRAM)
    (tmp_path / "mypy.ini").write_text(
        "[mypy]\nstrict = True\nignore_missing_imports = True\n"
        f"mypy_path = {ROOT}:{ROOT / 'queue'}\n"
        # the package's own code is checked by its own config; here only the user's program
        "[mypy-kvsvr.*,quorumq.*]\nfollow_imports = silent\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir",
         str(tmp_path / "cache"), "program.py"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "MYPYPATH": ""})
    lines = result.stdout.splitlines()
    revealed = [line.split('Revealed type is "', 1)[1].rstrip('"') for line in lines
                if "Revealed type is" in line]
    assert revealed == EXPECTED, result.stdout
    errors = [line for line in lines if ": error:" in line]
    assert len(errors) == 1 and 'variable has type "str"' in errors[0], result.stdout
