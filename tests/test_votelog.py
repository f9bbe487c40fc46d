"""The vote log: frames replay in order after the last checkpoint and nowhere past a torn,
foreign or stale frame; and a whole group SIGKILLed between checkpoints (its LMDB never
committed a write) still holds every acknowledged write, from the votes alone."""

from __future__ import annotations

import errno
import os
import re
import select
import signal
import time
from pathlib import Path

import pytest
import zmq

from kvsvr import Client, NotFound, _core, protocol
from kvsvr._syncer import Syncer
from kvsvr.launcher import LocalCluster, write_cluster_config
from kvsvr.sockets import libzmq_send
from kvsvr.votelog import VoteLog, VoteLogDamaged


def _record(i: int, chosen: bytes | None = None) -> _core.InstanceRecord:
    return _core.InstanceRecord(_core.INSTANCE, b"key-%d" % i, i + 1, 7, 7, b"value-%d" % i,
                                chosen)


def _write(log: VoteLog, first: int, count: int) -> None:
    for i in range(first, first + count):
        log.append(log.frame([_record(i), _record(i, b"chosen")]))


def test_frames_replay_in_order_after_the_checkpoint_only(tmp_path: Path):
    log = VoteLog(tmp_path / "votes.log", nonce=11, size=1 << 16)
    _write(log, 0, 5)
    log.close()
    again = VoteLog(tmp_path / "votes.log", nonce=11, size=1 << 16)
    records = again.replay(through=0)
    assert records == [r for i in range(5) for r in (_record(i), _record(i, b"chosen"))]
    assert again.seq == 5
    assert again.replay(through=3) == [_record(3), _record(3, b"chosen"),
                                       _record(4), _record(4, b"chosen")]
    assert again.replay(through=5) == [] and again.seq == 5


def test_named_records_frame_as_the_plain_tuples_did_and_replay_named(tmp_path: Path):
    """A frame of the core's named records is byte for byte the frame of the plain tuples
    they were before (the records' kind stays first); replay builds the named records, and a
    record of no known kind in a whole frame is damage, not something to restore."""
    records = [_record(1), _record(2, b"chosen"), _core.FenceRecord(_core.FENCE, 2, 5),
               _core.RebuiltRecord(_core.REBUILT, 4), _core.VerifiedRecord(_core.VERIFIED, 4)]
    log = VoteLog(tmp_path / "votes.log", nonce=9, size=1 << 16)
    assert log.frame(records) == log.frame([tuple(r) for r in records])
    log.append(log.frame(records))
    log.close()
    again = VoteLog(tmp_path / "votes.log", nonce=9, size=1 << 16)
    replayed = again.replay(through=0)
    assert replayed == records and [type(r) for r in replayed] == [type(r) for r in records]
    again.close()
    damaged = VoteLog(tmp_path / "damaged.log", nonce=9, size=1 << 16)
    damaged.append(damaged.frame([("bogus", 1)]))
    damaged.close()
    damaged = VoteLog(tmp_path / "damaged.log", nonce=9, size=1 << 16)
    with pytest.raises(VoteLogDamaged, match="frame 1: record: unknown quorum record kind"):
        damaged.replay(through=0)
    damaged.close()


def test_after_a_wrap_the_older_frames_behind_the_new_ones_are_not_replayed(tmp_path: Path):
    log = VoteLog(tmp_path / "votes.log", nonce=3, size=1 << 16)
    _write(log, 0, 20)           # frames 1..20
    log.checkpointed()           # LMDB holds them (through = 20): the log starts again
    _write(log, 100, 2)          # frames 21, 22 over the start of the old ones
    log.close()
    again = VoteLog(tmp_path / "votes.log", nonce=3, size=1 << 16)
    assert again.replay(through=20) == [_record(100), _record(100, b"chosen"),
                                        _record(101), _record(101, b"chosen")]
    assert again.seq == 22
    # Right after a checkpoint nothing new was written: the old frames are all behind it.
    log2 = VoteLog(tmp_path / "other.log", nonce=3, size=1 << 16)
    _write(log2, 0, 4)
    log2.checkpointed()
    assert log2.replay(through=4) == [] and log2.seq == 4


