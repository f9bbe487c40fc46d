"""Watch: the long poll on a key (WATCH), its parked state, the client's resuming iterator,
the CLI, and watchers failing over between real replicas that are SIGKILLed and SIGSTOPped."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from kvsvr import _core
from kvsvr import protocol as p
from kvsvr.aio import AsyncClient
from kvsvr.client import Client
from kvsvr.errors import Compacted, InvalidArgument, KvError, ResourceExhausted, Unavailable
from kvsvr.launcher import LocalCluster, write_cluster_config
from kvsvr.limits import (
    KEY_BYTES_MAX,
    PEER_DOWN_AFTER_S,
    WATCH_WAIT_S_MAX,
    WATCHES_PARKED_MAX,
)
from kvsvr.protocol import Change, WatchReply, WatchRequest
from kvsvr.sharding import home_index
from kvsvr.watches import ParkedWatch, Watches, due
from kvsvr.watching import WatchCursor, WatchEvent

SLACK_S = 0.5   # scheduling on a loaded two-core machine


# --- the parked state, by table ------------------------------------------------------------
def _parked(key: bytes, since: int, deadline: float, after_row: bytes = b"") -> ParkedWatch:
    return ParkedWatch(b"id", 1, WatchRequest(key, since, after_row, 1000), deadline, 0.0)


@pytest.mark.parametrize(("since", "after_row", "version", "expected"), [
    (0, b"", 0, False),      # a key never written: nothing yet
    (0, b"", 1, True),
    (5, b"", 5, False),      # still at the watcher's version
    (5, b"", 4, False),      # a replica behind parks
    (5, b"r", 5, True),      # the rest of a page cut at version 5
    (5, b"r", 4, False),     # ... not on a replica that has not reached it
    (5, b"", 6, True),
])
def test_a_watch_is_due_once_the_key_is_past_it(since: int, after_row: bytes, version: int,
                                                expected: bool):
    assert due(WatchRequest(b"k", since, after_row, 0), version) is expected


def test_parked_watches_wake_by_key_expire_by_deadline_and_are_bounded():
    watches = Watches(limit=3)
    a1, a5, b = _parked(b"a", 1, 10.0), _parked(b"a", 5, 20.0), _parked(b"b", 0, 5.0)
    for watch in (a1, a5, b):
        watches.park(watch)
    with pytest.raises(ResourceExhausted) as refused:
        watches.park(_parked(b"c", 0, 1.0))
    assert refused.value.field == "watch" and watches.count == 3
    assert watches.watching([b"a", b"x"]) == [b"a"]
    assert watches.take(b"a", 1) == []            # neither is past version 1
    assert watches.take(b"a", 3) == [a1]          # only the one at 1
    assert watches.count == 2 and watches.by_key[b"a"] == [a5]
    assert watches.next_deadline() == 5.0
    assert watches.expired(4.9) == []
    assert watches.expired(10.0) == [b]           # a1's deadline passes: it was answered
    assert watches.next_deadline() == 20.0 and b"b" not in watches.by_key
    watches.park(_parked(b"c", 0, 1.0))           # room again
    assert watches.take_all() and watches.count == 0 and watches.next_deadline() is None


def test_the_deadline_heap_stays_within_twice_the_parked_watches():
    """Watches answered by a wake leave their heap entry behind; the heap is rebuilt before
    those outnumber the live ones, so a busy key never grows it without bound."""
    watches = Watches(limit=10_000)
    for i in range(5_000):
        watches.park(_parked(b"k", i, 100.0 + i))
        if i % 2:
            watches.take(b"k", i + 1)
    assert watches.count <= 2_500
    assert len(watches._deadlines) <= 2 * watches.count + 64


# --- the client's cursor, by table ---------------------------------------------------------
def _reply(version: int, changes: list[tuple[int, str]], resume: tuple[int, bytes] | None,
           value: bytes | None = None) -> WatchReply:
    return WatchReply(version, True, value,
                      [Change(r.encode(), v, False, b"") for v, r in changes], resume)


def test_the_cursor_yields_strictly_increasing_versions_across_cut_pages():
    """A page cut inside a version holds that version's rows back until the version is whole;
    the versions before the cut are yielded at once; every row comes once, in order."""
    cursor = WatchCursor(2)
    assert cursor.on_reply(WatchReply(2, False, None, [], None)) is None   # no change yet
    first = cursor.on_reply(_reply(9, [(3, "a"), (4, "b"), (5, "c")], (5, b"c")))
    assert first == WatchEvent(4, None, [Change(b"a", 3, False, b""),
                                         Change(b"b", 4, False, b"")], False)
    assert (cursor.since, cursor.after_row, cursor.cut) == (5, b"c", True)
    assert cursor.on_reply(_reply(9, [(5, "d")], (5, b"d"))) is None   # version 5 still open
    last = cursor.on_reply(_reply(9, [(5, "e"), (8, "a")], None, b"v"))
    assert last is not None and last.complete and last.version == 9 and last.value == b"v"
    assert [(c.version, c.row) for c in last.changes] == [
        (5, b"c"), (5, b"d"), (5, b"e"), (8, b"a")]
    assert (cursor.since, cursor.after_row) == (9, b"")
    assert cursor.on_reply(_reply(9, [], None)) is None   # never the same version twice


# --- a single node -------------------------------------------------------------------------
def test_a_value_watch_sees_increasing_versions_and_the_last_value(client: Client):
    """Puts, a delete and puts again while a watcher polls: the versions it is given
    strictly increase, a delete is a version without a value, and the last one is seen."""
    client.put("v", "0")
    seen: list[WatchEvent] = []
    ready = threading.Event()

    def watcher() -> None:
        for event in client.watch("v", 0, wait=1.0, timeout=8.0):
            seen.append(event)
            ready.set()
            if event.value == b"last":
                return

    thread = threading.Thread(target=watcher)
    thread.start()
    assert ready.wait(5)
    for i in range(1, 30):
        client.put("v", str(i))
    client.delete("v")
    final = client.put("v", "last")
    thread.join(10)
    versions = [e.version for e in seen]
    assert versions == sorted(set(versions)) and versions[0] == 1
    assert seen[-1].version == final and seen[-1].value == b"last"
    assert all(e.complete and not e.changes for e in seen)


def test_a_watch_with_no_change_times_out_cleanly_and_polls_again(client: Client):
    """Each poll comes back "no change yet" after its wait (answered, not silent: the
    replica stays healthy) and the iterator asks again, until its own timeout."""
    client.put("quiet", "x")
    before = client.status()["counters"].get("requests.watch", 0)
    started = time.monotonic()
    assert list(client.watch("quiet", 1, wait=0.3, timeout=1.3)) == []
    elapsed = time.monotonic() - started
    polls = client.status()["counters"].get("requests.watch", 0) - before
    assert 1.2 <= elapsed < 1.3 + SLACK_S
    assert 4 <= polls <= 6
    reply = client._run(_watch_spec("quiet", 1, wait=0.2))
    assert reply == WatchReply(1, False, None, [], None)


def _watch_spec(key: Any, since: int, wait: float) -> Any:
    from kvsvr import calls
    return calls.watch(key, since, b"", wait)


@pytest.mark.parametrize(("call", "field"), [
    (lambda c: c.watch("k", -1), "since_version"),
    (lambda c: c.watch("k", 2**64), "since_version"),
    (lambda c: c.watch("k", "3"), "since_version"),
    (lambda c: c.watch("k", True), "since_version"),
    (lambda c: c.watch(b"x" * (KEY_BYTES_MAX + 1)), "key"),
    (lambda c: c.watch(b""), "key"),
    (lambda c: c.watch(3), "key"),
    (lambda c: c.watch("k", wait=0), "wait"),
    (lambda c: c.watch("k", wait=WATCH_WAIT_S_MAX + 1), "wait"),
    (lambda c: c.watch("k", timeout=-1), "timeout"),
])
def test_bad_arguments_are_refused_naming_the_field_before_anything_is_sent(
        client: Client, call: Any, field: str):
    with pytest.raises(InvalidArgument) as refused:
        call(client)
    assert refused.value.field == field


def _raw(address: str, frames: list[tuple[int, int, bytes]],
         answers: int) -> dict[int, tuple[int, Any]]:
    """Send request frames on a socket of our own; the answers by request id."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    try:
        for start in range(0, len(frames), 1000):
            socket.send(b"".join(_core.encode_frame(_core.FRAME_REQUEST, method, rid, 0, body)
                                 for method, rid, body in frames[start:start + 1000]))
        out: dict[int, tuple[int, Any]] = {}
        deadline = time.monotonic() + 20
        while len(out) < answers and time.monotonic() < deadline:
            if socket.poll(200):
                for _kind, status, rid, _budget, body in _core.decode_frames(socket.recv())[0]:
                    out[rid] = (status, bytes(body))
        return out
    finally:
        socket.close(linger=0)
        context.term()


