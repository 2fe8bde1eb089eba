"""JSON (the whole report) and CSV (one row per device) for pipelines."""

from __future__ import annotations

import csv
import io
import json

from ..report import AuditReport, DeviceReport, Tally

__all__ = ["CSV_COLUMNS", "to_csv", "to_json"]

CSV_COLUMNS = (
    "deviceId",
    "caller",
    "verdict",
    "reasons",
    "protocols",
    "tlsVersions",
    "cipherSuites",
    "connections",
    "failedConnections",
    "lastSeen",
)


def to_json(report: AuditReport, *, exit_code: int | None = None) -> str:
    data = report.as_dict()
    if exit_code is not None:
        data["exitCode"] = exit_code
    return json.dumps(data, indent=2) + "\n"


def _counts(items: dict[str, Tally]) -> str:
    ordered = sorted(items.items(), key=lambda kv: (-kv[1].connections, kv[0]))
    return ";".join(f"{name}:{tally.connections}" for name, tally in ordered)


def _row(device: DeviceReport) -> list[str]:
    return [
        device.device_id or "",
        device.caller or "",
        device.verdict.value,
        "; ".join(f.reason for f in device.reasons()),
        ";".join(f"{p}:{n}" for p, n in device.protocols.most_common()),
        _counts(device.tls),
        _counts(device.suites),
        str(device.connections),
        str(device.failed),
        device.last_seen,
    ]


def to_csv(report: AuditReport) -> str:
    """One row per device, riskiest first; lists inside a cell are ``name:count``
    pairs separated by ``;``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(_row(d) for d in report.devices)
    return out.getvalue()
