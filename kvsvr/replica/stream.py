"""The binlog stream: how data reaches a replica that was not in a quorum, or was down.

Each replica pulls every peer's binlog from its own durable cursor and applies each key's
next version; a record at or below the key's version is skipped. Because a peer applies each
key's versions in order and writes them to its binlog in that order, a cursor kept in the
same transaction as the applies never meets a gap (except behind a snapshot a peer installed:
that stream waits for the others to fill the key in, and copies a snapshot of that peer if
none does). A replica whose cursor fell behind a peer's trimmed binlog copies a snapshot of
that peer (and does nothing else meanwhile). This module takes both sides: the pulls and
copies this node makes, and the pulls and snapshot pages it serves.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from typing import Any

from kvsvr import _core, protocol
from kvsvr.errors import InvalidArgument, Unavailable
from kvsvr.limits import (
    APPLY_PULLED_RECORDS_MAX,
    GAP_SNAPSHOT_AFTER_S,
    HELLO_RESEND_S,
    PULL_BYTES_MAX,
    PULL_IDLE_INTERVAL_S,
    PULL_IDLE_INTERVAL_S_MAX,
    PULL_RECORDS_MAX,
    PULL_TIMEOUT_S_MAX,
    SNAPSHOT_IDLE_S_MAX,
    SNAPSHOT_PAGE_BYTES_MAX,
    SNAPSHOT_SESSIONS_MAX,
    TRIM_RECORDS_PER_ROUND_MAX,
)
from kvsvr.protocol import (
    Method,
    PullReply,
    PullRequest,
    SnapshotPosition,
    SnapshotReply,
    SnapshotRequest,
)
from kvsvr.replica.checkpoints import Checkpoints
from kvsvr.replica.lives import Life
from kvsvr.replica.network import Network
from kvsvr.replica.peers import Peer, Peers, request_id
from kvsvr.store import Meta, Store

log = logging.getLogger("kvsvr.replica")

_encode = protocol.encode

# A pull's answer waiting for the round's applies: (peer, its cursor when asked, records).
Pulled = tuple[Peer, int, list[bytes]]
# A snapshot page: (peer, page, the copy it was asked for: a page of a copy started again
# is dropped).
Page = tuple[Peer, SnapshotReply, dict[str, Any]]


class Stream:
    """The binlog streams from every peer, the snapshot copies taken and served."""

    def __init__(self, name: str, store: Store, peers: Peers, life: Life,
                 checkpoints: Checkpoints, edge: Network, counters: Counter[str]):
        self._name = name
        self._store = store
        self._peers = peers
        self._life = life
        self._checkpoints = checkpoints
        self._edge = edge
        self._counters = counters
        self.pulled: list[Pulled] = []
        self.pages: list[Page] = []
        # Copies served: [txn, lsn, last used, the key states held as of txn].
        self._sessions: dict[int, list[Any]] = {}
        self._after_copy: set[bytes] = set()  # keys whose chosen versions wait for a copy
        self.lag_peak = 0  # most records a stream was behind since the gauge was last set

    def copying(self) -> bool:
        """A snapshot is being copied: keys may be half installed (a page can end inside a
        key's rows) and op ids follow the keys, so this replica neither votes nor serves nor
        applies anything else until every copy is complete."""
        # A loop, not any() over a generator: asked several times a round.
        for peer in self._peers.linked:  # noqa: SIM110
            if peer.snapshot is not None:
                return True
        return False

    def pull_soon(self) -> None:
        """Ask every peer at once (what a read or write waits for may be due soon)."""
        for peer in self._peers.linked:
            peer.pull_idle_s = PULL_IDLE_INTERVAL_S
            if not peer.pull_sent_at:
                peer.next_pull = 0.0

    @property
    def waiting(self) -> bool:
        """Pulled records or snapshot pages wait for the round's applies."""
        return bool(self.pulled or self.pages)

    def take(self) -> tuple[list[Pulled], list[Page]]:
        """What the round applies: the pulled records and snapshot pages so far."""
        pulled, self.pulled = self.pulled, []
        pages, self.pages = self.pages, []
        return pulled, pages

    def put_back(self, pulled: list[Pulled]) -> None:
        """Pulled records the round could not apply (a commit is under way): first next time."""
        self.pulled = pulled + self.pulled

    def hold_until_copied(self, keys: set[bytes]) -> None:
        """Keys whose chosen versions wait until every copy is complete."""
        self._after_copy.update(keys)

    def release_copied(self) -> set[bytes]:
        """The keys held while a copy was under way (now complete)."""
        keys = self._after_copy
        if keys:
            self._after_copy = set()
        return keys

    def take_lag_peak(self) -> int:
        """The most records a stream was behind since the last call."""
        peak, self.lag_peak = self.lag_peak, 0
        return peak

    # --- our pulls and copies -----------------------------------------------------------------
    def pull(self, now: float) -> None:
        if self._checkpoints.committing is not None:
            return  # the cursors cannot move until it ends: a pull now would fetch the same
        waiting = {id(p) for p, _, _ in self.pulled} if self.pulled else set()
        index = self._peers.index
        for peer in self._peers.linked:
            if id(peer) in waiting:
                continue
            if peer.pull_sent_at and now - peer.pull_sent_at < peer.pull_timeout_s:
                continue
            if peer.snapshot is None and self.copying():
                continue  # its stream waits until every copy is complete
            if not peer.pull_sent_at and now < peer.next_pull:
                continue
            if peer.pull_sent_at:
                # Sent again: the unanswered one's answer, if it comes, is now dropped as
                # stale, so a peer slower than a fixed timeout would never get one through.
                peer.pull_timeout_s = min(peer.pull_timeout_s * 2, PULL_TIMEOUT_S_MAX)
            peer.pull_sent_at = now
            peer.pull_tag = (peer.pull_tag + 1) & 0xFFFFFFFF
            if peer.snapshot is not None:
                self._edge.send_peer(peer.index, [self._peers.frame(
                    Method.SNAPSHOT, request_id(Method.SNAPSHOT, peer.pull_tag),
                    _encode(SnapshotRequest(index, peer.snapshot["session"],
                                            peer.snapshot["after"],
                                            SNAPSHOT_PAGE_BYTES_MAX)))], now)
                continue
            peer.pull_from = peer.cursor + 1
            life, durable = peer.durable
            self._edge.send_peer(peer.index, [self._peers.frame(
                Method.PULL, request_id(Method.PULL, peer.pull_tag),
                _encode(PullRequest(index, peer.pull_from, peer.incarnation, PULL_RECORDS_MAX,
                                    durable if life == peer.incarnation else 0)))], now)

    def start_snapshot(self, peer: Peer, repair: set[bytes] | None = None) -> None:
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

    def repair_half_installed(self) -> None:
        """Copy again from each peer whose copy stopped with keys half installed (before a
        restart), before anything else."""
        for peer in self._peers.linked:
            half = self._life.half_installed.get(peer.index)
            if half:
                log.warning("node %s: a copy from %s stopped with %s half installed: "
                            "copying from %s again before serving", self._name, peer.name,
                            ", ".join(repr(k) for k in sorted(half)), peer.name)
                self.start_snapshot(peer, repair=half)

    def on_refused(self, peer: Peer, method: int, now: float) -> None:
        """A pull or snapshot page the peer refused: asked again later (a copy whose session
        is gone, from its start)."""
        peer.pull_sent_at = 0.0
        peer.next_pull = now + PULL_IDLE_INTERVAL_S
        if method == Method.SNAPSHOT and peer.snapshot is not None:
            self.start_snapshot(peer)
            peer.next_pull = now + HELLO_RESEND_S

    def on_snapshot_reply(self, peer: Peer, reply: SnapshotReply, now: float) -> None:
        peer.pull_sent_at = 0.0
        peer.next_pull = now
        if peer.snapshot is not None:
            self.pages.append((peer, reply, peer.snapshot))

    def on_pull_reply(self, peer: Peer, reply: PullReply, now: float) -> None:
        peer.pull_sent_at = 0.0
        peer.pulled = True
        peer.first_lsn, peer.last_lsn = reply.first_lsn, reply.last_lsn
        if reply.incarnation != peer.incarnation:
            if peer.incarnation:
                log.warning("node %s: peer %s is in life %d now (was %d): reading its binlog "
                            "from the start", self._name, peer.name, reply.incarnation,
                            peer.incarnation)
            # A life we never read (its new one, or the first we hear of when none was saved):
            # we hold none of its records, so read it from its first. If it trimmed some
            # already, the next answer starts past our cursor and we copy a snapshot; going
            # on from its first kept record instead would skip the trimmed ones for good
            # (a key's later version shows a gap, but a key written only there never would).
            peer.incarnation, peer.cursor = reply.incarnation, 0
            peer.next_pull = 0.0
            self.pulled.append((peer, peer.cursor, []))  # persists the reset cursor
            return
        if peer.cursor > reply.last_lsn:
            # Past the end of its binlog: it cannot have moved back in the same life unless its
            # disk did (a restored copy). Read again what it keeps; applies skip what we have.
            self._counters["pull_cursor_resets"] += 1
            log.error("node %s: cursor %d on %s is past its last lsn %d; reading it again from "
                      "%d", self._name, peer.cursor, peer.name, reply.last_lsn, reply.first_lsn)
            peer.cursor = max(0, reply.first_lsn - 1)
            peer.next_pull = 0.0
            self.pulled.append((peer, peer.cursor, []))
            return
        if peer.gap_since and now - peer.gap_since > GAP_SNAPSHOT_AFTER_S:
            log.warning("node %s: the stream from %s has waited %.0f s at a gap at lsn %d "
                        "that no other stream filled: copying a snapshot from it", self._name,
                        peer.name, now - peer.gap_since, peer.cursor + 1)
            peer.gap_since = 0.0
            self._counters["gap_snapshots"] += 1
            self.start_snapshot(peer)
            return
        # The records start where the request asked, which is where the cursor stood then; if
        # it has moved since, apply_pulled drops them (they would land at the wrong place).
        base = peer.pull_from - 1
        if base + 1 < reply.first_lsn:
            log.warning("node %s: peer %s trimmed its binlog past what this node has (it "
                        "keeps %d.., this node needs %d): copying a snapshot from it",
                        self._name, peer.name, reply.first_lsn, base + 1)
            peer.trimmed_past_us = True
            self.start_snapshot(peer)
            return
        # Far behind: ask again at once; else the quorum carries most data and the stream
        # only mends what it missed, so it need not be asked every round.
        full = len(reply.records) >= PULL_RECORDS_MAX // 2
        # An idle group would otherwise trade a pull and its answer per peer every 20 ms (a
        # few percent of a core per node); what needs data sooner asks at once (pull_soon).
        peer.pull_idle_s = PULL_IDLE_INTERVAL_S if reply.records \
            else min(peer.pull_idle_s * 2, PULL_IDLE_INTERVAL_S_MAX)
        # The gauge shows the most a stream was behind in the second, not where it stands at
        # the moment it is set: a catch-up is over in milliseconds, and would show as 0.
        self.lag_peak = max(self.lag_peak, reply.last_lsn - base)
        peer.next_pull = now if full else now + peer.pull_idle_s
        if reply.records:
            self.pulled.append((peer, base, reply.records))

    # --- applying what was pulled and copied --------------------------------------------------
    def apply_pulled(self, batch: Any, pulled: list[Pulled], touched: set[bytes],
                     now: float) -> int:
        applied = 0
        states = self._store.kept_states
        checkpoints = self._checkpoints
        for peer, cursor, records in pulled:
            if cursor != peer.cursor:
                continue  # an older answer (the cursor moved or was reset since it was asked)
            records = records[:APPLY_PULLED_RECORDS_MAX]
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
                    self._counters["bad_pulled_records"] += 1
                    log.error("node %s: record %d of %s's binlog is damaged (%s); asking again",
                              self._name, peer.cursor + 1, peer.name, e)
                    break
                version = batch.latest(record.key).version
                if record.version == version + 1:
                    checkpoints.apply(batch, record, None)
                    applied += 1
                    touched.add(record.key)
                    applied += checkpoints.apply_chosen(batch, record.key)
                elif record.version > version + 1:
                    # Only behind a snapshot that peer installed: the other streams should
                    # fill the key in. If none does for a while, on_pull_reply copies a
                    # snapshot of this peer instead (it holds the key at least that new).
                    self._counters["pull_gaps"] += 1
                    if not peer.gap_since:
                        peer.gap_since = now
                    break
                peer.cursor += 1
                peer.gap_since = 0.0
        return applied

    def install_pages(self, batch: Any, pages: list[Page], touched: set[bytes]) -> int:
        """Snapshot pages: keys newer than ours replace ours (and the instances below them
        are forgotten); when a copy is complete, the peer's binlog goes on from its LSN."""
        quorum = self._life.quorum
        checkpoints = self._checkpoints
        installed = 0
        for peer, reply, asked in pages:
            snapshot = peer.snapshot
            if snapshot is None or snapshot is not asked:
                continue
            installing, key, repair = snapshot["installing"], snapshot["key"], snapshot["repair"]
            others = [p.snapshot for p in self._peers.linked
                      if p is not peer and p.snapshot is not None]
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
                    checkpoints.batch_ops = None   # the page's op ids are not tracked
                    touched.add(item.key)
                    version = batch.latest(item.key).version
                    checkpoints.batch_keys[item.key] = version
                    if quorum is not None:
                        for dropped in quorum.forget_through(item.key, version):
                            checkpoints.forget_instance(batch, item.key, dropped)
            snapshot["installing"], snapshot["key"] = installing, key
            snapshot["session"] = reply.session
            snapshot["after"] = reply.next
            # Durable with this page: the key it may end inside (its rows can go on in the
            # next page), for a restart to repair.
            half = (repair | {key}) if installing and key is not None else repair
            batch.set_meta(Meta.COPY_INSTALLING_PREFIX + bytes([peer.index]),
                           _encode(sorted(half)) if half and reply.next is not None else None)
            if reply.next is None:
                self._copy_complete(peer, reply, repair)
        self._counters["snapshot_keys_installed"] += installed
        return installed

    def _copy_complete(self, peer: Peer, reply: SnapshotReply, repair: set[bytes]) -> None:
        if repair:
            log.error("node %s: the copy from %s did not have %s, half installed before a "
                      "restart, at that version or newer", self._name, peer.name,
                      ", ".join(repr(k) for k in sorted(repair)))
        self._life.half_installed.pop(peer.index, None)
        peer.snapshot = None
        peer.trimmed_past_us = False
        peer.snapshots_taken += 1
        # The copy was read from a checkpoint that holds binlog through its LSN: the peer
        # has at least that much (an earlier pull's answer may have said less).
        peer.last_lsn = reply.lsn if reply.incarnation != peer.incarnation \
            else max(peer.last_lsn, reply.lsn)
        peer.incarnation, peer.cursor = reply.incarnation, reply.lsn
        log.info("node %s: snapshot from %s complete (through its lsn %d)", self._name,
                 peer.name, reply.lsn)

    def save_cursors(self, batch: Any, pulled: list[Pulled], pages: list[Page]) -> None:
        """The cursors of the streams that moved, in the transaction of their applies."""
        moved = {id(p) for p, _, _ in pulled} | {id(p) for p, _, _ in pages}
        for peer in self._peers.linked:
            if id(peer) in moved:
                batch.set_meta_u64s(Meta.CURSOR_PREFIX + bytes([peer.index]), peer.incarnation,
                                    peer.cursor)
                peer.saved = (peer.incarnation, peer.cursor)

    def trim(self, batch: Any) -> None:
        """Binlog every peer has pulled is dropped (the size bound covers a peer down long)."""
        through = min(p.has_through for p in self._peers.linked)
        if through >= self._store.first_lsn:
            batch.trim_binlog_through(through, TRIM_RECORDS_PER_ROUND_MAX)

    # --- serving peers' pulls and copies ------------------------------------------------------
    def serve_pull(self, request: PullRequest) -> PullReply:
        peers = self._peers
        peer = peers.by_index[request.source] if request.source < peers.replicas else None
        if peer is None:
            raise InvalidArgument(f"source: {request.source} is not a peer of this node",
                                  field="source")
        store = self._store
        if request.incarnation == self._life.incarnation:
            through = request.from_lsn - 1
            if request.durable_through is not None:
                through = min(through, request.durable_through)
            # No puller holds more than this node ever made pullable: a cursor past it
            # (a bug or a forged pull) must not let records it never had be trimmed.
            through = min(through, store.durable_last_lsn)
            peer.has_through = max(peer.has_through, through)
        # Only what a checkpoint made durable: a record lost in a crash of this node would
        # otherwise live on in a peer, and its LSN be reused for another. (A read transaction
        # also sees the last commit, durable only once the next one ends.)
        durable = store.durable_last_lsn - request.from_lsn + 1
        records = store.binlog_raw(request.from_lsn, min(request.max_records, durable),
                                   PULL_BYTES_MAX) \
            if request.from_lsn >= store.durable_first_lsn and durable > 0 else []
        return PullReply(self._life.incarnation, store.durable_first_lsn,
                         store.durable_last_lsn, records)

    def serve_snapshot(self, request: SnapshotRequest, now: float) -> SnapshotReply:
        peers = self._peers
        if not 0 <= request.source < peers.replicas or request.source == peers.index:
            raise InvalidArgument(f"source: {request.source} is not a peer of this node",
                                  field="source")
        session = self._sessions.get(request.session) if request.session else None
        if request.session and session is None:
            raise Unavailable(f"snapshot session {request.session} is gone; start again",
                              field="session")
        if session is None:
            if len(self._sessions) >= SNAPSHOT_SESSIONS_MAX:
                raise Unavailable(f"node {self._name} already serves "
                                  f"{SNAPSHOT_SESSIONS_MAX} snapshots", field="session")
            # The copy says from which of our LSNs the peer goes on: they must never be
            # lost (after a power cut they would be reused for other records).
            self._checkpoints.make_durable()
            txn = self._store.read()
            # Held key states as of txn, not as memory has them now (maybe newer than the op
            # ids the copy takes from txn): rebuilt once per copy, see Store.snapshot_states.
            session = [txn, self._store.snapshot_lsn(txn), now,
                       self._store.snapshot_states(txn)]
            session_id = secrets.randbits(48) | 1
            self._sessions[session_id] = session
            log.info("node %s: snapshot %x for replica %d from lsn %d", self._name,
                     session_id, request.source, session[1])
        else:
            session_id = request.session
        session[2] = now
        after = request.after
        position = (after.db, after.key, after.row) if after is not None else None
        items, following = self._store.snapshot_page(
            session[0], position, min(request.max_bytes, SNAPSHOT_PAGE_BYTES_MAX), session[3])
        if following is None:
            session[0].abort()
            del self._sessions[session_id]
        return SnapshotReply(
            session_id, self._life.incarnation, session[1],
            [protocol.SnapshotItem(*item) for item in items],
            SnapshotPosition(*following) if following is not None else None)

    @property
    def serving(self) -> bool:
        """Snapshot copies are being served."""
        return bool(self._sessions)

    def expire_sessions(self, now: float) -> None:
        for session_id, session in list(self._sessions.items()):
            if now - session[2] > SNAPSHOT_IDLE_S_MAX:
                session[0].abort()
                del self._sessions[session_id]
                log.warning("node %s: snapshot %x abandoned by its reader", self._name,
                            session_id)


__all__ = ["Page", "Pulled", "Stream"]
