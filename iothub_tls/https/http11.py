"""HTTP/1.1 for the device client, without I/O: requests written, responses read.

The device client speaks a small, fixed part of HTTP/1.1 (RFC 9112) with one server: a
request at a time on a kept-alive connection, bodies framed by ``Content-Length``. So
this module is small and strict where a mistake could desynchronise the connection:

* :class:`RequestWriter` turns a request into bytes in one piece (head and body in one
  TLS record). The headers every request carries are checked and encoded once; a name
  that is not a token, or a value holding CR, LF or NUL (header injection), is refused
  with ``ValueError`` before anything is sent.
* :class:`ResponseReader` is fed the bytes that arrive and returns the response once it
  is complete. It frames the body as RFC 9112 section 6.3 says — none for HEAD, 1xx,
  204 and 304; chunked transfer coding; ``Content-Length``; else up to the close — skips
  interim (1xx) responses, bounds the head and the body, and raises
  :class:`HttpProtocolError` for anything malformed (the connection must then be
  dropped: where the next response starts is unknown).

Nothing here knows about IoT Hub; :mod:`.conventions` builds the requests and reads the
responses' meaning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["HttpProtocolError", "RequestWriter", "Response", "ResponseReader"]

# RFC 9110 5.6.2: a header name is a token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A header value or request target may not break the message apart.
_BREAKS = re.compile(r"[\r\n\x00]")
# Header names seen in responses -> lower case (checked once: a name that is in here is
# a token). Bounded: a server cannot grow it without limit.
_LOWER: dict[str, str] = {}
_CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,16}")

_STATUS_START = b"HTTP/1."

#: Largest response head (status line and headers) accepted.
MAX_HEAD_BYTES = 64 * 1024
#: Largest response body accepted: a cloud-to-device message is at most 64 KB, an error
#: a few hundred bytes.
MAX_BODY_BYTES = 4 * 1024 * 1024


class HttpProtocolError(ValueError):
    """The server's bytes are not a valid HTTP/1.1 response."""


class Response:
    """A complete response. ``headers`` keeps the names as sent (look them up without
    regard to case); repeated headers are joined with ``", "`` (RFC 9110 5.3).
    ``keep_alive`` is False when the connection cannot carry another request."""

    __slots__ = ("body", "headers", "keep_alive", "reason", "status")

    def __init__(
        self, status: int, reason: str, headers: dict[str, str], body: bytes, keep_alive: bool
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason!r} {len(self.body)} bytes>"


class RequestWriter:
    """Requests as bytes, with ``base_headers`` (Host, User-Agent...) in each."""

    def __init__(self, base_headers: Mapping[str, str]) -> None:
        for name, value in base_headers.items():
            _check_header(name, value)
        self._base = "".join(f"{n}: {v}\r\n" for n, v in base_headers.items())
        self._base_lines = len(base_headers)
        self._names: set[str] = set()  # header names already found to be tokens

    def encode(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes = b""
    ) -> bytes:
        """One request: request line, the base headers, ``headers``, ``Content-Length``
        (whenever there is a body, and for POST and PUT without one), the body.

        :raises ValueError: a method or target that is not one, a header name that is
            not a token, a value with CR, LF or NUL, or text outside ASCII.
        """
        if not _TOKEN.fullmatch(method) or not target.startswith("/"):
            raise ValueError(f"not a valid request: {method!r} {target!r}")
        parts = [method, " ", target, " HTTP/1.1\r\n", self._base]
        names = self._names
        for name, value in headers.items():
            if name not in names:
                _check_header(name, "")
                if len(names) < 1024:
                    names.add(name)
            parts += (name, ": ", value, "\r\n")
        lines = 3 + self._base_lines + len(headers)  # request line, CL, the empty line
        if body or method in ("POST", "PUT"):
            parts.append(f"Content-Length: {len(body)}\r\n\r\n")
        else:
            parts.append("\r\n")
            lines -= 1
        text = "".join(parts)
        # Every line break is one of ours: a CR, LF or NUL in the target or a value would
        # split the request (header injection). One scan of the whole head finds it.
        if text.count("\n") != lines or text.count("\r") != lines or "\x00" in text:
            if _BREAKS.search(target):
                raise ValueError(f"not a valid request target: {target!r}")
            for name, value in headers.items():
                _check_header(name, value)
        try:
            head = text.encode("ascii")
        except UnicodeEncodeError as exc:
            raise ValueError(f"a request header is not ASCII text: {exc}") from None
        return head + body if body else head


