"""WebSockets (RFC 6455) under a byte-stream protocol, with wsproto (sans-IO).

IoT Hub answers MQTT and AMQP over WebSockets on port 443 (path ``/$iothub/websocket``)
for networks that let only HTTPS through. :class:`WebSocketClient` is an asyncio
protocol placed on the TLS transport: it performs the upgrade, then hands the payload of
each binary message to the inner protocol (MQTT or AMQP) as if it came from a stream,
and frames what the inner protocol writes as binary messages. The inner protocol sees
it as its transport.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..errors import ConnectionFailedError, MissingDependencyError

__all__ = ["WebSocketClient", "require_wsproto"]


def require_wsproto() -> Any:
    try:
        import wsproto
    except ImportError:
        raise MissingDependencyError("websockets", "wsproto") from None
    return wsproto


class WebSocketClient(asyncio.Protocol):
    """A WebSocket client connection carrying ``inner``'s bytes."""

    def __init__(self, inner: asyncio.Protocol, *, host: str, path: str, subprotocol: str) -> None:
        require_wsproto()
        from wsproto import ConnectionType, WSConnection

        self._inner = inner
        self._host = host
        self._path = path
        self._subprotocol = subprotocol
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._transport: asyncio.Transport | None = None
        self._closing = False
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A connection lost after its connector stopped waiting (a time-out) still fails
        # this future: mark its exception as seen, or asyncio reports it on stderr.
        self.upgraded.add_done_callback(_seen)

    # -- the outer (TLS) side -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        from wsproto.events import Request

        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        request = Request(host=self._host, target=self._path, subprotocols=[self._subprotocol])
        transport.write(self._ws.send(request))

    def data_received(self, data: bytes) -> None:
        from wsproto.events import (
            AcceptConnection,
            BytesMessage,
            CloseConnection,
            Ping,
            RejectConnection,
            RejectData,
            TextMessage,
        )
        from wsproto.utilities import RemoteProtocolError

        try:
            self._ws.receive_data(data)
            events = list(self._ws.events())
        except RemoteProtocolError as exc:
            self._fail(ConnectionFailedError(f"the WebSocket stream is malformed: {exc}"))
            return
        for event in events:
            if isinstance(event, AcceptConnection):
                if not self.upgraded.done():
                    self.upgraded.set_result(None)
                self._inner.connection_made(self)  # type: ignore[arg-type]
            elif isinstance(event, RejectConnection):
                self._fail(
                    ConnectionFailedError(
                        f"{self._host} refused the WebSocket upgrade to {self._path} "
                        f"(HTTP {event.status_code}): check the port (443) and the path"
                    )
                )
                return
            elif isinstance(event, RejectData):
                continue
            elif isinstance(event, BytesMessage):
                self._inner.data_received(bytes(event.data))
            elif isinstance(event, TextMessage):
                self._fail(ConnectionFailedError("the server sent a text WebSocket message"))
                return
            elif isinstance(event, Ping):
                self._send(event.response())
            elif isinstance(event, CloseConnection):
                if not self._closing:
                    self._send(event.response())
                if self._transport is not None:
                    self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(
                ConnectionFailedError(
                    f"{self._host} closed the connection during the WebSocket upgrade"
                    f"{f' ({exc})' if exc else ''}"
                )
            )
        self._inner.connection_lost(exc)

    def _send(self, event: Any) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(self._ws.send(event))

    def _fail(self, error: BaseException) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(error)
        if self._transport is not None:
            self._transport.abort()

    # -- what the inner protocol sees as its transport --------------------------------------

    def write(self, data: bytes) -> None:
        from wsproto.events import BytesMessage

        self._send(BytesMessage(data=data))

    def close(self) -> None:
        from wsproto.events import CloseConnection

        if not self._closing:
            self._closing = True
            self._send(CloseConnection(code=1000))
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)


def _seen(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
