"""A replica's LMDB write transactions, begun and committed on a thread of their own.

A checkpoint commit writes every page the transaction dirtied and fsyncs them (a replica's
meta page waits for the next commit's fsync, or for a sync this thread also runs: see Store's
defer_meta_sync): about 10 ms on a shared disk, during which a loop that committed inline
answered nothing. Here the loop
hands the transaction over and goes on (votes go to the vote log meanwhile); py-lmdb releases
the GIL for the whole of mdb_txn_commit, so the disk work overlaps the loop's.

Why the thread also begins every transaction: LMDB's writer lock is a process-shared robust
mutex, and only the thread that locked it may unlock it (the commit does). The loop fills the
transaction in between (one thread at a time, never both). There is one write transaction at
a time, so nothing may write to LMDB while a commit is under way: the loop waits for it
(`finish`), which the thread tells it by writing to an eventfd the loop polls.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

from kvsvr.store import Store, WriteBatch

_BEGIN, _COMMIT, _ABORT, _SYNC, _STOP = range(5)


class Committer:
    def __init__(self, store: Store, name: str = "lmdb-commit"):
        self.store = store
        self.wake_fd: int | None = None   # written to when a commit started by start_commit ends
        self._requests: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[tuple[Any, BaseException | None]] = \
            queue.SimpleQueue()
        self._pending = False             # a commit started by start_commit has not been taken
        self.last_commit_us = 0           # how long the last commit took on the thread
        self.delay_s = 0.0                # a fault: each commit waits this long first
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            kind, batch = self._requests.get()
            if kind == _STOP:
                return
            result: Any = None
            error: BaseException | None = None
            try:
                if kind == _BEGIN:
                    result = self.store.begin()
                elif kind in (_COMMIT, _SYNC):
                    started = time.perf_counter()
                    if kind == _SYNC:
                        self.store.sync()
                    else:
                        if self.delay_s:
                            time.sleep(self.delay_s)   # a slow disk (kvsvr faults)
                        self.store.commit(batch)
                    result = int((time.perf_counter() - started) * 1e6)
                else:
                    batch.abort()
            except BaseException as e:  # handed to the loop, which decides
                error = e
            self._results.put((result, error))
            if kind in (_COMMIT, _SYNC) and self.wake_fd is not None:
                os.eventfd_write(self.wake_fd, 1)

    def _call(self, kind: int, batch: WriteBatch | None = None) -> Any:
        if self._pending:
            raise RuntimeError("a commit is under way: finish() it first")
        self._requests.put((kind, batch))
        result, error = self._results.get()
        if error is not None:
            raise error
        return result

    # --- the loop's side ------------------------------------------------------------------
    def begin(self) -> WriteBatch:
        """A new write transaction (see Store.begin)."""
        batch: WriteBatch = self._call(_BEGIN)
        return batch

    def abort(self, batch: WriteBatch) -> None:
        self._call(_ABORT, batch)

    def start_commit(self, batch: WriteBatch) -> None:
        """Commit `batch` while the caller goes on; `finish` says when it has ended. The
        caller must not touch LMDB's write side (nor `batch`) until then."""
        if self._pending:
            raise RuntimeError("a commit is under way: finish() it first")
        self._pending = True
        self._requests.put((_COMMIT, batch))

    def start_sync(self) -> None:
        """Store.sync() while the caller goes on; `finish` says when it has ended (the
        caller must not touch LMDB's write side until then, as for a commit)."""
        if self._pending:
            raise RuntimeError("a commit is under way: finish() it first")
        self._pending = True
        self._requests.put((_SYNC, None))

    @property
    def pending(self) -> bool:
        return self._pending

    def finish(self, block: bool) -> bool:
        """Whether the commit started by start_commit has ended (waiting for it if `block`);
        raises its error if it failed. True when none is under way."""
        if not self._pending:
            return True
        try:
            result, error = self._results.get(block=block)
        except queue.Empty:
            return False
        self._pending = False
        if error is not None:
            raise error
        self.last_commit_us = result
        return True

    def close(self) -> None:
        """Stop the thread (after the commit under way, whose outcome is then dropped)."""
        if self._pending:
            self._results.get()
            self._pending = False
        self._requests.put((_STOP, None))
        self._thread.join()


__all__ = ["Committer"]
