"""A deterministic simulation of a whole replica group running the replica's own code.

Every replica of one group is a real `ReplicaNode` (kvsvr/replica/) in this process, on a
real LMDB store in a directory of its own; what a node does outside its round is faked
(kvsvr/testing/fakes.py): the network between replicas and clients (seeded drops,
duplicates, delays that reorder, cuts), the vote log's fdatasync (a frame is durable when the
simulation says so, and a crash loses the rest), the committer's thread (commits land after
simulated milliseconds, so keys freeze during a commit), and the clock (a fake `now` handed to
every round; nothing sleeps). Clients send real request frames with op ids and retry with the
same op id, possibly on another replica. Faults during a run: crashes (what SIGKILL does: the
open LMDB transaction is lost, the store reopened from its directory), clean stops (what
SIGTERM does), wipes (the directory deleted: a new
incarnation that rebuilds from its peers), partitions, slow commits.

After the run the faults heal and the group settles; then every seed is checked:
- every key's history of acknowledged operations is linearizable (final reads included);
- nothing acknowledged is lost: every replica holds every acknowledged write, and each key
  took exactly one version per applied write (an `incr` or `append` retried is applied once);
- every replica applied the same operation at each version of a key (read from each
  replica's binlog as its commits land: ground truth, not the replicas' claims);
- the replicas converge: the same version, value and rows per key on every replica;
- no replica logs an error.

    outcome = Simulation(seed, faults=Faults(crashes=3)).run()   # SimulationFailure if not

A seed replays exactly in the same process, and in any process under PYTHONHASHSEED=HASH_SEED
(the replica iterates sets of keys, whose order follows the hash seed): `run_seeds_replayable`
runs seeds in such a process, and a failure's message gives the command that replays it.
`Script` runs scenario scripts (tests/testdata/replica_sim/) step by step.

The parts, by job: settings.py (timings, limits, keys, `Faults`), clients.py (the simulated
clients), replicas.py (a replica's host, node and driver), simulation.py (the harness: a run,
its calls and faults), checks.py (settling and the checks), script.py (scenario scripts),
runner.py (running seeds, the command line: `python -m kvsvr.testing.replica_sim`).
"""

from kvsvr.testing.replica_sim.replicas import ReplicaDriver, SimReplicaNode
from kvsvr.testing.replica_sim.runner import main, run_seeds, run_seeds_replayable
from kvsvr.testing.replica_sim.script import Script
from kvsvr.testing.replica_sim.settings import (
    ATTEMPT_TIMEOUT_US,
    CALL_KINDS,
    CALL_TIMEOUT_US,
    DUPLICATE_ONLY_ERRORS,
    HASH_SEED,
    IDLE_ROUND_US,
    INBOXES,
    KEYS,
    MAP_SIZE_MIB,
    REGISTERS,
    RETRY_BACKOFF_US,
    ROUND_MESSAGES_MAX,
    RUN_S_MAX,
    SETTLE_POLL_US,
    SETTLE_S_MAX,
    SIM_VOTE_LOG_BYTES,
    START_US,
    THINK_US,
    TRACE_EVENTS_MAX,
    Faults,
)
from kvsvr.testing.replica_sim.simulation import Outcome, Simulation, SimulationFailure

__all__ = [
    "ATTEMPT_TIMEOUT_US",
    "CALL_KINDS",
    "CALL_TIMEOUT_US",
    "DUPLICATE_ONLY_ERRORS",
    "HASH_SEED",
    "IDLE_ROUND_US",
    "INBOXES",
    "KEYS",
    "MAP_SIZE_MIB",
    "REGISTERS",
    "RETRY_BACKOFF_US",
    "ROUND_MESSAGES_MAX",
    "RUN_S_MAX",
    "SETTLE_POLL_US",
    "SETTLE_S_MAX",
    "SIM_VOTE_LOG_BYTES",
    "START_US",
    "THINK_US",
    "TRACE_EVENTS_MAX",
    "Faults",
    "Outcome",
    "ReplicaDriver",
    "Script",
    "SimReplicaNode",
    "Simulation",
    "SimulationFailure",
    "main",
    "run_seeds",
    "run_seeds_replayable",
]
