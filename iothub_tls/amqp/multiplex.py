"""Many devices on one AMQP connection, without I/O: :class:`MultiplexProtocol`.

IoT Hub lets one AMQP connection carry many SAS-authenticated devices (the Azure C
SDK's "multiplexing"): each device puts its own token on the connection's one ``$cbs``
node (``name`` = ``{hub}/devices/{id}``), and once the hub answered 200, attaches its
own links, which the hub authorizes for that device only. Devices are independent on
the shared connection: a refused token or a detached link ends one device's *group* of
links, not the connection.

:class:`MultiplexProtocol` is the client's AMQP logic for that, on top of the
single-device :class:`~iothub_tls.amqp.engine.ClientProtocol` (whose deliveries,
settlement, credit and connection-level errors it keeps): the connection is ready once
it is open and ``$cbs`` is attached; then each group is added with its token, and
reports :class:`DeviceAuthorized` (each accepted put-token, renewals included),
:class:`DeviceReady` (all its links attached) or :class:`DeviceRefused`.

Token renewals are spread by the I/O layer
(:func:`iothub_tls.amqp.shared.renewal_draw`).
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import AuthenticationError, ClientError, ConnectionFailedError, NotAuthorizedError
from .engine import (
    CBS_ADDRESS,
    CBS_TOKEN_TYPE,
    Attached,
    ClientProtocol,
    Engine,
    LinkSpec,
    condition_text,
    encode_message,
)

from proton import Delivery, Endpoint, Link, Message  # isort: skip

__all__ = [
    "DeviceAuthorized",
    "DeviceReady",
    "DeviceRefused",
    "MultiplexProtocol",
]

_UNAUTHORIZED = "amqp:unauthorized-access"
#: replies the client takes on $cbs before giving credit back (a thousand put-tokens
#: are answered in a burst; the hub queues only so many answers without credit)
CBS_REPLY_CREDIT = 200


@dataclass(frozen=True)
class DeviceAuthorized:
    """The hub accepted the put-token of ``group`` (``renewal``: on a live group)."""

    group: str
    renewal: bool


@dataclass(frozen=True)
class DeviceReady:
    """Every link of ``group`` is attached (its token was accepted before)."""

    group: str


@dataclass(frozen=True)
class DeviceRefused:
    """The hub refused ``group``'s token or detached one of its links; the group's
    links are detached and the group is gone from the connection. ``permanent``: the
    credentials or the authorization were refused (another attempt cannot cure it)."""

    group: str
    error: ClientError
    permanent: bool


class _Group:
    """One device on the connection: its token's audience, its links."""

    __slots__ = ("attaching", "audience", "keys", "ready", "specs")

    def __init__(self, audience: str, specs: Sequence[LinkSpec]) -> None:
        self.audience = audience
        self.specs = list(specs)
        self.keys = {spec.key for spec in specs}
        self.attaching = False  # the token was accepted and the links were attached
        self.ready = False


