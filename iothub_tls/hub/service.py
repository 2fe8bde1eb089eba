"""The local hub's service API: the parts of IoT Hub's service REST API that drive
devices (registry, twins, direct methods, cloud-to-device), independent of any
transport.

:class:`ServiceApi` takes a request as (method, path, query, headers, body) and returns
(status, headers, body): the HTTPS door hands it every request whose path is not a
device path, and any other I/O model can do the same. It checks the ``Authorization``
header (a SAS token of a shared access policy with the permission the operation needs,
signed for the hub's host name), routes with :func:`.service_conventions.parse_route`,
and answers in IoT Hub's JSON shapes and error bodies. It works on the hub's
:class:`~.registry.DeviceRegistry` (saved after every change), :class:`~.state.HubState`
(twins, cloud-to-device queues, method calls) and :class:`~.log.ConnectionLog` (whether
a device is connected).

A direct method call blocks the caller until the device answers or the call's
``responseTimeoutInSeconds`` (at most 300 s) passes: an asynchronous server runs
:meth:`ServiceApi.handle` in a worker thread.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

from ..errors import AuthenticationError, NotAuthorizedError
from ..https.conventions import H_CORRELATION_ID, H_ERROR_CODE, H_MESSAGE_ID, H_TO, app_properties
from ..https.conventions import error_body as _classic_error_body
from . import service_conventions as svc
from .log import ConnectionLog
from .registry import (
    REGISTRY_READ,
    REGISTRY_WRITE,
    SERVICE_CONNECT,
    Device,
    DeviceNotRegisteredError,
    DeviceRegistry,
    RegistryError,
)
from .state import HubState, Twin

__all__ = [
    "ServiceApi",
    "ServiceRefusal",
    "ServiceResponse",
    "device_etag",
    "device_json",
    "enqueue_c2d",
    "twin_json",
]

logger = logging.getLogger("iothub_tls.hub")

#: (status, headers, body)
ServiceResponse = tuple[int, dict[str, str], bytes]

_PERMISSION = {
    svc.Operation.LIST_DEVICES: REGISTRY_READ,
    svc.Operation.GET_DEVICE: REGISTRY_READ,
    svc.Operation.PUT_DEVICE: REGISTRY_WRITE,
    svc.Operation.DELETE_DEVICE: REGISTRY_WRITE,
    svc.Operation.GET_TWIN: SERVICE_CONNECT,
    svc.Operation.REPLACE_TWIN: SERVICE_CONNECT,
    svc.Operation.UPDATE_TWIN: SERVICE_CONNECT,
    svc.Operation.INVOKE_METHOD: SERVICE_CONNECT,
    svc.Operation.SEND_C2D: SERVICE_CONNECT,
    svc.Operation.PURGE_C2D: SERVICE_CONNECT,
}

#: IoT Hub's limit on the nesting of twin tags and desired properties.
_MAX_TWIN_DEPTH = 10
_MAX_REQUEST_BYTES = 256 * 1024


class ServiceRefusal(Exception):
    """A request the service API answers with an error: HTTP ``status``, IoT Hub's error
    ``code`` and a ``message`` (``body``: a ready error body, else the classic shape)."""

    def __init__(self, status: int, code: str, message: str, body: bytes | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.body = body


def device_etag(device: Device) -> str:
    """A device identity's ETag: changes whenever its registration does (IoT Hub's are
    base64 text of a number, as this is)."""
    data = json.dumps(device.as_json(), sort_keys=True).encode("utf-8")
    return base64.b64encode(str(zlib.crc32(data)).encode("ascii")).decode("ascii")


def _thumbprints(device: Device) -> dict[str, str | None]:
    prints: list[str | None] = [*device.thumbprints, None, None]
    return {"primaryThumbprint": prints[0], "secondaryThumbprint": prints[1]}


def device_json(device: Device, *, connected: bool = False, c2d_count: int = 0) -> dict[str, Any]:
    """A device identity as IoT Hub's registry returns it."""
    return {
        "deviceId": device.device_id,
        "moduleId": None,
        "generationId": device.generation_id,
        "etag": device_etag(device),
        "connectionState": "Connected" if connected else "Disconnected",
        "status": "enabled" if device.enabled else "disabled",
        "statusReason": None,
        "connectionStateUpdatedTime": svc.NEVER,
        "statusUpdatedTime": svc.NEVER,
        "lastActivityTime": svc.NEVER,
        "cloudToDeviceMessageCount": c2d_count,
        "authentication": {
            "symmetricKey": {
                "primaryKey": device.primary_key,
                "secondaryKey": device.secondary_key,
            },
            "x509Thumbprint": _thumbprints(device),
            "type": device.auth_type,
        },
        "capabilities": {"iotEdge": False},
    }


