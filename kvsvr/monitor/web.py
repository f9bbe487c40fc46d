"""The monitor center's web page (server-rendered HTML with inline SVG) and JSON API.

  /                      ids with sparklines of the last 10 minutes (sum), firing ids first
  /id/{id}?range=S&end=T the id's 1-second curve: summed and per machine; range in seconds,
                         ending at unix second T (default: the newest second)
  /alerts                alert history
  /api/ids               ids with name, kind, description, newest summed value
  /api/series?id=&range=&end=&machine=   per-second values (machine omitted: the sum)

What is drawn: a machine's curve covers the seconds its agent shipped (a counter's second
without a value is 0; a lost second, a gap, is shaded and not drawn); the sum's curve stops
at `Center.sum_through`, the newest second every reporting machine has shipped (past it the
sum is partial). The JSON API gives the values as stored (None: no value), the sum's partial
seconds as None, and the covered span so a client can tell 0 from "not known".
Query errors are 400 (malformed: the parameter and what was expected) or 404 (no such id or
machine).
  /api/alerts            firing alerts and history
  /api/machines          machines: covered through, last report, gaps
"""

from __future__ import annotations

import time
from html import escape
from typing import Any

from aiohttp import web

from kvsvr import _core
from kvsvr.monitor import charts, prometheus
from kvsvr.monitor.series import SERIES_SECONDS_MAX

RANGES_S = (300, 900, 3600, 6 * 3600, 86_400)
RANGE_S_DEFAULT = 900
SPARKLINE_S = 600
HISTORY_SHOWN = 200

CENTER_KEY: web.AppKey[Any] = web.AppKey("center")

