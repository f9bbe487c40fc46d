"""A log server's disk: topics as append-only segment files, consumer offsets, incarnation.

Layout of a data directory:

    incarnation               one queue record: {"id", "born_ms"} of this life of the disk
    topics/NAME/topic         one queue record: the topic's retention settings
    topics/NAME/<base>.qlog   segments: records (kvsvr/_qlog.pxi) back to back; <base> is the
                              offset of the first record, 20 digits
    offsets.log               consumer-group commits, one record each (latest wins)
    quarantine/               bytes cut from a segment whose tail or middle failed its checks

Writes go to the files at once (page cache); `dirty()` lists what a group commit must
fdatasync, and `mark_durable()` is called once it did: only durable records are ever read
back, so a consumer never sees a message that a crash could take away from this server.

Recovery walks every segment record by record (checksums verified). The first bad or torn
record ends what is served from that segment: the bytes from there to the end are copied to
`quarantine/` (fsynced) and the segment truncated; a later segment still serves (its offsets
say where it starts). Every cut is logged and kept in `recovery` for the status report.

Only a torn tail of the *last* segment (the file ends inside a record) can be bytes that were
never acknowledged: acknowledgements follow fdatasync, so a crash tears only the unsynced
end. Any other cut (a complete record failing its checksum, a cut inside an earlier segment,
a segment overlapping the previous one) may have removed acknowledged messages: the server
then starts a new incarnation (born now), so consumers do not count it whole until the
group's other servers have covered what it lost (consumer.py), and every stored consumer
offset is marked not whole.
"""

from __future__ import annotations

import bisect
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from kvsvr import _core
from quorumq.limits import INDEX_INTERVAL_BYTES, OFFSETS_LOG_BYTES_MAX, TOPICS_MAX

log = logging.getLogger("quorumq.storage")

SEGMENT_SUFFIX = ".qlog"
_encode = msgspec.msgpack.encode


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _write_record_file(path: Path, value: bytes) -> None:
    """Replace `path` atomically with one record holding `value`, durably."""
    tmp = path.with_name(path.name + ".tmp")
    data = _core.encode_queue_records(0, 0, 0, now_ms(), [value])
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_record_file(path: Path) -> bytes:
    """The value of a one-record file; ValueError saying why it is unreadable."""
    data = path.read_bytes()
    try:
        records = _core.decode_queue_records(data)
    except _core.QueueRecordError as e:
        raise ValueError(f"{path}: {e}") from None
    if len(records) != 1:
        raise ValueError(f"{path}: {len(records)} records, expected 1")
    return records[0][4]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Incarnation(msgspec.Struct):
    id: int
    born_ms: int


class TopicSettings(msgspec.Struct):
    retention_bytes: int = 0
    retention_s: int = 0


class OffsetCommit(msgspec.Struct, array_like=True):
    topic: str
    group: str
    offset: int
    whole: bool
    producers: bytes


@dataclass
class Segment:
    base_offset: int
    path: Path
    fd: int
    size: int = 0                  # bytes written
    durable_size: int = 0          # bytes known fdatasynced
    next_offset: int = 0           # offset after the last record written
    durable_next_offset: int = 0
    first_ms: int = 0
    last_ms: int = 0
    # Sparse index: offsets[i] starts at byte positions[i] (one entry per append or per
    # INDEX_INTERVAL_BYTES), so a read scans at most one interval before its first record.
    index_offsets: list[int] = field(default_factory=list)
    index_positions: list[int] = field(default_factory=list)

    def add_index(self, offset: int, position: int) -> None:
        if not self.index_positions or position - self.index_positions[-1] >= \
                INDEX_INTERVAL_BYTES or not self.index_offsets:
            self.index_offsets.append(offset)
            self.index_positions.append(position)

    def position_of(self, offset: int) -> int:
        """A byte position at or before the record of `offset` (within one interval)."""
        i = bisect.bisect_right(self.index_offsets, offset) - 1
        return self.index_positions[i] if i >= 0 else 0


