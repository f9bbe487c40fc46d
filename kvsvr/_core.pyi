"""Type stub of the Cython core (kvsvr/_core.pyx): what the Python shell may use."""

from typing import Any, Literal, NamedTuple

DEBUG_BUILD: bool

KEY_BYTES_MAX: int
ROW_KEY_BYTES_MAX: int
VALUE_BYTES_MAX: int
OPS_PER_BATCH_MAX: int
BATCH_BYTES_MAX: int
SCAN_ROWS_MAX: int
SCAN_ROWS_DEFAULT: int
FRAME_BYTES_MAX: int
FRAMES_PER_MESSAGE_MAX: int
MESSAGE_BYTES_MAX: int
RECORD_HEADER_BYTES: int
FRAME_HEADER_BYTES: int
FRAME_PROTOCOL: int
OP_PUT: int
OP_DELETE: int
OP_INCR: int
OP_ROW_PUT: int
OP_ROW_DELETE: int
OP_APPEND: int
OP_COMPACT: int
OP_EXPIRE: int
OP_PURGE: int
OP_NAMES: dict[int, str]
FRAME_REQUEST: int
FRAME_RESPONSE: int

OpTuple = tuple[int, bytes, bytes]
Frame = tuple[int, int, int, int, memoryview]

class RecordError(ValueError): ...
class FrameError(ValueError): ...

class Record:
    @property
    def lsn(self) -> int: ...
    @property
    def version(self) -> int: ...
    @property
    def client_id(self) -> int: ...
    @property
    def client_seq(self) -> int: ...
    @property
    def key(self) -> bytes: ...
    @property
    def ops(self) -> list[OpTuple]: ...

def check_op(kind: int, row: bytes, value: bytes) -> None: ...
def encode_record(lsn: int, version: int, client_id: int, client_seq: int, key: bytes,
                  ops: list[OpTuple]) -> bytes: ...
def decode_record(buf: Any) -> Record: ...
def record_invalid(buf: Any) -> str | None: ...
def applied_prefix(records: list[bytes], states: dict[bytes, Any], start: int = 0) -> int: ...
def record_lsn(buf: Any) -> int: ...
def encode_frame(kind: int, code: int, request_id: int, budget_ms: int, body: Any) -> bytes: ...
def decode_frames(buf: Any) -> tuple[list[Frame], str | None, int]: ...
def decode_frame(buf: Any) -> Frame: ...

# --- version quorum (_quorum.pxi) ---------------------------------------------------------
# Time in the quorum core is milliseconds: every entry point takes `now_ms` (on the caller's
# monotonic clock: the node's seconds times 1000, the simulator's tick count), and the *_MS
# timeouts are milliseconds too.
REPLICAS_MAX: int
INCARNATION_MAX: int
PROPOSAL_TIMEOUT_MS: int   # milliseconds
RETRY_BACKOFF_MS: int      # milliseconds
RETRY_DOUBLINGS_MAX: int
PROPOSALS_IN_FLIGHT_MAX: int
STATE_PART_BYTES: int
MSG_PREPARE: int
MSG_PROMISE: int
MSG_ACCEPT: int
MSG_ACCEPTED: int
MSG_REJECT: int
MSG_CHOSEN: int
MSG_STATE_REQUEST: int
MSG_STATE: int
MSG_BEHIND: int
PENDING: int
WON: int
LOST: int

def majority(replicas: int) -> int: ...
def rebuild_quorum(replicas: int) -> int: ...
def vote_result(yes: int, no: int, replicas: int) -> int: ...
def make_ballot(round_number: int, node: int, incarnation: int = 1) -> int: ...
def ballot_round(ballot: int) -> int: ...
def ballot_node(ballot: int) -> int: ...
def ballot_incarnation(ballot: int) -> int: ...

