"""The `kvsvr` command line against a real node: output, JSON and exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvsvr.launcher import LocalCluster


@pytest.fixture
def kv(cluster: LocalCluster):
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvsvr.cli", "--config",
                               cluster.config_path, *args],
                              capture_output=True, text=True, timeout=60)
    return run


def test_cli_round_trip(kv):
    assert kv("put", "greeting", "hello").stdout == "version 1\n"
    assert kv("get", "greeting").stdout == "hello\n"
    assert json.loads(kv("--json", "get", "greeting").stdout) == {"version": 1, "value": "hello"}
    assert kv("incr", "n", "5").stdout == "5\n"
    assert kv("append", "inbox", "first").stdout == "0\n"
    assert kv("append", "inbox", "second").stdout == "1\n"
    assert kv("scan", "inbox").stdout.splitlines() == ["#0\t1\tfirst", "#1\t2\tsecond"]
    kv("row-put", "t", "a", "1")
    kv("row-delete", "t", "a")
    assert kv("changes", "t", "0").stdout.splitlines() == ["2\ta\tdeleted\t"]
    status = json.loads(kv("status").stdout)
    assert status["node"] == "n1" and status["store"]["binlog_last_lsn"] == 6


def test_cli_exit_statuses(kv):
    missing = kv("get", "nothing")
    assert missing.returncode == 1 and "not found" in missing.stderr
    kv("put", "k", "v")
    conflict = kv("put", "k", "w", "--expect-version", "7")
    assert conflict.returncode == 3 and "version conflict" in conflict.stderr
    invalid = kv("put", "k" * 300, "v")
    assert invalid.returncode == 2 and "key" in invalid.stderr
    unknown = kv("frobnicate")
    assert unknown.returncode == 2


def test_cli_timeout_when_nothing_listens():
    result = subprocess.run([sys.executable, "-m", "kvsvr.cli", "--address",
                             "tcp://127.0.0.1:9", "--timeout", "0.3", "get", "k"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 4 and "timeout" in result.stderr
