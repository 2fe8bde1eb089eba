"""IoT Hub's service REST API as pure data: paths, JSON shapes, request builders and
error bodies, shared by the local hub (:mod:`iothub_tls.hub.service`) and its client
(:mod:`iothub_tls.hub.service_client`), so the two cannot drift apart. No I/O.

The operations, each with the ``api-version`` query parameter and an ``Authorization``
header holding a SAS token of a shared access policy (``skn``) signed for the hub's
host name:

* devices: ``GET /devices[?top=N]``, ``GET|PUT|DELETE /devices/{id}`` (registry)
* twins: ``GET|PUT|PATCH /twins/{id}`` (get, replace, update)
* direct methods: ``POST /twins/{id}/methods`` with ``{"methodName", "payload",
  "responseTimeoutInSeconds", "connectTimeoutInSeconds"}`` -> ``{"status", "payload"}``
* cloud-to-device: ``DELETE /devices/{id}/commands`` purges a device's queue (IoT Hub's
  REST API); sending is AMQP on IoT Hub (a sender on ``/messages/devicebound``, each
  message addressed ``to: /devices/{id}/messages/devicebound``) — the local hub serves
  that, and also the same message over HTTPS: ``POST /messages/devicebound`` with the
  ``iothub-to`` header and the device API's message headers (``iothub-messageid``,
  ``iothub-correlationid``, ``iothub-app-*``). That HTTPS form is the local hub's own:
  IoT Hub has no REST route for it.

Errors are ``{"Message": "ErrorCode:<code>;<text>", "ExceptionMessage": "Tracking
ID:..."}`` with an ``iothub-errorcode`` header; a direct method to a device that is not
online answers 404 with IoT Hub's newer nested shape (``errorCode`` 404103).
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from ..auth import generate_sas_token
from ..errors import ConnectionStringError
from ..https.conventions import (
    APP_PROPERTY_PREFIX,
    H_CORRELATION_ID,
    H_ERROR_CODE,
    H_MESSAGE_ID,
    H_TO,
    HttpRequest,
    HubErrorInfo,
    parse_error,
)

__all__ = [
    "API_VERSION",
    "C2D_PATH",
    "DEVICE_NOT_ONLINE",
    "GATEWAY_TIMEOUT",
    "H_ERROR_CODE",
    "MAX_C2D_BYTES",
    "MAX_C2D_QUEUE",
    "NEVER",
    "SERVICE_POLICY",
    "MethodCall",
    "MethodResult",
    "Operation",
    "Route",
    "RouteError",
    "ServiceConnectionString",
    "c2d_target",
    "delete_device_request",
    "device_body",
    "get_device_request",
    "get_twin_request",
    "invoke_method_request",
    "iso_time",
    "list_devices_request",
    "method_error_body",
    "parse_c2d_target",
    "parse_route",
    "parse_service_error",
    "purge_c2d_request",
    "put_device_request",
    "quote_etag",
    "send_c2d_request",
    "twin_etag",
    "unquote_etag",
    "update_twin_request",
]

#: The service API version the local hub and its client speak (azure-iot-hub 2.x's).
API_VERSION = "2021-04-12"
#: The policy the local hub creates with every permission, as IoT Hub does.
SERVICE_POLICY = "iothubowner"
#: Where a service sends cloud-to-device messages (AMQP link target; HTTPS path here).
C2D_PATH = "/messages/devicebound"
#: IoT Hub's cloud-to-device limits: message size and messages queued per device.
MAX_C2D_BYTES = 64 * 1024
MAX_C2D_QUEUE = 50
#: IoT Hub's "never" timestamp (a device that never connected, a status never changed).
NEVER = "0001-01-01T00:00:00Z"


def iso_time(ts: float) -> str:
    """Seconds since the epoch as IoT Hub writes times (UTC, 7 fraction digits, Z)."""
    moment = dt.datetime.fromtimestamp(ts, dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}0Z"


# -- the service connection string ---------------------------------------------------------


@dataclass(frozen=True)
class ServiceConnectionString:
    """``HostName=...;SharedAccessKeyName=...;SharedAccessKey=...``: a shared access
    policy of a hub. The key is left out of ``repr`` and ``str``; :meth:`format` gives
    the whole connection string."""

    host_name: str
    shared_access_key_name: str
    shared_access_key: str = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> ServiceConnectionString:
        """:raises ConnectionStringError: for a missing field or a device connection
        string."""
        if not isinstance(text, str):
            raise ConnectionStringError("a connection string must be text")
        fields: dict[str, str] = {}
        for part in text.strip().strip(";").split(";"):
            name, sep, value = part.partition("=")
            if not sep:
                raise ConnectionStringError(
                    "malformed service connection string: expected Name=value pairs "
                    "separated by ';'"
                )
            fields[name.strip()] = value.strip()
        if "DeviceId" in fields:
            raise ConnectionStringError(
                "this is a device connection string (it has DeviceId): the service API needs "
                "a shared access policy's, HostName=...;SharedAccessKeyName=...;SharedAccessKey=..."
            )
        missing = [
            n for n in ("HostName", "SharedAccessKeyName", "SharedAccessKey") if not fields.get(n)
        ]
        if missing:
            raise ConnectionStringError(
                f"the service connection string has no {', '.join(missing)}: expected "
                "HostName=...;SharedAccessKeyName=...;SharedAccessKey=..."
            )
        return cls(fields["HostName"], fields["SharedAccessKeyName"], fields["SharedAccessKey"])

    def format(self) -> str:
        """The whole connection string, key included (it is a credential)."""
        return (
            f"HostName={self.host_name};SharedAccessKeyName={self.shared_access_key_name};"
            f"SharedAccessKey={self.shared_access_key}"
        )

    def __str__(self) -> str:
        return (
            f"HostName={self.host_name};SharedAccessKeyName={self.shared_access_key_name};"
            "SharedAccessKey=<redacted>"
        )

    def token(self, *, ttl: float = 3600, now: float | None = None) -> str:
        """A SAS token of this policy for the whole hub (``sr`` = the host name)."""
        return generate_sas_token(
            self.host_name,
            self.shared_access_key,
            policy_name=self.shared_access_key_name,
            ttl=ttl,
            now=now,
        )


# -- routes -------------------------------------------------------------------------------


class Operation(enum.Enum):
    LIST_DEVICES = "list devices"
    GET_DEVICE = "get device"
    PUT_DEVICE = "create or update device"
    DELETE_DEVICE = "delete device"
    GET_TWIN = "get twin"
    REPLACE_TWIN = "replace twin"
    UPDATE_TWIN = "update twin"
    INVOKE_METHOD = "invoke direct method"
    SEND_C2D = "send cloud-to-device message"
    PURGE_C2D = "purge cloud-to-device queue"


@dataclass(frozen=True)
class Route:
    operation: Operation
    device_id: str | None = None


class RouteError(Exception):
    """No operation at that path (404) or not with that method (405)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_ROUTES: dict[tuple[str, ...], dict[str, Operation]] = {
    ("devices",): {"GET": Operation.LIST_DEVICES},
    ("devices", "*"): {
        "GET": Operation.GET_DEVICE,
        "PUT": Operation.PUT_DEVICE,
        "DELETE": Operation.DELETE_DEVICE,
    },
    ("devices", "*", "commands"): {"DELETE": Operation.PURGE_C2D},
    ("twins", "*"): {
        "GET": Operation.GET_TWIN,
        "PUT": Operation.REPLACE_TWIN,
        "PATCH": Operation.UPDATE_TWIN,
    },
    ("twins", "*", "methods"): {"POST": Operation.INVOKE_METHOD},
    ("messages", "devicebound"): {"POST": Operation.SEND_C2D},
}


