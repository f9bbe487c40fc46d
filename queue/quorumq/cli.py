"""The `quorumq` command: create topics, produce, tail, and per-server status and lag.

Every look-up asks all servers at once (an unreachable server costs ADMIN_CALL_TIMEOUT_S,
not that per server), and `--json` gives every command's result as JSON on stdout (errors
as one JSON object on stderr). Exit codes are in EXIT_CODES.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from kvsvr.config import ClusterConfig, load
from kvsvr.errors import ConfigError, InvalidArgument, KvError, NotFound, Timeout, Unavailable
from kvsvr.process import add_config_argument, on_stop_signals, program_parser
from quorumq import protocol, quorum
from quorumq.consumer import Consumer, Delivery
from quorumq.limits import ADMIN_CALL_TIMEOUT_S, REQUEST_TIMEOUT_S
from quorumq.producer import Producer
from quorumq.protocol import QMethod
from quorumq.transport import call

EXIT_OK = 0
EXIT_NOT_FOUND = 1       # the topic does not exist
EXIT_INVALID = 2         # a bad argument or config (nothing was changed)
EXIT_PARTIAL = 3         # status: a server is down, every group still has 2 up;
#                          create-topic: the topic exists with other settings (unchanged)
EXIT_UNAVAILABLE = 4     # status: a group has fewer than 2 servers up; produce: NOT
#                          acknowledged; any command: no server answered
EXIT_OTHER = 5
EXIT_INTERRUPTED = 130   # Ctrl-C (128 + SIGINT, as a shell reports it)
EXIT_CODES = {EXIT_OK: "ok", EXIT_NOT_FOUND: "not found", EXIT_INVALID: "invalid argument",
              EXIT_PARTIAL: "partial", EXIT_UNAVAILABLE: "unavailable", EXIT_OTHER: "error",
              EXIT_INTERRUPTED: "interrupted"}


@dataclass
class Answer:
    """One server's answer to a request sent to every server."""

    group: str
    node: str
    address: str
    result: Any = None
    error: KvError | None = None


def ask_all(config: ClusterConfig, method: int, request: Any | Callable[[str], Any],
            timeout: float, nodes: set[str] | None = None) -> list[Answer]:
    """`request` (or `request(node)`) sent to every queue server (or those in `nodes`) at
    once; the answers in config order. Returns within about `timeout`."""
    answers = [Answer(g.name, s.node, s.address) for g in config.queue_groups
               for s in g.servers if nodes is None or s.node in nodes]
    context = zmq.Context()

    def ask(answer: Answer) -> None:
        body = request(answer.node) if callable(request) else request
        try:
            answer.result = call(answer.address, method, body, timeout=timeout,
                                 context=context)
        except KvError as e:
            answer.error = e

    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, len(answers))) as pool:
            list(pool.map(ask, answers))
    finally:
        context.term()
    return answers


def emit(args: argparse.Namespace, document: Any, text: str) -> None:
    print(json.dumps(document) if args.json else text, flush=True)


def _settings_text(info: protocol.TopicInfo) -> str:
    return f"retention_bytes {info.retention_bytes}, retention_s {info.retention_s}"


