"""The storage of one node: Key-Value and Key-Table data, its binlog, op ids and the version
quorum's durable state, in one LMDB environment.

The parts, each a module that owns its state:

  layout        what is on disk, byte for byte: the tables, each record's layout, every
                meta name (`Meta`), SCHEMA_VERSION, and the decoded key state (`KeyState`)
  planner       `plan`: what a mutation's ops do to a key, checked before anything is written
  states        `KeyStates`: the key states kept in memory, the ones held back from LMDB's
                keys table (a replica's), their rolling flush and their replay from the binlog
  exactly_once  `OpIds`: the first answer to each operation id, so a retry is answered as
                the first time
  quorum        `QuorumState`: the version quorum's acceptor state and markers
  snapshots     `Snapshots`: a consistent copy of a store, paged, and its installation
  engine        `Store`: opens the environment, reads, and hands out write transactions
  batch         `WriteBatch`: one write transaction (mutations, binlog records of peers,
                quorum records, snapshot items, meta); kvsvr/_applier.pyx is its compiled
                path for a replica's plain writes

Other modules import from here, not from the parts.
"""

from kvsvr.store.batch import WriteBatch
from kvsvr.store.engine import Store, StoreLocked
from kvsvr.store.layout import SCHEMA_VERSION, KeyState, Meta, seq_of_row, seq_row
from kvsvr.store.planner import plan
from kvsvr.store.snapshots import SnapshotItem, SnapshotPosition

__all__ = [
    "SCHEMA_VERSION",
    "KeyState",
    "Meta",
    "SnapshotItem",
    "SnapshotPosition",
    "Store",
    "StoreLocked",
    "WriteBatch",
    "plan",
    "seq_of_row",
    "seq_row",
]
