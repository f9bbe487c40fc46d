"""Type stub of the Cython core (kvsvr/_core.pyx): what the Python shell may use."""

from typing import Any

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