def twin_json(
    device: Device, twin: Twin, *, connected: bool = False, c2d_count: int = 0
) -> dict[str, Any]:
    """A device twin as IoT Hub's service API returns it."""

    def section(values: dict[str, Any], version: int, updated: float) -> dict[str, Any]:
        return {**values, "$metadata": {"$lastUpdated": svc.iso_time(updated)}, "$version": version}

    return {
        "deviceId": device.device_id,
        "etag": svc.twin_etag(twin.version),
        "deviceEtag": device_etag(device),
        "status": "enabled" if device.enabled else "disabled",
        "statusUpdateTime": svc.NEVER,
        "connectionState": "Connected" if connected else "Disconnected",
        "lastActivityTime": svc.NEVER,
        "cloudToDeviceMessageCount": c2d_count,
        "authenticationType": device.auth_type,
        "x509Thumbprint": _thumbprints(device),
        "modelId": "",
        "version": twin.version,
        "tags": twin.tags,
        "properties": {
            "desired": section(twin.desired, twin.desired_version, twin.desired_updated),
            "reported": section(twin.reported, twin.reported_version, twin.reported_updated),
        },
        "capabilities": {"iotEdge": False},
    }


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


def _json_body(body: bytes) -> Any:
    if not body:
        raise ServiceRefusal(400, "ArgumentNull", "the request needs a JSON body")
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ServiceRefusal(400, "ArgumentInvalid", f"the body is not JSON: {exc}") from None


def _check_twin_object(value: Any, where: str, depth: int = 1) -> dict[str, Any]:
    """Tags and desired properties: objects whose keys have no '.', ' ' or '$' (IoT
    Hub's rule), nested at most 10 deep."""
    if not isinstance(value, dict):
        raise ServiceRefusal(400, "ArgumentInvalid", f"{where} must be a JSON object")
    if depth > _MAX_TWIN_DEPTH:
        raise ServiceRefusal(
            400, "ArgumentInvalid", f"{where} nests deeper than {_MAX_TWIN_DEPTH} levels"
        )
    for key, inner in value.items():
        if depth == 1 and key in ("$version", "$metadata"):
            continue  # read-only, sent back by clients that echo a twin: ignored
        if not key or any(c in key for c in ". $") or len(key) > 512:
            raise ServiceRefusal(
                400,
                "ArgumentInvalid",
                f"{where}: the key {key[:80]!r} is not allowed (no '.', ' ' or '$'; "
                "1-512 characters)",
            )
        if isinstance(inner, dict):
            _check_twin_object(inner, f"{where}.{key}", depth + 1)
    return value


