"""A simulated replica: its host (inboxes, lives, the sends of its edge), its real
`ReplicaNode` built on the fakes, and the driver that starts, runs and kills it as the serve
loop and the signals would."""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvsvr.committer import Committer
from kvsvr.config import ClusterConfig
from kvsvr.errors import KvError
from kvsvr.limits import SCAN_ROWS_MAX
from kvsvr.replica import ReplicaNode
from kvsvr.replica.network import Network
from kvsvr.store import Store
from kvsvr.testing.fakes import US_PER_MS, US_PER_S, FakeCommitter, FakeEdge, FakeVoteLog
from kvsvr.testing.replica_sim.clients import describe_answer
from kvsvr.testing.replica_sim.settings import (
    IDLE_ROUND_US,
    INBOXES,
    ROUND_MESSAGES_MAX,
    SIM_VOTE_LOG_BYTES,
)
from kvsvr.votelog import VoteLog

if TYPE_CHECKING:
    from kvsvr.testing.replica_sim.simulation import Simulation


class ReplicaHost:
    """One replica's host: its node (None while down), its inboxes, and its lives."""

    def __init__(self, sim: Simulation, index: int, name: str, config: ClusterConfig):
        self.sim = sim
        self.index = index
        self.name = name
        self.host = name
        self.config = config
        self.data_dir = config.data_dir(config.replica(name)[1])
        self.node: SimReplicaNode | None = None
        self.votes: FakeVoteLog | None = None
        self.committer: FakeCommitter | None = None
        self.life = 0               # a new one at each start: events of an old one are void
        self.inbound: list[list[bytes]] = []           # [identity, payload] at its router
        self.replies: list[tuple[int, bytes]] = []     # (peer index, payload) from its links
        self.woken = False          # a sync or a commit ended since the last round
        self.busy = False           # the last round said more work is ready
        self.round_due_us: int | None = None
        self.next_free_us = 0       # when the last round's simulated cost is over
        self.identities: dict[bytes, Callable[[bytes], None]] = {}  # peers' links, by name
        self.role = "down"          # as of its last round
        self.rebuilding = False     # started on a wiped directory, not yet a voting replica
        self.stopped_cleanly = False   # its last life ended with a clean stop
        self.binlog_read = 0        # the simulation read this life's binlog through here
        self.sync_thread_sends = True   # this life's votes leave from the vote log

    @property
    def up(self) -> bool:
        return self.node is not None

    # --- the node's fakes ---------------------------------------------------------------------
    def make_vote_log(self, path: Path, nonce: int, *, sync: bool,
                      must_exist: bool) -> FakeVoteLog:
        sim = self.sim
        low, high = sim.faults.vote_sync_ms
        self.votes = FakeVoteLog(
            path, nonce, scheduler=sim.scheduler, rng=sim.random_disk,
            sync_us=(int(low * US_PER_MS), int(high * US_PER_MS)), wake=self.woke,
            send=lambda slot, data: self.send_peer(slot, [data], votes=True),
            size=SIM_VOTE_LOG_BYTES, sync=sync, must_exist=must_exist,
            unsafe_early_durable=sim.faults.unsafe_early_durable)
        return self.votes

    def make_committer(self, store: Store) -> FakeCommitter:
        self.committer = FakeCommitter(store, scheduler=self.sim.scheduler,
                                       commit_us=self.sim.commit_us, ended=self.woke,
                                       landed=lambda: self.sim.read_binlog(self, store))
        return self.committer

    # --- arrivals and rounds ------------------------------------------------------------------
    def receive(self, message: list[bytes]) -> None:
        if self.node is None:
            return   # nobody listens: lost
        self.inbound.append(message)
        self.wake()

    def receive_reply(self, peer: int, life: int, payload: bytes) -> None:
        if self.node is None or life != self.life:
            return   # an answer to a link of a life that is gone
        self.replies.append((peer, payload))
        self.wake()

    def woke(self) -> None:
        """A sync or a commit ended (the eventfd the real threads write)."""
        self.woken = True
        self.wake()

    def wake(self, delay_us: int = 0) -> None:
        """Run a round soon (not before the last one's simulated cost is over)."""
        if self.node is None:
            return
        due = max(self.sim.scheduler.now_us + delay_us, self.next_free_us)
        if self.round_due_us is not None and self.round_due_us <= due:
            return
        self.round_due_us = due
        life = self.life
        self.sim.scheduler.at(due, lambda: self._round(life, due))

    def _round(self, life: int, due: int) -> None:
        node = self.node
        if node is None or life != self.life or self.round_due_us != due:
            return
        self.round_due_us = None
        sim = self.sim
        now = sim.scheduler.now
        inbound, self.inbound = self.inbound[:ROUND_MESSAGES_MAX], \
            self.inbound[ROUND_MESSAGES_MAX:]
        replies, self.replies = self.replies[:ROUND_MESSAGES_MAX], \
            self.replies[ROUND_MESSAGES_MAX:]
        woken, self.woken = self.woken, False
        sim.count("rounds")
        try:
            self.busy = sim.driver.round(self, node, inbound, replies, woken, now)
        except SystemExit:
            sim.fail(f"{self.name} stopped itself (storage full?)")
        except Exception:
            sim.fail(f"{self.name}'s round raised:\n{traceback.format_exc()}")
        if sim.errors.messages:
            sim.fail(f"{self.name} logged an error: {sim.errors.messages[0]}")
        self._note_role(str(node.life.role))
        self.next_free_us = sim.scheduler.now_us + sim.random_rounds.randint(
            *sim.faults.round_us)
        if self.busy or self.inbound or self.replies or self.woken:
            self.wake()
        else:
            # As the serve loop's poll: until the open transaction is due to commit, at most.
            due_s = node.due()
            wait_us = IDLE_ROUND_US if due_s is None else \
                min(IDLE_ROUND_US, max(0, int((due_s - now) * US_PER_S)) + US_PER_MS)
            self.wake(wait_us)

    def _note_role(self, role: str) -> None:
        if role != self.role:
            self.sim.note(f"{self.name}: {self.role} -> {role}", fault=False)
            self.role = role
            if role == "replica":
                self.rebuilding = False

    # --- sends (the edge) ---------------------------------------------------------------------
    def send_peer(self, peer: int, payloads: list[bytes], votes: bool = False) -> None:
        """Requests to a peer's router, from this life's link to it (or the vote log's)."""
        sim = self.sim
        target = sim.replicas[peer]
        identity = f"{self.index}:{self.life}{':votes' if votes else ''}".encode()
        source, life = self.index, self.life

        def deliver_reply(payload: bytes) -> None:
            sim.replicas[source].receive_reply(peer, life, payload)

        # The peer answers through its router to this name: the answer comes back to this
        # link while this life lasts (ZeroMQ names each connection).
        target.identities[identity] = deliver_reply
        for payload in payloads:
            sim.network.send(self.host, target.host,
                             functools.partial(target.receive, [identity, payload]))

    def answer(self, identity: bytes, payload: bytes) -> None:
        """An answer through the router: to a client, or to a peer's link."""
        sim = self.sim
        client = sim.hosts_by_identity.get(identity)
        if client is not None:
            sim.network.send(self.host, client.host, functools.partial(client.receive, payload))
            return
        deliver = self.identities.get(identity)
        if deliver is None:
            return   # nobody by that name (a vote log's link, which takes no answers)
        peer = sim.replicas[int(identity.split(b":")[0])]
        sim.network.send(self.host, peer.host, functools.partial(deliver, payload))

    def describe(self, keys: list[bytes]) -> str:
        """Its role and its own copy of each key, read as the node reads (in its open
        transaction, else a read transaction; held key states from memory)."""
        node = self.node
        if node is None:
            return f"{self.name} down"
        checkpoints = node.checkpoints
        parts = [f"{self.name} {node.life.role}"]
        if checkpoints.committing is not None:
            frozen = " ".join(sorted(key.decode() for key in checkpoints.frozen))
            parts[0] += f" (a commit under way, frozen: {frozen or 'none'})"
        with checkpoints.view() as txn:
            for key in keys:
                copy: Any
                try:
                    if key in INBOXES:
                        copy = node.store.scan(txn, key, b"", None, SCAN_ROWS_MAX)
                    else:
                        copy = node.store.get(txn, key)
                except KvError as e:
                    copy = e
                parts.append(f"{key.decode()} {describe_answer(copy)}")
        return ", ".join(parts)


