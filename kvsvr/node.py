"""`kvsvr-node`: serve one storage node over ZeroMQ.

A node of a group of one replica is a `Node` (kvsvr/single.py: group commit, answered once
durable); a node of a larger group is a `ReplicaNode` (kvsvr/replica/: the version quorum and
the binlog stream). `main` picks which from the config.
"""

from __future__ import annotations

import gc
import logging
import sys

import lmdb

from kvsvr.config import load
from kvsvr.errors import ConfigError
from kvsvr.process import (
    add_config_argument,
    add_log_level,
    on_stop_signals,
    program_parser,
    setup_logging,
)
from kvsvr.replica import ReplicaNode
from kvsvr.single import Node
from kvsvr.store import StoreLocked
from kvsvr.votelog import VoteLogDamaged

log = logging.getLogger("kvsvr.node")


def main(argv: list[str] | None = None) -> int:
    parser = program_parser("kvsvr-node", "Serve one KVSvr node.")
    add_config_argument(parser, "cluster TOML (the embedded config: one group of 3 replicas)")
    parser.add_argument("--node", help="node name in the config (default: the first node)")
    add_log_level(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = load(args.config)
        config.require_kv_groups()
        name = args.node or config.groups[0].replicas[0].node
        group, _ = config.replica(name)
        if len(group.replicas) > 1:
            node: Node = ReplicaNode(config, name)
        else:
            node = Node(config, name)
    except ConfigError as e:
        print(f"kvsvr-node: config error: {e}", file=sys.stderr)
        return 2
    except (StoreLocked, VoteLogDamaged, lmdb.Error, OSError) as e:
        print(f"kvsvr-node: cannot open storage: {e}", file=sys.stderr)
        return 1

    def stop() -> None:
        node.stopping = True

    on_stop_signals(stop, log)
    # What start-up made (modules, config, the open store) lives as long as the node: kept out
    # of the cyclic collector's full passes, which walked it on every one and paused a node
    # filling with new keys.
    gc.freeze()
    try:
        node.serve()
    except OSError as e:
        print(f"kvsvr-node: {e}", file=sys.stderr)
        node.store.close()
        return 1
    return 0


__all__ = ["Node", "ReplicaNode", "main"]

if __name__ == "__main__":
    sys.exit(main())
