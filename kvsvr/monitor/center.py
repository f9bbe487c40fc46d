"""`kvsvr-monitor`: the monitor center. Takes agents' reports over ZeroMQ (acknowledged once
stored durably), keeps the series in LMDB, evaluates the alert rules every second, keeps the
alert history and serves the web page and JSON API (kvsvr/monitor/web.py).

One asyncio loop runs it all: the ZeroMQ ROUTER, the HTTP server and the rule ticks. A report
is handled start to end (decode, one LMDB transaction, ack) before the next one is read.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from kvsvr import _core, protocol
from kvsvr.config import ClusterConfig, address_problem, load, web_address_problem
from kvsvr.errors import ConfigError, Internal, InvalidArgument, KvError, Unavailable
from kvsvr.monitor import prometheus
from kvsvr.monitor import rules as rules_module
from kvsvr.monitor.registry import FIRST_USER_ID, MonitorId, Registry, id_problem, load_registry
from kvsvr.monitor.report import (
    METHOD_REPORT,
    Ack,
    CatalogEntry,
    Report,
    ReportError,
    decode_report,
)
from kvsvr.monitor.rules import ABSENT_FOR_S_MAX, ResolvedRule, samples_needed
from kvsvr.monitor.series import SERIES_SECONDS_MAX, AlertEvent, SeriesStore
from kvsvr.process import add_config_argument, add_log_level, program_parser, setup_logging
from kvsvr.sockets import bind_router

log = logging.getLogger("kvsvr.monitor")

RULES_INTERVAL_S = 1.0
TRIM_INTERVAL_S = 60.0
RETENTION_S_DEFAULT = 7 * 86_400
CLOCK_SKEW_S_MAX = 300        # a report covering seconds further ahead of the center's clock
#                               is refused (Unavailable: the agent retries): one bad clock
#                               must not push every view into the future
LIVE_SLACK_S = 30             # a machine is "reporting" while its last report is at most two
#                               agent periods plus this old (see Center.sum_through)
LIVE_S_DEFAULT = 2 * 60 + LIVE_SLACK_S
assert ABSENT_FOR_S_MAX <= SERIES_SECONDS_MAX     # an absent rule's first look-back fits
_RESPONSE = _core.FRAME_RESPONSE
_REQUEST = _core.FRAME_REQUEST


class Center:
    """The center's logic over its store (no sockets here: `handle` takes a message)."""

    def __init__(self, store: SeriesStore, rules: list[ResolvedRule], registry: Registry,
                 *, live_s: float = LIVE_S_DEFAULT, cluster: str = "local",
                 datacenter: str = "", rules_source: str = ""):
        self.store = store
        self.rules = rules
        self.registry = registry
        self.live_s = live_s
        self.cluster = cluster
        self.datacenter = datacenter or cluster
        self.rules_source = rules_source     # what the rules were loaded from (the page says)
        # For /metrics, since this center started: per machine, the running sum of every
        # second it received (a value block; gauges' entries are not shown), the newest value
        # of each gauge, and the campus its agent reports.
        self.totals: dict[str, bytes] = {}
        self.gauge_values: dict[str, dict[int, int]] = {}
        self.campus: dict[str, str] = {}
        self._gauges: set[int] | None = None
        self.findings: dict[tuple[str, str], rules_module.Finding] = {}
        self.counters = {"reports": 0, "values": 0, "rejected": 0, "internal_errors": 0,
                         "catalog_refused": 0}
        self.last_rejection = ""
        self._catalog_logged: set[tuple[int, str]] = set()
        # (machine or "" for the sum, id) -> newest second with a value, for absent rules:
        # kept up to date at ingest, so a tick does not re-read a day of seconds.
        self._absent_ids = {r.id for r in rules if r.rule.kind == "absent"}
        self.last_value: dict[tuple[str, int], int | None] = {}
        self.firing: dict[tuple[str, str], AlertEvent] = store.firing()
        self._clear_removed_rules()

    def _clear_removed_rules(self) -> None:
        """An alert of a rule no longer in the config (removed or renamed) can never clear on
        its own: clear it now, in the history too."""
        names = {r.rule.name for r in self.rules}
        for key in [k for k in self.firing if k[0] not in names]:
            self.store.append_alert(time.time(), key[0], key[1], "cleared", None,
                                    f"{key[0]}: the rule is no longer configured")
            log.warning("alert %s cleared: the rule is no longer configured", key[0])
            del self.firing[key]

    # --- ingest ---------------------------------------------------------------------------
    def handle(self, payload: bytes, now: float) -> list[bytes]:
        """Answer one ZeroMQ message of report frames: an ack or an error frame each. Never
        raises: an unexpected failure is logged and answered Internal (nothing acked)."""
        try:
            frames, error, error_request_id = _core.decode_frames(payload)
        except Exception:
            log.exception("could not decode a message's frames")
            self.counters["internal_errors"] += 1
            return []
        out: list[bytes] = []
        for kind, code, request_id, _budget, body in frames:
            try:
                out.append(self._handle_report(kind, code, request_id, body, now))
            except KvError as e:
                out.append(self._reject(request_id, e))
            except Exception as e:
                # A bug or a storage failure: this report is not acked (the agent resends),
                # and the center goes on serving.
                log.exception("internal error while storing a report")
                self.counters["internal_errors"] += 1
                out.append(self._reject(request_id, Internal(
                    f"the center failed to store the report ({type(e).__name__}: {e}); "
                    "nothing of it was acknowledged")))
        if error is not None:
            out.append(self._reject(error_request_id, InvalidArgument(error, field="frame")))
        return out

    def _handle_report(self, kind: int, code: int, request_id: int, body: bytes | memoryview,
                       now: float) -> bytes:
        if kind != _REQUEST or code != METHOD_REPORT:
            raise InvalidArgument(f"frame: a monitor center takes only report requests "
                                  f"(method {METHOD_REPORT})", field="frame")
        try:
            report = decode_report(body)
        except ReportError as e:
            raise InvalidArgument(f"report: {e}", field="report") from None
        if report.through_second > now + CLOCK_SKEW_S_MAX:
            raise Unavailable(
                f"report.through_second: {report.through_second} is "
                f"{report.through_second - int(now)} s ahead of the center's clock (at most "
                f"{CLOCK_SKEW_S_MAX} s): check the clocks of {report.machine} and the center",
                field="through_second")
        report.catalog = self._accepted_catalog(report.machine, report.catalog)
        previous = self.store.machines().get(report.machine)
        try:
            through = self.store.ingest(report, now)
        except OverflowError as e:
            raise InvalidArgument(f"report: {e}", field="report") from None
        self._note_values(report)
        self._note_totals(report, previous.through if previous is not None else -1)
        self.counters["reports"] += 1
        self.counters["values"] += report.values
        return _core.encode_frame(_RESPONSE, 0, request_id, 0,
                                  msgspec.msgpack.encode(Ack(through)))

    def _accepted_catalog(self, machine: str, catalog: list[CatalogEntry]) -> list[CatalogEntry]:
        """The entries of an agent's catalog the center takes: valid ones (the registry's
        rules) that its own registry does not define otherwise. The center's registry wins;
        a refused entry is logged once and its values are still stored."""
        accepted = []
        for id, kind, name, description in catalog:
            entry = MonitorId(id, name, description,
                              "gauge" if kind == _core.KIND_GAUGE else "counter")
            problem = id_problem(entry, builtin=id < FIRST_USER_ID)
            known = self.registry.by_id.get(id) or self.registry.by_name.get(name)
            # Agents do not ship units: compare what they do ship.
            if problem is None and known is not None and \
                    msgspec.structs.replace(known, unit="") != entry:
                problem = (f"the center's registry has id {known.id} as {known.name!r} "
                           f"({known.kind}); it wins")
            if problem is None:
                if known is None:
                    accepted.append((id, kind, name, description))
                continue
            self.counters["catalog_refused"] += 1
            if (id, machine) not in self._catalog_logged:
                self._catalog_logged.add((id, machine))
                log.warning("catalog entry of id %d from %s not taken: %s", id, machine,
                            problem)
        return accepted

    def _note_values(self, report: Report) -> None:
        for id in self._absent_ids:
            for key in ((report.machine, id), ("", id)):
                newest = self.last_value.get(key)
                for second, block in reversed(report.blocks):
                    if newest is not None and second <= newest:
                        break
                    if _core.block_value(block, id) is not None:
                        self.last_value[key] = second
                        break

    def gauge_ids(self) -> set[int]:
        if self._gauges is None:
            self._gauges = {e.id for e in self.registry.list() if e.kind == "gauge"} | {
                id for id, (kind, _n, _d) in self.store.catalog().items()
                if kind == _core.KIND_GAUGE}
        return self._gauges

    def _note_totals(self, report: Report, old_through: int) -> None:
        """Add the report's new seconds (after what the machine covered before: a resend
        adds nothing) to the machine's running totals, and note its gauges' newest values."""
        if report.catalog:
            self._gauges = None
        if report.campus:
            self.campus[report.machine] = report.campus
        fresh = [(s, b) for s, b in report.blocks if s > old_through]
        if not fresh:
            return
        total = self.totals.get(report.machine, b"")
        try:
            for _second, block in fresh:
                total = _core.merge_blocks(total, block)
        except OverflowError:
            total = b""            # a counter reset, as a scraper sees a restart
        self.totals[report.machine] = total
        newest = self.gauge_values.setdefault(report.machine, {})
        for id in self.gauge_ids():
            for _second, block in reversed(fresh):
                value = _core.block_value(block, id)
                if value is not None:
                    newest[id] = value
                    break

    def metric_ids(self) -> list[int]:
        """Every id /metrics shows: registered here, named by an agent, or with values."""
        ids = set(self.all_ids())
        for total in self.totals.values():
            ids.update(_core.decode_block(total))
        return sorted(ids)

    def prometheus(self, now: float) -> str:
        """The /metrics text: every id per machine, then the center's own metrics."""
        machines = self.store.machines()
        labels: dict[str, tuple[str, ...]] = {m: (self.cluster, self.datacenter,
                      self.campus.get(m, prometheus.CAMPUS_UNKNOWN), m) for m in machines}
        totals = {m: _core.decode_block(self.totals.get(m, b"")) for m in machines}
        families = []
        samples: dict[tuple[str, ...], int | float]
        for id in self.metric_ids():
            name, kind, description = self.id_name(id)
            if kind == "gauge":
                samples = {labels[m]: self.gauge_values[m][id] for m in machines
                           if id in self.gauge_values.get(m, {})}
            else:
                samples = {labels[m]: totals[m].get(id, 0) for m in machines}
            families.append(prometheus.Family(id, name, kind, description or name, samples))
        own: tuple[str, ...] = (self.cluster, self.datacenter)
        own_names = ("cluster", "datacenter")
        per_machine: dict[tuple[str, ...], int | float] = {
            labels[m]: state.through for m, state in machines.items()}
        families += [
            prometheus.Family(None, "monitor.reports", "counter",
                              "Reports the monitor center stored", {own: self.counters["reports"]},
                              own_names),
            prometheus.Family(None, "monitor.reports_rejected", "counter",
                              "Reports the monitor center refused",
                              {own: self.counters["rejected"]}, own_names),
            prometheus.Family(None, "monitor.alerts_firing", "gauge",
                              "Alerts firing now", {own: len(self.firing)}, own_names),
            prometheus.Family(None, "monitor.rules_loaded", "gauge",
                              "Alert rules loaded", {own: len(self.rules)}, own_names),
            prometheus.Family(None, "monitor.covered_through_seconds", "gauge",
                              "Newest second a machine's agent shipped (unix time)",
                              per_machine)]
        return prometheus.render(families)

    def _reject(self, request_id: int, error: KvError) -> bytes:
        self.counters["rejected"] += 1
        self.last_rejection = error.message
        log.warning("refused a report: %s", error.message)
        return _core.encode_frame(_RESPONSE, error.code, request_id, 0,
                                  protocol.encode_error(error))

    # --- rules ---------------------------------------------------------------------------
    def sum_through(self, now: float) -> int:
        """The newest second the sum across machines is complete for: the oldest covered
        second of the machines reporting (last report within `live_s`), capped at the
        center's clock. A second past it is partial (a machine on a later agent phase has
        not shipped it yet): not drawn in the sum, not judged by sum rules. A machine silent
        longer than `live_s` no longer holds the sum back: its silence is the absent rule's
        business. No machine reporting: the newest second any machine covered."""
        machines = self.store.machines().values()
        live = [m.through for m in machines if now - m.reported_at <= self.live_s]
        through = min(live) if live else max((m.through for m in machines), default=0)
        return min(through, int(now))

    def scopes(self, resolved: ResolvedRule, now: float) -> list[tuple[str, int]]:
        """(machine or "" for the sum, the second it is covered through)."""
        if resolved.rule.scope == "sum":
            return [("", self.sum_through(now))]
        return [(name, min(state.through, int(now)))
                for name, state in sorted(self.store.machines().items())]

    def _last_value_second(self, resolved: ResolvedRule, machine: str, through: int,
                           now: float) -> int | None:
        key = (machine, resolved.id)
        if key not in self.last_value:
            # First look since the start: read back (for_s is at most the longest query).
            look_from = max(int(now) - resolved.rule.for_s - 1,
                            through - SERIES_SECONDS_MAX + 1)
            values = self.store.series(resolved.id, look_from, through, machine or None) \
                if through >= look_from else []
            found = None
            for offset in range(len(values) - 1, -1, -1):
                if values[offset] is not None:
                    found = look_from + offset
                    break
            if self.last_value.get(key) is None:    # ingest may have noted one meanwhile
                self.last_value[key] = found
        return self.last_value[key]

    def _covered_from(self, machine: str) -> int | None:
        """The first second `machine` (or, for "", any machine) ever reported."""
        machines = self.store.machines()
        if machine:
            state = machines.get(machine)
            return state.first if state is not None else None
        return min((m.first for m in machines.values()), default=None)

    def evaluate_rules(self, now: float) -> list[AlertEvent]:
        events: list[AlertEvent] = []
        for resolved in self.rules:
            rule = resolved.rule
            for machine, through in self.scopes(resolved, now):
                scope = machine or None
                needed = samples_needed(rule)
                samples = self.store.series(resolved.id, through - needed + 1, through, scope) \
                    if needed and through else []
                last_value = covered_from = None
                if rule.kind == "absent":
                    last_value = self._last_value_second(resolved, machine, through, now)
                    covered_from = self._covered_from(machine)
                finding = rules_module.evaluate(resolved, samples, now, last_value,
                                                covered_from)
                key = (rule.name, machine)
                self.findings[key] = finding
                change = rules_module.transition(key in self.firing, finding)
                if change is None:
                    continue
                event = self.store.append_alert(now, rule.name, machine, change, finding.value,
                                                finding.message)
                log.warning("alert %s %s%s: %s", rule.name, change,
                            f" on {machine}" if machine else "", finding.message)
                if change == "firing":
                    self.firing[key] = event
                else:
                    self.firing.pop(key, None)
                events.append(event)
        return events

    # --- views for the web page and the API --------------------------------------------------
    def id_name(self, id: int) -> tuple[str, str, str]:
        """(name, kind, description): the center's registry first, else the agents' catalog."""
        known = self.registry.by_id.get(id)
        if known is not None:
            return known.name, known.kind, known.description
        entry = self.store.catalog().get(id)
        if entry is not None:
            kind, name, description = entry
            return name, "gauge" if kind == _core.KIND_GAUGE else "counter", description
        return f"id.{id}", "counter", ""

    def unit_of(self, id: int) -> str:
        """What one count of `id` is ("requests"), from the center's registry ("" unknown)."""
        known = self.registry.by_id.get(id)
        return known.unit if known is not None else ""

    def all_ids(self) -> list[int]:
        """Every id the center knows: registered here, named by an agent, or with values."""
        return sorted(set(self.registry.by_id) | set(self.store.ids()))

    def resolve_id(self, text: str) -> int | None:
        """The id a page or query names (a number or a name), or None if it is not known
        here (not in the registry, the catalog or the newest sums)."""
        if text.isascii() and text.isdigit() and len(text) <= 6:
            id = int(text)
            if 1 <= id <= _core.MONITOR_IDS_MAX and (
                    id in self.registry.by_id or id in self.store.ids()):
                return id
            return None
        entry = self.registry.by_name.get(text)
        if entry is not None:
            return entry.id
        for id, (_kind, name, _description) in self.store.catalog().items():
            if name == text:
                return id
        return None

    def newest_second(self, now: float) -> int:
        """The newest second any machine covers, capped at the center's clock (views end
        here; the sum curve stops earlier, at `sum_through`)."""
        newest = max((m.through for m in self.store.machines().values()), default=0)
        return min(newest, int(now))

    def forget(self, machine: str) -> bool:
        """Drop a machine (decommissioned): no curve, no rule scope, no hold on the sum."""
        for key in [k for k in self.last_value if k[0] == machine]:
            del self.last_value[key]
        return self.store.forget(machine)

    def status(self) -> dict[str, Any]:
        return {"counters": dict(self.counters), "store": self.store.stats(),
                "last_rejection": self.last_rejection, "rules": len(self.rules)}


