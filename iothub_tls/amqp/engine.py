"""Proton's AMQP 1.0 engine, driven without I/O.

python-qpid-proton's ``Connection``/``Transport``/``Collector`` take bytes and give
bytes; this module wraps them so that the client (:mod:`iothub_tls.amqp`) and the local
endpoint (:mod:`iothub_tls.hub.amqp`) can run them over *our* TLS sockets. Nothing
here touches a socket or a clock: callers feed received bytes, take bytes to send, pass
the current time to :meth:`Engine.tick`, and react to the events produced.

* :class:`Engine` — one connection's proton objects (client or server side).
* :class:`ClientProtocol` — the client's AMQP logic on top of an engine: SASL, optional
  claims-based security (``$cbs`` put-token before the links attach, and again to renew
  the token on the live connection), declared links, deliveries with settlement.
* :class:`SaslServer` — the server side of the SASL exchange (RFC 4422 over AMQP 1.0
  section 5.3), kept out of proton so the endpoint decides who may connect (proton's
  built-in server SASL can only use an identity from its own TLS layer, which is not
  used here).
"""

from __future__ import annotations

import enum
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    AuthenticationError,
    ClientError,
    ConnectionFailedError,
    MissingDependencyError,
    NotAuthorizedError,
)

try:
    import proton

    # proton's C binding
    from cproton import (
        isnull,
        pn_collector_peek,
        pn_collector_pop,
        pn_event_type,
    )
    from proton import (
        SASL,
        Collector,
        Condition,
        Connection,
        Data,
        Delivery,
        Endpoint,
        Event,
        Link,
        Message,
        Receiver,
        Sender,
        Transport,
        symbol,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("amqp", "python-qpid-proton") from exc

__all__ = [
    "AMQP_HEADER",
    "CBS_ADDRESS",
    "CBS_TOKEN_TYPE",
    "CBS_TOKEN_TYPES",
    "SASL_HEADER",
    "Attached",
    "ClientEvent",
    "ClientProtocol",
    "Engine",
    "Failed",
    "LinkSpec",
    "Outcome",
    "Ready",
    "Received",
    "SaslCode",
    "SaslConfig",
    "SaslInit",
    "SaslServer",
    "Settled",
    "TokenAccepted",
    "decode_message",
    "encode_message",
]

#: Protocol headers (AMQP 1.0 section 2.2 and 5.3.1).
AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"
#: The claims-based-security node and the token type every SDK but the C# one sends
#: (``azure-devices.net:sastoken`` is accepted by IoT Hub as well).
CBS_ADDRESS = "$cbs"
CBS_TOKEN_TYPE = "servicebus.windows.net:sastoken"  # noqa: S105 - a type name
CBS_TOKEN_TYPES = frozenset({CBS_TOKEN_TYPE, "azure-devices.net:sastoken"})


class Outcome(enum.Enum):
    """The terminal delivery states of AMQP 1.0 (section 3.4)."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RELEASED = "released"
    MODIFIED = "modified"

    @classmethod
    def from_proton(cls, state: int) -> Outcome | None:
        return _FROM_PROTON.get(int(state))

    @property
    def proton(self) -> int:
        return int(_TO_PROTON[self])


_TO_PROTON = {
    Outcome.ACCEPTED: Delivery.ACCEPTED,
    Outcome.REJECTED: Delivery.REJECTED,
    Outcome.RELEASED: Delivery.RELEASED,
    Outcome.MODIFIED: Delivery.MODIFIED,
}
_FROM_PROTON = {int(v): k for k, v in _TO_PROTON.items()}


@dataclass(frozen=True)
class SaslConfig:
    """The client's SASL layer: ``mechanism`` None = no SASL layer at all (the AMQP
    header is sent right after TLS, as the IoT Hub SDKs do for X.509 devices)."""

    mechanism: str | None
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class LinkSpec:
    """A link the client keeps attached (re-attached after every reconnect)."""

    key: str
    address: str
    sender: bool
    name: str
    properties: Mapping[str, Any] = field(default_factory=dict)
    credit: int = 0


# ---------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------


class Engine:
    """One AMQP connection's proton objects, fed and drained by the caller."""

    def __init__(
        self,
        *,
        server: bool = False,
        container_id: str | None = None,
        hostname: str | None = None,
        sasl: SaslConfig | None = None,
        idle_timeout: float | None = None,
        max_frame_size: int | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> None:
        self.server = server
        self.transport = Transport(Transport.SERVER if server else Transport.CLIENT)
        if idle_timeout:
            self.transport.idle_timeout = float(idle_timeout)
        if max_frame_size:
            self.transport.max_frame_size = int(max_frame_size)
        self.sasl: SASL | None = None
        self.connection = Connection()
        self.connection.container = container_id or uuid.uuid4().hex
        if hostname is not None:
            # the open frame's hostname: the hub's name, whatever address we dialled
            self.connection.hostname = hostname
        if properties:
            self.connection.properties = {symbol(k): v for k, v in properties.items()}
        if sasl is not None and sasl.mechanism is not None:
            self.sasl = self.transport.sasl()
            # Offer exactly one mechanism: proton would otherwise pick the "best" one
            # the server lists, which need not be what the caller configured.
            self.sasl.allowed_mechs(sasl.mechanism)
            if sasl.mechanism == "PLAIN":
                # Proton cannot see that the bytes travel inside our TLS connection, so
                # it would refuse to send a password; we know they are encrypted.
                self.sasl.allow_insecure_mechs = True
            if sasl.username is not None:
                self.connection.user = sasl.username
            if sasl.password is not None:
                self.connection.password = sasl.password
        self.collector = Collector()
        self.connection.collect(self.collector)
        self.transport.bind(self.connection)

    # -- bytes ----------------------------------------------------------------------------

    def output(self) -> bytes:
        """Bytes waiting to be written (without consuming them); b"" when none."""
        n = self.transport.pending()
        if n <= 0:
            return b""
        return bytes(self.transport.peek(n) or b"")

    def consumed(self, n: int) -> None:
        """``n`` bytes of :meth:`output` were written."""
        if n > 0:
            self.transport.pop(n)

    @property
    def output_closed(self) -> bool:
        """True when the engine will never produce output again."""
        return self.transport.pending() < 0

    def feed(self, data: bytes) -> None:
        """Bytes received from the peer."""
        view = memoryview(data)
        while view:
            capacity = self.transport.capacity()
            if capacity < 0:  # input side closed (error or end of protocol)
                return
            if capacity == 0:  # pragma: no cover - proton always accepts after processing
                raise ConnectionFailedError("the AMQP engine cannot accept more input")
            chunk = view[:capacity]
            try:
                self.transport.push(bytes(chunk))
            except proton.TransportException:
                return  # recorded in transport.condition; reported as an event
            view = view[len(chunk) :]

    def feed_eof(self) -> None:
        """The peer closed its side of the connection."""
        self.transport.close_tail()

    def tick(self, now: float) -> float:
        """Run timers (idle timeout, heartbeats); returns the next deadline (0: none)."""
        return float(self.transport.tick(now))

    @property
    def closed(self) -> bool:
        return bool(self.transport.closed)

    def events(self, kinds: frozenset[int] | None = None) -> Iterator[Event]:
        """Drain proton's collector; with ``kinds`` (event type numbers), events of
        other types are dropped without being wrapped (wrapping is most of the cost of
        an event, and most events are of no interest to a client)."""
        collector = self.collector
        impl = collector._impl
        while True:
            found = pn_collector_peek(impl)
            if isnull(found):
                return
            if kinds is not None and pn_event_type(found) not in kinds:
                pn_collector_pop(impl)
                continue
            event: Event = Event.wrap(found)  # type: ignore[no-untyped-call]
            try:
                yield event
            finally:
                collector.pop()


def condition_text(cond: Condition | None) -> str:
    if cond is None:
        return "no reason given"
    if cond.description:
        return f"{cond.name}: {cond.description}"
    return str(cond.name)


def encode_message(message: Message) -> bytes:
    return bytes(message.encode())


def decode_message(data: bytes) -> Message:
    message = Message()
    message.decode(data)
    return message


# ---------------------------------------------------------------------------------------
# client protocol
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """CBS (if any) succeeded and every declared link is attached."""


@dataclass(frozen=True)
class Attached:
    """The peer attached declared link ``key`` (on every connection, also for links
    declared after :class:`Ready`)."""

    key: str


@dataclass(frozen=True)
class TokenAccepted:
    """A put-token was answered with status 200."""

    renewal: bool


@dataclass(frozen=True)
class Settled:
    """A message sent on a link reached a terminal state."""

    ref: object
    outcome: Outcome
    reason: str | None


@dataclass(frozen=True)
class Received:
    """A complete message arrived on a receiver link; settle it with
    :meth:`ClientProtocol.settle`."""

    key: str
    delivery: Delivery
    message: Message


@dataclass(frozen=True)
class Failed:
    """The connection is unusable; ``error`` says why (already translated)."""

    error: ClientError


ClientEvent = Ready | Attached | TokenAccepted | Settled | Received | Failed


@dataclass(frozen=True)
class CbsReply:
    """An answer on the ``$cbs`` reply link: the request it answers, its status code
    (None when the peer sent none) and description."""

    correlation_id: str
    status: Any
    description: str


_UNAUTHORIZED = "amqp:unauthorized-access"
#: the proton events ClientProtocol._on_event acts on (the others are not even wrapped)
_CLIENT_EVENTS = frozenset(
    kind.number
    for kind in (
        Event.CONNECTION_REMOTE_OPEN,
        Event.LINK_REMOTE_OPEN,
        Event.LINK_REMOTE_CLOSE,
        Event.LINK_REMOTE_DETACH,
        Event.LINK_FLOW,
        Event.DELIVERY,
        Event.CONNECTION_REMOTE_CLOSE,
        Event.SESSION_REMOTE_CLOSE,
        Event.TRANSPORT_ERROR,
        Event.TRANSPORT_CLOSED,
    )
)


class ClientProtocol:
    """Client-side AMQP logic over an :class:`Engine`.

    After :meth:`open`: SASL (by proton), open, begin; when ``cbs_audience`` is set, the
    ``$cbs`` sender and receiver links attach and a put-token is sent; once the reply
    says 200 (or straight away without CBS) the declared links attach and
    :class:`Ready` is produced. :meth:`events` turns proton's events into the
    :data:`ClientEvent` values the I/O layer acts on.
    """

    def __init__(
        self,
        engine: Engine,
        links: Sequence[LinkSpec],
        *,
        peer: str,
        cbs_audience: str | None = None,
        cbs_token_type: str = CBS_TOKEN_TYPE,
    ) -> None:
        self.engine = engine
        self.peer = peer
        self._specs = list(links)
        self._cbs_audience = cbs_audience
        self._cbs_token_type = cbs_token_type
        self._session: Any = None
        self._links: dict[str, Link] = {}
        self._key_of: dict[Link, str] = {}  # proton wrappers hash by their C object
        self._attached: set[str] = set()
        self._cbs_sender: Sender | None = None
        self._cbs_receiver: Receiver | None = None
        self._cbs_attached = 0
        self._tokens: deque[tuple[str, bool]] = deque()  # (token, renewal) to send
        self._cbs_waiting: dict[str, bool] = {}  # message id -> renewal
        self._outbox: dict[str, deque[tuple[bytes, object]]] = {}
        self._inflight: dict[Delivery, object] = {}  # proton wrappers hash by identity
        self._ready = False
        self._links_started = False
        self._failed: ClientError | None = None
        self._events: list[ClientEvent] = []
        self._tag = 0

    # -- what state it is in --------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready and self._failed is None

    @property
    def failed(self) -> ClientError | None:
        return self._failed

    @property
    def stage(self) -> str:
        """Where the connection set-up is (for timeout messages)."""
        sasl = self.engine.sasl
        if sasl is not None and sasl.outcome is None:
            if self.engine.transport.frames_input == 0:
                return "the SASL mechanisms frame"
            return "the SASL outcome"
        if self.engine.connection.state & Endpoint.REMOTE_UNINIT:
            return "the AMQP open frame"
        if self._cbs_audience is not None and self._cbs_attached < 2:
            return "the attach of the $cbs links"
        if self._cbs_waiting or self._tokens:
            return "the $cbs put-token reply"
        if not self._ready:
            return "the attach of the links"
        return "nothing (connected)"

    # -- commands -------------------------------------------------------------------------

    def open(self, token: str | None = None) -> None:
        conn = self.engine.connection
        conn.open()
        self._session = conn.session()
        self._session.open()
        if self._cbs_audience is not None:
            if token is None:
                raise ValueError("claims-based security needs a token")
            self._open_cbs(4)
            self._tokens.append((token, False))
        else:
            self._attach_links()

    def _open_cbs(self, credit: int) -> None:
        """Attach the ``$cbs`` link pair (requests out, replies in, ``credit`` replies
        prefetched)."""
        self._cbs_sender = self._session.sender("cbs-sender")
        self._cbs_sender.source.address = "cbs"
        self._cbs_sender.target.address = CBS_ADDRESS
        self._cbs_sender.open()
        self._cbs_receiver = self._session.receiver("cbs-receiver")
        self._cbs_receiver.source.address = CBS_ADDRESS
        self._cbs_receiver.target.address = "cbs"
        self._cbs_receiver.open()
        self._cbs_receiver.flow(credit)

    def put_token(self, token: str) -> None:
        """Send a renewed token on the live ``$cbs`` link."""
        self._tokens.append((token, True))
        self._pump_cbs()

    def send(self, key: str, payload: bytes, ref: object) -> None:
        """Queue an encoded message on link ``key``; :class:`Settled` reports it."""
        self._outbox.setdefault(key, deque()).append((payload, ref))
        self._pump_link(key)

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        delivery.update(outcome.proton)
        delivery.settle()

    def flow(self, key: str, credit: int) -> None:
        link = self._links.get(key)
        if isinstance(link, Receiver) and credit > 0:
            link.flow(credit)

    def close(self) -> None:
        conn = self.engine.connection
        if not conn.state & Endpoint.LOCAL_CLOSED:
            conn.close()

    def inflight(self) -> list[object]:
        """References of messages sent and not settled yet (e.g. to resend them after a
        reconnect), followed by those still queued."""
        refs = list(self._inflight.values())
        for queue in self._outbox.values():
            refs += [ref for _, ref in queue]
        return refs

    # -- internals ------------------------------------------------------------------------

    def add_link(self, spec: LinkSpec) -> None:
        """Declare one more link; attached now if the others already are."""
        if any(known.key == spec.key for known in self._specs):
            return  # declared before this connection was made: already attached
        self._specs.append(spec)
        if self._links_started:
            self._attach(spec)

    def _attach_links(self) -> None:
        self._links_started = True
        for spec in self._specs:
            self._attach(spec)
        self._check_ready()

    def _attach(self, spec: LinkSpec) -> None:
        if spec.sender:
            link: Link = self._session.sender(spec.name)
            link.target.address = spec.address
            link.source.address = spec.name
        else:
            link = self._session.receiver(spec.name)
            link.source.address = spec.address
            link.target.address = spec.name
        if spec.properties:
            link.properties = {symbol(k): v for k, v in spec.properties.items()}
        link.open()
        if isinstance(link, Receiver) and spec.credit:
            link.flow(spec.credit)
        self._links[spec.key] = link
        self._key_of[link] = spec.key
        self._outbox.setdefault(spec.key, deque())

    def _check_ready(self) -> None:
        opened = self.engine.connection.state & Endpoint.REMOTE_ACTIVE
        if (
            not self._ready
            and opened
            and self._links_started
            and len(self._attached) == len(self._links)
        ):
            self._become_ready()

    def _become_ready(self) -> None:
        if not self._ready:
            self._ready = True
            self._events.append(Ready())
            for key in self._outbox:
                self._pump_link(key)

    def _next_tag(self) -> str:
        self._tag += 1
        return str(self._tag)

    def _pump_link(self, key: str) -> None:
        link = self._links.get(key)
        queue = self._outbox[key]
        if not isinstance(link, Sender) or key not in self._attached:
            return
        while queue and link.credit > 0:
            payload, ref = queue.popleft()
            delivery = link.delivery(self._next_tag())
            link.send(payload)
            link.advance()
            self._inflight[delivery] = ref

    def _pump_cbs(self) -> None:
        sender = self._cbs_sender
        if sender is None or self._cbs_attached < 2:
            return
        while self._tokens and sender.credit > 0:
            token, renewal = self._tokens.popleft()
            request: Any = Message(body=token)
            request.id = str(uuid.uuid4())
            request.reply_to = "cbs"
            request.address = CBS_ADDRESS
            request.properties = {
                "operation": "put-token",
                "type": self._cbs_token_type,
                "name": self._cbs_audience,
            }
            self._cbs_waiting[str(request.id)] = renewal
            # CBS requests are sent pre-settled: the reply message is the outcome.
            delivery = sender.delivery(self._next_tag())
            sender.send(encode_message(request))
            sender.advance()
            delivery.settle()

    def _fail(self, error: ClientError) -> None:
        if self._failed is None:
            self._failed = error
            self._events.append(Failed(error))
            self.close()

    def events(self) -> list[ClientEvent]:
        """Process proton's events; return what happened since the last call."""
        for event in self.engine.events(_CLIENT_EVENTS):
            self._on_event(event)
        out, self._events = self._events, []
        return out

    def _on_event(self, event: Event) -> None:
        kind = event.type
        # (proton types every context as optional; each is set for its event types)
        ev: Any = event
        if kind == Event.CONNECTION_REMOTE_OPEN:
            self._check_ready()
        elif kind == Event.LINK_REMOTE_OPEN:
            self._on_link_open(ev.link)
        elif kind in (Event.LINK_REMOTE_CLOSE, Event.LINK_REMOTE_DETACH):
            self._on_link_close(ev.link)
        elif kind == Event.LINK_FLOW:
            link = ev.link
            if link == self._cbs_sender:
                self._pump_cbs()
            elif (key := self._key_of.get(link)) is not None:
                self._pump_link(key)
        elif kind == Event.DELIVERY:
            self._on_delivery(ev.delivery)
        elif kind == Event.CONNECTION_REMOTE_CLOSE:
            cond = ev.connection.remote_condition
            self._fail(self._connection_error(cond, "closed the connection"))
        elif kind == Event.SESSION_REMOTE_CLOSE:
            cond = ev.session.remote_condition
            self._fail(self._connection_error(cond, "ended the session"))
        elif kind == Event.TRANSPORT_ERROR:
            self._fail(self._transport_error(ev.transport.condition))
        elif kind == Event.TRANSPORT_CLOSED and self._failed is None:
            self._fail(
                ConnectionFailedError(f"the connection to {self.peer} was closed ({self.stage})")
            )

    def _on_link_open(self, link: Link) -> None:
        if link in (self._cbs_sender, self._cbs_receiver):
            self._cbs_attached += 1
            self._pump_cbs()
            return
        key = self._key_of.get(link)
        if key is not None:
            # A peer refusing a link attaches with a null terminus, then detaches.
            remote = link.remote_target if link.is_sender else link.remote_source
            if remote.address is None and not remote.dynamic:
                return
            self._attached.add(key)
            self._events.append(Attached(key))
            self._pump_link(key)
        self._check_ready()

    def _on_link_close(self, link: Link) -> None:
        if link.state & Endpoint.LOCAL_CLOSED:
            return
        cond = link.remote_condition
        address = link.target.address if link.is_sender else link.source.address
        if link in (self._cbs_sender, self._cbs_receiver):
            self._fail(
                AuthenticationError(
                    f"{self.peer} refused the claims-based-security link $cbs "
                    f"({condition_text(cond)}): the server does not support CBS put-token"
                )
            )
            return
        text = condition_text(cond)
        if cond is not None and cond.name == _UNAUTHORIZED:
            error: ClientError = NotAuthorizedError(
                f"{self.peer} refused the link to {address!r} ({text}): this identity is "
                "not allowed to use that address"
            )
        else:
            error = ConnectionFailedError(f"{self.peer} detached the link to {address!r} ({text})")
        self._fail(error)

    def _on_delivery(self, delivery: Delivery) -> None:
        link = delivery.link
        if link == self._cbs_receiver:
            self._on_cbs_reply(delivery)
            return
        if link.is_sender:
            if delivery not in self._inflight:
                return
            outcome = Outcome.from_proton(delivery.remote_state)
            if outcome is None and not delivery.settled:
                return  # an intermediate state (received), or nothing new
            ref = self._inflight.pop(delivery)
            reason = None
            if outcome is Outcome.REJECTED:
                cond = delivery.remote.condition
                reason = condition_text(cond) if cond is not None else None
            delivery.settle()
            self._events.append(Settled(ref, outcome or Outcome.RELEASED, reason))
            return
        if delivery.readable and not delivery.partial:
            data = link.recv(delivery.pending)
            link.advance()
            try:
                message = decode_message(bytes(data or b""))
            except proton.MessageException:
                delivery.update(Delivery.REJECTED)
                delivery.settle()
                return
            key = self._key_of.get(link)
            if key is not None:
                self._events.append(Received(key, delivery, message))

    def _read_cbs_reply(self, delivery: Delivery) -> CbsReply | None:
        """Take a complete ``$cbs`` reply off its link (accepted, one more credit given);
        None while it is incomplete or when it is unreadable (the connection failed)."""
        receiver = self._cbs_receiver
        assert receiver is not None
        if not delivery.readable or delivery.partial:
            return None
        data = receiver.recv(delivery.pending)
        receiver.advance()
        delivery.update(Delivery.ACCEPTED)
        delivery.settle()
        receiver.flow(1)
        try:
            reply = decode_message(bytes(data or b""))
        except proton.MessageException:
            self._fail(AuthenticationError(f"{self.peer} sent an unreadable $cbs reply"))
            return None
        props: dict[str, Any] = dict(reply.properties or {})
        status = props.get("status-code")
        if isinstance(status, int):
            status = int(status)  # IoT Hub sends an AMQP int (proton: int32)
        description = str(props.get("status-description") or "")
        return CbsReply(str(reply.correlation_id), status, description)

    def _on_cbs_reply(self, delivery: Delivery) -> None:
        reply = self._read_cbs_reply(delivery)
        if reply is None:
            return
        renewal = self._cbs_waiting.pop(reply.correlation_id, None)
        if renewal is None:
            return  # not an answer to one of ours
        status, description = reply.status, reply.description
        if status == 200:
            self._events.append(TokenAccepted(renewal))
            if not renewal and not self._links_started:
                self._attach_links()
            return
        self._fail(
            AuthenticationError(
                f"{self.peer} refused the SAS token for {self._cbs_audience!r}: "
                f"$cbs put-token status {status} {description}".rstrip()
                + ". Check the device id and key in the connection string, and the "
                "device clock (tokens are signed with an expiry time)"
            )
        )

    def _connection_error(self, cond: Condition | None, what: str) -> ClientError:
        text = condition_text(cond)
        if cond is not None and cond.name == _UNAUTHORIZED:
            return AuthenticationError(f"{self.peer} {what}: {text}")
        return ConnectionFailedError(f"{self.peer} {what} ({text})")

    def _transport_error(self, cond: Condition | None) -> ClientError:
        sasl = self.engine.sasl
        text = condition_text(cond)
        if sasl is not None and sasl.outcome not in (None, SASL.OK):
            mech = sasl.mech or "(none agreed)"
            outcome = _SASL_OUTCOMES.get(int(sasl.outcome), str(sasl.outcome))
            return AuthenticationError(
                f"{self.peer} refused SASL {mech} authentication (outcome {outcome}: {text}). "
                + _SASL_HINTS.get(mech, "Check the credentials")
            )
        if cond is not None and cond.name == _UNAUTHORIZED:
            # SASL refused before any outcome: usually no mechanism in common.
            return AuthenticationError(f"{self.peer} refused SASL authentication ({text})")
        if "idle-timeout" in text:
            return ConnectionFailedError(
                f"{self.peer} sent nothing within the idle timeout ({text}): the connection "
                "is considered dead"
            )
        if "Expected AMQP protocol header" in text or "SASL header" in text:
            return ConnectionFailedError(
                f"{self.peer} and this client disagree about the SASL layer ({text}): "
                "the server may require SASL (configure a mechanism) or not offer it"
            )
        return ConnectionFailedError(f"AMQP connection to {self.peer} failed ({text})")


_SASL_HINTS = {
    "PLAIN": "Check the user name and password",
    "EXTERNAL": "The client certificate verified, but the server knows no identity for it: "
    "register the certificate (its thumbprint, or its CA and CN) with the server",
    "ANONYMOUS": "The server does not accept anonymous connections",
}
_SASL_OUTCOMES = {
    int(SASL.AUTH): "auth",
    int(SASL.SYS): "sys",
    int(SASL.PERM): "sys-perm",
    int(SASL.TEMP): "sys-temp",
}


# ---------------------------------------------------------------------------------------
# server-side SASL
# ---------------------------------------------------------------------------------------

_SASL_MECHANISMS_CODE = 0x40
_SASL_INIT_CODE = 0x41
_SASL_OUTCOME_CODE = 0x44


class SaslCode(enum.IntEnum):
    """sasl-outcome codes (AMQP 1.0 section 5.3.3.6)."""

    OK = 0
    AUTH = 1
    SYS = 2
    SYS_PERM = 3
    SYS_TEMP = 4


@dataclass(frozen=True)
class SaslInit:
    mechanism: str
    initial_response: bytes | None
    hostname: str | None


def _sasl_frame(code: int, fields: list[tuple[str, Any]]) -> bytes:
    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(code)
    data.put_list()
    data.enter()
    for kind, value in fields:
        if kind == "symbols":
            data.put_array(False, Data.SYMBOL)
            data.enter()
            for item in value:
                data.put_symbol(item)
            data.exit()
        elif kind == "ubyte":
            data.put_ubyte(value)
        elif kind == "binary":
            data.put_binary(value)
    data.exit()
    data.exit()
    body = bytes(data.encode())
    size = 8 + len(body)
    return size.to_bytes(4, "big") + b"\x02\x01\x00\x00" + body


class SaslServer:
    """The server half of the SASL exchange, without I/O.

    Feed the connection's first bytes. ``state`` becomes:

    * ``"init"`` — a ``sasl-init`` arrived (:attr:`init`); call :meth:`outcome`.
    * ``"skipped"`` — the client sent the plain AMQP header (no SASL layer);
      :attr:`leftover` holds every byte received, for the AMQP engine.
    * ``"invalid"`` — not AMQP at all (the SASL header was sent in reply, as the
      specification asks of a server that cannot accept the header it received).
    """

    def __init__(self, mechanisms: Sequence[str]) -> None:
        self.mechanisms = tuple(mechanisms)
        self.state = "header"
        self.init: SaslInit | None = None
        self.output = bytearray()
        self.leftover = b""
        self._buffer = b""

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if self.state == "header" and len(self._buffer) >= 8:
            header, rest = self._buffer[:8], self._buffer[8:]
            if header == SASL_HEADER:
                self.output += SASL_HEADER
                self.output += _sasl_frame(_SASL_MECHANISMS_CODE, [("symbols", self.mechanisms)])
                self.state = "mechanisms"
                self._buffer = rest
            elif header == AMQP_HEADER:
                self.state = "skipped"
                self.leftover, self._buffer = self._buffer, b""
                return
            else:
                self.output += SASL_HEADER
                self.state = "invalid"
                return
        if self.state == "mechanisms" and len(self._buffer) >= 8:
            size = int.from_bytes(self._buffer[:4], "big")
            if size < 8 or size > 65536 or self._buffer[5] != 1:
                self.state = "invalid"
                return
            if len(self._buffer) < size:
                return
            frame, self._buffer = self._buffer[:size], self._buffer[size:]
            self.init = self._parse_init(frame)
            self.state = "init" if self.init is not None else "invalid"

    @staticmethod
    def _parse_init(frame: bytes) -> SaslInit | None:
        body = frame[frame[4] * 4 :]
        data = Data()
        try:
            data.decode(body)
            data.rewind()
            data.next()
            value = data.get_object()
        except Exception:
            return None
        if value is None or getattr(value, "descriptor", None) != _SASL_INIT_CODE:
            return None
        fields = [*list(value.value), None, None, None]
        mechanism, response, hostname = fields[0], fields[1], fields[2]
        if not isinstance(mechanism, str):
            return None
        return SaslInit(
            str(mechanism),
            bytes(response) if response is not None else None,
            str(hostname) if hostname is not None else None,
        )

    def outcome(self, code: SaslCode) -> None:
        """Send the sasl-outcome; after OK the remaining bytes belong to AMQP."""
        self.output += _sasl_frame(_SASL_OUTCOME_CODE, [("ubyte", int(code))])
        if code is SaslCode.OK:
            self.state = "done"
            self.leftover, self._buffer = self._buffer, b""
        else:
            self.state = "refused"

    def take_output(self) -> bytes:
        out, self.output = bytes(self.output), bytearray()
        return out
