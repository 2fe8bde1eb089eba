"""TLS session memory: each hardened context remembers the last resumable session of
every server it talked to (by host name and port), so a reconnection resumes it — a
fraction of the handshake's bytes and CPU, which the IoT Hub guidance asks devices to
save.

Sessions are kept as native ``SSL_SESSION`` copies through the OpenSSL shim
(:class:`NativeSession`) and offered through libssl directly. ``SSLSocket.session`` is
read only without the shim: on CPython 3.10-3.11, 3.12 before 3.12.7 and 3.13.0 every
read of it leaks a native SSL_SESSION (about 5 KiB, CPython gh-116810), which in TLS
1.3, where each connection brings a new ticket, meant one leak per handshake. (Keeping
them serialised instead, as an earlier version did, cost a device a quarter of a
millisecond per reconnection: decoding a session parses the server's certificate.)
"""

from __future__ import annotations

import ssl
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..errors import FeatureUnavailableError
from ._openssl import shim
from .info import TlsInfo

__all__ = [
    "NativeSession",
    "Remembered",
    "SessionCache",
    "capture",
    "offer",
    "session_key",
    "session_ticket",
]

#: Servers remembered per context (least recently used first out).
SESSION_CACHE_SIZE = 64
#: Tickets follow the handshake at once; a server that sends none is not asked forever.
TICKET_READS = 16

Key = tuple[str | None, int | None]


class NativeSession:
    """An ``SSL_SESSION*`` of our own (a copy made by the shim), freed with this object.
    It holds the resumption secret: its repr says nothing of it."""

    __slots__ = ("_free", "pointer")

    def __init__(self, pointer: int, free: Callable[[int], None]) -> None:
        self.pointer = pointer
        self._free = free

    def __del__(self) -> None:
        pointer, self.pointer = self.pointer, 0
        if pointer:
            self._free(pointer)

    def __repr__(self) -> str:
        return "<NativeSession>"


class Remembered:
    """A remembered session and the report of the handshake that created it."""

    __slots__ = ("info", "session")

    def __init__(self, session: NativeSession | ssl.SSLSession, info: TlsInfo) -> None:
        # The session (a native copy through the shim, or Python's SSLSession without
        # it). It holds the resumption secret: never in a repr.
        self.session = session
        # A resumed handshake exchanges no certificate: the server's key, the chain
        # and the anchor of a resumed connection are those of this report.
        self.info = info

    def __repr__(self) -> str:
        return f"Remembered(info={self.info!r})"

    @property
    def chain(self) -> tuple[str, ...]:
        return self.info.chain

    @property
    def anchor(self) -> str | None:
        return self.info.anchor


class SessionCache:
    """The sessions of one context, by (server name, port); thread-safe."""

    def __init__(self, size: int = SESSION_CACHE_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[Key, Remembered] = OrderedDict()
        self._lock = threading.Lock()

    def recall(self, key: Key) -> Remembered | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def remember(self, key: Key, entry: Remembered) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def forget(self, key: Key) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def capture(conn: ssl.SSLSocket | ssl.SSLObject, info: TlsInfo) -> Remembered | None:
    """The connection's session, if it is resumable (see the module docstring)."""
    need_ticket = info.version != "TLSv1.2"
    session: NativeSession | ssl.SSLSession | None
    try:
        native = shim("session resumption")
        pointer = native.session_copy(conn, need_ticket=need_ticket)
        session = None if pointer is None else NativeSession(pointer, native.free_session)
    except (FeatureUnavailableError, OSError):
        session = conn.session
        if session is not None and not (session.has_ticket or (not need_ticket and session.id)):
            session = None
    if session is None:
        return None
    return Remembered(session, info)


def offer(conn: ssl.SSLSocket | ssl.SSLObject, remembered: Remembered) -> bool:
    """Offer ``remembered`` on a connection that has not started its handshake."""
    try:
        if isinstance(remembered.session, NativeSession):
            shim("session resumption").offer_session(conn, remembered.session.pointer)
        else:
            conn.session = remembered.session
    except (FeatureUnavailableError, OSError, ValueError):  # ValueError: already started
        return False
    return True


def session_key(conn: Any) -> tuple[str | None, int | None]:
    port: int | None = None
    if isinstance(conn, ssl.SSLSocket):
        try:
            port = int(conn.getpeername()[1])
        except (OSError, IndexError, TypeError, ValueError):
            port = None
    return (conn.server_hostname, port)


def session_ticket(conn: Any) -> bytes | None:
    """The connection's current session ticket, cheaply (None without the shim)."""
    try:
        return shim("session tracking").session_ticket(conn)
    except (FeatureUnavailableError, OSError):
        return None
