"""A linearizability checker for KVSvr histories (Wing & Gong's search with Lowe's memoization).

A history is a list of `Op`: who called what on which key, with what result, between which
instants (time.monotonic() in each client; one machine, one clock). An op whose outcome is
unknown (a timeout, a client killed mid-call) has `result=UNKNOWN`: it may have taken effect
at any instant after its call, or never.

Linearizability is compositional over keys, so each key's sub-history is checked alone against
a sequential model of one key: its version, value and appended rows.

    ok, problem = check(history)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

UNKNOWN = object()
INFINITY = float("inf")

# results of the model: ("ok", x), ("not_found", version), ("conflict", version), ("invalid",)
State = tuple[int, bytes | None, tuple[bytes, ...]]  # version, value, appended rows


@dataclass
class Op:
    process: int
    kind: str          # get, put, delete, incr, append, scan
    key: bytes
    argument: Any      # put/delete: (value, expected_version); incr: delta; append: value
    result: Any        # see above; UNKNOWN if the outcome is not known
    call: float
    ret: float = INFINITY
    index: int = field(default=0, compare=False)


def step(state: State, op: Op) -> tuple[bool, State]:
    """Apply `op` to `state` in the model: (does the model give op's result?, next state)."""
    version, value, rows = state
    kind, result = op.kind, op.result
    unknown = result is UNKNOWN
    if kind == "get":
        expected = ("ok", (version, value)) if value is not None else ("not_found", version)
        return unknown or result == expected, state
    if kind == "scan":
        return unknown or result == ("ok", rows), state
    if kind in ("put", "delete", "incr"):
        expected_version = op.argument[1] if kind in ("put", "delete") else None
        if expected_version is not None and expected_version != version:
            return unknown or result == ("conflict", version), state
        if kind == "put":
            new_value: bytes | None = op.argument[0]
            answer: Any = version + 1
        elif kind == "delete":
            new_value, answer = None, version + 1
        else:
            if value is not None and not value.lstrip(b"-").isdigit():
                return unknown or result == ("invalid",), state
            answer = int(value or b"0") + op.argument
            new_value = str(answer).encode()
        return unknown or result == ("ok", answer), (version + 1, new_value, rows)
    if kind == "append":
        return (unknown or result == ("ok", len(rows)),
                (version + 1, value, (*rows, op.argument)))
    raise ValueError(f"op.kind: {kind!r} is not modelled")


def _check_key(ops: list[Op], initial: State) -> tuple[bool, str | None]:
    # Events in time order; a call sorts before a return at the same instant.
    events = []
    for op in ops:
        if op.result is not UNKNOWN or op.kind not in ("get", "scan"):  # unknown reads say nothing
            events.append((op.call, 0, op))
            events.append((op.ret, 1, op))
    events.sort(key=lambda e: (e[0], e[1], e[2].index))
    # A doubly linked list of entries, so linearized ops can be lifted out and put back.
    count = len(events)
    kinds = [e[1] for e in events]
    op_of = [e[2] for e in events]
    prev = list(range(-1, count - 1))
    nxt = list(range(1, count + 1))
    if count:
        nxt[-1] = -1
    head = -1
    first = 0 if count else -1
    match: dict[int, int] = {}
    positions: dict[int, int] = {}
    for position, (_t, kind, op) in enumerate(events):
        if kind == 0:
            positions[op.index] = position
        else:
            match[positions[op.index]] = position

    def lift(position: int) -> None:
        nonlocal first
        for p in (position, match[position]):
            if prev[p] == head:
                first = nxt[p]
            else:
                nxt[prev[p]] = nxt[p]
            if nxt[p] != -1:
                prev[nxt[p]] = prev[p]

    def unlift(position: int) -> None:
        nonlocal first
        for p in (match[position], position):
            if prev[p] == head:
                first = p
            else:
                nxt[prev[p]] = p
            if nxt[p] != -1:
                prev[nxt[p]] = p

    state = initial
    linearized = 0
    cache: set[tuple[int, State]] = set()
    stack: list[tuple[int, State]] = []
    entry = first
    deepest = 0
    while first != -1:
        if entry == -1:
            entry = first
        op = op_of[entry]
        if kinds[entry] == 0:
            ok, new_state = step(state, op)
            bit = 1 << op.index
            if ok and (linearized | bit, new_state) not in cache:
                cache.add((linearized | bit, new_state))
                stack.append((entry, state))
                state, linearized = new_state, linearized | bit
                lift(entry)
                deepest = max(deepest, len(stack))
                entry = first
            else:
                entry = nxt[entry]
        else:
            if op.result is UNKNOWN and op.ret == INFINITY:
                return True, None  # only ops that may never have happened are left
            if not stack:
                return False, f"no linearization; got {deepest} of {len(ops)} ops in order"
            entry, state = stack.pop()
            linearized &= ~(1 << op_of[entry].index)
            unlift(entry)
            entry = nxt[entry]
    return True, None


def check(history: Iterable[Op],
          initial: dict[bytes, State] | None = None) -> tuple[bool, str | None]:
    """(True, None) if every key's history is linearizable, else (False, what failed)."""
    by_key: dict[bytes, list[Op]] = defaultdict(list)
    for op in history:
        by_key[op.key].append(op)
    for key, ops in sorted(by_key.items()):
        for index, op in enumerate(ops):
            op.index = index
        start = (initial or {}).get(key, (0, None, ()))
        ok, problem = _check_key(ops, start)
        if not ok:
            return False, f"key {key!r}: {problem}"
    return True, None