_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #eee;text-align:left}
.firing{background:#fde0e0;color:#8b0000;font-weight:bold}
.alerts{border:2px solid #c62828;padding:.5em 1em;margin-bottom:1em}
.ok{color:#2e7d32}nav a{margin-right:1em}
"""


def _page(title: str, body: str) -> web.Response:
    html = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><nav><a href='/'>ids</a>"
            f"<a href='/alerts'>alerts</a><a href='/api/machines'>machines (JSON)</a></nav>"
            f"<h1>{escape(title)}</h1>{body}</body></html>")
    return web.Response(text=html, content_type="text/html")


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=message)


def _number(text: str) -> int | None:
    """An ASCII decimal of at most 12 digits, or None (str.isdigit also takes '²' and '٣')."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 12 else None


def _range(request: web.Request) -> int:
    text = request.query.get("range", str(RANGE_S_DEFAULT))
    span = _number(text)
    if span is None or not 10 <= span <= SERIES_SECONDS_MAX:
        raise _bad(f"range: {text!r}, expected seconds 10..{SERIES_SECONDS_MAX}")
    return span


def _window(request: web.Request, center: Any, now: float) -> tuple[int, int]:
    """(first, last) second of the view: `range` seconds ending at `end` (default and at
    most: the newest second any machine covers, never past the center's clock)."""
    span = _range(request)
    newest = center.newest_second(now)
    text = request.query.get("end")
    if text is None:
        end = newest
    else:
        end = _number(text)
        if end is None or not 1 <= end <= int(now):
            raise _bad(f"end: {text!r}, expected a unix second 1..{int(now)} (now)")
        end = min(end, newest) if newest else end
    return max(end - span + 1, 0), end


def _id(center: Any, text: str) -> int:
    id = center.resolve_id(text)
    if id is None:
        raise web.HTTPNotFound(text=f"id: {text[:80]!r} is not a known id (a number "
                               f"1..{_core.MONITOR_IDS_MAX} or a name that has values here)")
    return id


def _drawn(center: Any, id: int, first: int, last: int, machine: str | None,
           now: float) -> tuple[list[int | None], list[tuple[int, int]]]:
    """(values to draw, gaps) of one scope over first..last (see the module docstring)."""
    values = center.store.series(id, first, last, machine) if last else []
    counter = center.id_name(id)[1] == "counter"
    machines = center.store.machines()
    if machine is None:
        gaps = [(f, g) for _, f, g in center.store.gaps()]
        covered_from = min((m.first for m in machines.values()), default=0)
        covered_through = center.sum_through(now)
    else:
        gaps = [(f, g) for _, f, g in center.store.gaps(machine)]
        state = machines.get(machine)
        covered_from = state.first if state else 0
        covered_through = state.through if state else -1
    return charts.fill_covered(values, first, covered_from, covered_through, gaps,
                               counter=counter), gaps


def _firing_box(center: Any) -> str:
    if not center.firing:
        return "<p class='ok'>No alert firing.</p>"
    rows = "".join(
        f"<tr class='firing'><td>{escape(rule)}</td><td>{escape(machine or 'sum')}</td>"
        f"<td>{escape(event.message)}</td>"
        f"<td>{time.strftime('%H:%M:%S', time.localtime(event.at))}</td></tr>"
        for (rule, machine), event in sorted(center.firing.items()))
    return (f"<div class='alerts' id='firing'><h2>Firing alerts</h2><table>"
            f"<tr><th>rule</th><th>scope</th><th>finding</th><th>since</th></tr>{rows}"
            f"</table></div>")


def _firing_ids(center: Any) -> set[int]:
    by_name = {r.rule.name: r.id for r in center.rules}
    return {by_name[rule] for rule, _ in center.firing if rule in by_name}


async def index(request: web.Request) -> web.Response:
    center = request.app[CENTER_KEY]
    now = time.time()
    newest = center.newest_second(now)
    first = max(newest - SPARKLINE_S + 1, 0)
    firing_ids = _firing_ids(center)
    rows = []
    for id in sorted(center.store.ids(), key=lambda i: (i not in firing_ids, i)):
        name, kind, description = center.id_name(id)
        values, _ = _drawn(center, id, first, newest, None, now)
        latest = next((v for v in reversed(values) if v is not None), None)
        css = " class='firing'" if id in firing_ids else ""
        rows.append(f"<tr{css} data-id='{id}'><td>{id}</td><td><a href='/id/{id}'>"
                    f"{escape(name)}</a></td><td>{kind}</td><td>{escape(description)}</td>"
                    f"<td>{'' if latest is None else latest}</td>"
                    f"<td>{charts.sparkline(values)}</td></tr>")
    table = ("<table id='ids'><tr><th>id</th><th>name</th><th>kind</th><th>description</th>"
             "<th>newest (sum)</th><th>last 10 min</th></tr>" + "".join(rows) + "</table>"
             if rows else "<p>No values have arrived yet.</p>")
    gaps = "".join(
        f"<li class='gap'>{escape(machine)}: seconds {first}..{last} were lost "
        f"(its agent was down longer than the counters window)</li>"
        for machine, first, last in center.store.gaps())
    return _page("KVSvr monitor", _firing_box(center) + table
                 + (f"<h2>Gaps</h2><ul>{gaps}</ul>" if gaps else ""))


async def id_page(request: web.Request) -> web.Response:
    center = request.app[CENTER_KEY]
    id = _id(center, request.match_info["id"])
    now = time.time()
    first, last = _window(request, center, now)
    span = last - first + 1
    name, kind, description = center.id_name(id)
    firing = id in _firing_ids(center)
    end = f"&end={request.query['end']}" if "end" in request.query else ""
    choices = " ".join(
        f"<a href='/id/{id}?range={r}{end}'{' class=firing' if r == span else ''}>"
        f"{r // 3600 if r >= 3600 else r // 60}{'h' if r >= 3600 else 'min'}</a>"
        for r in RANGES_S)
    earlier = f"<a href='/id/{id}?range={span}&end={max(first - 1, 1)}'>earlier</a>"
    values, gaps = _drawn(center, id, first, last, None, now)
    charts_html = [f"<div class='chart' id='sum'>"
                   f"{charts.curve(values, first, title=f'{name} (sum of all machines)', firing=firing, gaps=gaps)}"  # noqa: E501
                   f"</div>"]
    for machine in sorted(center.store.machines()):
        values, gaps = _drawn(center, id, first, last, machine, now)
        charts_html.append(f"<div class='chart' data-machine='{escape(machine)}'>"
                           f"{charts.curve(values, first, title=f'{name} on {machine}', gaps=gaps)}"
                           f"</div>")
    body = (f"{_firing_box(center)}<p>{escape(description)} ({kind}, id {id}). "
            f"Range: {choices} {earlier}</p>{''.join(charts_html)}")
    return _page(name, body)


async def alerts_page(request: web.Request) -> web.Response:
    center = request.app[CENTER_KEY]
    rows = "".join(
        f"<tr class='{'firing' if e.state == 'firing' else ''}'><td>"
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e.at))}</td>"
        f"<td>{escape(e.rule)}</td><td>{escape(e.machine or 'sum')}</td><td>{e.state}</td>"
        f"<td>{escape(e.message)}</td></tr>" for e in center.store.alerts(HISTORY_SHOWN))
    return _page("Alerts", _firing_box(center) + "<h2>History</h2><table id='history'>"
                 "<tr><th>at</th><th>rule</th><th>scope</th><th>state</th><th>finding</th></tr>"
                 f"{rows}</table>")


