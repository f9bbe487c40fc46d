"""Edges found in review, each once a crash, a hang or a lost write: large replies, pages by
bytes, reused and ancient op ids, bad addresses, a lowered binlog bound, CLI and demo input."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time

import pytest

from kvsvr import AsyncClient, Client, InvalidArgument, NotFound, _core
from kvsvr.errors import ConfigError
from kvsvr.launcher import LocalCluster
from kvsvr.limits import MESSAGE_BYTES_MAX, OPS_REMEMBERED_PER_CLIENT, OPS_TRIM_STEP
from kvsvr.protocol import Op, encode_delta
from kvsvr.store import Store

MIB = 1 << 20


def test_a_pipelined_scan_of_big_rows_pages_and_the_node_lives(client: Client):
    """A write then a scan of the same key in one pipeline: the scan waits for the write and
    its page stops by bytes (5 rows of 1 MiB once killed the node)."""
    for i in range(5):
        client.row_put("big", f"r{i}", b"x" * (MIB - 100))
    pipeline = client.pipeline()
    pipeline.row_put("big", "r5", b"y" * (MIB - 100))
    pipeline.scan("big")
    _version, page = pipeline.execute(raise_errors=True)
    assert 1 <= len(page.rows) < 6 and page.next_start is not None
    rows, start = [], b""
    while start is not None:
        page = client.scan("big", start)
        rows.extend(page.rows)
        start = page.next_start
    assert [r.row for r in rows] == [f"r{i}".encode() for i in range(6)]
    assert client.ping() == {"node": "n1"}


def test_changes_pages_stop_by_bytes_too(client: Client):
    batch = client.pipeline()
    for i in range(1000):
        batch.row_put("wide", f"r{i:04d}", b"z" * 5000)
    batch.execute(raise_errors=True)
    page = client.changes("wide", 0)
    assert page.resume is not None and len(page.changes) < 1000
    seen = list(page.changes)
    while page.resume is not None:
        page = client.changes("wide", page.resume[0], after_row=page.resume[1])
        seen.extend(page.changes)
    assert len(seen) == 1000 and len({c.row for c in seen}) == 1000


def test_answers_over_one_message_come_back_split(cluster: LocalCluster, client: Client):
    client.put("mib", b"m" * (MIB - 64))
    count = MESSAGE_BYTES_MAX // MIB + 4
    pipeline = client.pipeline()
    for _ in range(count):
        pipeline.get("mib")
    assert all(r.value == b"m" * (MIB - 64) for r in pipeline.execute(raise_errors=True))

    async def concurrently() -> None:
        async with AsyncClient(cluster.config, timeout=20.0) as aclient:
            got = await asyncio.gather(*(aclient.get("mib") for _ in range(count)))
            assert {len(v.value) for v in got} == {MIB - 64}

    asyncio.run(concurrently())


def test_a_reused_op_id_is_refused_not_silently_answered(cluster: LocalCluster):
    """Two live clients sharing a client id can send one op id for two requests (forced here):
    the second is refused by name, not answered with the first's reply. A client id given
    to a later client resumes it: its op ids go on past the earlier one's."""
    with Client(cluster.config, client_id=42) as first, \
            Client(cluster.config, client_id=42) as second:
        seq = next(first._seq)
        first._seq, second._seq = itertools.count(seq), itertools.count(seq)
        assert first.put("x", "1") == 1
        with pytest.raises(InvalidArgument) as error:
            second.put("y", "2")
        assert error.value.field == "client_seq"
        with pytest.raises(NotFound):
            second.get("y")
    with Client(cluster.config, client_id=42) as later:
        assert later.put("y", "2") == 1


def test_a_retry_older_than_the_window_is_refused_not_reapplied(tmp_path):
    store = Store(tmp_path, map_size_mib=256, sync=False)
    incr = [Op(_core.OP_INCR, b"", encode_delta(1))]
    try:
        last = OPS_REMEMBERED_PER_CLIENT + 2 * OPS_TRIM_STEP
        for seq in range(1, last + 1):
            with store.write() as batch:
                batch.mutate(b"n", incr, None, 7, seq)
        with store.write() as batch:          # a recent retry: the first answer again
            assert batch.mutate(b"n", incr, None, 7, last).results == [last]
        with pytest.raises(InvalidArgument, match="older than the exactly-once window"), \
                store.write() as batch:
            batch.mutate(b"n", incr, None, 7, 1)
        with store.read() as txn:
            assert store.get(txn, b"n").value == str(last).encode()
    finally:
        store.close()


