"""AMQP 1.0 over WebSockets, as IoT Hub offers it on port 443 for networks that let only
HTTPS through: ``wss://{hub}/$iothub/websocket`` with the subprotocol ``AMQPWSB10``
(the OASIS *AMQP WebSocket Binding*, one AMQP frame stream in binary messages).

The connection is the same as over TCP (:mod:`.wire`): the TLS layer of the hardened
context, then :class:`~iothub_tls._io.websocket.WebSocketClient` (wsproto, the layer MQTT
over WebSockets uses), whose binary messages carry the AMQP engine's bytes. SASL, CBS
and the links do not change. The names are shared with the local hub, which serves the
same path on its HTTPS door.
"""

from __future__ import annotations

import asyncio

from .._io.websocket import WebSocketClient, require_wsproto

__all__ = [
    "SUBPROTOCOL",
    "WEBSOCKET_PATH",
    "WEBSOCKET_PORT",
    "require_websockets",
    "websocket_layer",
]

#: IoT Hub's WebSocket endpoint (the same for MQTT and AMQP) and its port.
WEBSOCKET_PATH = "/$iothub/websocket"
WEBSOCKET_PORT = 443
#: The WebSocket subprotocol of the AMQP WebSocket Binding (AMQP 1.0).
SUBPROTOCOL = "AMQPWSB10"


def require_websockets() -> None:
    """:class:`~iothub_tls.MissingDependencyError` naming ``pip install
    'iothub-tls[websockets]'`` when wsproto is missing (found when the client is built,
    not on the loop)."""
    require_wsproto()


def websocket_layer(inner: asyncio.Protocol, server_hostname: str) -> WebSocketClient:
    """The WebSocket client that carries ``inner``'s AMQP bytes to ``server_hostname``
    (its ``upgraded`` future completes when the hub accepted the upgrade)."""
    return WebSocketClient(
        inner, host=server_hostname, path=WEBSOCKET_PATH, subprotocol=SUBPROTOCOL
    )
