"""AMQP 1.0 over the hardened TLS connection, synchronously: :class:`AmqpDeviceClient`
for IoT Hub and the generic :class:`AmqpConnection` it is built on.

::

    from iothub_tls.amqp import AmqpDeviceClient

    with AmqpDeviceClient.from_connection_string(cs) as client:
        client.send_telemetry(b'{"t": 21.5}', {"unit": "C"}, content_type="application/json")
        message = client.receive_c2d(timeout=30)
        message.complete()

Both classes are facades over their asyncio twins in :mod:`iothub_tls.amqp.aio` (which
explains the protocol: SASL, claims-based security, links, reconnection). Every
synchronous client in a process shares one I/O thread (``iothub-tls-io``) running one
event loop, and one callback thread (``iothub-tls-callbacks``), however many devices it
holds; a connection has no thread of its own. Each call waits for the loop's answer,
except that a message to send is built and encoded in the caller's thread and handed to
the loop without a round trip through a coroutine.

Install the extra: ``pip install 'iothub-tls[amqp]'``.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .._io.backoff import RetryPolicy
from .._io.facade import SyncFacade
from .._io.lifecycle import Connectable
from .._io.loop import SharedLoop, shared_loop
from ..auth import ClientIdentity, ConnectionString, SasTokenProvider
from ..device import C2DMessage, ConnectionState, Message, MethodHandler
from ..errors import OperationTimeoutError
from ..policy import TlsPolicy
from ..tls.context import HardenedSSLContext
from ..tls.info import TlsInfo
from . import aio
from .links import AmqpDelivery, Outgoing
from .message import AmqpMessage
from .options import AMQPS_PORT, AmqpOptions

__all__ = [
    "AMQPS_PORT",
    "AmqpConnection",
    "AmqpDelivery",
    "AmqpDeviceClient",
    "AmqpMessage",
    "AmqpOptions",
    "AmqpReceiver",
    "AmqpSender",
    "C2DMessage",
    "RetryPolicy",
]

_T = TypeVar("_T")


class AmqpSender:
    """A sending link kept attached by an :class:`AmqpConnection`."""

    def __init__(self, connection: AmqpConnection, link: aio.AmqpSender) -> None:
        self._connection = connection
        self._link = link
        self.key = link.key
        self.address = link.address

    def send(self, message: AmqpMessage | bytes | str, timeout: float | None = None) -> None:
        """Send and wait for the peer's disposition.

        :raises DeliveryError: the peer rejected, released or modified the message.
        :raises OperationTimeoutError: no disposition within ``timeout``.
        """
        if not isinstance(message, AmqpMessage):
            message = AmqpMessage(body=message)
        self._connection._send(self.key, message, timeout)

    def __repr__(self) -> str:
        return repr(self._link)


class AmqpReceiver:
    """A receiving link kept attached by an :class:`AmqpConnection`; ``credit`` messages
    are prefetched, and a credit is given back as each one is settled."""

    def __init__(self, connection: AmqpConnection, link: aio.AmqpReceiver) -> None:
        self._connection = connection
        self._link = link
        self.key = link.key
        self.address = link.address

    def receive(self, timeout: float | None = None) -> AmqpDelivery | None:
        """The next message, or None when none arrived within ``timeout`` seconds.
        Settle it with ``accept()``, ``reject()`` or ``release()`` (from any thread)."""
        return self._connection._io.run(self._link.receive(timeout))

    def __repr__(self) -> str:
        return repr(self._link)


class AmqpConnection(Connectable):
    """An AMQP 1.0 connection over the hardened TLS context, with links that survive
    reconnects: the synchronous facade of :class:`iothub_tls.amqp.aio.AmqpConnection`,
    on the process's shared I/O loop.

    Declare links with :meth:`sender` / :meth:`receiver` (before or after
    :meth:`connect`); they are attached on every (re)connection. ``sasl`` is one of
    ``"ANONYMOUS"``, ``"EXTERNAL"`` (the TLS client certificate is the identity: pass
    ``identity``), ``"PLAIN"`` (``username``/``password``) or None for no SASL layer.
    ``cbs_token_provider`` enables claims-based security: its token is put on ``$cbs``
    before the links attach and renewed on the live connection before it expires.

    :param host: where to connect (TCP).
    :param server_hostname: the name sent in SNI and checked against the certificate
        (default: ``host``).
    :param open_hostname: the ``hostname`` of the AMQP open frame (default:
        ``server_hostname``).
    :param options: timeouts, reconnection and token renewal (:class:`AmqpOptions`).
    :param on_state: called with ``(state, reason)`` at each connection state change,
        on the I/O thread: it must not block.
    """

    def __init__(
        self,
        host: str,
        port: int = AMQPS_PORT,
        *,
        policy: TlsPolicy | None = None,
        identity: ClientIdentity | None = None,
        context: HardenedSSLContext | None = None,
        server_hostname: str | None = None,
        open_hostname: str | None = None,
        sasl: str | None = "ANONYMOUS",
        username: str | None = None,
        password: str | None = None,
        cbs_token_provider: SasTokenProvider | None = None,
        cbs_audience: str | None = None,
        container_id: str | None = None,
        options: AmqpOptions | None = None,
        on_state: Callable[[ConnectionState, BaseException | None], None] | None = None,
        websockets: bool = False,
        proxy: str | None = None,
    ) -> None:
        io = shared_loop()
        self._io = io
        self._aio = aio.AmqpConnection(
            host,
            port,
            policy=policy,
            identity=identity,
            context=context,
            server_hostname=server_hostname,
            open_hostname=open_hostname,
            sasl=sasl,
            username=username,
            password=password,
            cbs_token_provider=cbs_token_provider,
            cbs_audience=cbs_audience,
            container_id=container_id,
            options=options,
            on_state=on_state,
            gate=io.gate,
            lag=io.lag,
            websockets=websockets,
            proxy=proxy,
        )

    @classmethod
    def _over(cls, connection: aio.AmqpConnection, io: SharedLoop) -> AmqpConnection:
        """The facade of an asyncio connection that lives on ``io``."""
        facade = cls.__new__(cls)
        facade._io = io
        facade._aio = connection
        return facade

    # -- what it is -----------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._aio.host

    @property
    def port(self) -> int:
        return self._aio.port

    @property
    def server_hostname(self) -> str:
        return self._aio.server_hostname

    @property
    def options(self) -> AmqpOptions:
        return self._aio.options

    @property
    def operation_timeout(self) -> float:
        return self._aio.operation_timeout

    @property
    def ssl_context(self) -> HardenedSSLContext:
        return self._aio.ssl_context

    @property
    def tls_info(self) -> TlsInfo | None:
        """What the current (or last) TLS connection negotiated."""
        return self._aio.tls_info

    @property
    def connected(self) -> bool:
        return self._aio.connected

    @property
    def state(self) -> ConnectionState:
        return self._aio.state

    @property
    def reconnects(self) -> int:
        """How many times the connection was re-established."""
        return self._aio.reconnects

    @property
    def failure(self) -> BaseException | None:
        """The error that made the connection stop for good; None otherwise."""
        return self._aio.failure

    @property
    def token_puts(self) -> int:
        """How many CBS put-token requests were accepted (first one and renewals)."""
        return self._aio.token_puts

    def __repr__(self) -> str:
        return repr(self._aio)

    # -- links ----------------------------------------------------------------------------

    def _call(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` on the loop (directly when already there)."""
        if self._io.on_loop_thread:
            return fn()

        async def call() -> _T:
            return fn()

        return self._io.run(call())

    def sender(
        self, address: str, *, name: str | None = None, properties: Mapping[str, Any] | None = None
    ) -> AmqpSender:
        """Declare a sending link to ``address``."""
        link = self._call(lambda: self._aio.sender(address, name=name, properties=properties))
        return AmqpSender(self, link)

    def receiver(
        self,
        address: str,
        *,
        credit: int = 10,
        name: str | None = None,
        properties: Mapping[str, Any] | None = None,
        on_message: Callable[[AmqpMessage], None] | None = None,
        on_delivery: Callable[[AmqpDelivery], None] | None = None,
    ) -> AmqpReceiver:
        """Declare a receiving link from ``address`` with ``credit`` messages prefetched.

        With ``on_message``, each message is accepted as it arrives and handed to
        ``on_message`` on the I/O thread (for protocol code that must not block: it
        only hands the message on); :meth:`AmqpReceiver.receive` then gets nothing.
        With ``on_delivery``, each unsettled delivery is handed over instead (on the I/O
        thread too): whoever takes it settles it.
        """
        link = self._call(
            lambda: self._aio.receiver(
                address,
                credit=credit,
                name=name,
                properties=properties,
                on_message=on_message,
                on_delivery=on_delivery,
            )
        )
        return AmqpReceiver(self, link)

    # -- life cycle -----------------------------------------------------------------------

    def connect(self) -> None:
        """Connect, authenticate and attach the declared links.

        :raises ConnectionFailedError: TCP connection refused or lost during set-up, or
            already connected.
        :raises iothub_tls.TLSHandshakeError: (and subclasses) TLS refused; a peer that
            stalls the handshake raises :class:`~iothub_tls.HandshakeTimeoutError`.
        :raises AuthenticationError: SASL or the CBS put-token was refused.
        :raises OperationTimeoutError: the peer stalled SASL, open, CBS or attach.
        """
        self._io.run(self._aio.connect())

    def close(self, timeout: float = 5.0) -> None:
        """Close the connection (an AMQP close, then TLS close_notify). Messages still
        waiting for a disposition fail with :class:`~iothub_tls.ConnectionFailedError`."""
        self._io.run(self._aio.close(timeout))

    # -- messages -------------------------------------------------------------------------

    def _send(self, key: str, message: AmqpMessage, timeout: float | None) -> None:
        """Encode ``message`` here, queue it on the loop, wait for its disposition."""
        connection = self._aio
        limit = connection.operation_timeout if timeout is None else timeout
        if self._io.on_loop_thread:
            raise RuntimeError(
                "a blocking send was made on the iothub-tls I/O thread; send from another "
                "thread (callbacks of the synchronous clients never run on it)"
            )
        connection._raise_if_dead()
        waiter: concurrent.futures.Future[None] = concurrent.futures.Future()
        item = Outgoing(key, bytes(message._to_proton().encode()), waiter)
        self._io.call_soon(connection._post_item, item)
        try:
            # exception() returns an error set on the future instead of raising it, so
            # only this wait's own timeout is a TimeoutError here
            error = waiter.exception(limit)
        except concurrent.futures.TimeoutError:
            self._io.call_soon(connection._abandon, item)
            raise OperationTimeoutError(
                connection._timeout_text("the disposition of the message", limit)
            ) from None
        if error is not None:
            raise error


