"""Limits of KVSvr, as compiled into the core (`kvsvr/_consts.pxi` is the one definition)."""

import os

from kvsvr._core import (
    BATCH_BYTES_MAX,
    FRAME_BYTES_MAX,
    FRAME_HEADER_BYTES,
    FRAMES_PER_MESSAGE_MAX,
    KEY_BYTES_MAX,
    MESSAGE_BYTES_MAX,
    OPS_PER_BATCH_MAX,
    ROW_KEY_BYTES_MAX,
    SCAN_ROWS_DEFAULT,
    SCAN_ROWS_MAX,
    VALUE_BYTES_MAX,
)

# Tunables of the Python shell that are not part of any on-disk or wire layout.
OPS_REMEMBERED_PER_CLIENT = 10_000   # exactly-once window: retried op ids recognised per client
OPS_TRIM_STEP = 256                  # ... trimmed every this many ops (window + step at most)
CLIENT_IDLE_EXPIRY_S = 86_400        # a client silent this long is forgotten, op ids and all
CLIENT_SWEEP_BATCH = 1_000           # clients looked at per sweep (bounded work per round)
GROUP_COMMIT_OPS_MAX = 2_048         # mutations folded into one durable LMDB transaction
SCAN_ENTRIES_VISITED_MAX = 20_000    # tombstones skipped by one scan before it returns a page
PAGE_BYTES_MAX = 2 << 20             # rows + values in one scan/changes page (fits a frame)
BINLOG_TRIM_PER_WRITE = 64           # records trimmed per mutation when over the bound
DISK_FULL_BELOW_BYTES = 16 << 20     # a failed commit with less free disk than this: full
CLIENT_ATTEMPT_TIMEOUT_S = 1.0       # a request unanswered this long is resent (same op id)
TIMEOUT_S_DEFAULT = 5.0              # overall deadline of a client call
CLIENT_QUEUE_MESSAGES = 10_000       # ZeroMQ messages queued per client socket, each way
NODE_QUEUE_MESSAGES = 1_000          # ... per peer of a node (each <= MESSAGE_BYTES_MAX)
BINLOG_RECORDS_MAX = 1_000_000       # default bound on binlog length (trimmed oldest first)
VOTE_LOG_BYTES = 16 << 20            # a replica's vote log file (zero-filled once; a round's
                                     # records that do not fit go to LMDB at once instead)
STATE_CACHE_KEYS = 1 << 18           # key states a store keeps in memory (newest applied) ...
STATE_CACHE_VALUE_BYTES = 512        # ... each with a value at most this big
DEFERRED_RECORDS_MAX = 1 << 17       # binlog records a restart may replay into key states a
                                     # replica held back from LMDB (see Store) ...
KEY_FLUSH_CYCLE_S = 10.0             # ... which it writes once per this long, by key range
KEY_FLUSH_IDLE_S = 1.0               # ... or all at once after this long without a commit
PEER_SECRET_BYTES_MIN = 16           # [security] peer_secret, when set
PEER_MAC_BYTES = 16                  # the MAC at the head of an authenticated peer request

# A node's loop (kvsvr.single: a group of one replica; kvsvr.replica: a replicated group).
NODE_POLL_INTERVAL_MS = 100          # how often an idle single node looks at its stop flag
NODE_ROUND_MESSAGES_MAX = 256        # client messages a single node drains before it answers
NODE_ROUND_BYTES_MAX = 32 << 20      # ... or this many bytes of them
CLIENT_SWEEP_INTERVAL_S = 60.0       # how often idle clients' op ids are looked for
IO_THREAD_SCHED_POLICY = os.SCHED_BATCH  # ZeroMQ's I/O thread (see kvsvr.sockets.node_context)