class SimReplicaNode(ReplicaNode):
    """A ReplicaNode whose vote log, committer, network and clock are the simulation's."""

    def __init__(self, host: ReplicaHost):
        self.host = host
        self.clock = host.sim.clock   # (before the parts are built: they take it)
        super().__init__(host.config, host.name)

    def make_vote_log(self, path: Path, nonce: int, *, sync: bool,
                      must_exist: bool) -> VoteLog:
        return self.host.make_vote_log(path, nonce, sync=sync, must_exist=must_exist)

    def make_committer(self, store: Store, name: str) -> Committer:
        return self.host.make_committer(store)

    def make_edge(self) -> Network:
        host = self.host
        return FakeEdge(self.votes, [p.index for p in self.peers.linked], host.send_peer,
                        host.answer, lambda: host.sync_thread_sends)


class ReplicaDriver:
    """Starts, runs and kills a replica's node on the fakes, as its serve loop would."""

    def __init__(self, sim: Simulation):
        self.sim = sim

    def start(self, replica: ReplicaHost) -> None:
        sim = self.sim
        replica.life += 1
        replica.binlog_read = 0
        replica.inbound, replica.replies, replica.woken = [], [], False
        replica.round_due_us = None
        # Votes sent by the sync thread (the path with libzmq found) or by the loop.
        sends = sim.faults.vote_sends
        replica.sync_thread_sends = sends == "sync-thread" or (
            sends == "either" and sim.random_disk.random() < 0.5)
        node = SimReplicaNode(replica)
        if replica.stopped_cleanly and node.counters["votes_replayed"]:
            # A clean stop that found no open transaction (a commit was under way) leaves
            # the votes logged since that commit began to be replayed: harmless, counted.
            sim.count("replays_after_clean_stop")
        replica.stopped_cleanly = False
        # What serve() does before its loop.
        node.stream.repair_half_installed()
        node.votes.start(-1)
        # The first sweep of idle clients within the run (then every CLIENT_SWEEP_INTERVAL_S),
        # so that its writes into the open transaction run too.
        node.next_client_sweep = sim.scheduler.now + sim.random_rounds.uniform(0, 3)
        replica.node = node
        replica.wake()

    def round(self, replica: ReplicaHost, node: SimReplicaNode, inbound: list[list[bytes]],
              replies: list[tuple[int, bytes]], woken: bool, now: float) -> bool:
        """What the serve loop does once it has taken what arrived: True if busy."""
        if now >= node.next_client_sweep:
            node.sweep_idle_clients()
        if woken:
            node.woken(now)
            if not inbound and not replies and not replica.busy and not node.round_due(now):
                return False   # a sync ended and its messages went out: nothing else to do
        by_index = node.peers.by_index
        peers = []
        for index, payload in replies:
            peer = by_index[index]
            assert peer is not None
            peers.append((peer, payload))
        return node.round(inbound, peers, now)

    def crash(self, replica: ReplicaHost) -> None:
        """What SIGKILL does: nothing of the node runs again; what LMDB committed stays (the
        commit under way landed or not), the open transaction is lost, and the vote log
        keeps its durable frames only."""
        node, replica.node = replica.node, None
        assert node is not None and replica.committer is not None and replica.votes is not None
        self._count(node)
        replica.committer.crash(self.sim.random_disk)
        replica.votes.crash()
        node.store.close()
        replica.identities.clear()
        replica._note_role("down")

    def stop(self, replica: ReplicaHost) -> None:
        """What a clean stop (SIGTERM) does: the end of serve(), then the store closes."""
        node = replica.node
        assert node is not None
        node.stop_serving(clean=True)
        self._count(node)
        replica.node = None
        node.store.close()
        replica.identities.clear()
        replica.stopped_cleanly = True
        replica._note_role("down")

    def _count(self, node: SimReplicaNode) -> None:
        for name, value in node.counters.items():   # what paths the run took
            if not name.endswith("_us"):             # (not how long they took: wall time)
                self.sim.count(f"node.{name}", value)

