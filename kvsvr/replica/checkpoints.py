"""A replica's LMDB write transaction, open across rounds, and its checkpoints.

Every chosen version applied (from the quorum, a peer's binlog or a snapshot), the quorum
records that are not votes, and the cursors of the binlog streams go into one write
transaction that stays open across rounds. Every storage.checkpoint_interval_ms it commits
(fsync) on the committer's thread, recording the last vote log frame it covers; the loop goes
on voting meanwhile, and the log's room up to that frame is free once the commit is durable.
A crash loses the uncommitted transaction only: on restart the frames after the checkpoint
are replayed (`start_life`), and what they chose is applied again. So the fsync on a write's
path is a small sequential append, and LMDB's page writes are paid once per checkpoint, off
the loop.

Readers in the loop use the open transaction (they see every apply). While a commit is under
way there is none: a read transaction does not see the keys that commit holds, so their
applied version comes from memory (`frozen`), and reads of them wait for the commit to end
(`thaw`, `local_later`); their chosen versions wait too (`apply_later`). Writes to them go on
from the key's state kept in memory, unless that state was not kept or an op id the commit
holds is among the key's waiting writes (a retry must find its first answer, which only the
committed transaction shows). What leaves the node as data (binlog pulls, snapshots, the LSN
stamped on a rebuild answer) is only what a checkpoint made durable, so a peer never holds a
record this node could lose in a crash.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from typing import Any, NoReturn

from kvsvr import _core
from kvsvr._core import InstanceRecord, PersistRecord
from kvsvr.committer import Committer
from kvsvr.errors import KvError, StorageFull
from kvsvr.limits import CHECKPOINT_APPLIED_MAX, KEY_FLUSH_CYCLE_S, KEY_FLUSH_IDLE_S
from kvsvr.monitor import registry as monitor_ids
from kvsvr.monitor.counters import CounterSink
from kvsvr.replica.lives import Life
from kvsvr.replica.peers import Peers
from kvsvr.store import KeyState, Meta, Store, WriteBatch
from kvsvr.votelog import VoteLog

log = logging.getLogger("kvsvr.replica")

# `committing` while the committer syncs the last commit's meta page (no commit under way).
_SYNCING: tuple[int, dict[int, tuple[int, int]]] = (-1, {})

# A local read of a frozen key, answered when the commit ends: (identity, request id,
# method, request).
LocalRead = tuple[bytes, int, int, Any]


def _nothing(thaw: set[bytes], later: list[LocalRead]) -> None:
    """What a commit's end hands over before anyone takes it."""


class View:
    """Checkpoints.view's context: a class, not a generator (three a round)."""

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


