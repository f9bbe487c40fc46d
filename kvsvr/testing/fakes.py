"""In-memory stand-ins for what a replica does outside its round: the clock, the network, the
vote log's fdatasync and the committer's thread. The simulation (kvsvr/testing/replica_sim/)
runs every replica of a group in one process with these, and a seed replays a run exactly:
no wall clock, no thread, and every random choice drawn from a source seeded by the run.

- `Scheduler`: a fake clock and the events due on it, run one at a time in time order.
- `FakeNetwork`: delivers what one host sends another after a seeded delay (so messages
  reorder), or drops it, or delivers it twice; cut links drop everything between two hosts.
- `FakeVoteLog`: a real VoteLog on a real (small) file whose frames become durable only when
  a simulated fdatasync ends; a crash puts back the bytes the disk held at the last one, so
  the replay after a restart finds exactly the durable frames.
- `FakeCommitter`: begins and commits LMDB transactions on the caller's thread; a commit
  lands when the simulation's clock says so (slow commits on demand), and a crash decides
  whether the one under way reached the disk.
- `FakeEdge`: the replica's network interface, handing what a round sends to the simulated
  network.
"""

from __future__ import annotations

import heapq
import itertools
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvsvr import protocol
from kvsvr.committer import Committer
from kvsvr.errors import InvalidArgument
from kvsvr.replica.network import Outbox
from kvsvr.store import Store, WriteBatch
from kvsvr.votelog import VoteLog

US_PER_S = 1_000_000
US_PER_MS = 1_000


class Scheduler:
    """A fake clock (integer microseconds, so sums never drift) and the actions due on it."""

    def __init__(self, start_us: int):
        self.now_us = start_us
        self._events: list[tuple[int, int, Callable[[], None]]] = []
        self._order = itertools.count()   # ties run in the order they were scheduled

    @property
    def now(self) -> float:
        """The clock in seconds, as a replica's round takes it."""
        return self.now_us / US_PER_S

    def at(self, time_us: int, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (max(time_us, self.now_us), next(self._order), action))

    def after(self, delay_us: int, action: Callable[[], None]) -> None:
        self.at(self.now_us + delay_us, action)

    def next_due_us(self) -> int | None:
        return self._events[0][0] if self._events else None

    def run_until(self, time_us: int) -> None:
        """Run every event due by `time_us`, then move the clock there."""
        while self._events and self._events[0][0] <= time_us:
            self.run_next()
        self.now_us = max(self.now_us, time_us)

    def run_next(self) -> bool:
        """Move the clock to the next event and run it; False when none is left."""
        if not self._events:
            return False
        time_us, _, action = heapq.heappop(self._events)
        self.now_us = time_us
        action()
        return True


@dataclass
class LinkFaults:
    """What the network does to each message it carries."""

    drop: float = 0.0          # chance a message is lost
    duplicate: float = 0.0     # chance it is delivered twice (each copy delayed on its own)
    delay_us_min: int = 50     # every message takes at least this long ...
    delay_us_max: int = 2_000  # ... and at most this (uniform, so messages reorder)


class FakeNetwork:
    """Messages between hosts (a replica, a client), each delivered by calling the closure its
    sender handed over. A cut between two hosts loses what is sent across it; what is already
    on its way still arrives (it left before the cut)."""

    def __init__(self, scheduler: Scheduler, rng: random.Random, faults: LinkFaults):
        self.scheduler = scheduler
        self.random = rng
        self.faults = faults
        self._cuts: set[tuple[str, str]] = set()
        self.sent = 0
        self.dropped = 0
        self.duplicated = 0

    def cut(self, a: str, b: str) -> None:
        self._cuts.add((a, b) if a < b else (b, a))

    def mend(self, a: str, b: str) -> None:
        self._cuts.discard((a, b) if a < b else (b, a))

    def heal(self) -> None:
        self._cuts.clear()

    def cut_off(self, a: str, b: str) -> bool:
        return ((a, b) if a < b else (b, a)) in self._cuts

    @property
    def cuts(self) -> list[tuple[str, str]]:
        return sorted(self._cuts)

    def send(self, source: str, target: str, deliver: Callable[[], None]) -> None:
        self.sent += 1
        faults, rng = self.faults, self.random
        if self.cut_off(source, target) or (faults.drop and rng.random() < faults.drop):
            self.dropped += 1
            return
        copies = 2 if faults.duplicate and rng.random() < faults.duplicate else 1
        self.duplicated += copies - 1
        for _ in range(copies):
            self.scheduler.after(rng.randint(faults.delay_us_min, faults.delay_us_max), deliver)


