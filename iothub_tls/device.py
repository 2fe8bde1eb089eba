"""The device-client surface that MQTT, AMQP and HTTPS share.

:class:`DeviceClient` is the :class:`typing.Protocol` every device client satisfies
(``mypy --strict`` checks it in CI): the same factories, the same ``send_telemetry``,
one :class:`C2DMessage` type settled with ``complete()`` / ``reject()`` / ``abandon()``,
the same callbacks, twin and direct methods. The values here (:class:`Message`,
:class:`C2DMessage`, :class:`MethodRequest`, :class:`ConnectionState`) are what crosses
that surface; each transport's conventions module turns them into its wire form and
back, and the local hub uses the same modules, so both sides agree by construction.

Where a transport cannot do something IoT Hub offers elsewhere (a device twin over
HTTPS, rejecting a message over MQTT), the call raises
:class:`~iothub_tls.errors.UnsupportedOperationError` naming the transport that can.
"""

from __future__ import annotations

import enum
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

from .errors import (
    ClientError,
    DeliveryError,
    MessageTooLargeError,
    NotAuthorizedError,
    PolicyError,
    UnsupportedOperationError,
)

if TYPE_CHECKING:
    from .auth import ClientIdentity, ConnectionString
    from .tls.info import TlsInfo

__all__ = [
    "AsyncDeviceClient",
    "C2DMessage",
    "ConnectionState",
    "DeviceClient",
    "Message",
    "MethodHandler",
    "MethodRequest",
    "Settlement",
]

logger = logging.getLogger("iothub_tls")

#: Largest device-to-cloud message IoT Hub accepts, body and properties (256 KB).
MAX_MESSAGE_BYTES = 256 * 1024
#: The ``api-version`` every transport sends: the version Microsoft's MQTT article shows
#: (and the Node.js SDK sends), documented for every device operation. IoT Hub
#: recommends always sending one.
API_VERSION = "2021-04-12"

_SYSTEM_KEYWORDS = ("message_id", "correlation_id", "content_type", "content_encoding")


class ConnectionState(str, enum.Enum):
    """What ``on_connection_state_change(state, reason)`` reports."""

    #: connect() started a connection (also each reconnection attempt).
    CONNECTING = "connecting"
    #: authenticated and ready; also after every reconnection.
    CONNECTED = "connected"
    #: the connection was lost; ``reason`` is the error. The client reconnects.
    DISCONNECTED = "disconnected"
    #: the client stopped: ``reason`` is None after close(), else the error that made it
    #: give up (refused credentials or certificate, retry attempts used up).
    CLOSED = "closed"


class Settlement(str, enum.Enum):
    """How a cloud-to-device message is settled."""

    #: done with it: the hub removes it from the device's queue.
    COMPLETE = "complete"
    #: the device cannot process it: the hub dead-letters it (no redelivery).
    REJECT = "reject"
    #: give it back: the hub delivers it again (up to the hub's max delivery count).
    ABANDON = "abandon"


def _as_payload(payload: object) -> bytes:
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    raise TypeError(
        f"payload must be bytes or str, not {type(payload).__name__} (serialise it first, "
        "e.g. json.dumps(...).encode())"
    )


def _check_properties(properties: Mapping[str, str] | None) -> dict[str, str]:
    if properties is None:
        return {}
    if not isinstance(properties, Mapping):
        raise TypeError(
            f"properties must be a mapping of str to str, not {type(properties).__name__}"
        )
    checked: dict[str, str] = {}
    for name, value in properties.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"property names must be non-empty str, not {name!r}")
        if not isinstance(value, str):
            raise TypeError(
                f"property {name!r} has a {type(value).__name__} value; application "
                "property values are strings (convert it with str())"
            )
        checked[name] = value
    return checked


