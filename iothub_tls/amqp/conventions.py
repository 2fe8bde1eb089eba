"""IoT Hub's AMQP 1.0 conventions for devices, without any I/O — shared by the device
client (:mod:`iothub_tls.amqp`) and the local hub's AMQP door
(:mod:`iothub_tls.hub.amqp`), so the two agree by construction.

Everything here builds or reads an :class:`~iothub_tls.amqp.message.AmqpMessage` or a
link address; nothing touches a socket. What follows was learnt from Microsoft's device
SDKs (read, not copied): Java ``device/iot-device-client/.../transport/amqps/``
(``AmqpsTwinSenderLinkHandler``, ``AmqpsTwinReceiverLinkHandler``,
``AmqpsMethodsSenderLinkHandler``, ``AmqpsMethodsReceiverLinkHandler``,
``AmqpsDeviceOperations``), Node.js ``device/transport/amqp/src/amqp_twin_client.ts``
and ``amqp_device_method_client.ts``, and C ``iothub_client/src/
iothubtransport_amqp_twin_messenger.c`` and ``iothubtransportamqp_methods.c``.

Link addresses (one sender and one receiver link on the same address for the twin and
for methods; ``/modules/{module}`` after the device for a module identity; the C SDK
prefixes ``amqps://{hub}``, which the hub accepts too):

* telemetry: sender to ``/devices/{id}/messages/events``;
* cloud-to-device: receiver from ``/devices/{id}/messages/devicebound``;
* twin: ``/devices/{id}/twin`` (Java ``DEVICE_SENDER_LINK_ENDPOINT_PATH``, Node
  ``endpoint.devicePath(id) + '/twin'``, C ``twin`` suffix);
* direct methods: ``/devices/{id}/methods/devicebound`` (Java, Node
  ``deviceMethodPath``, C ``create_peer_endpoint_name``).

Attach properties of the twin and method links: ``com.microsoft:channel-correlation-id``
= ``twin:{uuid}`` / ``methods:{uuid}`` — the same value on the sender and the receiver
link, which is how the hub pairs a response link with its request link (Java comment
"must be equivalent to the correlation id in the ... link that it is paired with"; the
C methods code sends the device id instead, so the hub must not require the prefix);
``com.microsoft:api-version`` (C: ``IOTHUB_API_VERSION``; Node ``endpoint.apiVersion``);
``com.microsoft:client-version`` (Java ``VERSION_IDENTIFIER_KEY``). Keys are symbols.

Device twin (Java ``setMessageAnnotationMapOnProtonMessage``, C
``create_amqp_message_for_twin_operation``, Node ``_sendTwinRequest``):

* a request carries the *message annotation* ``operation`` = ``GET`` | ``PATCH`` |
  ``PUT`` | ``DELETE`` (symbol key, string value) and, except for GET, ``resource`` =
  ``/properties/reported`` (PATCH) or ``/notifications/twin/properties/desired`` (PUT
  subscribes the receiver link to desired-property updates, DELETE unsubscribes); its
  ``correlation-id`` property is a fresh string (C: a UUID string; Node: a number as
  a string); the body is one *data* section: the JSON patch for PATCH, a single space
  otherwise (C ``EMPTY_TWIN_BODY_DATA``, Node ``' '``).
* the response comes on the twin receiver link with the request's ``correlation-id``,
  the annotations ``status`` (an AMQP int: C rejects anything else) and ``version``
  (an AMQP long, the new reported version after a PATCH), and for GET the twin
  document ``{"desired": {...}, "reported": {...}}`` as a data section. A response
  without ``status`` counts as 200 (Java ``DEFAULT_STATUS_CODE``).
* a desired-property update is a message on the same receiver link *without* a
  correlation-id, its body the JSON patch (Node ``_messageHandler``: "the ONLY time we
  should see a message ... without a correlationId is ... a desired property delta";
  C ``TWIN_UPDATE_TYPE_PARTIAL``); the hub may add the annotations ``resource`` =
  ``/properties/desired`` (Java) and ``version``. The patch carries ``$version``.

Direct methods (Java ``AmqpsMethods*LinkHandler``, C ``on_message_received`` and
``iothubtransportamqp_methods_respond``, Node ``AmqpDeviceMethodClient``):

* a request arrives on the methods receiver link: the method name in the application
  property ``IoThub-methodname``, the request id as the ``correlation-id`` — an AMQP
  *uuid* (C reads it with ``amqpvalue_get_uuid``; Node notes rhea decodes it as 16
  bytes) — and the JSON payload as a data section.
* the response goes on the methods sender link with the same ``correlation-id`` (same
  uuid type), the status in the application property ``IoThub-status`` (an AMQP int)
  and the JSON payload as a data section.

Telemetry and cloud-to-device messages carry the application properties as AMQP
application properties (string to string) and IoT Hub's system properties in the
message's properties section (``message-id``, ``correlation-id``, ``content-type``,
``content-encoding``, ``to``); bodies are data sections.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from ..device import API_VERSION
from .message import AmqpMessage

__all__ = [
    "API_VERSION",
    "API_VERSION_PROPERTY",
    "CHANNEL_CORRELATION_ID",
    "CLIENT_VERSION_PROPERTY",
    "DESIRED_NOTIFICATIONS",
    "DESIRED_PROPERTIES",
    "METHOD_NAME",
    "METHOD_STATUS",
    "REPORTED_PROPERTIES",
    "Address",
    "C2DContent",
    "DesiredUpdate",
    "LinkKind",
    "MethodCall",
    "MethodResult",
    "TelemetryContent",
    "TwinOperation",
    "TwinRequest",
    "TwinResponse",
    "c2d_message",
    "channel_correlation_id",
    "desired_update",
    "link_address",
    "link_properties",
    "method_request",
    "method_response",
    "parse_address",
    "parse_c2d",
    "parse_method_request",
    "parse_method_response",
    "parse_telemetry",
    "parse_twin_message",
    "parse_twin_request",
    "telemetry_message",
    "twin_request",
    "twin_response",
]

#: Link attach properties (symbol keys).
CHANNEL_CORRELATION_ID = "com.microsoft:channel-correlation-id"
API_VERSION_PROPERTY = "com.microsoft:api-version"
CLIENT_VERSION_PROPERTY = "com.microsoft:client-version"
#: IoT Plug and Play: the model a device implements, on its links (the Java SDK's
#: ``AmqpsSenderLinkHandler`` sends it on every sender link).
MODEL_ID_PROPERTY = "com.microsoft:model-id"

#: Twin ``resource`` annotations.
REPORTED_PROPERTIES = "/properties/reported"
DESIRED_NOTIFICATIONS = "/notifications/twin/properties/desired"
DESIRED_PROPERTIES = "/properties/desired"

#: Direct-method application properties.
METHOD_NAME = "IoThub-methodname"
METHOD_STATUS = "IoThub-status"

_EMPTY_BODY = b" "  # what the SDKs send when a twin request has no body


def _int32(value: int) -> Any:
    """``value`` typed as an AMQP int (proton encodes a plain int as a long)."""
    from proton import int32

    return int32(value)


def _body_bytes(body: Any) -> bytes:
    """A message body as bytes: data sections as they are, an amqp-value string as
    UTF-8, nothing as b""."""
    if body is None:
        return b""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    return str(body).encode("utf-8")


def _text(value: object) -> str | None:
    """A system property as text; None (and empty) stay None."""
    if value is None or value == "" or value == b"":
        return None
    return str(value)


# --------------------------------------------------------------------------------------
# Link addresses and attach properties
# --------------------------------------------------------------------------------------


class LinkKind(str, enum.Enum):
    """The device links IoT Hub serves, by the address suffix after the identity."""

    EVENTS = "messages/events"
    C2D = "messages/devicebound"
    TWIN = "twin"
    METHODS = "methods/devicebound"

    @property
    def channel_prefix(self) -> str:
        """The ``com.microsoft:channel-correlation-id`` prefix (twin and methods)."""
        return {LinkKind.TWIN: "twin:", LinkKind.METHODS: "methods:"}.get(self, "")


def link_address(kind: LinkKind, device_id: str, module_id: str | None = None) -> str:
    """``/devices/{id}[/modules/{module}]/{suffix}``, the identities percent-encoded."""
    path = f"/devices/{quote(device_id, safe='')}"
    if module_id is not None:
        path += f"/modules/{quote(module_id, safe='')}"
    return f"{path}/{kind.value}"


@dataclass(frozen=True)
class Address:
    """A device link address, parsed."""

    kind: LinkKind
    device_id: str
    module_id: str | None = None
    #: the hub named by an ``amqps://{host}`` prefix, if any
    host: str | None = None

    @property
    def client_id(self) -> str:
        """``device`` or ``device/module``: whose twin and methods these are."""
        return self.device_id + (f"/{self.module_id}" if self.module_id else "")


_ADDRESS = re.compile(
    r"^(?:amqps?://(?P<host>[^/]+))?/devices/(?P<device>[^/]+)"
    r"(?:/modules/(?P<module>[^/]+))?/(?P<kind>messages/events|messages/devicebound|twin"
    r"|methods/devicebound)/?$",
    re.IGNORECASE,
)


def parse_address(address: str) -> Address | None:
    """The identity and kind of a device link address, or None for anything else."""
    match = _ADDRESS.match(address)
    if match is None:
        return None
    module = match["module"]
    return Address(
        LinkKind(match["kind"].lower()),
        unquote(match["device"]),
        unquote(module) if module is not None else None,
        match["host"],
    )


def link_properties(
    kind: LinkKind, channel: str, client_version: str | None = None
) -> dict[str, str]:
    """Attach properties of a twin or methods link: both links of a pair get the same
    ``channel`` (a fresh UUID per pair)."""
    properties = {API_VERSION_PROPERTY: API_VERSION}
    if kind.channel_prefix:
        properties[CHANNEL_CORRELATION_ID] = kind.channel_prefix + channel
    if client_version is not None:
        properties[CLIENT_VERSION_PROPERTY] = client_version
    return properties


def channel_correlation_id(properties: Mapping[Any, Any] | None) -> str | None:
    """The channel correlation id in a link's attach properties, if any (hub side)."""
    for key, value in (properties or {}).items():
        if str(key) == CHANNEL_CORRELATION_ID and value is not None:
            return str(value)
    return None


