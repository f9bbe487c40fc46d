"""The id range the README offers works with the default settings, every refusal says what is
wrong, the counters file stays sparse (only the ids in use take memory) and each cluster on a
machine has a counters file of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvsvr import _core
from kvsvr.config import default, parse
from kvsvr.errors import ConfigError
from kvsvr.launcher import free_port
from kvsvr.monitor.counters import (
    CountersError,
    cluster_counters_path,
    counters_for,
    id_refusal,
    open_counters,
    open_reader,
)
from kvsvr.monitor.registry import MonitorId, Registry, builtin_registry, parse_registry

ROOT = Path(__file__).resolve().parent.parent


def _registry(*ids: int) -> Registry:
    registry = builtin_registry()
    for id in ids:
        registry.add(MonitorId(id, f"test.id_{id}", f"test id {id}"))
    return registry


def _allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_user_ids_of_the_whole_range_register_and_count_with_the_default_sizing(tmp_path):
    """Ids 1000, 1500 and 65536 (the README's user range) register and count in a file made
    with the default settings; before, 1500 was refused as "the table is full"."""
    path = tmp_path / "counters"
    counters = open_counters(path, registry=_registry(1000, 1500, 65536))
    assert counters.max_ids == _core.MONITOR_IDS_MAX
    second = counters.now_s()
    for id in (1000, 1500, 65536):
        counters.add_at(id, id, second)
        assert counters.value_at(id, second) == id


def test_the_default_file_is_sparse_and_the_reader_touches_only_ids_in_use(tmp_path):
    """A file that holds every id takes the memory of the ids in use, also after the agent's
    reader looked for registered ids and read their seconds (reading a hole of a
    shared-memory file would allocate it)."""
    directory = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    path = directory / f"kvsvr-test-sparse-{os.getpid()}"
    try:
        counters = open_counters(path, registry=_registry(1000, 40_000))
        second = counters.now_s()
        counters.add_at(40_000, 7, second)
        counters.add_at(1, 3, second)
        reader = open_reader(path)
        ids = [id for id, _ in reader.ids]
        assert ids == [e.id for e in _registry(1000, 40_000).list()]
        assert _core.decode_block(reader.snapshot(second)) == {1: 3, 40_000: 7}
        assert os.stat(path).st_size > 300 << 20
        assert _allocated_bytes(path) < 1 << 20, "the reader allocated the file's holes"
        reader.close()
    finally:
        path.unlink(missing_ok=True)


def test_reader_matches_the_core_on_a_small_dense_file(tmp_path):
    """On a small file the reader's ids and value blocks are the core's own."""
    path = tmp_path / "counters"
    counters = open_counters(path, max_ids=2048, window_s=60, registry=_registry(1000, 2048))
    second = counters.now_s()
    counters.add_at(2048, 5, second)
    counters.add_at(2, 1, second)
    reader = open_reader(path)
    assert reader.ids == counters.registered()
    assert reader.snapshot(second) == counters.snapshot(second)


@pytest.mark.parametrize(("id", "message"), [
    (0, "id: 0 is reserved \\(ids start at 1"),
    (70_000, "id: 70000 is outside the id range 1..65536"),
    (-3, "id: -3 is outside the id range"),
    (5000, "id: 5000 is above max_ids \\(1024\\) of .*set \\[monitor\\] max_ids to at least "
           "5000 \\(the default, 65536, holds every id\\)"),
])
def test_each_refusal_says_what_is_wrong(id, message):
    """Id 0, an id outside the range and an id past a smaller max_ids each get their own
    reason (before, all of them read "the table is full at max_ids")."""
    problem = id_refusal(id, 1024)
    assert problem is not None
    assert __import__("re").search(message, problem), problem
    assert id_refusal(1024, 1024) is None


def test_registering_past_a_configured_max_ids_names_the_setting(tmp_path):
    """A registry id beyond a configured smaller max_ids is refused naming max_ids, how to
    raise it and the id's name; nothing is registered past it."""
    path = tmp_path / "counters"
    with pytest.raises(CountersError, match=r"id: 1500 is above max_ids \(1024\).*test\.id_1500"):
        open_counters(path, max_ids=1024, window_s=60, registry=_registry(1500))


@pytest.mark.parametrize(("text", "message"), [
    ('[[ids]]\nid = 0\nname = "x.y"\ndescription = "d"', "id: 0 is reserved"),
    ('[[ids]]\nid = 65537\nname = "x.y"\ndescription = "d"', "id: 65537 is outside the id "
     "range, expected 1000..65536"),
])
def test_registry_refusals_name_the_reason(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_registry(text)


def _config(name: str, port: int, extra: str = "") -> str:
    return f"""
name = "{name}"
[[groups]]
name = "g1"
shards = ["0-4095"]
[[groups.replicas]]
node = "n1"
campus = "a"
address = "tcp://127.0.0.1:{port}"
data_dir = "data/n1"
[monitor]
center = "tcp://127.0.0.1:{port + 1}"
{extra}
"""


def test_each_cluster_has_a_counters_file_of_its_own(tmp_path):
    """Two clusters on one machine (even of the same name) get two files; one cluster's
    processes derive the same file wherever its config is read from; counters_path wins."""
    one = parse(_config("alpha", 7700), base_dir=tmp_path)
    same = parse(_config("alpha", 7700), base_dir=tmp_path / "elsewhere")
    other = parse(_config("alpha", 7800), base_dir=tmp_path)
    beta = parse(_config("beta", 7700), base_dir=tmp_path)
    paths = {cluster_counters_path(c) for c in (one, other, beta)}
    assert len(paths) == 3
    assert cluster_counters_path(one) == cluster_counters_path(same)
    assert "alpha" in cluster_counters_path(one).name
    assert cluster_counters_path(one) != cluster_counters_path(default())
    chosen = parse(_config("alpha", 7700, 'counters_path = "mine"'), base_dir=tmp_path)
    assert cluster_counters_path(chosen) == tmp_path / "mine"


def test_a_node_counts_into_its_clusters_file(tmp_path):
    """counters_for (what kvsvr-node uses) opens the cluster's own file, with the builtin
    ids registered; the agent's reader of the same config finds them."""
    config = parse(_config("gamma", free_port()), base_dir=tmp_path)
    path = cluster_counters_path(config)
    try:
        sink = counters_for(config)
        sink.add(1, 2)
        reader = open_reader(config=config)
        assert reader.path == path
        assert {id for id, _ in reader.ids} >= {1, 2, 8}
    finally:
        path.unlink(missing_ok=True)


def test_agent_list_ids_reads_the_clusters_file(tmp_path):
    """kvsvr-agent --list-ids on a config lists the ids registered in that cluster's file."""
    config_path = tmp_path / "cluster.toml"
    config_path.write_text(_config("delta", free_port()))
    config = parse(config_path.read_text(), base_dir=tmp_path)
    path = cluster_counters_path(config)
    try:
        counters_for(config)
        out = subprocess.run([sys.executable, "-m", "kvsvr.monitor.agent", "--config",
                              str(config_path), "--list-ids"], capture_output=True, text=True,
                             timeout=60, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert "1\tnode.requests\tcounter\tregistered" in out.stdout
    finally:
        path.unlink(missing_ok=True)


HOLDER = """
import sys, time
from kvsvr.monitor.counters import open_counters
open_counters(sys.argv[1], window_s=8)
print("open", flush=True)
time.sleep(60)
"""


def test_stale_cluster_files_are_swept_when_a_new_one_is_made(tmp_path, monkeypatch):
    """Making a new default-named counters file removes the others that no process holds and
    that are older than their window (a cluster long gone); a file a live process maps is
    kept whatever its age, and so is a file of another kind."""
    import getpass
    import signal

    from kvsvr.monitor import counters as counters_module

    prefix = f"kvsvr-counters-{getpass.getuser()}"
    stale, live = tmp_path / f"{prefix}-stale-1", tmp_path / f"{prefix}-live-2"
    other = tmp_path / f"{prefix}-notes"
    other.write_text("not a counters file")
    subprocess.run([sys.executable, "-c", HOLDER.replace("time.sleep(60)", ""), str(stale)],
                   check=True, timeout=60, cwd=ROOT)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(live)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        real_time = counters_module.time.time
        monkeypatch.setattr(counters_module.time, "time", lambda: real_time() + 3600)
        open_counters(tmp_path / f"{prefix}-new-3", window_s=8)
        assert not stale.exists(), "the stale file was kept"
        assert live.exists() and other.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    open_counters(tmp_path / f"{prefix}-new-4", window_s=8)
    assert not live.exists(), "a file whose last holder died was kept"


def test_a_young_file_nobody_holds_yet_is_kept(tmp_path):
    """A file just made by a cluster that has not mapped it yet (younger than its window) is
    not swept by another cluster's start."""
    import getpass

    prefix = f"kvsvr-counters-{getpass.getuser()}"
    young = tmp_path / f"{prefix}-young"
    subprocess.run([sys.executable, "-c", HOLDER.replace("time.sleep(60)", ""), str(young)],
                   check=True, timeout=60, cwd=ROOT)
    open_counters(tmp_path / f"{prefix}-other", window_s=8)
    assert young.exists()
