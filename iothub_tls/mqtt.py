"""MQTT device client for Azure IoT Hub over the hardened TLS context.

::

    from iothub_tls.mqtt import MqttDeviceClient

    with MqttDeviceClient.from_connection_string(cs) as client:
        client.send_telemetry(b'{"t": 21.5}', {"unit": "C"}, content_type="application/json")
        message = client.receive_c2d(timeout=30)

MQTT 3.1.1 over TLS (port 8883) or over WebSockets (port 443, ``websockets=True``),
through paho-mqtt 1.6.x or 2.x (``pip install 'iothub-tls[mqtt]'``). TLS always comes from
:func:`iothub_tls.create_ssl_context`: the policy's checks run inside the handshake and a
refusal reaches the caller of :meth:`MqttDeviceClient.connect` as the core's own
exception. The same context is reused for every reconnection, so TLS sessions resume.

Threads: one network thread drives paho (it alone touches the socket); one callback
thread runs the application's callbacks and method handlers, so a slow or failing
callback never stalls or kills the connection (exceptions are logged).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import logging
import queue
import random
import secrets
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from . import __version__
from ._mqtt_protocol import (
    METHODS_FILTER,
    MQTT_PORT,
    TWIN_DESIRED_FILTER,
    TWIN_RESPONSE_FILTER,
    WEBSOCKET_PATH,
    WEBSOCKET_PORT,
    C2DMessage,
    ConnectRefusedError,
    MethodRequest,
    MqttOptions,
    QueueFullError,
    ReconnectPolicy,
    RequestTracker,
    backoff_delay,
    c2d_filter,
    check_message_size,
    connack_code,
    connack_error,
    is_certificate_alert,
    is_permanent,
    method_response_topic,
    parse_c2d,
    parse_desired_patch,
    parse_method_request,
    parse_twin_response,
    telemetry_topic,
    twin_error,
    twin_get_topic,
    twin_patch_topic,
    username,
)
from .auth import ClientIdentity, ConnectionString, SasTokenProvider
from .context import HardenedSSLContext, create_ssl_context
from .errors import (
    AuthenticationError,
    ClientError,
    ConnectionFailedError,
    DeliveryError,
    IdentityError,
    IncompatibleDependencyError,
    IoTHubTLSError,
    MissingDependencyError,
    NotAuthorizedError,
    OperationTimeoutError,
)
from .info import TlsInfo, tls_info
from .policy import TlsPolicy

__all__ = [
    "C2DMessage",
    "ConnectRefusedError",
    "MethodHandler",
    "MqttDeviceClient",
    "MqttOptions",
    "QueueFullError",
    "ReconnectPolicy",
]

logger = logging.getLogger("iothub_tls.mqtt")

MethodHandler = Callable[[Any], "tuple[int, Any]"]
"""A direct method handler: called with the request's JSON payload (None when empty),
returns ``(status, payload)``; the payload must be JSON-serialisable (None: empty)."""


# --------------------------------------------------------------------------------------
# paho-mqtt 1.6.x / 2.x
# --------------------------------------------------------------------------------------


#: paho-mqtt versions the client is tested with (CI runs both).
TESTED_PAHO_VERSIONS = ("1.6.1", "2.2.0")
_PAHO_REMEDY = "pip install 'paho-mqtt>=1.6,<3'"


def _import_paho() -> Any:
    try:
        import paho.mqtt
        import paho.mqtt.client as paho_client
    except ImportError as exc:
        raise MissingDependencyError("mqtt", "paho-mqtt") from exc
    version = str(getattr(paho.mqtt, "__version__", "unknown"))
    major, _, rest = version.partition(".")
    minor = rest.partition(".")[0]
    supported = major == "2" or (major == "1" and minor.isdigit() and int(minor) >= 6)
    if not supported:
        raise IncompatibleDependencyError(
            "paho-mqtt", version, TESTED_PAHO_VERSIONS, "the MQTT client", _PAHO_REMEDY
        )
    if not callable(getattr(paho_client.Client, "_create_socket_connection", None)):
        raise IncompatibleDependencyError(
            "paho-mqtt",
            f"{version} (without Client._create_socket_connection)",
            TESTED_PAHO_VERSIONS,
            "the MQTT client",
            _PAHO_REMEDY,
        )
    return paho_client


_CLIENT_CLASSES: dict[int, Any] = {}


def _client_class(mqtt: Any) -> Any:
    """A paho ``Client`` subclass that opens its TCP connection to our address.

    paho connects to the host it sends as SNI. Overriding its TCP step lets the client
    dial another address (a test broker, a local port forward) while TLS still names
    and verifies the hub. paho 1.6 times the TLS handshake with the keep-alive; the
    subclass swaps in the handshake timeout until the socket is open.
    """
    key = id(mqtt)
    if key in _CLIENT_CLASSES:
        return _CLIENT_CLASSES[key]
    base = mqtt.Client

    class _Client(base):  # type: ignore[misc,valid-type]
        _itls_address: tuple[str, int]
        _itls_connect_timeout: float
        _itls_handshake_timeout: float
        _itls_keepalive: int | None = None
        _itls_swap_keepalive = False

        def _create_socket_connection(self) -> socket.socket:
            host, port = self._itls_address
            try:
                sock = socket.create_connection((host, port), timeout=self._itls_connect_timeout)
            except OSError as exc:
                raise ConnectionFailedError(
                    f"could not open a TCP connection to {host}:{port}: {exc}"
                ) from exc
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._itls_swap_keepalive:
                self._itls_keepalive = getattr(self, "_keepalive")  # noqa: B009
                self._keepalive = self._itls_handshake_timeout
            return sock

        def _itls_restore_keepalive(self) -> None:
            if self._itls_keepalive is not None:
                self._keepalive = self._itls_keepalive
                self._itls_keepalive = None

    _CLIENT_CLASSES[key] = _Client
    return _Client


class _Paho:
    """One paho client, configured for IoT Hub, with its callbacks normalised across
    paho 1.6 (positional ints and dicts) and 2.x (ReasonCode objects)."""

    def __init__(
        self,
        *,
        client_id: str,
        websockets: bool,
        address: tuple[str, int],
        context: HardenedSSLContext,
        options: MqttOptions,
        on_connack: Callable[[int, bool], None],
        on_suback: Callable[[int, list[int]], None],
        on_puback: Callable[[int], None],
        on_message: Callable[[str, bytes], None],
    ) -> None:
        mqtt = _import_paho()
        self.mqtt = mqtt
        self.v2 = hasattr(mqtt, "CallbackAPIVersion")
        kwargs: dict[str, Any] = {
            "client_id": client_id,
            "clean_session": False,  # keep subscriptions and queued C2D across connections
            "protocol": mqtt.MQTTv311,
            "transport": "websockets" if websockets else "tcp",
            "reconnect_on_failure": False,  # we reconnect; never downgrade to MQTT 3.1
        }
        cls = _client_class(mqtt)
        client = cls(mqtt.CallbackAPIVersion.VERSION2, **kwargs) if self.v2 else cls(**kwargs)
        client._itls_address = address
        client._itls_connect_timeout = options.connect_timeout
        client._itls_handshake_timeout = options.handshake_timeout
        if self.v2:
            client.connect_timeout = options.handshake_timeout  # TLS and WebSocket upgrade
        else:
            client._itls_swap_keepalive = True
        client.suppress_exceptions = True
        client.enable_logger(logging.getLogger("iothub_tls.mqtt.paho"))
        # The one place TLS comes from: the hardened context, unchanged.
        client.tls_set_context(context)
        if websockets:
            client.ws_set_options(path=WEBSOCKET_PATH)
        self.client = client
        self._on_connack = on_connack
        self._on_suback = on_suback
        self._on_puback = on_puback
        self._on_message = on_message
        client.on_connect = self._connect_cb
        client.on_subscribe = self._subscribe_cb
        client.on_publish = self._publish_cb
        client.on_message = self._message_cb
        client.on_socket_open = self._socket_open_cb
        client.on_log = self._log_cb
        self.last_error: str | None = None

    # paho callbacks (network thread) -------------------------------------------------

    def _connect_cb(self, _client: Any, _userdata: Any, flags: Any, rc: Any, *_: Any) -> None:
        if isinstance(flags, dict):
            present = bool(flags.get("session present"))
        else:
            present = bool(getattr(flags, "session_present", False))
        self._on_connack(connack_code(rc), present)

    def _subscribe_cb(self, _client: Any, _userdata: Any, mid: int, granted: Any, *_: Any) -> None:
        self._on_suback(mid, [int(getattr(g, "value", g)) for g in granted])

    def _publish_cb(self, _client: Any, _userdata: Any, mid: int, *_: Any) -> None:
        self._on_puback(mid)

    def _message_cb(self, _client: Any, _userdata: Any, message: Any) -> None:
        self._on_message(message.topic, bytes(message.payload))

    def _log_cb(self, _client: Any, _userdata: Any, level: int, text: str) -> None:
        # paho reports socket errors (e.g. a TLS alert after the handshake) only here.
        if level == self.mqtt.MQTT_LOG_ERR:
            self.last_error = text

    def _socket_open_cb(self, client: Any, *_: Any) -> None:
        client._itls_restore_keepalive()

    # driving it ------------------------------------------------------------------------

    def connect(self, host: str, port: int, keepalive: int) -> None:
        try:
            self.client.connect(host, port, keepalive=keepalive)
        finally:
            self.client._itls_restore_keepalive()

    def socket(self) -> Any:
        return self.client.socket()

    def ssl_socket(self) -> ssl.SSLSocket | None:
        """The TLS socket, also when paho wrapped it in its WebSocket framing."""
        sock = self.socket()
        inner = getattr(sock, "_socket", None)
        for candidate in (sock, inner):
            if isinstance(candidate, ssl.SSLSocket):
                return candidate
        return None

    def force_close(self) -> None:
        closer = getattr(self.client, "_sock_close", None)
        if callable(closer):
            with contextlib.suppress(Exception):
                closer()

    def success(self, rc: Any) -> bool:
        return int(rc) == int(self.mqtt.MQTT_ERR_SUCCESS)

    def no_connection(self, rc: Any) -> bool:
        return int(rc) == int(self.mqtt.MQTT_ERR_NO_CONN)


# --------------------------------------------------------------------------------------
# The callback thread
# --------------------------------------------------------------------------------------


class _Dispatcher:
    """Runs application callbacks one at a time on their own thread; an exception is
    logged, never propagated."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(
            target=self._run, name="iothub-tls-mqtt-callbacks", daemon=True
        )
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._queue.put((fn, args))

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:
                logger.exception("an MQTT callback (%s) raised", getattr(fn, "__name__", fn))


