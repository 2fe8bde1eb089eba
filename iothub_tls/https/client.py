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
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

from .._io.backoff import RetryPolicy
from .._io.lifecycle import Connectable
from ..auth import ClientIdentity, ConnectionString, SasTokenProvider
from ..context import HardenedSSLContext, create_ssl_context
from ..errors import (
    AuthenticationError,
    ClientError,
    ConnectionFailedError,
    ConnectionStringError,
    HandshakeClosedError,
    IoTHubTLSError,
    MissingDependencyError,
    OperationTimeoutError,
    PolicyError,
)
from ..info import TlsInfo, tls_info
from ..policy import TlsPolicy
from . import conventions as proto
from .conventions import (
    API_VERSION,
    BadRequestError,
    C2DMessage,
    DeviceNotFoundError,
    HubServerError,
    InvalidMessageError,
    Message,
    MessageLockLostError,
    MessageTooLargeError,
    ThrottledError,
    UnexpectedResponseError,
)

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


def _hub_connection_class(u: Any) -> Any:
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


class HttpsDeviceClient(Connectable):
    """A device's HTTPS connection to IoT Hub.

    Build it with :meth:`from_connection_string`. Every request carries a SAS token
    (renewed before it expires, and once more when the hub refuses it) or, for
    ``x509=true`` devices, no ``Authorization`` header: the device certificate of
    ``identity`` is presented in TLS.

    :param host: connect to this host instead of the one in the connection string
        (a local endpoint, a tunnel). TLS still sends the hub's name as SNI and checks
        the certificate against it.
    :param port: connect to this port instead of 443.
    :param timeout: seconds to connect and to wait for each response.
    :param retry: how each operation retries throttling (429), hub failures (5xx) and
        transport faults: a :class:`~iothub_tls.RetryPolicy` with a finite
        ``max_attempts`` (tries per operation, the first included); by default four
        tries, the waits between them drawn up to 0.5 s, doubling, never over 30 s. A
        ``Retry-After`` longer than its ``max_delay`` is not waited out:
        :class:`ThrottledError` is raised at once with ``retry_after`` set. TLS and
        policy refusals are never retried.
    :param sas_ttl: lifetime of each SAS token in seconds.
    :param clock: time source for SAS tokens (seconds since the epoch).
    :param sleep: how to wait between retries and polls.
    """

    def __init__(
        self,
        connection_string: ConnectionString,
        *,
        policy: TlsPolicy | None = None,
        identity: ClientIdentity | None = None,
        host: str | None = None,
        port: int | None = None,
        api_version: str = API_VERSION,
        timeout: float = 30.0,
        retry: RetryPolicy = _DEFAULT_RETRY,
        sas_ttl: float = 3600.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not isinstance(connection_string, ConnectionString):
            raise ConnectionStringError(
                "pass a ConnectionString (or use HttpsDeviceClient.from_connection_string)"
            )
        cs = connection_string
        if cs.module_id is not None:
            raise ConnectionStringError(
                "module identities cannot use IoT Hub's HTTPS device API (it has no module "
                "routes): use MQTT or AMQP for a module, or a device connection string"
            )
        cs.check_identity(identity)
        if port is not None and (isinstance(port, bool) or not 0 < int(port) < 65536):
            raise PolicyError(f"port must be 1..65535, not {port!r}")
        self._urllib3 = _urllib3()
        self.connection_string = cs
        self.device_id = cs.device_id
        self.hostname = cs.hostname
        self._connect_host = host or cs.hostname
        self._connect_port = int(port) if port is not None else 443
        self.api_version = api_version
        self.timeout = float(timeout)
        if not isinstance(retry, RetryPolicy):
            raise PolicyError(f"retry must be a RetryPolicy, not {type(retry).__name__}")
        if retry.max_attempts is None:
            raise PolicyError(
                "an HTTPS operation needs a finite RetryPolicy.max_attempts (tries per "
                "operation, the first included), not None"
            )
        self.retry = retry
        self._draws = random.Random()  # noqa: S311 - jitter, not a secret
        self._sleep = sleep
        self.ssl_context: HardenedSSLContext = create_ssl_context(policy, identity=identity)
        self._identity = identity
        self._tokens: SasTokenProvider | None = (
            SasTokenProvider.from_connection_string(cs, ttl=sas_ttl, clock=clock)
            if cs.shared_access_key is not None
            else None
        )
        from .. import __version__

        self._headers = {
            "Host": cs.hostname,
            "User-Agent": f"iothub-tls/{__version__}",
            "Accept": "application/json",
        }
        self._lock = threading.Lock()
        self._pool: Any = None
        self._tls_info: TlsInfo | None = None

    @classmethod
    def from_connection_string(
        cls,
        connection_string: str | ConnectionString,
        *,
        policy: TlsPolicy | None = None,
        identity: ClientIdentity | None = None,
        host: str | None = None,
        port: int | None = None,
        **options: Any,
    ) -> HttpsDeviceClient:
        """A client for the device of ``connection_string`` (``HostName=...;DeviceId=...;
        SharedAccessKey=...`` or ``...;x509=true`` with ``identity``). Other keywords:
        see the class."""
        cs = ConnectionString.coerce(connection_string)
        return cls(cs, policy=policy, identity=identity, host=host, port=port, **options)

    # -- connection ---------------------------------------------------------------------

    def _get_pool(self) -> urllib3.HTTPSConnectionPool:
        with self._lock:
            if self._pool is None:
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
                    timeout=u.Timeout(connect=self.timeout, read=self.timeout),
                )
                self._pool.ConnectionCls = _hub_connection_class(u)
            return cast("urllib3.HTTPSConnectionPool", self._pool)

    def connect(self) -> HttpsDeviceClient:
        """Open the TLS connection now (otherwise the first request does), so a TLS
        refusal shows up here. Returns self."""
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
        return self

    def close(self) -> None:
        """Close the pooled connections. The client can be used again: the next request
        reconnects, resuming the TLS session."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    @property
    def tls_info(self) -> TlsInfo | None:
        """What the most recent connection negotiated (None before the first one)."""
        return self._tls_info

    def _remember_tls(self, conn: Any) -> None:
        try:
            self._tls_info = tls_info(conn)
        except (TypeError, ValueError):
            pass

    # -- operations ---------------------------------------------------------------------

    def send_telemetry(
        self,
        body: bytes | str,
        *,
        properties: Mapping[str, str] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
    ) -> None:
        """Send one device-to-cloud message (``POST /devices/{id}/messages/events``)."""
        message = Message(
            cast(bytes, body),
            dict(properties or {}),
            message_id=message_id,
            correlation_id=correlation_id,
            content_type=content_type,
            content_encoding=content_encoding,
        )
        self.send_message(message)

    def send_message(self, message: Message) -> None:
        """Send a prepared :class:`Message`."""
        request = proto.events_request(self.device_id, message, self.api_version)
        self._call(request, "send telemetry", (204, 200))

    def send_batch(self, messages: Iterable[Message]) -> None:
        """Send several messages in one request (at most 256 KB in all)."""
        request = proto.batch_request(self.device_id, messages, self.api_version)
        self._call(request, "send batch", (204, 200))

    def receive_c2d(
        self, timeout: float | None = None, *, poll_interval: float = 5.0
    ) -> C2DMessage | None:
        """The next cloud-to-device message, locked for this device, or None.

        With ``timeout`` None or 0 the hub is asked once. Otherwise it is polled every
        ``poll_interval`` seconds until a message arrives or ``timeout`` passes (IoT Hub
        throttles HTTPS receives: poll sparingly). Settle each message with
        :meth:`complete`, :meth:`reject` or :meth:`abandon` within one minute.
        """
        request = proto.receive_request(self.device_id, self.api_version)
        deadline = time.monotonic() + (timeout or 0)
        while True:
            status, headers, body = self._call(request, "receive cloud-to-device", (200, 204))
            message = proto.parse_c2d(status, headers, body)
            remaining = deadline - time.monotonic()
            if message is not None or remaining <= 0:
                return message
            self._sleep(min(poll_interval, remaining))

    def complete(self, message: C2DMessage | str) -> None:
        """Remove a received message from the device's queue."""
        request = proto.complete_request(self.device_id, _token(message), self.api_version)
        self._call(request, "complete cloud-to-device message", (204, 200))

    def reject(self, message: C2DMessage | str) -> None:
        """Refuse a received message: the hub dead-letters it (no redelivery)."""
        request = proto.reject_request(self.device_id, _token(message), self.api_version)
        self._call(request, "reject cloud-to-device message", (204, 200))

    def abandon(self, message: C2DMessage | str) -> None:
        """Put a received message back in the queue (it is delivered again)."""
        request = proto.abandon_request(self.device_id, _token(message), self.api_version)
        self._call(request, "abandon cloud-to-device message", (204, 200))

    # -- the request loop ---------------------------------------------------------------

    def _call(
        self, request: proto.HttpRequest, operation: str, expected: tuple[int, ...]
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
                status, response_headers, body = self._exchange(request, headers)
            except (ConnectionFailedError, HandshakeClosedError) as exc:
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
                if delay <= self.retry.max_delay:
                    logger.info(
                        "%s: HTTP %d (%s); retrying in %.2f s", operation, status, info.code, delay
                    )
                    self._sleep(delay)
                    attempt += 1
                    continue
            raise proto.error_for_status(status, info, operation=operation, retry_after=retry_after)

    @property
    def _max_attempts(self) -> int:
        return self.retry.max_attempts or 1  # never None: checked in __init__

    def _backoff(self, retry: int) -> float:
        """The wait before retry number ``retry`` of an operation (each operation starts
        the schedule afresh)."""
        return self.retry.delay(retry, self._draws.random())

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
        self, request: proto.HttpRequest, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        pool = self._get_pool()
        u = self._urllib3
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
                f"{doing}: no response from {target} within {self.timeout:g} s"
            )
        if any(isinstance(i, u.exceptions.ConnectTimeoutError) for i in chain) and not any(
            isinstance(i, u.exceptions.NewConnectionError) for i in chain
        ):
            return ConnectionFailedError(f"could not connect to {target} within {self.timeout:g} s")
        if isinstance(exc, ClientError):
            return exc
        return ConnectionFailedError(f"{doing}: connection to {target} failed: {exc}")

    def __repr__(self) -> str:
        auth = "x509" if self._tokens is None else "sas"
        return (
            f"HttpsDeviceClient(device_id={self.device_id!r}, hub={self.hostname!r}, "
            f"connect={self._connect_host}:{self._connect_port}, auth={auth})"
        )


def _token(message: C2DMessage | str) -> str:
    return message.lock_token if isinstance(message, C2DMessage) else message


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


# -- requests -----------------------------------------------------------------------------

if TYPE_CHECKING:

    class HardenedAdapter(HTTPAdapter):
        """See :func:`_hardened_adapter_class` (the class is built on first use, so
        importing this module does not import ``requests``)."""

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
