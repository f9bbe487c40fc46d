"""The `kvsvr` command line against a real node: output, JSON and exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from kvsvr.launcher import LocalCluster, write_cluster_config


@pytest.fixture
def kv(cluster: LocalCluster):
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvsvr.cli", "--config",
                               cluster.config_path, *args],
                              capture_output=True, text=True, timeout=60)
    return run


def test_cli_round_trip(kv):
    assert kv("put", "greeting", "hello").stdout == "version 1\n"
    assert kv("get", "greeting").stdout == "hello"   # the bytes: no newline added off a tty
    assert json.loads(kv("--json", "get", "greeting").stdout) == {
        "version": 1, "value": "hello", "value_base64": "aGVsbG8="}
    assert kv("incr", "n", "5").stdout == "5\n"
    assert kv("append", "inbox", "first").stdout == "0\n"
    assert kv("append", "inbox", "second").stdout == "1\n"
    assert kv("scan", "inbox").stdout.splitlines() == ["#0\t1\tfirst", "#1\t2\tsecond"]
    kv("row-put", "t", "a", "1")
    kv("row-delete", "t", "a")
    assert kv("changes", "t", "0").stdout.splitlines() == ["2\ta\tdeleted\t"]
    [status] = json.loads(kv("--json", "status").stdout)
    assert status["node"] == "n1" and status["store"]["binlog_last_lsn"] == 6
    assert status["up"] is True and status["address"].startswith("tcp://127.0.0.1:")
    assert kv("get", "greeting", "--local").stdout == "hello"
    assert kv("scan", "inbox", "--local", "--limit", "1").stdout == "#0\t1\tfirst\n"


def test_cli_compaction_and_resync(kv):
    """Tombstones are kept until compaction; a diff from before it says to resync from 0."""
    kv("row-put", "contacts", "bob", "friend")       # v1
    kv("row-delete", "contacts", "bob")              # v2: a tombstone
    kv("row-put", "contacts", "eve", "colleague")    # v3
    assert kv("changes", "contacts", "1").stdout.splitlines() == [
        "2\tbob\tdeleted\t", "3\teve\tput\tcolleague"]
    assert kv("compact", "contacts", "2").stdout == "version 4\n"
    stale = kv("changes", "contacts", "1")
    assert stale.returncode == 6 and "resync from version 0" in stale.stderr
    # the error carries the horizon, not the key's version (4): said as such
    assert "(compacted through version 2)" in stale.stderr
    assert "key version" not in stale.stderr
    assert kv("changes", "contacts", "0").stdout.splitlines() == ["3\teve\tput\tcolleague"]
    assert kv("changes", "contacts", "2").stdout.splitlines() == ["3\teve\tput\tcolleague"]
    too_far = kv("compact", "contacts", "99")
    assert too_far.returncode == 2 and "through_version" in too_far.stderr


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


def test_cli_status_asks_every_node_and_reports_the_silent_ones(tmp_path):
    """`kvsvr status` asks every node of the config, one line each (node, group, campus,
    address, up|down, details); a node that does not answer is "down" and the exit status 4."""
    config = write_cluster_config(tmp_path, groups=2, replicas=1, sync=False)
    cluster = LocalCluster(config, log_dir=tmp_path / "logs")
    cluster.start()
    try:
        def status(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "kvsvr.cli", "--config", str(config),
                                   *args, "status"], capture_output=True, text=True, timeout=60)

        both = status()
        assert both.returncode == 0, both.stderr
        lines = [line.split("\t") for line in both.stdout.splitlines()]
        assert [line[:5] for line in lines] == [
            ["n1", "g1", "a", cluster.address("n1"), "up"],
            ["n2", "g2", "a", cluster.address("n2"), "up"]]
        assert all("role=single" in line[5] and "lsn=0" in line[5] for line in lines)
        cluster.kill("n2")
        one_down = status("--json", "--timeout", "0.5")
        assert one_down.returncode == 4
        rows = json.loads(one_down.stdout)
        assert [(r["node"], r["up"]) for r in rows] == [("n1", True), ("n2", False)]
        assert rows[0]["store"]["binlog_last_lsn"] == 0 and "no node answered" in rows[1]["error"]
        text = status("--timeout", "0.5")
        assert text.returncode == 4
        assert text.stdout.splitlines()[1].split("\t")[:5] == [
            "n2", "g2", "a", cluster.address("n2"), "down"]
    finally:
        cluster.stop()


def test_cli_unavailable_when_nothing_listens():
    """Nothing listens: exit 4 within the connect wait, saying nothing was sent and how to
    start a cluster (not a Timeout: the put provably did not leave)."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "kvsvr.cli", "--address",
                             "tcp://127.0.0.1:9", "put", "k", "v"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 4, result.stderr
    assert time.monotonic() - started < 2 + 1   # (an interpreter's start included)
    assert "unavailable: no node answered" in result.stderr
    assert "tcp://127.0.0.1:9" in result.stderr and "kvsvr-cluster --config" in result.stderr


