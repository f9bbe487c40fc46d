"""The static checks are tests: ruff on everything, mypy on the Python shell."""

from __future__ import annotations

import ast
import os
import re
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


_QUALIFIER_FIRST = re.compile(r"^_?(MAX|MIN|DEFAULT)_|_(MAX|MIN|DEFAULT)_")
_CONSTANT = re.compile(r"^_?[A-Z][A-Z0-9_]*$")


def _module_constants() -> dict[str, list[tuple[str, str]]]:
    """Every module-level UPPER_CASE assignment of the product code (kvsvr, quorumq, the Cython
    parts' Python-level names): name -> [(where, value as written)]."""
    found: dict[str, list[tuple[str, str]]] = {}
    for path in sorted([*ROOT.glob("kvsvr/**/*.py"), *ROOT.glob("queue/quorumq/*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) and node.value else []
            for target in targets:
                if isinstance(target, ast.Name) and _CONSTANT.match(target.id):
                    assert node.value is not None
                    found.setdefault(target.id, []).append(
                        (f"{path.relative_to(ROOT)}:{node.lineno}", ast.unparse(node.value)))
    for path in sorted(ROOT.glob("kvsvr/*.pxi")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            match = re.match(r"^\s*(_?[A-Z][A-Z0-9_]*)\s*=\s*(.+?)\s*(#.*)?$", line)
            if match:
                found.setdefault(match[1], []).append(
                    (f"{path.relative_to(ROOT)}:{number}", match[2]))
    return found


def _is_plain_value(text: str) -> bool:
    """A number, string or bytes, or arithmetic on them (a limit), not a table or a call."""
    allowed = (ast.Expression, ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator,
               ast.unaryop)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:   # the first line of a table that goes on (in a .pxi)
        return False
    return all(isinstance(node, allowed) for node in ast.walk(tree))


def test_limits_are_named_with_the_qualifier_last():
    """`KEY_BYTES_MAX`, not `MAX_KEY_BYTES` or `KEY_MAX_BYTES`: a reader finds a limit by what
    it bounds, and the same thing is never spelled two ways."""
    wrong = sorted(f"{where}: {name}" for name, places in _module_constants().items()
                   for where, _ in places if _QUALIFIER_FIRST.search(name))
    assert not wrong, "qualifier not last:\n" + "\n".join(wrong)


def test_no_two_constants_of_one_name_have_two_values():
    """A name means one thing across the product: a second definition may only repeat the
    first (an alias of the same object, e.g. `X = _core.X`), never a different value."""
    clashes = []
    for name, places in _module_constants().items():
        values = {value for _, value in places
                  if not value.endswith(name) and _is_plain_value(value)}
        if len(values) > 1:
            clashes.append(f"{name}: " + ", ".join(f"{where} = {value}"
                                                   for where, value in places))
    assert not clashes, "\n".join(clashes)


FUNCTION_LINES_MAX = 80


def test_no_function_is_long_without_a_reason():
    """A function of the product over FUNCTION_LINES_MAX lines says why beside its `def`
    (a `# long: ...` comment on the line above): long functions hide what they do."""
    long = []
    for path in sorted([*ROOT.glob("kvsvr/**/*.py"), *ROOT.glob("queue/quorumq/*.py")]):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            size = node.end_lineno - node.lineno + 1 if node.end_lineno else 0
            if size > FUNCTION_LINES_MAX and not lines[first - 2].strip().startswith("# long:"):
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {size} lines")
    assert not long, "\n".join(long)


MODULE_LINES_MAX = 800


def test_no_module_is_over_the_size_a_reader_can_hold():
    """A module of the product over MODULE_LINES_MAX lines is several jobs in one file: split
    it into parts that own their state (as kvsvr/replica/ and kvsvr/store/ are)."""
    big = [f"{path.relative_to(ROOT)}: {count} lines"
           for path in sorted([*ROOT.glob("kvsvr/**/*.py"), *ROOT.glob("queue/quorumq/*.py")])
           if (count := len(path.read_text().splitlines())) > MODULE_LINES_MAX]
    assert not big, "\n".join(big)
