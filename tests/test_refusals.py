"""A refusal that may not be final is never reported as final.

A compare-and-set expecting a version the key has not reached, an incr refused for the key's
value, a compact through a version not reached: each holds only at the key's version when it
was made. While another attempt of the same op id (a resend after an attempt timeout) may
still wait at another replica, that attempt applies the write once the key gets there; so a
client that had such an attempt out reports Timeout (may or may not have been applied), not
the refusal. First the rule itself by a table, then the blocking and asyncio clients against
fake replicas that stay silent or answer what a test says, then a real group of three.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from kvsvr import AsyncClient, Client, calls
from kvsvr import protocol as p
from kvsvr.config import ClusterConfig, load
from kvsvr.errors import (
    Compacted,
    InvalidArgument,
    KvError,
    NotFound,
    Timeout,
    VersionConflict,
)
from kvsvr.launcher import LocalCluster, write_cluster_config
from kvsvr.protocol import I64_MAX
from kvsvr.store.layout import KeyState
from kvsvr.store.planner import plan
from tests.test_failover import ATTEMPT_S, FakeReplica, key_with_home

OP_ID = (7, 1)
A, B = "tcp://127.0.0.1:1", "tcp://127.0.0.1:2"


# --- the rule -----------------------------------------------------------------------------
def test_a_refusal_is_final_unless_it_depends_on_the_keys_future_and_may_still_apply():
    """refusal_outcome(spec, error, address, elsewhere): the refusal itself when it is final
    (a conflict with a version the key is past, a refusal at the version the request expects,
    a request refused for itself, any read's answer) or when no other attempt may still apply
    the write; else Timeout naming both replicas and the version."""
    cas_ahead = calls.put("k", "v", 2, OP_ID)
    incr = calls.incr("k", 1, None, OP_ID)
    conflict = VersionConflict("expected version 2, the key is at 1", version=1)
    not_decimal = InvalidArgument("incr: not a decimal integer", field="key", version=3)
    # spec, refusal, attempts elsewhere that may still apply it -> what is raised
    table: list[tuple[calls.CallSpec, KvError, list[str], type[KvError]]] = [
        (cas_ahead, conflict, [], VersionConflict),            # one attempt: the common case
        (cas_ahead, conflict, [B], Timeout),                   # the key may reach v2
        (calls.put("k", "v", 0, OP_ID), conflict, [B], VersionConflict),   # key past v0
        (calls.put("k", "v", 1, OP_ID), VersionConflict("x", version=1), [B],
         VersionConflict),                                     # (not a conflict, but final)
        (calls.delete("k", 5, OP_ID), VersionConflict("x", version=4), [B], Timeout),
        (calls.row_put("k", "r", "v", 3, OP_ID), VersionConflict("x", version=9), [B],
         VersionConflict),
        (incr, not_decimal, [], InvalidArgument),
        (incr, not_decimal, [B], Timeout),                     # the value may change
        (incr, InvalidArgument("overflow", field="delta", version=3), [B], Timeout),
        (calls.incr("k", 1, 3, OP_ID), not_decimal, [B], InvalidArgument),   # v3 stays so
        (calls.incr("k", 1, 4, OP_ID), not_decimal, [B], Timeout),
        (calls.compact("k", 5, OP_ID),
         InvalidArgument("through_version: 5", field="through_version", version=2), [B],
         Timeout),                                             # the key may reach v5
        (incr, InvalidArgument("delta: not an int", field="delta"), [B],
         InvalidArgument),                                     # the request itself
        (incr, InvalidArgument("key: too long", field="key"), [B], InvalidArgument),
        (incr, InvalidArgument("ops: over the limit", field="ops", version=3), [B],
         InvalidArgument),
        (incr, NotFound("?", version=3), [B], NotFound),
        (calls.get("k"), NotFound("key holds no value", field="key", version=3), [B],
         NotFound),
        (calls.changes("k", 1, b"", 10), Compacted("since", field="since_version",
                                                   version=4), [B], Compacted),
    ]
    for spec, refusal, elsewhere, raised in table:
        got = calls.refusal_outcome(spec, refusal, A, elsewhere)
        assert type(got) is raised, (spec.request, refusal, elsewhere)
        if raised is not Timeout:
            assert got is refusal
        else:
            message = str(got)
            assert f"refused at version {refusal.version} by the replica at {A}" in message
            assert f"at {B} may still apply it" in message and refusal.message in message


def test_the_plans_refusals_drawn_from_the_key_are_the_ones_the_rule_knows():
    """Every refusal the mutation planner draws from the key's state (an incr of a value
    that is not a decimal integer or that overflows, a compact ahead of the key) carries the
    key's version and a field of calls.VALUE_REFUSAL_FIELDS, so the clients can tell it from
    a refusal of the request itself."""
    cases = [
        (KeyState(3, 0, b"abc", 0), p.incr_op(1)),
        (KeyState(3, 0, str(I64_MAX).encode(), 0), p.incr_op(1)),
        (KeyState(3, 0, b"1", 0), p.compact_op(5)),
    ]
    fields = set()
    for state, op in cases:
        with pytest.raises(InvalidArgument) as refused:
            plan(state, [(op.kind, op.row, op.value)])
        assert refused.value.version == 3
        fields.add(refused.value.field)
    assert fields == calls.VALUE_REFUSAL_FIELDS


# --- the clients, against fake replicas ------------------------------------------------------
class Case(NamedTuple):
    what: str
    home: str | KvError          # the key's home replica: FakeReplica's mode
    next: str | KvError          # the next replica of the key
    call: tuple[str, tuple[Any, ...], dict[str, Any]]   # a client method and its arguments
    raised: type[KvError]
    home_delay_s: float = 0.0    # the home answers this late


CAS_AHEAD = ("put", ("v",), {"expected_version": 2})
CONFLICT_V1 = VersionConflict("expected version 2, the key is at 1", version=1)
CASES = [
    Case("one attempt: the refusal", CONFLICT_V1, "answer", CAS_AHEAD, VersionConflict),
    Case("the home silent: it may still apply it", "silent", CONFLICT_V1, CAS_AHEAD, Timeout),
    Case("the key past the version: final", "silent",
         VersionConflict("expected version 2, the key is at 5", version=5), CAS_AHEAD,
         VersionConflict),
    Case("the home answered Unavailable: it holds nothing", "unavailable", CONFLICT_V1,
         CAS_AHEAD, VersionConflict),
    Case("the home answered Timeout: it may still apply it",
         Timeout("node n1: the write was not confirmed by a majority in time"), CONFLICT_V1,
         CAS_AHEAD, Timeout),
    Case("an incr refused for the value after silence", "silent",
         InvalidArgument("incr: the key's value is not a decimal integer", field="key",
                         version=3), ("incr", (), {}), Timeout),
    Case("a compact ahead after silence", "silent",
         InvalidArgument("through_version: 5, the key is only at 2", field="through_version",
                         version=2), ("compact", (5,), {}), Timeout),
    Case("the request refused for itself after silence", "silent",
         InvalidArgument("value: too big", field="value"), CAS_AHEAD, InvalidArgument),
]
# The home's late refusal while the resend is out at the next replica (silent). Only the
# blocking client can take it: the asyncio client closes a silent replica's connection.
LATE = Case("a late refusal while the resend is out", CONFLICT_V1, "silent", CAS_AHEAD,
            Timeout, home_delay_s=ATTEMPT_S * 1.5)


@pytest.fixture
def fakes(tmp_path: Path) -> Iterator[tuple[ClusterConfig, list[FakeReplica]]]:
    config = load(write_cluster_config(tmp_path, replicas=3, sync=False))
    replicas = [FakeReplica(r.node, r.address) for r in config.groups[0].replicas]
    try:
        yield config, replicas
    finally:
        for replica in replicas:
            replica.stop()


def run_case(kind: str, config: ClusterConfig, replicas: list[FakeReplica],
             case: Case) -> KvError:
    """What `case`'s call raises on a new client of `kind` (no replica known to fail)."""
    home, nxt, _ = replicas
    home.mode, nxt.mode, home.delay_s = case.home, case.next, case.home_delay_s
    name, args, kwargs = case.call
    key = key_with_home(0)
    try:
        if kind == "blocking":
            with Client(config, timeout=2.0, attempt_timeout=ATTEMPT_S) as client:
                getattr(client, name)(key, *args, **kwargs)
        else:
            async def call() -> None:
                async with AsyncClient(config, timeout=2.0,
                                       attempt_timeout=ATTEMPT_S) as client:
                    await getattr(client, name)(key, *args, **kwargs)

            asyncio.run(call())
    except KvError as e:
        return e
    raise AssertionError(f"{case.what}: no error raised")