def test_a_lowered_binlog_bound_is_reached(tmp_path):
    store = Store(tmp_path, map_size_mib=64, sync=False, binlog_max_records=1500)
    put = [Op(_core.OP_PUT, b"", b"v")]
    for _ in range(1500):
        with store.write() as batch:
            batch.mutate(b"k", put)
    store.close()
    store = Store(tmp_path, map_size_mib=64, sync=False, binlog_max_records=1000)
    try:
        for _ in range(20):
            with store.write() as batch:
                batch.mutate(b"k", put)
        assert store.last_lsn - store.first_lsn + 1 == 1000
        assert len(store.binlog(0, 5000)) == 1000
    finally:
        store.close()


@pytest.mark.parametrize("address", ["foo", "tcp://*:7790", "tcp://127.0.0.1:99999",
                                     "http://127.0.0.1:1"])
def test_a_bad_address_is_an_error_not_a_hang(address):
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as error:
        Client(address=address)
    assert error.value.field == "address"
    result = subprocess.run([sys.executable, "-m", "kvsvr.cli", "--address", address,
                             "--timeout", "1", "get", "k"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and "address" in result.stderr
    assert time.monotonic() - started < 20


def test_config_refuses_wildcards_and_base_dir():
    from kvsvr import config
    text = ('[[groups]]\nname = "g"\nshards = ["0-4095"]\n[[groups.replicas]]\nnode = "n"\n'
            'campus = "a"\naddress = "ADDRESS"\ndata_dir = "d"\n')
    with pytest.raises(ConfigError, match=r"replicas\[0\].address"):
        config.parse(text.replace("ADDRESS", "tcp://*:7790"))
    with pytest.raises(ConfigError, match="base_dir"):
        config.parse('base_dir = "/etc"\n' + text.replace("ADDRESS", "tcp://127.0.0.1:7790"))


@pytest.mark.parametrize("timeout", ["-1", "nan", "0", "abc"])
def test_cli_refuses_a_bad_timeout(timeout):
    result = subprocess.run([sys.executable, "-m", "kvsvr.cli", "--timeout", timeout, "ping"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--timeout" in result.stderr


def test_cli_row_notation_round_trips(cluster: LocalCluster):
    def kv(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvsvr.cli", "--config",
                               cluster.config_path, *args], capture_output=True, text=True,
                              timeout=60)
    for i in range(3):
        kv("append", "inbox", f"m{i}")
    assert kv("scan", "inbox", "--start", "#1").stdout.splitlines() == ["#1\t2\tm1",
                                                                        "#2\t3\tm2"]
    assert kv("row-get", "inbox", "#2").stdout == "m2"   # raw bytes: no newline off a terminal
    assert kv("row-put", "t", "hex:00ff", "bin").returncode == 0
    assert kv("scan", "t").stdout.splitlines() == ["hex:00ff\t1\tbin"]
    first = kv("changes", "inbox", "0", "--limit", "2")
    assert first.stdout.splitlines() == ["1\t#0\tput\tm0", "2\t#1\tput\tm1"]
    assert "SINCE 2 --after-row #1" in first.stderr
    rest = kv("changes", "inbox", "2", "--after-row", "#1")
    assert rest.stdout.splitlines() == ["3\t#2\tput\tm2"]


def test_demo_refuses_zero_users(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kvsvr.demo", "--dir", str(tmp_path / "d"),
                             "--users", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--users" in result.stderr


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 3 MiB filesystem (tmpfs), where this machine lets us mount one."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_a_full_disk_is_storage_full_and_reads_go_on(tiny_disk):
    from kvsvr.errors import StorageFull
    from kvsvr.protocol import put_op

    store = Store(tiny_disk / "db", sync=True)
    try:
        with store.write() as batch:
            batch.mutate(b"first", [put_op(b"kept")])
        with pytest.raises(StorageFull, match=r"disk .* is full"):
            for i in range(100):
                with store.write() as batch:
                    batch.mutate(f"big{i}".encode(), [put_op(b"x" * 500_000)])
        lsn = store.last_lsn
        with pytest.raises(StorageFull), store.write() as batch:
            batch.mutate(b"more", [put_op(b"y" * 500_000)])
        assert store.last_lsn == lsn
        with store.read() as txn:
            assert store.get(txn, b"first").value == b"kept"
    finally:
        store.close()