@dataclass(frozen=True)
class Message:
    """A device-to-cloud message: the payload, application properties (str -> str,
    seen by the hub's routing queries) and IoT Hub's system properties.

    ``Message(b"...", {"k": "v"}, content_type="application/json")``; a ``str`` payload
    is sent as UTF-8. Every client's ``send_telemetry`` takes one, or the same fields
    as arguments.
    """

    payload: bytes
    properties: Mapping[str, str] = field(default_factory=dict, hash=False)
    message_id: str | None = None
    correlation_id: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "payload", _as_payload(self.payload))
        object.__setattr__(self, "properties", MappingProxyType(_check_properties(self.properties)))
        for keyword in _SYSTEM_KEYWORDS:
            value = getattr(self, keyword)
            if value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"{keyword} must be a non-empty str or None, not {value!r}")

    @classmethod
    def coerce(
        cls,
        payload: bytes | str | Message,
        properties: Mapping[str, str] | None = None,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
    ) -> Message:
        """``payload`` as a :class:`Message`: a Message is taken as it is (then the other
        arguments must be left out), anything else is built from the arguments."""
        if isinstance(payload, Message):
            given = (properties, message_id, correlation_id, content_type, content_encoding)
            if any(value is not None for value in given):
                raise TypeError(
                    "pass either a Message or a payload with properties and system "
                    "properties, not both"
                )
            return payload
        return cls(
            _as_payload(payload),
            properties or {},
            message_id=message_id,
            correlation_id=correlation_id,
            content_type=content_type,
            content_encoding=content_encoding,
        )

    @property
    def size(self) -> int:
        """What counts against IoT Hub's 256 KB limit: the payload, the application
        property names and values, and the system property values."""
        system = sum(len(getattr(self, k) or "") for k in _SYSTEM_KEYWORDS)
        app = sum(len(k) + len(v) for k, v in self.properties.items())
        return len(self.payload) + system + app

    def check_size(self) -> None:
        """Refuse a message IoT Hub would not accept (over 256 KB with its properties).

        :raises MessageTooLargeError: found before sending (its ``status`` is None).
        """
        if self.size > MAX_MESSAGE_BYTES:
            raise MessageTooLargeError(
                f"the message is {self.size} bytes with its properties; IoT Hub accepts at "
                f"most {MAX_MESSAGE_BYTES} bytes per device-to-cloud message: split it or "
                "upload large data as a file"
            )

    @property
    def text(self) -> str:
        """The payload decoded as UTF-8."""
        return self.payload.decode("utf-8")


Settler = Callable[["C2DMessage", Settlement], None]


class C2DMessage:
    """A cloud-to-device message, the same on every transport.

    Settle it once: :meth:`complete` (done: the hub removes it), :meth:`reject`
    (dead-lettered) or :meth:`abandon` (delivered again). Over MQTT IoT Hub has no reject
    or abandon: the client acknowledges each message when it arrives, so ``complete()``
    does nothing more and the other two raise ``UnsupportedOperationError``.

    ``properties`` are the sender's application properties; ``system_properties`` are
    IoT Hub's, keyed as the transport carried them (``$.exp``, ``iothub-ack``, ...).
    """

    __slots__ = (
        "_settled",
        "_settler",
        "content_encoding",
        "content_type",
        "correlation_id",
        "delivery_count",
        "expiry_time",
        "lock_token",
        "message_id",
        "payload",
        "properties",
        "system_properties",
        "transport",
        "user_id",
    )

    def __init__(
        self,
        payload: bytes,
        properties: Mapping[str, str | None] | None = None,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        expiry_time: str | None = None,
        user_id: str | None = None,
        delivery_count: int | None = None,
        lock_token: str | None = None,
        system_properties: Mapping[str, str | None] | None = None,
        transport: str = "",
        settler: Settler | None = None,
    ) -> None:
        self.payload = bytes(payload)
        self.properties: dict[str, str | None] = dict(properties or {})
        self.message_id = message_id
        self.correlation_id = correlation_id
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.expiry_time = expiry_time
        self.user_id = user_id
        #: how many times the hub delivered it before (AMQP, HTTPS), when known
        self.delivery_count = delivery_count
        #: the HTTPS lock token (ETag); None on the other transports
        self.lock_token = lock_token
        self.system_properties: dict[str, str | None] = dict(system_properties or {})
        #: "mqtt", "amqp" or "https"
        self.transport = transport
        self._settler = settler
        self._settled: Settlement | None = None

    @property
    def text(self) -> str:
        """The payload decoded as UTF-8 (the usual content encoding)."""
        return self.payload.decode("utf-8")

    @property
    def settled(self) -> Settlement | None:
        """How the message was settled, or None."""
        return self._settled

    def _settle(self, how: Settlement) -> None:
        if self._settled is not None:
            raise ClientError(
                f"this cloud-to-device message was already settled ({self._settled.value}); "
                "a message is completed, rejected or abandoned once"
            )
        if self._settler is None:
            raise UnsupportedOperationError(
                f"this cloud-to-device message cannot be settled ({how.value}): it was not "
                "received by a device client"
            )
        self._settler(self, how)
        self._settled = how

    def complete(self) -> None:
        """Done with the message: the hub removes it from the device's queue."""
        self._settle(Settlement.COMPLETE)

    def reject(self) -> None:
        """The device cannot process it: the hub dead-letters it, never redelivers."""
        self._settle(Settlement.REJECT)

    def abandon(self) -> None:
        """Give it back: the hub delivers it again."""
        self._settle(Settlement.ABANDON)

    def __repr__(self) -> str:
        return (
            f"<C2DMessage id={self.message_id!r} {len(self.payload)} bytes"
            f"{' over ' + self.transport if self.transport else ''}>"
        )


