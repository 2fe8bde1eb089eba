"""The HTTPS front door of the local compliance endpoint: IoT Hub's device REST API, and
its service REST API (every path that is not ``/devices/{id}/messages/...``), answered
by :class:`~.service.ServiceApi`.

:class:`HttpsEndpoint` serves, over the TLS of a :class:`~.profile.HubTlsProfile`, the
routes a device uses over HTTPS (telemetry, batches, cloud-to-device receive, complete,
reject, abandon), authenticates every request against a
:class:`~.registry.DeviceRegistry` (SAS token in ``Authorization``, or the device
certificate presented in TLS), and keeps its messages in the hub's shared
:class:`~.state.HubState`, so a cloud-to-device message reaches a device over whichever
protocol it uses. Each connection is reported to the shared
:class:`~.log.ConnectionLog` — TLS version, cipher suite, SNI, device certificate
thumbprint, outcome — as IoT Hub's *Connections* diagnostic log does.

It is meant to be driven by code (tests, ``iothub-tls serve``, ``demo``)::

    endpoint = HttpsEndpoint(profile, registry, on_connection=print)
    with endpoint:                                   # start() ... stop()
        endpoint.enqueue_c2d("dev1", b"reboot", {"priority": "high"})
        ...                                          # devices connect to endpoint.port
        print(endpoint.received)                     # telemetry seen, with properties
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import io
import logging
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..device import C2DMessage, Message
from ..errors import AuthenticationError
from ..https import conventions as proto
from .frontdoor import DEFAULT_MAX_CONNECTIONS, HubFrontDoor, TlsMeta
from .log import ConnectionEvent, ConnectionLog
from .profile import HubTlsProfile, PeerTls, peer_tls
from .registry import DeviceNotRegisteredError, DeviceRegistry, TokenSource
from .service import ServiceApi
from .state import HubState, ReceivedMessage, Telemetry

__all__ = ["HttpsEndpoint", "ReceivedMessage"]

logger = logging.getLogger("iothub_tls.hub")

#: Requests larger than this are refused without reading them (a message is 256 KB).
_MAX_REQUEST_BYTES = 1024 * 1024


class _RequestDeadlineExpired(Exception):
    """The whole-request deadline passed before the request was read (answered 408)."""


class _DeadlineReader(io.RawIOBase):
    """The handler's raw input: reads from the TLS socket under one clock.

    Between requests a read may wait ``idle_timeout`` (a kept-alive connection that
    stays silent is closed without an answer); from the first byte of a request, every
    read shares one deadline that covers the request line, the headers and the body,
    so a client sending a byte now and then cannot hold the connection (and its
    thread) longer than ``request_timeout`` per request."""

    def __init__(self, sock: socket.socket, idle_timeout: float, request_timeout: float) -> None:
        super().__init__()
        self._sock = sock
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self._deadline: float | None = None

    def readable(self) -> bool:
        return True

    def between_requests(self) -> None:
        self._deadline = None

    def request_started(self) -> None:
        self._deadline = time.monotonic() + self.request_timeout

    def readinto(self, buffer: Any) -> int:
        if self._deadline is None:
            self._sock.settimeout(self.idle_timeout)
            return self._sock.recv_into(buffer)
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise _RequestDeadlineExpired
        self._sock.settimeout(remaining)
        try:
            return self._sock.recv_into(buffer)
        except TimeoutError:
            raise _RequestDeadlineExpired from None


@dataclass
class _Fault:
    status: int
    remaining: int
    retry_after: float | None
    error_code: str


_DEFAULT_CODES = {
    400: "ArgumentInvalid",
    401: "IotHubUnauthorizedAccess",
    403: "IotHubQuotaExceeded",
    404: "DeviceNotFound",
    405: "MethodNotAllowed",
    412: "DeviceMessageLockLost",
    413: "MessageTooLarge",
    429: "ThrottlingException",
    500: "ServerError",
    503: "ServiceUnavailable",
}


class _HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _DEFAULT_CODES.get(status, "Error")
        self.headers = dict(headers or {})


class _Connection:
    """One device connection: its TLS facts and whether its outcome was logged."""

    def __init__(self, meta: TlsMeta, tls: PeerTls) -> None:
        self.meta = meta
        self.tls = tls
        self.device_id: str | None = None
        self.reported = False
        self.accepted = False


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat().replace("+00:00", "Z")


class HttpsEndpoint(HubFrontDoor):
    """IoT Hub's device REST API on ``host:port`` over the profile's TLS.

    :param profile: the server TLS (versions, suites, certificates, device certificates).
    :param registry: devices and their credentials.
    :param state: the hub's shared state (telemetry, cloud-to-device queues with their
        lock timeout); a private one when not given.
    :param port: 0 picks a free port; read :attr:`port` after :meth:`start`.
    :param log: the hub's shared connection log; a private one when not given.
    :param on_connection: called with each HTTPS :class:`~.log.ConnectionEvent`
        (``deviceConnect`` once per connection when its first request is authenticated
        or refused, or when TLS fails; ``deviceDisconnect`` when an accepted connection
        closes). Called on the connection's thread; exceptions are logged and ignored.
    :param clock: seconds since the epoch, for SAS token expiry.
    :param handshake_timeout: seconds a client has to complete the TLS handshake.
    :param idle_timeout: seconds a kept-alive connection may stay idle.
    :param request_timeout: seconds a client has to send a whole request (request line,
        headers and body) from its first byte; a request still incomplete then is
        answered 408 and its connection closed.
    :param max_connections: connections open at once (TLS handshakes in progress and
        connections served); the next is closed before TLS and logged as refused.
    :param service: answers the service API's requests (default: one over this door's
        registry, state and log).
    """

    protocol = "Https"
    token_source = TokenSource.AUTHORIZATION_HEADER

    def __init__(
        self,
        profile: HubTlsProfile,
        registry: DeviceRegistry,
        state: HubState | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log: ConnectionLog | None = None,
        on_connection: Callable[[ConnectionEvent], None] | None = None,
        clock: Callable[[], float] = time.time,
        handshake_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        request_timeout: float = 30.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        service: ServiceApi | None = None,
    ) -> None:
        if not request_timeout > 0:
            raise ValueError(
                f"request_timeout must be a positive number of seconds, not {request_timeout!r}"
            )
        super().__init__(
            profile,
            registry,
            state,
            host=host,
            port=port,
            log=log,
            on_connection=on_connection,
            handshake_timeout=handshake_timeout,
            max_connections=max_connections,
        )
        self.idle_timeout = idle_timeout
        self.request_timeout = float(request_timeout)
        self._clock = clock
        self._state_lock = threading.Condition()
        self._faults: deque[_Fault] = deque()
        self._active = 0
        self.service = service or ServiceApi(registry, self.state, log=self.log, clock=clock)

    # -- life cycle ---------------------------------------------------------------------

    def __enter__(self) -> HttpsEndpoint:
        self.start()
        return self

    def drop_connections(self, timeout: float = 5.0) -> None:
        """Close every open connection (as a hub does with idle ones) and wait until
        their threads are done. Clients reconnect, resuming their TLS session."""
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        with self._state_lock:
            while self._active and time.monotonic() < deadline:
                self._state_lock.wait(0.05)

    # -- what tests and `serve` drive ----------------------------------------------------

    def fail_next(
        self,
        status: int,
        *,
        times: int = 1,
        retry_after: float | None = None,
        error_code: str | None = None,
    ) -> None:
        """Answer the next ``times`` authenticated requests with ``status`` (429 with
        ``Retry-After``, 500, 503 ...) to show how devices back off."""
        if not 400 <= status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        code = error_code or _DEFAULT_CODES.get(status, "Error")
        with self._state_lock:
            self._faults.append(_Fault(status, times, retry_after, code))

    # -- the front door -----------------------------------------------------------------

    def serve_connection(self, tls: ssl.SSLSocket, meta: TlsMeta) -> None:
        conn = _Connection(meta, peer_tls(tls))
        with self._state_lock:
            self._active += 1
        try:
            _Handler(tls, meta.caller, self, conn)
        except (OSError, ssl.SSLError) as exc:
            logger.debug("HTTPS connection from %s ended: %s", meta.caller, exc)
        finally:
            if conn.accepted:
                self.disconnected(meta, conn.device_id)
            with self._state_lock:
                self._active -= 1
                self._state_lock.notify_all()

    # -- used by the handler ------------------------------------------------------------

    def _now(self) -> float:
        return self._clock()

    def _outcome(
        self, conn: _Connection, device_id: str, *, success: bool, reason: str | None = None
    ) -> None:
        """Log the connection's first authentication outcome (once per connection)."""
        if conn.reported:
            return
        conn.reported = True
        conn.accepted = success
        conn.device_id = device_id
        self.connected(conn.meta, device_id, success=success, reason=reason)

    def _take_fault(self) -> _Fault | None:
        with self._state_lock:
            if not self._faults:
                return None
            fault = self._faults[0]
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._faults.popleft()
            return fault

    def _record(
        self, message: Message, device_id: str, batch: bool, auth: str, tls: PeerTls
    ) -> None:
        entry = ReceivedMessage(
            device_id=device_id,
            body=message.payload,
            properties=message.properties,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            batch=batch,
            auth_type=auth,
            tls_version=tls.version,
            cipher=tls.iana_cipher,
            time=dt.datetime.now(dt.timezone.utc),
        )
        self.accept_telemetry(
            entry,
            Telemetry(
                device_id=device_id,
                payload=message.payload,
                properties=dict(message.properties),
                system_properties=proto.system_headers(message),
                protocol=self.protocol,
            ),
        )


