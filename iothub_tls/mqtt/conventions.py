"""IoT Hub's MQTT 3.1.1 conventions, without any I/O.

Everything here is a pure function or a small value: the CONNECT user name, the topic
names and filters of telemetry, cloud-to-device messages, the device twin and direct
methods, the RFC 2396 property bags carried in topic names, request-id bookkeeping,
and what a CONNACK refusal means (the reconnection back-off is
:class:`iothub_tls.RetryPolicy`, shared by every client). The network client
(:mod:`iothub_tls.mqtt`) feeds it strings and bytes and acts on the answers.

The conventions follow Microsoft's "Communicate with an IoT hub using the MQTT
protocol" article and agree with the Azure IoT SDKs for C, C#, Node.js and Python.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from urllib.parse import quote, unquote

from .._io.backoff import RetryPolicy
from .._record import Record
from ..device import API_VERSION, C2DMessage, Settler, check_model_id, twin_error
from ..errors import (
    AuthenticationError,
    CertificateVerificationError,
    CipherSuiteError,
    ClientError,
    ConnectionFailedError,
    ConnectRefusedError,
    IdentityError,
    MessageTooLargeError,
    NotAuthorizedError,
    PolicyError,
    PolicyViolation,
    ProtocolVersionError,
    ProxyAuthenticationError,
    QueueFullError,
)
from ..tls.refusals import Refusal

__all__ = [
    "API_VERSION",
    "CONNACK_REFUSALS",
    "MAX_MESSAGE_BYTES",
    "METHODS_FILTER",
    "MQTT_PORT",
    "TWIN_DESIRED_FILTER",
    "TWIN_RESPONSE_FILTER",
    "WEBSOCKET_PATH",
    "WEBSOCKET_PORT",
    "C2DMessage",
    "ConnectRefusedError",
    "MethodRequest",
    "MethodResponse",
    "MqttOptions",
    "QueueFullError",
    "RequestTracker",
    "TwinRequest",
    "TwinResponse",
    "c2d_filter",
    "c2d_topic",
    "connack_error",
    "decode_property_bag",
    "desired_patch_topic",
    "encode_property_bag",
    "is_certificate_alert",
    "is_permanent",
    "method_request_topic",
    "method_response_topic",
    "parse_c2d",
    "parse_desired_patch",
    "parse_method_request",
    "parse_method_response",
    "parse_telemetry_topic",
    "parse_twin_request",
    "parse_twin_response",
    "split_properties",
    "telemetry_topic",
    "twin_error",
    "twin_get_topic",
    "twin_patch_topic",
    "twin_response_topic",
    "username",
]

_set = object.__setattr__

#: The ``api-version`` sent in the CONNECT user name (the one all three transports send).
#: MQTT over TLS.
MQTT_PORT = 8883
#: MQTT over WebSockets over TLS.
WEBSOCKET_PORT = 443
#: The WebSocket path of IoT Hub's MQTT endpoint (the SDKs for C, Node.js and Python).
WEBSOCKET_PATH = "/$iothub/websocket"
#: Largest device-to-cloud message IoT Hub accepts (256 KB); larger ones make the hub
#: close the connection, so they are refused before sending.
MAX_MESSAGE_BYTES = 256 * 1024

TWIN_RESPONSE_FILTER = "$iothub/twin/res/#"
TWIN_DESIRED_FILTER = "$iothub/twin/PATCH/properties/desired/#"
METHODS_FILTER = "$iothub/methods/POST/#"

_TWIN_RESPONSE_PREFIX = "$iothub/twin/res/"
_TWIN_DESIRED_PREFIX = "$iothub/twin/PATCH/properties/desired/"
_METHODS_PREFIX = "$iothub/methods/POST/"
_METHODS_RESPONSE_PREFIX = "$iothub/methods/res/"


# --------------------------------------------------------------------------------------
# Errors the MQTT client adds to the tree of iothub_tls.errors
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Configuration values
# --------------------------------------------------------------------------------------


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PolicyError(f"{name} must be a finite number, not {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise PolicyError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, not {value!r}")


@dataclass(frozen=True)
class MqttOptions:
    """Tuning of :class:`~iothub_tls.mqtt.MqttDeviceClient`; every field has a default
    that suits IoT Hub.

    :param keepalive: MQTT keep-alive in seconds (IoT Hub allows up to 1177).
    :param connect_timeout: seconds for the TCP connection, and again for the MQTT
        CONNACK and the subscriptions that follow it.
    :param handshake_timeout: seconds the TLS handshake (and the WebSocket upgrade) may
        take before the attempt fails with ``HandshakeTimeoutError``.
    :param operation_timeout: default timeout of blocking operations (send, twin).
    :param queue_size: most telemetry messages held at once without the hub's
        acknowledgement (queued while disconnected plus in flight); one more raises
        :class:`QueueFullError`.
    :param sas_ttl: lifetime of generated SAS tokens, in seconds. The client reconnects
        with a fresh token when 80 % of it has passed.
    :param retry: the back-off between reconnection attempts, a
        :class:`~iothub_tls.RetryPolicy` (default: waits of up to 1 s doubling to
        60 s, never giving up, starting again after a connection healthy for 60 s), or
        None not to reconnect: a lost connection then ends the client (state
        ``DISCONNECTED``, pending messages fail) until :meth:`connect` is called again.

    A value outside these ranges raises :class:`~iothub_tls.PolicyError` (a
    ``ValueError``), as the other transports' options do.
    :param product_info: appended to the ``DeviceClientType`` sent to the hub.
    """

    keepalive: int = 60
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    operation_timeout: float = 30.0
    queue_size: int = 1000
    sas_ttl: float = 3600.0
    retry: RetryPolicy | None = field(default_factory=RetryPolicy)
    product_info: str | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.keepalive, bool)
            or not isinstance(self.keepalive, int)
            or not 5 <= self.keepalive <= 1177
        ):
            raise PolicyError(
                f"keepalive must be an int between 5 and 1177 seconds (IoT Hub closes "
                f"idle connections after 1.5 x keepalive, at most 1767 s), not "
                f"{self.keepalive!r}"
            )
        _positive("connect_timeout", self.connect_timeout)
        _positive("handshake_timeout", self.handshake_timeout)
        _positive("operation_timeout", self.operation_timeout)
        _positive("sas_ttl", self.sas_ttl)
        if self.sas_ttl < 60:
            raise PolicyError(f"sas_ttl must be at least 60 seconds, not {self.sas_ttl!r}")
        if (
            isinstance(self.queue_size, bool)
            or not isinstance(self.queue_size, int)
            or self.queue_size < 1
        ):
            raise PolicyError(f"queue_size must be an int >= 1, not {self.queue_size!r}")
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise PolicyError(
                f"retry must be a RetryPolicy (or None not to reconnect), not {self.retry!r}"
            )
        if self.product_info is not None and not isinstance(self.product_info, str):
            raise PolicyError(f"product_info must be a str or None, not {self.product_info!r}")


# --------------------------------------------------------------------------------------
# CONNECT
# --------------------------------------------------------------------------------------


def username(
    host_name: str,
    client_id: str,
    *,
    api_version: str = API_VERSION,
    device_client_type: str | None = None,
    model_id: str | None = None,
) -> str:
    """The CONNECT user name:
    ``{host_name}/{client_id}/?api-version={api_version}[&DeviceClientType=...]``.

    ``host_name`` is the hub's full name (``HostName``, even behind a gateway) and
    ``client_id`` is ``device`` or ``device/module``; neither is encoded. Query values
    are percent-encoded, as the SDKs do.
    """
    query = f"api-version={quote(api_version, safe='')}"
    if device_client_type:
        query += f"&DeviceClientType={quote(device_client_type, safe='')}"
    if model_id is not None:
        # IoT Plug and Play: the device announces its model when it connects
        query += f"&model-id={quote(check_model_id(model_id), safe='')}"
    return f"{host_name}/{client_id}/?{query}"


# --------------------------------------------------------------------------------------
# Property bags
# --------------------------------------------------------------------------------------


def _encode(text: str) -> str:
    # RFC 2396 / query-string encoding with every reserved character escaped: "$" goes
    # out as %24, "/" as %2F, space as %20 (never "+", which the hub would keep).
    return quote(text, safe="")


def encode_property_bag(properties: Mapping[str, str | None]) -> str:
    """``name=value&name2=value2`` with names and values percent-encoded; a ``None``
    value is sent as the bare name (IoT Hub's representation of null)."""
    parts = []
    for name, value in properties.items():
        parts.append(_encode(name) if value is None else f"{_encode(name)}={_encode(value)}")
    return "&".join(parts)


def decode_property_bag(bag: str) -> dict[str, str | None]:
    """Inverse of :func:`encode_property_bag`. ``key`` decodes to None, ``key=`` to the
    empty string; a leading ``?`` (shown in Microsoft's example) is ignored. ``+`` is
    kept as ``+``: the hub encodes spaces as ``%20``."""
    if bag.startswith("?"):
        bag = bag[1:]
    result: dict[str, str | None] = {}
    if not bag:
        return result
    for part in bag.split("&"):
        if not part:
            continue
        name, sep, value = part.partition("=")
        result[unquote(name)] = unquote(value) if sep else None
    return result


# --------------------------------------------------------------------------------------
# Telemetry (device-to-cloud)
# --------------------------------------------------------------------------------------

#: Keyword -> IoT Hub system property, as it appears (decoded) in the property bag.
TELEMETRY_SYSTEM_PROPERTIES = {
    "message_id": "$.mid",
    "correlation_id": "$.cid",
    "content_type": "$.ct",
    "content_encoding": "$.ce",
}


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
        if name.startswith("$."):
            raise ValueError(
                f"property {name!r}: names starting with '$.' are IoT Hub system "
                "properties; use the message_id, correlation_id, content_type and "
                "content_encoding arguments"
            )
        if not isinstance(value, str):
            raise TypeError(
                f"property {name!r} has a {type(value).__name__} value; application "
                "property values are strings (convert it with str())"
            )
        checked[name] = value
    return checked


def telemetry_topic(
    device_id: str,
    module_id: str | None = None,
    properties: Mapping[str, str] | None = None,
    *,
    message_id: str | None = None,
    correlation_id: str | None = None,
    content_type: str | None = None,
    content_encoding: str | None = None,
) -> str:
    """``devices/{device}/messages/events/{bag}`` (or
    ``devices/{device}/modules/{module}/messages/events/{bag}``); application properties
    first, then the system properties that were given.

    :raises TypeError: for a property that is not str -> str.
    :raises ValueError: for an application property named like a system one (``$.``).
    """
    bag: dict[str, str | None] = dict(_check_properties(properties))
    system = {
        "message_id": message_id,
        "correlation_id": correlation_id,
        "content_type": content_type,
        "content_encoding": content_encoding,
    }
    for keyword, value in system.items():
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise TypeError(f"{keyword} must be a non-empty str, not {value!r}")
        bag[TELEMETRY_SYSTEM_PROPERTIES[keyword]] = value
    base = f"devices/{device_id}/"
    if module_id is not None:
        base += f"modules/{module_id}/"
    return f"{base}messages/events/{encode_property_bag(bag)}"


def split_properties(
    bag: Mapping[str, str | None],
) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """(application, system) properties of a decoded bag: system ones start with ``$.``
    (plus ``iothub-ack`` on cloud-to-device messages)."""
    app: dict[str, str | None] = {}
    system: dict[str, str | None] = {}
    for name, value in bag.items():
        if name.startswith("$.") or name in _C2D_SERVICE_PROPERTIES:
            system[name] = value
        else:
            app[name] = value
    return app, system


def parse_telemetry_topic(
    topic: str, device_id: str, module_id: str | None = None
) -> tuple[dict[str, str | None], dict[str, str | None]] | None:
    """The hub's side of :func:`telemetry_topic`: (application, system) properties of a
    telemetry topic of this identity, or None for any other topic."""
    prefix = f"devices/{device_id}/"
    if module_id is not None:
        prefix += f"modules/{module_id}/"
    prefix += "messages/events/"
    if not topic.startswith(prefix):
        return None
    return split_properties(decode_property_bag(topic[len(prefix) :]))


def check_message_size(topic: str, payload: bytes) -> None:
    """Refuse a message IoT Hub would not accept (body and properties over 256 KB)."""
    size = len(payload) + len(topic.encode("utf-8"))
    if size > MAX_MESSAGE_BYTES:
        raise MessageTooLargeError(
            f"the message is {size} bytes with its properties; IoT Hub accepts at most "
            f"{MAX_MESSAGE_BYTES} bytes per device-to-cloud message: split it, or put "
            "large data in storage of your own and send a reference to it"
        )


# --------------------------------------------------------------------------------------
# Cloud-to-device messages
# --------------------------------------------------------------------------------------


def c2d_filter(device_id: str) -> str:
    """The subscription for cloud-to-device messages. The ``#`` only carries the
    property bag; IoT Hub supports no other wildcard use."""
    return f"devices/{device_id}/messages/devicebound/#"


# Properties the hub adds for its own bookkeeping; not the application's.
_C2D_SERVICE_PROPERTIES = frozenset({"iothub-ack"})


def c2d_topic(device_id: str, properties: Mapping[str, str | None]) -> str:
    """The hub's side of :func:`parse_c2d`: where a cloud-to-device message with this
    property bag (application and system properties together) is published."""
    return f"devices/{device_id}/messages/devicebound/{encode_property_bag(properties)}"


def parse_c2d(
    topic: str, payload: bytes, device_id: str, *, settler: Settler | None = None
) -> C2DMessage | None:
    """The message delivered on ``topic``, or None when ``topic`` is not this device's
    cloud-to-device topic. ``settler`` carries out ``complete()`` and the others."""
    prefix = f"devices/{device_id}/messages/devicebound/"
    if not topic.startswith(prefix):
        return None
    app, system = split_properties(decode_property_bag(topic[len(prefix) :]))
    return C2DMessage(
        payload,
        app,
        message_id=system.get("$.mid"),
        correlation_id=system.get("$.cid"),
        content_type=system.get("$.ct"),
        content_encoding=system.get("$.ce"),
        expiry_time=system.get("$.exp"),
        user_id=system.get("$.uid"),
        system_properties=system,
        transport="mqtt",
        settler=settler,
    )


# --------------------------------------------------------------------------------------
# Device twin
# --------------------------------------------------------------------------------------


def twin_get_topic(request_id: str) -> str:
    """Where to publish (an empty payload) to read the whole twin."""
    return f"$iothub/twin/GET/?$rid={_encode(request_id)}"


def twin_patch_topic(request_id: str) -> str:
    """Where to publish a JSON patch of the reported properties."""
    return f"$iothub/twin/PATCH/properties/reported/?$rid={_encode(request_id)}"


class TwinResponse(Record):
    """What ``$iothub/twin/res/{status}/?$rid={rid}[&$version={n}]`` says."""

    _fields = ("status", "request_id", "version")
    __slots__ = _fields
    status: int
    request_id: str
    version: int | None

    def __init__(self, status: int, request_id: str, version: int | None = None) -> None:
        _set(self, "status", status)
        _set(self, "request_id", request_id)
        _set(self, "version", version)


def _query(text: str) -> dict[str, str | None]:
    return decode_property_bag(text[1:] if text.startswith("?") else text)


def _int_or_none(value: str | None) -> int | None:
    if value is None or not re.fullmatch(r"-?\d+", value):
        return None
    return int(value)


def parse_twin_response(topic: str) -> TwinResponse | None:
    """Parse a twin response topic; None for other topics or a malformed one."""
    if not topic.startswith(_TWIN_RESPONSE_PREFIX):
        return None
    rest = topic[len(_TWIN_RESPONSE_PREFIX) :]
    status_text, sep, query = rest.partition("/")
    if not sep or not re.fullmatch(r"\d{3}", status_text):
        return None
    fields = _query(query)
    rid = fields.get("$rid")
    if not rid:
        return None
    return TwinResponse(int(status_text), rid, _int_or_none(fields.get("$version")))


def twin_response_topic(status: int, request_id: str, version: int | None = None) -> str:
    """The hub's side of :func:`parse_twin_response`."""
    # "$rid" and "$version" are written as they are, as IoT Hub does
    query = f"$rid={_encode(request_id)}"
    if version is not None:
        query += f"&$version={version}"
    return f"{_TWIN_RESPONSE_PREFIX}{status:03d}/?{query}"


def desired_patch_topic(version: int) -> str:
    """The hub's side of :func:`parse_desired_patch`."""
    return f"{_TWIN_DESIRED_PREFIX}?$version={version}"


class TwinRequest(Record):
    """What a device asked of its twin: ``operation`` is "GET" (the whole twin) or
    "PATCH" (reported properties)."""

    _fields = ("operation", "request_id")
    __slots__ = _fields
    operation: str
    request_id: str

    def __init__(self, operation: str, request_id: str) -> None:
        _set(self, "operation", operation)
        _set(self, "request_id", request_id)


_TWIN_REQUEST_PATHS = {
    "$iothub/twin/GET/": "GET",
    "$iothub/twin/PATCH/properties/reported/": "PATCH",
}


def parse_twin_request(topic: str) -> TwinRequest | None:
    """The hub's side of :func:`twin_get_topic` and :func:`twin_patch_topic`; None for
    other topics or one without a request id."""
    path, sep, query = topic.partition("?")
    operation = _TWIN_REQUEST_PATHS.get(path)
    if operation is None or not sep:
        return None
    rid = _query(query).get("$rid")
    return TwinRequest(operation, rid) if rid else None


def parse_desired_patch(topic: str) -> tuple[bool, int | None]:
    """(True, ``$version``) for a desired-properties update topic (the version is None
    when absent), (False, None) for any other topic."""
    if not topic.startswith(_TWIN_DESIRED_PREFIX):
        return False, None
    return True, _int_or_none(_query(topic[len(_TWIN_DESIRED_PREFIX) :]).get("$version"))


# --------------------------------------------------------------------------------------
# Direct methods
# --------------------------------------------------------------------------------------


class MethodRequest(Record):
    """A direct method invocation: ``$iothub/methods/POST/{name}/?$rid={rid}``."""

    _fields = ("name", "request_id")
    __slots__ = _fields
    name: str
    request_id: str

    def __init__(self, name: str, request_id: str) -> None:
        _set(self, "name", name)
        _set(self, "request_id", request_id)


def parse_method_request(topic: str) -> MethodRequest | None:
    """Parse a method request topic; None for other topics or a malformed one."""
    if not topic.startswith(_METHODS_PREFIX):
        return None
    name, sep, query = topic[len(_METHODS_PREFIX) :].partition("/")
    rid = _query(query).get("$rid") if sep else None
    if not name or not rid:
        return None
    return MethodRequest(unquote(name), rid)


def method_request_topic(name: str, request_id: str) -> str:
    """The hub's side of :func:`parse_method_request`."""
    return f"{_METHODS_PREFIX}{_encode(name)}/?$rid={_encode(request_id)}"


class MethodResponse(Record):
    """A device's answer to a direct method: ``$iothub/methods/res/{status}/?$rid=``."""

    _fields = ("status", "request_id")
    __slots__ = _fields
    status: int
    request_id: str

    def __init__(self, status: int, request_id: str) -> None:
        _set(self, "status", status)
        _set(self, "request_id", request_id)


def parse_method_response(topic: str) -> MethodResponse | None:
    """The hub's side of :func:`method_response_topic`; None for other topics or a
    malformed one."""
    if not topic.startswith(_METHODS_RESPONSE_PREFIX):
        return None
    status, sep, query = topic[len(_METHODS_RESPONSE_PREFIX) :].partition("/")
    rid = _query(query).get("$rid") if sep else None
    if not re.fullmatch(r"\d{1,3}", status) or not rid:
        return None
    return MethodResponse(int(status), rid)


def method_response_topic(status: int, request_id: str) -> str:
    """Where the device answers a method call."""
    if isinstance(status, bool) or not isinstance(status, int) or not 0 <= status <= 999:
        raise ValueError(f"a method status is an integer (e.g. 200), not {status!r}")
    return f"{_METHODS_RESPONSE_PREFIX}{status}/?$rid={_encode(request_id)}"


# --------------------------------------------------------------------------------------
# Request ids
# --------------------------------------------------------------------------------------

T = TypeVar("T")


class RequestTracker(Generic[T]):
    """Pairs twin requests with their responses by ``$rid``.

    Request ids are ``{prefix}{counter}``: unique within a client, and (with a random
    prefix per client) unlikely to collide with another client's on a shared broker.
    Each request carries a deadline; :meth:`expire` hands back the ones that passed it.
    Not thread-safe: one thread (the client's network thread) owns it.
    """

    def __init__(self, prefix: str = "") -> None:
        if not re.fullmatch(r"[A-Za-z0-9]*", prefix):
            raise ValueError("the request-id prefix must be alphanumeric")
        self._prefix = prefix
        self._counter = 0
        self._pending: dict[str, tuple[T, float]] = {}

    def start(self, value: T, deadline: float) -> str:
        """Register ``value`` and return its new request id."""
        self._counter += 1
        rid = f"{self._prefix}{self._counter}"
        self._pending[rid] = (value, deadline)
        return rid

    def finish(self, request_id: str) -> T | None:
        """The value of a pending request (removed), or None for an unknown id."""
        found = self._pending.pop(request_id, None)
        return None if found is None else found[0]

    def expire(self, now: float) -> list[T]:
        """Remove and return the requests whose deadline is not after ``now``."""
        gone = [rid for rid, (_, deadline) in self._pending.items() if deadline <= now]
        return [self._pending.pop(rid)[0] for rid in gone]

    def next_deadline(self) -> float | None:
        """The earliest deadline of a pending request, or None."""
        return min((deadline for _, deadline in self._pending.values()), default=None)

    def drain(self) -> list[T]:
        """Remove and return every pending request."""
        values = [value for value, _ in self._pending.values()]
        self._pending.clear()
        return values

    def pending(self) -> Iterator[tuple[str, T]]:
        """(request id, value) of each pending request, oldest first."""
        return ((rid, value) for rid, (value, _) in list(self._pending.items()))

    def __len__(self) -> int:
        return len(self._pending)


# --------------------------------------------------------------------------------------
# CONNACK and what is worth retrying
# --------------------------------------------------------------------------------------


#: What each refusing CONNACK return code means (MQTT 3.1.1 section 3.2.2.3, as IoT Hub
#: uses them): :func:`connack_error` builds its errors from these rows, and the
#: documentation's troubleshooting page lists them.
CONNACK_REFUSALS: tuple[Refusal, ...] = (
    Refusal(
        key="connack-1",
        code=1,
        signals=("CONNACK 1",),
        error=ConnectionFailedError,
        says="unacceptable protocol version",
        cause="The endpoint does not speak MQTT 3.1.1",
        fix="Check the host name and port",
    ),
    Refusal(
        key="connack-2",
        code=2,
        signals=("CONNACK 2",),
        error=AuthenticationError,
        says="identifier rejected",
        cause="The MQTT client id is not the identity the hub expects",
        fix="The client id must be the device id, or device_id/module_id for a module",
    ),
    Refusal(
        key="connack-3",
        code=3,
        signals=("CONNACK 3",),
        error=ConnectionFailedError,
        says="server unavailable",
        cause="The hub cannot take the connection for now",
        fix="Nothing to change: the client is retrying with its RetryPolicy",
        retryable=True,
    ),
    Refusal(
        key="connack-4",
        code=4,
        signals=("CONNACK 4",),
        error=AuthenticationError,
        says="bad user name or password",
        cause="The SAS token was not made with the device's key, or it has expired",
        fix="Check the device's SharedAccessKey and that the device clock is right (SAS "
        "tokens expire)",
    ),
    Refusal(
        key="connack-5",
        code=5,
        signals=("CONNACK 5",),
        error=ConnectRefusedError,
        says="not authorized",
        cause="IoT Hub answers this for a wrong or expired SAS token, a device that is "
        "disabled or not registered, and an X.509 certificate whose thumbprint or CA is not "
        "registered",
        fix="Check the key or certificate, the device id and the device clock",
    ),
)
_CONNACK = {row.code: row for row in CONNACK_REFUSALS}


def connack_error(code: int, host: str) -> tuple[ClientError, bool] | None:
    """None when CONNACK ``code`` accepts the connection, else (error, retryable).

    IoT Hub uses the MQTT 3.1.1 codes (section 3.2.2.3); :data:`CONNACK_REFUSALS` says
    what each means. Only 3, *server unavailable*, is worth retrying; the others need the
    device's configuration to change.
    """
    if code == 0:
        return None
    where = f"{host} refused the MQTT connection"
    row = _CONNACK.get(code)
    if row is None:
        return (ConnectionFailedError(f"{where}: unknown CONNACK code {code}"), False)
    error = row.error(f"{where}: {row.says} (CONNACK {code}). {row.explain()}")
    assert isinstance(error, ClientError)
    return (error, row.retryable)


_CERTIFICATE_ALERT = re.compile(
    r"ALERT_(UNKNOWN_CA|BAD_CERTIFICATE|CERTIFICATE_[A-Z_]+|UNSUPPORTED_CERTIFICATE|ACCESS_DENIED)"
)


def is_certificate_alert(text: str) -> bool:
    """True when an OpenSSL error text is a TLS alert about the client's certificate
    (in TLS 1.3 a server refuses the device certificate after the client's handshake
    completed, so the alert arrives with the first read)."""
    return _CERTIFICATE_ALERT.search(text) is not None


_PERMANENT = (
    CertificateVerificationError,
    CipherSuiteError,
    ProtocolVersionError,
    PolicyViolation,
    PolicyError,
    IdentityError,
    AuthenticationError,
    NotAuthorizedError,
    ProxyAuthenticationError,
)


def is_permanent(exc: BaseException) -> bool:
    """True for failures that another attempt cannot cure: certificate and TLS policy
    refusals, bad configuration, refused credentials. Network trouble (refused or reset
    TCP, a stalled or closed handshake, no CONNACK) is worth retrying."""
    return isinstance(exc, _PERMANENT)
