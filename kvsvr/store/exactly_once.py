"""The exactly-once table: the first answer to each operation id, per client, in a window.

A client numbers its writes (client_id, client_seq); the store keeps each write's answer with
a digest of the request (the ops table), so a retry is answered as the first time and an id
reused for another request is refused. Per client it keeps the last OPS_REMEMBERED_PER_CLIENT
ids and a clients entry (below which seq retries are refused, and when it was last active);
a client silent for CLIENT_IDLE_EXPIRY_S is forgotten with its ids.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from kvsvr._applier import remembered_value, request_digest
from kvsvr.errors import InvalidArgument
from kvsvr.limits import (
    CLIENT_IDLE_EXPIRY_S,
    CLIENT_SWEEP_BATCH,
    OPS_REMEMBERED_PER_CLIENT,
    OPS_TRIM_STEP,
)
from kvsvr.protocol import MutateReply
from kvsvr.store.layout import CLIENT, OP_ID, U64BE, Tables

_remembered_decoder = msgspec.msgpack.Decoder(tuple[int, MutateReply])


class OpIds:
    """The ops and clients tables of one store; every method works in the caller's
    transaction."""

    __slots__ = ("clients", "ops")

    def __init__(self, tables: Tables) -> None:
        self.ops = tables.ops
        self.clients = tables.clients

    def remembered(self, txn: Any, key: bytes, ops: list[tuple[int, bytes, bytes]],
                   client_id: int, client_seq: int) -> MutateReply | None:
        """The first answer to this op id, if it was applied; raises if the id is unusable."""
        raw = txn.get(OP_ID.pack(client_id, client_seq), db=self.ops)
        if raw is not None:
            digest, reply = _remembered_decoder.decode(raw)
            if digest != request_digest(key, ops):
                raise InvalidArgument(
                    f"client_seq: operation id ({client_id}, {client_seq}) was already used "
                    "for a different request; a client id must never be reused",
                    field="client_seq")
            return reply
        client = txn.get(U64BE.pack(client_id), db=self.clients)
        if client is not None and client_seq < CLIENT.unpack(client)[0]:
            raise InvalidArgument(
                f"client_seq: operation ({client_id}, {client_seq}) is older than the "
                f"exactly-once window of {OPS_REMEMBERED_PER_CLIENT} operations; whether it "
                "was applied is unknown, so it is not applied now", field="client_seq")
        return None

    def remember(self, txn: Any, key: bytes, ops: list[tuple[int, bytes, bytes]],
                 client_id: int, client_seq: int, reply: MutateReply) -> None:
        """Keep `reply` as the answer to this op id."""
        txn.put(OP_ID.pack(client_id, client_seq),
                remembered_value(request_digest(key, ops), reply), db=self.ops)
        # The clients entry is written on a client's first write and at each trim step, so
        # most writes pay nothing for it; it says when the client was last active and below
        # which seq retries are refused (their answers were trimmed).
        if client_seq % OPS_TRIM_STEP and txn.get(U64BE.pack(client_id), db=self.clients):
            return
        self.remember_client(txn, client_id, client_seq)

    def remember_client(self, txn: Any, client_id: int, client_seq: int) -> None:
        """Write the client's entry, dropping the op ids that fell out of its window."""
        client_key = U64BE.pack(client_id)
        horizon = 0
        if client_seq > OPS_REMEMBERED_PER_CLIENT:
            horizon = client_seq - OPS_REMEMBERED_PER_CLIENT
            end = OP_ID.pack(client_id, horizon)
            cursor = txn.cursor(db=self.ops)
            if cursor.set_range(OP_ID.pack(client_id, 0)):
                while cursor.key() < end and cursor.key()[:8] == client_key:
                    if not cursor.delete():
                        break
        txn.put(client_key, CLIENT.pack(horizon, int(time.time())), db=self.clients)

    def forget_idle_clients(self, txn: Any, idle_s: float = CLIENT_IDLE_EXPIRY_S,
                            start: bytes = b"", limit: int = CLIENT_SWEEP_BATCH) -> bytes:
        """Drop clients silent for `idle_s` with their op ids, looking at `limit` clients from
        `start`; returns where the next sweep starts (b"" when it wrapped around)."""
        cutoff = time.time() - idle_s
        cursor = txn.cursor(db=self.clients)
        if not cursor.set_range(start):
            return b""
        next_start = b""
        expired = []
        for seen, (client_key, raw) in enumerate(cursor):
            if seen == limit:
                next_start = bytes(client_key)
                break
            if CLIENT.unpack(raw)[1] < cutoff:
                expired.append(bytes(client_key))
        for client_key in expired:
            txn.delete(client_key, db=self.clients)
            ops = txn.cursor(db=self.ops)
            if ops.set_range(client_key):
                while ops.key()[:8] == client_key:
                    if not ops.delete():
                        break
        return next_start


__all__ = ["OpIds"]
