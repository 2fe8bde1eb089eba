"""MQTT and AMQP over WebSockets on the local hub's HTTPS door, as IoT Hub serves them on
port 443: ``GET /$iothub/websocket`` with ``Upgrade: websocket`` and the subprotocol
``mqtt`` (MQTT 3.1.1) or ``AMQPWSB10`` (AMQP 1.0, the OASIS WebSocket binding).

The HTTPS door (:mod:`.https`) hands such a request to :func:`refusal` first: a request
that cannot be upgraded is answered with its HTTP status (404 for another path, 405 for
another method, 426 without the upgrade headers or with another WebSocket version, 400
for a missing key or no subprotocol the hub serves) and a line in the connection log.
An accepted upgrade is answered ``101 Switching Protocols`` and the connection becomes a
:class:`WebSocketSession`: its binary messages carry the bytes of a session of the MQTT
or AMQP door, created by that door on the same connection (same loop, same TLS facts,
same authentication, same connection log, where its protocol reads ``MqttWs`` or
``AmqpWs``). wsproto frames and unframes the messages (the client's must be masked).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from ..amqp.websocket import SUBPROTOCOL as AMQP_SUBPROTOCOL
from ..amqp.websocket import WEBSOCKET_PATH
from ..mqtt.conventions import WEBSOCKET_PATH as _MQTT_PATH

if TYPE_CHECKING:
    from .frontdoor import TlsFrontDoor
    from .http1 import RequestHead
    from .stream import Session, TlsMeta, TlsStream

__all__ = [
    "MQTT_SUBPROTOCOL",
    "SUBPROTOCOLS",
    "Refusal",
    "WebSocketSession",
    "accept",
    "is_websocket_request",
    "refusal",
]

logger = logging.getLogger("iothub_tls.hub")

assert WEBSOCKET_PATH == _MQTT_PATH  # one WebSocket endpoint for both protocols

#: The subprotocol of MQTT over WebSockets (MQTT 3.1.1 section 6).
MQTT_SUBPROTOCOL = "mqtt"
#: subprotocol -> the hub's protocol whose door serves it
SUBPROTOCOLS = {MQTT_SUBPROTOCOL: "mqtt", AMQP_SUBPROTOCOL: "amqp"}
#: RFC 6455 section 1.3: appended to Sec-WebSocket-Key before hashing.
_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass(frozen=True)
class Refusal:
    """Why an upgrade request is refused, and how it is answered."""

    status: int
    reason: str
    code: str
    headers: dict[str, str]


def _tokens(head: RequestHead, name: str) -> list[str]:
    return [
        token.strip().lower()
        for value in head.headers.get_all(name)
        for token in value.split(",")
        if token.strip()
    ]


def is_websocket_request(head: RequestHead) -> bool:
    """Whether the HTTPS door hands this request to WebSockets: it names the WebSocket
    path, or asks for an upgrade to WebSocket (to whatever path)."""
    return urlsplit(head.target).path == WEBSOCKET_PATH or "websocket" in _tokens(head, "Upgrade")


def refusal(head: RequestHead, served: set[str]) -> Refusal | None:
    """Why ``head`` cannot become a WebSocket session for one of the ``served``
    protocols ("mqtt", "amqp"), or None when it can."""
    try:
        import wsproto  # noqa: F401
    except ImportError:
        return Refusal(
            501,
            "WebSocket upgrade refused: this hub serves WebSockets with wsproto, which is "
            "not installed: pip install 'iothub-tls[websockets]'",
            "NotImplemented",
            {},
        )
    path = urlsplit(head.target).path
    if path != WEBSOCKET_PATH:
        return Refusal(
            404,
            f"WebSocket upgrade refused: no WebSocket endpoint at {path[:80]!r}; IoT Hub "
            f"serves MQTT and AMQP over WebSockets on {WEBSOCKET_PATH}",
            "NotFound",
            {},
        )
    if head.method != "GET":
        return Refusal(
            405,
            f"WebSocket upgrade refused: {head.method} {WEBSOCKET_PATH}; the upgrade is a GET",
            "MethodNotAllowed",
            {"Allow": "GET"},
        )
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade"}
    if "websocket" not in _tokens(head, "Upgrade") or "upgrade" not in _tokens(head, "Connection"):
        return Refusal(
            426,
            f"WebSocket upgrade refused: GET {WEBSOCKET_PATH} without 'Upgrade: websocket' "
            "and 'Connection: Upgrade' (MQTT and AMQP are served here over WebSockets only)",
            "UpgradeRequired",
            upgrade,
        )
    version = (head.headers.get("Sec-WebSocket-Version") or "").strip()
    if version != "13":
        return Refusal(
            426,
            f"WebSocket upgrade refused: Sec-WebSocket-Version {version[:10]!r}; this "
            "endpoint speaks version 13 (RFC 6455)",
            "UpgradeRequired",
            {**upgrade, "Sec-WebSocket-Version": "13"},
        )
    key = (head.headers.get("Sec-WebSocket-Key") or "").strip()
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid_key = False
    if not valid_key:
        return Refusal(
            400,
            "WebSocket upgrade refused: Sec-WebSocket-Key is missing or is not 16 bytes "
            "in base64 (RFC 6455 section 4.1)",
            "ArgumentInvalid",
            {},
        )
    offered = _tokens(head, "Sec-WebSocket-Protocol")
    if _choose(head, served) is None:
        wanted = " or ".join(p for p, name in SUBPROTOCOLS.items() if name in served)
        said = ", ".join(offered) if offered else "none"
        return Refusal(
            400,
            f"WebSocket upgrade refused: subprotocol {said[:80]} is not served here; ask "
            f"for {wanted or 'nothing: no MQTT or AMQP door runs'} in Sec-WebSocket-Protocol",
            "ArgumentInvalid",
            {},
        )
    return None


def _choose(head: RequestHead, served: set[str]) -> str | None:
    """The first subprotocol the client offers that the hub serves (as the client
    spelled it: ``AMQPWSB10`` is case-sensitive on the wire, so it is matched exactly
    except for case)."""
    for value in head.headers.get_all("Sec-WebSocket-Protocol"):
        for token in value.split(","):
            name = token.strip()
            for known, protocol in SUBPROTOCOLS.items():
                if name.lower() == known.lower() and protocol in served:
                    return known
    return None


def accept(
    stream: TlsStream,
    meta: TlsMeta,
    head: RequestHead,
    doors: dict[str, TlsFrontDoor],
    leftover: bytes,
) -> WebSocketSession:
    """Answer ``101 Switching Protocols`` for ``head`` (checked by :func:`refusal`) and
    return the session that replaces the HTTP one on ``stream``; ``leftover`` is what the
    client sent after its request (WebSocket frames already)."""
    subprotocol = _choose(head, set(doors))
    assert subprotocol is not None  # refusal() said so
    door = doors[SUBPROTOCOLS[subprotocol]]
    key = (head.headers.get("Sec-WebSocket-Key") or "").strip()
    digest = hashlib.sha1((key + _GUID).encode("ascii"), usedforsecurity=False).digest()
    stream.write(
        (
            "HTTP/1.1 101 Switching Protocols\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {base64.b64encode(digest).decode('ascii')}\r\n"
            f"Sec-WebSocket-Protocol: {subprotocol}\r\n\r\n"
        ).encode("ascii")
    )
    logger.debug("%s: WebSocket upgrade to %s", meta.caller, subprotocol)
    session = WebSocketSession(stream, replace(meta, websocket=True), door)
    if leftover:
        session.data_received(leftover)
    return session


class _MessageStream:
    """What the MQTT or AMQP session sees as its stream: what it writes goes out as
    binary WebSocket messages; closing sends a WebSocket close first."""

    def __init__(self, owner: WebSocketSession) -> None:
        self._owner = owner
        self.tls = owner.stream.tls
        self.caller = owner.stream.caller

    def write(self, data: bytes) -> None:
        if data:
            self._owner.send_bytes(data)

    def close(self, *, linger: float = 0.0) -> None:
        self._owner.close(1000, linger=max(linger, 2.0))

    def abort(self, reason: BaseException | None = None) -> None:
        self._owner.stream.abort(reason)


class WebSocketSession:
    """The TLS stream's session after an accepted upgrade: WebSocket frames in and out
    (wsproto), their payload to and from the protocol door's own session."""

    def __init__(self, stream: TlsStream, meta: TlsMeta, door: TlsFrontDoor) -> None:
        from wsproto.connection import Connection, ConnectionType

        self.stream = stream
        self._ws = Connection(ConnectionType.SERVER)
        self._closing = False
        self._ended = False
        # The door's session takes a TlsStream; it uses write / close / abort / tls,
        # which the message stream provides.
        self.inner: Session = door.open_session(cast("TlsStream", _MessageStream(self)), meta)

    # -- the TLS stream's side ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
        from wsproto.utilities import RemoteProtocolError

        if self._ended:
            return
        try:
            self._ws.receive_data(data)
            events = list(self._ws.events())
        except RemoteProtocolError as exc:
            self._protocol_error(f"malformed WebSocket frame: {exc}", 1002)
            return
        for event in events:
            if self._ended:
                return
            if isinstance(event, BytesMessage):
                self.inner.data_received(bytes(event.data))
            elif isinstance(event, TextMessage):
                self._protocol_error("a text WebSocket message (MQTT and AMQP are binary)", 1003)
                return
            elif isinstance(event, Ping):
                self._send(event.response())
            elif isinstance(event, CloseConnection):
                if not self._closing:
                    self._closing = True
                    self._send(event.response())
                self.inner.eof_received()

    def eof_received(self) -> None:
        if not self._ended:
            self.inner.eof_received()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._ended:
            self._ended = True
            self.inner.connection_lost(exc)

    # -- the protocol session's side -------------------------------------------------------------

    def send_bytes(self, data: bytes) -> None:
        from wsproto.events import BytesMessage

        if not self._closing:
            self._send(BytesMessage(data=data))

    def close(self, code: int, *, linger: float) -> None:
        from wsproto.events import CloseConnection

        if not self._closing:
            self._closing = True
            self._send(CloseConnection(code=code))
        self.stream.close(linger=linger)

    def _send(self, event: Any) -> None:
        try:
            data = self._ws.send(event)
        except Exception:  # wsproto refuses to send in its current state
            return
        self.stream.write(data)

    def _protocol_error(self, reason: str, code: int) -> None:
        logger.info("%s: WebSocket closed: %s", self.stream.caller, reason)
        ended = ConnectionAbortedError(reason)
        self.close(code, linger=0.0)
        if not self._ended:
            self._ended = True
            self.inner.connection_lost(ended)
