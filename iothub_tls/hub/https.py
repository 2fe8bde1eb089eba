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

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import email.utils
import http
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from ..device import C2DMessage, Message
from ..errors import AuthenticationError
from ..https import conventions as proto
from . import http1, websocket
from .frontdoor import DEFAULT_MAX_CONNECTIONS, HubFrontDoor, TlsFrontDoor, TlsMeta
from .log import ConnectionEvent, ConnectionLog
from .loop import HubLoop
from .profile import HubTlsProfile, PeerTls, peer_tls
from .registry import DeviceNotRegisteredError, DeviceRegistry, TokenSource
from .service import ServiceApi
from .state import HubState, ReceivedMessage, Telemetry
from .stream import TlsStream

__all__ = ["HttpsEndpoint", "ReceivedMessage"]

logger = logging.getLogger("iothub_tls.hub")

#: Requests larger than this are refused without reading them (a message is 256 KB).
_MAX_REQUEST_BYTES = 1024 * 1024
#: After an answer that closes the connection, how long the door still reads (and
#: drops) what the client sends, so the answer is not lost to a TCP reset.
_LINGER = 2.0
_METHODS = frozenset({"GET", "POST", "DELETE", "PUT", "PATCH"})
_SERVER = "iothub-tls-endpoint"


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
        closes). Called on the hub's I/O thread; exceptions are logged and ignored.
    :param clock: seconds since the epoch, for SAS token expiry.
    :param handshake_timeout: seconds a client has to complete the TLS handshake.
    :param idle_timeout: seconds a kept-alive connection may stay idle.
    :param request_timeout: seconds a client has to send a whole request (request line,
        headers and body) from its first byte; a request still incomplete then is
        answered 408 and its connection closed.
    :param max_connections: connections open at once (TLS handshakes in progress and
        connections served); the next is closed before TLS and logged as refused.
    :param service: answers the service API's requests (default: one over this door's
        registry, state and log), on the hub's worker threads: a direct-method call
        waits there for the device's answer.
    :param hub_loop: the hub's I/O loop (default: one of the door's own).
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
        hub_loop: HubLoop | None = None,
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
            hub_loop=hub_loop,
        )
        self.idle_timeout = idle_timeout
        self.request_timeout = float(request_timeout)
        self._clock = clock
        self._state_lock = threading.Lock()
        self._faults: deque[_Fault] = deque()
        self.service = service or ServiceApi(registry, self.state, log=self.log, clock=clock)
        #: the doors whose sessions run over WebSockets on this door ("mqtt", "amqp")
        self.websocket_doors: dict[str, TlsFrontDoor] = {}

    def serve_websockets(self, **doors: TlsFrontDoor | None) -> None:
        """Serve ``GET /$iothub/websocket`` upgrades for these doors (``mqtt=``,
        ``amqp=``; :mod:`.websocket`), as IoT Hub serves MQTT and AMQP over WebSockets on
        443. Their sessions run on this door's loop, which must be theirs too."""
        for name, door in doors.items():
            if door is None:
                continue
            if door.io is not self.io:
                raise ValueError(f"the {name} door runs on another loop than the HTTPS door")
            self.websocket_doors[name] = door

    # -- life cycle ---------------------------------------------------------------------

    def __enter__(self) -> HttpsEndpoint:
        self.start()
        return self

    def drop_connections(self, timeout: float = 5.0) -> None:
        """Close every open connection (as a hub does with idle ones) and wait until
        they are gone. Clients reconnect, resuming their TLS session."""
        if self.io.running:
            with contextlib.suppress(TimeoutError, concurrent.futures.TimeoutError):
                self.io.run(self._drop(timeout), timeout + 5)

    async def _drop(self, timeout: float) -> None:
        served = self.served_streams()
        for stream in served:
            stream.close()
        await self._until_gone(set(served), timeout)

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

    def open_session(self, stream: TlsStream, meta: TlsMeta) -> _HttpConnection:
        return _HttpConnection(self, stream, _Connection(meta, peer_tls(stream.tls)))

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


