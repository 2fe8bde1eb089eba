"""AMQP 1.0 device client for IoT Hub (5671) on the hardened context, and a generic
AMQP 1.0 connection: ``pip install 'iothub-tls[amqp]'``.

:class:`AmqpDeviceClient` and :class:`AmqpConnection` here are synchronous facades over
their asyncio twins in :mod:`iothub_tls.amqp.aio`; every one of them in a process runs on
the one shared I/O thread.
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

__all__ = [
    "AMQPS_PORT",
    "AmqpConnection",
    "AmqpDelivery",
    "AmqpDeviceClient",
    "AmqpMessage",
    "AmqpOptions",
    "AmqpReceiver",
    "AmqpSender",
    "C2DMessage",
    "RetryPolicy",
]
