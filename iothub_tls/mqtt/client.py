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

The surface is :class:`iothub_tls.DeviceClient`, the same as AMQP's and HTTPS's.

Threads: one network thread drives paho (it alone touches the socket, waits on it with
``poll()``, so descriptor numbers above 1023 are fine, and writes what paho queued once
per round, several packets per broker wake-up); a callback thread, started
with the first callback, runs the application's callbacks and method handlers, so a slow
or failing callback never stalls or kills the connection (what they raise goes to
``on_background_exception``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from .. import __version__
from .._io.backoff import RetryPolicy
from .._io.base import ClientBase, check_host, check_port, unsupported
from ..auth import ClientIdentity, ConnectionString, SasTokenProvider
from ..device import (
    C2DMessage,
    Message,
    Settlement,
    decode_twin_document,
    encode_reported_patch,
)
from ..errors import ClientError, OperationTimeoutError
from ..policy import TlsPolicy
from ..tls.context import HardenedSSLContext, create_ssl_context
from ..tls.info import TlsInfo
from ._paho import TESTED_PAHO_VERSIONS as TESTED_PAHO_VERSIONS
from .commands import ClientConfig, MethodResponse, TwinRequest, completed_within
from .conventions import (
    MQTT_PORT,
    WEBSOCKET_PORT,
    ConnectRefusedError,
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
    "MqttDeviceClient",
    "MqttOptions",
    "QueueFullError",
    "RetryPolicy",
]

logger = logging.getLogger("iothub_tls.mqtt")


def _settle_mqtt(message: C2DMessage, how: Settlement) -> None:
    # IoT Hub's MQTT acknowledges a C2D message with its PUBACK, sent when it arrives.
    if how is not Settlement.COMPLETE:
        raise unsupported(
            "MQTT",
            f"{how.value} of a cloud-to-device message",
            "each message is acknowledged (completed) when it arrives; use AMQP or HTTPS "
            "to reject or abandon messages",
        )


class MqttDeviceClient(ClientBase):
    """An IoT Hub device (or module) over MQTT 3.1.1, TLS from the hardened context.

    Build it with :meth:`from_connection_string`, :meth:`from_symmetric_key` or
    :meth:`from_x509`; they take these keywords:

    :param policy: the :class:`~iothub_tls.TlsPolicy` (default: IoT Hub's guidance).
    :param identity: the device certificate and key (X.509 authentication).
    :param host: the address to dial instead of the hub's name (a proxy, a test broker);
        TLS still sends and verifies the hub's (or gateway's) name.
    :param port: default 8883, or 443 with ``websockets=True``.
    :param websockets: MQTT over WebSockets (``wss://{host}/$iothub/websocket``).
    :param options: :class:`MqttOptions` (timeouts, queue size, retry, keep-alive).
    :param sas_token_provider: tokens from this provider instead of the key's.
    :param model_id: the IoT Plug and Play model the device implements (``dtmi:...``).
    """

    transport = "mqtt"

    def __init__(
        self,
        connection_string: ConnectionString,
        *,
        policy: TlsPolicy | None = None,
        identity: ClientIdentity | None = None,
        host: str | None = None,
        port: int | None = None,
        websockets: bool = False,
        options: MqttOptions | None = None,
        sas_token_provider: SasTokenProvider | None = None,
        model_id: str | None = None,
    ) -> None:
        options = MqttOptions() if options is None else options
        if not isinstance(options, MqttOptions):
            raise TypeError(f"options must be MqttOptions, not {type(options).__name__}")
        cs = ConnectionString.coerce(connection_string)
        cs.check_identity(identity)
        connect_host = check_host(host)
        port = check_port(port, WEBSOCKET_PORT if websockets else MQTT_PORT)
        super().__init__("mqtt", options.operation_timeout)
        sas = sas_token_provider
        if sas is None and not cs.x509:
            sas = SasTokenProvider.from_connection_string(cs, ttl=options.sas_ttl)
        client_type = f"iothub-tls/{__version__}"
        if options.product_info:
            client_type += f" {options.product_info}"
        self._config = ClientConfig(
            cs=cs,
            server_hostname=cs.hostname,
            connect_host=connect_host or cs.hostname,
            port=port,
            websockets=bool(websockets),
            # One context for the client's lifetime: it remembers TLS sessions, so every
            # reconnection resumes (IoT Hub guidance: fewer bytes and CPU per connection).
            context=create_ssl_context(policy, identity=identity),
            sas=sas,
            username=username(
                cs.host_name, cs.client_id, device_client_type=client_type, model_id=model_id
            ),
            options=options,
        )
        self._lock = threading.Lock()
        self._network: Network | None = None
        self._last_tls_info: TlsInfo | None = None

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
        as ``OperationTimeoutError``. Later losses are healed in the background and
        reported to ``on_connection_state_change``.
        """
        with self._lock:
            network = self._network
            started = network is not None and network.alive
            if not started:
                network = Network(
                    config=self._config, on_message=self._route, on_state=self._set_state
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
        if network is not None:
            network.close(timeout=10.0)
            self._last_tls_info = network.tls_info
        self._stop_callbacks()

    def _require_network(self) -> Network:
        network = self._network
        if network is None:
            raise ClientError("the client is not connected: call connect() first")
        return network

    # -- telemetry --------------------------------------------------------------------------

    def send_telemetry_async(
        self,
        payload: bytes | str | Message,
        properties: Mapping[str, str] | None = None,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
    ) -> concurrent.futures.Future[None]:
        """Queue a device-to-cloud message and return at once.

        The returned future completes when the hub acknowledges the message (PUBACK), or
        fails with ``DeliveryError`` (the client was closed or gave up reconnecting).
        While disconnected the message waits in the queue and is sent after the
        reconnection. Cancelling the future withdraws a message that has not been sent.

        :raises QueueFullError: ``MqttOptions.queue_size`` messages are already pending.
        :raises TypeError, ValueError: for a malformed payload or property.
        """
        message = Message.coerce(
            payload,
            properties,
            message_id=message_id,
            correlation_id=correlation_id,
            content_type=content_type,
            content_encoding=content_encoding,
        )
        cs = self._config.cs
        topic = telemetry_topic(
            cs.device_id,
            cs.module_id,
            message.properties,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
        )
        check_message_size(topic, message.payload)
        return self._require_network().submit_telemetry(topic, message.payload)

    def send_telemetry(
        self,
        payload: bytes | str | Message,
        properties: Mapping[str, str] | None = None,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Send a device-to-cloud message and return once the hub acknowledged it.

        ``payload`` is bytes, text (sent as UTF-8) or a :class:`~iothub_tls.Message`.

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
            message_id=message_id,
            correlation_id=correlation_id,
            content_type=content_type,
            content_encoding=content_encoding,
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
        """The next cloud-to-device message (those not taken by :attr:`on_c2d`). Over
        MQTT it is acknowledged when it arrives: ``complete()`` adds nothing, and
        ``reject()`` / ``abandon()`` raise ``UnsupportedOperationError``.

        :raises OperationTimeoutError: none arrived within ``timeout`` seconds (default
            ``MqttOptions.operation_timeout``).
        :raises UnsupportedOperationError: for a module identity (IoT Hub sends modules
            no C2D messages over MQTT).
        """
        if self._config.cs.module_id is not None:
            raise unsupported(
                "MQTT",
                "cloud-to-device messages for modules",
                "use direct methods or the module twin instead",
            )
        return self._receive_c2d(timeout)

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
        return decode_twin_document(body)

    def patch_reported(self, patch: Mapping[str, Any], timeout: float | None = None) -> int | None:
        """Update reported properties (``None`` deletes one); return the twin's new
        ``$version`` when the hub reports it.

        :raises TypeError: ``patch`` is not a JSON-serialisable mapping.
        :raises DeliveryError: the hub refused it (e.g. 400, malformed).
        """
        _body, version = self._twin("PATCH", encode_reported_patch(patch), timeout)
        return version

    # -- routing (network thread -> callback thread) --------------------------------------

    def _route(self, topic: str, payload: bytes) -> None:
        is_desired, _version = parse_desired_patch(topic)
        if is_desired:
            try:
                patch = decode_twin_document(payload)
            except ClientError as exc:
                self._report(exc)
                return
            self._incoming_desired(patch)
            return
        request = parse_method_request(topic)
        if request is not None:
            rid = request.request_id
            self._incoming_method(
                request.name, rid, payload, lambda status, body: self._respond(status, rid, body)
            )
            return
        message = parse_c2d(topic, payload, self._config.cs.device_id, settler=_settle_mqtt)
        if message is not None:
            self._incoming_c2d(message)
            return
        logger.debug("ignoring a message on unexpected topic %r", topic)

    def _respond(self, status: int, request_id: str, body: bytes) -> None:
        network = self._network
        if network is None:
            return
        try:
            network.submit(MethodResponse(status, request_id, body))
        except ClientError as exc:  # closed meanwhile
            logger.debug("could not answer method request %s: %s", request_id, exc)
