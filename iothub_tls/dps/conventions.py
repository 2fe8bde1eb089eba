"""The Device Provisioning Service's device API, sans I/O: both sides use this module
(the client in :mod:`iothub_tls.dps.aio` and the local hub's DPS door,
:mod:`iothub_tls.hub.dps`), so they agree on the wire by construction.

What DPS documents for devices (api-version 2019-03-31 and later):

* MQTT 3.1.1 on 8883: client id = registration id, user name
  ``{idScope}/registrations/{registrationId}/api-version=...``, password = a SAS token
  for ``{idScope}/registrations/{registrationId}`` signed with the enrollment's key
  (``skn=registration``), or none with an X.509 certificate whose subject CN is the
  registration id. The device subscribes to ``$dps/registrations/res/#`` and publishes
  ``$dps/registrations/PUT/iotdps-register/?$rid={rid}`` (the register request), then
  ``$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={id}``
  (polling) after the ``retry-after`` the answer
  ``$dps/registrations/res/{status}/?$rid={rid}&retry-after={s}`` carries.
* HTTPS on 443: ``PUT /{idScope}/registrations/{registrationId}/register?api-version=``
  and ``GET /{idScope}/registrations/{registrationId}/operations/{operationId}?...``,
  the SAS token in ``Authorization`` (none with an X.509 certificate), ``Retry-After``.

Both carry the same JSON: the request ``{"registrationId": ..., "payload": ...}``, the
answer ``{"operationId": ..., "status": "assigning" | "assigned" | "failed" |
"disabled", "registrationState": {...}}``, and errors ``{"errorCode": 401002,
"trackingId": ..., "message": ...}``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

from ..errors import (
    AuthenticationError,
    BadRequestError,
    ClientError,
    HubServerError,
    PolicyError,
    ThrottledError,
    UnexpectedResponseError,
)

__all__ = [
    "API_VERSION",
    "GLOBAL_ENDPOINT",
    "HTTPS_PORT",
    "MQTT_PORT",
    "RESPONSE_FILTER",
    "SAS_KEY_NAME",
    "STATUSES",
    "DpsError",
    "DpsRequest",
    "DpsResponse",
    "Operation",
    "Registration",
    "derive_device_key",
    "error_body",
    "error_for_status",
    "mqtt_username",
    "operation_body",
    "operation_path",
    "operation_status_topic",
    "parse_error",
    "parse_mqtt_username",
    "parse_operation",
    "parse_path",
    "parse_register_body",
    "parse_request_topic",
    "parse_response_topic",
    "parse_retry_after",
    "register_body",
    "register_path",
    "register_topic",
    "resource_uri",
    "response_topic",
]

#: The api-version this library sends (DPS documents the MQTT user name with it).
API_VERSION = "2019-03-31"
#: The global device endpoint of the public cloud.
GLOBAL_ENDPOINT = "global.azure-devices-provisioning.net"
MQTT_PORT = 8883
HTTPS_PORT = 443
#: What a device subscribes to before it registers.
RESPONSE_FILTER = "$dps/registrations/res/#"
#: The ``skn`` of a device's SAS token for DPS.
SAS_KEY_NAME = "registration"
#: A registration's statuses: the first while DPS works, the others final.
STATUSES = ("assigning", "assigned", "failed", "disabled")

_REGISTER_PREFIX = "$dps/registrations/PUT/iotdps-register/?"
_STATUS_PREFIX = "$dps/registrations/GET/iotdps-get-operationstatus/?"
_RESPONSE_PREFIX = "$dps/registrations/res/"
# DPS: "alphanumeric, lowercase, and may contain hyphens" (up to 128); we also take the
# characters the SDKs pass through (. _ :) and refuse what would break a topic or path.
_REGISTRATION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ID_SCOPE = re.compile(r"^[A-Za-z0-9]{1,64}$")


def check_registration_id(registration_id: object) -> str:
    """``registration_id`` if DPS could take it, else :class:`PolicyError`."""
    if not isinstance(registration_id, str) or not _REGISTRATION_ID.match(registration_id):
        raise PolicyError(
            f"registration id {registration_id!r} is not valid: 1 to 128 letters, digits, "
            "'-', '.', '_' or ':' (DPS lower-cases it; use lower case)"
        )
    return registration_id


def check_id_scope(id_scope: object) -> str:
    """``id_scope`` if it looks like a DPS ID scope (``0ne00012345``), else
    :class:`PolicyError`."""
    if not isinstance(id_scope, str) or not _ID_SCOPE.match(id_scope):
        raise PolicyError(
            f"ID scope {id_scope!r} is not valid: the ID scope of the provisioning service "
            "(letters and digits, e.g. 0ne00012345; portal: DPS > Overview)"
        )
    return id_scope


# -- credentials ----------------------------------------------------------------------------


def resource_uri(id_scope: str, registration_id: str) -> str:
    """The resource a device's DPS SAS token is signed for."""
    return f"{id_scope}/registrations/{registration_id}"