def test_a_torn_last_frame_ends_the_log(tmp_path: Path):
    log = VoteLog(tmp_path / "votes.log", nonce=5, size=1 << 16)
    _write(log, 0, 3)
    end = log.offset
    log.close()
    with open(tmp_path / "votes.log", "r+b") as f:   # the crash hit the third frame's tail
        f.seek(end - 3)
        f.write(b"\xff\xff\xff")
    again = VoteLog(tmp_path / "votes.log", nonce=5, size=1 << 16)
    assert again.replay(through=0) == [r for i in range(2)
                                       for r in (_record(i), _record(i, b"chosen"))]
    assert again.seq == 2   # the next frame written is 3 again, over the torn one


def test_a_log_from_another_environment_is_not_replayed(tmp_path: Path):
    log = VoteLog(tmp_path / "votes.log", nonce=1, size=1 << 16)
    _write(log, 0, 3)
    log.close()
    stranger = VoteLog(tmp_path / "votes.log", nonce=2, size=1 << 16)
    assert stranger.replay(through=0) == [] and stranger.seq == 0


def test_missing_frames_after_the_checkpoint_are_damage_not_an_empty_log(tmp_path: Path):
    log = VoteLog(tmp_path / "votes.log", nonce=9, size=1 << 16)
    _write(log, 0, 6)
    log.close()
    again = VoteLog(tmp_path / "votes.log", nonce=9, size=1 << 16)
    with open(tmp_path / "votes.log", "r+b") as f:
        header = f.read(20)
    assert int.from_bytes(header[4:12], "little") == 1
    assert len(again.replay(through=0)) == 12
    log3 = VoteLog(tmp_path / "gap.log", nonce=9, size=1 << 16)
    log3.seq = 10               # frames 11.. as if 1..10 had been checkpointed
    _write(log3, 0, 2)
    with pytest.raises(VoteLogDamaged, match=r"frames 5\.\.10 are missing"):
        log3.replay(through=4)


def test_frames_written_while_a_checkpoint_commits_replay_from_where_it_said(tmp_path: Path):
    """The ring: a checkpoint covers the frames before its mark; the frames written while it
    commits come back from the offset it stored, across a wrap to offset 0, and none of the
    frames it covered does."""
    size = 1 << 13
    log = VoteLog(tmp_path / "votes.log", nonce=8, size=size)
    _write(log, 0, 60)
    first, _ = log.mark()                       # checkpoint A covers frames 1..60
    _write(log, 100, 10)                        # 61..70, written while A commits
    log.checkpointed(first)
    through, start = log.mark()                 # checkpoint B covers 1..70
    assert through == 70 and start == log.offset
    _write(log, 200, 25)                        # 71..95 while B commits: past the end, so
    assert log.offset < start                   # the last ones wrapped to offset 0
    log.checkpointed(through)
    assert log.frames == 25
    log.close()
    again = VoteLog(tmp_path / "votes.log", nonce=8, size=size)
    assert again.replay(through, start) == [r for i in range(200, 225)
                                            for r in (_record(i), _record(i, b"chosen"))]
    assert again.seq == 95


