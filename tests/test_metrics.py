"""Prometheus /metrics, through real processes and real HTTP: the monitor center's endpoint
and an agent's opt-in endpoint, each checked by a strict parser of the text exposition format
(0.0.4) written here: every registered id with HELP and TYPE lines, counters as counters,
gauges as gauges, the cluster/datacenter/campus/machine labels, the values counted."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kvsvr.launcher import free_port, write_single_node_config
from kvsvr.monitor import prometheus
from kvsvr.monitor.counters import open_counters
from kvsvr.monitor.registry import builtin_registry, load_registry

HITS, LEVEL, UNUSED = 1000, 1001, 1500
MACHINE = "m1"

REGISTRY = """
[[ids]]
id = 1000
name = "test.hits"
description = "Adds by the test"

[[ids]]
id = 1001
name = "test.level"
kind = "gauge"
description = "A level the test sets"

[[ids]]
id = 1500
name = "test.unused"
description = "An id nothing counts: still listed, with \\\\ and \\"quotes\\""
"""

# --- a strict parser of the text exposition format, version 0.0.4 --------------------------
_METRIC = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_VALUE = r"[-+]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9]+|Inf|NaN)"
_SAMPLE = re.compile(rf"^({_METRIC})(\{{(.*)\}})? ({_VALUE})( -?[0-9]+)?$")
_HELP = re.compile(rf"^# HELP ({_METRIC}) (.*)$")
_TYPE = re.compile(rf"^# TYPE ({_METRIC}) (counter|gauge|histogram|summary|untyped)$")
_PAIR = re.compile(rf'({_LABEL})="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


@dataclass
class Family:
    type: str = ""
    help: str = ""
    samples: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)


def _unescape(text: str, quotes: bool) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\":
            following = text[i + 1:i + 2]
            allowed = {"\\": "\\", "n": "\n"} | ({'"': '"'} if quotes else {})
            assert following in allowed, f"bad escape \\{following} in {text!r}"
            out.append(allowed[following])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _labels(text: str) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    position = 0
    while position < len(text):
        match = _PAIR.match(text, position)
        assert match, f"malformed labels at {text[position:]!r}"
        assert not match.group(1).startswith("__"), "reserved label name"
        pairs.append((match.group(1), _unescape(match.group(2), True)))
        position = match.end()
    names = [n for n, _ in pairs]
    assert len(names) == len(set(names)), f"a label twice in {text!r}"
    return tuple(sorted(pairs))


def parse_exposition(text: str) -> dict[str, Family]:
    """Families by name; AssertionError on anything the format does not allow (metadata after
    samples, a family split in two, a sample repeated, a counter without _total, ...)."""
    assert text.endswith("\n"), "the last line must end with a newline"
    families: dict[str, Family] = {}
    finished: set[str] = set()
    current = None
    for line in text[:-1].split("\n"):
        assert line, "an empty line"
        if line.startswith("#"):
            help_match, type_match = _HELP.match(line), _TYPE.match(line)
            assert help_match or type_match, f"a comment that is neither HELP nor TYPE: {line!r}"
            match = help_match or type_match
            assert match is not None
            name = match.group(1)
            assert name not in finished, f"{name}: metadata after its samples ended"
            family = families.setdefault(name, Family())
            if help_match:
                assert not family.help, f"{name}: two HELP lines"
                family.help = _unescape(help_match.group(2), False)
            else:
                assert not family.type and not family.samples, f"{name}: TYPE late or twice"
                family.type = match.group(2)
            if current is not None and current != name:
                finished.add(current)
            current = name
            continue
        sample = _SAMPLE.match(line)
        assert sample, f"not a sample line: {line!r}"
        name = sample.group(1)
        assert name not in finished, f"{name}: its samples are not together"
        if current is not None and current != name:
            finished.add(current)
        current = name
        family = families.setdefault(name, Family())
        labels = _labels(sample.group(3) or "")
        assert labels not in family.samples, f"{name}{labels}: a sample twice"
        value = float(sample.group(4).replace("Inf", "inf"))
        family.samples[labels] = value
    for name, family in families.items():
        assert family.type, f"{name}: no TYPE line"
        if family.type == "counter":
            assert name.endswith("_total"), f"{name}: a counter's name ends in _total"
            assert all(v >= 0 and not math.isnan(v) for v in family.samples.values())
    return families


def test_the_strict_parser_refuses_what_the_format_does_not_allow():
    """The parser used below is itself checked: each broken text is refused."""
    good = ('# HELP a_total x\n# TYPE a_total counter\na_total{l="v"} 1\n'
            '# TYPE b gauge\nb -Inf\n')
    assert set(parse_exposition(good)) == {"a_total", "b"}
    for broken in ['# TYPE a counter\na 1\n',                     # counter without _total
                   'a_total 1\n',                                 # no TYPE
                   '# TYPE a gauge\na{l="v} 1\n',                 # unclosed quote
                   '# TYPE a gauge\na{l="\\x"} 1\n',              # bad escape
                   '# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na 2\n',  # split family
                   '# TYPE a gauge\na 1\na 2\n',                  # repeated sample
                   '# TYPE a gauge\na one\n',                     # not a number
                   '# TYPE a gauge\na 1',                         # no final newline
                   '# TYPE 1a gauge\n1a 1\n']:                    # bad name
        with pytest.raises(AssertionError):
            parse_exposition(broken)


def test_names_and_escapes_of_the_renderer():
    """Dotted names become Prometheus names, counters end in _total, HELP and label values
    are escaped so the text still parses."""
    assert prometheus.metric_name("node.requests", "counter") == "kvsvr_node_requests_total"
    assert prometheus.metric_name("node.binlog_lag", "gauge") == "kvsvr_node_binlog_lag"
    text = prometheus.render([prometheus.Family(
        7, "a.b", "gauge", 'back\\slash\nnew "line"', {("c", 'd"\\\n', "e", "f"): 1.5})])
    family = parse_exposition(text)["kvsvr_a_b"]
    assert family.help == 'back\\slash\nnew "line" (id 7)'
    assert list(family.samples.values()) == [1.5]
    assert dict(next(iter(family.samples)))["datacenter"] == 'd"\\\n'


# --- real processes ---------------------------------------------------------------------
class Processes:
    def __init__(self, directory: Path):
        self.directory = directory
        self.config = write_single_node_config(directory)
        (directory / "registry.toml").write_text(REGISTRY)
        self.counters_path = directory / "counters"
        self.web_port, self.agent_port = free_port(), free_port()
        with open(self.config, "a") as f:
            f.write(f"""
