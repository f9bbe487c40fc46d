"""`kvsvr`: the command-line client.

Values are bytes and leave as bytes: get and row-get write the value itself to standard
output (a newline is added only on a terminal); scan and changes print one line per row,
with values as text only when every one is printable, else they ask for --base64 (values in
base64) or --json (one JSON object; values in "value_base64", and in "value" as text when
they are valid UTF-8). Exit status: 0 ok, 1 not found, 2 bad usage or argument, 3 version
conflict, 4 timeout or unavailable (and for `status`: some node did not answer), 5 any other
error, 6 compacted (resync from version 0).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import struct
import sys
from collections.abc import Callable
from typing import Any

from kvsvr.client import Client
from kvsvr.config import ClusterConfig, load
from kvsvr.errors import (
    Compacted,
    ConfigError,
    InvalidArgument,
    KvError,
    NotFound,
    Timeout,
    Unavailable,
    VersionConflict,
)
from kvsvr.limits import (
    CLI_STATUS_TIMEOUT_S,
    LIST_KEYS_DEFAULT,
    SCAN_ROWS_DEFAULT,
    SCAN_ROWS_MAX,
    TIMEOUT_S_DEFAULT,
    TTL_S_MAX,
    TTL_S_MIN,
    VALUE_BYTES_MAX,
    WATCH_WAIT_S_DEFAULT,
    WATCH_WAIT_S_MAX,
)
from kvsvr.process import ADDRESS_ENV, CONFIG_ENV, add_config_argument, program_parser
from kvsvr.protocol import ChangesPage, KeysPage, RowValue, ScanPage, Versioned
from kvsvr.store import seq_row
from kvsvr.watching import WatchEvent

EXIT_NODE_DOWN = 4

EXIT_CODES: list[tuple[type[Exception], int]] = [
    (NotFound, 1), (InvalidArgument, 2), (ConfigError, 2), (VersionConflict, 3),
    (Timeout, 4), (Unavailable, 4), (Compacted, 6), (KvError, 5),
]


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="backslashreplace")


def _row_text(row: bytes) -> str:
    """A row key as the CLI writes and reads it: text; #N for row N of `append`; hex:... for
    other bytes (and for text that would be read as one of those)."""
    text = row.decode("utf-8", errors="replace")
    if (text.isprintable() and "\ufffd" not in text
            and not text.startswith(("#", "hex:"))):
        return text
    if len(row) == 8:
        return f"#{int.from_bytes(row, 'big')}"
    return "hex:" + row.hex()


def row_argument(text: str) -> bytes:
    """Parse a row key given on the command line (the notation of _row_text)."""
    if text.startswith("#"):
        try:
            return seq_row(int(text[1:]))
        except (ValueError, OverflowError, struct.error):
            raise argparse.ArgumentTypeError(f"{text!r}: #N needs a sequence number") from None
    if text.startswith("hex:"):
        try:
            return bytes.fromhex(text[4:])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: hex: needs hex digits") from None
    return os.fsencode(text)   # the bytes given, even when they are not UTF-8


def key_argument(text: str) -> bytes:
    """A key where the CLI may print one back (`keys --after`): text, or hex:HEXDIGITS."""
    if text.startswith("hex:"):
        try:
            return bytes.fromhex(text[4:])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: hex: needs hex digits") from None
    return os.fsencode(text)


def _key_text(key: bytes) -> str:
    """A key as key_argument reads it back."""
    text = _utf8(key)
    if text is not None and text.isprintable() and not text.startswith("hex:"):
        return text
    return "hex:" + key.hex()


VALUE_HELP = "the value; - reads it from standard input (bytes as they are, up to the value limit)"


STDIN_VALUE = b"\0kvsvr:stdin\0"   # a marker only: replaced by what standard input holds


def value_argument(text: str) -> bytes:
    """A value argument; "-" stands for standard input, read when the command runs (see
    _read_values), so a value can be binary or larger than the command line allows."""
    return STDIN_VALUE if text == "-" else os.fsencode(text)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds in (0, 86400]")
    return value


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _value_fields(data: bytes) -> dict[str, str]:
    """A value in JSON: "value_base64" always (the exact bytes), and "value" too when the
    bytes are valid UTF-8 (the same bytes as text)."""
    text = _utf8(data)
    fields = {} if text is None else {"value": text}
    fields["value_base64"] = _b64(data)
    return fields


def _jsonable(result: Any) -> Any:
    if isinstance(result, bytes):
        return _value_fields(result)
    if isinstance(result, Versioned):
        return {"version": result.version, **_value_fields(result.value)}
    if isinstance(result, RowValue):
        return {"key_version": result.key_version, "row_version": result.row_version,
                **_value_fields(result.value)}
    if isinstance(result, ScanPage):
        return {"version": result.version,
                "rows": [{"row": _row_text(r.row), "row_base64": _b64(r.row),
                          "version": r.version, **_value_fields(r.value)}
                         for r in result.rows],
                "next_start": (None if result.next_start is None
                               else _row_text(result.next_start))}
    if isinstance(result, KeysPage):
        return {"keys": [_key_fields(key) for key in result.keys],
                "next_after": (None if result.next_after is None   # as --after takes it
                               else _key_text(result.next_after))}
    if isinstance(result, ChangesPage):
        return {"version": result.version,
                "changes": [{"row": _row_text(c.row), "row_base64": _b64(c.row),
                             "version": c.version, "deleted": c.deleted,
                             **_value_fields(c.value)} for c in result.changes],
                "resume": None if result.resume is None
                else [result.resume[0], _row_text(result.resume[1])]}
    return result


def _write(data: bytes) -> None:
    sys.stdout.flush()   # whatever print() holds goes first
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _line_value(row: bytes, value: bytes, encoded: bool) -> str:
    """A value in a multi-row line: base64 with --base64, else the text itself, which must be
    printable (no tab, newline or other control character, valid UTF-8) so that lines and
    columns stay unambiguous."""
    if encoded:
        return _b64(value)
    text = _utf8(value)
    if text is None or not text.isprintable():
        raise InvalidArgument(f"value: row {_row_text(row)} holds bytes that are not printable "
                              "text (non-UTF-8, tab, newline or another control character); "
                              "ask again with --base64 or --json", field="value")
    return text


def _key_fields(key: bytes) -> dict[str, str]:
    """A key in JSON: "key_base64" always, "key" too when it is valid UTF-8."""
    text = _utf8(key)
    return {**({} if text is None else {"key": text}), "key_base64": _b64(key)}


def _key_line(key: bytes, encoded: bool) -> str:
    """A key on a line of its own: base64 with --base64, else printable text only."""
    if encoded:
        return _b64(key)
    text = _utf8(key)
    if text is None or not text.isprintable():
        raise InvalidArgument(f"key: {key!r} is not printable text; ask again with --base64 "
                              "or --json", field="key")
    return text


def list_keys_through(client: Client, prefix: bytes, limit: int,
                      after: bytes | None = None) -> KeysPage:
    """Up to `limit` keys with `prefix` (those past `after`), following pages (the CLI's
    `keys`)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidArgument(f"limit: expected a positive integer, got {limit!r}",
                              field="limit")
    keys: list[bytes] = []
    while len(keys) < limit:
        page = client.list_keys(prefix, after=after, limit=min(limit - len(keys),
                                                              SCAN_ROWS_MAX))
        keys += page.keys
        after = page.next_after
        if after is None:
            break
    return KeysPage(keys, after if len(keys) >= limit else None)