def test_the_ring_never_writes_over_a_frame_no_committed_checkpoint_covers(tmp_path: Path):
    log = VoteLog(tmp_path / "votes.log", nonce=6, size=1 << 13)
    written = 0
    while log.fits(log.frame([_record(written), _record(written, b"chosen")])):
        _write(log, written, 1)
        written += 1
    assert log.used <= log.size and log.frames == written
    through, _ = log.mark()
    log.checkpointed(through - 5)               # the first frames free, the last five not
    assert log.frames == 5
    while log.fits(log.frame([_record(written), _record(written, b"chosen")])):
        _write(log, written, 1)
        written += 1
    log.close()
    again = VoteLog(tmp_path / "votes.log", nonce=6, size=1 << 13)
    # Everything after frame through-5 is still whole: its five frames, then the wrapped ones.
    replayed = again.replay(through - 5, log._live[0][1])
    assert replayed == [r for i in range(through - 5, written)
                        for r in (_record(i), _record(i, b"chosen"))]


def test_a_frame_after_an_empty_checkpoint_goes_to_the_start_and_replays(tmp_path: Path):
    """Nothing was live when the frame after a checkpoint was written: it went to offset 0,
    and its followers may since have reached the offset the checkpoint stored."""
    log = VoteLog(tmp_path / "votes.log", nonce=12, size=1 << 16)
    _write(log, 10, 5)                           # (frames of one size: they line up)
    through, start = log.mark()
    log.checkpointed(through)
    _write(log, 20, 8)                           # frames 6..13 from offset 0: 11 at `start`
    assert log._live[0][1] == 0 and log._live[5][1] == start
    log.close()
    again = VoteLog(tmp_path / "votes.log", nonce=12, size=1 << 16)
    assert again.replay(through, start) == [r for i in range(20, 28)
                                            for r in (_record(i), _record(i, b"chosen"))]
    # A power cut while frame 6 was being synced: a later frame's page was written back but
    # frame 6 is torn. Nothing from 6 on was ever durable (a sync covers a prefix), so none
    # of it was revealed: the log ends at the checkpoint, it is not damage.
    with open(tmp_path / "votes.log", "r+b") as f:
        f.seek(25)
        f.write(b"\xff\xff\xff")                   # inside frame 6, at offset 0
    cut = VoteLog(tmp_path / "votes.log", nonce=12, size=1 << 16)
    assert cut.replay(through, start) == [] and cut.seq == through


def test_frames_left_behind_a_torn_one_never_join_the_log_after_a_restart(tmp_path: Path):
    """A power cut tore frame 1 while frames 2..5 (never durable) reached the disk. The next
    life must not number its first frame 1 again: of the same size, it would end where the
    old frame 2 begins, and the next replay would take the old, never-sent votes as its
    continuation. skip_past_stale numbers the new frames past anything the file can hold."""
    path = tmp_path / "votes.log"
    log = VoteLog(path, nonce=21, size=1 << 16)
    _write(log, 10, 5)                                # frames 1..5 of one size
    first_length = log._live[0][2]
    log.close()
    with open(path, "r+b") as f:
        f.seek(first_length - 2)
        f.write(b"\xff\xff")                           # frame 1 torn
    again = VoteLog(path, nonce=21, size=1 << 16)
    assert again.replay(0) == [] and again.seq == 0
    # Without the skip, a new frame 1 the same size as the torn one revives frames 2..5:
    naive = VoteLog(path, nonce=21, size=1 << 16)
    naive.replay(0)
    naive.append(naive.frame([_record(10), _record(10, b"chosen")]))
    naive.close()
    assert len(VoteLog(path, nonce=21, size=1 << 16).replay(0)) == 10   # 1 new + 4 stale
    # With it (as a replica does at every start, checkpointing the new number):
    with open(path, "r+b") as f:
        f.seek(first_length - 2)
        f.write(b"\xff\xff")                           # back to the torn state
    fixed = VoteLog(path, nonce=21, size=1 << 16)
    assert fixed.replay(0) == []
    fixed.skip_past_stale()
    through = fixed.seq
    fixed.append(fixed.frame([_record(10), _record(10, b"chosen")]))
    fixed.close()
    assert VoteLog(path, nonce=21, size=1 << 16).replay(through) == [
        _record(10), _record(10, b"chosen")]


