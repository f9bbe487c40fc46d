"""`ReplicaNode`: one replica of a replicated group, and the round that ties its parts (see
the package docstring, kvsvr/replica/__init__.py, for the loop)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import msgspec

from kvsvr import _core, protocol
from kvsvr._core import Decided, FenceRecord, InstanceRecord, PersistRecord
from kvsvr.committer import Committer
from kvsvr.config import ClusterConfig
from kvsvr.errors import Internal, InvalidArgument, KvError, StorageFull
from kvsvr.limits import (
    CLIENT_SWEEP_INTERVAL_S,
    EXPIRE_INTERVAL_S,
    OPEN_CHECK_INTERVAL_S,
    OPEN_RECOVER_AFTER_S,
    PEER_WATCH_INTERVAL_S,
    PULL_IDLE_INTERVAL_S,
    PULL_TIMEOUT_S,
    REQUEST_WAIT_S_MAX,
    ROUND_WAKE_ONLY_S_MAX,
    YIELD_AFTER_VOTE_S,
)
from kvsvr.monitor import registry as monitor_ids
from kvsvr.protocol import HelloReply, Method, PullReply, SnapshotReply, VersionsReply
from kvsvr.replica.barriers import Barriers
from kvsvr.replica.checkpoints import Checkpoints
from kvsvr.replica.edge import Edge
from kvsvr.replica.lives import Life
from kvsvr.replica.network import Network
from kvsvr.replica.peers import Peer, Peers
from kvsvr.replica.purges import propose_purges
from kvsvr.replica.sending import QuorumSender
from kvsvr.replica.stream import Page, Pulled, Stream
from kvsvr.replica.watches import ReplicaWatches
from kvsvr.replica.work import Work
from kvsvr.single import METHOD_COUNTER, Node
from kvsvr.store import Meta, Store
from kvsvr.votelog import VoteLog

log = logging.getLogger("kvsvr.replica")

_REQUEST = _core.FRAME_REQUEST
_RESPONSE = _core.FRAME_RESPONSE
_encode = protocol.encode
_encode_frame = _core.encode_frame
_PEER_METHODS = protocol.PEER_METHODS
_QUORUM = Method.QUORUM
_FAULTS = Method.FAULTS
_WATCH = Method.WATCH
_STREAM_METHODS = (Method.PULL, Method.SNAPSHOT)
_LOCAL_METHODS = (Method.PING, Method.STATUS, Method.LIST)   # LIST: from the applied state
_pull_reply_decoder = msgspec.msgpack.Decoder(PullReply)
_versions_reply_decoder = msgspec.msgpack.Decoder(VersionsReply)
_hello_reply_decoder = msgspec.msgpack.Decoder(HelloReply)
_snapshot_reply_decoder = msgspec.msgpack.Decoder(SnapshotReply)


class ReplicaNode(Node):
    """A node of a group of 2..7 replicas. The round (`round`) takes data and the time, so
    it runs without ZeroMQ: the edge, the vote log and the committer are made by methods a
    simulator overrides (`make_edge`, `make_vote_log`, `make_committer`), and `clock` is
    the one time source besides the round's `now`."""

    clock: Callable[[], float] = time.monotonic

    def __init__(self, config: ClusterConfig, name: str):
        super().__init__(config, name, replicated=True)
        self.index = self.group.replicas.index(self.replica)
        self.replicas = len(self.group.replicas)
        store = self.store
        cursors = {int(k[0]): v for k, v in store.meta_u64s(Meta.CURSOR_PREFIX).items() if k}
        self.peers = Peers(self.group, self.index, cursors, config.security.peer_secret)
        self.votes = self._open_vote_log()
        # LMDB write transactions begin and commit on the committer's thread; a checkpoint's
        # commit runs there while the loop goes on (see kvsvr/replica/checkpoints.py).
        self.committer = self.make_committer(store, f"{name}-commit")
        self.edge = self.make_edge()
        self.life = Life(name, self.group.name, self.index, store, self.peers, self.edge)
        self.checkpoints = Checkpoints(
            name, store, self.votes, self.committer, self.peers, self.life, self.counters,
            self.monitor, checkpoint_s=config.storage.checkpoint_interval_ms / 1000,
            clock=self.clock, on_storage_full=self._stop_storage_full)
        self.sender = QuorumSender(name, self.peers, self.votes, self.checkpoints, self.edge,
                                   store, self.counters)
        self.stream = Stream(name, store, self.peers, self.life, self.checkpoints, self.edge,
                             self.counters)
        self.work = Work(name, self.group.name, store, self.peers, self.life, self.checkpoints,
                         self.stream, self.edge, self.counters, self.monitor, read=self._read,
                         check_owned=self.check_owned, observe_latency=self.observe_latency,
                         clock=self.clock)
        self.checkpoints.on_commit_end = self.work.commit_ended
        self.barriers = Barriers(name, self.peers, self.life, self.checkpoints, self.work,
                                 self.edge)
        self.replica_watches = ReplicaWatches(
            name, self.group.name, store, self.peers, self.life, self.checkpoints, self.edge,
            self.counters, self.watches, check_owned=self.check_owned)
        self.round_at = 0.0
        self._open_checked = 0.0
        self._peers_watched = 0.0
        self._expire_at = 0.0
        if self.life.incarnation:
            self._start_quorum(rebuilding=False)

    # --- what a simulator replaces --------------------------------------------------------------
    def make_vote_log(self, path: Path, nonce: int, *, sync: bool, must_exist: bool) -> VoteLog:
        return VoteLog(path, nonce, sync=sync, must_exist=must_exist)

    def make_committer(self, store: Store, name: str) -> Committer:
        return Committer(store, name=name)

    def make_edge(self) -> Network:
        return Edge(self.name, self.replica.address, self.peers, self.votes, self.counters,
                    self.monitor)

    def _open_vote_log(self) -> VoteLog:
        # The nonce is stored only once its log file is whole (zero-filled and synced): a
        # store with a nonce and no whole log lost votes, and VoteLog refuses to go on.
        nonce = self.store.meta_u64s(Meta.VOTES_NONCE).get(b"")
        had_log = nonce is not None
        if nonce is None:
            nonce = (secrets.randbits(64),)
        votes = self.make_vote_log(self.store.path / "votes.log", nonce[0],
                                   sync=self.config.storage.sync, must_exist=had_log)
        if not had_log:
            with self.store.write() as batch:
                batch.set_meta_u64s(Meta.VOTES_NONCE, *nonce)
        return votes

    # --- lives ------------------------------------------------------------------------------------
    def _start_quorum(self, rebuilding: bool) -> None:
        quorum = self.life.start_quorum(rebuilding)
        self.checkpoints.start_life(quorum, rebuilding)
        self.life.update_role(self.stream.copying())
        log.info("node %s: incarnation %d, %s", self.name, self.life.incarnation,
                 self.life.role)

    def _on_hello_reply(self, peer: Peer, reply: HelloReply) -> None:
        knew = self.life.on_hello_reply(peer, reply)
        if knew is None:
            return
        self.checkpoints.checkpoint(durable=True)
        self.life.begin(knew)
        wiped = knew > 0
        if wiped:
            for p in self.peers.linked:
                p.cursor, p.incarnation = 0, 0
                self.stream.start_snapshot(p)
        self._start_quorum(rebuilding=wiped)

    # --- serving ----------------------------------------------------------------------------------
    def serve(self) -> None:
        edge = self.edge
        if not isinstance(edge, Edge):
            raise TypeError("serve() runs on the ZeroMQ edge; drive round() on another")
        edge.open()
        self.stream.repair_half_installed()
        store = self.store
        log.info("node %s (group %s, replica %d of %d, campus %s) serving on %s, data %s, "
                 "binlog lsn %d..%d, %d key states held (replayed from lsn %d)", self.name,
                 self.group.name, self.index, self.replicas, self.replica.campus,
                 self.replica.address, store.path, store.first_lsn, store.last_lsn,
                 store.deferred_keys, store.replay_from())
        self.votes.start(edge.wake_fd)
        self.committer.wake_fd = edge.wake_fd
        edge.hand_vote_sockets()   # (once the sync thread runs)
        self.start_metrics()
        clean = False
        try:
            edge.run(self)
            clean = True
        finally:
            self.stop_serving(clean)
            edge.close()
            self.stop_metrics()
            store.close()
            log.info("node %s stopped", self.name)

    def stop_serving(self, clean: bool) -> None:
        """The end of serve() before its sockets and store close (a simulator stops a node
        with it too). `clean`: the loop stopped as asked, so the open transaction is
        checkpointed and what waits is answered; else a round failed, and the vote log has
        what counts."""
        if clean:
            self.checkpoints.checkpoint(durable=True, all_held=True)
            self.work.answer_waiting_on_stop()
            self.replica_watches.stop()
            self.edge.flush()   # (and local reads that waited for the checkpoint)
        else:
            self.checkpoints.abandon()
        self.committer.close()
        self.votes.close()   # (the sync thread uses the vote sockets until it returns)

    # What the edge's serve loop asks between rounds (see kvsvr.replica.edge.Loop).
    def due(self) -> float | None:
        return self.checkpoints.due()

    def wrote_votes_lately(self) -> bool:
        return self.round_at - self.sender.voted_at < YIELD_AFTER_VOTE_S

    def woken(self, now: float) -> None:
        """A vote log sync or a checkpoint commit ended (or failed: the node stops)."""
        self.votes.check()
        self.checkpoints.finish_commit(block=False)   # (may make more frames durable)
        self.sender.release(now)

    def round_due(self, now: float) -> bool:
        """Whether a round has work beyond sending what a sync released."""
        work, stream = self.work, self.stream
        return bool(work.dirty or self.checkpoints.apply_later or stream.waiting
                    or self.edge.answering or work.want_barrier) \
            or now - self.round_at >= ROUND_WAKE_ONLY_S_MAX

    def sweep_idle_clients(self) -> None:
        """In the open transaction, committed by the next checkpoint. (A transaction of its
        own made the loop wait for the commit under way and commit the open one first,
        answering nothing meanwhile, every minute: seconds on a slow disk.) While a commit
        is under way there is no open transaction: the sweep stays due."""
        if self.checkpoints.committing is not None or self.life.quorum is None:
            return
        now = self.clock()
        self.next_client_sweep = now + CLIENT_SWEEP_INTERVAL_S
        try:
            batch = self.checkpoints.open_batch(now)
            self._client_sweep_from = batch.forget_idle_clients(start=self._client_sweep_from)
        except Exception:  # housekeeping must never take the node down (as in Node)
            log.exception("node %s: sweeping idle clients failed", self.name)

    # --- one round --------------------------------------------------------------------------------
    def round(self, inbound: list[list[bytes]], replies: list[tuple[Peer, bytes]],
              now: float) -> bool:
        """Handle what arrived, move work on, commit, send. True if more work is ready."""
        self.counters["rounds"] += 1
        self.round_at = now
        if self.metrics is not None:
            self.publish_metrics(now)
        now_ms = now * 1000   # the quorum core's time unit
        checkpoints, work, stream, sender = self.checkpoints, self.work, self.stream, self.sender
        if checkpoints.committing is not None:
            checkpoints.finish_commit(block=False)
        sender.release(now)
        self.edge.release_delayed(now)
        with checkpoints.view() as txn:
            for parts in inbound:
                for payload in parts[1:]:
                    self._inbound(parts[0], payload, txn, now, now_ms)
        for peer, payload in replies:
            self._peer_reply(peer, payload, now)
        quorum = self.life.quorum
        if quorum is None:
            self.life.hello(now)
        else:
            work.progress(now_ms)
            if checkpoints.open_since and now - self._open_checked >= OPEN_CHECK_INTERVAL_S:
                self._recover_open(now, now_ms)
            quorum.tick(now_ms)
        self._persist_and_apply(now)
        self.life.update_role(stream.copying())
        if now - self._peers_watched >= PEER_WATCH_INTERVAL_S:
            self._watch_peers(now)
        if work.want_barrier:
            self.barriers.send(work.take_want_barrier(), now)
        self.barriers.resend(now)
        if self.life.quorum is not None:
            stream.pull(now)  # catch-ups asked for this round leave now
        if now >= self._expire_at:
            self._expire_at = now + EXPIRE_INTERVAL_S
            work.expire(now)
        propose_purges(self, now)   # expired values and rows (kvsvr/replica/purges.py)
        if stream.serving:
            stream.expire_sessions(now)
        if self.watches.count:
            self.replica_watches.tick(now)
        self.edge.flush()
        checkpoints.maybe_checkpoint(now)
        # A sync wakes this loop only while messages of its own wait for one (the sync
        # thread sends the rest): asked before the last look at what is durable, so a sync
        # ending after that look still wakes it.
        sender.wake_on_sync(bool(sender.held))
        sender.release(now)
        if not sender.held:
            sender.wake_on_sync(False)
        # (Applies that wait for a commit under way are taken up when it wakes the loop.)
        return bool(work.dirty) or (checkpoints.committing is None
                                    and bool(stream.pulled or checkpoints.apply_later))

    def _inbound(self, identity: bytes, payload: bytes, txn: Any, now: float,
                 now_ms: float) -> None:
        self.monitor.add(monitor_ids.NODE_BYTES_IN, len(payload))
        frames, error, error_request_id = _core.decode_frames(payload)
        auth, counters, work = self.peers.auth, self.counters, self.work
        for kind, method, request_id, budget_ms, body in frames:
            try:
                if kind != _REQUEST:
                    raise InvalidArgument("frame.kind: a node only takes requests",
                                          field="frame.kind")
                if auth is not None and method in _PEER_METHODS:
                    try:
                        body = auth.open(method, request_id, body)
                    except InvalidArgument:
                        counters["peer_auth_refused"] += 1
                        raise
                if method == _QUORUM:
                    self._on_quorum(protocol.decode_quorum(body), txn, now, now_ms)
                    continue
                request = protocol.decode_request(method, body)
                counters[METHOD_COUNTER[method]] += 1
                if method in _PEER_METHODS:
                    result = self._peer_request(method, request, txn, now)
                elif method == _FAULTS:
                    self.monitor.add(monitor_ids.NODE_REQUESTS, 1)
                    result = self._set_faults(request)
                elif method in _LOCAL_METHODS:
                    self.monitor.add(monitor_ids.NODE_REQUESTS, 1)
                    result = self._read(method, request, txn)
                elif method == _WATCH:
                    self.monitor.add(monitor_ids.NODE_REQUESTS, 1)
                    self.replica_watches.request(identity, request_id, request, txn, now)
                    continue
                else:
                    self.monitor.add(monitor_ids.NODE_REQUESTS, 1)  # clients' requests only
                    if method == Method.MUTATE:
                        self.stamp_write(request)   # its TTLs become instants (expiry.py)
                    work.client_request(identity, request_id, method, request,
                                        now + min(budget_ms / 1000 or REQUEST_WAIT_S_MAX,
                                                  REQUEST_WAIT_S_MAX), txn, now)
                    continue
                self.edge.answer(identity, _encode_frame(_RESPONSE, 0, request_id, 0,
                                                         _encode(result)))
            except KvError as e:
                work.answer_error(identity, request_id, e)
            except Exception:  # a bug must cost one request, never the node
                log.exception("request %d (method %d) failed", request_id, method)
                work.answer_error(identity, request_id, Internal("internal error"))
        if error is not None:
            counters["bad_frames"] += 1
            self.monitor.add(monitor_ids.NODE_BAD_FRAMES, 1)
            work.answer_error(identity, error_request_id, InvalidArgument(error, field="frame"))

    def _set_faults(self, request: Any) -> dict[str, Any]:
        """The fault hook: messages to peers lost or held back, a slow disk."""
        faults = self.edge.set_faults(request.peer, request.drop, request.delay_ms)
        if request.commit_delay_ms or self.committer.delay_s:
            log.warning("node %s: slow disk: each checkpoint commit waits %d ms first",
                        self.name, request.commit_delay_ms)
        self.committer.delay_s = request.commit_delay_ms / 1000
        return faults

    # --- peers' requests and answers --------------------------------------------------------------
    def _on_quorum(self, messages: list[_core.Message], txn: Any, now: float,
                   now_ms: float) -> None:
        life = self.life
        quorum = life.quorum
        if quorum is None:
            return  # joining: no acceptor state yet, and no vote to give
        # (A floor counts only for requests and choices, so only their keys are looked up:
        # see "Floors" in the core, where the loop over a frame's messages runs.)
        floors = self.checkpoints.floors(txn, _core.floor_keys(messages))
        misaddressed, heard, follow_up = quorum.step_all(messages, now_ms, floors, life.voting)
        if misaddressed:
            self.counters["quorum_misaddressed"] += misaddressed
        if heard:
            for peer in self.peers.linked:
                if heard >> peer.index & 1:
                    peer.heard_at = now
        for message in follow_up:
            if message.kind == _core.MSG_STATE:
                # Where the peer's binlog stood when it answered: data to catch up to.
                life.note_rebuild_target(message.source, message.version)
                continue
            self.work.behind(message.key, message.accepted_ballot)  # BEHIND: a peer is ahead
            ahead = self.peers.by_index[message.source]
            if ahead is not None:
                ahead.next_pull, ahead.pull_idle_s = 0.0, PULL_IDLE_INTERVAL_S  # ask now

    def _peer_request(self, method: int, request: Any, txn: Any, now: float) -> Any:
        if method == Method.VERSIONS:
            return self.barriers.serve_versions(request, txn)
        if method == Method.PULL:
            return self.stream.serve_pull(request)
        if method == Method.HELLO:
            return self.life.answer_hello(request)
        if method == Method.SNAPSHOT:
            return self.stream.serve_snapshot(request, now)
        raise InvalidArgument(f"method: {method} is not a peer request", field="method")

    def _peer_reply(self, peer: Peer, payload: bytes, now: float) -> None:
        frames, _error, _ = _core.decode_frames(payload)
        for _kind, status, request_id, _budget, body in frames:
            peer.heard_at = now
            method, tag = request_id >> 32, request_id & 0xFFFFFFFF  # see peers.request_id
            if method in _STREAM_METHODS:
                if tag != peer.pull_tag:
                    continue  # an answer to a pull given up on (resent or superseded)
                peer.pull_timeout_s = PULL_TIMEOUT_S
            if status != protocol.OK:
                if method in _STREAM_METHODS:
                    self.stream.on_refused(peer, method, now)
                continue  # a refused barrier: another peer answers, or it is asked again
            try:
                if method == Method.PULL:
                    self.stream.on_pull_reply(peer, _pull_reply_decoder.decode(body), now)
                elif method == Method.VERSIONS:
                    if tag in self.barriers.pending:
                        self.barriers.on_reply(peer, tag, _versions_reply_decoder.decode(body))
                elif method == Method.HELLO:
                    self._on_hello_reply(peer, _hello_reply_decoder.decode(body))
                elif method == Method.SNAPSHOT:
                    self.stream.on_snapshot_reply(peer, _snapshot_reply_decoder.decode(body),
                                                  now)
            except msgspec.DecodeError as e:
                self.counters["bad_peer_replies"] += 1
                log.warning("node %s: unreadable answer from %s: %s", self.name, peer.name, e)

    def _recover_open(self, now: float, now_ms: float) -> None:
        """Finish instances accepted here long ago and still not known chosen (a prepare that
        adopts the highest accepted value, ours at least, so the instance always closes)."""
        self._open_checked = now
        quorum = self.life.quorum
        if quorum is None or not self.life.voting:
            return
        checkpoints = self.checkpoints
        open_since = checkpoints.open_since
        with checkpoints.view() as txn:
            for (key, version), since in list(open_since.items()):
                if now - since < OPEN_RECOVER_AFTER_S or quorum.proposing(key, version):
                    continue
                floor = checkpoints.applied(txn, key)
                if floor >= version:
                    del open_since[(key, version)]   # applied meanwhile
                elif floor + 1 == version:
                    if quorum.propose(key, version, None, now_ms, recover=True):
                        self.counters["open_recoveries"] += 1
                        open_since[(key, version)] = now  # next try after another wait
                else:
                    self.stream.pull_soon()   # the versions below it first

    def _watch_peers(self, now: float) -> None:
        self._peers_watched = now
        self.monitor.set(monitor_ids.NODE_BINLOG_LAG,
                         max(self.peers.lag(), self.stream.take_lag_peak()))
        self.peers.watch(self.name, now)

    # --- persist, apply, send ---------------------------------------------------------------------
    def _persist_and_apply(self, now: float) -> None:
        """What the core asks to persist goes to the vote log (votes) or LMDB; what was chosen,
        pulled or copied is applied in the open transaction; then the quorum's messages are
        sent (persist before send: the core is told with advance() once the persist is
        written). A write is answered once chosen."""
        quorum = self.life.quorum
        ready = _core.Ready([], [], []) if quorum is None else quorum.ready()
        persist, send, decided = ready.persist, ready.send, ready.decided
        learned = [] if quorum is None else quorum.take_learned()
        touched, fence, markers, chosen_values = self._scan_ready(persist, decided, now)
        if decided and not fence:
            # (A fence learned this round must be durable before any answer: a voter whose
            # first message it is could otherwise lose its disk, come back as a first life
            # nobody knew, and vote with no memory of the write being answered.)
            self.work.answer_chosen(decided)
        checkpoints, stream = self.checkpoints, self.stream
        pulled, pages = stream.take()
        later = checkpoints.apply_later if checkpoints.committing is None else None
        if not persist and not pulled and not pages and not later and not learned \
                and not chosen_values:
            self._after_commit(send, decided, now)
            return
        started = time.perf_counter()
        open_since = checkpoints.open_since
        for record in learned:
            touched.add(record.key)
            open_since.pop((record.key, record.version), None)
        # Votes go to the vote log (one fdatasync). Fences and the rebuild markers, snapshot
        # pages, and a frame bigger than the whole log are made durable by committing LMDB
        # before anything is sent.
        durable_now = bool(pages) or markers
        if durable_now:
            checkpoints.finish_commit(block=True)   # (rare) LMDB must take them now
        logged: list[PersistRecord] = [*persist, *learned] if learned else persist
        if logged and not durable_now:
            durable_now = self.sender.log_votes(logged, bool(persist), now)
        if quorum is not None and not durable_now:
            quorum.advance(ready)   # (in the vote log frame just written: sends wait for it)
        if checkpoints.committing is not None:
            # A checkpoint is committing: LMDB takes no write until it ends, so the applies
            # wait (what was chosen stays in the core, and pulled records are asked again).
            checkpoints.log_records(None, logged)
            checkpoints.apply_later |= touched
            stream.put_back(pulled)
            self._after_commit(send, decided, now)
            return
        if send and not durable_now and not _core.any_kind(send, _core.MSG_STATE):
            # Sent before the applies below, which nothing sent waits for: the votes leave
            # from the sync thread the moment their frame is durable (the sync runs while
            # this loop applies), the choices at once.
            self.sender.send(send, now)
            send = []
        if later:
            touched |= later
            checkpoints.apply_later = set()
        touched = self._apply(logged, pulled, pages, touched, durable_now, now)
        if self.watches.count:
            self.replica_watches.applied(touched)
        self.counters["apply_us"] += int((time.perf_counter() - started) * 1e6)
        if quorum is not None:
            if durable_now:
                quorum.advance(ready)   # (in the checkpoint _apply made durable)
            more = quorum.ready()
            if more.persist or quorum.take_learned():  # forget() does neither
                raise RuntimeError("quorum asked to persist or apply after forgetting")
            send += more.send
            decided += more.decided
        work = self.work
        work.dirty.update(key for key in touched if key in work.keys)
        self._after_commit(send, decided, now)

    def _scan_ready(self, persist: list[PersistRecord], decided: list[Decided],
                    now: float) -> tuple[set[bytes], bool, bool, bool]:
        """One pass over each list (this runs every round): the keys with versions chosen,
        whether a fence or another marker is to persist, whether a decision carries a value;
        instances accepted and not known chosen are watched (see _recover_open)."""
        touched: set[bytes] = set()
        open_since = self.checkpoints.open_since
        fence = markers = False
        for record in persist:
            if isinstance(record, InstanceRecord):
                if record.chosen_value is not None:
                    touched.add(record.key)
                    open_since.pop((record.key, record.version), None)
                elif record.accepted_ballot:
                    open_since.setdefault((record.key, record.version), now)
            else:
                markers = True
                fence = fence or isinstance(record, FenceRecord)
        chosen_values = False
        for decision in decided:
            touched.add(decision.key)
            chosen_values = chosen_values or decision.value is not None
        return touched, fence, markers, chosen_values

    def _apply(self, logged: list[PersistRecord], pulled: list[Pulled], pages: list[Page],
               touched: set[bytes], durable_now: bool, now: float) -> set[bytes]:
        """The round's records, snapshot pages, pulled records and chosen versions into the
        open transaction (committed at once if `durable_now`). The keys applied."""
        checkpoints, stream = self.checkpoints, self.stream
        try:
            batch = checkpoints.open_batch(now)
            checkpoints.log_records(batch, logged)
            applied = stream.install_pages(batch, pages, touched)
            if stream.copying():
                # Nothing but the copy until it is complete; what was chosen meanwhile
                # stays in the core and is applied right after.
                stream.hold_until_copied(touched)
                touched = set()
                pulled = []
            else:
                touched |= stream.release_copied()
            applied += stream.apply_pulled(batch, pulled, touched, now)
            apply_chosen = checkpoints.apply_chosen
            for key in touched:
                applied += apply_chosen(batch, key)
            stream.save_cursors(batch, pulled, pages)
            stream.trim(batch)
            if self.life.rebuild_pending:
                self.life.save_rebuild_progress(batch)
            if durable_now:
                checkpoints.checkpoint(durable=True)
            self.counters["applied"] += applied
            self.monitor.add(monitor_ids.NODE_MUTATIONS, applied)
        except StorageFull as e:
            self._stop_storage_full(e)
        return touched

    def _after_commit(self, send: list[_core.Message], decided: list[Decided],
                      now: float) -> None:
        checkpoints = self.checkpoints
        if (checkpoints.batch is not None or checkpoints.committing is not None
                or checkpoints.undurable is not None) \
                and _core.any_kind(send, _core.MSG_STATE):
            # A rebuild answer says how far our binlog stood: that must be durable and
            # readable by the peer's pulls, which see only checkpoints.
            checkpoints.checkpoint(durable=True)
        if send:
            self.sender.send(send, now)
        if decided:
            self.work.decided(decided)

    def _stop_storage_full(self, error: StorageFull) -> NoReturn:
        """LMDB cannot take more: every waiting write is answered with why, and the node
        stops (a restart after room is made replays the vote log)."""
        log.error("node %s: %s", self.name, error)
        self.work.fail_all_writes(error)
        raise SystemExit(1) from None

    # --- status -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        votes, counters, life = self.votes, self.counters, self.life
        counters["vote_log_syncs"], sync_ns = votes.syncs   # counted by the sync thread
        counters["vote_log_sync_us"] = sync_ns // 1000
        counters["votes_sent_by_sync_thread"], counters["vote_sends_dropped"], _ = votes.sends
        status = super().status()
        quorum = life.quorum
        peers = self.peers.status(self.clock(), self.edge.faults())
        down = [name for name, p in peers.items() if not p["up"]]
        status.update({
            "role": life.role.value,
            "replica_index": self.index,
            "replicas": self.replicas,
            "incarnation": life.incarnation,
            "health": ("ok" if not down else "degraded" if self.replicas - len(down)
                       >= self.peers.majority else "no-majority")
                      if life.voting else life.role.value,
            "peers": peers,
            "peer_auth": self.peers.auth is not None,   # [security] peer_secret is set
            "quorum": {
                "proposals_in_flight": quorum.proposals_in_flight if quorum else 0,
                "open_instances": quorum.instances if quorum else 0,
                "fast_path": bool(quorum.fast_path) if quorum else False,
            },
            "waiting": {"keys": len(self.work.keys), "barriers": len(self.barriers.pending),
                        "watches": self.watches.count},
            "vote_log": self.sender.status(),
            "checkpoint": self.checkpoints.status(),
        })
        return status


__all__ = ["ReplicaNode"]
