"""A client of IoT Hub's service REST API (as the local hub serves it): devices, twins,
direct methods and cloud-to-device messages, over urllib3 with the hardened TLS
context pinned to the hub's root.

::

    with ServiceClient.from_state_dir(".iothub-tls-hub") as hub:   # a running `serve`
        hub.send_c2d("thermostat-1", b"reboot", {"priority": "high"})
        hub.update_twin("thermostat-1", desired={"interval": 5})
        print(hub.invoke_method("thermostat-1", "echo", {"x": 1}))

Requests and answers are built and read by :mod:`.service_conventions`, the module the
hub's :mod:`.service` uses. Every refusal raises :class:`ServiceRequestError` with the
HTTP status and IoT Hub's error code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConnectionFailedError, IoTHubTLSError, MissingDependencyError
from ..https.conventions import H_MESSAGE_ID, HttpRequest
from ..policy import TlsPolicy
from ..roots import RootSet
from ..tls.context import create_ssl_context
from . import service_conventions as svc

if TYPE_CHECKING:
    import urllib3

__all__ = ["ServiceClient", "ServiceRequestError"]


class ServiceRequestError(IoTHubTLSError):
    """The hub refused a service request: ``status`` (HTTP), ``error_code`` (IoT Hub's,
    e.g. ``DeviceNotFound``, ``DeviceNotOnline``) and the hub's message."""

    def __init__(self, operation: str, status: int, error_code: str | None, message: str) -> None:
        said = f"{error_code}: {message}" if error_code else message or "no detail"
        super().__init__(f"{operation} failed with HTTP {status} ({said})")
        self.operation = operation
        self.status = status
        self.error_code = error_code
        self.hub_message = message


def _urllib3() -> Any:
    try:
        import urllib3
    except ImportError:
        raise MissingDependencyError("https", "urllib3") from None
    return urllib3


