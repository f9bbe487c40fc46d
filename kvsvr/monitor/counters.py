"""Open (or create) a machine's counters file and map it (the I/O edge of `_core.Counters`).

A new file is built under a temporary name (sized, header written) and then hard-linked to its
real name, which fails if another process got there first: nobody ever maps a file whose header
is half written, and two processes starting at once end up on the same file.

One file per machine and cluster: its default name carries the cluster's name and a hash of its
node addresses (`cluster_counters_path`), so two clusters on one machine never mix their counts.

The core indexes slots by id, and the default sizing has a slot for every id (1..65,536): the
file is sparse (about 315 MB of address space at the 600 s window) and only the pages of the
ids in use are ever touched, by their writers. Reading a page of a sparse shared-memory file
allocates it, so nothing here scans every slot: `CountersReader` finds the registered ids
among the file's allocated pages (SEEK_DATA) and reads only those.
"""

from __future__ import annotations

import errno
import fcntl
import getpass
import hashlib
import logging
import mmap
import os
import tempfile
import time
from pathlib import Path
from typing import Protocol

from kvsvr import _core
from kvsvr.config import ClusterConfig, default, load
from kvsvr.errors import ConfigError
from kvsvr.limits import COUNTERS_FILE_IDS_DEFAULT, MONITOR_FIRST_USER_ID
from kvsvr.monitor.registry import Registry, load_registry

log = logging.getLogger("kvsvr.monitor")

Counters = _core.Counters
CountersError = _core.CountersError
WINDOW_S_DEFAULT = _core.WINDOW_S_DEFAULT
FILE_MODE = 0o600             # the counting processes and the agent run as one user


class CountersMissing(CountersError):
    """The counters file does not exist (and the caller does not create it: the agent)."""


class CounterSink(Protocol):
    """What instrumented code calls: `_core.Counters`, or `NullCounters` when monitoring is off."""

    def add(self, id: int, delta: int) -> None: ...
    def set(self, id: int, value: int) -> None: ...


class NullCounters:
    """Monitoring switched off (or its file unusable): the calls cost one method call."""

    def add(self, id: int, delta: int) -> None:
        pass

    def set(self, id: int, value: int) -> None:
        pass


def _shared_memory_dir() -> Path:
    """/dev/shm when the machine has it (memory, no disk writes), else the temporary dir."""
    base = Path("/dev/shm")
    return base if base.is_dir() else Path(tempfile.gettempdir())


def cluster_counters_path(config: ClusterConfig) -> Path:
    """The counters file of `config`'s processes on this machine: `monitor.counters_path`,
    or by default kvsvr-counters-<user>-<cluster name>-<8 hex digits> in /dev/shm. The digits
    hash the addresses of the cluster's nodes: two clusters running on one machine cannot
    share an address, so they never share a file, whatever their names and wherever their
    config files are (every process of one cluster derives the same name)."""
    monitor = config.monitor
    if monitor.counters_path:
        return config.path(monitor.counters_path)
    addresses = sorted([r.address for g in config.groups for r in g.replicas]
                       + [s.address for g in config.queue_groups for s in g.servers])
    digest = hashlib.sha256("\n".join([config.name, *addresses]).encode()).hexdigest()[:8]
    return _shared_memory_dir() / f"kvsvr-counters-{getpass.getuser()}-{config.name}-{digest}"


def default_path() -> Path:
    """The counters file of the embedded default cluster (what `kvsvr-cluster` runs)."""
    return cluster_counters_path(default())


def id_refusal(id: int, max_ids: int, path: str | Path = "the counters file") -> str | None:
    """Why id `id` cannot have a slot in a counters file of `max_ids` ids (the field first,
    then what to do), or None."""
    if id == 0:
        return (f"id: 0 is reserved (ids start at 1: 1..{MONITOR_FIRST_USER_ID - 1} are "
                f"KVSvr's own, {MONITOR_FIRST_USER_ID}..{_core.MONITOR_IDS_MAX} are yours)")
    if not 1 <= id <= _core.MONITOR_IDS_MAX:
        return f"id: {id} is outside the id range 1..{_core.MONITOR_IDS_MAX}"
    if id > max_ids:
        return (f"id: {id} is above max_ids ({max_ids}) of {path}: set [monitor] max_ids "
                f"to at least {id} (the default, {COUNTERS_FILE_IDS_DEFAULT}, holds every id), "
                "then stop the processes using the file and remove it, so that it is made "
                "again at the new size")
    return None