def parse_route(method: str, path: str) -> Route:
    """The operation ``method path`` asks for (path without the query).

    :raises RouteError: 404 for an unknown path, 405 for a method the path does not take.
    """
    parts = path.split("/")
    if len(parts) < 2 or parts[0] != "" or any(p == "" for p in parts[1:]):
        raise RouteError(404, f"no such resource: {path}")
    segments = parts[1:]
    shape = tuple(
        "*" if i == 1 and segments[0] in ("devices", "twins") else s.lower()
        for i, s in enumerate(segments)
    )
    methods = _ROUTES.get(shape)
    if methods is None:
        raise RouteError(404, f"no such resource: {path}")
    operation = methods.get(method.upper())
    if operation is None:
        allowed = ", ".join(sorted(methods))
        raise RouteError(405, f"{method} is not allowed on {path}; use {allowed}")
    device_id = unquote(segments[1]) if "*" in shape else None
    return Route(operation, device_id)


def _q(device_id: str) -> str:
    return quote(device_id, safe="")


def _query(api_version: str, **extra: str) -> str:
    query = "?api-version=" + quote(api_version, safe="")
    return query + "".join(f"&{k}={quote(v, safe='')}" for k, v in extra.items())


def _json_request(
    method: str, path: str, body: Any = None, *, etag: str | None = None
) -> HttpRequest:
    headers = {"Accept": "application/json"}
    data = b""
    if body is not None:
        headers["Content-Type"] = "application/json; charset=utf-8"
        data = json.dumps(body).encode("utf-8")
    if etag is not None:
        headers["If-Match"] = quote_etag(etag)
    return HttpRequest(method, path, headers, data)