class _HttpConnection:
    """HTTP/1.1 with keep-alive on one TLS connection, on the hub's loop.

    Between requests the connection may stay silent ``idle_timeout`` (then it is closed
    without an answer); from the first byte of a request, one deadline covers its
    request line, headers and body (``request_timeout``; then 408 and close), so a
    client sending a byte now and then cannot hold the connection. Requests are answered
    one at a time, in order; bytes of the next one wait in the buffer meanwhile."""

    def __init__(self, endpoint: HttpsEndpoint, stream: TlsStream, conn: _Connection) -> None:
        self.endpoint = endpoint
        self.stream = stream
        self.conn = conn
        self.caller = conn.meta.caller
        self.loop = asyncio.get_running_loop()
        self.buffer = bytearray()
        #: "idle" (between requests), "head", "body", "busy" (answering), "closed"
        self.state = "idle"
        self.head: http1.RequestHead | None = None
        self.length = 0
        self.keep_alive = True
        self.eof = False
        self._timer: asyncio.TimerHandle | None = None
        self._wait(endpoint.idle_timeout, self._idle_expired)

    # -- the stream's session ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.state == "closed":
            return
        self.buffer += data
        self._advance()

    def eof_received(self) -> None:
        self.eof = True
        if self.state == "body":
            received, self.buffer = len(self.buffer), bytearray()
            self.keep_alive = False  # the client closed mid-body
            self._error(_HttpError(400, f"the body ended after {received} of {self.length} bytes"))
        elif self.state != "busy":
            self._close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if exc is not None:
            logger.debug("HTTPS connection from %s ended: %s", self.caller, exc)
        self.state = "closed"
        self._cancel()
        if self.conn.accepted:
            self.endpoint.disconnected(self.conn.meta, self.conn.device_id)

    # -- reading requests -------------------------------------------------------------------

    def _advance(self) -> None:
        """Take what the buffer holds as far as it goes (several pipelined requests)."""
        while True:
            if self.state == "idle":
                if not self.buffer:
                    return
                self.state = "head"
                self._wait(self.endpoint.request_timeout, self._request_expired)
            if self.state == "head" and not self._read_head():
                return
            if self.state == "body":
                if len(self.buffer) < self.length:
                    return
                body = bytes(self.buffer[: self.length])
                del self.buffer[: self.length]
                self._cancel()
                self.state = "busy"
                self._dispatch(body)
            if self.state != "idle":
                return  # answering (on a worker thread), or closed

    def _read_head(self) -> bool:
        """Parse the head once it is complete; True when the body may be read."""
        end = http1.head_end(self.buffer)
        try:
            if end < 0:
                http1.check_incomplete(self.buffer)
                return False
            head = http1.parse_head(bytes(self.buffer[:end]))
        except http1.HeadError as exc:
            self.keep_alive = False
            self._error(_HttpError(exc.status, exc.message, _head_error_code(exc.status)))
            return False
        del self.buffer[:end]
        self.head = head
        self.keep_alive = head.keep_alive
        if websocket.is_websocket_request(head):
            self._upgrade(head)
            return False
        if head.method not in _METHODS:
            self.keep_alive = False
            self._error(_HttpError(501, f"unsupported method {head.method!r}", "NotImplemented"))
            return False
        try:
            self.length = self._body_length(head.headers)
        except _HttpError as err:
            self._error(err)  # no "100 Continue": the body is never invited
            return False
        if head.expects_continue:
            self.stream.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.state = "body"
        return True

    def _upgrade(self, head: http1.RequestHead) -> None:
        """A WebSocket upgrade (MQTT or AMQP over WebSockets): refused with its status
        and a log line, or accepted: the connection's bytes go to the new session."""
        endpoint = self.endpoint
        refused = websocket.refusal(head, set(endpoint.websocket_doors))
        if refused is not None:
            self.conn.reported = True
            endpoint.connected(self.conn.meta, None, success=False, reason=refused.reason)
            self.keep_alive = False
            self.state = "busy"
            self._error(_HttpError(refused.status, refused.reason, refused.code, refused.headers))
            return
        self._cancel()
        self.state = "closed"  # this HTTP session is over; the stream has a new one
        leftover, self.buffer = bytes(self.buffer), bytearray()
        self.stream.session = websocket.accept(
            self.stream, self.conn.meta, head, endpoint.websocket_doors, leftover
        )

    def _body_length(self, headers: http1.Headers) -> int:
        """The request body's length, framed by Content-Length only (RFC 9112 section 6).
        Framing that cannot be trusted closes the connection after the answer: the bytes
        that follow cannot be told apart from the next request."""
        if headers.get_all("Transfer-Encoding"):
            # RFC 9112 6.1: with Transfer-Encoding, Content-Length must be ignored; we do
            # not decode transfer codings, so the request has no length we can use.
            self.keep_alive = False
            raise _HttpError(
                411,
                "Transfer-Encoding is not supported: send the body with Content-Length",
                "LengthRequired",
            )
        values = [v.strip() for h in headers.get_all("Content-Length") for v in h.split(",")]
        for value in values:
            # 1*DIGIT (RFC 9110 8.6): no sign, no spaces, no other digits than ASCII.
            if not (value.isascii() and value.isdigit()):
                self.keep_alive = False
                raise _HttpError(400, f"Content-Length {value[:20]!r} is not a number of bytes")
        if len({int(v) for v in values}) > 1:
            self.keep_alive = False
            raise _HttpError(400, f"conflicting Content-Length values: {', '.join(values)[:80]}")
        length = int(values[0]) if values else 0
        if length > _MAX_REQUEST_BYTES:
            self.keep_alive = False
            raise _HttpError(413, f"request body of {length} bytes is too large")
        return length

    # -- timers -------------------------------------------------------------------------------

    def _wait(self, seconds: float, then: Callable[[], None]) -> None:
        self._cancel()
        self._timer = self.loop.call_later(seconds, then)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_expired(self) -> None:
        self._timer = None
        if self.state == "idle":  # idle: close without an answer, as IoT Hub does
            self._close()

    def _request_expired(self) -> None:
        self._timer = None
        if self.state not in ("head", "body"):
            return
        self.keep_alive = False
        seconds = f"{self.endpoint.request_timeout:g}"
        self._error(
            _HttpError(
                408,
                f"the whole request (request line, headers, body) did not arrive "
                f"within {seconds} s of its first byte",
                "RequestTimeout",
            )
        )

    # -- answering ----------------------------------------------------------------------------

    def _dispatch(self, body: bytes) -> None:
        head = self.head
        assert head is not None
        request = _Request(self.endpoint, self.conn, head, body)
        if request.is_device_path:
            try:
                answer = request.route()
            except _HttpError as err:
                self._error(err)
                return
            self._send(*answer)
            return
        # Not a device path: IoT Hub's service API, on the same port as on IoT Hub. It
        # may block (a direct-method call waits for the device), so not on the loop.
        task = self.loop.create_task(self._service(request))
        task.add_done_callback(_report_failure)

    async def _service(self, request: _Request) -> None:
        url = request.url
        answer = await self.endpoint.io.in_worker(
            self.endpoint.service.handle,
            request.method,
            url.path,
            url.query,
            request.headers.as_dict(),
            request.body,
        )
        if self.state == "busy":
            self._send(*answer)

    def _error(self, err: _HttpError) -> None:
        tracking = uuid.uuid4().hex
        headers = {proto.H_ERROR_CODE: err.code, **err.headers}
        self._send(err.status, headers, proto.error_body(err.code, err.message, tracking))

    def _send(self, status: int, headers: Mapping[str, str], payload: bytes) -> None:
        if self.state == "closed":
            return
        head = self.head
        logger.debug(
            "%s %s %s -> %d",
            self.caller,
            head.method if head else "-",
            head.target if head else "-",
            status,
        )
        close = not self.keep_alive or self.eof
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        lines = [
            f"HTTP/1.1 {status} {phrase}",
            f"Server: {_SERVER}",
            f"Date: {email.utils.formatdate(usegmt=True)}",
        ]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if status != 204:
            lines.append(f"Content-Length: {len(payload)}")
        if close:
            lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if payload and status != 204:
            data += payload
        self.stream.write(data)
        self.head = None
        if close:
            self._close(linger=_LINGER)
            return
        self.state = "idle"
        self._wait(self.endpoint.idle_timeout, self._idle_expired)
        if self.buffer:  # the next request (pipelined) is already here
            self.loop.call_soon(self._advance)

    def _close(self, *, linger: float = 0.0) -> None:
        self.state = "closed"
        self._cancel()
        self.stream.close(linger=linger)