def _print_text(command: str, result: Any, encoded: bool = False) -> None:
    """Text output. A single value (get, row-get) is written as its bytes, with a newline
    only when standard output is a terminal, or as one base64 line with --base64."""
    if isinstance(result, Versioned | RowValue):
        if encoded:
            print(_b64(result.value))
        else:
            _write(result.value + (b"\n" if sys.stdout.isatty() else b""))
    elif isinstance(result, ScanPage):
        lines = [f"{_row_text(r.row)}\t{r.version}\t{_line_value(r.row, r.value, encoded)}"
                 for r in result.rows]
        print("".join(line + "\n" for line in lines), end="")
        if result.next_start is not None:
            print(f"# more rows: --start {_row_text(result.next_start)}", file=sys.stderr)
    elif isinstance(result, KeysPage):
        print("".join(_key_line(key, encoded) + "\n" for key in result.keys), end="")
        if result.next_after is not None:
            print(f"# more keys: --after {_key_text(result.next_after)}", file=sys.stderr)
    elif isinstance(result, ChangesPage):
        lines = [f"{c.version}\t{_row_text(c.row)}\t{'deleted' if c.deleted else 'put'}\t"
                 f"{_line_value(c.row, c.value, encoded)}" for c in result.changes]
        print("".join(line + "\n" for line in lines), end="")
        print(f"# key version {result.version}", file=sys.stderr)
        if result.resume is not None:
            print(f"# more changes: SINCE {result.resume[0]} --after-row "
                  f"{_row_text(result.resume[1])}", file=sys.stderr)
    elif isinstance(result, dict):
        print(json.dumps(result, indent=2, sort_keys=True))
    elif command in ("put", "delete", "row-put", "row-delete", "compact"):
        print(f"version {result}")
    else:
        print(result)