def test_cli_faults_on_a_replica_and_status_of_a_group(tmp_path):
    """`kvsvr faults NODE` sets and heals link faults on a running replica; an unknown node or
    peer is an invalid argument (exit 2); `status` shows each replica's role and peers."""
    config = write_cluster_config(tmp_path, replicas=3)
    group = LocalCluster(config, log_dir=tmp_path / "logs")
    group.start()

    def kv(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvsvr.cli", "--config", str(config),
                               *args], capture_output=True, text=True, timeout=60)
    try:
        result = kv("--json", "faults", "n1", "--peer", "n2", "--drop", "0.5",
                    "--delay-ms", "20")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["n2"] == {"drop": 0.5, "delay_ms": 20}
        assert kv("put", "k", "v").returncode == 0
        assert json.loads(kv("--json", "faults", "n1").stdout)["n2"] == {"drop": 0.0,
                                                                          "delay_ms": 0}
        assert kv("faults", "nx").returncode == 2
        bad = kv("faults", "n1", "--peer", "nobody", "--drop", "0.1")
        assert bad.returncode == 2 and "peer" in bad.stderr
        assert kv("faults", "n1", "--drop", "1.5").returncode == 2
        rows = json.loads(kv("--json", "status").stdout)
        assert [r["role"] for r in rows] == ["replica"] * 3
        assert all(set(r["peers"]) == {"n1", "n2", "n3"} - {r["node"]} for r in rows)
    finally:
        group.stop()


