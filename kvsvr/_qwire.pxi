# The QUORUM frame body in binary: the version quorum's messages between replicas, the most
# frequent thing a replica decodes and encodes (each replicated write is an ACCEPT, an ACCEPTED
# and a CHOSEN per follower). msgpack cost about 3 us per message to decode and validate in
# Python; this does the same checks in one pass.
#
# Layout, little-endian, layout version 1:
#
#   offset size field
#        0    1 magic       0xC1: the one byte msgpack never uses, so a body that starts with
#                           it is this layout and anything else is msgpack (state answers,
#                           whose value is a list of records, travel as msgpack)
#        1    1 layout      1
#        2    2 count       messages that follow, 1 .. QUORUM_MESSAGES_MAX
#   then `count` times:
#        0    1 kind        MSG_PREPARE .. MSG_BEHIND, not MSG_STATE
#        1    1 source      replica index, < REPLICAS_MAX
#        2    1 target      replica index, < REPLICAS_MAX
#        3    1 has_value   0 or 1
#        4    2 incarnation 1 .. INCARNATION_MAX
#        6    2 key_len     0 .. KEY_BYTES_MAX (at least 1 for the instance kinds)
#        8    8 version
#       16    8 ballot
#       24    8 accepted_ballot
#       32    4 value_len   0 unless has_value; a value is a binlog record of exactly this
#                           key and version (checked here, checksum included)
#       36      key, then value

class QuorumWireError(ValueError):
    """A QUORUM body that is truncated, corrupted or breaks a rule; `field` names where."""

    def __init__(self, message, field):
        super().__init__(message)
        self.field = field


cdef enum:
    _QWIRE_MAGIC = 0xC1
    _QWIRE_LAYOUT = 1
    _QWIRE_HEADER_BYTES = 4
    _QWIRE_MESSAGE_BYTES = 36
    _QUORUM_MESSAGES_MAX = 4096

QWIRE_MAGIC = _QWIRE_MAGIC
QUORUM_MESSAGES_MAX = _QUORUM_MESSAGES_MAX


def encode_quorum_messages(list messages not None) -> bytes:
    """The binary body of a QUORUM frame holding `messages` (none of them MSG_STATE: those
    travel as msgpack). Raises ValueError for a message the layout cannot carry."""
    cdef Py_ssize_t count = len(messages)
    if count < 1 or count > _QUORUM_MESSAGES_MAX:
        raise ValueError(f"messages: {count}, expected 1..{_QUORUM_MESSAGES_MAX}")
    cdef Py_ssize_t total = _QWIRE_HEADER_BYTES
    cdef Message m
    for item in messages:
        m = <Message?> item
        if m.kind == MSG_STATE or m.kind < MSG_PREPARE or m.kind > MSG_BEHIND:
            raise ValueError(f"kind: {m.kind} is not sent in the binary layout")
        if m.incarnation < 1 or m.incarnation > _INCARNATION_MAX:
            raise ValueError(f"incarnation: {m.incarnation}, expected 1..{_INCARNATION_MAX}")
        if m.source < 0 or m.source >= _REPLICAS_MAX or m.target < 0 \
                or m.target >= _REPLICAS_MAX:
            raise ValueError(f"source, target: {m.source}, {m.target}, expected 0.."
                             f"{_REPLICAS_MAX - 1}")
        if m.value is not None and type(m.value) is not bytes:
            raise ValueError("value: a binlog record (bytes) or None")
        if len(m.key) > _KEY_BYTES_MAX:
            raise ValueError(f"key: {len(m.key)} bytes, the limit is {_KEY_BYTES_MAX}")
        if not m.key and m.kind != MSG_STATE_REQUEST:
            # (the decoder refuses it: a peer would drop the whole frame)
            raise ValueError(f"key: required for kind {m.kind}")
        total += _QWIRE_MESSAGE_BYTES + len(m.key) + _size_of(m.value)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t* p = <uint8_t*> PyBytes_AS_STRING(out)
    p[0] = _QWIRE_MAGIC
    p[1] = _QWIRE_LAYOUT
    _store16(p + 2, <uint16_t> count)
    cdef Py_ssize_t pos = _QWIRE_HEADER_BYTES, key_len, value_len
    for item in messages:
        m = <Message> item
        key_len = len(m.key)
        value_len = _size_of(m.value)
        p[pos] = <uint8_t> m.kind
        p[pos + 1] = <uint8_t> m.source
        p[pos + 2] = <uint8_t> m.target
        p[pos + 3] = 1 if m.value is not None else 0
        _store16(p + pos + 4, <uint16_t> m.incarnation)
        _store16(p + pos + 6, <uint16_t> key_len)
        _store64(p + pos + 8, m.version)
        _store64(p + pos + 16, m.ballot)
        _store64(p + pos + 24, m.accepted_ballot)
        _store32(p + pos + 32, <uint32_t> value_len)
        pos += _QWIRE_MESSAGE_BYTES
        if key_len:
            memcpy(p + pos, PyBytes_AS_STRING(m.key), key_len)
            pos += key_len
        if value_len:
            memcpy(p + pos, PyBytes_AS_STRING(<bytes> m.value), value_len)
            pos += value_len
    return out


def group_quorum(list messages not None):
    """`messages` by target, each list in order: {target: (chosen, others)}. A CHOSEN reveals
    no vote of the sender and leaves at once; the others wait for its vote log."""
    cdef dict out = {}
    cdef Message m
    cdef tuple entry
    for item in messages:
        m = <Message?> item
        entry = out.get(m.target)
        if entry is None:
            entry = out[m.target] = ([], [])
        if m.kind == MSG_CHOSEN:
            (<list> entry[0]).append(m)
        else:
            (<list> entry[1]).append(m)
    return out