async def api_ids(request: web.Request) -> web.Response:
    center = request.app[CENTER_KEY]
    newest = center.sum_through(time.time())
    out = []
    for id in center.store.ids():
        name, kind, description = center.id_name(id)
        latest = center.store.series(id, newest, newest)[0] if newest else None
        out.append({"id": id, "name": name, "kind": kind, "description": description,
                    "newest_second": newest, "newest_sum": latest})
    return web.json_response({"ids": out})


async def api_series(request: web.Request) -> web.Response:
    center = request.app[CENTER_KEY]
    text = request.query.get("id", "")
    if not text:
        raise _bad("id: missing, expected an id number or name")
    id = _id(center, text)
    now = time.time()
    first, last = _window(request, center, now)
    machine = request.query.get("machine") or None
    machines = center.store.machines()
    if machine is not None and machine not in machines:
        raise web.HTTPNotFound(text=f"machine: {machine[:80]!r} is not known here")
    values = center.store.series(id, first, last, machine) if last else []
    if machine is None:
        covered_through = center.sum_through(now)
        values = [v if first + i <= covered_through else None for i, v in enumerate(values)]
    else:
        covered_through = machines[machine].through
    name, kind, _ = center.id_name(id)
    return web.json_response({"id": id, "name": name, "kind": kind, "machine": machine,
                              "first_second": first, "covered_through": covered_through,
                              "values": values})


async def api_alerts(request: web.Request) -> web.Response:
    center = request.app[CENTER_KEY]
    return web.json_response({
        "firing": [{"rule": r, "machine": m, "since": e.at, "message": e.message}
                   for (r, m), e in sorted(center.firing.items())],
        "history": [{"at": e.at, "rule": e.rule, "machine": e.machine, "state": e.state,
                     "value": e.value, "message": e.message}
                    for e in center.store.alerts(HISTORY_SHOWN)]})


async def api_machines(request: web.Request) -> web.Response:
    center = request.app[CENTER_KEY]
    gaps = center.store.gaps()
    return web.json_response({
        "machines": {name: {"through": s.through, "first": s.first,
                            "reported_at": s.reported_at, "reports": s.reports,
                            "values": s.values,
                            "gaps": [[f, last] for m, f, last in gaps if m == name]}
                     for name, s in center.store.machines().items()},
        "center": center.status()})


async def metrics(request: web.Request) -> web.Response:
    center = request.app[CENTER_KEY]
    return web.Response(body=center.prometheus(time.time()).encode(),
                        headers={"Content-Type": prometheus.CONTENT_TYPE})


def make_app(center: Any) -> web.Application:
    app = web.Application()
    app[CENTER_KEY] = center
    app.router.add_get("/", index)
    app.router.add_get("/id/{id}", id_page)
    app.router.add_get("/alerts", alerts_page)
    app.router.add_get("/api/ids", api_ids)
    app.router.add_get("/api/series", api_series)
    app.router.add_get("/api/alerts", api_alerts)
    app.router.add_get("/api/machines", api_machines)
    app.router.add_get("/metrics", metrics)
    return app


__all__ = ["make_app"]
