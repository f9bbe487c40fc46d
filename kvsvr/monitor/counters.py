"""Open (or create) a machine's counters file and map it (the I/O edge of `_core.Counters`).

A new file is built under a temporary name (sized, header written) and then hard-linked to its
real name, which fails if another process got there first: nobody ever maps a file whose header
is half written, and two processes starting at once end up on the same file.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import mmap
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from kvsvr import _core
from kvsvr.errors import ConfigError
from kvsvr.monitor.registry import Registry, load_registry

if TYPE_CHECKING:
    from kvsvr.config import ClusterConfig

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


def default_path() -> Path:
    """One file per machine and user: /dev/shm when the machine has it (memory, no disk
    writes), else the temporary directory."""
    base = Path("/dev/shm")
    if not base.is_dir():
        base = Path(tempfile.gettempdir())
    return base / f"kvsvr-counters-{getpass.getuser()}"


def open_counters(path: str | Path | None = None, *, max_ids: int | None = None,
                  window_s: int | None = None, registry: Registry | None = None,
                  create: bool = True) -> _core.Counters:
    """Map the counters file at `path` (default: `default_path()`), creating it with the
    given sizing (defaults 1024 ids, 600 s) if it does not exist and `create` (else
    CountersMissing); register `registry`'s ids.

    Given a sizing, an existing file of another sizing is refused (CountersError saying
    both); without one, any valid file is taken (the agent's way). A damaged file is refused
    with the reason; it is never repaired in place under running writers.
    """
    path = Path(path) if path is not None else default_path()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            if not create:
                raise CountersMissing(f"{path}: no counters file (yet)") from None
            _create(path, max_ids or _core.MONITOR_IDS_DEFAULT, window_s or WINDOW_S_DEFAULT)
            continue
        except OSError as e:
            raise CountersError(f"{path}: cannot open ({e.strerror})") from None
        try:
            size = os.fstat(fd).st_size
            if size < _core.COUNTERS_HEADER_BYTES:
                raise CountersError(f"{path}: {size} bytes, not a counters file "
                                    f"(the header alone is {_core.COUNTERS_HEADER_BYTES})")
            mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        problem = _core.counters_invalid(mapped)
        if problem is not None:
            mapped.close()
            raise CountersError(f"{path}: {problem}")
        counters = _core.Counters(mapped)
        wanted = (max_ids or counters.max_ids, window_s or counters.window_s)
        if wanted != (counters.max_ids, counters.window_s):
            raise CountersError(
                f"{path}: the file holds max_ids={counters.max_ids}, window_s="
                f"{counters.window_s}; asked for max_ids={wanted[0]}, window_s={wanted[1]} "
                "(stop its users and remove the file to resize; its values are lost)")
        if registry is not None:
            register(counters, registry)
        return counters
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
            config.path(monitor.counters_path) if monitor.counters_path else None,
            max_ids=monitor.max_ids, window_s=monitor.window_s,
            registry=load_registry([config.path(p) for p in monitor.registry]))
    except (CountersError, ConfigError) as e:
        log.warning("monitoring is off for this process: %s", e)
        return NullCounters()


def register(counters: _core.Counters, registry: Registry) -> None:
    for entry in registry.list():
        counters.register(entry.id, entry.kind_code)


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
        with contextlib.suppress(FileExistsError):   # another process published first: use it
            os.link(temporary, path)
    finally:
        os.close(fd)
        os.unlink(temporary)


__all__ = ["CounterSink", "Counters", "CountersError", "CountersMissing", "NullCounters",
           "counters_for", "default_path", "open_counters", "register"]