class MultiplexProtocol(ClientProtocol):
    """Client-side AMQP for many devices (groups of links) on one connection.

    :meth:`open` opens the connection, a session and the ``$cbs`` pair; :class:`Ready`
    (of :mod:`.engine`) says the connection can take groups. :meth:`add_group` puts a
    device's token and, once accepted, attaches its links; :meth:`add_link` declares one
    more link of a group; :meth:`renew` puts a fresh token; :meth:`remove_group`
    detaches a device. Link keys are unique on the connection (the I/O layer prefixes
    them with the group's name).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        peer: str,
        cbs_token_type: str = CBS_TOKEN_TYPE,
    ) -> None:
        super().__init__(engine, [], peer=peer, cbs_audience=None, cbs_token_type=cbs_token_type)
        self._groups: dict[str, _Group] = {}
        self._owner: dict[str, str] = {}  # link key -> group
        self._puts: deque[tuple[str, _Group, str, bool]] = deque()
        self._put_waiting: dict[str, tuple[str, _Group, bool]] = {}  # message id -> ...

    # -- what state it is in --------------------------------------------------------------

    @property
    def stage(self) -> str:
        if self.engine.connection.state & Endpoint.REMOTE_UNINIT:
            return super().stage
        if self._cbs_attached < 2:
            return "the attach of the $cbs links"
        return "nothing (connected)"

    def has_group(self, group: str) -> bool:
        return group in self._groups

    # -- commands -------------------------------------------------------------------------

    def open(self, token: str | None = None) -> None:
        conn = self.engine.connection
        conn.open()
        self._session = conn.session()
        self._session.open()
        self._open_cbs(CBS_REPLY_CREDIT)

    def add_group(self, group: str, audience: str, specs: Sequence[LinkSpec], token: str) -> None:
        """A device joins: put its token, then attach ``specs`` once it is accepted."""
        if group in self._groups:
            raise ValueError(f"group {group!r} is already on this connection")
        entry = _Group(audience, specs)
        self._groups[group] = entry
        for spec in specs:
            self._owner[spec.key] = group
        self._puts.append((group, entry, token, False))
        self._pump_cbs()

    def add_link(self, group: str, spec: LinkSpec) -> None:  # type: ignore[override]
        """One more link of ``group`` (attached now if the group's links are)."""
        entry = self._groups.get(group)
        if entry is None or spec.key in entry.keys:
            return
        entry.specs.append(spec)
        entry.keys.add(spec.key)
        self._owner[spec.key] = group
        if entry.attaching:
            self._attach(spec)

    def renew(self, group: str, token: str) -> None:
        """Put a fresh token for a live ``group``."""
        entry = self._groups.get(group)
        if entry is not None:
            self._puts.append((group, entry, token, True))
            self._pump_cbs()

    def remove_group(self, group: str) -> None:
        """Detach ``group``'s links and forget it; what it had queued or in flight is
        dropped (the I/O layer sends it again when the device is back)."""
        entry = self._groups.pop(group, None)
        if entry is None:
            return
        links = set()
        for key in entry.keys:
            self._owner.pop(key, None)
            self._attached.discard(key)
            self._outbox.pop(key, None)
            link = self._links.pop(key, None)
            if link is None:
                continue
            links.add(link)
            self._key_of.pop(link, None)
            if not link.state & Endpoint.LOCAL_CLOSED:
                link.close()
        if links:
            for delivery in [d for d in self._inflight if d.link in links]:
                del self._inflight[delivery]
        self._specs = [spec for spec in self._specs if spec.key not in entry.keys]
        self._puts = deque(put for put in self._puts if put[1] is not entry)

    # -- internals ------------------------------------------------------------------------

    def _emit(self, event: DeviceAuthorized | DeviceReady | DeviceRefused) -> None:
        """Report one of this class's own events (besides the engine's ClientEvent)."""
        self._events.append(event)  # type: ignore[arg-type]

    def _check_ready(self) -> None:
        opened = self.engine.connection.state & Endpoint.REMOTE_ACTIVE
        if not self._ready and opened and self._cbs_attached >= 2:
            self._links_started = True
            self._become_ready()

    def _pump_cbs(self) -> None:
        sender = self._cbs_sender
        if sender is None or self._cbs_attached < 2:
            return
        while self._puts and sender.credit > 0:
            group, entry, token, renewal = self._puts.popleft()
            request: Any = Message(body=token)
            request.id = str(uuid.uuid4())
            request.reply_to = "cbs"
            request.address = CBS_ADDRESS
            request.properties = {
                "operation": "put-token",
                "type": self._cbs_token_type,
                "name": entry.audience,
            }
            self._put_waiting[str(request.id)] = (group, entry, renewal)
            # pre-settled, as the single-device client sends it: the reply is the outcome
            delivery = sender.delivery(self._next_tag())
            sender.send(encode_message(request))
            sender.advance()
            delivery.settle()

    def _on_cbs_reply(self, delivery: Delivery) -> None:
        reply = self._read_cbs_reply(delivery)
        if reply is None:
            return
        waiting = self._put_waiting.pop(reply.correlation_id, None)
        if waiting is None:
            return  # not an answer to one of ours
        group, entry, renewal = waiting
        if self._groups.get(group) is not entry:
            return  # the device left meanwhile
        if reply.status == 200:
            self._emit(DeviceAuthorized(group, renewal))
            if not entry.attaching:
                entry.attaching = True
                for spec in entry.specs:
                    self._specs.append(spec)
                    self._attach(spec)
                self._check_group(group, entry)
            return
        self.remove_group(group)
        error = AuthenticationError(
            f"{self.peer} refused the SAS token for {entry.audience!r}: $cbs put-token "
            f"status {reply.status} {reply.description}".rstrip()
            + ". Check the device id and key in the connection string, whether the device "
            "is enabled, and the clock (tokens are signed with an expiry time)"
        )
        self._emit(DeviceRefused(group, error, True))

    def _on_link_open(self, link: Link) -> None:
        if link in (self._cbs_sender, self._cbs_receiver):
            self._cbs_attached += 1
            self._pump_cbs()
            self._check_ready()
            return
        key = self._key_of.get(link)
        if key is None:
            return
        # A peer refusing a link attaches with a null terminus, then detaches.
        remote = link.remote_target if link.is_sender else link.remote_source
        if remote.address is None and not remote.dynamic:
            return
        self._attached.add(key)
        self._events.append(Attached(key))
        self._pump_link(key)
        group = self._owner.get(key)
        entry = self._groups.get(group) if group is not None else None
        if group is not None and entry is not None:
            self._check_group(group, entry)

    def _check_group(self, group: str, entry: _Group) -> None:
        if entry.attaching and not entry.ready and entry.keys <= self._attached:
            entry.ready = True
            self._emit(DeviceReady(group))

    def _on_link_close(self, link: Link) -> None:
        if link in (self._cbs_sender, self._cbs_receiver):
            super()._on_link_close(link)  # without $cbs the connection is no use
            return
        if link.state & Endpoint.LOCAL_CLOSED:
            return
        key = self._key_of.get(link)
        group = self._owner.get(key) if key is not None else None
        if group is None:
            link.close()
            return
        cond = link.remote_condition
        address = link.target.address if link.is_sender else link.source.address
        text = condition_text(cond)
        error: ClientError
        permanent = cond is not None and cond.name == _UNAUTHORIZED
        if permanent:
            error = NotAuthorizedError(
                f"{self.peer} refused the link to {address!r} ({text}): this device is not "
                "allowed to use that address"
            )
        else:
            error = ConnectionFailedError(f"{self.peer} detached the link to {address!r} ({text})")
        self.remove_group(group)
        self._emit(DeviceRefused(group, error, permanent))