class FakeVoteLog(VoteLog):
    """The replica's VoteLog with the fdatasync taken over by the simulation.

    Frames are written into a real file by VoteLog itself (its ring, codec and replay are
    what a replica runs), never synced by it. A sync the replica asks for begins at once if
    none runs, covers every frame written before it began, and ends after a seeded delay;
    frames are durable only then (or once a checkpoint covers them). `durable_image` is what
    the disk holds after the last sync; `crash()` writes it back over the file, so the frames
    that were never durable are gone and the next life replays exactly the durable ones.

    The sync thread's sends (`add_sender`, `send_after`) are kept here and handed to
    `send(slot, data)` the moment their frame is durable; a crash loses those not sent.
    `unsafe_early_durable` is a bug to catch, not a mode of the product: `synced` says every
    frame written is durable at once, while the disk gets them only at the next sync."""

    def __init__(self, path: str | Path, nonce: int, *, scheduler: Scheduler,
                 rng: random.Random, sync_us: tuple[int, int], wake: Callable[[], None],
                 send: Callable[[int, bytes], None], size: int, sync: bool = True,
                 must_exist: bool = False, unsafe_early_durable: bool = False):
        super().__init__(path, nonce, size=size, sync=sync, must_exist=must_exist)
        self._scheduler = scheduler
        self._random = rng
        self._sync_us = sync_us
        self._wake = wake
        self._send = send
        self._unsafe = unsafe_early_durable
        with open(self.path, "rb") as file:
            self.durable_image = bytearray(file.read())   # what the last sync left on disk
        self._reader = os.open(self.path, os.O_RDONLY)
        self._written: list[tuple[int, int, int]] = []   # (seq, offset, length) not synced
        self._durable = 0         # durable through this frame (syncs, checkpoints, replay)
        self._requested = 0       # the last frame a sync was asked for
        self._syncing = 0         # the last frame the sync under way covers (0: none runs)
        self._wakes = True
        self._slots = 0
        self._waiting: list[tuple[int, int, bytes]] = []   # (seq, slot, data) for send_after
        self._sent = 0
        self.syncs_done = 0
        self.dead = False

    @property
    def synced(self) -> int:
        return self.seq if self._unsafe else self._durable

    @property
    def syncs(self) -> tuple[int, int]:
        return self.syncs_done, 0

    @property
    def sends(self) -> tuple[int, int, int]:
        return self._sent, 0, len(self._waiting)

    def replay(self, *args: Any, **kwargs: Any) -> Any:
        """VoteLog.replay (whatever its records' type); the frames found are durable."""
        records = super().replay(*args, **kwargs)
        self._durable = max(self._durable, self.seq)   # found on disk after a crash
        return records

    def skip_past_stale(self) -> None:
        super().skip_past_stale()
        self._durable = max(self._durable, self.seq)

    # --- writing and syncing ------------------------------------------------------------------
    def write(self, frame: bytes, sync: bool = True) -> None:
        super().write(frame, sync)   # (no sync thread runs: VoteLog only writes)
        self._written.append((self.seq, self.offset - len(frame), len(frame)))
        if not self.sync:
            self._make_durable(self.seq)
        elif sync:
            self._requested = self.seq
            self._start_sync()

    def append(self, frame: bytes) -> None:
        """Write a frame durable at once (the inline path: no simulated delay)."""
        self.write(frame, sync=False)
        self._make_durable(self.seq)

    def _start_sync(self) -> None:
        if self._syncing or self._requested <= self._durable or self.dead:
            return
        # One fdatasync covers every frame written before it began (group commit).
        self._syncing = self.seq
        low, high = self._sync_us
        self._scheduler.after(self._random.randint(low, high), self._sync_ended)

    def _sync_ended(self) -> None:
        if self.dead:
            return
        through, self._syncing = self._syncing, 0
        self.syncs_done += 1
        self._make_durable(through)
        if self._wakes:
            self._wake()
        self._start_sync()

    def _make_durable(self, through: int) -> None:
        """Frames through `through` reach the disk image; the sends waiting for them leave."""
        if through > self._durable:
            self._durable = through
            kept = []
            for seq, offset, length in self._written:
                if seq <= through:
                    self.durable_image[offset:offset + length] = \
                        os.pread(self._reader, length, offset)
                else:
                    kept.append((seq, offset, length))
            self._written = kept
        self._release()

    def _release(self) -> None:
        durable = self.synced
        if not self._waiting or self._waiting[0][0] > durable:
            return
        ready = [w for w in self._waiting if w[0] <= durable]
        self._waiting = [w for w in self._waiting if w[0] > durable]
        for _, slot, data in ready:
            self._sent += 1
            self._send(slot, data)

    def start(self, wake_fd: int) -> None:
        """The sync thread's place: the simulation runs every sync (nothing to start)."""

    def wake_on_sync(self, on: bool) -> None:
        self._wakes = on

    def check(self) -> None:
        """A simulated fdatasync never fails."""

    def add_sender(self, send_fn: int, socket: int) -> int | None:
        """A slot for send_after: what send() is later called with (`socket` is not used)."""
        self._slots += 1
        return self._slots - 1

    def send_after(self, seq: int, slot: int, data: bytes) -> None:
        self._waiting.append((seq, slot, data))
        self._release()

    def checkpointed(self, through: int | None = None) -> None:
        through = self.seq if through is None else through
        super().checkpointed(through)
        # A checkpoint holds these frames' votes: as good as durable (their bytes are
        # taken to have reached the disk too, one of the outcomes a real one can have).
        self._make_durable(through)

    # --- ends -----------------------------------------------------------------------------
    def close(self) -> None:
        """As the sync thread stops: one last sync covers every frame written, and what
        still waited to be sent never is (those votes never were)."""
        self._waiting = []
        self._make_durable(self.seq)
        self._shut()

    def _shut(self) -> None:
        self.dead = True
        super().close()
        if self._reader >= 0:
            os.close(self._reader)
            self._reader = -1

    def crash(self) -> None:
        """The process is gone: what no sync covered never reached the disk."""
        self._waiting = []
        self._shut()
        if self.path.exists():
            with open(self.path, "r+b") as file:
                file.write(self.durable_image)


