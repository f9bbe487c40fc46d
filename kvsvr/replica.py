"""One replica of a replicated group: the version quorum and the binlog stream around LMDB.

`ReplicaNode` serves a node whose group has more than one replica. Its loop, per round:

1. Take what arrived: client requests, peer quorum messages (stepped into the core with the
   key's applied version as its floor), peer queries (VERSIONS, PULL, HELLO) answered at once,
   and peers' answers to our own queries.
2. Move waiting work on: a write at the head of its key's queue is checked (op id already
   applied? compare-and-set?) and proposed as the key's next version; a linearizable read
   waits for a version barrier (a majority's applied and open versions of the key) and is
   answered from local LMDB once this replica is at least that new.
3. Tick the core; what it asks to persist (votes) is one frame of the vote log, made durable
   with one fdatasync (kvsvr/votelog.py). The same records, every chosen version applied in
   order (from the quorum or from a peer's binlog) and the instances it forgets go into an
   LMDB write transaction that stays open across rounds.
4. Only then send peer messages (persist before send). A write is answered as soon as the
   quorum has chosen it (a majority holds it durably), even before the local apply commits.
5. Every storage.checkpoint_interval_ms the open transaction commits (fsync) on the
   committer's thread, recording the last vote log frame it covers; the loop goes on voting
   meanwhile, and the log's room up to that frame is free once the commit ends. A crash
   loses the uncommitted transactions only: on restart the frames after the checkpoint are
   replayed, and what they chose is applied again. So the fsync on a write's path is a small
   sequential append, and LMDB's page writes are paid once per checkpoint, off the loop.

Readers in this loop use the open transaction (they see every apply). While a commit is
under way there is none: a read transaction does not see the keys that commit holds, so
their applied version comes from memory (`_frozen`), and reads of them wait for the commit
to end. Writes to them go on from the key's state kept in memory, unless that state was not
kept or an op id the commit holds is among the key's waiting writes (a retry must find its
first answer, which only the committed transaction shows): a checkpoint of 1 s held about
3% of writes for its whole commit, the p99 of a write workload. What leaves the node
as data (binlog pulls, snapshots, the LSN stamped on a rebuild answer) is only what a
checkpoint made durable, so a peer never holds a record this node could lose in a crash.

Data reaches a replica that was not in a quorum, or was down, through the binlog stream: each
replica pulls every peer's binlog from its own durable cursor and applies each key's next
version; a record at or below the key's version is skipped. Because a peer applies each key's
versions in order and writes them to its binlog in that order, a cursor kept in the same
transaction as the applies never meets a gap (except behind a snapshot a peer installed:
that stream waits for the others to fill the key in). A replica whose cursor fell behind a
peer's trimmed binlog copies a snapshot of that peer (and does nothing else meanwhile).

Lives. A node whose data directory is new asks every peer what it knows of it (HELLO) before
it votes: if some peer heard from an earlier life, the disk was lost, so this is a new
incarnation that rebuilds (the core gathers every peer's acceptor state, and the data comes
from a snapshot of every peer and its binlog up to where that peer stood when it answered)
before it may vote.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import random
import secrets
import time
from collections import deque
from contextlib import suppress
from typing import Any, NoReturn

import msgspec
import zmq

from kvsvr import _core, protocol
from kvsvr.committer import Committer
from kvsvr.config import ClusterConfig
from kvsvr.errors import (
    Internal,
    InvalidArgument,
    KvError,
    StorageFull,
    Timeout,
    Unavailable,
    VersionConflict,
)
from kvsvr.limits import KEY_FLUSH_CYCLE_S, KEY_FLUSH_IDLE_S
from kvsvr.monitor import registry as monitor_ids
from kvsvr.node import (
    _METHOD_COUNTER,
    CLIENT_SWEEP_INTERVAL_S,
    Node,
    _error_frame,
    bind_router,
    libzmq_send,
    node_context,
    node_socket,
)
from kvsvr.peerauth import PeerAuth
from kvsvr.protocol import (
    CONSISTENCY_LOCAL,
    HelloReply,
    HelloRequest,
    KeyVersions,
    Method,
    MutateReply,
    MutateRequest,
    PullReply,
    PullRequest,
    SnapshotPosition,
    SnapshotReply,
    SnapshotRequest,
    VersionsReply,
    VersionsRequest,
)
from kvsvr.store import KeyState, Store, WriteBatch, _plan
from kvsvr.votelog import VoteLog

log = logging.getLogger("kvsvr.replica")

# `_committing` while the committer syncs the last commit's meta page (no commit under way).
_SYNCING: tuple[int, dict[int, tuple[int, int]]] = (-1, {})

# Tunables of a replica (time in seconds unless the name says otherwise).
REQUEST_WAIT_MAX_S = 3.0        # a request the group cannot finish this long is answered
BARRIER_RESEND_S = 0.25         # a version barrier without a majority is asked again
PULL_IDLE_INTERVAL_S = 0.02     # a peer whose binlog had nothing new is asked again after this,
PULL_IDLE_INTERVAL_MAX_S = 0.2  # ... twice as long after each empty answer, up to this
PULL_TIMEOUT_S = 1.0            # an unanswered pull is sent again, ...
PULL_TIMEOUT_MAX_S = 8.0        # ... after twice as long each time it goes unanswered
PULL_MAX_RECORDS = 2048         # records per pull answer ...
PULL_MAX_BYTES = 2 << 20        # ... and bytes
HELLO_RESEND_S = 0.5            # a joining node asks silent peers again
JOINING_LOG_S = 5.0             # ... and says whom it is waiting for this often
SNAPSHOT_PAGE_BYTES = 1 << 20   # a page of a snapshot
SNAPSHOT_SESSIONS_MAX = 4       # copies a node serves at once (each pins an LMDB read txn)
SNAPSHOT_IDLE_S = 30.0          # a copy nobody asked a page of for this long is dropped
GAP_SNAPSHOT_AFTER_S = 5.0      # a stream stopped at a gap this long: copy that peer instead
PEER_DOWN_AFTER_S = 2.0         # a peer silent this long is reported down in status
QUORUM_FRAME_BYTES = 1 << 20    # quorum messages per frame, by size ...
QUORUM_FRAME_MESSAGES = 1024    # ... and count
APPLY_MAX_PER_ROUND = 20_000    # pulled records applied in one transaction
TRIM_MAX_PER_ROUND = 4096       # binlog records every peer has, trimmed per round
ROUND_MAX_MESSAGES = 512        # inbound messages taken per round
IDLE_POLL_MS = 20               # poll timeout with nothing pending (pulls, ticks)
EXPIRE_INTERVAL_S = 0.01        # waiting requests are checked for their deadline this often
ROUND_WAKE_ONLY_MAX_S = 0.005   # a sync ending alone skips the round if one ran this recently
OPEN_RECOVER_AFTER_S = 1.0      # an instance accepted here but not chosen this long: finish it
OPEN_CHECK_INTERVAL_S = 0.25    # how often open instances are looked at
YIELD_AFTER_VOTE_S = 0.01       # a loop that wrote votes this recently yields its core ...
WAKE_YIELDS = 2                 # ... this many times when woken, before taking what arrived
CHECKPOINT_MAX_APPLIED = 20_000  # a checkpoint at least every this many applied versions

_REQUEST = _core.FRAME_REQUEST
_RESPONSE = _core.FRAME_RESPONSE
_encode = protocol.encode
_encode_frame = _core.encode_frame
_READS = frozenset({Method.GET, Method.ROW_GET, Method.SCAN, Method.CHANGES})
_pull_reply_decoder = msgspec.msgpack.Decoder(PullReply)
_versions_reply_decoder = msgspec.msgpack.Decoder(VersionsReply)
_hello_reply_decoder = msgspec.msgpack.Decoder(HelloReply)
_snapshot_reply_decoder = msgspec.msgpack.Decoder(SnapshotReply)


_arrivals = itertools.count(1)


class _Waiter:
    """A client request this replica cannot answer yet."""

    __slots__ = ("arrival", "barrier", "confirmed", "deadline", "identity", "method", "open",
                 "proposed", "received", "reply", "request", "request_id", "target")

    def __init__(self, identity: bytes, request_id: int, method: int, request: Any,
                 deadline: float):
        self.identity = identity
        self.request_id = request_id
        self.method = method
        self.request = request
        self.deadline = deadline
        self.barrier = 0          # the version barrier it waits for (0: none)
        self.target = -1          # ... whose result: the majority's highest applied version
        self.open = 0             # ... and highest open (maybe chosen) version
        self.confirmed = False    # a barrier found this replica current for the key
        self.proposed = 0         # version a write was proposed at (0: not in flight)
        self.reply: Any = None    # ... and its answer if that proposal is chosen
        self.arrival = next(_arrivals)  # a read waits for the writes of its key before it
        self.received = time.monotonic()   # for the latency bucket ids


class _KeyWork:
    __slots__ = ("need_floor", "reads", "writes")

    def __init__(self) -> None:
        self.writes: deque[_Waiter] = deque()
        self.reads: list[_Waiter] = []
        self.need_floor = 0       # a peer applied this far (BEHIND): catch up before proposing


class _Barrier:
    __slots__ = ("answers", "created", "keys", "sent_at")

    def __init__(self, keys: list[bytes], sent_at: float):
        self.keys = keys
        self.created = sent_at
        self.sent_at = sent_at
        self.answers: dict[int, list[KeyVersions]] = {}


class _View:
    """ReplicaNode._view's context: a class, not a generator (three a round: a generator-based
    one cost 3 us each under the put load, profiled)."""

    __slots__ = ("_batch", "_store", "_txn")

    def __init__(self, store: Store, batch: WriteBatch | None):
        self._store, self._batch = store, batch
        self._txn: Any = None

    def __enter__(self) -> Any:
        if self._batch is not None:
            return self._batch.txn
        self._txn = self._store.read()
        return self._txn

    def __exit__(self, *exc: object) -> None:
        if self._txn is not None:
            self._txn.abort()


class _Peer:
    """This node's link to one other replica of its group."""

    def __init__(self, index: int, name: str, address: str, socket: zmq.Socket):
        self.index = index
        self.name = name
        self.address = address
        self.socket = socket
        self.incarnation = 0      # the peer's life whose binlog `cursor` points into
        self.cursor = 0           # we applied or skipped every record of its binlog up to here
        self.saved = (0, 0)       # (incarnation, cursor) last put in the open transaction
        self.durable = (0, 0)     # ... and in the last checkpoint: what a crash goes back to
        self.pull_sent_at = 0.0   # 0: no pull in flight
        self.pull_timeout_s = PULL_TIMEOUT_S   # until it is sent again (see _pull)
        self.pull_tag = 0         # the pull (or snapshot page) in flight: older answers are stale
        self.pull_from = 1        # the first LSN the pull in flight asked for
        self.next_pull = 0.0
        self.pull_idle_s = PULL_IDLE_INTERVAL_S  # the wait after an empty answer (see _pull)
        self.first_lsn = 0
        self.last_lsn = 0
        self.pulled = False       # it has answered a pull (its last_lsn is known)
        self.has_through = 0      # what the peer says it pulled of ours (trimming)
        self.up = False           # as last logged
        self.gap_since = 0.0      # its stream has stopped at a gap since then (0: it has not)
        self.heard_at = 0.0
        self.hello: HelloReply | None = None
        self.trimmed_past_us = False  # its binlog no longer has what we need: snapshot
        self.snapshot: dict[str, Any] | None = None  # a copy from it under way
        self.snapshots_taken = 0
        self.vote_socket: zmq.Socket | None = None   # the sync thread's link to it ...
        self.vote_slot = -1       # ... and its slot there (-1: votes go out from the loop)
        self.drop = 0.0           # fault hook: chance a message to this peer is lost
        self.delay_ms = 0         # ... and the most it is held back (uniform, so reordered)


