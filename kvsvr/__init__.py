"""KVSvr: a replicated Key-Value / Key-Table store on LMDB.

The public surface: `Client` (blocking), `AsyncClient` (asyncio), their result types and
typed errors. Everything else is implementation behind it.
"""

from kvsvr.aio import AsyncBatch, AsyncClient
from kvsvr.client import Batch, Client, Pipeline
from kvsvr.errors import (
    Compacted,
    ConfigError,
    Internal,
    InvalidArgument,
    KvError,
    NotFound,
    ResourceExhausted,
    StorageFull,
    Timeout,
    Unavailable,
    UnknownMethod,
    VersionConflict,
)
from kvsvr.protocol import (
    Change,
    ChangesPage,
    KeysPage,
    MutateReply,
    Row,
    RowValue,
    ScanPage,
    Versioned,
)
from kvsvr.store import seq_of_row, seq_row
from kvsvr.watching import WatchEvent

__version__ = "0.2.0"

__all__ = [
    "AsyncBatch",
    "AsyncClient",
    "Batch",
    "Change",
    "ChangesPage",
    "Client",
    "Compacted",
    "ConfigError",
    "Internal",
    "InvalidArgument",
    "KeysPage",
    "KvError",
    "MutateReply",
    "NotFound",
    "Pipeline",
    "ResourceExhausted",
    "Row",
    "RowValue",
    "ScanPage",
    "StorageFull",
    "Timeout",
    "Unavailable",
    "UnknownMethod",
    "VersionConflict",
    "Versioned",
    "WatchEvent",
    "seq_of_row",
    "seq_row",
]