class FakeCommitter(Committer):
    """Committer's interface on the caller's thread (no thread is started). A commit (or a
    sync of the last commit's meta page) lands `commit_us()` microseconds of simulated time
    after it starts (plus `delay_s`, the FAULTS request's slow disk), and `ended()` is called
    then (the eventfd the real one writes); until then LMDB has not seen it, as on the real
    thread. `landed()` is called after each commit reaches LMDB (what the simulation reads
    of the binlog)."""

    def __init__(self, store: Store, *, scheduler: Scheduler, commit_us: Callable[[], int],
                 ended: Callable[[], None], landed: Callable[[], None] | None = None):
        # (Committer's own __init__ starts its thread: not called.)
        self.store = store
        self.wake_fd: int | None = None
        self.last_commit_us = 0
        self.delay_s = 0.0
        self._scheduler = scheduler
        self._commit_us = commit_us
        self._ended_callback = ended
        self._landed_callback = landed
        self._open: WriteBatch | None = None        # begun and not yet handed to a commit
        self._committing: WriteBatch | None = None  # under commit (None with a sync)
        self._pending = False
        self._landed = False
        self._error: BaseException | None = None
        self._started_us = 0
        self._attempt = 0   # which commit a scheduled landing is for
        self.dead = False

    def begin(self) -> WriteBatch:
        if self._pending:
            raise RuntimeError("a commit is under way: finish() it first")
        self._open = self.store.begin()
        return self._open

    def abort(self, batch: WriteBatch) -> None:
        if self._pending:
            raise RuntimeError("a commit is under way: finish() it first")
        batch.abort()
        if batch is self._open:
            self._open = None

    def start_commit(self, batch: WriteBatch) -> None:
        self._start(batch)

    def start_sync(self) -> None:
        self._start(None)

    def _start(self, batch: WriteBatch | None) -> None:
        if self._pending:
            raise RuntimeError("a commit is under way: finish() it first")
        if batch is self._open:
            self._open = None
        self._pending, self._landed, self._error = True, False, None
        self._committing = batch
        self._started_us = self._scheduler.now_us
        self._attempt += 1
        attempt = self._attempt
        due = self._commit_us() + int(self.delay_s * US_PER_S)
        self._scheduler.after(due, lambda: self._land_scheduled(attempt))

    def _land_scheduled(self, attempt: int) -> None:
        if self.dead or attempt != self._attempt or not self._pending or self._landed:
            return
        self._land()
        self._ended_callback()

    def _land(self) -> None:
        """The commit (or sync) reaches LMDB now."""
        self._landed = True
        self.last_commit_us = self._scheduler.now_us - self._started_us
        try:
            if self._committing is None:
                self.store.sync()
            else:
                self.store.commit(self._committing)
        except BaseException as e:  # handed to finish(), as the thread hands it to the loop
            self._error = e
        if self._committing is not None and self._error is None \
                and self._landed_callback is not None:
            self._landed_callback()
        self._committing = None

    @property
    def pending(self) -> bool:
        return self._pending

    def finish(self, block: bool) -> bool:
        if not self._pending:
            return True
        if not self._landed:
            if not block:
                return False
            self._land()   # the loop waits for it: the simulated time it takes is not counted
        self._pending = False
        error, self._error = self._error, None
        if error is not None:
            raise error
        return True

    def close(self) -> None:
        if self._pending and not self._landed:
            self._land()
        self._pending = False

    def crash(self, rng: random.Random) -> None:
        """The process is gone: the commit under way reached LMDB or not (either can happen
        to a killed process), and the open transaction is lost."""
        self.dead = True
        if self._pending and not self._landed:
            if rng.random() < 0.5:
                self._land()
            elif self._committing is not None:
                self._committing.abort()
        self._pending = False
        if self._open is not None:
            self._open.abort()
            self._open = None


