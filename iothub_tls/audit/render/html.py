"""One self-contained HTML page: inline CSS, inline SVG charts drawn by :mod:`.charts`,
no script, no font, no image, no request of any kind. Its Content-Security-Policy
(``default-src 'none'``) makes a browser refuse anything that would load."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from html import escape

from ..report import AuditReport, DeviceReport, Tally
from ..rules import SuiteKind, Verdict
from .charts import bars, stacked_columns

__all__ = ["MAX_ROWS", "to_html"]

#: Devices listed in the page's table (the riskiest; CSV and JSON list all).
MAX_ROWS = 5000

CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
    "form-action 'none'"
)

VERDICT_COLORS = {
    Verdict.WILL_BE_REFUSED: "#c62828",
    Verdict.UNKNOWN: "#e0a800",
    Verdict.COMPLIANT: "#2e7d32",
}
TLS_COLORS = {
    "1.3": "#1b5e20",
    "1.2": "#66bb6a",
    "1.1": "#ef6c00",
    "1.0": "#c62828",
    "SSL3": "#6a1b9a",
    "not logged": "#9e9e9e",
}
SUITE_COLORS = {
    SuiteKind.STRONG_ECDSA.value: "#1b5e20",
    SuiteKind.STRONG_RSA.value: "#66bb6a",
    SuiteKind.TLS13.value: "#1565c0",
    SuiteKind.WEAK.value: "#c62828",
    SuiteKind.UNKNOWN.value: "#6a1b9a",
    "not logged": "#9e9e9e",
}

_STYLE = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif;
       margin: 0; color: #212121; background: #f5f5f5; }
header { background: #263238; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; }
header p { margin: 0; color: #cfd8dc; font-size: 13px; }
main { padding: 20px 32px 40px; max-width: 1400px; }
section { background: #fff; border-radius: 6px; padding: 16px 20px; margin-bottom: 18px;
          box-shadow: 0 1px 2px rgba(0,0,0,.12); }
h2 { font-size: 16px; margin: 0 0 12px; }
.cards { display: flex; gap: 14px; flex-wrap: wrap; }
.card { flex: 1 1 150px; border-left: 6px solid #90a4ae; padding: 8px 14px; background: #fafafa; }
.card b { display: block; font-size: 26px; }
.card span { font-size: 13px; color: #555; }
.row { display: flex; gap: 18px; flex-wrap: wrap; }
.row section { flex: 1 1 460px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #eee; vertical-align: top; }
th { background: #eceff1; position: sticky; top: 0; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; color: #fff;
         font-size: 12px; white-space: nowrap; }
.muted { color: #757575; font-size: 12px; }
code { font-size: 12px; }
td.nowrap { white-space: nowrap; }
td.wide { min-width: 170px; }
svg { max-width: 100%; height: auto; }
ul.plain { margin: 0; padding-left: 18px; }
"""


def _when(text: str) -> str:
    return text[:19].replace("T", " ") if text else "-"


def _last(tally: Tally) -> str:
    return f", last {escape(_when(tally.last_seen))}" if tally.last_seen else ""


def _badge(verdict: Verdict) -> str:
    return (
        f'<span class="badge" style="background:{VERDICT_COLORS[verdict]}">'
        f"{escape(verdict.value)}</span>"
    )


def _tallies(items: dict[str, Tally]) -> str:
    ordered = sorted(items.items(), key=lambda kv: (-kv[1].connections, kv[0]))
    return "<br>".join(
        f"{escape(name)} <span class=muted>&times;{t.connections:,}{_last(t)}</span>"
        for name, t in ordered
    )


def _device_row(device: DeviceReport) -> str:
    verdict = device.verdict
    if verdict is Verdict.COMPLIANT:
        reasons = '<span class="muted">every logged connection accepted</span>'
    else:
        reasons = "<br>".join(
            f"{escape(f.reason)} <span class=muted>&times;{f.tally.connections:,}"
            f"{_last(f.tally)}</span>"
            for f in device.reasons()
        )
    protocols = ", ".join(f"{escape(p)} &times;{n:,}" for p, n in device.protocols.most_common())
    return (
        f"<tr><td>{_badge(verdict)}</td><td class=nowrap><code>{escape(device.name)}</code></td>"
        f"<td>{reasons}</td><td>{protocols or '-'}</td><td class=wide>{_tallies(device.tls)}</td>"
        f"<td>{_tallies(device.suites)}</td><td class=n>{device.connections:,}</td>"
        f"<td class=nowrap>{escape(_when(device.last_seen))}</td></tr>"
    )


def _period(text: str) -> dt.datetime:
    """A timeline period: an hour (YYYY-MM-DDTHH) or a day (YYYY-MM-DD)."""
    return dt.datetime.strptime(text, "%Y-%m-%dT%H" if len(text) > 10 else "%Y-%m-%d")


