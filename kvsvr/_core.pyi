"""Type stub of the Cython core (kvsvr/_core.pyx): what the Python shell may use."""

from typing import Any

DEBUG_BUILD: bool

MAX_KEY_BYTES: int
MAX_ROW_KEY_BYTES: int
MAX_VALUE_BYTES: int
MAX_OPS_PER_BATCH: int
MAX_BATCH_BYTES: int
MAX_SCAN_ROWS: int
DEFAULT_SCAN_ROWS: int
MAX_FRAME_BYTES: int
MAX_FRAMES_PER_MESSAGE: int
MAX_MESSAGE_BYTES: int
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
def record_lsn(buf: Any) -> int: ...
def encode_frame(kind: int, code: int, request_id: int, budget_ms: int, body: Any) -> bytes: ...
def decode_frames(buf: Any) -> tuple[list[Frame], str | None, int]: ...
def decode_frame(buf: Any) -> Frame: ...

# --- version quorum (_quorum.pxi) ---------------------------------------------------------
MAX_REPLICAS: int
MAX_INCARNATION: int
PROPOSAL_TIMEOUT_TICKS: int
RETRY_BACKOFF_TICKS: int
MAX_PROPOSALS_IN_FLIGHT: int
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

# persist records: ("instance", key, version, promised, accepted_ballot, accepted_value,
# chosen_value), ("fence", peer, incarnation), ("rebuilt", incarnation),
# ("verified", incarnation)
PersistRecord = tuple[Any, ...]
Decided = tuple[bytes, int, Any, bool]   # chosen value None: taken, value unknown

class QuorumReplica:
    node: int
    replicas: int
    incarnation: int
    rebuilding: bool
    fast_path: bool
    proposals_in_flight: int
    instances: int
    def __init__(self, node: int, replicas: int, incarnation: int = 1,
                 rebuilding: bool = False) -> None: ...
    def restore(self, records: list[PersistRecord]) -> None: ...
    def acceptor_state(self, key: bytes, version: int) -> tuple[int, int, Any, Any]: ...
    def ready(self) -> tuple[list[PersistRecord], list[Message], list[Decided]]: ...
    def propose(self, key: bytes, version: int, value: Any, now: float,
                recover: bool = False) -> bool: ...
    def proposing(self, key: bytes, version: int) -> bool: ...
    def highest_open(self, key: bytes) -> int: ...
    def forget(self, key: bytes, version: int, chosen_value: Any = None) -> None: ...
    def forget_through(self, key: bytes, version: int) -> list[int]: ...
    def home(self, key: bytes) -> int: ...
    def tick(self, now: float) -> None: ...
    def step(self, message: Message, now: float, floor: int = 0) -> None: ...

# --- quorum-queue log records (_qlog.pxi) ---------------------------------------------------
QUEUE_RECORD_HEADER_BYTES: int
QUEUE_MAX_MESSAGE_BYTES: int
QUEUE_MAX_BATCH_MESSAGES: int
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
