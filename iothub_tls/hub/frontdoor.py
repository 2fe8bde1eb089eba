"""A TLS listener for the local hub: accepts TCP, completes the server-side handshake
under the hub's TLS profile, logs what was negotiated (or why it was refused), and
hands each connection to a protocol handler on its own thread."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from ..diagnostics.clienthello import parse_client_hello
from ..errors import AuthenticationError
from ..roots import common_name
from ..tls.info import verified_chain_der
from .log import ConnectionEvent, ConnectionLog, tls_failure_reason
from .profile import HubTlsProfile
from .registry import (
    Device,
    DeviceNotRegisteredError,
    DeviceRegistry,
    TokenSource,
    certificate_thumbprints,
)
from .state import HubState, ReceivedMessage, Telemetry

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "HubFrontDoor",
    "PortInUseError",
    "PrivilegedPortError",
    "TlsFrontDoor",
    "TlsMeta",
]

logger = logging.getLogger("iothub_tls.hub")


class PortInUseError(OSError):
    """The front door cannot listen on its port (taken, or not allowed: see
    :class:`PrivilegedPortError`). ``protocol`` and ``port`` say which."""

    protocol: str = ""
    port: int = 0


class PrivilegedPortError(PortInUseError):
    """The port is privileged (below 1024) and this process may not listen on it."""


@dataclass(frozen=True)
class TlsMeta:
    """What the handshake established about a client."""

    tls_version: str | None
    cipher: str | None
    sni: str | None
    client_cert: bytes | None
    caller: str
    #: The client's certificate chain as TLS verified it (DER, leaf first, ending at the
    #: anchor); just the leaf where the verified chain cannot be read; empty without one.
    client_chain: tuple[bytes, ...] = field(default=(), repr=False)
    #: the client named itself ``iothub-tls probe`` in its ClientHello
    probe: bool = False

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


#: The door's default cap on concurrent connections (handshaking and served).
DEFAULT_MAX_CONNECTIONS = 1000

_SNI_ATTR = "_iothub_frontdoor_sni"
#: accept() errors that mean "out of resources now", not "the listener is gone".
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def _record_sni(context: ssl.SSLContext) -> None:
    """Remember the SNI each client sent on its own socket (Python exposes it only in
    the callback) — also for handshakes that then fail."""
    if getattr(context, "_iothub_sni_recording", False):
        return
    previous = context.sni_callback

    def callback(conn: Any, name: str | None, ctx: ssl.SSLContext) -> int | None:
        with contextlib.suppress(TypeError):  # an object without a __dict__
            vars(conn)[_SNI_ATTR] = name
        return previous(conn, name, ctx) if previous else None  # type: ignore[arg-type]

    context.sni_callback = callback
    context._iothub_sni_recording = True  # type: ignore[attr-defined]


def _sni(tls: ssl.SSLSocket) -> str | None:
    found = vars(tls).get(_SNI_ATTR)
    return found if isinstance(found, str) else None


@dataclass
class _Handshake:
    """A connection whose TLS handshake is in progress on the accept thread."""

    tls: ssl.SSLSocket
    caller: str
    deadline: float
    events: int = selectors.EVENT_READ
    #: the ClientHello was looked at (once, before OpenSSL reads it)
    hello_read: bool = False
    probe: bool = False


class TlsFrontDoor:
    """Base class: subclasses implement :meth:`serve_connection`.

    One thread accepts connections and runs their TLS handshakes, non-blocking, each
    under one deadline (``handshake_timeout`` for the whole handshake, however slowly
    the client sends); a connection gets its own thread for :meth:`serve_connection`
    only once its handshake is complete. At most ``max_connections`` connections
    (handshaking or served) are open at once: the next one is closed as soon as it is
    accepted, before any TLS, and logged as refused.
    """

    protocol = "Tls"

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log: ConnectionLog | None = None,
        handshake_timeout: float = 10.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise TypeError("max_connections must be an int")
        if max_connections < 1:
            raise ValueError(f"max_connections must be a whole number >= 1, not {max_connections}")
        _record_sni(context)
        self.context = context
        self.host = host
        self.requested_port = port
        self.log = log or ConnectionLog()
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        #: connections being served (their handshake is done), each on its thread
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._handshakes: dict[int, _Handshake] = {}  # the accept thread's alone
        self._open_count = 0  # handshaking + served; changed under _lock

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the front door is not started")
        return int(self._listener.getsockname()[1])

    @property
    def open_connections(self) -> int:
        """Connections open now: TLS handshakes in progress and connections served."""
        with self._lock:
            return self._open_count

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host, self.requested_port))
        except OSError as exc:
            listener.close()
            raise self._bind_error(exc) from exc
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name=f"{self.protocol}-accept", daemon=True
        )
        self._thread.start()

    def _bind_error(self, exc: OSError) -> PortInUseError:
        port = self.requested_port
        where = f"cannot listen on {self.host}:{port} for {self.protocol}"
        error: PortInUseError
        if exc.errno in (errno.EACCES, errno.EPERM) and 0 < port < 1024:
            error = PrivilegedPortError(
                exc.errno,
                f"{where}: port {port} is privileged (below 1024) and this user may not "
                "listen on it. Choose a port from 1024 up (0 = any free port), or run as "
                "root or with the CAP_NET_BIND_SERVICE capability",
            )
        else:
            error = PortInUseError(
                exc.errno,
                f"{where}: {exc.strerror}. Choose another port (0 = any free port) or stop "
                "what uses it",
            )
        error.protocol, error.port = self.protocol, port
        return error

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)  # it closes the listener and the handshakes in progress
            self._thread = None
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._lock:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
        self._listener = None

    def __enter__(self) -> TlsFrontDoor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the accept thread: accept, refuse beyond the cap, handshake ---------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, None)
        paused_until: float | None = None  # accepting paused: out of file descriptors
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                if paused_until is not None and now >= paused_until:
                    selector.register(listener, selectors.EVENT_READ, None)
                    paused_until = None
                wait = 0.2
                for hs in self._handshakes.values():
                    wait = min(wait, hs.deadline - now)
                if paused_until is not None:
                    wait = min(wait, paused_until - now)
                for key, _ in selector.select(max(wait, 0.0)):
                    if key.data is None:
                        if not self._accept(listener, selector):
                            selector.unregister(listener)
                            paused_until = time.monotonic() + 0.1
                    else:
                        self._handshake(selector, key.data)
                self._expire(selector, time.monotonic())
        finally:
            for hs in list(self._handshakes.values()):
                self._drop(selector, hs, None)
            selector.close()
            with contextlib.suppress(OSError):
                listener.close()

    def _accept(self, listener: socket.socket, selector: selectors.BaseSelector) -> bool:
        """Accept what is waiting; False when out of file descriptors (pause a little:
        the backlog keeps the rest, and closing connections frees descriptors)."""
        for _ in range(64):
            try:
                raw, address = listener.accept()
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    logger.warning(
                        "%s door: out of file descriptors (%s) with %d connections open; "
                        "raise the open-file limit (ulimit -n) or lower max_connections",
                        self.protocol,
                        exc.strerror,
                        self.open_connections,
                    )
                    return False
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue  # that client gave up while queued
                raise
            caller = f"{address[0]}:{address[1]}"
            with self._lock:
                admitted = self._open_count < self.max_connections
                if admitted:
                    self._open_count += 1
                held = self._open_count
            if not admitted:
                # Closed before any TLS: no thread, no handshake, no OpenSSL state.
                raw.close()
                self.log.emit(
                    ConnectionEvent(
                        "deviceConnect",
                        self.protocol,
                        "Failure",
                        reason=(
                            f"refused: the door already holds {held} connections "
                            f"(max_connections={self.max_connections}); closed before the "
                            "TLS handshake"
                        ),
                        caller=caller,
                    )
                )
                continue
            try:
                raw.setblocking(False)
                tls = self.context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            except (OSError, ssl.SSLError) as exc:
                raw.close()
                self._closed()
                self._handshake_failed(None, caller, tls_failure_reason(exc))
                continue
            hs = _Handshake(tls, caller, time.monotonic() + self.handshake_timeout)
            self._handshakes[tls.fileno()] = hs
            selector.register(tls, hs.events, hs)
        return True

    @staticmethod
    def _read_hello(hs: _Handshake) -> None:
        """Peek at the ClientHello before OpenSSL consumes it: a handshake that
        ``iothub-tls probe`` makes says so there (and may fail before OpenSSL would look
        at it). Read once, on the first bytes; a ClientHello that arrives in pieces is
        taken as a device's."""
        try:
            # The plain socket's recv: SSLSocket.recv takes no flags. MSG_PEEK leaves the
            # bytes for OpenSSL.
            data = socket.socket.recv(hs.tls, 16384, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        hs.hello_read = True
        hello = parse_client_hello(data) if data else None
        hs.probe = hello is not None and hello.from_probe

    def _handshake(self, selector: selectors.BaseSelector, hs: _Handshake) -> None:
        if not hs.hello_read:
            self._read_hello(hs)
        try:
            hs.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._wait_for(selector, hs, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._wait_for(selector, hs, selectors.EVENT_WRITE)
            return
        except (OSError, ssl.SSLError) as exc:
            self._drop(selector, hs, tls_failure_reason(exc))
            return
        self._handshakes.pop(hs.tls.fileno(), None)
        selector.unregister(hs.tls)
        tls = hs.tls
        try:
            tls.setblocking(True)
            tls.settimeout(self.handshake_timeout)  # until the protocol sets its own
            cipher = tls.cipher()
            leaf = tls.getpeercert(binary_form=True)
            meta = TlsMeta(
                tls_version=tls.version(),
                cipher=cipher[0] if cipher else None,
                sni=_sni(tls),
                client_cert=leaf,
                caller=hs.caller,
                client_chain=tuple(verified_chain_der(tls) or [leaf]) if leaf else (),
                probe=hs.probe,
            )
            with self._lock:
                self._connections.add(tls)
            threading.Thread(
                target=self._serve, args=(tls, meta), name=f"{self.protocol}-conn", daemon=True
            ).start()
        except (OSError, RuntimeError) as exc:  # e.g. no thread can be started
            logger.warning("%s connection from %s not served: %s", self.protocol, hs.caller, exc)
            with self._lock:
                self._connections.discard(tls)
            tls.close()
            self._closed()

    @staticmethod
    def _wait_for(selector: selectors.BaseSelector, hs: _Handshake, events: int) -> None:
        if events != hs.events:
            hs.events = events
            selector.modify(hs.tls, events, hs)

    def _expire(self, selector: selectors.BaseSelector, now: float) -> None:
        for hs in [h for h in self._handshakes.values() if h.deadline <= now]:
            self._drop(
                selector,
                hs,
                f"TLS handshake failed: not completed within {self.handshake_timeout:g} s",
            )

    def _drop(self, selector: selectors.BaseSelector, hs: _Handshake, reason: str | None) -> None:
        """End a handshake in progress; log why (None: the door is stopping)."""
        self._handshakes.pop(hs.tls.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(hs.tls)
        sni = _sni(hs.tls)
        hs.tls.close()
        self._closed()
        if reason is not None:
            self._handshake_failed(sni, hs.caller, reason, probe=hs.probe)

    def _handshake_failed(
        self, sni: str | None, caller: str, reason: str, *, probe: bool = False
    ) -> None:
        self.log.emit(
            ConnectionEvent(
                "deviceConnect",
                self.protocol,
                "Failure",
                sni=sni,
                reason=reason,
                caller=caller,
                probe=probe,
            )
        )

    def _closed(self) -> None:
        with self._lock:
            self._open_count -= 1

    # -- a connection's thread ------------------------------------------------------------

    def _serve(self, tls: ssl.SSLSocket, meta: TlsMeta) -> None:
        try:
            self.serve_connection(tls, meta)
        except Exception:  # a handler bug must not kill the listener
            logger.exception("%s connection from %s failed", self.protocol, meta.caller)
        finally:
            with contextlib.suppress(OSError):
                tls.close()
            with self._lock:
                self._connections.discard(tls)
                self._open_count -= 1

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
                probe=meta.probe,
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
                probe=meta.probe,
            )
        )


class HubFrontDoor(TlsFrontDoor):
    """A protocol front door of the local hub: the hub's TLS profile, its device
    registry and its shared state (telemetry, cloud-to-device queues), so a message
    queued for a device reaches it whichever protocol it uses.

    :param port: 0 picks a free port; read :attr:`port` after :meth:`start`. After
        :meth:`stop`, :meth:`start` listens on the same port again.
    :param on_connection: called with each of this door's connection events, on the
        connection's thread; exceptions are logged and ignored.
    :param max_connections: connections (TLS handshakes in progress and connections
        served) open at once; the next is closed before TLS and logged as refused.
    """

    #: Where this door's devices put their SAS token (subclasses set it).
    token_source = TokenSource.AUTHORIZATION_HEADER

    def __init__(
        self,
        profile: HubTlsProfile,
        registry: DeviceRegistry,
        state: HubState | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log: ConnectionLog | None = None,
        on_connection: Callable[[ConnectionEvent], None] | None = None,
        handshake_timeout: float = 10.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if not isinstance(profile, HubTlsProfile):
            raise TypeError(f"profile must be a HubTlsProfile, not {type(profile).__name__}")
        if not isinstance(registry, DeviceRegistry):
            raise TypeError(f"registry must be a DeviceRegistry, not {type(registry).__name__}")
        super().__init__(
            profile.server_context(),
            host=host,
            port=port,
            log=log,
            handshake_timeout=handshake_timeout,
            max_connections=max_connections,
        )
        self.profile = profile
        self.registry = registry
        self.state = state or HubState()
        self._received_lock = threading.Lock()
        self._received: list[ReceivedMessage] = []
        if on_connection is not None:
            self.add_connection_listener(on_connection)

    def start(self) -> None:
        """Bind and serve in background threads (again on the same port after a stop)."""
        super().start()
        self.requested_port = self.port
        logger.info(
            "%s endpoint on %s:%d, %s",
            self.protocol,
            self.host,
            self.port,
            self.profile.describe(),
        )

    @property
    def running(self) -> bool:
        return self._listener is not None

    def enqueue_c2d(
        self,
        device_id: str,
        payload: bytes | str,
        properties: Mapping[str, str] | None = None,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> str:
        """Queue a cloud-to-device message in the hub's state; returns its message id.

        :raises DeviceNotRegisteredError: for a device the registry does not hold.
        """
        if self.registry.get(device_id) is None:
            raise DeviceNotRegisteredError(
                f"device {device_id!r} is not registered: add it to the registry first"
            )
        body = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        message = self.state.enqueue_c2d(
            device_id,
            body,
            dict(properties or {}),
            message_id=message_id,
            correlation_id=correlation_id,
        )
        return message.message_id

    @property
    def received(self) -> tuple[ReceivedMessage, ...]:
        """Telemetry accepted by this door so far, oldest first."""
        with self._received_lock:
            return tuple(self._received)

    def accept_telemetry(self, received: ReceivedMessage, telemetry: Telemetry) -> None:
        """Record a device-to-cloud message: in this door's list and the hub's state."""
        with self._received_lock:
            self._received.append(received)
        self.state.record_telemetry(telemetry)

    def authenticate_sas(self, device_id: str, token: str, *, now: float | None = None) -> Device:
        """The registered device a SAS token authenticates (refusals name where this
        door's devices put their token: :attr:`token_source`).

        :raises AuthenticationError: saying which check failed.
        :raises DeviceNotRegisteredError: for a valid policy token and an unknown device.
        """
        return self.registry.verify_sas(device_id, token, now=now, source=self.token_source)

    def authenticate_certificate(self, meta: TlsMeta, device_id: str | None = None) -> Device:
        """The registered device that the client's certificate chain authenticates — the
        one answer every door uses.

        :param device_id: the device the client claims to be (MQTT client id, HTTPS
            path, AMQP link address); its certificate must identify that device. None
            (AMQP SASL EXTERNAL): the device is the one whose thumbprint is registered,
            else the one named by the certificate's subject CN.
        :raises AuthenticationError: saying why the chain does not identify the device.
        """
        chain = meta.client_chain
        if device_id is None:
            if not chain:
                raise AuthenticationError("no device certificate was presented in TLS")
            sha1, sha256 = certificate_thumbprints(chain[0])
            device_id = next(
                (
                    d.device_id
                    for d in self.registry.devices
                    if sha1 in d.thumbprints or sha256 in d.thumbprints
                ),
                None,
            ) or _subject_cn(chain[0])
            if not device_id or self.registry.get(device_id) is None:
                raise AuthenticationError(
                    f"no registered device has the certificate presented (SHA-256 "
                    f"thumbprint {sha256}, CN {_subject_cn(chain[0])!r})"
                )
        # The verified chain (leaf, intermediates, anchor) lets the registry link a
        # CA-signed leaf to a registered root through the intermediate the device sent.
        return self.registry.verify_certificate(device_id, chain, source=self.token_source)

    @property
    def connections(self) -> tuple[ConnectionEvent, ...]:
        """This door's events in the connection log."""
        return tuple(e for e in list(self.log.events) if e.protocol == self.protocol)

    def add_connection_listener(self, callback: Callable[[ConnectionEvent], None]) -> None:
        """Call ``callback`` with every connection event of this door."""

        def listener(event: ConnectionEvent) -> None:
            if event.protocol != self.protocol:
                return
            try:
                callback(event)
            except Exception:  # a broken log sink must not break the endpoint
                logger.exception("connection listener %r failed", callback)

        self.log.subscribe(listener)


def _subject_cn(der: bytes) -> str:
    return common_name(x509.load_der_x509_certificate(der))
