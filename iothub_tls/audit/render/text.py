"""The terminal view: a summary, then the devices as a table, riskiest first."""

from __future__ import annotations

from collections.abc import Sequence

from ..report import AuditReport, DeviceReport, Tally
from ..rules import Verdict

__all__ = ["to_text"]


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row[:-1]):
            widths[i] = max(widths[i], len(cell))

    def line(values: Sequence[str]) -> str:
        cells = [v.ljust(widths[i]) for i, v in enumerate(values[:-1])]
        return "  ".join([*cells, values[-1]]).rstrip()

    rule = ["-" * w for w in widths[:-1]] + ["-" * max(len(headers[-1]), 40)]
    return [line(headers), line(rule), *(line(r) for r in rows)]


def _versions(tls: dict[str, Tally]) -> str:
    ordered = sorted(tls.items(), key=lambda kv: (-kv[1].connections, kv[0]))
    return ", ".join(f"{name} ({t.connections:,})" for name, t in ordered)


def _when(text: str) -> str:
    return text[:19].replace("T", " ") if text else "-"


def _row(device: DeviceReport) -> list[str]:
    reasons = device.reasons()
    if device.verdict is Verdict.COMPLIANT:
        reason = ""
    else:
        reason = "; ".join(
            f"{f.reason} ({f.tally.connections:,}"
            + (f", last {_when(f.tally.last_seen)})" if f.tally.last_seen else ")")
            for f in reasons
        )
    return [
        device.verdict.value,
        device.name,
        ",".join(p for p, _ in device.protocols.most_common()) or "-",
        _versions(device.tls),
        f"{device.connections:,}",
        _when(device.last_seen),
        reason,
    ]


def to_text(report: AuditReport, *, limit: int = 100) -> str:
    """``limit`` devices at most (0: all)."""
    counts = report.by_verdict
    inputs = report.inputs
    lines = [
        f"{len(inputs)} input{'s' if len(inputs) != 1 else ''}, {report.rows:,} connection "
        f"rows, {len(report.devices):,} devices; policy: {report.policy.describe()}",
        f"  will be refused: {counts[Verdict.WILL_BE_REFUSED]:,}   unknown: "
        f"{counts[Verdict.UNKNOWN]:,}   compliant: {counts[Verdict.COMPLIANT]:,}",
    ]
    if report.first_seen:
        lines.append(f"  from {_when(report.first_seen)} to {_when(report.last_seen)} UTC")
    if report.other_operations:
        skipped = ", ".join(f"{op} {n:,}" for op, n in report.other_operations.most_common())
        lines.append(f"  not connection attempts (not judged): {skipped}")
    lines.append("")
    shown = report.devices if limit <= 0 else report.devices[:limit]
    lines += _table(
        (
            "VERDICT",
            "DEVICE",
            "PROTOCOLS",
            "TLS (CONNECTIONS)",
            "CONNECTIONS",
            "LAST SEEN",
            "REASON",
        ),
        [_row(d) for d in shown],
    )
    if len(shown) < len(report.devices):
        lines.append(
            f"(showing {len(shown):,} of {len(report.devices):,} devices, riskiest first; "
            "--limit 0 shows all, --csv and --json list every device)"
        )
    for stats in inputs:
        if not stats.rejected:
            continue
        listed = ", ".join(str(n) for n in stats.lines)
        more = ", ..." if stats.rejected > len(stats.lines) else ""
        why = ", ".join(f"{reason} {n:,}" for reason, n in stats.reasons.most_common())
        lines.append(
            f"{stats.name}: {stats.rejected:,} row{'s' if stats.rejected != 1 else ''} not "
            f"read ({why}) at line{'s' if stats.rejected != 1 else ''} {listed}{more}"
        )
    return "\n".join(lines) + "\n"
