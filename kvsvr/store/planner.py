"""The mutation planner: what a key's ops do, computed before anything is written.

Pure (no LMDB, no clock): a store applies a plan only once all of it checked out, which is
why a rejected mutation changes nothing; a replica also runs it to answer a write it learns
was chosen without applying it yet.
"""

from __future__ import annotations

import re

from kvsvr import _core
from kvsvr.errors import InvalidArgument
from kvsvr.protocol import I64_MAX, I64_MIN, decode_delta, decode_instant, decode_version
from kvsvr.store.layout import KeyState, seq_row

_DECIMAL = re.compile(rb"-?[0-9]{1,19}")


class RowTimes:
    """What a mutation's expire and purge ops do to rows (None in a plan without them):
    `expiry`, the instant a row written by the same mutation expires; `purges`, the rows to
    remove if their recorded instant is still at or before the given one (the store decides,
    on the row as it holds it)."""

    __slots__ = ("expiry", "purges")

    def __init__(self) -> None:
        self.expiry: dict[bytes, int] = {}
        self.purges: dict[bytes, int] = {}


# long: one branch per op kind, each a few lines; split, the kinds' rules would be far apart
def plan(state: KeyState, ops: list[tuple[int, bytes, bytes]]
         ) -> tuple[KeyState, dict[bytes, bytes | None], list[int | None], RowTimes | None]:
    """What `ops` do to a key in `state`: (its next state, row writes, per-op results, and
    the rows' expiry and purges, None when the ops have none).

    Pure: it checks everything and raises a KvError before anything is written.
    """
    value, next_seq, compacted = state.value, state.next_seq, state.compacted_through
    expires, value_set = state.expires_ms, False
    row_writes: dict[bytes, bytes | None] = {}
    row_times: RowTimes | None = None
    results: list[int | None] = []
    for kind, row, operand in ops:
        result = None
        if kind == _core.OP_PUT:
            value, expires, value_set = operand, 0, True   # a put without TTL clears one
        elif kind == _core.OP_DELETE:
            value, expires, value_set = None, 0, False
        elif kind == _core.OP_INCR:
            current = 0
            if value is not None:
                if not _DECIMAL.fullmatch(value):
                    raise InvalidArgument("incr: the key's value is not a decimal integer",
                                          field="key", version=state.version)
                current = int(value)
            result = current + decode_delta(operand)
            if not I64_MIN <= result <= I64_MAX:
                raise InvalidArgument("incr: the result overflows a signed 64-bit integer",
                                      field="delta", version=state.version)
            value, value_set = str(result).encode(), True   # (an expiry stays)
        elif kind == _core.OP_ROW_PUT or kind == _core.OP_ROW_DELETE:
            row_writes[row] = operand if kind == _core.OP_ROW_PUT else None
            if row_times is not None:
                row_times.expiry.pop(row, None)
                row_times.purges.pop(row, None)
        elif kind == _core.OP_APPEND:
            row_writes[seq_row(next_seq)] = operand
            result = next_seq
            next_seq += 1
        elif kind == _core.OP_COMPACT:
            through = decode_version(operand)
            if through > state.version:
                raise InvalidArgument(
                    f"through_version: {through}, the key is only at {state.version}",
                    field="through_version", version=state.version)
            compacted = max(compacted, through)
        elif kind == _core.OP_EXPIRE:
            at_ms = decode_instant(operand)
            if not at_ms:
                raise InvalidArgument("ops: an expire op without its instant (a node sets "
                                      "it from the ttl when it takes the request)", field="ops")
            if not row:
                if not value_set:
                    raise InvalidArgument("ops: expire of the value follows no put or incr "
                                          "of it in the batch", field="ops")
                expires = at_ms
            elif row_writes.get(row) is None:
                raise InvalidArgument(f"ops: expire of row {row!r} follows no row_put of it "
                                      "in the batch", field="ops")
            else:
                if row_times is None:
                    row_times = RowTimes()
                row_times.expiry[row] = at_ms
        elif kind == _core.OP_PURGE:
            instant = decode_instant(operand)
            if not row:
                if value is not None and expires and expires <= instant:
                    value, expires, value_set = None, 0, False
            else:
                if row_times is None:
                    row_times = RowTimes()
                if row in row_writes:   # written by this batch: decided here
                    if row_writes[row] is not None \
                            and 0 < row_times.expiry.get(row, 0) <= instant:
                        row_writes[row] = None
                        row_times.expiry.pop(row)
                else:
                    row_times.purges[row] = instant
            continue   # no result: a purge a node put ahead of an incr leaves its result first
        else:  # decode_request validated kinds already; a new kind must be handled here
            raise InvalidArgument(f"ops: kind {kind} is not applied by this node", field="ops")
        results.append(result)
    new_state = KeyState(state.version + 1, next_seq, value, compacted,
                         expires if value is not None else 0)
    return new_state, row_writes, results, row_times


__all__ = ["RowTimes", "plan"]
