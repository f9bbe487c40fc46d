"""One replica of a replicated group: the version quorum and the binlog stream around LMDB.

`ReplicaNode` serves a node whose group has more than one replica. Its loop, per round
(kvsvr/replica/round.py):

1. Take what arrived (the edge, edge.py): client requests, peer quorum messages (stepped
   into the core with the key's applied version as its floor), peer queries (VERSIONS,
   PULL, HELLO, SNAPSHOT) answered at once, and peers' answers to our own queries.
2. Move waiting work on (work.py): a write at the head of its key's queue is checked (op id
   already applied? compare-and-set?) and proposed as the key's next version; a
   linearizable read waits for a version barrier (barriers.py: a majority's applied and
   open versions of the key) and is answered from local LMDB once this replica is at least
   that new.
3. Tick the core; what it asks to persist (votes) is one frame of the vote log, made durable
   with one fdatasync (kvsvr/votelog.py); the core is told once the frame is written
   (advance), and hands out nothing more before that. The same records, every chosen
   version applied in order (from the quorum or from a peer's binlog) and the instances it
   forgets go into an LMDB write transaction that stays open across rounds (checkpoints.py).
4. Only then send peer messages (persist before send, sending.py). A write is answered as
   soon as the quorum has chosen it (a majority holds it durably), even before the local
   apply commits.
5. Every storage.checkpoint_interval_ms the open transaction commits (fsync) on the
   committer's thread, recording the last vote log frame it covers; the loop goes on voting
   meanwhile, and the log's room up to that frame is free once the commit ends. A crash
   loses the uncommitted transactions only: on restart the frames after the checkpoint are
   replayed, and what they chose is applied again. So the fsync on a write's path is a small
   sequential append, and LMDB's page writes are paid once per checkpoint, off the loop.

Readers in this loop use the open transaction (they see every apply). While a commit is
under way there is none: a read transaction does not see the keys that commit holds, so
their applied version comes from memory (frozen keys), and reads of them wait for the commit
to end. Writes to them go on from the key's state kept in memory, unless that state was not
kept or an op id the commit holds is among the key's waiting writes (a retry must find its
first answer, which only the committed transaction shows). What leaves the node as data
(binlog pulls, snapshots, the LSN stamped on a rebuild answer) is only what a checkpoint made
durable, so a peer never holds a record this node could lose in a crash.

Data reaches a replica that was not in a quorum, or was down, through the binlog stream
(stream.py): each replica pulls every peer's binlog from its own durable cursor and applies
each key's next version; a record at or below the key's version is skipped. A replica whose
cursor fell behind a peer's trimmed binlog copies a snapshot of that peer (and does nothing
else meanwhile).

Lives (lives.py). A node whose data directory is new asks every peer what it knows of it
(HELLO) before it votes: if some peer heard from an earlier life, the disk was lost, so this
is a new incarnation that rebuilds (the core gathers every peer's acceptor state, and the data
comes from a snapshot of every peer and its binlog up to where that peer stood when it
answered) before it may vote.

The parts, each a class with its own state: `Peers` (peers.py), `Life`, `Edge` (the only
module that touches ZeroMQ), `QuorumSender`, `Checkpoints`, `Stream`, `Work`, `Barriers`,
tied by `ReplicaNode` (round.py).
"""

from kvsvr.replica.round import ReplicaNode

__all__ = ["ReplicaNode"]