@dataclass(frozen=True)
class MethodRequest:
    """A direct method call: its ``name``, the JSON ``payload`` (None when empty) and
    the hub's ``request_id``."""

    name: str
    payload: Any
    request_id: str


MethodHandler = Callable[[MethodRequest], "tuple[int, Any]"]
"""A direct method handler: called with the :class:`MethodRequest`, returns
``(status, payload)``; the payload must be JSON-serialisable (None: empty)."""


class MethodRouter:
    """Handlers by method name (``None``: every method without its own handler), and
    the one rule for answering a call, shared by the MQTT and AMQP clients: unknown
    method 404, payload that is not JSON 400, a handler that raises or returns something
    that is not ``(status, payload)`` 500 (the exception goes to ``report``)."""

    def __init__(self, report: Callable[[BaseException], None]) -> None:
        self._handlers: dict[str | None, MethodHandler] = {}
        self._lock = threading.Lock()
        self._report = report

    def register(self, name: str | None, handler: MethodHandler | None) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError("the method name must be a non-empty str, or None for all methods")
        if handler is not None and not callable(handler):
            raise TypeError("handler must be callable: handler(request) -> (status, payload)")
        with self._lock:
            if handler is None:
                self._handlers.pop(name, None)
            else:
                self._handlers[name] = handler

    def __bool__(self) -> bool:
        return bool(self._handlers)

    def prepare(
        self, name: str, request_id: str, raw: bytes
    ) -> tuple[MethodHandler, MethodRequest] | tuple[int, bytes]:
        """The handler of ``name`` and its request, or the (status, body) answer when
        there is nothing to call (no handler: 404; a payload that is not JSON: 400)."""
        with self._lock:
            handler = self._handlers.get(name) or self._handlers.get(None)
        if handler is None:
            return _method_error(404, f"this device has no handler for method {name!r}")
        import json  # (JSON only where a payload is read or written: not at start-up)

        try:
            payload = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _method_error(400, "the method payload is not valid JSON")
        return handler, MethodRequest(name, payload, request_id)

    def finish(self, name: str, result: object) -> tuple[int, bytes]:
        """The (status, JSON body) answer for what a handler returned."""
        if (
            not isinstance(result, tuple)
            or len(result) != 2
            or isinstance(result[0], bool)
            or not isinstance(result[0], int)
            or not 0 <= result[0] <= 999
        ):
            self._report(
                TypeError(
                    f"the handler of method {name!r} returned {result!r}; it must return "
                    "(status, payload) with an int status 0-999"
                )
            )
            return _method_error(500, f"the handler of method {name!r} returned no valid status")
        status, value = result
        if value is None:
            return status, b""
        import json

        try:
            return status, json.dumps(value).encode("utf-8")
        except (TypeError, ValueError) as exc:
            self._report(exc)
            return _method_error(500, f"the handler of method {name!r} returned non-JSON data")

    def failed(self, name: str, exc: BaseException) -> tuple[int, bytes]:
        """The answer when the handler raised ``exc`` (which goes to ``report``)."""
        self._report(exc)
        return _method_error(500, f"the handler of method {name!r} failed")

    def invoke(self, name: str, request_id: str, raw: bytes) -> tuple[int, bytes]:
        """Run the handler of ``name``; the (status, JSON body) to answer with."""
        prepared = self.prepare(name, request_id, raw)
        if isinstance(prepared[0], int):
            return prepared
        handler, request = prepared
        try:
            result = handler(request)
        except Exception as exc:
            return self.failed(name, exc)
        return self.finish(name, result)


