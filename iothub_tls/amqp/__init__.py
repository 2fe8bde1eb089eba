"""AMQP 1.0 device client for IoT Hub (5671) on the hardened context, and a generic
AMQP 1.0 connection: ``pip install 'iothub-tls[amqp]'``.
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
