"""Which devices of a fleet IoT Hub's TLS policy refuses, from the hub's own logs.

IoT Hub's guidance finds devices on TLS 1.0/1.1 or weak suites through the Connections
diagnostic log; this reads that log in the forms operators have (Log Analytics CSV and
JSON exports, Azure Monitor resource logs archived to storage, the local hub's
connection log; gzip or not) in one streaming pass and judges every device::

    from iothub_tls.audit import AuditPolicy, audit

    report = audit(["connections.csv", "PT1H.json.gz"], AuditPolicy(ecc_only=True))
    for device in report.devices:          # riskiest first
        print(device.name, device.verdict.value, [f.reason for f in device.reasons()])

Memory holds per-device aggregates, never the rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from ..errors import AuditInputError
from .aggregate import Aggregator, InputStats
from .csvlog import csv_dialect, open_reader, read_csv, read_header
from .jsondoc import read_json_document
from .jsonlines import read_json_lines
from .parallel import MIN_PARALLEL_BYTES, plain_file, read_parallel
from .report import AuditReport, DeviceReport, Finding, build_report
from .rules import AuditPolicy, Verdict
from .sources import Source, open_source

__all__ = [
    "AuditInputError",
    "AuditPolicy",
    "AuditReport",
    "DeviceReport",
    "Finding",
    "Verdict",
    "audit",
]

logger = logging.getLogger("iothub_tls.audit")

_FORMATS = {
    "jsonl": ("JSON lines", read_json_lines),
    "json": ("JSON document", read_json_document),
    "csv": ("CSV", read_csv),
}


def _in_parallel(
    source: Source, kind: str, aggregator: Aggregator, stats: InputStats, jobs: int
) -> bool:
    if jobs < 2 or source.compressed or kind not in ("jsonl", "csv"):
        return False
    if not plain_file(source.name) or os.path.getsize(source.name) < MIN_PARALLEL_BYTES:
        return False
    header = None
    if kind == "csv":
        dialect = csv_dialect(source.head[:8192])
        first = source.head.split("\n", 1)[0] + "\n"
        header = read_header(source, open_reader(iter([first]), dialect), dialect)
    return read_parallel(source, kind, aggregator, stats, jobs, header)


def _read(name: str, aggregator: Aggregator, jobs: int) -> InputStats:
    source = open_source(name)
    stats = InputStats(name)
    try:
        kind = source.kind()
        if kind == "empty":
            raise AuditInputError(f"{name}: empty, not a connection log")
        label, reader = _FORMATS[kind]
        stats.format = label + (", gzip" if source.compressed else "")
        if not _in_parallel(source, kind, aggregator, stats, jobs):
            reader(source, aggregator, stats)
    except (OSError, EOFError) as exc:  # e.g. a gzip stream cut short
        raise AuditInputError(f"{name}: cannot read: {exc}") from exc
    finally:
        source.close()
    if not stats.rows:
        why = stats.reasons.most_common(1)[0][0] if stats.reasons else "no rows"
        raise AuditInputError(f"{name}: not a connection log: no connection rows ({why})")
    logger.debug("%s: %s, %d rows, %d rejected", name, stats.format, stats.rows, stats.rejected)
    return stats


def audit(
    inputs: Iterable[str], policy: AuditPolicy | None = None, *, jobs: int = 1
) -> AuditReport:
    """Read every input (a path, or ``-`` for standard input) and judge each device
    against ``policy`` (default: IoT Hub's, TLS 1.2+ and strong suites).

    ``jobs`` > 1 reads a large plain JSON lines or CSV file with that many worker
    processes (see :mod:`.parallel`); the result is the same. Workers are started
    with ``spawn``, so a script calling this with ``jobs`` > 1 needs the usual
    ``if __name__ == "__main__":`` guard.

    Rows that are not connection rows or cannot be read are counted per input with
    their line numbers (see :attr:`AuditReport.inputs`). An input that cannot be
    opened, or holds no connection row at all, raises :class:`AuditInputError`.
    """
    aggregator = Aggregator()
    for name in inputs:
        aggregator.inputs.append(_read(name, aggregator, jobs))
    return build_report(aggregator, policy or AuditPolicy())