def _method_error(status: int, message: str) -> tuple[int, bytes]:
    import json

    return status, json.dumps({"error": message}).encode("utf-8")


def check_model_id(model_id: object) -> str:
    """An IoT Plug and Play model id (a DTMI, ``dtmi:com:example:Thermostat;1``)."""
    if not isinstance(model_id, str) or not re.fullmatch(
        r"dtmi:[A-Za-z](?:[A-Za-z0-9_]*[A-Za-z0-9])?(?::[A-Za-z](?:[A-Za-z0-9_]*[A-Za-z0-9])?)*;[1-9][0-9]{0,8}",
        model_id,
    ):
        raise PolicyError(
            f"model_id must be a DTMI such as 'dtmi:com:example:Thermostat;1', not {model_id!r}"
        )
    return model_id


def twin_error(status: int, operation: str, body: bytes) -> ClientError | None:
    """None for a successful twin response, else the error to raise.

    GET answers 200 and a reported-properties PATCH 204 (older documentation said 200,
    so both are accepted; so is 202). 401/403 mean the identity may not do this; 429 is
    throttling; any other status means the hub did not accept the request.
    """
    if status in (200, 202, 204):
        return None
    detail = body.decode("utf-8", "replace").strip()[:200]
    suffix = f": {detail}" if detail else ""
    if status in (401, 403):
        return NotAuthorizedError(
            f"the hub refused the twin {operation} with status {status} (not authorized "
            f"for this device){suffix}"
        )
    if status == 429:
        return DeliveryError(
            f"the hub throttled the twin {operation} (status 429){suffix}; retry later, "
            "with back-off"
        )
    if status == 400:
        return DeliveryError(
            f"the hub rejected the twin {operation} as malformed (status 400){suffix}"
        )
    return DeliveryError(f"the hub failed the twin {operation} with status {status}{suffix}")


def decode_twin_document(body: bytes) -> dict[str, Any]:
    """A twin (or twin patch) document from the hub: a JSON object."""
    import json

    try:
        twin = json.loads(body.decode("utf-8")) if body else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeliveryError(f"the hub's twin document is not valid JSON: {exc}") from exc
    if not isinstance(twin, dict):
        raise DeliveryError("the hub's twin document is not a JSON object")
    return twin