def test_a_frame_bigger_than_the_room_left_does_not_fit(tmp_path: Path):
    log = VoteLog(tmp_path / "votes.log", nonce=4, size=4096)
    big = log.frame([_core.InstanceRecord(_core.INSTANCE, b"k", 1, 1, 1, bytes(5000), None)])
    assert not log.fits(big)
    with pytest.raises(ValueError, match="does not fit"):
        log.append(big)
    assert log.offset == 0 and log.seq == 0
    with pytest.raises(ValueError, match="at least 4096"):
        VoteLog(tmp_path / "tiny.log", nonce=4, size=100)


def _config_without_checkpoints(tmp_path: Path) -> Path:
    path = write_cluster_config(tmp_path, replicas=3)
    text = path.read_text().replace("[storage]\n", "[storage]\ncheckpoint_interval_ms = 600000\n")
    path.write_text(text)
    return path


def _wait_for_wake(wake: int, timeout: float = 10.0) -> None:
    readable, _, _ = select.select([wake], [], [], timeout)
    assert readable, "the sync thread never woke the loop"
    os.eventfd_read(wake)


def test_the_sync_thread_makes_written_frames_durable_and_wakes_the_loop(tmp_path: Path):
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    log = VoteLog(tmp_path / "votes.log", nonce=9, size=1 << 16)
    log.start(wake)
    try:
        for i in range(30):
            log.write(log.frame([_record(i)]))
            assert log.synced <= log.seq   # never claims a frame it has not synced
        deadline = time.monotonic() + 10
        while log.synced < log.seq:
            assert time.monotonic() < deadline, "frames written were never synced"
            _wait_for_wake(wake)
        syncs, nanoseconds = log.syncs
        assert 1 <= syncs <= 30 and nanoseconds > 0
        log.append(log.frame([_record(99)]))   # with the thread: waits for it
        assert log.synced == log.seq == 31
        log.checkpointed()                     # durable in LMDB: nothing left to sync
        assert log.synced == log.seq
    finally:
        log.close()
        os.close(wake)
    again = VoteLog(tmp_path / "votes.log", nonce=9, size=1 << 16)
    assert again.replay(through=0) == [_record(i) for i in range(30)] + [_record(99)]


def _woken(wake: int) -> bool:
    try:
        os.eventfd_read(wake)
    except BlockingIOError:
        return False
    return True


def test_a_sync_wakes_the_loop_only_while_it_asks_but_a_failure_always(tmp_path: Path):
    """The loop turns the wake-up off while nothing of its own waits for a sync: the syncs
    then go on (and count) without a word, and turned back on, the next one wakes it."""
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    log = VoteLog(tmp_path / "votes.log", nonce=4, size=1 << 16)
    log.start(wake)
    try:
        log.wake_on_sync(False)
        for i in range(5):
            log.append(log.frame([_record(i)]))   # waits for its sync
        assert log.synced == 5 and log.syncs[0] >= 1
        time.sleep(0.05)
        assert not _woken(wake), "a sync wrote the eventfd with wake-ups turned off"
        log.wake_on_sync(True)
        log.write(log.frame([_record(5)]))
        _wait_for_wake(wake)
        assert log.synced == 6
    finally:
        log.close()
    read_end, write_end = os.pipe()   # fdatasync of a pipe fails (EINVAL)
    syncer = Syncer(write_end, wake)
    try:
        syncer.wake_on_sync(False)
        syncer.request(1)
        _wait_for_wake(wake)   # the node must learn of it at once: it stops
        assert syncer.stats[3] == errno.EINVAL
    finally:
        syncer.close()
        os.close(read_end)
        os.close(write_end)
        os.close(wake)