class FakeEdge:
    """The replica's network (kvsvr.replica.network.Network) on a simulated one: what the
    round sends goes to `send_peer(index, messages)` and `answer(identity, message)` instead
    of ZeroMQ sockets. Votes that wait for the vote log go through the vote log's send_after
    (the sync thread's path) while `vote_log_sends()` says so, else the round holds them and
    sends them itself once durable (the path without a sync thread). The FAULTS request's
    hook is not there (the simulated network has faults of its own)."""

    def __init__(self, votes: VoteLog, peers: list[int],
                 send_peer: Callable[[int, list[bytes]], None],
                 answer: Callable[[bytes, bytes], None], vote_log_sends: Callable[[], bool]):
        self._votes = votes
        self._peers = peers
        self._send_peer = send_peer
        self._answer = answer
        self._vote_log_sends = vote_log_sends
        self._outbox = Outbox()

    def send_peer(self, index: int, frames: list[bytes], now: float) -> None:
        self._send_peer(index, protocol.pack(frames))

    def send_after_sync(self, seq: int, index: int, frames: list[bytes]) -> bool:
        if not self._vote_log_sends():
            return False
        for message in protocol.pack(frames):
            self._votes.send_after(seq, index, message)   # (the slot is the peer's index)
        return True

    def release_delayed(self, now: float) -> None:
        """Nothing is held back here (the simulated network delays messages itself)."""

    def answer(self, identity: bytes, frame: bytes) -> None:
        self._outbox.add(identity, frame)

    @property
    def answering(self) -> bool:
        return bool(self._outbox)

    def flush(self) -> None:
        for identity, message in self._outbox.take():
            self._answer(identity, message)

    def set_faults(self, peer: str, drop: float, delay_ms: int) -> dict[str, Any]:
        raise InvalidArgument("faults: not simulated (the simulated network has its own)",
                              field="peer")

    def faults(self) -> dict[int, tuple[float, int]]:
        return {index: (0.0, 0) for index in self._peers}


__all__ = ["FakeCommitter", "FakeEdge", "FakeNetwork", "FakeVoteLog", "LinkFaults",
           "Scheduler"]