def derive_device_key(group_key: str | bytes, registration_id: str) -> str:
    """The symmetric key of device ``registration_id`` in an enrollment group with
    ``group_key``: base64(HMAC-SHA256(base64decode(group_key), registration_id)), as
    DPS computes it. Give each device its derived key, never the group key.

    :raises PolicyError: ``group_key`` is not base64.
    """
    try:
        raw = base64.b64decode(group_key, validate=True)
    except (ValueError, binascii.Error):
        raise PolicyError(
            "the enrollment group key is not valid base64 (copy the group's primary key "
            "from the provisioning service)"
        ) from None
    if not raw:
        raise PolicyError("the enrollment group key is empty")
    digest = hmac.new(raw, registration_id.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


# -- MQTT -------------------------------------------------------------------------------------


def mqtt_username(
    id_scope: str, registration_id: str, *, api_version: str = API_VERSION,
    client_version: str | None = None,
) -> str:  # fmt: skip
    """``{idScope}/registrations/{registrationId}/api-version=...`` (and
    ``&ClientVersion=...``, URL-encoded, when given)."""
    params = [("api-version", api_version)]
    if client_version:
        params.append(("ClientVersion", client_version))
    return f"{resource_uri(id_scope, registration_id)}/{urlencode(params, quote_via=quote)}"


def parse_mqtt_username(username: str) -> tuple[str, str, dict[str, str]] | None:
    """(id scope, registration id, parameters) of a DPS MQTT user name, else None."""
    parts = username.split("/", 3)
    if len(parts) != 4 or parts[1] != "registrations" or not parts[0] or not parts[2]:
        return None
    return parts[0], parts[2], dict(parse_qsl(parts[3], keep_blank_values=True))


def register_topic(request_id: str) -> str:
    return f"{_REGISTER_PREFIX}$rid={quote(request_id, safe='')}"


def operation_status_topic(request_id: str, operation_id: str) -> str:
    return (
        f"{_STATUS_PREFIX}$rid={quote(request_id, safe='')}"
        f"&operationId={quote(operation_id, safe='')}"
    )


@dataclass(frozen=True)
class DpsRequest:
    """A device's publish to DPS: ``kind`` is "register" or "status"."""

    kind: str
    request_id: str
    operation_id: str | None = None


def _query(text: str) -> dict[str, str]:
    return {k.lstrip("$"): v for k, v in parse_qsl(text, keep_blank_values=True)}


def parse_request_topic(topic: str) -> DpsRequest | None:
    """The request a device published (None: not a DPS request topic, or no ``$rid``)."""
    for prefix, kind in ((_REGISTER_PREFIX, "register"), (_STATUS_PREFIX, "status")):
        if topic.startswith(prefix):
            query = _query(topic[len(prefix) :])
            rid = query.get("rid")
            if not rid:
                return None
            operation = query.get("operationId")
            if kind == "status" and not operation:
                return None
            return DpsRequest(kind, rid, operation if kind == "status" else None)
    return None


def response_topic(status: int, request_id: str, retry_after: int | None = None) -> str:
    topic = f"{_RESPONSE_PREFIX}{status}/?$rid={quote(request_id, safe='')}"
    if retry_after is not None:
        topic += f"&retry-after={retry_after}"
    return topic


@dataclass(frozen=True)
class DpsResponse:
    """DPS's answer on ``$dps/registrations/res/{status}/?$rid=...``."""

    status: int
    request_id: str
    retry_after: float | None = None


def parse_response_topic(topic: str) -> DpsResponse | None:
    if not topic.startswith(_RESPONSE_PREFIX):
        return None
    status_text, _, rest = topic[len(_RESPONSE_PREFIX) :].partition("/")
    if not status_text.isdigit() or not rest.startswith("?"):
        return None
    query = _query(rest[1:])
    rid = query.get("rid")
    if rid is None:
        return None
    return DpsResponse(int(status_text), rid, parse_retry_after(query.get("retry-after")))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``retry-after`` (MQTT) or ``Retry-After`` (HTTPS) value; None when
    absent or not a number of seconds."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if 0 <= seconds < 86400 else None


# -- HTTPS ------------------------------------------------------------------------------------


def register_path(id_scope: str, registration_id: str, api_version: str = API_VERSION) -> str:
    return (
        f"/{quote(id_scope, safe='')}/registrations/{quote(registration_id, safe='')}"
        f"/register?api-version={quote(api_version, safe='')}"
    )


def operation_path(
    id_scope: str, registration_id: str, operation_id: str, api_version: str = API_VERSION
) -> str:
    return (
        f"/{quote(id_scope, safe='')}/registrations/{quote(registration_id, safe='')}"
        f"/operations/{quote(operation_id, safe='')}?api-version={quote(api_version, safe='')}"
    )


def parse_path(path: str) -> tuple[str, str, str | None] | None:
    """(id scope, registration id, operation id or None for register) of a DPS device
    path (without its query), else None."""
    parts = path.split("/")
    if (
        len(parts) == 5
        and parts[0] == ""
        and parts[2] == "registrations"
        and parts[4] == "register"
    ):
        return unquote(parts[1]), unquote(parts[3]), None
    if (
        len(parts) == 6
        and parts[0] == ""
        and parts[2] == "registrations"
        and parts[4] == "operations"
    ):
        if parts[5]:
            return unquote(parts[1]), unquote(parts[3]), unquote(parts[5])
    return None


# -- the JSON bodies --------------------------------------------------------------------------


def register_body(registration_id: str, payload: Any = None) -> bytes:
    """The register request: ``{"payload": ..., "registrationId": ...}``."""
    return json.dumps({"payload": payload, "registrationId": registration_id}).encode("utf-8")


def parse_register_body(body: bytes) -> tuple[str | None, Any]:
    """(registrationId or None, payload) of a register request.

    :raises ValueError: not a JSON object (an empty body is ``(None, None)``).
    """
    if not body.strip():
        return None, None
    data = json.loads(body.decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError("the register request must be a JSON object")
    rid = data.get("registrationId")
    return (rid if isinstance(rid, str) else None), data.get("payload")


@dataclass(frozen=True)
class Registration:
    """What the provisioning service says about a device's registration.

    ``status`` is "assigned", "failed", "disabled" (or "assigning" while the service
    works); ``assigned_hub`` and ``device_id`` say where the device now lives;
    ``substatus`` ("initialAssignment", "deviceDataMigrated", "deviceDataReset",
    "reprovisionedToInitialAssignment"); ``payload`` is the JSON the service returns to
    the device (a custom allocation's answer); ``etag`` the registration state's version.

    :meth:`device_client` / :meth:`connect` turn an assigned registration into a device
    client for its hub (see :mod:`iothub_tls.dps`).
    """

    registration_id: str
    status: str
    assigned_hub: str | None = None
    device_id: str | None = None
    substatus: str | None = None
    payload: Any = None
    etag: str | None = None
    operation_id: str | None = None
    created: str | None = None
    last_updated: str | None = None
    error_code: int | None = None
    error_message: str | None = None
    #: the client that registered: its credential, TLS policy and allowed hubs (for
    #: device_client(); never shown: it holds the key)
    _origin: Any = field(default=None, repr=False, compare=False)

    def as_json(self) -> dict[str, Any]:
        """The ``registrationState`` document, as DPS writes it."""
        doc: dict[str, Any] = {"registrationId": self.registration_id, "status": self.status}
        for key, value in (
            ("createdDateTimeUtc", self.created),
            ("assignedHub", self.assigned_hub),
            ("deviceId", self.device_id),
            ("substatus", self.substatus),
            ("errorCode", self.error_code),
            ("errorMessage", self.error_message),
            ("lastUpdatedDateTimeUtc", self.last_updated),
            ("etag", self.etag),
            ("payload", self.payload),
        ):
            if value is not None:
                doc[key] = value
        return doc

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], *, operation_id: str | None = None,
        status: str | None = None,
    ) -> Registration:  # fmt: skip
        def text(key: str) -> str | None:
            value = data.get(key)
            return value if isinstance(value, str) else None

        code = data.get("errorCode")
        return cls(
            registration_id=text("registrationId") or "",
            status=text("status") or status or "",
            assigned_hub=text("assignedHub"),
            device_id=text("deviceId"),
            substatus=text("substatus"),
            payload=data.get("payload"),
            etag=text("etag"),
            operation_id=operation_id,
            created=text("createdDateTimeUtc"),
            last_updated=text("lastUpdatedDateTimeUtc"),
            error_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
            error_message=text("errorMessage"),
        )

    # -- into a device client ------------------------------------------------------------

    def device_client(self, transport: str = "mqtt", *, aio: bool = False, **kwargs: Any) -> Any:
        """A device client (not connected) for the assigned hub, with the credential the
        device registered with and the registering client's TLS policy.

        :param transport: "mqtt", "amqp" or "https".
        :param aio: the asyncio client of :mod:`iothub_tls.aio` instead of the
            synchronous one.
        :param kwargs: the client's keywords (``host``, ``port``, ``options``...);
            ``policy`` overrides the registering client's.
        :raises ProvisioningError: the registration is not assigned.
        :raises UntrustedAssignmentError: the assigned hub's name is outside the
            registering client's ``allowed_hubs``.
        """
        from .assign import device_client

        return device_client(self, transport, aio=aio, kwargs=kwargs)

    def connect(self, transport: str = "mqtt", **kwargs: Any) -> Any:
        """:meth:`device_client` (synchronous), connected. A hub whose certificate does
        not chain to the policy's roots raises :class:`UntrustedAssignmentError` (a
        :class:`~iothub_tls.errors.ProvisioningError`), with the TLS error as its cause."""
        from .assign import connect

        return connect(self, transport, kwargs)