class ServiceApi:
    """IoT Hub's service REST API over a local hub's registry, state and log.

    :param registry: devices and shared access policies (tokens are checked against it;
        it is saved after every change when it has a state directory).
    :param state: twins, cloud-to-device queues and direct method calls.
    :param log: the connection log, for ``connectionState`` (None: always Disconnected).
    :param clock: seconds since the epoch, for SAS token expiry.
    """

    def __init__(
        self,
        registry: DeviceRegistry,
        state: HubState,
        *,
        log: ConnectionLog | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.state = state
        self.log = log
        self._clock = clock

    # -- the one entry point --------------------------------------------------------------

    def handle(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> ServiceResponse:
        """Answer one request. Never raises for a bad request: every refusal is an
        answer in IoT Hub's error shape."""
        try:
            return self._handle(method, path, query, headers, body)
        except ServiceRefusal as refusal:
            tracking = uuid.uuid4().hex
            payload = refusal.body or _classic_error_body(refusal.code, refusal.message, tracking)
            logger.info(
                "service %s %s refused: %d %s", method, path, refusal.status, refusal.message
            )
            return (
                refusal.status,
                {H_ERROR_CODE: refusal.code, "Content-Type": "application/json; charset=utf-8"},
                payload,
            )

    def _handle(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> ServiceResponse:
        try:
            route = svc.parse_route(method, path)
        except svc.RouteError as exc:
            code = "NotFound" if exc.status == 404 else "MethodNotAllowed"
            raise ServiceRefusal(exc.status, code, exc.message) from None
        self._authorize(headers, _PERMISSION[route.operation])
        params = parse_qs(query, keep_blank_values=True)
        if not params.get("api-version", [""])[0]:
            raise ServiceRefusal(
                400,
                "ArgumentInvalid",
                f"the api-version query parameter is required (e.g. api-version={svc.API_VERSION})",
            )
        if len(body) > _MAX_REQUEST_BYTES:
            raise ServiceRefusal(
                413, "RequestEntityTooLarge", f"the body of {len(body)} bytes is too large"
            )
        op = svc.Operation
        if route.operation is op.LIST_DEVICES:
            return self._list_devices(params)
        device_id = route.device_id
        assert device_id is not None or route.operation is op.SEND_C2D
        if route.operation is op.SEND_C2D:
            return self._send_c2d(headers, body)
        assert device_id is not None
        if route.operation is op.PUT_DEVICE:
            return self._put_device(device_id, headers, body)
        device = self._device(device_id)
        if route.operation is op.GET_DEVICE:
            return self._json(200, self._device_json(device))
        if route.operation is op.DELETE_DEVICE:
            return self._delete_device(device, headers)
        if route.operation is op.GET_TWIN:
            return self._json(200, self._twin_json(device, self.state.twin_snapshot(device_id)))
        if route.operation in (op.REPLACE_TWIN, op.UPDATE_TWIN):
            return self._update_twin(
                device, headers, body, replace=route.operation is op.REPLACE_TWIN
            )
        if route.operation is op.INVOKE_METHOD:
            return self._invoke_method(device, body)
        assert route.operation is op.PURGE_C2D
        purged = self.state.purge_c2d(device_id)
        return self._json(
            200, {"totalMessagesPurged": purged, "deviceId": device_id, "moduleId": None}
        )

    # -- helpers ----------------------------------------------------------------------------

    def _authorize(self, headers: Mapping[str, str], permission: str) -> None:
        authorization = _header(headers, "Authorization")
        if not authorization:
            raise ServiceRefusal(
                401,
                "IotHubUnauthorizedAccess",
                "no Authorization header: send a SAS token of a shared access policy "
                "(e.g. iothubowner) signed for the hub's host name",
            )
        try:
            self.registry.verify_service_sas(authorization, permission, now=self._clock())
        except (AuthenticationError, NotAuthorizedError) as exc:
            raise ServiceRefusal(401, "IotHubUnauthorizedAccess", str(exc)) from None

    @staticmethod
    def _json(status: int, data: Any, headers: Mapping[str, str] | None = None) -> ServiceResponse:
        out = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        return status, out, json.dumps(data).encode("utf-8")

    def _device(self, device_id: str) -> Device:
        device = self.registry.get(device_id)
        if device is None:
            raise ServiceRefusal(404, "DeviceNotFound", f"Device {device_id} not registered")
        return device

    def _connected(self, device_id: str) -> bool:
        return self.log is not None and self.log.is_connected(device_id)

    def _device_json(self, device: Device) -> dict[str, Any]:
        return device_json(
            device,
            connected=self._connected(device.device_id),
            c2d_count=self.state.pending_c2d(device.device_id),
        )

    def _twin_json(self, device: Device, twin: Twin) -> dict[str, Any]:
        return twin_json(
            device,
            twin,
            connected=self._connected(device.device_id),
            c2d_count=self.state.pending_c2d(device.device_id),
        )

    def _save(self) -> None:
        if self.registry.state_dir is not None:
            self.registry.save()

    # -- devices ------------------------------------------------------------------------------

    def _list_devices(self, params: dict[str, list[str]]) -> ServiceResponse:
        top_text = params.get("top", ["1000"])[0]
        if not top_text.isdigit() or not 1 <= int(top_text) <= 1000:
            raise ServiceRefusal(400, "ArgumentInvalid", "top must be a whole number 1..1000")
        devices = self.registry.devices[: int(top_text)]
        return self._json(200, [self._device_json(d) for d in devices])

    def _put_device(
        self, device_id: str, headers: Mapping[str, str], body: bytes
    ) -> ServiceResponse:
        data = _json_body(body)
        if not isinstance(data, dict):
            raise ServiceRefusal(400, "ArgumentInvalid", "the device must be a JSON object")
        if data.get("deviceId") not in (None, device_id):
            raise ServiceRefusal(
                400,
                "ArgumentInvalid",
                f"the body's deviceId {data.get('deviceId')!r} is not the path's {device_id!r}",
            )
        existing = self.registry.get(device_id)
        if_match = _header(headers, "If-Match")
        if existing is None:
            if if_match is not None and if_match.strip() != "*":
                raise ServiceRefusal(404, "DeviceNotFound", f"Device {device_id} not registered")
        elif if_match is None:
            raise ServiceRefusal(
                409,
                "DeviceAlreadyExists",
                f"A device with ID '{device_id}' is already registered (send If-Match with "
                "its etag, or *, to update it)",
            )
        elif if_match.strip() != "*" and svc.unquote_etag(if_match) != device_etag(existing):
            raise ServiceRefusal(
                412, "PreconditionFailed", "the etag in If-Match is not the device's current etag"
            )
        device = self._device_from_json(device_id, data, existing)
        try:
            self.registry.add(device, replace_existing=True)
        except RegistryError as exc:
            raise ServiceRefusal(400, "ArgumentInvalid", str(exc)) from None
        self._save()
        return self._json(200, self._device_json(device))

    def _device_from_json(
        self, device_id: str, data: dict[str, Any], existing: Device | None
    ) -> Device:
        status = data.get("status") or "enabled"
        if status not in ("enabled", "disabled"):
            raise ServiceRefusal(
                400, "ArgumentInvalid", f"status must be enabled or disabled, not {status!r}"
            )
        auth = data.get("authentication") or {}
        if not isinstance(auth, dict):
            raise ServiceRefusal(400, "ArgumentInvalid", "authentication must be a JSON object")
        kind = auth.get("type") or "sas"
        keys = auth.get("symmetricKey") or {}
        prints = auth.get("x509Thumbprint") or {}
        if not isinstance(keys, dict) or not isinstance(prints, dict):
            raise ServiceRefusal(
                400, "ArgumentInvalid", "symmetricKey and x509Thumbprint must be JSON objects"
            )
        common: dict[str, Any] = {
            "enabled": status == "enabled",
            "generation_id": existing.generation_id if existing else "",
        }
        try:
            if kind == "sas":
                # Keys left out are generated, as IoT Hub does (both of them).
                was_sas = existing is not None and existing.auth_type == "sas"
                primary = keys.get("primaryKey") or (
                    existing.primary_key if was_sas and existing else None
                )
                secondary = keys.get("secondaryKey") or (
                    existing.secondary_key if was_sas and existing else None
                )
                return Device(
                    device_id,
                    primary_key=primary or DeviceRegistry.new_key(),
                    secondary_key=secondary or DeviceRegistry.new_key(),
                    **common,
                )
            if kind == "selfSigned":
                found = [
                    prints.get("primaryThumbprint"),
                    prints.get("secondaryThumbprint"),
                ]
                if not found[0]:
                    raise ServiceRefusal(
                        400,
                        "ArgumentInvalid",
                        "a selfSigned device needs x509Thumbprint.primaryThumbprint",
                    )
                return Device(device_id, thumbprints=tuple(t for t in found if t), **common)
            if kind == "certificateAuthority":
                return Device(device_id, x509_ca=True, **common)
        except RegistryError as exc:
            raise ServiceRefusal(400, "ArgumentInvalid", str(exc)) from None
        raise ServiceRefusal(
            400,
            "ArgumentInvalid",
            f"authentication type {kind!r} is not one of sas, selfSigned, certificateAuthority",
        )

    def _delete_device(self, device: Device, headers: Mapping[str, str]) -> ServiceResponse:
        if_match = _header(headers, "If-Match")
        if (
            if_match is not None
            and if_match.strip() != "*"
            and svc.unquote_etag(if_match) != device_etag(device)
        ):
            raise ServiceRefusal(
                412, "PreconditionFailed", "the etag in If-Match is not the device's current etag"
            )
        try:
            self.registry.remove(device.device_id)
        except DeviceNotRegisteredError:
            raise ServiceRefusal(
                404, "DeviceNotFound", f"Device {device.device_id} not registered"
            ) from None
        self.state.forget_device(device.device_id)
        self._save()
        return 204, {}, b""

    # -- twins ----------------------------------------------------------------------------------

    def _update_twin(
        self, device: Device, headers: Mapping[str, str], body: bytes, *, replace: bool
    ) -> ServiceResponse:
        data = _json_body(body)
        if not isinstance(data, dict):
            raise ServiceRefusal(400, "ArgumentInvalid", "the twin must be a JSON object")
        if_match = _header(headers, "If-Match")
        if if_match is not None and if_match.strip() != "*":
            current = self.state.twin_snapshot(device.device_id)
            if svc.unquote_etag(if_match) != svc.twin_etag(current.version):
                raise ServiceRefusal(
                    412, "PreconditionFailed", "the etag in If-Match is not the twin's current etag"
                )
        tags = data.get("tags")
        properties = data.get("properties") or {}
        if not isinstance(properties, dict):
            raise ServiceRefusal(400, "ArgumentInvalid", "properties must be a JSON object")
        desired = properties.get("desired")
        # Reported properties belong to the device: a twin sent back whole keeps them
        # as they are (IoT Hub ignores them too).
        if tags is not None:
            _check_twin_object(tags, "tags")
        if desired is not None:
            _check_twin_object(desired, "properties.desired")
        if replace:
            tags = tags or {}
            desired = desired or {}
        twin = self.state.update_twin(device.device_id, tags=tags, desired=desired, replace=replace)
        return self._json(200, self._twin_json(device, twin))

    # -- direct methods -------------------------------------------------------------------------

    def _invoke_method(self, device: Device, body: bytes) -> ServiceResponse:
        try:
            call = svc.MethodCall.from_json(_json_body(body))
        except ValueError as exc:
            raise ServiceRefusal(400, "ArgumentInvalid", str(exc)) from None
        payload = json.dumps(call.payload).encode("utf-8")
        tracking = uuid.uuid4().hex
        try:
            status, answer = self.state.invoke_method(
                device.device_id,
                call.method_name,
                payload,
                timeout=call.response_timeout,
                connect_timeout=call.connect_timeout,
            )
        except LookupError:
            text = (
                "The operation failed because the requested device isn't online or hasn't "
                "registered the direct method callback."
            )
            raise ServiceRefusal(
                404,
                "DeviceNotOnline",
                text,
                svc.method_error_body(svc.DEVICE_NOT_ONLINE, text, tracking, call.connect_timeout),
            ) from None
        except TimeoutError:
            text = "Timed out waiting for the response from device."
            raise ServiceRefusal(
                504,
                "GatewayTimeout",
                text,
                svc.method_error_body(svc.GATEWAY_TIMEOUT, text, tracking, call.response_timeout),
            ) from None
        try:
            result: Any = json.loads(answer.decode("utf-8")) if answer else None
        except (UnicodeDecodeError, ValueError):
            result = answer.decode("utf-8", "replace")
        return self._json(200, svc.MethodResult(status, result).to_json())

    # -- cloud to device ------------------------------------------------------------------------

    def _send_c2d(self, headers: Mapping[str, str], body: bytes) -> ServiceResponse:
        device_id = svc.parse_c2d_target(_header(headers, H_TO))
        if device_id is None:
            raise ServiceRefusal(
                400,
                "ArgumentInvalid",
                f"the {H_TO} header must address a device: /devices/{{id}}/messages/devicebound",
            )
        self._device(device_id)
        message_id = enqueue_c2d(
            self.state,
            device_id,
            body,
            app_properties(headers),
            message_id=_header(headers, H_MESSAGE_ID),
            correlation_id=_header(headers, H_CORRELATION_ID),
        )
        return 204, {H_MESSAGE_ID: message_id}, b""


def enqueue_c2d(
    state: HubState,
    device_id: str,
    payload: bytes,
    properties: Mapping[str, str],
    *,
    message_id: str | None = None,
    correlation_id: str | None = None,
) -> str:
    """Queue a service's cloud-to-device message under IoT Hub's limits (64 KB, 50 per
    device); returns its message id. Shared by the HTTPS and AMQP service senders.

    :raises ServiceRefusal: 413 / 403 with IoT Hub's error codes.
    """
    size = len(payload) + sum(len(k) + len(v) for k, v in properties.items())
    if size > svc.MAX_C2D_BYTES:
        raise ServiceRefusal(
            413,
            "MessageTooLarge",
            f"the message is {size} bytes; a cloud-to-device message is at most "
            f"{svc.MAX_C2D_BYTES} bytes",
        )
    if state.pending_c2d(device_id) >= svc.MAX_C2D_QUEUE:
        raise ServiceRefusal(
            403,
            "DeviceMaximumQueueDepthExceeded",
            f"device {device_id} already has {svc.MAX_C2D_QUEUE} cloud-to-device messages "
            "queued: it must receive some first",
        )
    message = state.enqueue_c2d(
        device_id,
        bytes(payload),
        dict(properties),
        message_id=message_id,
        correlation_id=correlation_id,
    )
    return message.message_id
