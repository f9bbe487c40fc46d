"""Limits of KVSvr, as compiled into the core (`kvsvr/_consts.pxi` is the one definition)."""

from kvsvr._core import (
    DEFAULT_SCAN_ROWS,
    FRAME_HEADER_BYTES,
    MAX_BATCH_BYTES,
    MAX_FRAME_BYTES,
    MAX_FRAMES_PER_MESSAGE,
    MAX_KEY_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_OPS_PER_BATCH,
    MAX_ROW_KEY_BYTES,
    MAX_SCAN_ROWS,
    MAX_VALUE_BYTES,
)

# Tunables of the Python shell that are not part of any on-disk or wire layout.
OPS_REMEMBERED_PER_CLIENT = 10_000   # exactly-once window: retried op ids recognised per client
OPS_TRIM_STEP = 256                  # ... trimmed every this many ops (window + step at most)
CLIENT_IDLE_EXPIRY_S = 86_400        # a client silent this long is forgotten, op ids and all
CLIENT_SWEEP_BATCH = 1_000           # clients looked at per sweep (bounded work per round)
GROUP_COMMIT_MAX_OPS = 2_048         # mutations folded into one durable LMDB transaction
SCAN_MAX_ENTRIES_VISITED = 20_000    # tombstones skipped by one scan before it returns a page
PAGE_MAX_BYTES = 2 << 20             # rows + values in one scan/changes page (fits a frame)
BINLOG_TRIM_PER_WRITE = 64           # records trimmed per mutation when over the bound
DISK_FULL_BELOW_BYTES = 16 << 20     # a failed commit with less free disk than this: full
CLIENT_ATTEMPT_TIMEOUT_S = 1.0       # a request unanswered this long is resent (same op id)
DEFAULT_TIMEOUT_S = 5.0              # overall deadline of a client call
CLIENT_QUEUE_MESSAGES = 10_000       # ZeroMQ messages queued per client socket, each way
NODE_QUEUE_MESSAGES = 1_000          # ... per peer of a node (each <= MAX_MESSAGE_BYTES)
BINLOG_MAX_RECORDS = 1_000_000       # default bound on binlog length (trimmed oldest first)
VOTE_LOG_BYTES = 16 << 20            # a replica's vote log file (zero-filled once; a round's
                                     # records that do not fit go to LMDB at once instead)
STATE_CACHE_KEYS = 1 << 18           # key states a store keeps in memory (newest applied) ...
STATE_CACHE_VALUE_BYTES = 512        # ... each with a value at most this big
DEFERRED_RECORDS_MAX = 1 << 17       # binlog records a restart may replay into key states a
                                     # replica held back from LMDB (see Store) ...
KEY_FLUSH_CYCLE_S = 10.0             # ... which it writes once per this long, by key range
KEY_FLUSH_IDLE_S = 1.0               # ... or all at once after this long without a commit
PEER_SECRET_MIN_BYTES = 16           # [security] peer_secret, when set
PEER_MAC_BYTES = 16                  # the MAC at the head of an authenticated peer request

# Held key states are pinned in the state cache, which must keep room for others.
assert DEFERRED_RECORDS_MAX <= STATE_CACHE_KEYS // 2
# A page of at least one maximal row must still fit in one frame.
assert PAGE_MAX_BYTES + MAX_VALUE_BYTES + MAX_ROW_KEY_BYTES + 4096 <= MAX_FRAME_BYTES

__all__ = [
    "BINLOG_MAX_RECORDS",
    "BINLOG_TRIM_PER_WRITE",
    "CLIENT_ATTEMPT_TIMEOUT_S",
    "CLIENT_IDLE_EXPIRY_S",
    "CLIENT_QUEUE_MESSAGES",
    "CLIENT_SWEEP_BATCH",
    "DEFAULT_SCAN_ROWS",
    "DEFAULT_TIMEOUT_S",
    "DEFERRED_RECORDS_MAX",
    "DISK_FULL_BELOW_BYTES",
    "FRAME_HEADER_BYTES",
    "GROUP_COMMIT_MAX_OPS",
    "KEY_FLUSH_CYCLE_S",
    "KEY_FLUSH_IDLE_S",
    "MAX_BATCH_BYTES",
    "MAX_FRAMES_PER_MESSAGE",
    "MAX_FRAME_BYTES",
    "MAX_KEY_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_OPS_PER_BATCH",
    "MAX_ROW_KEY_BYTES",
    "MAX_SCAN_ROWS",
    "MAX_VALUE_BYTES",
    "NODE_QUEUE_MESSAGES",
    "OPS_REMEMBERED_PER_CLIENT",
    "OPS_TRIM_STEP",
    "PAGE_MAX_BYTES",
    "PEER_MAC_BYTES",
    "PEER_SECRET_MIN_BYTES",
    "SCAN_MAX_ENTRIES_VISITED",
    "STATE_CACHE_KEYS",
    "STATE_CACHE_VALUE_BYTES",
    "VOTE_LOG_BYTES",
]
