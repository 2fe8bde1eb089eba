"""Line templates: the fast path for JSON lines.

The lines of one log are written by one program, so they share a layout: the same keys
in the same order, the same separators, Azure's ``properties`` always a JSON string
with its own keys in order. A template is that layout learned from a parsed line and
turned into one regular expression that matches a whole line and captures the fields
the audit needs, so a whole chunk of lines is read by one ``findall`` in C.

A template matches a line only if the line reads the same through ``json``: captured
values must be plain strings (no escapes, so the raw text is the value) or ``null``,
and everything skipped must have the shape its key had in the learned line. A line
that does not match is parsed by ``json`` (the slow path) and may teach the template
a variant: keys missing from one layout or the other become optional.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .aggregate import Layout
from .fields import PROPERTIES, TIME_ISO, field_of

__all__ = ["Template", "learn", "merge"]

_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\r]*")
_CAPTURED = frozenset(
    {
        "device",
        "protocol",
        "tls",
        "suite",
        "operation",
        "category",
        "result",
        "level",
        "resulttype",
        "time",
        "caller",
        "reason",
    }
)
_NUMBER = r"-?\d[\d.eE+\-]*"
_HOUR_END = TIME_ISO.index(":")  # TIME_ISO up to the hour


@dataclass(frozen=True)
class Member:
    """One ``, "key": value`` of a layout, as regex text."""

    key: str
    head: str  # the separator before the key, the key and the colon
    value: str = ""  # the value (empty for a nested object)
    optional: bool = False
    nested: tuple[Member, ...] | None = None
    closing: str = ""  # of a nested object
    captures: frozenset[str] = frozenset()
    #: a captured field: its name, nesting level and whether null was seen for it
    field: str | None = None
    level: int = 0
    nullable: bool = False

    @property
    def pattern(self) -> str:
        return self.head + self.value


@dataclass(frozen=True)
class Template:
    members: tuple[Member, ...]
    closing: str
    #: Matches "\n" + a line, up to (not including) the next "\n".
    chunk: re.Pattern[str]
    #: Matches one line (fullmatch).
    line: re.Pattern[str]
    layout: Layout

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(m.key for m in self.members)


# -- reading a line's layout ----------------------------------------------------------


@dataclass(frozen=True)
class _Pair:
    key: str
    lead: str  # the text before the key: "{", ", " or ","
    colon: str  # the text between key and value: ": " or ":"
    raw: str  # the value's text
    value: Any


def _object_members(text: str) -> tuple[list[_Pair], str] | None:
    """The members of the JSON object ``text`` in order, and the text closing it
    (``"}"`` or ``" }"``); None when ``text`` is not exactly one object."""
    start = _WS.match(text).end()  # type: ignore[union-attr]
    if not text.startswith("{", start):
        return None
    pos = start + 1
    lead_from = start
    found: list[_Pair] = []
    try:
        while True:
            pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
            if text.startswith("}", pos) and not found:
                return None  # {} is not a record
            key_at = pos
            key, pos = _DECODER.raw_decode(text, pos)
            if not isinstance(key, str):
                return None
            lead = text[lead_from:key_at]
            colon_at = pos
            pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
            if not text.startswith(":", pos):
                return None
            pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
            colon = text[colon_at:pos]
            value, end = _DECODER.raw_decode(text, pos)
            found.append(_Pair(key, lead, colon, text[pos:end], value))
            pos = _WS.match(text, end).end()  # type: ignore[union-attr]
            if text.startswith(",", pos):
                lead_from = end
                pos += 1
                continue
            if text.startswith("}", pos):
                closing = text[end : pos + 1]
                pos += 1
                break
            return None
    except (ValueError, IndexError):
        return None
    if text[pos:].strip():
        return None
    return found, closing


# -- regex pieces, per nesting level ---------------------------------------------------
# Level 0 is the line; level 1 is the JSON text inside a string of level 0 (Azure's
# "properties"), where a quote is written \" and a backslash \\.
#
# A skipped string of level 0 is matched by "[^"]*": in JSON text a quote inside a
# string is always preceded by a backslash, so stopping early at an escaped quote
# leaves a backslash where the template needs the separator's unescaped quote, and the
# line does not match (it goes to the slow path). Captured strings exclude backslashes
# too, so a captured value is its own raw text.


def _quote(level: int) -> str:
    return '"' if level == 0 else r'\\"'


def _plain(level: int) -> str:
    """A string body without escapes (so its raw text is its value)."""
    return r'[^"\\]*' if level == 0 else r"[^\\]*"


def _capture(name: str, level: int, nullable: bool) -> str:
    q = _quote(level)
    if name == "time":
        return f"{q}(?P<time>(?P<hour>{TIME_ISO[:_HOUR_END]}){TIME_ISO[_HOUR_END:]}){q}"
    if nullable:
        return f"(?:{q}(?P<{name}>{_plain(level)}){q}|null)"
    return f"{q}(?P<{name}>{_plain(level)}){q}"


def _skip(raw: str, value: Any, level: int) -> str | None:
    """A pattern for a value the audit does not read, of the shape ``value`` had."""
    if isinstance(value, (dict, list)):
        return None
    if level == 0:
        if isinstance(value, str):
            return '"[^"]*"' if raw.startswith('"') else None
        return "(?:null|true|false|" + _NUMBER + ")"
    if isinstance(value, str):
        if "\\" not in raw and '"' not in raw[1:-1]:
            return r'\\"[^\\]*\\"'
        # JSON text in a string (Azure's authType): {...} with no braces inside
        inner = value.strip()
        body = inner[1:-1]
        if inner.startswith("{") and inner.endswith("}") and "{" not in body and "}" not in body:
            return r'\\"\{[^}]*\}\\"'
        return None
    return "(?:null|true|false|" + _NUMBER + ")"


def _members(pairs: Sequence[_Pair], level: int, used: set[str]) -> tuple[Member, ...] | None:
    out: list[Member] = []
    q = _quote(level)
    for pair in pairs:
        key = pair.key
        if '"' in key or "\\" in key:
            return None
        key_text = re.escape(pair.lead) + q + re.escape(key) + q + re.escape(pair.colon)
        name = field_of(key)
        if name == PROPERTIES and level == 0 and isinstance(pair.value, str):
            inner = _object_members(pair.value)
            if inner is not None:
                nested = _members(inner[0], 1, used)
                if nested is None:
                    return None
                out.append(
                    Member(
                        key,
                        key_text,
                        nested=nested,
                        closing=re.escape(inner[1]),
                        captures=frozenset().union(*(m.captures for m in nested)),
                    )
                )
                continue
        if name in _CAPTURED and name not in used and (name != "time" or pair.value):
            used.add(name)
            captures = frozenset({name, "hour"} if name == "time" else {name})
            nullable = pair.value is None
            if not nullable and not isinstance(pair.value, str):
                return None  # a number or a flag where text is read: the slow path
            value = _capture(name, level, nullable)
            out.append(
                Member(
                    key,
                    key_text,
                    value,
                    captures=captures,
                    field=name,
                    level=level,
                    nullable=nullable,
                )
            )
            continue
        skip = _skip(pair.raw, pair.value, level)
        if skip is None:
            return None
        out.append(Member(key, key_text, skip))
    return tuple(out)


def _join(members: Sequence[Member]) -> str:
    parts = []
    for member in members:
        body = member.pattern
        if member.nested is not None:
            body += '"' + _join(member.nested) + member.closing + '"'
        parts.append(f"(?:{body})?" if member.optional else body)
    return "".join(parts)


def _compile(members: tuple[Member, ...], closing: str) -> Template | None:
    if not members or members[0].optional:
        return None
    body = _join(members) + closing
    try:
        # in a chunk: each line is matched with the newline before it (the chunk is
        # read with one prepended), so matches start at line starts and a literal
        # prefix leads the search; alone: a whole line
        chunk = re.compile(r"\n" + body + r"[ \t]*\r?(?=\n)")
        line = re.compile(body + r"[ \t]*\r?")
    except re.error:
        return None
    positions = {name: index - 1 for name, index in chunk.groupindex.items()}
    return Template(members, closing, chunk, line, Layout.of(positions))


def learn(line: str) -> Template | None:
    """The template of ``line`` (one JSON object), or None when it has none."""
    parsed = _object_members(line)
    if parsed is None:
        return None
    members = _members(parsed[0], 0, set())
    if members is None:
        return None
    return _compile(members, re.escape(parsed[1]))


# -- variants -------------------------------------------------------------------------


def _lcs(a: Sequence[str], b: Sequence[str]) -> list[tuple[int, int]]:
    """Index pairs of a longest common subsequence of ``a`` and ``b``."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) - 1, -1, -1):
        for j in range(len(b) - 1, -1, -1):
            table[i][j] = (
                table[i + 1][j + 1] + 1 if a[i] == b[j] else max(table[i + 1][j], table[i][j + 1])
            )
    pairs: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] == b[j]:
            pairs.append((i, j))
            i += 1
            j += 1
        elif table[i + 1][j] >= table[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def _merge_members(a: Sequence[Member], b: Sequence[Member]) -> tuple[Member, ...] | None:
    pairs = _lcs([m.key for m in a], [m.key for m in b])
    out: list[Member] = []
    i = j = 0
    for pi, pj in [*pairs, (len(a), len(b))]:
        out.extend(replace(m, optional=True) for m in a[i:pi])
        out.extend(replace(m, optional=True) for m in b[j:pj])
        if pi == len(a) and pj == len(b):
            break
        left, right = a[pi], b[pj]
        if left.nested is not None and right.nested is not None:
            if left.closing != right.closing or left.pattern != right.pattern:
                return None
            nested = _merge_members(left.nested, right.nested)
            if nested is None:
                return None
            merged = replace(
                left,
                nested=nested,
                optional=left.optional or right.optional,
                captures=left.captures | right.captures,
            )
        elif left.pattern == right.pattern and left.nested == right.nested:
            merged = replace(left, optional=left.optional or right.optional)
        elif (
            left.head == right.head
            and left.field is not None
            and left.field == right.field
            and left.field != "time"
        ):  # text here, null there
            nullable = left.nullable or right.nullable
            merged = replace(
                left,
                value=_capture(left.field, left.level, nullable),
                nullable=nullable,
                optional=left.optional or right.optional,
            )
        elif (
            left.head == right.head
            and not left.captures
            and not right.captures
            and left.nested is None
            and right.nested is None
        ):  # a value of another shape (null here, a string there)
            merged = replace(
                left,
                value=f"(?:{left.value}|{right.value})",
                optional=left.optional or right.optional,
            )
        else:
            return None
        out.append(merged)
        i, j = pi + 1, pj + 1
    # a field may be captured once per template
    seen: set[str] = set()
    for member in out:
        if member.captures & seen:
            return None
        seen |= member.captures
    return tuple(out)


def merge(current: Template, other: Template) -> Template | None:
    """One template matching the lines of both, or None when their layouts do not
    combine (the other layout's lines then stay on the slow path)."""
    if current.closing != other.closing:
        return None
    members = _merge_members(current.members, other.members)
    if members is None:
        return None
    return _compile(members, current.closing)