@dataclass(frozen=True)
class Operation:
    """An answer to a register request or a status poll."""

    operation_id: str
    status: str
    registration: Registration | None = None


def operation_body(operation_id: str, status: str, state: Registration | None = None) -> bytes:
    doc: dict[str, Any] = {"operationId": operation_id, "status": status}
    if state is not None:
        doc["registrationState"] = state.as_json()
    return json.dumps(doc).encode("utf-8")


def parse_operation(body: bytes) -> Operation:
    """The answer to a register request or a poll.

    :raises ValueError: not a JSON object with ``operationId`` and ``status``.
    """
    data = json.loads(body.decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    operation_id, status = data.get("operationId"), data.get("status")
    if not isinstance(operation_id, str) or not isinstance(status, str):
        raise ValueError("operationId and status are missing")
    state = data.get("registrationState")
    registration = (
        Registration.from_json(state, operation_id=operation_id, status=status)
        if isinstance(state, dict)
        else None
    )
    return Operation(operation_id, status, registration)


# -- errors -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DpsError:
    """DPS's error document: ``errorCode`` (HTTP status * 1000 + a detail), ``message``,
    ``trackingId``."""

    error_code: int | None
    message: str
    tracking_id: str | None = None


def error_body(error_code: int, message: str, tracking_id: str, timestamp: str) -> bytes:
    return json.dumps(
        {
            "errorCode": error_code,
            "trackingId": tracking_id,
            "message": message,
            "timestampUtc": timestamp,
        }
    ).encode("utf-8")


def parse_error(body: bytes) -> DpsError:
    try:
        data = json.loads(body.decode("utf-8")) if body.strip() else None
    except (UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict):
        return DpsError(None, body[:200].decode("utf-8", "replace"))
    code = data.get("errorCode")
    message = data.get("message") or data.get("Message") or ""
    tracking = data.get("trackingId")
    return DpsError(
        code if isinstance(code, int) and not isinstance(code, bool) else None,
        message if isinstance(message, str) else str(message),
        tracking if isinstance(tracking, str) else None,
    )


def error_for_status(
    status: int, error: DpsError, *, endpoint: str, registration_id: str,
    retry_after: float | None = None,
) -> ClientError:  # fmt: skip
    """The exception for an unsuccessful DPS answer."""
    said = f"{error.error_code}: {error.message}" if error.error_code else error.message
    text = (
        f"{endpoint} answered {status} to registration {registration_id!r} ({said or 'no detail'})"
    )
    exc: ClientError
    if status == 401:
        exc = AuthenticationError(
            f"{text}: the provisioning service did not accept the device's credentials. "
            "Check the ID scope, the registration id (for X.509: the certificate's subject "
            "CN), and the key (for an enrollment group: the key derived from the group key "
            "with derive_device_key) or that the certificate is enrolled"
        )
    elif status == 429:
        exc = ThrottledError(
            f"{text}: the provisioning service throttled the device and it was still "
            "throttling when the registration's time ran out; register later"
        )
        exc.retry_after = retry_after
    elif status == 400:
        exc = BadRequestError(f"{text}: the request was refused as malformed")
    elif status >= 500:
        exc = HubServerError(f"{text}: the provisioning service failed; register again later")
    else:
        exc = UnexpectedResponseError(f"{text}: an answer DPS does not document here")
    for name, value in (
        ("status", status),
        ("error_code", str(error.error_code) if error.error_code is not None else None),
        ("tracking_id", error.tracking_id),
    ):
        setattr(exc, name, value)
    return exc