def quote_etag(etag: str) -> str:
    """An ETag as If-Match carries it: quoted, except ``*``."""
    if etag == "*" or (len(etag) > 1 and etag[0] == '"' and etag[-1] == '"'):
        return etag
    return f'"{etag}"'


def unquote_etag(value: str) -> str:
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


# -- request builders (the client side) -----------------------------------------------------


def list_devices_request(top: int | None = None, api_version: str = API_VERSION) -> HttpRequest:
    extra = {"top": str(top)} if top is not None else {}
    return _json_request("GET", "/devices" + _query(api_version, **extra))


def get_device_request(device_id: str, api_version: str = API_VERSION) -> HttpRequest:
    return _json_request("GET", f"/devices/{_q(device_id)}" + _query(api_version))


def put_device_request(
    device_id: str, body: Mapping[str, Any], *, etag: str | None = None,
    api_version: str = API_VERSION,
) -> HttpRequest:  # fmt: skip
    return _json_request(
        "PUT", f"/devices/{_q(device_id)}" + _query(api_version), dict(body), etag=etag
    )


def delete_device_request(
    device_id: str, *, etag: str = "*", api_version: str = API_VERSION
) -> HttpRequest:
    return _json_request("DELETE", f"/devices/{_q(device_id)}" + _query(api_version), etag=etag)


def get_twin_request(device_id: str, api_version: str = API_VERSION) -> HttpRequest:
    return _json_request("GET", f"/twins/{_q(device_id)}" + _query(api_version))


def update_twin_request(
    device_id: str,
    twin: Mapping[str, Any],
    *,
    replace: bool = False,
    etag: str | None = None,
    api_version: str = API_VERSION,
) -> HttpRequest:
    """PATCH (merge) or, with ``replace``, PUT a twin: ``{"tags": {...}, "properties":
    {"desired": {...}}}``."""
    method = "PUT" if replace else "PATCH"
    return _json_request(
        method, f"/twins/{_q(device_id)}" + _query(api_version), dict(twin), etag=etag
    )


def invoke_method_request(
    device_id: str, call: MethodCall, api_version: str = API_VERSION
) -> HttpRequest:
    return _json_request(
        "POST", f"/twins/{_q(device_id)}/methods" + _query(api_version), call.to_json()
    )


def purge_c2d_request(device_id: str, api_version: str = API_VERSION) -> HttpRequest:
    return _json_request("DELETE", f"/devices/{_q(device_id)}/commands" + _query(api_version))


def c2d_target(device_id: str) -> str:
    """The ``to`` of a cloud-to-device message for ``device_id``."""
    return f"/devices/{_q(device_id)}/messages/devicebound"


def parse_c2d_target(to: str | None) -> str | None:
    """The device id a cloud-to-device message is addressed to (its ``to``), or None."""
    if not to:
        return None
    parts = to.split("/")
    if (
        len(parts) == 5
        and parts[0] == ""
        and parts[1] == "devices"
        and parts[2]
        and parts[3] == "messages"
        and parts[4].lower() == "devicebound"
    ):
        return unquote(parts[2])
    return None


def send_c2d_request(
    device_id: str,
    payload: bytes,
    properties: Mapping[str, str] | None = None,
    *,
    message_id: str | None = None,
    correlation_id: str | None = None,
    api_version: str = API_VERSION,
) -> HttpRequest:
    """A cloud-to-device message over HTTPS (the local hub's form of IoT Hub's AMQP
    send): the body is the payload, the address and properties are headers."""
    headers = {"Content-Type": "application/octet-stream", H_TO: c2d_target(device_id)}
    if message_id is not None:
        headers[H_MESSAGE_ID] = message_id
    if correlation_id is not None:
        headers[H_CORRELATION_ID] = correlation_id
    headers.update({APP_PROPERTY_PREFIX + k: v for k, v in (properties or {}).items()})
    return HttpRequest("POST", C2D_PATH + _query(api_version), headers, bytes(payload))


# -- shapes ------------------------------------------------------------------------------


#: IoT Hub's bounds on a direct method's timeouts (seconds).
RESPONSE_TIMEOUT_RANGE = (5, 300)
CONNECT_TIMEOUT_RANGE = (0, 300)