def test_cli_keys_and_values_that_are_not_utf8_are_taken_as_the_bytes_given(cluster, kv):
    """Arguments are bytes on POSIX: `kvsvr put $'\\xff' ...` stores key b"\\xff" (it used
    to end in a traceback)."""
    result = subprocess.run([sys.executable, "-m", "kvsvr.cli", "--config",
                             cluster.config_path, "put", b"\xff", b"caf\xe9"],
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    with cluster.client(timeout=10.0) as client:
        assert client.get(b"\xff").value == b"caf\xe9"
    result = subprocess.run([sys.executable, "-m", "kvsvr.cli", "--config",
                             cluster.config_path, "get", b"\xff"], capture_output=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.rstrip(b"\n"), result.stderr


def test_cli_values_from_standard_input(cluster):
    """`-` as the value reads standard input as bytes (binary, bigger than argv allows);
    more than the value limit is refused naming the field, and nothing is written."""
    from kvsvr.limits import VALUE_BYTES_MAX

    def kv(stdin: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "kvsvr.cli", "--config",
                               cluster.config_path, *args], input=stdin,
                              capture_output=True, timeout=60)

    big = bytes(range(256)) * (VALUE_BYTES_MAX // 256)   # NULs included: not an argv
    assert kv(big, "put", "blob", "-").returncode == 0
    assert kv(b"\x00row", "row-put", "table", "r1", "-").returncode == 0
    assert kv(b"msg\n", "append", "inbox", "-").stdout == b"0\n"
    too_big = kv(big + b"x" * 257, "put", "blob", "-")
    assert too_big.returncode == 2 and b"value" in too_big.stderr
    with cluster.client(timeout=10.0) as client:
        got = client.get(b"blob")
        assert got.value == big and got.version == 1
        assert client.row_get(b"table", b"r1").value == b"\x00row"
        assert client.scan(b"inbox").rows[0].value == b"msg\n"


def test_cli_values_round_trip_as_bytes(cluster):
    """Every byte value, the empty value and a value at the limit come back exactly: raw
    from get and row-get, in base64 with --base64 and in JSON's value_base64; scan and
    changes refuse a value their text lines cannot carry and ask for --base64 or --json."""
    import base64
    import random

    from kvsvr.limits import VALUE_BYTES_MAX

    def kv(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run([sys.executable, "-m", "kvsvr.cli", "--config",
                                 cluster.config_path, *args], input=stdin,
                                capture_output=True, timeout=60)
        return result

    every_byte = bytes(range(256))
    at_limit = random.Random(7).randbytes(VALUE_BYTES_MAX)
    for key, value in [("all", every_byte), ("empty", b""), ("big", at_limit)]:
        assert kv("put", key, "-", stdin=value).returncode == 0
        got = kv("get", key)
        assert got.returncode == 0 and got.stdout == value, got.stderr
        assert base64.b64decode(kv("get", key, "--base64").stdout) == value
        assert base64.b64decode(kv("--base64", "get", key).stdout) == value
        answer = json.loads(kv("--json", "get", key).stdout)
        assert base64.b64decode(answer["value_base64"]) == value
        assert ("value" in answer) == _utf8(value)
    assert kv("row-put", "t", "hex:00ff", "-", stdin=every_byte).returncode == 0
    assert kv("row-put", "t", "plain", "a b").returncode == 0
    assert kv("row-get", "t", "hex:00ff").stdout == every_byte
    refused = kv("scan", "t")
    assert refused.returncode == 2 and b"--base64" in refused.stderr and not refused.stdout
    lines = kv("scan", "t", "--base64").stdout.decode().splitlines()
    assert lines == [f"hex:00ff\t1\t{base64.b64encode(every_byte).decode()}",
                     f"plain\t2\t{base64.b64encode(b'a b').decode()}"]
    rows = json.loads(kv("--json", "scan", "t").stdout)["rows"]
    assert [base64.b64decode(r["row_base64"]) for r in rows] == [b"\x00\xff", b"plain"]
    assert [base64.b64decode(r["value_base64"]) for r in rows] == [every_byte, b"a b"]
    assert rows[1]["value"] == "a b" and "value" not in rows[0]
    assert kv("changes", "t", "0").returncode == 2
    changes = kv("changes", "t", "1", "--base64").stdout.decode().splitlines()
    assert changes == [f"2\tplain\tput\t{base64.b64encode(b'a b').decode()}"]
    assert kv("changes", "t", "1").stdout.decode().splitlines() == ["2\tplain\tput\ta b"]


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_cli_get_adds_a_newline_only_on_a_terminal(cluster, kv):
    """On a terminal the value ends its line (the prompt comes back on the next); in a pipe
    or file the bytes are the value's alone (see test_cli_values_round_trip_as_bytes)."""
    import os
    import pty

    kv("put", "greeting", "hello")
    leader, follower = pty.openpty()
    try:
        result = subprocess.run([sys.executable, "-m", "kvsvr.cli", "--config",
                                 cluster.config_path, "get", "greeting"], stdout=follower,
                                stderr=subprocess.PIPE, timeout=60)
        assert result.returncode == 0, result.stderr
        assert os.read(leader, 100).replace(b"\r\n", b"\n") == b"hello\n"
    finally:
        os.close(leader)
        os.close(follower)
