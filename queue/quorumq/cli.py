"""The `quorumq` command: create topics, produce, tail, and per-server status and lag."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvsvr.config import ClusterConfig, load
from kvsvr.errors import ConfigError, InvalidArgument, KvError, NotFound, Timeout, Unavailable
from quorumq import protocol
from quorumq.consumer import Consumer, Delivery
from quorumq.producer import Producer
from quorumq.protocol import QMethod
from quorumq.transport import call

EXIT_OK, EXIT_NOT_FOUND, EXIT_INVALID, EXIT_UNAVAILABLE, EXIT_OTHER = 0, 1, 2, 4, 5


def _servers(config: ClusterConfig) -> list[tuple[str, str, str]]:
    return [(g.name, s.node, s.address) for g in config.queue_groups for s in g.servers]


def create_topic(config: ClusterConfig, args: argparse.Namespace) -> int:
    request = protocol.CreateTopicRequest(protocol.check_topic(args.topic), args.retention_bytes,
                                          args.retention_s)
    failed = 0
    for group, node, address in _servers(config):
        try:
            call(address, QMethod.CREATE_TOPIC, request, timeout=args.timeout)
            print(f"{group}/{node}: topic {args.topic!r} ready")
        except KvError as e:
            failed += 1
            print(f"{group}/{node}: {type(e).__name__}: {e}", file=sys.stderr)
    # A server that missed it gets it from the producers later (they recreate it on NotFound).
    return EXIT_OK if failed < len(_servers(config)) else EXIT_UNAVAILABLE


def produce(config: ClusterConfig, args: argparse.Namespace) -> int:
    messages = list(args.messages) or [line.rstrip("\n") for line in sys.stdin]
    if not messages:
        raise InvalidArgument("messages: nothing to send", field="messages")
    with Producer(config, args.topic) as producer:
        for start in range(0, len(messages), args.batch):
            committed = producer.send_batch(messages[start:start + args.batch],
                                            timeout=args.timeout)
            print(f"committed on {committed.group}: producer {committed.producer_id:016x} "
                  f"seq {committed.first_seq}..{committed.first_seq + committed.count - 1}")
    return EXIT_OK


def tail(config: ClusterConfig, args: argparse.Namespace) -> int:
    def show(d: Delivery) -> None:
        if args.json:
            print(json.dumps({"producer": d.producer_id, "seq": d.seq, "group": d.group,
                              "append_ms": d.append_ms,
                              "value": d.value.decode(errors="replace")}), flush=True)
        else:
            print(f"{d.producer_id:016x}:{d.seq}\t{d.value.decode(errors='replace')}",
                  flush=True)

    topic = protocol.check_topic(args.topic)
    known = unreachable = 0
    for _group, _node, address in _servers(config):
        try:
            known += any(info.topic == topic for info in call(
                address, QMethod.TOPICS, protocol.TopicsRequest(), timeout=args.timeout))
        except KvError:
            unreachable += 1
    if not known:
        if unreachable == len(_servers(config)):
            raise Unavailable(f"no queue server answered in {args.timeout} s")
        raise NotFound(f"topic: {topic!r} does not exist on any queue server that answered "
                       "(create it with `quorumq create-topic`)", field="topic")
    with Consumer(config, topic, args.group) as consumer:
        consumer.run(show, max_messages=args.max,
                     idle_timeout=None if args.follow else args.idle)
    return EXIT_OK


def status(config: ClusterConfig, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for group, node, address in _servers(config):
        try:
            info = call(address, QMethod.STATUS, protocol.StatusRequest(), timeout=args.timeout)
            rows.append({"group": group, "node": node, "up": True, **info})
        except KvError as e:
            rows.append({"group": group, "node": node, "address": address, "up": False,
                         "error": str(e)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        if not row["up"]:
            print(f"{row['group']}/{row['node']}  DOWN  {row['error']}")
            continue
        print(f"{row['group']}/{row['node']}  {row['address']}  incarnation "
              f"{row['incarnation']:016x}  up {row['uptime_s']} s  mean fdatasync "
              f"{row['sync_mean_us']} us")
        for name, topic in row["topics"].items():
            print(f"    topic {name}: offsets {topic['start_offset']}..{topic['end_offset']}  "
                  f"{topic['bytes']} bytes in {topic['segments']} segment(s)")
        for offsets in row["offsets"]:
            lag = row["topics"].get(offsets["topic"], {}).get("end_offset", 0) - \
                offsets["offset"]
            print(f"    group {offsets['group']} on {offsets['topic']}: offset "
                  f"{offsets['offset']}  lag {lag}  {'whole' if offsets['whole'] else 'NOT whole'}")
        for report in row["recovery"]:
            print(f"    RECOVERY: {report}")
    return EXIT_OK


def lag(config: ClusterConfig, args: argparse.Namespace) -> int:
    topic = protocol.check_topic(args.topic)
    group_name = protocol.check_group(args.group)
    print("GROUP/NODE\tEND\tCOMMITTED\tLAG\tWHOLE")
    for group, node, address in _servers(config):
        try:
            offsets = call(address, QMethod.OFFSETS, protocol.OffsetsRequest(topic, group_name),
                           timeout=args.timeout)
            fetched = call(address, QMethod.FETCH, protocol.FetchRequest(topic, 0, 1),
                           timeout=args.timeout)
        except KvError as e:
            print(f"{group}/{node}\t-\t-\t-\t-\t({type(e).__name__}: {e})")
            continue
        committed = offsets.offset if offsets.found else fetched.start_offset
        print(f"{group}/{node}\t{fetched.end_offset}\t{committed}\t"
              f"{fetched.end_offset - committed}\t{'yes' if offsets.whole else 'no'}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quorumq", description="Quorum queue tool.")
    parser.add_argument("--config", help="cluster TOML with [[queue_groups]]")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per call")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("create-topic", help="create a topic on every server")
    p.add_argument("topic")
    p.add_argument("--retention-bytes", type=int, default=0, help="per server (0: no bound)")
    p.add_argument("--retention-s", type=int, default=0, help="age bound (0: none)")
    p.set_defaults(run=create_topic)
    p = commands.add_parser("produce", help="send messages (arguments, or stdin lines)")
    p.add_argument("topic")
    p.add_argument("messages", nargs="*")
    p.add_argument("--batch", type=int, default=1000)
    p.set_defaults(run=produce)
    p = commands.add_parser("tail", help="consume and print, committing offsets")
    p.add_argument("topic")
    p.add_argument("--group", default="tail", help="consumer group (default: tail)")
    p.add_argument("--max", type=int, default=None, help="stop after N messages")
    p.add_argument("--follow", action="store_true", help="keep waiting for new messages")
    p.add_argument("--idle", type=float, default=2.0, help="stop after N idle seconds")
    p.set_defaults(run=tail)
    p = commands.add_parser("status", help="every server: incarnation, topics, offsets, "
                            "recovery reports")
    p.set_defaults(run=status)
    p = commands.add_parser("lag", help="per server: end offset, committed offset, lag")
    p.add_argument("topic")
    p.add_argument("--group", required=True)
    p.set_defaults(run=lag)
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout: expected seconds > 0")
    try:
        config = load(args.config)
        if not config.queue_groups:
            raise ConfigError("queue_groups: the config has no queue groups")
        return int(args.run(config, args))
    except ConfigError as e:
        print(f"quorumq: config error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except InvalidArgument as e:
        print(f"quorumq: invalid argument: {e}", file=sys.stderr)
        return EXIT_INVALID
    except NotFound as e:
        print(f"quorumq: not found: {e}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (Timeout, Unavailable) as e:
        print(f"quorumq: {type(e).__name__.lower()}: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KvError as e:
        print(f"quorumq: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_OTHER


if __name__ == "__main__":
    sys.exit(main())