def test_bad_requests_on_the_wire_get_an_error_naming_the_field(cluster: LocalCluster):
    address = cluster.address(cluster.nodes[0])
    bad = {
        1: p.encode([b"k", -1, b"", 100]),                       # version out of range
        2: p.encode([b"k", "1", b"", 100]),                      # wrong type
        3: p.encode([b"x" * (KEY_BYTES_MAX + 1), 0, b"", 100]),  # key too long
        4: p.encode([b"k", 0, b"", int(WATCH_WAIT_S_MAX * 1000) + 1]),   # wait too long
        5: p.encode([b"k", 0]),                                  # fields missing
        6: b"\xc1",                                              # not msgpack
    }
    answers = _raw(address, [(p.Method.WATCH, rid, body) for rid, body in bad.items()],
                   len(bad))
    fields = {}
    for rid, (status, body) in answers.items():
        with pytest.raises(InvalidArgument) as refused:
            p.parse_reply(p.Method.WATCH, status, body)
        fields[rid] = refused.value.field
    assert fields == {1: "since_version", 2: "since_version", 3: "key", 4: "wait_ms",
                      5: None, 6: "body"}
    with Client(address=address) as c:
        assert c.ping() == {"node": cluster.nodes[0]}   # the node goes on


def test_parked_watches_are_bounded_per_node(cluster: LocalCluster):
    """The node holds WATCHES_PARKED_MAX watches; the next one is refused ResourceExhausted
    at once (named), and the parked ones are still answered when their key moves."""
    address = cluster.address(cluster.nodes[0])
    body = p.encode(WatchRequest(b"many", 0, b"", 20_000))
    frames = [(p.Method.WATCH, rid, body) for rid in range(1, WATCHES_PARKED_MAX + 2)]
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.connect(address)
    try:
        for start in range(0, len(frames), 1000):
            socket.send(b"".join(_core.encode_frame(_core.FRAME_REQUEST, m, rid, 0, b)
                                 for m, rid, b in frames[start:start + 1000]))
        refused = _receive(socket, 1, 30)
        assert list(refused) == [WATCHES_PARKED_MAX + 1]
        status, error = refused[WATCHES_PARKED_MAX + 1]
        with pytest.raises(ResourceExhausted) as exhausted:
            p.parse_reply(p.Method.WATCH, status, error)
        assert exhausted.value.field == "watch"
        with Client(address=address) as c:
            assert c.status()["counters"]["requests.watch"] == WATCHES_PARKED_MAX + 1
            c.put("many", "moved")
        woken = _receive(socket, WATCHES_PARKED_MAX, 30)
        assert len(woken) == WATCHES_PARKED_MAX
        assert {p.parse_reply(p.Method.WATCH, s, b).value for s, b in woken.values()} \
            == {b"moved"}
    finally:
        socket.close(linger=0)
        context.term()