# Tunables of a replica (time in seconds unless the name says otherwise).
ROUND_MESSAGES_MAX = 512             # inbound messages a replica takes per round (each side)
IDLE_POLL_MS = 20                    # a replica's poll timeout with nothing pending
REQUEST_WAIT_S_MAX = 3.0             # a request the group cannot finish this long is answered
EXPIRE_INTERVAL_S = 0.01             # waiting requests are checked for their deadline this often
ROUND_WAKE_ONLY_S_MAX = 0.005        # a sync ending alone skips the round if one ran this recently
YIELD_AFTER_VOTE_S = 0.01            # a loop that wrote votes this recently yields its core ...
WAKE_YIELDS = 2                      # ... this many times when woken, before taking what arrived
BARRIER_RESEND_S = 0.25              # a version barrier without a majority is asked again
BARRIER_KEYS_MAX = 4096              # keys asked about in one version barrier
PULL_IDLE_INTERVAL_S = 0.02          # a peer whose binlog had nothing new is asked again then,
PULL_IDLE_INTERVAL_S_MAX = 0.2       # ... twice as long after each empty answer, up to this
PULL_TIMEOUT_S = 1.0                 # an unanswered pull is sent again, ...
PULL_TIMEOUT_S_MAX = 8.0             # ... after twice as long each time it goes unanswered
PULL_RECORDS_MAX = 2048              # binlog records per pull answer ...
PULL_BYTES_MAX = 2 << 20             # ... and bytes
APPLY_PULLED_RECORDS_MAX = 20_000    # pulled records applied in one round
TRIM_RECORDS_PER_ROUND_MAX = 4096    # binlog records every peer has, trimmed per round
HELLO_RESEND_S = 0.5                 # a joining node asks silent peers again
JOINING_LOG_INTERVAL_S = 5.0         # ... and says whom it is waiting for this often
SNAPSHOT_PAGE_BYTES_MAX = 1 << 20    # a page of a snapshot
SNAPSHOT_SESSIONS_MAX = 4            # copies a node serves at once (each pins an LMDB read txn)
SNAPSHOT_IDLE_S_MAX = 30.0           # a copy nobody asked a page of for this long is dropped
GAP_SNAPSHOT_AFTER_S = 5.0           # a stream stopped at a gap this long: copy that peer instead
PEER_DOWN_AFTER_S = 2.0              # a peer silent this long is reported down in status
PEER_WATCH_INTERVAL_S = 1.0          # how often silent peers (and the binlog lag) are looked at
QUORUM_FRAME_BYTES_MAX = 1 << 20     # quorum messages per frame, by size ...
QUORUM_FRAME_MESSAGES_MAX = 1024     # ... and count
OPEN_RECOVER_AFTER_S = 1.0           # an instance accepted here but not chosen this long: finish it
OPEN_CHECK_INTERVAL_S = 0.25         # how often open instances are looked at
CHECKPOINT_APPLIED_MAX = 20_000      # a checkpoint at least every this many applied versions

# A store (kvsvr.store).
STORE_MAP_SIZE_MIB_DEFAULT = 1024 * 1024  # the LMDB map's bound (address space, not disk)
LMDB_READERS_MAX = 256               # read transactions open at once in the environment
BINLOG_READ_RECORDS_DEFAULT = 1000   # records `Store.binlog` returns unless told
STATE_CACHE_EVICT_SLICES = 16        # a full key-state cache evicts 1/n of its bound at a time

# Clients and tools.
BACKOFF_FIRST_S = 0.5                # a failing replica is skipped this long first, ...
BACKOFF_S_MAX = 10.0                 # ... doubling per consecutive failure, up to this
ASYNC_CLIENT_SWEEP_INTERVAL_S = 0.05  # the asyncio client looks for expired attempts this often
CLI_STATUS_TIMEOUT_S = 1.0           # `kvsvr status` waits this long for each node by default
NODE_READY_TIMEOUT_S = 30.0          # the launcher waits this long for a node to serve
CONNECT_WAIT_S = 1.0                 # a call no replica of its key has a connection for
                                     # fails this long after (Unavailable: nothing was sent)
CONNECT_FAILOVER_S = 0.1             # a request waits this long for its first choice of
                                     # replica to connect before any other of its key will do
CONNECT_CHECK_S = 0.002              # the asyncio client looks this often whether a request
                                     # waiting for a connection has one

# Watches: a long poll on a key, parked on the node until the key is applied past a version.
WATCH_WAIT_S_MAX = 30.0              # longest a node holds a watch before "no change yet"
WATCH_WAIT_S_DEFAULT = 10.0          # what the clients ask for each poll unless told
WATCH_REPLY_GRACE_S = 2.0            # a poll unanswered this long past its wait fails over
WATCHES_PARKED_MAX = 50_000          # watches one node holds at once; more are refused

LIST_KEYS_DEFAULT = 1_000            # keys in one list_keys page unless told (<= SCAN_ROWS_MAX)
LIST_ROUTE_PROBES_MAX = 1 << 20      # keys a client hashes to find one routed to each group

# Keys and rows that expire (TTL; kvsvr/expiry.py), and their removal in the background.
TTL_S_MIN = 1                        # a put's time to live, in seconds ...
TTL_S_MAX = 10 * 365 * 86_400        # ... at most about ten years
PURGE_INTERVAL_S = 1.0               # how often a node looks for expired entries to remove
PURGE_KEYS_MAX = 256                 # keys one look proposes removals for (bounded work)
PURGE_ENTRIES_READ_MAX = 4_096       # ... from at most this many due entries of the index
PURGE_STAGGER_S = 2.0                # replica i removes what expired i times this long ago,
                                     # so the replicas of a group rarely remove the same key
PURGE_RETRY_S = 10.0                 # a key proposed for removal waits this long to be again

# Held key states are pinned in the state cache, which must keep room for others.
assert DEFERRED_RECORDS_MAX <= STATE_CACHE_KEYS // 2
# A page of at least one maximal row must still fit in one frame.
assert PAGE_BYTES_MAX + VALUE_BYTES_MAX + ROW_KEY_BYTES_MAX + 4096 <= FRAME_BYTES_MAX