def test_a_frame_written_without_a_sync_is_covered_by_the_next_one(tmp_path: Path):
    """Learned choices alone ask no fdatasync (nothing waits for them): the next vote's sync
    makes them durable too, and both replay."""
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    log = VoteLog(tmp_path / "votes.log", nonce=5, size=1 << 16)
    log.start(wake)
    try:
        log.write(log.frame([_record(0, b"chosen")]), sync=False)
        time.sleep(0.2)
        assert log.synced == 0 and log.syncs[0] == 0, "a frame of choices asked a sync"
        log.write(log.frame([_record(1)]))
        deadline = time.monotonic() + 10
        while log.synced < 2:
            assert time.monotonic() < deadline, "the vote's frame was never synced"
            _wait_for_wake(wake)
        assert log.syncs[0] == 1
    finally:
        log.close()
        os.close(wake)
    again = VoteLog(tmp_path / "votes.log", nonce=5, size=1 << 16)
    assert again.replay(through=0) == [_record(0, b"chosen"), _record(1)]


def test_one_write_at_a_time_costs_each_replica_one_vote_log_sync(tmp_path: Path):
    """A write's vote is synced on each replica once; the choice learned after it waits for
    no sync of its own (it cost a second one per write on every replica, and the follower's
    apply and the next write's vote waited behind it)."""
    cluster = LocalCluster(write_cluster_config(tmp_path), log_dir=tmp_path / "logs")
    cluster.start()
    try:
        def syncs(counter: str = "vote_log_syncs") -> int:
            total = 0
            for node in cluster.nodes:
                with Client(address=cluster.address(node), timeout=5.0) as one:
                    total += one.status()["counters"].get(counter, 0)
            return total

        writes = 60
        with cluster.client(timeout=10.0) as client:
            client.put(b"warm", b"x")
            time.sleep(0.5)
            before = syncs()
            for i in range(writes):
                client.put(b"one-at-a-time-%d" % i, b"v")
            time.sleep(0.3)
            after = syncs()
        per_write_per_node = (after - before) / writes / len(cluster.nodes)
        # ~1.0 now (a sync can cover two writes' votes); 2.0 when choices were synced too.
        assert 0.3 <= per_write_per_node <= 1.5, per_write_per_node
        # Each write's ACCEPTs and ACCEPTEDs left from the sync threads, none refused.
        assert syncs("votes_sent_by_sync_thread") >= 2 * writes
        assert syncs("vote_sends_dropped") == 0
    finally:
        cluster.stop()


def test_a_failed_fdatasync_stops_the_log_and_is_never_counted_durable(tmp_path: Path):
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    read_end, write_end = os.pipe()   # fdatasync of a pipe fails (EINVAL)
    syncer = Syncer(write_end, wake)
    try:
        syncer.request(1)
        _wait_for_wake(wake)
        synced, syncs, _, error = syncer.stats
        assert (synced, syncs, error) == (0, 0, errno.EINVAL)
        syncer.wait(1)   # returns on the failure instead of waiting forever
    finally:
        syncer.close()
        os.close(read_end)
        os.close(write_end)
    # Through the log: its check() raises and names the file; the frame stays unsynced.
    log = VoteLog(tmp_path / "votes.log", nonce=2, size=1 << 16)
    read_end, write_end = os.pipe()
    log._syncer = Syncer(write_end, wake)
    try:
        log.write(log.frame([_record(1)]))
        _wait_for_wake(wake)
        with pytest.raises(OSError, match=r"votes\.log: fdatasync failed"):
            log.check()
        assert log.synced == 0 and log.seq == 1
        with pytest.raises(OSError, match="fdatasync failed"):
            log.append(log.frame([_record(2)]))
    finally:
        log.close()
        os.close(read_end)
        os.close(write_end)
        os.close(wake)


def _received(router: zmq.Socket, timeout_ms: int) -> list[bytes]:
    """Payloads the ROUTER gets within `timeout_ms` (identities dropped)."""
    got = []
    while router.poll(timeout_ms):
        got.append(router.recv_multipart()[1])
        timeout_ms = 50
    return got