[monitor]
counters_path = "{self.counters_path}"
window_s = 60
registry = ["registry.toml"]
center = "tcp://127.0.0.1:{free_port()}"
web = "127.0.0.1:{self.web_port}"
data_dir = "monitor-data"
agent_period_s = 1
agent_state_dir = "agent-state"
machine = "{MACHINE}"
datacenter = "dc1"
agent_metrics = "127.0.0.1:{self.agent_port}"
""")
        self.logs = directory / "logs"
        self.logs.mkdir()
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, module: str) -> None:
        with open(self.logs / f"{module}.log", "ab") as log:
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", module, "--config", str(self.config)],
                stdout=log, stderr=log))

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGKILL)
            process.wait()

    def logs_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.logs.iterdir())


def _get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.headers["Content-Type"], answer.read().decode()


def _wait(what: str, predicate: Any, processes: Processes, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (OSError, KeyError, StopIteration):
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})\n"
                         f"{processes.logs_text()}")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    processes = Processes(tmp_path_factory.mktemp("metrics"))
    open_counters(processes.counters_path, window_s=60,
                  registry=load_registry([processes.directory / "registry.toml"]))
    processes.start("kvsvr.monitor.center")
    processes.start("kvsvr.monitor.agent")
    try:
        yield processes
    finally:
        processes.stop()


def _sample(families: dict[str, Family], name: str) -> tuple[dict[str, str], float]:
    labels, value = next(iter(families[name].samples.items()))
    return dict(labels), value


def test_center_metrics_list_every_id_with_labels_and_counted_values(running):
    """What a process counts reaches the center's /metrics as the running total of a counter
    and the newest value of a gauge, on one series per machine labelled cluster, datacenter
    (from the config), campus (of the machine's node) and machine; every registered id has
    its HELP and TYPE lines, the one nothing counted too."""
    counters = open_counters(running.counters_path)
    for _ in range(7):
        counters.add(HITS, 3)
    counters.set(LEVEL, 42)
    url = f"http://127.0.0.1:{running.web_port}/metrics"

    def counted() -> dict[str, Family] | None:
        content_type, text = _get(url)
        assert content_type == prometheus.CONTENT_TYPE
        families = parse_exposition(text)
        hits = families["kvsvr_test_hits_total"].samples
        return families if hits and next(iter(hits.values())) == 21 else None

    families = _wait("the center's total of test.hits", counted, running)
    labels = _sample(families, "kvsvr_test_hits_total")[0]
    assert labels == {"cluster": "local", "datacenter": "dc1", "campus": "a",
                      "machine": MACHINE}
    assert _sample(families, "kvsvr_test_level") == (labels, 42)
    assert families["kvsvr_test_level"].type == "gauge"
    registry = load_registry([running.directory / "registry.toml"])
    for entry in registry.list():
        name = prometheus.metric_name(entry.name, entry.kind)
        assert families[name].type == entry.kind, name
        assert families[name].help == f"{entry.description} (id {entry.id})"
    assert families["kvsvr_test_unused_total"].samples == {tuple(sorted(labels.items())): 0}
    assert families["kvsvr_monitor_reports_total"].samples
    assert families["kvsvr_monitor_rules_loaded"].type == "gauge"


def test_agent_metrics_expose_the_machines_own_counters(running):
    """The agent's opt-in endpoint shows this machine's counts straight from the counters
    file (a counter's total of complete seconds since the agent started, a gauge's newest
    value) with the same names and labels; other paths are 404."""
    counters = open_counters(running.counters_path)
    url = f"http://127.0.0.1:{running.agent_port}/metrics"
    _wait("the agent's endpoint", lambda: _get(url), running)
    before = _sample(parse_exposition(_get(url)[1]), "kvsvr_test_hits_total")[1]
    for _ in range(5):
        counters.add(HITS, 2)
    counters.set(LEVEL, 77)

    def counted() -> dict[str, Family] | None:
        content_type, text = _get(url)
        assert content_type == prometheus.CONTENT_TYPE
        families = parse_exposition(text)
        return families if _sample(families, "kvsvr_test_hits_total")[1] >= before + 10 \
            else None

    families = _wait("the agent's total of test.hits", counted, running, timeout_s=15)
    labels, value = _sample(families, "kvsvr_test_hits_total")
    assert value == before + 10
    assert labels == {"cluster": "local", "datacenter": "dc1", "campus": "a",
                      "machine": MACHINE}
    assert _sample(families, "kvsvr_test_level")[1] == 77
    for entry in builtin_registry().list():
        assert families[prometheus.metric_name(entry.name, entry.kind)].type == entry.kind
    assert "kvsvr_test_unused_total" in families
    with pytest.raises(urllib.error.HTTPError) as refused:
        _get(f"http://127.0.0.1:{running.agent_port}/other")
    assert refused.value.code == 404


def test_agent_metrics_are_off_by_default_and_a_bad_address_is_refused(tmp_path):
    """Without agent_metrics nothing listens; a malformed one is a config error naming the
    field."""
    from kvsvr.config import parse
    from kvsvr.errors import ConfigError

    base = write_single_node_config(tmp_path).read_text()
    assert parse(base, base_dir=tmp_path).monitor.agent_metrics == ""
    with pytest.raises(ConfigError, match=r"monitor\.agent_metrics: 'nowhere', expected HOST:PORT"):
        parse(base + '\n[monitor]\nagent_metrics = "nowhere"\n', base_dir=tmp_path)
