"""The asyncio AMQP clients: :class:`AmqpDeviceClient` (exported by
:mod:`iothub_tls.aio`) and the generic :class:`AmqpConnection` it is built on.

One connection per client, driven by the event loop it runs on (any asyncio loop); no
thread of its own. The AMQP engine is python-qpid-proton's, without I/O
(:mod:`.engine`); IoT Hub's conventions (addresses, properties, twin and method
messages) come from :mod:`.conventions`, the module the local hub uses too. TLS comes
from :func:`iothub_tls.create_ssl_context`: asyncio runs the handshake with the
hardened context, so its checks and refusals are the core's own.

IoT Hub authentication, as the Azure IoT SDKs do it:

* **SAS key** — SASL ANONYMOUS, then claims-based security: a ``put-token`` request on
  the ``$cbs`` node with ``name`` = the token's resource (``{hub}/devices/{id}``), type
  ``servicebus.windows.net:sastoken``; the links attach only after status 200. A new
  token is put on the same connection before the current one expires.
* **X.509** — the device certificate in the TLS handshake (``identity=``) and *no SASL
  layer*, as the C, C# and Java SDKs connect; ``sasl_external=True`` sends SASL
  EXTERNAL instead, for gateways and brokers that require a SASL layer.

The synchronous :class:`iothub_tls.amqp.AmqpDeviceClient` and
:class:`iothub_tls.amqp.AmqpConnection` are facades over these classes, running on the
process's shared I/O loop.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from .. import __version__
from .._io.aiobase import AsyncClientBase
from .._io.base import check_host, check_port
from .._io.loop import HandshakeGate, LoopLag
from .._io.proxy import Proxy
from ..auth import ClientIdentity, ConnectionString, SasTokenProvider
from ..device import (
    C2DMessage,
    ConnectionState,
    Message,
    MethodHandler,
    Settlement,
    Settler,
    check_model_id,
    decode_twin_document,
    encode_reported_patch,
)
from ..errors import PolicyError
from ..policy import TlsPolicy
from ..tls.context import HardenedSSLContext
from ..tls.info import TlsInfo
from . import conventions as amqpc
from .connection import AmqpConnection
from .links import AmqpDelivery, AmqpReceiver, AmqpSender
from .message import AmqpMessage
from .methods import MethodChannel
from .options import AMQPS_PORT, AmqpOptions
from .twin import TwinChannel
from .websocket import WEBSOCKET_PORT

__all__ = [
    "AMQPS_PORT",
    "AmqpConnection",
    "AmqpDelivery",
    "AmqpDeviceClient",
    "AmqpMessage",
    "AmqpOptions",
    "AmqpReceiver",
    "AmqpSender",
]


def _settle_delivery(delivery: AmqpDelivery) -> Settler:
    """How a C2D message received over AMQP is settled: by its delivery's disposition
    (IoT Hub: accepted completes, rejected dead-letters, released requeues)."""

    def settle(_message: C2DMessage, how: Settlement) -> None:
        if how is Settlement.COMPLETE:
            delivery.accept()
        elif how is Settlement.REJECT:
            delivery.reject()
        else:
            delivery.release()

    return settle


class AmqpDeviceClient(AsyncClientBase):
    """An IoT Hub device (or module) over AMQP 1.0 on port 5671, for asyncio
    applications.

    The same surface as :class:`iothub_tls.amqp.AmqpDeviceClient`, with ``await``:
    ``async with client:``, ``await client.send_telemetry(...)``, ``await
    client.receive_c2d(timeout)``, ``async for message in client.c2d_messages()``;
    callbacks and method handlers may be coroutine functions. Telemetry goes to
    ``/devices/{id}/messages/events``; cloud-to-device messages come from
    ``/devices/{id}/messages/devicebound`` and are settled through their delivery
    (``complete()``, ``reject()``, ``abandon()``); the twin and direct methods use link
    pairs attached on first use (or at connect, when a handler or the desired-update
    callback was set before) and re-attached after every reconnection.

    Keywords of the factories: ``policy``, ``identity``, ``host``, ``port``, ``options``
    (:class:`AmqpOptions`), ``sas_token_provider``, ``sasl_external``, ``model_id``
    (announced on the links), ``websockets`` (AMQP over WebSockets on port 443,
    subprotocol ``AMQPWSB10``), ``proxy`` (``"http://..."``, ``"socks5://..."``,
    ``"socks4://..."`` or ``"env"``), ``gate`` (a :class:`~iothub_tls.aio.HandshakeGate`
    shared by a process's clients).
    """

    transport = "amqp"

    def __init__(
        self,
        connection_string: ConnectionString,
        *,
        policy: TlsPolicy | None = None,
        identity: ClientIdentity | None = None,
        host: str | None = None,
        port: int | None = None,
        options: AmqpOptions | None = None,
        sas_token_provider: SasTokenProvider | None = None,
        sasl_external: bool = False,
        model_id: str | None = None,
        websockets: bool = False,
        proxy: str | Proxy | None = None,
        gate: HandshakeGate | None = None,
        lag: LoopLag | None = None,
    ) -> None:
        cs = ConnectionString.coerce(connection_string)
        options = AmqpOptions() if options is None else options
        if not isinstance(options, AmqpOptions):
            raise TypeError(f"options must be AmqpOptions, not {type(options).__name__}")
        cs.check_identity(identity)
        connect_host = check_host(host)
        port = check_port(port, WEBSOCKET_PORT if websockets else AMQPS_PORT)
        provider = None
        if cs.x509:
            sasl: str | None = "EXTERNAL" if sasl_external else None
        else:
            if sasl_external:
                raise PolicyError("sasl_external=True needs an X.509 device (x509=true)")
            provider = sas_token_provider or SasTokenProvider.from_connection_string(
                cs, ttl=options.sas_ttl
            )
            sasl = "ANONYMOUS"
        super().__init__(options.operation_timeout)
        self.connection_string = cs
        kinds = amqpc.LinkKind
        self.events_address = amqpc.link_address(kinds.EVENTS, cs.device_id, cs.module_id)
        self.devicebound_address = amqpc.link_address(kinds.C2D, cs.device_id, cs.module_id)
        client_version = f"iothub-tls/{__version__}"
        link_properties: dict[str, Any] = {amqpc.CLIENT_VERSION_PROPERTY: client_version}
        if model_id is not None:
            # IoT Plug and Play: the model is announced on the links (as the Java SDK does)
            link_properties[amqpc.MODEL_ID_PROPERTY] = check_model_id(model_id)
        self._connection = self._make_connection(
            connect_host or cs.hostname,
            port,
            policy=policy,
            identity=identity,
            server_hostname=cs.hostname,
            open_hostname=cs.host_name,
            sasl=sasl,
            cbs_token_provider=provider,
            cbs_audience=cs.resource_uri if provider else None,
            options=options,
            on_state=self._connection_state,
            gate=gate,
            lag=lag,
            websockets=websockets,
            proxy=proxy,
        )
        self._events = self._connection.sender(
            self.events_address, name="link-snd-events", properties=link_properties
        )
        self._c2d = self._connection.receiver(
            self.devicebound_address,
            name="link-rcv-devicebound",
            credit=options.c2d_credit,
            properties=link_properties,
            on_delivery=self._c2d_delivery,
        )
        self._twin_channel = TwinChannel(
            self._connection,
            amqpc.link_address(kinds.TWIN, cs.device_id, cs.module_id),
            client_version=client_version,
            on_desired=self._incoming_desired,
        )
        self._method_channel = MethodChannel(
            self._connection,
            amqpc.link_address(kinds.METHODS, cs.device_id, cs.module_id),
            client_version=client_version,
            on_request=self._incoming_method,
        )
        self._closed: asyncio.Event | None = None

    def _make_connection(self, host: str, port: int, **kwargs: Any) -> AmqpConnection:
        """The connection the client's links live on (a gateway's device client puts
        them on a shared one instead)."""
        return AmqpConnection(host, port, **kwargs)

    # -- what it is ---------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        return self.connection_string.device_id

    @property
    def module_id(self) -> str | None:
        return self.connection_string.module_id

    @property
    def connected(self) -> bool:
        return self._connection.connected

    @property
    def tls_info(self) -> TlsInfo | None:
        """What the current (or last) TLS connection negotiated; None before connect()."""
        return self._connection.tls_info

    @property
    def connection(self) -> AmqpConnection:
        """The underlying AMQP connection (reconnect count, token renewals)."""
        return self._connection

    @property
    def options(self) -> AmqpOptions:
        return self._connection.options

    @property
    def ssl_context(self) -> HardenedSSLContext:
        """The hardened context every connection of this client uses."""
        return self._connection.ssl_context

    @property
    def failure(self) -> BaseException | None:
        """The error that made the client stop reconnecting (refused credentials or
        certificate, ``RetryPolicy.max_attempts`` used up); None otherwise."""
        return self._connection.failure

    @property
    def reconnect_count(self) -> int:
        """How many times the client reconnected since connect()."""
        return self._connection.reconnects

    def __repr__(self) -> str:
        conn = self._connection
        return (
            f"<AmqpDeviceClient {self.connection_string.client_id} -> "
            f"{conn.server_hostname} via {conn.host}:{conn.port} ({self.state.value})>"
        )

    # -- life cycle ---------------------------------------------------------------------

    async def __aenter__(self) -> AmqpDeviceClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, authenticate (CBS put-token or certificate) and attach the links;
        with ``on_desired_update`` set, subscribe to desired-property updates.

        The first connection is not retried: its failure is raised here (TLS refusals as
        the core raised them, refused credentials as ``AuthenticationError``, an
        unreachable host as ``ConnectionFailedError``, a peer that stalls the AMQP
        set-up as ``OperationTimeoutError``). Later losses are healed in the background
        and reported to ``on_connection_state_change``.

        :raises ConnectionFailedError: also when already connected.
        """
        self._closed = asyncio.Event()
        await self._connection.connect()
        try:
            await self._twin_channel.resume(self._connection.operation_timeout)
        except BaseException:
            await self._connection.close()
            raise

    async def close(self) -> None:
        """Close the connection (messages waiting for the hub fail); a later
        :meth:`connect` starts afresh."""
        await self._connection.close()

    def _connection_state(self, state: ConnectionState, reason: BaseException | None) -> None:
        self._set_state(state, reason)
        if state is ConnectionState.CLOSED and self._closed is not None:
            self._closed.set()

    def _closed_event(self) -> asyncio.Event:
        if self._closed is None:
            self._closed = asyncio.Event()
        return self._closed

    # -- telemetry ----------------------------------------------------------------------

    def _telemetry(
        self,
        payload: bytes | str | Message,
        properties: Mapping[str, str] | None,
        message_id: str | None,
        correlation_id: str | None,
        content_type: str | None,
        content_encoding: str | None,
    ) -> AmqpMessage:
        """The AMQP message for one telemetry message (any thread)."""
        message = Message.coerce(
            payload,
            properties,
            message_id=message_id,
            correlation_id=correlation_id,
            content_type=content_type,
            content_encoding=content_encoding,
        )
        message.check_size()
        return amqpc.telemetry_message(
            message.payload,
            message.properties,
            message_id=message.message_id or str(uuid.uuid4()),
            correlation_id=message.correlation_id,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
        )

    async def send_telemetry(
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
        """Send a device-to-cloud message; return once the hub accepted it. A message
        without an id gets a random one (it traces the message).

        :raises DeliveryError: the hub rejected or released it.
        :raises OperationTimeoutError: no disposition within ``timeout`` (default:
            ``options.operation_timeout``); while reconnecting the message is sent
            again on the new connection (at-least-once).
        """
        message = self._telemetry(
            payload, properties, message_id, correlation_id, content_type, content_encoding
        )
        await self._events.send(message, timeout)

    # -- cloud-to-device ----------------------------------------------------------------

    def _c2d_delivery(self, delivery: AmqpDelivery) -> None:
        content = amqpc.parse_c2d(delivery.message)
        self._incoming_c2d(
            C2DMessage(
                content.payload,
                content.properties,
                message_id=content.message_id,
                correlation_id=content.correlation_id,
                content_type=content.content_type,
                content_encoding=content.content_encoding,
                delivery_count=delivery.message.delivery_count,
                system_properties={"to": content.to} if content.to else None,
                transport="amqp",
                settler=_settle_delivery(delivery),
            )
        )

    async def receive_c2d(self, timeout: float | None = None) -> C2DMessage:
        """The next cloud-to-device message (those not taken by ``on_c2d``). Settle it
        with ``complete()``, ``reject()`` or ``abandon()``; up to
        ``options.c2d_credit`` messages are prefetched, and each settlement lets the hub
        send one more. A message not settled before the connection is lost is delivered
        again.

        :raises OperationTimeoutError: none arrived within ``timeout`` seconds (default:
            ``options.operation_timeout``).
        """
        return await self._receive_c2d(timeout)

    # -- device twin --------------------------------------------------------------------

    async def get_twin(self, timeout: float | None = None) -> dict[str, Any]:
        """The device twin: ``{"desired": {...}, "reported": {...}}``.

        :raises OperationTimeoutError: no answer within ``timeout`` (default:
            ``options.operation_timeout``).
        :raises NotAuthorizedError: status 401/403.
        :raises DeliveryError: another error status (429, 5xx, ...), or a twin document
            that is not a JSON object.
        """
        response = await self._twin_channel.request(amqpc.TwinOperation.GET, None, timeout)
        return decode_twin_document(response.body)

    async def patch_reported(
        self, patch: Mapping[str, Any], timeout: float | None = None
    ) -> int | None:
        """Update reported properties (``None`` deletes one); return the twin's new
        reported ``$version`` when the hub says it.

        :raises TypeError: ``patch`` is not a JSON-serialisable mapping.
        :raises OperationTimeoutError: no answer within ``timeout``.
        :raises NotAuthorizedError: status 401/403.
        :raises DeliveryError: the hub refused it (e.g. 400, malformed).
        """
        body = encode_reported_patch(patch)
        response = await self._twin_channel.request(amqpc.TwinOperation.PATCH, body, timeout)
        return response.version

    def _desired_callback_changed(self) -> None:
        """Setting ``on_desired_update`` subscribes to the updates: on a live connection
        in the background (a failure goes to ``on_background_exception``), else at
        connect."""
        if self._on_desired_update is None:
            return
        if self._connection._running:
            self._runner._start(self._subscribe_desired())
        else:
            self._twin_channel.want_desired()

    async def _subscribe_desired(self) -> None:
        try:
            await self._twin_channel.subscribe_desired(self._connection.operation_timeout)
        except Exception as exc:
            self._report(exc)

    async def _set_desired_callback(self, callback: Callable[[dict[str, Any]], Any] | None) -> None:
        """Set ``on_desired_update`` and wait for the subscription (the synchronous
        facade's setter: it returns once updates are subscribed, or raises why not)."""
        if callback is not None and not callable(callback):
            raise TypeError("on_desired_update must be callable or None")
        self._on_desired_update = callback
        if callback is not None:
            await self._twin_channel.subscribe_desired(self._connection.operation_timeout)

    # -- direct methods -----------------------------------------------------------------

    def _methods_changed(self) -> None:
        """Registering a handler declares the method links: attached at once on a live
        connection, else at connect."""
        if self._methods:
            self._method_channel.declare()

    async def _set_method_handler(self, name: str | None, handler: MethodHandler | None) -> None:
        """``on_method`` that waits until the method links are attached (the synchronous
        facade's: calls are routed to the device when it returns)."""
        self.on_method(name, handler)
        if self._methods:
            await self._method_channel.attach(self._connection.operation_timeout)
