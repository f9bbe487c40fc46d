"""The committer: LMDB write transactions begun and committed on a thread of their own, while
the caller goes on; its end is told through an eventfd, and its failure reaches the caller."""

from __future__ import annotations

import os
import select
import threading
import time
from pathlib import Path

import lmdb
import pytest

from kvsvr import _core
from kvsvr.committer import Committer
from kvsvr.protocol import Op
from kvsvr.store import Store


def _put(batch, key: bytes, value: bytes) -> None:
    batch.mutate(key, [Op(_core.OP_PUT, b"", value)])


def test_a_commit_runs_while_the_caller_goes_on_and_wakes_it_when_done(tmp_path: Path):
    store = Store(tmp_path, map_size_mib=64, sync=True)
    committer = Committer(store)
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    committer.wake_fd = wake
    try:
        batch = committer.begin()
        for i in range(2000):
            _put(batch, b"k%d" % i, b"v" * 100)
        committer.start_commit(batch)
        assert committer.pending
        with pytest.raises(RuntimeError, match="under way"):
            committer.begin()          # one write transaction at a time: finish() first
        # The caller reads (a read transaction sees the last commit until this one ends).
        with store.read() as txn:
            before = store.key_state(txn, b"k0").version
        assert before in (0, 1)
        readable, _, _ = select.select([wake], [], [], 30)
        assert readable, "the committer never woke the caller"
        assert committer.finish(block=False) and not committer.pending
        assert store.durable_last_lsn == store.last_lsn == 2000
        with store.read() as txn:
            assert store.get(txn, b"k1999").value == b"v" * 100
        # The writer lock went back with the commit: a write transaction of this thread
        # begins and commits (it would hang if the lock had stayed with the other thread).
        done = threading.Event()

        def write_here() -> None:
            with store.write() as own:
                _put(own, b"mine", b"1")
            done.set()

        writer = threading.Thread(target=write_here, daemon=True)
        writer.start()
        writer.join(30)
        assert done.is_set()
        nxt = committer.begin()
        _put(nxt, b"k0", b"again")
        committer.start_commit(nxt)
        assert committer.finish(block=True)
        with store.read() as txn:
            assert store.get(txn, b"k0").version == 2
            assert store.get(txn, b"mine").value == b"1"
    finally:
        committer.close()
        store.close()
        os.close(wake)


def test_a_failed_commit_reaches_the_caller_and_keeps_nothing(tmp_path: Path):
    store = Store(tmp_path, map_size_mib=64, sync=True)
    committer = Committer(store)
    try:
        batch = committer.begin()
        _put(batch, b"lost", b"x")
        # Ended on the committer's thread (only the thread holding LMDB's writer lock may
        # end a write transaction): committing it now fails inside LMDB's binding.
        committer.abort(batch)
        committer.start_commit(batch)
        with pytest.raises(lmdb.Error):
            committer.finish(block=True)
        assert not committer.pending
        assert store.last_lsn == 0     # the batch's LSNs stepped back
        with store.read() as txn:
            assert store.key_state(txn, b"lost").version == 0
        batch = committer.begin()      # and the next transaction is fine
        _put(batch, b"kept", b"y")
        committer.start_commit(batch)
        assert committer.finish(block=True)
        with store.read() as txn:
            assert store.get(txn, b"kept").version == 1
    finally:
        committer.close()
        store.close()


def test_a_deferred_meta_sync_makes_a_commit_durable_only_at_the_next_commit_or_sync(
        tmp_path: Path):
    """A replica's store fsyncs each commit's pages but not its meta page (MDB_NOMETASYNC),
    which the next commit's fsync makes durable: what peers may pull (durable_last_lsn)
    follows one commit behind, and sync() or a blocking write() catches it up."""
    store = Store(tmp_path, map_size_mib=64, sync=True, defer_meta_sync=True)
    committer = Committer(store)
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    committer.wake_fd = wake
    try:
        assert store.defers_meta_sync and not store.meta_sync_pending
        batch = committer.begin()
        for i in range(10):
            _put(batch, b"a%d" % i, b"1")
        committer.start_commit(batch)
        assert committer.finish(block=True)
        # Committed and readable, but a power cut could still undo it.
        with store.read() as txn:
            assert store.get(txn, b"a9").value == b"1"
        assert (store.last_lsn, store.durable_last_lsn) == (10, 0)
        assert store.meta_sync_pending and store.stats()["binlog_durable_last_lsn"] == 0
        batch = committer.begin()
        _put(batch, b"b", b"2")
        committer.start_commit(batch)
        assert committer.finish(block=True)
        assert (store.last_lsn, store.durable_last_lsn) == (11, 10)  # the first is durable
        committer.start_sync()             # nothing more to commit: a sync of its own
        deadline = time.monotonic() + 30
        while True:   # (a commit's wake-up may come after its result: the loop polls again)
            assert select.select([wake], [], [], max(0.0, deadline - time.monotonic()))[0], \
                "the sync never woke the caller"
            os.eventfd_read(wake)
            if committer.finish(block=False):
                break
        assert store.durable_last_lsn == 11 and not store.meta_sync_pending
        with store.write() as own:         # a blocking write is durable when it returns
            _put(own, b"c", b"3")
        assert store.durable_last_lsn == 12 and not store.meta_sync_pending
    finally:
        committer.close()
        store.close()
        os.close(wake)
    # Every commit is there after a reopen; a store without the option is durable at once.
    store = Store(tmp_path, map_size_mib=64, sync=True)
    try:
        assert not store.defers_meta_sync
        assert store.durable_last_lsn == store.last_lsn == 12
        with store.write() as batch:
            _put(batch, b"d", b"4")
        assert store.durable_last_lsn == 13 and not store.meta_sync_pending
    finally:
        store.close()
