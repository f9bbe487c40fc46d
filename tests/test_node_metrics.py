"""A node's own /metrics (opt-in `metrics = "HOST:PORT"` in its replica entry): requests by
method, errors, role, health, store and peers, labelled cluster, datacenter, campus and
node, in a text a strict exposition parser takes; through real node processes and HTTP."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import kvsvr
from kvsvr.config import load, parse
from kvsvr.errors import ConfigError
from kvsvr.launcher import LocalCluster, free_port, write_cluster_config
from kvsvr.monitor import prometheus
from kvsvr.monitor.node_metrics import node_families
from tests.test_metrics import parse_exposition

LABELS = ("local", "dc1", "a", "n1")


def _with_metrics(path: Path) -> dict[str, str]:
    """Give every replica of the config at `path` a metrics address; {node: HOST:PORT}."""
    text = path.read_text()
    addresses: dict[str, str] = {}

    def add(match: re.Match[str]) -> str:
        address = f"127.0.0.1:{free_port()}"
        addresses[match.group(1)] = address
        return f'{match.group(0)}\nmetrics = "{address}"'

    path.write_text(re.sub(r'node = "(n\d+)"', add, text))
    return addresses


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as answer:
        assert answer.headers["Content-Type"] == prometheus.CONTENT_TYPE
        return answer.read().decode()


def _value(text: str, name: str, **labels: str) -> float | None:
    family = parse_exposition(text).get(name)
    if family is None:
        return None
    for sample_labels, value in family.samples.items():
        if all((k, v) in sample_labels for k, v in labels.items()):
            return value
    return None


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, dict]]:
    path = write_cluster_config(tmp_path_factory.mktemp("node_metrics"), replicas=3)
    addresses = _with_metrics(path)
    cluster = LocalCluster(path)
    cluster.start()
    try:
        yield cluster, addresses
    finally:
        cluster.stop()


def test_each_node_serves_its_own_metrics(group):
    cluster, addresses = group
    with kvsvr.Client(cluster.config) as client:
        client.put("k", b"v")
        client.get("k")
        with pytest.raises(kvsvr.NotFound):
            client.get("missing")
    deadline = time.monotonic() + 10
    while True:
        texts = {node: _scrape(address) for node, address in addresses.items()}
        mutates = sum(_value(t, "kvsvr_node_process_requests_total", method="mutate") or 0
                      for t in texts.values())
        not_found = sum(_value(t, "kvsvr_node_process_errors_total", error="NotFound") or 0
                        for t in texts.values())
        if mutates >= 1 and not_found >= 1:
            break
        assert time.monotonic() < deadline, "the put and the refused get never showed"
        time.sleep(0.3)
    for node, text in texts.items():
        campus = cluster.config.replica(node)[1].campus
        labels = {"cluster": "local", "datacenter": "local", "campus": campus, "node": node}
        assert _value(text, "kvsvr_node_process_up", **labels) == 1
        assert _value(text, "kvsvr_node_process_role", role="replica", node=node) == 1
        assert _value(text, "kvsvr_node_process_health", health="ok", node=node) == 1
        assert _value(text, "kvsvr_node_store_keys", node=node) == 1
        peers = parse_exposition(text)["kvsvr_node_peer_up"].samples
        assert sorted(dict(labels)["peer"] for labels in peers) == \
            sorted(n for n in addresses if n != node)
        assert all(value == 1 for value in peers.values())


def test_a_node_answers_404_off_metrics(group):
    _, addresses = group
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://{addresses['n1']}/other", timeout=5)
    assert refused.value.code == 404


def test_the_families_of_a_status_parse_strictly():
    status = {"uptime_s": 2.5, "incarnation": 3, "role": "replica", "health": "degraded",
              "counters": {"requests.get": 4, "requests.mutate": 2, "errors.NotFound": 1,
                           "rounds": 10, "group_commit_us": 1200},
              "store": {"keys": 7, "expiring": 1},
              "waiting": {"keys": 0, "watches": 5},
              "checkpoint": {"committing": False},
              "peers": {"n2": {"up": True, "lag_records": 12, "last_heard_s": 0.1},
                        "n3": {"up": False, "lag_records": 0}}}
    text = prometheus.render(node_families(status, LABELS))
    families = parse_exposition(text)
    assert families["kvsvr_node_process_requests_total"].samples == {
        (("campus", "a"), ("cluster", "local"), ("datacenter", "dc1"), ("method", "get"),
         ("node", "n1")): 4.0,
        (("campus", "a"), ("cluster", "local"), ("datacenter", "dc1"), ("method", "mutate"),
         ("node", "n1")): 2.0}
    assert _value(text, "kvsvr_node_process_health", health="degraded") == 1
    assert _value(text, "kvsvr_node_waiting_watches") == 5
    assert _value(text, "kvsvr_node_checkpoint_committing") == 0
    assert _value(text, "kvsvr_node_peer_up", peer="n3") == 0
    assert _value(text, "kvsvr_node_peer_lag_records", peer="n2") == 12
    assert _value(text, "kvsvr_node_process_rounds_total") == 10
    # An empty status (before the first snapshot) is valid text too.
    assert "kvsvr_node_process_up" in parse_exposition(
        prometheus.render(node_families({}, LABELS)))


@pytest.mark.parametrize(("value", "message"), [
    ("nonsense", "groups[0].replicas[0].metrics: "),
    ("127.0.0.1:7580", "groups[0].replicas[0].metrics: '127.0.0.1:7580' is already used by "
                       "monitor.web"),
])
def test_bad_metrics_addresses_are_refused_naming_the_field(tmp_path, value, message):
    path = write_cluster_config(tmp_path, replicas=1)
    text = path.read_text().replace('node = "n1"', f'node = "n1"\nmetrics = "{value}"')
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(text, base_dir=tmp_path)
    assert load(write_cluster_config(tmp_path / "ok", replicas=1)).groups[0].replicas[0] \
        .metrics == ""
