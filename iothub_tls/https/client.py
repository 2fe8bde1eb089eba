"""Azure IoT Hub over HTTPS (port 443) through the hardened TLS context.

Two things live here:

* :class:`HttpsDeviceClient` — IoT Hub's device REST API (telemetry, batches,
  cloud-to-device receive / complete / reject / abandon) on a urllib3 connection pool
  whose only TLS configuration is :func:`iothub_tls.create_ssl_context`. Connections
  are kept alive; a new connection resumes the previous TLS session. Needs the
  ``https`` extra (``pip install 'iothub-tls[https]'``).
* :class:`HardenedAdapter` — a ``requests`` transport adapter that uses a
  :class:`~iothub_tls.HardenedSSLContext`, for applications that already speak HTTPS
  with ``requests`` (``session.mount("https://", HardenedAdapter(policy))``).

Errors a request can raise (besides the TLS errors of :mod:`iothub_tls.errors`: the
refusals are never retried; ``HandshakeClosedError``, a peer that closed or reset the
connection mid-handshake without a TLS alert, is a transport fault and is retried)::

    ClientError
    ├── AuthenticationError              401 (after one SAS token renewal)
    ├── NotAuthorizedError               403
    ├── DeviceNotFoundError (LookupError)       404
    ├── BadRequestError                  400
    ├── InvalidMessageError (ValueError) found before sending
    ├── DeliveryError
    │   ├── MessageLockLostError         412: lock expired / message already settled
    │   └── MessageTooLargeError (ValueError)  413, or found before sending
    ├── ThrottledError                   429 after the retries (``retry_after``)
    ├── HubServerError                   5xx after the retries
    ├── UnexpectedResponseError          any other status
    ├── ConnectionFailedError            could not connect, or the connection broke — also
    │                                    a TLS error after the handshake (after the retries)
    └── OperationTimeoutError            no response in time

Errors built from a response carry ``status``, ``error_code`` and ``tracking_id``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from .._io.backoff import RetryPolicy
from .._io.base import ClientBase, check_host, check_port, unsupported
from ..auth import ClientIdentity, ConnectionString, SasTokenProvider
from ..device import C2DMessage, ConnectionState, Message, MethodHandler, Settlement
from ..errors import (
    AuthenticationError,
    BadRequestError,
    ClientError,
    ConnectionFailedError,
    DeviceNotFoundError,
    HandshakeClosedError,
    HubServerError,
    InvalidMessageError,
    IoTHubTLSError,
    MessageLockLostError,
    MessageTooLargeError,
    MissingDependencyError,
    OperationTimeoutError,
    PolicyError,
    ThrottledError,
    UnexpectedResponseError,
)
from ..policy import TlsPolicy
from ..tls.context import HardenedSSLContext, create_ssl_context
from ..tls.info import TlsInfo, tls_info
from . import conventions as proto
from .conventions import API_VERSION

if TYPE_CHECKING:
    import urllib3
    from requests import PreparedRequest, Response
    from requests.adapters import HTTPAdapter

__all__ = [
    "API_VERSION",
    "BadRequestError",
    "C2DMessage",
    "DeviceNotFoundError",
    "HardenedAdapter",
    "HttpsDeviceClient",
    "HttpsOptions",
    "HubServerError",
    "InvalidMessageError",
    "Message",
    "MessageLockLostError",
    "MessageTooLargeError",
    "RetryPolicy",
    "ThrottledError",
    "UnexpectedResponseError",
]

logger = logging.getLogger("iothub_tls.https")

# TLS alerts by which a server refuses the *device* certificate. In TLS 1.3 they arrive
# after the client's handshake has finished, with the first response.
_CLIENT_CERT_REFUSED = {
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "TLSV1_ALERT_ACCESS_DENIED",
}


def _urllib3() -> Any:
    try:
        import urllib3
    except ImportError:
        raise MissingDependencyError("https", "urllib3") from None
    return urllib3


#: HttpsDeviceClient's retries by default: four tries per operation, the waits between
#: them up to 0.5 s, doubling, never over 30 s.
_DEFAULT_RETRY = RetryPolicy(initial_delay=0.5, max_delay=30.0, max_attempts=4)


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, its causes/contexts and urllib3's wrapped reasons."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        nxt = current.__cause__ or current.__context__
        if nxt is None:
            nxt = (
                getattr(current, "reason", None)
                if isinstance(getattr(current, "reason", None), BaseException)
                else None
            )
        if nxt is None and current.args and isinstance(current.args[0], BaseException):
            nxt = current.args[0]
        current = nxt
    return seen


def _hub_connection_class(u: Any, on_connect: Callable[[], None]) -> Any:
    """urllib3's HTTPSConnection, with an idle-connection check that understands TLS:
    a kept-alive socket that is readable is not necessarily closed — TLS 1.3 session
    tickets arrive after the handshake. Process those records and keep the connection
    (and the ticket, for resumption) instead of discarding it."""
    from urllib3.util.wait import wait_for_read

    class HubConnection(u.connection.HTTPSConnection):  # type: ignore[misc]
        #: requests sent on the current socket (0 on a fresh connection)
        requests_sent = 0

        def connect(self) -> None:
            self.requests_sent = 0
            on_connect()
            super().connect()

        @property
        def is_connected(self) -> bool:
            sock = self.sock
            if sock is None:
                return False
            if not wait_for_read(sock, timeout=0.0):
                return True
            if not isinstance(sock, ssl.SSLSocket):
                return False
            previous = sock.gettimeout()
            try:
                sock.settimeout(0.0)
                data = sock.read(1)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return True  # only TLS records (tickets) were waiting
            except (OSError, ValueError):
                return False
            finally:
                with contextlib.suppress(OSError, ValueError):
                    sock.settimeout(previous)
            # EOF (b"") or bytes nobody asked for: the connection is not reusable.
            del data
            return False

        def request(self, *args: Any, **kwargs: Any) -> None:
            self.requests_sent += 1
            try:
                super().request(*args, **kwargs)
            except (ssl.SSLError, OSError) as exc:
                # In TLS 1.3 a server refuses the device certificate after the client's
                # handshake has finished: its alert is waiting unread when our write
                # hits the closed connection. Surface the alert, not the broken pipe.
                alert = self._pending_alert()
                if alert is None:
                    raise
                raise alert from exc

        def _pending_alert(self) -> ssl.SSLError | None:
            sock = self.sock
            if not isinstance(sock, ssl.SSLSocket):
                return None
            try:
                sock.settimeout(0.0)
                sock.read(1)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return None
            except ssl.SSLError as exc:
                return exc if getattr(exc, "reason", None) in _CLIENT_CERT_REFUSED else None
            except (OSError, ValueError):
                return None
            return None

    return HubConnection


@dataclass(frozen=True)
class HttpsOptions:
    """Tuning of :class:`HttpsDeviceClient`; every field has a default suited to IoT
    Hub. Make variants with :func:`dataclasses.replace`.

    :param operation_timeout: seconds to wait for each response, and the default wait of
        :meth:`HttpsDeviceClient.receive_c2d`.
    :param connect_timeout: seconds to open a connection (TCP and TLS).
    :param retry: how each operation retries throttling (429), hub failures (5xx) and
        transport faults: a :class:`~iothub_tls.RetryPolicy` with a finite
        ``max_attempts`` (tries per operation, the first included); by default four
        tries, the waits between them drawn up to 0.5 s, doubling, never over 30 s. A
        ``Retry-After`` longer than its ``max_delay`` is not waited out:
        :class:`ThrottledError` is raised at once with ``retry_after`` set. TLS and
        policy refusals are never retried.
    :param sas_ttl: lifetime of each SAS token in seconds.
    :param c2d_poll_interval: seconds between two receives while waiting for a
        cloud-to-device message (``receive_c2d`` with a timeout, ``on_c2d``). IoT Hub
        throttles HTTPS receives per hub: a fleet should poll rarely (the service
        documentation suggests every 25 minutes) or use MQTT or AMQP.
    :param api_version: the REST API version sent with every request.
    :param product_info: appended to the ``User-Agent``.
    """

    operation_timeout: float = 30.0
    connect_timeout: float = 30.0
    retry: RetryPolicy = _DEFAULT_RETRY
    sas_ttl: float = 3600.0
    c2d_poll_interval: float = 5.0
    api_version: str = API_VERSION
    product_info: str | None = None

    def __post_init__(self) -> None:
        for name in ("operation_timeout", "connect_timeout", "sas_ttl", "c2d_poll_interval"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise PolicyError(f"{name} must be a positive number of seconds, not {value!r}")
        if not isinstance(self.retry, RetryPolicy):
            raise PolicyError(f"retry must be a RetryPolicy, not {type(self.retry).__name__}")
        if self.retry.max_attempts is None:
            raise PolicyError(
                "an HTTPS operation needs a finite RetryPolicy.max_attempts (tries per "
                "operation, the first included), not None"
            )
        if not isinstance(self.api_version, str) or not self.api_version:
            raise PolicyError(f"api_version must be a non-empty str, not {self.api_version!r}")


class HttpsDeviceClient(ClientBase):
    """A device's HTTPS connection to IoT Hub.

    Build it with :meth:`from_connection_string`, :meth:`from_symmetric_key` or
    :meth:`from_x509`. Every request carries a SAS token (renewed before it expires,
    and once more when the hub refuses it) or, for X.509 devices, no ``Authorization``
    header: the device certificate of ``identity`` is presented in TLS.

    IoT Hub's HTTPS API has no device twin, no direct methods and no module routes:
    those calls raise :class:`~iothub_tls.UnsupportedOperationError` (use MQTT or AMQP).

    :param policy: the :class:`~iothub_tls.TlsPolicy` (default: IoT Hub's guidance).
    :param identity: the device certificate and key (X.509 authentication).
    :param host: connect to this host instead of the one in the connection string
        (a local endpoint, a tunnel). TLS still sends the hub's name as SNI and checks
        the certificate against it.
    :param port: connect to this port instead of 443.
    :param options: :class:`HttpsOptions` (timeouts, retries, polling).
    :param sas_token_provider: tokens from this provider instead of the key's.
    :param clock: time source for SAS tokens (seconds since the epoch).
    :param sleep: how to wait between retries and polls.
    """

    transport = "https"

    def __init__(
        self,
        connection_string: ConnectionString,
        *,
        policy: TlsPolicy | None = None,
        identity: ClientIdentity | None = None,
        host: str | None = None,
        port: int | None = None,
        options: HttpsOptions | None = None,
        sas_token_provider: SasTokenProvider | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        options = HttpsOptions() if options is None else options
        if not isinstance(options, HttpsOptions):
            raise TypeError(f"options must be HttpsOptions, not {type(options).__name__}")
        cs = ConnectionString.coerce(connection_string)
        if cs.module_id is not None:
            raise unsupported(
                "HTTPS",
                "module identities",
                "its device API has no module routes; use MQTT or AMQP for a module",
            )
        cs.check_identity(identity)
        connect_host = check_host(host)
        port = check_port(port, 443)
        super().__init__("https", options.operation_timeout)
        self._urllib3 = _urllib3()
        self._options = options
        self._retry = options.retry
        self.connection_string = cs
        self.hostname = cs.hostname
        self._connect_host = connect_host or cs.hostname
        self._connect_port = port
        self._draws = random.Random()  # noqa: S311 - jitter, not a secret
        self._sleep = sleep
        self.ssl_context: HardenedSSLContext = create_ssl_context(policy, identity=identity)
        self._identity = identity
        self._tokens: SasTokenProvider | None = sas_token_provider
        if self._tokens is None and not cs.x509:
            self._tokens = SasTokenProvider.from_connection_string(
                cs, ttl=options.sas_ttl, clock=clock
            )
        from .. import __version__

        agent = f"iothub-tls/{__version__}"
        if options.product_info:
            agent += f" {options.product_info}"
        self._headers = {"Host": cs.hostname, "User-Agent": agent, "Accept": "application/json"}
        self._lock = threading.Lock()
        self._pool: Any = None
        self._tls_info: TlsInfo | None = None
        self._poller: threading.Thread | None = None
        self._polling = threading.Event()

    # -- what it is ---------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        return self.connection_string.device_id

    @property
    def module_id(self) -> str | None:
        return None  # HTTPS has no module routes (refused in the constructor)

    @property
    def options(self) -> HttpsOptions:
        return self._options

    @property
    def connected(self) -> bool:
        """True between a successful :meth:`connect` and :meth:`close`, while requests
        reach the hub."""
        return self.state is ConnectionState.CONNECTED

    @property
    def tls_info(self) -> TlsInfo | None:
        """What the most recent connection negotiated (None before the first one)."""
        return self._tls_info

    def __repr__(self) -> str:
        auth = "x509" if self._tokens is None else "sas"
        return (
            f"<HttpsDeviceClient {self.device_id} -> {self.hostname} "
            f"via {self._connect_host}:{self._connect_port} ({auth}, {self.state.value})>"
        )

    # -- connection ---------------------------------------------------------------------

    def _get_pool(self) -> urllib3.HTTPSConnectionPool:
        with self._lock:
            if self._pool is None:
                if self.state is ConnectionState.CLOSED:
                    raise ClientError("the client is not connected: call connect() first")
                u = self._urllib3
                self._pool = u.HTTPSConnectionPool(
                    self._connect_host,
                    self._connect_port,
                    ssl_context=self.ssl_context,
                    # SNI and the certificate check use the hub's name even when
                    # connecting elsewhere; hostname verification stays in the context.
                    server_hostname=self.hostname,
                    maxsize=1,
                    block=False,
                    retries=False,
                    timeout=u.Timeout(
                        connect=self._options.connect_timeout,
                        read=self._options.operation_timeout,
                    ),
                )
                self._pool.ConnectionCls = _hub_connection_class(u, self._new_connection)
            return cast("urllib3.HTTPSConnectionPool", self._pool)

    def connect(self) -> None:
        """Open the TLS connection now, so a TLS refusal shows up here (raised as the
        core raised it, never retried). A connection reset or closed mid-handshake
        without a TLS alert is a transport fault, retried like every operation
        (``HttpsOptions.retry``)."""
        if self.state is ConnectionState.CONNECTED:
            return
        self._set_state(ConnectionState.CONNECTING)
        attempt = 1
        try:
            while True:
                try:
                    self._open()
                    break
                except (ConnectionFailedError, HandshakeClosedError) as exc:
                    if attempt >= self._max_attempts:
                        raise
                    delay = self._backoff(attempt)
                    logger.info("connect: %s; retrying in %.2f s", exc, delay)
                    self._sleep(delay)
                    attempt += 1
        except BaseException as exc:
            self._close_pool()
            self._set_state(ConnectionState.CLOSED, exc)
            raise
        self._set_state(ConnectionState.CONNECTED)
        self._c2d_callback_changed()

    def _open(self) -> None:
        pool = self._get_pool()
        conn = pool._get_conn()
        try:
            conn.connect()
            self._remember_tls(conn)
        except Exception as exc:
            conn.close()
            raise self._translate(exc, "connect") from exc
        finally:
            pool._put_conn(conn)

    def close(self) -> None:
        """Close the pooled connection and stop polling for cloud-to-device messages. The
        client can connect again (resuming the TLS session)."""
        self._polling.clear()
        poller, self._poller = self._poller, None
        self._close_pool()
        if poller is not None and poller is not threading.current_thread():
            poller.join(self._options.operation_timeout + 1)
        if self.state is not ConnectionState.CLOSED:
            self._set_state(ConnectionState.CLOSED)
        self._stop_callbacks()

    def _close_pool(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _new_connection(self) -> None:
        """A connection is being opened: after the first, the previous one was lost."""
        if self.state is ConnectionState.CONNECTED and self._tls_info is not None:
            self._lost(
                ConnectionFailedError(
                    f"the connection to {self._connect_host}:{self._connect_port} was closed; "
                    "opening a new one"
                )
            )

    def _lost(self, reason: BaseException) -> None:
        if self.state is ConnectionState.CONNECTED:
            self._set_state(ConnectionState.DISCONNECTED, reason)
        if self.state is not ConnectionState.CLOSED:
            self._set_state(ConnectionState.CONNECTING)

    def _remember_tls(self, conn: Any) -> None:
        try:
            self._tls_info = tls_info(conn)
        except (TypeError, ValueError):
            pass

    # -- telemetry ----------------------------------------------------------------------

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
    ) -> None:
        """Send one device-to-cloud message (``POST /devices/{id}/messages/events``);
        returns once the hub accepted it. ``payload`` is bytes, text or a
        :class:`~iothub_tls.Message`. ``timeout`` is the wait for each response
        (default ``HttpsOptions.operation_timeout``)."""
        message = Message.coerce(
            payload,
            properties,
            message_id=message_id,
            correlation_id=correlation_id,
            content_type=content_type,
            content_encoding=content_encoding,
        )
        request = proto.events_request(self.device_id, message, self._options.api_version)
        self._call(request, "send telemetry", (204, 200), timeout)

    def send_batch(self, messages: Iterable[Message], timeout: float | None = None) -> None:
        """Send several messages in one request (at most 256 KB in all)."""
        request = proto.batch_request(self.device_id, messages, self._options.api_version)
        self._call(request, "send batch", (204, 200), timeout)

    # -- cloud-to-device ----------------------------------------------------------------

    def _receive_once(self) -> C2DMessage | None:
        request = proto.receive_request(self.device_id, self._options.api_version)
        status, headers, body = self._call(request, "receive cloud-to-device", (200, 204))
        return proto.parse_c2d(status, headers, body, settler=self._settle)

    def receive_c2d(self, timeout: float | None = None) -> C2DMessage:
        """The next cloud-to-device message, locked for this device: settle it with
        ``complete()``, ``reject()`` or ``abandon()`` within one minute.

        The hub is asked at once, then every ``HttpsOptions.c2d_poll_interval`` seconds
        until a message arrives or ``timeout`` (default
        ``HttpsOptions.operation_timeout``) passes; ``timeout=0`` asks once.

        :raises OperationTimeoutError: no message arrived in time.
        """
        wait = self._options.operation_timeout if timeout is None else timeout
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            message = self._receive_once()
            if message is not None:
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OperationTimeoutError(f"no cloud-to-device message arrived within {wait:g} s")
            self._sleep(min(self._options.c2d_poll_interval, remaining))

    def _settle(self, message: C2DMessage, how: Settlement) -> None:
        token = message.lock_token
        if token is None:  # pragma: no cover - parse_c2d always sets it
            raise ClientError("this message has no lock token")
        version = self._options.api_version
        if how is Settlement.COMPLETE:
            request = proto.complete_request(self.device_id, token, version)
        elif how is Settlement.REJECT:
            request = proto.reject_request(self.device_id, token, version)
        else:
            request = proto.abandon_request(self.device_id, token, version)
        self._call(request, f"{how.value} cloud-to-device message", (204, 200))

    def _c2d_callback_changed(self) -> None:
        """Poll for messages while ``on_c2d`` is set and the client is connected."""
        if self.on_c2d is None or self.state is ConnectionState.CLOSED:
            self._polling.clear()
            return
        with self._lock:
            if self._poller is not None and self._poller.is_alive():
                self._polling.set()
                return
            self._polling.set()
            self._poller = threading.Thread(
                target=self._poll, name="iothub-tls-https-c2d", daemon=True
            )
            self._poller.start()

    def _poll(self) -> None:
        interval = self._options.c2d_poll_interval
        while self._polling.is_set():
            try:
                message = self._receive_once()
            except ClientError as exc:
                if not self._polling.is_set():
                    return
                self._report(exc)
                message = None
            except Exception as exc:  # a bug must not end polling silently
                self._report(exc)
                message = None
            if message is not None:
                self._incoming_c2d(message)
                continue  # more may be waiting
            self._polling.wait(0)  # re-check the flag before sleeping
            deadline = time.monotonic() + interval
            while self._polling.is_set() and time.monotonic() < deadline:
                time.sleep(min(0.05, interval))

    # -- what HTTPS does not have -------------------------------------------------------

    def get_twin(self, timeout: float | None = None) -> dict[str, Any]:
        """IoT Hub has no device twin over HTTPS: raises ``UnsupportedOperationError``."""
        raise unsupported("HTTPS", "device twin", "use MQTT or AMQP for the twin")

    def patch_reported(self, patch: Mapping[str, Any], timeout: float | None = None) -> int | None:
        """IoT Hub has no device twin over HTTPS: raises ``UnsupportedOperationError``."""
        raise unsupported("HTTPS", "device twin", "use MQTT or AMQP for the twin")

    def _desired_callback_changed(self) -> None:
        if self.on_desired_update is not None:
            self._on_desired_update = None
            raise unsupported("HTTPS", "desired-property updates", "use MQTT or AMQP for the twin")

    def _methods_changed(self) -> None:
        self._methods.register(None, None)
        raise unsupported("HTTPS", "direct methods", "use MQTT or AMQP for direct methods")

    def on_method(self, name: str | None, handler: MethodHandler | None) -> None:
        """IoT Hub has no direct methods over HTTPS: raises ``UnsupportedOperationError``."""
        raise unsupported("HTTPS", "direct methods", "use MQTT or AMQP for direct methods")

    # -- the request loop ---------------------------------------------------------------

    def _call(
        self,
        request: proto.HttpRequest,
        operation: str,
        expected: tuple[int, ...],
        timeout: float | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        renewed = False
        replaced_stale = False
        attempt = 1
        while True:
            headers = {**self._headers, **request.headers}
            if self._tokens is not None:
                headers["Authorization"] = self._tokens.token()
            reusing = self._reusing_connection()
            try:
                status, response_headers, body = self._exchange(request, headers, timeout)
            except (ConnectionFailedError, HandshakeClosedError) as exc:
                self._lost(exc)
                # HandshakeClosedError: the peer closed or reset the connection (or let
                # it stall) during the handshake without a TLS alert, i.e. before any
                # policy decision — a transport fault. Refusals (version, suites,
                # certificates, policy violations) are other classes and not caught.
                if reusing and not replaced_stale and isinstance(exc, ConnectionFailedError):
                    # A kept-alive connection that sat idle in the pool can be dead
                    # without our knowing (a NAT or load balancer forgot it): that says
                    # nothing about the hub. Send once more, at once, on a new connection.
                    replaced_stale = True
                    logger.debug("%s: the pooled connection was dead (%s)", operation, exc)
                    continue
                if attempt >= self._max_attempts:
                    raise
                delay = self._backoff(attempt)
                logger.info("%s: %s; retrying in %.2f s", operation, exc, delay)
                self._sleep(delay)
                attempt += 1
                continue
            self._set_state(ConnectionState.CONNECTED)
            if status in expected:
                return status, response_headers, body
            if status == 401 and self._tokens is not None and not renewed:
                # The hub refused the token (expired by its clock, key rolled): try once
                # with a fresh one before reporting the failure.
                self._tokens.renew()
                renewed = True
                continue
            retry_after = proto.parse_retry_after(_header(response_headers, "Retry-After"))
            info = proto.parse_error(response_headers, body)
            if (status == 429 or status >= 500) and attempt < self._max_attempts:
                delay = retry_after if retry_after is not None else self._backoff(attempt)
                if delay <= self._retry.max_delay:
                    logger.info(
                        "%s: HTTP %d (%s); retrying in %.2f s", operation, status, info.code, delay
                    )
                    self._sleep(delay)
                    attempt += 1
                    continue
            raise proto.error_for_status(status, info, operation=operation, retry_after=retry_after)

    @property
    def _max_attempts(self) -> int:
        return self._retry.max_attempts or 1  # never None: checked in HttpsOptions

    def _backoff(self, retry: int) -> float:
        """The wait before retry number ``retry`` of an operation (each operation starts
        the schedule afresh)."""
        return self._retry.delay(retry, self._draws.random())

    def _reusing_connection(self) -> bool:
        """True when the next request will go out on a pooled connection that already
        served a request (and may have died while idle)."""
        waiting = getattr(self._pool, "pool", None)
        if waiting is None:
            return False
        return any(
            conn is not None and conn.sock is not None and conn.requests_sent > 0
            for conn in list(waiting.queue)
        )

    def _exchange(
        self, request: proto.HttpRequest, headers: dict[str, str], timeout: float | None
    ) -> tuple[int, dict[str, str], bytes]:
        pool = self._get_pool()
        u = self._urllib3
        extra: dict[str, Any] = {}
        if timeout is not None:
            extra["timeout"] = u.Timeout(connect=self._options.connect_timeout, read=timeout)
        try:
            response = pool.urlopen(
                request.method,
                request.path,
                body=request.body if request.method in ("POST", "PUT") else None,
                headers=headers,
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
                **extra,
            )
        except (u.exceptions.HTTPError, OSError, ValueError) as exc:
            raise self._translate(exc, request.method + " " + request.path.split("?")[0]) from exc
        try:
            if response.connection is not None:
                self._remember_tls(response.connection)
            body = response.read()
        except (u.exceptions.HTTPError, OSError) as exc:
            raise self._translate(exc, "reading the response") from exc
        finally:
            response.release_conn()
        return int(response.status), dict(response.headers.items()), bytes(body)

    def _translate(self, exc: BaseException, doing: str) -> BaseException:
        """urllib3's wrapping undone: TLS and policy errors come out as themselves, and
        no bare :mod:`ssl` exception escapes.

        Refusals (the handshake's policy errors, the hub refusing the device
        certificate) are returned as they are; the request loop never retries them. A
        TLS error on an established connection — EOF without close_notify, a reset
        under the TLS layer, a record that fails its MAC check — is the network's fault:
        it becomes :class:`ConnectionFailedError`, which the request loop retries."""
        u = self._urllib3
        chain = _chain(exc)
        target = f"{self._connect_host}:{self._connect_port}"
        for item in chain:
            reason = getattr(item, "reason", None)
            if reason in _CLIENT_CERT_REFUSED and (
                self._identity is not None or not isinstance(item, IoTHubTLSError)
            ):
                if self._identity is not None:
                    text = (
                        f"the hub refused the device certificate during the TLS handshake "
                        f"({reason}): register its thumbprint, or its CA, for device "
                        f"{self.device_id!r} and check that it has not expired"
                    )
                else:  # in TLS 1.3 the alert comes after the client's handshake
                    text = (
                        f"the hub refused the connection with TLS alert {reason}: it asks "
                        "for a device certificate and this client has none; pass the "
                        "registered certificate as identity=ClientIdentity.from_files(...)"
                    )
                failure = AuthenticationError(text)
                vars(failure)["reason"] = reason
                return failure
        for item in chain:
            if isinstance(item, IoTHubTLSError):
                return item
        for item in chain:
            if isinstance(item, ssl.SSLError):
                # Handshake failures were translated by the hardened socket (above):
                # this one broke an established connection.
                detail = getattr(item, "reason", None) or type(item).__name__
                return ConnectionFailedError(
                    f"{doing}: the TLS connection to {target} broke ({detail}: {item})"
                )
        if any(isinstance(i, u.exceptions.ReadTimeoutError) for i in chain):
            return OperationTimeoutError(
                f"{doing}: no response from {target} within {self._options.operation_timeout:g} s"
            )
        if any(isinstance(i, u.exceptions.ConnectTimeoutError) for i in chain) and not any(
            isinstance(i, u.exceptions.NewConnectionError) for i in chain
        ):
            return ConnectionFailedError(
                f"could not connect to {target} within {self._options.operation_timeout:g} s"
            )
        if isinstance(exc, ClientError):
            return exc
        return ConnectionFailedError(f"{doing}: connection to {target} failed: {exc}")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


# -- requests -----------------------------------------------------------------------------

if TYPE_CHECKING:

    class HardenedAdapter(HTTPAdapter):
        """A ``requests`` transport adapter whose TLS is a :class:`HardenedSSLContext`:
        ``session.mount("https://", HardenedAdapter(policy, identity=identity))``.

        Certificate verification stays required and requests' CA bundle stays away, so
        the trust anchors are exactly the policy's roots; ``verify=False``, a ``verify``
        path and ``cert=`` raise :class:`PolicyError`. The class is built on first use
        (by ``_hardened_adapter_class``), so importing this module does not import
        ``requests``.
        """

        ssl_context: HardenedSSLContext

        def __init__(
            self,
            policy: TlsPolicy | None = None,
            *,
            identity: ClientIdentity | None = None,
            context: HardenedSSLContext | None = None,
            **adapter_options: Any,
        ) -> None: ...


def _environment_bundles() -> set[str]:
    """CA bundles requests takes from the environment (``trust_env``) as ``verify``."""
    import os

    return {
        value
        for value in (os.environ.get(n) for n in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"))
        if value
    }


def _refuse_weakening(verify: Any, cert: Any) -> None:
    """Refuse what would change the context's trust; an environment CA bundle is left
    out instead (not trusting it is stricter, never weaker)."""
    if isinstance(verify, str) and verify in _environment_bundles():
        logger.debug("HardenedAdapter: CA bundle %s from the environment not used", verify)
        verify = True
    if verify is False:
        raise PolicyError(
            "verify=False is not allowed through HardenedAdapter: the hub's certificate "
            "is always verified against the policy's pinned roots"
        )
    if isinstance(verify, str):
        raise PolicyError(
            f"verify={verify!r} would trust a CA bundle next to the pinned roots; put "
            "extra roots in TlsPolicy(roots=RootSet.from_pem_file(path)) instead"
        )
    if cert:
        raise PolicyError(
            "cert= is not used with HardenedAdapter: give the device certificate to the "
            "adapter as identity=ClientIdentity.from_files(certfile, keyfile)"
        )


def _hardened_adapter_class() -> type[HardenedAdapter]:
    try:
        from requests.adapters import HTTPAdapter
    except ImportError:
        raise MissingDependencyError("requests", "requests") from None  # an extra to add

    class _Adapter(HTTPAdapter):
        """A ``requests`` adapter whose TLS is a :class:`HardenedSSLContext`.

        ``session.mount("https://", HardenedAdapter(policy, identity=identity))``.

        requests normally points urllib3 at certifi's bundle (``verify=True``), which
        makes urllib3 call ``load_verify_locations`` on the context — a hardened context
        refuses that (it would defeat pinning). This adapter keeps the bundle away and
        certificate verification required, so the trust anchors stay exactly the
        policy's roots. ``verify=False``, a ``verify`` path and ``cert=`` raise
        :class:`PolicyError`.
        """

        def __init__(
            self,
            policy: TlsPolicy | None = None,
            *,
            identity: ClientIdentity | None = None,
            context: HardenedSSLContext | None = None,
            **adapter_options: Any,
        ) -> None:
            if context is None:
                context = create_ssl_context(policy, identity=identity)
            elif policy is not None or identity is not None:
                raise PolicyError("give either context= or policy=/identity=, not both")
            if not isinstance(context, HardenedSSLContext):
                raise PolicyError(
                    "context must come from iothub_tls.create_ssl_context(), got "
                    f"{type(context).__name__}"
                )
            self.ssl_context = context
            super().__init__(**adapter_options)

        def init_poolmanager(
            self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
        ) -> None:
            pool_kwargs["ssl_context"] = self.ssl_context
            super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)

        def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
            proxy_kwargs.setdefault("ssl_context", self.ssl_context)
            return super().proxy_manager_for(proxy, **proxy_kwargs)

        def send(
            self,
            request: PreparedRequest,
            stream: bool = False,
            timeout: Any = None,
            verify: Any = True,
            cert: Any = None,
            proxies: Any = None,
        ) -> Response:
            # Here, not deeper: requests turns a ValueError raised while it picks the
            # pool into InvalidURL, which would hide the reason.
            _refuse_weakening(verify, cert)
            return super().send(
                request, stream=stream, timeout=timeout, verify=True, cert=None, proxies=proxies
            )

        def build_connection_pool_key_attributes(
            self, request: PreparedRequest, verify: Any, cert: Any = None
        ) -> tuple[dict[str, Any], dict[str, Any]]:
            host_params, pool_kwargs = super().build_connection_pool_key_attributes(
                request, verify, cert
            )
            pool_kwargs.pop("ca_certs", None)
            pool_kwargs.pop("ca_cert_dir", None)
            pool_kwargs["ssl_context"] = self.ssl_context
            pool_kwargs["cert_reqs"] = "CERT_REQUIRED"
            return host_params, pool_kwargs

        def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
            # Not super(): that would set conn.ca_certs to certifi's bundle.
            conn.cert_reqs = "CERT_REQUIRED"
            conn.ca_certs = None
            conn.ca_cert_dir = None

    _Adapter.__module__ = __name__
    _Adapter.__name__ = _Adapter.__qualname__ = "HardenedAdapter"
    # The class made here is the one the TYPE_CHECKING declaration above describes.
    return cast("type[HardenedAdapter]", cast(Any, _Adapter))


def __getattr__(name: str) -> Any:
    if name == "HardenedAdapter":
        cls = _hardened_adapter_class()
        globals()["HardenedAdapter"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
