"""The asyncio MQTT device client: :class:`MqttDeviceClient` of :mod:`iothub_tls.aio`.

One connection per client, driven by the event loop it runs on (any asyncio loop,
uvloop included); no thread of its own. The MQTT packets come from
:mod:`iothub_tls.mqtt.packets` and the topics and property bags from
:mod:`iothub_tls.mqtt.conventions` — the same modules the local hub uses. TLS comes from
:func:`iothub_tls.create_ssl_context`: asyncio runs the handshake with the hardened
context, so its checks and refusals are the core's own.

The synchronous :class:`iothub_tls.mqtt.MqttDeviceClient` is a facade over this class
running on the process's shared I/O loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import __version__
from .._io.aiobase import AsyncClientBase
from .._io.backoff import Backoff
from .._io.base import check_host, check_port
from .._io.loop import HandshakeGate, LoopLag, overload_hint, wait_for
from .._io.proxy import Proxy, proxy_for
from .._io.tls import open_tls
from .._io.waiter import ThreadWaiter
from ..auth import ConnectionString, SasTokenProvider
from ..device import (
    C2DMessage,
    ConnectionState,
    Message,
    Settlement,
    decode_twin_document,
    encode_reported_patch,
)
from ..errors import (
    AuthenticationError,
    ClientError,
    ConnectionFailedError,
    DeliveryError,
    HandshakeTimeoutError,
    IoTHubTLSError,
    NotAuthorizedError,
    OperationTimeoutError,
    QueueFullError,
)
from ..policy import TlsPolicy
from ..tls.context import HardenedSSLContext, create_ssl_context
from ..tls.info import TlsInfo
from . import packets
from .conventions import (
    METHODS_FILTER,
    MQTT_PORT,
    TWIN_DESIRED_FILTER,
    TWIN_RESPONSE_FILTER,
    WEBSOCKET_PATH,
    WEBSOCKET_PORT,
    MqttOptions,
    RequestTracker,
    c2d_filter,
    check_message_size,
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

if TYPE_CHECKING:
    from ..auth import ClientIdentity

__all__ = ["MqttDeviceClient"]

logger = logging.getLogger("iothub_tls.mqtt")

#: What a sender waits on: an asyncio future (asyncio senders), a concurrent future
#: (``send_telemetry_async``) or a ThreadWaiter (a blocking ``send_telemetry``).
Waiter = asyncio.Future[Any] | concurrent.futures.Future[Any] | ThreadWaiter


def _resolve(waiter: Waiter, result: Any = None, error: BaseException | None = None) -> None:
    """Complete a waiter unless it already is (withdrawn, timed out, cancelled)."""
    if waiter.done():
        return
    if error is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(result)


class _Outgoing:
    """A telemetry message on its way: queued, then in flight until its PUBACK. It holds
    one place in the queue (``counted``) until it is settled or withdrawn."""

    __slots__ = ("counted", "payload", "sent", "topic", "waiter")

    def __init__(self, topic: str, payload: bytes, waiter: Waiter) -> None:
        self.topic = topic
        self.payload = payload
        self.waiter = waiter
        self.sent = False
        self.counted = True


class _TwinRequest:
    __slots__ = ("deadline", "operation", "payload", "waiter")

    def __init__(
        self,
        operation: str,  # "GET" or "PATCH"
        payload: bytes,
        waiter: asyncio.Future[tuple[bytes, int | None]],
        deadline: float,
    ) -> None:
        self.operation = operation
        self.payload = payload
        self.waiter = waiter
        self.deadline = deadline


def _settle_mqtt(message: C2DMessage, how: Settlement) -> None:
    # IoT Hub's MQTT acknowledges a C2D message with its PUBACK, sent when it arrives.
    if how is not Settlement.COMPLETE:
        from .._io.base import unsupported

        raise unsupported(
            "MQTT",
            f"{how.value} of a cloud-to-device message",
            "each message is acknowledged (completed) when it arrives; use AMQP or HTTPS "
            "to reject or abandon messages",
        )


class _Link(asyncio.Protocol):
    """One connection's bytes: MQTT packets in and out."""

    def __init__(self, client: MqttDeviceClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.decoder = packets.Decoder(from_server=True)
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            received = self.decoder.feed(data)
        except packets.MqttProtocolError as exc:
            self.abort(exc)
            return
        for packet in received:
            self.client._on_packet(self, packet)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def abort(self, reason: BaseException | None = None) -> None:
        if not self.lost.done():
            self.lost.set_result(reason)
        if self.transport is not None:
            self.transport.abort()

    @property
    def ssl_object(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("ssl_object")


class MqttDeviceClient(AsyncClientBase):
    """An IoT Hub device (or module) over MQTT 3.1.1, for asyncio applications.

    The same surface as :class:`iothub_tls.mqtt.MqttDeviceClient`, with ``await``:
    ``async with client:``, ``await client.send_telemetry(...)``, ``await
    client.receive_c2d(timeout)``, ``async for message in client.c2d_messages()``;
    callbacks and method handlers may be coroutine functions. Keywords of the
    factories: ``policy``, ``identity``, ``host``, ``port``, ``websockets``, ``options``
    (:class:`~iothub_tls.mqtt.MqttOptions`), ``sas_token_provider``, ``model_id``,
    ``proxy`` (``"http://[user:password@]host:port"``, ``"socks5://..."``,
    ``"socks4://..."`` or ``"env"``; see :mod:`iothub_tls._io.proxy`).
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
        proxy: str | Proxy | None = None,
        gate: HandshakeGate | None = None,
        lag: LoopLag | None = None,
    ) -> None:
        options = MqttOptions() if options is None else options
        if not isinstance(options, MqttOptions):
            raise TypeError(f"options must be MqttOptions, not {type(options).__name__}")
        cs = ConnectionString.coerce(connection_string)
        cs.check_identity(identity)
        connect_host = check_host(host)
        self._port = check_port(port, WEBSOCKET_PORT if websockets else MQTT_PORT)
        super().__init__(options.operation_timeout)
        if websockets:
            from .._io.websocket import require_wsproto

            require_wsproto()
        self._cs = cs
        self._options = options
        self._connect_host = connect_host or cs.hostname
        self._server_hostname = cs.hostname
        self._websockets = bool(websockets)
        self._proxy = proxy_for(proxy, self._connect_host, self._port)
        # One context for the client's lifetime: it remembers TLS sessions, so every
        # reconnection resumes (IoT Hub guidance: fewer bytes and CPU per connection).
        self._context = create_ssl_context(policy, identity=identity)
        self._sas = sas_token_provider
        if self._sas is None and not cs.x509:
            self._sas = SasTokenProvider.from_connection_string(cs, ttl=options.sas_ttl)
        client_type = f"iothub-tls/{__version__}"
        if options.product_info:
            client_type += f" {options.product_info}"
        self._username = username(
            cs.host_name, cs.client_id, device_client_type=client_type, model_id=model_id
        )
        # the topic of a message without properties (most telemetry)
        self._plain_topic = telemetry_topic(cs.device_id, cs.module_id)
        self._gate = gate or HandshakeGate()
        self._lag = lag
        # connection state (loop only)
        self._link: _Link | None = None
        self._tls_info: TlsInfo | None = None
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._closed: asyncio.Event | None = None
        self._closing = False
        self._failure: BaseException | None = None
        self._reconnects = 0
        self._outbox: deque[_Outgoing] = deque()
        self._inflight: dict[int, _Outgoing] = {}
        self._outstanding = 0
        self._count_lock = threading.Lock()  # senders may reserve from other threads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_id = 0
        self._connack: asyncio.Future[packets.ConnAck] | None = None
        self._subacks: dict[int, asyncio.Future[packets.SubAck]] = {}
        # a list, not a deque: an empty deque is 600 bytes per client, and twin requests
        # wait here only while the device is offline
        self._twin_waiting: list[_TwinRequest] = []
        self._twins: RequestTracker[_TwinRequest] = RequestTracker(os.urandom(3).hex())
        self._ping_due = False
        self._ping_outstanding = False
        self._keepalive: asyncio.TimerHandle | None = None
        self._wake_serve: asyncio.Future[str] | None = None

    # -- what it is ---------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        return self._cs.device_id

    @property
    def module_id(self) -> str | None:
        return self._cs.module_id

    @property
    def username(self) -> str:
        """The MQTT user name sent in CONNECT."""
        return self._username

    @property
    def ssl_context(self) -> HardenedSSLContext:
        return self._context

    @property
    def options(self) -> MqttOptions:
        return self._options

    @property
    def connected(self) -> bool:
        return self._state is ConnectionState.CONNECTED

    @property
    def tls_info(self) -> TlsInfo | None:
        """What the current (or last) connection negotiated; None before connect()."""
        return self._tls_info

    @property
    def failure(self) -> BaseException | None:
        """The error that made the client stop reconnecting, else None."""
        return self._failure

    @property
    def reconnect_count(self) -> int:
        return self._reconnects

    @property
    def outstanding(self) -> int:
        """Telemetry messages not yet acknowledged by the hub (queued or in flight)."""
        return self._outstanding

    def __repr__(self) -> str:
        return (
            f"<MqttDeviceClient {self._cs.client_id} -> {self._server_hostname}:{self._port}"
            f"{' (websockets)' if self._websockets else ''}"
            f"{f' via {self._proxy.url}' if self._proxy else ''} {self._state.value}>"
        )

    # -- life cycle ---------------------------------------------------------------------

    async def __aenter__(self) -> MqttDeviceClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, authenticate and subscribe; return when the client is ready.

        The first connection is not retried: its failure is raised here (TLS refusals as
        the core raised them, refused credentials as ``AuthenticationError``, an
        unreachable host as ``ConnectionFailedError``, a server that does not answer
        MQTT as ``OperationTimeoutError``). Later losses are healed in the background and
        reported to ``on_connection_state_change``.
        """
        if self._task is not None and not self._task.done():
            assert self._first is not None
            await asyncio.shield(self._first)
            return
        loop = self._loop = asyncio.get_running_loop()
        self._closing = False
        self._failure = None
        if self._closed is not None and self._closed.is_set():
            self._closed = None  # made when something waits for the close (an Event: 0.8 KiB)
        self._first = loop.create_future()
        self._task = loop.create_task(self._supervise(), name=f"iothub-tls-mqtt-{self.device_id}")
        await asyncio.shield(self._first)

    async def close(self) -> None:
        """Disconnect cleanly and stop. Messages not yet acknowledged fail with
        ``DeliveryError``; a later :meth:`connect` starts afresh."""
        self._closing = True
        task = self._task
        if task is None:
            return
        self._wake("closing")
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), 10.0)
            except (TimeoutError, asyncio.TimeoutError):
                task.cancel()
        self._task = None

    def _closed_event(self) -> asyncio.Event:
        if self._closed is None:
            self._closed = asyncio.Event()
        return self._closed

    # -- the connection's life ----------------------------------------------------------

    async def _supervise(self) -> None:
        assert self._first is not None
        first = self._first
        retry = self._options.retry
        backoff = Backoff(retry) if retry is not None else None
        try:
            while True:
                self._set_state(ConnectionState.CONNECTING)
                try:
                    await self._establish()
                except BaseException as exc:
                    self._drop_link()
                    if isinstance(exc, asyncio.CancelledError) or self._closing:
                        self._finish(None, first_error=exc)
                        return
                    if not first.done():
                        self._finish(None, first_error=exc)
                        return
                    if is_permanent(exc):
                        logger.error("reconnecting is pointless, giving up: %s", exc)
                        self._finish(exc)
                        return
                    delay = backoff.next_delay() if backoff is not None else None
                    if backoff is None or delay is None:
                        logger.error(
                            "giving up after %d reconnection attempts: %s",
                            backoff.attempts if backoff is not None else 1,
                            exc,
                        )
                        self._finish(exc)
                        return
                    logger.warning(
                        "reconnection attempt %d failed (%s); next attempt in %.1f s",
                        backoff.attempts,
                        exc,
                        delay,
                    )
                    if await self._pause(delay):
                        self._finish(None)
                        return
                    continue
                if backoff is not None:
                    backoff.connected()
                self._set_state(ConnectionState.CONNECTED)
                if not first.done():
                    first.set_result(None)
                else:
                    self._reconnects += 1
                    logger.info("reconnected to %s (%s)", self._server_hostname, self._tls_info)
                reason, fault = await self._serve()
                if reason == "closing":
                    await self._disconnect()
                    self._finish(None)
                    return
                if reason == "renew":
                    await self._disconnect()
                else:
                    self._drop_link()
                self._requeue()
                self._set_state(ConnectionState.DISCONNECTED, self._lost_error(reason, fault))
                if backoff is not None:
                    backoff.lost()  # a healthy connection starts the schedule again
                if reason == "renew":
                    logger.info("reconnecting with a fresh SAS token")
                    continue
                if backoff is None:
                    error = ConnectionFailedError(
                        f"lost the connection to {self._server_hostname}; not reconnecting "
                        "(MqttOptions.retry is None): call connect() again"
                    )
                    logger.error("%s", error)
                    self._finish(error)
                    return
                delay = backoff.next_delay()
                if delay is None:
                    error = ConnectionFailedError(
                        f"lost the connection to {self._server_hostname} after "
                        f"{backoff.attempts} reconnections without a healthy connection; "
                        "giving up (RetryPolicy.max_attempts)"
                    )
                    logger.error("%s", error)
                    self._finish(error)
                    return
                logger.warning(
                    "lost the connection to %s; reconnecting in %.1f s",
                    self._server_hostname,
                    delay,
                )
                if await self._pause(delay):
                    self._finish(None)
                    return
        except BaseException as exc:  # pragma: no cover - a bug must not leave callers hanging
            logger.exception("the MQTT client's connection task failed")
            self._drop_link()
            self._finish(exc if not isinstance(exc, asyncio.CancelledError) else None)
            if not isinstance(exc, Exception):
                raise

    async def _pause(self, delay: float) -> bool:
        """Wait between attempts; True when close() was called meanwhile."""
        if self._closing:
            return True
        loop = asyncio.get_running_loop()
        self._wake_serve = loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._wake_serve), delay)
        except (TimeoutError, asyncio.TimeoutError):
            pass
        finally:
            self._wake_serve = None
        return self._closing

    def _wake(self, reason: str) -> None:
        waiter = self._wake_serve
        if waiter is not None and not waiter.done():
            waiter.set_result(reason)

    async def _establish(self) -> None:
        loop = asyncio.get_running_loop()
        queued = loop.time()
        async with self._gate.slot():
            waited = loop.time() - queued
            link = await self._open(waited)
            self._link = link
            try:
                await self._handshake_mqtt(link, waited)
            except BaseException:
                self._link = None
                link.abort()
                raise
        self._ping_outstanding = False
        self._schedule_keepalive()
        self._flush()

    async def _open(self, waited: float) -> _Link:
        """TCP, TLS (and the WebSocket upgrade): a link ready for MQTT."""
        options = self._options
        where = f"{self._connect_host}:{self._port}"
        link = _Link(self)
        ws: Any = None
        if self._websockets:
            from .._io.websocket import WebSocketClient

            ws = WebSocketClient(
                link, host=self._server_hostname, path=WEBSOCKET_PATH, subprotocol="mqtt"
            )
        inner: asyncio.Protocol = ws if self._websockets else link
        try:
            await open_tls(
                inner,
                self._connect_host,
                self._port,
                context=self._context,
                server_hostname=self._server_hostname,
                connect_timeout=options.connect_timeout,
                handshake_timeout=options.handshake_timeout,
                proxy=self._proxy,
            )
        except IoTHubTLSError as exc:
            # the core's TLS refusals, unchanged (a stalled handshake: say if we were slow)
            if isinstance(exc, HandshakeTimeoutError) and (
                hint := overload_hint(self._lag, waited)
            ):
                raise HandshakeTimeoutError(None, f"{exc}.{hint}") from exc
            raise
        except (TimeoutError, asyncio.TimeoutError):
            raise ConnectionFailedError(
                f"could not connect to {where} within {options.connect_timeout:g} s"
                + overload_hint(self._lag, waited)
            ) from None
        except OSError as exc:
            raise ConnectionFailedError(f"could not connect to {where}: {exc}") from exc
        if self._websockets:
            await wait_for(ws.upgraded, options.handshake_timeout)
        ssl_object = link.ssl_object
        found = getattr(ssl_object, "tls_info", None)
        if isinstance(found, TlsInfo):
            self._tls_info = found
        return link

    async def _handshake_mqtt(self, link: _Link, waited: float) -> None:
        """CONNECT / CONNACK, then the subscriptions."""
        loop = asyncio.get_running_loop()
        options = self._options
        password = self._sas.token().encode("utf-8") if self._sas is not None else None
        self._connack = loop.create_future()
        link.write(
            packets.connect(
                self._cs.client_id,
                username=self._username,
                password=password,
                keepalive=options.keepalive,
            )
        )
        ack = await self._await_reply(
            link,
            self._connack,
            "a CONNACK (the answer to MQTT CONNECT)",
            waited,
            closed="before answering MQTT CONNECT",
        )
        refusal = connack_error(ack.return_code, self._server_hostname)
        if refusal is not None:
            raise refusal[0]
        # (Re)subscribe every time: cheap, and correct whether or not the hub kept the
        # session. QoS 1 for C2D (the hub redelivers until PUBACK), 0 for twin/methods.
        filters = [(TWIN_RESPONSE_FILTER, 0), (TWIN_DESIRED_FILTER, 0), (METHODS_FILTER, 0)]
        if self._cs.module_id is None:
            filters.insert(0, (c2d_filter(self._cs.device_id), 1))
        packet_id = self._packet_id()
        waiter: asyncio.Future[packets.SubAck] = loop.create_future()
        self._subacks[packet_id] = waiter
        link.write(packets.subscribe(packet_id, filters))
        try:
            suback = await self._await_reply(
                link, waiter, "the SUBACKs", waited, closed="while subscribing"
            )
        finally:
            self._subacks.pop(packet_id, None)
        for (topic_filter, _), granted in zip(filters, suback.granted, strict=False):
            if granted >= 0x80:
                raise NotAuthorizedError(
                    f"{self._server_hostname} refused the subscription to {topic_filter} "
                    "(SUBACK 0x80): this identity may not use that feature"
                )

    async def _await_reply(
        self, link: _Link, waiter: asyncio.Future[Any], what: str, waited: float, *, closed: str
    ) -> Any:
        timeout = self._options.connect_timeout
        done, _ = await asyncio.wait(
            {waiter, link.lost}, timeout=timeout, return_when="FIRST_COMPLETED"
        )
        if waiter in done:
            return waiter.result()
        if link.lost in done:
            raise self._closed_before_reply(link.lost.result(), closed)
        raise OperationTimeoutError(
            f"no answer from {self._server_hostname} within {timeout:g} s while waiting for "
            f"{what}: the server accepted TLS but does not answer MQTT"
            + overload_hint(self._lag, waited)
        )

    def _closed_before_reply(self, fault: BaseException | None, when: str) -> ClientError:
        host = self._server_hostname
        detail = f"{type(fault).__name__}: {fault}" if fault is not None else None
        if isinstance(fault, ClientError):
            return fault
        if detail is not None and is_certificate_alert(detail):
            error: ClientError = AuthenticationError(
                f"{host} refused the device certificate ({detail}): check that the "
                "certificate is registered with (or chains to a CA trusted by) the server"
            )
        else:
            hint = ""
            if self._context.identity is not None:
                hint = (
                    " If the server checks client certificates it may have refused the "
                    "device certificate (TLS 1.3 servers do so after the handshake)."
                )
            error = ConnectionFailedError(
                f"{host} closed the connection {when}"
                f"{f' ({detail})' if detail else ''}: it may not speak MQTT 3.1.1 on this "
                f"port, or it refused the connection.{hint}"
            )
        error.__cause__ = fault
        return error

    async def _serve(self) -> tuple[str, BaseException | None]:
        """Until the connection ends: ("closing"|"renew"|"lost", the fault)."""
        link = self._link
        assert link is not None
        loop = asyncio.get_running_loop()
        self._wake_serve = loop.create_future()
        waiting: set[asyncio.Future[Any]] = {self._wake_serve, link.lost}
        try:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake, self._wake_serve = self._wake_serve, None
        if wake in done:
            return wake.result(), None
        return "lost", link.lost.result()

    def _lost_error(self, reason: str, fault: BaseException | None) -> ClientError | None:
        if reason == "renew":
            return None
        error = ConnectionFailedError(
            f"lost the connection to {self._server_hostname}"
            f"{f': {type(fault).__name__}: {fault}' if fault is not None else ''}"
        )
        error.__cause__ = fault
        return error

    async def _disconnect(self) -> None:
        """A clean MQTT DISCONNECT, then close the connection (bounded in time)."""
        link = self._link
        self._link = None
        self._cancel_timers()
        if link is None or link.transport is None:
            return
        link.write(packets.disconnect())
        link.transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(link.lost), 2.0)
        except (TimeoutError, asyncio.TimeoutError):
            link.abort()

    def _drop_link(self) -> None:
        link, self._link = self._link, None
        self._cancel_timers()
        if link is not None:
            link.abort()

    def _cancel_timers(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
        self._keepalive = None

    def _requeue(self) -> None:
        """After a lost connection: messages in flight go back to the front of the queue
        (sent again: at-least-once); unanswered twin requests are asked again."""
        resend = [self._inflight[pid] for pid in sorted(self._inflight)]
        self._inflight.clear()
        for item in reversed(resend):
            item.sent = False
            self._outbox.appendleft(item)
        pending = [request for _, request in self._twins.pending()]
        self._twins.drain()
        self._twin_waiting[:0] = pending

    def _finish(
        self, failure: BaseException | None, first_error: BaseException | None = None
    ) -> None:
        """No more connections: settle what waits, report CLOSED."""
        self._failure = failure
        self._drop_link()
        reason = (
            f"the connection failed for good ({failure})"
            if failure is not None
            else "the client was closed"
        )
        first = self._first
        if first is not None and not first.done():
            if first_error is not None and not isinstance(first_error, asyncio.CancelledError):
                first.set_exception(first_error)
            else:
                first.set_exception(ConnectionFailedError("the client was closed while connecting"))
        messages = [*self._inflight.values(), *self._outbox]
        self._inflight.clear()
        self._outbox.clear()
        for item in messages:
            self._release(item)
            error = DeliveryError(f"{reason} before the hub acknowledged the message")
            error.__cause__ = failure
            _resolve(item.waiter, error=error)
        for request in [*self._twin_waiting, *(r for _, r in self._twins.pending())]:
            lost = ConnectionFailedError(f"{reason} before the hub answered the twin request")
            lost.__cause__ = failure
            _resolve(request.waiter, error=lost)
        self._twin_waiting.clear()
        self._twins.drain()
        self._set_state(
            ConnectionState.CLOSED,
            failure
            or (first_error if not isinstance(first_error, asyncio.CancelledError) else None),
        )
        self._closed_event().set()

    # -- timers -------------------------------------------------------------------------

    def _schedule_keepalive(self) -> None:
        """A PINGREQ when the connection was quiet for half the keep-alive; the link is
        dead when the next check finds the PINGRESP still missing."""
        loop = asyncio.get_running_loop()
        self._keepalive = loop.call_later(self._tick_interval(), self._keepalive_tick)
        self._ping_due = True

    def _tick_interval(self) -> float:
        return self._options.keepalive / 2

    def _keepalive_tick(self) -> None:
        link = self._link
        if link is None:
            return
        if self._renewal_due():
            self._wake("renew")
            return
        if self._ping_outstanding:
            link.abort(
                OperationTimeoutError(
                    f"{self._server_hostname} did not answer a keep-alive PINGREQ within "
                    f"{self._options.keepalive / 2:g} s" + overload_hint(self._lag, 0.0)
                )
            )
            return
        if self._ping_due:  # nothing was sent since the last tick
            link.write(packets.pingreq())
            self._ping_outstanding = True
        self._schedule_keepalive()

    def _renewal_due(self) -> bool:
        """IoT Hub's MQTT takes a new SAS token only in CONNECT: reconnect with a fresh one
        when the current one nears its end (checked at every keep-alive tick, at most
        half of 1177 s apart, well inside the 20 % of a token's life kept in reserve)."""
        sas = self._sas
        return sas is not None and sas.renewable and sas.needs_renewal()

    # -- packets from the hub -----------------------------------------------------------

    def _on_packet(self, link: _Link, packet: packets.Packet) -> None:
        self._ping_outstanding = False
        if isinstance(packet, packets.PubAck):
            item = self._inflight.pop(packet.packet_id, None)
            if item is not None:
                self._release(item)
                _resolve(item.waiter)
        elif isinstance(packet, packets.Publish):
            if packet.qos == 1 and packet.packet_id is not None:
                link.write(packets.puback(packet.packet_id))
                self._ping_due = False
            self._route(packet.topic, packet.payload)
        elif isinstance(packet, packets.ConnAck):
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(packet)
        elif isinstance(packet, packets.SubAck):
            waiter = self._subacks.get(packet.packet_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(packet)

    def _route(self, topic: str, payload: bytes) -> None:
        response = parse_twin_response(topic)
        if response is not None:
            request = self._twins.finish(response.request_id)
            if request is not None:
                error = twin_error(response.status, request.operation, payload)
                if error is not None:
                    _resolve(request.waiter, error=error)
                else:
                    _resolve(request.waiter, (payload, response.version))
            return
        is_desired, _version = parse_desired_patch(topic)
        if is_desired:
            try:
                patch = decode_twin_document(payload)
            except ClientError as exc:
                self._report(exc)
                return
            self._incoming_desired(patch)
            return
        request_topic = parse_method_request(topic)
        if request_topic is not None:
            rid = request_topic.request_id
            self._incoming_method(
                request_topic.name,
                rid,
                payload,
                lambda status, body: self._respond(status, rid, body),
            )
            return
        message = parse_c2d(topic, payload, self._cs.device_id, settler=_settle_mqtt)
        if message is not None:
            self._incoming_c2d(message)
            return
        logger.debug("ignoring a message on unexpected topic %r", topic)

    def _respond(self, status: int, request_id: str, body: bytes) -> None:
        link = self._link
        if link is None:
            logger.warning(
                "the connection was lost before the answer to method request %s could be "
                "sent; the caller will see a timeout",
                request_id,
            )
            return
        link.write(packets.publish(method_response_topic(status, request_id), body))
        self._ping_due = False

    # -- telemetry ----------------------------------------------------------------------

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._inflight and self._next_id not in self._subacks:
                return self._next_id
        raise QueueFullError("65535 messages are in flight: no MQTT packet id is free")

    def _reserve(self) -> None:
        """Take a place in the queue for one message, or refuse it (any thread)."""
        if self._task is None or self._closing:
            raise ClientError("the client is not connected: call connect() first")
        if self._failure is not None:
            error = ConnectionFailedError(f"the client stopped reconnecting after: {self._failure}")
            error.__cause__ = self._failure
            raise error
        with self._count_lock:
            if self._outstanding >= self._options.queue_size:
                raise QueueFullError(
                    f"{self._outstanding} messages are already waiting for the hub's "
                    f"acknowledgement (queue_size={self._options.queue_size}"
                    f"{'' if self.connected else ', the client is reconnecting'}); the "
                    "message was not accepted: retry later or raise MqttOptions.queue_size"
                )
            self._outstanding += 1

    def _release(self, item: _Outgoing) -> None:
        """Give back a message's place in the queue, once (any thread)."""
        with self._count_lock:
            if item.counted:
                item.counted = False
                self._outstanding -= 1

    def _enqueue(self, topic: str, payload: bytes, waiter: asyncio.Future[None]) -> _Outgoing:
        """Queue a telemetry message (on the loop)."""
        self._reserve()
        item = _Outgoing(topic, payload, waiter)
        self._enqueue_item(item)
        return item

    def _outgoing_threadsafe(
        self, topic: str, payload: bytes, waiter: concurrent.futures.Future[None] | ThreadWaiter
    ) -> _Outgoing:
        """A message of a synchronous sender (any thread), its place taken already:
        cancelling a future ``waiter`` withdraws it at once, before or after it reaches
        the loop (a ThreadWaiter's sender calls :meth:`_cancelled` itself)."""
        item = _Outgoing(topic, payload, waiter)
        if isinstance(waiter, concurrent.futures.Future):

            def withdrawn(done: concurrent.futures.Future[Any]) -> None:
                if done.cancelled():
                    self._cancelled(item)

            waiter.add_done_callback(withdrawn)
        return item

    def _enqueue_item(self, item: _Outgoing) -> None:
        """Put a message in the queue (on the loop) and send it if connected."""
        if item.waiter.cancelled():
            return  # withdrawn before it got here
        if self._task is None or self._task.done():  # closed after the place was taken
            self._release(item)
            _resolve(item.waiter, error=DeliveryError("the client was closed before sending"))
            return
        self._outbox.append(item)
        if self._link is not None and self._state is ConnectionState.CONNECTED:
            self._flush()

    def _cancelled(self, item: _Outgoing) -> None:
        """A synchronous sender withdrew ``item`` (any thread): its place is free now."""
        self._release(item)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._drop_from_outbox, item)

    def _drop_from_outbox(self, item: _Outgoing) -> None:
        try:
            self._outbox.remove(item)
        except ValueError:
            pass

    def _flush(self) -> None:
        """Send what is queued, back to back in one write."""
        link = self._link
        if link is None:
            return
        chunks: list[bytes] = []
        outbox = self._outbox
        while outbox:
            item = outbox.popleft()
            waiter = item.waiter
            if isinstance(waiter, asyncio.Future):
                if waiter.done():
                    self._release(item)
                    continue
            # a synchronous sender's (a message sent again after a reconnection is
            # running already)
            elif not waiter.running() and not waiter.set_running_or_notify_cancel():
                self._release(item)  # the sender timed out and withdrew it
                continue
            packet_id = self._packet_id()
            item.sent = True
            self._inflight[packet_id] = item
            chunks.append(packets.publish(item.topic, item.payload, 1, packet_id))
        loop_time = asyncio.get_running_loop().time() if self._twin_waiting else 0.0
        while self._twin_waiting:
            request = self._twin_waiting.pop(0)
            if request.waiter.done():
                continue
            rid = self._twins.start(request, request.deadline)
            topic = twin_get_topic(rid) if request.operation == "GET" else twin_patch_topic(rid)
            chunks.append(packets.publish(topic, request.payload))
            self._schedule_twin_expiry(request.deadline - loop_time)
        if chunks:
            link.write(b"".join(chunks) if len(chunks) > 1 else chunks[0])
            self._ping_due = False

    def _withdraw(self, item: _Outgoing) -> bool:
        """Take back a message that was not sent yet; True when it was withdrawn."""
        if item.sent:
            return False
        try:
            self._outbox.remove(item)
        except ValueError:
            return False
        self._release(item)
        return True

    def _outgoing(
        self,
        payload: bytes | str | Message,
        properties: Mapping[str, str] | None,
        message_id: str | None,
        correlation_id: str | None,
        content_type: str | None,
        content_encoding: str | None,
    ) -> tuple[str, bytes]:
        """(topic, payload) of a telemetry message given as ``send_telemetry`` takes
        it; TypeError, ValueError or MessageTooLargeError for one that cannot be sent."""
        if (
            type(payload) is bytes
            and properties is None
            and message_id is None
            and correlation_id is None
            and content_type is None
            and content_encoding is None
        ):
            # bytes without properties (most telemetry): nothing to check or encode
            # but the size, on the topic without a property bag
            topic = self._plain_topic
            check_message_size(topic, payload)
            return topic, payload
        message = Message.coerce(
            payload,
            properties,
            message_id=message_id,
            correlation_id=correlation_id,
            content_type=content_type,
            content_encoding=content_encoding,
        )
        return self._topic_for(message), message.payload

    def _topic_for(self, message: Message) -> str:
        topic = telemetry_topic(
            self._cs.device_id,
            self._cs.module_id,
            message.properties,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
        )
        check_message_size(topic, message.payload)
        return topic

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
        """Send a device-to-cloud message; return once the hub acknowledged it (PUBACK).

        While disconnected the message waits in the queue. :raises
        OperationTimeoutError: not acknowledged within ``timeout`` (default
        ``MqttOptions.operation_timeout``); a message still queued is withdrawn (the
        error says so). :raises QueueFullError: too many messages pending. :raises
        DeliveryError: the client was closed or gave up first.
        """
        topic, data = self._outgoing(
            payload, properties, message_id, correlation_id, content_type, content_encoding
        )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        item = self._enqueue(topic, data, waiter)
        limit = self._options.operation_timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(asyncio.shield(waiter), limit)
        except (TimeoutError, asyncio.TimeoutError):
            if self._withdraw(item):
                raise OperationTimeoutError(
                    f"the message could not be sent within {limit:g} s (no connection); it "
                    "was withdrawn and will not be sent"
                ) from None
            raise OperationTimeoutError(
                f"the hub did not acknowledge the message within {limit:g} s; it was sent "
                "and may still be delivered"
            ) from None

    # -- cloud-to-device ----------------------------------------------------------------

    async def receive_c2d(self, timeout: float | None = None) -> C2DMessage:
        """The next cloud-to-device message (those not taken by ``on_c2d``); over MQTT it
        was acknowledged when it arrived.

        :raises OperationTimeoutError: none arrived within ``timeout``.
        :raises UnsupportedOperationError: for a module identity.
        """
        if self._cs.module_id is not None:
            from .._io.base import unsupported

            raise unsupported(
                "MQTT",
                "cloud-to-device messages for modules",
                "use direct methods or the module twin instead",
            )
        return await self._receive_c2d(timeout)

    # -- device twin --------------------------------------------------------------------

    def _schedule_twin_expiry(self, delay: float) -> None:
        asyncio.get_running_loop().call_later(max(delay, 0.0), self._expire_twins)

    def _expire_twins(self) -> None:
        now = asyncio.get_running_loop().time()
        expired = self._twins.expire(now)
        expired += [r for r in self._twin_waiting if r.deadline <= now]
        self._twin_waiting = [r for r in self._twin_waiting if r.deadline > now]
        for request in expired:
            _resolve(
                request.waiter,
                error=OperationTimeoutError(
                    f"the hub did not answer the twin {request.operation} in time"
                ),
            )

    async def _twin(
        self, operation: str, payload: bytes, timeout: float | None
    ) -> tuple[bytes, int | None]:
        if self._task is None or self._closing:
            raise ClientError("the client is not connected: call connect() first")
        loop = asyncio.get_running_loop()
        wait = self._options.operation_timeout if timeout is None else timeout
        waiter: asyncio.Future[tuple[bytes, int | None]] = loop.create_future()
        request = _TwinRequest(operation, payload, waiter, loop.time() + wait)
        self._twin_waiting.append(request)
        self._schedule_twin_expiry(wait)
        if self._link is not None and self._state is ConnectionState.CONNECTED:
            self._flush()
        try:
            return await waiter
        except OperationTimeoutError:
            raise OperationTimeoutError(
                f"the hub did not answer the twin {operation} within {wait:g} s"
            ) from None

    async def get_twin(self, timeout: float | None = None) -> dict[str, Any]:
        """The device twin: ``{"desired": {...}, "reported": {...}}``."""
        body, _version = await self._twin("GET", b"", timeout)
        return decode_twin_document(body)

    async def patch_reported(
        self, patch: Mapping[str, Any], timeout: float | None = None
    ) -> int | None:
        """Update reported properties (``None`` deletes one); the twin's new
        ``$version`` when the hub reports it."""
        _body, version = await self._twin("PATCH", encode_reported_patch(patch), timeout)
        return version
