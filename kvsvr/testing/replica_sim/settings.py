"""What a simulated run takes: its timings and limits, the keys its clients call on, and the
faults that strike it."""

from __future__ import annotations

from dataclasses import dataclass

from kvsvr.testing.fakes import US_PER_MS, US_PER_S

START_US = 1_000 * US_PER_S       # the fake clock's start (0 means "never" to a replica)
SIM_VOTE_LOG_BYTES = 256 << 10        # small, so the ring wraps and fills within a run
MAP_SIZE_MIB = 64                 # each replica's LMDB map
IDLE_ROUND_US = 20 * US_PER_MS    # a node with nothing due runs a round this often
ROUND_MESSAGES_MAX = 512          # what a round takes from each of its inboxes
ATTEMPT_TIMEOUT_US = 500 * US_PER_MS   # a client resends an unanswered request (same op id)
CALL_TIMEOUT_US = 4 * US_PER_S         # ... and gives up on it (outcome unknown) after this
RETRY_BACKOFF_US = (10 * US_PER_MS, 60 * US_PER_MS)  # after Unavailable / Timeout answers
THINK_US = (0, 60 * US_PER_MS)    # a client's pause between calls
RUN_S_MAX = 120.0                 # simulated time the clients get to finish their calls
SETTLE_S_MAX = 60.0               # ... and the group to settle once faults heal
SETTLE_POLL_US = 250 * US_PER_MS  # how often settling is looked at
TRACE_EVENTS_MAX = 30             # the last events shown in a failure message
HASH_SEED = "0"                   # PYTHONHASHSEED under which a seed replays across processes
REGISTERS = (b"r0", b"r1", b"r2")  # get, put, compare-and-set, incr
INBOXES = (b"i0",)                 # append, scan
KEYS = (*REGISTERS, *INBOXES)
CALL_KINDS = (("get", 25), ("put", 20), ("cas", 15), ("incr", 20), ("append", 15),
              ("scan", 5))         # what a client calls, and how often

# Errors a replica logs that duplicated messages cause on their own (ZeroMQ never delivers
# one twice): a PULL request delivered twice is answered twice under one tag, and when a
# checkpoint made more records durable in between, the answer that arrives second looks
# like a peer whose binlog moved back; the puller says so and reads that binlog again.
DUPLICATE_ONLY_ERRORS = ("is past its last lsn",)


@dataclass
class Faults:
    """What goes wrong during a run (each seed draws its own times and victims)."""

    drop: float = 0.03              # chance a message is lost
    duplicate: float = 0.02         # chance a message is delivered twice
    delay_ms_min: float = 0.02      # a message takes at least this long ...
    delay_ms_max: float = 4.0       # ... and up to this (so messages reorder)
    vote_sync_ms: tuple[float, float] = (0.1, 3.0)   # a vote log fdatasync takes this long
    commit_ms: tuple[float, float] = (0.2, 4.0)      # an LMDB checkpoint commit
    slow_commit: float = 0.0        # chance a commit is slow ...
    slow_commit_ms: float = 150.0   # ... and takes this long
    crashes: int = 0                # replicas killed during the run (each restarts later)
    wipes: int = 0                  # of which this many lose their data directory
    stops: int = 0                  # replicas stopped cleanly (as by SIGTERM), restarted later
    partitions: int = 0             # links cut for a while
    down_ms: tuple[float, float] = (20.0, 1_500.0)        # how long a crashed replica is down
    partition_ms: tuple[float, float] = (100.0, 2_000.0)  # how long a cut lasts
    round_us: tuple[int, int] = (50, 400)   # a round's simulated cost (no round starts sooner)
    vote_sends: str = "either"      # votes leave from the vote log ("sync-thread"), from the
                                    # loop once durable ("loop"), or either, drawn per life
    unsafe_early_durable: bool = False  # a bug to catch: votes count durable before they are

    @classmethod
    def scripted(cls) -> Faults:
        """No fault and fixed timings: what a scenario script runs with (it makes its own
        faults, step by step)."""
        return cls(drop=0.0, duplicate=0.0, delay_ms_min=0.5, delay_ms_max=0.5,
                   vote_sync_ms=(1.0, 1.0), commit_ms=(2.0, 2.0), round_us=(100, 100),
                   vote_sends="sync-thread")

