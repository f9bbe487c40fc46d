"""Bad input through the public client API: a clear error naming the field, and nothing
changed (the key's version is where it was)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kvsvr import AsyncClient, Client, InvalidArgument, NotFound
from kvsvr.limits import KEY_BYTES_MAX, OPS_PER_BATCH_MAX, ROW_KEY_BYTES_MAX, VALUE_BYTES_MAX


@pytest.mark.parametrize("call, field", [
    (lambda c: c.put("k" * (KEY_BYTES_MAX + 1), "v"), "key"),
    (lambda c: c.put("", "v"), "key"),
    (lambda c: c.put(12, "v"), "key"),
    (lambda c: c.put("k", b"v" * (VALUE_BYTES_MAX + 1)), "value"),
    (lambda c: c.put("k", 3.5), "value"),
    (lambda c: c.put("k", "v", expected_version=-1), "expected_version"),
    (lambda c: c.put("k", "v", expected_version="1"), "expected_version"),
    (lambda c: c.incr("k", 2**63), "delta"),
    (lambda c: c.incr("k", "1"), "delta"),
    (lambda c: c.row_put("k", "r" * (ROW_KEY_BYTES_MAX + 1), "v"), "row"),
    (lambda c: c.row_put("k", "", "v"), "row"),
    (lambda c: c.scan("k", limit=0), "limit"),
    (lambda c: c.scan("k", limit=10**9), "limit"),
    (lambda c: c.changes("k", -1), "since_version"),
    (lambda c: c.batch("k").commit(), "ops"),
])
def test_bad_arguments_name_the_field_and_change_nothing(client: Client, call, field):
    before = client.put("k", "original")
    with pytest.raises(InvalidArgument) as error:
        call(client)
    assert error.value.field == field
    assert field.split("[")[0] in str(error.value)
    assert client.get("k").version == before
    assert client.get("k").value == b"original"


def test_too_many_ops_in_a_batch(client: Client):
    batch = client.batch("k")
    for i in range(OPS_PER_BATCH_MAX + 1):
        batch.row_put(f"r{i}", "v")
    with pytest.raises(InvalidArgument, match="ops"):
        batch.commit()


def test_incr_on_a_non_integer_changes_nothing(client: Client):
    version = client.put("name", "alice")
    with pytest.raises(InvalidArgument, match="not a decimal integer"):
        client.incr("name")
    with pytest.raises(InvalidArgument, match="not a decimal integer"):
        client.batch("name").row_put("r", "x").incr(1).commit()
    assert client.get("name").version == version
    with pytest.raises(Exception, match="row holds no value"):
        client.row_get("name", "r")


def test_incr_overflow_is_refused(client: Client):
    client.put("big", str(2**63 - 1))
    with pytest.raises(InvalidArgument, match="overflows"):
        client.incr("big")
    assert client.get("big").value == str(2**63 - 1).encode()


def test_text_that_is_not_utf8_encodable_is_refused_by_name(client: Client):
    """A str with a lone surrogate cannot be sent as UTF-8: InvalidArgument, not a
    UnicodeEncodeError from deep inside the client."""
    with pytest.raises(InvalidArgument) as error:
        client.get("\ud800")
    assert error.value.field == "key"
    with pytest.raises(InvalidArgument) as error:
        client.put("k", "\udcff")
    assert error.value.field == "value"


def test_a_batch_over_the_byte_limit_is_refused_before_it_is_sent(client: Client):
    """Five 1 MiB rows are within every per-op limit but over the batch's 4 MiB: the client
    says so by name (it used to fail encoding the frame with a bare ValueError)."""
    batch = client.batch("big")
    for i in range(5):
        batch.row_put(f"r{i}", b"x" * VALUE_BYTES_MAX)
    with pytest.raises(InvalidArgument, match=r"ops: \d+ bytes of rows and values") as error:
        batch.commit()
    assert error.value.field == "ops"
    with pytest.raises(NotFound):
        client.get("big")


@pytest.mark.parametrize("make, field", [
    (lambda: Client(42), "config"),
    (lambda: Client(address=5), "address"),
    (lambda: Client(address="tcp://127.0.0.1:1", client_id=0), "client_id"),
    (lambda: Client(address="tcp://127.0.0.1:1", client_id=-1), "client_id"),
    (lambda: Client(address="tcp://127.0.0.1:1", client_id=2**64), "client_id"),
    (lambda: Client(address="tcp://127.0.0.1:1", client_id="7"), "client_id"),
    (lambda: AsyncClient(address="tcp://127.0.0.1:1", client_id=0), "client_id"),
])
def test_client_arguments_are_checked_when_it_is_made(make, field):
    with pytest.raises(InvalidArgument) as error:
        make()
    assert error.value.field == field


def test_a_pipeline_timeout_is_checked_before_anything_is_sent(client: Client):
    pipeline = client.pipeline()
    pipeline.put("k", "v")
    for bad in (-1, 0, "soon"):
        with pytest.raises(InvalidArgument, match="timeout"):
            pipeline.execute(timeout=bad)
    with pytest.raises(NotFound):
        client.get("k")


def test_a_client_dropped_after_an_error_does_not_hang_the_program(cluster):
    """Clients (blocking and asyncio) that raised (NotFound here) and were dropped without
    close(): the garbage collector used to free them in a cycle, destroy their ZeroMQ
    context before their sockets closed, and hang in zmq_ctx_term for ever."""
    script = textwrap.dedent(f"""
        import asyncio, gc, kvsvr
        config = {str(cluster.config_path)!r}
        def lookup():
            c = kvsvr.Client(config)
            try:
                return c.get("no-such-key").value
            except kvsvr.NotFound:
                return None
        async def lookup_async():
            c = kvsvr.AsyncClient(config)   # (its connections and it form a cycle anyway)
            try:
                return (await c.get("no-such-key")).value
            except kvsvr.NotFound:
                return None
        for _ in range(20):
            assert lookup() is None
            assert asyncio.run(lookup_async()) is None
        gc.collect()
        print("done")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout == "done\n", result.stderr


def test_a_client_id_passed_again_goes_on_past_the_earlier_clients_op_ids(client: Client,
                                                                            cluster):
    """A later client given an earlier one's id (resuming it) must not reuse its op ids: its
    sequence started at 1 again, so its incr and append were answered from the earlier
    client's remembered replies and never applied."""
    for _life in range(3):
        with Client(cluster.config, client_id=4242, timeout=10.0) as resumed:
            resumed.incr("counter")
            resumed.append("inbox", "m")
    assert client.get("counter").value == b"3"
    assert len(client.scan("inbox").rows) == 3
