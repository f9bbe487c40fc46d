"""The monitor center's web pages, JSON API and Prometheus /metrics.

  /                      every id the center knows (registered, named by an agent, or with
                         values), with a 10-minute chart of the sum, firing ids first; the
                         rules' state (firing alerts, or "no rules loaded" as such)
  /id/{id}?range=S&end=T the id's curves (kvsvr/monitor/assets.py draws them from /api/chart):
                         the sum, and one line per machine with a legend; axes with the unit
                         and local date/time with the zone; hover values; a range picker
                         (15 min, 1 h, 6 h, 24 h); auto-refresh every 5 s (can be paused)
  /alerts                alert history and the rules loaded
  /metrics               Prometheus text format (Center.prometheus)
  /api/ids               ids with name, kind, unit, description, newest summed value
  /api/series?id=&range=&end=&machine=   per-second values (machine omitted: the sum)
  /api/chart?id=&range=&end=             what an id's page draws (sum and every machine)
  /api/alerts            firing alerts and history
  /api/machines          machines: covered through, last report, gaps

The ids and alerts pages refresh themselves (every 10 s, ?part=main). Times are written as
<time data-t=UNIX> and shown by the browser in its own zone, which the page names.

What is drawn: a machine's curve covers the seconds its agent shipped (a counter's second
without a value is 0; a lost second, a gap, is shaded and not drawn); the sum's curve stops
at `Center.sum_through`, the newest second every reporting machine has shipped (past it the
sum is partial). The JSON API gives the values as stored (None: no value), the sum's partial
seconds as None, and the covered span so a client can tell 0 from "not known".
Query errors are 400 (malformed: the parameter and what was expected) or 404 (no such id or
machine).
"""

from __future__ import annotations

import json
import time
from html import escape
from typing import Any

from aiohttp import web

from kvsvr import _core
from kvsvr.monitor import assets, charts, prometheus
from kvsvr.monitor.series import SERIES_SECONDS_MAX

RANGES_S = (900, 3600, 6 * 3600, 86_400)     # the range picker: 15 min, 1 h, 6 h, 24 h
RANGE_S_DEFAULT = 900
SPARKLINE_S = 600
HISTORY_SHOWN = 200
REFRESH_S = 5                 # an id's page fetches its curves again this often
INDEX_REFRESH_S = 10          # the ids and alerts pages, likewise

CENTER_KEY: web.AppKey[Any] = web.AppKey("center")


def _range_name(span: int) -> str:
    return f"{span // 3600} h" if span >= 3600 else f"{span // 60} min"


def _page(title: str, body: str, *, refresh_part: bool = False, script: str = "",
          extra_head: str = "") -> web.Response:
    refresh = (f" data-refresh-part='1' data-refresh-s='{INDEX_REFRESH_S}'"
               if refresh_part else "")
    html = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{escape(title)} - KVSvr monitor</title><style>{assets.STYLE}</style>"
            f"<script>{assets.COMMON_SCRIPT}{script}</script>{extra_head}</head><body>"
            f"<header><a href='/'>KVSvr monitor</a><a href='/'>ids</a>"
            f"<a href='/alerts'>alerts</a><a href='/api/machines'>machines (JSON)</a>"
            f"<a href='/metrics'>/metrics</a><span class='grow'></span>"
            f"<label><input type='checkbox' id='autorefresh' checked> auto-refresh</label>"
            f"<span class='muted' id='updated'></span>"
            f"<span class='muted'>times: <span class='zone'>local</span></span></header>"
            f"<main{refresh}>{body}</main></body></html>")
    return web.Response(text=html, content_type="text/html")


def _main_part(request: web.Request, title: str, body: str, **kwargs: Any) -> web.Response:
    """The whole page, or with ?part=main only what its auto-refresh swaps in."""
    if request.query.get("part") == "main":
        return web.Response(text=body, content_type="text/html")
    return _page(title, body, refresh_part=True, **kwargs)


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


def _stamp(at: float) -> str:
    """A moment the browser writes in its local zone (UTC here until its script ran)."""
    text = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
    return f"<time data-t='{int(at)}'>{text}</time>"


