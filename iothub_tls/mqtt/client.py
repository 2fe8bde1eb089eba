"""MQTT device client for Azure IoT Hub over the hardened TLS context.

::

    from iothub_tls.mqtt import MqttDeviceClient

    with MqttDeviceClient.from_connection_string(cs) as client:
        client.send_telemetry(b'{"t": 21.5}', {"unit": "C"}, content_type="application/json")
        message = client.receive_c2d(timeout=30)

MQTT 3.1.1 over TLS (port 8883) or over WebSockets (port 443, ``websockets=True``,
``pip install 'iothub-tls[mqtt]'`` brings wsproto for it). TLS always comes from
:func:`iothub_tls.create_ssl_context`: the policy's checks run inside the handshake and a
refusal reaches the caller of :meth:`MqttDeviceClient.connect` as the core's own
exception. The same context is reused for every reconnection, so TLS sessions resume.

The surface is :class:`iothub_tls.DeviceClient`, the same as AMQP's and HTTPS's. This
class is a facade over :class:`iothub_tls.aio.MqttDeviceClient`: every synchronous client
in a process shares one I/O thread (``iothub-tls-io``) and one callback thread
(``iothub-tls-callbacks``), however many devices it holds.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .._io.backoff import RetryPolicy
from .._io.facade import SyncFacade
from .._io.loop import shared_loop
from .._io.waiter import ThreadWaiter
from ..auth import ConnectionString, SasTokenProvider
from ..device import C2DMessage, Message
from ..errors import OperationTimeoutError
from ..policy import TlsPolicy
from ..tls.context import HardenedSSLContext
from .aio import MqttDeviceClient as AsyncMqttDeviceClient
from .conventions import ConnectRefusedError, MqttOptions, QueueFullError

if TYPE_CHECKING:
    from ..auth import ClientIdentity

__all__ = [
    "C2DMessage",
    "ConnectRefusedError",
    "MqttDeviceClient",
    "MqttOptions",
    "QueueFullError",
    "RetryPolicy",
]


class MqttDeviceClient(SyncFacade):
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
    :param proxy: reach the hub through a proxy: ``"http://[user:password@]host:port"``
        (HTTP CONNECT), ``"socks5://[user:password@]host:port"``, ``"socks4://host:port"``,
        or ``"env"`` for ``HTTPS_PROXY``/``NO_PROXY``. TLS still runs end to end with the
        hub; a proxy refusal is :class:`~iothub_tls.ProxyError`.
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
        proxy: str | None = None,
    ) -> None:
        io = shared_loop()
        self._attach(
            AsyncMqttDeviceClient(
                connection_string,
                policy=policy,
                identity=identity,
                host=host,
                port=port,
                websockets=websockets,
                options=options,
                sas_token_provider=sas_token_provider,
                model_id=model_id,
                proxy=proxy,
                gate=io.gate,
                lag=io.lag,
            )
        )
        self._aio: AsyncMqttDeviceClient

    # -- what it is ---------------------------------------------------------------------

    @property
    def username(self) -> str:
        """The MQTT user name sent in CONNECT."""
        return self._aio.username

    @property
    def ssl_context(self) -> HardenedSSLContext:
        """The hardened context every connection of this client uses."""
        return self._aio.ssl_context

    @property
    def options(self) -> MqttOptions:
        return self._aio.options

    @property
    def failure(self) -> BaseException | None:
        """The error that made the client stop reconnecting (a refused certificate or
        credentials, or ``RetryPolicy.max_attempts`` used up); None otherwise."""
        return self._aio.failure

    @property
    def reconnect_count(self) -> int:
        """How many times the client reconnected since connect()."""
        return self._aio.reconnect_count

    # -- telemetry ----------------------------------------------------------------------

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
        reconnection. Cancelling the future withdraws a message that has not been sent,
        and frees its place in the queue at once.

        :raises QueueFullError: ``MqttOptions.queue_size`` messages are already pending.
        :raises TypeError: for a payload or property of the wrong type.
        :raises ValueError: for a malformed payload or property.
        """
        aio = self._aio
        topic, data = aio._outgoing(
            payload, properties, message_id, correlation_id, content_type, content_encoding
        )
        aio._reserve()  # QueueFullError here, in the caller's thread
        waiter: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._io.call_soon(aio._enqueue_item, aio._outgoing_threadsafe(topic, data, waiter))
        return waiter

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
        aio = self._aio
        topic, data = aio._outgoing(
            payload, properties, message_id, correlation_id, content_type, content_encoding
        )
        aio._reserve()  # QueueFullError here, in the caller's thread
        # The blocked caller needs no more than a ThreadWaiter (see _io/waiter.py): a
        # lighter hand-over between the I/O thread and this one than a Future.
        waiter = ThreadWaiter()
        item = aio._outgoing_threadsafe(topic, data, waiter)
        limit = aio.options.operation_timeout if timeout is None else timeout
        self._io.call_soon(aio._enqueue_item, item)
        if not waiter.wait(limit):
            if waiter.cancel():
                aio._cancelled(item)  # its place in the queue is free at once
                raise OperationTimeoutError(
                    f"the message could not be sent within {limit:g} s (no connection); it "
                    "was withdrawn and will not be sent"
                ) from None
            if not waiter.done():
                raise OperationTimeoutError(
                    f"the hub did not acknowledge the message within {limit:g} s; it was "
                    "sent and may still be delivered"
                ) from None
        error = waiter.exception()
        if error is not None:
            raise error
