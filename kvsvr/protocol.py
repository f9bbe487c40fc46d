"""KVSvr's request/response protocol, without I/O.

Both clients (blocking and asyncio) and the node use this module: a client turns a call into
`(method, body)` with the `*_request` builders and turns the node's `(status, body)` back into
a result or a typed error with `parse_reply`; the node decodes requests with `decode_request`,
which validates every field against the limits and names the field it rejects.
"""

from __future__ import annotations

import enum
import re
import struct
import typing
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from kvsvr import _core, errors
from kvsvr.errors import Internal, InvalidArgument, KvError, UnknownMethod
from kvsvr.limits import (
    FRAME_BYTES_MAX,
    FRAMES_PER_MESSAGE_MAX,
    KEY_BYTES_MAX,
    LIST_KEYS_DEFAULT,
    MESSAGE_BYTES_MAX,
    OPS_PER_BATCH_MAX,
    ROW_KEY_BYTES_MAX,
    SCAN_ROWS_DEFAULT,
    SCAN_ROWS_MAX,
    TTL_S_MAX,
    TTL_S_MIN,
    VALUE_BYTES_MAX,
    WATCH_WAIT_S_MAX,
)

U64_MAX = 2**64 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1


class Method(enum.IntEnum):
    PING = 1
    STATUS = 2
    GET = 10
    ROW_GET = 11
    SCAN = 12
    CHANGES = 13
    FAULTS = 3      # operator: inject drops and delays on this node's links to its peers
    MUTATE = 20
    QUORUM = 30     # replica to replica: a batch of version-quorum messages (no reply)
    VERSIONS = 31   # replica to replica: keys' applied and highest open versions (reads)
    PULL = 32       # replica to replica: binlog records from an LSN (the data stream)
    HELLO = 33      # replica to replica: what do you know of my past lives (bootstrap)
    SNAPSHOT = 34   # replica to replica: a page of a consistent copy of the data
    WATCH = 14      # a long poll: answered once the key is applied past a version
    LIST = 15       # a group's keys by prefix, in key order (one replica of each group)


PEER_METHODS = frozenset({Method.QUORUM, Method.VERSIONS, Method.PULL, Method.HELLO,
                          Method.SNAPSHOT})


OK = 0

# How a read is served. LINEARIZABLE: the replica asks a majority of its group for the key's
# version and answers only from a copy at least that new. LOCAL: from the replica's own copy
# at once (possibly stale; the reply carries the version it read).
CONSISTENCY_LINEARIZABLE = 0
CONSISTENCY_LOCAL = 1
CONSISTENCY_NAMES = {"linearizable": CONSISTENCY_LINEARIZABLE, "local": CONSISTENCY_LOCAL}
Consistency = Annotated[int, Meta(ge=CONSISTENCY_LINEARIZABLE, le=CONSISTENCY_LOCAL)]

Key = Annotated[bytes, Meta(min_length=1, max_length=KEY_BYTES_MAX)]
RowKey = Annotated[bytes, Meta(min_length=1, max_length=ROW_KEY_BYTES_MAX)]
RowBound = Annotated[bytes, Meta(max_length=ROW_KEY_BYTES_MAX)]
Value = Annotated[bytes, Meta(max_length=VALUE_BYTES_MAX)]
U64 = Annotated[int, Meta(ge=0)]  # msgpack itself caps it at 2^64-1
Limit = Annotated[int, Meta(ge=1, le=SCAN_ROWS_MAX)]
OpKind = Annotated[int, Meta(ge=_core.OP_PUT, le=_core.OP_EXPIRE)]  # purge: replicas only
RecordBytes = Annotated[bytes, Meta(min_length=1, max_length=FRAME_BYTES_MAX)]
ReplicaIndex = Annotated[int, Meta(ge=0, lt=_core.REPLICAS_MAX)]


# --- requests (array-like: compact on the wire; errors are mapped back to field names) ----
class PingRequest(Struct, array_like=True, forbid_unknown_fields=True):
    pass


class StatusRequest(Struct, array_like=True, forbid_unknown_fields=True):
    pass


class GetRequest(Struct, array_like=True, forbid_unknown_fields=True):
    key: Key
    consistency: Consistency = CONSISTENCY_LINEARIZABLE


class RowGetRequest(Struct, array_like=True, forbid_unknown_fields=True):
    key: Key
    row: RowKey
    consistency: Consistency = CONSISTENCY_LINEARIZABLE


