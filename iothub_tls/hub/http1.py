"""HTTP/1.1 request heads as the local hub's HTTPS door reads them, sans I/O.

The door buffers a connection's bytes; :func:`head_end` says where the request line and
header fields end (the first empty line), and :func:`parse_head` turns them into a
:class:`RequestHead` or refuses them with the status RFC 9112 names (:class:`HeadError`).
The parser is strict where leniency is a smuggling risk (whitespace before a field's
colon, obsolete line folding, a field line without a colon, header sections without
bound) and lenient where RFC 9112 allows it (empty lines before the request line, bare
LF line ends). Bodies are the door's business: it frames them by Content-Length only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "MAX_HEADER_FIELDS",
    "MAX_HEAD_BYTES",
    "MAX_REQUEST_LINE",
    "HeadError",
    "Headers",
    "RequestHead",
    "check_incomplete",
    "head_end",
    "parse_head",
]

#: The longest request line accepted (longer: 414).
MAX_REQUEST_LINE = 65536
#: The most header fields in one request (more: 431).
MAX_HEADER_FIELDS = 100
#: The largest request head (request line and header fields; larger: 431).
MAX_HEAD_BYTES = 128 * 1024

_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_VERSION = re.compile(r"^HTTP/(\d)\.(\d)$")


class HeadError(ValueError):
    """A request head the door refuses: answer ``status`` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Headers:
    """A request's header fields, in order, looked up without regard to case."""

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self._fields = fields

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first field named ``name``."""
        wanted = name.lower()
        for key, value in self._fields:
            if key.lower() == wanted:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self._fields if key.lower() == wanted]

    def items(self) -> Iterator[tuple[str, str]]:
        return iter(self._fields)

    def as_dict(self) -> dict[str, str]:
        """Name -> value (a repeated field: its last value), names as the client sent
        them."""
        return dict(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    version: tuple[int, int]
    headers: Headers

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request after this one (RFC 9112
        section 9.3): HTTP/1.1 unless ``Connection: close``; HTTP/1.0 only with
        ``Connection: keep-alive``."""
        connection = (self.headers.get("Connection") or "").strip().lower()
        if connection == "close":
            return False
        return self.version >= (1, 1) or connection == "keep-alive"

    @property
    def expects_continue(self) -> bool:
        expect = (self.headers.get("Expect") or "").strip().lower()
        return expect == "100-continue" and self.version >= (1, 1)


def head_end(buffer: bytes | bytearray) -> int:
    """Where the head ends in ``buffer`` (the index after its empty line), -1 when it
    has not all arrived. Empty lines before the request line are skipped first (RFC
    9112 section 2.2) and belong to the head."""
    start = len(buffer) - len(bytes(buffer).lstrip(b"\r\n"))
    if start == len(buffer):
        return -1
    found = _END.search(buffer, start)
    if found is None:
        # A request line alone, ended by the empty line: "GET / HTTP/1.1\r\n\r\n" is
        # found above; here the head is incomplete.
        return -1
    return found.end()


def check_incomplete(buffer: bytes | bytearray) -> None:
    """Refuse a head still incomplete that already breaks a bound (so the door does not
    buffer without end)."""
    text = bytes(buffer).lstrip(b"\r\n")
    line_end = text.find(b"\n")
    if (line_end < 0 and len(text) > MAX_REQUEST_LINE) or line_end > MAX_REQUEST_LINE:
        raise HeadError(414, f"the request line is longer than {MAX_REQUEST_LINE} bytes")
    if len(buffer) > MAX_HEAD_BYTES:
        raise HeadError(431, f"the request head is larger than {MAX_HEAD_BYTES} bytes")


def parse_head(data: bytes) -> RequestHead:
    """The request line and header fields of ``data`` (a whole head, see
    :func:`head_end`)."""
    if len(data) > MAX_HEAD_BYTES:
        raise HeadError(431, f"the request head is larger than {MAX_HEAD_BYTES} bytes")
    text = data.lstrip(b"\r\n").decode("iso-8859-1")
    lines = text.split("\n")
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    while lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise HeadError(400, "empty request")
    request_line = lines[0]
    if len(request_line) > MAX_REQUEST_LINE:
        raise HeadError(414, f"the request line is longer than {MAX_REQUEST_LINE} bytes")
    words = request_line.split(" ")
    if len(words) != 3 or not all(words):
        raise HeadError(400, f"bad request line {request_line[:100]!r}")
    method, target, version_text = words
    version = _VERSION.match(version_text)
    if version is None:
        raise HeadError(400, f"bad HTTP version {version_text[:20]!r}")
    major, minor = int(version[1]), int(version[2])
    if major != 1:
        raise HeadError(505, f"HTTP version {version_text} is not supported; use HTTP/1.1")
    if not _TOKEN.match(method):
        raise HeadError(400, f"bad request method {method[:20]!r}")
    if target.startswith("//"):  # a path, not an authority (as http.server reads it)
        target = "/" + target.lstrip("/")
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            # RFC 9112 5.2: obsolete line folding may be refused with 400
            raise HeadError(400, "header fields folded over several lines are not accepted")
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name):
            # RFC 9112 5.1: no whitespace between the field name and the colon
            raise HeadError(400, f"bad header field line {line[:60]!r}")
        fields.append((name, value.strip(" \t")))
        if len(fields) > MAX_HEADER_FIELDS:
            raise HeadError(431, f"more than {MAX_HEADER_FIELDS} header fields")
    return RequestHead(method, target, (major, minor), Headers(fields))