def watch_task(task: asyncio.Task[None], stop: asyncio.Event, failed: list[str]) -> None:
    """A done-callback for the center's long-lived tasks: they only end when cancelled at
    shutdown. One that ends otherwise is logged and stops the center (it exits non-zero),
    rather than leaving a process that answers HTTP but ingests nothing."""
    if task.cancelled():
        return
    error = task.exception()
    reason = f"{type(error).__name__}: {error}" if error is not None else "returned"
    log.critical("the center's %s task ended (%s): stopping", task.get_name(), reason,
                 exc_info=error)
    failed.append(f"{task.get_name()}: {reason}")
    stop.set()


async def serve(center: Center, listen: str, web_address: str,
                retention_s: int = RETENTION_S_DEFAULT,
                ready: asyncio.Event | None = None) -> int:
    """Run the center until SIGTERM/SIGINT (0) or until one of its tasks fails (1)."""
    from aiohttp import web as aioweb

    from kvsvr.monitor.web import make_app

    context = zmq.asyncio.Context()
    router: Any = bind_router(context, listen)   # an asyncio socket: awaitable calls
    host, _, port = web_address.rpartition(":")
    runner = aioweb.AppRunner(make_app(center), access_log=None)
    await runner.setup()
    site = aioweb.TCPSite(runner, host.strip("[]"), int(port))
    try:
        await site.start()
    except OSError as e:
        router.close()
        context.term()
        await runner.cleanup()
        raise OSError(f"cannot serve the web page on {web_address}: {e}") from None
    log.info("monitor center: reports on %s, web page on http://%s/, data %s", listen,
             web_address, center.store.path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async def ingest() -> None:
        while True:
            parts = await router.recv_multipart()
            now = time.time()
            for payload in parts[1:]:
                for message in protocol.pack(center.handle(payload, now)):
                    await router.send_multipart([parts[0], message])

    async def tick() -> None:
        trimmed_at = 0.0
        while True:
            now = time.time()
            try:
                center.evaluate_rules(now)
                if now - trimmed_at >= TRIM_INTERVAL_S:
                    trimmed_at = now
                    center.store.trim(int(now) - retention_s)
            except Exception:  # a rule or trim bug must not stop the ingest
                log.exception("rule evaluation failed")
            await asyncio.sleep(RULES_INTERVAL_S)

    failed: list[str] = []
    tasks = [asyncio.create_task(ingest(), name="ingest"),
             asyncio.create_task(tick(), name="rules")]
    for task in tasks:
        task.add_done_callback(lambda t: watch_task(t, stop, failed))
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await runner.cleanup()
        router.close()
        context.term()
        center.store.close()
        log.info("monitor center stopped")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = program_parser(
        "kvsvr-monitor", "The monitor center: stores agents' reports, evaluates alert rules, "
        "serves curves on a web page, a JSON API and Prometheus /metrics.")
    add_config_argument(parser, "cluster TOML; its [monitor] section is used "
                        "(else the embedded config)")
    parser.add_argument("--listen", help="ZeroMQ address for reports (default: monitor.center)")
    parser.add_argument("--web", help="HOST:PORT of the web page (default: monitor.web)")
    parser.add_argument("--data-dir", help="LMDB directory (default: monitor.data_dir)")
    parser.add_argument("--rules", help="alert rules TOML, or 'none' (default: monitor.rules; "
                        "unset there: the default rules for KVSvr's own ids)")
    parser.add_argument("--registry", action="append", default=None,
                        help="id registry TOML (repeatable; default: monitor.registry)")
    parser.add_argument("--retention-s", type=int, default=RETENTION_S_DEFAULT,
                        help="seconds of values kept (default: 7 days)")
    parser.add_argument("--forget", metavar="MACHINE", action="append", default=None,
                        help="drop a decommissioned machine (its state, gaps and rule scopes; "
                        "its values age out with the retention) and exit (repeatable)")
    parser.add_argument("--no-sync", action="store_true",
                        help="no fsync per report (benchmarks only: acks are not durable)")
    add_log_level(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        config: ClusterConfig = load(args.config)
        monitor = config.monitor
        listen = args.listen or monitor.center
        problem = address_problem(listen)
        if problem:
            raise ConfigError(f"--listen: {problem}")
        registry = load_registry(args.registry if args.registry is not None
                                 else [config.path(p) for p in monitor.registry])
        web = args.web or monitor.web
        problem = web_address_problem(web)
        if problem:
            raise ConfigError(f"--web: {problem}")
        setting = args.rules or (monitor.rules if monitor.rules in ("", rules_module.NO_RULES)
                                 else str(config.path(monitor.rules)))
        rules, rules_source = rules_module.configured_rules(setting, registry)
        if args.retention_s < 60:
            raise ConfigError(f"--retention-s: {args.retention_s}, expected >= 60")
        data_dir = Path(args.data_dir) if args.data_dir else config.path(monitor.data_dir)
        store = SeriesStore(data_dir, sync=not args.no_sync)
    except ConfigError as e:
        print(f"kvsvr-monitor: config error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"kvsvr-monitor: cannot open the store: {e}", file=sys.stderr)
        return 1
    center = Center(store, rules, registry, live_s=2 * monitor.agent_period_s + LIVE_SLACK_S,
                    cluster=config.name, datacenter=monitor.datacenter,
                    rules_source=rules_source)
    if args.forget:
        for machine in args.forget:
            found = center.forget(machine)
            print(f"{machine}: {'forgotten' if found else 'not known here'}")
        store.close()
        return 0
    try:
        return asyncio.run(serve(center, listen, web, args.retention_s))
    except OSError as e:
        print(f"kvsvr-monitor: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
