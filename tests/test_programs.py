"""Conventions every installed program shares: --version, "did you mean" for a mistyped
command, and the environment ($KVSVR_CONFIG, $KVSVR_ADDRESS) with explicit options winning."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kvsvr import __version__
from kvsvr.config import load
from kvsvr.launcher import write_single_node_config
from kvsvr.process import ADDRESS_ENV, CONFIG_ENV

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
    "scripts"]


def _run_entry(name: str, *args: str, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    """Run the entry point of [project.scripts] `name` as its installed script would."""
    module, function = SCRIPTS[name].split(":")
    code = (f"import sys; sys.argv[0] = {name!r}; from {module} import {function}; "
            f"sys.exit({function}())")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=ROOT)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_program_prints_its_version(name: str):
    result = _run_entry(name, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{name} {__version__}"


def test_a_mistyped_command_gets_a_suggestion():
    result = _run_entry("kvsvr", "gett", "k")
    assert result.returncode == 2 and "did you mean 'get'?" in result.stderr


def _environment(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (CONFIG_ENV, ADDRESS_ENV)}
    return {**env, **values}


def test_the_cluster_comes_from_the_environment_unless_given(tmp_path: Path):
    """Nothing listens on these addresses, so each answer (exit 4, Unavailable) names the
    address the command used: $KVSVR_CONFIG's node, $KVSVR_ADDRESS (it wins over
    $KVSVR_CONFIG when both are set), and --config or --address given win over both."""
    config = write_single_node_config(tmp_path / "a")
    config_node = load(config).groups[0].replicas[0].address
    other = write_single_node_config(tmp_path / "b")
    other_node = load(other).groups[0].replicas[0].address
    address = "tcp://127.0.0.1:9"

    def used(*args: str, **env: str) -> str:
        result = _run_entry("kvsvr", "--timeout", "0.3", *args, "get", "k",
                            env=_environment(**env))
        assert result.returncode == 4, result.stderr
        return next(a for a in (config_node, other_node, address) if a in result.stderr)

    assert used(KVSVR_CONFIG=str(config)) == config_node
    assert used(KVSVR_ADDRESS=address) == address
    assert used(KVSVR_CONFIG=str(config), KVSVR_ADDRESS=address) == address
    assert used("--config", str(other), KVSVR_CONFIG=str(config),
                KVSVR_ADDRESS=address) == other_node
    assert used("--address", address, KVSVR_CONFIG=str(config)) == address
    both = _run_entry("kvsvr", "--config", str(config), "--address", address, "get", "k")
    assert both.returncode == 2 and "not allowed with" in both.stderr
