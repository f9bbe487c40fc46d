"""Listing keys by prefix: each group answers a sorted page of its keys that hold a value or
live rows, and the client merges the groups' pages into one sorted page; paging with `after`
gives every key exactly once, in order, with any page size, on several groups (real
processes), binary keys included; expired values and rows, deleted values and tables of
tombstones are left out; bad input is refused naming the field."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvsvr import Client, InvalidArgument
from kvsvr.aio import AsyncClient
from kvsvr.launcher import LocalCluster, write_cluster_config
from kvsvr.listing import merge_pages
from kvsvr.protocol import KeysPage


def every_key(client: Client, prefix: bytes = b"", page: int = 1000) -> list[bytes]:
    keys: list[bytes] = []
    after = None
    for _ in range(10_000):
        result = client.list_keys(prefix, after=after, limit=page)
        assert len(result.keys) <= page
        keys += result.keys
        after = result.next_after
        if after is None:
            return keys
    raise AssertionError("paging did not end")


def test_merge_cuts_where_every_group_answer_is_complete() -> None:
    """A group with more to say has told every key up to its next_after: the merged page
    ends at the lowest such bound, or at the limit, and says where to go on."""
    done = KeysPage([b"a", b"d", b"x"], None)
    more = KeysPage([b"b", b"c"], b"c")
    assert merge_pages([done, more], 10) == KeysPage([b"a", b"b", b"c"], b"c")
    assert merge_pages([done, more], 2) == KeysPage([b"a", b"b"], b"b")
    assert merge_pages([done, KeysPage([b"e"], None)], 10) == \
        KeysPage([b"a", b"d", b"e", b"x"], None)
    # A group that only passed over keys without data still bounds the page.
    assert merge_pages([done, KeysPage([], b"b")], 10) == KeysPage([b"a"], b"b")
    assert merge_pages([], 10) == KeysPage([], None)


@pytest.fixture
def two_groups(tmp_path: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(write_cluster_config(tmp_path, groups=2, replicas=1),
                         log_dir=tmp_path / "logs")
    local.start()
    try:
        yield local
    finally:
        local.stop()


def test_paging_over_two_groups_gives_each_key_once_in_order(two_groups: LocalCluster) -> None:
    """Keys spread over two groups come back merged in key order, each once, whatever the
    page size; prefixes select, one that matches nothing gives an empty last page; binary
    keys are keys like any other."""
    binary = [bytes([0]), bytes([0, 255]), bytes(range(200, 240)), b"\xff" * 240]
    text = [b"user/%03d" % i for i in range(60)] + [b"room/%02d" % i for i in range(25)]
    with two_groups.client(timeout=10.0) as client:
        for key in text + binary:
            client.put(key, b"v")
        assert sorted({client.status(address=two_groups.address(n))["store"]["keys"] > 0
                       for n in two_groups.nodes}) == [True]   # both groups hold keys
        expected = sorted(text + binary)
        for page in (1, 7, 1000):
            assert every_key(client, page=page) == expected
        assert every_key(client, b"user/", page=9) == [k for k in expected
                                                        if k.startswith(b"user/")]
        assert every_key(client, b"user/05") == [b"user/%03d" % i for i in range(50, 60)]
        assert client.list_keys(b"nothing/") == KeysPage([], None)
        assert every_key(client, b"\xff") == [b"\xff" * 240]
        assert client.list_keys(after=b"user/058").keys == [b"user/059",
                                                             bytes(range(200, 240)),
                                                             b"\xff" * 240]


def test_only_keys_holding_data_are_listed(two_groups: LocalCluster) -> None:
    """A deleted value, a table of tombstones, an expired value or row: not listed; a table
    with a live row is; the key comes back once it holds data again."""
    with two_groups.client(timeout=10.0) as client:
        client.put(b"deleted", b"v")
        client.delete(b"deleted")
        client.row_put(b"tombstones", b"r", b"v")
        client.row_delete(b"tombstones", b"r")
        client.row_put(b"table", b"r", b"v")
        client.put(b"expiring", b"v", ttl=1)
        client.row_put(b"expiring-row", b"r", b"v", ttl=1)
        client.put(b"kept", b"v")
        assert every_key(client) == [b"expiring", b"expiring-row", b"kept", b"table"]
        time.sleep(1.2)
        assert every_key(client) == [b"kept", b"table"]
        client.put(b"deleted", b"again")
        assert every_key(client, page=1) == [b"deleted", b"kept", b"table"]


def test_bad_list_requests_are_refused_naming_the_field(two_groups: LocalCluster) -> None:
    with two_groups.client(timeout=10.0) as client:
        for kwargs, field in (({"limit": 0}, "limit"), ({"limit": 10_001}, "limit"),
                              ({"limit": "5"}, "limit"), ({"after": b""}, "after"),
                              ({"after": 5}, "after"), ({"prefix": b"x" * 241}, "prefix"),
                              ({"prefix": 3.5}, "prefix")):
            with pytest.raises(InvalidArgument) as refused:
                client.list_keys(**kwargs)
            assert refused.value.field == field


def test_the_asyncio_client_lists_too(two_groups: LocalCluster) -> None:
    async def scenario() -> list[bytes]:
        async with AsyncClient(two_groups.config_path, timeout=10.0) as client:
            for i in range(12):
                await client.put(b"a%02d" % i, b"v")
            keys: list[bytes] = []
            after = None
            while True:
                page = await client.list_keys(b"a", after=after, limit=5)
                keys += page.keys
                after = page.next_after
                if after is None:
                    return keys

    assert asyncio.run(scenario()) == [b"a%02d" % i for i in range(12)]


def test_keys_through_the_cli(two_groups: LocalCluster) -> None:
    """`kvsvr keys [PREFIX] [--limit N] [--after KEY]`: one key a line, a cut listing
    saying the --after that goes on; --json carries key_base64; a
    binary key needs --base64 or --json; a bad --limit fails naming it."""
    def kv(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvsvr.cli", "--config",
                               str(two_groups.config_path), *args],
                              capture_output=True, text=True, timeout=30)

    with two_groups.client(timeout=10.0) as client:
        for i in range(5):
            client.put(b"cli/%d" % i, b"v")
    listed = kv("keys", "cli/")
    assert listed.returncode == 0 and listed.stdout.split() == [f"cli/{i}" for i in range(5)]
    first = kv("keys", "cli/", "--limit", "2")
    assert first.stdout.split() == ["cli/0", "cli/1"]
    assert "# more keys: --after cli/1" in first.stderr   # a hint the CLI can take
    rest = kv("keys", "cli/", "--after", "cli/1")
    assert rest.returncode == 0 and rest.stdout.split() == ["cli/2", "cli/3", "cli/4"]
    assert kv("keys", "cli/", "--after", "hex:636c692f33").stdout.split() == ["cli/4"]
    assert kv("keys", "--after", "hex:zz").returncode == 2
    cut = json.loads(kv("--json", "keys", "cli/", "--limit", "2").stdout)
    assert cut["next_after"] == "cli/1"   # in the notation --after takes, as next_start is
    assert '"key_base64": "Y2xpLzA="' in kv("--json", "keys", "cli/", "--limit", "1").stdout
    refused = kv("keys", "--limit", "0")
    assert refused.returncode != 0 and "limit" in refused.stderr
    with two_groups.client(timeout=10.0) as client:
        client.put(b"\x01bin", b"v")
    assert kv("keys", "\x01").returncode != 0
    assert kv("keys", "--base64", "\x01").stdout.split() == ["AWJpbg=="]


def test_a_replicated_group_lists_from_any_replica(tmp_path: Path) -> None:
    """Two groups of three replicas: a LIST goes to one replica of each group, and each
    replica's applied state holds every key of its group."""
    config = write_cluster_config(tmp_path, groups=2, replicas=3)
    with LocalCluster(config, log_dir=tmp_path / "logs") as cluster, \
            Client(config, timeout=10.0) as client:
        keys = [b"r%03d" % i for i in range(40)]
        for key in keys:
            client.put(key, b"v")
        deadline = time.monotonic() + 20
        while every_key(client, page=6) != keys:
            assert time.monotonic() < deadline, "the replicas did not list every key"
            time.sleep(0.2)
        for node in cluster.nodes:   # each replica alone: its own group's keys
            with Client(address=cluster.address(node), timeout=5.0) as one:
                mine = every_key(one)
                assert mine and set(mine) <= set(keys)
