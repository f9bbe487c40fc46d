"""Bad input through the public client API: a clear error naming the field, and nothing
changed (the key's version is where it was)."""

from __future__ import annotations

import pytest

from kvsvr import Client, InvalidArgument
from kvsvr.limits import MAX_KEY_BYTES, MAX_OPS_PER_BATCH, MAX_ROW_KEY_BYTES, MAX_VALUE_BYTES


@pytest.mark.parametrize("call, field", [
    (lambda c: c.put("k" * (MAX_KEY_BYTES + 1), "v"), "key"),
    (lambda c: c.put("", "v"), "key"),
    (lambda c: c.put(12, "v"), "key"),
    (lambda c: c.put("k", b"v" * (MAX_VALUE_BYTES + 1)), "value"),
    (lambda c: c.put("k", 3.5), "value"),
    (lambda c: c.put("k", "v", expected_version=-1), "expected_version"),
    (lambda c: c.put("k", "v", expected_version="1"), "expected_version"),
    (lambda c: c.incr("k", 2**63), "delta"),
    (lambda c: c.incr("k", "1"), "delta"),
    (lambda c: c.row_put("k", "r" * (MAX_ROW_KEY_BYTES + 1), "v"), "row"),
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
    for i in range(MAX_OPS_PER_BATCH + 1):
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
