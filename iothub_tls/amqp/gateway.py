"""Many SAS devices over one AMQP connection (IoT Hub's AMQP multiplexing),
synchronously: :class:`AmqpGateway`.

::

    from iothub_tls.amqp import AmqpGateway

    with AmqpGateway("myhub.azure-devices.net") as gateway:
        sensor = gateway.add_device(connection_string)
        sensor.send_telemetry(b'{"t": 21.5}', {"unit": "C"})
        message = sensor.receive_c2d(timeout=30)
        message.complete()

A facade over :class:`iothub_tls.amqp.aio_gateway.AmqpGateway` (which explains the
protocol, the isolation of devices and reconnection), on the process's shared I/O loop:
a thousand devices are a thousand sets of links on one TLS connection, driven by one
thread. Each device client is a :class:`GatewayDeviceClient`, with the surface of
:class:`~iothub_tls.amqp.AmqpDeviceClient`; its callbacks run on the shared callback
thread. X.509 devices cannot share a connection: connect each with its own
:class:`~iothub_tls.amqp.AmqpDeviceClient`.
"""

from __future__ import annotations

from typing import Any, cast

from .._io.loop import shared_loop
from .._io.proxy import Proxy
from ..auth import ConnectionString, SasTokenProvider
from ..errors import PolicyError
from ..policy import TlsPolicy
from ..tls.context import HardenedSSLContext
from . import aio_gateway
from .client import AmqpConnection, AmqpDeviceClient, AmqpSender
from .options import AmqpOptions

__all__ = ["AmqpGateway", "GatewayDeviceClient"]


class GatewayDeviceClient(AmqpDeviceClient):
    """A device of an :class:`AmqpGateway`: the surface of
    :class:`~iothub_tls.amqp.AmqpDeviceClient` (telemetry, cloud-to-device messages,
    twin, direct methods, ``tls_info``, ``on_connection_state_change``), its links on a
    connection shared with the gateway's other devices. ``close()`` detaches its links;
    :meth:`AmqpGateway.remove_device` also frees its place."""

    def __init__(self, device: aio_gateway.GatewayDeviceClient) -> None:
        # (not AmqpDeviceClient.__init__: the asyncio client exists already)
        io = shared_loop()
        self._attach(device)
        self._aio: aio_gateway.GatewayDeviceClient
        self._connection = AmqpConnection._over(cast(Any, device.links), io)
        self._events = AmqpSender(self._connection, device._events)

    @property
    def token_puts(self) -> int:
        """This device's accepted put-tokens (the first one and its renewals)."""
        return self._aio.links.token_puts

    def __repr__(self) -> str:
        return repr(self._aio).replace("<GatewayDeviceClient", "<GatewayDeviceClient (sync)", 1)


class AmqpGateway:
    """Many SAS devices over few AMQP connections to one IoT Hub: up to
    ``devices_per_connection`` (1,000) devices share one TLS connection; more devices
    open more connections.

    :param hub_host: the hub (``myhub.azure-devices.net``): TLS server name, AMQP open
        hostname, and the ``HostName`` of every device added.
    :param policy: the :class:`~iothub_tls.TlsPolicy` (default: IoT Hub's guidance).
    :param port: default 5671.
    :param proxy: ``"http://[user:password@]host:port"`` (HTTP CONNECT),
        ``"socks5://..."``, ``"socks4://..."`` or ``"env"``, as on the device clients.
    :param websockets: AMQP over WebSockets (port 443, ``/$iothub/websocket``).
    :param host: where to dial instead of ``hub_host`` (a local hub, a port forward).
    :param options: :class:`AmqpOptions` for the connections and devices.
    :param devices_per_connection: devices per connection (default 1,000).
    """

    def __init__(
        self,
        hub_host: str,
        *,
        policy: TlsPolicy | None = None,
        port: int | None = None,
        proxy: str | Proxy | None = None,
        websockets: bool = False,
        host: str | None = None,
        options: AmqpOptions | None = None,
        devices_per_connection: int = aio_gateway.DEVICES_PER_CONNECTION,
    ) -> None:
        io = shared_loop()
        self._io = io
        self._aio = aio_gateway.AmqpGateway(
            hub_host,
            policy=policy,
            port=port,
            proxy=proxy,
            websockets=websockets,
            host=host,
            options=options,
            devices_per_connection=devices_per_connection,
            gate=io.gate,
            lag=io.lag,
        )
        self._devices: dict[aio_gateway.GatewayDeviceClient, GatewayDeviceClient] = {}

    # -- what it is -----------------------------------------------------------------------

    @property
    def hub_host(self) -> str:
        return self._aio.hub_host

    @property
    def ssl_context(self) -> HardenedSSLContext:
        return self._aio.ssl_context

    @property
    def devices(self) -> tuple[GatewayDeviceClient, ...]:
        """The devices added (and not removed), in order."""
        return tuple(self._devices[d] for d in self._aio.devices if d in self._devices)

    @property
    def connection_count(self) -> int:
        """How many connections the gateway opened (one per ``devices_per_connection``
        devices)."""
        return len(self._aio.connections)

    @property
    def handshakes(self) -> int:
        """TLS handshakes completed by the gateway's connections (reconnections too)."""
        return self._aio.handshakes

    def __repr__(self) -> str:
        return repr(self._aio)

    # -- devices --------------------------------------------------------------------------

    def add_device(
        self,
        connection_string: str | ConnectionString | None = None,
        *,
        device_id: str | None = None,
        key: str | None = None,
        module_id: str | None = None,
        model_id: str | None = None,
        sas_token_provider: SasTokenProvider | None = None,
        connect: bool = True,
    ) -> GatewayDeviceClient:
        """Add a device (a connection string with ``SharedAccessKey`` or
        ``SharedAccessSignature``, or ``device_id=`` and ``key=``) and, unless
        ``connect=False``, connect it: return its client once its links are attached.
        With ``connect=False``, set its callbacks and call its ``connect()``.

        :raises PolicyError: an X.509 device (it needs a connection of its own: use
            ``AmqpDeviceClient``), a device of another hub, a device already added.
        :raises AuthenticationError: the hub refused the device's token (wrong key,
            unknown or disabled device); the device is not kept.
        """

        async def make() -> aio_gateway.GatewayDeviceClient:
            return self._aio.new_device(
                connection_string,
                device_id=device_id,
                key=key,
                module_id=module_id,
                model_id=model_id,
                sas_token_provider=sas_token_provider,
            )

        device = self._io.run(make())
        client = GatewayDeviceClient(device)
        self._devices[device] = client
        if connect:
            try:
                client.connect()
            except BaseException:
                self.remove_device(client)
                raise
        return client

    def remove_device(self, device: GatewayDeviceClient) -> None:
        """Detach the device's links and free its place on its connection."""
        if not isinstance(device, GatewayDeviceClient) or device._aio not in self._devices:
            raise PolicyError(f"{device!r} is not a device of this gateway")
        del self._devices[device._aio]
        self._io.run(self._aio.remove_device(device._aio))

    # -- life cycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close every connection; the gateway cannot be used again."""
        self._io.run(self._aio.close())

    def __enter__(self) -> AmqpGateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
