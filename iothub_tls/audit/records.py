"""Connection rows from parsed JSON values (pure; the slow path of every JSON reader).

One value may be:

* an Azure Monitor resource record: ``time``, ``operationName``, ``category``,
  ``level``, ``resultType`` … and ``properties``, a JSON *string* (or object) holding
  ``deviceId``, ``protocol``, ``tlsVersion``, ``cipherSuite``, ``maskedIpAddress`` …;
* a row of a Log Analytics export (``DeviceId``, ``TLSVersion``, ``props_json_protocol``,
  ``TimeGenerated``…), as ``az monitor log-analytics query`` prints them;
* a line of the local hub's connection log (``deviceId``, ``tlsVersion``,
  ``cipherSuite``, ``result``, ``reason``, ``callerIpAddress`` at the top level);
* a document wrapping those: ``{"records": [...]}`` (Azure Monitor), ``{"tables":
  [{"columns": [...], "rows": [[...]]}]}`` (the Log Analytics query API), or a list.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .fields import FIELDS, PROPERTIES, field_of, normalize_time

__all__ = ["CANONICAL", "Reject", "Row", "row_of_record", "rows_of", "rows_of_table"]

Row = tuple[str, ...]
#: Field -> index in a canonical row.
CANONICAL: dict[str, int] = {name: i for i, name in enumerate(FIELDS)}
#: Fields read from inside ``properties`` first (the rest from the record itself).
_INNER_FIRST = frozenset({"device", "protocol", "tls", "suite", "caller", "reason"})
#: Fields whose presence (even as null) marks a record as a connection row.
_EVIDENCE = frozenset({"device", "tls", "suite"})


class Reject(str):
    """Why a value gave no row (a ``str``, so it reads as the reason)."""


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def _finish(found: dict[str, Any]) -> Row | Reject:
    if not _EVIDENCE & found.keys() and str(found.get("category", "")).lower() != "connections":
        return Reject("not a connection record")
    time = normalize_time(_text(found.get("time")))
    if time is None:
        return Reject("unreadable time")
    values = [_text(found.get(name)) for name in FIELDS]
    values[CANONICAL["time"]] = time
    return tuple(values)


def row_of_record(record: Mapping[str, Any]) -> Row | Reject:
    """The canonical row of one record, or why it is not one."""
    found: dict[str, Any] = {}
    inner: Any = None
    for key, value in record.items():
        name = field_of(key)
        if name == PROPERTIES:
            inner = value
        elif name is not None and name not in found:
            found[name] = value
    if isinstance(inner, str) and inner.lstrip().startswith("{"):
        try:
            inner = json.loads(inner)
        except ValueError:
            return Reject("properties is not JSON")
    if isinstance(inner, Mapping):
        for key, value in inner.items():
            name = field_of(key)
            if name is None or name == PROPERTIES:
                continue
            if name in _INNER_FIRST or name not in found:
                found[name] = value
    return _finish(found)


def rows_of_table(columns: Sequence[Any], rows: Sequence[Any]) -> Iterator[Row | Reject]:
    """Rows of one table of the Log Analytics query API."""
    names = [c.get("name", "") if isinstance(c, Mapping) else str(c) for c in columns]
    for row in rows:
        if not isinstance(row, list) or len(row) != len(names):
            yield Reject("table row does not match its columns")
            continue
        yield row_of_record(dict(zip(names, row, strict=True)))


def rows_of(value: Any) -> Iterator[Row | Reject]:
    """Every row (or rejection) one parsed JSON value holds."""
    if isinstance(value, list):
        for item in value:
            yield from rows_of(item)
        return
    if not isinstance(value, Mapping):
        yield Reject("not a JSON object")
        return
    records = value.get("records")
    if isinstance(records, list):
        for item in records:
            yield from rows_of(item)
        return
    tables = value.get("tables")
    if isinstance(tables, list):
        for table in tables:
            if isinstance(table, Mapping):
                yield from rows_of_table(table.get("columns") or [], table.get("rows") or [])
            else:
                yield Reject("table is not a JSON object")
        return
    yield row_of_record(value)
