"""Sums across several machines: a second is summed and judged only once every reporting
machine has shipped it (machines on other agent phases never count as 0), a machine silent
for long stops holding the sum back, sum-scope rules fire on real sums, absent rules read
their last value from what ingest noted, and the incremental sum equals a full rebuild."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvsvr import _core
from kvsvr.errors import ConfigError
from kvsvr.monitor.center import Center
from kvsvr.monitor.registry import load_registry
from kvsvr.monitor.report import Report
from kvsvr.monitor.rules import parse_rules
from kvsvr.monitor.series import SeriesStore

T = 1_800_000_000
HITS = 1000
REGISTRY = """
[[ids]]
id = 1000
name = "test.hits"
description = "hits"
"""


def _center(tmp_path: Path, rules: str, live_s: float = 150) -> Center:
    (tmp_path / "registry.toml").write_text(REGISTRY)
    registry = load_registry([tmp_path / "registry.toml"])
    return Center(SeriesStore(tmp_path / "data", sync=False), parse_rules(rules, registry),
                  registry, live_s=live_s)


def _report(machine: str, first: int, through: int, value: int = 200) -> Report:
    return Report(machine, first, through,
                  [(s, _core.encode_block([(HITS, value)])) for s in range(first, through + 1)])


SUM_LOW = """
[[rules]]
name = "sum-low"
id = "test.hits"
kind = "threshold"
scope = "sum"
op = "<"
value = 300
window_s = 10
"""


def test_machines_on_other_phases_do_not_make_the_sum_partial(tmp_path):
    """Two machines at 200/s each, their agents 30 s apart: A has shipped through T, B only
    through T-30. The sum is complete through T-30 only: the rule judges 400/s there and
    does not fire, and the sum's curve stops at T-30 (it used to draw 200 and fire)."""
    center = _center(tmp_path, SUM_LOW)
    store = center.store
    store.ingest(_report("A", T - 119, T - 60), T - 58)
    store.ingest(_report("B", T - 119, T - 30), T - 28)
    store.ingest(_report("A", T - 59, T), T + 2)
    assert center.sum_through(T + 3) == T - 30
    assert center.evaluate_rules(T + 3) == []
    assert center.findings[("sum-low", "")].value == 400
    # B ships its next period: the sum is complete through T now, still 400/s.
    store.ingest(_report("B", T - 29, T + 30), T + 32)
    store.ingest(_report("A", T + 1, T + 30), T + 32)
    assert center.sum_through(T + 33) == T + 30
    assert center.evaluate_rules(T + 33) == []
    assert store.series(HITS, T - 5, T) == [400] * 6


def test_a_real_drop_in_the_sum_still_fires(tmp_path):
    """The same two machines; B's count falls to 0: once both have shipped those seconds
    the sum is 200/s and the rule fires."""
    center = _center(tmp_path, SUM_LOW)
    center.store.ingest(_report("A", T - 20, T), T + 2)
    center.store.ingest(_report("B", T - 20, T, value=0), T + 2)
    (event,) = center.evaluate_rules(T + 3)
    assert (event.rule, event.state, event.value) == ("sum-low", "firing", 200)


def test_a_silent_machine_stops_holding_the_sum_back(tmp_path):
    """B stopped reporting long ago (more than live_s): the sum goes on with A alone (B's
    silence is the absent rule's business), up to A's newest second, never past now."""
    center = _center(tmp_path, SUM_LOW, live_s=150)
    center.store.ingest(_report("B", T - 1000, T - 900), T - 898)
    center.store.ingest(_report("A", T - 1000, T), T + 2)
    assert center.sum_through(T + 3) == T
    assert center.sum_through(T - 899) == T - 900      # B reporting: it holds the sum
    assert center.sum_through(T - 950) == T - 950      # never past the center's clock
    center.forget("B")
    assert set(center.store.machines()) == {"A"}


ABSENT = """
[[rules]]
name = "quiet"
id = "test.hits"
kind = "absent"
scope = "machine"
for_s = 86400
"""


def test_absent_rules_use_the_last_value_noted_at_ingest(tmp_path):
    """for_s of a day: a last value 100,001 s ago fires; then a report through handle()
    notes the new last value, so the next tick clears without reading a day back."""
    center = _center(tmp_path, ABSENT)
    center.store.ingest(_report("A", T - 100_000, T - 100_000), T)
    center.store.ingest(Report("A", T - 99_999, T, []), T)
    (event,) = center.evaluate_rules(T + 1)
    assert (event.rule, event.machine, event.state) == ("quiet", "A", "firing")
    center._note_values(_report("A", T + 1, T + 1))
    center.store.ingest(_report("A", T + 1, T + 1), T + 2)
    assert center.last_value[("A", HITS)] == T + 1
    (event,) = center.evaluate_rules(T + 3)
    assert event.state == "cleared"


def test_absent_for_s_longer_than_a_day_is_refused():
    """An absent rule cannot look back further than one query reads (a day): it would fire
    early; refused naming the field."""
    registry = load_registry()
    with pytest.raises(ConfigError, match=r"rules\[0\].for_s"):
        parse_rules('[[rules]]\nname = "x"\nid = "node.requests"\nkind = "absent"\n'
                    'for_s = 172800\n', registry)


def test_the_incremental_sum_equals_a_rebuild(tmp_path):
    """Machines' blocks for the same seconds, in random order, some resent identically and
    some re-shipped with different values (a clock step): every stored sum equals the sum
    of the machines' stored blocks."""
    store = SeriesStore(tmp_path / "data", sync=False)
    rng = random.Random(4)
    for _ in range(200):
        machine = f"m{rng.randrange(6)}"
        second = T + rng.randrange(5)
        pairs = [(i, rng.randrange(-50, 50)) for i in sorted(rng.sample(range(1, 30), 5))]
        store.ingest(Report(machine, second, second,
                            [(second, _core.encode_block(pairs))]), 0.0)
    for second in range(T, T + 5):
        machines = [store.blocks(second, second, m)[0] for m in store.machines()]
        expected = _core.sum_blocks([b for b in machines if b is not None])
        assert store.blocks(second, second)[0] == expected


def test_sum_blocks_are_checked_and_match_a_dict_model():
    """merge/sum of blocks: ids in the union, values added; an i64 overflow is an
    OverflowError naming the id, never a wrapped number."""
    rng = random.Random(7)
    for _ in range(50):
        blocks = [{i: rng.randrange(-10**12, 10**12) for i in rng.sample(range(1, 100), 10)}
                  for _ in range(rng.randrange(0, 5))]
        model: dict[int, int] = {}
        for block in blocks:
            for i, v in block.items():
                model[i] = model.get(i, 0) + v
        encoded = [_core.encode_block(b.items()) for b in blocks]
        assert _core.decode_block(_core.sum_blocks(encoded)) == model
    big = _core.encode_block([(5, 2**62)])
    with pytest.raises(OverflowError, match="id 5"):
        _core.sum_blocks([big, big])
    with pytest.raises(OverflowError, match="id 5"):
        _core.merge_blocks(big, big)