def encode_reported_patch(patch: Mapping[str, Any]) -> bytes:
    """A reported-properties patch as compact JSON (``None`` deletes a property)."""
    if not isinstance(patch, Mapping):
        raise TypeError(f"patch must be a mapping, not {type(patch).__name__}")
    import json

    try:
        return json.dumps(dict(patch), separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the reported-properties patch is not JSON-serialisable: {exc}") from exc


_Client = TypeVar("_Client", bound="DeviceClient")
_AsyncClient = TypeVar("_AsyncClient", bound="AsyncDeviceClient")


@runtime_checkable
class DeviceClient(Protocol):
    """What every device client offers, whatever the transport.

    Factories: ``from_connection_string(cs, *, policy=None, identity=None, host=None,
    port=None, ...)``, ``from_symmetric_key(host, device_id, key, *, module_id=None,
    ...)``, ``from_x509(host, device_id, identity, *, module_id=None, ...)``.
    """

    transport: ClassVar[str]

    on_c2d: Callable[[C2DMessage], None] | None
    on_connection_state_change: Callable[[ConnectionState, BaseException | None], None] | None
    on_background_exception: Callable[[BaseException], None] | None
    on_desired_update: Callable[[dict[str, Any]], None] | None

    @classmethod
    def from_connection_string(
        cls: type[_Client],
        connection_string: str | ConnectionString,
        *,
        policy: Any = None,
        identity: ClientIdentity | None = None,
        host: str | None = None,
        port: int | None = None,
    ) -> _Client: ...

    @classmethod
    def from_symmetric_key(
        cls: type[_Client],
        host_name: str,
        device_id: str,
        key: str,
        *,
        module_id: str | None = None,
    ) -> _Client: ...

    @classmethod
    def from_x509(
        cls: type[_Client],
        host_name: str,
        device_id: str,
        identity: ClientIdentity,
        *,
        module_id: str | None = None,
    ) -> _Client: ...

    @property
    def device_id(self) -> str: ...
    @property
    def module_id(self) -> str | None: ...
    @property
    def connected(self) -> bool: ...
    @property
    def state(self) -> ConnectionState: ...
    @property
    def tls_info(self) -> TlsInfo | None: ...

    def connect(self) -> None: ...
    def close(self) -> None: ...
    def __enter__(self: _Client) -> _Client: ...
    def __exit__(self, *exc: object) -> None: ...

    def send_telemetry(
        self,
        payload: bytes | str | Message,
        properties: Mapping[str, str] | None = None,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        timeout: float | None = None,
    ) -> None: ...

    def receive_c2d(self, timeout: float | None = None) -> C2DMessage: ...

    def get_twin(self, timeout: float | None = None) -> dict[str, Any]: ...
    def patch_reported(
        self, patch: Mapping[str, Any], timeout: float | None = None
    ) -> int | None: ...
    def on_method(self, name: str | None, handler: MethodHandler | None) -> None: ...


@runtime_checkable
class AsyncDeviceClient(Protocol):
    """:class:`DeviceClient` for asyncio (:mod:`iothub_tls.aio`): the same members, with
    ``await`` on the operations, ``async with``, and ``c2d_messages()``, an async
    iterator of cloud-to-device messages. Callbacks and handlers may be coroutine
    functions."""

    transport: ClassVar[str]

    on_connection_state_change: Callable[[ConnectionState, BaseException | None], Any] | None
    on_background_exception: Callable[[BaseException], Any] | None

    @property
    def on_c2d(self) -> Callable[[C2DMessage], Any] | None: ...
    @on_c2d.setter
    def on_c2d(self, callback: Callable[[C2DMessage], Any] | None) -> None: ...
    @property
    def on_desired_update(self) -> Callable[[dict[str, Any]], Any] | None: ...
    @on_desired_update.setter
    def on_desired_update(self, callback: Callable[[dict[str, Any]], Any] | None) -> None: ...

    @property
    def device_id(self) -> str: ...
    @property
    def module_id(self) -> str | None: ...
    @property
    def connected(self) -> bool: ...
    @property
    def state(self) -> ConnectionState: ...
    @property
    def tls_info(self) -> TlsInfo | None: ...

    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    async def __aenter__(self: _AsyncClient) -> _AsyncClient: ...
    async def __aexit__(self, *exc: object) -> None: ...

    async def send_telemetry(
        self,
        payload: bytes | str | Message,
        properties: Mapping[str, str] | None = None,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        timeout: float | None = None,
    ) -> None: ...

    async def receive_c2d(self, timeout: float | None = None) -> C2DMessage: ...
    def c2d_messages(self) -> AsyncIterator[C2DMessage]: ...

    async def get_twin(self, timeout: float | None = None) -> dict[str, Any]: ...
    async def patch_reported(
        self, patch: Mapping[str, Any], timeout: float | None = None
    ) -> int | None: ...
    def on_method(self, name: str | None, handler: MethodHandler | None) -> None: ...
