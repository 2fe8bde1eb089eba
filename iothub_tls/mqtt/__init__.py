"""MQTT 3.1.1 device client for IoT Hub (TCP 8883 or WebSockets 443) on the hardened
context: ``pip install 'iothub-tls[mqtt]'``.
"""

from __future__ import annotations

from .client import (
    C2DMessage,
    ConnectRefusedError,
    MqttDeviceClient,
    MqttOptions,
    QueueFullError,
    RetryPolicy,
)

__all__ = [
    "C2DMessage",
    "ConnectRefusedError",
    "MqttDeviceClient",
    "MqttOptions",
    "QueueFullError",
    "RetryPolicy",
]
