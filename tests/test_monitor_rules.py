"""Alert rules as tables: each kind fires and clears on synthetic series; bad rule configs are
refused naming the field."""

from __future__ import annotations

import pytest

from kvsvr.errors import ConfigError
from kvsvr.monitor.registry import MonitorId, builtin_registry
from kvsvr.monitor.rules import (
    Finding,
    Rule,
    evaluate,
    parse_rules,
    samples_needed,
    transition,
)

REGISTRY = builtin_registry()
REGISTRY.add(MonitorId(1000, "test.level", "a level", "gauge"))


def _rule(**fields) -> object:
    text = "[[rules]]\n" + "".join(
        f"{k} = {v!r}\n".replace("'", '"') for k, v in {"name": "r", **fields}.items())
    (resolved,) = parse_rules(text, REGISTRY)
    return resolved


N = None
THRESHOLD_CASES = [
    # fields, samples (oldest first), firing
    ({"id": "node.failures", "kind": "threshold", "op": ">", "value": 5}, [9], True),
    ({"id": "node.failures", "kind": "threshold", "op": ">", "value": 5}, [5], False),
    ({"id": "node.failures", "kind": "threshold", "op": ">=", "value": 5}, [5], True),
    ({"id": "node.failures", "kind": "threshold", "op": ">", "value": 6, "window_s": 4},
     [20, 1, 1, 1], False),          # the mean over the window, not one spike: 23/4 = 5.75
    ({"id": "node.failures", "kind": "threshold", "op": ">", "value": 5, "window_s": 4},
     [9, 9, 1, 5], True),            # 24/4 = 6
    ({"id": "node.failures", "kind": "threshold", "op": ">", "value": 5, "window_s": 3},
     [12, N, N], False),             # a counter: the covered seconds without values are 0
    ({"id": "test.level", "kind": "threshold", "op": ">", "value": 5, "window_s": 3},
     [12, N, N], True),              # a gauge: only the seconds it was set count
    ({"id": "test.level", "kind": "threshold", "op": "<", "value": 1, "window_s": 3},
     [N, N, N], False),              # no sample: not this rule's business
    ({"id": "node.failures", "kind": "threshold", "op": "<", "value": 1}, [0], True),
    ({"id": "node.failures", "kind": "threshold", "op": "<=", "value": -3}, [-3], True),
]

RATE_CASES = [
    ({"id": "node.requests", "kind": "rate", "op": ">", "value": 50, "window_s": 2},
     [10, 10, 20, 20], True),         # +100 %
    ({"id": "node.requests", "kind": "rate", "op": ">", "value": 50, "window_s": 2},
     [10, 10, 14, 14], False),        # +40 %
    ({"id": "node.requests", "kind": "rate", "op": "<", "value": -50, "window_s": 2},
     [100, 100, 10, 30], True),       # -80 %
    ({"id": "node.requests", "kind": "rate", "op": "<", "value": -50, "window_s": 2},
     [100, 100, 90, 80], False),
    ({"id": "node.requests", "kind": "rate", "op": ">", "value": 100, "window_s": 1},
     [0, 5], True),                   # from 0: the change is measured against 1
    ({"id": "test.level", "kind": "rate", "op": ">", "value": 10, "window_s": 2},
     [N, N, 5, 5], False),            # no earlier window: no rate
]


@pytest.mark.parametrize(("fields", "samples", "firing"), THRESHOLD_CASES + RATE_CASES)
def test_threshold_and_rate_rules(fields, samples, firing):
    """Each row: a rule and the samples ending at the newest covered second -> firing?"""
    resolved = _rule(**fields)
    assert samples_needed(resolved.rule) == len(samples)
    finding = evaluate(resolved, samples, 0.0, None)
    assert finding.firing is firing, finding.message


ABSENT_CASES = [
    # for_s, now, newest second with a value (None: none in the look-back), firing
    (10, 1000.0, 995, False),
    (10, 1000.0, 990, False),
    (10, 1000.0, 989, True),
    (10, 1000.0, None, True),
    (60, 1000.0, 941, False),
]


@pytest.mark.parametrize(("for_s", "now", "last", "firing"), ABSENT_CASES)
def test_absent_rule(for_s, now, last, firing):
    """A value that stopped arriving fires once it has been silent longer than for_s."""
    resolved = _rule(id="node.requests", kind="absent", for_s=for_s)
    finding = evaluate(resolved, [], now, last)
    assert finding.firing is firing, finding.message