class ScanRequest(Struct, array_like=True, forbid_unknown_fields=True):
    key: Key
    start: RowBound
    end: RowBound | None
    limit: Limit
    consistency: Consistency = CONSISTENCY_LINEARIZABLE


class ChangesRequest(Struct, array_like=True, forbid_unknown_fields=True):
    key: Key
    since_version: U64
    after_row: RowBound
    limit: Limit
    consistency: Consistency = CONSISTENCY_LINEARIZABLE


WatchWaitMs = Annotated[int, Meta(ge=0, le=int(WATCH_WAIT_S_MAX * 1000))]


class WatchRequest(Struct, array_like=True, forbid_unknown_fields=True):
    """Answer once the key is applied past `since_version` (at once when `after_row` is set:
    the rest of a page cut at that version), or after `wait_ms` with no change (0: at once)."""

    key: Key
    since_version: U64
    after_row: RowBound
    wait_ms: WatchWaitMs
    limit: Limit = SCAN_ROWS_DEFAULT


class ListRequest(Struct, array_like=True, forbid_unknown_fields=True):
    """The group's keys that start with `prefix` and hold a value or live rows, after
    `after` (None: from the first), at most `limit`; from the replica's applied state."""

    prefix: Annotated[bytes, Meta(max_length=KEY_BYTES_MAX)]
    after: Key | None
    limit: Limit


class Op(Struct, array_like=True, forbid_unknown_fields=True):
    kind: OpKind
    row: RowBound = b""
    value: Value = b""


class MutateRequest(Struct, array_like=True, forbid_unknown_fields=True):
    key: Key
    ops: Annotated[list[Op], Meta(min_length=1, max_length=OPS_PER_BATCH_MAX)]
    expected_version: U64 | None
    client_id: U64
    client_seq: U64


Probability = Annotated[float, Meta(ge=0.0, le=1.0)]


class FaultsRequest(Struct, array_like=True, forbid_unknown_fields=True):
    """Faults on the links from this node to `peer` (a node name; "" = every peer): each
    message is dropped with probability `drop`, else held for a uniform 0..delay_ms
    (so delayed messages also reorder). drop 0 and delay_ms 0 heal the link.
    `commit_delay_ms`: a slow disk, node-wide: each LMDB checkpoint commit waits this long
    first (while the loop goes on); every faults request sets it, 0 heals."""

    peer: Annotated[str, Meta(max_length=64)] = ""
    drop: Probability = 0.0
    delay_ms: Annotated[int, Meta(ge=0, le=60_000)] = 0
    commit_delay_ms: Annotated[int, Meta(ge=0, le=60_000)] = 0


class VersionsRequest(Struct, array_like=True, forbid_unknown_fields=True):
    keys: Annotated[list[Key], Meta(max_length=FRAMES_PER_MESSAGE_MAX * 4)]


class KeyVersions(Struct, array_like=True, forbid_unknown_fields=True, gc=False):
    applied: U64        # the replica's floor: versions it has applied
    open: U64           # the highest version it holds an unapplied value for (0: none)


class VersionsReply(Struct, array_like=True, forbid_unknown_fields=True):
    versions: list[KeyVersions]


class PullRequest(Struct, array_like=True, forbid_unknown_fields=True):
    source: ReplicaIndex       # the puller (its cursor tells the server what it may trim)
    from_lsn: U64              # first LSN wanted; everything below it the puller has ...
    incarnation: U64           # ... of this life of the server (an older life's LSNs differ)
    max_records: Annotated[int, Meta(ge=1, le=FRAMES_PER_MESSAGE_MAX * 16)]
    # What of this life the puller holds in its last checkpoint: all the server may trim
    # (from_lsn can be ahead of it, and a crash of the puller goes back to the checkpoint).
    durable_through: U64 | None = None


class PullReply(Struct, array_like=True, forbid_unknown_fields=True):
    incarnation: U64           # the server's life: LSNs restart with a new life
    first_lsn: U64             # oldest record still kept (from_lsn below it: trimmed)
    last_lsn: U64
    records: list[RecordBytes]  # from from_lsn on, in LSN order, none skipped


class HelloRequest(Struct, array_like=True, forbid_unknown_fields=True):
    source: ReplicaIndex


class HelloReply(Struct, array_like=True, forbid_unknown_fields=True):
    incarnation: U64           # the answering replica's life (0: still joining)
    knew_you: U64              # the highest incarnation of the asker it has heard from
    first_lsn: U64
    last_lsn: U64


