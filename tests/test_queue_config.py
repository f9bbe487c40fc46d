"""Queue groups in the cluster config: valid ones load, every mistake names its field."""

from __future__ import annotations

import pytest

from kvsvr import config
from kvsvr.errors import ConfigError

BASE = '''
[[groups]]
name = "g1"
shards = ["0-4095"]
[[groups.replicas]]
node = "n1"
campus = "a"
address = "tcp://127.0.0.1:7001"
data_dir = "d/n1"
'''


def queue_group(name="q1", nodes=("qa", "qb", "qc"), campuses=("a", "b", "c"),
                ports=(7101, 7102, 7103)):
    text = f'\n[[queue_groups]]\nname = "{name}"\n'
    for node, campus, port in zip(nodes, campuses, ports, strict=False):
        text += (f'[[queue_groups.servers]]\nnode = "{node}"\ncampus = "{campus}"\n'
                 f'address = "tcp://127.0.0.1:{port}"\ndata_dir = "d/{node}"\n')
    return text


def test_queue_groups_load():
    """Two queue groups and queue settings decode; servers are found by name."""
    cfg = config.parse(BASE + queue_group() + queue_group("q2", ("qd", "qe", "qf"),
                                                          ports=(7104, 7105, 7106))
                       + "\n[queue]\nack_deadline_ms = 1500\n")
    assert [g.name for g in cfg.queue_groups] == ["q1", "q2"]
    assert cfg.queue.ack_deadline_ms == 1500 and cfg.queue.sync is True
    group, server = cfg.queue_server("qe")
    assert group.name == "q2" and server.campus == "b"


def test_configs_without_queue_groups_are_unchanged():
    """The queue sections are optional: the embedded default still has none."""
    assert config.default().queue_groups == []


@pytest.mark.parametrize("text, field", [
    (BASE + queue_group(nodes=("qa", "qb")), "queue_groups[0].servers"),
    (BASE + queue_group(campuses=("a", "a", "c")), "queue_groups[0].servers[1].campus"),
    (BASE + queue_group(nodes=("qa", "n1", "qc")), "queue_groups[0].servers[1].node"),
    (BASE + queue_group(ports=(7101, 7001, 7103)), "queue_groups[0].servers[1].address"),
    (BASE + queue_group(name="g1"), "queue_groups[0].name"),
    (BASE + queue_group() + queue_group(nodes=("qd", "qe", "qf"), ports=(1, 2, 3)),
     "queue_groups[1].name"),
    (BASE + queue_group(ports=(7101, 7102, 99999)), "queue_groups[0].servers[2].address"),
    (BASE + queue_group() + "\n[queue]\nack_deadline_ms = 5\n", "queue.ack_deadline_ms"),
    (BASE + queue_group() + "\n[queue]\nack_deadline_ms = 5000\nbatch_lifetime_ms = 4000\n",
     "queue.batch_lifetime_ms"),
    (BASE + queue_group() + "\n[queue]\nsegmnt_mib = 5\n", "segmnt_mib"),
    (BASE + queue_group().replace('campus = "a"', 'campus = 7'), "queue_groups[0].servers[0]"),
])
def test_bad_queue_configs_name_the_field(text, field):
    """Wrong server counts, shared campuses, nodes or addresses, bad settings, typos."""
    with pytest.raises(ConfigError) as error:
        config.parse(text)
    assert field in str(error.value)


def test_unknown_queue_server_is_clear():
    with pytest.raises(ConfigError, match="'zz' is not a queue server"):
        config.parse(BASE + queue_group()).queue_server("zz")


def test_the_monitor_center_address_must_not_be_a_servers():
    """The monitor center listens on its own address: a queue server (or replica) on the
    same one is refused naming both; with monitoring off the address is not used."""
    clash = queue_group(ports=(7500, 7102, 7103))
    with pytest.raises(ConfigError) as error:
        config.parse(BASE + clash)
    assert ("monitor.center: 'tcp://127.0.0.1:7500' is already used by "
            "queue_groups[0].servers[0]") in str(error.value)
    cfg = config.parse(BASE + clash + "\n[monitor]\nenabled = false\n")
    assert cfg.queue_groups[0].servers[0].address == "tcp://127.0.0.1:7500"


def test_a_queue_only_config_loads_and_kv_use_of_it_is_refused_clearly():
    """Only [[queue_groups]]: fine for the queue; asking it for KV replicas or shards names
    the missing [[groups]]. A config with neither kind of group is refused."""
    cfg = config.parse(queue_group())
    assert cfg.groups == [] and [g.name for g in cfg.queue_groups] == ["q1"]
    cfg.require_queue_groups()
    for use in (cfg.require_kv_groups, cfg.shard_table, lambda: cfg.replica("qa")):
        with pytest.raises(ConfigError, match=r"groups: the config has no KV groups"):
            use()
    with pytest.raises(ConfigError, match=r"queue_groups: the config has no queue groups"):
        config.default().require_queue_groups()
    with pytest.raises(ConfigError, match=r"groups: the config has neither KV groups"):
        config.parse('name = "empty"\n')
