"""IoT Hub's device REST API as pure data: requests built, responses parsed, no I/O.

Both the device client (:mod:`iothub_tls.https`) and the local compliance endpoint
(:mod:`iothub_tls.hub.https`) use this module, so the two sides cannot drift apart
on a header name, a path or a status code.

The operations, all under ``/devices/{url-encoded device id}`` and each with the
``api-version`` query parameter:

* send telemetry: ``POST /messages/events`` -> 204
* send a batch: the same, with ``Content-Type: application/vnd.microsoft.iothub.json``
* receive cloud-to-device: ``GET /messages/deviceBound`` -> 200 (a message) or 204 (none)
* complete: ``DELETE /messages/deviceBound/{lock token}`` -> 204
* reject (dead-letter): ``DELETE /messages/deviceBound/{lock token}?reject`` -> 204
* abandon (requeue): ``POST /messages/deviceBound/{lock token}/abandon`` -> 204

Application properties travel as ``iothub-app-<name>`` headers, system properties as
``iothub-messageid``, ``iothub-correlationid``, ``iothub-contenttype`` and
``iothub-contentencoding``; a received message's lock token is its ``ETag`` (quoted).
Errors come back with an ``iothub-errorcode`` header and a JSON body whose ``Message``
reads ``ErrorCode:<code>;<text>``.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import functools
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from ..device import API_VERSION, C2DMessage, Message, Settler
from ..errors import (
    AuthenticationError,
    BadRequestError,
    ClientError,
    DeviceNotFoundError,
    HubServerError,
    InvalidMessageError,
    MessageLockLostError,
    MessageTooLargeError,
    NotAuthorizedError,
    ThrottledError,
    UnexpectedResponseError,
)
from ..tls.refusals import Refusal

__all__ = [
    "API_VERSION",
    "APP_PROPERTY_PREFIX",
    "BATCH_CONTENT_TYPE",
    "HTTP_REFUSALS",
    "MAX_MESSAGE_BYTES",
    "BadRequestError",
    "C2DMessage",
    "DeviceNotFoundError",
    "HttpRequest",
    "HubErrorInfo",
    "HubServerError",
    "InvalidMessageError",
    "Message",
    "MessageLockLostError",
    "MessageTooLargeError",
    "ThrottledError",
    "UnexpectedResponseError",
]

#: Largest device-to-cloud message: body + system property values + application
#: property names and values (IoT Hub quotas); also the largest batch.
MAX_MESSAGE_BYTES = 256 * 1024
#: Content type of a batch of messages in one request.
BATCH_CONTENT_TYPE = "application/vnd.microsoft.iothub.json"
#: Prefix of application-property headers.
APP_PROPERTY_PREFIX = "iothub-app-"

# System-property headers (device-to-cloud and cloud-to-device).
H_MESSAGE_ID = "iothub-messageid"
H_CORRELATION_ID = "iothub-correlationid"
H_CONTENT_TYPE = "iothub-contenttype"
H_CONTENT_ENCODING = "iothub-contentencoding"
H_TO = "iothub-to"
H_SEQUENCE_NUMBER = "iothub-sequencenumber"
H_DELIVERY_COUNT = "iothub-deliverycount"
H_ENQUEUED_TIME = "iothub-enqueuedtime"
H_EXPIRY = "iothub-expiry"
H_USER_ID = "iothub-userid"
H_ACK = "iothub-ack"
H_ERROR_CODE = "iothub-errorcode"
# Cloud-to-device content type/encoding arrive without the iothub- prefix.
H_C2D_CONTENT_TYPE = "ContentType"
H_C2D_CONTENT_ENCODING = "ContentEncoding"

# Property names and values over HTTPS: ASCII alphanumerics and these symbols
# (IoT Hub "create and read messages", application properties over HTTPS).
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")
# Message id: up to 128 ASCII alphanumerics and these symbols.
_MESSAGE_ID = re.compile(r"[A-Za-z0-9\-:.+%_#*?!(),=@;$']{1,128}")


@dataclass(frozen=True)
class HubErrorInfo:
    """What an error response said."""

    code: str | None
    message: str
    tracking_id: str | None = None


def parse_error(headers: Mapping[str, str], body: bytes) -> HubErrorInfo:
    """Read IoT Hub's error code, text and tracking id from a response."""
    code = _get(headers, H_ERROR_CODE)
    text = ""
    tracking = None
    try:
        data = json.loads(body.decode("utf-8")) if body else None
    except (UnicodeDecodeError, ValueError):
        data = None
    if isinstance(data, dict):
        raw = data.get("Message") or data.get("message") or ""
        if isinstance(raw, str):
            # "ErrorCode:DeviceNotFound;Device not registered" (the SDKs split on ';')
            head, sep, rest = raw.partition(";")
            if head.startswith("ErrorCode:"):
                code = code or head[len("ErrorCode:") :] or None
                text = rest if sep else ""
            else:
                text = raw
        exc_text = data.get("ExceptionMessage")
        if isinstance(exc_text, str):
            found = re.search(r"Tracking ID:\s*([^\s-]+)", exc_text)
            tracking = found.group(1) if found else None
    elif body:
        text = body[:200].decode("utf-8", "replace")
    return HubErrorInfo(code=code, message=text.strip(), tracking_id=tracking)