def chunk_quorum(list messages not None, Py_ssize_t max_bytes, Py_ssize_t max_messages):
    """`messages` cut into the chunks that each go in one QUORUM frame, in order: a state
    answer part alone (it travels as msgpack), the others up to `max_messages`, or until
    they reach `max_bytes` counting 96 bytes a message plus its value."""
    cdef list chunks = []
    cdef list chunk = []
    cdef Py_ssize_t size = 0
    cdef Message m
    for item in messages:
        m = <Message?> item
        if m.kind == MSG_STATE:
            if chunk:
                chunks.append(chunk)
                chunk = []
                size = 0
            chunks.append([m])
            continue
        chunk.append(m)
        size += 96 + _size_of(m.value)
        if size >= max_bytes or len(chunk) >= max_messages:
            chunks.append(chunk)
            chunk = []
            size = 0
    if chunk:
        chunks.append(chunk)
    return chunks


def decode_quorum_messages(body) -> list:
    """The messages of a binary QUORUM body, every field checked; raises QuorumWireError
    naming the field (messages[i].<field>) on anything malformed."""
    cdef const uint8_t[::1] view = body
    cdef Py_ssize_t n = view.shape[0]
    if n < _QWIRE_HEADER_BYTES:
        raise QuorumWireError(f"body: truncated, {n} bytes", "body")
    cdef const uint8_t* p = &view[0]
    if p[0] != _QWIRE_MAGIC or p[1] != _QWIRE_LAYOUT:
        raise QuorumWireError(f"body: layout {p[1]}, this build reads {_QWIRE_LAYOUT}", "body")
    cdef Py_ssize_t count = _load16(p + 2)
    if count < 1 or count > _QUORUM_MESSAGES_MAX:
        raise QuorumWireError(f"messages: {count}, expected 1..{_QUORUM_MESSAGES_MAX}",
                              "messages")
    cdef list out = []
    cdef Py_ssize_t pos = _QWIRE_HEADER_BYTES, head, i
    cdef int kind, source, target
    cdef uint32_t key_len, value_len
    cdef uint64_t incarnation, version
    cdef Message m
    cdef Record record
    cdef bytes key
    cdef object value
    for i in range(count):
        if n - pos < _QWIRE_MESSAGE_BYTES:
            raise QuorumWireError(f"messages[{i}]: truncated", "body")
        head = pos
        kind = p[pos]
        source = p[pos + 1]
        target = p[pos + 2]
        incarnation = _load16(p + pos + 4)
        key_len = _load16(p + pos + 6)
        version = _load64(p + pos + 8)
        value_len = _load32(p + pos + 32)
        if kind < MSG_PREPARE or kind > MSG_BEHIND or kind == MSG_STATE:
            raise QuorumWireError(f"messages[{i}].kind: {kind}, expected {MSG_PREPARE}.."
                                  f"{MSG_BEHIND} (a state message is msgpack)",
                                  f"messages[{i}].kind")
        if source >= _REPLICAS_MAX:
            raise QuorumWireError(f"messages[{i}].source: {source}, expected < "
                                  f"{_REPLICAS_MAX}", f"messages[{i}].source")
        if target >= _REPLICAS_MAX:
            raise QuorumWireError(f"messages[{i}].target: {target}, expected < "
                                  f"{_REPLICAS_MAX}", f"messages[{i}].target")
        if incarnation < 1:
            raise QuorumWireError(f"messages[{i}].incarnation: 0, expected >= 1",
                                  f"messages[{i}].incarnation")
        if p[pos + 3] > 1 or (p[pos + 3] == 0 and value_len != 0):
            raise QuorumWireError(f"messages[{i}].has_value: {p[pos + 3]} with "
                                  f"{value_len} value bytes", f"messages[{i}].value")
        if key_len > _KEY_BYTES_MAX:
            raise QuorumWireError(f"messages[{i}].key: {key_len} bytes, the limit is "
                                  f"{_KEY_BYTES_MAX}", f"messages[{i}].key")
        if kind != MSG_STATE_REQUEST and key_len == 0:
            raise QuorumWireError(f"messages[{i}].key: required for kind {kind}",
                                  f"messages[{i}].key")
        pos += _QWIRE_MESSAGE_BYTES
        if <Py_ssize_t> key_len > n - pos or <Py_ssize_t> value_len > n - pos - key_len:
            raise QuorumWireError(f"messages[{i}]: key or value runs past the end", "body")
        key = PyBytes_FromStringAndSize(<const char*> (p + pos), key_len)
        value = None
        if p[head + 3] and kind != MSG_STATE_REQUEST:
            value = PyBytes_FromStringAndSize(<const char*> (p + pos + key_len), value_len)
            try:
                record = _decode(value)
            except RecordError as e:
                raise QuorumWireError(f"messages[{i}].value: not a binlog record ({e})",
                                      f"messages[{i}].value") from None
            if record.key != key or record.version != version:
                raise QuorumWireError(
                    f"messages[{i}].value: a record of {record.key!r} v{record.version}, "
                    f"the message is about {key!r} v{version}", f"messages[{i}].value")
        pos += key_len + value_len
        m = Message.__new__(Message)
        m.kind = kind
        m.source = source
        m.target = target
        m.incarnation = incarnation
        m.key = key
        m.version = version
        m.ballot = _load64(p + head + 16)
        m.accepted_ballot = _load64(p + head + 24)
        m.value = value
        out.append(m)
    if pos != n:
        raise QuorumWireError(f"body: {n - pos} trailing bytes after the last message", "body")
    return out
