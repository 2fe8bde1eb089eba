"""One AMQP connection shared by many SAS devices, on an asyncio event loop:
:class:`SharedConnection`, and :class:`DeviceLinks`, one device's part of it.

:class:`SharedConnection` is an :class:`~iothub_tls.amqp.connection.AmqpConnection`
(the single-device client's connection: its supervisor, back-off, handshake gate,
session resumption, at-least-once resending and settlement are used unchanged) whose
engine is a :class:`~iothub_tls.amqp.multiplex.MultiplexProtocol`: every (re)connection
makes one TLS handshake, then puts each member device's token on ``$cbs`` and attaches
its links.

:class:`DeviceLinks` offers one device the part of :class:`AmqpConnection`'s surface
that :class:`~iothub_tls.amqp.aio.AmqpDeviceClient` and its twin and method channels
use (links declared by name, ``_post``/``_send``, ready hooks, attach waits, its own
life and failure). The device's link keys on the shared connection are its local names
prefixed with its current *group* (a new one at every join), so nothing of an earlier
join can be mistaken for the current one. A device fails alone: a refused token or an
unauthorized link ends that device (its error is raised by its operations), a link the
hub detached otherwise is attached again after the device's own back-off; losing the
connection takes every device down and the next connection brings every one back.

Everything here runs on the loop, except what :class:`AmqpConnection` says may be
called from a thread (``_post_item``, scheduled by the synchronous facades).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from .._io.backoff import Backoff
from .._io.loop import HandshakeGate, LoopLag, overload_hint
from .._io.proxy import Proxy
from ..auth import SasTokenProvider
from ..device import ConnectionState
from ..errors import (
    ClientError,
    ConnectionFailedError,
    DeliveryError,
    OperationTimeoutError,
    PolicyError,
)
from ..tls.context import HardenedSSLContext
from ..tls.info import TlsInfo
from .connection import (
    AmqpConnection,
    AttachedLinks,
    _as_client_error,
    _Reporting,
    _retrieve,
    renewal_delay,
)
from .links import AmqpDelivery, AmqpReceiver, AmqpSender, Outgoing, resolve
from .message import AmqpMessage
from .options import AmqpOptions

if TYPE_CHECKING:
    from .multiplex import DeviceAuthorized, DeviceReady, DeviceRefused

__all__ = ["DeviceLinks", "SharedConnection", "renewal_draw"]

logger = logging.getLogger("iothub_tls.amqp")

StateCallback = Callable[[ConnectionState, "BaseException | None"], None]

#: the group of a message posted while its device is between joins (never live)
_NO_GROUP = "-"


#: the golden ratio's fractional part: n times it, modulo 1, fills [0, 1) evenly
_GOLDEN = 0.6180339887498949


def renewal_draw(slot: int) -> float:
    """Where in its renewal window (0: at the end, 1: at the start) the device in
    ``slot`` of a connection renews its SAS token: the fractional part of ``slot`` times
    the golden ratio. The first n slots cut [0, 1) into gaps of at most three sizes,
    the largest under 2.7 / n (the three-gap theorem), so a connection's renewals are
    spread evenly over the window whatever its number of devices, where random draws
    would bunch (1,000 uniform draws over a 360 s window put up to about 10 in one
    second)."""
    if slot < 0:
        raise ValueError("slot must be >= 0")
    return (slot * _GOLDEN) % 1.0


def _local(key: str) -> str:
    return key.partition(":")[2]


def _group(key: str) -> str:
    return key.partition(":")[0]


@dataclass(frozen=True)
class _Spec:
    address: str
    sender: bool
    properties: Mapping[str, Any]
    credit: int


class SharedConnection(AmqpConnection):
    """One AMQP connection (SASL ANONYMOUS, then a ``$cbs`` put-token per device) for
    up to ``capacity`` devices, each a :class:`DeviceLinks` placed with :meth:`place`.

    :param context: the hardened context (shared by a gateway's connections, so that
        every reconnection resumes its TLS session).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        context: HardenedSSLContext,
        server_hostname: str,
        open_hostname: str,
        options: AmqpOptions,
        capacity: int,
        gate: HandshakeGate | None = None,
        lag: LoopLag | None = None,
        websockets: bool = False,
        proxy: Proxy | None = None,
    ) -> None:
        super().__init__(
            host,
            port,
            context=context,
            server_hostname=server_hostname,
            open_hostname=open_hostname,
            sasl="ANONYMOUS",
            options=options,
            on_state=self._connection_state,
            gate=gate,
            lag=lag,
            websockets=websockets,
            proxy=proxy,
        )
        from . import multiplex  # proton (the amqp extra), as _engine() imports it

        self._multiplex = multiplex
        self.capacity = capacity
        self._members: dict[DeviceLinks, None] = {}  # placed here, in order
        self._live: dict[str, DeviceLinks] = {}  # group on the current engine -> device
        self._groups_made = 0
        self._slots_given = 0
        self._connect_task: asyncio.Task[None] | None = None
        #: TLS handshakes completed (one per connection made), and how many resumed
        self.handshakes = 0
        self.resumed = 0

    def __repr__(self) -> str:
        return (
            f"<SharedConnection {self.server_hostname} via {self.host}:{self.port} "
            f"{len(self._members)} devices {self.state.value}>"
        )

    # -- membership -----------------------------------------------------------------------

    @property
    def members(self) -> int:
        """Devices placed on this connection."""
        return len(self._members)

    @property
    def has_room(self) -> bool:
        return len(self._members) < self.capacity

    def place(
        self,
        *,
        provider: SasTokenProvider,
        label: str,
        options: AmqpOptions,
        on_state: StateCallback | None,
    ) -> DeviceLinks:
        """A new device's part of this connection (it joins at its ``connect()``)."""
        if not self.has_room:
            raise PolicyError(f"this connection already carries {self.capacity} devices")
        device = DeviceLinks(
            self,
            provider=provider,
            label=label,
            options=options,
            on_state=on_state,
            draw=renewal_draw(self._slots_given),
        )
        self._slots_given += 1
        self._members[device] = None
        return device

    def forget(self, device: DeviceLinks) -> None:
        """``device`` leaves the connection for good (it must be closed)."""
        self._leave(device)
        self._members.pop(device, None)

    async def _ensure_connected(self) -> None:
        """Connect unless connected (or reconnecting); every device joining meanwhile
        waits for the same attempt."""
        task = self._connect_task
        if task is None or (task.done() and not self._running):
            task = self._connect_task = asyncio.get_running_loop().create_task(self.connect())
        await asyncio.shield(task)

    def _join(self, device: DeviceLinks) -> None:
        """Put ``device`` on the current engine (else it joins with the next one)."""
        proto = self._protocol
        if proto is not None and device._group is None:
            self._add_group(proto, device)
            self._kick()

    def _leave(self, device: DeviceLinks) -> None:
        group = device._group
        device._group = None
        if group is None or self._live.pop(group, None) is None:
            return
        for local in device._receivers:
            self._receivers.pop(f"{group}:{local}", None)
        proto = self._protocol
        if proto is not None:
            proto.remove_group(group)
            self._kick()

    def _add_group(self, proto: Any, device: DeviceLinks) -> None:
        try:
            token = device._provider.token()
        except ClientError as exc:
            device._refused(exc, True)
            return
        self._groups_made += 1
        group = f"g{self._groups_made}"
        device._group = group
        self._live[group] = device
        for local, handle in device._receivers.items():
            self._receivers[f"{group}:{local}"] = handle
        specs = [device._link_spec(group, local) for local in device._specs]
        proto.add_group(group, device._provider.resource_uri, specs, token)

    def _declared(self, device: DeviceLinks, local: str) -> None:
        """A device declared one more link: attach it on a live group."""
        group, proto = device._group, self._protocol
        if group is None or proto is None or self._live.get(group) is not device:
            return
        handle = device._receivers.get(local)
        if handle is not None:
            self._receivers[f"{group}:{local}"] = handle
        proto.add_link(group, device._link_spec(group, local))
        self._kick()

    def _renew_token(self, device: DeviceLinks, token: str) -> None:
        group, proto = device._group, self._protocol
        if group is not None and proto is not None and self._live.get(group) is device:
            proto.renew(group, token)
            self._kick()

    # -- the connection (AmqpConnection's hooks) ------------------------------------------

    def _new_protocol(self) -> Any:
        eng = self._engine
        engine = eng.Engine(
            container_id=self._container_id,
            hostname=self._open_hostname,
            sasl=self._sasl,
            idle_timeout=self.options.idle_timeout,
        )
        proto = self._multiplex.MultiplexProtocol(
            engine, peer=f"{self.server_hostname} ({self.host}:{self.port})"
        )
        self._live.clear()
        for device in list(self._members):
            device._group = None
            if device._wants and device._dead is None:
                self._add_group(proto, device)
        return proto

    async def _set_up(self, wire: Any, deadline: float, waited: float) -> None:
        self.handshakes += 1
        info = wire.tls_info
        if info is not None and info.session_reused:
            self.resumed += 1
        await super()._set_up(wire, deadline, waited)

    def _drop_connection(self) -> None:
        live, self._live = list(self._live.values()), {}
        for device in live:
            device._group = None
            device._off_connection()
        super()._drop_connection()

    def _connection_state(self, state: ConnectionState, reason: BaseException | None) -> None:
        if state is ConnectionState.DISCONNECTED:
            for device in list(self._members):
                device._lost(reason)
        elif state is ConnectionState.CLOSED:
            error = self._dead or ConnectionFailedError("the shared AMQP connection was closed")
            for device in list(self._members):
                if device._wants and device._dead is None:
                    device._end(error, reason)

    def _on_event(self, event: Any) -> None:
        mux = self._multiplex
        if isinstance(event, mux.DeviceAuthorized | mux.DeviceReady | mux.DeviceRefused):
            self._on_device_event(event)
        elif isinstance(event, self._engine.Attached):
            device = self._live.get(_group(event.key))
            if device is not None:
                device._attached_link(_local(event.key))
        else:
            super()._on_event(event)

    def _on_device_event(self, event: DeviceAuthorized | DeviceReady | DeviceRefused) -> None:
        device = self._live.get(event.group)
        if device is None:
            return
        mux = self._multiplex
        if isinstance(event, mux.DeviceAuthorized):
            self._token_puts += 1
            device._authorized()
        elif isinstance(event, mux.DeviceReady):
            device._ready_now()
        else:
            refused = cast("DeviceRefused", event)
            self._live.pop(refused.group, None)
            for local in device._receivers:
                self._receivers.pop(f"{refused.group}:{local}", None)
            device._group = None
            device._refused(refused.error, refused.permanent)

    def _submit(self, item: Outgoing) -> None:
        if _group(item.key) in self._live:
            super()._submit(item)

    def _settle_now(self, delivery: AmqpDelivery, outcome: str) -> None:
        proto = self._protocol
        link = proto._links.get(delivery._key) if proto is not None else None
        if link is None or link != delivery._handle.link:
            raise DeliveryError(
                f"cannot settle ({outcome.lower()}): the link on which the message arrived "
                "was detached; the hub will deliver it again"
            )
        super()._settle_now(delivery, outcome)


