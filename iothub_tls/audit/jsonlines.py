"""JSON lines: the local hub's connection log, Azure Monitor resource logs archived to a
storage account (one record per line), ``{"records": [...]}`` documents one per line.

Chunks of lines go through the learned :mod:`.template` in one ``findall``; a chunk
where some line does not match is read line by line, and the lines the template does
not match are parsed with ``json`` (and may teach the template a variant).
"""

from __future__ import annotations

import json

from .aggregate import Aggregator, InputStats, Layout
from .records import CANONICAL, Reject, Row, rows_of
from .sources import Source
from .template import Template, learn, merge

__all__ = ["read_json_lines"]

_CANONICAL = Layout.of(CANONICAL)
#: Give up learning after this many layouts that would not combine.
_MAX_FAILED_LAYOUTS = 32


class _Reader:
    def __init__(self, aggregator: Aggregator, stats: InputStats) -> None:
        self.aggregator = aggregator
        self.stats = stats
        self.template: Template | None = None
        #: top-level key sequences that gave no (matching) template
        self.failed_layouts: set[tuple[str, ...]] = set()
        self.recognised = 0

    def chunk(self, text: str, first_line: int) -> int:
        """Read one chunk of whole lines starting at line ``first_line``; returns the
        number of lines it held."""
        newlines = text.count("\n")
        count = newlines + (0 if text.endswith("\n") else 1)
        template = self.template
        if template is not None:
            found = template.chunk.findall("\n" + text if text.endswith("\n") else f"\n{text}\n")
            if len(found) == count:
                self.aggregator.add(found, template.layout, self.stats, first_line)
                self.recognised += len(found)
                return count
        matched: list[Row] = []
        matched_lines: list[int] = []
        slow: list[Row] = []
        slow_lines: list[int] = []
        lines = text.split("\n")
        if text.endswith("\n"):
            lines.pop()
        for index, line in enumerate(lines):
            number = first_line + index
            if template is not None:
                match = template.line.fullmatch(line)
                if match is not None:
                    matched.append(match.groups(""))
                    matched_lines.append(number)
                    continue
            self._slow(line, number, slow, slow_lines)
        if template is not None:
            self.aggregator.add(matched, template.layout, self.stats, matched_lines)
        self.aggregator.add(slow, _CANONICAL, self.stats, slow_lines)
        self.recognised += len(matched) + len(slow)
        return count

    def _slow(self, line: str, number: int, rows: list[Row], lines: list[int]) -> None:
        if not line.strip():
            return
        try:
            value = json.loads(line)
        except ValueError:
            self.stats.reject(number, "not JSON")
            return
        produced = 0
        for row in rows_of(value):
            if isinstance(row, Reject):
                self.stats.reject(number, str(row))
                continue
            rows.append(row)
            lines.append(number)
            produced += 1
        if produced == 1 and isinstance(value, dict) and "records" not in value:
            self._learn(line, tuple(value))

    def _learn(self, line: str, keys: tuple[str, ...]) -> None:
        """Learn the layout of ``line`` (a record with top-level ``keys``) into the
        template, once per layout: a layout that gives no template, or whose template
        did not match the line (a value of another shape: a time with an offset, an
        escaped string), is not tried again."""
        if keys in self.failed_layouts or len(self.failed_layouts) >= _MAX_FAILED_LAYOUTS:
            return
        learned = learn(line)
        if learned is None:
            self.failed_layouts.add(keys)
            return
        if self.template is None:
            if learned.line.fullmatch(line) is None:
                self.failed_layouts.add(keys)
            else:
                self.template = learned
            return
        combined = merge(self.template, learned)
        if combined is None or combined.line.fullmatch(line) is None:
            self.failed_layouts.add(keys)
        else:
            self.template = combined


def read_json_lines(source: Source, aggregator: Aggregator, stats: InputStats) -> int:
    """Fold every line of ``source``; returns the rows recognised."""
    reader = _Reader(aggregator, stats)
    line = 1
    while True:
        text = source.read()
        if not text:
            break
        line += reader.chunk(text, line)
    return reader.recognised