# --------------------------------------------------------------------------------------
# Telemetry (device -> hub)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TelemetryContent:
    """A device-to-cloud message as the hub reads it."""

    payload: bytes
    properties: dict[str, str] = field(default_factory=dict)
    message_id: str | None = None
    correlation_id: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None

    @property
    def system_properties(self) -> dict[str, str]:
        """IoT Hub's names for the system properties that are set."""
        return {
            name: value
            for name, value in (
                ("message-id", self.message_id),
                ("correlation-id", self.correlation_id),
                ("content-type", self.content_type),
                ("content-encoding", self.content_encoding),
            )
            if value is not None
        }


def _check_properties(properties: Mapping[str, str] | None) -> dict[str, str]:
    checked = dict(properties or {})
    for key, value in checked.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                "telemetry properties must map str to str (IoT Hub application "
                f"properties), got {key!r}: {type(value).__name__}"
            )
    return checked


def telemetry_message(
    payload: bytes | str,
    properties: Mapping[str, str] | None = None,
    *,
    message_id: str | None = None,
    correlation_id: str | None = None,
    content_type: str | None = None,
    content_encoding: str | None = None,
) -> AmqpMessage:
    """A device-to-cloud message for ``/devices/{id}/messages/events``.

    :raises TypeError: a property name or value is not a str.
    """
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return AmqpMessage(
        body=bytes(payload),
        properties=_check_properties(properties),
        message_id=message_id,
        correlation_id=correlation_id,
        content_type=content_type,
        content_encoding=content_encoding,
    )


