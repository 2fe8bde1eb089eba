"""A TCP proxy on loopback that puts network faults between a client and a server.

``FaultProxy(target_port)`` listens on ``127.0.0.1:proxy.port`` and forwards every
connection it accepts to ``127.0.0.1:target_port`` (``target_port`` may be changed
between connections). One thread runs every connection with non-blocking sockets, so a
fault is applied between two reads or writes of the same thread and has happened when
the method that asked for it returns.

Faults on the connections that are live when they are called:

* :meth:`cut` — an orderly loss: both sides get FIN (EOF), pending bytes are dropped.
* :meth:`reset` — an abortive loss: both sides get a TCP RST (``SO_LINGER`` 0, then
  close), as when a middlebox tears the connection down.
* :meth:`reset_on_next_request` — the connection looks alive until the client sends on
  it; those bytes are not forwarded and the answer is a RST. That is what a device sees
  when a NAT or load balancer forgot its idle pooled connection.
* :meth:`flip_next` — one byte of the next chunk the server sends is inverted (a
  corrupted TLS record: the client's MAC/AEAD check fails).

Faults on connections that are yet to come:

* :meth:`drop_handshakes` — the next ``count`` connections are reset once the server has
  sent ``after`` bytes to the client (the middle of the TLS handshake).
* ``refusing`` — new connections are closed at once (the client sees EOF).
* ``muted`` — what the server sends is swallowed (acknowledgements get lost); the
  bytes are counted in ``swallowed``.

Counters: ``accepted`` (connections accepted), ``faults`` (connections ended by a
fault: cut, reset, drop), ``live`` (connections open now).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FaultProxy"]

_CHUNK = 65536


@dataclass(eq=False)
class _Link:
    client: socket.socket
    upstream: socket.socket
    to_client: bytearray = field(default_factory=bytearray)
    to_upstream: bytearray = field(default_factory=bytearray)
    client_eof: bool = False  # the client sent FIN
    upstream_eof: bool = False  # the server sent FIN
    down_bytes: int = 0  # bytes the server sent so far
    drop_after: int | None = None  # reset once the server sent this many bytes
    reset_on_request: bool = False  # reset when the client sends anything
    abort_when_flushed: bool = False  # reset once to_client has been delivered


def _abort(sock: socket.socket) -> None:
    """Close with a RST instead of a FIN (linger on, timeout 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class FaultProxy:
    """See the module docstring."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refusing = False
        self.muted = False
        self.swallowed = 0
        self.accepted = 0
        self.faults = 0
        self._links: list[_Link] = []
        self._flip: int | None = None
        self._drops: deque[int] = deque()
        self._commands: deque[tuple[Callable[[], None], threading.Event]] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._loop, name="fault-proxy", daemon=True)
        self._thread.start()

    # -- faults (any thread) -------------------------------------------------------------

    def cut(self) -> None:
        """Drop every live connection with FIN on both sides."""
        self._run(lambda: self._end_all(_shut))

    def reset(self) -> None:
        """Drop every live connection with a RST on both sides."""
        self._run(lambda: self._end_all(_abort))

    def reset_on_next_request(self) -> None:
        """Reset each live connection when its client next sends something."""

        def arm() -> None:
            for link in self._links:
                link.reset_on_request = True

        self._run(arm)

    def flip_next(self, position: int = -1) -> None:
        """Invert the byte at ``position`` (negative: from the end) of the next chunk the
        server sends on any connection."""

        def arm() -> None:
            self._flip = position

        self._run(arm)

    def drop_handshakes(self, after: int, count: int = 1) -> None:
        """Reset each of the next ``count`` new connections once the server has sent
        ``after`` bytes to its client."""

        def arm() -> None:
            self._drops.extend([after] * count)

        self._run(arm)

    @property
    def live(self) -> int:
        with self._lock:
            return len(self._links)

    def close(self) -> None:
        """Stop accepting, drop every connection (FIN) and stop the thread."""
        if self._closed:
            return
        self._run(lambda: self._end_all(_shut))
        self._closed = True
        self._wake()
        self._thread.join(5)
        self._listener.close()
        self._wake_w.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the proxy's thread and wait until it has run."""
        if self._closed:
            return
        done = threading.Event()
        with self._lock:
            self._commands.append((fn, done))
        self._wake()
        if not done.wait(5):
            raise RuntimeError("the fault proxy's thread did not answer")

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- the thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        sel = self._selector
        sel.register(self._listener, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._closed:
                self._watch()
                for key, mask in sel.select(1.0):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    else:
                        link, side = key.data
                        if link in self._links:
                            self._service(link, side, mask)
                self._commands_now()
        finally:
            self._end_all(_shut)
            sel.close()
            self._wake_r.close()

    def _commands_now(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, deque()
        for fn, done in commands:
            try:
                fn()
            finally:
                done.set()

    def _watch(self) -> None:
        """(Re)register each socket for what it needs now."""
        for link in list(self._links):
            for side, sock, pending, eof in (
                ("client", link.client, link.to_client, link.client_eof),
                ("upstream", link.upstream, link.to_upstream, link.upstream_eof),
            ):
                mask = 0 if eof else selectors.EVENT_READ
                if pending:
                    mask |= selectors.EVENT_WRITE
                try:
                    key: Any = self._selector.get_key(sock)
                except KeyError:
                    key = None
                if mask == 0:
                    if key is not None:
                        self._selector.unregister(sock)
                elif key is None:
                    self._selector.register(sock, mask, (link, side))
                elif key.events != mask:
                    self._selector.modify(sock, mask, (link, side))

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        self.accepted += 1
        if self.refusing:
            _shut(client)
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            _shut(client)
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(client, upstream)
        if self._drops:
            link.drop_after = self._drops.popleft()
        with self._lock:
            self._links.append(link)

    def _service(self, link: _Link, side: str, mask: int) -> None:
        sock = link.client if side == "client" else link.upstream
        try:
            if mask & selectors.EVENT_WRITE:
                pending = link.to_client if side == "client" else link.to_upstream
                sent = sock.send(pending)
                del pending[:sent]
            if mask & selectors.EVENT_READ:
                data = sock.recv(_CHUNK)
                if side == "client":
                    self._from_client(link, data)
                else:
                    self._from_server(link, data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._end(link, _abort)  # one side reset: so does the other
            return
        if link in self._links:
            self._half_close(link)

    def _from_client(self, link: _Link, data: bytes) -> None:
        if not data:
            link.client_eof = True
        elif link.reset_on_request:
            self.faults += 1
            self._end(link, _abort)
        else:
            link.to_upstream += data

    def _from_server(self, link: _Link, data: bytes) -> None:
        if not data:
            link.upstream_eof = True
            return
        if self.muted:
            self.swallowed += len(data)
            return
        if self._flip is not None:
            chunk = bytearray(data)
            chunk[self._flip] ^= 0xFF
            data, self._flip = bytes(chunk), None
        if link.drop_after is not None and link.down_bytes + len(data) >= link.drop_after:
            data = data[: link.drop_after - link.down_bytes]
            link.abort_when_flushed = True
            link.upstream_eof = True  # read nothing more from the server
        link.down_bytes += len(data)
        link.to_client += data

    def _half_close(self, link: _Link) -> None:
        """Pass a FIN on once what came before it was delivered; end the link when both
        directions are done."""
        if link.abort_when_flushed and not link.to_client:
            self.faults += 1
            self._end(link, _abort)
            return
        if link.upstream_eof and not link.to_client:
            with contextlib.suppress(OSError):
                link.client.shutdown(socket.SHUT_WR)
        if link.client_eof and not link.to_upstream:
            with contextlib.suppress(OSError):
                link.upstream.shutdown(socket.SHUT_WR)
        if link.upstream_eof and link.client_eof and not link.to_client and not link.to_upstream:
            self._end(link, _shut)

    def _end(self, link: _Link, how: Callable[[socket.socket], None]) -> None:
        with self._lock:
            if link not in self._links:
                return
            self._links.remove(link)
        for sock in (link.client, link.upstream):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            how(sock)

    def _end_all(self, how: Callable[[socket.socket], None]) -> None:
        with self._lock:
            links = list(self._links)
        for link in links:
            self.faults += 1
            self._end(link, how)
