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

Threads: one network thread drives paho (it alone touches the socket, waits on it with
``poll()``, so descriptor numbers above 1023 are fine, and writes what paho queued once
per round, several packets per broker wake-up); a callback thread, started
with the first callback, runs the application's callbacks and method handlers, so a slow
or failing callback never stalls or kills the connection (exceptions are logged).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .. import __version__
from .._io.backoff import RetryPolicy
from .._io.dispatch import Dispatcher
from .._io.lifecycle import Connectable
from ..auth import ClientIdentity, ConnectionString, SasTokenProvider
from ..context import HardenedSSLContext, create_ssl_context
from ..errors import (
    ClientError,
    DeliveryError,
    IdentityError,
    OperationTimeoutError,
)
from ..info import TlsInfo
from ..policy import TlsPolicy
from ._paho import TESTED_PAHO_VERSIONS as TESTED_PAHO_VERSIONS
from .commands import ClientConfig, MethodResponse, TwinRequest, completed_within
from .conventions import (
    MQTT_PORT,
    WEBSOCKET_PORT,
    C2DMessage,
    ConnectRefusedError,
    MethodRequest,
    MqttOptions,
    QueueFullError,
    check_message_size,
    parse_c2d,
    parse_desired_patch,
    parse_method_request,
    telemetry_topic,
    username,
)
from .network import Network

__all__ = [
    "C2DMessage",
    "ConnectRefusedError",
    "MethodHandler",
    "MqttDeviceClient",
    "MqttOptions",
    "QueueFullError",
    "RetryPolicy",
]

logger = logging.getLogger("iothub_tls.mqtt")

MethodHandler = Callable[[Any], "tuple[int, Any]"]
"""A direct method handler: called with the request's JSON payload (None when empty),
returns ``(status, payload)``; the payload must be JSON-serialisable (None: empty)."""


def _as_bytes(payload: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    raise TypeError(
        f"payload must be bytes or str, not {type(payload).__name__} (serialise it first, "
        "e.g. json.dumps(...).encode())"
    )


class MqttDeviceClient(Connectable):
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
        self._config = ClientConfig(
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
        self._network: Network | None = None
        self._last_tls_info: TlsInfo | None = None
        self._dispatcher: Dispatcher | None = None
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
        cs = ConnectionString.coerce(connection_string)
        cs.check_identity(identity)
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
        credentials, or ``RetryPolicy.max_attempts`` used up); None otherwise."""
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
                    self._dispatcher = Dispatcher(
                        "mqtt",
                        report=lambda exc: logger.error("an MQTT callback raised", exc_info=exc),
                    )
                network = Network(
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
        if not completed_within(network.first, bound):  # pragma: no cover - bounded by the thread
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

    def _require_network(self) -> Network:
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
        limit = self._config.options.operation_timeout if timeout is None else timeout
        try:
            # exception() returns a TimeoutError set on the future instead of raising it
            error = future.exception(limit)
        except concurrent.futures.TimeoutError:
            if future.cancel():
                raise OperationTimeoutError(
                    f"the message could not be sent within {limit:g} s (no connection); it "
                    "was withdrawn and will not be sent"
                ) from None
            if not future.done():
                raise OperationTimeoutError(
                    f"the hub did not acknowledge the message within {limit:g} s; it was "
                    "sent and may still be delivered"
                ) from None
            error = future.exception()
        if error is not None:
            raise error

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
        request = TwinRequest(operation, payload, future, time.monotonic() + wait)
        self._require_network().submit(request)
        # The network thread fails the request at its deadline; the margin only guards
        # against that thread having died.
        if not completed_within(future, wait + 5.0):  # pragma: no cover
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
            network.submit(MethodResponse(status, request.request_id, body))

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
