"""The acceptor's vote log: the version quorum's records made durable with one fdatasync.

A replica must persist its votes (promises, accepted values, learned choices) before it sends
the messages that reveal them. Doing that in an LMDB commit costs two fdatasyncs and a page
per touched key every round; here a round's records are one frame written into a file that was
filled with zeros when it was made, so the fdatasync writes the frame's blocks and nothing
else (no size change, no extent to allocate, so no journal commit on ext4).

LMDB takes the same records (and the applies they lead to) in a write transaction that stays
open across rounds and commits every few tens of milliseconds: a checkpoint. The commit runs
on a thread of its own while the loop goes on writing frames, so the log is a ring: a
checkpoint stores `votes/through`, the sequence number of the last frame it covers, and the
offset where the frame after it goes (`mark()`); once it has committed, the room of the frames
it covers is free again (`checkpointed()`). A frame goes right after the last one, or at
offset 0 when it does not fit before the end (or nothing is live), never over a frame no
committed checkpoint covers. After a crash, the frames after `through` are replayed on top of
LMDB from that offset (continuing at 0 where the ring wrapped): they hold every vote the lost
transaction held.

The fdatasync runs on a native thread (`start()`, kvsvr/_syncer.pyx): the loop writes a
round's frame and goes on with the next round while the disk works, and holds back the
messages that reveal the votes until `synced` reaches the frame's sequence number. One
fdatasync covers every frame written before it began, so while one is under way the next
rounds' frames wait for a single following one (group commit). Without the thread, `append()`
writes and syncs inline.

Frame: u32 payload length, u64 sequence, u64 xxh64 of (length, sequence, payload) seeded
with the log's nonce, payload (msgpack list of records, each the array of its fields with its
kind first: the core's named persist records, rebuilt as such by `replay`). Reading stops at
the first frame that is torn, fails its checksum, or does not continue the sequence (after
looking once at offset 0 for the continuation): frames left from before a wrap have older
sequence numbers, so they can never be mistaken for the continuation, and each sequence
number is written once: after a crash, frames past a torn one may still be on disk (written,
never durable), so a replica numbers its next frames past anything the file can hold
(`skip_past_stale`) and checkpoints that number before it votes. A later frame found where
the first after the checkpoint was due, with that first frame nowhere, is such a
never-durable tail (a sync covers a prefix).
The nonce is drawn once per LMDB environment and kept in it, so frames of a file that
outlived its LMDB (a data directory half deleted) fail their checksum instead of being
replayed into another.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgspec
from xxhash import xxh64_intdigest

from kvsvr._core import PersistRecord, persist_record
from kvsvr._syncer import Syncer
from kvsvr.limits import VOTE_LOG_BYTES

log = logging.getLogger("kvsvr.votelog")
_HEADER = struct.Struct("<IQQ")   # payload length, sequence, checksum
_SUM_PREFIX = struct.Struct("<IQ")
_ZERO_CHUNK = 1 << 20
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[list[Any]])


class VoteLogDamaged(RuntimeError):
    """The log's frames after the last checkpoint do not start where the checkpoint ended."""


def _checksum(nonce: int, length: int, seq: int, payload: bytes) -> int:
    return xxh64_intdigest(_SUM_PREFIX.pack(length, seq) + payload, seed=nonce)


