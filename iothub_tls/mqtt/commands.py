"""What the MQTT client's threads hand its network thread, and how they wait for it.

Each telemetry message is one object: the future its sender waits on, carrying its
topic and payload. Twin requests and method answers are small values; futures are
completed with :func:`settle` and waited for with :func:`completed_within`.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..auth import ConnectionString, SasTokenProvider
from ..tls.context import HardenedSSLContext
from .conventions import MqttOptions


@dataclass(frozen=True)
class ClientConfig:
    """Everything a connection needs, fixed for the client's lifetime."""

    cs: ConnectionString
    server_hostname: str
    connect_host: str
    port: int
    websockets: bool
    context: HardenedSSLContext
    sas: SasTokenProvider | None
    username: str
    options: MqttOptions


class Message(concurrent.futures.Future[None]):
    """A telemetry message, and the future its sender waits on (one object each).

    Cancelling it withdraws a message that has not been handed to paho yet and frees
    its place in the queue at once.
    """

    def __init__(self, topic: str, payload: bytes, on_withdrawn: Callable[[Message], None]) -> None:
        super().__init__()
        self.topic = topic
        self.payload = payload
        self.counted = True  # holds a place in the queue (guarded by the network's lock)
        self._on_withdrawn = on_withdrawn

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        self._on_withdrawn(self)
        return True


@dataclass
class TwinRequest:
    operation: str  # "GET" or "PATCH"
    payload: bytes
    future: concurrent.futures.Future[tuple[bytes, int | None]]
    deadline: float


@dataclass
class MethodResponse:
    status: int
    request_id: str
    payload: bytes


def settle(
    future: concurrent.futures.Future[Any],
    *,
    result: Any = None,
    error: BaseException | None = None,
) -> bool:
    """Complete a future unless it already is (cancelled by a caller that timed out);
    True when this call completed it."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        return False
    return True


def completed_within(future: concurrent.futures.Future[Any], timeout: float) -> bool:
    """True when ``future`` completed within ``timeout``. (Catching the TimeoutError of
    ``future.result(timeout)`` would also catch a TimeoutError *set on* the future, such
    as HandshakeTimeoutError; ``exception()`` returns that one instead.)"""
    try:
        future.exception(timeout)
    except concurrent.futures.TimeoutError:
        return False
    except concurrent.futures.CancelledError:
        return True
    return True