def error_body(code: str, message: str, tracking_id: str) -> bytes:
    """The JSON body IoT Hub sends with an error (what the endpoint answers)."""
    stamp = time.strftime("%m/%d/%Y %H:%M:%S", time.gmtime())
    return json.dumps(
        {
            "Message": f"ErrorCode:{code};{message}",
            "ExceptionMessage": f"Tracking ID:{tracking_id}-G:0-TimeStamp:{stamp}",
        }
    ).encode("utf-8")


#: What each unsuccessful status of the device API means: :func:`error_for_status` builds
#: its errors from these rows (a 5xx status takes the 500 row), and the documentation's
#: troubleshooting page lists them.
HTTP_REFUSALS: tuple[Refusal, ...] = (
    Refusal(
        key="http-400",
        code=400,
        signals=("HTTP 400",),
        error=BadRequestError,
        says="bad request",
        cause="The hub could not read the request: a property, an id or a body it does not accept",
        fix="The hub's error code, quoted in the message, names what it refused",
    ),
    Refusal(
        key="http-401",
        code=401,
        signals=("HTTP 401",),
        error=AuthenticationError,
        says="unauthorized",
        cause="The SAS token or the certificate does not authenticate this device (the "
        "client renews a SAS token once before it gives up)",
        fix="Check the device's SharedAccessKey (or its X.509 certificate and registered "
        "thumbprint), the DeviceId and the device clock (SAS tokens carry an expiry)",
    ),
    Refusal(
        key="http-403",
        code=403,
        signals=("HTTP 403",),
        error=NotAuthorizedError,
        says="forbidden",
        cause="The hub refused the operation for this identity (daily message quota reached, "
        "hub suspended, or a policy without DeviceConnect permission)",
        fix="Check the hub's quota and state, and the permissions of the key's policy",
    ),
    Refusal(
        key="http-404",
        code=404,
        signals=("HTTP 404",),
        error=DeviceNotFoundError,
        says="not found",
        cause="The hub has no such device",
        fix="Register the device in the hub, or check the DeviceId of the connection string",
    ),
    Refusal(
        key="http-412",
        code=412,
        signals=("HTTP 412",),
        error=MessageLockLostError,
        says="precondition failed",
        cause="The message lock expired or the message was already settled",
        fix="It will be delivered again: receive it again and settle it within one minute",
    ),
    Refusal(
        key="http-413",
        code=413,
        signals=("HTTP 413",),
        error=MessageTooLargeError,
        says="payload too large",
        cause="The message (body and properties) or the batch is over 256 KB",
        fix="Keep a message and a batch under 256 KB",
    ),
    Refusal(
        key="http-429",
        code=429,
        signals=("HTTP 429",),
        error=ThrottledError,
        says="too many requests",
        cause="The hub throttles the device or the hub (its tier's quotas)",
        fix="The client retries after the wait the hub asks for (Retry-After); send less "
        "often or raise the hub's tier",
        retryable=True,
    ),
    Refusal(
        key="http-5xx",
        code=500,
        signals=("HTTP 500", "HTTP 5xx"),
        error=HubServerError,
        says="server error",
        cause="The hub failed to serve the request",
        fix="The client retries with its RetryPolicy; if it persists, check the hub's health",
        retryable=True,
    ),
)
_BY_STATUS = {row.code: row for row in HTTP_REFUSALS}


