"""A TLS listener for the local hub: accepts TCP, completes the server-side handshake
under the hub's TLS profile, logs what was negotiated (or why it was refused), and hands
each connection to its protocol's session — all on the hub's one event loop
(:class:`~.loop.HubLoop`), without a thread per connection."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from typing import Any

from cryptography import x509

from ..errors import AuthenticationError
from ..roots import common_name
from .log import ConnectionEvent, ConnectionLog
from .loop import HubLoop
from .profile import HubTlsProfile
from .registry import (
    Device,
    DeviceNotRegisteredError,
    DeviceRegistry,
    TokenSource,
    certificate_thumbprints,
)
from .state import HubState, ReceivedMessage, Telemetry
from .stream import _SNI_ATTR, Phase, Session, TlsMeta, TlsStream, sni_of

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


#: The door's default cap on concurrent connections (handshaking and served).
DEFAULT_MAX_CONNECTIONS = 1000

#: accept() errors that mean "out of resources now", not "the listener is gone".
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
#: connections taken from the backlog in one turn of the loop
_ACCEPT_BATCH = 64
#: how long accepting pauses when out of file descriptors
_EXHAUSTED_PAUSE = 0.1


def _record_sni(context: ssl.SSLContext) -> None:
    """Remember the SNI each client sent on its own TLS object (Python exposes it only
    in the callback) — also for handshakes that then fail."""
    if getattr(context, "_iothub_sni_recording", False):
        return
    previous = context.sni_callback

    def callback(conn: Any, name: str | None, ctx: ssl.SSLContext) -> int | None:
        with contextlib.suppress(TypeError):  # an object without a __dict__
            vars(conn)[_SNI_ATTR] = name
        return previous(conn, name, ctx) if previous else None  # type: ignore[arg-type]

    context.sni_callback = callback
    context._iothub_sni_recording = True  # type: ignore[attr-defined]


class TlsFrontDoor:
    """Base class: subclasses implement :meth:`open_session`.

    The door runs on a :class:`~.loop.HubLoop` — the hub's (``hub_loop``), or one of its
    own started by :meth:`start` — where it accepts connections and runs their TLS
    handshakes, each under one deadline (``handshake_timeout`` for the whole handshake,
    however slowly the client sends); once a handshake is complete, the connection's
    bytes go to the session :meth:`open_session` returns, on the same loop. At most
    ``max_connections`` connections (handshaking or served) are open at once: the next
    one is closed as soon as it is accepted, before any TLS, and logged as refused.
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
        hub_loop: HubLoop | None = None,
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
        #: the loop the door runs on (its own when none is given: started by start())
        self.io = hub_loop or HubLoop(name=f"iothub-tls-hub-{self.protocol.lower()}")
        self._own_loop = hub_loop is None
        self._listener: socket.socket | None = None
        self._paused: asyncio.TimerHandle | None = None
        # The loop thread's alone:
        self._streams: set[TlsStream] = set()
        self._open_count = 0  # handshaking + served (read from any thread)

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the front door is not started")
        return int(self._listener.getsockname()[1])

    @property
    def open_connections(self) -> int:
        """Connections open now: TLS handshakes in progress and connections served."""
        return self._open_count

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host, self.requested_port))
        except OSError as exc:
            listener.close()
            raise self._bind_error(exc) from exc
        listener.listen(1024)
        listener.setblocking(False)
        self._listener = listener
        try:
            if self._own_loop:
                self.io.start()
            self.io.call(self._listen, listener)
        except BaseException:
            self._listener = None
            listener.close()
            raise

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
        """Close the listener and every connection (handshakes in progress are dropped
        without a log line; sessions log their end)."""
        listener, self._listener = self._listener, None
        if listener is not None and self.io.running:
            # (concurrent.futures.TimeoutError is TimeoutError from Python 3.11 on)
            with contextlib.suppress(RuntimeError, TimeoutError, concurrent.futures.TimeoutError):
                self.io.run(self._shutdown(listener), timeout=15)
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.close()
        if self._own_loop:
            self.io.stop()

    async def _shutdown(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        loop.remove_reader(listener.fileno())
        listener.close()
        stopping = ConnectionAbortedError("the hub stopped")
        for stream in list(self._streams):
            stream.abort(stopping)
        await self._until_gone(set(self._streams), 5.0)

    async def _until_gone(self, streams: set[TlsStream], timeout: float) -> None:
        """Wait (on the loop) until none of ``streams`` is open any more."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while streams & self._streams and loop.time() < deadline:
            await asyncio.sleep(0.01)

    def __enter__(self) -> TlsFrontDoor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- on the loop: accept, refuse beyond the cap, start the handshake ---------------------

    def _listen(self, listener: socket.socket) -> None:
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener)

    def _accept(self, listener: socket.socket) -> None:
        """Accept what is waiting (a batch per turn of the loop); out of file
        descriptors, pause a little: the backlog keeps the rest, and closing connections
        frees descriptors."""
        loop = asyncio.get_running_loop()
        for _ in range(_ACCEPT_BATCH):
            try:
                raw, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    logger.warning(
                        "%s door: out of file descriptors (%s) with %d connections open; "
                        "raise the open-file limit (ulimit -n) or lower max_connections",
                        self.protocol,
                        exc.strerror,
                        self.open_connections,
                    )
                    loop.remove_reader(listener.fileno())
                    self._paused = loop.call_later(_EXHAUSTED_PAUSE, self._resume, listener)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # that client gave up while queued
                logger.error("%s door: accept failed: %s", self.protocol, exc)
                loop.remove_reader(listener.fileno())
                return
            self._admit(loop, raw, f"{address[0]}:{address[1]}")

    def _resume(self, listener: socket.socket) -> None:
        self._paused = None
        if self._listener is listener:
            self._listen(listener)

    def _admit(self, loop: asyncio.AbstractEventLoop, raw: socket.socket, caller: str) -> None:
        if self._open_count >= self.max_connections:
            # Closed before any TLS: no handshake, no OpenSSL state.
            raw.close()
            self.log.emit(
                ConnectionEvent(
                    "deviceConnect",
                    self.protocol,
                    "Failure",
                    reason=(
                        f"refused: the door already holds {self._open_count} connections "
                        f"(max_connections={self.max_connections}); closed before the "
                        "TLS handshake"
                    ),
                    caller=caller,
                )
            )
            return
        try:
            # Small MQTT/AMQP frames go out at once, not after Nagle's delay.
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setblocking(False)
            stream = TlsStream(self, caller, loop.time() + self.handshake_timeout)
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            self._handshake_failed(None, caller, f"TLS handshake failed: {exc}")
            return
        self._open_count += 1
        self._streams.add(stream)
        task = loop.create_task(loop.connect_accepted_socket(lambda: stream, raw))
        task.add_done_callback(lambda done: self._attached(done, stream, raw))

    def _attached(self, task: asyncio.Task[Any], stream: TlsStream, raw: socket.socket) -> None:
        if not task.cancelled() and task.exception() is None:
            return
        if stream.transport is None:  # never reached the loop's transport
            raw.close()
            self.stream_ended(stream)

    # -- what streams report ----------------------------------------------------------------

    def stream_established(self, stream: TlsStream, meta: TlsMeta) -> Session:
        return self.open_session(stream, meta)

    def stream_failed(self, stream: TlsStream, reason: str) -> None:
        self._handshake_failed(sni_of(stream.tls), stream.caller, reason, probe=stream.probe)

    def stream_ended(self, stream: TlsStream) -> None:
        if stream in self._streams:
            self._streams.discard(stream)
            self._open_count -= 1

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

    def served_streams(self) -> list[TlsStream]:
        """Connections past their handshake (on the loop)."""
        return [s for s in self._streams if s.phase is Phase.OPEN]

    def open_session(self, stream: TlsStream, meta: TlsMeta) -> Session:
        """The protocol's session for a connection whose handshake completed (on the
        loop). Subclasses implement it."""
        raise NotImplementedError

    def connected(
        self, meta: TlsMeta, device_id: str | None, *, success: bool, reason: str | None = None
    ) -> None:
        """Log the outcome of a connection attempt (after authentication)."""
        self.log.emit(
            ConnectionEvent(
                "deviceConnect",
                self._protocol_of(meta),
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

    def _protocol_of(self, meta: TlsMeta) -> str:
        """The log's protocol: the door's, ``MqttWs`` / ``AmqpWs`` over WebSockets."""
        return f"{self.protocol}Ws" if meta.websocket else self.protocol

    def disconnected(self, meta: TlsMeta, device_id: str | None, reason: str | None = None) -> None:
        self.log.emit(
            ConnectionEvent(
                "deviceDisconnect",
                self._protocol_of(meta),
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
        hub's I/O thread (keep it short); exceptions are logged and ignored.
    :param max_connections: connections (TLS handshakes in progress and connections
        served) open at once; the next is closed before TLS and logged as refused.
    :param hub_loop: the hub's I/O loop, shared by its doors; without one the door
        runs one of its own (one thread) from :meth:`start` to :meth:`stop`.
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
        hub_loop: HubLoop | None = None,
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
            hub_loop=hub_loop,
        )
        self.profile = profile
        self.registry = registry
        self.state = state or HubState()
        self._received_lock = threading.Lock()
        self._received: list[ReceivedMessage] = []
        if on_connection is not None:
            self.add_connection_listener(on_connection)

    def start(self) -> None:
        """Bind and serve on the I/O loop (again on the same port after a stop)."""
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