def _sends_become(syncer: Syncer, expected: tuple[int, int, int]) -> None:
    """The thread counts a send after making it: wait for its count."""
    deadline = time.monotonic() + 10
    while syncer.sends != expected:
        assert time.monotonic() < deadline, (syncer.sends, expected)
        time.sleep(0.01)


def test_the_sync_thread_sends_what_waits_for_a_sync_only_once_it_is_durable(tmp_path: Path):
    """Votes leave the moment their frames are durable, never before, in the order handed
    over; what is still waiting when the thread stops is never sent."""
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    fd = os.open(tmp_path / "votes.log", os.O_RDWR | os.O_CREAT, 0o644)
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind("inproc://votes")
    dealer = context.socket(zmq.DEALER)
    dealer.connect("inproc://votes")
    syncer = Syncer(fd, wake)
    try:
        slot = syncer.add_socket(libzmq_send(), dealer.underlying)
        for seq, data in ((2, b"a"), (2, b"b"), (3, b"c")):
            assert syncer.send_after(seq, slot, data)
        assert _received(router, 300) == [], "sent before its frames were durable"
        syncer.request(2)
        _wait_for_wake(wake)
        assert _received(router, 2000) == [b"a", b"b"]   # c waits for frame 3
        assert syncer.synced == 2
        syncer.mark_durable(3)                            # a checkpoint covered it
        assert _received(router, 2000) == [b"c"]
        assert syncer.send_after(1, slot, b"now")         # durable already: sent at once
        assert _received(router, 2000) == [b"now"]
        _sends_become(syncer, (4, 0, 0))
        assert syncer.send_after(9, slot, b"never")
        with pytest.raises(ValueError, match="slot"):
            syncer.send_after(1, slot + 1, b"x")
        with pytest.raises(ValueError, match="send_fn"):
            syncer.add_socket(0, dealer.underlying)
    finally:
        syncer.close()   # drops b"never": frame 9 never became durable
    assert syncer.sends[2] == 0
    assert not syncer.send_after(1, 0, b"after close")
    with pytest.raises(ValueError, match="closed"):
        syncer.add_socket(libzmq_send(), dealer.underlying)
    assert _received(router, 300) == []
    dealer.close()
    router.close()
    context.term()
    os.close(fd)
    os.close(wake)


def test_votes_waiting_on_a_failed_fdatasync_never_leave(tmp_path: Path):
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    read_end, write_end = os.pipe()   # fdatasync of a pipe fails (EINVAL)
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind("inproc://failing")
    dealer = context.socket(zmq.DEALER)
    dealer.connect("inproc://failing")
    unconnected = context.socket(zmq.DEALER)   # sends to it are refused, and counted
    syncer = Syncer(write_end, wake)
    try:
        slot = syncer.add_socket(libzmq_send(), dealer.underlying)
        nowhere = syncer.add_socket(libzmq_send(), unconnected.underlying)
        assert syncer.send_after(0, nowhere, b"lost")
        _sends_become(syncer, (0, 1, 0))
        assert syncer.send_after(1, slot, b"vote")
        syncer.request(1)
        _wait_for_wake(wake)
        assert syncer.stats[3] == errno.EINVAL
        assert not syncer.send_after(0, slot, b"later"), "taken after the thread stopped"
        assert _received(router, 300) == []
    finally:
        syncer.close()
        for socket in (dealer, unconnected, router):
            socket.close()
        context.term()
        os.close(read_end)
        os.close(write_end)
        os.close(wake)


