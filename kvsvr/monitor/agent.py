"""`kvsvr-agent`: ship this machine's per-second counter values to the monitor center(s).

Every period it reads, from the shared-memory counters file, each completed second after the
last one a center acknowledged (its cursor, kept durably per center in the state directory),
sends them as reports (kvsvr/monitor/report.py) and moves the cursor only on the center's
ack. After a restart of the agent or of a center, it resends from the cursor: the center
stores values keyed by (machine, second), so a resend overwrites with the same bytes. Nothing
counted is lost and nothing is counted twice, as long as the agent is back within the counters
window (600 s by default); seconds that left the window before it came back are reported as a
gap (the center shows it).

A second is complete GRACE_S seconds after it ended (a writer that read the clock just before
the second turned still lands in it).

Failures: no ack in time, or an ack it cannot read, is a failed send: the agent tries again
with a growing delay (1 s doubling, at most a period), from the cursor. A report the center
refuses as invalid (InvalidArgument: the report itself is bad, resending it cannot help) is
logged as an error and skipped: the cursor moves past it and its seconds are reported as a
gap in the next report, so one bad report never blocks the machine's monitoring. Other
refusals (Unavailable: e.g. this machine's clock is ahead of the center's) are retried.

The id catalog (names and descriptions) goes to each center in parts (each under the report's
meta limit), one part per report, and only what that center has not acknowledged since the
agent started: every legal registry ships, a few parts per round at worst.

If the clock is stepped back behind the cursor, writers count again into seconds that were
shipped; the agent notices (the newest complete second is behind its cursor), logs it, and
moves its cursor back to two periods before now, so those seconds are read and sent again
(the center overwrites them: no count lost or doubled).

The agent never creates the counters file (a file of the default sizing would shut out the
nodes configured with another one): it waits for the counters' owners to create it. It reads
only the slots of registered ids (kvsvr.monitor.counters.CountersReader), never the whole
sparse file.

With `[monitor] agent_metrics = "HOST:PORT"` (or --metrics) it also serves this machine's
counters as Prometheus text on http://HOST:PORT/metrics (kvsvr/monitor/exporter.py).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import socket as socket_module
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec
import zmq

from kvsvr import _core, protocol
from kvsvr.config import ClusterConfig, address_problem, load, web_address_problem
from kvsvr.errors import ConfigError, InvalidArgument
from kvsvr.monitor.counters import (
    CountersError,
    CountersMissing,
    CountersReader,
    cluster_counters_path,
    open_reader,
)
from kvsvr.monitor.prometheus import CAMPUS_UNKNOWN
from kvsvr.monitor.registry import Registry, load_registry
from kvsvr.monitor.report import (
    BLOCK_HEADER,
    GAPS_MAX,
    HEADER,
    META_BYTES_MAX,
    METHOD_REPORT,
    REPORT_BYTES_MAX,
    REPORT_SECONDS_MAX,
    Ack,
    CatalogEntry,
    Report,
    encode_report,
    machine_problem,
)
from kvsvr.process import (
    add_config_argument,
    add_log_level,
    on_stop_signals,
    program_parser,
    setup_logging,
)

log = logging.getLogger("kvsvr.agent")

GRACE_S = 2                    # a second is shipped once it ended this long ago
ACK_TIMEOUT_S = 10.0           # a report unanswered this long is sent again (new socket)
REPORT_BUDGET_BYTES = REPORT_BYTES_MAX - (1 << 20)   # blocks per report; room for the catalog
CATALOG_PART_BYTES = META_BYTES_MAX - (16 << 10)      # one report's catalog; room for gaps
CATALOG_ENTRY_OVERHEAD = 24     # msgpack bytes of an entry beyond its name and description
RETRY_FIRST_S = 1.0             # after a failed send: 1 s, doubling up to the period
WAIT_LOG_S = 30.0               # how often "waiting for the counters file" is logged
_ack_decoder = msgspec.msgpack.Decoder(Ack)


def readable_span(cursor: int, now: float, window_s: int,
                  created_s: int = 0) -> tuple[int, int, tuple[int, int] | None]:
    """(first, through, gap) of the seconds to ship now, given the last acknowledged second.

    `through` is the newest complete second; `first` the one after the cursor unless that has
    left the window, in which case the seconds in between are the gap (and are gone). A
    cursor of 0 (never shipped) starts at the oldest second still in the window, or at the
    file's creation (`created_s`) if later: seconds before the file existed were never
    counted, and shipping them as empty would tell the center that every id was silent then
    (an absent rule would fire as the cluster starts). A creation after `now` (the clock
    was stepped back since) is not believed.
    """
    second = int(now)
    through = second - GRACE_S
    # Writers may be in second `second` (or one before, on a coarse clock): a bucket is safe
    # to read while s + window > second + 1.
    oldest = second - window_s + GRACE_S
    first = cursor + 1 if cursor else max(oldest, created_s if created_s <= through else 0)
    gap = None
    if first < oldest:
        gap = (first, oldest - 1)
        first = oldest
    return first, through, gap


def split_catalog(catalog: list[CatalogEntry]) -> list[list[CatalogEntry]]:
    """The catalog in parts that each fit a report's meta (CATALOG_PART_BYTES)."""
    parts: list[list[CatalogEntry]] = []
    part: list[CatalogEntry] = []
    size = 0
    for entry in catalog:
        entry_bytes = CATALOG_ENTRY_OVERHEAD + len(entry[2].encode()) + len(entry[3].encode())
        if part and size + entry_bytes > CATALOG_PART_BYTES:
            parts.append(part)
            part, size = [], 0
        part.append(entry)
        size += entry_bytes
    if part:
        parts.append(part)
    return parts


