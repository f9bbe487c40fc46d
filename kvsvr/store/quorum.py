"""The version quorum's durable state in a store: each open instance's acceptor state (the
paxos table) and the node's life, fences and rebuild markers (meta's quorum/ names).

The records are the core's named persist records (kvsvr/_quorum.pxi): InstanceRecord (a row
of the paxos table: msgpack [promised, accepted_ballot, accepted_value, chosen_value] under
the key's prefix and the version), FenceRecord (meta quorum/fence/<peer>), RebuiltRecord and
VerifiedRecord (meta quorum/rebuilt and quorum/verified, the incarnation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from kvsvr._core import (
    FENCE,
    INSTANCE,
    REBUILT,
    VERIFIED,
    FenceRecord,
    InstanceRecord,
    PersistRecord,
    RebuiltRecord,
    VerifiedRecord,
)
from kvsvr.store.layout import U16BE, U64BE, Meta, Tables, key_prefix

_paxos_encoder = msgspec.msgpack.Encoder()
_paxos_decoder = msgspec.msgpack.Decoder(tuple[int, int, bytes | None, bytes | None])
_REBUILT = Meta.QUORUM_REBUILT
_VERIFIED = Meta.QUORUM_VERIFIED


class QuorumState:
    """The paxos table and the quorum/ meta names of one store."""

    __slots__ = ("meta", "paxos")

    def __init__(self, tables: Tables) -> None:
        self.paxos = tables.paxos
        self.meta = tables.meta

    def persist(self, txn: Any, records: Sequence[PersistRecord]) -> None:
        """Write the core's records in `txn`. ValueError for a record of no known kind."""
        for record in records:
            if isinstance(record, InstanceRecord):
                txn.put(key_prefix(record.key) + U64BE.pack(record.version),
                        _paxos_encoder.encode([record.promised, record.accepted_ballot,
                                               record.accepted_value, record.chosen_value]),
                        db=self.paxos)
            elif isinstance(record, FenceRecord):
                txn.put(Meta.QUORUM_FENCE_PREFIX + bytes([record.peer]),
                        U64BE.pack(record.incarnation), db=self.meta)
            elif isinstance(record, RebuiltRecord):
                txn.put(_REBUILT, U64BE.pack(record.incarnation), db=self.meta)
            elif isinstance(record, VerifiedRecord):
                txn.put(_VERIFIED, U64BE.pack(record.incarnation), db=self.meta)
            else:
                raise ValueError(f"record: unknown quorum record kind {record!r}")

    def set_incarnation(self, txn: Any, incarnation: int) -> None:
        txn.put(Meta.QUORUM_INCARNATION, U64BE.pack(incarnation), db=self.meta)

    def forget_instance(self, txn: Any, key: bytes, version: int) -> None:
        """The version was applied: its acceptor state is no longer kept."""
        txn.delete(key_prefix(key) + U64BE.pack(version), db=self.paxos)

    def records(self, txn: Any) -> list[PersistRecord]:
        """Every persisted record, as QuorumReplica.restore takes them."""
        records: list[PersistRecord] = []
        for raw_key, raw in txn.cursor(db=self.paxos):
            key_len = U16BE.unpack_from(raw_key)[0]
            key = raw_key[2:2 + key_len]
            version = U64BE.unpack_from(raw_key, 2 + key_len)[0]
            promised, accepted_ballot, accepted_value, chosen_value = \
                _paxos_decoder.decode(raw)
            records.append(InstanceRecord(INSTANCE, key, version, promised, accepted_ballot,
                                          accepted_value, chosen_value))
        cursor = txn.cursor(db=self.meta)
        if cursor.set_range(Meta.QUORUM_PREFIX):
            for name, raw in cursor:
                if not name.startswith(Meta.QUORUM_PREFIX):
                    break
                value = U64BE.unpack(raw)[0]
                if name.startswith(Meta.QUORUM_FENCE_PREFIX):
                    records.append(FenceRecord(FENCE, name[len(Meta.QUORUM_FENCE_PREFIX)],
                                               value))
                elif name == _REBUILT:
                    records.append(RebuiltRecord(REBUILT, value))
                elif name == _VERIFIED:
                    records.append(VerifiedRecord(VERIFIED, value))
        return records

    def incarnation(self, txn: Any) -> int:
        """This node's life: 0 until a quorum member first sets it."""
        raw = txn.get(Meta.QUORUM_INCARNATION, db=self.meta)
        return U64BE.unpack(raw)[0] if raw else 0


__all__ = ["QuorumState"]
