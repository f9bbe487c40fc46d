"""Scenario scripts (tests/testdata/replica_sim/): commands run step by step on a simulated
group, each block printed with what its command printed."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

from kvsvr import _core, calls, protocol
from kvsvr.errors import KvError, Timeout
from kvsvr.limits import SCAN_ROWS_MAX
from kvsvr.testing.fakes import US_PER_MS
from kvsvr.testing.replica_sim.clients import describe_answer
from kvsvr.testing.replica_sim.replicas import ReplicaHost
from kvsvr.testing.replica_sim.settings import CALL_TIMEOUT_US, Faults
from kvsvr.testing.replica_sim.simulation import Simulation, SimulationFailure


class Script:
    """A scenario script in the etcd-io/raft testdata style: blocks of a command, a line
    "----" and what the command printed, separated by blank lines ("#" lines are comments).
    `Script(text).run()` runs the commands on a simulated group (fixed timings, no random
    fault: the script makes its own) and gives the text back with what they print now.

        group [replicas=3] [checkpoint_ms=50]   start the group (each replica says its role)
        put|cas|incr|append|get|scan CLIENT NODE KEY [ARG] [expected=V] [local]
                                     send a call (a new op id); answers print in `run`
        retry CLIENT NODE            send the client's last call again (same op id) to NODE
        run MS                       let MS simulated milliseconds pass: what was answered
                                     (with how long after its send) and role changes
        crash|wipe|restart NODE      kill (the directory kept or deleted) or start a replica
        cut A B | mend A B | isolate NODE | heal     links between hosts (replicas, clients)
        commits MS                   later checkpoint commits take MS milliseconds
        state NODE KEY...            the node's role and its own copy of each key
        counters NODE NAME...        some of the node's counters
    """

    def __init__(self, text: str):
        self.text = text
        self.sim: Simulation | None = None
        self.out: list[str] = []
        self.clients: dict[str, ScriptClient] = {}
        self._stack = contextlib.ExitStack()

    def run(self) -> str:
        blocks = []
        with self._stack:
            for comments, command in _script_blocks(self.text):
                self.out = []
                try:
                    self._do(command.split())
                except SimulationFailure as e:
                    self.out.append(f"failed: {str(e).splitlines()[0]}")
                blocks.append("\n".join([*comments, command, "----", *(self.out or ["ok"])]))
        return "\n\n".join(blocks) + "\n"

    def _group(self, words: list[str]) -> Simulation:
        options = dict(word.split("=") for word in words[1:])
        sim = Simulation(int(options.get("seed", 0)), replicas=int(options.get("replicas", 3)),
                         faults=Faults.scripted(),
                         checkpoint_interval_ms=int(options.get("checkpoint_ms", 50)))
        sim.listener = self.out.append
        self._stack.enter_context(sim.group())
        sim.run_until(lambda: all(r.role == "replica" for r in sim.replicas), 10.0,
                      "the group did not start")
        return sim

    def _do(self, words: list[str]) -> None:
        kind, args = words[0], words[1:]
        if kind == "group":
            self.sim = self._group(words)
            return
        sim = self.sim
        if sim is None:
            raise ValueError("a script starts with `group`")
        sim.listener = self.out.append
        if kind in ("put", "cas", "incr", "append", "get", "scan", "retry"):
            client = self.clients.get(args[0])
            if client is None:
                client = self.clients[args[0]] = ScriptClient(sim, args[0])
            client.call(kind, args[1:])
        elif kind == "run":
            sim.scheduler.run_until(sim.scheduler.now_us + int(float(args[0]) * US_PER_MS))
        elif kind in ("crash", "wipe", "restart"):
            self._life(sim, kind, sim.replica(args[0]))
        elif kind in ("cut", "mend"):
            getattr(sim.network, kind)(args[0], args[1])
        elif kind == "isolate":
            for host in [r.host for r in sim.replicas] + sorted(self.clients):
                if host != args[0]:
                    sim.network.cut(args[0], host)
        elif kind == "heal":
            sim.network.heal()
        elif kind == "commits":
            sim.faults.commit_ms = (float(args[0]), float(args[0]))
        elif kind == "state":
            self.out.append(sim.replica(args[0]).describe([a.encode() for a in args[1:]]))
        elif kind == "counters":
            node = sim.replica(args[0]).node
            counters = node.counters if node is not None else {}
            self.out.append(", ".join(f"{name} {counters.get(name, 0)}" for name in args[1:]))
        else:
            raise ValueError(f"unknown command {kind!r}")

    @staticmethod
    def _life(sim: Simulation, kind: str, replica: ReplicaHost) -> None:
        if kind == "restart":
            sim.driver.start(replica)
            return
        sim.driver.crash(replica)
        if kind == "wipe":
            shutil.rmtree(replica.data_dir)


class ScriptClient:
    """A client of a script: each call has an op id of its own; `retry` sends the last one
    again (same op id, new request id); answers are noted as they arrive. A refusal that may
    not be final, while an attempt of the same op id at another replica is unanswered or was
    answered Timeout, is noted as the Timeout kvsvr.client raises for it
    (kvsvr.calls.refusal_outcome): "Timeout, not conflict v1: ..."."""

    def __init__(self, sim: Simulation, name: str):
        self.sim = sim
        self.name = self.host = name
        self.identity = name.encode()
        self.client_id = 1000 + len(sim.hosts_by_identity)
        self.seq = 0
        self.request_id = 0
        self.last: tuple[calls.CallSpec, str] | None = None
        self.sent: dict[int, tuple[calls.CallSpec, str, str, int]] = {}
        # request id -> (spec, node) of the attempts answered Timeout: they may still apply
        self.timed_out: dict[int, tuple[calls.CallSpec, str]] = {}
        sim.hosts_by_identity[self.identity] = self

    def call(self, kind: str, args: list[str]) -> None:
        if kind == "retry":
            if self.last is None:
                raise ValueError(f"{self.name} has no call to retry")
            self._send(*self.last, args[0])
            return
        node, key = args[0], args[1].encode()
        values = [a for a in args[2:] if "=" not in a and a != "local"]
        expected = next((int(a.split("=")[1]) for a in args if a.startswith("expected=")),
                        None)
        consistency = "local" if "local" in args else "linearizable"
        self.seq += 1
        op_id = (self.client_id, self.seq)
        if kind in ("put", "cas"):
            spec = calls.put(key, values[0].encode(), expected, op_id)
        elif kind == "incr":
            spec = calls.incr(key, int(values[0]) if values else 1, expected, op_id)
        elif kind == "append":
            spec = calls.append(key, values[0].encode(), op_id)
        elif kind == "get":
            spec = calls.get(key, consistency)
        else:
            spec = calls.scan(key, b"", None, SCAN_ROWS_MAX, consistency)
        self.last = (spec, " ".join([kind, *args[1:]]))
        self._send(*self.last, node)

    def _send(self, spec: calls.CallSpec, what: str, node: str) -> None:
        sim = self.sim
        self.request_id += 1
        self.sent[self.request_id] = (spec, what, node, sim.scheduler.now_us)
        sim.send_request(self, sim.replica(node).index, spec, self.request_id, CALL_TIMEOUT_US)

    def receive(self, payload: bytes) -> None:
        for _kind, status, request_id, _budget, body in _core.decode_frames(payload)[0]:
            sent = self.sent.pop(request_id, None)
            if sent is None:
                continue
            spec, what, node, at_us = sent
            try:
                answer = describe_answer(protocol.parse_reply(spec.method, status, body))
            except Timeout as e:
                self.timed_out[request_id] = (spec, node)
                answer = describe_answer(e)
            except KvError as e:
                answer = self._refusal(spec, node, e)
            took_ms = (self.sim.scheduler.now_us - at_us) / US_PER_MS
            self.sim.note(f"{self.name} {what} at {node}: {answer} (+{took_ms:.1f}ms)",
                          fault=False)

    def _refusal(self, spec: calls.CallSpec, node: str, error: KvError) -> str:
        """How `error`, the answer of `node`, reads: as the client's Timeout when an attempt
        of the same call at another node may still apply the write and `error` may not be
        final."""
        elsewhere = {other: None for other_spec, _, other, _ in self.sent.values()
                     if other_spec is spec and other != node}
        elsewhere.update((other, None) for other_spec, other in self.timed_out.values()
                         if other_spec is spec and other != node)
        outcome = calls.refusal_outcome(spec, error, node, list(elsewhere))
        if outcome is error:
            return describe_answer(error)
        return (f"{describe_answer(outcome)}, not {describe_answer(error)}: the attempt at "
                f"{', '.join(elsewhere)} may still apply it")


def _script_blocks(text: str) -> Iterator[tuple[list[str], str]]:
    """(comment lines, command) of each block of a script (what it printed is dropped)."""
    for block in text.strip().split("\n\n"):
        lines = block.strip().splitlines()
        commands = [line for line in lines if not line.startswith("#")]
        if commands:
            yield [line for line in lines if line.startswith("#")], commands[0]