class SecondsSource(Protocol):
    """What reports are built from: a CountersReader (the agent) or `_core.Counters`."""

    @property
    def window_s(self) -> int: ...
    @property
    def created_s(self) -> int: ...
    def snapshot(self, second: int) -> bytes: ...
    def registered(self) -> list[tuple[int, int]]: ...


# long: one pass that cuts the span into reports by seconds, bytes and catalog parts
def build_reports(counters: SecondsSource, machine: str, cursor: int, now: float,
                  catalog: list[CatalogEntry],
                  lost: Sequence[tuple[int, int]] = (), campus: str = "") -> list[Report]:
    """The reports that ship everything after `cursor` (empty: nothing complete yet).

    `catalog` goes in parts, one per report (the span is cut into at least as many reports
    as there are parts while seconds allow; parts left over wait for the next round).
    `lost`: spans already known lost (refused reports), put on the first report with the
    gap of seconds that left the window.
    """
    first, through, gap = readable_span(cursor, now, counters.window_s, counters.created_s)
    if first > through:
        return []
    parts = split_catalog(catalog)
    seconds_per_report = REPORT_SECONDS_MAX
    if len(parts) > 1:
        seconds_per_report = max(1, -(-(through - first + 1) // len(parts)))
    reports: list[Report] = []
    fixed = HEADER.size + len(machine.encode()) + 64
    start = first
    blocks: list[tuple[int, bytes]] = []
    size = fixed
    for second in range(first, through + 1):
        if second - start >= seconds_per_report:
            reports.append(Report(machine, start, second - 1, blocks))
            start, blocks, size = second, [], fixed
        block = counters.snapshot(second)
        if not block:
            continue
        if blocks and (size + BLOCK_HEADER.size + len(block) > REPORT_BUDGET_BYTES
                       or len(blocks) == REPORT_SECONDS_MAX):
            reports.append(Report(machine, start, second - 1, blocks))
            start, blocks, size = second, [], fixed
        blocks.append((second, block))
        size += BLOCK_HEADER.size + len(block)
    reports.append(Report(machine, start, through, blocks))
    for report in reports:
        report.campus = campus
    for report, part in zip(reports, parts, strict=False):
        report.catalog = part
    gaps = [g for g in lost if g[1] < first] + ([gap] if gap is not None else [])
    reports[0].gaps = gaps[-GAPS_MAX:]
    return reports


def rewound_cursor(cursor: int, now: float, period_s: float, window_s: int) -> int | None:
    """The cursor to resend from after the clock was stepped back behind `cursor`, or None
    if it was not. Since the step (at most about a period ago: the last round saw the clock
    ahead), writers have counted into seconds from the stepped-back clock on; two periods
    back covers them (resending more is harmless: the center overwrites)."""
    second = int(now)
    if second - GRACE_S >= cursor:
        return None
    oldest = second - window_s + GRACE_S
    return max(second - int(2 * period_s) - GRACE_S, oldest) - 1


def catalog_of(counters: SecondsSource, registry: Registry) -> list[CatalogEntry]:
    """Names of the ids registered in the counters file that the registry knows."""
    out: list[CatalogEntry] = []
    for id, kind in counters.registered():
        entry = registry.by_id.get(id)
        if entry is not None:
            out.append((id, kind, entry.name, entry.description))
    return out


def _error_message(body: Any) -> str:
    try:
        return msgspec.msgpack.decode(body, type=protocol.ErrorReply).message
    except msgspec.DecodeError:
        return "(an unreadable error answer)"


class CenterLink:
    """One center: its socket, its durable cursor."""

    def __init__(self, context: zmq.Context, address: str, state_dir: Path, machine: str):
        self.context = context
        self.address = address
        tag = hashlib.sha256(f"{address}\0{machine}".encode()).hexdigest()[:16]
        self.cursor_path = state_dir / f"cursor-{tag}"
        self.cursor = self._load_cursor()
        self.socket: zmq.Socket | None = None
        self.request_id = 0
        self.catalog_acked: set[CatalogEntry] = set()   # since this agent started
        self.lost: list[tuple[int, int]] = []            # refused spans, not yet reported

    def _load_cursor(self) -> int:
        try:
            text = self.cursor_path.read_text().split()
        except FileNotFoundError:
            return 0
        if len(text) != 2 or text[0] != self.address or not text[1].isdigit():
            raise ConfigError(f"{self.cursor_path}: not a cursor file of {self.address}")
        return int(text[1])

    def save_cursor(self, second: int) -> None:
        """Durably: a write to a new file, fsync, rename over the old one, fsync the dir."""
        temporary = self.cursor_path.with_suffix(".new")
        with open(temporary, "w") as f:
            f.write(f"{self.address} {second}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.cursor_path)
        directory = os.open(self.cursor_path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self.cursor = second

    def _connect(self) -> zmq.Socket:
        if self.socket is None:
            self.socket = self.context.socket(zmq.DEALER)
            self.socket.setsockopt(zmq.LINGER, 0)
            self.socket.connect(self.address)
        return self.socket

    def reset(self) -> None:
        """Drop the socket (and whatever it still queues): the next send starts clean."""
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def send(self, report: Report, timeout_s: float = ACK_TIMEOUT_S) -> str:
        """Send one report and wait for its answer: "acked" once the center holds it durably,
        "refused" if the center says the report itself is invalid (resending cannot help),
        "failed" otherwise (no answer, an unreadable answer, another refusal: retry)."""
        socket = self._connect()
        self.request_id += 1
        socket.send(_core.encode_frame(_core.FRAME_REQUEST, METHOD_REPORT, self.request_id,
                                       int(timeout_s * 1000), encode_report(report)))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not socket.poll(int(left * 1000) + 1):
                continue
            frames, error, _ = _core.decode_frames(socket.recv())
            for _kind, status, request_id, _budget, body in frames:
                if request_id != self.request_id:
                    continue    # the answer to a send that had timed out
                if status == InvalidArgument.code:
                    log.error("center %s REFUSED the report of seconds %d..%d as invalid: %s",
                              self.address, report.first_second, report.through_second,
                              _error_message(body))
                    return "refused"
                if status != 0:
                    log.error("center %s refused a report (status %d): %s; retrying",
                              self.address, status, _error_message(body))
                    self.reset()
                    return "failed"
                try:
                    _ack_decoder.decode(body)
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    log.error("center %s answered an unreadable ack (%s); resending later",
                              self.address, e)
                    self.reset()
                    return "failed"
                self.save_cursor(report.through_second)
                return "acked"
            if error is not None:
                log.error("center %s answered a malformed message: %s", self.address, error)
        log.warning("center %s: no ack within %.0f s; resending from second %d later",
                    self.address, timeout_s, self.cursor + 1)
        self.reset()
        return "failed"


class Agent:
    def __init__(self, counters: CountersReader, machine: str, centers: list[str],
                 state_dir: Path, period_s: float, registry: Registry, campus: str = ""):
        problem = machine_problem(machine)
        if problem:
            raise ConfigError(problem)
        if not 1 <= period_s <= 3600:
            raise ConfigError(f"period_s: {period_s}, expected 1..3600")
        if counters.window_s < 2 * period_s + 10:
            raise ConfigError(f"period_s: {period_s} s; the counters window ({counters.window_s}"
                              " s) must cover two periods plus 10 s")
        self.counters = counters
        self.machine = machine
        self.period_s = period_s
        self.registry = registry
        self.campus = campus
        state_dir.mkdir(parents=True, exist_ok=True)
        self.context = zmq.Context(io_threads=1)
        self.links = [CenterLink(self.context, a, state_dir, machine) for a in centers]
        self.stopping = False

    def ship(self, now: float) -> bool:
        """Ship everything complete to every center; True if all of it was acknowledged."""
        self.counters.refresh()      # ids registered since the last round
        catalog = catalog_of(self.counters, self.registry)
        all_done = True
        for link in self.links:
            rewound = rewound_cursor(link.cursor, now, self.period_s, self.counters.window_s)
            if rewound is not None:
                log.warning("the clock is behind the last second shipped to %s (%d): it was "
                            "stepped back; resending from second %d", link.address,
                            link.cursor, rewound + 1)
                link.save_cursor(rewound)
            unsent = [e for e in catalog if e not in link.catalog_acked]
            for report in build_reports(self.counters, self.machine, link.cursor, now,
                                        unsent, link.lost, self.campus):
                for gap in report.gaps:
                    if gap not in link.lost:
                        log.warning("seconds %d..%d left the counters window before they "
                                    "were shipped to %s: reported as a gap", *gap,
                                    link.address)
                outcome = link.send(report)
                if outcome == "refused":
                    # Skip it: its seconds become a gap on the next report (see the module
                    # docstring); the cursor moves on.
                    link.save_cursor(report.through_second)
                    link.lost = [*link.lost, (report.first_second, report.through_second)]
                    link.lost = link.lost[-(GAPS_MAX - 1):]
                    continue
                if outcome != "acked":
                    all_done = False
                    break
                link.catalog_acked.update(report.catalog)
                link.lost = [g for g in link.lost if g not in report.gaps]
        return all_done

    def run(self) -> None:
        log.info("agent for machine %s: %d ids, window %d s, every %g s to %s",
                 self.machine, len(self.counters.registered()), self.counters.window_s,
                 self.period_s, ", ".join(link.address for link in self.links))
        next_at = time.time()
        retry_s = RETRY_FIRST_S
        try:
            while not self.stopping:
                now = time.time()
                if now >= next_at:
                    if self.ship(now):
                        next_at, retry_s = now + self.period_s, RETRY_FIRST_S
                    else:
                        next_at = now + min(retry_s, self.period_s)
                        retry_s = min(retry_s * 2, self.period_s)
                time.sleep(min(0.2, max(0.0, next_at - time.time())))
        finally:
            for link in self.links:
                link.reset()
            self.context.term()


def wait_for_counters(path: str | Path, stopping: list[bool]) -> CountersReader | None:
    """Open the counters file, waiting (and saying so every WAIT_LOG_S) until a counting
    process has created it; None if asked to stop meanwhile."""
    logged_at: float | None = None
    while not stopping:
        try:
            return open_reader(path)
        except CountersMissing as e:
            if logged_at is None or time.monotonic() - logged_at >= WAIT_LOG_S:
                log.warning("%s; waiting for a node (or an instrumented program) to create "
                            "it with its configured sizing", e)
                logged_at = time.monotonic()
        time.sleep(0.5)
    return None


def machine_campus(config: ClusterConfig) -> str:
    """This machine's campus label: [monitor] campus, else the campus of the config's nodes
    whose address is on this machine when they share one, else "unknown"."""
    if config.monitor.campus:
        return config.monitor.campus
    names = {"localhost", "0.0.0.0", "*", "[::]", "[::1]", socket_module.gethostname()}
    try:
        names.add(socket_module.getfqdn())
        names.update(socket_module.gethostbyname_ex(socket_module.gethostname())[2])
    except OSError:
        pass
    campuses = set()
    for member in [r for g in config.groups for r in g.replicas] + [
            s for g in config.queue_groups for s in g.servers]:
        host = member.address.removeprefix("tcp://").rpartition(":")[0]
        if host in names or host.startswith("127."):
            campuses.add(member.campus)
    return campuses.pop() if len(campuses) == 1 else CAMPUS_UNKNOWN


def period_argument(text: str) -> float:
    """--period: seconds 1..3600, refused at once (not after the counters file appears)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds 1..3600")
    return value


def _parser() -> Any:
    parser = program_parser("kvsvr-agent",
                            "Ship this machine's counters to the monitor center.")
    add_config_argument(parser, "cluster TOML; its [monitor] section is used")
    parser.add_argument("--center", action="append", default=None,
                        help="center address (repeatable; default: monitor.center)")
    parser.add_argument("--counters", help="counters file (default: monitor.counters_path, "
                        "else the cluster's file in /dev/shm)")
    parser.add_argument("--machine", help="this machine's name (default: the host name)")
    parser.add_argument("--campus", help="this machine's campus label for /metrics "
                        "(default: monitor.campus, else the campus of its nodes)")
    parser.add_argument("--period", type=period_argument, help="seconds between shipments "
                        "(default: monitor.agent_period_s, 60)")
    parser.add_argument("--state-dir", help="where cursors are kept "
                        "(default: monitor.agent_state_dir)")
    parser.add_argument("--registry", action="append", default=None,
                        help="id registry TOML (repeatable; default: monitor.registry)")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve this machine's counters as Prometheus /metrics here "
                        "(default: monitor.agent_metrics; off when empty)")
    parser.add_argument("--list-ids", action="store_true",
                        help="list the registered ids (registry and counters file) and exit")
    add_log_level(parser)
    return parser


def _list_ids(path: Path, registry: Registry) -> None:
    reader = open_reader(path)
    registered = dict(reader.registered())
    reader.close()
    for entry in registry.list():
        mark = "registered" if entry.id in registered else "not in counters file"
        print(f"{entry.id}\t{entry.name}\t{entry.kind}\t{mark}\t{entry.description}")
    for id, kind in sorted(registered.items()):
        if id not in registry:
            print(f"{id}\tid.{id}\t{'gauge' if kind == 2 else 'counter'}\t"
                  "registered\t(no registry entry)")


# long: the command line, its checks and the run, with one error path for each kind of failure
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    exporter: Any = None
    try:
        config = load(args.config)
        monitor = config.monitor
        registry = load_registry(args.registry if args.registry is not None
                                 else [config.path(p) for p in monitor.registry])
        path = Path(args.counters) if args.counters else cluster_counters_path(config)
        if args.list_ids:
            _list_ids(path, registry)
            return 0
        centers = args.center or [monitor.center]
        for address in centers:
            problem = address_problem(address)
            if problem:
                raise ConfigError(f"--center: {problem}")
        machine = args.machine or monitor.machine or socket_module.gethostname()
        problem = machine_problem(machine)
        if problem:
            raise ConfigError(problem)
        campus = args.campus or machine_campus(config)
        metrics_address = args.metrics if args.metrics is not None else monitor.agent_metrics
        problem = metrics_address and web_address_problem(metrics_address)
        if problem:
            raise ConfigError(f"--metrics: {problem}")
        stopping: list[bool] = []
        agent: Agent | None = None

        def stop() -> None:
            stopping.append(True)
            if agent is not None:
                agent.stopping = True

        on_stop_signals(stop)
        log.info("counters file: %s", path)
        found = wait_for_counters(path, stopping)
        if found is None:
            return 0
        agent = Agent(found, machine, centers, Path(args.state_dir) if args.state_dir
                      else config.path(monitor.agent_state_dir),
                      monitor.agent_period_s if args.period is None else args.period, registry,
                      campus)
        if metrics_address:
            from kvsvr.monitor.exporter import MetricsExporter

            exporter = MetricsExporter(found, registry, (config.name, monitor.datacenter
                                                         or config.name, campus, machine))
            exporter.serve(metrics_address)
        if stopping:
            return 0
    except (ConfigError, CountersError) as e:
        print(f"kvsvr-agent: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"kvsvr-agent: cannot serve /metrics: {e}", file=sys.stderr)
        return 1
    try:
        agent.run()
    finally:
        if exporter is not None:
            exporter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
