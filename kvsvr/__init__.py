"""KVSvr: a replicated Key-Value / Key-Table store on LMDB.

The public surface: `Client` (blocking), `AsyncClient` (asyncio), their result types and
typed errors. Everything else is implementation behind it.
"""

from kvsvr.aio import AsyncClient
from kvsvr.client import Batch, Client, Pipeline
from kvsvr.errors import (
    Compacted,
    ConfigError,
    Internal,
    InvalidArgument,
    KvError,
    NotFound,
    StorageFull,
    Timeout,
    Unavailable,
    UnknownMethod,
    VersionConflict,
)
from kvsvr.protocol import Change, ChangesPage, MutateReply, Row, RowValue, ScanPage, Versioned
from kvsvr.store import seq_of_row, seq_row

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Batch",
    "Change",
    "ChangesPage",
    "Client",
    "Compacted",
    "ConfigError",
    "Internal",
    "InvalidArgument",
    "KvError",
    "MutateReply",
    "NotFound",
    "Pipeline",
    "Row",
    "RowValue",
    "ScanPage",
    "StorageFull",
    "Timeout",
    "Unavailable",
    "UnknownMethod",
    "VersionConflict",
    "Versioned",
    "seq_of_row",
    "seq_row",
]