def create_topic(config: ClusterConfig, args: argparse.Namespace) -> int:
    """Create the topic where it is missing; an existing one keeps its settings unless
    --update. Settings not given are the existing topic's (else 0: no bound)."""
    topic = protocol.check_topic(args.topic)
    for name in ("retention_bytes", "retention_s"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise InvalidArgument(f"--{name.replace('_', '-')}: expected >= 0", field=name)
    if args.update and args.retention_bytes is None and args.retention_s is None:
        raise InvalidArgument("--update: give --retention-bytes and/or --retention-s to "
                              "change", field="update")
    looked = ask_all(config, QMethod.TOPICS, protocol.TopicsRequest(), args.timeout)
    existing = {a.node: info for a in looked if a.error is None
                for info in a.result if info.topic == topic}
    base = next(iter(existing.values()), None)

    def wanted(current: protocol.TopicInfo | None) -> protocol.CreateTopicRequest:
        known = current or base
        return protocol.CreateTopicRequest(
            topic,
            args.retention_bytes if args.retention_bytes is not None
            else (known.retention_bytes if known else 0),
            args.retention_s if args.retention_s is not None
            else (known.retention_s if known else 0))

    def differs(info: protocol.TopicInfo) -> bool:
        request = wanted(info)
        return (info.retention_bytes, info.retention_s) != (request.retention_bytes,
                                                              request.retention_s)

    up = {a.node for a in looked if a.error is None}
    to_create = up - set(existing)
    to_update = {n for n, info in existing.items() if args.update and differs(info)}
    conflicts = {n for n, info in existing.items() if not args.update and differs(info)}
    created = ask_all(config, QMethod.CREATE_TOPIC, lambda n: wanted(None), REQUEST_TIMEOUT_S,
                      to_create) if to_create else []
    updated = ask_all(config, QMethod.UPDATE_TOPIC, lambda n: wanted(existing[n]),
                      REQUEST_TIMEOUT_S, to_update) if to_update else []
    done = {a.node: a for a in created + updated}
    rows = []
    for answer in looked:
        node = answer.node
        row: dict[str, Any] = {"group": answer.group, "node": node, "topic": topic}
        error = answer.error or (done[node].error if node in done else None)
        if error is not None:
            row.update(state="error", error=f"{type(error).__name__}: {error}")
        else:
            info = done[node].result if node in done else existing[node]
            row.update(state="created" if node in to_create else "updated"
                       if node in to_update else "exists",
                       retention_bytes=info.retention_bytes, retention_s=info.retention_s)
        rows.append(row)
        if not args.json:
            where = f"{answer.group}/{node}"
            if error is not None:
                print(f"{where}: {row['error']}", file=sys.stderr)
            elif node in conflicts:
                print(f"{where}: topic {topic!r} exists with {_settings_text(existing[node])}; "
                      "unchanged (add --update to change it)")
            else:
                print(f"{where}: topic {topic!r} {row['state']} ({_settings_text(info)})")
    if args.json:
        print(json.dumps(rows))
    # A server that missed it gets it from the producers later (they recreate it on NotFound).
    if not any(r["state"] != "error" for r in rows):
        return EXIT_UNAVAILABLE
    return EXIT_PARTIAL if conflicts else EXIT_OK


def produce(config: ClusterConfig, args: argparse.Namespace) -> int:
    messages = list(args.messages) or [line.rstrip("\n") for line in sys.stdin]
    if not messages:
        raise InvalidArgument("messages: nothing to send", field="messages")
    if args.batch < 1:
        raise InvalidArgument("--batch: expected >= 1", field="batch")
    with Producer(config, args.topic) as producer:
        for start in range(0, len(messages), args.batch):
            committed = producer.send_batch(messages[start:start + args.batch],
                                            timeout=args.timeout)
            last = committed.first_seq + committed.count - 1
            emit(args, {"group": committed.group, "producer_id": committed.producer_id,
                        "first_seq": committed.first_seq, "count": committed.count,
                        "attempts": committed.attempts, "latency_s": committed.latency_s},
                 f"committed on {committed.group}: producer {committed.producer_id:016x} "
                 f"seq {committed.first_seq}..{last}")
    return EXIT_OK


def tail(config: ClusterConfig, args: argparse.Namespace) -> int:
    def show(d: Delivery) -> None:
        emit(args, {"producer": d.producer_id, "seq": d.seq, "group": d.group,
                    "append_ms": d.append_ms, "value": d.value.decode(errors="replace")},
             f"{d.producer_id:016x}:{d.seq}\t{d.value.decode(errors='replace')}")

    topic = protocol.check_topic(args.topic)
    protocol.check_group(args.group)
    if args.max is not None and args.max < 1:
        raise InvalidArgument("--max: expected a number of messages >= 1", field="max")
    if not args.idle > 0:
        raise InvalidArgument("--idle: expected seconds > 0", field="idle")
    answers = ask_all(config, QMethod.TOPICS, protocol.TopicsRequest(), args.timeout)
    if all(a.error is not None for a in answers):
        raise Unavailable(f"no queue server answered in {args.timeout} s")
    if not any(info.topic == topic for a in answers if a.error is None for info in a.result):
        raise NotFound(f"topic: {topic!r} does not exist on any queue server that answered "
                       "(create it with `quorumq create-topic`)", field="topic")
    # Ctrl-C or SIGTERM ends the tail after the current poll, with a last commit.
    stopping = threading.Event()
    on_stop_signals(stopping.set)
    with Consumer(config, topic, args.group) as consumer:
        consumer.run(show, max_messages=args.max, stop=stopping.is_set,
                     idle_timeout=None if args.follow else args.idle)
    return EXIT_OK


def _print_status(row: dict[str, Any]) -> None:
    if not row["up"]:
        print(f"{row['group']}/{row['node']}  DOWN  {row['error']}")
        return
    print(f"{row['group']}/{row['node']}  {row['address']}  incarnation "
          f"{row['incarnation']:016x}  up {row['uptime_s']} s  mean fdatasync "
          f"{row['sync_mean_us']} us")
    for name, topic in row["topics"].items():
        print(f"    topic {name}: offsets {topic['start_offset']}..{topic['end_offset']}  "
              f"{topic['bytes']} bytes in {topic['segments']} segment(s)")
    for offsets in row["offsets"]:
        lag = row["topics"].get(offsets["topic"], {}).get("end_offset", 0) - offsets["offset"]
        print(f"    group {offsets['group']} on {offsets['topic']}: offset "
              f"{offsets['offset']}  lag {lag}  {'whole' if offsets['whole'] else 'NOT whole'}")
    for report in row["recovery"]:
        print(f"    RECOVERY: {report}")


def status(config: ClusterConfig, args: argparse.Namespace) -> int:
    """Every server's state; exit 0 when all are up, EXIT_PARTIAL when some are down but
    every group has 2 up (it takes writes and serves reads), EXIT_UNAVAILABLE otherwise."""
    rows: list[dict[str, Any]] = []
    for answer in ask_all(config, QMethod.STATUS, protocol.StatusRequest(), args.timeout):
        if answer.error is None:
            rows.append({"group": answer.group, "node": answer.node, "up": True,
                         **answer.result})
        else:
            rows.append({"group": answer.group, "node": answer.node,
                         "address": answer.address, "up": False, "error": str(answer.error)})
    groups = []
    for group in config.queue_groups:
        up = sum(r["up"] for r in rows if r["group"] == group.name)
        groups.append({"group": group.name, "servers_up": up, "servers": len(group.servers),
                       "available": up >= quorum.WRITE_QUORUM})
    if any(not g["available"] for g in groups):
        code = EXIT_UNAVAILABLE
    else:
        code = EXIT_PARTIAL if any(not r["up"] for r in rows) else EXIT_OK
    if args.json:
        print(json.dumps({"servers": rows, "groups": groups, "exit": code,
                          "state": EXIT_CODES[code]}, indent=2))
        return code
    for row in rows:
        _print_status(row)
    for g in groups:
        state = ("ok" if g["servers_up"] == g["servers"] else "DEGRADED (still takes "
                 "writes)" if g["available"] else "UNAVAILABLE (fewer than 2 servers up)")
        print(f"group {g['group']}: {g['servers_up']}/{g['servers']} servers up: {state}")
    return code


def lag(config: ClusterConfig, args: argparse.Namespace) -> int:
    topic = protocol.check_topic(args.topic)
    group_name = protocol.check_group(args.group)
    offsets = ask_all(config, QMethod.OFFSETS, protocol.OffsetsRequest(topic, group_name),
                      args.timeout)
    fetched = ask_all(config, QMethod.FETCH, protocol.FetchRequest(topic, 0, 1), args.timeout)
    rows: list[dict[str, Any]] = []
    for o, f in zip(offsets, fetched, strict=True):
        error = o.error or f.error
        if error is not None:
            rows.append({"group": o.group, "node": o.node,
                         "error": f"{type(error).__name__}: {error}"})
            continue
        committed = o.result.offset if o.result.found else f.result.start_offset
        rows.append({"group": o.group, "node": o.node, "end": f.result.end_offset,
                     "committed": committed, "lag": f.result.end_offset - committed,
                     "whole": o.result.whole})
    if args.json:
        print(json.dumps(rows))
    else:
        print("GROUP/NODE\tEND\tCOMMITTED\tLAG\tWHOLE")
        for row in rows:
            where = f"{row['group']}/{row['node']}"
            if "error" in row:
                print(f"{where}\t-\t-\t-\t-\t({row['error']})")
            else:
                print(f"{where}\t{row['end']}\t{row['committed']}\t{row['lag']}\t"
                      f"{'yes' if row['whole'] else 'no'}")
    if all("error" in row for row in rows):
        return EXIT_UNAVAILABLE
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    top = program_parser("quorumq", "Quorum queue tool.", epilog="exit codes: " + ", ".join(
        f"{code} {meaning}" for code, meaning in EXIT_CODES.items()))
    add_config_argument(top, "cluster TOML with [[queue_groups]]")
    top.add_argument("--timeout", type=float, default=None,
                     help=f"seconds to wait for each server (default {ADMIN_CALL_TIMEOUT_S}; "
                          "produce: seconds per batch, default its batch lifetime)")
    top.add_argument("--json", action="store_true", help="machine-readable output")
    commands = top.add_subparsers(dest="command", required=True)
    p = commands.add_parser("create-topic", help="create a topic on every server (an existing "
                            "one is left as it is unless --update)")
    p.add_argument("topic")
    p.add_argument("--retention-bytes", type=int, default=None,
                   help="per server (0: no bound; default: the existing topic's, else 0)")
    p.add_argument("--retention-s", type=int, default=None,
                   help="age bound (0: none; default: the existing topic's, else 0)")
    p.add_argument("--update", action="store_true",
                   help="change the settings of an existing topic")
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
                            "recovery reports (exit 3: a server down, 4: a group unavailable)")
    p.set_defaults(run=status)
    p = commands.add_parser("lag", help="per server: end offset, committed offset, lag")
    p.add_argument("topic")
    p.add_argument("--group", required=True)
    p.set_defaults(run=lag)
    return top


