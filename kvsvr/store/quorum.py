"""The version quorum's durable state in a store: each open instance's acceptor state (the
paxos table) and the node's life, fences and rebuild markers (meta's quorum/ names).

The records are the core's (kvsvr/_quorum.pxi): ("instance", key, version, promised,
accepted_ballot, accepted_value, chosen_value), ("fence", peer, incarnation),
("rebuilt", incarnation), ("verified", incarnation).
"""

from __future__ import annotations

from typing import Any

import msgspec

from kvsvr.store.layout import U16BE, U64BE, Meta, Tables, key_prefix

_paxos_encoder = msgspec.msgpack.Encoder()
_paxos_decoder = msgspec.msgpack.Decoder(tuple[int, int, bytes | None, bytes | None])
_MARKERS = {"rebuilt": Meta.QUORUM_REBUILT, "verified": Meta.QUORUM_VERIFIED}


class QuorumState:
    """The paxos table and the quorum/ meta names of one store."""

    __slots__ = ("meta", "paxos")

    def __init__(self, tables: Tables) -> None:
        self.paxos = tables.paxos
        self.meta = tables.meta

    def persist(self, txn: Any, records: list[tuple[Any, ...]]) -> None:
        """Write the core's records in `txn`."""
        for record in records:
            kind = record[0]
            if kind == "instance":
                _, key, version, promised, accepted_ballot, accepted_value, chosen = record
                txn.put(key_prefix(key) + U64BE.pack(version),
                        _paxos_encoder.encode([promised, accepted_ballot, accepted_value,
                                               chosen]), db=self.paxos)
            elif kind == "fence":
                txn.put(Meta.QUORUM_FENCE_PREFIX + bytes([record[1]]), U64BE.pack(record[2]),
                        db=self.meta)
            elif kind in _MARKERS:
                txn.put(_MARKERS[kind], U64BE.pack(record[1]), db=self.meta)
            else:
                raise ValueError(f"record: unknown quorum record kind {kind!r}")

    def set_incarnation(self, txn: Any, incarnation: int) -> None:
        txn.put(Meta.QUORUM_INCARNATION, U64BE.pack(incarnation), db=self.meta)

    def forget_instance(self, txn: Any, key: bytes, version: int) -> None:
        """The version was applied: its acceptor state is no longer kept."""
        txn.delete(key_prefix(key) + U64BE.pack(version), db=self.paxos)

    def records(self, txn: Any) -> list[tuple[Any, ...]]:
        """Every persisted record, in the form QuorumReplica.restore takes."""
        records: list[tuple[Any, ...]] = []
        for raw_key, raw in txn.cursor(db=self.paxos):
            key_len = U16BE.unpack_from(raw_key)[0]
            key = raw_key[2:2 + key_len]
            version = U64BE.unpack_from(raw_key, 2 + key_len)[0]
            promised, accepted_ballot, accepted_value, chosen_value = \
                _paxos_decoder.decode(raw)
            records.append(("instance", key, version, promised, accepted_ballot,
                            accepted_value, chosen_value))
        cursor = txn.cursor(db=self.meta)
        if cursor.set_range(Meta.QUORUM_PREFIX):
            for name, raw in cursor:
                if not name.startswith(Meta.QUORUM_PREFIX):
                    break
                value = U64BE.unpack(raw)[0]
                if name.startswith(Meta.QUORUM_FENCE_PREFIX):
                    records.append(("fence", name[len(Meta.QUORUM_FENCE_PREFIX)], value))
                elif name in (Meta.QUORUM_REBUILT, Meta.QUORUM_VERIFIED):
                    records.append((name[len(Meta.QUORUM_PREFIX):].decode(), value))
        return records

    def incarnation(self, txn: Any) -> int:
        """This node's life: 0 until a quorum member first sets it."""
        raw = txn.get(Meta.QUORUM_INCARNATION, db=self.meta)
        return U64BE.unpack(raw)[0] if raw else 0


__all__ = ["QuorumState"]