__all__ = [
    "APPLY_PULLED_RECORDS_MAX",
    "ASYNC_CLIENT_SWEEP_INTERVAL_S",
    "BACKOFF_FIRST_S",
    "BACKOFF_S_MAX",
    "BARRIER_KEYS_MAX",
    "BARRIER_RESEND_S",
    "BATCH_BYTES_MAX",
    "BINLOG_READ_RECORDS_DEFAULT",
    "BINLOG_RECORDS_MAX",
    "BINLOG_TRIM_PER_WRITE",
    "CHECKPOINT_APPLIED_MAX",
    "CLIENT_ATTEMPT_TIMEOUT_S",
    "CLIENT_IDLE_EXPIRY_S",
    "CLIENT_QUEUE_MESSAGES",
    "CLIENT_SWEEP_BATCH",
    "CLIENT_SWEEP_INTERVAL_S",
    "CLI_STATUS_TIMEOUT_S",
    "CONNECT_CHECK_S",
    "CONNECT_FAILOVER_S",
    "CONNECT_WAIT_S",
    "DEFERRED_RECORDS_MAX",
    "DISK_FULL_BELOW_BYTES",
    "EXPIRE_INTERVAL_S",
    "FRAMES_PER_MESSAGE_MAX",
    "FRAME_BYTES_MAX",
    "FRAME_HEADER_BYTES",
    "GAP_SNAPSHOT_AFTER_S",
    "GROUP_COMMIT_OPS_MAX",
    "HELLO_RESEND_S",
    "IDLE_POLL_MS",
    "IO_THREAD_SCHED_POLICY",
    "JOINING_LOG_INTERVAL_S",
    "KEY_BYTES_MAX",
    "KEY_FLUSH_CYCLE_S",
    "KEY_FLUSH_IDLE_S",
    "LIST_KEYS_DEFAULT",
    "LIST_ROUTE_PROBES_MAX",
    "LMDB_READERS_MAX",
    "MESSAGE_BYTES_MAX",
    "NODE_POLL_INTERVAL_MS",
    "NODE_QUEUE_MESSAGES",
    "NODE_READY_TIMEOUT_S",
    "NODE_ROUND_BYTES_MAX",
    "NODE_ROUND_MESSAGES_MAX",
    "OPEN_CHECK_INTERVAL_S",
    "OPEN_RECOVER_AFTER_S",
    "OPS_PER_BATCH_MAX",
    "OPS_REMEMBERED_PER_CLIENT",
    "OPS_TRIM_STEP",
    "PAGE_BYTES_MAX",
    "PEER_DOWN_AFTER_S",
    "PEER_MAC_BYTES",
    "PEER_SECRET_BYTES_MIN",
    "PEER_WATCH_INTERVAL_S",
    "PULL_BYTES_MAX",
    "PULL_IDLE_INTERVAL_S",
    "PULL_IDLE_INTERVAL_S_MAX",
    "PULL_RECORDS_MAX",
    "PULL_TIMEOUT_S",
    "PULL_TIMEOUT_S_MAX",
    "PURGE_ENTRIES_READ_MAX",
    "PURGE_INTERVAL_S",
    "PURGE_KEYS_MAX",
    "PURGE_RETRY_S",
    "PURGE_STAGGER_S",
    "QUORUM_FRAME_BYTES_MAX",
    "QUORUM_FRAME_MESSAGES_MAX",
    "REQUEST_WAIT_S_MAX",
    "ROUND_MESSAGES_MAX",
    "ROUND_WAKE_ONLY_S_MAX",
    "ROW_KEY_BYTES_MAX",
    "SCAN_ENTRIES_VISITED_MAX",
    "SCAN_ROWS_DEFAULT",
    "SCAN_ROWS_MAX",
    "SNAPSHOT_IDLE_S_MAX",
    "SNAPSHOT_PAGE_BYTES_MAX",
    "SNAPSHOT_SESSIONS_MAX",
    "STATE_CACHE_EVICT_SLICES",
    "STATE_CACHE_KEYS",
    "STATE_CACHE_VALUE_BYTES",
    "STORE_MAP_SIZE_MIB_DEFAULT",
    "TIMEOUT_S_DEFAULT",
    "TRIM_RECORDS_PER_ROUND_MAX",
    "TTL_S_MAX",
    "TTL_S_MIN",
    "VALUE_BYTES_MAX",
    "VOTE_LOG_BYTES",
    "WAKE_YIELDS",
    "WATCHES_PARKED_MAX",
    "WATCH_REPLY_GRACE_S",
    "WATCH_WAIT_S_DEFAULT",
    "WATCH_WAIT_S_MAX",
    "YIELD_AFTER_VOTE_S",
]

# Monitoring (kvsvr/monitor). A counters file indexes slots by id, so the default sizing holds
# every id (1..MONITOR_IDS_MAX): the file is sparse, and only the pages of registered ids are
# ever touched (the agent finds them with SEEK_DATA), so its memory follows the ids in use.
COUNTERS_FILE_IDS_DEFAULT = 65_536     # [monitor] max_ids: the core's MONITOR_IDS_MAX
MONITOR_FIRST_USER_ID = 1000         # ids below belong to KVSvr's own programs