def parse_telemetry(message: AmqpMessage) -> TelemetryContent:
    """What the hub records of a device-to-cloud message (property values as text)."""
    return TelemetryContent(
        payload=_body_bytes(message.body),
        properties={str(k): str(v) for k, v in message.properties.items()},
        message_id=_text(message.message_id),
        correlation_id=_text(message.correlation_id),
        content_type=_text(message.content_type),
        content_encoding=_text(message.content_encoding),
    )


# --------------------------------------------------------------------------------------
# Cloud-to-device (hub -> device)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class C2DContent:
    """A cloud-to-device message as the device reads it."""

    payload: bytes
    properties: dict[str, str] = field(default_factory=dict)
    message_id: str | None = None
    correlation_id: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    to: str | None = None
    #: earlier delivery attempts (the AMQP header's delivery-count)
    delivery_count: int = 0


def c2d_message(
    device_id: str,
    payload: bytes,
    properties: Mapping[str, str] | None = None,
    *,
    message_id: str | None = None,
    correlation_id: str | None = None,
    module_id: str | None = None,
    delivery_count: int = 0,
) -> AmqpMessage:
    """A cloud-to-device message as the hub sends it on ``.../messages/devicebound``."""
    return AmqpMessage(
        body=bytes(payload),  # a data section, as IoT Hub sends it
        properties=dict(properties or {}),
        message_id=message_id,
        correlation_id=correlation_id,
        to=link_address(LinkKind.C2D, device_id, module_id),
        delivery_count=max(0, delivery_count),
    )


