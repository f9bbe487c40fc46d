"""Limits and tunables of the quorum queue, in one place.

The record layout and the per-message limits are compiled into the core
(`kvsvr/_qlog.pxi`) and re-exported here, so there is no second copy of them.
"""

from __future__ import annotations

from kvsvr._core import (
    QUEUE_MAX_BATCH_MESSAGES,
    QUEUE_MAX_MESSAGE_BYTES,
    QUEUE_RECORD_HEADER_BYTES,
)
from kvsvr.limits import FRAME_BYTES_MAX, MESSAGE_BYTES_MAX

# --- wire -------------------------------------------------------------------------------------
BATCH_MAX_BYTES = 4 << 20           # values of one produce batch (a batch is one frame)
FETCH_MAX_BYTES = 4 << 20           # records returned by one fetch
FETCH_DEFAULT_BYTES = 1 << 20
FETCH_MAX_WAIT_MS = 30_000          # a fetch may wait this long for new records (long poll)
TOPIC_BYTES_MAX = 200               # topic name length (it is a directory name)
PRODUCER_MAP_MAX_BYTES = 2 << 20    # a consumer group's per-producer positions, encoded

# --- server -----------------------------------------------------------------------------------
SERVER_QUEUE_MESSAGES = 10_000      # ZeroMQ messages queued per peer of a server, each way
ROUND_MAX_MESSAGES = 1_024          # client messages drained before a round is handed to sync
ROUND_MAX_BYTES = 64 << 20          # ... or this many bytes of them
PARKED_FETCHES_MAX = 10_000         # long-poll fetches waiting at once (more: answered empty)
INDEX_INTERVAL_BYTES = 64 << 10     # sparse offset index: one entry per this many bytes
RETENTION_CHECK_S = 1.0             # how often retention and parked fetches are looked at
OFFSETS_LOG_MAX_BYTES = 16 << 20    # the offsets log is rewritten (latest commits) past this
TOPICS_MAX = 10_000                 # topics per server
REQUESTS_PER_MESSAGE_MAX = 64       # frames handled per ZeroMQ message (the rest: an error)
CLIENT_ROUND_REPLY_BYTES = 2 * FETCH_MAX_BYTES   # fetch reply bytes per client per round

# --- clients ----------------------------------------------------------------------------------
PRODUCER_MAX_BATCHES_IN_FLIGHT = 256   # per producer: send() waits when this many are open
PRODUCER_LINGER_MS = 2                 # send() gathers messages this long into one batch
GROUP_BACKOFF_S = 1.0                  # a group that failed a batch is avoided this long ...
GROUP_BACKOFF_MAX_S = 10.0             # ... doubling up to this
# (Messages held while a gap fills are not bounded by count: refusing to read more could
# keep the gap from ever filling. They are bounded in time by batch_lifetime_ms + skew;
# README "Known limits".)
CONSUMER_MAX_TRACKED_PRODUCERS = 100_000  # producers whose next seq a group remembers
CONSUMER_COMMIT_INTERVAL_S = 0.2        # offsets are committed at most this often
REQUEST_TIMEOUT_S = 5.0                 # CLI, status and admin calls

assert BATCH_MAX_BYTES + QUEUE_MAX_BATCH_MESSAGES * 8 + 4096 <= FRAME_BYTES_MAX
assert FETCH_MAX_BYTES + 4096 <= FRAME_BYTES_MAX <= MESSAGE_BYTES_MAX
assert QUEUE_MAX_MESSAGE_BYTES <= BATCH_MAX_BYTES

__all__ = [
    "BATCH_MAX_BYTES",
    "CLIENT_ROUND_REPLY_BYTES",
    "CONSUMER_COMMIT_INTERVAL_S",
    "CONSUMER_MAX_TRACKED_PRODUCERS",
    "FETCH_DEFAULT_BYTES",
    "FETCH_MAX_BYTES",
    "FETCH_MAX_WAIT_MS",
    "GROUP_BACKOFF_MAX_S",
    "GROUP_BACKOFF_S",
    "INDEX_INTERVAL_BYTES",
    "OFFSETS_LOG_MAX_BYTES",
    "PARKED_FETCHES_MAX",
    "PRODUCER_LINGER_MS",
    "PRODUCER_MAP_MAX_BYTES",
    "PRODUCER_MAX_BATCHES_IN_FLIGHT",
    "QUEUE_MAX_BATCH_MESSAGES",
    "QUEUE_MAX_MESSAGE_BYTES",
    "QUEUE_RECORD_HEADER_BYTES",
    "REQUESTS_PER_MESSAGE_MAX",
    "REQUEST_TIMEOUT_S",
    "RETENTION_CHECK_S",
    "ROUND_MAX_BYTES",
    "ROUND_MAX_MESSAGES",
    "SERVER_QUEUE_MESSAGES",
    "TOPICS_MAX",
    "TOPIC_BYTES_MAX",
]
