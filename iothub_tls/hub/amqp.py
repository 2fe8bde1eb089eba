"""The AMQP 1.0 front door of the local compliance endpoint (port 5671 on IoT Hub).

:class:`AmqpEndpoint` is a :class:`~.frontdoor.TlsFrontDoor`: it accepts TLS connections
under a :class:`~.profile.HubTlsProfile` on the hub's event loop, then runs proton's
engine in server mode on the decrypted bytes of each (sans I/O: bytes in, bytes out,
its timers on the loop), the way IoT Hub serves devices:

* **SASL** — ANONYMOUS (and MSSBCBS, the C SDK's name for it), after which the device
  must authenticate through ``$cbs``; EXTERNAL, offered when the device presented a
  certificate: the identity is that certificate, checked against the registry
  (registered thumbprint, or registered CA with the device id as CN). A connection
  without a SASL layer is accepted too, as IoT Hub accepts X.509 devices: the
  certificate is then checked when the device attaches its links.
* **Claims-based security** — ``put-token`` requests on ``$cbs`` are verified with
  :meth:`~.registry.DeviceRegistry.verify_sas` and answered with ``status-code`` 200 or
  401 (``status-description`` says why). A new token on the live connection extends
  the authorization; when a token expires without renewal the connection is closed
  with ``amqp:unauthorized-access`` (on a multiplexed connection, only that device's
  links are detached).
* **Multiplexing** — as on IoT Hub, one connection may carry many SAS devices, each
  with its own put-token; each link is authorized for the device named in its address
  only (a link to another device's address is refused with
  ``amqp:unauthorized-access``), and the connection log has one line per device, each
  with the shared connection's TLS details. :meth:`AmqpEndpoint.detach_device` detaches
  one device's links (as IoT Hub does when a device is disabled or its session must
  end).
* **Links** — ``/devices/{id}/messages/events`` (the endpoint receives telemetry,
  settles it *accepted* and records it with its properties) and
  ``/devices/{id}/messages/devicebound`` (the endpoint sends the device's
  cloud-to-device queue from the shared :class:`~.state.HubState`; *accepted* completes
  a message, *rejected* dead-letters it, *released* or *modified* puts it back until
  ``max_delivery_count``). Module addresses
  (``/devices/{id}/modules/{m}/...``) and the ``amqps://{hub}`` prefix are accepted.
* **Device twin** — a link pair on ``/devices/{id}/twin``: GET is answered with the twin
  document of :meth:`~.state.HubState.twin`, a PATCH of ``/properties/reported`` is
  applied with :meth:`~.state.HubState.patch_reported` (status 204 and the new
  ``version``), PUT / DELETE of ``/notifications/twin/properties/desired`` subscribe and
  unsubscribe the receiver link to the desired patches the hub's state announces.
  Answers go to the device's twin receiver link with the same
  ``com.microsoft:channel-correlation-id`` (or its only one), carrying the request's
  correlation-id.
* **Direct methods** — a link pair on ``/devices/{id}/methods/devicebound``: once the
  device attached its receiver, :meth:`~.state.HubState.invoke_method` reaches it here
  (``IoThub-methodname``, a uuid correlation-id), and its answers (``IoThub-status``)
  complete the call.

* **The service's cloud-to-device sender** — as on IoT Hub, a service puts a token of a
  shared access policy with ServiceConnect (``skn``, signed for the hub's host name) on
  ``$cbs`` for the audience of the hub itself (``{hub}``, optionally with a scheme),
  attaches a sender to ``/messages/devicebound`` and sends messages whose ``to`` is
  ``/devices/{id}/messages/devicebound``: each is queued with the hub's shared state
  (*accepted*), or *rejected* with ``amqp:not-found`` (unknown device),
  ``amqp:resource-limit-exceeded`` (50 queued) or ``amqp:link:message-size-exceeded``
  (over 64 KB). Service connections are not device connections: they do not appear in
  the connection log. Delivery feedback (``/messages/servicebound/feedback``) is not
  served.

Twin, method and telemetry messages are read and written with the functions of
:mod:`iothub_tls.amqp.conventions`, the module the device client uses.

Each connection is reported to the hub's :class:`~.log.ConnectionLog` and the
``on_connection`` callbacks as a :class:`~.log.ConnectionEvent` (TLS version, cipher,
SNI, certificate thumbprint, device id, result, reason): ``deviceConnect`` once, when
the device authenticated or was refused, and ``deviceDisconnect`` when an accepted
connection ends::

    endpoint = AmqpEndpoint(profile, registry, on_connection=print)
    with endpoint:
        endpoint.enqueue_c2d("dev1", b"reboot", {"priority": "high"})
        ...                      # devices connect to endpoint.port
        print(endpoint.received)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from ..amqp import conventions as amqpc
from ..amqp import engine as amqp  # first: MissingDependencyError without proton
from ..amqp.message import AmqpMessage, encode
from ..errors import AuthenticationError, NotAuthorizedError
from .frontdoor import DEFAULT_MAX_CONNECTIONS, HubFrontDoor, TlsMeta
from .log import ConnectionEvent, ConnectionLog
from .loop import HubLoop
from .profile import HubTlsProfile, PeerTls, peer_tls
from .registry import SERVICE_CONNECT, DeviceNotRegisteredError, DeviceRegistry, TokenSource
from .service import ServiceRefusal, enqueue_c2d
from .service_conventions import C2D_PATH, parse_c2d_target
from .state import HubState, ReceivedMessage, Telemetry
from .stream import TlsStream

from proton import Condition, Delivery, Endpoint, Event, Message, int32  # isort: skip

__all__ = ["AmqpEndpoint"]

logger = logging.getLogger("iothub_tls.hub")

_MAX_MESSAGE = 256 * 1024  # IoT Hub's device-to-cloud message size limit
_AUDIENCE = re.compile(r"^(?P<host>[^/]+)/devices/(?P<device>[^/]+)(?:/modules/[^/]+)?/?$")
_UNAUTHORIZED = "amqp:unauthorized-access"
_DETACH_FORCED = "amqp:link:detach-forced"
#: put-tokens a connection may send ahead on $cbs
_CBS_CREDIT = 100
#: above this many cloud-to-device links on a connection, only the queues of devices
#: with news (a message queued or abandoned, a link attached or given credit) are asked
_C2D_SCAN_ALL = 8
_NOT_FOUND = "amqp:not-found"
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
#: how a refused service message is rejected, by IoT Hub's error code
_C2D_CONDITIONS = {
    "DeviceNotFound": _NOT_FOUND,
    "DeviceMaximumQueueDepthExceeded": "amqp:resource-limit-exceeded",
    "MessageTooLarge": "amqp:link:message-size-exceeded",
}


@dataclass
class _Conn:
    """The state of one device connection (on the hub's loop)."""

    meta: TlsMeta
    tls: PeerTls
    stream: TlsStream
    #: the SASL exchange while it runs (None before the engine runs, or without SASL)
    sasl: amqp.SaslServer | None = None
    #: proton's engine once SASL is done
    engine: amqp.Engine | None = None
    #: the one timer: SASL deadline, then proton's next tick or the first token expiry
    timer: asyncio.TimerHandle | None = None
    ended: bool = False
    sasl_mechanism: str | None = None
    #: device id -> (auth type, authorized until (epoch s) or None for certificates)
    authorized: dict[str, tuple[str, float | None]] = field(default_factory=dict)
    #: the earliest of the authorized tokens' expiries (kept, not searched each turn)
    next_expiry: float | None = None
    reported: bool = False
    accepted_device: str | None = None
    #: devices whose deviceConnect was logged on this connection: successes (each gets
    #: its deviceDisconnect when it leaves) and refusals (one line each)
    logged: dict[str, None] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    #: devices whose cloud-to-device queue is worth a look on the next turn (a
    #: multiplexed connection does not ask every device's queue on every frame)
    c2d_due: set[str] = field(default_factory=set)
    put_tokens: int = 0
    #: delivery -> (lock token, delivery count) of the cloud-to-device message it carries
    c2d_unsettled: dict[Any, tuple[str, int]] = field(default_factory=dict)
    #: sender links of devicebound, with their device id
    c2d_links: list[tuple[Any, str]] = field(default_factory=list)
    cbs_reply_link: Any = None
    #: $cbs answers waiting for the reply link (a client may send its put-token before
    #: its reply receiver is attached or has given credit)
    cbs_backlog: deque[bytes] = field(default_factory=deque)
    #: answers at the end of cbs_backlog made in the current pass of the engine (sent on
    #: the next one)
    cbs_held: int = 0
    closing: str | None = None
    #: hub -> device twin links (the device's twin receivers): link -> (client id, channel)
    twin_links: dict[Any, tuple[str, str | None]] = field(default_factory=dict)
    #: twin links subscribed to desired-property updates
    desired_links: set[Any] = field(default_factory=set)
    #: hub -> device method links by client id, and the routes installed for them
    method_links: dict[str, Any] = field(default_factory=dict)
    method_routes: dict[str, Callable[[str, bytes, str], None]] = field(default_factory=dict)
    #: correlation-id (text of the uuid) of a method call in flight -> the hub's request id
    method_calls: dict[str, str] = field(default_factory=dict)
    #: messages waiting for link credit, by hub -> device link (sent pre-settled)
    backlog: dict[Any, deque[AmqpMessage]] = field(default_factory=dict)
    #: a service (shared access policy) authenticated on $cbs: its policy name and
    #: until when its token is valid
    service_policy: str | None = None
    service_until: float | None = None
    #: a service, not a device, is on this connection (it put a hub-wide token)
    service_attempt: bool = False
    #: links on which a service sends cloud-to-device messages
    service_links: set[Any] = field(default_factory=set)

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Connection:
    """The stream's session: hands bytes, the end of the stream and the end of the
    connection to the door."""

    def __init__(self, door: AmqpEndpoint, conn: _Conn) -> None:
        self.door = door
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        self.door._on_bytes(self.conn, data)

    def eof_received(self) -> None:
        self.door._on_eof(self.conn)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.door._on_lost(self.conn, exc)


class AmqpEndpoint(HubFrontDoor):
    """IoT Hub's device AMQP 1.0 endpoint on ``host:port`` over the profile's TLS.

    :param profile: the server TLS (versions, suites, certificates, device certificates).
    :param registry: devices and their credentials.
    :param state: the hub's shared state (telemetry, cloud-to-device queues); a private
        one when not given. Share it with the other front doors so a message queued for
        a device reaches it whichever protocol it uses.
    :param port: 0 picks a free port; read :attr:`port` after :meth:`start`. After
        :meth:`stop`, :meth:`start` listens on the same port again.
    :param log: the hub's shared connection log; a private one when not given.
    :param on_connection: called with each AMQP :class:`~.log.ConnectionEvent`
        (``deviceConnect`` once per connection when the device authenticated or was
        refused, or when TLS failed; ``deviceDisconnect`` when an accepted connection
        ends). Called on the hub's I/O thread; exceptions are logged and ignored.
    :param handshake_timeout: seconds a client has for TLS, and then for SASL.
    :param idle_timeout: the AMQP idle timeout the endpoint announces and enforces.
    :param max_delivery_count: a cloud-to-device message released (abandoned) this many
        times is dead-lettered instead of delivered again (IoT Hub's default: 10).
    :param max_connections: connections open at once (TLS handshakes in progress and
        connections served); the next is closed before TLS and logged as refused.
    :param hub_loop: the hub's I/O loop (default: one of the door's own).
    """

    protocol = "Amqp"
    token_source = TokenSource.CBS_PUT_TOKEN

    def __init__(
        self,
        profile: HubTlsProfile,
        registry: DeviceRegistry,
        state: HubState | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log: ConnectionLog | None = None,
        on_connection: Callable[[ConnectionEvent], None] | None = None,
        handshake_timeout: float = 10.0,
        idle_timeout: float = 240.0,
        max_delivery_count: int = 10,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        hub_loop: HubLoop | None = None,
    ) -> None:
        super().__init__(
            profile,
            registry,
            state,
            host=host,
            port=port,
            log=log,
            on_connection=on_connection,
            handshake_timeout=handshake_timeout,
            max_connections=max_connections,
            hub_loop=hub_loop,
        )
        self.idle_timeout = float(idle_timeout)
        if not 1 <= max_delivery_count <= 100:
            raise ValueError("max_delivery_count must be 1..100 (IoT Hub default: 10)")
        self.max_delivery_count = max_delivery_count
        self._state_lock = threading.Lock()  # put_tokens reads _open from any thread
        self._open: dict[int, _Conn] = {}
        self.state.on_desired_patch(self._desired_patched)
        self.state.on_c2d_enqueued(self._c2d_ready)

    # -- life cycle ---------------------------------------------------------------------

    def __enter__(self) -> AmqpEndpoint:
        self.start()
        return self

    @property
    def put_tokens(self) -> tuple[int, ...]:
        """Accepted ``$cbs`` put-tokens of each open connection (a renewal counts)."""
        with self._state_lock:
            return tuple(c.put_tokens for c in self._open.values())

    # -- the front door -----------------------------------------------------------------

    def open_session(self, stream: TlsStream, meta: TlsMeta) -> _Connection:
        mechanisms = ["ANONYMOUS", "MSSBCBS"]
        if meta.client_chain:
            mechanisms.insert(0, "EXTERNAL")
        conn = _Conn(meta, peer_tls(stream.tls), stream, sasl=amqp.SaslServer(mechanisms))
        with self._state_lock:
            self._open[id(conn)] = conn
        loop = asyncio.get_running_loop()
        conn.timer = loop.call_later(self.handshake_timeout, self._sasl_expired, conn)
        return _Connection(self, conn)

    def _on_bytes(self, conn: _Conn, data: bytes) -> None:
        if conn.ended:
            return
        if conn.engine is not None:
            conn.engine.feed(data)
            self._pump(conn)
        elif conn.sasl is not None:
            conn.sasl.feed(data)
            self._sasl(conn)

    def _on_eof(self, conn: _Conn) -> None:
        if conn.ended:
            return
        if conn.engine is None:
            conn.closing = conn.closing or "closed during the SASL exchange"
            self._close_stream(conn)
            return
        conn.engine.feed_eof()
        self._pump(conn)

    def _on_lost(self, conn: _Conn, exc: BaseException | None) -> None:
        if exc is not None:
            conn.closing = conn.closing or f"connection lost: {exc}"
        elif conn.engine is None:
            conn.closing = conn.closing or "closed during the SASL exchange"
        conn.ended = True
        conn.cancel_timer()
        with self._state_lock:
            self._open.pop(id(conn), None)
        for client_id, route in conn.method_routes.items():
            self.state.unroute_methods(client_id, route)
        self._abandon_unsettled(conn)
        if conn.logged:
            for device_id in conn.logged:
                self.disconnected(conn.meta, device_id, conn.closing)
        elif conn.service_attempt:
            logger.debug("service connection from %s ended: %s", conn.meta.caller, conn.closing)
        else:
            self._outcome(conn, None, False, conn.closing or "closed before authenticating")

    def _close_stream(self, conn: _Conn) -> None:
        """The connection is over for us: close it after what was written."""
        conn.ended = True
        conn.cancel_timer()
        conn.stream.close()

    def _outcome(
        self, conn: _Conn, device_id: str | None, success: bool, reason: str | None = None
    ) -> None:
        """Log a device's authentication outcome on this connection: once per device
        (a multiplexed connection has a line per device, each with the connection's TLS
        details); without a device, once per connection."""
        if device_id is None:
            if conn.reported:
                return
        elif device_id in conn.logged or (not success and device_id in conn.refused):
            return
        conn.reported = True
        if success:
            assert device_id is not None
            conn.logged[device_id] = None
            conn.refused.discard(device_id)
            if conn.accepted_device is None:
                conn.accepted_device = device_id
        elif device_id is not None:
            conn.refused.add(device_id)
        self.connected(conn.meta, device_id, success=success, reason=reason)

    # -- SASL ---------------------------------------------------------------------------

    def _sasl_expired(self, conn: _Conn) -> None:
        conn.timer = None
        if conn.engine is None and not conn.ended:
            conn.closing = f"the SASL exchange did not complete within {self.handshake_timeout:g} s"
            conn.ended = True
            conn.stream.abort()

    def _sasl(self, conn: _Conn) -> None:
        """Advance the SASL exchange with what arrived; hand the bytes that follow it to
        the AMQP engine once it is done."""
        server = conn.sasl
        assert server is not None
        stream = conn.stream
        stream.write(server.take_output())
        if server.state in ("header", "mechanisms"):
            return  # more to come
        if server.state == "invalid":
            self._outcome(conn, None, False, "not an AMQP 1.0 client (bad protocol header)")
            self._close_stream(conn)
            return
        if server.state == "skipped":
            conn.sasl_mechanism = None
            self._start_engine(conn, server.leftover)
            return
        init = server.init
        assert init is not None
        conn.sasl_mechanism = init.mechanism
        if init.mechanism in ("ANONYMOUS", "MSSBCBS"):
            server.outcome(amqp.SaslCode.OK)
        elif init.mechanism == "EXTERNAL" and "EXTERNAL" in server.mechanisms:
            try:
                device_id = self.authenticate_certificate(conn.meta).device_id
            except AuthenticationError as exc:
                server.outcome(amqp.SaslCode.AUTH)
                stream.write(server.take_output())
                self._outcome(conn, None, False, f"SASL EXTERNAL refused: {exc}")
                self._close_stream(conn)
                return
            self._grant(conn, device_id, self._auth_type(device_id), None)
            self._outcome(conn, device_id, True)
            server.outcome(amqp.SaslCode.OK)
        else:
            server.outcome(amqp.SaslCode.AUTH)
            stream.write(server.take_output())
            self._outcome(conn, None, False, f"SASL mechanism {init.mechanism!r} is not offered")
            self._close_stream(conn)
            return
        stream.write(server.take_output())
        self._start_engine(conn, server.leftover)

    def _auth_type(self, device_id: str) -> str:
        device = self.registry.get(device_id)
        return device.auth_type if device is not None else "unknown"

    # -- the AMQP connection ------------------------------------------------------------

    def _start_engine(self, conn: _Conn, leftover: bytes) -> None:
        conn.sasl = None
        conn.cancel_timer()
        conn.engine = amqp.Engine(
            server=True,
            container_id=f"iothub-tls-{uuid.uuid4().hex[:8]}",
            idle_timeout=self.idle_timeout,
        )
        conn.engine.feed(leftover)
        self._pump(conn)

    def _pump(self, conn: _Conn) -> None:
        """Run the engine until it has nothing more to say: its timers, its events, the
        tokens' expiry, cloud-to-device deliveries and answers waiting for credit; write
        its output; then sleep until its next deadline (or the first token's expiry)."""
        engine = conn.engine
        if engine is None or conn.ended:
            return
        loop = asyncio.get_running_loop()
        deadline = 0.0
        for _ in range(64):  # each pass writes what the last one produced
            deadline = engine.tick(loop.time())
            for event in engine.events():
                self._on_event(conn, engine, event)
            self._expire_tokens(conn, engine)
            self._deliver_c2d(conn)
            self._flush(conn)
            output = engine.output()
            held = conn.cbs_held
            conn.cbs_held = 0  # the next pass sends the $cbs answers held back in this one
            if not output:
                if held:
                    continue
                break
            conn.stream.write(output)
            engine.consumed(len(output))
        else:  # still talking: let the other connections have a turn first
            loop.call_soon(self._pump, conn)
        if engine.closed:
            self._close_stream(conn)
            return
        self._schedule(conn, loop, deadline)

    def _schedule(self, conn: _Conn, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        wake = [deadline] if deadline else []
        now = time.time()
        expiries = [] if conn.next_expiry is None else [conn.next_expiry]
        if conn.service_until is not None:
            expiries.append(conn.service_until)
        if expiries:  # epoch seconds -> the loop's clock
            wake.append(loop.time() + max(0.0, min(expiries) - now) + 0.001)
        when = min(wake) if wake else None
        if conn.timer is not None:
            if when is not None and conn.timer.when() == when:
                return
            conn.timer.cancel()
            conn.timer = None
        if when is not None:
            conn.timer = loop.call_at(when, self._woken, conn)

    def _woken(self, conn: _Conn) -> None:
        conn.timer = None
        self._pump(conn)

    def _posted(self, conn: _Conn, work: Callable[[], None]) -> None:
        """Work handed over by another thread, on the loop: run it, then pump."""
        if conn.ended or conn.engine is None:
            return
        work()
        self._pump(conn)

    def _on_event(self, conn: _Conn, engine: amqp.Engine, event: Any) -> None:
        kind = event.type
        E = Event
        if kind == E.CONNECTION_REMOTE_OPEN:
            event.connection.open()
        elif kind == E.SESSION_REMOTE_OPEN:
            event.session.open()
        elif kind == E.LINK_REMOTE_OPEN:
            self._on_attach(conn, event.link)
        elif kind == E.LINK_FLOW:
            link = event.link
            if link.is_sender and conn.c2d_links:  # credit for cloud-to-device, maybe
                address = amqpc.parse_address(link.remote_source.address or "")
                if address is not None and address.kind is amqpc.LinkKind.C2D:
                    conn.c2d_due.add(address.device_id)
        elif kind == E.DELIVERY:
            delivery = event.delivery
            if delivery.link.is_receiver:
                self._on_incoming(conn, engine, delivery)
            else:
                self._on_disposition(conn, delivery)
        elif kind == E.LINK_REMOTE_CLOSE:
            link = event.link
            self._release_link(conn, link)
            if not link.state & Endpoint.LOCAL_CLOSED:
                link.close()
        elif kind == E.SESSION_REMOTE_CLOSE:
            if not event.session.state & Endpoint.LOCAL_CLOSED:
                event.session.close()
        elif kind == E.CONNECTION_REMOTE_CLOSE:
            conn.closing = conn.closing or "closed by the device"
            if not event.connection.state & Endpoint.LOCAL_CLOSED:
                event.connection.close()

    # -- links ----------------------------------------------------------------------------

    def _refuse_link(self, link: Any, name: str, description: str) -> None:
        link.condition = Condition(name, description)
        link.open()
        link.close()

    def _on_attach(self, conn: _Conn, link: Any) -> None:
        if link.state & Endpoint.LOCAL_ACTIVE:
            return
        remote = link.remote_target if link.is_receiver else link.remote_source
        address = remote.address or ""
        if address == amqp.CBS_ADDRESS:
            link.source.copy(link.remote_source)
            link.target.copy(link.remote_target)
            link.open()
            if link.is_receiver:
                # a gateway puts a token per device at once: take them in big gulps
                link.flow(_CBS_CREDIT)
            else:
                conn.cbs_reply_link = link
            return
        if self._is_service_c2d(address):
            self._attach_service_sender(conn, link, address)
            return
        parsed = amqpc.parse_address(address)
        if parsed is None:
            self._refuse_link(link, _NOT_FOUND, f"no such node: {address!r}")
            return
        kind, host = parsed.kind, parsed.host
        if host is not None and host.lower() != self.registry.hub_host:
            self._refuse_link(link, _NOT_FOUND, f"{host!r} is not this hub")
            return
        # telemetry only goes to the hub, C2D only comes from it; twin and method links
        # are pairs, one each way
        one_way = {amqpc.LinkKind.EVENTS: True, amqpc.LinkKind.C2D: False}
        if one_way.get(kind, link.is_receiver) != bool(link.is_receiver):
            self._refuse_link(
                link, "amqp:not-allowed", f"{address!r} cannot be attached in this direction"
            )
            return
        if not self._authorize(conn, link, parsed.device_id):
            return
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.open()
        if link.is_receiver:
            link.flow(100 if kind is amqpc.LinkKind.EVENTS else 10)
        elif kind is amqpc.LinkKind.C2D:
            conn.c2d_links.append((link, parsed.device_id))
            conn.c2d_due.add(parsed.device_id)
        elif kind is amqpc.LinkKind.TWIN:
            channel = amqpc.channel_correlation_id(link.remote_properties)
            conn.twin_links[link] = (parsed.client_id, channel)
        else:
            self._route_methods(conn, parsed.client_id, link)

    def _is_service_c2d(self, address: str) -> bool:
        """``/messages/devicebound``, optionally as ``amqps://{hub}/messages/devicebound``."""
        if _SCHEME.match(address):
            rest = _SCHEME.sub("", address)
            host, _, path = rest.partition("/")
            if host.split(":")[0].lower() != self.registry.hub_host:
                return False
            address = "/" + path
        return address.rstrip("/").lower() == C2D_PATH

    def _attach_service_sender(self, conn: _Conn, link: Any, address: str) -> None:
        if not link.is_receiver:
            self._refuse_link(
                link, "amqp:not-allowed", f"{address!r} takes messages from the service only"
            )
            return
        if conn.service_policy is None:
            self._refuse_link(
                link,
                _UNAUTHORIZED,
                "put a token of a shared access policy with ServiceConnect on $cbs first "
                f"(audience {self.registry.hub_host})",
            )
            return
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.open()
        link.flow(50)
        conn.service_links.add(link)

    def _on_service_c2d(self, conn: _Conn, delivery: Any, message: AmqpMessage) -> None:
        """A cloud-to-device message from the service: queue it for its device."""
        device_id = parse_c2d_target(message.to)
        condition: Condition | None = None
        if device_id is None:
            condition = Condition(
                "amqp:invalid-field",
                f"'to' must be /devices/{{id}}/messages/devicebound, not {message.to!r}",
            )
        elif self.registry.get(device_id) is None:
            condition = Condition(_NOT_FOUND, f"Device {device_id} not registered")
        else:
            body = message.body
            if isinstance(body, str):
                body = body.encode("utf-8")
            elif isinstance(body, (list, tuple)):  # several data sections
                body = b"".join(bytes(part) for part in body)
            payload = bytes(body) if body is not None else b""
            properties = {str(k): str(v) for k, v in (message.properties or {}).items()}
            try:
                enqueue_c2d(
                    self.state,
                    device_id,
                    payload,
                    properties,
                    message_id=None if message.message_id is None else str(message.message_id),
                    correlation_id=(
                        None if message.correlation_id is None else str(message.correlation_id)
                    ),
                )
            except ServiceRefusal as refusal:
                name = _C2D_CONDITIONS.get(refusal.code, "amqp:internal-error")
                condition = Condition(name, refusal.message)
        if condition is not None:
            delivery.local.condition = condition
        delivery.update(Delivery.REJECTED if condition else Delivery.ACCEPTED)
        delivery.settle()

    def _authorize(self, conn: _Conn, link: Any, device_id: str) -> bool:
        """May this connection use ``device_id``'s links? Refuses the link (or, for an
        X.509 device without SASL whose certificate does not match, the connection)."""
        if device_id in conn.authorized:
            return True
        if conn.sasl_mechanism is None and conn.meta.client_chain:
            # IoT Hub's X.509 connections: no SASL, the TLS certificate is the identity.
            try:
                self.authenticate_certificate(conn.meta, device_id)
            except AuthenticationError as exc:
                self._outcome(conn, device_id, False, str(exc))
                self._close(conn, link.connection, _UNAUTHORIZED, str(exc))
                return False
            self._grant(conn, device_id, self._auth_type(device_id), None)
            self._outcome(conn, device_id, True)
            return True
        if conn.authorized:
            names = sorted(conn.authorized)
            listed = ", ".join(names[:3]) + (
                f" and {len(names) - 3} more" if len(names) > 3 else ""
            )
            reason = f"this connection is authenticated for {listed}, not for device {device_id!r}"
        else:
            reason = (
                f"no credentials for device {device_id!r}: put a SAS token on $cbs first, "
                "or present the device certificate"
            )
            self._outcome(conn, device_id, False, reason)
        self._refuse_link(link, _UNAUTHORIZED, reason)
        return False

    def _close(self, conn: _Conn, connection: Any, name: str, description: str) -> None:
        conn.closing = description
        connection.condition = Condition(name, description)
        connection.close()

    def _release_link(self, conn: _Conn, link: Any) -> None:
        conn.c2d_links = [(lnk, dev) for lnk, dev in conn.c2d_links if lnk != link]
        conn.twin_links.pop(link, None)
        conn.desired_links.discard(link)
        conn.service_links.discard(link)
        conn.backlog.pop(link, None)
        for client_id, method_link in list(conn.method_links.items()):
            if method_link == link:
                del conn.method_links[client_id]
                route = conn.method_routes.pop(client_id, None)
                if route is not None:
                    self.state.unroute_methods(client_id, route)
        for delivery, (token, _) in list(conn.c2d_unsettled.items()):
            if delivery.link == link:
                conn.c2d_unsettled.pop(delivery)
                with contextlib.suppress(KeyError):
                    self.state.settle_c2d(token, "abandon")

    def _abandon_unsettled(self, conn: _Conn) -> None:
        """Messages delivered on a connection that ended unsettled go back to the queue."""
        for token, _ in conn.c2d_unsettled.values():
            with contextlib.suppress(KeyError):
                self.state.settle_c2d(token, "abandon")
        conn.c2d_unsettled.clear()

    # -- deliveries -------------------------------------------------------------------------

    def _on_incoming(self, conn: _Conn, engine: amqp.Engine, delivery: Any) -> None:
        link = delivery.link
        if delivery.pending > _MAX_MESSAGE:  # however many frames it came in
            delivery.update(Delivery.REJECTED)
            delivery.settle()
            return
        if not delivery.readable or delivery.partial:
            return
        data = link.recv(delivery.pending)
        link.advance()
        try:
            message = amqp.decode_message(bytes(data or b""))
        except Exception as exc:
            delivery.local.condition = Condition("amqp:decode-error", str(exc))
            delivery.update(Delivery.REJECTED)
            delivery.settle()
            return
        if link in conn.service_links:
            self._on_service_c2d(conn, delivery, AmqpMessage._from_proton(message))
            link.flow(1)
            return
        address = link.remote_target.address or ""
        parsed = amqpc.parse_address(address)
        refusal: str | None = None
        if address == amqp.CBS_ADDRESS:
            delivery.update(Delivery.ACCEPTED)
            delivery.settle()
            self._on_put_token(conn, message)
        elif parsed is not None and parsed.kind is amqpc.LinkKind.TWIN:
            refusal = self._on_twin_request(conn, link, parsed, AmqpMessage._from_proton(message))
        elif parsed is not None and parsed.kind is amqpc.LinkKind.METHODS:
            refusal = self._on_method_response(conn, AmqpMessage._from_proton(message))
        elif parsed is not None:
            self._record(conn, parsed, AmqpMessage._from_proton(message))
        if address != amqp.CBS_ADDRESS:
            if refusal is not None:
                delivery.local.condition = Condition("amqp:invalid-field", refusal)
            delivery.update(Delivery.REJECTED if refusal else Delivery.ACCEPTED)
            delivery.settle()
        link.flow(1)

    def _record(self, conn: _Conn, address: amqpc.Address, message: AmqpMessage) -> None:
        content = amqpc.parse_telemetry(message)
        device_id = address.device_id
        tls = conn.tls
        entry = ReceivedMessage(
            device_id=device_id,
            body=content.payload,
            properties=content.properties,
            message_id=content.message_id,
            correlation_id=content.correlation_id,
            content_type=content.content_type,
            content_encoding=content.content_encoding,
            batch=False,
            auth_type=conn.authorized.get(device_id, ("unknown", None))[0],
            tls_version=tls.version,
            cipher=tls.iana_cipher,
            time=dt.datetime.now(dt.timezone.utc),
        )
        telemetry = Telemetry(
            device_id,
            content.payload,
            content.properties,
            content.system_properties,
            self.protocol,
            address.module_id,
        )
        self.accept_telemetry(entry, telemetry)

    # -- device twin ------------------------------------------------------------------------

    def _twin_reply_link(self, conn: _Conn, client_id: str, request_link: Any) -> Any:
        """The device's twin receiver that answers go to: the one with the request link's
        channel correlation-id, else the device's only (or first) one."""
        channel = amqpc.channel_correlation_id(request_link.remote_properties)
        candidates = [link for link, (cid, _) in conn.twin_links.items() if cid == client_id]
        for link in candidates:
            if channel is not None and conn.twin_links[link][1] == channel:
                return link
        return candidates[0] if candidates else None

    def _on_twin_request(
        self, conn: _Conn, link: Any, address: amqpc.Address, message: AmqpMessage
    ) -> str | None:
        """Answer a twin request; returns why the transfer is rejected, if it is."""
        request = amqpc.parse_twin_request(message)
        if request is None:
            return (
                "not a twin request: it needs an 'operation' annotation (GET, PATCH, PUT or "
                "DELETE) and a correlation-id"
            )
        reply = self._twin_reply_link(conn, address.client_id, link)
        if reply is None:
            return f"no twin receiver link is attached on {address.client_id!r}'s twin address"
        status, body, version = self._twin_operation(conn, reply, address.client_id, request)
        self._send_on(
            conn, reply, amqpc.twin_response(request.correlation_id, status, body, version)
        )
        return None

    def _twin_operation(
        self, conn: _Conn, reply: Any, client_id: str, request: amqpc.TwinRequest
    ) -> tuple[int, bytes, int | None]:
        """(status, body, version) of the answer to ``request``."""
        operation = amqpc.TwinOperation

        def error(status: int, text: str) -> tuple[int, bytes, int | None]:
            return status, json.dumps({"message": text}).encode("utf-8"), None

        if request.operation is operation.GET:
            document = self.state.twin(client_id).document()
            return 200, json.dumps(document).encode("utf-8"), None
        if request.operation is operation.PATCH:
            if request.resource != amqpc.REPORTED_PROPERTIES:
                return error(400, f"PATCH applies to {amqpc.REPORTED_PROPERTIES!r} only")
            try:
                patch = json.loads(request.body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                patch = None
            if not isinstance(patch, dict):
                return error(400, "the reported-properties patch must be a JSON object")
            return 204, b"", self.state.patch_reported(client_id, patch)
        if request.resource != amqpc.DESIRED_NOTIFICATIONS:
            return error(
                400, f"{request.operation.value} applies to {amqpc.DESIRED_NOTIFICATIONS!r} only"
            )
        if request.operation is operation.PUT:
            conn.desired_links.add(reply)
        else:
            conn.desired_links.discard(reply)
        return 200, b"", None

    def _desired_patched(self, client_id: str, patch: dict[str, Any], version: int) -> None:
        """The hub's state changed a desired property (any thread): tell the subscribed
        twin links of ``client_id``."""
        message = amqpc.desired_update(patch, version)
        self.io.post(self._push_desired, client_id, message)

    def _push_desired(self, client_id: str, message: AmqpMessage) -> None:
        with self._state_lock:
            conns = list(self._open.values())
        for conn in conns:
            links = [
                link
                for link in conn.desired_links
                if conn.twin_links.get(link, ("", None))[0] == client_id
            ]
            if links and not conn.ended:
                for link in links:
                    self._send_on(conn, link, message)
                self._pump(conn)

    # -- direct methods ---------------------------------------------------------------------

    def _route_methods(self, conn: _Conn, client_id: str, link: Any) -> None:
        """The device attached its method receiver: route its method calls here."""

        def route(name: str, payload: bytes, rid: str) -> None:  # any thread
            self.io.post(
                self._posted, conn, lambda: self._call_method(conn, client_id, name, payload, rid)
            )

        conn.method_links[client_id] = link
        conn.method_routes[client_id] = route
        self.state.route_methods(client_id, route)

    def _call_method(
        self, conn: _Conn, client_id: str, name: str, payload: bytes, rid: str
    ) -> None:
        link = conn.method_links.get(client_id)
        if link is None:
            return  # detached meanwhile: the caller times out, as with a device gone
        correlation_id = uuid.uuid4()
        conn.method_calls[str(correlation_id)] = rid
        self._send_on(conn, link, amqpc.method_request(name, correlation_id, payload))

    def _on_method_response(self, conn: _Conn, message: AmqpMessage) -> str | None:
        result = amqpc.parse_method_response(message)
        if result is None:
            return f"not a method response: it needs {amqpc.METHOD_STATUS!r} and a correlation-id"
        rid = conn.method_calls.pop(result.request_id, None)
        if rid is None:
            return f"no method call in flight has the correlation-id {result.request_id}"
        self.state.method_response(rid, result.status, result.payload)
        return None

    # -- hub -> device messages ---------------------------------------------------------------

    def _send_on(self, conn: _Conn, link: Any, message: AmqpMessage) -> None:
        """Send ``message`` on ``link`` (pre-settled) when it has credit."""
        conn.backlog.setdefault(link, deque()).append(message)
        self._flush(conn)

    @staticmethod
    def _flush(conn: _Conn) -> None:
        link = conn.cbs_reply_link
        while (
            len(conn.cbs_backlog) > conn.cbs_held
            and link is not None
            and link.state & Endpoint.LOCAL_ACTIVE
            and link.credit > 0
        ):
            delivery = link.delivery(uuid.uuid4().hex)
            link.send(conn.cbs_backlog.popleft())
            link.advance()
            delivery.settle()
        for link, queue in list(conn.backlog.items()):
            if not link.state & Endpoint.LOCAL_ACTIVE:
                continue
            while queue and link.credit > 0:
                delivery = link.delivery(uuid.uuid4().bytes)
                link.send(encode(queue.popleft()))
                link.advance()
                delivery.settle()

    def _on_put_token(self, conn: _Conn, request: Any) -> None:
        props = request.properties or {}
        operation = props.get("operation")
        token_type = props.get("type")
        audience = str(props.get("name") or "")
        token = request.body
        if isinstance(token, memoryview):
            token = token.tobytes().decode("utf-8", "replace")
        elif isinstance(token, bytes):
            token = token.decode("utf-8", "replace")
        status, description = 200, "OK"
        device_id: str | None = None
        if operation == "put-token" and self._is_hub_audience(audience):
            self._on_service_token(conn, request, token_type, token)
            return
        match = _AUDIENCE.match(audience)
        if operation != "put-token":
            status, description = 400, f"unsupported $cbs operation {operation!r}"
        elif token_type not in amqp.CBS_TOKEN_TYPES:
            status, description = 400, f"unsupported token type {token_type!r}"
        elif match is None or match["host"].lower() != self.registry.hub_host:
            status, description = (
                401,
                (f"the token audience {audience!r} is not a device of {self.registry.hub_host}"),
            )
        elif not isinstance(token, str):
            status, description = 400, "the token must be an AMQP string"
        else:
            device_id = unquote(match["device"])
            try:
                device = self.authenticate_sas(device_id, token)
            except (AuthenticationError, DeviceNotRegisteredError) as exc:
                status, description = 401, str(exc)
            else:
                expiry = amqp_token_expiry(token)
                self._grant(conn, device.device_id, device.auth_type, expiry)
                conn.put_tokens += 1
                self._outcome(conn, device.device_id, True)
        if status != 200:
            self._outcome(conn, device_id, False, f"$cbs put-token refused: {description}")
        self._reply_cbs(conn, request, status, description)

    def _is_hub_audience(self, audience: str) -> bool:
        """A token for the whole hub (a service): ``{hub}``, ``https://{hub}`` ..."""
        host = _SCHEME.sub("", audience).rstrip("/")
        return bool(host) and host.lower() == self.registry.hub_host

    def _on_service_token(self, conn: _Conn, request: Any, token_type: Any, token: Any) -> None:
        """A service's put-token: a shared access policy with ServiceConnect."""
        conn.service_attempt = True
        status, description = 200, "OK"
        if token_type not in amqp.CBS_TOKEN_TYPES:
            status, description = 400, f"unsupported token type {token_type!r}"
        elif not isinstance(token, str):
            status, description = 400, "the token must be an AMQP string"
        else:
            try:
                conn.service_policy = self.registry.verify_service_sas(token, SERVICE_CONNECT)
            except (AuthenticationError, NotAuthorizedError) as exc:
                status, description = 401, str(exc)
            else:
                conn.service_until = amqp_token_expiry(token)
        if status != 200:
            logger.info("service $cbs put-token from %s refused: %s", conn.meta.caller, description)
        self._reply_cbs(conn, request, status, description)

    def _reply_cbs(self, conn: _Conn, request: Any, status: int, description: str) -> None:
        """Answer a put-token on the $cbs reply link (as soon as it can take it)."""
        reply: Any = Message()
        reply.correlation_id = request.id
        reply.address = request.reply_to
        # status-code is an AMQP int (32 bits) as IoT Hub sends it: uamqp-c's management
        # client refuses any other integer type.
        reply.properties = {"status-code": int32(status), "status-description": description}
        if len(conn.cbs_backlog) >= 100:
            logger.info("$cbs replies to %s are not taken; reply dropped", conn.meta.caller)
            return
        conn.cbs_backlog.append(amqp.encode_message(reply))
        # Sent on the engine's next pass, after the disposition that accepts the request:
        # uamqp (the service SDK's AMQP library) fails a put-token whose answer arrives
        # before the request's disposition.
        conn.cbs_held += 1

    def _grant(self, conn: _Conn, device_id: str, auth_type: str, until: float | None) -> None:
        """``device_id`` may use this connection (until ``until``, epoch s)."""
        old = conn.authorized.get(device_id)
        conn.authorized[device_id] = (auth_type, until)
        if old is not None and old[1] is not None and old[1] == conn.next_expiry:
            self._refresh_expiry(conn)  # the earliest token was replaced
        elif until is not None and (conn.next_expiry is None or until < conn.next_expiry):
            conn.next_expiry = until

    @staticmethod
    def _refresh_expiry(conn: _Conn) -> None:
        expiries = [until for _, until in conn.authorized.values() if until is not None]
        conn.next_expiry = min(expiries) if expiries else None

    def _expire_tokens(self, conn: _Conn, engine: amqp.Engine) -> None:
        if conn.closing is not None:
            return
        now = time.time()
        if conn.service_until is not None and conn.service_until <= now:
            self._close(
                conn,
                engine.connection,
                _UNAUTHORIZED,
                "the service's SAS token expired and was not renewed on $cbs",
            )
            return
        if conn.next_expiry is None or conn.next_expiry > now:
            return
        expired = [
            d for d, (_, until) in conn.authorized.items() if until is not None and until <= now
        ]
        for device_id in expired:
            reason = f"the SAS token for {device_id!r} expired and was not renewed on $cbs"
            if len(conn.authorized) == 1:
                self._close(conn, engine.connection, _UNAUTHORIZED, reason)
                return
            # a multiplexed connection: the other devices stay
            self._detach(conn, engine, device_id, _UNAUTHORIZED, reason)
        self._refresh_expiry(conn)

    def _detach(
        self, conn: _Conn, engine: amqp.Engine, device_id: str, condition: str, description: str
    ) -> int:
        """Detach every link of ``device_id`` on ``conn``, which no longer authorizes it;
        log its disconnection. Returns the number of links detached."""
        detached = 0
        link = engine.connection.link_head(Endpoint.LOCAL_ACTIVE)
        while link is not None:
            following = link.next(Endpoint.LOCAL_ACTIVE)
            remote = link.remote_target if link.is_receiver else link.remote_source
            address = amqpc.parse_address(remote.address or "")
            if address is not None and address.device_id == device_id:
                link.condition = Condition(condition, description)
                self._release_link(conn, link)
                link.close()
                detached += 1
            link = following
        conn.authorized.pop(device_id, None)
        conn.c2d_due.discard(device_id)
        if device_id in conn.logged:
            del conn.logged[device_id]
            self.disconnected(conn.meta, device_id, description)
        return detached

    def detach_device(
        self,
        device_id: str,
        *,
        condition: str = _DETACH_FORCED,
        description: str = "the hub detached the device's links",
    ) -> int:
        """Detach ``device_id``'s links on every connection (any thread), with the AMQP
        error ``condition``, as IoT Hub does when it ends a device's session (a disabled
        device: ``amqp:unauthorized-access``). The connections stay open for their other
        devices. Returns the number of links detached."""

        def detach() -> int:
            with self._state_lock:
                conns = list(self._open.values())
            count = 0
            for conn in conns:
                engine = conn.engine
                if engine is None or conn.ended or device_id not in conn.authorized:
                    continue
                count += self._detach(conn, engine, device_id, condition, description)
                self._pump(conn)
            return count

        return self.io.call(detach)

    def _c2d_ready(self, device_id: str) -> None:
        """A message was queued for ``device_id`` (on any thread)."""
        self.io.post(self._deliver_to, device_id)

    def _deliver_to(self, device_id: str) -> None:
        with self._state_lock:
            conns = list(self._open.values())
        for conn in conns:
            if any(device == device_id for _, device in conn.c2d_links):
                conn.c2d_due.add(device_id)
                self._pump(conn)

    def _deliver_c2d(self, conn: _Conn) -> None:
        links = conn.c2d_links
        if len(links) > _C2D_SCAN_ALL:
            if not conn.c2d_due:
                return
            due, conn.c2d_due = conn.c2d_due, set()
            links = [(link, device_id) for link, device_id in links if device_id in due]
        else:
            conn.c2d_due.clear()
        for link, device_id in links:
            while link.credit > 0 and link.state & Endpoint.LOCAL_ACTIVE:
                item = self.state.lock_next_c2d(device_id)
                if item is None:
                    break
                assert item.lock_token is not None
                message = amqpc.c2d_message(
                    device_id,
                    item.payload,
                    item.properties,
                    message_id=item.message_id,
                    correlation_id=item.correlation_id,
                    delivery_count=item.delivery_count - 1,
                )
                # IoT Hub's lock token is the delivery tag (a GUID)
                delivery = link.delivery(uuid.UUID(item.lock_token).bytes)
                link.send(encode(message))
                link.advance()
                conn.c2d_unsettled[delivery] = (item.lock_token, item.delivery_count)

    def _on_disposition(self, conn: _Conn, delivery: Any) -> None:
        found = conn.c2d_unsettled.get(delivery)
        if found is None:
            return
        token, deliveries = found
        outcome = amqp.Outcome.from_proton(delivery.remote_state)
        if outcome is None and not delivery.settled:
            return
        conn.c2d_unsettled.pop(delivery)
        if outcome is amqp.Outcome.ACCEPTED:
            settlement = "complete"
        elif outcome is amqp.Outcome.REJECTED:
            settlement = "reject"  # dead-lettered
        elif deliveries >= self.max_delivery_count:
            settlement = "reject"  # IoT Hub dead-letters after maxDeliveryCount attempts
        else:
            settlement = "abandon"  # released / modified: delivered again
        with contextlib.suppress(KeyError):  # the lock may have expired meanwhile
            self.state.settle_c2d(token, settlement)
        delivery.settle()


def amqp_token_expiry(token: str) -> float | None:
    """The ``se`` of a SAS token (already verified), as epoch seconds."""
    from ..auth import SasToken

    try:
        return float(SasToken.parse(token).expiry)
    except ValueError:
        return None