class Topic:
    """One topic's segments on this server."""

    def __init__(self, name: str, directory: Path, settings: TopicSettings,
                 segment_bytes: int, recovery: list[dict[str, Any]], quarantine: Path):
        self.lost_acknowledged = False   # recovery cut bytes that may have been acknowledged
        self.name = name
        self.directory = directory
        self.settings = settings
        self.segment_bytes = segment_bytes
        self.segments: list[Segment] = []
        self._recover(recovery, quarantine)
        if not self.segments:
            self._new_segment(0)

    # --- recovery ------------------------------------------------------------------------------
    def _recover(self, recovery: list[dict[str, Any]], quarantine: Path) -> None:
        paths = sorted(p for p in self.directory.iterdir() if p.name.endswith(SEGMENT_SUFFIX))
        expected_next = None
        for number, path in enumerate(paths):
            try:
                base = int(path.name[:-len(SEGMENT_SUFFIX)])
            except ValueError:
                self._quarantine(path, 0, quarantine, recovery, "not a segment name")
                continue
            data = path.read_bytes()
            segment = Segment(base, path, os.open(path, os.O_RDWR), next_offset=base)
            pos = 0
            problem: tuple[int, str] | None = None
            while pos < len(data):
                end, count, first, last, last_ms, stop, reason = _core.scan_queue_records(
                    data, pos, INDEX_INTERVAL_BYTES)
                if count:
                    if first < segment.next_offset:
                        problem = (pos, f"offset {first} goes backwards (expected >= "
                                        f"{segment.next_offset})")
                        self.lost_acknowledged = True
                        break
                    segment.index_offsets.append(first)
                    segment.index_positions.append(pos)
                    if not segment.first_ms:
                        segment.first_ms = _first_ms(data, pos)
                    segment.next_offset = last + 1
                    segment.last_ms = last_ms
                    pos = end
                if stop != _core.SCAN_END:
                    problem = (pos, reason or "bad record")
                    if stop != _core.SCAN_TRUNCATED or number != len(paths) - 1:
                        self.lost_acknowledged = True
                    break
                if not count:
                    break
            if problem is not None:
                cut, reason = problem
                self._cut(segment, data, cut, reason, quarantine, recovery)
            segment.size = segment.durable_size = pos if problem is None else problem[0]
            segment.durable_next_offset = segment.next_offset
            if expected_next is not None and segment.base_offset < expected_next:
                os.close(segment.fd)
                self._quarantine(path, 0, quarantine, recovery,
                                 f"segment starts at {base}, inside the previous one")
                self.lost_acknowledged = True
                continue
            expected_next = segment.next_offset
            self.segments.append(segment)
            if problem is None:
                self._cut_bytes = 0
        if self.segments and self._cut_bytes:
            # Never hand out again an offset the cut bytes may have used (a consumer may
            # have read past it before the crash): skip as many as they could hold.
            damaged = self.segments[-1]
            skip = self._new_segment(damaged.next_offset + self._cut_bytes //
                                     _core.QUEUE_RECORD_HEADER_BYTES + 1)
            # Durable before anything is served: else a crash now would hand the skipped
            # offsets out again.
            os.fsync(skip.fd)
            _fsync_dir(self.directory)
            self.new_files = False

    _cut_bytes = 0   # bytes the last recovered segment lost to a cut

    def _cut(self, segment: Segment, data: bytes, cut: int, reason: str, quarantine: Path,
             recovery: list[dict[str, Any]]) -> None:
        self._cut_bytes = len(data) - cut
        quarantine.mkdir(exist_ok=True)
        target = quarantine / f"{self.name}.{segment.path.name}.at{cut}.{now_ms()}"
        with open(target, "wb") as f:   # the copy is durable before the original is cut
            f.write(data[cut:])
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(quarantine)
        os.ftruncate(segment.fd, cut)
        os.fsync(segment.fd)
        report = {"topic": self.name, "segment": segment.path.name, "byte": cut,
                  "bytes_cut": len(data) - cut, "after_offset": segment.next_offset - 1,
                  "reason": reason, "quarantined_to": str(target)}
        recovery.append(report)
        log.error("topic %s: segment %s is damaged at byte %d (%s): %d bytes moved to %s; "
                  "records before it are served", self.name, segment.path.name, cut, reason,
                  len(data) - cut, target)

    def _quarantine(self, path: Path, cut: int, quarantine: Path,
                    recovery: list[dict[str, Any]], reason: str) -> None:
        quarantine.mkdir(exist_ok=True)
        target = quarantine / f"{self.name}.{path.name}.{now_ms()}"
        shutil.move(str(path), target)
        recovery.append({"topic": self.name, "segment": path.name, "byte": cut,
                         "reason": reason, "quarantined_to": str(target)})
        log.error("topic %s: %s %s: moved to %s", self.name, path.name, reason, target)

    # --- writing -------------------------------------------------------------------------------
    def _new_segment(self, base: int) -> Segment:
        path = self.directory / f"{base:020d}{SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        segment = Segment(base, path, fd, next_offset=base, durable_next_offset=base)
        self.segments.append(segment)
        self.new_files = True
        return segment

    new_files = False  # a segment was created since the last sync: the directory needs one

    @property
    def active(self) -> Segment:
        return self.segments[-1]

    @property
    def end_offset(self) -> int:
        return self.active.next_offset

    @property
    def durable_end_offset(self) -> int:
        return self.active.durable_next_offset

    @property
    def start_offset(self) -> int:
        for segment in self.segments:
            if segment.durable_next_offset > segment.base_offset:
                return segment.index_offsets[0] if segment.index_offsets else segment.base_offset
        return self.active.durable_next_offset

    def append(self, producer_id: int, first_seq: int, values: list[bytes],
               append_ms: int) -> tuple[int, Segment]:
        """Write a batch (not yet durable); returns its first offset and the segment."""
        segment = self.active
        # Log times never go backwards (time_offset and retention bisect by them), even if
        # the wall clock does.
        append_ms = max(append_ms, segment.last_ms)
        if segment.size >= self.segment_bytes:
            segment = self._new_segment(segment.next_offset)
        first = segment.next_offset
        data = _core.encode_queue_records(first, producer_id, first_seq, append_ms, values)
        try:
            written = os.pwrite(segment.fd, data, segment.size)
            if written != len(data):
                raise OSError(f"short write: {written} of {len(data)} bytes")
        except OSError:
            os.ftruncate(segment.fd, segment.size)  # leave no torn batch behind us
            raise
        position = segment.size
        segment.add_index(first, position)
        inner = 0
        while True:  # a large batch gets an index entry every INDEX_INTERVAL_BYTES inside it
            inner = _core.scan_queue_records(data, inner, INDEX_INTERVAL_BYTES, verify=False)[0]
            if inner >= len(data):
                break
            segment.index_offsets.append(_offset_at(data, inner))
            segment.index_positions.append(position + inner)
        segment.size += len(data)
        segment.next_offset = first + len(values)
        if not segment.first_ms:
            segment.first_ms = append_ms
        segment.last_ms = append_ms
        return first, segment

    # --- reading -------------------------------------------------------------------------------
    def read(self, offset: int, max_bytes: int) -> tuple[bytes, int]:
        """Durable whole records from `offset` (or the first one after it), at most
        `max_bytes` unless the first record alone is larger; and the offset to read next."""
        start = self.start_offset
        if offset < start:
            offset = start
        for i, segment in enumerate(self.segments):
            if offset >= segment.durable_next_offset:
                continue
            if i + 1 < len(self.segments) and offset >= self.segments[i + 1].base_offset:
                continue
            position = segment.position_of(offset)
            length = segment.durable_size - position
            if length <= 0:
                continue
            # One index interval before the wanted record, then the records themselves.
            chunk = os.pread(segment.fd, min(length, max_bytes + INDEX_INTERVAL_BYTES +
                                             _core.QUEUE_MESSAGE_BYTES_MAX), position)
            at = _core.seek_queue_records(chunk, 0, offset)
            end, count, _first, last, _ms, _stop, _reason = _core.scan_queue_records(
                chunk, at, max_bytes, verify=False)
            if count == 0:
                return b"", offset
            return chunk[at:end], last + 1
        return b"", max(offset, self.durable_end_offset)

    def time_offset(self, append_ms: int) -> int:
        """The first durable offset appended at or after `append_ms` (the end if none)."""
        for segment in self.segments:
            if segment.durable_size == 0 or segment.last_ms < append_ms:
                continue
            data = os.pread(segment.fd, segment.durable_size, 0)
            at = _core.seek_queue_records(data, 0, 0, append_ms)
            if at < len(data):
                return _offset_at(data, at)
        return self.durable_end_offset

    # --- retention -----------------------------------------------------------------------------
    def enforce_retention(self, now: int) -> list[Segment]:
        """Drop the oldest segments past the size or age bound (whole, durable segments only;
        the active one rolls first when it is too old). Returns the dropped segments."""
        settings = self.settings
        if settings.retention_s and self.active.durable_size and \
                self.active.size == self.active.durable_size and \
                self.active.last_ms < now - settings.retention_s * 1000:
            self._new_segment(self.active.next_offset)
        dropped = []
        total = sum(s.size for s in self.segments)
        while len(self.segments) > 1:
            oldest = self.segments[0]
            if oldest.durable_size != oldest.size:
                break
            too_big = settings.retention_bytes and total > settings.retention_bytes
            too_old = settings.retention_s and oldest.last_ms < now - settings.retention_s * 1000
            if not (too_big or too_old):
                break
            self.segments.pop(0)
            total -= oldest.size
            os.close(oldest.fd)
            oldest.path.unlink(missing_ok=True)
            dropped.append(oldest)
        return dropped

    def bytes(self) -> int:
        return sum(s.size for s in self.segments)

    def close(self) -> None:
        for segment in self.segments:
            os.close(segment.fd)
        self.segments.clear()