class ReplicaNode(Node):
    """A node of a group of 2..7 replicas (see the module docstring)."""

    def __init__(self, config: ClusterConfig, name: str):
        super().__init__(config, name, replicated=True)
        self.index = self.group.replicas.index(self.replica)
        self.replicas = len(self.group.replicas)
        self.quorum: _core.QuorumReplica | None = None
        self.role = "joining"
        self._work: dict[bytes, _KeyWork] = {}
        self._dirty: set[bytes] = set()
        self._outbox: dict[bytes, list[bytes]] = {}
        # Quorum messages wait for the vote log frames written before them to be durable:
        # (the last such frame, peer, the messages' frames), in the order they were made.
        self._held: deque[tuple[int, _Peer, list[bytes]]] = deque()
        self._vote_gate = 0   # the last vote log frame holding votes: sends wait for it
        self._sync_wakes = True   # each finished sync wakes the loop (see _wake_on_sync)
        self._voted_at = -1.0     # when a round last wrote votes (see serve)
        self._barriers: dict[int, _Barrier] = {}
        self._barrier_ids = itertools.count(1)
        self._want_barrier: dict[bytes, list[_Waiter]] = {}
        self._pulled: list[tuple[_Peer, int, list[bytes]]] = []
        # (peer, page, the copy it was asked for: a page of a copy started again is dropped)
        self._pages: list[tuple[_Peer, SnapshotReply, dict[str, Any]]] = []
        self._sessions: dict[int, list[Any]] = {}  # copies served: [txn, lsn, last used]
        self._delayed: list[tuple[float, int, int, list[bytes]]] = []
        self._delayed_seq = itertools.count()
        # Acceptor records of instances: those in the vote log since the last checkpoint
        # (the latest per instance), which the checkpoint writes to LMDB if still open, and
        # those LMDB holds. Most instances are chosen and applied within one checkpoint
        # interval, so they never cost LMDB a put and a delete.
        self._logged: dict[tuple[bytes, int], tuple[Any, ...]] = {}
        self._in_lmdb: set[tuple[bytes, int]] = set()
        self._random = random.Random()
        self._hello_sent = 0.0
        self._joining_since = 0.0
        self._joining_logged = 0.0
        self._rebuild_targets: dict[int, int] = {}  # peer -> its last LSN when it sent state
        self._anonymous_client = secrets.randbits(62) | 2  # op ids for requests without one
        self._anonymous_seq = itertools.count(1)
        self._peers: list[_Peer | None] = [None] * self.replicas
        self._pending_peers: list[tuple[int, str, str]] = [
            (i, r.node, r.address) for i, r in enumerate(self.group.replicas) if i != self.index]
        self.incarnation = self.store.incarnation
        cursors = self.store.meta_u64s(b"cursor/")
        self._saved_cursors = {int(k[0]): v for k, v in cursors.items() if k}
        self._rebuild_targets = {
            int(k[0]): v[0] for k, v in self.store.meta_u64s(b"rebuild/target/").items() if k}
        self._rebuild_done = bool(self.store.meta_u64s(b"rebuild/done"))
        # Keys a copy was installing when the node stopped (a page can end inside a key's
        # rows, and a checkpoint can make that half durable): copied again from that peer,
        # those keys replaced even by their own version, before anything else.
        self._half_installed = {int(k[0]): set(msgspec.msgpack.decode(v, type=list[bytes]))
                                for k, v in self.store.meta_raw(b"copy/installing/").items()
                                if k}
        # Instances accepted here and not known chosen, since when: one whose proposer went
        # quiet (died after a majority accepted, before anyone learned) is finished here, so
        # an acknowledged write reaches every copy without waiting for a read or a write.
        self._open_since: dict[tuple[bytes, int], float] = {}
        self._open_checked = 0.0
        self._lag_peak = 0  # most records a stream was behind since the gauge was last set
        self._peers_watched = 0.0
        self._expire_at = 0.0
        self._round_at = 0.0
        self._after_copy: set[bytes] = set()  # keys whose chosen versions wait for a copy
        # The nonce is stored only once its log file is whole (zero-filled and synced): a
        # store with a nonce and no whole log lost votes, and VoteLog refuses to go on.
        nonce = self.store.meta_u64s(b"votes/nonce").get(b"")
        had_log = nonce is not None
        if nonce is None:
            nonce = (secrets.randbits(64),)
        self.votes = VoteLog(self.store.path / "votes.log", nonce[0], sync=config.storage.sync,
                             must_exist=had_log)
        if not had_log:
            with self.store.write() as batch:
                batch.set_meta_u64s(b"votes/nonce", *nonce)
        # LMDB write transactions begin and commit on the committer's thread; a checkpoint's
        # commit runs there while the loop goes on (see _checkpoint and _finish_commit).
        self._committer = Committer(self.store, name=f"{name}-commit")
        self._batch: WriteBatch | None = None  # the LMDB transaction open across rounds
        self._batch_opened = 0.0
        self._batch_keys: dict[bytes, int] = {}  # keys applied in it -> their version
        # Op ids applied in it (None: not known, as after a snapshot page: it brings op ids).
        self._batch_ops: set[tuple[int, int]] | None = set()
        # The checkpoint under commit: (frames it covers, cursors in it). Until
        # it ends LMDB takes no writes, and a read transaction does not see it: the keys it
        # applied (-> their version) are frozen, and what needs them waits for it to end.
        self._committing: tuple[int, dict[int, tuple[int, int]]] | None = None
        # The last checkpoint committed, durable once the next commit (or a sync) ends, as
        # the store defers each commit's meta page sync: (frames it covers, cursors in it,
        # when it ended). Until then its frames stay in the vote log and peers are told
        # only the cursors before it (see Store's defer_meta_sync).
        self._undurable: tuple[int, dict[int, tuple[int, int]], float] | None = None
        self._frozen: dict[bytes, int] = {}
        self._commit_ended = 0.0   # when the last checkpoint commit (or sync) ended
        self._frozen_ops: set[tuple[int, int]] | None = set()   # _batch_ops of the commit
        self._thaw: set[bytes] = set()            # keys with work that waits for the commit
        self._apply_later: set[bytes] = set()     # keys whose chosen versions wait for it
        self._local_later: list[tuple[bytes, int, int, Any]] = []  # local reads of frozen keys
        self._checkpoint_s = config.storage.checkpoint_interval_ms / 1000
        self._majority = _core.majority(self.replicas)
        secret = config.security.peer_secret
        self._peer_auth = PeerAuth(secret) if secret else None
        if self.incarnation:
            self._start_quorum(rebuilding=False)

    # --- lives --------------------------------------------------------------------------------
    def _start_quorum(self, rebuilding: bool) -> None:
        self.quorum = _core.QuorumReplica(self.index, self.replicas, self.incarnation,
                                          rebuilding=rebuilding,
                                          answer_base=secrets.randbits(32))
        stored = self.store.quorum_records()
        self._in_lmdb = {(r[1], r[2]) for r in stored if r[0] == "instance"}
        if not rebuilding:
            # (A store from before the ring kept no offset: its log started again at 0.)
            through, start = (*self.store.meta_u64s(b"votes/through").get(b"", (0,)), 0)[:2]
            # Votes after the last checkpoint, newer than what LMDB holds: restored after it.
            logged = self.votes.replay(through, start)
            records = []
            stale = []
            with self.store.read() as txn:
                for record in stored + logged:
                    if record[0] == "instance" and \
                            record[2] <= self.store.key_state(txn, record[1]).version:
                        stale.append(record)  # applied before a crash: never needed again
                        continue
                    records.append(record)
            self.quorum.restore(records)
            started = time.monotonic()
            for record in records:
                if record[0] == "instance" and record[4] and record[6] is None:
                    self._open_since[(record[1], record[2])] = started
            if logged:
                self.counters["votes_replayed"] += len(logged)
                log.info("node %s: %d votes replayed from the vote log (frames %d..%d)",
                         self.name, len(logged), through + 1, self.votes.seq)
            # A checkpoint of the replayed votes, with what they chose applied again (the
            # transaction that had applied it was lost with the process), and of a frame
            # number no frame left in the file can follow.
            self.votes.skip_past_stale()
            batch = self._open_batch(started)
            for record in stale:
                self._forget_instance(batch, record[1], record[2])
            replayed = [r for r in logged if r[0] != "instance" or r[2] >
                        self.store.key_state(batch.txn, r[1]).version]
            self._log_records(batch, replayed)
            for key in {r[1] for r in replayed if r[0] == "instance" and r[6] is not None}:
                self._apply_chosen(batch, key)
            self._checkpoint(durable=True)
        self._update_role()
        log.info("node %s: incarnation %d, %s", self.name, self.incarnation, self.role)

    def _update_role(self) -> None:
        before = self.role
        if self.quorum is None:
            self.role = "joining"
        elif self.quorum.rebuilding:
            self.role = "rebuilding"
        elif not self._data_rebuilt() or self._copying():
            self.role = "catching-up"
        else:
            self.role = "replica"
        if self.role != before:
            log.info("node %s: %s -> %s", self.name, before, self.role)

    def _watch_peers(self, now: float) -> None:
        """Log each peer going silent and coming back (what an operator looks for first)."""
        self._peers_watched = now
        lag = max((p.last_lsn - p.cursor for p in self._peers if p is not None and p.pulled),
                  default=0)
        self.monitor.set(monitor_ids.NODE_BINLOG_LAG, max(lag, self._lag_peak))
        self._lag_peak = 0
        for peer in self._peers:
            if peer is None:
                continue
            up = bool(peer.heard_at) and now - peer.heard_at < PEER_DOWN_AFTER_S
            if up != peer.up:
                peer.up = up
                if up:
                    log.info("node %s: peer %s (%s) is up", self.name, peer.name, peer.address)
                else:
                    log.warning("node %s: peer %s (%s) silent for %.1f s: down", self.name,
                                peer.name, peer.address, now - peer.heard_at)

    def _majority_heard(self, now: float) -> bool:
        """This replica and the peers heard from within PEER_DOWN_AFTER_S are a majority
        (checked for every client request: no list built)."""
        heard = 1
        for p in self._peers:
            if p is not None and p.heard_at and now - p.heard_at < PEER_DOWN_AFTER_S:
                heard += 1
        return heard >= self._majority

    def _copying(self) -> bool:
        """A snapshot is being copied: keys may be half installed (a page can end inside a
        key's rows) and op ids follow the keys, so this replica neither votes nor serves nor
        applies anything else until every copy is complete."""
        # A loop, not any() over a generator: asked several times a round.
        for peer in self._peers:  # noqa: SIM110
            if peer is not None and peer.snapshot is not None:
                return True
        return False

    def _data_rebuilt(self) -> bool:
        """A rebuilt life votes only once it holds every peer's data as of its answer."""
        if self.incarnation <= 1 or self._rebuild_done or not self._rebuild_targets:
            return self.incarnation <= 1 or self._rebuild_done
        for index, target in self._rebuild_targets.items():
            peer = self._peers[index]
            if peer is None or peer.cursor < target:
                return False
        return len(self._rebuild_targets) >= self.replicas - 1

    @property
    def voting(self) -> bool:
        return self.role == "replica"

    def _on_hello_reply(self, peer: _Peer, reply: HelloReply) -> None:
        peer.hello = reply
        if self.quorum is not None:
            return
        peers = [p for p in self._peers if p is not None]
        if any(p.hello is None for p in peers):
            return
        knew = max(p.hello.knew_you for p in peers if p.hello is not None)
        wiped = knew > 0
        self.incarnation = knew + 1 if wiped else 1
        self._checkpoint(durable=True)
        with self.store.write() as batch:
            batch.set_incarnation(self.incarnation)
        if wiped:
            log.warning("node %s: peers knew life %d of this node and its data directory is "
                        "new: the disk was lost; rebuilding as life %d", self.name, knew,
                        self.incarnation)
            for p in peers:
                p.cursor, p.incarnation = 0, 0
                self._start_snapshot(p)
        self._start_quorum(rebuilding=wiped)

    # --- the I/O edge -------------------------------------------------------------------------
    def serve(self) -> None:
        context = node_context()
        router = bind_router(context, self.replica.address)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        for index, name, address in self._pending_peers:
            socket = node_socket(context, zmq.DEALER)
            socket.connect(address)
            peer = _Peer(index, name, address, socket)
            saved = self._saved_cursors.get(index)
            if saved:
                peer.incarnation, peer.cursor = saved[0], saved[1]
                peer.saved = peer.durable = (saved[0], saved[1])
            self._peers[index] = peer
            poller.register(socket, zmq.POLLIN)
            half = self._half_installed.get(index)
            if half:
                log.warning("node %s: a copy from %s stopped with %s half installed: "
                            "copying from %s again before serving", self.name, name,
                            ", ".join(repr(k) for k in sorted(half)), name)
                self._start_snapshot(peer, repair=half)
        self.router = router
        log.info("node %s (group %s, replica %d of %d, campus %s) serving on %s, data %s, "
                 "binlog lsn %d..%d, %d key states held (replayed from lsn %d)", self.name,
                 self.group.name, self.index, self.replicas, self.replica.campus,
                 self.replica.address, self.store.path, self.store.first_lsn,
                 self.store.last_lsn, self.store.deferred_keys, self.store.replay_from())
        peers_by_socket = {p.socket: p for p in self._peers if p is not None}
        wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        poller.register(wake, zmq.POLLIN)
        self.votes.start(wake)
        self._committer.wake_fd = wake
        send_fn = libzmq_send()
        for linked in peers_by_socket.values() if send_fn else ():
            self._hand_vote_socket(context, linked, send_fn)
        clean = False
        try:
            busy = False
            while not self.stopping:
                if time.monotonic() >= self._next_client_sweep:
                    self.sweep_idle_clients()
                timeout = 0 if busy else self._poll_timeout_ms()
                events = dict(poller.poll(timeout))
                if events and not busy and self._round_at - self._voted_at < YIELD_AFTER_VOTE_S:
                    # Woken while writes are in flight: the threads already waiting for this
                    # core (ZeroMQ's I/O thread, the sync thread, the other nodes) go first,
                    # and what they deliver meanwhile joins this round. Under the put load:
                    # 15% fewer rounds and 8% fewer syncs per put, +3-4% puts/s for one
                    # yield, about 4% more for a second. Not for reads alone: a read-only
                    # load lost 3-9% (each round is cheap there).
                    for _ in range(WAKE_YIELDS):
                        os.sched_yield()
                    events = dict(poller.poll(0))
                if wake in events:   # a sync or a commit ended (or failed: the node stops)
                    with suppress(BlockingIOError):
                        os.eventfd_read(wake)
                    self.votes.check()
                    self._finish_commit(block=False)   # (may make more frames durable)
                    self._release_held(time.monotonic())
                inbound: list[list[bytes]] = []
                replies: list[tuple[_Peer, bytes]] = []
                if router in events:
                    while len(inbound) < ROUND_MAX_MESSAGES:
                        try:
                            inbound.append(router.recv_multipart(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                for socket, peer in peers_by_socket.items():
                    if socket in events:
                        while len(replies) < ROUND_MAX_MESSAGES:
                            try:
                                replies.extend((peer, part) for part in
                                               socket.recv_multipart(zmq.NOBLOCK))
                            except zmq.Again:
                                break
                now = time.monotonic()
                if not busy and not inbound and not replies and len(events) == 1 \
                        and wake in events and not self._round_due(now):
                    continue   # a sync ended and its messages went out: nothing else to do
                busy = self.round(inbound, replies, now)
            clean = True
        finally:
            if clean:
                # A clean stop leaves nothing to replay.
                self._checkpoint(durable=True, all_held=True)
                self._answer_waiting_on_stop()
                self._flush_clients()   # (and local reads that waited for the checkpoint)
            else:
                # A failed round: the vote log has what counts.
                with suppress(Exception):
                    self._committer.finish(block=True)
                if self._batch is not None:
                    with suppress(Exception):
                        self._committer.abort(self._batch)
                    self._batch = None
            self._committer.close()
            self.votes.close()   # (the sync thread uses the vote sockets until it returns)
            os.close(wake)
            for link in self._peers:
                if link is not None:
                    link.socket.close()
                    if link.vote_socket is not None:
                        link.vote_socket.close()
            router.close()
            context.term()
            self.store.close()
            log.info("node %s stopped", self.name)

    def _hand_vote_socket(self, context: zmq.Context, peer: _Peer, send_fn: int) -> None:
        """A socket to `peer` of the sync thread's own: the quorum messages that wait for a
        vote log sync leave from it the moment the sync ends (see kvsvr/_syncer.pyx)."""
        socket = node_socket(context, zmq.DEALER)
        socket.connect(peer.address)
        slot = self.votes.add_sender(send_fn, socket.underlying)
        if slot is None:
            socket.close()
            return
        peer.vote_socket, peer.vote_slot = socket, slot

    def _round_due(self, now: float) -> bool:
        """Whether a round has work beyond sending what a sync released."""
        return bool(self._dirty or self._apply_later or self._pulled or self._pages
                    or self._outbox or self._want_barrier) \
            or now - self._round_at >= ROUND_WAKE_ONLY_MAX_S

    def _poll_timeout_ms(self) -> int:
        due = []
        if self._delayed:
            due.append(self._delayed[0][0])
        if self._batch is not None:
            due.append(self._batch_opened + self._checkpoint_s)
        if not due:
            return IDLE_POLL_MS
        return max(0, min(IDLE_POLL_MS, int((min(due) - time.monotonic()) * 1000) + 1))

    def _send_peer(self, peer: _Peer, frames: list[bytes], now: float) -> None:
        """Through the fault hook: dropped, held back, or sent now."""
        if peer.drop and self._random.random() < peer.drop:
            self.counters["fault_dropped"] += 1
            return
        if peer.delay_ms:
            due = now + self._random.uniform(0, peer.delay_ms / 1000)
            heapq.heappush(self._delayed, (due, next(self._delayed_seq), peer.index, frames))
            return
        self._send_now(peer, frames)

    def _send_now(self, peer: _Peer, frames: list[bytes]) -> None:
        for message in protocol.pack(frames):
            try:
                peer.socket.send(message, zmq.NOBLOCK)
            except zmq.Again:
                self.counters["peer_sends_dropped"] += 1  # its queue is full: it is behind

    def _send_votes(self, peer: _Peer, frames: list[bytes], now: float) -> None:
        """Quorum messages: sent once every vote log frame holding votes written so far is
        durable (any of them may hold the vote they reveal), else held until the sync thread
        says so."""
        if peer.vote_slot >= 0 and not peer.drop and not peer.delay_ms:
            # The sync thread sends them as its fdatasync ends: the loop may be mid-round.
            for message in protocol.pack(frames):
                self.votes.send_after(self._vote_gate, peer.vote_slot, message)
        elif self._held or self.votes.synced < self._vote_gate:
            self._held.append((self._vote_gate, peer, frames))
        else:
            self._send_peer(peer, frames, now)

    def _wake_on_sync(self, on: bool) -> None:
        if on != self._sync_wakes:
            self._sync_wakes = on
            self.votes.wake_on_sync(on)

    def _release_held(self, now: float) -> None:
        """Send the quorum messages whose vote log frames are durable now."""
        held = self._held
        if not held:
            return
        synced = self.votes.synced
        if held[0][0] > synced:
            return
        # One message per peer for everything released (a send wakes ZeroMQ's I/O thread).
        ready: dict[int, tuple[_Peer, list[bytes]]] = {}
        while held and held[0][0] <= synced:
            _, peer, frames = held.popleft()
            entry = ready.get(peer.index)
            if entry is None:
                ready[peer.index] = (peer, frames)
            else:
                entry[1].extend(frames)
        for peer, frames in ready.values():
            self._send_peer(peer, frames, now)

    def _release_delayed(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            _, _, index, frames = heapq.heappop(self._delayed)
            peer = self._peers[index]
            if peer is not None:
                self._send_now(peer, frames)

    def _answer(self, identity: bytes, frame: bytes) -> None:
        self._outbox.setdefault(identity, []).append(frame)

    def _answer_ok(self, waiter: _Waiter, result: Any) -> None:
        self.observe_latency(time.monotonic() - waiter.received)
        self._answer(waiter.identity,
                     _encode_frame(_RESPONSE, 0, waiter.request_id, 0, _encode(result)))

    def _answer_error(self, identity: bytes, request_id: int, error: KvError) -> None:
        self.counters[f"errors.{type(error).__name__}"] += 1
        self.monitor.add(monitor_ids.NODE_FAILURES, 1)
        self._answer(identity, _error_frame(request_id, error))

    def _flush_clients(self) -> None:
        """Send the answers to clients and to peers' requests. None waits for the vote log:
        they reveal chosen versions, checkpointed binlog, and at most that an instance is
        open (a version barrier then finishes it, which is safe whatever became of it)."""
        outbox, self._outbox = self._outbox, {}
        for identity, frames in outbox.items():
            for message in protocol.pack(frames):
                self.monitor.add(monitor_ids.NODE_BYTES_OUT, len(message))
                try:
                    self.router.send_multipart([identity, message], zmq.NOBLOCK)
                except zmq.Again:
                    self.counters["replies_dropped"] += 1

    # --- one round ----------------------------------------------------------------------------
    def round(self, inbound: list[list[bytes]], replies: list[tuple[_Peer, bytes]],
              now: float) -> bool:
        """Handle what arrived, move work on, commit, send. True if more work is ready."""
        self.counters["rounds"] += 1
        self._round_at = now
        if self._committing is not None:
            self._finish_commit(block=False)
        self._release_held(now)
        self._release_delayed(now)
        with self._view() as txn:
            for parts in inbound:
                for payload in parts[1:]:
                    self._inbound(parts[0], payload, txn, now)
        for peer, payload in replies:
            self._peer_reply(peer, payload, now)
        if self.quorum is None:
            self._hello(now)
        else:
            self._progress(now)
            if self._open_since and now - self._open_checked >= OPEN_CHECK_INTERVAL_S:
                self._recover_open(now)
            self.quorum.tick(now * 1000)
        self._persist_and_apply(now)
        self._update_role()
        if now - self._peers_watched >= 1.0:
            self._watch_peers(now)
        if self._want_barrier:
            self._send_barrier(now)
        self._resend_barriers(now)
        if self.quorum is not None:
            self._pull(now)  # catch-ups asked for this round leave now
        if now >= self._expire_at:
            self._expire_at = now + EXPIRE_INTERVAL_S
            self._expire(now)
        if self._sessions:
            self._expire_sessions(now)
        self._flush_clients()
        self._maybe_checkpoint(now)
        # A sync wakes this loop only while messages of its own wait for one (the sync
        # thread sends the rest): asked before the last look at what is durable, so a sync
        # ending after that look still wakes it.
        self._wake_on_sync(bool(self._held))
        self._release_held(now)
        if not self._held:
            self._wake_on_sync(False)
        # (Applies that wait for a commit under way are taken up when it wakes the loop.)
        return bool(self._dirty) or (self._committing is None
                                     and bool(self._pulled or self._apply_later))

    # --- the open LMDB transaction and its checkpoints ------------------------------------------
    def _view(self) -> _View:
        """A transaction to read in: the open write transaction (it sees every apply of this
        node), else a read transaction."""
        return _View(self.store, self._batch)

    def _open_batch(self, now: float) -> WriteBatch:
        if self._batch is None:
            if self._committing is not None:
                raise RuntimeError("no write transaction while a checkpoint commits")
            self._batch = self._committer.begin()
            self._batch_opened = now
        return self._batch

    def _maybe_checkpoint(self, now: float) -> None:
        batch = self._batch
        if batch is not None and self._committing is None and (
                now - self._batch_opened >= self._checkpoint_s
                or batch.applied >= CHECKPOINT_MAX_APPLIED
                or self.votes.used > self.votes.size // 2):
            self._checkpoint(wait=False)
        elif batch is None and self._committing is None and self.store.deferred_keys \
                and now - self._commit_ended >= KEY_FLUSH_IDLE_S:
            # No write for a while: the held key states go to LMDB at once (and the binlog
            # records they needed may then be trimmed).
            self._checkpoint(wait=False, all_held=True)
        elif batch is None and self._committing is None and self._undurable is not None \
                and now - self._undurable[2] >= self._checkpoint_s:
            # Nothing more to commit: the last commit's meta page gets an fsync of its own
            # (on the committer's thread), or peers would never be told about its records.
            self._committing = _SYNCING
            self._committer.start_sync()

    def _checkpoint(self, wait: bool = True, durable: bool = False,
                    all_held: bool = False) -> None:
        """Commit the open transaction (fsync): the vote log frames so far are in it. With
        `wait` false the commit runs on the committer's thread while the loop goes on, and
        _finish_commit takes its end. `durable`: also sync it (one more fsync, on the loop)
        for what must not wait for the next commit: see _make_durable. `all_held`: with
        every held key state, not just the sweep's next key range (see Store)."""
        self._finish_commit(block=True)
        if all_held and self.store.deferred_keys:
            self._open_batch(time.monotonic()).flush_all_key_states()
        batch, self._batch = self._batch, None
        if batch is None:
            if durable:
                self._make_durable()   # (the last commit may still wait for its meta sync)
            return
        if self._logged:
            # The instances still open: once this commits, the log's room holding their
            # records is reused.
            batch.persist_quorum(list(self._logged.values()))
            self._in_lmdb.update(self._logged)
            self._logged = {}
        through, start = self.votes.mark()
        batch.set_meta_u64s(b"votes/through", through, start)
        # A key range's held states go to LMDB with each checkpoint (see Store).
        batch.flush_key_states(self._checkpoint_s / KEY_FLUSH_CYCLE_S)
        batch.seal()   # (here: the commit runs on the committer's thread)
        cursors = {p.index: p.saved for p in self._peers if p is not None}
        self._committing = (through, cursors)
        self._frozen, self._batch_keys = self._batch_keys, {}
        self._frozen_ops, self._batch_ops = self._batch_ops, set()
        self._committer.start_commit(batch)
        if wait:
            self._finish_commit(block=True)
        if durable:
            self._make_durable()

    def _make_durable(self) -> None:
        """Every checkpoint committed so far durable now (the store defers each commit's
        meta page sync to the next commit): before the vote log must have room at once,
        before a snapshot is read for a peer, and for fences, rebuild markers and snapshot
        pages, which count only once durable."""
        self._finish_commit(block=True)
        if self._undurable is not None:
            self.store.sync()
            self._release_durable()

    def _release_durable(self) -> None:
        """The checkpoint waiting for its meta page sync counts once the store says it is
        durable (at once for a store that syncs every commit)."""
        if self._undurable is not None and not self.store.meta_sync_pending:
            undurable, self._undurable = self._undurable, None
            self._checkpoint_durable(undurable[0], undurable[1])

    def _checkpoint_durable(self, through: int, cursors: dict[int, tuple[int, int]]) -> None:
        """A checkpoint is durable: the vote log frames it covers are free, and the cursors
        in it are what peers may trim their binlog by."""
        self.votes.checkpointed(through)
        for peer in self._peers:
            if peer is not None and peer.index in cursors:
                peer.durable = cursors[peer.index]

    def _finish_commit(self, block: bool) -> None:
        """Take the end of the checkpoint under commit, if it has ended (or wait for it)."""
        committing = self._committing
        if committing is None:
            return
        try:
            if not self._committer.finish(block):
                return
        except StorageFull as e:
            self._committing = None
            self._stop_storage_full(e)
        self._committing = None
        self._commit_ended = time.monotonic()
        if committing is not _SYNCING:
            self.store.commit_seen()   # (held key states it took are in LMDB for readers)
            # Its fsync made the checkpoint before it durable (a store deferring meta page
            # syncs); itself, only if the store syncs every commit.
            previous = self._undurable
            self._undurable = (committing[0], committing[1], self._commit_ended)
            if previous is not None:
                self._checkpoint_durable(previous[0], previous[1])
        self._release_durable()
        self._frozen = {}
        self._frozen_ops = set()
        if self._thaw:
            self._dirty |= self._thaw
            self._thaw = set()
        if self._local_later:
            later, self._local_later = self._local_later, []
            with self._view() as txn:
                for identity, request_id, method, request in later:
                    try:
                        self._answer(identity, _encode_frame(
                            _RESPONSE, 0, request_id, 0,
                            _encode(self._read(method, request, txn))))
                    except KvError as e:
                        self._answer_error(identity, request_id, e)
                    except Exception:  # as in _inbound: a bug costs one request
                        log.exception("request %d (method %d) failed", request_id, method)
                        self._answer_error(identity, request_id, Internal("internal error"))
        if committing is _SYNCING:
            self.counters["meta_syncs"] += 1
            return
        self.counters["group_commits"] += 1
        self.counters["group_commit_us"] += self._committer.last_commit_us
        self.monitor.add(monitor_ids.NODE_GROUP_COMMITS, 1)

    def _stop_storage_full(self, error: StorageFull) -> NoReturn:
        """LMDB cannot take more: every waiting write is answered with why, and the node
        stops (a restart after room is made replays the vote log)."""
        log.error("node %s: %s", self.name, error)
        self._fail_all_writes(error)
        raise SystemExit(1) from None

    def _applied(self, txn: Any, key: bytes) -> int:
        """The key's applied version (a read transaction does not see a commit under way)."""
        version = self._frozen.get(key)
        return self._latest(txn, key).version if version is None else version

    def _latest(self, txn: Any, key: bytes) -> KeyState:
        """Store.latest; read in the open write transaction (always current), the state is
        also kept in memory, where the apply that usually follows finds it."""
        batch = self._batch
        if batch is not None and txn is batch.txn:
            return batch.latest(key)
        return self.store.latest(txn, key)

    def sweep_idle_clients(self) -> None:
        """In the open transaction, committed by the next checkpoint. (A transaction of its
        own made the loop wait for the commit under way and commit the open one first,
        answering nothing meanwhile, every minute: seconds on a slow disk.) While a commit
        is under way there is no open transaction: the sweep stays due."""
        if self._committing is not None or self.quorum is None:
            return
        self._next_client_sweep = time.monotonic() + CLIENT_SWEEP_INTERVAL_S
        try:
            batch = self._open_batch(time.monotonic())
            self._client_sweep_from = batch.forget_idle_clients(start=self._client_sweep_from)
        except Exception:  # housekeeping must never take the node down (as in Node)
            log.exception("node %s: sweeping idle clients failed", self.name)

    def _inbound(self, identity: bytes, payload: bytes, txn: Any, now: float) -> None:
        self.monitor.add(monitor_ids.NODE_BYTES_IN, len(payload))
        frames, error, error_request_id = _core.decode_frames(payload)
        for kind, method, request_id, budget_ms, body in frames:
            try:
                if kind != _REQUEST:
                    raise InvalidArgument("frame.kind: a node only takes requests",
                                          field="frame.kind")
                if self._peer_auth is not None and method in protocol.PEER_METHODS:
                    try:
                        body = self._peer_auth.open(method, request_id, body)
                    except InvalidArgument:
                        self.counters["peer_auth_refused"] += 1
                        raise
                if method == Method.QUORUM:
                    self._on_quorum(protocol.decode_quorum(body), txn, now)
                    continue
                request = protocol.decode_request(method, body)
                self.counters[_METHOD_COUNTER[method]] += 1
                if method in protocol.PEER_METHODS:
                    self._answer(identity, _encode_frame(
                        _RESPONSE, 0, request_id, 0,
                        _encode(self._peer_request(method, request, txn, now))))
                    continue
                self.monitor.add(monitor_ids.NODE_REQUESTS, 1)  # clients' requests only
                self._client_request(identity, request_id, method, request,
                                     now + min(budget_ms / 1000 or REQUEST_WAIT_MAX_S,
                                               REQUEST_WAIT_MAX_S), txn)
            except KvError as e:
                self._answer_error(identity, request_id, e)
            except Exception:  # a bug must cost one request, never the node
                log.exception("request %d (method %d) failed", request_id, method)
                self._answer_error(identity, request_id, Internal("internal error"))
        if error is not None:
            self.counters["bad_frames"] += 1
            self.monitor.add(monitor_ids.NODE_BAD_FRAMES, 1)
            self._answer_error(identity, error_request_id, InvalidArgument(error, field="frame"))

    # --- peers' requests and answers ------------------------------------------------------------
    def _on_quorum(self, messages: list[_core.Message], txn: Any, now: float) -> None:
        quorum = self.quorum
        if quorum is None:
            return  # joining: no acceptor state yet, and no vote to give
        # (The floor counts only for requests and choices: see "Floors" in the core, where
        # the loop over a frame's messages runs: 0.3 of the 3.6 us a message took here.)
        misaddressed, heard, follow_up = quorum.step_all(
            messages, now, self._frozen, self.store.kept_states,
            lambda key: self._applied(txn, key), self.voting)
        if misaddressed:
            self.counters["quorum_misaddressed"] += misaddressed
        if heard:
            for peer in self._peers:
                if peer is not None and heard >> peer.index & 1:
                    peer.heard_at = now
        for message in follow_up:
            if message.kind == _core.MSG_STATE:
                # Where the peer's binlog stood when it answered: data to catch up to.
                # The highest answer counts: a duplicate or reordered older one must not lower
                # the target below what a merged answer's sender had forgotten.
                self._rebuild_targets[message.source] = max(
                    message.version, self._rebuild_targets.get(message.source, 0))
                continue
            work = self._work.get(message.key)   # BEHIND: a peer applied further
            if work is not None:
                work.need_floor = max(work.need_floor, message.accepted_ballot)
                self._dirty.add(message.key)
            peer = self._peers[message.source]
            if peer is not None:
                peer.next_pull, peer.pull_idle_s = 0.0, PULL_IDLE_INTERVAL_S  # ask now

    def _peer_request(self, method: int, request: Any, txn: Any, now: float) -> Any:
        if method == Method.VERSIONS:
            if self.quorum is None or not self.voting:
                raise Unavailable(f"node {self.name} is {self.role}: its versions do not count")
            quorum, applied = self.quorum, self._applied
            return VersionsReply([KeyVersions(applied(txn, key), quorum.highest_open(key))
                                  for key in request.keys])
        if method == Method.PULL:
            peer = self._peers[request.source] if request.source < self.replicas else None
            if peer is None:
                raise InvalidArgument(f"source: {request.source} is not a peer of this node",
                                      field="source")
            store = self.store
            if request.incarnation == self.incarnation:
                through = request.from_lsn - 1
                if request.durable_through is not None:
                    through = min(through, request.durable_through)
                # No puller holds more than this node ever made pullable: a cursor past it
                # (a bug or a forged pull) must not let records it never had be trimmed.
                through = min(through, store.durable_last_lsn)
                peer.has_through = max(peer.has_through, through)
            # Only what a checkpoint made durable: a record lost in a crash of this node
            # would otherwise live on in a peer, and its LSN be reused for another. (A read
            # transaction also sees the last commit, durable only once the next one ends.)
            durable = store.durable_last_lsn - request.from_lsn + 1
            records = store.binlog_raw(request.from_lsn, min(request.max_records, durable),
                                       PULL_MAX_BYTES) \
                if request.from_lsn >= store.durable_first_lsn and durable > 0 else []
            return PullReply(self.incarnation, store.durable_first_lsn, store.durable_last_lsn,
                             records)
        if method == Method.HELLO:
            if not 0 <= request.source < self.replicas or request.source == self.index:
                raise InvalidArgument(f"source: {request.source} is not a peer of this node",
                                      field="source")
            knew = self._fence_of(request.source)
            return HelloReply(self.incarnation, knew, self.store.durable_first_lsn,
                              self.store.durable_last_lsn)
        if method == Method.SNAPSHOT:
            if not 0 <= request.source < self.replicas or request.source == self.index:
                raise InvalidArgument(f"source: {request.source} is not a peer of this node",
                                      field="source")
            return self._serve_snapshot(request, now)
        raise InvalidArgument(f"method: {method} is not a peer request", field="method")

    def _fence_of(self, peer: int) -> int:
        """The highest life of `peer` this node has heard from (persisted as fences)."""
        fences = self.store.meta_u64s(b"quorum/fence/" + bytes([peer]))
        return max((v[0] for v in fences.values()), default=0)

    def _peer_reply(self, peer: _Peer, payload: bytes, now: float) -> None:
        frames, _error, _ = _core.decode_frames(payload)
        for _kind, status, request_id, _budget, body in frames:
            peer.heard_at = now
            method, tag = request_id >> 32, request_id & 0xFFFFFFFF  # see _peer_request_id
            if method in (Method.PULL, Method.SNAPSHOT):
                if tag != peer.pull_tag:
                    continue  # an answer to a pull given up on (resent or superseded)
                peer.pull_timeout_s = PULL_TIMEOUT_S
            if status != protocol.OK:
                if method in (Method.PULL, Method.SNAPSHOT):
                    peer.pull_sent_at = 0.0
                    peer.next_pull = now + PULL_IDLE_INTERVAL_S
                    if method == Method.SNAPSHOT and peer.snapshot is not None:
                        self._start_snapshot(peer)  # its session is gone: from the start
                        peer.next_pull = now + HELLO_RESEND_S
                continue  # a refused barrier: another peer answers, or it is asked again
            try:
                if method == Method.PULL:
                    self._on_pull_reply(peer, _pull_reply_decoder.decode(body), now)
                elif method == Method.VERSIONS:
                    barrier = self._barriers.get(tag)
                    if barrier is not None:
                        reply = _versions_reply_decoder.decode(body)
                        if len(reply.versions) == len(barrier.keys):
                            barrier.answers[peer.index] = reply.versions
                            self._check_barrier(tag, barrier)
                elif method == Method.HELLO:
                    self._on_hello_reply(peer, _hello_reply_decoder.decode(body))
                elif method == Method.SNAPSHOT:
                    self._on_snapshot_reply(peer, _snapshot_reply_decoder.decode(body), now)
            except msgspec.DecodeError as e:
                self.counters["bad_peer_replies"] += 1
                log.warning("node %s: unreadable answer from %s: %s", self.name, peer.name, e)

    def _peer_frame(self, method: int, request_id: int, body: bytes) -> bytes:
        """A request frame to a peer, sealed with the peer secret if there is one."""
        if self._peer_auth is not None:
            body = self._peer_auth.seal(method, request_id, body)
        return _encode_frame(_REQUEST, method, request_id, 0, body)

    @staticmethod
    def _peer_request_id(method: int, tag: int = 0) -> int:
        """Our requests to peers carry their method in the id's high half, so an answer says
        what it answers (a tag, e.g. the barrier, in the low half)."""
        return (method << 32) | tag

    def _hello(self, now: float) -> None:
        if now - self._hello_sent < HELLO_RESEND_S:
            return
        if not self._hello_sent:
            self._joining_since = self._joining_logged = now
        self._hello_sent = now
        silent = [p.name for p in self._peers if p is not None and p.hello is None]
        if now - self._joining_logged >= JOINING_LOG_S:
            self._joining_logged = now
            log.warning("node %s: joining group %s: a new data directory votes only after "
                        "every peer has said whether it knew an earlier life of it; waiting "
                        "for %s (%.0f s so far)", self.name, self.group.name,
                        ", ".join(silent), now - self._joining_since)
        for peer in self._peers:
            if peer is not None and peer.hello is None:
                self._send_peer(peer, [self._peer_frame(
                    Method.HELLO, self._peer_request_id(Method.HELLO),
                    _encode(HelloRequest(self.index)))], now)

    # --- the binlog stream ------------------------------------------------------------------------
    def _pull(self, now: float) -> None:
        if self._committing is not None:
            return  # the cursors cannot move until it ends: a pull now would fetch the same
        waiting = {id(p) for p, _, _ in self._pulled} if self._pulled else set()
        for peer in self._peers:
            if peer is None or id(peer) in waiting:
                continue
            if peer.pull_sent_at and now - peer.pull_sent_at < peer.pull_timeout_s:
                continue
            if peer.snapshot is None and self._copying():
                continue  # its stream waits until every copy is complete
            if not peer.pull_sent_at and now < peer.next_pull:
                continue
            if peer.pull_sent_at:
                # Sent again: the unanswered one's answer, if it comes, is now dropped as
                # stale, so a peer slower than a fixed timeout would never get one through.
                peer.pull_timeout_s = min(peer.pull_timeout_s * 2, PULL_TIMEOUT_MAX_S)
            peer.pull_sent_at = now
            peer.pull_tag = (peer.pull_tag + 1) & 0xFFFFFFFF
            if peer.snapshot is not None:
                self._send_peer(peer, [self._peer_frame(
                    Method.SNAPSHOT, self._peer_request_id(Method.SNAPSHOT, peer.pull_tag),
                    _encode(SnapshotRequest(self.index, peer.snapshot["session"],
                                            peer.snapshot["after"], SNAPSHOT_PAGE_BYTES)))],
                    now)
                continue
            peer.pull_from = peer.cursor + 1
            life, durable = peer.durable
            self._send_peer(peer, [self._peer_frame(
                Method.PULL, self._peer_request_id(Method.PULL, peer.pull_tag),
                _encode(PullRequest(self.index, peer.pull_from, peer.incarnation,
                                    PULL_MAX_RECORDS,
                                    durable if life == peer.incarnation else 0)))], now)

    def _start_snapshot(self, peer: _Peer, repair: set[bytes] | None = None) -> None:
        # "key": the key of the last key item installed ("installing" says whether it is
        # being replaced); "repair": keys half installed by an earlier copy (before a
        # restart, or this copy's lost session), replaced even by their own version.
        repair = set(repair or ())
        old = peer.snapshot
        if old is not None:
            repair |= old["repair"]
            if old["installing"] and old["key"] is not None:
                repair.add(old["key"])
        peer.snapshot = {"session": 0, "after": None, "installing": False, "key": None,
                         "repair": repair}
        peer.pull_sent_at = 0.0
        peer.next_pull = 0.0

    def _on_snapshot_reply(self, peer: _Peer, reply: SnapshotReply, now: float) -> None:
        peer.pull_sent_at = 0.0
        peer.next_pull = now
        if peer.snapshot is not None:
            self._pages.append((peer, reply, peer.snapshot))

    def _serve_snapshot(self, request: SnapshotRequest, now: float) -> SnapshotReply:
        session = self._sessions.get(request.session) if request.session else None
        if request.session and session is None:
            raise Unavailable(f"snapshot session {request.session} is gone; start again",
                              field="session")
        if session is None:
            if len(self._sessions) >= SNAPSHOT_SESSIONS_MAX:
                raise Unavailable(f"node {self.name} already serves "
                                  f"{SNAPSHOT_SESSIONS_MAX} snapshots", field="session")
            # The copy says from which of our LSNs the peer goes on: they must never be
            # lost (after a power cut they would be reused for other records).
            self._make_durable()
            txn = self.store.read()
            session = [txn, self.store.snapshot_lsn(txn), now]
            request_session = secrets.randbits(48) | 1
            self._sessions[request_session] = session
            log.info("node %s: snapshot %x for replica %d from lsn %d", self.name,
                     request_session, request.source, session[1])
        else:
            request_session = request.session
        session[2] = now
        after = request.after
        position = (after.db, after.key, after.row) if after is not None else None
        items, following = self.store.snapshot_page(session[0], position,
                                                    min(request.max_bytes, SNAPSHOT_PAGE_BYTES))
        if following is None:
            session[0].abort()
            del self._sessions[request_session]
        return SnapshotReply(
            request_session, self.incarnation, session[1],
            [protocol.SnapshotItem(*item) for item in items],
            SnapshotPosition(*following) if following is not None else None)

    def _expire_sessions(self, now: float) -> None:
        for session_id, session in list(self._sessions.items()):
            if now - session[2] > SNAPSHOT_IDLE_S:
                session[0].abort()
                del self._sessions[session_id]
                log.warning("node %s: snapshot %x abandoned by its reader", self.name,
                            session_id)

    def _on_pull_reply(self, peer: _Peer, reply: PullReply, now: float) -> None:
        peer.pull_sent_at = 0.0
        peer.pulled = True
        peer.first_lsn, peer.last_lsn = reply.first_lsn, reply.last_lsn
        if reply.incarnation != peer.incarnation:
            if peer.incarnation:
                log.warning("node %s: peer %s is in life %d now (was %d): reading its binlog "
                            "from the start", self.name, peer.name, reply.incarnation,
                            peer.incarnation)
            # A life we never read (its new one, or the first we hear of when none was saved):
            # we hold none of its records, so read it from its first. If it trimmed some
            # already, the next answer starts past our cursor and we copy a snapshot; going
            # on from its first kept record instead would skip the trimmed ones for good
            # (a key's later version shows a gap, but a key written only there never would).
            peer.incarnation, peer.cursor = reply.incarnation, 0
            peer.next_pull = 0.0
            self._pulled.append((peer, peer.cursor, []))  # persists the reset cursor
            return
        if peer.cursor > reply.last_lsn:
            # Past the end of its binlog: it cannot have moved back in the same life unless its
            # disk did (a restored copy). Read again what it keeps; applies skip what we have.
            self.counters["pull_cursor_resets"] += 1
            log.error("node %s: cursor %d on %s is past its last lsn %d; reading it again from "
                      "%d", self.name, peer.cursor, peer.name, reply.last_lsn, reply.first_lsn)
            peer.cursor = max(0, reply.first_lsn - 1)
            peer.next_pull = 0.0
            self._pulled.append((peer, peer.cursor, []))
            return
        if peer.gap_since and now - peer.gap_since > GAP_SNAPSHOT_AFTER_S:
            log.warning("node %s: the stream from %s has waited %.0f s at a gap at lsn %d "
                        "that no other stream filled: copying a snapshot from it", self.name,
                        peer.name, now - peer.gap_since, peer.cursor + 1)
            peer.gap_since = 0.0
            self.counters["gap_snapshots"] += 1
            self._start_snapshot(peer)
            return
        # The records start where the request asked, which is where the cursor stood then; if
        # it has moved since, _apply_pulled drops them (they would land at the wrong place).
        base = peer.pull_from - 1
        if base + 1 < reply.first_lsn:
            log.warning("node %s: peer %s trimmed its binlog past what this node has (it "
                        "keeps %d.., this node needs %d): copying a snapshot from it",
                        self.name, peer.name, reply.first_lsn, base + 1)
            peer.trimmed_past_us = True
            self._start_snapshot(peer)
            return
        # Far behind: ask again at once; else the quorum carries most data and the stream
        # only mends what it missed, so it need not be asked every round.
        full = len(reply.records) >= PULL_MAX_RECORDS // 2
        # An idle group would otherwise trade a pull and its answer per peer every 20 ms (a
        # few percent of a core per node); what needs data sooner asks at once (_pull_soon).
        peer.pull_idle_s = PULL_IDLE_INTERVAL_S if reply.records \
            else min(peer.pull_idle_s * 2, PULL_IDLE_INTERVAL_MAX_S)
        # The gauge shows the most a stream was behind in the second, not where it stands at
        # the moment it is set: a catch-up is over in milliseconds, and would show as 0.
        self._lag_peak = max(self._lag_peak, reply.last_lsn - base)
        peer.next_pull = now if full else now + peer.pull_idle_s
        if reply.records:
            self._pulled.append((peer, base, reply.records))

    # --- client requests ----------------------------------------------------------------------
    def _client_request(self, identity: bytes, request_id: int, method: int, request: Any,
                        deadline: float, txn: Any) -> None:
        if method in (Method.PING, Method.STATUS):
            self._answer(identity, _encode_frame(_RESPONSE, 0, request_id, 0,
                                                 _encode(self._read(method, request, txn))))
            return
        if method == Method.FAULTS:
            self._answer(identity, _encode_frame(_RESPONSE, 0, request_id, 0,
                                                 _encode(self._set_faults(request))))
            return
        key = request.key
        self.check_owned(key)
        if not self.voting:
            raise Unavailable(f"node {self.name} is {self.role}; try another replica",
                              field="node")
        if (method == Method.MUTATE or request.consistency != CONSISTENCY_LOCAL) \
                and not self._majority_heard(time.monotonic()):
            # Said at once, and true (nothing was proposed): waiting out the deadline ended
            # in an ambiguous Timeout, and the write went on once the peers came back.
            silent = [p.name for p in self._peers if p is not None
                      and not (p.heard_at and time.monotonic() - p.heard_at < PEER_DOWN_AFTER_S)]
            raise Unavailable(
                f"node {self.name}: no majority of group {self.group.name} is reachable "
                f"({', '.join(silent)} silent for over {PEER_DOWN_AFTER_S:g} s)",
                field="node")
        if method in _READS:
            if request.consistency == CONSISTENCY_LOCAL:
                if key in self._frozen:
                    # Its newest version is in the commit under way: answered when it ends,
                    # so a local read never goes back behind one this node gave before.
                    self._local_later.append((identity, request_id, method, request))
                    return
                self._answer(identity, _encode_frame(_RESPONSE, 0, request_id, 0,
                                                     _encode(self._read(method, request, txn))))
                return
            waiter = _Waiter(identity, request_id, method, request, deadline)
            work = self._work.get(key)
            if work is None:
                work = self._work[key] = _KeyWork()
            work.reads.append(waiter)
            self._await_barrier(key, waiter)
            return
        if method != Method.MUTATE:
            raise InvalidArgument(f"method: {method} is not served here", field="method")
        if not request.client_id:
            request = msgspec.structs.replace(request, client_id=self._anonymous_client,
                                              client_seq=next(self._anonymous_seq))
        work = self._work.get(key)
        if work is None:
            work = self._work[key] = _KeyWork()
        work.writes.append(_Waiter(identity, request_id, method, request, deadline))
        self._dirty.add(key)

    def _set_faults(self, request: Any) -> dict[str, Any]:
        targets = [p for p in self._peers if p is not None
                   and (not request.peer or p.name == request.peer)]
        if request.peer and not targets:
            raise InvalidArgument(f"peer: {request.peer!r} is not a peer of {self.name}",
                                  field="peer")
        for peer in targets:
            peer.drop, peer.delay_ms = request.drop, request.delay_ms
        log.warning("node %s: faults on links to %s: drop %.2f, delay up to %d ms", self.name,
                    request.peer or "every peer", request.drop, request.delay_ms)
        if request.commit_delay_ms or self._committer.delay_s:
            log.warning("node %s: slow disk: each checkpoint commit waits %d ms first",
                        self.name, request.commit_delay_ms)
        self._committer.delay_s = request.commit_delay_ms / 1000
        return {p.name: {"drop": p.drop, "delay_ms": p.delay_ms}
                for p in self._peers if p is not None}

    # --- moving work on -----------------------------------------------------------------------
    def _progress(self, now: float) -> None:
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        frozen, later = self._frozen, self._apply_later
        with self._view() as txn:
            for key in dirty:
                work = self._work.get(key)
                if work is None:
                    continue
                if not work.writes and not work.reads:
                    del self._work[key]
                    continue
                if key in later:
                    self._thaw.add(key)   # its chosen versions wait for the commit under way
                    self.counters["work_held_by_checkpoint"] += 1
                    continue
                if key in frozen:
                    # Its state is in the commit under way: reads wait for it, writes go on
                    # from the state kept in memory when that is safe.
                    writable = bool(work.writes) and self._writable_frozen(key, work)
                    if work.reads or not writable:
                        self._thaw.add(key)
                    if not writable:
                        self.counters["work_held_by_checkpoint"] += 1
                        continue
                    self.counters["writes_through_checkpoint"] += 1
                    self._progress_write(key, work, frozen[key], txn, now)
                    if not work.writes and not work.reads:
                        del self._work[key]
                    continue
                floor = self._latest(txn, key).version
                if work.writes:
                    self._progress_write(key, work, floor, txn, now)
                if work.reads:
                    self._progress_reads(key, work, floor, now)
                if not work.writes and not work.reads:
                    del self._work[key]

    def _writable_frozen(self, key: bytes, work: _KeyWork) -> bool:
        """Whether writes to a key the commit under way holds can be proposed now: its newest
        state is kept in memory (a read transaction has an older one), and no waiting write
        is a retry of an op the commit holds (its first answer is in there)."""
        state = self.store.cached_state(key)
        ops = self._frozen_ops
        if state is None or state.version != self._frozen[key] or ops is None:
            return False
        return not any((w.request.client_id, w.request.client_seq) in ops
                       for w in work.writes)

    def _progress_reads(self, key: bytes, work: _KeyWork, floor: int, now: float) -> None:
        """Reads whose barrier answered: serve, catch up, or finish an open instance."""
        quorum = self.quorum
        assert quorum is not None
        waiting = []
        answer = []
        # A read waits for writes to its key that arrived before it (pipelined after them),
        # so a client sees its own writes in the order it sent them.
        write_arrival = work.writes[0].arrival if work.writes else 0
        for waiter in work.reads:
            if write_arrival and write_arrival < waiter.arrival:
                waiting.append(waiter)
            elif waiter.barrier or waiter.target < 0:
                waiting.append(waiter)          # its barrier has not answered yet
            elif floor < waiter.target:
                waiting.append(waiter)          # a majority applied more: the stream brings it
                self._pull_soon()
            elif waiter.open > floor:
                # Maybe chosen, not applied anywhere we asked: finish it, then ask again.
                waiting.append(waiter)
                if not quorum.proposing(key, floor + 1) and not work.writes:
                    quorum.propose(key, floor + 1, None, now * 1000, recover=True)
                    self.counters["read_recoveries"] += 1
                self._await_barrier(key, waiter)
            else:
                answer.append(waiter)
        work.reads = waiting
        if answer:
            with self._view() as txn:
                for waiter in answer:
                    try:
                        self._answer_ok(waiter, self._read(waiter.method, waiter.request, txn))
                    except KvError as e:
                        self._answer_error(waiter.identity, waiter.request_id, e)

    def _pull_soon(self) -> None:
        for peer in self._peers:
            if peer is not None:
                peer.pull_idle_s = PULL_IDLE_INTERVAL_S   # (what it waits for may be due soon)
                if not peer.pull_sent_at:
                    peer.next_pull = 0.0

    def _progress_write(self, key: bytes, work: _KeyWork, floor: int, txn: Any,
                        now: float) -> None:
        """The head write of a key: answer it if it is done or doomed, else propose it."""
        quorum = self.quorum
        assert quorum is not None
        while work.writes:
            waiter = work.writes[0]
            request: MutateRequest = waiter.request
            if waiter.proposed:
                return  # in flight, or decided and not yet applied (see _after_commit)
            try:
                reply = self.store.remembered(txn, key, request.ops, request.client_id,
                                              request.client_seq)
                if reply is not None:
                    work.writes.popleft()
                    self._answer_ok(waiter, reply)
                    self.counters["mutations_acknowledged"] += 1
                    continue
                if floor < work.need_floor:
                    self._pull_soon()
                    return  # a peer is ahead: catch up before proposing
                if waiter.barrier:
                    return  # a barrier is wanted or under way
                if waiter.target >= 0 and not self._barrier_settled(key, waiter, floor, now):
                    return
                state = self._latest(txn, key)
                expected = request.expected_version
                if expected is not None and expected != state.version:
                    # A conflict is sure once the key is past `expected`, but the version it
                    # reports must be current too: so only after a barrier.
                    if waiter.confirmed:
                        raise VersionConflict(
                            f"expected version {expected}, the key is at {state.version}",
                            field="expected_version", version=state.version)
                    self._await_barrier(key, waiter)
                    return
                ops = [(op.kind, op.row, op.value) for op in request.ops]
                try:
                    results = _plan(state, ops)[2]
                except KvError:
                    if waiter.confirmed:
                        raise
                    self._await_barrier(key, waiter)  # perhaps only this copy is stale
                    return
                value = _core.encode_record(0, state.version + 1, request.client_id,
                                            request.client_seq, key, ops)
                if quorum.proposing(key, state.version + 1):
                    return  # a recovery of that version runs: wait for it
                if not quorum.propose(key, state.version + 1, value, now * 1000):
                    raise Unavailable(f"node {self.name} cannot propose now ({self.role}, "
                                      f"{quorum.proposals_in_flight} proposals in flight)")
                waiter.proposed = state.version + 1
                # Chosen at this version, it applies to exactly this state: the answer is known.
                waiter.reply = MutateReply(state.version + 1, results)
                self.counters["proposals"] += 1
                return
            except KvError as e:
                work.writes.popleft()
                self._answer_error(waiter.identity, waiter.request_id, e)

    def _recover_open(self, now: float) -> None:
        """Finish instances accepted here long ago and still not known chosen (a prepare that
        adopts the highest accepted value, ours at least, so the instance always closes)."""
        self._open_checked = now
        quorum = self.quorum
        if quorum is None or not self.voting:
            return
        with self._view() as txn:
            for (key, version), since in list(self._open_since.items()):
                if now - since < OPEN_RECOVER_AFTER_S or quorum.proposing(key, version):
                    continue
                floor = self._applied(txn, key)
                if floor >= version:
                    del self._open_since[(key, version)]   # applied meanwhile
                elif floor + 1 == version:
                    if quorum.propose(key, version, None, now * 1000, recover=True):
                        self.counters["open_recoveries"] += 1
                        self._open_since[(key, version)] = now  # next try after another wait
                else:
                    self._pull_soon()   # the versions below it first

    def _await_barrier(self, key: bytes, waiter: _Waiter) -> None:
        waiter.barrier, waiter.target = -1, -1
        self._want_barrier.setdefault(key, []).append(waiter)

    def _barrier_settled(self, key: bytes, waiter: _Waiter, floor: int, now: float) -> bool:
        """For a write that waited on a barrier: is this replica current for the key now?"""
        quorum = self.quorum
        assert quorum is not None
        if floor < waiter.target:
            self._pull_soon()
            return False
        if waiter.open > floor:
            if not quorum.proposing(key, floor + 1):
                quorum.propose(key, floor + 1, None, now * 1000, recover=True)
            self._await_barrier(key, waiter)
            return False
        waiter.confirmed = True
        waiter.target = -1
        return True

    # --- version barriers (linearizable reads) ------------------------------------------------
    def _send_barrier(self, now: float) -> None:
        want, self._want_barrier = self._want_barrier, {}
        keys = list(want)
        for start in range(0, len(keys), 4096):
            chunk = keys[start:start + 4096]
            barrier_id = next(self._barrier_ids) & 0xFFFFFFFF
            barrier = _Barrier(chunk, now)
            quorum = self.quorum
            assert quorum is not None
            with self._view() as txn:
                barrier.answers[self.index] = [
                    KeyVersions(self._applied(txn, key), quorum.highest_open(key))
                    for key in chunk]
            self._barriers[barrier_id] = barrier
            for key in chunk:
                for waiter in want[key]:
                    waiter.barrier, waiter.target = barrier_id, -1
            self._ask_barrier(barrier_id, barrier, now)
            self._check_barrier(barrier_id, barrier)

    def _ask_barrier(self, barrier_id: int, barrier: _Barrier, now: float) -> None:
        barrier.sent_at = now
        frame = self._peer_frame(Method.VERSIONS,
                                 self._peer_request_id(Method.VERSIONS, barrier_id),
                                 _encode(VersionsRequest(barrier.keys)))
        for peer in self._peers:
            if peer is not None and peer.index not in barrier.answers:
                self._send_peer(peer, [frame], now)

    def _resend_barriers(self, now: float) -> None:
        for barrier_id, barrier in list(self._barriers.items()):
            if now - barrier.created > REQUEST_WAIT_MAX_S:
                del self._barriers[barrier_id]  # its waiters have been answered (expired)
                continue
            if now - barrier.sent_at >= BARRIER_RESEND_S:
                self._ask_barrier(barrier_id, barrier, now)

    def _check_barrier(self, barrier_id: int, barrier: _Barrier) -> None:
        if len(barrier.answers) < _core.majority(self.replicas):
            return
        del self._barriers[barrier_id]
        for i, key in enumerate(barrier.keys):
            target = max(answer[i].applied for answer in barrier.answers.values())
            open_version = max(answer[i].open for answer in barrier.answers.values())
            work = self._work.get(key)
            if work is None:
                continue
            for waiter in itertools.chain(work.reads, work.writes):
                if waiter.barrier == barrier_id:
                    waiter.barrier, waiter.target, waiter.open = 0, target, open_version
            self._dirty.add(key)

    # --- persist, apply, send -----------------------------------------------------------------
    def _persist_and_apply(self, now: float) -> None:
        quorum = self.quorum
        persist: list[Any] = []
        send: list[_core.Message] = []
        decided: list[Any] = []
        learned: list[Any] = []
        if quorum is not None:
            persist, send, decided = quorum.ready()
            learned = quorum.take_learned()
        # One pass over each list (this runs every round): what was chosen is applied, and
        # instances accepted and not known chosen are watched (see _recover_open).
        touched: set[bytes] = set()
        open_since = self._open_since
        fence = markers = False
        for r in persist:
            if r[0] == "instance":
                if r[6] is not None:
                    touched.add(r[1])
                    open_since.pop((r[1], r[2]), None)
                elif r[4]:
                    open_since.setdefault((r[1], r[2]), now)
            else:
                markers = True
                fence = fence or r[0] == "fence"
        chosen_values = False
        for d in decided:
            touched.add(d[0])
            chosen_values = chosen_values or d[2] is not None
        if decided and not fence:
            # (A fence learned this round must be durable before any answer: a voter whose
            # first message it is could otherwise lose its disk, come back as a first life
            # nobody knew, and vote with no memory of the write being answered.)
            self._answer_chosen(decided)
        pulled, self._pulled = self._pulled, []
        pages, self._pages = self._pages, []
        later = self._apply_later if self._committing is None else None
        if not persist and not pulled and not pages and not later and not learned \
                and not chosen_values:
            self._after_commit(send, decided, now)
            return
        started = time.perf_counter()
        for r in learned:
            touched.add(r[1])
            open_since.pop((r[1], r[2]), None)
        # Votes go to the vote log (one fdatasync). Fences and the rebuild markers, snapshot
        # pages, and a frame bigger than the whole log are made durable by committing LMDB
        # before anything is sent, as every round did before the log.
        durable_now = bool(pages) or markers
        if durable_now:
            self._finish_commit(block=True)   # (rare) LMDB must take them now
        logged = persist + learned if learned else persist
        if logged and not durable_now:
            # Learned choices ride along so that a restart applies them at once (its copy
            # never goes back), but only votes make what is sent wait for a sync, and a
            # frame of choices alone asks for none (the next vote's sync covers it: one
            # of its own cost every replica a second fdatasync per write).
            frame = self.votes.frame(logged)
            if not self.votes.fits(frame):
                self._checkpoint(durable=True)
            if self.votes.fits(frame):
                # Durable on the sync thread while this loop goes on; what reveals these
                # votes waits in _held until it is.
                self.votes.write(frame, sync=bool(persist))
                if persist:
                    self._vote_gate = self.votes.seq
                    self._voted_at = now
            elif persist:
                durable_now = True
        if self._committing is not None:
            # A checkpoint is committing: LMDB takes no write until it ends, so the applies
            # wait (what was chosen stays in the core, and pulled records are asked again).
            self._log_records(None, logged)
            self._apply_later |= touched
            self._pulled = pulled + self._pulled
            self._after_commit(send, decided, now)
            return
        if send and not durable_now and not _core.any_kind(send, _core.MSG_STATE):
            # Sent before the applies below, which nothing sent waits for: the votes leave
            # from the sync thread the moment their frame is durable (the sync runs while
            # this loop applies), the choices at once.
            self._send_quorum(send, now)
            send = []
        if later:
            touched |= later
            self._apply_later = set()
        try:
            batch = self._open_batch(now)
            self._log_records(batch, logged)
            applied = self._install_pages(batch, pages, touched)
            if self._copying():
                # Nothing but the copy until it is complete; what was chosen meanwhile
                # stays in the core and is applied right after.
                self._after_copy.update(touched)
                touched = set()
                pulled = []
            elif self._after_copy:
                touched |= self._after_copy
                self._after_copy = set()
            applied += self._apply_pulled(batch, pulled, touched)
            for key in touched:
                applied += self._apply_chosen(batch, key)
            moved = {id(p) for p, _, _ in pulled} | {id(p) for p, _, _ in pages}
            for peer in self._peers:
                if peer is not None and id(peer) in moved:
                    batch.set_meta_u64s(b"cursor/" + bytes([peer.index]), peer.incarnation,
                                        peer.cursor)
                    peer.saved = (peer.incarnation, peer.cursor)
            self._trim(batch)
            if self.quorum is not None and self.incarnation > 1 \
                    and not self._rebuild_done:
                self._save_rebuild_progress(batch)
            if durable_now:
                self._checkpoint(durable=True)
            self.counters["applied"] += applied
            self.monitor.add(monitor_ids.NODE_MUTATIONS, applied)
            self.counters["apply_us"] += int((time.perf_counter() - started) * 1e6)
        except StorageFull as e:
            self._stop_storage_full(e)
        if quorum is not None:
            more_persist, more_send, more_decided = quorum.ready()
            if more_persist or quorum.take_learned():  # forget() does neither
                raise RuntimeError("quorum asked to persist or apply after forgetting")
            send += more_send
            decided += more_decided
        self._dirty.update(key for key in touched if key in self._work)
        self._after_commit(send, decided, now)

    def _answer_chosen(self, decided: list[Any]) -> None:
        """Writes of ours that were chosen are answered now, before they are applied here: a
        majority holds them durably already, and the answer was computed when proposed. This
        keeps the local apply's fsync off the write's latency."""
        answered = False
        for key, version, _value, own in decided:
            if not own:
                continue
            work = self._work.get(key)
            if work is None or not work.writes:
                continue
            head = work.writes[0]
            if head.proposed == version and head.reply is not None:
                work.writes.popleft()
                self._answer_ok(head, head.reply)
                self.counters["mutations_acknowledged"] += 1
                answered = True
        if answered:
            self._flush_clients()

    def _after_commit(self, send: list[_core.Message], decided: list[Any], now: float) -> None:
        if (self._batch is not None or self._committing is not None
                or self._undurable is not None) \
                and _core.any_kind(send, _core.MSG_STATE):
            # A rebuild answer says how far our binlog stood: that must be durable and
            # readable by the peer's pulls, which see only checkpoints.
            self._checkpoint(durable=True)
        if send:
            self._send_quorum(send, now)
        counters = self.counters
        for key, version, value, own in decided:
            counters["decided_own" if own else "decided_taken" if value is None
                     else "decided_other"] += 1
            self.monitor.add(monitor_ids.NODE_QUORUM_RETRIES, int(not own))
            work = self._work.get(key)
            if work is not None and work.writes and work.writes[0].proposed == version:
                work.writes[0].proposed = 0  # applied if chosen: the op-id table answers
            self._dirty.add(key)

    def _apply_pulled(self, batch: Any, pulled: list[tuple[_Peer, int, list[bytes]]],
                      touched: set[bytes]) -> int:
        applied = 0
        states = self.store.kept_states
        for peer, cursor, records in pulled:
            if cursor != peer.cursor:
                continue  # an older answer (the cursor moved or was reset since it was asked)
            records = records[:APPLY_MAX_PER_ROUND]
            at = 0
            while at < len(records):
                # Most of a pull's records are versions the quorum brought already (each
                # replica applies every write): passed over in the core, no Record built.
                known = _core.applied_prefix(records, states, at)
                if known > at:
                    peer.cursor += known - at
                    peer.gap_since = 0.0
                    at = known
                    if at == len(records):
                        break
                raw = records[at]
                at += 1
                try:
                    record = _core.decode_record(raw)
                except ValueError as e:
                    self.counters["bad_pulled_records"] += 1
                    log.error("node %s: record %d of %s's binlog is damaged (%s); asking again",
                              self.name, peer.cursor + 1, peer.name, e)
                    break
                version = batch.latest(record.key).version
                if record.version == version + 1:
                    self._apply(batch, record, None)
                    applied += 1
                    touched.add(record.key)
                    applied += self._apply_chosen(batch, record.key)
                elif record.version > version + 1:
                    # Only behind a snapshot that peer installed: the other streams should
                    # fill the key in. If none does for a while, _on_pull_reply copies a
                    # snapshot of this peer instead (it holds the key at least that new).
                    self.counters["pull_gaps"] += 1
                    if not peer.gap_since:
                        peer.gap_since = time.monotonic()
                    break
                peer.cursor += 1
                peer.gap_since = 0.0
        return applied

    def _install_pages(self, batch: Any,
                       pages: list[tuple[_Peer, SnapshotReply, dict[str, Any]]],
                       touched: set[bytes]) -> int:
        """Snapshot pages: keys newer than ours replace ours (and the instances below them
        are forgotten); when a copy is complete, the peer's binlog goes on from its LSN."""
        quorum = self.quorum
        installed = 0
        for peer, reply, asked in pages:
            snapshot = peer.snapshot
            if snapshot is None or snapshot is not asked:
                continue
            installing, key, repair = snapshot["installing"], snapshot["key"], snapshot["repair"]
            others = [p.snapshot for p in self._peers
                      if p is not None and p is not peer and p.snapshot is not None]
            for item in reply.items:
                installing = batch.install((item.db, item.key, item.row, item.raw), installing,
                                           repair)
                if item.db == 0 and item.row is None:
                    key = item.key
                if item.db == 0 and item.row is None and installing:
                    repair.discard(item.key)
                    # Another copy under way may be inside this key's rows (of an older
                    # version): they must not land in the newer state.
                    for other in others:
                        if other["key"] == item.key:
                            other["installing"] = False
                    installed += 1
                    self._batch_ops = None   # the page's op ids are not tracked
                    touched.add(item.key)
                    version = batch.latest(item.key).version
                    self._batch_keys[item.key] = version
                    if quorum is not None:
                        for dropped in quorum.forget_through(item.key, version):
                            self._forget_instance(batch, item.key, dropped)
            snapshot["installing"], snapshot["key"] = installing, key
            snapshot["session"] = reply.session
            snapshot["after"] = reply.next
            # Durable with this page: the key it may end inside (its rows can go on in the
            # next page), for a restart to repair.
            half = (repair | {key}) if installing and key is not None else repair
            batch.set_meta(b"copy/installing/" + bytes([peer.index]),
                           _encode(sorted(half)) if half and reply.next is not None else None)
            if reply.next is None:
                if repair:
                    log.error("node %s: the copy from %s did not have %s, half installed "
                              "before a restart, at that version or newer", self.name,
                              peer.name, ", ".join(repr(k) for k in sorted(repair)))
                self._half_installed.pop(peer.index, None)
                peer.snapshot = None
                peer.trimmed_past_us = False
                peer.snapshots_taken += 1
                # The copy was read from a checkpoint that holds binlog through its LSN: the
                # peer has at least that much (an earlier pull's answer may have said less).
                peer.last_lsn = reply.lsn if reply.incarnation != peer.incarnation \
                    else max(peer.last_lsn, reply.lsn)
                peer.incarnation, peer.cursor = reply.incarnation, reply.lsn
                log.info("node %s: snapshot from %s complete (through its lsn %d)", self.name,
                         peer.name, reply.lsn)
        self.counters["snapshot_keys_installed"] += installed
        return installed

    def _apply_chosen(self, batch: Any, key: bytes) -> int:
        """Apply the key's next versions while the core knows them chosen."""
        quorum = self.quorum
        assert quorum is not None
        applied = 0
        version = batch.latest(key).version + 1
        chosen = quorum.chosen_value(key, version)
        while chosen is not None:
            self._apply(batch, _core.decode_record(chosen), chosen)
            applied += 1
            version += 1
            chosen = quorum.chosen_value(key, version)
        return applied

    def _apply(self, batch: Any, record: Any, chosen: bytes | None) -> None:
        """Apply one chosen version (data, binlog, op id) and forget its instance."""
        quorum = self.quorum
        assert quorum is not None
        try:
            batch.apply_record(record)
        except KvError as e:
            # Every replica applies the same record to the same state, so this fails
            # everywhere alike; the version still counts (it was chosen).
            log.error("node %s: chosen %r v%d does not apply (%s)", self.name, record.key,
                      record.version, e)
            raise
        if chosen is None:
            chosen = _core.encode_record(0, record.version, record.client_id,
                                         record.client_seq, record.key, record.ops)
        quorum.forget(record.key, record.version, chosen)
        self._forget_instance(batch, record.key, record.version)
        self._batch_keys[record.key] = record.version
        if record.client_id and self._batch_ops is not None:
            self._batch_ops.add((record.client_id, record.client_seq))

    def _log_records(self, batch: WriteBatch | None, records: list[tuple[Any, ...]]) -> None:
        """Records the vote log took: instances wait for the checkpoint (most are applied
        and forgotten before it), the rest go into the open transaction now."""
        other = []
        logged = self._logged
        for record in records:
            if record[0] == "instance":
                logged[(record[1], record[2])] = record
            else:
                other.append(record)
        if other:
            assert batch is not None, "only instance records are logged without LMDB"
            batch.persist_quorum(other)

    def _forget_instance(self, batch: WriteBatch, key: bytes, version: int) -> None:
        instance = (key, version)
        self._logged.pop(instance, None)
        if instance in self._in_lmdb:
            self._in_lmdb.discard(instance)
            batch.forget_instance(key, version)
        self._open_since.pop(instance, None)

    def _trim(self, batch: Any) -> None:
        """Binlog every peer has pulled is dropped (the size bound covers a peer down long)."""
        peers = [p for p in self._peers if p is not None]
        through = min(p.has_through for p in peers)
        if through >= self.store.first_lsn:
            batch.trim_binlog_through(through, TRIM_MAX_PER_ROUND)

    def _save_rebuild_progress(self, batch: Any) -> None:
        for index, target in self._rebuild_targets.items():
            batch.set_meta_u64s(b"rebuild/target/" + bytes([index]), target)
        if self.quorum is not None and not self.quorum.rebuilding and self._data_rebuilt():
            batch.set_meta_u64s(b"rebuild/done", self.incarnation)
            self._rebuild_done = True
            log.info("node %s: rebuilt life %d holds every peer's data: voting", self.name,
                     self.incarnation)

    def _send_quorum(self, messages: list[_core.Message], now: float) -> None:
        if _core.any_kind(messages, _core.MSG_STATE):
            # Stamp where our binlog stands: the rebuilding peer catches up to it.
            messages = [m if m.kind != _core.MSG_STATE else _core.Message(
                m.kind, m.source, m.target, m.incarnation, m.key, self.store.durable_last_lsn,
                m.ballot, m.accepted_ballot, m.value) for m in messages]
        # A CHOSEN message reveals no vote of ours: it goes now, not after the vote log sync
        # the others wait for (the follower applies the write a sync sooner).
        for index, (chosen, votes) in _core.group_quorum(messages).items():
            peer = self._peers[index] if 0 <= index < self.replicas else None
            if peer is None:
                continue
            if chosen:
                self._send_peer(peer, self._quorum_frames(chosen), now)
            if votes:
                self._send_votes(peer, self._quorum_frames(votes), now)

    def _quorum_frames(self, messages: list[_core.Message]) -> list[bytes]:
        """One peer's messages in frames of at most QUORUM_FRAME_BYTES or
        QUORUM_FRAME_MESSAGES each (a state answer part in a frame of its own)."""
        frames: list[bytes] = []
        for chunk in _core.chunk_quorum(messages, QUORUM_FRAME_BYTES, QUORUM_FRAME_MESSAGES):
            self._quorum_frame(chunk, frames)
        return frames

    def _quorum_frame(self, messages: list[_core.Message], frames: list[bytes]) -> None:
        try:
            frames.append(self._peer_frame(Method.QUORUM, 0,
                                           protocol.encode_quorum(messages)))
        except ValueError as e:
            # Only a state answer part holding one huge record (a chosen 4 MiB batch not yet
            # applied) can outgrow a frame: the peer asks again, by when it is applied.
            self.counters["quorum_frames_too_large"] += 1
            log.error("node %s: %d quorum messages do not fit a frame (%s); not sent",
                      self.name, len(messages), e)

    def _expire(self, now: float) -> None:
        for key, work in list(self._work.items()):
            for waiter in [w for w in work.reads if now >= w.deadline]:
                work.reads.remove(waiter)
                self._answer_error(waiter.identity, waiter.request_id, Unavailable(
                    f"node {self.name}: no majority of group {self.group.name} confirmed "
                    "the key's version in time; try another replica", field="node"))
            while work.writes and now >= work.writes[0].deadline:
                waiter = work.writes.popleft()
                if waiter.proposed:
                    # Its proposal goes on in the core and may still be chosen: say so.
                    error: KvError = Timeout(
                        f"node {self.name}: the write was not confirmed by a majority in "
                        "time; it may or may not be applied (retry with the same op id)")
                else:
                    error = Unavailable(f"node {self.name}: the write could not start in "
                                        "time; it was not applied", field="node")
                self._answer_error(waiter.identity, waiter.request_id, error)
                self._dirty.add(key)
            if not work.writes and not work.reads:
                del self._work[key]
        for key, waiters in list(self._want_barrier.items()):
            kept = [w for w in waiters if now < w.deadline]  # the expired were answered above
            if kept:
                self._want_barrier[key] = kept
            else:
                del self._want_barrier[key]

    def _answer_waiting_on_stop(self) -> None:
        """A stopping node answers what waits instead of leaving callers to time out. A write
        may be under way (proposed, or chosen and not yet answered): Timeout, which is
        ambiguous and sends the client to another replica with the same op id. A read:
        Unavailable."""
        for work in self._work.values():
            for waiter in work.writes:
                self._answer_error(waiter.identity, waiter.request_id, Timeout(
                    f"node {self.name} stopped with the write waiting; it may or may not be "
                    "applied (retry with the same op id)"))
            for waiter in work.reads:
                self._answer_error(waiter.identity, waiter.request_id, Unavailable(
                    f"node {self.name} is stopping; try another replica", field="node"))
        self._work.clear()

    def _fail_all_writes(self, error: KvError) -> None:
        for work in self._work.values():
            for waiter in work.writes:
                self._answer_error(waiter.identity, waiter.request_id, error)
            work.writes.clear()
        self._flush_clients()

    # --- status -------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        counters = self.counters
        counters["vote_log_syncs"], sync_ns = self.votes.syncs   # counted by the sync thread
        counters["vote_log_sync_us"] = sync_ns // 1000
        counters["votes_sent_by_sync_thread"], counters["vote_sends_dropped"], _ = \
            self.votes.sends
        status = super().status()
        now = time.monotonic()
        quorum = self.quorum
        peers = {}
        for peer in self._peers:
            if peer is None:
                continue
            up = bool(peer.heard_at) and now - peer.heard_at < PEER_DOWN_AFTER_S
            peers[peer.name] = {
                "index": peer.index,
                "address": peer.address,
                "up": up,
                "last_heard_s": round(now - peer.heard_at, 3) if peer.heard_at else None,
                "incarnation": peer.incarnation,
                "pulled_through_lsn": peer.cursor,
                "peer_last_lsn": peer.last_lsn,
                # None until the peer has answered a pull: no lag can be claimed unseen
                "lag_records": max(0, peer.last_lsn - peer.cursor) if peer.pulled else None,
                "has_our_binlog_through": peer.has_through,
                "pull_timeout_s": peer.pull_timeout_s,
                "needs_snapshot": peer.trimmed_past_us,
                "snapshots_taken": peer.snapshots_taken,
                "faults": {"drop": peer.drop, "delay_ms": peer.delay_ms},
            }
        down = [name for name, p in peers.items() if not p["up"]]
        status.update({
            "role": self.role,
            "replica_index": self.index,
            "replicas": self.replicas,
            "incarnation": self.incarnation,
            "health": ("ok" if not down else "degraded" if self.replicas - len(down)
                       >= _core.majority(self.replicas) else "no-majority")
                      if self.voting else self.role,
            "peers": peers,
            "peer_auth": self._peer_auth is not None,   # [security] peer_secret is set
            "quorum": {
                "proposals_in_flight": quorum.proposals_in_flight if quorum else 0,
                "open_instances": quorum.instances if quorum else 0,
                "fast_path": bool(quorum.fast_path) if quorum else False,
            },
            "waiting": {"keys": len(self._work), "barriers": len(self._barriers)},
            "vote_log": {
                "last_frame": self.votes.seq,
                "last_durable_frame": self.votes.synced,
                "messages_waiting_for_sync": len(self._held),
                "frames_since_checkpoint": self.votes.frames,
                "bytes_since_checkpoint": self.votes.used,
                "checkpoint_interval_ms": round(self._checkpoint_s * 1000),
            },
            "checkpoint": {
                "committing": self._committing is not None,
                "keys_in_commit": len(self._frozen),
                # Keys chosen while it commits: applied (and readable) once it ends.
                "keys_waiting_to_apply": len(self._apply_later),
                "fault_commit_delay_ms": round(self._committer.delay_s * 1000),
                # The last commit's meta page waits for the next commit's fsync (or the
                # idle sync a checkpoint interval later) to be durable.
                "meta_sync_pending": self._undurable is not None,
            },
        })
        return status


__all__ = ["ReplicaNode"]
