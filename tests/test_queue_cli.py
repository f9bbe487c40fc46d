"""The `quorumq` command against a real queue group: create a topic, produce, tail, status
and lag; bad input and bad configs exit with status 2 and say which field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from quorumq.launcher import LocalQueueCluster, write_queue_config


def quorumq(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quorumq.cli", "--config", str(config), *args],
                          input=stdin, capture_output=True, text=True, timeout=60)


def test_create_produce_tail_status_lag(tmp_path):
    """Messages produced by the CLI come back from tail; status shows the committed offset
    and lag 0 on the servers read."""
    config = write_queue_config(tmp_path)
    with LocalQueueCluster(config, log_dir=tmp_path / "logs"):
        assert quorumq(config, "create-topic", "news", "--retention-s", "3600").returncode == 0
        produced = quorumq(config, "produce", "news", "hello", "world")
        assert produced.returncode == 0 and "committed on q1" in produced.stdout
        assert quorumq(config, "produce", "news", stdin="a\nb\n").returncode == 0
        tailed = quorumq(config, "tail", "news", "--group", "g", "--idle", "1")
        values = [line.split("\t")[1] for line in tailed.stdout.splitlines()]
        assert sorted(values) == ["a", "b", "hello", "world"]
        status = quorumq(config, "status")
        assert status.returncode == 0 and "topic news: offsets 0..4" in status.stdout
        lag = quorumq(config, "lag", "news", "--group", "g")
        rows = [line.split("\t") for line in lag.stdout.splitlines()[1:]]
        assert len(rows) == 3 and sum(row[3] == "0" for row in rows) >= 2
        missing = quorumq(config, "produce", "nope", "x")
        assert missing.returncode == 1 and "topic" in missing.stderr
        bad = quorumq(config, "create-topic", "bad/name")
        assert bad.returncode == 2 and "topic" in bad.stderr
        dots = quorumq(config, "create-topic", "..")
        assert dots.returncode == 2 and "topic" in dots.stderr
        no_topic = quorumq(config, "tail", "nosuchtopic", "--idle", "0.5")
        assert no_topic.returncode == 1 and "nosuchtopic" in no_topic.stderr


def test_bad_config_is_refused_naming_the_field(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(write_queue_config(tmp_path / "ok").read_text().replace(
        'campus = "b"', 'campus = "a"', 2))
    result = quorumq(config, "status")
    assert result.returncode == 2 and "queue_groups[0].servers[1].campus" in result.stderr


def test_a_stopped_group_fails_produce_fast_saying_unavailable(tmp_path):
    """No server up: produce exits 4 within seconds, the error's kind is "unavailable"
    (a subclass's lowered name ran into the message), and --json gives an object."""
    config = write_queue_config(tmp_path, kv_group=False)
    produced = quorumq(config, "produce", "t", "one")
    assert produced.returncode == 4
    assert produced.stderr.startswith("quorumq: unavailable: "), produced.stderr
    as_json = quorumq(config, "--json", "produce", "t", "one")
    assert as_json.returncode == 4
    assert json.loads(as_json.stderr)["error"] == "unavailable"