def test_a_whole_group_killed_between_checkpoints_keeps_every_acknowledged_write(
        tmp_path: Path):
    """No checkpoint runs during the test, so LMDB never committed any of these writes: after
    all three replicas are SIGKILLed at once, only their vote logs hold them."""
    cluster = LocalCluster(_config_without_checkpoints(tmp_path), log_dir=tmp_path / "logs")
    cluster.start()
    try:
        acked: dict[bytes, tuple[int, bytes]] = {}
        counter_total = 0
        with cluster.client(timeout=10.0) as client:
            for i in range(150):
                key = b"vk-%d" % i
                version = client.put(key, b"v1-%d" % i)
                version = client.put(key, b"v2-%d" % i) if i % 3 == 0 else version
                acked[key] = (version, b"v2-%d" % i if i % 3 == 0 else b"v1-%d" % i)
                client.incr(b"vote-counter", 1)
                counter_total += 1
            for node in cluster.nodes:
                with Client(address=cluster.address(node), timeout=5.0) as one:
                    assert one.status()["vote_log"]["frames_since_checkpoint"] > 0
        for node in cluster.nodes:
            cluster.signal(node, signal.SIGKILL)   # all at once, none reaped in between
        for node in cluster.nodes:
            cluster.kill(node)
        cluster.start()
        replayed = 0
        for node in cluster.nodes:
            with Client(address=cluster.address(node), timeout=5.0) as one:
                replayed += one.status()["counters"].get("votes_replayed", 0)
        assert replayed > 0, "the restart replayed nothing: the test did not test the log"
        with cluster.client(timeout=10.0) as client:
            for key, (version, value) in acked.items():
                got = client.get(key)
                assert (got.version, got.value) == (version, value), key
            assert int(client.get(b"vote-counter").value) == counter_total
            client.put(b"after", b"x")   # and the group goes on
        logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
        assert re.search(r"votes replayed from the vote log", logs)
    finally:
        cluster.stop()


def _local_copy(cluster: LocalCluster, node: str, keys: list[bytes]) -> dict[bytes, tuple]:
    copy = {}
    with Client(address=cluster.address(node), timeout=5.0) as one:
        for key in keys:
            try:
                got = one.get(key, consistency="local")
                copy[key] = (got.version, got.value)
            except NotFound as e:
                copy[key] = (e.version, None)
    return copy


def test_a_killed_replica_comes_back_with_everything_it_had_applied(tmp_path: Path):
    """Between checkpoints a replica's applies live only in its open transaction; killed,
    it gets them back from its votes at once (its copy is as new as it was, key by key)."""
    cluster = LocalCluster(_config_without_checkpoints(tmp_path), log_dir=tmp_path / "logs")
    cluster.start()
    try:
        keys = [b"rk-%d" % i for i in range(60)]
        with cluster.client(timeout=10.0) as client:
            for i, key in enumerate(keys):
                client.put(key, b"x%d" % i)
        victim = cluster.nodes[0]
        time.sleep(0.3)   # the last choices reach it
        before = _local_copy(cluster, victim, keys)
        assert sum(value is not None for _, value in before.values()) >= 55
        cluster.kill(victim)
        cluster.start(victim)
        with Client(address=cluster.address(victim), timeout=5.0) as one:
            assert one.status()["counters"].get("votes_replayed", 0) > 0
        after = _local_copy(cluster, victim, keys)
        for key in keys:   # as new as before (an open instance may be finished meanwhile)
            assert after[key][0] >= before[key][0], key
            if after[key][0] == before[key][0]:
                assert after[key] == before[key], key
        assert sum(after[k] == before[k] for k in keys) >= 55
        assert os.path.getsize(tmp_path / "data" / victim / "votes.log") == 16 << 20
    finally:
        cluster.stop()


