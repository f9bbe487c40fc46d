"""`kvsvr-monitor`: the monitor center. Takes agents' reports over ZeroMQ (acknowledged once
stored durably), keeps the series in LMDB, evaluates the alert rules every second, keeps the
alert history and serves the web page and JSON API (kvsvr/monitor/web.py).

One asyncio loop runs it all: the ZeroMQ ROUTER, the HTTP server and the rule ticks. A report
is handled start to end (decode, one LMDB transaction, ack) before the next one is read.
"""

from __future__ import annotations

import argparse
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
from kvsvr.config import ClusterConfig, address_problem, load
from kvsvr.errors import ConfigError, InvalidArgument, KvError
from kvsvr.monitor import rules as rules_module
from kvsvr.monitor.registry import Registry, load_registry
from kvsvr.monitor.report import METHOD_REPORT, Ack, ReportError, decode_report
from kvsvr.monitor.rules import ResolvedRule, samples_needed
from kvsvr.monitor.series import MAX_SERIES_SECONDS, AlertEvent, SeriesStore
from kvsvr.node import bind_router

log = logging.getLogger("kvsvr.monitor")

RULES_INTERVAL_S = 1.0
TRIM_INTERVAL_S = 60.0
DEFAULT_RETENTION_S = 7 * 86_400
_RESPONSE = _core.FRAME_RESPONSE
_REQUEST = _core.FRAME_REQUEST


class Center:
    """The center's logic over its store (no sockets here: `handle` takes a message)."""

    def __init__(self, store: SeriesStore, rules: list[ResolvedRule], registry: Registry):
        self.store = store
        self.rules = rules
        self.registry = registry
        self.firing: dict[tuple[str, str], AlertEvent] = store.firing()
        self.findings: dict[tuple[str, str], rules_module.Finding] = {}
        self.counters = {"reports": 0, "values": 0, "rejected": 0}
        self.last_rejection = ""

    # --- ingest ---------------------------------------------------------------------------
    def handle(self, payload: bytes, now: float) -> list[bytes]:
        """Answer one ZeroMQ message of report frames: an ack or an error frame each."""
        frames, error, error_request_id = _core.decode_frames(payload)
        out: list[bytes] = []
        for kind, code, request_id, _budget, body in frames:
            try:
                if kind != _REQUEST or code != METHOD_REPORT:
                    raise InvalidArgument(f"frame: a monitor center takes only report requests "
                                          f"(method {METHOD_REPORT})", field="frame")
                try:
                    report = decode_report(body)
                except ReportError as e:
                    raise InvalidArgument(f"report: {e}", field="report") from None
                through = self.store.ingest(report, now)
                self.counters["reports"] += 1
                self.counters["values"] += report.values
                out.append(_core.encode_frame(_RESPONSE, 0, request_id, 0,
                                              msgspec.msgpack.encode(Ack(through))))
            except KvError as e:
                out.append(self._reject(request_id, e))
        if error is not None:
            out.append(self._reject(error_request_id, InvalidArgument(error, field="frame")))
        return out

    def _reject(self, request_id: int, error: KvError) -> bytes:
        self.counters["rejected"] += 1
        self.last_rejection = error.message
        log.warning("rejected a report: %s", error.message)
        return _core.encode_frame(_RESPONSE, error.code, request_id, 0,
                                  protocol.encode_error(error))

    # --- rules ----------------------------------------------------------------------------
    def scopes(self, resolved: ResolvedRule) -> list[tuple[str, int]]:
        """(machine or "" for the sum, the second it is covered through)."""
        machines = self.store.machines()
        if resolved.rule.scope == "sum":
            through = max((m.through for m in machines.values()), default=0)
            return [("", through)]
        return [(name, state.through) for name, state in sorted(machines.items())]

    def evaluate_rules(self, now: float) -> list[AlertEvent]:
        events: list[AlertEvent] = []
        for resolved in self.rules:
            rule = resolved.rule
            for machine, through in self.scopes(resolved):
                scope = machine or None
                needed = samples_needed(rule)
                samples = self.store.series(resolved.id, through - needed + 1, through, scope) \
                    if needed and through else []
                last_value = None
                if rule.kind == "absent":
                    look_from = max(int(now) - rule.for_s - 1, through - MAX_SERIES_SECONDS + 1)
                    values = self.store.series(resolved.id, look_from, through, scope) \
                        if through >= look_from else []
                    for offset in range(len(values) - 1, -1, -1):
                        if values[offset] is not None:
                            last_value = look_from + offset
                            break
                finding = rules_module.evaluate(resolved, samples, now, last_value)
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
        """(name, kind, description) from the agents' catalog, else the local registry."""
        entry = self.store.catalog().get(id)
        if entry is not None:
            kind, name, description = entry
            return name, "gauge" if kind == _core.KIND_GAUGE else "counter", description
        known = self.registry.by_id.get(id)
        if known is not None:
            return known.name, known.kind, known.description
        return f"id.{id}", "counter", ""

    def resolve_id(self, text: str) -> int | None:
        if text.isdigit():
            return int(text)
        for id, (_kind, name, _description) in self.store.catalog().items():
            if name == text:
                return id
        entry = self.registry.by_name.get(text)
        return entry.id if entry is not None else None

    def newest_second(self) -> int:
        return max((m.through for m in self.store.machines().values()), default=0)

    def status(self) -> dict[str, Any]:
        return {"counters": dict(self.counters), "store": self.store.stats(),
                "last_rejection": self.last_rejection, "rules": len(self.rules)}


async def serve(center: Center, listen: str, web_address: str,
                retention_s: int = DEFAULT_RETENTION_S,
                ready: asyncio.Event | None = None) -> None:
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

    tasks = [asyncio.create_task(ingest()), asyncio.create_task(tick())]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kvsvr-monitor", description="The monitor center: stores agents' reports, "
        "evaluates alert rules, serves curves on a web page and a JSON API.")
    parser.add_argument("--config", help="cluster TOML; its [monitor] section is used "
                        "(default: the embedded config)")
    parser.add_argument("--listen", help="ZeroMQ address for reports (default: monitor.center)")
    parser.add_argument("--web", help="HOST:PORT of the web page (default: monitor.web)")
    parser.add_argument("--data-dir", help="LMDB directory (default: monitor.data_dir)")
    parser.add_argument("--rules", help="alert rules TOML (default: monitor.rules)")
    parser.add_argument("--registry", action="append", default=None,
                        help="id registry TOML (repeatable; default: monitor.registry)")
    parser.add_argument("--retention-s", type=int, default=DEFAULT_RETENTION_S,
                        help="seconds of values kept (default: 7 days)")
    parser.add_argument("--no-sync", action="store_true",
                        help="no fsync per report (benchmarks only: acks are not durable)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config: ClusterConfig = load(args.config)
        monitor = config.monitor
        listen = args.listen or monitor.center
        problem = address_problem(listen)
        if problem:
            raise ConfigError(f"--listen: {problem}")
        registry = load_registry(args.registry if args.registry is not None
                                 else [config.path(p) for p in monitor.registry])
        rules_path = args.rules or (str(config.path(monitor.rules)) if monitor.rules else None)
        rules = rules_module.load_rules(rules_path, registry) if rules_path else []
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
    center = Center(store, rules, registry)
    try:
        asyncio.run(serve(center, listen, args.web or monitor.web, args.retention_s))
    except OSError as e:
        print(f"kvsvr-monitor: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