JSON_HELP = ("print the result as one JSON object; a value is in \"value_base64\" (its "
             "exact bytes) and also in \"value\" (as text) when it is valid UTF-8; a row "
             "also in \"row_base64\"")
BASE64_HELP = "write values in base64 (get, row-get: one line; scan, changes: the VALUE column)"
LINES_HELP = ("ROW: text, #N (appended row N) or hex:HEXDIGITS. VALUE: the value as text if "
              "every value listed is printable UTF-8 text (no tab, newline or control "
              "character), else the command fails with exit status 2: use --base64 (VALUE in "
              "base64) or --json")


def _parser() -> argparse.ArgumentParser:
    parser = program_parser(
        "kvsvr", "KVSvr command-line client.",
        epilog="exit status: 0 ok, 1 not found, 2 bad usage or argument, 3 version conflict, "
               "4 timeout or unavailable (status: some node did not answer), 5 other errors, "
               f"6 compacted (resync from version 0). Which cluster: --config or --address "
               f"when given (not both), else ${ADDRESS_ENV} if set, else ${CONFIG_ENV} if "
               "set, else the embedded config.")
    target = parser.add_mutually_exclusive_group()
    add_config_argument(target, "cluster TOML")
    target.add_argument("--address", help="talk to one node, e.g. tcp://127.0.0.1:7400 "
                                          f"(default: ${ADDRESS_ENV}, which wins over "
                                          f"${CONFIG_ENV} when both are set)")
    parser.set_defaults(config=None)   # None: not given (the environment is read in main)
    parser.add_argument("--timeout", type=positive_seconds, default=None,
                        help=f"seconds to wait for an answer (default {TIMEOUT_S_DEFAULT}; "
                             f"status: {CLI_STATUS_TIMEOUT_S} per node)")
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    parser.add_argument("--base64", action="store_true", help=BASE64_HELP)
    _add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


KEYS_HELP = ("list the keys that start with PREFIX and hold a value or live rows (expired "
             "ones left out), in key order, one a line (text when printable, else use "
             "--base64 or --json); each group's replica answers from its own applied state")


def _keys_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("prefix", nargs="?", type=os.fsencode, default=b"")
    p.add_argument("--limit", type=int, default=LIST_KEYS_DEFAULT,
                   help="at most this many keys (several pages are asked for if needed)")
    p.add_argument("--after", type=key_argument, default=None, metavar="KEY",
                   help="only keys after this one (text or hex:HEXDIGITS), to go on from "
                        "where a listing stopped (it prints \"# more keys: --after KEY\")")


