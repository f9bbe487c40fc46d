"""Limits and tunables of the RPC kit (kvsvr.rpc), named in one place with the qualifier last.

Time is in seconds unless the name says otherwise.
"""

from kvsvr.config import BUSINESS_PRIORITY_MAX
from kvsvr.limits import FRAME_BYTES_MAX, FRAME_HEADER_BYTES

# Priorities (after DAGOR): lower numbers are more important. A request's compound priority
# is business * USER_PRIORITY_LEVELS + user, so one integer orders them all.
BUSINESS_PRIORITY_LEVELS = BUSINESS_PRIORITY_MAX + 1   # 0 (most important) .. 63, as
                                     # the config's table allows
BUSINESS_PRIORITY_DEFAULT = 32       # an entry method missing from the config's table
USER_PRIORITY_LEVELS = 128           # user priorities 0 .. 127, from an hourly-rotated hash
USER_HASH_ROTATE_S = 3600            # the user hash changes its seed this often
PRIORITY_LEVELS = BUSINESS_PRIORITY_LEVELS * USER_PRIORITY_LEVELS
ADMIT_ALL = PRIORITY_LEVELS - 1      # the admission level that admits everything

# Admission (FastReject): overload is read from the average queuing time of a window.
WINDOW_S = 1.0                       # a window ends after this long ...
WINDOW_REQUESTS_MAX = 2_000          # ... or this many started requests, whichever first
QUEUING_THRESHOLD_MS_DEFAULT = 20          # average queuing time above this: overloaded
SHED_FRACTION = 0.05                 # an overloaded window sheds at least this much of what
                                     # it admitted, or down to what it ran less this much ...
SHED_FRACTION_MAX = 0.8              # ... at most this much
RESTORE_FRACTION = 0.01              # a calm window admits this much more, times the
                                     # threshold over its queuing time ...
RESTORE_FRACTION_MAX = 0.1           # ... at most this much

# Callers.
LEVEL_CACHE_S = 0.5                  # a level an instance reported is honoured this long:
                                     # half a window, so every window sees what callers would
                                     # send above the level, and can plan raising it
SAMPLE_EVERY = 16                    # a call the caller would drop for a reported level goes
                                     # out anyway one time in this many, flagged as standing
                                     # for that many: the instance still sees the demand above
                                     # its level, and can plan raising it
RETRY_BUDGET_RATIO = 0.1             # retries at most this fraction of calls ...
RETRY_TOKENS_MAX = 10.0              # ... with this many saved up at most (a burst)
CALL_TIMEOUT_S_DEFAULT = 5.0         # a call's deadline unless told (or inherited)
ATTEMPT_TIMEOUT_S_DEFAULT = 1.0      # an attempt unanswered this long counts as a failure
FAILURES_TO_EJECT = 3                # consecutive failures that eject an instance
EJECT_FIRST_S = 0.5                  # an ejected instance is skipped this long first, ...
EJECT_S_MAX = 4.0                    # ... doubling per failed probe, up to this: a recovered
                                     # instance gets its traffic back within seconds
EJECT_DOUBLINGS_MAX = 16             # (no huge powers of two)
CALLER_QUEUE_MESSAGES = 10_000       # ZeroMQ messages queued per stub socket, each way
CONNECT_RETRY_S = 0.005              # a call no instance had a connection for looks again
                                     # this often, for kvsvr.limits.CONNECT_WAIT_S

# Shielding: the switch is a key in KVSvr; callers read it this often.
SHIELD_POLL_S = 1.0
SHIELD_KEY_PREFIX = "__kvsvr/shield/"

# Servers.
INSTANCE_QUEUE_MESSAGES = 100_000      # ZeroMQ messages queued on an instance's socket, each way
INSTANCE_ROUND_MESSAGES_MAX = 512      # messages an instance takes before it lets handlers run
IN_FLIGHT_MAX = 20_000               # requests one instance holds (queued or running); more:
                                     # Overloaded at once
STARTS_PER_TURN_MAX = 512            # handlers an instance starts per loop turn, at most ...
TURN_S_TARGET = 0.002                # ... fewer while a turn takes longer than this, so the
                                     # socket is read (and arrivals timed) every few ms
STOP_WAIT_S = 2.0                    # a stopping instance lets running handlers finish this long
RPC_PREFIX_BYTES = 8                 # the RPC prefix of every request and response body
BODY_BYTES_MAX = FRAME_BYTES_MAX - FRAME_HEADER_BYTES - RPC_PREFIX_BYTES
METHODS_PER_SERVICE_MAX = 63         # method codes 1 .. this

# Monitor ids (kvsvr.rpc.metrics): a block per method code, block 0 for the whole instance.
MONITOR_IDS_PER_METHOD = 16
MONITOR_IDS_PER_SERVICE = (METHODS_PER_SERVICE_MAX + 1) * MONITOR_IDS_PER_METHOD
MONITOR_IDS_FIRST_DEFAULT = 16_384   # the n-th [[services]] entry's block starts at
                                     # this + n * MONITOR_IDS_PER_SERVICE unless configured
