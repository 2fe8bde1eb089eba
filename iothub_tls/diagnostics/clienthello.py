"""What a client's TLS ClientHello says before the handshake runs: its ALPN protocol
ids (RFC 7301) and its server name (RFC 6066), read from bytes the front door peeks at
without consuming them — pure, no sockets.

The local hub's front doors use it to tell ``iothub-tls probe`` apart from devices. A probe offers
its refused protocol versions and weak suites on purpose; those handshakes fail before
OpenSSL would ever look at ALPN, so the hub reads the ClientHello itself. ``probe``
names itself with the ALPN protocol id :data:`PROBE_ALPN` in every handshake (and keeps
sending the real host name in SNI, so what it checks is what devices get). ALPN is the
one ClientHello field a client may fill freely without changing what it tests: servers
that do not speak ALPN ignore it, and the local hub never selects it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["PROBE_ALPN", "ClientHello", "parse_client_hello"]

#: The ALPN protocol id ``iothub-tls probe`` offers in every handshake.
PROBE_ALPN = "iothub-tls-probe"

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16


@dataclass(frozen=True)
class ClientHello:
    """The parts of a ClientHello the hub reads."""

    alpn: tuple[str, ...] = ()
    server_name: str | None = None

    @property
    def from_probe(self) -> bool:
        return PROBE_ALPN in self.alpn


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack("!H", self.take(2))[0]
        return value

    def vector(self, length_bytes: int) -> bytes:
        n = self.u8() if length_bytes == 1 else self.u16()
        return self.take(n)


def _handshake_bytes(data: bytes) -> bytes | None:
    """The handshake layer carried by the TLS records at the start of ``data`` (a
    ClientHello may span records); None when the records are not handshake records."""
    out = bytearray()
    pos = 0
    while pos + 5 <= len(data):
        content_type = data[pos]
        if content_type != _HANDSHAKE:
            return None if not out else bytes(out)
        (length,) = struct.unpack("!H", data[pos + 3 : pos + 5])
        out += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(out) >= 4 and len(out) >= 4 + int.from_bytes(out[1:4], "big"):
            break
    return bytes(out)


def parse_client_hello(data: bytes) -> ClientHello | None:
    """Read the ClientHello at the start of ``data`` (the first bytes a client sent).

    :returns: the :class:`ClientHello`, or None when ``data`` does not (yet) hold a whole
        ClientHello — too few bytes, or not TLS at all.
    """
    handshake = _handshake_bytes(data)
    if handshake is None or len(handshake) < 4 or handshake[0] != _CLIENT_HELLO:
        return None
    length = int.from_bytes(handshake[1:4], "big")
    if len(handshake) < 4 + length:
        return None
    body = _Reader(handshake[4 : 4 + length])
    try:
        body.take(2 + 32)  # legacy_version, random
        body.vector(1)  # legacy_session_id
        body.vector(2)  # cipher_suites
        body.vector(1)  # legacy_compression_methods
        if body.pos == len(body.data):
            return ClientHello()  # no extensions at all
        extensions = _Reader(body.vector(2))
        alpn: tuple[str, ...] = ()
        server_name: str | None = None
        while extensions.pos < len(extensions.data):
            kind = extensions.u16()
            ext = _Reader(extensions.vector(2))
            if kind == _EXT_ALPN:
                names = _Reader(ext.vector(2))
                found = []
                while names.pos < len(names.data):
                    found.append(names.vector(1).decode("ascii", "replace"))
                alpn = tuple(found)
            elif kind == _EXT_SERVER_NAME:
                names = _Reader(ext.vector(2))
                while names.pos < len(names.data):
                    name_type = names.u8()
                    name = names.vector(2)
                    if name_type == 0:  # host_name
                        server_name = name.decode("ascii", "replace")
    except ValueError:
        return None
    return ClientHello(alpn=alpn, server_name=server_name)
