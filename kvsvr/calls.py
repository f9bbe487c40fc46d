"""Every client call as data: which key routes it, the method, the request, and how the reply
becomes the caller's result. The blocking client, the pipeline, batches and the asyncio
client all run these specs; none of them builds a request on its own. Also the clients'
one rule for a refusal that may not be final (`refusal_outcome`)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import msgspec

from kvsvr import _core
from kvsvr import protocol as p
from kvsvr.config import check_client_address
from kvsvr.errors import Internal, InvalidArgument, KvError, Timeout, VersionConflict
from kvsvr.expiry import check_incr_room
from kvsvr.limits import SCAN_ROWS_DEFAULT, WATCH_REPLY_GRACE_S

LINEARIZABLE = "linearizable"
LOCAL = "local"


class CallSpec(NamedTuple):
    key: bytes | None          # routes the call to its group, home first; None: any node
    method: int
    request: Any
    finish: Callable[[Any], Any]
    address: str | None = None  # this node only, no failover (status of every node)
    attempt_timeout: float | None = None  # this call's own (a long poll's); None: the client's


def call_name(spec: CallSpec) -> str:
    """The client call a spec came from, as the user wrote it (`put`, `row_put`, `batch`,
    `list_keys`): an error about the call names it, not the wire method that carried it."""
    if spec.method == p.Method.LIST:
        return "list_keys"
    if spec.method != p.Method.MUTATE:
        return p.Method(spec.method).name.lower()
    kinds = [op.kind for op in spec.request.ops]
    if (len(kinds) == 2 and kinds[1] == _core.OP_EXPIRE
            and kinds[0] in (_core.OP_PUT, _core.OP_ROW_PUT)):
        kinds = kinds[:1]   # put(ttl=) and row_put(ttl=) carry their expiry as a second op
    return _core.OP_NAMES.get(kinds[0], "batch") if len(kinds) == 1 else "batch"


def _same(reply: Any) -> Any:
    return reply


def _version(reply: p.MutateReply) -> int:
    return reply.version


def _first_result(reply: p.MutateReply) -> int:
    result = reply.results[0] if reply.results else None
    if result is None:  # incr and append always answer a number
        raise Internal(f"answer without the expected result: {reply!r}")
    return result


# Reads take `consistency`: "linearizable" (the default: the replica checks the key's version
# with a majority first) or "local" (its own copy at once, possibly stale; the reply says which
# version it read).
def get(key: Any, consistency: Any = LINEARIZABLE) -> CallSpec:
    k = p.as_key(key)
    return CallSpec(k, p.Method.GET, p.GetRequest(k, p.as_consistency(consistency)), _same)


def row_get(key: Any, row: Any, consistency: Any = LINEARIZABLE) -> CallSpec:
    k = p.as_key(key)
    r = p.as_bytes("row", row, min_length=1, max_length=p.ROW_KEY_BYTES_MAX)
    return CallSpec(k, p.Method.ROW_GET,
                    p.RowGetRequest(k, r, p.as_consistency(consistency)), _same)


def scan(key: Any, start: Any, end: Any, limit: Any,
         consistency: Any = LINEARIZABLE) -> CallSpec:
    request = _with_consistency(p.scan_request(key, start, end, limit), consistency)
    return CallSpec(request.key, p.Method.SCAN, request, _same)


def changes(key: Any, since_version: Any, after_row: Any, limit: Any,
            consistency: Any = LINEARIZABLE) -> CallSpec:
    request = _with_consistency(p.changes_request(key, since_version, after_row, limit),
                                consistency)
    return CallSpec(request.key, p.Method.CHANGES, request, _same)


def watch(key: Any, since_version: Any, after_row: Any = b"", wait: Any = 0.0,
          limit: Any = SCAN_ROWS_DEFAULT) -> CallSpec:
    """A long poll on `key` (see kvsvr/watching.py): the node holds it up to `wait` seconds,
    so an attempt counts as unanswered only WATCH_REPLY_GRACE_S after that."""
    request = p.watch_request(key, since_version, after_row, wait, limit)
    return CallSpec(request.key, p.Method.WATCH, request, _same,
                    attempt_timeout=request.wait_ms / 1000 + WATCH_REPLY_GRACE_S)


def _with_consistency(request: Any, consistency: Any) -> Any:
    level = p.as_consistency(consistency)
    if level == request.consistency:
        return request
    return msgspec.structs.replace(request, consistency=level)


def mutate(key: Any, ops: list[p.Op], expected_version: Any, op_id: tuple[int, int],
           finish: Callable[[Any], Any] = _same) -> CallSpec:
    k = p.as_key(key)
    if not ops:
        raise p.InvalidArgument("ops: a batch needs at least one operation", field="ops")
    if len(ops) > p.OPS_PER_BATCH_MAX:
        ttls = sum(op.kind == _core.OP_EXPIRE for op in ops)   # a ttl rides as an op of its own
        raise p.InvalidArgument(f"ops: {len(ops)} operations, the limit is {p.OPS_PER_BATCH_MAX}"
                                + (f" ({ttls} of them the ttls: each ttl counts as an operation)"
                                   if ttls else ""), field="ops")
    p.check_ops(ops)   # as the node will (a batch over the byte limit would not even encode)
    check_incr_room(ops)
    request = p.MutateRequest(k, ops, p.as_version("expected_version", expected_version),
                              op_id[0], op_id[1])
    return CallSpec(k, p.Method.MUTATE, request, finish)


def put(key: Any, value: Any, expected_version: Any, op_id: tuple[int, int],
        ttl: Any = None) -> CallSpec:
    """`ttl`: seconds the value lives after a node takes the write (None: for ever)."""
    ops = [p.put_op(value)] if ttl is None else [p.put_op(value), p.expire_op(ttl)]
    return mutate(key, ops, expected_version, op_id, _version)


def delete(key: Any, expected_version: Any, op_id: tuple[int, int]) -> CallSpec:
    return mutate(key, [p.delete_op()], expected_version, op_id, _version)


def incr(key: Any, delta: Any, expected_version: Any, op_id: tuple[int, int]) -> CallSpec:
    return mutate(key, [p.incr_op(delta)], expected_version, op_id, _first_result)


def row_put(key: Any, row: Any, value: Any, expected_version: Any,
            op_id: tuple[int, int], ttl: Any = None) -> CallSpec:
    """`ttl`: seconds the row lives after a node takes the write (None: for ever)."""
    ops = [p.row_put_op(row, value)]
    if ttl is not None:
        ops.append(p.expire_op(ttl, ops[0].row))
    return mutate(key, ops, expected_version, op_id, _version)


def row_delete(key: Any, row: Any, expected_version: Any, op_id: tuple[int, int]) -> CallSpec:
    return mutate(key, [p.row_delete_op(row)], expected_version, op_id, _version)


def compact(key: Any, through_version: Any, op_id: tuple[int, int]) -> CallSpec:
    return mutate(key, [p.compact_op(through_version)], None, op_id, _version)


def append(key: Any, value: Any, op_id: tuple[int, int]) -> CallSpec:
    return mutate(key, [p.append_op(value)], None, op_id, _first_result)


def list_keys(routes: list[bytes], request: p.ListRequest) -> list[CallSpec]:
    """LIST asked of every group: `routes` holds a key that routes to each group (the reply
    says nothing of it; kvsvr/listing.py finds them and merges the groups' pages)."""
    return [CallSpec(route, p.Method.LIST, request, _same) for route in routes]


# The fields of the refusals a mutation's plan draws from the key's value
# (kvsvr/store/planner.py): an incr of a value that is not a decimal integer ("key") or whose
# sum overflows ("delta"), a compact through a version the key has not reached
# ("through_version"). Those carry the key's version; a refusal of the request itself never
# does.
VALUE_REFUSAL_FIELDS = frozenset({"key", "delta", "through_version"})


def refusal_is_final(spec: CallSpec, error: KvError) -> bool:
    """Whether a replica's refusal of `spec` holds whatever the key does next. A
    compare-and-set expecting a version the key has not reached, and a refusal drawn from the
    key's value (VALUE_REFUSAL_FIELDS), hold only at the version they were made at: the key
    may get there, or its value change, and then an attempt of the same op id still waiting
    at another replica applies the write. A conflict with a version the key is past is final
    (versions only grow), so is a refusal at the very version the request expects (that
    version's value never changes), and so is every refusal of the request itself."""
    version = error.version
    if version is None or spec.method != p.Method.MUTATE:
        return True
    expected = spec.request.expected_version
    if isinstance(error, VersionConflict):
        return expected is None or expected <= version
    if isinstance(error, InvalidArgument) and error.field in VALUE_REFUSAL_FIELDS:
        return expected is not None and expected <= version
    return True


def refusal_outcome(spec: CallSpec, error: KvError, address: str,
                    elsewhere: Collection[str]) -> KvError:
    """What a call raises for `error`, the answer of the replica at `address`, while other
    attempts of it (same op id) at the replicas `elsewhere` are unanswered or were answered
    Timeout: `error` if it is final or `elsewhere` is empty, else Timeout, since one of those
    attempts may still apply the write. Attempts answered Unavailable hold nothing, so they
    are not in `elsewhere`; nor are other attempts at `address`: a replica takes a key's
    writes in the order they come, so it settled those before this one."""
    if not elsewhere or refusal_is_final(spec, error):
        return error
    return Timeout(
        f"the write may or may not have been applied: refused at version {error.version} by "
        f"the replica at {address} ({error.message}), but another attempt of it (same op id) "
        f"at {', '.join(elsewhere)} may still apply it")


def _node(address: str | None) -> str | None:
    if address is not None:
        if not isinstance(address, str):
            raise InvalidArgument(f"address: expected a str, got {type(address).__name__}",
                                  field="address")
        check_client_address(address)
    return address


def ping(address: str | None = None) -> CallSpec:
    """Any node of the cluster (the first that is not failing), or the one at `address`."""
    return CallSpec(None, p.Method.PING, p.PingRequest(), _same, _node(address))


def status(address: str | None = None) -> CallSpec:
    return CallSpec(None, p.Method.STATUS, p.StatusRequest(), _same, _node(address))


def faults(address: str, peer: Any = "", drop: Any = 0.0, delay_ms: Any = 0,
           commit_delay_ms: Any = 0) -> CallSpec:
    """Fault injection on the links from the node at `address` to its peers (all, or the
    node named `peer`): drop each message with probability `drop`, hold the rest up to
    `delay_ms` (so they reorder). drop=0, delay_ms=0 heals. `commit_delay_ms` makes the
    node's disk slow: each checkpoint commit waits that long first (0 heals). Answers each
    link's faults."""
    if not isinstance(peer, str) or len(peer) > 64:
        raise InvalidArgument(f"peer: expected a node name, got {peer!r}", field="peer")
    if isinstance(drop, bool) or not isinstance(drop, int | float) or not 0.0 <= drop <= 1.0:
        raise InvalidArgument(f"drop: expected a probability 0..1, got {drop!r}", field="drop")
    if isinstance(delay_ms, bool) or not isinstance(delay_ms, int) or \
            not 0 <= delay_ms <= 60_000:
        raise InvalidArgument(f"delay_ms: expected 0..60000, got {delay_ms!r}",
                              field="delay_ms")
    if isinstance(commit_delay_ms, bool) or not isinstance(commit_delay_ms, int) or \
            not 0 <= commit_delay_ms <= 60_000:
        raise InvalidArgument(f"commit_delay_ms: expected 0..60000, got {commit_delay_ms!r}",
                              field="commit_delay_ms")
    return CallSpec(None, p.Method.FAULTS,
                    p.FaultsRequest(peer, float(drop), delay_ms, commit_delay_ms), _same,
                    _node(address))