# --------------------------------------------------------------------------------------
# The network thread
# --------------------------------------------------------------------------------------


@dataclass
class _Telemetry:
    topic: str
    payload: bytes
    future: concurrent.futures.Future[None]


@dataclass
class _TwinRequest:
    operation: str  # "GET" or "PATCH"
    payload: bytes
    future: concurrent.futures.Future[tuple[bytes, int | None]]
    deadline: float


@dataclass
class _MethodResponse:
    status: int
    request_id: str
    payload: bytes


class _Closing(Exception):
    """close() was called while the network thread was connecting."""


def _settle(
    future: concurrent.futures.Future[Any],
    *,
    result: Any = None,
    error: BaseException | None = None,
) -> None:
    """Complete a future unless it already is (cancelled by a caller that timed out)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _wait(future: concurrent.futures.Future[Any], timeout: float) -> bool:
    """True when ``future`` completed within ``timeout``. (Catching the TimeoutError of
    ``future.result(timeout)`` would also catch a TimeoutError *set on* the future, such
    as HandshakeTimeoutError.)"""
    done, _ = concurrent.futures.wait([future], timeout=timeout)
    return bool(done)


class _Network:
    """Owns the paho client and the connection; runs on one thread.

    Other threads only append commands (:meth:`submit`) and wake the thread through a
    socket pair; everything that touches paho or the socket happens here.
    """

    def __init__(
        self,
        *,
        config: _Config,
        on_message: Callable[[str, bytes], None],
        on_reconnect: Callable[[], None],
    ) -> None:
        self._config = config
        self._route = on_message
        self._on_reconnect = on_reconnect
        options = config.options
        self._paho = _Paho(
            client_id=config.cs.client_id,
            websockets=config.websockets,
            address=(config.connect_host, config.port),
            context=config.context,
            options=options,
            on_connack=self._connack_cb,
            on_suback=self._suback_cb,
            on_puback=self._puback_cb,
            on_message=self._message_cb,
        )
        self._lock = threading.Lock()
        self._commands: collections.deque[Any] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._alive = True
        self._closing = False
        self._outstanding = 0
        # network-thread state
        self._outbox: collections.deque[_Telemetry] = collections.deque()
        self._inflight: dict[int, _Telemetry] = {}
        self._twin_waiting: collections.deque[_TwinRequest] = collections.deque()
        self._twins: RequestTracker[_TwinRequest] = RequestTracker(secrets.token_hex(3))
        self._connack: tuple[int, bool] | None = None
        self._subacks: dict[int, list[int] | None] = {}
        self._established = False
        self._permanent: BaseException | None = None
        # visible to other threads
        self.tls_info: TlsInfo | None = None
        self.failure: BaseException | None = None
        self.reconnects = 0
        self.connected = threading.Event()
        self.first: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="iothub-tls-mqtt", daemon=True)

    # -- other threads ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, command: Any) -> None:
        """Hand a command to the network thread (raises once the thread has ended)."""
        with self._lock:
            if not self._alive:
                raise self._ended_error()
            self._commands.append(command)
        self._wake()

    def submit_telemetry(self, topic: str, payload: bytes) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            if not self._alive:
                raise self._ended_error()
            if self._outstanding >= self._config.options.queue_size:
                raise QueueFullError(
                    f"{self._outstanding} messages are already waiting for the hub's "
                    f"acknowledgement (queue_size={self._config.options.queue_size}"
                    f"{'' if self.connected.is_set() else ', the client is reconnecting'}); "
                    "the message was not accepted: retry later or raise "
                    "MqttOptions.queue_size"
                )
            self._outstanding += 1
            self._commands.append(_Telemetry(topic, payload, future))
        future.add_done_callback(self._release)
        self._wake()
        return future

    def close(self, timeout: float) -> None:
        with self._lock:
            self._closing = True
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """False once the thread stopped (closed, failed, or the first connect failed)."""
        with self._lock:
            return self._alive

    def _release(self, _future: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._outstanding -= 1

    def _ended_error(self) -> ClientError:
        if self.failure is not None:
            error: ClientError = ConnectionFailedError(
                f"the client stopped reconnecting after: {self.failure}"
            )
            error.__cause__ = self.failure
            return error
        return ClientError("the client is closed: call connect() again first")

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- paho callbacks (network thread) ------------------------------------------------

    def _connack_cb(self, code: int, session_present: bool) -> None:
        self._connack = (code, session_present)

    def _suback_cb(self, mid: int, granted: list[int]) -> None:
        if mid in self._subacks:
            self._subacks[mid] = granted

    def _puback_cb(self, mid: int) -> None:
        item = self._inflight.pop(mid, None)
        if item is not None:
            _settle(item.future)

    def _message_cb(self, topic: str, payload: bytes) -> None:
        try:
            response = parse_twin_response(topic)
            if response is not None:
                request = self._twins.finish(response.request_id)
                if request is not None:
                    error = twin_error(response.status, request.operation, payload)
                    if error is not None:
                        _settle(request.future, error=error)
                    else:
                        _settle(request.future, result=(payload, response.version))
                return
            self._route(topic, payload)
        except Exception:
            logger.exception("could not process a message on %r", topic)

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # pragma: no cover - a bug must not leave callers hanging
            logger.exception("the MQTT network thread failed")
            self._finish(exc)
        finally:
            self._paho.force_close()
            for sock in (self._wake_r, self._wake_w):
                sock.close()

    def _loop(self) -> None:
        policy = self._config.options.reconnect
        first = True
        attempt = 0
        while True:
            try:
                self._establish()
            except _Closing:
                self._finish(None)
                return
            except BaseException as exc:
                self._paho.force_close()
                if first:
                    self._finish(None, first_error=exc)
                    return
                if is_permanent(exc) or exc is self._permanent:
                    logger.error("reconnecting is pointless, giving up: %s", exc)
                    self._finish(exc)
                    return
                attempt += 1
                if policy.max_attempts is not None and attempt >= policy.max_attempts:
                    logger.error("giving up after %d reconnection attempts: %s", attempt, exc)
                    self._finish(exc)
                    return
                delay = backoff_delay(policy, attempt + 1, random.random())  # noqa: S311
                logger.warning(
                    "reconnection attempt %d failed (%s); next attempt in %.1f s",
                    attempt,
                    exc,
                    delay,
                )
                if not self._idle(delay):
                    self._finish(None)
                    return
                continue
            attempt = 0
            self.connected.set()
            if first:
                first = False
                self.first.set_result(None)
            else:
                self.reconnects += 1
                logger.info("reconnected to %s (%s)", self._config.server_hostname, self.tls_info)
                self._on_reconnect()
            reason = self._serve()
            self.connected.clear()
            self._established = False
            self._requeue_twins()
            if reason == "closing":
                self._finish(None)
                return
            if reason == "renew":
                logger.info("reconnecting with a fresh SAS token")
                continue
            logger.warning("lost the connection to %s; reconnecting", self._config.server_hostname)
            delay = backoff_delay(policy, 1, random.random())  # noqa: S311
            if not self._idle(delay):
                self._finish(None)
                return

    # connecting -------------------------------------------------------------------------

    def _establish(self) -> None:
        cfg = self._config
        options = cfg.options
        self._connack = None
        self._subacks = {}
        self._permanent = None
        self._paho.last_error = None
        password = cfg.sas.token() if cfg.sas is not None else None
        self._paho.client.username_pw_set(cfg.username, password)
        if self._closing:
            raise _Closing
        try:
            self._paho.connect(cfg.server_hostname, cfg.port, options.keepalive)
        except IoTHubTLSError:
            raise  # the core's TLS refusals and our TCP errors, unchanged
        except (OSError, ValueError) as exc:
            # After TCP connect and the TLS handshake: a reset or refusal during the
            # WebSocket upgrade, or (paho 1.6 writes CONNECT at once) a server that
            # closed the TLS connection right after the handshake.
            if isinstance(exc, ssl.SSLError) or self._paho.socket() is not None:
                raise self._closed_before_connack(str(exc)) from exc
            raise ConnectionFailedError(
                f"connection to {cfg.connect_host}:{cfg.port} failed after TCP connect: {exc}"
            ) from exc

        deadline = time.monotonic() + options.connect_timeout
        while self._connack is None:
            alive = self._wait_step(deadline, "a CONNACK (the answer to MQTT CONNECT)")
            if self._connack is None and not alive:
                raise self._closed_before_connack()
        code, _session_present = self._connack
        refusal = connack_error(code, cfg.server_hostname)
        if refusal is not None:
            error, retryable = refusal
            if not retryable:
                self._permanent = error
            raise error
        ssl_sock = self._paho.ssl_socket()
        if ssl_sock is not None:
            self.tls_info = tls_info(ssl_sock)

        # (Re)subscribe every time: cheap, and correct whether or not the hub kept the
        # session. QoS 1 for C2D (the hub redelivers until PUBACK), 0 for twin/methods.
        filters = [(TWIN_RESPONSE_FILTER, 0), (TWIN_DESIRED_FILTER, 0), (METHODS_FILTER, 0)]
        if cfg.cs.module_id is None:
            filters.insert(0, (c2d_filter(cfg.cs.device_id), 1))
        by_mid: dict[int, str] = {}
        for topic_filter, qos in filters:
            rc, mid = self._paho.client.subscribe(topic_filter, qos)
            if not self._paho.success(rc):
                raise ConnectionFailedError(f"could not subscribe to {topic_filter} (paho rc {rc})")
            self._subacks[mid] = None
            by_mid[mid] = topic_filter
        while any(v is None for v in self._subacks.values()):
            if not self._wait_step(deadline, "the SUBACKs") and any(
                v is None for v in self._subacks.values()
            ):
                raise ConnectionFailedError(
                    f"{cfg.server_hostname} closed the connection while subscribing"
                )
        for mid, granted in self._subacks.items():
            if granted is not None and any(g >= 0x80 for g in granted):
                raise NotAuthorizedError(
                    f"{cfg.server_hostname} refused the subscription to {by_mid[mid]} "
                    "(SUBACK 0x80): this identity may not use that feature"
                )
        self._established = True
        self._flush()

    def _closed_before_connack(self, detail: str | None = None) -> ClientError:
        host = self._config.server_hostname
        detail = detail or self._paho.last_error
        if detail is not None and is_certificate_alert(detail):
            return AuthenticationError(
                f"{host} refused the device certificate ({detail}): check that the "
                "certificate is registered with (or chains to a CA trusted by) the server"
            )
        hint = ""
        if self._config.context.identity is not None:
            hint = (
                " If the server checks client certificates it may have refused the "
                "device certificate (TLS 1.3 servers do so after the handshake)."
            )
        return ConnectionFailedError(
            f"{host} closed the connection before answering MQTT CONNECT"
            f"{f' ({detail})' if detail else ''}: it may not speak MQTT 3.1.1 on this port, "
            f"or it refused the connection.{hint}"
        )

    def _wait_step(self, deadline: float, what: str) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise OperationTimeoutError(
                f"no answer from {self._config.server_hostname} within "
                f"{self._config.options.connect_timeout:g} s while waiting for {what}: the "
                "server accepted TLS but does not answer MQTT"
            )
        alive = self._step(min(remaining, 0.5))
        if self._closing:
            raise _Closing
        return alive

    # serving ----------------------------------------------------------------------------

    def _serve(self) -> str:
        sas = self._config.sas
        while True:
            if self._closing:
                self._disconnect()
                return "closing"
            if sas is not None and sas.needs_renewal():
                self._disconnect()
                return "renew"
            if not self._step(self._until_next_deadline(1.0)):
                return "lost"

    def _step(self, timeout: float) -> bool:
        """One round of select + read + write + keep-alive; False once the connection is
        gone."""
        paho = self._paho
        sock = paho.socket()
        if sock is None:
            self._take_commands()
            return False
        try:
            pending = sock.pending() if hasattr(sock, "pending") else 0
            wlist = [sock] if paho.client.want_write() else []
            readable, writable, _ = select.select(
                [sock, self._wake_r], wlist, [], 0 if pending else max(timeout, 0)
            )
            if self._wake_r in readable:
                with contextlib.suppress(OSError):
                    while self._wake_r.recv(4096):
                        pass
            self._take_commands()
            if self._established:
                self._flush()
            if sock in readable or pending:
                paho.client.loop_read()
            if paho.socket() is not None and (writable or paho.client.want_write()):
                paho.client.loop_write()
            if paho.socket() is not None:
                paho.client.loop_misc()
        except (OSError, ValueError) as exc:
            logger.warning("connection error: %s", exc)
            paho.force_close()
        except Exception:  # a paho bug or a malformed packet must not end the thread
            logger.exception("unexpected error on the MQTT connection; reconnecting")
            paho.force_close()
        self._expire_twins()
        return paho.socket() is not None

    def _idle(self, delay: float) -> bool:
        """Wait ``delay`` seconds between attempts, still taking commands; False when
        close() was called."""
        deadline = time.monotonic() + delay
        while not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            wait = min(remaining, self._until_next_deadline(0.5))
            with contextlib.suppress(OSError, ValueError):
                readable, _, _ = select.select([self._wake_r], [], [], wait)
                if readable:
                    while self._wake_r.recv(4096):
                        pass
            self._take_commands()
            self._expire_twins()
        return False

    def _disconnect(self) -> None:
        """A clean MQTT DISCONNECT (so the hub does not publish a will), bounded in time."""
        paho = self._paho
        if paho.socket() is None:
            return
        with contextlib.suppress(Exception):
            paho.client.disconnect()
        deadline = time.monotonic() + 2.0
        while paho.socket() is not None and time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                paho.client.loop_write()
                if paho.socket() is not None:
                    paho.client.loop_read()
            time.sleep(0.01)
        paho.force_close()

    # commands ---------------------------------------------------------------------------

    def _take_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                command = self._commands.popleft()
            if isinstance(command, _Telemetry):
                self._outbox.append(command)
            elif isinstance(command, _TwinRequest):
                self._twin_waiting.append(command)
            elif isinstance(command, _MethodResponse):
                self._send_method_response(command)

    def _flush(self) -> None:
        paho = self._paho
        while self._outbox and paho.socket() is not None:
            item = self._outbox.popleft()
            if not item.future.set_running_or_notify_cancel():
                continue  # the sender timed out and withdrew it
            info = paho.client.publish(item.topic, item.payload, qos=1)
            if paho.success(info.rc) or paho.no_connection(info.rc):
                # paho keeps QoS 1 messages and resends them after a reconnect.
                self._inflight[info.mid] = item
            else:
                _settle(
                    item.future,
                    error=DeliveryError(
                        f"the message could not be queued for sending (paho rc {info.rc})"
                    ),
                )
        while self._twin_waiting and paho.socket() is not None:
            request = self._twin_waiting.popleft()
            if request.future.done():
                continue
            rid = self._twins.start(request, request.deadline)
            topic = twin_get_topic(rid) if request.operation == "GET" else twin_patch_topic(rid)
            paho.client.publish(topic, request.payload, qos=0)

    def _send_method_response(self, response: _MethodResponse) -> None:
        if not self._established or self._paho.socket() is None:
            logger.warning(
                "the connection was lost before the answer to method request %s could be "
                "sent; the caller will see a timeout",
                response.request_id,
            )
            return
        topic = method_response_topic(response.status, response.request_id)
        self._paho.client.publish(topic, response.payload, qos=0)

    def _requeue_twins(self) -> None:
        """Twin requests unanswered when the connection dropped are sent again (with new
        request ids) after the reconnection; GET and PATCH are both idempotent."""
        pending = [request for _, request in self._twins.pending()]
        self._twins.drain()
        self._twin_waiting.extendleft(reversed(pending))

    def _until_next_deadline(self, longest: float) -> float:
        """Seconds until the next twin request expires, at most ``longest``."""
        deadlines = [r.deadline for r in self._twin_waiting]
        tracked = self._twins.next_deadline()
        if tracked is not None:
            deadlines.append(tracked)
        if not deadlines:
            return longest
        return max(0.0, min(longest, min(deadlines) - time.monotonic()))

    def _expire_twins(self) -> None:
        now = time.monotonic()
        expired = self._twins.expire(now)
        expired += [r for r in self._twin_waiting if r.deadline <= now]
        if not expired:
            return
        self._twin_waiting = collections.deque(r for r in self._twin_waiting if r.deadline > now)
        for request in expired:
            _settle(
                request.future,
                error=OperationTimeoutError(
                    f"the hub did not answer the twin {request.operation} in time"
                ),
            )

    # ending -----------------------------------------------------------------------------

    def _finish(
        self, failure: BaseException | None, first_error: BaseException | None = None
    ) -> None:
        """Stop accepting commands and settle everything still pending."""
        with self._lock:
            self._alive = False
            self.failure = failure
        self.connected.clear()
        self._take_commands()
        if first_error is not None:
            _settle(self.first, error=first_error)
        elif not self.first.done():
            _settle(
                self.first, error=ConnectionFailedError("the client was closed while connecting")
            )
        reason = (
            f"the connection failed for good ({failure})"
            if failure is not None
            else "the client was closed"
        )
        for item in [*self._inflight.values(), *self._outbox]:
            error = DeliveryError(f"{reason} before the hub acknowledged the message")
            error.__cause__ = failure
            _settle(item.future, error=error)
        self._inflight.clear()
        self._outbox.clear()
        for request in [*self._twin_waiting, *self._twins.drain()]:
            lost = ConnectionFailedError(f"{reason} before the hub answered the twin request")
            lost.__cause__ = failure
            _settle(request.future, error=lost)
        self._twin_waiting.clear()


# --------------------------------------------------------------------------------------
# The public client
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    cs: ConnectionString
    server_hostname: str
    connect_host: str
    port: int
    websockets: bool
    context: HardenedSSLContext
    sas: SasTokenProvider | None
    username: str
    options: MqttOptions


def _as_bytes(payload: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    raise TypeError(
        f"payload must be bytes or str, not {type(payload).__name__} (serialise it first, "
        "e.g. json.dumps(...).encode())"
    )


class MqttDeviceClient:
    """An IoT Hub device (or module) over MQTT 3.1.1, TLS from the hardened context.

    Build it from a connection string with :meth:`from_connection_string`, or from its
    parts. Authentication is a SAS key (tokens are generated, and renewed by
    reconnecting before they expire) or an X.509 ``identity`` (mutual TLS, no password).

    :param host_name: the hub, e.g. ``myhub.azure-devices.net``.
    :param device_id: the device id; ``module_id`` makes it a module identity.
    :param shared_access_key: the device's (or module's) base64 key.
    :param shared_access_key_name: a shared access policy name, when the key is one.
    :param identity: the device certificate and key (X.509 authentication).
    :param gateway_host_name: connect through this gateway (IoT Edge); TLS then names
        and verifies the gateway.
    :param policy: the :class:`~iothub_tls.TlsPolicy` (default: IoT Hub's guidance).
    :param host: the address to dial instead of the hub's name (a proxy, a test broker);
        TLS still sends and verifies the hub's (or gateway's) name.
    :param port: default 8883, or 443 with ``websockets=True``.
    :param websockets: MQTT over WebSockets (``wss://{host}/$iothub/websocket``).
    :param options: :class:`MqttOptions` (timeouts, queue size, reconnection, keep-alive).
    :param sas_token_provider: tokens from this provider instead of one made from the key.
    """

    def __init__(
        self,
        host_name: str,
        device_id: str,
        *,
        module_id: str | None = None,
        shared_access_key: str | None = None,
        shared_access_key_name: str | None = None,
        identity: ClientIdentity | None = None,
        gateway_host_name: str | None = None,
        policy: TlsPolicy | None = None,
        host: str | None = None,
        port: int | None = None,
        websockets: bool = False,
        options: MqttOptions | None = None,
        sas_token_provider: SasTokenProvider | None = None,
    ) -> None:
        options = MqttOptions() if options is None else options
        if not isinstance(options, MqttOptions):
            raise TypeError(f"options must be MqttOptions, not {type(options).__name__}")
        if identity is not None and not isinstance(identity, ClientIdentity):
            raise TypeError(
                f"identity must be a ClientIdentity, not {type(identity).__name__} (use "
                "ClientIdentity.from_files(cert, key))"
            )
        has_key = shared_access_key is not None or sas_token_provider is not None
        if identity is not None and has_key:
            raise IdentityError(
                "both a shared access key and an X.509 identity were given: a device "
                "authenticates with one of them; drop the key (x509=true) or the identity"
            )
        if identity is None and not has_key:
            raise IdentityError(
                "no credentials: pass shared_access_key=... (symmetric key device), or "
                "identity=ClientIdentity.from_files(cert, key) for an X.509 device"
            )
        cs = ConnectionString(
            host_name=host_name,
            device_id=device_id,
            module_id=module_id,
            shared_access_key=shared_access_key,
            shared_access_key_name=shared_access_key_name,
            x509=shared_access_key is None,
            gateway_host_name=gateway_host_name,
        )
        if host is not None and (not isinstance(host, str) or not host.strip()):
            raise ValueError(f"host must be a non-empty host name or address, not {host!r}")
        default_port = WEBSOCKET_PORT if websockets else MQTT_PORT
        port = default_port if port is None else port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port must be an int between 1 and 65535, not {port!r}")
        sas = sas_token_provider
        if sas is None and shared_access_key is not None:
            sas = SasTokenProvider.from_connection_string(cs, ttl=options.sas_ttl)
        client_type = f"iothub-tls/{__version__}"
        if options.product_info:
            client_type += f" {options.product_info}"
        self._config = _Config(
            cs=cs,
            server_hostname=cs.hostname,
            connect_host=host or cs.hostname,
            port=port,
            websockets=bool(websockets),
            # One context for the client's lifetime: it remembers TLS sessions, so every
            # reconnection resumes (IoT Hub guidance: fewer bytes and CPU per connection).
            context=create_ssl_context(policy, identity=identity),
            sas=sas,
            username=username(cs.host_name, cs.client_id, device_client_type=client_type),
            options=options,
        )
        self._lock = threading.Lock()
        self._network: _Network | None = None
        self._last_tls_info: TlsInfo | None = None
        self._dispatcher: _Dispatcher | None = None
        self._c2d: queue.Queue[C2DMessage] = queue.Queue()
        self._methods: dict[str, MethodHandler] = {}
        self.on_c2d: Callable[[C2DMessage], None] | None = None
        """Called (on the callback thread) with each cloud-to-device message; when None,
        messages wait for :meth:`receive_c2d`."""
        self.on_desired_update: Callable[[dict[str, Any]], None] | None = None
        """Called with each desired-properties patch (a dict including ``$version``)."""
        self.on_reconnect: Callable[[], None] | None = None
        """Called after each automatic reconnection. Desired-property patches sent while
        the device was offline are not replayed: call :meth:`get_twin` here."""

    @classmethod
    def from_connection_string(
        cls,
        connection_string: str | ConnectionString,
        *,
        policy: TlsPolicy | None = None,
        identity: ClientIdentity | None = None,
        host: str | None = None,
        port: int | None = None,
        websockets: bool = False,
        options: MqttOptions | None = None,
        sas_token_provider: SasTokenProvider | None = None,
    ) -> MqttDeviceClient:
        """A client for the device of ``HostName=...;DeviceId=...;SharedAccessKey=...``
        (or ``...;x509=true`` with ``identity``; ``ModuleId``, ``SharedAccessKeyName``
        and ``GatewayHostName`` are honoured).

        :raises ConnectionStringError: naming the malformed part (never the key).
        :raises IdentityError: x509=true without ``identity``, or a key and an identity.
        """
        cs = (
            connection_string
            if isinstance(connection_string, ConnectionString)
            else ConnectionString.parse(connection_string)
        )
        if cs.x509 and identity is None:
            raise IdentityError(
                "the connection string says x509=true: pass "
                "identity=ClientIdentity.from_files(device_cert, device_key)"
            )
        if cs.shared_access_key is not None and identity is not None:
            raise IdentityError(
                "the connection string has a SharedAccessKey and an X.509 identity was "
                "given: use x509=true for certificate authentication, or drop identity"
            )
        return cls(
            cs.host_name,
            cs.device_id,
            module_id=cs.module_id,
            shared_access_key=cs.shared_access_key,
            shared_access_key_name=cs.shared_access_key_name,
            identity=identity,
            gateway_host_name=cs.gateway_host_name,
            policy=policy,
            host=host,
            port=port,
            websockets=websockets,
            options=options,
            sas_token_provider=sas_token_provider,
        )

    # -- what it is ---------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        return self._config.cs.device_id

    @property
    def module_id(self) -> str | None:
        return self._config.cs.module_id

    @property
    def username(self) -> str:
        """The MQTT user name sent in CONNECT."""
        return self._config.username

    @property
    def ssl_context(self) -> HardenedSSLContext:
        """The hardened context every connection of this client uses."""
        return self._config.context

    @property
    def connected(self) -> bool:
        network = self._network
        return network is not None and network.connected.is_set()

    @property
    def tls_info(self) -> TlsInfo | None:
        """What the current (or last) connection negotiated; None before connect()."""
        network = self._network
        return network.tls_info if network is not None else self._last_tls_info

    @property
    def failure(self) -> BaseException | None:
        """The error that made the client stop reconnecting (a refused certificate or
        credentials, or ``ReconnectPolicy.max_attempts`` used up); None otherwise."""
        network = self._network
        return network.failure if network is not None else None

    @property
    def reconnect_count(self) -> int:
        """How many times the client reconnected since connect()."""
        network = self._network
        return network.reconnects if network is not None else 0

    def __repr__(self) -> str:
        cfg = self._config
        return (
            f"<MqttDeviceClient {cfg.cs.client_id} -> {cfg.server_hostname}:{cfg.port}"
            f"{' (websockets)' if cfg.websockets else ''} "
            f"{'connected' if self.connected else 'not connected'}>"
        )

    # -- connection -----------------------------------------------------------------------

    def connect(self) -> None:
        """Connect, authenticate and subscribe; return when the client is ready.

        The first connection is not retried: its failure is raised here. TLS refusals
        arrive as the core raised them (``CertificateVerificationError``,
        ``CipherSuiteError``, ``ProtocolVersionError``, ``PolicyViolation``,
        ``HandshakeTimeoutError``, ...); refused credentials as ``AuthenticationError``
        (CONNACK 5 as :class:`ConnectRefusedError`, also a ``NotAuthorizedError``); an
        unreachable host as ``ConnectionFailedError``; a server that does not answer MQTT
        as ``OperationTimeoutError``. Later losses are healed in the background.
        """
        with self._lock:
            network = self._network
            started = network is not None and network.alive
            if not started:
                if self._dispatcher is None:
                    self._dispatcher = _Dispatcher()
                network = _Network(
                    config=self._config, on_message=self._route, on_reconnect=self._reconnected
                )
                self._network = network
        assert network is not None
        if started:
            network.first.result()  # connected already, or a connect() in progress
            return
        network.start()
        opts = self._config.options
        bound = opts.connect_timeout * 2 + opts.handshake_timeout + 10
        if not _wait(network.first, bound):  # pragma: no cover - bounded by the thread
            network.close(1.0)
            raise OperationTimeoutError(f"connect() did not finish within {bound:g} s")
        network.first.result()  # raises the first connection's error, unchanged

    def close(self) -> None:
        """Disconnect cleanly and stop the threads. Messages not yet acknowledged fail
        with ``DeliveryError``; a later :meth:`connect` starts afresh."""
        with self._lock:
            network, self._network = self._network, None
            dispatcher, self._dispatcher = self._dispatcher, None
        if network is not None:
            network.close(timeout=10.0)
            self._last_tls_info = network.tls_info
        if dispatcher is not None:
            dispatcher.stop()

    def __enter__(self) -> MqttDeviceClient:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _require_network(self) -> _Network:
        network = self._network
        if network is None:
            raise ClientError("the client is not connected: call connect() first")
        return network

    # -- telemetry --------------------------------------------------------------------------

    def send_telemetry_async(
        self,
        payload: bytes | str,
        properties: Mapping[str, str] | None = None,
        *,
        content_type: str | None = None,
        content_encoding: str | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> concurrent.futures.Future[None]:
        """Queue a device-to-cloud message and return at once.

        The returned future completes when the hub acknowledges the message (PUBACK), or
        fails with ``DeliveryError`` (the client was closed or gave up reconnecting).
        While disconnected the message waits in the queue and is sent after the
        reconnection. Cancelling the future withdraws a message that has not been sent.

        :raises QueueFullError: ``MqttOptions.queue_size`` messages are already pending.
        :raises TypeError, ValueError: for a malformed payload or property.
        """
        data = _as_bytes(payload)
        cs = self._config.cs
        topic = telemetry_topic(
            cs.device_id,
            cs.module_id,
            properties,
            message_id=message_id,
            correlation_id=correlation_id,
            content_type=content_type,
            content_encoding=content_encoding,
        )
        check_message_size(topic, data)
        return self._require_network().submit_telemetry(topic, data)

    def send_telemetry(
        self,
        payload: bytes | str,
        properties: Mapping[str, str] | None = None,
        *,
        content_type: str | None = None,
        content_encoding: str | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Send a device-to-cloud message and return once the hub acknowledged it.

        :param properties: application properties (str -> str), routed by the hub.
        :param timeout: seconds (default ``MqttOptions.operation_timeout``).
        :raises OperationTimeoutError: not acknowledged in time. If the message had not
            left the queue it is withdrawn (the error says so); otherwise it may still
            arrive.
        :raises DeliveryError: the client was closed or gave up before the acknowledgement.
        :raises QueueFullError: too many messages pending.
        """
        future = self.send_telemetry_async(
            payload,
            properties,
            content_type=content_type,
            content_encoding=content_encoding,
            message_id=message_id,
            correlation_id=correlation_id,
        )
        wait = self._config.options.operation_timeout if timeout is None else timeout
        if not _wait(future, wait):
            if future.cancel():
                raise OperationTimeoutError(
                    f"the message could not be sent within {wait:g} s (no connection); it "
                    "was withdrawn and will not be sent"
                )
            if not future.done():
                raise OperationTimeoutError(
                    f"the hub did not acknowledge the message within {wait:g} s; it was "
                    "sent and may still be delivered"
                )
        future.result()

    # -- cloud-to-device ------------------------------------------------------------------

    def receive_c2d(self, timeout: float | None = None) -> C2DMessage:
        """The next cloud-to-device message (those not taken by :attr:`on_c2d`).

        :raises OperationTimeoutError: none arrived within ``timeout`` seconds (default
            ``MqttOptions.operation_timeout``).
        :raises ClientError: for a module identity (IoT Hub sends modules no C2D
            messages over MQTT).
        """
        if self._config.cs.module_id is not None:
            raise ClientError(
                "IoT Hub delivers no cloud-to-device messages to modules over MQTT; use "
                "direct methods or the module twin instead"
            )
        wait = self._config.options.operation_timeout if timeout is None else timeout
        try:
            return self._c2d.get(timeout=wait)
        except queue.Empty:
            raise OperationTimeoutError(
                f"no cloud-to-device message arrived within {wait:g} s"
            ) from None

    # -- device twin ----------------------------------------------------------------------

    def _twin(
        self, operation: str, payload: bytes, timeout: float | None
    ) -> tuple[bytes, int | None]:
        wait = self._config.options.operation_timeout if timeout is None else timeout
        future: concurrent.futures.Future[tuple[bytes, int | None]] = concurrent.futures.Future()
        request = _TwinRequest(operation, payload, future, time.monotonic() + wait)
        self._require_network().submit(request)
        # The network thread fails the request at its deadline; the margin only guards
        # against that thread having died.
        if not _wait(future, wait + 5.0):  # pragma: no cover
            raise OperationTimeoutError(
                f"the hub did not answer the twin {operation} within {wait:g} s"
            )
        return future.result()

    def get_twin(self, timeout: float | None = None) -> dict[str, Any]:
        """The device twin: ``{"desired": {...}, "reported": {...}}``.

        :raises OperationTimeoutError: no answer within ``timeout``.
        :raises DeliveryError: the hub answered with an error status (429, 5xx, ...).
        :raises NotAuthorizedError: status 401/403.
        """
        body, _version = self._twin("GET", b"", timeout)
        try:
            twin = json.loads(body.decode("utf-8")) if body else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DeliveryError(f"the hub's twin document is not valid JSON: {exc}") from exc
        if not isinstance(twin, dict):
            raise DeliveryError("the hub's twin document is not a JSON object")
        return twin

    def patch_reported(self, patch: Mapping[str, Any], timeout: float | None = None) -> int | None:
        """Update reported properties (``None`` deletes one); return the twin's new
        ``$version`` when the hub reports it.

        :raises TypeError: ``patch`` is not a JSON-serialisable mapping.
        :raises DeliveryError: the hub refused it (e.g. 400, malformed).
        """
        if not isinstance(patch, Mapping):
            raise TypeError(f"patch must be a mapping, not {type(patch).__name__}")
        try:
            body = json.dumps(dict(patch), separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"the reported-properties patch is not JSON-serialisable: {exc}"
            ) from exc
        _body, version = self._twin("PATCH", body, timeout)
        return version

    # -- direct methods -------------------------------------------------------------------

    def on_method(self, name: str, handler: MethodHandler | None) -> None:
        """Answer direct method ``name`` with ``handler(payload) -> (status, payload)``;
        ``None`` removes it. Unregistered methods are answered with status 404; a
        handler that raises, with 500."""
        if not isinstance(name, str) or not name:
            raise ValueError("the method name must be a non-empty str")
        if handler is None:
            self._methods.pop(name, None)
        elif not callable(handler):
            raise TypeError("handler must be callable: handler(payload) -> (status, payload)")
        else:
            self._methods[name] = handler

    # -- routing (network thread -> callback thread) --------------------------------------

    def _dispatch(self, fn: Callable[..., Any], *args: Any) -> None:
        dispatcher = self._dispatcher
        if dispatcher is not None:
            dispatcher.submit(fn, *args)

    def _reconnected(self) -> None:
        callback = self.on_reconnect
        if callback is not None:
            self._dispatch(callback)

    def _route(self, topic: str, payload: bytes) -> None:
        is_desired, _version = parse_desired_patch(topic)
        if is_desired:
            self._dispatch(self._deliver_desired, payload)
            return
        request = parse_method_request(topic)
        if request is not None:
            self._dispatch(self._run_method, request, payload)
            return
        message = parse_c2d(topic, payload, self._config.cs.device_id)
        if message is not None:
            callback = self.on_c2d
            if callback is not None:
                self._dispatch(callback, message)
            else:
                self._c2d.put(message)
            return
        logger.debug("ignoring a message on unexpected topic %r", topic)

    def _deliver_desired(self, payload: bytes) -> None:
        callback = self.on_desired_update
        if callback is None:
            return
        try:
            patch = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            logger.warning("ignoring a desired-properties update that is not JSON")
            return
        callback(patch)

    def _run_method(self, request: MethodRequest, payload: bytes) -> None:
        status, body = self._call_method(request, payload)
        network = self._network
        if network is None:
            return
        with contextlib.suppress(ClientError):
            network.submit(_MethodResponse(status, request.request_id, body))

    def _call_method(self, request: MethodRequest, payload: bytes) -> tuple[int, bytes]:
        def error(status: int, message: str) -> tuple[int, bytes]:
            return status, json.dumps({"error": message}).encode("utf-8")

        handler = self._methods.get(request.name)
        if handler is None:
            return error(404, f"this device has no handler for method {request.name!r}")
        try:
            argument = json.loads(payload.decode("utf-8")) if payload.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            return error(400, "the method payload is not valid JSON")
        try:
            result = handler(argument)
        except Exception:
            logger.exception("the handler of method %r raised", request.name)
            return error(500, f"the handler of method {request.name!r} failed")
        if (
            not isinstance(result, tuple)
            or len(result) != 2
            or isinstance(result[0], bool)
            or not isinstance(result[0], int)
        ):
            logger.error(
                "the handler of method %r returned %r; it must return (status, payload)",
                request.name,
                result,
            )
            return error(500, f"the handler of method {request.name!r} returned no status")
        status, value = result
        if not 0 <= status <= 999:
            logger.error("method %r: status %r is out of range", request.name, status)
            return error(500, f"the handler of method {request.name!r} returned a bad status")
        if value is None:
            return status, b""
        try:
            return status, json.dumps(value).encode("utf-8")
        except (TypeError, ValueError):
            logger.exception(
                "method %r: the response payload is not JSON-serialisable", request.name
            )
            return error(500, f"the handler of method {request.name!r} returned non-JSON data")
