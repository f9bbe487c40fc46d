"""The quorum queue's requests and replies, without I/O.

Frames are KVSvr's (`kvsvr/_frame.pxi`: 24-byte header, msgpack body, many frames per ZeroMQ
message); the queue only adds its own method codes (100 and up, so a queue request sent to a
KVSvr node, or the reverse, is refused as an unknown method) and body schemas. The server
decodes with `decode_request`, which validates every field and names the one it rejects;
clients turn answers back into results or typed errors with `parse_reply`.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from kvsvr.errors import ERRORS_BY_CODE, Internal, InvalidArgument, KvError, UnknownMethod
from kvsvr.protocol import describe_validation_error
from quorumq.limits import (
    FETCH_BYTES_MAX,
    FETCH_WAIT_MS_MAX,
    PRODUCE_BATCH_BYTES_MAX,
    PRODUCER_MAP_BYTES_MAX,
    QUEUE_BATCH_MESSAGES_MAX,
    QUEUE_MESSAGE_BYTES_MAX,
    TOPIC_BYTES_MAX,
)


class QMethod(enum.IntEnum):
    STATUS = 100          # the server's incarnation, topics, recovery report, counters
    CREATE_TOPIC = 101    # idempotent; an existing topic keeps its settings
    PRODUCE = 102         # append a batch; answered once it is fdatasynced
    FETCH = 103           # records from an offset (long poll: wait_ms)
    COMMIT = 104          # a consumer group's offset on this server (durable when answered)
    OFFSETS = 105         # a consumer group's committed offset on this server
    TIME_OFFSET = 106     # the first offset appended at or after a time
    TOPICS = 107          # every topic's settings and bounds
    UPDATE_TOPIC = 108    # create, or change an existing topic's settings


OK = 0
SEQ_LIMIT = 1 << 64   # seqs and offsets are u64 on disk

# A topic is a directory name: no leading dot (".", ".." and hidden names are refused).
TopicName = Annotated[str, Meta(min_length=1, max_length=TOPIC_BYTES_MAX,
                                pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")]
GroupName = Annotated[str, Meta(min_length=1, max_length=TOPIC_BYTES_MAX,
                                pattern=r"^[A-Za-z0-9_.:-]+$")]
U64 = Annotated[int, Meta(ge=0)]
MessageBytes = Annotated[bytes, Meta(max_length=QUEUE_MESSAGE_BYTES_MAX)]


class StatusRequest(Struct, array_like=True, forbid_unknown_fields=True):
    pass


class CreateTopicRequest(Struct, array_like=True, forbid_unknown_fields=True):
    topic: TopicName
    retention_bytes: U64 = 0      # 0: no size bound
    retention_s: U64 = 0          # 0: no age bound


class ProduceRequest(Struct, array_like=True, forbid_unknown_fields=True):
    topic: TopicName
    producer_id: Annotated[int, Meta(ge=1)]
    first_seq: U64                # message i of the batch is (producer_id, first_seq + i)
    messages: Annotated[list[MessageBytes], Meta(min_length=1,
                                                 max_length=QUEUE_BATCH_MESSAGES_MAX)]
    # Wall-clock ms after which no server may append or acknowledge this batch (the
    # producer's submit time + batch_lifetime_ms, the same in every attempt).
    expires_ms: U64


class ProduceReply(Struct, array_like=True, gc=False):
    incarnation: int
    first_offset: int


class FetchRequest(Struct, array_like=True, forbid_unknown_fields=True):
    topic: TopicName
    offset: U64
    max_bytes: Annotated[int, Meta(ge=1, le=FETCH_BYTES_MAX)]
    wait_ms: Annotated[int, Meta(ge=0, le=FETCH_WAIT_MS_MAX)] = 0


class FetchReply(Struct, array_like=True, gc=False):
    incarnation: int
    born_ms: int
    start_offset: int             # oldest offset retained
    end_offset: int               # next offset to be written (durable records end here)
    next_offset: int              # fetch from here next time
    records: bytes                # whole records (kvsvr/_qlog.pxi), offsets ascending


class CommitRequest(Struct, array_like=True, forbid_unknown_fields=True):
    topic: TopicName
    group: GroupName
    incarnation: U64              # the server life the offset belongs to (else refused)
    offset: U64
    whole: bool                   # this server holds everything, for this consumer group
    producers: Annotated[bytes, Meta(max_length=PRODUCER_MAP_BYTES_MAX)] = b""


class OffsetsRequest(Struct, array_like=True, forbid_unknown_fields=True):
    topic: TopicName
    group: GroupName


class OffsetsReply(Struct, array_like=True, gc=False):
    incarnation: int
    born_ms: int
    found: bool
    offset: int
    whole: bool
    producers: bytes


class TimeOffsetRequest(Struct, array_like=True, forbid_unknown_fields=True):
    topic: TopicName
    append_ms: U64


class TimeOffsetReply(Struct, array_like=True, gc=False):
    offset: int                   # first offset appended at or after append_ms (or the end)
    complete: bool                # append_ms is in this server's past: nothing earlier follows
    start_offset: int


class TopicsRequest(Struct, array_like=True, forbid_unknown_fields=True):
    pass


class TopicInfo(Struct, array_like=True, gc=False):
    topic: str
    retention_bytes: int
    retention_s: int
    start_offset: int
    end_offset: int
    bytes: int


REQUEST_TYPES: dict[int, type[Struct]] = {
    QMethod.STATUS: StatusRequest,
    QMethod.CREATE_TOPIC: CreateTopicRequest,
    QMethod.PRODUCE: ProduceRequest,
    QMethod.FETCH: FetchRequest,
    QMethod.COMMIT: CommitRequest,
    QMethod.OFFSETS: OffsetsRequest,
    QMethod.TIME_OFFSET: TimeOffsetRequest,
    QMethod.TOPICS: TopicsRequest,
    QMethod.UPDATE_TOPIC: CreateTopicRequest,
}

REPLY_TYPES: dict[int, Any] = {
    QMethod.STATUS: dict[str, Any],
    QMethod.CREATE_TOPIC: TopicInfo,
    QMethod.PRODUCE: ProduceReply,
    QMethod.FETCH: FetchReply,
    QMethod.COMMIT: dict[str, Any],
    QMethod.OFFSETS: OffsetsReply,
    QMethod.TIME_OFFSET: TimeOffsetReply,
    QMethod.TOPICS: list[TopicInfo],
    QMethod.UPDATE_TOPIC: TopicInfo,
}


class ErrorReply(Struct, array_like=True, gc=False):
    message: str
    field: str | None = None
    version: int | None = None


_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
_request_decoders = {m: msgspec.msgpack.Decoder(t) for m, t in REQUEST_TYPES.items()}
_reply_decoders = {m: msgspec.msgpack.Decoder(t) for m, t in REPLY_TYPES.items()}
_error_decoder = msgspec.msgpack.Decoder(ErrorReply)


def decode_request(method: int, body: Any) -> Any:
    """Decode and validate a request body; InvalidArgument naming the field if it is bad,
    UnknownMethod if `method` is not a queue method."""
    decoder = _request_decoders.get(method)
    if decoder is None:
        raise UnknownMethod(f"method {method} is not known to a queue server", field="method")
    try:
        request: Any = decoder.decode(body)
    except msgspec.ValidationError as e:
        message, field = describe_validation_error(REQUEST_TYPES[method], str(e))
        raise InvalidArgument(f"{QMethod(method).name.lower()}: {message}",
                              field=field) from None
    except msgspec.DecodeError as e:
        raise InvalidArgument(f"body: malformed msgpack ({e})", field="body") from None
    if method == QMethod.PRODUCE:
        if request.first_seq + len(request.messages) > SEQ_LIMIT:
            raise InvalidArgument(f"first_seq: {request.first_seq} + {len(request.messages)} "
                                  f"messages passes the largest seq ({SEQ_LIMIT - 1})",
                                  field="first_seq")
        total = sum(len(m) for m in request.messages)
        if total > PRODUCE_BATCH_BYTES_MAX:
            raise InvalidArgument(f"messages: {total} bytes in one batch, the limit is "
                                  f"{PRODUCE_BATCH_BYTES_MAX}", field="messages")
    return request


def encode_error(error: KvError) -> bytes:
    return encode(ErrorReply(error.message, error.field, error.version))


def parse_reply(method: int, status: int, body: Any) -> Any:
    """A server's answer as a result object, or raise the typed error it carries."""
    if status == OK:
        try:
            return _reply_decoders[method].decode(body)
        except (msgspec.DecodeError, KeyError) as e:
            raise Internal(f"malformed reply to method {method}: {e}") from None
    error_class = ERRORS_BY_CODE.get(status, KvError)
    try:
        reply = _error_decoder.decode(body)
    except msgspec.DecodeError:
        reply = ErrorReply(f"status {status} with an unreadable body")
    raise error_class(reply.message, field=reply.field, version=reply.version)


# --- a consumer group's per-producer positions (stored with its offsets) -------------------
_producers_encoder = msgspec.msgpack.Encoder()
_producers_decoder = msgspec.msgpack.Decoder(dict[int, int])


def encode_producers(next_seq: dict[int, int]) -> bytes:
    return _producers_encoder.encode(next_seq)


def decode_producers(blob: bytes) -> dict[int, int]:
    """{} for an empty or unreadable blob: positions only save redeliveries, never data."""
    if not blob:
        return {}
    try:
        return _producers_decoder.decode(blob)
    except msgspec.DecodeError:
        return {}


def check_topic(topic: Any) -> str:
    """A topic name as the server would accept it, or InvalidArgument naming `topic`."""
    try:
        return msgspec.convert(topic, TopicName)
    except msgspec.ValidationError:
        raise InvalidArgument(f"topic: {topic!r} is not a topic name (expected 1.."
                              f"{TOPIC_BYTES_MAX} of A-Z a-z 0-9 _ - ., not starting with "
                              "a dot)", field="topic") from None


def check_group(group: Any) -> str:
    try:
        return msgspec.convert(group, GroupName)
    except msgspec.ValidationError as e:
        raise InvalidArgument(f"group: {e} (got {group!r})", field="group") from None
