"""Limits and tunables of the quorum queue, in one place.

The record layout and the per-message limits are compiled into the core
(`kvsvr/_qlog.pxi`) and re-exported here, so there is no second copy of them.
"""

from __future__ import annotations

from kvsvr._core import (
    QUEUE_BATCH_MESSAGES_MAX,
    QUEUE_MESSAGE_BYTES_MAX,
    QUEUE_RECORD_HEADER_BYTES,
)
from kvsvr.limits import FRAME_BYTES_MAX, MESSAGE_BYTES_MAX

# --- wire -------------------------------------------------------------------------------------
PRODUCE_BATCH_BYTES_MAX = 4 << 20           # values of one produce batch (a batch is one frame)
FETCH_BYTES_MAX = 4 << 20           # records returned by one fetch
FETCH_BYTES_DEFAULT = 1 << 20
FETCH_WAIT_MS_MAX = 30_000          # a fetch may wait this long for new records (long poll)
TOPIC_BYTES_MAX = 200               # topic name length (it is a directory name)
PRODUCER_MAP_BYTES_MAX = 2 << 20    # a consumer group's per-producer positions, encoded

# --- server -----------------------------------------------------------------------------------
QUEUE_CLIENT_SOCKET_MESSAGES = 100_000  # ZeroMQ messages queued per producer/consumer socket
SERVER_QUEUE_MESSAGES = 10_000      # ZeroMQ messages queued per peer of a server, each way
SERVER_ROUND_MESSAGES_MAX = 1_024   # client messages drained before a round is handed to sync
SERVER_ROUND_BYTES_MAX = 64 << 20   # ... or this many bytes of them
SERVER_READY_TIMEOUT_S = 30.0      # the launcher waits this long for a server to serve
PARKED_FETCHES_MAX = 10_000         # long-poll fetches waiting at once (more: answered empty)
INDEX_INTERVAL_BYTES = 64 << 10     # sparse offset index: one entry per this many bytes
RETENTION_CHECK_S = 1.0             # how often retention and parked fetches are looked at
OFFSETS_LOG_BYTES_MAX = 16 << 20    # the offsets log is rewritten (latest commits) past this
TOPICS_MAX = 10_000                 # topics per server
REQUESTS_PER_MESSAGE_MAX = 64       # frames handled per ZeroMQ message (the rest: an error)
CLIENT_ROUND_REPLY_BYTES = 2 * FETCH_BYTES_MAX   # fetch reply bytes per client per round

# --- clients ----------------------------------------------------------------------------------
PRODUCER_BATCHES_IN_FLIGHT_MAX = 256   # per producer: send() waits when this many are open
PRODUCER_LINGER_MS = 2                 # send() gathers messages this long into one batch
GROUP_BACKOFF_S = 1.0                  # a group that failed a batch is avoided this long ...
GROUP_BACKOFF_S_MAX = 10.0             # ... doubling up to this
# (Messages held while a gap fills are not bounded by count: refusing to read more could
# keep the gap from ever filling. They are bounded in time by batch_lifetime_ms + skew;
# README "Known limits".)
CONSUMER_TRACKED_PRODUCERS_MAX = 100_000  # producers whose next seq a group remembers
CONSUMER_COMMIT_INTERVAL_S = 0.2        # offsets are committed at most this often
REQUEST_TIMEOUT_S = 5.0                 # admin calls that write (create a topic)
# status, lag and topic look-ups ask every server at once and wait this long for each: an
# unreachable server costs this, whatever the number of servers
ADMIN_CALL_TIMEOUT_S = 1.0
# A producer's sockets may still be connecting this long after it started (or after a
# server came back): until then a batch waits for 2 servers of a group to connect;
# after it, a batch no group can take (fewer than 2 servers connected in each) fails
# at once with Unavailable instead of being retried for its whole lifetime.
PRODUCER_CONNECT_GRACE_S = 1.0
PRODUCER_CONNECT_POLL_S = 0.005        # how often a batch looks while sockets connect
# Failed batches a producer remembers so that they can be retried under their own
# message ids (`retry_of`); older ones can only be sent again as new messages.
PRODUCER_RETRYABLE_BATCHES_MAX = 4_096

assert PRODUCE_BATCH_BYTES_MAX + QUEUE_BATCH_MESSAGES_MAX * 8 + 4096 <= FRAME_BYTES_MAX
assert FETCH_BYTES_MAX + 4096 <= FRAME_BYTES_MAX <= MESSAGE_BYTES_MAX
assert QUEUE_MESSAGE_BYTES_MAX <= PRODUCE_BATCH_BYTES_MAX

__all__ = [
    "ADMIN_CALL_TIMEOUT_S",
    "CLIENT_ROUND_REPLY_BYTES",
    "CONSUMER_COMMIT_INTERVAL_S",
    "CONSUMER_TRACKED_PRODUCERS_MAX",
    "FETCH_BYTES_DEFAULT",
    "FETCH_BYTES_MAX",
    "FETCH_WAIT_MS_MAX",
    "GROUP_BACKOFF_S",
    "GROUP_BACKOFF_S_MAX",
    "INDEX_INTERVAL_BYTES",
    "OFFSETS_LOG_BYTES_MAX",
    "PARKED_FETCHES_MAX",
    "PRODUCER_BATCHES_IN_FLIGHT_MAX",
    "PRODUCER_CONNECT_GRACE_S",
    "PRODUCER_CONNECT_POLL_S",
    "PRODUCER_LINGER_MS",
    "PRODUCER_MAP_BYTES_MAX",
    "PRODUCER_RETRYABLE_BATCHES_MAX",
    "PRODUCE_BATCH_BYTES_MAX",
    "QUEUE_BATCH_MESSAGES_MAX",
    "QUEUE_CLIENT_SOCKET_MESSAGES",
    "QUEUE_MESSAGE_BYTES_MAX",
    "QUEUE_RECORD_HEADER_BYTES",
    "REQUESTS_PER_MESSAGE_MAX",
    "REQUEST_TIMEOUT_S",
    "RETENTION_CHECK_S",
    "SERVER_QUEUE_MESSAGES",
    "SERVER_READY_TIMEOUT_S",
    "SERVER_ROUND_BYTES_MAX",
    "SERVER_ROUND_MESSAGES_MAX",
    "TOPICS_MAX",
    "TOPIC_BYTES_MAX",
]