def _ttl_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ttl", type=float, default=None, metavar="SECONDS",
                   help=f"expire it this many seconds after the write ({TTL_S_MIN}.."
                        f"{TTL_S_MAX}); then it reads as absent and is removed")


def _watch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("key", type=os.fsencode)
    p.add_argument("--since", type=int, default=0,
                   help="changes after this version (default 0: everything the key holds)")
    p.add_argument("--wait", type=positive_seconds, default=WATCH_WAIT_S_DEFAULT,
                   help=f"how long each poll waits on a replica (at most {WATCH_WAIT_S_MAX:g}; "
                        f"default {WATCH_WAIT_S_DEFAULT:g})")
    p.add_argument("--duration", type=positive_seconds, default=None,
                   help="stop after this many seconds (default: never)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="one JSON object per line per event: version, complete, changes, and "
                        "the value (null: none) as get --json gives it")


def _faults_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("node", help="the replica whose outgoing links get the faults")
    p.add_argument("--peer", default="", help="only the link to this node (default: all)")
    p.add_argument("--drop", type=float, default=0.0, help="chance a message is lost, 0..1")
    p.add_argument("--delay-ms", type=int, default=0,
                   help="hold each message up to this long (uniform, so they reorder)")
    p.add_argument("--commit-delay-ms", type=int, default=0,
                   help="a slow disk: each checkpoint commit of the node waits this long "
                        "first (node-wide; 0 heals)")


def _local(p: argparse.ArgumentParser) -> None:
    p.add_argument("--local", action="store_true",
                   help="read the replica's own copy without asking a majority first "
                        "(faster, possibly stale; --json shows the version read)")