def _firing_box(center: Any) -> str:
    """Firing alerts; else whether rules are watching at all (no rule loaded is not an
    all-clear)."""
    if not center.firing:
        if not center.rules:
            return ("<div class='status norules' id='rules-status'>No alert rules are loaded "
                    f"({escape(center.rules_source or 'none given')}): nothing is watched, "
                    "so nothing can fire. Leave [monitor] rules empty for the default rules, "
                    "or name a rules file.</div>")
        return (f"<div class='status ok' id='rules-status'>No alert firing: "
                f"{len(center.rules)} rules watching ({escape(center.rules_source)}).</div>")
    rows = "".join(
        f"<tr class='firing'><td>{escape(rule)}</td><td>{escape(machine or 'sum')}</td>"
        f"<td>{escape(event.message)}</td><td>{_stamp(event.at)}</td></tr>"
        for (rule, machine), event in sorted(center.firing.items()))
    return (f"<div class='alerts' id='firing'><h2>Firing alerts</h2><table>"
            f"<tr><th>rule</th><th>scope</th><th>finding</th><th>since</th></tr>{rows}"
            f"</table></div>")


def _unit_label(kind: str, unit: str) -> str:
    """The y axis of a curve: a counter's values are per second, a gauge's as set."""
    return f"{unit or 'count'}/s" if kind == "counter" else (unit or "value")


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
    for id in sorted(center.all_ids(), key=lambda i: (i not in firing_ids, i)):
        name, kind, description = center.id_name(id)
        label = _unit_label(kind, center.unit_of(id))
        stored = center.store.series(id, first, newest) if newest else []
        counted = any(v is not None for v in stored)
        values, _ = _drawn(center, id, first, newest, None, now) if counted else ([], [])
        latest = next((v for v in reversed(values) if v is not None), None)
        css = "firing" if id in firing_ids else ("" if counted else "novalue")
        chart = (charts.sparkline(values, unit=label, span_s=SPARKLINE_S) if counted
                 else f"no values in the last {SPARKLINE_S // 60} min")
        rows.append(f"<tr class='{css}' data-id='{id}'><td class='num'>{id}</td><td>"
                    f"<a href='/id/{id}'>{escape(name)}</a></td><td>{kind}</td>"
                    f"<td>{escape(description)}</td><td class='num'>"
                    f"{'' if latest is None else f'{latest:,} {escape(label)}'}</td>"
                    f"<td>{chart}</td></tr>")
    table = ("<table id='ids'><tr><th>id</th><th>name</th><th>kind</th><th>description</th>"
             "<th>newest (sum)</th><th>last 10 min (sum)</th></tr>" + "".join(rows)
             + "</table>")
    gaps = "".join(
        f"<li class='gap'>{escape(machine)}: {_stamp(first)} to {_stamp(last)} were lost "
        f"(its agent was down longer than the counters window)</li>"
        for machine, first, last in center.store.gaps())
    body = (_firing_box(center) + f"<h1>Monitor ids ({len(rows)})</h1>" + table
            + (f"<h2>Gaps</h2><ul>{gaps}</ul>" if gaps else ""))
    return _main_part(request, "ids", body)


async def id_page(request: web.Request) -> web.Response:
    center = request.app[CENTER_KEY]
    id = _id(center, request.match_info["id"])
    now = time.time()
    first, last = _window(request, center, now)
    span = _range(request)
    end = request.query.get("end")
    name, kind, description = center.id_name(id)
    label = _unit_label(kind, center.unit_of(id))
    choices = "".join(f"<button type='button' data-range='{r}'>{_range_name(r)}</button>"
                      for r in RANGES_S)
    values, gaps = _drawn(center, id, first, last, None, now)
    fallback = charts.curve(values, first, title=f"{name} (sum of all machines, {label})",
                            firing=id in _firing_ids(center), gaps=gaps)
    config = json.dumps({"id": id, "range": span, "end": int(end) if end else None,
                         "refresh_s": REFRESH_S})
    cards = "".join(
        f"<div class='card' id='{element}'><h2>{escape(heading)}</h2><div class='plot'></div>"
        f"<div class='legend'></div><div class='tooltip'></div></div>"
        for element, heading in (("sum", f"{name}: sum of all machines"),
                                 ("machines", f"{name} per machine")))
    body = (f"{_firing_box(center)}<h1>{escape(name)}</h1><p>{escape(description)} "
            f"({kind}, id {id}; values in {escape(label)}).</p>"
            f"<p class='picker'>Range: {choices}<span id='custom-range'></span>"
            f"<button type='button' id='earlier'>"
            f"&larr; earlier</button><button type='button' id='newest'>newest</button></p>"
            f"<p class='note' id='span'></p><p class='error' id='chart-error'></p>{cards}"
            f"<noscript>{fallback}</noscript>"
            f"<script type='application/json' id='chart-config'>{config}</script>"
            f"<script>KV.curvePage();</script>")
    return _page(name, body, script=assets.CHART_SCRIPT)


