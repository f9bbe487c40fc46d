"""What a node's LMDB environment holds, byte for byte: its sub-databases (tables), the
layout of each record, every name in the meta table, and the decoded key state.

One environment per node, SCHEMA_VERSION 2. `be` is big-endian (keys that must sort in
numeric order), `le` little-endian; `prefix(key)` (key_prefix) is u16be len(key) then the
key, so one key's entries sort together and apart from any other key's.

  keys     key
           -> u64le version, u64le next_seq, u64le compacted_through, u8 has_value, value
              (25 bytes then the value; has_value 0: the key holds no value, none follows)
  rows     prefix(key) row
           -> u64le version, u8 deleted, value
              (version: the key's version that last changed the row; a deleted row is kept
              as a tombstone, deleted 1 and no value, until a compaction drops it)
  changes  prefix(key) u64be version row -> b""
              (one entry per row, at the version that last changed it: `changes(since)`
              walks them in version order)
  binlog   u64be lsn -> one record of kvsvr._core's record codec (kvsvr/_record.pxi: a
              56-byte little-endian header checksummed with xxh3, the key, the ops)
  ops      u64be client_id u64be client_seq
           -> msgpack [request digest, [version, results]]
              (the exactly-once table: the digest is xxh64 of msgpack [key, ops], see
              kvsvr._applier.request_digest; the second item is the first MutateReply)
  clients  u64be client_id -> u64le horizon, u64le last active (unix seconds)
              (op ids below the horizon were trimmed: their retries are refused)
  paxos    prefix(key) u64be version
           -> msgpack [promised, accepted_ballot, accepted_value, chosen_value]
              (the version quorum's acceptor state of one instance, until it is applied)
  meta     a name of `Meta` -> the value it documents

A row key made by `append` is u64be of the key's next_seq (`seq_row`), so appended rows
sort in the order they were appended.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from kvsvr._applier import encode_state

SCHEMA_VERSION = 2          # the layout above; a store of another version is refused at open

KEY_STATE = struct.Struct("<QQQB")   # keys: version, next_seq, compacted_through, has_value
KEY_STATE_HAS_VALUE_OFFSET = 24      # where has_value is in a keys record
ROW_META = struct.Struct("<QB")      # rows: version, deleted
CLIENT = struct.Struct("<QQ")        # clients: horizon seq, last active (unix seconds)
OP_ID = struct.Struct(">QQ")         # ops key: client_id, client_seq
SCHEMA = struct.Struct("<I")         # meta's schema entry
U64BE = struct.Struct(">Q")          # LSNs, versions, client ids and meta numbers in keys
U16BE = struct.Struct(">H")          # the length in front of a key (see prefix)

Table = Any   # an LMDB named database handle (what lmdb.Environment.open_db returns)


class Tables:
    """The environment's sub-databases, opened once, by name."""

    # In the order they are opened (and the count sizes LMDB's max_dbs).
    NAMES = ("keys", "rows", "changes", "binlog", "ops", "paxos", "clients", "meta")
    __slots__ = NAMES

    keys: Table
    rows: Table
    changes: Table
    binlog: Table
    ops: Table
    paxos: Table
    clients: Table
    meta: Table

    def __init__(self, env: Any) -> None:
        for name in self.NAMES:
            setattr(self, name, env.open_db(name.encode()))


class Meta:
    """Every name in the meta table, with what its value holds. A name marked "+ peer" is a
    prefix: one entry per peer, named by the prefix then the peer's index as one byte.
    Numbers are u64be unless said otherwise (`Store.meta_u64s` reads them)."""

    SCHEMA = b"schema"                      # u32le: SCHEMA_VERSION of the files
    LAST_LSN = b"last_lsn"                  # last LSN at a commit that trimmed the binlog
    KEYS_REPLAY_FROM = b"keys/replay_from"  # first binlog LSN a held key state needs replayed
    QUORUM_PREFIX = b"quorum/"              # what the four names below start with
    QUORUM_INCARNATION = b"quorum/incarnation"  # this node's life (absent: 0, none set yet)
    QUORUM_FENCE_PREFIX = b"quorum/fence/"  # + peer: its lowest life still listened to
    QUORUM_REBUILT = b"quorum/rebuilt"      # a life that rebuilt its state from a quorum
    QUORUM_VERIFIED = b"quorum/verified"    # a life that rebuilt from every peer (fast path)
    CURSOR_PREFIX = b"cursor/"              # + peer: its life, its binlog applied through
    REBUILD_TARGET_PREFIX = b"rebuild/target/"  # + peer: its last LSN when it sent state
    REBUILD_DONE = b"rebuild/done"          # the life whose rebuild holds every peer's data
    COPY_INSTALLING_PREFIX = b"copy/installing/"  # + peer: msgpack [key, ...] half installed
    VOTES_NONCE = b"votes/nonce"            # the vote log's nonce (stored once it is whole)
    VOTES_THROUGH = b"votes/through"        # vote log at the last checkpoint: frame, offset


def key_prefix(key: bytes) -> bytes:
    """What every rows, changes and paxos entry of `key` starts with."""
    return U16BE.pack(len(key)) + key


def seq_row(seq: int) -> bytes:
    """The row key `append` gives to sequence number `seq` (sorts in sequence order)."""
    return U64BE.pack(seq)


def seq_of_row(row: bytes) -> int:
    """The sequence number of a row key made by `append`."""
    if len(row) != 8:
        raise ValueError(f"row: {len(row)} bytes, an appended row key is 8")
    return int(U64BE.unpack(row)[0])


class KeyState(msgspec.Struct, gc=False):
    """What a key is at its latest version: a keys record, decoded. Not tracked by the
    cyclic garbage collector (it holds no containers): a store keeps up to STATE_CACHE_KEYS
    of them, and each full collection walking them all paused writes."""

    version: int = 0
    next_seq: int = 0
    value: bytes | None = None
    compacted_through: int = 0   # tombstones up to here are gone

    @classmethod
    def decode(cls, raw: bytes | None) -> KeyState:
        if raw is None:
            return cls()
        version, next_seq, compacted_through, has_value = KEY_STATE.unpack_from(raw)
        return cls(version, next_seq, raw[KEY_STATE.size:] if has_value else None,
                   compacted_through)

    def encode(self) -> bytes:
        return encode_state(self)   # (one encoder: the compiled path writes states too)


__all__ = [
    "CLIENT",
    "KEY_STATE",
    "KEY_STATE_HAS_VALUE_OFFSET",
    "OP_ID",
    "ROW_META",
    "SCHEMA",
    "SCHEMA_VERSION",
    "U16BE",
    "U64BE",
    "KeyState",
    "Meta",
    "Table",
    "Tables",
    "key_prefix",
    "seq_of_row",
    "seq_row",
]