def _encoded(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: given after the command it sets the flag, absent it keeps the global one
    p.add_argument("--base64", action="store_true", default=argparse.SUPPRESS,
                   help=BASE64_HELP)

def _expect(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expect-version", type=int, default=None,
                   help="apply only if the key is at this version (compare-and-set)")


def _add_table_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    row_help = "row key: text, #N for appended row N, or hex:HEXDIGITS"
    p = command("row-get", "write a row's value of a key's table to standard output (as "
                           "get does)")
    p.add_argument("key", type=os.fsencode)
    p.add_argument("row", type=row_argument, help=row_help)
    _local(p)
    _encoded(p)
    p = command("row-put", "store a row; prints the key's new version")
    p.add_argument("key", type=os.fsencode)
    p.add_argument("row", type=row_argument, help=row_help)
    p.add_argument("value", type=value_argument, help=VALUE_HELP)
    _expect(p)
    _ttl_option(p)
    p = command("row-delete", "delete a row (a tombstone is kept); prints the new version")
    p.add_argument("key", type=os.fsencode)
    p.add_argument("row", type=row_argument, help=row_help)
    _expect(p)
    p = command("scan", "list rows, one line each: ROW<TAB>VERSION<TAB>VALUE. " + LINES_HELP)
    p.add_argument("key", type=os.fsencode)
    p.add_argument("--start", type=row_argument, default=b"", help=row_help)
    p.add_argument("--end", type=row_argument, default=None, help=row_help)
    p.add_argument("--limit", type=int, default=SCAN_ROWS_DEFAULT)
    _local(p)
    _encoded(p)
    p = command("changes", "rows changed after a version, one line each: "
                           "VERSION<TAB>ROW<TAB>put|deleted<TAB>VALUE. " + LINES_HELP)
    p.add_argument("key", type=os.fsencode)
    p.add_argument("since_version", type=int)
    p.add_argument("--after-row", type=row_argument, default=b"",
                   help="continue a page: " + row_help)
    p.add_argument("--limit", type=int, default=SCAN_ROWS_DEFAULT)
    _local(p)
    _encoded(p)


def _add_commands(commands: Any) -> None:
    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text)

    p = command("get", "write a key's value to standard output: its bytes as they are "
                       "(a newline added only on a terminal), or one base64 line with --base64")
    p.add_argument("key", type=os.fsencode)
    _local(p)
    _encoded(p)
    p = command("put", "store a value; prints the new version")
    p.add_argument("key", type=os.fsencode)
    p.add_argument("value", type=value_argument, help=VALUE_HELP)
    _expect(p)
    _ttl_option(p)
    p = command("delete", "remove a key's value; prints the new version")
    p.add_argument("key", type=os.fsencode)
    _expect(p)
    p = command("incr", "add to an integer value; prints the new value")
    p.add_argument("key", type=os.fsencode)
    p.add_argument("delta", nargs="?", type=int, default=1)
    _expect(p)
    _add_table_commands(command)
    p = command("keys", KEYS_HELP)
    _keys_options(p)
    _encoded(p)
    p = command("append", "append a row (an inbox message); prints its sequence number")
    p.add_argument("key", type=os.fsencode)
    p.add_argument("value", type=value_argument, help=VALUE_HELP)
    p = command("watch", "print a key's changes as they are applied, until interrupted (or "
                         "--duration ends): one line per changed row, VERSION<TAB>ROW<TAB>"
                         "put|deleted<TAB>VALUE, and after each poll's rows the key's value, "
                         "VERSION<TAB><TAB>value|none<TAB>VALUE, when the key holds a value, "
                         "held one before or no row changed (values between two polls are "
                         "coalesced; VERSION says how far the watch got). " + LINES_HELP)
    _watch_options(p)
    _encoded(p)
    p = command("compact", "drop a key's tombstones up to a version; prints the new version")
    p.add_argument("key", type=os.fsencode)
    p.add_argument("through_version", type=int)
    command("status", "ask every node of the cluster (or the one of --address) for its status: "
                      "one line per node, NODE GROUP CAMPUS ADDRESS up|down DETAILS; exit "
                      "status 4 if some node does not answer")
    command("ping", "check that a node answers")
    p = command("faults", "inject faults on the links from one replica to its peers (for "
                          "drills and tests): drop messages, delay and reorder them; "
                          "--drop 0 --delay-ms 0 heals")
    _faults_options(p)


def run(args: argparse.Namespace, client: Client) -> Any:
    expected = getattr(args, "expect_version", None)
    consistency = "local" if getattr(args, "local", False) else "linearizable"
    c = args.command
    if c == "get":
        return client.get(args.key, consistency=consistency)
    if c == "put":
        return client.put(args.key, args.value, expected_version=expected, ttl=args.ttl)
    if c == "delete":
        return client.delete(args.key, expected_version=expected)
    if c == "incr":
        return client.incr(args.key, args.delta, expected_version=expected)
    if c == "row-get":
        return client.row_get(args.key, args.row, consistency=consistency)
    if c == "row-put":
        return client.row_put(args.key, args.row, args.value, expected_version=expected,
                              ttl=args.ttl)
    if c == "row-delete":
        return client.row_delete(args.key, args.row, expected_version=expected)
    if c == "scan":
        return client.scan(args.key, args.start, args.end, args.limit, consistency=consistency)
    if c == "append":
        return client.append(args.key, args.value)
    if c == "keys":
        return list_keys_through(client, args.prefix, args.limit, args.after)
    if c == "changes":
        return client.changes(args.key, args.since_version, after_row=args.after_row,
                              limit=args.limit, consistency=consistency)
    if c == "compact":
        return client.compact(args.key, args.through_version)
    if c == "status":  # main() asks every node; this is the one node the client picks
        return client.status()
    if c == "ping":
        return client.ping()
    if c == "faults":
        return client.faults(_node_address(args), peer=args.peer, drop=args.drop,
                             delay_ms=args.delay_ms, commit_delay_ms=args.commit_delay_ms)
    raise AssertionError(c)


