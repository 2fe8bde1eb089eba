"""AMQP 1.0 device client for IoT Hub (5671) on the hardened context, and a generic
AMQP 1.0 connection: ``pip install 'iothub-tls[amqp]'``.

:class:`AmqpDeviceClient` and :class:`AmqpConnection` here are synchronous facades over
their asyncio twins in :mod:`iothub_tls.amqp.aio`; every one of them in a process runs on
the one shared I/O thread. :class:`AmqpGateway` carries many SAS devices over one
connection (IoT Hub's AMQP multiplexing).
"""

from __future__ import annotations

from .client import (
    AMQPS_PORT,
    AmqpConnection,
    AmqpDelivery,
    AmqpDeviceClient,
    AmqpMessage,
    AmqpOptions,
    AmqpReceiver,
    AmqpSender,
    C2DMessage,
    RetryPolicy,
)
from .gateway import AmqpGateway

__all__ = [
    "AMQPS_PORT",
    "AmqpConnection",
    "AmqpDelivery",
    "AmqpDeviceClient",
    "AmqpGateway",
    "AmqpMessage",
    "AmqpOptions",
    "AmqpReceiver",
    "AmqpSender",
    "C2DMessage",
    "RetryPolicy",
]