def _check_header(name: str, value: str) -> None:
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"header name {name!r} is not an HTTP token")
    if _BREAKS.search(value):
        raise ValueError(f"the value of header {name!r} holds CR, LF or NUL")


# Reading states.
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE = range(8)


class ResponseReader:
    """Reads one response at a time: :meth:`start` it when the request goes out, then
    :meth:`feed` it bytes until it returns the :class:`Response` (and :meth:`eof` when
    the server closes its side)."""

    def __init__(self, *, max_head: int = MAX_HEAD_BYTES, max_body: int = MAX_BODY_BYTES) -> None:
        self._max_head = max_head
        self._max_body = max_body
        self._buffer = bytearray()
        self._state = _IDLE
        self._head_request = False
        self._status = 0
        self._reason = ""
        self._headers: dict[str, str] = {}
        self._keep_alive = True
        self._body = bytearray()
        self._remaining = 0

    @property
    def waiting(self) -> bool:
        """True while a response is expected."""
        return self._state != _IDLE

    def start(self, method: str) -> None:
        """A request was sent: read its response next.

        :raises HttpProtocolError: a response is still expected, or the server sent
            bytes before this request (they cannot be an answer to it).
        """
        if self._state != _IDLE:
            raise HttpProtocolError("a response is still expected: one request at a time")
        if self._buffer:
            raise HttpProtocolError(f"the server sent {len(self._buffer)} bytes unasked")
        self._head_request = method == "HEAD"
        self._state = _HEAD

    def feed(self, data: bytes) -> Response | None:
        """Take ``data``; the response once it is complete, else None.

        :raises HttpProtocolError: malformed, too large, or bytes nobody asked for.
        """
        if self._state == _IDLE:
            if data:
                self._buffer += data
                raise HttpProtocolError(f"the server sent {len(data)} bytes unasked")
            return None
        if self._state == _HEAD and not self._buffer:
            # The usual case: the whole head (often the whole response) in one piece.
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                response = self._read_head(data, end)
                return response if response is not None else self._advance()
        self._buffer += data
        return self._advance()

    def eof(self) -> Response | None:
        """The server closed its side: the response if that completes it (a body read
        to the close), else None (the response is incomplete or was never sent)."""
        if self._state == _UNTIL_CLOSE:
            self._body += self._buffer
            self._buffer.clear()
            return self._finish(keep_alive=False)
        return None

    # -- the states ---------------------------------------------------------------------

    def _advance(self) -> Response | None:
        buffer = self._buffer
        while True:
            state = self._state
            if state == _HEAD:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    start = bytes(buffer[:7])
                    if not _STATUS_START.startswith(start):  # a server that is no HTTP/1
                        raise HttpProtocolError(f"not an HTTP/1.x response: {start!r}...")
                    if len(buffer) > self._max_head:
                        raise HttpProtocolError(
                            f"the response head is larger than {self._max_head} bytes"
                        )
                    return None
                data = bytes(buffer)
                buffer.clear()
                response = self._read_head(data, end)
                if response is not None:
                    return response
            elif state == _LENGTH or state == _CHUNK_DATA:
                take = min(self._remaining, len(buffer))
                self._body += buffer[:take]
                del buffer[:take]
                self._remaining -= take
                if self._remaining:
                    return None
                if state == _LENGTH:
                    return self._finish(self._keep_alive)
                self._state = _CHUNK_END
            elif state == _CHUNK_END:
                if len(buffer) < 2:
                    if bytes(buffer[:1]) not in (b"", b"\r"):
                        raise HttpProtocolError("a chunk's data is not followed by CRLF")
                    return None
                if buffer[:2] != b"\r\n":
                    raise HttpProtocolError("a chunk's data is not followed by CRLF")
                del buffer[:2]
                self._state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > 1024:
                        raise HttpProtocolError("a chunk-size line is longer than 1024 bytes")
                    return None
                line = bytes(buffer[:end]).split(b";", 1)[0].strip(b" \t")
                del buffer[: end + 2]
                if not _CHUNK_SIZE_RE.fullmatch(line):
                    raise HttpProtocolError(f"bad chunk size {line[:20]!r}")
                size = int(line, 16)
                if size == 0:
                    self._state = _TRAILERS
                elif len(self._body) + size > self._max_body:
                    raise HttpProtocolError(
                        f"the response body is larger than {self._max_body} bytes"
                    )
                else:
                    self._remaining = size
                    self._state = _CHUNK_DATA
            elif state == _TRAILERS:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > self._max_head:
                        raise HttpProtocolError("the trailer section is too large")
                    return None
                del buffer[: end + 2]
                if end == 0:  # the empty line that ends the (ignored) trailers
                    return self._finish(self._keep_alive)
            elif state == _UNTIL_CLOSE:
                self._body += buffer
                buffer.clear()
                if len(self._body) > self._max_body:
                    raise HttpProtocolError(
                        f"the response body is larger than {self._max_body} bytes"
                    )
                return None
            else:  # pragma: no cover - _IDLE is handled by feed()
                return None

    def _read_head(self, data: bytes, end: int) -> Response | None:
        """Parse the head that ends at ``end`` of ``data``; what follows goes back to
        the buffer. The response when it is complete already, else None (the state
        says what comes next)."""
        if end > self._max_head:
            raise HttpProtocolError(f"the response head is larger than {self._max_head} bytes")
        lines = data[:end].decode("latin-1").split("\r\n")
        first = lines[0]
        if (
            first[:7] != "HTTP/1."
            or first[7:8] not in ("0", "1")
            or first[8:9] != " "
            or not first[9:12].isdigit()
            or not first[9:12].isascii()
            or first[12:13] not in ("", " ")
        ):
            raise HttpProtocolError(f"not an HTTP/1.x status line: {first[:60]!r}")
        status = int(first[9:12])
        headers: dict[str, str] = {}
        length: str | None = None
        coding: str | None = None
        connection = ""
        known = _LOWER
        for raw in lines[1:]:
            if raw[:1] in (" ", "\t"):
                # obs-fold (RFC 9112 5.2): a recipient replaces it with a space.
                if not headers:
                    raise HttpProtocolError("the first header line starts with whitespace")
                last = next(reversed(headers))
                headers[last] += " " + raw.strip(" \t")
                continue
            name, colon, value = raw.partition(":")
            lowered = known.get(name)
            if lowered is None or not colon:
                if not colon or not _TOKEN.fullmatch(name):
                    raise HttpProtocolError(f"malformed header line {raw[:60]!r}")
                lowered = name.lower()
                if len(known) < 512:
                    known[name] = lowered
            value = value.strip(" \t")
            if name in headers:
                headers[name] += ", " + value
            else:
                headers[name] = value
            if lowered == "content-length":
                length = value if length is None else length + "," + value
            elif lowered == "transfer-encoding":
                coding = value if coding is None else coding + "," + value
            elif lowered == "connection":
                connection += "," + value.lower()
        rest = data[end + 4 :]
        if rest:
            self._buffer[:0] = rest
        if 100 <= status < 200:
            if status == 101:
                raise HttpProtocolError("the server switched protocols (101) unasked")
            return None  # an interim response: the final one follows (state stays _HEAD)
        tokens = {t.strip() for t in connection.split(",")} if connection else set()
        keep_alive = "keep-alive" in tokens if first[7] == "0" else "close" not in tokens
        self._status = status
        self._reason = first[13:]
        self._headers = headers
        self._keep_alive = keep_alive
        self._body = bytearray()
        if self._head_request or status in (204, 304):
            return self._finish(keep_alive)
        if coding is not None:
            if coding.rsplit(",", 1)[-1].strip().lower() == "chunked":
                self._state = _CHUNK_SIZE
            else:  # RFC 9112 6.3 (4): the body ends with the connection
                self._keep_alive = False
                self._state = _UNTIL_CLOSE
        elif length is not None:
            values = {v.strip() for v in length.split(",")}
            size_text = values.pop()
            if values or not size_text.isdigit() or not size_text.isascii():
                raise HttpProtocolError(f"bad Content-Length {length[:40]!r}")
            size = int(size_text)
            if size > self._max_body:
                raise HttpProtocolError(f"the response body of {size} bytes is too large")
            if len(self._buffer) == size:  # the whole body is here (the usual case)
                body = bytes(self._buffer)
                self._buffer.clear()
                return self._finish(keep_alive, body)
            self._remaining = size
            self._state = _LENGTH
        else:
            self._keep_alive = False
            self._state = _UNTIL_CLOSE
        return None

    def _finish(self, keep_alive: bool, body: bytes | None = None) -> Response:
        if self._buffer:
            # More than the response: a server that answers what was not asked.
            keep_alive = False
            self._buffer.clear()
        response = Response(
            self._status,
            self._reason,
            self._headers,
            bytes(self._body) if body is None else body,
            keep_alive,
        )
        self._state = _IDLE
        self._body = bytearray()
        self._headers = {}
        return response
