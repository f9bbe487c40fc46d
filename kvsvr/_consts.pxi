# Limits and layout constants of KVSvr, in one place.
#
# Every size that a client, a frame or a record can carry is bounded here; the Python shell
# reads them through `kvsvr.limits` (re-exported from `_core`), so there is no second copy.

# --- data model limits -------------------------------------------------------------------
# LMDB refuses keys over 511 bytes. The longest LMDB key we build is the change index entry
# (u16 key length + key + u64 version + row key), so key and row key share that budget.
cdef enum:
    _KEY_BYTES_MAX = 240
    _ROW_KEY_BYTES_MAX = 240
    _VALUE_BYTES_MAX = 1048576          # 1 MiB per value or row
    _OPS_PER_BATCH_MAX = 256            # operations in one atomic batch on one key
    _BATCH_BYTES_MAX = 4194304          # rows + values of one batch
    _SCAN_ROWS_MAX = 10000              # rows returned by one scan / changes call
    _SCAN_ROWS_DEFAULT = 1000

# --- wire limits -------------------------------------------------------------------------
cdef enum:
    _FRAME_BYTES_MAX = 4259840          # one request or response frame: a full batch + slack
    _FRAMES_PER_MESSAGE_MAX = 1024      # pipelined requests carried by one ZeroMQ message
    _MESSAGE_BYTES_MAX = 16777216       # one ZeroMQ message (frames back to back)

# --- binlog record layout (see _record.pxi) ------------------------------------------------
cdef enum:
    _RECORD_MAGIC = 0x4C42564B          # b"KVBL" little-endian
    _RECORD_LAYOUT = 1
    _RECORD_HEADER_BYTES = 56
    _OP_HEADER_BYTES = 9

# --- wire frame layout (see _frame.pxi) ----------------------------------------------------
cdef enum:
    _FRAME_MAGIC = 0x564B               # b"KV" little-endian
    _FRAME_PROTOCOL = 1
    _FRAME_HEADER_BYTES = 24

KEY_BYTES_MAX = _KEY_BYTES_MAX
ROW_KEY_BYTES_MAX = _ROW_KEY_BYTES_MAX
VALUE_BYTES_MAX = _VALUE_BYTES_MAX
OPS_PER_BATCH_MAX = _OPS_PER_BATCH_MAX
BATCH_BYTES_MAX = _BATCH_BYTES_MAX
SCAN_ROWS_MAX = _SCAN_ROWS_MAX
SCAN_ROWS_DEFAULT = _SCAN_ROWS_DEFAULT
FRAME_BYTES_MAX = _FRAME_BYTES_MAX
FRAMES_PER_MESSAGE_MAX = _FRAMES_PER_MESSAGE_MAX
MESSAGE_BYTES_MAX = _MESSAGE_BYTES_MAX
RECORD_HEADER_BYTES = _RECORD_HEADER_BYTES
FRAME_HEADER_BYTES = _FRAME_HEADER_BYTES
FRAME_PROTOCOL = _FRAME_PROTOCOL

# Operation kinds of a mutation (binlog records carry them as one byte).
OP_PUT = 1          # value := value                      (row must be empty)
OP_DELETE = 2       # value := absent                     (row and value empty)
OP_INCR = 3         # value := int(value) + delta         (value = 8-byte signed delta)
OP_ROW_PUT = 4      # rows[row] := value
OP_ROW_DELETE = 5   # rows[row] := tombstone              (value empty)
OP_APPEND = 6       # rows[u64be(next_seq)] := value; next_seq += 1   (row empty)
OP_COMPACT = 7      # drop tombstones of versions <= value (8-byte u64)  (row empty)
# The value (row empty) or the row written earlier in the same batch expires at an instant:
# value = u64 at_ms (unix ms, set by the node that takes the request; 0 on the wire), u64 ttl_ms
OP_EXPIRE = 8
# Removes the value (row empty) or the row if its recorded instant is still <= value (u64 unix
# ms): a replica's background removal of expired data, alone in its batch
OP_PURGE = 9
cdef enum:
    _OP_KIND_MAX = 9
    _EXPIRE_VALUE_BYTES = 16

OP_NAMES = {
    OP_PUT: "put", OP_DELETE: "delete", OP_INCR: "incr",
    OP_ROW_PUT: "row_put", OP_ROW_DELETE: "row_delete", OP_APPEND: "append",
    OP_COMPACT: "compact", OP_EXPIRE: "expire", OP_PURGE: "purge",
}

# Frame kinds.
FRAME_REQUEST = 1
FRAME_RESPONSE = 2
cdef enum:
    _FRAME_KIND_MAX = 2

