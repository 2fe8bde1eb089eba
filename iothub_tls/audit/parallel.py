"""Large files read by several processes at once.

A plain (not gzip) JSON lines or CSV file is cut into byte ranges at line starts; each
range is folded by a worker process (``spawn``: no state is shared with the caller) into
its own counters, and the counters are merged. JSON text cannot hold a raw newline, so
every line start is a record start. CSV can (in a quoted field): each worker counts the
quote characters of its range, and a cut after an odd number of quotes means it fell
inside a field, so the file is then read again by one process.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from .aggregate import Aggregator, InputStats
from .csvlog import Header, fold_rows, open_reader
from .jsonlines import read_json_lines
from .sources import Source

__all__ = ["MIN_PARALLEL_BYTES", "plain_file", "read_parallel", "split"]

logger = logging.getLogger("iothub_tls.audit")

#: Files smaller than this are read by one process (starting workers costs more).
MIN_PARALLEL_BYTES = 64 << 20


class _Bounded(io.RawIOBase):
    """The bytes of one file from ``start`` to ``end``."""

    def __init__(self, path: str, start: int, end: int) -> None:
        self._file = open(path, "rb")  # closed in close()
        self._file.seek(start)
        self._left = end - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buffer)[: min(len(buffer), self._left)]
        count = self._file.readinto(view)
        self._left -= count
        return count

    def close(self) -> None:
        self._file.close()
        super().close()


def split(path: str, start: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` byte ranges from ``start`` to the end of the file, each starting at a
    line start (fewer when lines are long)."""
    size = os.path.getsize(path)
    cuts = [start]
    with open(path, "rb") as handle:
        for k in range(1, parts):
            target = start + (size - start) * k // parts
            if target <= cuts[-1]:
                continue
            handle.seek(target - 1)
            handle.readline()  # to the end of the line holding byte target-1
            cut = handle.tell()
            if cut < size and cut > cuts[-1]:
                cuts.append(cut)
    cuts.append(size)
    return list(itertools.pairwise(cuts))


@dataclass
class _Part:
    aggregator: Aggregator
    stats: InputStats
    lines: int  # physical lines in the range
    quotes: int  # quote characters in the range (CSV)


def _scan(path: str, start: int, end: int) -> tuple[int, int]:
    """(lines, quote characters) of a byte range."""
    lines = quotes = 0
    last = b"\n"
    with _Bounded(path, start, end) as raw:
        reader = io.BufferedReader(raw, 1 << 20)
        while chunk := reader.read(1 << 20):
            lines += chunk.count(b"\n")
            quotes += chunk.count(b'"')
            last = chunk[-1:]
    return lines + (0 if last == b"\n" else 1), quotes


def _work(path: str, kind: str, start: int, end: int, header: Header | None) -> _Part:
    aggregator = Aggregator()
    stats = InputStats(path)
    lines, quotes = _scan(path, start, end)
    stream = io.TextIOWrapper(
        io.BufferedReader(_Bounded(path, start, end), 1 << 20),
        encoding="utf-8-sig" if start == 0 else "utf-8",
        errors="replace",
        newline="",
    )
    try:
        source = Source(path, stream, "", False)
        if kind == "jsonl":
            read_json_lines(source, aggregator, stats)
        else:
            assert header is not None
            fold_rows(open_reader(source.lines(), header.dialect), header, aggregator, stats, path)
    finally:
        stream.close()
    return _Part(aggregator, stats, lines, quotes)


def read_parallel(
    source: Source,
    kind: str,
    aggregator: Aggregator,
    stats: InputStats,
    jobs: int,
    header: Header | None = None,
) -> bool:
    """Fold ``source`` (a plain file) with ``jobs`` processes; False when the file
    must be read by one process instead (nothing was folded then)."""
    header_bytes = header_quotes = 0
    if header is not None:
        if header.lines != 1:
            return False
        with open(source.name, "rb") as handle:
            first = handle.readline()
        header_bytes, header_quotes = len(first), first.count(b'"')
    ranges = split(source.name, header_bytes, jobs)
    if len(ranges) < 2:
        return False
    context = get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(ranges), mp_context=context) as pool:
        futures = [pool.submit(_work, source.name, kind, a, b, header) for a, b in ranges]
        parts = [f.result() for f in futures]
    if kind == "csv":
        parity = header_quotes % 2
        for part in parts[:-1]:
            parity = (parity + part.quotes) % 2
            if parity:
                logger.debug("%s: a cut fell inside a quoted field; one process", source.name)
                return False
    first_line = header.lines if header is not None else 0
    for part in parts:
        aggregator.merge(part.aggregator)
        stats.absorb(part.stats, first_line)
        first_line += part.lines
    return True


def plain_file(name: str) -> bool:
    """Whether ``name`` is a regular file that can be read by ranges."""
    return name != "-" and Path(name).is_file()
