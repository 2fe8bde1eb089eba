"""Many SAS devices over one AMQP connection, for asyncio applications:
:class:`AmqpGateway` (exported by :mod:`iothub_tls.aio`) and its device clients,
:class:`GatewayDeviceClient`.

::

    from iothub_tls.aio import AmqpGateway

    async with AmqpGateway("myhub.azure-devices.net") as gateway:
        devices = await asyncio.gather(*(gateway.add_device(cs) for cs in strings))
        await devices[0].send_telemetry(b'{"t": 21.5}', {"unit": "C"})

One TLS connection carries up to ``devices_per_connection`` devices (1,000 by default);
more devices open more connections. Every device client has the surface of
:class:`iothub_tls.aio.AmqpDeviceClient` — telemetry, cloud-to-device messages settled
through their delivery, the twin, direct methods, ``tls_info`` (the shared
connection's), ``on_connection_state_change`` — and is built from the same code: only
where its links live differs (:class:`~iothub_tls.amqp.shared.DeviceLinks` on a
:class:`~iothub_tls.amqp.shared.SharedConnection`).

A device's refusal is its own: a bad key or a disabled device raises
``AuthenticationError`` from :meth:`AmqpGateway.add_device` (or the device's
``connect()``), a link the hub refuses ends that device with ``NotAuthorizedError``, a
link the hub detaches for another reason is attached again after the device's back-off;
the other devices on the connection carry on. A lost connection is made again (one TLS
handshake, resumed, inside the process's :class:`~iothub_tls.aio.HandshakeGate`) and
brings every device back.

X.509 devices cannot share a connection: the device certificate is presented in the TLS
handshake, so a connection is one device's. :meth:`AmqpGateway.add_device` refuses them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from .._io.base import check_host, check_port
from .._io.loop import HandshakeGate, LoopLag
from .._io.proxy import Proxy, proxy_for
from ..auth import ConnectionString, SasTokenProvider
from ..errors import PolicyError
from ..policy import TlsPolicy
from ..tls.context import HardenedSSLContext, create_ssl_context
from .aio import AmqpDeviceClient
from .connection import AmqpConnection
from .options import AMQPS_PORT, AmqpOptions
from .shared import DeviceLinks, SharedConnection
from .websocket import WEBSOCKET_PORT

__all__ = ["DEVICES_PER_CONNECTION", "AmqpGateway", "GatewayDeviceClient"]

#: How many devices one connection carries by default (IoT Hub's AMQP multiplexing
#: limit per connection, as the Azure IoT SDKs document it).
DEVICES_PER_CONNECTION = 1000

X509_REFUSAL = (
    "device {id!r} authenticates with an X.509 certificate, and X.509 devices cannot share "
    "an AMQP connection (the certificate is presented in the TLS handshake, so a "
    "connection belongs to one device): connect it with its own "
    "iothub_tls.amqp.AmqpDeviceClient (or iothub_tls.aio.AmqpDeviceClient)"
)


class GatewayDeviceClient(AmqpDeviceClient):
    """A device of an :class:`AmqpGateway`, with the surface of
    :class:`iothub_tls.aio.AmqpDeviceClient`; its links live on a connection it shares
    with other devices. ``close()`` detaches its links (the connection stays);
    :meth:`AmqpGateway.remove_device` also frees its place on the connection."""

    def __init__(
        self,
        connection_string: ConnectionString,
        *,
        shared: SharedConnection,
        options: AmqpOptions,
        model_id: str | None = None,
        sas_token_provider: SasTokenProvider | None = None,
        lag: LoopLag | None = None,
    ) -> None:
        self._shared = shared
        super().__init__(
            connection_string,
            host=shared.host,
            port=shared.port,
            options=options,
            model_id=model_id,
            sas_token_provider=sas_token_provider,
            lag=lag,
        )

    def _make_connection(self, host: str, port: int, **kwargs: Any) -> AmqpConnection:
        links = self._shared.place(
            provider=kwargs["cbs_token_provider"],
            label=self.connection_string.client_id,
            options=kwargs["options"],
            on_state=kwargs["on_state"],
        )
        # DeviceLinks has the part of AmqpConnection's surface that the client and its
        # twin and method channels use
        return cast(AmqpConnection, links)

    @property
    def links(self) -> DeviceLinks:
        """This device's part of the shared connection (token puts, renewals)."""
        return cast(DeviceLinks, self._connection)

    @property
    def shared_connection(self) -> SharedConnection:
        """The connection this device shares with the gateway's other devices."""
        return self._shared

    def __repr__(self) -> str:
        shared = self._shared
        return (
            f"<GatewayDeviceClient {self.connection_string.client_id} -> "
            f"{shared.server_hostname} via {shared.host}:{shared.port} ({self.state.value})>"
        )