class AmqpDeviceClient(SyncFacade):
    """An IoT Hub device (or module) over AMQP 1.0 on port 5671.

    Build it with :meth:`from_connection_string`, :meth:`from_symmetric_key` or
    :meth:`from_x509`; use it as a context manager or call :meth:`connect` /
    :meth:`close`. Telemetry goes to ``/devices/{id}/messages/events``; cloud-to-device
    messages come from ``/devices/{id}/messages/devicebound``; the device twin
    (``/devices/{id}/twin``) and direct methods (``/devices/{id}/methods/devicebound``)
    use link pairs attached on first use — the first :meth:`get_twin` /
    :meth:`patch_reported`, setting :attr:`on_desired_update`, the first
    :meth:`on_method` — and re-attached after every reconnection.

    :param policy: the :class:`~iothub_tls.TlsPolicy` (default: IoT Hub's guidance).
    :param identity: the device certificate and key (X.509 authentication).
    :param host: / :param port: change only where the TCP connection goes (a local
        endpoint, a port forward); the TLS server name (SNI, certificate check) and the
        AMQP open hostname stay the hub's.
    :param options: :class:`AmqpOptions` (timeouts, retry, credit, token renewal).
    :param sas_token_provider: where SAS tokens come from (default: generated from the
        connection string's key, ``options.sas_ttl`` long).
    :param sasl_external: X.509 devices only: authenticate with SASL EXTERNAL instead of
        connecting without a SASL layer (IoT Hub and its SDKs use none).
    :param model_id: the IoT Plug and Play model the device implements (``dtmi:...``),
        announced on its links (``com.microsoft:model-id``).
    :param websockets: AMQP over WebSockets (``wss://{hub}/$iothub/websocket``,
        subprotocol ``AMQPWSB10``, port 443 by default; needs wsproto:
        ``pip install 'iothub-tls[websockets]'``).
    :param proxy: reach the hub through a proxy: ``"http://[user:password@]host:port"``
        (HTTP CONNECT), ``"socks5://[user:password@]host:port"``, ``"socks4://host:port"``,
        or ``"env"`` for ``HTTPS_PROXY``/``NO_PROXY``. TLS still runs end to end with the
        hub; a proxy refusal is :class:`~iothub_tls.ProxyError`.
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
        proxy: str | None = None,
    ) -> None:
        io = shared_loop()
        self._attach(
            aio.AmqpDeviceClient(
                connection_string,
                policy=policy,
                identity=identity,
                host=host,
                port=port,
                options=options,
                sas_token_provider=sas_token_provider,
                sasl_external=sasl_external,
                model_id=model_id,
                websockets=websockets,
                proxy=proxy,
                gate=io.gate,
                lag=io.lag,
            )
        )
        self._aio: aio.AmqpDeviceClient
        self._connection = AmqpConnection._over(self._aio.connection, io)
        self._events = AmqpSender(self._connection, self._aio._events)

    # -- what it is ---------------------------------------------------------------------

    @property
    def connection_string(self) -> ConnectionString:
        return self._aio.connection_string

    @property
    def events_address(self) -> str:
        return self._aio.events_address

    @property
    def devicebound_address(self) -> str:
        return self._aio.devicebound_address

    @property
    def connection(self) -> AmqpConnection:
        """The underlying AMQP connection (reconnect count, token renewals)."""
        return self._connection

    @property
    def options(self) -> AmqpOptions:
        return self._aio.options

    @property
    def ssl_context(self) -> HardenedSSLContext:
        """The hardened context every connection of this client uses."""
        return self._aio.ssl_context

    @property
    def failure(self) -> BaseException | None:
        """The error that made the client stop reconnecting (refused credentials or
        certificate, ``RetryPolicy.max_attempts`` used up); None otherwise."""
        return self._aio.failure

    @property
    def reconnect_count(self) -> int:
        """How many times the client reconnected since connect()."""
        return self._aio.reconnect_count

    # -- messaging ------------------------------------------------------------------------

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
        """Send a device-to-cloud message and wait until the hub accepts it. ``payload``
        is bytes, text or a :class:`~iothub_tls.Message`; a message without an id gets a
        random one (IoT Hub deduplicates nothing, but the id traces a message).

        :raises DeliveryError: the hub rejected or released it.
        :raises OperationTimeoutError: no disposition within ``timeout`` (default:
            ``options.operation_timeout``); while reconnecting the message is sent
            again on the new connection (at-least-once).
        """
        message = self._aio._telemetry(
            payload, properties, message_id, correlation_id, content_type, content_encoding
        )
        self._events.send(message, timeout)

    # -- twin and methods ---------------------------------------------------------------

    @property
    def on_desired_update(self) -> Callable[[dict[str, Any]], Any] | None:
        """Called (on the callback thread) with each desired-properties patch (a dict
        including ``$version``). Setting it on a connected client subscribes to the
        updates before the setter returns (and raises why it could not); on a client
        not connected yet, :meth:`connect` subscribes. Patches sent while the device was
        offline are not replayed: call :meth:`get_twin` when the state becomes CONNECTED
        again."""
        return self._aio.on_desired_update

    @on_desired_update.setter
    def on_desired_update(self, callback: Callable[[dict[str, Any]], Any] | None) -> None:
        self._run(self._aio._set_desired_callback(callback))

    def on_method(self, name: str | None, handler: MethodHandler | None) -> None:
        """Answer direct method ``name`` (``None``: every method without a handler of
        its own) with ``handler(request) -> (status, payload)``, run on the callback
        thread; ``handler=None`` removes it. On a connected client the method links are
        attached before this returns. Unknown methods are answered 404; a handler that
        raises, 500 (the exception goes to ``on_background_exception``)."""
        self._run(self._aio._set_method_handler(name, handler))