class ServiceClient:
    """The service side of one hub.

    :param connection_string: a shared access policy's (``iothubowner``).
    :param policy: the TLS policy (pin the hub's root: ``TlsPolicy(roots=...)``).
    :param address: where to connect (default: the connection string's host name); TLS
        still checks the host name.
    :param port: the HTTPS port (IoT Hub: 443).
    :param timeout: seconds for connecting and for each answer (a direct method call
        waits for its own timeouts on top).
    """

    def __init__(
        self,
        connection_string: svc.ServiceConnectionString | str,
        *,
        policy: TlsPolicy | None = None,
        address: str | None = None,
        port: int = 443,
        timeout: float = 30.0,
    ) -> None:
        if isinstance(connection_string, str):
            connection_string = svc.ServiceConnectionString.parse(connection_string)
        self.connection_string = connection_string
        self.hostname = connection_string.host_name
        self.address = address or self.hostname
        self.port = port
        self.timeout = timeout
        self.ssl_context = create_ssl_context(policy or TlsPolicy())
        self._pool: urllib3.HTTPSConnectionPool | None = None

    @classmethod
    def from_state_dir(
        cls, state_dir: str | os.PathLike[str], *, timeout: float = 30.0
    ) -> ServiceClient:
        """The client of the hub running on ``state_dir`` (``iothub-tls serve --state``):
        its address, HTTPS port, root and service connection string come from
        ``STATE/hub.json``.

        :raises StateDirectoryError: no hub runs there.
        :raises ConnectionFailedError: that hub has no HTTPS door.
        """
        from .hub import read_endpoint

        endpoint = read_endpoint(state_dir)
        port = endpoint.get("ports", {}).get("https")
        if not isinstance(port, int):
            raise ConnectionFailedError(
                f"the hub on {state_dir} serves no HTTPS (started with --https-port off): "
                "the service API is on its HTTPS door"
            )
        roots = RootSet.from_pem_file(Path(endpoint["root"]))
        return cls(
            endpoint["service"]["connectionString"],
            policy=TlsPolicy(roots=roots),
            address=endpoint.get("address") or None,
            port=port,
            timeout=timeout,
        )

    def __repr__(self) -> str:
        return f"<ServiceClient {self.connection_string} via {self.address}:{self.port}>"

    # -- I/O --------------------------------------------------------------------------

    def _get_pool(self) -> urllib3.HTTPSConnectionPool:
        if self._pool is None:
            u = _urllib3()
            self._pool = u.HTTPSConnectionPool(
                self.address,
                self.port,
                ssl_context=self.ssl_context,
                server_hostname=self.hostname,  # SNI and the certificate check
                maxsize=1,
                retries=False,
                timeout=u.Timeout(connect=self.timeout, read=self.timeout),
            )
        return self._pool

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(
        self, operation: str, request: HttpRequest, *, read_timeout: float | None = None
    ) -> tuple[int, Mapping[str, str], bytes]:
        u = _urllib3()
        headers = dict(request.headers)
        headers["Authorization"] = self.connection_string.token()
        headers["Host"] = self.hostname
        kwargs: dict[str, Any] = {}
        if read_timeout is not None:
            kwargs["timeout"] = u.Timeout(connect=self.timeout, read=read_timeout)
        try:
            response = self._get_pool().urlopen(
                request.method,
                request.path,
                body=request.body or None,
                headers=headers,
                redirect=False,
                **kwargs,
            )
        except u.exceptions.SSLError as exc:
            raise ConnectionFailedError(
                f"{operation}: TLS with {self.hostname} via {self.address}:{self.port} "
                f"failed: {exc.__context__ or exc}"
            ) from exc
        except u.exceptions.HTTPError as exc:
            raise ConnectionFailedError(
                f"{operation}: cannot reach the hub at {self.address}:{self.port} "
                f"({exc.__context__ or exc}): is it running?"
            ) from exc
        status, answer_headers, body = response.status, dict(response.headers), response.data
        if status >= 300:
            info = svc.parse_service_error(answer_headers, body)
            raise ServiceRequestError(operation, status, info.code, info.message)
        return status, answer_headers, body

    def _json(self, operation: str, request: HttpRequest, **kwargs: Any) -> Any:
        _, _, body = self._send(operation, request, **kwargs)
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ServiceRequestError(
                operation, 200, None, f"the answer is not JSON: {exc}"
            ) from None

    # -- devices ------------------------------------------------------------------------

    def list_devices(self, top: int | None = None) -> list[dict[str, Any]]:
        devices: list[dict[str, Any]] = self._json("list devices", svc.list_devices_request(top))
        return devices

    def get_device(self, device_id: str) -> dict[str, Any]:
        device: dict[str, Any] = self._json("get device", svc.get_device_request(device_id))
        return device

    def create_device(
        self,
        device_id: str,
        *,
        auth_type: str = "sas",
        primary_key: str | None = None,
        secondary_key: str | None = None,
        primary_thumbprint: str | None = None,
        secondary_thumbprint: str | None = None,
        enabled: bool = True,
    ) -> dict[str, Any]:
        """Register a device (``sas`` with the keys given or made by the hub,
        ``selfSigned`` with thumbprints, ``certificateAuthority``)."""
        body = svc.device_body(
            device_id,
            auth_type=auth_type,
            primary_key=primary_key,
            secondary_key=secondary_key,
            primary_thumbprint=primary_thumbprint,
            secondary_thumbprint=secondary_thumbprint,
            status="enabled" if enabled else "disabled",
        )
        device: dict[str, Any] = self._json(
            "create device", svc.put_device_request(device_id, body)
        )
        return device

    def delete_device(self, device_id: str, *, etag: str = "*") -> None:
        self._send("delete device", svc.delete_device_request(device_id, etag=etag))

    def connection_string_of(self, device_id: str) -> str:
        """A SAS device's connection string (with its primary key)."""
        device = self.get_device(device_id)
        auth = device.get("authentication") or {}
        key = (auth.get("symmetricKey") or {}).get("primaryKey")
        if auth.get("type") != "sas" or not key:
            return f"HostName={self.hostname};DeviceId={device_id};x509=true"
        return f"HostName={self.hostname};DeviceId={device_id};SharedAccessKey={key}"

    # -- twins ----------------------------------------------------------------------------

    def get_twin(self, device_id: str) -> dict[str, Any]:
        twin: dict[str, Any] = self._json("get twin", svc.get_twin_request(device_id))
        return twin

    def update_twin(
        self,
        device_id: str,
        *,
        desired: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        replace: bool = False,
        etag: str | None = None,
    ) -> dict[str, Any]:
        """Merge (or, with ``replace``, replace) desired properties and tags; returns the
        twin as the hub has it now."""
        body: dict[str, Any] = {}
        if tags is not None:
            body["tags"] = dict(tags)
        if desired is not None:
            body["properties"] = {"desired": dict(desired)}
        request = svc.update_twin_request(device_id, body, replace=replace, etag=etag)
        twin: dict[str, Any] = self._json("replace twin" if replace else "update twin", request)
        return twin

    # -- direct methods ---------------------------------------------------------------------

    def invoke_method(
        self,
        device_id: str,
        method_name: str,
        payload: Any = None,
        *,
        timeout: int = 30,
        connect_timeout: int = 0,
    ) -> svc.MethodResult:
        """Call a direct method; returns the device's status and payload (a status of
        400 or more is the device's answer, not an error of the call).

        :raises ServiceRequestError: 404 ``DeviceNotOnline``, 504 ``GatewayTimeout`` ...
        """
        call = svc.MethodCall(method_name, payload, timeout, connect_timeout)
        data = self._json(
            f"invoke method {method_name!r}",
            svc.invoke_method_request(device_id, call),
            read_timeout=self.timeout + timeout + connect_timeout,
        )
        try:
            return svc.MethodResult.from_json(data)
        except ValueError as exc:
            raise ServiceRequestError("invoke method", 200, None, str(exc)) from None

    # -- cloud to device ----------------------------------------------------------------------

    def send_c2d(
        self,
        device_id: str,
        payload: bytes | str,
        properties: Mapping[str, str] | None = None,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> str:
        """Queue a cloud-to-device message; returns its message id."""
        body = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        request = svc.send_c2d_request(
            device_id, body, properties, message_id=message_id, correlation_id=correlation_id
        )
        _, headers, _ = self._send("send cloud-to-device message", request)
        found = {k.lower(): v for k, v in headers.items()}.get(H_MESSAGE_ID)
        return found or message_id or ""

    def purge_c2d(self, device_id: str) -> int:
        """Drop the device's queued cloud-to-device messages; returns how many."""
        data = self._json("purge cloud-to-device queue", svc.purge_c2d_request(device_id))
        return int(data.get("totalMessagesPurged", 0))
