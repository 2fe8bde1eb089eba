"""Opening an input: a path or ``-`` (standard input), gzip detected by its magic bytes,
text decoded as UTF-8 (a BOM is dropped, undecodable bytes become U+FFFD so one bad
byte costs a row, not the run), and the first bytes looked at to tell the format."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..errors import AuditInputError

__all__ = ["Source", "open_source"]

_GZIP_MAGIC = b"\x1f\x8b"
#: How much text is read at a time.
CHUNK = 1 << 20


@dataclass
class Source:
    """An open input: a text stream with its first lines already read (``head``)."""

    name: str
    stream: IO[str]
    head: str
    compressed: bool

    def read(self, size: int = CHUNK) -> str:
        """The next text, ending at a line end (unless the input ends first)."""
        if self.head:
            text, self.head = self.head, ""
            return text
        text = self.stream.read(size)
        if text and not text.endswith("\n"):
            text += self.stream.readline()
        return text

    def lines(self) -> Iterator[str]:
        """The remaining text, line by line (line ends kept)."""
        head, self.head = self.head, ""
        return itertools.chain(io.StringIO(head, newline=""), self.stream)

    def close(self) -> None:
        self.stream.close()

    def kind(self) -> str:
        """``jsonl``, ``json`` (one document) or ``csv``, from the first character and,
        for ``{``, whether the first line is a whole JSON value."""
        text = self.head.lstrip()
        if not text:
            return "empty"
        if text[0] == "[":
            return "json"
        if text[0] == "{":
            first = text.split("\n", 1)[0].strip()
            try:
                json.loads(first)
            except ValueError:
                return "json"
            return "jsonl"
        return "csv"


def open_source(name: str) -> Source:
    """Open ``name`` (``-`` = standard input); :class:`AuditInputError` when it cannot
    be read or is binary data."""
    binary: IO[bytes]
    try:
        if name == "-":
            binary = sys.stdin.buffer
        else:
            path = Path(name)
            if path.is_dir():
                raise AuditInputError(f"{name}: is a directory, not a connection log")
            binary = path.open("rb")
    except FileNotFoundError as exc:
        raise AuditInputError(f"{name}: no such file") from exc
    except OSError as exc:
        raise AuditInputError(f"{name}: cannot open: {exc.strerror or exc}") from exc
    buffered: io.BufferedReader = (
        binary if isinstance(binary, io.BufferedReader) else io.BufferedReader(binary)  # type: ignore[arg-type]
    )
    compressed = buffered.peek(2)[:2] == _GZIP_MAGIC
    raw: IO[bytes] = (
        gzip.GzipFile(fileobj=buffered, mode="rb") if compressed else buffered  # type: ignore[assignment]
    )
    try:
        stream = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
        head = stream.read(64 * 1024)
        if head and not head.endswith("\n"):
            head += stream.readline()
    except (OSError, EOFError) as exc:  # a truncated or corrupt gzip member
        raw.close()
        raise AuditInputError(f"{name}: cannot read: {exc}") from exc
    if "\0" in head[:4096]:
        stream.close()
        raise AuditInputError(f"{name}: binary data, not a connection log")
    return Source(name=name, stream=stream, head=head, compressed=compressed)
