"""The static checks are tests: ruff on everything, mypy on the Python shell."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run the tests through `bash tools/test`")
    return found


def test_ruff_is_clean():
    result = subprocess.run([_tool("ruff"), "check", "kvsvr", "queue", "tests", "bench",
                             "tools"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean():
    result = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cython_lint_is_clean():
    # cython-lint runs pycodestyle by name: put the venv's tools first on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    result = subprocess.run([_tool("cython-lint"), "--max-line-length", "100",
                             *map(str, sorted({*(ROOT / "kvsvr").glob("*.pyx"),
                                               *(ROOT / "kvsvr").glob("*.px[di]")}))],
                            cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_package_named_queue_shadows_the_standard_library():
    assert not (ROOT / "queue" / "__init__.py").exists()