class VoteLog:
    def __init__(self, path: str | Path, nonce: int, *, size: int = VOTE_LOG_BYTES,
                 sync: bool = True, must_exist: bool = False):
        if size < 4096:
            raise ValueError(f"size: {size} bytes, a vote log needs at least 4096")
        self.path = Path(path)
        self.nonce = nonce
        self.size = size
        self.sync = sync
        self.seq = 0          # the last frame's sequence number (written or replayed)
        self.offset = 0       # where the last frame written ends
        # Frames no committed checkpoint covers yet: (sequence, offset, length), oldest first.
        self._live: deque[tuple[int, int, int]] = deque()
        self._live_bytes = 0
        self._synced = 0      # durable through this frame (inline syncs and checkpoints)
        self._syncs = 0       # inline fdatasyncs, and the time they took
        self._sync_ns = 0
        self._syncer: Syncer | None = None
        fresh = not self.path.exists() or self.path.stat().st_size < size
        if fresh and must_exist:
            # Its votes since the last checkpoint are gone: voting on as if they had never
            # been cast could let two values be chosen. Only a rebuild from the peers is safe.
            raise VoteLogDamaged(
                f"{self.path} is missing or cut short, so this replica's votes since its "
                "last checkpoint are lost; move its data directory away (or wipe it) and "
                "start it again: it then rebuilds from its peers before it votes")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fresh:
            self._fill_zeros()

    def _fill_zeros(self) -> None:
        chunk = bytes(_ZERO_CHUNK)
        written = 0
        while written < self.size:
            written += os.pwrite(self._fd, chunk[:self.size - written], written)
        os.fsync(self._fd)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)   # the file's name is durable too
        finally:
            os.close(directory)

    def close(self) -> None:
        if self._syncer is not None:
            self._syncer.close()   # after the sync under way, and one for frames waiting
            self._syncer = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # --- recovery -------------------------------------------------------------------------
    def replay(self, through: int, start: int = 0) -> list[PersistRecord]:
        """The records of every frame after sequence `through` (the last checkpoint), which
        it said goes at offset `start`, in order; afterwards `seq` is the last frame's
        sequence number."""
        records: list[PersistRecord] = []
        offset, previous, expected = start, None, through + 1
        tried_zero = start == 0
        ahead = 0   # a later frame found where the next one was to go
        while True:
            frame = self._read_frame(offset)
            if frame is not None and previous is not None and frame[0] != previous + 1:
                frame = None   # a frame from before the last wrap: not the continuation
            if frame is not None and previous is None and start and frame[0] != expected:
                # Not the next frame: it went to offset 0 (nothing was live then), and the
                # frames after it may since have reached this offset.
                ahead = max(ahead, frame[0])
                frame = None
            if frame is None and not tried_zero:
                # The ring goes on at offset 0 where a frame did not fit before the end (or
                # nothing was live when it was written): look there once.
                tried_zero, offset = True, 0
                continue
            if frame is None:
                break
            seq, length, payload = frame
            if seq > through:
                if seq != expected:
                    raise VoteLogDamaged(
                        f"{self.path}: frame {seq} follows checkpoint {through}; frames "
                        f"{expected}..{seq - 1} are missing")
                try:
                    records.extend(persist_record(r) for r in _decoder.decode(payload))
                except ValueError as e:
                    raise VoteLogDamaged(f"{self.path}: frame {seq}: {e}") from None
                expected = seq + 1
            previous = seq
            offset += _HEADER.size + length
        if ahead > through and expected == through + 1:
            # Frame `expected` never reached the disk whole, so no fdatasync ever covered it
            # or anything after it (each covers a prefix): those votes were never revealed,
            # and the later frame is writeback of a tail that was never durable (a power cut).
            log.warning("%s: frame %d is on disk but frame %d, the first after checkpoint %d, "
                        "is not: the log ends at the checkpoint (the frames after it were "
                        "never durable, so none of their votes was sent)", self.path, ahead,
                        expected, through)
        self.seq = max(through, expected - 1)
        self._synced = self.seq   # replayed frames were found on disk after a crash
        return records

    def skip_past_stale(self) -> None:
        """Number the next frames past any frame the file may still hold. After a crash the
        log can hold frames beyond where replay stopped (written, never durable, the one
        before them torn); a new frame reusing the next number could end where such a frame
        begins and make it look like the continuation at the next replay. No file holds more
        frames than fit in it, so a gap of that many numbers makes every older frame older
        than the new ones. The caller then checkpoints this sequence number."""
        self.seq += self.size // (_HEADER.size + 1) + 1
        self._synced = max(self._synced, self.seq)

    def _read_frame(self, offset: int) -> tuple[int, int, bytes] | None:
        """(sequence, length, payload) of a whole frame at `offset`, else None."""
        if offset < 0 or offset + _HEADER.size > self.size:
            return None
        length, seq, checksum = _HEADER.unpack(os.pread(self._fd, _HEADER.size, offset))
        if length == 0 or offset + _HEADER.size + length > self.size:
            return None
        payload = os.pread(self._fd, length, offset + _HEADER.size)
        if _checksum(self.nonce, length, seq, payload) != checksum:
            return None   # torn by a crash mid-write (never acknowledged), or another log's
        return seq, length, payload

    # --- writing --------------------------------------------------------------------------
    def frame(self, records: list[PersistRecord]) -> bytes:
        """The next frame holding `records` (not yet written)."""
        payload = _encoder.encode(records)
        seq = self.seq + 1
        return _HEADER.pack(len(payload), seq,
                            _checksum(self.nonce, len(payload), seq, payload)) + payload

    def _place(self, length: int) -> int | None:
        """Where a frame of `length` bytes goes now, or None if it does not fit."""
        if not self._live:
            return 0 if length <= self.size else None
        start = self._live[0][1]
        if self.offset > start:            # live frames run from `start` to `offset`
            if self.offset + length <= self.size:
                return self.offset
            return 0 if length <= start else None
        # wrapped: live from `start` to the end, and from 0 to `offset`
        return self.offset if self.offset + length <= start else None

    def fits(self, frame: bytes) -> bool:
        return self._place(len(frame)) is not None

    def write(self, frame: bytes, sync: bool = True) -> None:
        """Write a frame made by frame(); it is durable once `synced` reaches its sequence
        number (at once when sync is off: it is then in the page cache, which survives the
        process being killed). With the sync thread started, this does not wait for it.
        `sync` false: ask no fdatasync for it (nothing waits for it); the next one covers it."""
        offset = self._place(len(frame))
        if offset is None:
            raise ValueError(f"vote log: a {len(frame)}-byte frame does not fit (live "
                             f"{self._live_bytes} of {self.size} bytes); checkpoint first")
        written = os.pwrite(self._fd, frame, offset)
        if written != len(frame):
            raise OSError(f"{self.path}: short write ({written} of {len(frame)} bytes)")
        self.offset = offset + len(frame)
        self.seq += 1
        self._live.append((self.seq, offset, len(frame)))
        self._live_bytes += len(frame)
        if not self.sync:
            self._synced = self.seq
        elif self._syncer is not None and sync:
            self._syncer.request(self.seq)

    def append(self, frame: bytes) -> None:
        """Write a frame and make it durable before returning."""
        self.write(frame)
        if self._syncer is not None:
            self._syncer.wait(self.seq)
            self.check()
        elif self._synced < self.seq:
            # A failure raises and is never retried: after a failed fdatasync the kernel may
            # have dropped the pages it could not write.
            started = time.perf_counter_ns()
            os.fdatasync(self._fd)
            self._sync_ns += time.perf_counter_ns() - started
            self._syncs += 1
            self._synced = self.seq

    def start(self, wake_fd: int) -> None:
        """Sync on a native thread from now on; after each sync (or a failure) it writes 1 to
        the eventfd `wake_fd`, so a loop polling it sends what waited for the frames (see
        wake_on_sync)."""
        if self.sync and self._syncer is None:
            self._syncer = Syncer(self._fd, wake_fd, self._synced)
            if self.seq > self._synced:
                self._syncer.request(self.seq)

    def wake_on_sync(self, on: bool) -> None:
        """Whether each finished sync writes the eventfd given to start() (a failed one
        always does); on until turned off. Without a sync thread: nothing to do."""
        if self._syncer is not None:
            self._syncer.wake_on_sync(on)

    def add_sender(self, send_fn: int, socket: int) -> int | None:
        """Hand a ZeroMQ socket (libzmq handle) to the sync thread for send_after; its slot,
        or None without a sync thread (the caller then sends once `synced` says so)."""
        if self._syncer is None or not send_fn:
            return None
        return self._syncer.add_socket(send_fn, socket)

    def send_after(self, seq: int, slot: int, data: bytes) -> None:
        """Send `data` on socket `slot` the moment frames up to `seq` are durable. Never
        sent if the thread stops first (a failed sync, or close): those votes never were."""
        assert self._syncer is not None
        self._syncer.send_after(seq, slot, data)

    @property
    def sends(self) -> tuple[int, int, int]:
        """(messages the sync thread sent, refused by a full socket, still waiting)."""
        return (0, 0, 0) if self._syncer is None else self._syncer.sends

    @property
    def synced(self) -> int:
        """Every frame up to this sequence number is durable."""
        if self._syncer is None:
            return self._synced
        return max(self._synced, self._syncer.synced)

    @property
    def syncs(self) -> tuple[int, int]:
        """(fdatasyncs done, nanoseconds they took)."""
        if self._syncer is None:
            return self._syncs, self._sync_ns
        _, syncs, sync_ns, _ = self._syncer.stats
        return self._syncs + syncs, self._sync_ns + sync_ns

    def check(self) -> None:
        """Raise if the sync thread's fdatasync failed: the node must stop."""
        if self._syncer is not None:
            error = self._syncer.stats[3]
            if error:
                raise OSError(error, f"{self.path}: fdatasync failed: {os.strerror(error)}; "
                              "the votes since the last checkpoint may not be on disk")

    def mark(self) -> tuple[int, int]:
        """What a checkpoint beginning now covers and where replay then starts: (the last
        frame's sequence number, the offset the next frame goes at unless it wraps)."""
        return self.seq, self.offset

    def checkpointed(self, through: int | None = None) -> None:
        """Frames up to `through` (default: all so far) are durable elsewhere (a checkpoint
        committed them): their room is free."""
        through = self.seq if through is None else through
        live = self._live
        while live and live[0][0] <= through:
            self._live_bytes -= live.popleft()[2]
        if through > self._synced:
            self._synced = through
        if self._syncer is not None:
            self._syncer.mark_durable(through)

    @property
    def frames(self) -> int:
        """Frames no committed checkpoint covers."""
        return len(self._live)

    @property
    def used(self) -> int:
        """Bytes of the frames no committed checkpoint covers."""
        return self._live_bytes
