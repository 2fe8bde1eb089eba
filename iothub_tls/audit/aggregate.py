"""Per-device aggregates, built from batches of rows without keeping the rows.

Readers hand over batches of rows (tuples or lists of strings) with a :class:`Layout`
saying where each field sits. A batch is folded into counters keyed by the fields that
matter for a verdict (device, protocol, TLS version, suite, operation, result), plus the
last time each key was seen and a count per hour (per day, once the log spans more than
:data:`MAX_PERIODS` hours) and TLS version. The folding runs in C
(``Counter.update``, ``dict(zip(...))``, ``map(itemgetter)``): no Python code runs per
row on the common path. Memory grows with the number of distinct keys (devices x the
ways they connect), never with the number of rows.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter, le
from typing import Any

from .fields import FIELDS, normalize_tls

__all__ = ["KEY_FIELDS", "Aggregator", "InputStats", "Layout"]

#: The fields rows are aggregated by.
KEY_FIELDS = FIELDS[:9]
#: How many line numbers of rejected rows each input lists (the count stays exact).
LISTED_LINES = 20
#: Timeline periods kept per layout before hours are merged into days (so the timeline
#: grows with the days a log spans, not with its rows).
MAX_PERIODS = 24 * 366
HOUR, DAY = 13, 10  # characters of an ISO time that name its hour, its day

Row = Sequence[str]
_SUITE_SYNTAX = re.compile(r"[A-Za-z0-9_\-]{0,120}")


def _getter(indices: Sequence[int]) -> Callable[[Row], tuple[str, ...]]:
    """itemgetter that always returns a tuple (itemgetter(i) returns the item)."""
    if len(indices) == 1:
        only = indices[0]
        return lambda row: (row[only],)
    if not indices:
        return lambda row: ()
    return itemgetter(*indices)


@dataclass(frozen=True)
class Layout:
    """Where the canonical fields sit in the rows of one reader (or one template)."""

    #: Key fields present, in key order (a subset of :data:`KEY_FIELDS`).
    fields: tuple[str, ...]
    #: Their indices in a row.
    source: tuple[int, ...]
    time: int | None = None
    caller: int | None = None
    reason: int | None = None
    #: Index of the time's first 13 characters (YYYY-MM-DDTHH), when a reader has it.
    hour: int | None = None

    @classmethod
    def of(cls, positions: Mapping[str, int]) -> Layout:
        """A layout from ``{field: index}`` (unknown fields are ignored)."""
        present = [f for f in KEY_FIELDS if f in positions]
        return cls(
            fields=tuple(present),
            source=tuple(positions[f] for f in present),
            time=positions.get("time"),
            caller=positions.get("caller"),
            reason=positions.get("reason"),
            hour=positions.get("hour"),
        )

    def position(self, name: str) -> int | None:
        """Index of ``name`` in this layout's key tuples."""
        return self.fields.index(name) if name in self.fields else None

    def canonical(self, key: tuple[str, ...]) -> dict[str, str]:
        values = dict(zip(self.fields, key, strict=True))
        return {f: values.get(f, "") for f in KEY_FIELDS}


@dataclass
class InputStats:
    """What one input held: rows used, rows rejected (with their first line numbers)."""

    name: str
    format: str = ""
    rows: int = 0
    rejected: int = 0
    lines: list[int] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)

    def reject(self, line: int, why: str) -> None:
        self.rejected += 1
        self.reasons[why] += 1
        if len(self.lines) < LISTED_LINES:
            self.lines.append(line)

    def absorb(self, other: InputStats, line_offset: int) -> None:
        """Add the counts of a part of this input whose lines start after
        ``line_offset`` lines."""
        self.rows += other.rows
        self.rejected += other.rejected
        self.reasons.update(other.reasons)
        room = LISTED_LINES - len(self.lines)
        self.lines.extend(line_offset + n for n in other.lines[: max(room, 0)])

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.name,
            "format": self.format,
            "rows": self.rows,
            "rejectedRows": self.rejected,
            "rejectedLines": list(self.lines),
            "rejectedLinesTruncated": self.rejected > len(self.lines),
            "rejectedReasons": dict(self.reasons.most_common()),
        }


