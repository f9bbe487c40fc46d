"""What a node's LMDB environment holds, byte for byte: its sub-databases (tables), the
layout of each record, every name in the meta table, and the decoded key state.

One environment per node, SCHEMA_VERSION 3 (3 added the expiry table and the expiry flags;
a version-2 store, which has neither, is upgraded in place at open: the empty table is
made). `be` is big-endian (keys that must sort in numeric order), `le` little-endian;
`prefix(key)` (key_prefix) is u16be len(key) then the key, so one key's entries sort
together and apart from any other key's.

  keys     key
           -> u64le version, u64le next_seq, u64le compacted_through, u8 flags,
              [u64le expires_ms], value
              (flags bit 0: the key holds a value, which follows; bit 1: the value expires
              at expires_ms, unix milliseconds, which comes first)
  rows     prefix(key) row
           -> u64le version, u8 state, [u64le expires_ms], value
              (version: the key's version that last changed the row; state 0 a live row,
              1 a tombstone (no value) kept until a compaction drops it, 2 a live row that
              expires at expires_ms)
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
  expiry   u64be expires_ms prefix(key) row -> b""
              (one entry per value (row empty) or row that expires, in the order they are
              due: what the background removal reads; kept in step with keys and rows)

A row key made by `append` is u64be of the key's next_seq (`seq_row`), so appended rows
sort in the order they were appended.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from kvsvr._applier import encode_state

SCHEMA_VERSION = 3          # the layout above; a store of another version is refused at open
SCHEMA_UPGRADABLE = (2,)    # ... but these are upgraded in place (see the docstring)

KEY_STATE = struct.Struct("<QQQB")   # keys: version, next_seq, compacted_through, has_value
KEY_STATE_HAS_VALUE_OFFSET = 24      # where the flags are in a keys record
KEY_HAS_VALUE = 1                    # keys flags: a value follows ...
KEY_EXPIRES = 2                      # ... and expires (u64le expires_ms first)
ROW_META = struct.Struct("<QB")      # rows: version, state
ROW_LIVE, ROW_DELETED, ROW_EXPIRING = 0, 1, 2   # rows: the state byte
U64LE = struct.Struct("<Q")          # expires_ms in keys and rows records
CLIENT = struct.Struct("<QQ")        # clients: horizon seq, last active (unix seconds)
OP_ID = struct.Struct(">QQ")         # ops key: client_id, client_seq
SCHEMA = struct.Struct("<I")         # meta's schema entry
U64BE = struct.Struct(">Q")          # LSNs, versions, client ids and meta numbers in keys
U16BE = struct.Struct(">H")          # the length in front of a key (see prefix)

Table = Any   # an LMDB named database handle (what lmdb.Environment.open_db returns)


class Tables:
    """The environment's sub-databases, opened once, by name."""

    # In the order they are opened (and the count sizes LMDB's max_dbs).
    NAMES = ("keys", "rows", "changes", "binlog", "ops", "paxos", "clients", "meta", "expiry")
    __slots__ = NAMES

    keys: Table
    rows: Table
    changes: Table
    binlog: Table
    ops: Table
    paxos: Table
    clients: Table
    meta: Table
    expiry: Table

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


def expiry_entry(expires_ms: int, key: bytes, row: bytes) -> bytes:
    """The expiry table's entry of a value (row empty) or row that expires at `expires_ms`."""
    return U64BE.pack(expires_ms) + U16BE.pack(len(key)) + key + row


def split_expiry_entry(entry: bytes) -> tuple[int, bytes, bytes]:
    """(expires_ms, key, row) of an expiry table entry."""
    key_len = U16BE.unpack_from(entry, 8)[0]
    return int(U64BE.unpack_from(entry)[0]), entry[10:10 + key_len], entry[10 + key_len:]


def row_expires_ms(raw: bytes) -> int:
    """When a rows record expires (unix ms), 0 if it does not."""
    return int(U64LE.unpack_from(raw, ROW_META.size)[0]) if raw[8] == ROW_EXPIRING else 0


def row_value(raw: bytes) -> bytes:
    """The value of a live rows record (expiring or not)."""
    return raw[ROW_META.size + 8:] if raw[8] == ROW_EXPIRING else raw[ROW_META.size:]


def encode_row(version: int, value: bytes | None, expires_ms: int = 0) -> bytes:
    """A rows record: a tombstone when `value` is None."""
    if value is None:
        return ROW_META.pack(version, ROW_DELETED)
    if expires_ms:
        return ROW_META.pack(version, ROW_EXPIRING) + U64LE.pack(expires_ms) + value
    return ROW_META.pack(version, ROW_LIVE) + value


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
    expires_ms: int = 0          # the value expires then (unix ms); 0: never, or no value

    @classmethod
    def decode(cls, raw: bytes | None) -> KeyState:
        if raw is None:
            return cls()
        version, next_seq, compacted_through, flags = KEY_STATE.unpack_from(raw)
        if flags & KEY_EXPIRES:
            return cls(version, next_seq, raw[KEY_STATE.size + 8:], compacted_through,
                       U64LE.unpack_from(raw, KEY_STATE.size)[0])
        return cls(version, next_seq, raw[KEY_STATE.size:] if flags else None,
                   compacted_through)

    def encode(self) -> bytes:
        return encode_state(self)   # (one encoder: the compiled path writes states too)


__all__ = [
    "CLIENT",
    "KEY_EXPIRES",
    "KEY_HAS_VALUE",
    "KEY_STATE",
    "KEY_STATE_HAS_VALUE_OFFSET",
    "OP_ID",
    "ROW_DELETED",
    "ROW_EXPIRING",
    "ROW_LIVE",
    "ROW_META",
    "SCHEMA",
    "SCHEMA_UPGRADABLE",
    "SCHEMA_VERSION",
    "U16BE",
    "U64BE",
    "U64LE",
    "KeyState",
    "Meta",
    "Table",
    "Tables",
    "encode_row",
    "expiry_entry",
    "key_prefix",
    "row_expires_ms",
    "row_value",
    "seq_of_row",
    "seq_row",
    "split_expiry_entry",
]
