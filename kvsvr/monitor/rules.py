"""Alert rules: pure functions over per-second series, and the firing/cleared bookkeeping.

Nothing here reads a clock, a file or a socket: the center gathers the samples and calls
`evaluate`, then feeds the finding to `transition`, which says whether an event is due.

A rules file (TOML):

    [[rules]]
    name = "failures"            # unique; [A-Za-z0-9_.-]
    id = "node.failures"         # a registered id name, or its number
    kind = "threshold"           # threshold | rate | absent
    scope = "sum"                # sum (across machines) | machine (each machine on its own)
    op = ">"                     # > >= < <=  (threshold and rate)
    value = 5                    # threshold: the per-second mean over window_s;
                                 # rate: percent change of that mean from the window before
    window_s = 10                # 1..3600 (threshold and rate)
    for_s = 180                  # absent: no value for longer than this fires (1..86400)

Counters count 0 in a second the agent covered without a value; gauges count only seconds they
were set in. A threshold or rate rule with no sample in its window does not fire (a missing
value is the absent rule's business).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from kvsvr.config import decode_toml
from kvsvr.errors import ConfigError
from kvsvr.monitor.registry import Registry

RULES_MAX = 1000
WINDOW_S_MAX = 3600
ABSENT_FOR_S_MAX = 86_400     # series.SERIES_SECONDS_MAX: the look-back of one query
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}

RuleName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: RuleName
    id: int | str
    kind: Literal["threshold", "rate", "absent"]
    scope: Literal["sum", "machine"] = "sum"
    op: Literal[">", ">=", "<", "<="] = ">"
    value: float = 0.0
    window_s: Annotated[int, Meta(ge=1, le=WINDOW_S_MAX)] = 1
    # absent: at most the longest look-back of one query (a day), or it would fire early
    for_s: Annotated[int, Meta(ge=1, le=ABSENT_FOR_S_MAX)] = 180


class ResolvedRule(msgspec.Struct, frozen=True):
    rule: Rule
    id: int
    id_name: str
    counter: bool     # missing seconds count as 0


class _RulesFile(msgspec.Struct, forbid_unknown_fields=True):
    rules: Annotated[list[Rule], Meta(max_length=RULES_MAX)] = []


def parse_rules(text: str | bytes, registry: Registry, *,
                source: str = "rules") -> list[ResolvedRule]:
    """Decode, check and resolve a rules file; ConfigError naming the field if anything is
    wrong (then no rule of it is taken)."""
    document = decode_toml(text, _RulesFile, source)
    resolved: list[ResolvedRule] = []
    names: set[str] = set()
    for index, rule in enumerate(document.rules):
        field = f"{source}: rules[{index}]"
        if rule.name in names:
            raise ConfigError(f"{field}.name: {rule.name!r} is used twice")
        names.add(rule.name)
        entry = (registry.by_name.get(rule.id) if isinstance(rule.id, str)
                 else registry.by_id.get(rule.id))
        if entry is None:
            known = ", ".join(e.name for e in registry.list()[:20])
            raise ConfigError(f"{field}.id: {rule.id!r} is not a registered monitor id "
                              f"(known: {known}, ...)")
        if not math.isfinite(rule.value):
            raise ConfigError(f"{field}.value: {rule.value}, expected a finite number")
        if rule.kind == "rate" and rule.window_s * 2 > WINDOW_S_MAX:
            raise ConfigError(f"{field}.window_s: a rate rule compares two windows; at most "
                              f"{WINDOW_S_MAX // 2}")
        resolved.append(ResolvedRule(rule, entry.id, entry.name, entry.kind == "counter"))
    return resolved


RULES_PATH_DEFAULT = Path(__file__).with_name("default_rules.toml")
NO_RULES = "none"             # [monitor] rules = "none": load no rules at all


def configured_rules(setting: str | Path | None,
                     registry: Registry) -> tuple[list[ResolvedRule], str]:
    """(rules, where they came from) for a [monitor] rules setting: "" or None loads the
    default set shipped with KVSvr (RULES_PATH_DEFAULT), "none" no rules, else that file."""
    if setting is None or str(setting) == "":
        return load_rules(RULES_PATH_DEFAULT, registry), "the default rules"
    if str(setting) == NO_RULES:
        return [], "[monitor] rules = \"none\""
    return load_rules(setting, registry), str(setting)


def load_rules(path: str | Path, registry: Registry) -> list[ResolvedRule]:
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    return parse_rules(text, registry, source=str(path))


class Finding(msgspec.Struct, frozen=True):
    firing: bool
    value: float | None       # what was compared (mean, percent change, seconds silent)
    message: str


def samples_needed(rule: Rule) -> int:
    """How many seconds of samples, ending at the scope's newest covered second, `evaluate`
    looks at."""
    if rule.kind == "threshold":
        return rule.window_s
    if rule.kind == "rate":
        return 2 * rule.window_s
    return 0


def _mean(values: Sequence[int | None], counter: bool) -> float | None:
    present = [0 if v is None else v for v in values] if counter else \
        [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def evaluate(resolved: ResolvedRule, samples: Sequence[int | None], now: float,
             last_value_second: int | None, covered_from: int | None = None) -> Finding:
    """Judge one rule on one scope.

    `samples`: the per-second values of the rule's id over the `samples_needed` seconds
    ending at the newest second the scope is covered through (oldest first; None: no value).
    `last_value_second`: the newest second with a value of the id in this scope, looking back
    at least `for_s` seconds from `now` (None: none there). `now`: unix seconds (absent only).
    `covered_from`: the first second the scope was ever reported (absent only): a silence
    counts from then at the earliest, so a machine that just started reporting is not absent.
    """
    rule = resolved.rule
    compare = OPERATORS[rule.op]
    if rule.kind == "absent":
        if last_value_second is None and (covered_from is None
                                          or now - covered_from > rule.for_s):
            return Finding(True, None, f"{resolved.id_name}: no value for more than "
                           f"{rule.for_s} s")
        silent = now - max(s for s in (last_value_second, covered_from) if s is not None)
        if silent > rule.for_s:
            return Finding(True, silent, f"{resolved.id_name}: no value for {silent:.0f} s "
                           f"(> {rule.for_s} s)")
        return Finding(False, silent, f"{resolved.id_name}: last value {silent:.0f} s ago")
    if rule.kind == "threshold":
        mean = _mean(samples[-rule.window_s:], resolved.counter)
        if mean is None:
            return Finding(False, None, f"{resolved.id_name}: no sample in the window")
        firing = compare(mean, rule.value)
        unit = "/s" if resolved.counter else ""
        return Finding(firing, mean, f"{resolved.id_name}: mean {mean:g}{unit} over "
                       f"{rule.window_s} s {'' if firing else 'not '}{rule.op} {rule.value:g}")
    window = rule.window_s
    current = _mean(samples[-window:], resolved.counter)
    previous = _mean(samples[-2 * window:-window], resolved.counter) \
        if len(samples) >= 2 * window else None
    if current is None or previous is None:
        return Finding(False, None, f"{resolved.id_name}: not enough samples for a rate")
    change = (current - previous) / max(abs(previous), 1.0) * 100.0
    firing = compare(change, rule.value)
    return Finding(firing, change, f"{resolved.id_name}: changed {change:+.1f}% "
                   f"({previous:g} -> {current:g}) {'' if firing else 'not '}{rule.op} "
                   f"{rule.value:g}%")


def transition(was_firing: bool, finding: Finding) -> str | None:
    """The event due when a rule's scope moves: "firing", "cleared" or None (no change)."""
    if finding.firing and not was_firing:
        return "firing"
    if was_firing and not finding.firing:
        return "cleared"
    return None


__all__ = [
    "NO_RULES",
    "RULES_PATH_DEFAULT",
    "Finding",
    "ResolvedRule",
    "Rule",
    "configured_rules",
    "evaluate",
    "load_rules",
    "parse_rules",
    "samples_needed",
    "transition",
]