def parse_c2d(message: AmqpMessage) -> C2DContent:
    """What the device reads of a cloud-to-device message (property values as text)."""
    return C2DContent(
        payload=_body_bytes(message.body),
        properties={str(k): str(v) for k, v in message.properties.items()},
        message_id=_text(message.message_id),
        correlation_id=_text(message.correlation_id),
        content_type=_text(message.content_type),
        content_encoding=_text(message.content_encoding),
        to=message.to,
        delivery_count=message.delivery_count,
    )


# --------------------------------------------------------------------------------------
# Device twin
# --------------------------------------------------------------------------------------


class TwinOperation(str, enum.Enum):
    """The ``operation`` annotation of a twin request."""

    GET = "GET"
    PATCH = "PATCH"
    PUT = "PUT"
    DELETE = "DELETE"


_TWIN_RESOURCES = {
    TwinOperation.GET: None,
    TwinOperation.PATCH: REPORTED_PROPERTIES,
    TwinOperation.PUT: DESIRED_NOTIFICATIONS,
    TwinOperation.DELETE: DESIRED_NOTIFICATIONS,
}


@dataclass(frozen=True)
class TwinRequest:
    """A twin request as the hub reads it."""

    operation: TwinOperation
    resource: str | None
    correlation_id: str
    body: bytes = b""


def twin_request(
    operation: TwinOperation, correlation_id: str, body: bytes | None = None
) -> AmqpMessage:
    """A twin request: GET the twin, PATCH the reported properties (``body``: the JSON
    patch), PUT / DELETE the subscription to desired-property updates."""
    annotations: dict[str, Any] = {"operation": operation.value}
    resource = _TWIN_RESOURCES[operation]
    if resource is not None:
        annotations["resource"] = resource
    return AmqpMessage(
        body=body if body else _EMPTY_BODY,
        correlation_id=correlation_id,
        annotations=annotations,
    )


def parse_twin_request(message: AmqpMessage) -> TwinRequest | None:
    """The twin request in ``message``; None when it has no known ``operation`` or no
    correlation-id (the hub cannot answer it)."""
    try:
        operation = TwinOperation(str(message.annotations.get("operation", "")).upper())
    except ValueError:
        return None
    if message.correlation_id is None:
        return None
    resource = message.annotations.get("resource")
    body = _body_bytes(message.body)
    return TwinRequest(
        operation,
        str(resource) if resource is not None else None,
        str(message.correlation_id),
        b"" if body.strip() == b"" else body,
    )