def _receive(socket: zmq.Socket, count: int, timeout: float) -> dict[int, tuple[int, bytes]]:
    out: dict[int, tuple[int, bytes]] = {}
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        if socket.poll(100):
            for _kind, status, rid, _budget, body in _core.decode_frames(socket.recv())[0]:
                out[rid] = (status, bytes(body))
    return out


def test_a_watch_from_before_the_compaction_horizon_is_compacted(client: Client):
    """Deletions before the horizon are gone: the watch says Compacted (restart from 0),
    and from 0 it sees the table as it is."""
    client.row_put("t", "a", "1")
    client.row_put("t", "b", "2")
    client.row_delete("t", "a")
    horizon = client.compact("t", 3)
    with pytest.raises(Compacted) as compacted:
        next(client.watch("t", 1, wait=0.2, timeout=2))
    assert compacted.value.version == 3
    event = next(client.watch("t", 0, wait=0.2, timeout=2))
    assert event.version == horizon and [c.row for c in event.changes] == [b"b"]


def test_a_big_table_comes_in_pages_with_every_row_once(client: Client):
    """More changed rows than one page (SCAN_ROWS_DEFAULT) arrive in several events whose
    versions increase, every row once; a batch's rows share its version."""
    for start in range(0, 2_400, 240):   # pages of 1,000 rows cut inside a version
        batch = client.batch("big")
        for i in range(start, start + 240):
            batch.row_put(f"r{i:05}", "x")
        batch.commit()
    events = []
    for event in client.watch("big", 0, wait=0.2, timeout=3):
        events.append(event)
        if event.complete:
            break
    rows = [c.row for e in events for c in e.changes]
    assert rows == [f"r{i:05}".encode() for i in range(2_400)]
    assert [e.version for e in events] == sorted({e.version for e in events})
    assert events[-1].version == 10 and len(events) == 3
    assert [e.complete for e in events] == [False, False, True]


