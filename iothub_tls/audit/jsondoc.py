"""One JSON document, read element by element: ``{"records": [...]}`` (Azure Monitor,
pretty-printed or not), ``{"tables": [{"columns": [...], "rows": [...]}]}`` (the Log
Analytics query API), or ``[...]`` (``az monitor log-analytics query`` output).

The standard library has no streaming JSON parser, so this walks the document's outer
structure itself and hands each element (a record, a table row) to
``json.JSONDecoder.raw_decode``: memory holds one element and a read buffer, never the
document.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from ..errors import AuditInputError
from .aggregate import Aggregator, InputStats, Layout
from .records import CANONICAL, Reject, Row, row_of_record, rows_of
from .sources import Source

__all__ = ["read_json_document"]

_CANONICAL = Layout.of(CANONICAL)
_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\r\n]*")
#: An element larger than this is not a log record.
_MAX_ELEMENT = 64 << 20
_BATCH = 4096


class _Buffer:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.text = ""
        self.pos = 0
        self.eof = False
        self.line_base = 1  # line number of self.text[0]

    def _fill(self) -> bool:
        if self.eof:
            return False
        more = self.source.read()
        if not more:
            self.eof = True
            return False
        self.line_base += self.text.count("\n", 0, self.pos)
        self.text = self.text[self.pos :] + more
        self.pos = 0
        return True

    def line(self) -> int:
        return self.line_base + self.text.count("\n", 0, self.pos)

    def peek(self) -> str:
        """The next non-space character ("" at the end)."""
        while True:
            self.pos = _SPACE.match(self.text, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self._fill():
                return ""

    def take(self, char: str) -> None:
        if self.peek() != char:
            found = self.peek() or "the end"
            raise ValueError(f"expected {char!r} at line {self.line()}, found {found!r}")
        self.pos += 1

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, self.pos)
            except ValueError:
                if len(self.text) - self.pos > _MAX_ELEMENT or not self._fill():
                    raise
                continue
            if end == len(self.text) and self._fill():
                continue  # a number may go on in the next read
            self.pos = end
            return value

    def elements(self, each: Callable[[int], None]) -> None:
        """Walk an array; ``each(line)`` reads one element at the buffer."""
        self.take("[")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            each(self.line())
            separator = self.peek()
            self.pos += 1
            if separator == "]":
                return
            if separator != ",":
                raise ValueError(f"expected ',' or ']' at line {self.line()}")

    def members(self, each: Callable[[str], None]) -> None:
        """Walk an object; ``each(key)`` reads the value at the buffer."""
        self.take("{")
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            key = self.value()
            if not isinstance(key, str):
                raise ValueError(f"object key expected at line {self.line()}")
            self.take(":")
            each(key)
            separator = self.peek()
            self.pos += 1
            if separator == "}":
                return
            if separator != ",":
                raise ValueError(f"expected ',' or '}}' at line {self.line()}")


class _Document:
    def __init__(self, source: Source, aggregator: Aggregator, stats: InputStats) -> None:
        self.buffer = _Buffer(source)
        self.aggregator = aggregator
        self.stats = stats
        self.rows: list[Row] = []
        self.lines: list[int] = []
        self.elements = 0

    def emit(self, produced: Row | Reject, line: int) -> None:
        if isinstance(produced, Reject):
            self.stats.reject(line, str(produced))
            return
        self.rows.append(produced)
        self.lines.append(line)
        if len(self.rows) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        self.aggregator.add(self.rows, _CANONICAL, self.stats, self.lines)
        self.rows, self.lines = [], []

    def record(self, line: int) -> None:
        self.elements += 1
        for produced in rows_of(self.buffer.value()):
            self.emit(produced, line)

    def table(self, line: int) -> None:
        names: list[str] = []

        def member(key: str) -> None:
            nonlocal names
            if key == "columns":
                columns = self.buffer.value()
                if isinstance(columns, list):
                    names = [c.get("name", "") if isinstance(c, dict) else str(c) for c in columns]
            elif key == "rows":
                self.buffer.elements(lambda row_line: self.table_row(names, row_line))
            else:
                self.buffer.value()

        if self.buffer.peek() != "{":
            self.buffer.value()
            self.stats.reject(line, "table is not a JSON object")
            return
        self.buffer.members(member)

    def table_row(self, names: list[str], line: int) -> None:
        self.elements += 1
        row = self.buffer.value()
        if not isinstance(row, list) or len(row) != len(names):
            self.stats.reject(line, "table row does not match its columns")
            return
        self.emit(row_of_record(dict(zip(names, row, strict=True))), line)

    def read(self) -> None:
        first = self.buffer.peek()
        if first == "[":
            self.buffer.elements(self.record)
        elif first == "{":
            rest: dict[str, Any] = {}
            line = self.buffer.line()

            def member(key: str) -> None:
                if key == "records" and self.buffer.peek() == "[":
                    self.buffer.elements(self.record)
                elif key == "tables" and self.buffer.peek() == "[":
                    self.buffer.elements(self.table)
                else:
                    rest[key] = self.buffer.value()

            self.buffer.members(member)
            if not self.elements:  # one record on its own
                self.elements = 1
                for produced in rows_of(rest):
                    self.emit(produced, line)
        else:
            raise ValueError("not a JSON document")
        if self.buffer.peek():
            raise ValueError(f"text after the JSON document at line {self.buffer.line()}")
        self.flush()


def read_json_document(source: Source, aggregator: Aggregator, stats: InputStats) -> int:
    """Fold every record of the document; returns how many elements it held.
    A document that stops being JSON part way is an :class:`AuditInputError` only if
    nothing was read from it; otherwise the rest is one rejected row at that line."""
    document = _Document(source, aggregator, stats)
    try:
        document.read()
    except ValueError as exc:
        document.flush()
        if not document.elements:
            raise AuditInputError(f"{source.name}: not a connection log ({exc})") from exc
        stats.reject(document.buffer.line(), f"JSON ends early or breaks: {exc}")
    return document.elements