@pytest.mark.parametrize(("for_s", "now", "last", "covered_from", "firing"), [
    # a machine reporting since second 990 has not been silent for more than 10 s at 1000
    (10, 1000.0, None, 990, False),
    (10, 1000.0, None, 989, True),
    (10, 1000.0, 985, 995, False),     # the later of the last value and the coverage counts
    (10, 1000.0, 985, 989, True),
    (180, 1000.0, None, 999, False),   # a cluster just started: no alert
])
def test_absent_rule_counts_silence_from_the_first_report(for_s, now, last, covered_from,
                                                          firing):
    """Before, a machine whose first report held no value yet fired at once ("no value for
    more than 180 s") as the cluster started."""
    resolved = _rule(id="node.requests", kind="absent", for_s=for_s)
    finding = evaluate(resolved, [], now, last, covered_from)
    assert finding.firing is firing, finding.message


def test_a_series_fires_then_clears_exactly_once_each():
    """Walking a threshold rule along a series gives one 'firing' event where it crosses and
    one 'cleared' where it falls back, nothing in between."""
    resolved = _rule(id="node.failures", kind="threshold", op=">", value=5, window_s=2)
    series = [0, 1, 2, 9, 9, 9, 8, 1, 0, 0, 0]
    events = []
    firing = False
    for end in range(2, len(series) + 1):
        finding = evaluate(resolved, series[end - 2:end], 0.0, None)
        change = transition(firing, finding)
        if change:
            events.append((end - 1, change))
            firing = change == "firing"
    assert events == [(3, "firing"), (7, "cleared")]   # means 5.5 then 4.5


def test_transition_table():
    """firing/cleared only on a change of state."""
    on, off = Finding(True, 1.0, ""), Finding(False, 0.0, "")
    assert [transition(False, on), transition(True, on), transition(True, off),
            transition(False, off)] == ["firing", None, "cleared", None]


@pytest.mark.parametrize(("text", "message"), [
    ('[[rules]]\nname = "a"\nid = "no.such"\nkind = "threshold"', "rules\\[0\\].id: 'no.such'"),
    ('[[rules]]\nname = "a"\nid = 99999\nkind = "threshold"', "rules\\[0\\].id: 99999"),
    ('[[rules]]\nname = "a"\nid = 1\nkind = "median"', "rules\\[0\\].kind"),
    ('[[rules]]\nname = "a"\nid = 1\nkind = "threshold"\nop = "=="', "rules\\[0\\].op"),
    ('[[rules]]\nname = "a"\nid = 1\nkind = "threshold"\nwindow_s = 0', "window_s"),
    ('[[rules]]\nname = "a"\nid = 1\nkind = "rate"\nwindow_s = 3000', "compares two windows"),
    ('[[rules]]\nname = "a"\nid = 1\nkind = "absent"\nfor_s = 0', "for_s"),
    ('[[rules]]\nname = "a"\nid = 1\nkind = "threshold"\nvalue = nan', "finite"),
    ('[[rules]]\nname = "a"\nid = 1\nkind = "threshold"\nscope = "rack"', "scope"),
    ('[[rules]]\nname = "a b"\nid = 1\nkind = "threshold"', "rules\\[0\\].name"),
    ('[[rules]]\nname = "a"\nid = 1\nkind = "threshold"\nthreshold = 3', "threshold"),
    ('[[rules]]\nname = "a"\nid = 1\nkind = "threshold"\n'
     '[[rules]]\nname = "a"\nid = 2\nkind = "threshold"', "rules\\[1\\].name: 'a' is used"),
    ('[[rules]]\nname = "a"\nkind = "threshold"', "id"),
    ("rules = 3", "rules"),
])
def test_bad_rule_configs_are_refused_naming_the_field(text, message):
    """Unknown ids, kinds, operators, windows, names, fields: a ConfigError saying which."""
    with pytest.raises(ConfigError, match=message):
        parse_rules(text, REGISTRY)


def test_rules_resolve_names_and_numbers():
    """A rule may name its id or give its number; both resolve to the same id."""
    by_name = _rule(id="node.requests", kind="absent")
    by_number = _rule(id=1, kind="absent")
    assert by_name.id == by_number.id == 1
    assert isinstance(by_name.rule, Rule)