@dataclass
class _Folded:
    """The counters of one layout."""

    layout: Layout
    counts: Counter[tuple[str, ...]] = field(default_factory=Counter)
    last: dict[tuple[str, ...], str] = field(default_factory=dict)
    hours: Counter[tuple[str, ...]] = field(default_factory=Counter)


class Aggregator:
    """Folds batches of rows into per-key counters; :mod:`.report` turns them into
    per-device verdicts."""

    def __init__(self) -> None:
        self._folded: dict[Layout, _Folded] = {}
        #: (caller host, canonical key..., reason) -> count, for rows without a device
        self.unidentified: Counter[tuple[str, ...]] = Counter()
        self.unidentified_last: dict[tuple[str, ...], str] = {}
        self._valid: dict[str, set[str]] = {"tls": set(), "suite": set()}
        self.latest = ""
        self.earliest = ""
        #: HOUR or DAY: what a timeline period is
        self.period = HOUR
        self.inputs: list[InputStats] = []

    def folded(self) -> list[_Folded]:
        return list(self._folded.values())

    def merge(self, other: Aggregator) -> None:
        """Add what ``other`` folded (another part of the same inputs)."""
        if other.period < self.period:
            self._coarsen(other.period)
        for layout, theirs in other._folded.items():
            mine = self._folded.get(layout)
            if mine is None:
                theirs.hours = _coarse(theirs.hours, self.period)
                self._folded[layout] = theirs
                continue
            mine.counts.update(theirs.counts)
            mine.hours.update(_coarse(theirs.hours, self.period))
            _keep_latest(mine.last, theirs.last)
        self.unidentified.update(other.unidentified)
        _keep_latest(self.unidentified_last, other.unidentified_last)
        for name, values in other._valid.items():
            self._valid[name] |= values
        if other.latest > self.latest:
            self.latest = other.latest
        if other.earliest and (not self.earliest or other.earliest < self.earliest):
            self.earliest = other.earliest

    def add(
        self,
        rows: Sequence[Row],
        layout: Layout,
        stats: InputStats,
        lines: int | Sequence[int],
    ) -> None:
        """Fold ``rows``; ``lines`` is the line number of ``rows[0]`` when the rows are
        consecutive lines, else each row's line number."""
        if not rows:
            return
        folded = self._folded.get(layout)
        if folded is None:
            folded = self._folded[layout] = _Folded(layout)
        keys = list(map(_getter(layout.source), rows))
        times = list(map(itemgetter(layout.time), rows)) if layout.time is not None else None
        keys, times, rows = self._drop_invalid(keys, times, rows, layout, stats, lines)
        if not keys:
            return
        stats.rows += len(keys)
        folded.counts.update(keys)
        if times is not None:
            self._fold_times(folded, keys, times, rows)
        device = layout.position("device")
        if device is None or "" in map(itemgetter(device), keys):
            self._fold_unidentified(rows, keys, times, layout)

    # -- per batch ------------------------------------------------------------------------

    def _drop_invalid(
        self,
        keys: list[tuple[str, ...]],
        times: list[str] | None,
        rows: Sequence[Row],
        layout: Layout,
        stats: InputStats,
        lines: int | Sequence[int],
    ) -> tuple[list[tuple[str, ...]], list[str] | None, Sequence[Row]]:
        """Rows with a TLS version or suite that is no such thing are rejected (with
        their line numbers); checked once per distinct value."""
        bad: dict[int, set[str]] = {}
        checks: tuple[tuple[str, Callable[[str], bool]], ...] = (
            ("tls", _valid_tls),
            ("suite", _valid_suite),
        )
        for name, valid in checks:
            position = layout.position(name)
            if position is None:
                continue
            seen = self._valid[name]
            for value in set(map(itemgetter(position), keys)) - seen:
                if valid(value):
                    seen.add(value)
                else:
                    bad.setdefault(position, set()).add(value)
        if not bad:
            return keys, times, rows
        keep: list[int] = []
        for i, key in enumerate(keys):
            wrong = next((key[p] for p, values in bad.items() if key[p] in values), None)
            if wrong is None:
                keep.append(i)
                continue
            line = lines + i if isinstance(lines, int) else lines[i]
            name = layout.fields[next(p for p, values in bad.items() if key[p] in values)]
            stats.reject(line, f"unreadable {'TLS version' if name == 'tls' else 'cipher suite'}")
        return (
            [keys[i] for i in keep],
            [times[i] for i in keep] if times is not None else None,
            [rows[i] for i in keep],
        )

    def _fold_times(
        self,
        folded: _Folded,
        keys: list[tuple[str, ...]],
        times: list[str],
        rows: Sequence[Row],
    ) -> None:
        ascending = all(map(le, times, itertools.islice(times, 1, None)))
        if ascending:
            latest = dict(zip(keys, times, strict=True))
            first, last = times[0], times[-1]
        else:
            order = sorted(range(len(times)), key=times.__getitem__)
            ordered = map(keys.__getitem__, order)
            latest = dict(zip(ordered, map(times.__getitem__, order), strict=True))
            first, last = times[order[0]], times[order[-1]]
        if ascending and first >= self.latest:
            folded.last.update(latest)  # a later stretch of a chronological log
        else:
            seen = folded.last
            for key, when in latest.items():
                if when > seen.get(key, ""):
                    seen[key] = when
        if last > self.latest:
            self.latest = last
        if first and (not self.earliest or first < self.earliest):
            self.earliest = first
        layout = folded.layout
        positions = (layout.position(f) for f in ("tls", "operation", "category"))
        present = [p for p in positions if p is not None]
        if layout.hour is not None and self.period == HOUR:
            hourly = itemgetter(layout.hour, *(layout.source[p] for p in present))
            folded.hours.update(map(hourly, rows))
        else:
            periods = map(itemgetter(slice(0, self.period)), times)
            columns = [map(itemgetter(p), keys) for p in present]
            folded.hours.update(zip(periods, *columns, strict=True))
        if len(folded.hours) > MAX_PERIODS * 4 and self.period == HOUR:
            distinct = len({key[0] for key in folded.hours})
            if distinct > MAX_PERIODS:
                self._coarsen(DAY)

    def _coarsen(self, period: int) -> None:
        """Merge the timeline's periods into longer ones (hours into days)."""
        self.period = period
        for folded in self._folded.values():
            folded.hours = _coarse(folded.hours, period)

    def _fold_unidentified(
        self,
        rows: Sequence[Row],
        keys: list[tuple[str, ...]],
        times: list[str] | None,
        layout: Layout,
    ) -> None:
        device = layout.position("device")
        for i, key in enumerate(keys):
            if device is not None and key[device]:
                continue
            row = rows[i]
            caller = _host(row[layout.caller]) if layout.caller is not None else ""
            reason = row[layout.reason][:200] if layout.reason is not None else ""
            canonical = layout.canonical(key)
            entry = (caller, *(canonical[f] for f in KEY_FIELDS), reason)
            self.unidentified[entry] += 1
            when = times[i] if times is not None else ""
            if when > self.unidentified_last.get(entry, ""):
                self.unidentified_last[entry] = when


def _coarse(counts: Counter[tuple[str, ...]], period: int) -> Counter[tuple[str, ...]]:
    if all(len(key[0]) <= period for key in itertools.islice(counts, 1)):
        return counts
    merged: Counter[tuple[str, ...]] = Counter()
    for (when, *rest), n in counts.items():
        key = (when[:period], *rest)
        merged[key] += n
    return merged


def _keep_latest(mine: dict[tuple[str, ...], str], theirs: dict[tuple[str, ...], str]) -> None:
    for key, when in theirs.items():
        if when > mine.get(key, ""):
            mine[key] = when


def _valid_tls(value: str) -> bool:
    return normalize_tls(value) is not None


def _valid_suite(value: str) -> bool:
    return _SUITE_SYNTAX.fullmatch(value) is not None


_PORT = re.compile(r"^(\[[^\]]*\]|[^:]+):\d+$")


def _host(caller: str) -> str:
    """``127.0.0.1:51234`` -> ``127.0.0.1``; ``[::1]:5000`` -> ``[::1]``."""
    text = caller.strip()
    match = _PORT.match(text)
    return match.group(1) if match else text
