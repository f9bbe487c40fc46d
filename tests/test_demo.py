"""The README's main job, small: the demo runs a 3-replica group, kills a replica, and
verifies everything."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_verifies(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kvsvr.demo", "--dir", str(tmp_path / "demo"), "--users", "100",
         "--messages", "1500"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verification    OK" in result.stdout
    assert "SIGKILL         n1 down" in result.stdout
    assert result.stdout.count(" replica  life") == 3   # every replica votes again at the end
