"""The queue's edges as a user meets them, on real server processes: `quorumq status` and
`produce` against dead servers answer fast and say so in their exit code, create-topic never
resets an existing topic, configs with only queue groups (or none) are handled, and every
program has --version, "did you mean" and --json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quorumq.launcher import LocalQueueCluster, write_queue_config

ROOT = Path(__file__).resolve().parent.parent
LEAKS = ("never retrieved", "Task was destroyed", "Traceback")


def run(module: str, *args: str, stdin: str = "", timeout: float = 60,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", module, *args], input=stdin, cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    for leak in LEAKS:
        assert leak not in result.stderr, result.stderr
    return result


def quorumq(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return run("quorumq.cli", "--config", str(config), *args, stdin=stdin)


def test_status_and_produce_with_every_server_down_answer_fast(tmp_path):
    """Six servers, none running: status asks them at once (about a second in all, not
    seconds per server) and exits 4 (a group cannot take writes); produce fails with
    Unavailable in about a second, not after the batch lifetime, and leaks no future."""
    config = write_queue_config(tmp_path, groups=2, ack_deadline_ms=5000,
                                batch_lifetime_ms=30_000)
    started = time.monotonic()
    status = quorumq(config, "status")
    assert time.monotonic() - started < 5.0
    assert status.returncode == 4, status
    assert status.stdout.count("DOWN") == 6 and "q2: 0/3 servers up: UNAVAILABLE" in status.stdout
    started = time.monotonic()
    produced = quorumq(config, "produce", "t", "hello")
    assert time.monotonic() - started < 6.0
    assert produced.returncode == 4 and "NOT acknowledged" in produced.stderr, produced
    assert "unavailable" in produced.stderr


def test_status_exit_codes_follow_the_groups(tmp_path):
    """All up: 0; one server down: 3 (the group still takes writes); two of a group down:
    4. --json carries the same verdict."""
    config = write_queue_config(tmp_path)
    with LocalQueueCluster(config, log_dir=tmp_path / "logs") as queue:
        assert quorumq(config, "status").returncode == 0
        queue.kill("q1a")
        degraded = quorumq(config, "--json", "status")
        assert degraded.returncode == 3
        document = json.loads(degraded.stdout)
        assert document["state"] == "partial"
        assert document["groups"] == [{"group": "q1", "servers_up": 2, "servers": 3,
                                       "available": True}]
        queue.kill("q1b")
        down = quorumq(config, "status")
        assert down.returncode == 4 and "q1: 1/3 servers up: UNAVAILABLE" in down.stdout


def test_create_topic_again_changes_nothing_unless_told(tmp_path):
    """create-topic on an existing topic keeps its retention and says so; other settings
    without --update are refused (exit 3, unchanged); --update changes only what it is
    given; a server that lacks the topic gets the existing settings."""
    config = write_queue_config(tmp_path)
    with LocalQueueCluster(config, log_dir=tmp_path / "logs") as queue:
        first = quorumq(config, "create-topic", "logs", "--retention-bytes", "10000000",
                        "--retention-s", "604800")
        assert first.returncode == 0 and first.stdout.count("created") == 3, first
        again = quorumq(config, "create-topic", "logs")
        assert again.returncode == 0 and again.stdout.count("exists") == 3, again
        assert "retention_bytes 10000000, retention_s 604800" in again.stdout

        def settings() -> set[tuple[int, int]]:
            rows = json.loads(quorumq(config, "--json", "status").stdout)["servers"]
            return {(r["topics"]["logs"]["retention_bytes"], r["topics"]["logs"]["retention_s"])
                    for r in rows}

        assert settings() == {(10_000_000, 604_800)}
        other = quorumq(config, "create-topic", "logs", "--retention-s", "60")
        assert other.returncode == 3 and "add --update" in other.stdout
        assert settings() == {(10_000_000, 604_800)}
        updated = quorumq(config, "--json", "create-topic", "logs", "--retention-s", "60",
                          "--update")
        assert updated.returncode == 0
        assert {r["state"] for r in json.loads(updated.stdout)} == {"updated"}
        assert settings() == {(10_000_000, 60)}
        bare_update = quorumq(config, "create-topic", "logs", "--update")
        assert bare_update.returncode == 2 and "--update" in bare_update.stderr
        queue.wipe("q1c")
        queue.start("q1c")
        refill = quorumq(config, "create-topic", "logs")
        assert refill.returncode == 0 and "q1/q1c: topic 'logs' created" in refill.stdout
        assert settings() == {(10_000_000, 60)}


def test_every_command_honours_json(tmp_path):
    config = write_queue_config(tmp_path)
    with LocalQueueCluster(config, log_dir=tmp_path / "logs"):
        created = quorumq(config, "--json", "create-topic", "j")
        assert [r["state"] for r in json.loads(created.stdout)] == ["created"] * 3
        produced = quorumq(config, "--json", "produce", "j", "a", "b")
        assert json.loads(produced.stdout)["count"] == 2
        tailed = quorumq(config, "--json", "tail", "j", "--group", "g", "--idle", "1")
        assert [json.loads(line)["value"] for line in tailed.stdout.splitlines()] == ["a", "b"]
        lag = quorumq(config, "--json", "lag", "j", "--group", "g")
        assert len(json.loads(lag.stdout)) == 3
        missing = quorumq(config, "--json", "tail", "nope")
        assert missing.returncode == 1
        assert json.loads(missing.stderr) == {
            "error": "not found", "field": "topic", "exit": 1,
            "message": json.loads(missing.stderr)["message"]}


def test_configs_without_queue_groups_are_refused_at_once(tmp_path):
    """The embedded default (KV only) as a file: quorumq-cluster, quorumq and quorumq-server
    exit 2 at once saying the config has no queue groups (quorumq-cluster used to print an
    empty server list and hang); $KVSVR_CONFIG is read too."""
    kv_only = tmp_path / "kv.toml"
    kv_only.write_text((ROOT / "kvsvr" / "default_cluster.toml").read_text())
    for module, args in (("quorumq.launcher", []), ("quorumq.cli", ["status"]),
                         ("quorumq.server", ["--node", "q1a"])):
        result = run(module, "--config", str(kv_only), *args, timeout=20)
        assert result.returncode == 2, (module, result)
        assert "no queue groups" in result.stderr
        from_env = run(module, *args, env={"KVSVR_CONFIG": str(kv_only)}, timeout=20)
        assert from_env.returncode == 2 and "no queue groups" in from_env.stderr


def test_a_queue_only_config_runs_the_queue_and_kv_programs_say_so(tmp_path):
    """A config with only [[queue_groups]]: quorumq-cluster serves it and the CLI uses it;
    the KV CLI refuses it naming the missing [[groups]]."""
    config = write_queue_config(tmp_path, kv_group=False)
    assert "[[groups]]" not in config.read_text()
    cluster = subprocess.Popen([sys.executable, "-m", "quorumq.launcher", "--config",
                                str(config)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert cluster.stdout is not None
        line = cluster.stdout.readline()
        assert line.startswith("quorumq-cluster: q1a tcp://"), line
        assert quorumq(config, "create-topic", "t").returncode == 0
        assert quorumq(config, "produce", "t", "x").returncode == 0
        tailed = quorumq(config, "tail", "t", "--idle", "1")
        assert tailed.stdout.split("\t")[1].strip() == "x"
    finally:
        cluster.send_signal(signal.SIGTERM)
        assert cluster.wait(timeout=30) == 0
    kv = run("kvsvr.cli", "--config", str(config), "get", "k", timeout=20)
    assert kv.returncode == 2 and "no KV groups" in kv.stderr, kv


@pytest.mark.parametrize("module, prog", [("quorumq.cli", "quorumq"),
                                          ("quorumq.server", "quorumq-server"),
                                          ("quorumq.launcher", "quorumq-cluster")])
def test_programs_have_version(module, prog):
    result = run(module, "--version", timeout=20)
    assert result.returncode == 0 and result.stdout.startswith(f"{prog} ")


def test_a_mistyped_command_gets_a_suggestion():
    result = run("quorumq.cli", "stauts", timeout=20)
    assert result.returncode == 2 and "did you mean 'status'?" in result.stderr


@pytest.mark.parametrize("args, field", [
    (["tail", "t", "--idle", "-1"], "--idle"),
    (["tail", "t", "--max", "0"], "--max"),
    (["tail", "t", "--group", "a/b"], "group"),
    (["produce", "t", "x", "--batch", "0"], "--batch"),
    (["create-topic", "t", "--retention-s", "-1"], "--retention-s"),
    (["create-topic", "t", "--update"], "--update"),
    (["create-topic", "bad/name"], "topic"),
])
def test_bad_arguments_are_refused_before_any_server_is_asked(tmp_path, args, field):
    """No server runs: a bad argument is still exit 2 naming it (not a wait and exit 4)."""
    config = write_queue_config(tmp_path)
    result = quorumq(config, *args)
    assert result.returncode == 2 and field in result.stderr, result


def test_ctrl_c_ends_tail_follow_cleanly_with_a_last_commit(tmp_path):
    """SIGINT to `tail --follow`: exit 0 at once, no traceback, and what it printed is
    committed (the group's next tail gets nothing again)."""
    config = write_queue_config(tmp_path)
    with LocalQueueCluster(config, log_dir=tmp_path / "logs"):
        assert quorumq(config, "create-topic", "f").returncode == 0
        assert quorumq(config, "produce", "f", "one", "two").returncode == 0
        follower = subprocess.Popen([sys.executable, "-m", "quorumq.cli", "--config",
                                     str(config), "tail", "f", "--group", "g", "--follow"],
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        assert follower.stdout is not None and follower.stderr is not None
        lines = [follower.stdout.readline(), follower.stdout.readline()]
        assert [line.split("\t")[1].strip() for line in lines] == ["one", "two"]
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=10) == 0
        stderr = follower.stderr.read()
        for leak in LEAKS:
            assert leak not in stderr, stderr
        again = quorumq(config, "tail", "f", "--group", "g", "--idle", "1")
        assert again.returncode == 0 and again.stdout == ""