def _buckets(report: AuditReport) -> tuple[list[str], dict[str, list[int]], str]:
    """Timeline columns: hours over up to three days, days up to 120, else weeks."""
    hours = sorted({h for h, _ in report.timeline if h})
    if not hours:
        return [], {}, "hour"
    first, last = _period(hours[0]), _period(hours[-1])
    span = last - first
    if span <= dt.timedelta(days=3) and len(hours[0]) > 10:
        unit, step = "hour", dt.timedelta(hours=1)

        def bucket(moment: dt.datetime) -> dt.datetime:
            return moment

        def label(moment: dt.datetime) -> str:
            return moment.strftime("%m-%d %H:00")
    elif span <= dt.timedelta(days=120):
        unit, step = "day", dt.timedelta(days=1)

        def bucket(moment: dt.datetime) -> dt.datetime:
            return moment.replace(hour=0)

        def label(moment: dt.datetime) -> str:
            return moment.strftime("%Y-%m-%d")
    else:
        unit, step = "week", dt.timedelta(days=7)

        def bucket(moment: dt.datetime) -> dt.datetime:
            day = moment.replace(hour=0)
            return day - dt.timedelta(days=day.weekday())

        def label(moment: dt.datetime) -> str:
            return "wk " + moment.strftime("%Y-%m-%d")

    counts: Counter[tuple[dt.datetime, str]] = Counter()
    versions: set[str] = set()
    for (hour, version), n in report.timeline.items():
        if not hour:
            continue
        counts[(bucket(_period(hour)), version)] += n
        versions.add(version)
    columns: list[dt.datetime] = []
    moment = bucket(first)
    while moment <= last:
        columns.append(moment)
        moment += step
    order = [v for v in TLS_COLORS if v in versions] + sorted(versions - set(TLS_COLORS))
    series = {v: [counts[(c, v)] for c in columns] for v in order}
    return [label(c) for c in columns], series, unit


def to_html(report: AuditReport, *, generated: str | None = None) -> str:
    """The page, as one string."""
    counts = report.by_verdict
    when = generated or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    labels, series, unit = _buckets(report)
    timeline = (
        stacked_columns(
            labels,
            series,
            TLS_COLORS,
            title=f"deviceConnect events per {unit}, by TLS version",
        )
        if labels
        else '<p class="muted">No connection in these logs carries a time.</p>'
    )
    verdict_chart = bars(
        [(v.value, counts[v], VERDICT_COLORS[v]) for v in sorted(Verdict, key=lambda v: v.risk)],
        title="Devices by verdict",
        label_width=130,
    )
    suite_items = [
        (name, n, SUITE_COLORS.get(kind, "#888"))
        for name, (kind, n) in sorted(report.suites.items(), key=lambda kv: (-kv[1][1], kv[0]))
    ][:16]
    suite_chart = bars(suite_items, title="Connections by cipher suite", width=640, label_width=330)
    suite_legend = " ".join(
        f'<span class="badge" style="background:{color}">{escape(kind)}</span>'
        for kind, color in SUITE_COLORS.items()
    )
    shown = report.devices[:MAX_ROWS]
    more = (
        f'<p class="muted">The {MAX_ROWS:,} riskiest of {len(report.devices):,} devices; '
        "<code>--csv</code> and <code>--json</code> list every device.</p>"
        if len(report.devices) > len(shown)
        else ""
    )
    inputs = "".join(
        f"<li><code>{escape(i.name)}</code>: {escape(i.format)}, {i.rows:,} rows"
        + (
            f", <b>{i.rejected:,} not read</b> ("
            + ", ".join(f"{escape(r)} &times;{n:,}" for r, n in i.reasons.most_common())
            + ") at lines "
            + escape(", ".join(str(n) for n in i.lines))
            + ("…" if i.rejected > len(i.lines) else "")
            if i.rejected
            else ""
        )
        + "</li>"
        for i in report.inputs
    )
    other = ""
    if report.other_operations:
        other = (
            '<p class="muted">Not connection attempts, not judged: '
            + ", ".join(
                f"{escape(op)} &times;{n:,}" for op, n in report.other_operations.most_common()
            )
            + "</p>"
        )
    period = (
        f"{escape(_when(report.first_seen))} to {escape(_when(report.last_seen))} UTC"
        if report.first_seen
        else "no times logged"
    )
    cards = "".join(
        f'<div class="card" style="border-color:{color}"><b>{value}</b><span>{label}</span></div>'
        for value, label, color in (
            (f"{len(report.devices):,}", "devices and clients", "#546e7a"),
            (f"{counts[Verdict.WILL_BE_REFUSED]:,}", "will be refused", "#c62828"),
            (f"{counts[Verdict.UNKNOWN]:,}", "unknown (no TLS evidence)", "#e0a800"),
            (f"{counts[Verdict.COMPLIANT]:,}", "compliant", "#2e7d32"),
            (f"{report.connections:,}", "connections judged", "#546e7a"),
        )
    )
    rows = "".join(_device_row(d) for d in shown)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>IoT Hub TLS audit</title>
<style>{_STYLE}</style>
</head>
<body>
<header>
<h1>IoT Hub TLS audit</h1>
<p>Policy: {escape(report.policy.describe())} &middot; connections from {period}
&middot; generated {escape(when)} by iothub-tls audit</p>
</header>
<main>
<section id="summary">
<h2>Summary</h2>
<div class="cards">{cards}</div>
<ul class="plain">{inputs}</ul>
{other}
</section>
<section id="timeline">
<h2>Connections by TLS version over time</h2>
{timeline}
</section>
<div class="row">
<section id="verdicts">
<h2>Devices by verdict</h2>
{verdict_chart}
</section>
<section id="suites">
<h2>Cipher suites in use</h2>
{suite_chart}
<p>{suite_legend}</p>
</section>
</div>
<section id="devices">
<h2>Devices, riskiest first</h2>
{more}
<table>
<thead><tr><th>Verdict</th><th>Device</th><th>Why</th><th>Protocols</th><th>TLS versions</th>
<th>Cipher suites</th><th>Connections</th><th>Last seen (UTC)</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
</section>
</main>
</body>
</html>
"""