def _offset_at(data: bytes, position: int) -> int:
    return int.from_bytes(data[position + 16:position + 24], "little")


def _first_ms(data: bytes, position: int) -> int:
    return int.from_bytes(data[position + 40:position + 48], "little")


SyncItem = tuple[Any, int, int, int]


class ServerStore:
    """Every topic, the offsets log and the incarnation of one server's data directory."""

    def __init__(self, path: str | Path, *, segment_bytes: int):
        self.path = Path(path)
        self.segment_bytes = segment_bytes
        self.recovery: list[dict[str, Any]] = []
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "topics").mkdir(exist_ok=True)
        self.quarantine = self.path / "quarantine"
        self.incarnation = self._incarnation()
        self.topics: dict[str, Topic] = {}
        for directory in sorted((self.path / "topics").iterdir()):
            try:
                settings = msgspec.msgpack.decode(_read_record_file(directory / "topic"),
                                                  type=TopicSettings)
            except (OSError, ValueError, msgspec.DecodeError) as e:
                self.recovery.append({"topic": directory.name, "reason": f"unreadable topic "
                                      f"settings ({e}); retention defaults (none) apply"})
                log.error("topic %s: unreadable settings (%s); serving without retention",
                          directory.name, e)
                settings = TopicSettings()
            self.topics[directory.name] = Topic(directory.name, directory, settings,
                                                segment_bytes, self.recovery, self.quarantine)
        self.offsets: dict[tuple[str, str], OffsetCommit] = {}
        self._offsets_path = self.path / "offsets.log"
        lost = [name for name, topic in self.topics.items() if topic.lost_acknowledged]
        if lost:
            # Messages this disk acknowledged may be gone: it is a new life, not whole.
            self.incarnation = self._new_incarnation()
            self.recovery.append({"reason": "records that may have been acknowledged were "
                                  f"cut from topic(s) {', '.join(lost)}: new incarnation "
                                  f"{self.incarnation.id:016x}"})
            log.error("topic(s) %s lost records that may have been acknowledged: new "
                      "incarnation %016x (consumers do not count this server until the "
                      "others cover what it lost)", ", ".join(lost), self.incarnation.id)
        self._load_offsets(not_whole=bool(lost))
        self._offsets_fd = os.open(self._offsets_path, os.O_RDWR | os.O_CREAT | os.O_APPEND,
                                   0o644)
        self._offsets_size = os.fstat(self._offsets_fd).st_size
        self.offsets_dirty = False

    def _incarnation(self) -> Incarnation:
        """This disk's life. A missing file means a new disk (or a wiped one): a new id."""
        path = self.path / "incarnation"
        if path.exists():
            try:
                return msgspec.msgpack.decode(_read_record_file(path), type=Incarnation)
            except (ValueError, msgspec.DecodeError) as e:
                # Unreadable: whatever this disk held cannot be vouched for: a new life.
                log.error("incarnation file unreadable (%s): starting a new incarnation", e)
                self.recovery.append({"reason": f"incarnation file unreadable ({e}): "
                                      "new incarnation"})
        return self._new_incarnation()

    def _new_incarnation(self) -> Incarnation:
        incarnation = Incarnation(secrets.randbits(63) | 1, now_ms())
        _write_record_file(self.path / "incarnation", _encode(incarnation))
        log.info("new incarnation %016x born at %d ms", incarnation.id, incarnation.born_ms)
        return incarnation

    # --- topics --------------------------------------------------------------------------------
    def create_topic(self, name: str, settings: TopicSettings, *,
                     update: bool = False) -> Topic:
        """The topic, created with `settings` if it is new; an existing one takes `settings`
        only when `update` says so."""
        topic = self.topics.get(name)
        if topic is not None:
            if update and topic.settings != settings:
                _write_record_file(topic.directory / "topic", _encode(settings))
                topic.settings = settings
            return topic
        if len(self.topics) >= TOPICS_MAX:
            raise ValueError(f"topic: this server holds {TOPICS_MAX} topics, the limit")
        directory = self.path / "topics" / name
        directory.mkdir(exist_ok=True)
        _write_record_file(directory / "topic", _encode(settings))
        _fsync_dir(self.path / "topics")
        topic = Topic(name, directory, settings, self.segment_bytes, self.recovery,
                      self.quarantine)
        self.topics[name] = topic
        return topic

    # --- offsets -------------------------------------------------------------------------------
    def _load_offsets(self, *, not_whole: bool = False) -> None:
        if not self._offsets_path.exists():
            return
        data = self._offsets_path.read_bytes()
        end, _count, _f, _l, _ms, stop, reason = _core.scan_queue_records(data)
        for record in _core.decode_queue_records(data[:end]):
            try:
                commit = msgspec.msgpack.decode(record[4], type=OffsetCommit)
            except msgspec.DecodeError:
                continue
            if not_whole:
                commit.whole = False
            self.offsets[(commit.topic, commit.group)] = commit
        if stop != _core.SCAN_END:
            self.recovery.append({"file": "offsets.log", "byte": end, "reason": reason,
                                  "bytes_cut": len(data) - end})
            log.error("offsets.log damaged at byte %d (%s): later commits dropped", end, reason)
        self._rewrite_offsets()

    def _rewrite_offsets(self) -> None:
        """The latest commit of each (topic, group), durably, in place of the log."""
        values = [_encode(c) for c in self.offsets.values()]
        tmp = self._offsets_path.with_name("offsets.log.tmp")
        with open(tmp, "wb") as f:
            for start in range(0, len(values), _core.QUEUE_BATCH_MESSAGES_MAX):
                f.write(_core.encode_queue_records(0, 0, 0, now_ms(),
                                                   values[start:start + 4096]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._offsets_path)
        _fsync_dir(self.path)

    def commit_offset(self, commit: OffsetCommit) -> None:
        """Append a commit (durable at the next sync)."""
        data = _core.encode_queue_records(0, 0, 0, now_ms(), [_encode(commit)])
        os.write(self._offsets_fd, data)
        self._offsets_size += len(data)
        self.offsets[(commit.topic, commit.group)] = commit
        self.offsets_dirty = True

    def maybe_compact_offsets(self) -> None:
        if self._offsets_size > OFFSETS_LOG_BYTES_MAX and not self.offsets_dirty:
            os.close(self._offsets_fd)
            self._rewrite_offsets()
            self._offsets_fd = os.open(self._offsets_path, os.O_RDWR | os.O_APPEND)
            self._offsets_size = os.fstat(self._offsets_fd).st_size

    # --- group commit --------------------------------------------------------------------------
    def dirty(self) -> list[SyncItem]:
        """What the next sync must cover: (segment, directory or None for the offsets log;
        fd or -1 for a directory; the segment's size and next offset as written now)."""
        out: list[SyncItem] = []
        for topic in self.topics.values():
            if topic.new_files:
                topic.new_files = False
                out.append((topic.directory, -1, 0, 0))
            for segment in topic.segments:
                if segment.size != segment.durable_size:
                    out.append((segment, segment.fd, segment.size, segment.next_offset))
        if self.offsets_dirty:
            self.offsets_dirty = False
            out.append((None, self._offsets_fd, 0, 0))
        return out

    @staticmethod
    def sync(items: list[SyncItem], sync: bool) -> None:
        """fdatasync every item (runs on the sync thread: no Python state is touched)."""
        if not sync:
            return
        for what, fd, _size, _next in items:
            if fd >= 0:
                os.fdatasync(fd)
            else:
                _fsync_dir(what)

    @staticmethod
    def mark_durable(items: list[SyncItem]) -> None:
        """After sync(items): segments are durable up to the size and offset they had."""
        for what, _fd, size, next_offset in items:
            if isinstance(what, Segment):
                what.durable_size = max(what.durable_size, size)
                what.durable_next_offset = max(what.durable_next_offset, next_offset)

    def close(self) -> None:
        for topic in self.topics.values():
            topic.close()
        os.close(self._offsets_fd)
