"""The checks that end a run: the group settles (every replica's own copy the same), a final
linearizable read of every key through every replica joins the history, the history is
linearizable and nothing acknowledged is lost or applied twice."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from kvsvr import calls, protocol
from kvsvr.errors import NotFound
from kvsvr.limits import SCAN_ROWS_MAX
from kvsvr.protocol import Method
from kvsvr.testing.fakes import US_PER_S
from kvsvr.testing.linearizability import UNKNOWN, Op, check
from kvsvr.testing.replica_sim.clients import Call, SimClient
from kvsvr.testing.replica_sim.settings import (
    INBOXES,
    KEYS,
    REGISTERS,
    RUN_S_MAX,
    SETTLE_POLL_US,
    SETTLE_S_MAX,
)

if TYPE_CHECKING:
    from kvsvr.testing.replica_sim.simulation import Simulation


def settle(sim: Simulation) -> None:
    """Run until every replica votes with nothing open above what it applied, nothing
    in flight or waiting, and every replica's own copy of every key is the same."""
    sim.scheduler.after(SETTLE_POLL_US, functools.partial(_look, sim))
    end_us = sim.scheduler.now_us + int(SETTLE_S_MAX * US_PER_S)
    while not sim.settled:
        due = sim.scheduler.next_due_us()
        if due is None or due > end_us:
            looks = dict(zip([r.name for r in sim.replicas], sim.copies, strict=False))
            sim.fail(f"the group did not settle within {SETTLE_S_MAX:g} s after the "
                     f"faults healed; last look: {looks}")
        sim.scheduler.run_next()


def _look(sim: Simulation) -> None:
    """Ask every replica its status, each key's versions (applied, highest open) and its
    own copy of every key (local reads); once every answer is in, the group has settled
    or is looked at again later."""
    specs: list[tuple[Any, calls.CallSpec]] = [
        ("status", calls.status()),
        ("versions", calls.CallSpec(None, Method.VERSIONS,
                                    protocol.VersionsRequest(list(KEYS)), _same))]
    specs += [(key, calls.get(key, consistency="local")) for key in REGISTERS]
    specs += [(key, calls.scan(key, b"", None, SCAN_ROWS_MAX, consistency="local"))
              for key in INBOXES]
    answers: list[dict[Any, Any]] = [{} for _ in sim.replicas]
    pending = [len(specs) * len(sim.replicas)]

    def collected() -> None:
        sim.copies = []
        for got in answers:
            copy: dict[Any, Any] = {key: _copy_of(got[key]) for key in KEYS}
            busy = _busy(got["status"], got["versions"])
            if busy:
                copy["busy"] = busy
            sim.copies.append(copy)
        if all(copy == sim.copies[0] and "busy" not in copy for copy in sim.copies):
            sim.settled = True
        else:
            sim.scheduler.after(SETTLE_POLL_US, functools.partial(_look, sim))

    for replica in sim.replicas:
        for what, spec in specs:
            def done(result: Any, into: dict[Any, Any] = answers[replica.index],
                     what: Any = what) -> None:
                into[what] = result
                pending[0] -= 1
                if not pending[0]:
                    collected()

            sim.checker.call(replica.index, spec, done)


def final_reads(sim: Simulation) -> None:
    """A linearizable read of every key through every replica, part of the history: a
    write acknowledged and then lost would make these reads fail the check."""
    client = SimClient(sim, len(sim.clients), sim.random_client.getrandbits(62) | 1)
    sim.hosts_by_identity[client.identity] = client
    plan = [(key, replica) for key in KEYS for replica in sim.replicas]

    def next_read() -> None:
        if not plan:
            return
        key, replica = plan.pop(0)
        scan = key in INBOXES
        spec = calls.scan(key, b"", None, SCAN_ROWS_MAX) if scan else calls.get(key)
        op = Op(client.index, "scan" if scan else "get", key, None, UNKNOWN,
                sim.scheduler.now)
        sim.history.append(op)

        def done(result: Any) -> None:
            if result is UNKNOWN:
                sim.fail(f"a final read of {key!r} through {replica.name} went "
                         "unanswered after the group settled")
            sim.record(client, op, result)
            next_read()

        client.start(Call(spec, sim.scheduler.now_us, done), replica.index)

    next_read()
    sim.run_until(lambda: not plan and client.call is None, RUN_S_MAX,
                  "the final reads did not finish")


def check_outcome(sim: Simulation) -> None:
    ok, problem = check(sim.history)
    if not ok:
        sim.fail(f"not linearizable: {problem}")
    for replica, copy in zip(sim.replicas, sim.copies, strict=True):
        for key in KEYS:
            _check_acknowledged(sim, replica.name, key, copy[key])
    sim.count("history_ops", len(sim.history))


def _check_acknowledged(sim: Simulation, name: str, key: bytes,
                        held: tuple[int, Any]) -> None:
    """Every acknowledged write of `key` is in this replica's copy, and the key's version
    counts exactly the writes applied: at least those acknowledged, at most those and
    the ones whose outcome is unknown."""
    version = held[0]
    writes = [op for op in sim.history if op.key == key and op.kind not in ("get", "scan")]
    applied = [op for op in writes if op.result is not UNKNOWN and op.result[0] == "ok"]
    unknown = [op for op in writes if op.result is UNKNOWN]
    if not len(applied) <= version <= len(applied) + len(unknown):
        sim.fail(f"{name} holds {key!r} at version {version}, but {len(applied)} writes "
                 f"were acknowledged and {len(unknown)} may have applied: a write was "
                 "lost or applied twice")
    top = max((sim.acknowledged[id(op)] for op in applied), default=0)
    if version < top:
        sim.fail(f"{name} holds {key!r} at version {version}, below the acknowledged "
                 f"version {top}")
    if key in INBOXES:
        rows = held[1]
        for op in applied:
            seq = op.result[1]
            if seq >= len(rows) or rows[seq] != op.argument:
                sim.fail(f"{name}: append {op.argument!r} acknowledged at seq {seq} is "
                         f"not there (rows {rows!r})")
        if len(set(rows)) != len(rows):
            sim.fail(f"{name}: an append was applied twice: {rows!r}")


def _same(reply: Any) -> Any:
    return reply


def _busy(status: Any, versions: Any) -> str:
    """What keeps a replica from counting as settled ("" if nothing): not voting, proposals
    in flight, requests waiting, or a value accepted above the version it applied (an
    instance still to finish). Instances at or below it are not counted: a rebuilt life can
    keep some in memory (state answers of instances it then copied past)."""
    if not isinstance(status, dict):
        return f"no status ({status!r})"
    busy = []
    if status["role"] != "replica":
        busy.append(status["role"])
    if status["quorum"]["proposals_in_flight"]:
        busy.append(f"{status['quorum']['proposals_in_flight']} proposals in flight")
    if status["waiting"]["keys"]:
        busy.append(f"{status['waiting']['keys']} keys with waiting requests")
    if not isinstance(versions, protocol.VersionsReply):
        busy.append(f"no versions ({versions!r})")
    elif any(v.open > v.applied for v in versions.versions):
        busy.append("instances open above the applied version")
    return ", ".join(busy)


def _copy_of(answer: Any) -> Any:
    """A local read's answer as a comparable value: (version, value) or (version, rows)."""
    if isinstance(answer, NotFound):
        return (answer.version, None)
    if isinstance(answer, protocol.Versioned):
        return (answer.version, answer.value)
    if isinstance(answer, protocol.ScanPage):
        return (answer.version, tuple(row.value for row in answer.rows))
    return ("error", repr(answer))