def test_a_peer_trims_only_what_a_puller_has_checkpointed(tmp_path: Path):
    """A pull can ask from past the puller's last checkpoint (a crash goes back to it): the
    server takes durable_through as what it may trim; an older puller's from_lsn still counts;
    and no pull can claim more than the server ever made pullable (a forged or buggy cursor
    would let it trim what the puller never had)."""
    cluster = LocalCluster(write_cluster_config(tmp_path, replicas=3), log_dir=tmp_path / "logs")
    cluster.start()
    server, puller = cluster.nodes[0], cluster.nodes[1]
    cluster.stop(puller)   # its own pulls would move what it claims; the pulls below are its
    with cluster.client(timeout=10.0) as writer:
        for i in range(200):
            writer.put(f"k{i}", b"v")
    time.sleep(1.0)   # a checkpoint or more: the 200 records are pullable
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 5000)
    socket.connect(cluster.address(server))
    try:
        with Client(address=cluster.address(server), timeout=5.0) as client:
            life = client.status()["incarnation"]

            def pull(from_lsn: int, durable_through: int | None) -> int:
                request = protocol.PullRequest(1, from_lsn, life, 16, durable_through)
                socket.send(_core.encode_frame(1, protocol.Method.PULL, 7, 0,
                                               protocol.encode(request)))
                frames, error, _ = _core.decode_frames(socket.recv())
                assert error is None and frames[0][1] == protocol.OK
                return client.status()["peers"][puller]["has_our_binlog_through"]

            assert pull(100, 3) == 3
            assert pull(100, 500) == 99   # never past what it asked from
            assert pull(120, None) == 119
            written = client.status()["store"]["binlog_last_lsn"]
            assert written >= 200
            assert pull(2**64 - 1, None) == written   # never past what it could have
    finally:
        socket.close()
        context.term()
        cluster.stop()


def test_a_replica_whose_vote_log_is_gone_refuses_to_start(tmp_path: Path):
    """Its votes since the last checkpoint are lost with the file: it must not vote on as
    if they had never been cast; the message says how to recover (rebuild)."""
    cluster = LocalCluster(_config_without_checkpoints(tmp_path), log_dir=tmp_path / "logs")
    cluster.start()
    try:
        with cluster.client(timeout=10.0) as client:
            client.put(b"k", b"v")
        victim = cluster.nodes[1]
        cluster.kill(victim)
        (tmp_path / "data" / victim / "votes.log").unlink()
        with pytest.raises(RuntimeError, match="exited"):
            cluster.start(victim)
        log_text = (tmp_path / "logs" / f"{victim}.log").read_text()
        assert "votes.log is missing or cut short" in log_text
        assert "rebuilds from its peers" in log_text
    finally:
        cluster.stop()


@pytest.mark.soak
def test_the_minutely_client_sweep_never_stalls_a_replica_on_a_slow_disk(tmp_path: Path):
    """Every 60 s a replica forgets idle clients. In a transaction of its own, that first
    committed the open transaction on the loop, answering nothing meanwhile: with the disk
    slowed to 3 s per commit (and no checkpoint due, so a transaction is always open), a
    write through that replica waited the whole 3 s. It now goes into the open transaction."""
    cluster = LocalCluster(_config_without_checkpoints(tmp_path), log_dir=tmp_path / "logs")
    cluster.start()
    try:
        quorum = _core.QuorumReplica(0, 3)
        keys = (k for k in (b"sweep-%d" % i for i in range(10**9)) if quorum.home(k) == 0)
        with cluster.client(timeout=20.0) as client, \
                Client(address=cluster.address("n1"), timeout=20.0) as n1:
            for i in range(30):   # first contacts (fences) are committed before the fault
                client.put(b"warm-%d" % i, b"v")
            client.faults(cluster.address("n1"), commit_delay_ms=3000)
            slowest, writes = 0.0, 0
            deadline = time.monotonic() + 70   # n1's sweep is due 60 s after it started
            while time.monotonic() < deadline:
                started = time.monotonic()
                n1.put(next(keys), b"v")
                slowest = max(slowest, time.monotonic() - started)
                writes += 1
                time.sleep(0.02)   # (paced: the vote log and batch stay far from a checkpoint)
            client.faults(cluster.address("n1"))
        assert writes > 100
        assert slowest < 2.0, f"a write waited {slowest:.1f} s"
        logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
        assert "sweeping idle clients failed" not in logs
    finally:
        cluster.stop()
