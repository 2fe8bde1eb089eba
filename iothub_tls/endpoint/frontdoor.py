"""A TLS listener for the local hub: accepts TCP, completes the server-side handshake
under the hub's TLS profile, logs what was negotiated (or why it was refused), and
hands each connection to a protocol handler on its own thread."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any

from .log import ConnectionEvent, ConnectionLog, tls_failure_reason

__all__ = ["PortInUseError", "TlsFrontDoor", "TlsMeta"]

logger = logging.getLogger("iothub_tls.endpoint")


class PortInUseError(OSError):
    """The front door's port is taken."""


@dataclass(frozen=True)
class TlsMeta:
    """What the handshake established about a client."""

    tls_version: str | None
    cipher: str | None
    sni: str | None
    client_cert: bytes | None
    caller: str

    @property
    def thumbprint(self) -> str | None:
        """SHA-1 of the client certificate, uppercase hex (how IoT Hub registers it)."""
        if not self.client_cert:
            return None
        return hashlib.sha1(self.client_cert, usedforsecurity=False).hexdigest().upper()

    @property
    def thumbprint_sha256(self) -> str | None:
        if not self.client_cert:
            return None
        return hashlib.sha256(self.client_cert).hexdigest().upper()


_handshake_state = threading.local()


def _record_sni(context: ssl.SSLContext) -> None:
    """Remember the SNI each client sent (Python exposes it only in the callback, which
    runs on the thread doing the handshake) — also for handshakes that then fail."""
    if getattr(context, "_iothub_sni_recording", False):
        return
    previous = context.sni_callback

    def callback(conn: Any, name: str | None, ctx: ssl.SSLContext) -> int | None:
        _handshake_state.sni = name
        return previous(conn, name, ctx) if previous else None  # type: ignore[arg-type]

    context.sni_callback = callback
    context._iothub_sni_recording = True  # type: ignore[attr-defined]


class TlsFrontDoor:
    """Base class: subclasses implement :meth:`serve_connection`."""

    protocol = "Tls"

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log: ConnectionLog | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        _record_sni(context)
        self.context = context
        self.host = host
        self.requested_port = port
        self.log = log or ConnectionLog()
        self.handshake_timeout = handshake_timeout
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the front door is not started")
        return int(self._listener.getsockname()[1])

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host, self.requested_port))
        except OSError as exc:
            listener.close()
            raise PortInUseError(
                exc.errno,
                f"cannot listen on {self.host}:{self.requested_port} for {self.protocol}: "
                f"{exc.strerror}. Choose another port (0 = any free port) or stop what uses it",
            ) from exc
        listener.listen(64)
        listener.settimeout(0.2)
        self._listener = listener
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"{self.protocol}-accept", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
        if self._thread is not None:
            self._thread.join(5)
        self._listener = None

    def __enter__(self) -> TlsFrontDoor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        while not self._stopping.is_set():
            try:
                raw, address = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(
                target=self._handle, args=(raw, address), name=f"{self.protocol}-conn", daemon=True
            ).start()

    def _handle(self, raw: socket.socket, address: Any) -> None:
        caller = f"{address[0]}:{address[1]}"
        with self._lock:
            self._connections.add(raw)
        try:
            raw.settimeout(self.handshake_timeout)
            _handshake_state.sni = None
            try:
                tls = self.context.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                self.log.emit(
                    ConnectionEvent(
                        "deviceConnect",
                        self.protocol,
                        "Failure",
                        sni=_handshake_state.sni,
                        reason=tls_failure_reason(exc),
                        caller=caller,
                    )
                )
                return
            cipher = tls.cipher()
            meta = TlsMeta(
                tls_version=tls.version(),
                cipher=cipher[0] if cipher else None,
                sni=_handshake_state.sni,
                client_cert=tls.getpeercert(binary_form=True),
                caller=caller,
            )
            with self._lock:
                self._connections.discard(raw)
                self._connections.add(tls)
            try:
                self.serve_connection(tls, meta)
            except Exception:  # a handler bug must not kill the listener
                logger.exception("%s connection from %s failed", self.protocol, caller)
            finally:
                with contextlib.suppress(OSError):
                    tls.close()
                with self._lock:
                    self._connections.discard(tls)
        finally:
            with self._lock:
                self._connections.discard(raw)
            raw.close()

    def serve_connection(self, tls: ssl.SSLSocket, meta: TlsMeta) -> None:
        raise NotImplementedError

    def connected(
        self, meta: TlsMeta, device_id: str | None, *, success: bool, reason: str | None = None
    ) -> None:
        """Log the outcome of a connection attempt (after authentication)."""
        self.log.emit(
            ConnectionEvent(
                "deviceConnect",
                self.protocol,
                "Success" if success else "Failure",
                device_id=device_id,
                tls_version=meta.tls_version,
                cipher=meta.cipher,
                sni=meta.sni,
                client_cert_thumbprint=meta.thumbprint,
                reason=reason,
                caller=meta.caller,
            )
        )

    def disconnected(self, meta: TlsMeta, device_id: str | None, reason: str | None = None) -> None:
        self.log.emit(
            ConnectionEvent(
                "deviceDisconnect",
                self.protocol,
                "Success",
                device_id=device_id,
                tls_version=meta.tls_version,
                cipher=meta.cipher,
                sni=meta.sni,
                client_cert_thumbprint=meta.thumbprint,
                reason=reason,
                caller=meta.caller,
            )
        )
