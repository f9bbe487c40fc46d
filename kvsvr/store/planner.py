"""The mutation planner: what a key's ops do, computed before anything is written.

Pure (no LMDB, no clock): a store applies a plan only once all of it checked out, which is
why a rejected mutation changes nothing; a replica also runs it to answer a write it learns
was chosen without applying it yet.
"""

from __future__ import annotations

import re

from kvsvr import _core
from kvsvr.errors import InvalidArgument
from kvsvr.protocol import I64_MAX, I64_MIN, decode_delta, decode_version
from kvsvr.store.layout import KeyState, seq_row

_DECIMAL = re.compile(rb"-?[0-9]{1,19}")


def plan(state: KeyState, ops: list[tuple[int, bytes, bytes]]
         ) -> tuple[KeyState, dict[bytes, bytes | None], list[int | None]]:
    """What `ops` do to a key in `state`: (its next state, row writes, per-op results).

    Pure: it checks everything and raises a KvError before anything is written.
    """
    value, next_seq, compacted = state.value, state.next_seq, state.compacted_through
    row_writes: dict[bytes, bytes | None] = {}
    results: list[int | None] = []
    for kind, row, operand in ops:
        result = None
        if kind == _core.OP_PUT:
            value = operand
        elif kind == _core.OP_DELETE:
            value = None
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
            value = str(result).encode()
        elif kind == _core.OP_ROW_PUT:
            row_writes[row] = operand
        elif kind == _core.OP_ROW_DELETE:
            row_writes[row] = None
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
        else:  # decode_request validated kinds already; a new kind must be handled here
            raise InvalidArgument(f"ops: kind {kind} is not applied by this node", field="ops")
        results.append(result)
    return KeyState(state.version + 1, next_seq, value, compacted), row_writes, results


__all__ = ["plan"]