class Checkpoints:
    """The open transaction, what it holds, and the checkpoint committing or made durable."""

    def __init__(self, name: str, store: Store, votes: VoteLog, committer: Committer,
                 peers: Peers, life: Life, counters: Counter[str], monitor: CounterSink, *,
                 checkpoint_s: float, clock: Callable[[], float],
                 on_storage_full: Callable[[StorageFull], NoReturn]):
        self._name = name
        self._store = store
        self._votes = votes
        self._committer = committer
        self._peers = peers
        self._life = life
        self._counters = counters
        self._monitor = monitor
        self.checkpoint_s = checkpoint_s
        self._clock = clock
        self._on_storage_full = on_storage_full
        # Given `thaw` and `local_later` when a commit ends (set by the node: Work takes them).
        self.on_commit_end: Callable[[set[bytes], list[LocalRead]], None] = _nothing
        self.batch: WriteBatch | None = None    # the LMDB transaction open across rounds
        self._batch_opened = 0.0
        self.batch_keys: dict[bytes, int] = {}  # keys applied in it -> their version
        # Op ids applied in it (None: not known, as after a snapshot page: it brings op ids).
        self.batch_ops: set[tuple[int, int]] | None = set()
        # The checkpoint under commit: (frames it covers, cursors in it). Until it ends LMDB
        # takes no writes, and a read transaction does not see it: the keys it applied
        # (-> their version) are frozen, and what needs them waits for it to end.
        self.committing: tuple[int, dict[int, tuple[int, int]]] | None = None
        # The last checkpoint committed, durable once the next commit (or a sync) ends, as
        # the store defers each commit's meta page sync: (frames it covers, cursors in it,
        # when it ended). Until then its frames stay in the vote log and peers are told only
        # the cursors before it (see Store's defer_meta_sync).
        self.undurable: tuple[int, dict[int, tuple[int, int]], float] | None = None
        self.frozen: dict[bytes, int] = {}
        self._commit_ended = 0.0   # when the last checkpoint commit (or sync) ended
        self.frozen_ops: set[tuple[int, int]] | None = set()   # batch_ops of the commit
        self.thaw: set[bytes] = set()           # keys with work that waits for the commit
        self.apply_later: set[bytes] = set()    # keys whose chosen versions wait for it
        self.local_later: list[LocalRead] = []  # local reads of frozen keys
        # Acceptor records of instances: those in the vote log since the last checkpoint
        # (the latest per instance), which the checkpoint writes to LMDB if still open, and
        # those LMDB holds. Most instances are chosen and applied within one checkpoint
        # interval, so they never cost LMDB a put and a delete.
        self._logged: dict[tuple[bytes, int], InstanceRecord] = {}
        self._in_lmdb: set[tuple[bytes, int]] = set()
        # Instances accepted here and not known chosen, since when: one whose proposer went
        # quiet (died after a majority accepted, before anyone learned) is finished here, so
        # an acknowledged write reaches every copy without waiting for a read or a write.
        self.open_since: dict[tuple[bytes, int], float] = {}

    # --- reading in the loop ----------------------------------------------------------------
    def view(self) -> View:
        """A transaction to read in: the open write transaction (it sees every apply of this
        node), else a read transaction."""
        return View(self._store, self.batch)

    def applied(self, txn: Any, key: bytes) -> int:
        """The key's applied version (a read transaction does not see a commit under way)."""
        version = self.frozen.get(key)
        return self.latest(txn, key).version if version is None else version

    def floors(self, txn: Any, keys: list[bytes]) -> dict[bytes, int]:
        """The applied version of each of `keys` (the floors QuorumReplica.step_all takes):
        from the commit under way if it holds the key, else the key state kept in memory,
        else read in `txn`."""
        frozen, kept = self.frozen, self._store.kept_states
        floors = {}
        for key in keys:
            version = frozen.get(key)
            if version is None:
                state = kept.get(key)
                version = self.latest(txn, key).version if state is None else state.version
            floors[key] = version
        return floors

    def latest(self, txn: Any, key: bytes) -> KeyState:
        """Store.latest; read in the open write transaction (always current), the state is
        also kept in memory, where the apply that usually follows finds it."""
        batch = self.batch
        if batch is not None and txn is batch.txn:
            return batch.latest(key)
        return self._store.latest(txn, key)

    # --- what goes into the open transaction ------------------------------------------------
    def open_batch(self, now: float) -> WriteBatch:
        if self.batch is None:
            if self.committing is not None:
                raise RuntimeError("no write transaction while a checkpoint commits")
            self.batch = self._committer.begin()
            self._batch_opened = now
        return self.batch

    def log_records(self, batch: WriteBatch | None, records: list[PersistRecord]) -> None:
        """Records the vote log took: instances wait for the checkpoint (most are applied
        and forgotten before it), the rest go into the open transaction now."""
        other: list[PersistRecord] = []
        logged = self._logged
        for record in records:
            if isinstance(record, InstanceRecord):
                logged[(record.key, record.version)] = record
            else:
                other.append(record)
        if other:
            assert batch is not None, "only instance records are logged without LMDB"
            batch.persist_quorum(other)

    def forget_instance(self, batch: WriteBatch, key: bytes, version: int) -> None:
        instance = (key, version)
        self._logged.pop(instance, None)
        if instance in self._in_lmdb:
            self._in_lmdb.discard(instance)
            batch.forget_instance(key, version)
        self.open_since.pop(instance, None)

    def apply_chosen(self, batch: Any, key: bytes) -> int:
        """Apply the key's next versions while the core knows them chosen."""
        quorum = self._life.quorum
        assert quorum is not None
        applied = 0
        version = batch.latest(key).version + 1
        chosen = quorum.chosen_value(key, version)
        while chosen is not None:
            self.apply(batch, _core.decode_record(chosen), chosen)
            applied += 1
            version += 1
            chosen = quorum.chosen_value(key, version)
        return applied

    def apply(self, batch: Any, record: Any, chosen: bytes | None) -> None:
        """Apply one chosen version (data, binlog, op id) and forget its instance."""
        quorum = self._life.quorum
        assert quorum is not None
        try:
            batch.apply_record(record)
        except KvError as e:
            # Every replica applies the same record to the same state, so this fails
            # everywhere alike; the version still counts (it was chosen).
            log.error("node %s: chosen %r v%d does not apply (%s)", self._name, record.key,
                      record.version, e)
            raise
        if chosen is None:
            chosen = _core.encode_record(0, record.version, record.client_id,
                                         record.client_seq, record.key, record.ops)
        quorum.forget(record.key, record.version, chosen)
        self.forget_instance(batch, record.key, record.version)
        self.batch_keys[record.key] = record.version
        if record.client_id and self.batch_ops is not None:
            self.batch_ops.add((record.client_id, record.client_seq))

    # --- checkpoints --------------------------------------------------------------------------
    def due(self) -> float | None:
        """When the open transaction is due to commit (None: there is none)."""
        return None if self.batch is None else self._batch_opened + self.checkpoint_s

    def maybe_checkpoint(self, now: float) -> None:
        batch = self.batch
        if batch is not None and self.committing is None and (
                now - self._batch_opened >= self.checkpoint_s
                or batch.applied >= CHECKPOINT_APPLIED_MAX
                or self._votes.used > self._votes.size // 2):
            self.checkpoint(wait=False)
        elif batch is None and self.committing is None and self._store.deferred_keys \
                and now - self._commit_ended >= KEY_FLUSH_IDLE_S:
            # No write for a while: the held key states go to LMDB at once (and the binlog
            # records they needed may then be trimmed).
            self.checkpoint(wait=False, all_held=True)
        elif batch is None and self.committing is None and self.undurable is not None \
                and now - self.undurable[2] >= self.checkpoint_s:
            # Nothing more to commit: the last commit's meta page gets an fsync of its own
            # (on the committer's thread), or peers would never be told about its records.
            self.committing = _SYNCING
            self._committer.start_sync()

    def checkpoint(self, wait: bool = True, durable: bool = False,
                   all_held: bool = False) -> None:
        """Commit the open transaction (fsync): the vote log frames so far are in it. With
        `wait` false the commit runs on the committer's thread while the loop goes on, and
        finish_commit takes its end. `durable`: also sync it (one more fsync, on the loop)
        for what must not wait for the next commit: see make_durable. `all_held`: with
        every held key state, not just the sweep's next key range (see Store)."""
        self.finish_commit(block=True)
        if all_held and self._store.deferred_keys:
            self.open_batch(self._clock()).flush_all_key_states()
        batch, self.batch = self.batch, None
        if batch is None:
            if durable:
                self.make_durable()   # (the last commit may still wait for its meta sync)
            return
        if self._logged:
            # The instances still open: once this commits, the log's room holding their
            # records is reused.
            batch.persist_quorum(list(self._logged.values()))
            self._in_lmdb.update(self._logged)
            self._logged = {}
        through, start = self._votes.mark()
        batch.set_meta_u64s(Meta.VOTES_THROUGH, through, start)
        # A key range's held states go to LMDB with each checkpoint (see Store).
        batch.flush_key_states(self.checkpoint_s / KEY_FLUSH_CYCLE_S)
        batch.seal()   # (here: the commit runs on the committer's thread)
        cursors = {p.index: p.saved for p in self._peers.linked}
        self.committing = (through, cursors)
        self.frozen, self.batch_keys = self.batch_keys, {}
        self.frozen_ops, self.batch_ops = self.batch_ops, set()
        self._committer.start_commit(batch)
        if wait:
            self.finish_commit(block=True)
        if durable:
            self.make_durable()

    def make_durable(self) -> None:
        """Every checkpoint committed so far durable now (the store defers each commit's
        meta page sync to the next commit): before the vote log must have room at once,
        before a snapshot is read for a peer, and for fences, rebuild markers and snapshot
        pages, which count only once durable."""
        self.finish_commit(block=True)
        if self.undurable is not None:
            self._store.sync()
            self._release_durable()

    def _release_durable(self) -> None:
        """The checkpoint waiting for its meta page sync counts once the store says it is
        durable (at once for a store that syncs every commit)."""
        if self.undurable is not None and not self._store.meta_sync_pending:
            undurable, self.undurable = self.undurable, None
            self._checkpoint_durable(undurable[0], undurable[1])

    def _checkpoint_durable(self, through: int, cursors: dict[int, tuple[int, int]]) -> None:
        """A checkpoint is durable: the vote log frames it covers are free, and the cursors
        in it are what peers may trim their binlog by."""
        self._votes.checkpointed(through)
        for peer in self._peers.linked:
            if peer.index in cursors:
                peer.durable = cursors[peer.index]

    def finish_commit(self, block: bool) -> None:
        """Take the end of the checkpoint under commit, if it has ended (or wait for it)."""
        committing = self.committing
        if committing is None:
            return
        try:
            if not self._committer.finish(block):
                return
        except StorageFull as e:
            self.committing = None
            self._on_storage_full(e)
        self.committing = None
        self._commit_ended = self._clock()
        if committing is not _SYNCING:
            self._store.commit_seen()   # (held key states it took are in LMDB for readers)
            # Its fsync made the checkpoint before it durable (a store deferring meta page
            # syncs); itself, only if the store syncs every commit.
            previous = self.undurable
            self.undurable = (committing[0], committing[1], self._commit_ended)
            if previous is not None:
                self._checkpoint_durable(previous[0], previous[1])
        self._release_durable()
        self.frozen = {}
        self.frozen_ops = set()
        if self.thaw or self.local_later:
            thaw, self.thaw = self.thaw, set()
            later, self.local_later = self.local_later, []
            self.on_commit_end(thaw, later)
        if committing is _SYNCING:
            self._counters["meta_syncs"] += 1
            return
        self._counters["group_commits"] += 1
        self._counters["group_commit_us"] += self._committer.last_commit_us
        self._monitor.add(monitor_ids.NODE_GROUP_COMMITS, 1)

    def abandon(self) -> None:
        """A failed loop stops: the commit under way ends, the open transaction is dropped
        (the vote log has what counts)."""
        with suppress(Exception):
            self._committer.finish(block=True)
        if self.batch is not None:
            with suppress(Exception):
                self._committer.abort(self.batch)
            self.batch = None

    # --- a life's start: the vote log replayed on top of LMDB --------------------------------
    def start_life(self, quorum: _core.QuorumReplica, rebuilding: bool) -> None:
        """The acceptor's records LMDB holds; unless rebuilding (a new life has none), the
        votes of the vote log's frames after the last checkpoint restored on top of them,
        what they chose applied again (the transaction that had applied it was lost with the
        process), and a checkpoint of that with a frame number no frame left in the file can
        follow."""
        # (Store.quorum_records is typed list[tuple]; its items are the core's records.)
        stored = self._store.quorum_records()
        self._in_lmdb = {(r.key, r.version) for r in stored if isinstance(r, InstanceRecord)}
        if rebuilding:
            return
        store = self._store
        # (A store from before the ring kept no offset: its log started again at 0.)
        through, start = (*store.meta_u64s(Meta.VOTES_THROUGH).get(b"", (0,)), 0)[:2]
        logged = self._votes.replay(through, start)
        records: list[PersistRecord] = []
        stale: list[InstanceRecord] = []
        with store.read() as txn:
            for record in stored + logged:
                if isinstance(record, InstanceRecord) and \
                        record.version <= store.key_state(txn, record.key).version:
                    stale.append(record)  # applied before a crash: never needed again
                    continue
                records.append(record)
        quorum.restore(records)
        started = self._clock()
        for record in records:
            if isinstance(record, InstanceRecord) and record.accepted_ballot \
                    and record.chosen_value is None:
                self.open_since[(record.key, record.version)] = started
        if logged:
            self._counters["votes_replayed"] += len(logged)
            log.info("node %s: %d votes replayed from the vote log (frames %d..%d)",
                     self._name, len(logged), through + 1, self._votes.seq)
        self._votes.skip_past_stale()
        batch = self.open_batch(started)
        for record in stale:
            self.forget_instance(batch, record.key, record.version)
        replayed = [r for r in logged if not isinstance(r, InstanceRecord)
                    or r.version > store.key_state(batch.txn, r.key).version]
        self.log_records(batch, replayed)
        for key in {r.key for r in replayed
                    if isinstance(r, InstanceRecord) and r.chosen_value is not None}:
            self.apply_chosen(batch, key)
        self.checkpoint(durable=True)

    def status(self) -> dict[str, Any]:
        return {
            "committing": self.committing is not None,
            "keys_in_commit": len(self.frozen),
            # Keys chosen while it commits: applied (and readable) once it ends.
            "keys_waiting_to_apply": len(self.apply_later),
            "fault_commit_delay_ms": round(self._committer.delay_s * 1000),
            # The last commit's meta page waits for the next commit's fsync (or the idle
            # sync a checkpoint interval later) to be durable.
            "meta_sync_pending": self.undurable is not None,
        }


__all__ = ["Checkpoints", "LocalRead", "View"]