def test_the_asyncio_client_watches_too(cluster: LocalCluster):
    async def run() -> list[WatchEvent]:
        async with AsyncClient(address=cluster.address(cluster.nodes[0])) as client:
            await client.put("a", "1")
            seen = []
            async for event in client.watch("a", 0, wait=0.5, timeout=3):
                seen.append(event)
                if len(seen) == 1:
                    await client.row_put("a", "r", "2")
                else:
                    break
            return seen

    seen = asyncio.run(run())
    assert [e.version for e in seen] == [1, 2]
    assert seen[1].value == b"1" and [c.row for c in seen[1].changes] == [b"r"]


def test_the_cli_prints_each_change_as_it_comes(cluster: LocalCluster, tmp_path: Path):
    address = cluster.address(cluster.nodes[0])
    with Client(address=address) as client:
        client.put("c", "one")
        command = [sys.executable, "-m", "kvsvr.cli", "--address", address, "watch", "c",
                   "--duration", "3", "--wait", "1"]
        text = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        encoded = subprocess.Popen([*command, "--json", "--since", "1"],
                                   stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        client.row_put("c", "r1", "two")
        text_out, _ = text.communicate(timeout=10)
        json_out, _ = encoded.communicate(timeout=10)
    assert text.returncode == encoded.returncode == 0
    assert text_out.splitlines() == ["1\t\tvalue\tone", "2\tr1\tput\ttwo", "2\t\tvalue\tone"]
    events = [json.loads(line) for line in json_out.splitlines()]
    assert [e["version"] for e in events] == [2]
    assert events[0]["value"]["value"] == "one" and events[0]["changes"][0]["value"] == "two"
    bad = subprocess.run([*command[:-4], "--since", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_the_cli_prints_a_value_line_only_for_a_key_that_holds_or_held_one(
        cluster: LocalCluster):
    """A table key's polls print their rows alone (no "VERSION<TAB><TAB>none" line after
    each); a value key's delete still prints its "none" line."""
    address = cluster.address(cluster.nodes[0])
    command = [sys.executable, "-m", "kvsvr.cli", "--address", address, "watch",
               "--duration", "3", "--wait", "1"]
    with Client(address=address) as client:
        table = subprocess.Popen([*command, "tbl"], stdout=subprocess.PIPE, text=True)
        value = subprocess.Popen([*command, "val"], stdout=subprocess.PIPE, text=True)
        time.sleep(1.2)
        client.row_put("tbl", "a", "x")
        client.put("val", "one")
        time.sleep(0.3)
        client.row_delete("tbl", "a")
        client.delete("val")
        table_out, _ = table.communicate(timeout=10)
        value_out, _ = value.communicate(timeout=10)
    assert table_out.splitlines() == ["1\ta\tput\tx", "2\ta\tdeleted\t"]
    assert value_out.splitlines() == ["1\t\tvalue\tone", "2\t\tnone\t"]


# --- a replicated group --------------------------------------------------------------------
def _group(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(write_cluster_config(tmp_path, replicas=3, sync=False),
                           log_dir=tmp_path / "logs")
    cluster.start()
    try:
        for node in cluster.nodes:
            cluster.wait_joined(node)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def group(tmp_path: Path) -> Iterator[LocalCluster]:
    yield from _group(tmp_path)


def _key_with_home(home: int, tag: str) -> str:
    return next(k for k in (f"{tag}{i}" for i in range(1000))
                if home_index(k.encode(), 3) == home)


def _all_changes(client: Client, key: str) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    since, after = 0, b""
    while True:
        page = client.changes(key, since, after_row=after)
        out += [(c.version, c.row) for c in page.changes]
        if page.resume is None:
            return out
        since, after = page.resume


def _fill_with_watches(address: str) -> tuple[zmq.Context, zmq.Socket]:
    """Park WATCHES_PARKED_MAX raw watches on the node at `address` (on key b"many")."""
    body = p.encode(WatchRequest(b"many", 0, b"", 20_000))
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.connect(address)
    rids = range(1, WATCHES_PARKED_MAX + 1)
    for start in range(0, len(rids), 1000):
        socket.send(b"".join(_core.encode_frame(_core.FRAME_REQUEST, p.Method.WATCH, rid, 0,
                                                body) for rid in rids[start:start + 1000]))
    return context, socket


def test_a_replica_full_of_watches_sends_the_watcher_to_another(group: LocalCluster):
    """The key's home replica parks as many watches as it may and refuses the next one
    ResourceExhausted: the client asks the next replica instead of raising, blocking and
    asyncio clients alike; raw requests still see ResourceExhausted, as a WatchesFull."""
    key = _key_with_home(0, "full")
    home = group.address(group.nodes[0])
    context, socket = _fill_with_watches(home)
    try:
        with Client(address=home) as one:
            deadline = time.monotonic() + 30
            while one.status()["counters"].get("requests.watch", 0) < WATCHES_PARKED_MAX:
                assert time.monotonic() < deadline, "the watches were not parked"
                time.sleep(0.1)
            with pytest.raises(ResourceExhausted) as refused:   # one node, nowhere else
                next(one.watch(key, 0, wait=0.5, timeout=2))
            assert refused.value.field == "watch"
        with Client(group.config, timeout=10.0) as client:
            client.put(key, "v")
            event = next(client.watch(key, 0, wait=1.0, timeout=10))
            assert (event.version, event.value) == (1, b"v")

            async def asynchronous() -> WatchEvent:
                async with AsyncClient(group.config, timeout=10.0) as async_client:
                    async for seen in async_client.watch(key, 1, wait=1.0, timeout=10):
                        return seen
                raise AssertionError("no event")

            threading.Timer(1.0, lambda: client.put(key, "w")).start()
            moved = asyncio.run(asynchronous())
            assert (moved.version, moved.value) == (2, b"w")
    finally:
        socket.close(linger=0)
        context.term()


def test_a_table_watcher_sees_every_change_once_in_order_while_replicas_are_killed(
        group: LocalCluster):
    """Rows are appended to a Key-Table key while each replica in turn is SIGKILLed and
    restarted; a watcher failing over between the replicas sees every row change exactly
    once, in version order, up to the key's last version."""
    key = _key_with_home(0, "inbox")
    stop = threading.Event()
    errors: list[KvError] = []   # (what failed may have been applied: the watcher says)

    def writer() -> None:
        with Client(group.config, timeout=10.0, attempt_timeout=0.5) as client:
            i = 0
            while not stop.is_set():
                try:
                    client.row_put(key, f"r{i:05}", "x")
                except KvError as e:   # an outage: outcome unknown, the watcher tells
                    errors.append(e)
                i += 1
                time.sleep(0.005)

    seen: list[tuple[int, bytes]] = []
    versions: list[int] = []
    watch_client = Client(group.config, timeout=10.0, attempt_timeout=0.5)
    final = [2**63]

    def watcher() -> None:
        # Watches of 2 s each, every one resuming where the last left off, until the key's
        # last version was seen.
        while not versions or versions[-1] < final[0]:
            for event in watch_client.watch(key, versions[-1] if versions else 0, wait=1.0,
                                            timeout=2.0):
                seen.extend((c.version, c.row) for c in event.changes)
                versions.append(event.version)

    threads = [threading.Thread(target=writer), threading.Thread(target=watcher)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        for node in group.nodes:
            group.kill(node)
            time.sleep(1.0)
            group.start(node)
            group.wait_joined(node)
            time.sleep(1.0)
        stop.set()
        threads[0].join(20)
        with Client(group.config, timeout=10.0) as client:
            expected = _all_changes(client, key)
            final[0] = client.changes(key, 0, limit=1).version
        threads[1].join(30)
        assert not threads[1].is_alive(), "the watcher never reached the last version"
    finally:
        stop.set()
        final[0] = 0
        threads[1].join(10)
        watch_client.close()
    assert len(expected) > 100
    assert seen == expected
    assert versions == sorted(set(versions))


def test_a_watch_parked_on_a_stopped_replica_fails_over(group: LocalCluster):
    """The key's home (where the watch goes first) is SIGSTOPped with the watch parked on
    it: after the poll's wait and grace the watcher asks the next replica, which answers
    the change made meanwhile."""
    key = _key_with_home(0, "sw")
    with Client(group.config, timeout=10.0, attempt_timeout=0.5) as client:
        client.put(key, "before")
        events = client.watch(key, 1, wait=1.0, timeout=30)
        got: list[WatchEvent] = []
        thread = threading.Thread(target=lambda: got.append(next(events)))
        thread.start()
        time.sleep(0.3)                       # parked on the home now
        group.signal("n1", signal.SIGSTOP)
        try:
            started = time.monotonic()
            with Client(group.config, timeout=10.0, attempt_timeout=0.3) as writer:
                version = writer.put(key, "after")
            thread.join(15)
            elapsed = time.monotonic() - started
        finally:
            group.signal("n1", signal.SIGCONT)
    assert got and got[0].version == version and got[0].value == b"after"
    assert elapsed < 1.0 + 2.0 + 2.0 + SLACK_S   # wait + grace + the next replica's answer


def test_a_replica_cut_off_from_its_group_sends_watchers_elsewhere(group: LocalCluster):
    """With both peers SIGSTOPped, the remaining replica cannot learn of any change: it
    refuses watches Unavailable (once its peers are silent past PEER_DOWN_AFTER_S) instead
    of answering "no change" for ever, and serves them again once they are back."""
    key = _key_with_home(0, "cut")
    address = group.address("n1")
    with Client(group.config, timeout=5.0) as client:
        client.put(key, "v")
    with Client(address=address, timeout=3.0, attempt_timeout=0.5) as client:
        for node in ("n2", "n3"):
            group.signal(node, signal.SIGSTOP)
        try:
            time.sleep(PEER_DOWN_AFTER_S + 0.5)
            with pytest.raises(Unavailable) as refused:
                next(client.watch(key, 1, wait=0.5, timeout=5))
            assert "no majority" in str(refused.value)
        finally:
            for node in ("n2", "n3"):
                group.signal(node, signal.SIGCONT)
        time.sleep(1.0)
        assert list(client.watch(key, 1, wait=0.3, timeout=0.6)) == []
        assert next(client.watch(key, 0, wait=0.3, timeout=2)).value == b"v"


def test_a_stopping_replica_hands_its_watches_on_at_once(group: LocalCluster):
    """SIGTERM on the replica a watch is parked on: it answers the watch Unavailable as it
    stops, so the watcher asks the next replica at once instead of waiting out its poll
    (10 s here), and gets the change made meanwhile."""
    key = _key_with_home(0, "term")
    with Client(group.config, timeout=10.0, attempt_timeout=0.5) as client:
        client.put(key, "before")
        events = client.watch(key, 1, wait=10.0, timeout=30)
        got: list[WatchEvent] = []
        thread = threading.Thread(target=lambda: got.append(next(events)))
        thread.start()
        time.sleep(0.3)                       # parked on the home now
        started = time.monotonic()
        group.stop("n1")
        with Client(group.config, timeout=10.0, attempt_timeout=0.3) as writer:
            version = writer.put(key, "after")
        thread.join(15)
        elapsed = time.monotonic() - started
    assert got and got[0].version == version and got[0].value == b"after"
    assert elapsed < 4.0