@dataclass(frozen=True)
class TwinResponse:
    """The hub's answer to a twin request."""

    correlation_id: str
    status: int
    version: int | None = None
    body: bytes = b""


@dataclass(frozen=True)
class DesiredUpdate:
    """A desired-properties patch pushed by the hub (``$version`` included)."""

    patch: dict[str, Any]
    version: int | None = None


def twin_response(
    correlation_id: str, status: int, body: bytes = b"", version: int | None = None
) -> AmqpMessage:
    """The hub's answer on the twin receiver link, correlated with the request."""
    annotations: dict[str, Any] = {"status": _int32(status)}
    if version is not None:
        annotations["version"] = int(version)  # an AMQP long
    return AmqpMessage(
        body=bytes(body) if body else None, correlation_id=correlation_id, annotations=annotations
    )


def desired_update(patch: Mapping[str, Any], version: int) -> AmqpMessage:
    """A desired-properties patch as the hub pushes it to a subscribed receiver link."""
    document = {**dict(patch), "$version": version}
    return AmqpMessage(
        body=json.dumps(document, separators=(",", ":")).encode("utf-8"),
        annotations={"resource": DESIRED_PROPERTIES, "version": int(version)},
    )


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str | bytes) and value.strip().isdigit():
        return int(value)
    return None


def parse_twin_message(message: AmqpMessage) -> TwinResponse | DesiredUpdate | None:
    """What arrived on the twin receiver link: a response (it has a correlation-id), a
    desired-properties update (no correlation-id, a JSON object body), or None."""
    body = _body_bytes(message.body)
    version = _int_or_none(message.annotations.get("version"))
    if message.correlation_id is not None:
        status = _int_or_none(message.annotations.get("status"))
        return TwinResponse(
            str(message.correlation_id),
            200 if status is None else status,
            version,
            b"" if body.strip() == b"" else body,
        )
    try:
        patch = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(patch, dict):
        return None
    if version is None:
        version = _int_or_none(patch.get("$version"))
    return DesiredUpdate(patch, version)


# --------------------------------------------------------------------------------------
# Direct methods
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodCall:
    """A direct-method request as the device reads it. ``correlation_id`` is the value
    to answer with, as it came (a uuid); ``request_id`` is its text form."""

    name: str
    request_id: str
    correlation_id: Any
    payload: bytes


@dataclass(frozen=True)
class MethodResult:
    """A device's answer to a direct method, as the hub reads it."""

    request_id: str
    status: int
    payload: bytes


def method_request(name: str, correlation_id: uuid.UUID, payload: bytes) -> AmqpMessage:
    """A direct-method request as the hub sends it on ``.../methods/devicebound``."""
    return AmqpMessage(
        body=bytes(payload),
        properties={METHOD_NAME: name},
        correlation_id=correlation_id,
    )


def parse_method_request(message: AmqpMessage) -> MethodCall | None:
    """The method call in ``message``; None without a method name or correlation-id."""
    name = message.properties.get(METHOD_NAME)
    if not isinstance(name, str) or message.correlation_id is None:
        return None
    return MethodCall(
        name, str(message.correlation_id), message.correlation_id, _body_bytes(message.body)
    )


def method_response(correlation_id: Any, status: int, payload: bytes) -> AmqpMessage:
    """The device's answer to a method call (``correlation_id`` as the request had it)."""
    return AmqpMessage(
        body=bytes(payload),
        properties={METHOD_STATUS: _int32(status)},
        correlation_id=correlation_id,
    )


def parse_method_response(message: AmqpMessage) -> MethodResult | None:
    """The answer in ``message``; None without a status or correlation-id."""
    status = _int_or_none(message.properties.get(METHOD_STATUS))
    if status is None or message.correlation_id is None:
        return None
    return MethodResult(str(message.correlation_id), status, _body_bytes(message.body))
