"""HTTPS device client for IoT Hub (443) on the hardened context, and a requests
adapter that keeps the pinning (``pip install 'iothub-tls[requests]'`` for it). The
asyncio client is :class:`iothub_tls.aio.HttpsDeviceClient`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .adapter import HardenedAdapter as HardenedAdapter

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


def __getattr__(name: str) -> Any:
    if name == "HardenedAdapter":  # built on first use: importing this imports no requests
        from .adapter import __getattr__ as build

        adapter = build(name)
        globals()[name] = adapter
        return adapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
