# Wire frames: every request and response on every KVSvr socket is one.
#
# A ZeroMQ message is one part holding one or more frames back to back (at most
# FRAMES_PER_MESSAGE_MAX, MESSAGE_BYTES_MAX in all): each header's body_len says where the next
# frame starts. So a client pipelines many requests in one send and a node answers them in
# one send, paying ZeroMQ's per-message cost once.
#
#   offset size field
#        0    2 magic       0x564B (b"KV")
#        2    1 protocol    1
#        3    1 kind        1 request, 2 response
#        4    2 code        request: method; response: status (0 = ok)
#        6    2 flags       reserved, must be 0
#        8    8 request_id  chosen by the caller, echoed in the response
#       16    4 budget_ms   request: how long the caller waits (0 = unbounded); response: 0
#       20    4 body_len    bytes of body after this header (<= FRAME_BYTES_MAX - 24)
#       24      body        msgpack, its schema chosen by (kind, code)
#
# The header is fixed so that later layers (RPC services, replica-to-replica streams) reuse
# it unchanged: they only add methods and body schemas.


class FrameError(ValueError):
    """A frame is truncated, oversize or not a KVSvr frame."""


def encode_frame(int kind, int code, uint64_t request_id, uint32_t budget_ms, body) -> bytes:
    """Header + body in one allocation."""
    cdef const uint8_t[::1] b = body
    cdef Py_ssize_t body_len = b.shape[0]
    if kind < 1 or kind > _FRAME_KIND_MAX:
        raise ValueError(f"kind: {kind}, expected 1 (request) or 2 (response)")
    if code < 0 or code > 0xFFFF:
        raise ValueError(f"code: {code} does not fit in u16")
    if body_len + _FRAME_HEADER_BYTES > _FRAME_BYTES_MAX:
        raise ValueError(f"body: {body_len} bytes, a frame is at most {_FRAME_BYTES_MAX}")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _FRAME_HEADER_BYTES + body_len)
    cdef uint8_t* p = <uint8_t*> PyBytes_AS_STRING(out)
    _store16(p, _FRAME_MAGIC)
    p[2] = _FRAME_PROTOCOL
    p[3] = <uint8_t> kind
    _store16(p + 4, <uint16_t> code)
    _store16(p + 6, 0)
    _store64(p + 8, request_id)
    _store32(p + 16, budget_ms)
    _store32(p + 20, <uint32_t> body_len)
    if body_len:
        memcpy(p + _FRAME_HEADER_BYTES, &b[0], body_len)
    return out


cdef str _header_invalid(const uint8_t* p, Py_ssize_t available):
    """Why the header at p (with `available` bytes from p on) is bad, or None."""
    if available < _FRAME_HEADER_BYTES:
        return f"frame: truncated, {available} bytes left, a header is {_FRAME_HEADER_BYTES}"
    if _load16(p) != _FRAME_MAGIC:
        return "frame.magic: not a KVSvr frame"
    if p[2] != _FRAME_PROTOCOL:
        return f"frame.protocol: {p[2]}, this build speaks {_FRAME_PROTOCOL}"
    if p[3] < 1 or p[3] > _FRAME_KIND_MAX:
        return f"frame.kind: {p[3]}, expected 1 (request) or 2 (response)"
    if _load16(p + 6) != 0:
        return "frame.flags: reserved bits set"
    cdef uint32_t body_len = _load32(p + 20)
    if <Py_ssize_t> body_len + _FRAME_HEADER_BYTES > _FRAME_BYTES_MAX:
        return f"frame.body_len: {body_len}, a frame is at most {_FRAME_BYTES_MAX} bytes"
    if <Py_ssize_t> body_len > available - _FRAME_HEADER_BYTES:
        return (f"frame.body_len: header says {body_len}, "
                f"{available - _FRAME_HEADER_BYTES} bytes present")
    return None


def decode_frames(buf):
    """Split a message into frames.

    Returns (frames, error, error_request_id): `frames` is a list of
    (kind, code, request_id, budget_ms, body memoryview) for every frame read before the
    first bad one; `error` says what was wrong with that one (None if the message was whole),
    and `error_request_id` is its request id when its header got that far (else 0). A bad
    frame ends the message: its length cannot be trusted, so nothing after it is read.
    """
    cdef const uint8_t[::1] view
    try:
        view = buf
    except (TypeError, ValueError, BufferError):
        return [], "message: not a contiguous byte buffer", 0
    cdef Py_ssize_t n = view.shape[0]
    cdef list frames = []
    if n == 0:
        return frames, "message: empty", 0
    if n > _MESSAGE_BYTES_MAX:
        return frames, f"message: {n} bytes, the limit is {_MESSAGE_BYTES_MAX}", 0
    cdef const uint8_t* p = &view[0]
    cdef Py_ssize_t pos = 0
    cdef uint32_t body_len
    cdef str error
    mv = memoryview(buf)
    while pos < n:
        error = _header_invalid(p + pos, n - pos)
        if error is not None:
            return frames, error, (_load64(p + pos + 8) if n - pos >= 16 else 0)
        if len(frames) == _FRAMES_PER_MESSAGE_MAX:
            return (frames, f"message: more than {_FRAMES_PER_MESSAGE_MAX} frames",
                    _load64(p + pos + 8))
        body_len = _load32(p + pos + 20)
        frames.append((p[pos + 3], _load16(p + pos + 4), _load64(p + pos + 8),
                       _load32(p + pos + 16),
                       mv[pos + _FRAME_HEADER_BYTES:pos + _FRAME_HEADER_BYTES + body_len]))
        pos += _FRAME_HEADER_BYTES + body_len
    return frames, None, 0


def decode_frame(buf):
    """Exactly one frame: (kind, code, request_id, budget_ms, body); FrameError if not."""
    frames, error, _ = decode_frames(buf)
    if error is not None:
        raise FrameError(error)
    if len(frames) != 1:
        raise FrameError(f"message: {len(frames)} frames, expected exactly one")
    return frames[0]