def open_counters(path: str | Path | None = None, *, max_ids: int | None = None,
                  window_s: int | None = None, registry: Registry | None = None,
                  create: bool = True, config: ClusterConfig | str | Path | None = None
                  ) -> _core.Counters:
    """Map the counters file at `path` and register `registry`'s ids.

    Without `path`: the file of `config` (a ClusterConfig or a config file's path; its
    [monitor] sizing applies unless given here), or of the embedded default cluster. A file
    that does not exist is created with the given sizing (defaults: every id, 600 s) if
    `create` (else CountersMissing).

    Given a sizing, an existing file of another sizing is refused (CountersError saying
    both); without one, any valid file is taken (the agent's way). A damaged file is refused
    with the reason; it is never repaired in place under running writers.
    """
    counters, fd, path = _map(path, max_ids, window_s, create, config)
    os.close(fd)
    if registry is not None:
        register(counters, registry, path)
    return counters


def _map(path: str | Path | None, max_ids: int | None, window_s: int | None, create: bool,
         config: ClusterConfig | str | Path | None) -> tuple[_core.Counters, int, Path]:
    """(the mapped counters, an open descriptor of the file, its path)."""
    if config is not None and not isinstance(config, ClusterConfig):
        config = load(config)
    if path is None:
        if config is None:
            path = default_path()
        else:
            path = cluster_counters_path(config)
            max_ids = max_ids or config.monitor.max_ids
            window_s = window_s or config.monitor.window_s
    path = Path(path)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            if not create:
                raise CountersMissing(f"{path}: no counters file (yet)") from None
            _create(path, max_ids or COUNTERS_FILE_IDS_DEFAULT, window_s or WINDOW_S_DEFAULT)
            continue
        except OSError as e:
            raise CountersError(f"{path}: cannot open ({e.strerror})") from None
        if not _hold(fd, path):
            os.close(fd)          # swept away as we opened it: make it again
            continue
        try:
            size = os.fstat(fd).st_size
            if size < _core.COUNTERS_HEADER_BYTES:
                raise CountersError(f"{path}: {size} bytes, not a counters file "
                                    f"(the header alone is {_core.COUNTERS_HEADER_BYTES})")
            mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        problem = _core.counters_invalid(mapped)
        if problem is not None:
            mapped.close()
            os.close(fd)
            raise CountersError(f"{path}: {problem}")
        counters = _core.Counters(mapped)
        wanted = (max_ids or counters.max_ids, window_s or counters.window_s)
        if wanted != (counters.max_ids, counters.window_s):
            os.close(fd)
            raise CountersError(
                f"{path}: the file holds max_ids={counters.max_ids}, window_s="
                f"{counters.window_s}; asked for max_ids={wanted[0]}, window_s={wanted[1]} "
                "(stop its users and remove the file to resize; its values are lost)")
        return counters, fd, path
    raise CountersError(f"{path}: appeared and vanished three times while being opened")


def counters_for(config: ClusterConfig) -> CounterSink:
    """The counters a process of this cluster writes to, with the built-in and configured ids
    registered. Monitoring off, or its file unusable: NullCounters (the process still runs;
    the reason is logged), since counting must never be what stops a node."""
    monitor = config.monitor
    if not monitor.enabled:
        return NullCounters()
    try:
        return open_counters(
            cluster_counters_path(config), max_ids=monitor.max_ids,
            window_s=monitor.window_s,
            registry=load_registry([config.path(p) for p in monitor.registry]))
    except (CountersError, ConfigError) as e:
        log.warning("monitoring is off for this process: %s", e)
        return NullCounters()


def register(counters: _core.Counters, registry: Registry,
             path: str | Path = "the counters file") -> None:
    """Claim a slot for every id of `registry`; CountersError saying what is wrong (and what
    to do) for an id the file has no slot for, or one registered with another kind."""
    for entry in registry.list():
        problem = id_refusal(entry.id, counters.max_ids, path)
        if problem is not None:
            raise CountersError(f"{problem} ({entry.name})")
        counters.register(entry.id, entry.kind_code)