def error_for_status(
    status: int,
    info: HubErrorInfo,
    *,
    operation: str,
    retry_after: float | None = None,
) -> ClientError:
    """The exception for an unsuccessful response to ``operation``: the row of
    :data:`HTTP_REFUSALS` for ``status`` (any 5xx status takes the 500 row)."""
    said = f"{info.code}: {info.message}" if info.code else info.message or "no detail"
    text = f"{operation} failed with HTTP {status} ({said})"
    row = _BY_STATUS.get(500 if status >= 500 else status)
    if row is None:
        exc: ClientError = UnexpectedResponseError(text)
    else:
        text += f"; {row.says}. {row.explain()}"
        if row.retryable:
            text += (
                f"; retries exhausted, the hub asked to wait {retry_after:g} s"
                if retry_after is not None
                else "; retries exhausted"
            )
        made = row.error(text)
        assert isinstance(made, ClientError)
        exc = made
    # Plain attributes, also on AuthenticationError / NotAuthorizedError instances.
    vars(exc).update(status=status, error_code=info.code, tracking_id=info.tracking_id)
    if status == 429:
        vars(exc)["retry_after"] = retry_after
    return exc


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date,
    RFC 9110 10.2.3); None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


# -- messages -----------------------------------------------------------------------------


def _check_token(kind: str, text: str) -> None:
    if not isinstance(text, str) or not _TOKEN.fullmatch(text):
        raise InvalidMessageError(
            f"{kind} {text!r} cannot be sent over HTTPS: IoT Hub allows only ASCII "
            "letters, digits and !#$%&'*+-.^_`|~ in property names and values "
            "(encode other text, e.g. percent-encode it, or send it in the body)"
        )


def check_message(message: Message) -> Message:
    """``message`` if HTTPS can carry it, else :class:`InvalidMessageError`: property
    names and values travel as HTTP headers (token characters only, no ``iothub-``
    prefix), the message id has IoT Hub's format, the other system properties are
    printable ASCII."""
    if not isinstance(message, Message):
        raise TypeError(f"expected an iothub_tls.Message, not {type(message).__name__}")
    for name, value in message.properties.items():
        _check_token("property name", name)
        _check_token(f"value of property {name!r}", value)
        if name.lower().startswith("iothub-"):
            raise InvalidMessageError(
                f"property name {name!r} is reserved: names starting with 'iothub-' "
                "are IoT Hub system properties; use message_id, correlation_id, "
                "content_type or content_encoding for those"
            )
    if message.message_id is not None and not _MESSAGE_ID.fullmatch(message.message_id):
        raise InvalidMessageError(
            f"message_id {message.message_id!r} is not valid: up to 128 ASCII letters, "
            "digits and -:.+%_#*?!(),=@;$' characters"
        )
    for name in ("correlation_id", "content_type", "content_encoding"):
        value = getattr(message, name)
        if value is not None and (not value.isascii() or not value.isprintable()):
            raise InvalidMessageError(
                f"{name} {value!r} must be printable ASCII text (it travels in an HTTP header)"
            )
    return message


def system_headers(message: Message) -> dict[str, str]:
    """A message's system properties under their HTTP header names."""
    out: dict[str, str] = {}
    for header, value in (
        (H_MESSAGE_ID, message.message_id),
        (H_CORRELATION_ID, message.correlation_id),
        (H_CONTENT_TYPE, message.content_type),
        (H_CONTENT_ENCODING, message.content_encoding),
    ):
        if value is not None:
            out[header] = value
    return out


