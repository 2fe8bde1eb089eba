"""Device clients for asyncio applications: the same surface as the synchronous ones,
with ``await``.

::

    from iothub_tls.aio import MqttDeviceClient   # or AmqpDeviceClient, HttpsDeviceClient

    async with MqttDeviceClient.from_connection_string(cs) as client:
        await client.send_telemetry(b'{"t": 21.5}', {"unit": "C"})
        async for message in client.c2d_messages():
            message.complete()

The clients run on the application's event loop (any asyncio loop; uvloop works the same:
``uvloop.run(main())`` or ``asyncio.run(main(), loop_factory=uvloop.new_event_loop)``),
start no thread of their own, and never block the loop: TLS runs over the loop's
transports (MQTT and AMQP in the library's own layer over memory BIOs, HTTPS in
asyncio's), name resolution is the loop's ``getaddrinfo``. Callbacks (``on_c2d``,
``on_connection_state_change``, ``on_desired_update``, ``on_background_exception``) and
method handlers run on the loop and may be coroutine functions. A process with many
devices should share one :class:`HandshakeGate` (``gate=``) among its clients, so a
reconnection storm runs a bounded number of handshakes at a time. :class:`AmqpGateway`
carries many SAS devices over one AMQP connection.
"""

from __future__ import annotations

from ._io.loop import HandshakeGate
from .amqp.aio import AmqpDeviceClient
from .amqp.aio_gateway import AmqpGateway
from .https.aio import HttpsDeviceClient
from .mqtt.aio import MqttDeviceClient

__all__ = [
    "AmqpDeviceClient",
    "AmqpGateway",
    "HandshakeGate",
    "HttpsDeviceClient",
    "MqttDeviceClient",
]