def _node_address(args: argparse.Namespace) -> str:
    """The address of the node named on the command line (or --address itself)."""
    if args.address:
        return str(args.address)
    try:
        return load(args.config).replica(args.node)[1].address
    except ConfigError as e:
        raise InvalidArgument(str(e), field="node") from None


def cluster_status(config: ClusterConfig | None, address: str | None,
                   timeout: float) -> list[dict[str, Any]]:
    """Ask every node of `config` (or the one at `address`) for its status, all at once: one
    dict per node, in config order; its status dict and "up": True, or "up": False and
    "error" when it did not answer within `timeout`."""
    if address is not None:
        nodes = [{"node": None, "group": None, "campus": None, "address": address}]
    else:
        assert config is not None
        nodes = [{"node": r.node, "group": g.name, "campus": r.campus, "address": r.address}
                 for g in config.groups for r in g.replicas]
    with Client(config, address=address, timeout=timeout,
                attempt_timeout=min(1.0, timeout)) as client:
        pipeline = client.pipeline()
        for node in nodes:
            pipeline.status(address=node["address"])
        answers = pipeline.execute(timeout=timeout)
    rows = []
    for node, answer in zip(nodes, answers, strict=True):
        if isinstance(answer, KvError):
            rows.append({**node, "up": False, "error": str(answer)})
        else:
            known = {k: v for k, v in node.items() if v is not None}
            rows.append({**known, **answer, "address": node["address"], "up": True})
    return rows


def _status_line(row: dict[str, Any]) -> str:
    columns = [str(row.get(name) or "-") for name in ("node", "group", "campus", "address")]
    if not row["up"]:
        return "\t".join([*columns, "down", row.get("error", "")])
    details = []
    if "role" in row:
        details.append(f"role={row['role']}")
    store = row.get("store")
    if isinstance(store, dict) and "binlog_last_lsn" in store:
        details.append(f"lsn={store['binlog_last_lsn']}")
    if "uptime_s" in row:
        details.append(f"uptime_s={row['uptime_s']}")
    peers = row.get("peers")
    last_lsn = store.get("binlog_last_lsn") if isinstance(store, dict) else None
    if isinstance(peers, dict) and peers:
        described = []
        for name, peer in sorted(peers.items()):
            if isinstance(peer, dict):
                state = "up" if peer.get("up") else "down"
                # lag: records of the peer's binlog this node has yet to read; behind: of
                # this node's binlog, records the peer has not pulled (a down peer's gap).
                lag = peer.get("lag_records")
                through = peer.get("has_our_binlog_through")
                described.append(
                    f"{name}:{state}" + (f",lag={lag}" if lag is not None else "")
                    + (f",behind={max(0, last_lsn - through)}"
                       if isinstance(through, int) and isinstance(last_lsn, int) else ""))
            else:
                described.append(f"{name}:{peer}")
        details.append("peers=" + ";".join(described))
    if "health" in row:
        health = row["health"]
        details.append("health=" + (json.dumps(health, sort_keys=True, separators=(",", ":"))
                                    if isinstance(health, dict | list) else str(health)))
    return "\t".join([*columns, "up", " ".join(details)])


def _status(args: argparse.Namespace) -> int:
    config = None if args.address else load(args.config)
    rows = cluster_status(config, args.address, args.timeout or CLI_STATUS_TIMEOUT_S)
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(_status_line(row))
    return 0 if all(row["up"] for row in rows) else EXIT_NODE_DOWN


def _read_values(args: argparse.Namespace) -> None:
    """Replace a "-" value by standard input, refusing one over the value limit before
    anything is sent (reading at most one byte past it)."""
    if getattr(args, "value", None) is not STDIN_VALUE:
        return
    data = sys.stdin.buffer.read(VALUE_BYTES_MAX + 1)
    if len(data) > VALUE_BYTES_MAX:
        raise InvalidArgument(f"value: standard input holds more than {VALUE_BYTES_MAX} "
                              "bytes, the value limit", field="value")
    args.value = data