SnapshotDb = Annotated[int, Meta(ge=0, le=2)]


class SnapshotPosition(Struct, array_like=True, forbid_unknown_fields=True):
    db: SnapshotDb
    key: Annotated[bytes, Meta(max_length=KEY_BYTES_MAX + 64)] | None
    row: RowBound | None


class SnapshotRequest(Struct, array_like=True, forbid_unknown_fields=True):
    source: ReplicaIndex
    session: U64                  # 0: start a copy (the answer names its session)
    after: SnapshotPosition | None
    max_bytes: Annotated[int, Meta(ge=1, le=FRAME_BYTES_MAX // 2)]


class SnapshotItem(Struct, array_like=True, forbid_unknown_fields=True, gc=False):
    db: SnapshotDb
    key: Annotated[bytes, Meta(min_length=1, max_length=KEY_BYTES_MAX + 64)]
    row: RowKey | None
    raw: RecordBytes


class SnapshotReply(Struct, array_like=True, forbid_unknown_fields=True):
    session: U64
    incarnation: U64
    lsn: U64                      # the copy holds everything up to this LSN of the server
    items: list[SnapshotItem]
    next: SnapshotPosition | None  # None: the copy is complete


REQUEST_TYPES: dict[int, type[Struct]] = {
    Method.PING: PingRequest,
    Method.STATUS: StatusRequest,
    Method.GET: GetRequest,
    Method.ROW_GET: RowGetRequest,
    Method.SCAN: ScanRequest,
    Method.CHANGES: ChangesRequest,
    Method.WATCH: WatchRequest,
    Method.LIST: ListRequest,
    Method.MUTATE: MutateRequest,
    Method.FAULTS: FaultsRequest,
    Method.VERSIONS: VersionsRequest,
    Method.PULL: PullRequest,
    Method.HELLO: HelloRequest,
    Method.SNAPSHOT: SnapshotRequest,
}


# --- replies: these are also the public result types of the clients ---------------------
class Versioned(Struct, array_like=True, gc=False):
    """A value and the key's version that holds it."""

    version: int
    value: bytes


class RowValue(Struct, array_like=True, gc=False):
    """A row's value, the version that last changed the row, and the key's current version."""

    key_version: int
    row_version: int
    value: bytes


class Row(Struct, array_like=True, gc=False):
    row: bytes
    version: int
    value: bytes


class Change(Struct, array_like=True, gc=False):
    """A row changed after some version: `deleted` rows are tombstones (value empty)."""

    row: bytes
    version: int
    deleted: bool
    value: bytes


class ScanPage(Struct, array_like=True):
    """Rows in row-key order; `next_start` is where to continue, None when the range is done."""

    version: int
    rows: list[Row]
    next_start: bytes | None


class ChangesPage(Struct, array_like=True):
    """Rows changed after a version, in version order; continue from `resume` while not None."""

    version: int
    changes: list[Change]
    resume: tuple[int, bytes] | None


class WatchReply(Struct, array_like=True):
    """A watch's answer. `changed` false: no change within the wait, the key is still at
    `version` (poll again). Else the key's `version` and `value` (None: it holds none) as
    applied on the replica, and the rows changed after the request's position in version
    order (CHANGES' page: continue from `resume` while not None)."""

    version: int
    changed: bool
    value: bytes | None
    changes: list[Change]
    resume: tuple[int, bytes] | None


class KeysPage(Struct, array_like=True):
    """Keys in key order; `next_after`: continue after it (list_keys(after=...)) while it is
    not None (None: no more keys with the prefix)."""

    keys: list[bytes]
    next_after: bytes | None


class MutateReply(Struct, array_like=True, gc=False):
    """The key's new version and per-op results (incr: new value, append: seq, else None)."""

    version: int
    results: list[int | None]


class ErrorReply(Struct, array_like=True, gc=False):
    message: str
    field: str | None = None
    version: int | None = None


REPLY_TYPES: dict[int, Any] = {
    Method.PING: dict[str, Any],
    Method.STATUS: dict[str, Any],
    Method.GET: Versioned,
    Method.ROW_GET: RowValue,
    Method.SCAN: ScanPage,
    Method.CHANGES: ChangesPage,
    Method.WATCH: WatchReply,
    Method.LIST: KeysPage,
    Method.MUTATE: MutateReply,
    Method.FAULTS: dict[str, Any],
    Method.VERSIONS: VersionsReply,
    Method.PULL: PullReply,
    Method.HELLO: HelloReply,
    Method.SNAPSHOT: SnapshotReply,
}

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
_request_decoders = {m: msgspec.msgpack.Decoder(t) for m, t in REQUEST_TYPES.items()}
_reply_decoders = {m: msgspec.msgpack.Decoder(t) for m, t in REPLY_TYPES.items()}
_error_decoder = msgspec.msgpack.Decoder(ErrorReply)


# --- replica to replica: version-quorum messages -------------------------------------------
QUORUM_MESSAGES_MAX = _core.QUORUM_MESSAGES_MAX  # per QUORUM frame


class QuorumStateRecord(Struct, array_like=True, forbid_unknown_fields=True):
    """A state answer's InstanceRecord on the wire (its kind left out)."""

    key: Key
    version: U64
    promised: U64
    accepted_ballot: U64
    accepted_value: RecordBytes | None
    chosen_value: RecordBytes | None


class QuorumMessage(Struct, array_like=True, forbid_unknown_fields=True):
    kind: Annotated[int, Meta(ge=_core.MSG_PREPARE, le=_core.MSG_BEHIND)]
    source: ReplicaIndex
    target: ReplicaIndex
    incarnation: Annotated[int, Meta(ge=1, le=_core.INCARNATION_MAX)]
    key: Annotated[bytes, Meta(max_length=KEY_BYTES_MAX)]
    version: U64
    ballot: U64
    accepted_ballot: U64
    value: RecordBytes | list[QuorumStateRecord] | None = None


_quorum_decoder = msgspec.msgpack.Decoder(
    Annotated[list[QuorumMessage], Meta(max_length=QUORUM_MESSAGES_MAX)])
_INSTANCE_KINDS = frozenset({_core.MSG_PREPARE, _core.MSG_PROMISE, _core.MSG_ACCEPT,
                             _core.MSG_ACCEPTED, _core.MSG_REJECT, _core.MSG_CHOSEN,
                             _core.MSG_BEHIND})


def encode_quorum(messages: list[_core.Message]) -> bytes:
    """The body of a QUORUM frame: the core's binary layout (kvsvr/_qwire.pxi), or msgpack
    when it holds a state answer (records in a list, rare and big)."""
    if not _core.any_kind(messages, _core.MSG_STATE):
        return _core.encode_quorum_messages(messages)
    out = []
    for m in messages:
        value: Any = m.value
        if m.kind == _core.MSG_STATE:
            value = [QuorumStateRecord(r.key, r.version, r.promised, r.accepted_ballot,
                                       r.accepted_value, r.chosen_value) for r in m.value]
        out.append(QuorumMessage(m.kind, m.source, m.target, m.incarnation, m.key, m.version,
                                 m.ballot, m.accepted_ballot, value))
    return encode(out)


def _check_value(field: str, key: bytes, version: int, value: bytes | None) -> None:
    """An accepted or chosen value is the binlog record of exactly that key and version."""
    if value is None:
        return
    try:
        record = _core.decode_record(value)
    except _core.RecordError as e:
        raise InvalidArgument(f"{field}: not a binlog record ({e})", field=field) from None
    if record.key != key or record.version != version:
        raise InvalidArgument(f"{field}: a record of {record.key!r} v{record.version}, "
                              f"the message is about {key!r} v{version}", field=field)


def decode_quorum(body: Any) -> list[_core.Message]:
    """Decode and validate a QUORUM frame body; raises InvalidArgument naming the field."""
    if len(body) and body[0] == _core.QWIRE_MAGIC:
        try:
            return _core.decode_quorum_messages(body)
        except _core.QuorumWireError as e:
            raise InvalidArgument(f"quorum: {e}", field=e.field) from None
    try:
        decoded = _quorum_decoder.decode(body)
    except msgspec.ValidationError as e:
        message, field = describe_validation_error(list[QuorumMessage], str(e))
        if field:
            field, message = f"messages{field}", f"messages{message}"
        raise InvalidArgument(f"quorum: {message}", field=field) from None
    except msgspec.DecodeError as e:
        raise InvalidArgument(f"body: malformed msgpack ({e})", field="body") from None
    messages = []
    for i, m in enumerate(decoded):
        where = f"messages[{i}]"
        if m.kind in _INSTANCE_KINDS:
            if not m.key:
                raise InvalidArgument(f"{where}.key: required for this kind", field="key")
            if isinstance(m.value, list):
                raise InvalidArgument(f"{where}.value: a record list only in a state message",
                                      field="value")
            _check_value(f"{where}.value", m.key, m.version, m.value)
            value: Any = m.value
        elif m.kind == _core.MSG_STATE:
            if not isinstance(m.value, list):
                raise InvalidArgument(f"{where}.value: a state message carries records",
                                      field="value")
            value = []
            for j, r in enumerate(m.value):
                _check_value(f"{where}.value[{j}].accepted_value", r.key, r.version,
                             r.accepted_value)
                _check_value(f"{where}.value[{j}].chosen_value", r.key, r.version,
                             r.chosen_value)
                value.append(_core.InstanceRecord(_core.INSTANCE, r.key, r.version, r.promised,
                                                  r.accepted_ballot, r.accepted_value,
                                                  r.chosen_value))
        else:  # MSG_STATE_REQUEST
            value = None
        messages.append(_core.Message(m.kind, m.source, m.target, m.incarnation, m.key,
                                      m.version, m.ballot, m.accepted_ballot, value))
    return messages


# --- framing of messages ------------------------------------------------------------------
def pack(frames: list[bytes]) -> list[bytes]:
    """Frames back to back in as few ZeroMQ messages as the limits allow (at most
    FRAMES_PER_MESSAGE_MAX frames and MESSAGE_BYTES_MAX each; a frame is never split)."""
    messages: list[bytes] = []
    start = 0
    while start < len(frames):
        end = start
        size = 0
        while (end < len(frames) and end - start < FRAMES_PER_MESSAGE_MAX
               and (size + len(frames[end]) <= MESSAGE_BYTES_MAX or end == start)):
            size += len(frames[end])
            end += 1
        messages.append(frames[start] if end == start + 1 else b"".join(frames[start:end]))
        start = end
    return messages


# --- node side ----------------------------------------------------------------------------
def decode_request(method: int, body: Any) -> Any:
    """Decode and validate a request body; raises InvalidArgument naming the field."""
    decoder = _request_decoders.get(method)
    if decoder is None:
        raise UnknownMethod(f"method {method} is not known to this node", field="method")
    try:
        request: Any = decoder.decode(body)
    except msgspec.ValidationError as e:
        message, field = describe_validation_error(REQUEST_TYPES[method], str(e))
        raise InvalidArgument(f"{Method(method).name.lower()}: {message}", field=field) from None
    except msgspec.DecodeError as e:
        raise InvalidArgument(f"body: malformed msgpack ({e})", field="body") from None
    if method == Method.MUTATE:
        check_ops(request.ops)
    return request


def check_ops(ops: list[Op]) -> None:
    """Per-kind rules of ops (the core's check_op), plus the batch byte limit."""
    total = 0
    for i, op in enumerate(ops):
        try:
            _core.check_op(op.kind, op.row, op.value)
        except ValueError as e:
            raise InvalidArgument(f"ops[{i}]: {e}", field=f"ops[{i}]") from None
        total += len(op.row) + len(op.value)
    if total > _core.BATCH_BYTES_MAX:
        raise InvalidArgument(
            f"ops: {total} bytes of rows and values, the limit is {_core.BATCH_BYTES_MAX}",
            field="ops",
        )


def encode_error(error: KvError) -> bytes:
    return encode(ErrorReply(error.message, error.field, error.version))


_PATH_SEGMENT = re.compile(r"\[(\d+)\]|\.(\w+)")


def describe_validation_error(root: type, text: str) -> tuple[str, str | None]:
    """Turn msgspec's `... - at `$[1][0][2]`` into `ops[0].value` for array-like structs."""
    message, sep, path = text.rpartition(" - at `")
    if not sep:
        return text, None
    path = path.rstrip("`")
    names: list[str] = []
    current: Any = root
    for index, attribute in _PATH_SEGMENT.findall(path.removeprefix("$")):
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, Struct) and index:
            fields = current.__struct_fields__
            name = fields[int(index)] if int(index) < len(fields) else f"[{index}]"
            names.append(("." if names else "") + name)
            current = typing.get_type_hints(current, include_extras=True).get(name)
        elif index:
            names.append(f"[{index}]")
            args = typing.get_args(current)
            current = args[0] if args else None
        else:
            names.append(("." if names else "") + attribute)
            current = None
    field = "".join(names) or None
    return (f"{field}: {message}" if field else message), field


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else tp
            if len(args) != 1:
                return tp
        else:
            return tp


# --- client side --------------------------------------------------------------------------
def as_bytes(name: str, value: Any, *, max_length: int, min_length: int = 0) -> bytes:
    """Accept bytes-like or str (UTF-8); check the length limit; name the field if not."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        try:
            data = value.encode()
        except UnicodeEncodeError as e:
            raise InvalidArgument(f"{name}: not UTF-8 encodable text ({e.reason} at "
                                  f"{e.start}); pass bytes", field=name) from None
    elif isinstance(value, bytearray | memoryview):
        data = bytes(value)
    else:
        raise InvalidArgument(
            f"{name}: expected bytes or str, got {type(value).__name__}", field=name
        )
    if not min_length <= len(data) <= max_length:
        raise InvalidArgument(
            f"{name}: {len(data)} bytes, expected {min_length}..{max_length}", field=name
        )
    return data


def as_key(key: Any) -> bytes:
    return as_bytes("key", key, min_length=1, max_length=KEY_BYTES_MAX)


def as_consistency(value: Any) -> int:
    """"linearizable" (the default) or "local", as the wire's number."""
    number = CONSISTENCY_NAMES.get(value) if isinstance(value, str) else None
    if number is None:
        raise InvalidArgument(f"consistency: expected one of {sorted(CONSISTENCY_NAMES)}, "
                              f"got {value!r}", field="consistency")
    return number


def as_version(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U64_MAX:
        raise InvalidArgument(f"{name}: expected an integer 0..2^64-1, got {value!r}", field=name)
    return value


_DELTA = struct.Struct("<q")
_U64LE = struct.Struct("<Q")


def encode_delta(delta: Any) -> bytes:
    if not isinstance(delta, int) or isinstance(delta, bool) or not I64_MIN <= delta <= I64_MAX:
        raise InvalidArgument(f"delta: expected a signed 64-bit integer, got {delta!r}",
                              field="delta")
    return _DELTA.pack(delta)


def decode_delta(value: bytes) -> int:
    return int(_DELTA.unpack(value)[0])


def put_op(value: Any) -> Op:
    return Op(_core.OP_PUT, b"", as_bytes("value", value, max_length=VALUE_BYTES_MAX))


def delete_op() -> Op:
    return Op(_core.OP_DELETE)


def incr_op(delta: Any) -> Op:
    return Op(_core.OP_INCR, b"", encode_delta(delta))


def row_put_op(row: Any, value: Any) -> Op:
    return Op(_core.OP_ROW_PUT, as_bytes("row", row, min_length=1, max_length=ROW_KEY_BYTES_MAX),
              as_bytes("value", value, max_length=VALUE_BYTES_MAX))


def row_delete_op(row: Any) -> Op:
    return Op(_core.OP_ROW_DELETE,
              as_bytes("row", row, min_length=1, max_length=ROW_KEY_BYTES_MAX))


def compact_op(through_version: Any) -> Op:
    through = as_version("through_version", through_version)
    if through is None:
        raise InvalidArgument("through_version: required", field="through_version")
    return Op(_core.OP_COMPACT, b"", _U64LE.pack(through))


def decode_version(value: bytes) -> int:
    return int(_U64LE.unpack(value)[0])


def append_op(value: Any) -> Op:
    return Op(_core.OP_APPEND, b"", as_bytes("value", value, max_length=VALUE_BYTES_MAX))


_EXPIRY = struct.Struct("<QQ")   # an expire op's value: at_ms (0 until a node sets it), ttl_ms


def as_ttl(ttl: Any) -> int:
    """A time to live in seconds (int or float, TTL_S_MIN..TTL_S_MAX) as milliseconds."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl != ttl \
            or not TTL_S_MIN <= ttl <= TTL_S_MAX:
        raise InvalidArgument(f"ttl: expected seconds {TTL_S_MIN}..{TTL_S_MAX}, got {ttl!r}",
                              field="ttl")
    return round(ttl * 1000)


def expire_op(ttl: Any, row: Any = b"") -> Op:
    """The value (row empty) or the row put just before it in the batch expires `ttl`
    seconds after a node takes the request (see kvsvr/expiry.py)."""
    return Op(_core.OP_EXPIRE,
              as_bytes("row", row, max_length=ROW_KEY_BYTES_MAX), _EXPIRY.pack(0, as_ttl(ttl)))


def expiry_of(value: bytes) -> tuple[int, int]:
    """(at_ms, ttl_ms) of an expire op's value."""
    at_ms, ttl_ms = _EXPIRY.unpack(value)
    return int(at_ms), int(ttl_ms)


def stamped_expiry(at_ms: int, ttl_ms: int) -> bytes:
    """An expire op's value with its instant set."""
    return _EXPIRY.pack(at_ms, ttl_ms)


def purge_op(instant_ms: int, row: bytes = b"") -> Op:
    """Remove the value (row empty) or the row if it expired at or before `instant_ms`."""
    return Op(_core.OP_PURGE, row, _U64LE.pack(instant_ms))


def decode_instant(value: bytes) -> int:
    """The instant (unix ms) at the head of an expire or purge op's value."""
    return int(_U64LE.unpack_from(value)[0])


def limit_arg(limit: Any) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= SCAN_ROWS_MAX:
        raise InvalidArgument(f"limit: expected 1..{SCAN_ROWS_MAX}, got {limit!r}", field="limit")
    return limit


def scan_request(key: Any, start: Any = b"", end: Any = None,
                 limit: Any = SCAN_ROWS_DEFAULT) -> ScanRequest:
    return ScanRequest(
        as_key(key),
        as_bytes("start", start, max_length=ROW_KEY_BYTES_MAX),
        None if end is None else as_bytes("end", end, max_length=ROW_KEY_BYTES_MAX),
        limit_arg(limit),
    )


def changes_request(key: Any, since_version: Any, after_row: Any = b"",
                    limit: Any = SCAN_ROWS_DEFAULT) -> ChangesRequest:
    since = as_version("since_version", since_version)
    if since is None:
        raise InvalidArgument("since_version: required", field="since_version")
    return ChangesRequest(as_key(key), since,
                          as_bytes("after_row", after_row, max_length=ROW_KEY_BYTES_MAX),
                          limit_arg(limit))


def watch_request(key: Any, since_version: Any, after_row: Any = b"", wait: Any = 0.0,
                  limit: Any = SCAN_ROWS_DEFAULT) -> WatchRequest:
    """A WATCH request; `wait` in seconds, 0..WATCH_WAIT_S_MAX."""
    since = as_version("since_version", since_version)
    if since is None:
        raise InvalidArgument("since_version: required", field="since_version")
    if (isinstance(wait, bool) or not isinstance(wait, int | float) or wait != wait
            or not 0 <= wait <= WATCH_WAIT_S_MAX):
        raise InvalidArgument(f"wait: expected seconds 0..{WATCH_WAIT_S_MAX:g}, got {wait!r}",
                              field="wait")
    return WatchRequest(as_key(key), since,
                        as_bytes("after_row", after_row, max_length=ROW_KEY_BYTES_MAX),
                        int(wait * 1000), limit_arg(limit))


def list_request(prefix: Any = b"", after: Any = None,
                 limit: Any = LIST_KEYS_DEFAULT) -> ListRequest:
    """A LIST request: keys starting with `prefix`, after `after` (None: from the first)."""
    return ListRequest(as_bytes("prefix", prefix, max_length=KEY_BYTES_MAX),
                       None if after is None else as_key_named("after", after),
                       limit_arg(limit))


def as_key_named(name: str, key: Any) -> bytes:
    return as_bytes(name, key, min_length=1, max_length=KEY_BYTES_MAX)


def parse_reply(method: int, status: int, body: Any) -> Any:
    """A node's answer as a result object, or raise the typed error it carries."""
    if status == OK:
        try:
            return _reply_decoders[method].decode(body)
        except msgspec.DecodeError as e:
            raise Internal(f"malformed reply to {Method(method).name}: {e}") from None
    error_class = errors.error_class(status, watch=method == Method.WATCH)
    try:
        reply = _error_decoder.decode(body)
    except msgspec.DecodeError:
        reply = ErrorReply(f"status {status} with an unreadable body")
    raise error_class(reply.message, field=reply.field, version=reply.version)


__all__ = [
    "OPS_PER_BATCH_MAX",
    "ROW_KEY_BYTES_MAX",
    "Change",
    "ChangesPage",
    "InvalidArgument",
    "Method",
    "MutateReply",
    "Op",
    "Row",
    "RowValue",
    "ScanPage",
    "Versioned",
    "WatchReply",
    "WatchRequest",
    "describe_validation_error",
]