def _fail(args: argparse.Namespace, kind: str, error: Exception, code: int) -> int:
    if args.json:
        print(json.dumps({"error": kind, "message": str(error),
                          "field": getattr(error, "field", None), "exit": code}),
              file=sys.stderr)
    else:
        print(f"quorumq: {kind}: {error}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    if args.timeout is not None and args.timeout <= 0:
        top.error("--timeout: expected seconds > 0")
    if args.timeout is None and args.command != "produce":
        args.timeout = ADMIN_CALL_TIMEOUT_S
    try:
        config = load(args.config)
        config.require_queue_groups()
        return int(args.run(config, args))
    except ConfigError as e:
        return _fail(args, "config error", e, EXIT_INVALID)
    except InvalidArgument as e:
        return _fail(args, "invalid argument", e, EXIT_INVALID)
    except NotFound as e:
        return _fail(args, "not found", e, EXIT_NOT_FOUND)
    except (Timeout, Unavailable) as e:
        # by the base class: a subclass's name (PublishUnavailable) is no kind to print
        kind = "timeout" if isinstance(e, Timeout) else "unavailable"
        return _fail(args, kind, e, EXIT_UNAVAILABLE)
    except KvError as e:
        return _fail(args, type(e).__name__, e, EXIT_OTHER)
    except KeyboardInterrupt:   # Ctrl-C (produce: batches still open are NOT acknowledged)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