class _Handler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive on one TLS connection; one instance per connection."""

    protocol_version = "HTTP/1.1"
    server_version = "iothub-tls-endpoint"
    sys_version = ""

    def __init__(
        self, tls: ssl.SSLSocket, caller: str, endpoint: HttpsEndpoint, conn: _Connection
    ) -> None:
        self.endpoint = endpoint
        self.conn = conn
        self.caller = caller
        host, _, port = caller.rpartition(":")
        super().__init__(tls, (host, int(port or 0)), None)  # type: ignore[arg-type]

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.caller, *args)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket's own reader: replaced by one under our clock
        self.clock = _DeadlineReader(
            self.connection, self.endpoint.idle_timeout, self.endpoint.request_timeout
        )
        self.reader = io.BufferedReader(self.clock)
        self.rfile = self.reader

    def handle_one_request(self) -> None:
        # Defaults for an answer sent before the request line is parsed.
        self.requestline, self.request_version, self.command = "", "HTTP/1.1", ""
        self.clock.between_requests()
        try:
            if not self.reader.peek(1):  # waits up to idle_timeout for a request to begin
                self.close_connection = True
                return
        except TimeoutError:  # idle: close without an answer, as IoT Hub does
            self.close_connection = True
            return
        self.clock.request_started()
        try:
            super().handle_one_request()
        except _RequestDeadlineExpired:
            self.close_connection = True
            seconds = f"{self.endpoint.request_timeout:g}"
            self._error(
                _HttpError(
                    408,
                    f"the whole request (request line, headers, body) did not arrive "
                    f"within {seconds} s of its first byte",
                    "RequestTimeout",
                )
            )

    # -- requests -----------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        try:
            body = self._read_body()
            status, headers, payload = self._route(body)
        except _HttpError as err:
            self._error(err)
            return
        self._send(status, headers, payload)

    def _error(self, err: _HttpError) -> None:
        tracking = uuid.uuid4().hex
        headers = {proto.H_ERROR_CODE: err.code, **err.headers}
        self._send(err.status, headers, proto.error_body(err.code, err.message, tracking))

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue``: refuse a body we would refuse anyway before the
        client sends it."""
        try:
            self._body_length()
        except _HttpError as err:
            self._error(err)
            return False
        return super().handle_expect_100()

    def _read_body(self) -> bytes:
        length = self._body_length()
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            self.close_connection = True  # the client closed mid-body
            raise _HttpError(400, f"the body ended after {len(body)} of {length} bytes")
        return body

    def _body_length(self) -> int:
        """The request body's length, framed by Content-Length only (RFC 9112 section 6).
        Framing that cannot be trusted closes the connection after the answer: the bytes
        that follow cannot be told apart from the next request."""
        if self.headers.get_all("Transfer-Encoding"):
            # RFC 9112 6.1: with Transfer-Encoding, Content-Length must be ignored; we do
            # not decode transfer codings, so the request has no length we can use.
            self.close_connection = True
            raise _HttpError(
                411,
                "Transfer-Encoding is not supported: send the body with Content-Length",
                "LengthRequired",
            )
        values = [
            v.strip() for h in self.headers.get_all("Content-Length") or () for v in h.split(",")
        ]
        for value in values:
            # 1*DIGIT (RFC 9110 8.6): no sign, no spaces, no other digits than ASCII.
            if not (value.isascii() and value.isdigit()):
                self.close_connection = True
                raise _HttpError(400, f"Content-Length {value[:20]!r} is not a number of bytes")
        if len({int(v) for v in values}) > 1:
            self.close_connection = True
            raise _HttpError(400, f"conflicting Content-Length values: {', '.join(values)[:80]}")
        length = int(values[0]) if values else 0
        if length > _MAX_REQUEST_BYTES:
            self.close_connection = True
            raise _HttpError(413, f"request body of {length} bytes is too large")
        return length

    def _send(self, status: int, headers: Mapping[str, str], payload: bytes) -> None:
        # Writing is not bound by the request's deadline, only by the idle timeout.
        self.connection.settimeout(self.endpoint.idle_timeout)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if status != 204:
            self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if payload and status != 204:
            self.wfile.write(payload)

    def _route(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        url = urlsplit(self.path)
        parts = url.path.split("/")
        device_path = len(parts) >= 4 and parts[:2] == ["", "devices"] and parts[3] == "messages"
        if not device_path:
            # Not a device path: IoT Hub's service API, on the same port as on IoT Hub.
            return self.endpoint.service.handle(
                self.command, url.path, url.query, dict(self.headers.items()), body
            )
        query = parse_qs(url.query, keep_blank_values=True)
        if len(parts) < 5:
            raise _HttpError(404, f"no such resource: {url.path}", "NotFound")
        device_id = unquote(parts[2])
        rest = [p.lower() for p in parts[4:]]
        if rest == ["events"]:
            operation, allowed = "telemetry", "POST"
        elif rest == ["devicebound"]:
            operation, allowed = "receive", "GET"
        elif len(rest) == 2 and rest[0] == "devicebound":
            operation, allowed = ("reject" if "reject" in query else "complete"), "DELETE"
        elif len(rest) == 3 and rest[0] == "devicebound" and rest[2] == "abandon":
            operation, allowed = "abandon", "POST"
        else:
            raise _HttpError(404, f"no such resource: {url.path}", "NotFound")
        if self.command != allowed:
            raise _HttpError(405, f"{self.command} is not allowed on {url.path}; use {allowed}")
        if not query.get("api-version", [""])[0]:
            raise _HttpError(
                400, "the api-version query parameter is required (e.g. api-version=2021-04-12)"
            )
        auth = self._authenticate(device_id)
        fault = self.endpoint._take_fault()
        if fault is not None:
            extra = {}
            if fault.retry_after is not None:
                extra["Retry-After"] = f"{fault.retry_after:g}"
            raise _HttpError(fault.status, "injected by the endpoint", fault.error_code, extra)
        if operation == "telemetry":
            self._telemetry(device_id, body, auth)
            return 204, {}, b""
        if operation == "receive":
            return self._receive(device_id)
        return self._settle(device_id, unquote(parts[5]), operation)

    def _authenticate(self, device_id: str) -> str:
        endpoint, conn = self.endpoint, self.conn
        authorization = self.headers.get("Authorization")
        try:
            if authorization:
                endpoint.authenticate_sas(device_id, authorization, now=endpoint._now())
                auth = "sas"
            else:
                device = endpoint.authenticate_certificate(conn.meta, device_id)
                auth = device.auth_type
        except DeviceNotRegisteredError as exc:
            endpoint._outcome(conn, device_id, success=False, reason=str(exc))
            raise _HttpError(404, str(exc)) from None
        except AuthenticationError as exc:
            endpoint._outcome(conn, device_id, success=False, reason=str(exc))
            raise _HttpError(401, str(exc)) from None
        endpoint._outcome(conn, device_id, success=True)
        return auth

    def _telemetry(self, device_id: str, body: bytes, auth: str) -> None:
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        try:
            if content_type == proto.BATCH_CONTENT_TYPE:
                messages = proto.parse_batch(body)
                batch = True
            else:
                messages = [proto.message_from_headers(dict(self.headers.items()), body)]
                batch = False
        except proto.InvalidMessageError as exc:
            raise _HttpError(400, str(exc)) from None
        total = sum(m.size for m in messages)
        if total > proto.MAX_MESSAGE_BYTES:
            kind = "batch" if batch else "message"
            raise _HttpError(
                413, f"{kind} of {total} bytes exceeds {proto.MAX_MESSAGE_BYTES} bytes"
            )
        for message in messages:
            self.endpoint._record(message, device_id, batch, auth, self.conn.tls)

    def _receive(self, device_id: str) -> tuple[int, dict[str, str], bytes]:
        locked = self.endpoint.state.lock_next_c2d(device_id)
        if locked is None or locked.lock_token is None:
            return 204, {}, b""
        message = C2DMessage(
            locked.payload,
            dict(locked.properties),
            lock_token=locked.lock_token,
            message_id=locked.message_id,
            correlation_id=locked.correlation_id,
            # Deliveries before this one (0 on the first delivery).
            delivery_count=locked.delivery_count - 1,
            system_properties={
                proto.H_ENQUEUED_TIME: _iso(locked.enqueued_at),
                proto.H_TO: f"/devices/{device_id}/messages/deviceBound",
            },
        )
        return 200, proto.c2d_headers(message), message.payload

    def _settle(
        self, device_id: str, token: str, operation: str
    ) -> tuple[int, dict[str, str], bytes]:
        if_match = self.headers.get("If-Match")
        if if_match is not None and if_match.strip().strip('"') != token:
            raise _HttpError(412, "If-Match does not match the lock token in the path")
        try:
            self.endpoint.state.settle_c2d(token, operation, device_id=device_id)
        except KeyError:
            raise _HttpError(
                412,
                "the lock token is unknown or expired, or the message was already settled",
            ) from None
        return 204, {}, b""