# --- version quorum (see _quorum.pxi) ----------------------------------------------------
# Ballot = ((round << 24) | (incarnation << 8) | node) + 1: 0 means "no ballot", two lives of a
# replica never share a ballot, and round 0 sorts below every round >= 1.
cdef enum:
    _REPLICAS_MAX = 7
    _INCARNATION_MAX = 65535
    _PROPOSAL_TIMEOUT_MS = 50        # a proposal phase without a majority is retried ...
    _RETRY_BACKOFF_MS = 10           # first retry delay after a rejection (grows, per node)
    _RETRY_DOUBLINGS_MAX = 6            # ... each retry waits twice as long, up to 64x
    _PROPOSALS_IN_FLIGHT_MAX = 65536    # per replica; beyond it propose() refuses
    _STATE_PART_BYTES = 2097152         # a state answer is sent in parts of about this size
    _STATE_PARTS_MAX = 65535            # ... numbered in 16 bits
    _STATE_ANSWERS_FOLLOWED = 4         # answers of one peer assembled at once

REPLICAS_MAX = _REPLICAS_MAX
INCARNATION_MAX = _INCARNATION_MAX
PROPOSAL_TIMEOUT_MS = _PROPOSAL_TIMEOUT_MS
RETRY_BACKOFF_MS = _RETRY_BACKOFF_MS
RETRY_DOUBLINGS_MAX = _RETRY_DOUBLINGS_MAX
PROPOSALS_IN_FLIGHT_MAX = _PROPOSALS_IN_FLIGHT_MAX
STATE_PART_BYTES = _STATE_PART_BYTES

# Quorum message kinds.
MSG_PREPARE = 1         # proposer -> acceptors: promise me `ballot` for (key, version)
MSG_PROMISE = 2         # acceptor -> proposer: promised; carries what it accepted (if any)
MSG_ACCEPT = 3          # proposer -> acceptors: accept `value` at `ballot`
MSG_ACCEPTED = 4        # acceptor -> proposer: accepted `ballot`
MSG_REJECT = 5          # acceptor -> proposer: promised higher (`accepted_ballot` = promise)
MSG_CHOSEN = 6          # anyone -> anyone: `value` is chosen for (key, version)
MSG_STATE_REQUEST = 7   # rebuilding replica -> peers: send me your acceptor state
# peer -> rebuilding replica: its acceptor records, one part of its answer (`accepted_ballot`
# = answer << 32 | part << 16 | parts); the answer counts once every part of it arrived
MSG_STATE = 8
# acceptor -> proposer: that version is at or below my floor (chosen and applied here;
# `accepted_ballot` carries the floor): catch up, then retry above it
MSG_BEHIND = 9

# --- shared-memory counters and value blocks (see _counters.pxi) -------------------------
cdef enum:
    _COUNTERS_MAGIC = 0x5443564B        # b"KVCT" little-endian
    _COUNTERS_LAYOUT = 1
    _COUNTERS_HEADER_BYTES = 64
    _COUNTERS_SLOT_HEADER_BYTES = 8     # u32 kind, u32 reserved
    _MONITOR_IDS_MAX = 65536            # ids are 1..max_ids; a file holds at most this many
    _MONITOR_IDS_DEFAULT = 1024
    _WINDOW_S_MIN = 8                   # seconds of per-second buckets kept per id
    _WINDOW_S_MAX = 86400
    _WINDOW_S_DEFAULT = 600
    _BUCKET_VALUE_BITS = 44             # a bucket word: 20-bit cycle stamp, 44-bit value
    _MONITOR_NAME_BYTES_MAX = 64
    _MONITOR_DESCRIPTION_BYTES_MAX = 256
    _VALUE_ENTRY_BYTES = 12             # value block entry: u32 id, i64 value

# Kinds of a monitor id (the u32 at the head of its slot).
cdef enum:
    _KIND_FREE = 0
    _KIND_COUNTER = 1                   # add(): per-second sum of deltas
    _KIND_GAUGE = 2                     # set(): per-second last value

COUNTERS_HEADER_BYTES = _COUNTERS_HEADER_BYTES
MONITOR_IDS_MAX = _MONITOR_IDS_MAX
MONITOR_IDS_DEFAULT = _MONITOR_IDS_DEFAULT
WINDOW_S_MIN = _WINDOW_S_MIN
WINDOW_S_MAX = _WINDOW_S_MAX
WINDOW_S_DEFAULT = _WINDOW_S_DEFAULT
MONITOR_NAME_BYTES_MAX = _MONITOR_NAME_BYTES_MAX
MONITOR_DESCRIPTION_BYTES_MAX = _MONITOR_DESCRIPTION_BYTES_MAX
VALUE_ENTRY_BYTES = _VALUE_ENTRY_BYTES
BUCKET_VALUE_MAX = (<long long> 1 << (_BUCKET_VALUE_BITS - 1)) - 1
BUCKET_VALUE_MIN = -(<long long> 1 << (_BUCKET_VALUE_BITS - 1))
KIND_COUNTER = _KIND_COUNTER
KIND_GAUGE = _KIND_GAUGE