class Message:
    kind: int
    source: int
    target: int
    incarnation: int
    key: bytes
    version: int
    ballot: int
    accepted_ballot: int
    value: Any
    def __init__(self, kind: int, source: int, target: int, incarnation: int, key: bytes,
                 version: int, ballot: int = 0, accepted_ballot: int = 0,
                 value: Any = None) -> None: ...

QWIRE_MAGIC: int
QUORUM_MESSAGES_MAX: int

class QuorumWireError(ValueError):
    field: str
    def __init__(self, message: str, field: str) -> None: ...

def any_kind(messages: list[Message], kind: int) -> bool: ...
def floor_keys(messages: list[Message]) -> list[bytes]: ...
def encode_quorum_messages(messages: list[Message]) -> bytes: ...
def group_quorum(messages: list[Message]) -> dict[int, tuple[list[Message], list[Message]]]: ...
def chunk_quorum(messages: list[Message], max_bytes: int,
                 max_messages: int) -> list[list[Message]]: ...
def decode_quorum_messages(body: Any) -> list[Message]: ...

# --- what QuorumReplica hands its caller ---------------------------------------------------
# Persist records keep their kind string first: the vote log and the store encode each as the
# array of its fields, the same bytes as the plain tuples they replaced.
INSTANCE: Literal["instance"]
FENCE: Literal["fence"]
REBUILT: Literal["rebuilt"]
VERIFIED: Literal["verified"]

class InstanceRecord(NamedTuple):
    """An acceptor's state for one (key, version)."""
    kind: Literal["instance"]
    key: bytes
    version: int
    promised: int
    accepted_ballot: int
    accepted_value: Any   # a binlog record (bytes) in the node, any object in the simulator
    chosen_value: Any     # the same, or None: not known chosen

class FenceRecord(NamedTuple):
    """Messages of `peer` from lives before `incarnation` are dropped."""
    kind: Literal["fence"]
    peer: int
    incarnation: int

class RebuiltRecord(NamedTuple):
    """Life `incarnation` rebuilt its acceptor state from its peers: it votes."""
    kind: Literal["rebuilt"]
    incarnation: int

class VerifiedRecord(NamedTuple):
    """Life `incarnation` rebuilt from every peer: round 0 without a prepare is safe."""
    kind: Literal["verified"]
    incarnation: int

PersistRecord = InstanceRecord | FenceRecord | RebuiltRecord | VerifiedRecord

def persist_record(fields: Any) -> PersistRecord:
    """The record of a decoded array (kind first); ValueError for an unknown kind."""

class Decided(NamedTuple):
    """A proposal of this replica finished."""
    key: bytes
    version: int
    value: Any               # chosen; None: taken (value unknown) or a recovery found nothing
    own_value_chosen: bool   # False: another value won the version

class Ready(NamedTuple):
    """Make `persist` durable, acknowledge with QuorumReplica.advance, then send `send`."""
    persist: list[PersistRecord]
    send: list[Message]
    decided: list[Decided]

class QuorumReplica:
    node: int
    replicas: int
    incarnation: int
    rebuilding: bool
    fast_path: bool
    proposals_in_flight: int
    instances: int
    state_part_bytes: int
    def __init__(self, node: int, replicas: int, incarnation: int = 1,
                 rebuilding: bool = False, state_part_bytes: int = ...,
                 answer_base: int = 0) -> None: ...
    def restore(self, records: list[PersistRecord]) -> None: ...
    def acceptor_state(self, key: bytes, version: int) -> tuple[int, int, Any, Any]: ...
    def chosen_value(self, key: bytes, version: int) -> bytes | None: ...
    def ready(self) -> Ready:
        """Raises RuntimeError while the last Ready with records is not acknowledged."""
    def advance(self, ready: Ready) -> None:
        """`ready.persist` is durable (the node: in a vote log frame written): ready() may
        hand out more."""
    def take_learned(self) -> list[InstanceRecord]: ...
    def propose(self, key: bytes, version: int, value: Any, now_ms: float,
                recover: bool = False) -> bool: ...
    def proposing(self, key: bytes, version: int) -> bool: ...
    def highest_open(self, key: bytes) -> int: ...
    def forget(self, key: bytes, version: int, chosen_value: Any = None) -> None: ...
    def forget_through(self, key: bytes, version: int) -> list[int]: ...
    def home(self, key: bytes) -> int: ...
    def tick(self, now_ms: float) -> None: ...
    def step(self, message: Message, now_ms: float, floor: int = 0) -> None: ...
    def step_all(self, messages: list[Message], now_ms: float, floors: dict[bytes, int],
                 voting: bool) -> tuple[int, int, list[Message]]:
        """`floors`: the applied version of every key floor_keys(messages) lists (a key
        missing that a message needs raises ValueError)."""