def device_connection_string(
    hub_host: str,
    connection_string: str | ConnectionString | None,
    device_id: str | None,
    key: str | None,
    module_id: str | None,
) -> ConnectionString:
    """The connection string of a device to add: given, or made from id and key."""
    if connection_string is not None:
        if device_id is not None or key is not None or module_id is not None:
            raise PolicyError("pass a connection string, or device_id and key, not both")
        return ConnectionString.coerce(connection_string)
    if device_id is None or key is None:
        raise PolicyError("add_device needs a connection string, or device_id= and key=")
    return ConnectionString(
        host_name=hub_host, device_id=device_id, module_id=module_id, shared_access_key=key
    )


class AmqpGateway:
    """Many SAS devices over few AMQP connections to one IoT Hub, for asyncio
    applications.

    :param hub_host: the hub (``myhub.azure-devices.net``): TLS server name, AMQP open
        hostname, and the ``HostName`` every added device must have.
    :param policy: the :class:`~iothub_tls.TlsPolicy` (default: IoT Hub's guidance); one
        hardened context serves every connection, so reconnections resume.
    :param port: default 5671.
    :param proxy: ``"http://[user:password@]host:port"`` (HTTP CONNECT),
        ``"socks5://..."``, ``"socks4://..."`` or ``"env"``, as on the device clients;
        TLS runs end to end with the hub through the tunnel.
    :param websockets: AMQP over WebSockets (port 443, ``/$iothub/websocket``), for
        networks that let only 443 through.
    :param host: where to dial instead of ``hub_host`` (a local hub, a port forward);
        SNI and the certificate check stay ``hub_host``'s.
    :param options: :class:`AmqpOptions` for the connections and the devices (timeouts,
        retry, credit, SAS token lifetime and renewal margin).
    :param devices_per_connection: devices per connection (default 1,000); one more
        device opens another connection.
    :param gate: the :class:`~iothub_tls.aio.HandshakeGate` shared by the process's
        connections.
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
        devices_per_connection: int = DEVICES_PER_CONNECTION,
        gate: HandshakeGate | None = None,
        lag: LoopLag | None = None,
    ) -> None:
        if websockets:
            from .websocket import require_websockets

            require_websockets()
        if not isinstance(hub_host, str) or not hub_host.strip():
            raise PolicyError(f"hub_host must be the hub's host name, not {hub_host!r}")
        options = AmqpOptions() if options is None else options
        if not isinstance(options, AmqpOptions):
            raise PolicyError(f"options must be AmqpOptions, not {type(options).__name__}")
        if (
            isinstance(devices_per_connection, bool)
            or not isinstance(devices_per_connection, int)
            or devices_per_connection < 1
        ):
            raise PolicyError(
                f"devices_per_connection must be a positive int, not {devices_per_connection!r}"
            )
        self.hub_host = hub_host.strip()
        self.host = check_host(host) or self.hub_host
        self.websockets = bool(websockets)
        self.port = check_port(port, WEBSOCKET_PORT if websockets else AMQPS_PORT)
        self.proxy = proxy_for(proxy, self.host, self.port)
        self.options = options
        self.devices_per_connection = devices_per_connection
        self._context = create_ssl_context(policy)
        self._gate = gate or HandshakeGate()
        self._lag = lag
        self._connections: list[SharedConnection] = []
        self._devices: dict[GatewayDeviceClient, None] = {}
        self._by_id: dict[str, GatewayDeviceClient] = {}
        self._closed = False

    # -- what it is -----------------------------------------------------------------------

    @property
    def ssl_context(self) -> HardenedSSLContext:
        return self._context

    @property
    def devices(self) -> tuple[GatewayDeviceClient, ...]:
        """The devices added (and not removed), in order."""
        return tuple(self._devices)

    @property
    def connections(self) -> tuple[SharedConnection, ...]:
        """The connections opened so far (each carries up to ``devices_per_connection``)."""
        return tuple(self._connections)

    @property
    def handshakes(self) -> int:
        """TLS handshakes completed by the gateway's connections (first connections and
        reconnections)."""
        return sum(c.handshakes for c in self._connections)

    def __repr__(self) -> str:
        return (
            f"<AmqpGateway {self.hub_host} via {self.host}:{self.port}: "
            f"{len(self._devices)} devices on {len(self._connections)} connections>"
        )

    # -- devices --------------------------------------------------------------------------

    def _place(self) -> SharedConnection:
        for shared in self._connections:
            if shared.has_room and shared.failure is None:
                return shared
        shared = SharedConnection(
            self.host,
            self.port,
            context=self._context,
            server_hostname=self.hub_host,
            open_hostname=self.hub_host,
            options=self.options,
            capacity=self.devices_per_connection,
            gate=self._gate,
            lag=self._lag,
            websockets=self.websockets,
            proxy=self.proxy,
        )
        self._connections.append(shared)
        return shared

    def new_device(
        self,
        connection_string: str | ConnectionString | None = None,
        *,
        device_id: str | None = None,
        key: str | None = None,
        module_id: str | None = None,
        model_id: str | None = None,
        sas_token_provider: SasTokenProvider | None = None,
    ) -> GatewayDeviceClient:
        """Add a device without connecting it (set its callbacks, then ``await
        device.connect()``). Same arguments and refusals as :meth:`add_device`."""
        if self._closed:
            raise PolicyError("this gateway was closed: make a new AmqpGateway")
        cs = device_connection_string(self.hub_host, connection_string, device_id, key, module_id)
        if cs.x509:
            raise PolicyError(X509_REFUSAL.format(id=cs.client_id))
        if cs.hostname.lower() != self.hub_host.lower():
            raise PolicyError(
                f"device {cs.client_id!r} belongs to {cs.hostname}, and this gateway connects "
                f"to {self.hub_host}: use a gateway for each hub"
            )
        if cs.client_id in self._by_id:
            raise PolicyError(
                f"device {cs.client_id!r} is already on this gateway: one client per device"
            )
        device = GatewayDeviceClient(
            cs,
            shared=self._place(),
            options=self.options,
            model_id=model_id,
            sas_token_provider=sas_token_provider,
            lag=self._lag,
        )
        self._devices[device] = None
        self._by_id[cs.client_id] = device
        return device

    async def add_device(
        self,
        connection_string: str | ConnectionString | None = None,
        *,
        device_id: str | None = None,
        key: str | None = None,
        module_id: str | None = None,
        model_id: str | None = None,
        sas_token_provider: SasTokenProvider | None = None,
    ) -> GatewayDeviceClient:
        """Add a device (a connection string with ``SharedAccessKey`` or
        ``SharedAccessSignature``, or ``device_id=`` and ``key=``) and connect it; return
        its client once its links are attached.

        :raises PolicyError: an X.509 device (it needs a connection of its own: use
            ``AmqpDeviceClient``), a device of another hub, a device already added.
        :raises AuthenticationError: the hub refused the device's token (wrong key,
            unknown or disabled device); the device is not kept.
        :raises ConnectionFailedError: (and the TLS errors of the core) the connection
            could not be made.
        """
        device = self.new_device(
            connection_string,
            device_id=device_id,
            key=key,
            module_id=module_id,
            model_id=model_id,
            sas_token_provider=sas_token_provider,
        )
        try:
            await device.connect()
        except BaseException:
            await self.remove_device(device)
            raise
        return device

    async def remove_device(self, device: GatewayDeviceClient) -> None:
        """Detach the device's links and free its place (the connection stays open for
        the others)."""
        if device not in self._devices:
            raise PolicyError(f"{device!r} is not a device of this gateway")
        del self._devices[device]
        self._by_id.pop(device.connection_string.client_id, None)
        await device.close()
        device.shared_connection.forget(device.links)

    # -- life cycle -----------------------------------------------------------------------

    async def __aenter__(self) -> AmqpGateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection (every device's operations fail with
        ``ConnectionFailedError``); the gateway cannot be used again."""
        self._closed = True
        for shared in list(self._connections):
            await shared.close()
        for device in list(self._devices):
            await device.close()

    async def connect_all(
        self, devices: Iterable[GatewayDeviceClient]
    ) -> list[BaseException | None]:
        """Connect devices made with :meth:`new_device` together; each one's error (or
        None) in order. A device that failed stays on the gateway (remove it, or call
        its ``connect()`` again)."""
        import asyncio

        results = await asyncio.gather(*(d.connect() for d in devices), return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]
