"""Cluster configs: the embedded default is valid; every mistake is refused naming the field."""

from __future__ import annotations

import pytest

from kvsvr import config
from kvsvr.errors import ConfigError
from kvsvr.sharding import ShardMap, shard_of

GROUP = '''
[[groups]]
name = "{name}"
shards = [{shards}]
[[groups.replicas]]
node = "{node}"
campus = "a"
address = "tcp://127.0.0.1:{port}"
data_dir = "d/{node}"
'''
REPLICA = '''
[[groups.replicas]]
node = "{node}"
campus = "{campus}"
address = "{address}"
data_dir = "{data_dir}"
'''


def two_groups(**overrides: str) -> str:
    first = dict(name="g1", shards='"0-2047"', node="n1", port="7001")
    second = dict(name="g2", shards='"2048-4095"', node="n2", port="7002")
    second.update(overrides)
    return GROUP.format(**first) + GROUP.format(**second)


def test_embedded_default_is_valid():
    cfg = config.default()
    assert cfg.virtual_shards == 4096 and len(cfg.groups) == 1
    assert cfg.storage.sync is True


def test_two_groups_split_the_shards():
    cfg = config.parse(two_groups())
    shards = ShardMap(cfg)
    owners = {shards.group_of(f"user:{i}".encode()).name for i in range(200)}
    assert owners == {"g1", "g2"}
    assert shards.group_of(b"x").name == ("g1" if shard_of(b"x", 4096) < 2048 else "g2")


@pytest.mark.parametrize("text, field", [
    ("", "groups"),
    ("groups = []", "groups"),
    ("x = ", "not valid TOML"),
    (two_groups(shards='"2000-4095"'), "groups[1].shards[0]"),
    (two_groups(shards='"3000-4095"'), "shard 2048 is owned by no group"),
    (two_groups(shards='"4000-5000"'), "groups[1].shards[0]"),
    (two_groups(shards='"a-b"'), "groups[1].shards[0]"),
    (two_groups(node="n1"), "groups[1].replicas[0].node"),
    (two_groups(port="7001"), "groups[1].replicas[0].address"),
    (two_groups(name="g1"), "groups[1].name"),
    (two_groups(port="x"), "groups[1].replicas[0].address"),
    (two_groups() + "\n[storage]\nmap_size_mib = 'big'\n", "storage.map_size_mib"),
    (two_groups() + "\n[storage]\nsnyc = true\n", "snyc"),
    (two_groups() + "\n[storage]\ncheckpoint_interval_ms = 0\n",
     "storage.checkpoint_interval_ms"),
    (two_groups() + "\n[storage]\ncheckpoint_interval_ms = '50'\n",
     "storage.checkpoint_interval_ms"),
    ("virtual_shards = 0\n" + two_groups(), "virtual_shards"),
    (GROUP.format(name="g", shards='"0-4095"', node="n1", port="7400")
     + REPLICA.format(node="n2", campus="b", address="tcp://localhost:7400", data_dir="d2"),
     "groups[0].replicas[1].address"),
    (GROUP.format(name="g", shards='"0-4095"', node="n1", port="7400")
     + REPLICA.format(node="n2", campus="b", address="tcp://0.0.0.0:7400", data_dir="d2"),
     "groups[0].replicas[1].address"),
    (two_groups() + "\n[security]\npeer_secret = 'short'\n", "security.peer_secret"),
    (two_groups() + "\n[security]\npeer_secret = 42\n", "security.peer_secret"),
    (two_groups() + "\n[security]\npeer_sercet = 'x'\n", "peer_sercet"),
    (GROUP.format(name="g", shards='"0-4095"', node="n 1", port="1"), "node"),
])
def test_bad_configs_name_the_field(text, field):
    with pytest.raises(ConfigError) as error:
        config.parse(text)
    assert field in str(error.value)


def test_two_replicas_of_a_group_in_one_campus_are_refused():
    text = GROUP.format(name="g", shards='"0-4095"', node="n1", port="7001") + '''
[[groups.replicas]]
node = "n2"
campus = "a"
address = "tcp://127.0.0.1:7002"
data_dir = "d/n2"
'''
    with pytest.raises(ConfigError, match=r"groups\[0\].replicas\[1\].campus"):
        config.parse(text)


def test_unknown_node_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="'nx' is not in the config"):
        config.default().replica("nx")
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.toml")


def test_relative_data_dirs_resolve_against_the_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(two_groups())
    cfg = config.load(path)
    assert cfg.data_dir(cfg.groups[0].replicas[0]) == tmp_path / "d" / "n1"