@dataclass(frozen=True)
class MethodCall:
    """A direct method invocation (the body of ``POST /twins/{id}/methods``)."""

    method_name: str
    payload: Any = None
    response_timeout: int = 30
    connect_timeout: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.method_name, str) or not self.method_name.strip():
            raise ValueError("methodName must be a non-empty string")
        if len(self.method_name) > 100:
            raise ValueError("methodName must be at most 100 characters")
        for name, value, (low, high) in (
            ("responseTimeoutInSeconds", self.response_timeout, RESPONSE_TIMEOUT_RANGE),
            ("connectTimeoutInSeconds", self.connect_timeout, CONNECT_TIMEOUT_RANGE),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be a whole number of seconds {low}..{high}")

    def to_json(self) -> dict[str, Any]:
        return {
            "methodName": self.method_name,
            "payload": self.payload,
            "responseTimeoutInSeconds": self.response_timeout,
            "connectTimeoutInSeconds": self.connect_timeout,
        }

    @classmethod
    def from_json(cls, data: Any) -> MethodCall:
        """:raises ValueError: saying which field is wrong."""
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object with methodName")
        response = data.get("responseTimeoutInSeconds")
        if response is None:
            response = data.get("timeoutInSeconds", 30)  # the 2016 API's name
        connect = data.get("connectTimeoutInSeconds")
        return cls(
            method_name=data.get("methodName"),  # type: ignore[arg-type]
            payload=data.get("payload"),
            response_timeout=response,
            connect_timeout=0 if connect is None else connect,
        )


@dataclass(frozen=True)
class MethodResult:
    """The device's answer (HTTP 200 ``{"status", "payload"}``)."""

    status: int
    payload: Any = None

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "payload": self.payload}

    @classmethod
    def from_json(cls, data: Any) -> MethodResult:
        if not isinstance(data, dict) or not isinstance(data.get("status"), int):
            raise ValueError("a method result is a JSON object with an integer status")
        return cls(data["status"], data.get("payload"))


def device_body(
    device_id: str,
    *,
    auth_type: str = "sas",
    primary_key: str | None = None,
    secondary_key: str | None = None,
    primary_thumbprint: str | None = None,
    secondary_thumbprint: str | None = None,
    status: str = "enabled",
    etag: str | None = None,
) -> dict[str, Any]:
    """The body of ``PUT /devices/{id}`` (what the SDKs send; keys omitted are made by
    the hub)."""
    body: dict[str, Any] = {
        "deviceId": device_id,
        "status": status,
        "authentication": {
            "type": auth_type,
            "symmetricKey": {"primaryKey": primary_key, "secondaryKey": secondary_key},
            "x509Thumbprint": {
                "primaryThumbprint": primary_thumbprint,
                "secondaryThumbprint": secondary_thumbprint,
            },
        },
        "capabilities": {"iotEdge": False},
    }
    if etag is not None:
        body["etag"] = etag
    return body


def twin_etag(version: int) -> str:
    """A twin's ETag as IoT Hub makes it: base64 of its version, 8 bytes big-endian."""
    return base64.b64encode(version.to_bytes(8, "big")).decode("ascii")


# -- errors ------------------------------------------------------------------------------


#: IoT Hub's numeric error code of a direct method to a device that is not online.
DEVICE_NOT_ONLINE = 404103
#: ... and of a device that did not answer in time.
GATEWAY_TIMEOUT = 504101


def method_error_body(error_code: int, message: str, tracking_id: str, timeout: float) -> bytes:
    """The nested error shape IoT Hub answers a direct method with (404103, 504101)."""
    now = time.time()
    seconds = int(timeout)
    stamp = time.strftime("%m/%d/%Y %H:%M:%S", time.gmtime(now))
    inner = {
        "errorCode": error_code,
        "trackingId": f"{tracking_id}-TimeStamp:{stamp}",
        "message": message,
        "info": {"timeout": f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"},
        "timestampUtc": iso_time(now),
    }
    return json.dumps({"Message": json.dumps(inner), "ExceptionMessage": ""}).encode("utf-8")


def parse_service_error(headers: Mapping[str, str], body: bytes) -> HubErrorInfo:
    """Error code, text and tracking id of a service API error, in either of IoT Hub's
    shapes (``ErrorCode:<code>;<text>``, or the nested JSON of direct methods)."""
    info = parse_error(headers, body)
    text = info.message
    if text.startswith("{"):
        try:
            inner = json.loads(text)
        except ValueError:
            inner = None
        if isinstance(inner, dict):
            code = info.code or (str(inner["errorCode"]) if "errorCode" in inner else None)
            tracking = inner.get("trackingId")
            return HubErrorInfo(
                code=code,
                message=str(inner.get("message", "")),
                tracking_id=str(tracking).split("-")[0] if tracking else info.tracking_id,
            )
    return info