class CountersReader:
    """What the agent reads of a counters file: the registered ids and their per-second
    values, touching only pages that writers allocated (see the module docstring).

    `refresh()` looks for registered ids among the file's data regions (lseek SEEK_DATA and
    SEEK_HOLE: a cost in proportion to the ids in use, not to max_ids); `snapshot(second)`
    is the value block of those ids for one second."""

    def __init__(self, counters: _core.Counters, fd: int, path: Path):
        self.counters = counters
        self.path = path
        self.window_s = counters.window_s
        self.max_ids = counters.max_ids
        self._fd = fd
        self._slot_bytes = 8 + 8 * counters.window_s
        self.created_s = counters.created_s   # nothing was counted before it
        self.ids: list[tuple[int, int]] = []
        self.refresh()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _data_regions(self) -> list[tuple[int, int]]:
        size = _core.COUNTERS_HEADER_BYTES + self.max_ids * self._slot_bytes
        regions: list[tuple[int, int]] = []
        position = 0
        while position < size:
            try:
                start = os.lseek(self._fd, position, os.SEEK_DATA)
                end = os.lseek(self._fd, start, os.SEEK_HOLE)
            except OSError as e:
                if e.errno == errno.ENXIO:       # no data past `position`
                    break
                return [(0, size)]               # no SEEK_DATA here: every slot may be used
            regions.append((start, end))
            position = end
        return regions

    def refresh(self) -> list[tuple[int, int]]:
        """[(id, kind)] of every registered id, ascending (kept in `ids`)."""
        header, slot = _core.COUNTERS_HEADER_BYTES, self._slot_bytes
        found: list[tuple[int, int]] = []
        kind_of = self.counters.kind
        for start, end in self._data_regions():
            # ids whose 4-byte kind word lies inside [start, end)
            first = max(1, -(-(start - header) // slot) + 1)
            last = min(self.max_ids, (end - 4 - header) // slot + 1)
            for id in range(first, last + 1):
                kind = kind_of(id)
                if kind:
                    found.append((id, kind))
        self.ids = found
        return found

    def registered(self) -> list[tuple[int, int]]:
        return self.ids

    def snapshot(self, second: int) -> bytes:
        """The value block of the registered ids (as of the last refresh) for `second`."""
        value_at = self.counters.value_at
        pairs = []
        for id, _kind in self.ids:
            value = value_at(id, second)
            if value is not None:
                pairs.append((id, value))
        return _core.encode_block(pairs)


def open_reader(path: str | Path | None = None, *,
                config: ClusterConfig | str | Path | None = None) -> CountersReader:
    """A CountersReader over an existing counters file (CountersMissing if there is none)."""
    counters, fd, found = _map(path, None, None, False, config)
    return CountersReader(counters, fd, found)


def _create(path: Path, max_ids: int, window_s: int) -> None:
    size = _core.counters_file_bytes(max_ids, window_s)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.new")
    try:
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    except OSError as e:
        raise CountersError(f"{path}: cannot create ({e.strerror})") from None
    try:
        os.ftruncate(fd, size)        # zero-filled: every slot free, every bucket empty
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mapped:
            _core.format_counters(mapped, max_ids, window_s, int(time.time()))
        try:
            os.link(temporary, path)
        except FileExistsError:          # another process published first: use it
            return
    finally:
        os.close(fd)
        os.unlink(temporary)
    _sweep(path)


# Default-named counters files (one per cluster, in shared memory) are never removed by their
# users, so each process that maps one holds a shared lock on it for its life, and making a
# new one removes the others nobody holds that are older than their window: no process of
# their cluster is left, and nothing in them could still be shipped.
_HELD: dict[tuple[int, int], int] = {}     # (device, inode) -> a descriptor holding LOCK_SH


def _default_named(path: Path) -> bool:
    return path.name.startswith(f"kvsvr-counters-{getpass.getuser()}")


def _hold(fd: int, path: Path) -> bool:
    """Hold a shared lock on a default-named file for this process's life; False if the
    path no longer names the file opened (a sweep removed it meanwhile)."""
    if not _default_named(path):
        return True
    status = os.fstat(fd)
    key = (status.st_dev, status.st_ino)
    if key not in _HELD:
        held = os.dup(fd)
        fcntl.flock(held, fcntl.LOCK_SH)     # waits only while a sweep looks at this file
        _HELD[key] = held
    try:
        now = os.stat(path)
    except FileNotFoundError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != key:
        os.close(_HELD.pop(key))
        return False
    return True


def _sweep(made: Path) -> None:
    """Remove the default-named counters files beside `made` that no process holds and that
    are older than their window (see _HELD)."""
    if not _default_named(made):
        return
    for candidate in made.parent.glob(f"kvsvr-counters-{getpass.getuser()}*"):
        if candidate == made:
            continue
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            status = os.fstat(fd)
            if status.st_size < _core.COUNTERS_HEADER_BYTES:
                continue
            with mmap.mmap(fd, status.st_size, mmap.MAP_SHARED, mmap.PROT_READ) as mapped:
                if _core.counters_invalid(mapped) is not None:
                    continue               # not a counters file: not ours to remove
                window_s = int.from_bytes(mapped[12:16], "little")
            if time.time() - status.st_ctime > window_s:
                candidate.unlink()
                log.info("removed %s: no process uses it and its last %d s are past",
                         candidate, window_s)
        except OSError:
            continue                       # held (BlockingIOError) or gone: leave it
        finally:
            os.close(fd)


__all__ = ["CounterSink", "Counters", "CountersError", "CountersMissing", "CountersReader",
           "NullCounters", "cluster_counters_path", "counters_for", "default_path",
           "id_refusal", "open_counters", "open_reader", "register"]