@pytest.mark.parametrize("kind", ["blocking", "asyncio"])
def test_a_refusal_after_an_attempt_that_may_still_apply_is_a_timeout(
        kind: str, fakes: tuple[ClusterConfig, list[FakeReplica]]):
    """Each client, against fake replicas: a refusal that may not be final, answered while an
    attempt at another replica went unanswered or was answered Timeout, is raised as Timeout
    naming both replicas; with a single attempt, after Unavailable answers, or when final,
    the refusal itself."""
    config, replicas = fakes
    home, nxt, _ = (r.address for r in replicas)
    for case in CASES + ([LATE] if kind == "blocking" else []):
        raised = run_case(kind, config, replicas, case)
        assert type(raised) is case.raised, (case.what, raised)
        refused_at_home = isinstance(case.home, KvError) and not isinstance(case.home, Timeout)
        refuser, other = (home, nxt) if refused_at_home else (nxt, home)
        if case.raised is Timeout:
            assert f"by the replica at {refuser}" in str(raised) and \
                f"at {other} may still apply it" in str(raised), (case.what, raised)
        else:
            refusal = case.home if refused_at_home else case.next
            assert isinstance(refusal, KvError)
            assert (raised.message, raised.version) == (refusal.message, refusal.version)


# --- a real group ---------------------------------------------------------------------------
def test_a_compare_and_set_ahead_answered_after_a_silent_home_is_a_timeout(tmp_path: Path):
    """Three real replicas; the key's home is cut off from its peers (every message it sends
    them dropped), so a compare-and-set there waits for its version barrier and goes
    unanswered. Expecting a version the key has not reached, its resend to the next replica
    is refused there: reported Timeout, since the home may still apply it. Expecting a
    version the key is past, the same history is VersionConflict (final); and the CAS ahead
    sent once (to the next replica only) is VersionConflict too."""
    cluster = LocalCluster(write_cluster_config(tmp_path, replicas=3, sync=False),
                           log_dir=tmp_path / "logs")
    cluster.start()
    try:
        key = key_with_home(0)
        home, nxt = cluster.address("n1"), cluster.address("n2")
        with Client(cluster.config, timeout=5.0, attempt_timeout=0.3) as admin:
            assert admin.put(key, "a") == 1
            admin.faults(home, drop=1.0)
            with Client(cluster.config, timeout=5.0, attempt_timeout=0.3) as client, \
                    pytest.raises(Timeout) as timeout:
                client.put(key, "x", expected_version=2)
            assert f"refused at version 1 by the replica at {nxt}" in str(timeout.value)
            assert f"at {home} may still apply it" in str(timeout.value)
            with Client(cluster.config, timeout=5.0, attempt_timeout=0.3) as client, \
                    pytest.raises(VersionConflict) as conflict:
                client.put(key, "y", expected_version=0)
            assert conflict.value.version == 1
            with Client(address=nxt, timeout=5.0) as client, \
                    pytest.raises(VersionConflict) as conflict:
                client.put(key, "z", expected_version=2)
            assert conflict.value.version == 1
            admin.faults(home)
            assert admin.get(key).value == b"a"
    finally:
        cluster.stop()