def _queried_series(request: web.Request, center: Any, now: float) -> tuple[int, int, int]:
    """The id (`id=`, a number or a name) and the seconds (`range=`, `end=`) an API query
    asks for; 400 naming the parameter otherwise."""
    text = request.query.get("id", "")
    if not text:
        raise _bad("id: missing, expected an id number or name")
    id = _id(center, text)
    first, last = _window(request, center, now)
    return id, first, last


async def api_chart(request: web.Request) -> web.Response:
    """What an id's page draws: the sum and each machine over the range, as drawn (covered
    seconds of a counter without a value are 0, unknown ones null), at most 3,600 points."""
    center = request.app[CENTER_KEY]
    now = time.time()
    id, first, last = _queried_series(request, center, now)
    name, kind, description = center.id_name(id)
    values, gaps = _drawn(center, id, first, last, None, now)
    total, step = charts.downsample(values)
    machines = {machine: charts.downsample(_drawn(center, id, first, last, machine, now)[0])[0]
                for machine in sorted(center.store.machines())}
    return web.json_response({
        "id": id, "name": name, "kind": kind, "description": description,
        "unit": center.unit_of(id), "unit_label": _unit_label(kind, center.unit_of(id)),
        "first_second": first, "last_second": last, "step": step, "sum": total,
        "machines": machines, "gaps": [[f, g] for f, g in gaps],
        "covered_through": center.sum_through(now), "firing": id in _firing_ids(center)})


async def alerts_page(request: web.Request) -> web.Response:
    center = request.app[CENTER_KEY]
    rows = "".join(
        f"<tr class='{'firing' if e.state == 'firing' else ''}'><td>{_stamp(e.at)}</td>"
        f"<td>{escape(e.rule)}</td><td>{escape(e.machine or 'sum')}</td><td>{e.state}</td>"
        f"<td>{escape(e.message)}</td></tr>" for e in center.store.alerts(HISTORY_SHOWN))
    rules = "".join(
        f"<tr><td>{escape(r.rule.name)}</td><td>{escape(r.id_name)}</td>"
        f"<td>{r.rule.kind}</td><td>{r.rule.scope}</td></tr>" for r in center.rules)
    history = ("<table id='history'><tr><th>at</th><th>rule</th><th>scope</th><th>state</th>"
               f"<th>finding</th></tr>{rows}</table>" if rows
               else "<p class='note' id='history'>No alert has fired or cleared yet.</p>")
    loaded = ("<table id='rules'><tr><th>rule</th><th>id</th><th>kind</th><th>scope</th>"
              f"</tr>{rules}</table>" if rules else "<p class='note' id='rules'>None.</p>")
    body = (f"{_firing_box(center)}<h1>Alerts</h1><h2>History</h2>{history}"
            f"<h2>Rules ({escape(center.rules_source or 'none')})</h2>{loaded}")
    return _main_part(request, "alerts", body)


async def api_ids(request: web.Request) -> web.Response:
    center = request.app[CENTER_KEY]
    newest = center.sum_through(time.time())
    out = []
    for id in center.all_ids():
        name, kind, description = center.id_name(id)
        latest = center.store.series(id, newest, newest)[0] if newest else None
        out.append({"id": id, "name": name, "kind": kind, "description": description,
                    "unit": center.unit_of(id), "newest_second": newest,
                    "newest_sum": latest})
    return web.json_response({"ids": out})


async def api_series(request: web.Request) -> web.Response:
    center = request.app[CENTER_KEY]
    now = time.time()
    id, first, last = _queried_series(request, center, now)
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
    app.router.add_get("/api/chart", api_chart)
    app.router.add_get("/api/alerts", api_alerts)
    app.router.add_get("/api/machines", api_machines)
    app.router.add_get("/metrics", metrics)
    return app


__all__ = ["make_app"]
