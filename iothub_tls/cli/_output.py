"""Rendering shared by the commands: plain-text tables for people, JSON for scripts,
and one way to report an error."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["EXIT_NOT_COMPLIANT", "EXIT_OK", "EXIT_UNABLE", "error", "print_json", "table", "yes_no"]

#: OK / compliant
EXIT_OK = 0
#: checked, and not compliant
EXIT_NOT_COMPLIANT = 1
#: could not check: usage error, unreachable host, timeout, unreadable input
EXIT_UNABLE = 2


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, indent: int = 0) -> str:
    """A left-aligned text table; the last column is not padded."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    pad = " " * indent

    def line(values: Sequence[str]) -> str:
        parts = [v.ljust(widths[i]) for i, v in enumerate(values[:-1])]
        return (pad + "  ".join([*parts, values[-1]])).rstrip()

    # The last column holds free text: its rule stops at a readable width.
    rules = ["-" * w for w in widths[:-1]] + ["-" * min(widths[-1], 60)]
    out = [line(list(headers)), line(rules)]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def print_json(data: Any, stream: TextIO | None = None) -> None:
    """Pretty-printed JSON (stable key order as given) with a trailing newline."""
    out = stream or sys.stdout
    out.write(json.dumps(data, indent=2) + "\n")
    out.flush()


def error(command: str, message: str, *, as_json: bool = False) -> int:
    """Report that a command could not do its job; returns :data:`EXIT_UNABLE`.

    The message goes to stderr; with ``--json`` stdout also gets ``{"error": message}``
    so a script reading stdout always gets JSON."""
    if as_json:
        print_json({"error": message})
    sys.stderr.write(f"iothub-tls {command}: error: {message}\n")
    sys.stderr.flush()
    return EXIT_UNABLE
