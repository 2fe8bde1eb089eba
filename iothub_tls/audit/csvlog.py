"""CSV: what Log Analytics exports for the guidance's query (``DeviceId,TLSVersion``),
for a query projecting more (``TimeGenerated [UTC]``, ``Protocol``, ``CipherSuite``,
``props_json_deviceId``...), in any column order, or whole ``AzureDiagnostics`` rows
with their ``properties_s`` JSON.

Rows come from ``csv.reader`` in batches and go to the aggregator as they are (lists),
with a layout naming the columns: no Python code runs per row unless a batch needs it
(times in a locale format, rows of the wrong width, a ``properties_s`` column).
"""

from __future__ import annotations

import csv
import itertools
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from ..errors import AuditInputError
from .aggregate import Aggregator, InputStats, Layout
from .fields import PROPERTIES, TIME_ISO, field_of, normalize_time
from .records import CANONICAL, Reject, Row, row_of_record
from .sources import Source

__all__ = ["Header", "csv_dialect", "fold_rows", "open_reader", "read_csv", "read_header"]

_BATCH = 8192
_ISO_LINES = re.compile(rf"^(?:{TIME_ISO})?$", re.MULTILINE)
_CANONICAL = Layout.of(CANONICAL)
_FIELD_LIMIT = 1 << 30


def _rows(reader: Iterator[list[str]], stats: InputStats) -> Iterator[list[str]]:
    """``reader``'s rows; a row the csv module cannot parse (Python 3.10: a NUL byte)
    is rejected, not fatal."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            stats.reject(getattr(reader, "line_num", 0), f"not CSV: {exc}")


@dataclass(frozen=True)
class Header:
    """What the header line says: the dialect, the columns and where each field is."""

    dialect: dict[str, Any]
    columns: tuple[str, ...]
    positions: dict[str, int]
    #: index of a ``properties_s`` (JSON) column
    properties: int | None
    #: physical lines up to and including the header
    lines: int


def csv_dialect(sample: str) -> dict[str, Any]:
    try:
        found: Any = csv.Sniffer().sniff(sample, delimiters=",;\t")
    except csv.Error:
        found = csv.excel
    return {
        "delimiter": found.delimiter,
        "quotechar": found.quotechar or '"',
        "doublequote": found.doublequote,
        "skipinitialspace": found.skipinitialspace,
        "escapechar": found.escapechar,
        "quoting": found.quoting,
    }


def read_header(source: Source, reader: Any, dialect: dict[str, Any]) -> Header:
    columns: list[str] = []
    for columns in reader:
        if any(cell.strip() for cell in columns):
            break
    positions: dict[str, int] = {}
    properties: int | None = None
    for index, name in enumerate(columns):
        found = field_of(name)
        if found == PROPERTIES:
            properties = index
        elif found is not None and found not in positions:
            positions[found] = index
    if "device" not in positions and properties is None:
        shown = ", ".join(columns[:8]) or "nothing"
        raise AuditInputError(
            f"{source.name}: not a connection log (no DeviceId column; the header has {shown})"
        )
    return Header(dialect, tuple(columns), positions, properties, reader.line_num)


def open_reader(lines: Iterator[str], dialect: dict[str, Any]) -> Any:
    if csv.field_size_limit() < _FIELD_LIMIT:
        csv.field_size_limit(_FIELD_LIMIT)
    return csv.reader(lines, **dialect)


def read_csv(source: Source, aggregator: Aggregator, stats: InputStats) -> int:
    """Fold every row of a CSV export; returns the data rows read."""
    dialect = csv_dialect(source.head[:8192])
    reader = open_reader(source.lines(), dialect)
    header = read_header(source, reader, dialect)
    return fold_rows(reader, header, aggregator, stats, source.name)


def fold_rows(
    reader: Any,
    header: Header,
    aggregator: Aggregator,
    stats: InputStats,
    name: str,
    line_offset: int = 0,
) -> int:
    """Fold the rows ``reader`` has left; row line numbers are ``line_offset`` plus the
    reader's own."""
    layout = Layout.of(header.positions)
    width = len(header.columns)
    time = header.positions.get("time")
    rows = _rows(reader, stats) if sys.version_info < (3, 11) else reader
    total = 0
    while True:
        before = reader.line_num
        try:
            batch = list(itertools.islice(rows, _BATCH))
        except csv.Error as exc:  # 3.11+: only a field over the size limit
            raise AuditInputError(
                f"{name}: not readable as CSV at line {line_offset + reader.line_num}: {exc}"
            ) from exc
        if not batch:
            break
        total += len(batch)
        consecutive = reader.line_num - before == len(batch)
        start = line_offset + before
        lines: int | list[int] = start + 1 if consecutive else _spread(start, batch)
        if header.properties is not None:
            _with_properties(batch, list(header.columns), lines, aggregator, stats)
            continue
        if set(map(len, batch)) != {width}:
            batch, lines = _fit(batch, width, lines, stats)
        if time is not None and batch:
            times = list(map(itemgetter(time), batch))
            if len(_ISO_LINES.findall("\n".join(times))) != len(times):
                batch, lines = _normalize_times(batch, time, lines, stats)
        aggregator.add(batch, layout, stats, lines)
    return total


def _spread(before: int, batch: list[list[str]]) -> list[int]:
    """Line numbers of a batch holding quoted fields that span lines: each row starts
    one line after the previous row's last line."""
    lines: list[int] = []
    line = before + 1
    for row in batch:
        lines.append(line)
        line += 1 + sum(cell.count("\n") for cell in row)
    return lines


def _fit(
    batch: list[list[str]], width: int, lines: int | list[int], stats: InputStats
) -> tuple[list[list[str]], list[int]]:
    kept: list[list[str]] = []
    kept_lines: list[int] = []
    for i, row in enumerate(batch):
        line = lines + i if isinstance(lines, int) else lines[i]
        if len(row) == width:
            kept.append(row)
            kept_lines.append(line)
        elif any(cell.strip() for cell in row):
            stats.reject(line, f"{len(row)} columns, the header has {width}")
    return kept, kept_lines


def _normalize_times(
    batch: list[list[str]], time: int, lines: int | list[int], stats: InputStats
) -> tuple[list[list[str]], list[int]]:
    kept: list[list[str]] = []
    kept_lines: list[int] = []
    for i, row in enumerate(batch):
        line = lines + i if isinstance(lines, int) else lines[i]
        normalized = normalize_time(row[time])
        if normalized is None:
            stats.reject(line, "unreadable time")
            continue
        row[time] = normalized
        kept.append(row)
        kept_lines.append(line)
    return kept, kept_lines


def _with_properties(
    batch: list[list[str]],
    header: list[str],
    lines: int | list[int],
    aggregator: Aggregator,
    stats: InputStats,
) -> None:
    rows: list[Row] = []
    row_lines: list[int] = []
    for i, cells in enumerate(batch):
        line = lines + i if isinstance(lines, int) else lines[i]
        if len(cells) != len(header):
            if any(cell.strip() for cell in cells):
                stats.reject(line, f"{len(cells)} columns, the header has {len(header)}")
            continue
        produced = row_of_record(dict(zip(header, cells, strict=True)))
        if isinstance(produced, Reject):
            stats.reject(line, str(produced))
            continue
        rows.append(produced)
        row_lines.append(line)
    aggregator.add(rows, _CANONICAL, stats, row_lines)