def _watch_lines(event: WatchEvent, encoded: bool, held: bool) -> str:
    """An event as text lines: its rows as `changes` prints them, then the key's value when
    it has one, or had one (`held`: a value line was printed before), or when no row changed
    (the version moved for the value alone, a delete say). A table key's polls thus print
    only their rows, not an empty value line each."""
    lines = [f"{c.version}\t{_row_text(c.row)}\t{'deleted' if c.deleted else 'put'}\t"
             f"{_line_value(c.row, c.value, encoded)}\n" for c in event.changes]
    if event.complete:
        value = event.value
        if value is not None:
            lines.append(f"{event.version}\t\tvalue\t{_line_value(b'', value, encoded)}\n")
        elif held or not event.changes:
            lines.append(f"{event.version}\t\tnone\t\n")
    return "".join(lines)


def _watch_json(event: WatchEvent) -> dict[str, Any]:
    value = None if event.value is None else _value_fields(event.value)
    return {"version": event.version, "complete": event.complete, "value": value,
            "changes": _jsonable(ChangesPage(event.version, event.changes, None))["changes"]}


def _watch(args: argparse.Namespace, client: Client) -> int:
    """Print each event of a watch as it comes; 0 when --duration ends (or ^C)."""
    held = False   # a value line was printed: a later "none" line says it went
    try:
        for event in client.watch(args.key, args.since, timeout=args.duration,
                                  wait=args.wait):
            if args.json:
                print(json.dumps(_watch_json(event)), flush=True)
            else:
                print(_watch_lines(event, args.base64, held), end="", flush=True)
                held = held or (event.complete and event.value is not None)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:   # the reader stopped: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def choose_target(args: argparse.Namespace) -> None:
    """--config or --address as given; with neither, $KVSVR_ADDRESS (one node, the narrower
    choice) if set, else $KVSVR_CONFIG if set, else the embedded config (config None)."""
    if args.config is None and args.address is None:
        args.address = os.environ.get(ADDRESS_ENV) or None
        if args.address is None:
            args.config = os.environ.get(CONFIG_ENV) or None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    choose_target(args)
    try:
        _read_values(args)
        if args.command == "status":
            return _status(args)
        timeout = args.timeout or TIMEOUT_S_DEFAULT
        with Client(args.config, address=args.address, timeout=timeout,
                    attempt_timeout=min(1.0, timeout)) as client:
            if args.command == "watch":
                return _watch(args, client)
            result = run(args, client)
    except (KvError, ConfigError) as e:
        code = next(code for cls, code in EXIT_CODES if isinstance(e, cls))
        kinds: dict[type, str] = {NotFound: "not found", VersionConflict: "version conflict",
                                  Timeout: "timeout", Unavailable: "unavailable",
                                  Compacted: "compacted"}
        kind = kinds.get(type(e), "error")
        if code == 2:
            kind = "invalid"
        version = getattr(e, "version", None)
        detail = "" if version is None else (
            f" (compacted through version {version})" if isinstance(e, Compacted)
            else f" (key version {version})")   # a Compacted carries its horizon
        if args.json:
            print(json.dumps({"error": type(e).__name__, "message": str(e),
                              "field": getattr(e, "field", None),
                              "version": getattr(e, "version", None)}))
        print(f"kvsvr: {kind}: {e}{detail}", file=sys.stderr)
        return code
    try:
        if args.json:
            print(json.dumps(_jsonable(result)))
        else:
            _print_text(args.command, result, args.base64)
    except InvalidArgument as e:   # a value that text lines cannot carry
        print(f"kvsvr: invalid: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:   # the reader stopped (`kvsvr scan ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