# --- shared-memory counters and value blocks (_counters.pxi) -----------------------------
COUNTERS_HEADER_BYTES: int
MONITOR_IDS_MAX: int
MONITOR_IDS_DEFAULT: int
WINDOW_S_MIN: int
WINDOW_S_MAX: int
WINDOW_S_DEFAULT: int
MONITOR_NAME_BYTES_MAX: int
MONITOR_DESCRIPTION_BYTES_MAX: int
VALUE_ENTRY_BYTES: int
BUCKET_VALUE_MAX: int
BUCKET_VALUE_MIN: int
KIND_COUNTER: int
KIND_GAUGE: int

class CountersError(ValueError): ...

def counters_file_bytes(max_ids: int, window_s: int) -> int: ...
def format_counters(buf: Any, max_ids: int, window_s: int, created_s: int) -> None: ...
def counters_invalid(buf: Any) -> str | None: ...

class Counters:
    max_ids: int
    window_s: int
    created_s: int
    def __init__(self, buf: Any) -> None: ...
    def add(self, id: int, delta: int) -> None: ...
    def set(self, id: int, value: int) -> None: ...
    def add_at(self, id: int, delta: int, second: int) -> None: ...
    def set_at(self, id: int, value: int, second: int) -> None: ...
    def register(self, id: int, kind: int) -> None: ...
    def kind(self, id: int) -> int: ...
    def registered(self) -> list[tuple[int, int]]: ...
    def value_at(self, id: int, second: int) -> int | None: ...
    def snapshot(self, second: int) -> bytes: ...
    @staticmethod
    def now_s() -> int: ...

def block_invalid(buf: Any) -> str | None: ...
def encode_block(pairs: Any) -> bytes: ...
def decode_block(buf: Any) -> dict[int, int]: ...
def sum_blocks(blocks: Any) -> bytes: ...
def merge_blocks(a: Any, b: Any) -> bytes: ...
def block_value(buf: Any, id: int) -> int | None: ...
def block_series(blocks: Any, id: int) -> list[int | None]: ...

# --- quorum-queue log records (_qlog.pxi) ---------------------------------------------------
QUEUE_RECORD_HEADER_BYTES: int
QUEUE_MESSAGE_BYTES_MAX: int
QUEUE_BATCH_MESSAGES_MAX: int
SCAN_END: int
SCAN_TRUNCATED: int
SCAN_CORRUPT: int
QueueMessage = tuple[int, int, int, int, bytes]   # offset, producer_id, seq, append_ms, value

class QueueRecordError(ValueError): ...

def encode_queue_records(first_offset: int, producer_id: int, first_seq: int, append_ms: int,
                         values: list[bytes]) -> bytes: ...
def scan_queue_records(buf: Any, pos: int = 0, max_bytes: int = -1, max_records: int = -1,
                       verify: bool = True
                       ) -> tuple[int, int, int, int, int, int, str | None]: ...
def seek_queue_records(buf: Any, pos: int, offset: int, append_ms: int = 0) -> int: ...
def decode_queue_records(buf: Any) -> list[QueueMessage]: ...