def _report_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("HTTPS service request failed", exc_info=task.exception())


def _head_error_code(status: int) -> str:
    return {414: "RequestUriTooLong", 431: "RequestHeaderFieldsTooLarge"}.get(
        status, _DEFAULT_CODES.get(status, "Error")
    )


class _Request:
    """One request of a device (or of the service API), with what answers it."""

    def __init__(
        self, endpoint: HttpsEndpoint, conn: _Connection, head: http1.RequestHead, body: bytes
    ) -> None:
        self.endpoint = endpoint
        self.conn = conn
        self.method = head.method
        self.headers = head.headers
        self.body = body
        self.url = urlsplit(head.target)
        self.parts = self.url.path.split("/")
        parts = self.parts
        self.is_device_path = (
            len(parts) >= 4 and parts[:2] == ["", "devices"] and parts[3] == "messages"
        )

    def route(self) -> tuple[int, dict[str, str], bytes]:
        url, parts = self.url, self.parts
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
        if self.method != allowed:
            raise _HttpError(405, f"{self.method} is not allowed on {url.path}; use {allowed}")
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
            self._telemetry(device_id, auth)
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

    def _telemetry(self, device_id: str, auth: str) -> None:
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        try:
            if content_type == proto.BATCH_CONTENT_TYPE:
                messages = proto.parse_batch(self.body)
                batch = True
            else:
                messages = [proto.message_from_headers(self.headers.as_dict(), self.body)]
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