# -- requests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpRequest:
    """One request: method, path with query, headers, body."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    body: bytes = b""


@functools.lru_cache(maxsize=1024)  # every request of a device builds the same few paths
def device_path(device_id: str, *segments: str) -> str:
    """``/devices/{id}/...`` with the device id and each segment URL-encoded (as the
    SDKs do: ``/`` and every reserved character are escaped)."""
    return "/".join(["", "devices", quote(device_id, safe=""), *segments])


@functools.lru_cache(maxsize=64)
def _query(api_version: str, *flags: str) -> str:
    return "?api-version=" + quote(api_version, safe="") + "".join("&" + f for f in flags)


def events_request(device_id: str, message: Message, api_version: str = API_VERSION) -> HttpRequest:
    """Send one message: its body is the HTTP body, properties go in headers."""
    check_message(message)
    if message.size > MAX_MESSAGE_BYTES:
        raise MessageTooLargeError(
            f"the message is {message.size} bytes; IoT Hub accepts at most "
            f"{MAX_MESSAGE_BYTES} bytes (body + properties): split it or send less"
        )
    path = device_path(device_id, "messages", "events")
    headers = {
        "Content-Type": "application/octet-stream",
        H_TO: path,
        **system_headers(message),
    }
    headers.update({APP_PROPERTY_PREFIX + k: v for k, v in message.properties.items()})
    return HttpRequest("POST", path + _query(api_version), headers, message.payload)


def batch_body(messages: Iterable[Message]) -> bytes:
    """The JSON array of a batch: base64 bodies, properties under their header names."""
    items: list[dict[str, Any]] = []
    for message in messages:
        check_message(message)
        item: dict[str, Any] = {"body": base64.b64encode(message.payload).decode("ascii")}
        props = system_headers(message)
        props.update({APP_PROPERTY_PREFIX + k: v for k, v in message.properties.items()})
        if props:
            item["properties"] = props
        items.append(item)
    return json.dumps(items, separators=(",", ":")).encode("ascii")


def batch_request(
    device_id: str, messages: Iterable[Message], api_version: str = API_VERSION
) -> HttpRequest:
    """Send several messages in one request."""
    batch = list(messages)
    if not batch:
        raise InvalidMessageError("a batch needs at least one message")
    total = sum(m.size for m in batch)
    if total > MAX_MESSAGE_BYTES:
        raise MessageTooLargeError(
            f"the batch is {total} bytes; IoT Hub accepts at most {MAX_MESSAGE_BYTES} "
            "bytes per batch: send it in several batches"
        )
    path = device_path(device_id, "messages", "events")
    headers = {"Content-Type": BATCH_CONTENT_TYPE, H_TO: path}
    return HttpRequest("POST", path + _query(api_version), headers, batch_body(batch))


def receive_request(device_id: str, api_version: str = API_VERSION) -> HttpRequest:
    path = device_path(device_id, "messages", "deviceBound")
    return HttpRequest("GET", path + _query(api_version), {H_TO: path})


def _settle_headers(lock_token: str) -> dict[str, str]:
    return {"If-Match": f'"{lock_token}"'}


def _check_lock_token(lock_token: str) -> str:
    if not isinstance(lock_token, str) or not lock_token or not lock_token.isprintable():
        raise InvalidMessageError(
            "lock_token must be the non-empty lock token of a received message "
            "(C2DMessage.lock_token)"
        )
    return quote(lock_token, safe="")


def complete_request(
    device_id: str, lock_token: str, api_version: str = API_VERSION
) -> HttpRequest:
    path = device_path(device_id, "messages", "deviceBound", _check_lock_token(lock_token))
    return HttpRequest("DELETE", path + _query(api_version), _settle_headers(lock_token))


def reject_request(device_id: str, lock_token: str, api_version: str = API_VERSION) -> HttpRequest:
    path = device_path(device_id, "messages", "deviceBound", _check_lock_token(lock_token))
    return HttpRequest("DELETE", path + _query(api_version, "reject"), _settle_headers(lock_token))


def abandon_request(device_id: str, lock_token: str, api_version: str = API_VERSION) -> HttpRequest:
    path = device_path(
        device_id, "messages", "deviceBound", _check_lock_token(lock_token), "abandon"
    )
    return HttpRequest("POST", path + _query(api_version), _settle_headers(lock_token))


# -- responses ----------------------------------------------------------------------------


def _get(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup (HTTP header names are case-insensitive)."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, found in headers.items():
        if key.lower() == lowered:
            return found
    return None


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and text.strip().isdigit() else None


def app_properties(headers: Mapping[str, str]) -> dict[str, str]:
    """Application properties from ``iothub-app-*`` headers, prefix removed."""
    n = len(APP_PROPERTY_PREFIX)
    return {
        key[n:]: value
        for key, value in headers.items()
        if key.lower().startswith(APP_PROPERTY_PREFIX) and len(key) > n
    }


# Cloud-to-device system properties kept as they arrived (besides the typed fields).
_C2D_SYSTEM_HEADERS = (H_SEQUENCE_NUMBER, H_ENQUEUED_TIME, H_TO, H_ACK, H_EXPIRY, H_USER_ID)


def parse_c2d(
    status: int, headers: Mapping[str, str], body: bytes, *, settler: Settler | None = None
) -> C2DMessage | None:
    """A received cloud-to-device message from a 200 response; None for 204 (empty
    queue). ``settler`` carries out ``complete()`` and the others."""
    if status == 204:
        return None
    etag = _get(headers, "ETag")
    if not etag:
        raise UnexpectedResponseError(
            "the hub answered a receive with a message but no ETag (lock token)"
        )
    system = {name: _get(headers, name) for name in _C2D_SYSTEM_HEADERS}
    return C2DMessage(
        body,
        app_properties(headers),
        message_id=_get(headers, H_MESSAGE_ID),
        correlation_id=_get(headers, H_CORRELATION_ID),
        content_type=_get(headers, H_C2D_CONTENT_TYPE) or _get(headers, H_CONTENT_TYPE),
        content_encoding=(
            _get(headers, H_C2D_CONTENT_ENCODING) or _get(headers, H_CONTENT_ENCODING)
        ),
        expiry_time=system[H_EXPIRY],
        user_id=system[H_USER_ID],
        delivery_count=_int_or_none(_get(headers, H_DELIVERY_COUNT)),
        lock_token=etag.strip().strip('"'),
        system_properties={k: v for k, v in system.items() if v is not None},
        transport="https",
        settler=settler,
    )


# -- the server side of the same messages --------------------------------------------------


def message_from_headers(headers: Mapping[str, str], body: bytes) -> Message:
    """The message a single-send request carries (what the hub reads from it).

    :raises InvalidMessageError: for properties outside what HTTPS allows.
    """
    try:
        message = Message(
            body,
            app_properties(headers),
            message_id=_get(headers, H_MESSAGE_ID) or None,
            correlation_id=_get(headers, H_CORRELATION_ID) or None,
            content_type=_get(headers, H_CONTENT_TYPE) or None,
            content_encoding=_get(headers, H_CONTENT_ENCODING) or None,
        )
    except TypeError as exc:
        raise InvalidMessageError(str(exc)) from None
    return check_message(message)


def parse_batch(body: bytes) -> list[Message]:
    """The messages of a batch body.

    :raises InvalidMessageError: when the body is not a batch of valid messages.
    """
    try:
        items = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidMessageError(f"the batch body is not JSON: {exc}") from None
    if not isinstance(items, list) or not items:
        raise InvalidMessageError("a batch body must be a non-empty JSON array of messages")
    out: list[Message] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("body"), str):
            raise InvalidMessageError(f"batch item {index} has no string 'body'")
        props = item.get("properties") or {}
        if not isinstance(props, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in props.items()
        ):
            raise InvalidMessageError(f"batch item {index}: 'properties' must map text to text")
        if item.get("base64Encoded", True) is False:
            data = item["body"].encode("utf-8")
        else:
            try:
                data = base64.b64decode(item["body"], validate=True)
            except (ValueError, binascii.Error):
                raise InvalidMessageError(f"batch item {index}: body is not base64") from None
        out.append(message_from_headers(props, data))
    return out


def c2d_headers(message: C2DMessage) -> dict[str, str]:
    """The response headers that carry a cloud-to-device message (200 to a receive)."""
    headers = {"ETag": f'"{message.lock_token}"'}
    for name, value in (
        (H_MESSAGE_ID, message.message_id),
        (H_CORRELATION_ID, message.correlation_id),
        (H_C2D_CONTENT_TYPE, message.content_type),
        (H_C2D_CONTENT_ENCODING, message.content_encoding),
        (H_DELIVERY_COUNT, None if message.delivery_count is None else str(message.delivery_count)),
        (H_EXPIRY, message.expiry_time),
        (H_USER_ID, message.user_id),
    ):
        if value is not None:
            headers[name] = value
    for name in (H_SEQUENCE_NUMBER, H_ENQUEUED_TIME, H_TO, H_ACK):
        value = message.system_properties.get(name)
        if value is not None:
            headers[name] = value
    headers.update({APP_PROPERTY_PREFIX + k: v or "" for k, v in message.properties.items()})
    return headers