class DeviceLinks(_Reporting):
    """One device's links on a :class:`SharedConnection`, with the surface of
    :class:`~iothub_tls.amqp.connection.AmqpConnection` that the device client and its
    channels use (what the device client calls its ``connection``)."""

    def __init__(
        self,
        shared: SharedConnection,
        *,
        provider: SasTokenProvider,
        label: str,
        options: AmqpOptions,
        on_state: StateCallback | None,
        draw: float,
    ) -> None:
        self._shared = shared
        self._provider = provider
        self.label = label
        self.options = options
        self.operation_timeout = options.operation_timeout
        self._on_state = on_state
        self._draw = draw  # where in the renewal window this device renews
        self._specs: dict[str, _Spec] = {}
        self._receivers: dict[str, AmqpReceiver] = {}
        self._hooks: list[Callable[[bool], None]] = []
        self._sends: dict[Outgoing, None] = {}
        self._attached = AttachedLinks()
        self._group: str | None = None
        self._wants = False
        self._ready = False
        self._ever_ready = False
        self._first: asyncio.Future[None] | None = None
        self._finished: asyncio.Future[None] | None = None
        self._dead: BaseException | None = None
        self._failure: BaseException | None = None
        self._last_error: BaseException | None = None
        self._state_now = ConnectionState.CLOSED
        self._renew_handle: asyncio.TimerHandle | None = None
        self._retry_handle: asyncio.TimerHandle | None = None
        self._backoff: Backoff | None = None
        self._reconnects = 0
        self._token_puts = 0
        self.renewals = 0

    # -- what it is -----------------------------------------------------------------------

    @property
    def shared(self) -> SharedConnection:
        """The connection this device shares."""
        return self._shared

    @property
    def host(self) -> str:
        return self._shared.host

    @property
    def port(self) -> int:
        return self._shared.port

    @property
    def server_hostname(self) -> str:
        return self._shared.server_hostname

    @property
    def ssl_context(self) -> HardenedSSLContext:
        return self._shared.ssl_context

    @property
    def tls_info(self) -> TlsInfo | None:
        """What the shared connection's current (or last) TLS handshake negotiated."""
        return self._shared.tls_info

    @property
    def connected(self) -> bool:
        return self._ready and self._dead is None and self._shared.connected

    @property
    def _running(self) -> bool:
        return self._wants and self._dead is None

    @property
    def _generation(self) -> int:
        return self._shared._generation

    @property
    def _loop(self) -> asyncio.AbstractEventLoop | None:
        return self._shared._loop

    def __repr__(self) -> str:
        return f"<DeviceLinks {self.label} on {self._shared!r} ({self._state_now.value})>"

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise _as_client_error(self._dead)
        if not self._wants:
            raise ConnectionFailedError(f"device {self.label} is not connected: call connect()")

    def _timeout_text(self, what: str, timeout: float) -> str:
        if self.connected:
            return f"{what} did not arrive within {timeout:g} s" + overload_hint(
                self._shared._lag, 0.0
            )
        last = f" (last error: {self._last_error})" if self._last_error else ""
        return (
            f"{what} did not arrive within {timeout:g} s: device {self.label} is being "
            f"reconnected on the shared connection to {self.host}:{self.port}{last}"
        )

    # -- links ----------------------------------------------------------------------------

    def sender(
        self, address: str, *, name: str | None = None, properties: Mapping[str, Any] | None = None
    ) -> AmqpSender:
        local = name or f"snd-{uuid.uuid4().hex[:8]}"
        self._declare(local, _Spec(address, True, dict(properties or {}), 0))
        return AmqpSender(self, local, address)  # type: ignore[arg-type]

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
        if isinstance(credit, bool) or not (isinstance(credit, int) and credit >= 1):
            raise PolicyError(f"credit must be a positive integer, not {credit!r}")
        local = name or f"rcv-{uuid.uuid4().hex[:8]}"
        handle = AmqpReceiver(self, local, address, on_message, on_delivery)  # type: ignore[arg-type]
        self._receivers[local] = handle
        self._declare(local, _Spec(address, False, dict(properties or {}), credit))
        return handle

    def _declare(self, local: str, spec: _Spec) -> None:
        if local in self._specs or ":" in local:
            raise PolicyError(f"a link named {local!r} already exists (or has a ':')")
        self._specs[local] = spec
        self._shared._declared(self, local)

    def _link_spec(self, group: str, local: str) -> Any:
        spec = self._specs[local]
        key = f"{group}:{local}"
        return self._shared._engine.LinkSpec(
            key, spec.address, spec.sender, f"{local}-{group}", spec.properties, spec.credit
        )

    async def _wait_attached(self, keys: Collection[str], timeout: float) -> bool:
        return await self._attached.wait(
            keys, timeout, self._finished, attached_will_do=self._ready
        )

    def _on_ready_hook(self, hook: Callable[[bool], None]) -> None:
        self._hooks.append(hook)

    # -- life cycle -----------------------------------------------------------------------

    async def connect(self) -> None:
        """Join the shared connection (connecting it first if needed): put this device's
        token, attach its links. Raises this device's refusal (``AuthenticationError``
        for a refused token) or the connection's failure."""
        if self._running:
            raise ConnectionFailedError("already connected: call close() before connect()")
        loop = asyncio.get_running_loop()
        self._dead = self._failure = self._last_error = None
        self._ever_ready = False
        self._first = loop.create_future()
        self._finished = loop.create_future()
        retry = self.options.retry
        self._backoff = Backoff(retry) if retry is not None else None
        self._wants = True
        self._state(ConnectionState.CONNECTING)
        try:
            await self._shared._ensure_connected()
        except BaseException as exc:
            if self._dead is None:
                self._fail(exc)
            raise
        self._shared._join(self)
        first = self._first
        limit = self.options.connect_timeout
        try:
            await asyncio.wait({first}, timeout=limit)
        except asyncio.CancelledError:
            await self.close()
            raise
        if not first.done():
            stage = "waiting for the connection" if self._group is None else "put-token, attach"
            error = OperationTimeoutError(
                f"device {self.label} did not join the shared connection to "
                f"{self.host}:{self.port} within {limit:g} s ({stage})"
            )
            self._fail(error)
            raise error
        first.result()

    async def close(self, timeout: float = 5.0) -> None:
        """Detach this device's links (the shared connection stays)."""
        if not self._wants and self._dead is not None:
            return
        self._shared._leave(self)
        self._end(ConnectionFailedError(f"device {self.label} was closed"), None)

    def _fail(self, error: BaseException) -> None:
        self._shared._leave(self)
        self._end(error, error)

    def _end(self, error: BaseException, reason: BaseException | None) -> None:
        """No more joins: fail what waits. ``reason``: why (None when closed on purpose)."""
        self._wants = False
        self._off_connection()
        self._cancel(retry=True)
        self._dead = error
        self._failure = reason
        first = self._first
        if first is not None and not first.done():
            first.set_exception(error)
            _retrieve(first)
        sends, self._sends = list(self._sends), {}
        for item in sends:
            self._shared._abandon(item)
            resolve(item.waiter, _as_client_error(error))
        finished = self._finished
        if finished is not None and not finished.done():
            finished.set_result(None)
        if self._state_now is not ConnectionState.CLOSED or reason is not None:
            self._state(ConnectionState.CLOSED, reason)

    def _cancel(self, *, retry: bool) -> None:
        if self._renew_handle is not None:
            self._renew_handle.cancel()
            self._renew_handle = None
        if retry and self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None

    # -- from the shared connection -------------------------------------------------------

    def _off_connection(self) -> None:
        """This device's group is gone (connection lost, refused, left)."""
        self._ready = False
        self._attached.clear()
        self._cancel(retry=False)

    def _lost(self, reason: BaseException | None) -> None:
        """The shared connection was lost; it comes back by itself."""
        self._off_connection()
        if reason is not None:
            self._last_error = reason
        if self._running and self._state_now is ConnectionState.CONNECTED:
            self._state(ConnectionState.DISCONNECTED, reason)

    def _attached_link(self, local: str) -> None:
        self._attached.add(local)

    def _authorized(self) -> None:
        self._token_puts += 1
        if self._token_puts > 1 and self._ever_ready:
            self.renewals += 1
        self._schedule_renewal()

    def _ready_now(self) -> None:
        if self._ready or not self._running:
            return
        self._ready = True
        self._last_error = None
        reconnected = self._ever_ready
        self._ever_ready = True
        if reconnected:
            self._reconnects += 1
        if self._backoff is not None:
            self._backoff.connected()
        self._state(ConnectionState.CONNECTED)
        for hook in list(self._hooks):
            try:
                hook(reconnected)
            except Exception:  # a hook's bug must not take the device down
                logger.exception("an AMQP ready hook of %r failed", self)
        group = self._group
        assert group is not None
        for item in list(self._sends):  # at-least-once: what the last join left unsettled
            if _group(item.key) != group:
                item.key = f"{group}:{_local(item.key)}"
                item.generation = 0
                self._shared._submit(item)
        first = self._first
        if first is not None and not first.done():
            first.set_result(None)

    def _refused(self, error: BaseException, permanent: bool) -> None:
        """The hub refused this device's token or detached one of its links."""
        self._off_connection()
        self._last_error = error
        first = self._first
        backoff = self._backoff
        if permanent or backoff is None or first is None or not first.done():
            logger.warning("device %s on the shared AMQP connection failed: %s", self.label, error)
            self._end(error, error)
            return
        backoff.lost()
        delay = backoff.next_delay()
        if delay is None:
            gave_up = ConnectionFailedError(
                f"gave up attaching device {self.label} after {backoff.attempts} attempts "
                f"(RetryPolicy.max_attempts); last error: {error}"
            )
            gave_up.__cause__ = error
            self._end(gave_up, gave_up)
            return
        logger.warning(
            "device %s on the shared AMQP connection was detached (%s); again in %.1f s",
            self.label,
            error,
            delay,
        )
        if self._state_now is ConnectionState.CONNECTED:
            self._state(ConnectionState.DISCONNECTED, _as_client_error(error))
        loop = self._shared._loop
        assert loop is not None
        self._retry_handle = loop.call_later(delay, self._rejoin)

    def _rejoin(self) -> None:
        self._retry_handle = None
        if self._running and self._group is None:
            self._shared._join(self)

    # -- the SAS token --------------------------------------------------------------------

    def _schedule_renewal(self) -> None:
        """Renew in this device's own place of the renewal window (see
        :func:`~iothub_tls.amqp.multiplex.renewal_draw`)."""
        provider, loop = self._provider, self._shared._loop
        if loop is None or not provider.renewable:
            return
        if self._renew_handle is not None:
            self._renew_handle.cancel()
        delay = renewal_delay(
            provider.expires_at, provider.ttl, self.options.renew_margin, time.time(), self._draw
        )
        self._renew_handle = loop.call_later(delay, self._renew, self._group)

    def _renew(self, group: str | None) -> None:
        self._renew_handle = None
        if group is None or group != self._group or not self._ready:
            return
        try:
            token = self._provider.renew()
        except ClientError as exc:
            self._fail(exc)
            return
        self._shared._renew_token(self, token)

    # -- messages -------------------------------------------------------------------------

    def _key(self, local: str) -> str:
        return f"{self._group or _NO_GROUP}:{local}"

    def _track(self, item: Outgoing) -> None:
        self._sends[item] = None
        item.waiter.add_done_callback(lambda _: self._sends.pop(item, None))

    def _post(self, local: str, message: AmqpMessage) -> Outgoing:
        self._raise_if_dead()
        item = self._shared._post(self._key(local), message)
        self._track(item)
        return item

    def _post_item(self, item: Outgoing) -> None:
        """Queue a message a thread made (the synchronous facade's send)."""
        if item.waiter.done():
            return
        try:
            self._raise_if_dead()
        except ClientError as exc:
            resolve(item.waiter, exc)
            return
        item.key = self._key(item.key)
        self._track(item)
        self._shared._post_item(item)

    async def _send(self, local: str, message: AmqpMessage, timeout: float | None) -> None:
        timeout = self.operation_timeout if timeout is None else timeout
        item = self._post(local, message)
        waiter = item.waiter
        assert isinstance(waiter, asyncio.Future)
        await asyncio.wait({waiter}, timeout=max(timeout, 0.0))
        if not waiter.done():
            self._abandon(item)
            raise OperationTimeoutError(
                self._timeout_text("the disposition of the message", timeout)
            )
        waiter.result()

    def _abandon(self, item: Outgoing) -> None:
        self._shared._abandon(item)
        self._sends.pop(item, None)
