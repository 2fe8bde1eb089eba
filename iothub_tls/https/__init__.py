"""HTTPS device client for IoT Hub (443) on the hardened context, and a requests
adapter that keeps the pinning: ``pip install 'iothub-tls[https]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .client import (
    API_VERSION,
    BadRequestError,
    C2DMessage,
    DeviceNotFoundError,
    HttpsDeviceClient,
    HttpsOptions,
    HubServerError,
    InvalidMessageError,
    Message,
    MessageLockLostError,
    MessageTooLargeError,
    RetryPolicy,
    ThrottledError,
    UnexpectedResponseError,
)
from .client import __getattr__ as __getattr__  # HardenedAdapter, built lazily

if TYPE_CHECKING:
    from .client import HardenedAdapter as HardenedAdapter

__all__ = [
    "API_VERSION",
    "BadRequestError",
    "C2DMessage",
    "DeviceNotFoundError",
    "HardenedAdapter",
    "HttpsDeviceClient",
    "HttpsOptions",
    "HubServerError",
    "InvalidMessageError",
    "Message",
    "MessageLockLostError",
    "MessageTooLargeError",
    "RetryPolicy",
    "ThrottledError",
    "UnexpectedResponseError",
]
