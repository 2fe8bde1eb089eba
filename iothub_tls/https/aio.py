"""The asyncio HTTPS device client: :class:`HttpsDeviceClient` of :mod:`iothub_tls.aio`.

IoT Hub's device REST API (telemetry, batches, cloud-to-device receive / complete /
reject / abandon) over one kept-alive TLS connection, driven by the event loop it runs on
(any asyncio event loop); no thread of its own. The connection comes from
``loop.create_connection(ssl=<the hardened context>)``, so the policy's checks and
refusals are the core's own, and a new connection resumes the previous TLS session. The
HTTP/1.1 messages are written and read by :mod:`.http11`; what they mean comes from
:mod:`.conventions`, the module the local hub uses too.

Each operation is one request (retried as :class:`~.options.HttpsOptions` says): the
requests of one client go out one at a time on its connection. A connection the hub (or
the network) closed while it was idle is replaced before the next request; one that
turns out dead when a request is sent on it is replaced at once, and the request sent
again, without waiting: that says nothing about the hub.

The synchronous :class:`iothub_tls.https.HttpsDeviceClient` is a facade over this class
running on the process's shared I/O loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

from .. import __version__
from .._io.aiobase import AsyncClientBase
from .._io.base import check_host, check_port, unsupported
from .._io.loop import HandshakeGate, LoopLag, overload_hint
from .._io.proxy import Proxy, proxy_for
from ..auth import ClientIdentity, ConnectionString, SasTokenProvider
from ..device import C2DMessage, ConnectionState, Message, MethodHandler, Settlement
from ..errors import (
    AuthenticationError,
    ClientError,
    ConnectionFailedError,
    HandshakeClosedError,
    HandshakeTimeoutError,
    IoTHubTLSError,
    OperationTimeoutError,
    ProxyAuthenticationError,
)
from ..policy import TlsPolicy
from ..tls.context import HardenedSSLContext, create_ssl_context
from ..tls.info import TlsInfo
from . import conventions as proto
from .channel import Channel, Lost, Outcome, Turns
from .http11 import HttpProtocolError, RequestWriter, Response
from .options import HttpsOptions

__all__ = ["HttpsDeviceClient"]

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

Sleep = Callable[[float], Awaitable[Any]]


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes / contexts, nearest first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


class _Broken(Exception):
    """An exchange failed: ``error`` (translated) and whether the connection had served
    a request before (a kept-alive connection that may have died while idle)."""

    def __init__(self, error: BaseException, reused: bool) -> None:
        super().__init__(error)
        self.error = error
        self.reused = reused


class HttpsDeviceClient(AsyncClientBase):
    """A device's HTTPS connection to IoT Hub, for asyncio applications.

    The same surface as :class:`iothub_tls.https.HttpsDeviceClient`, with ``await``:
    ``async with client:``, ``await client.send_telemetry(...)``, ``await
    client.receive_c2d(timeout)``, ``async for message in client.c2d_messages():``
    (which polls the hub every ``HttpsOptions.c2d_poll_interval`` seconds). ``on_c2d``
    polls as a task on the loop; callbacks may be coroutine functions.

    A received message's ``complete()``, ``reject()`` and ``abandon()`` are requests to
    the hub. Called on the client's loop they cannot wait for the answer: the request
    goes out in the background, its failure goes to ``on_background_exception``, and
    :meth:`close` waits for it. From another thread they wait, and raise.

    Keywords of the factories: ``policy``, ``identity``, ``host``, ``port``, ``options``
    (:class:`~iothub_tls.https.HttpsOptions`), ``sas_token_provider``, ``clock`` (the
    time source of SAS tokens), ``sleep`` (a coroutine function: how to wait between
    retries and polls), ``gate`` (a :class:`~iothub_tls.aio.HandshakeGate` shared by
    many clients), ``lag``.

    IoT Hub's HTTPS API has no device twin, no direct methods and no module routes:
    those calls raise :class:`~iothub_tls.UnsupportedOperationError`.
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
        sleep: Sleep = asyncio.sleep,
        proxy: str | Proxy | None = None,
        gate: HandshakeGate | None = None,
        lag: LoopLag | None = None,
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
        super().__init__(options.operation_timeout)
        self._options = options
        self._retry = options.retry
        self.connection_string = cs
        self.hostname = cs.hostname
        self._connect_host = connect_host or cs.hostname
        self._connect_port = port
        self._target = f"{self._connect_host}:{port}"
        self._proxy = proxy_for(proxy, self._connect_host, port)
        if self._proxy is not None:
            self._target += f" through {self._proxy.url}"
        self._draws = random.Random()  # noqa: S311 - jitter, not a secret
        self._sleep = sleep
        # One context for the client's lifetime: it remembers the TLS session, so every
        # new connection resumes it (fewer bytes and less CPU, IoT Hub's guidance).
        self.ssl_context: HardenedSSLContext = create_ssl_context(policy, identity=identity)
        self._identity = identity
        self._tokens: SasTokenProvider | None = sas_token_provider
        # The token text of our own key's provider, kept while it needs no renewal
        # (making the text costs more than the rest of a request's headers). A provider
        # given to us is asked every time: it may do what it likes.
        self._token_text: str | None = None
        self._own_tokens = False
        if self._tokens is None and not cs.x509:
            self._tokens = SasTokenProvider.from_connection_string(
                cs, ttl=options.sas_ttl, clock=clock
            )
            # (a ready-made token is asked every time: it says when it has expired)
            self._own_tokens = self._tokens.renewable
        agent = f"iothub-tls/{__version__}"
        if options.product_info:
            agent += f" {options.product_info}"
        self._writer = RequestWriter(
            {"Host": cs.hostname, "User-Agent": agent, "Accept": "application/json"}
        )
        self._gate = gate or HandshakeGate()
        self._lag = lag
        # loop side
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel: Channel | None = None
        self._turns = Turns()
        self._tls_info: TlsInfo | None = None
        self._closed: asyncio.Event | None = None
        self._poller: asyncio.Task[None] | None = None
        self._polling = False
        self._poll_wake: asyncio.Future[None] | None = None
        self._settling: set[asyncio.Task[None]] = set()

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
        return self._state is ConnectionState.CONNECTED

    @property
    def tls_info(self) -> TlsInfo | None:
        """What the most recent connection negotiated (None before the first one)."""
        return self._tls_info

    def __repr__(self) -> str:
        auth = "x509" if self._tokens is None else "sas"
        return (
            f"<HttpsDeviceClient {self.device_id} -> {self.hostname} "
            f"via {self._target} ({auth}, {self._state.value})>"
        )

    # -- life cycle ---------------------------------------------------------------------

    async def __aenter__(self) -> HttpsDeviceClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the TLS connection now, so a TLS refusal shows up here (raised as the
        core raised it, never retried). A connection reset or closed mid-handshake
        without a TLS alert is a transport fault, retried like every operation
        (``HttpsOptions.retry``)."""
        if self._state is ConnectionState.CONNECTED:
            return
        self._loop = asyncio.get_running_loop()
        self._closed_event().clear()
        self._set_state(ConnectionState.CONNECTING)
        attempt = 1
        try:
            while True:
                try:
                    await self._turns.take()
                    try:
                        if self._channel is None or self._channel.closed:
                            self._channel = await self._open("connect")
                    finally:
                        self._turns.give()
                    break
                except (ConnectionFailedError, HandshakeClosedError) as exc:
                    if attempt >= self._max_attempts or isinstance(exc, ProxyAuthenticationError):
                        raise
                    delay = self._backoff(attempt)
                    logger.info("connect: %s; retrying in %.2f s", exc, delay)
                    await self._sleep(delay)
                    attempt += 1
        except BaseException as exc:
            self._drop_channel()
            self._set_state(ConnectionState.CLOSED, exc if isinstance(exc, Exception) else None)
            raise
        self._set_state(ConnectionState.CONNECTED)
        self._c2d_callback_changed()

    async def close(self) -> None:
        """Stop polling for cloud-to-device messages, let settlements under way finish,
        and close the connection. The client can connect again (resuming the TLS
        session)."""
        self._stop_polling()
        poller, self._poller = self._poller, None
        bound = self._options.operation_timeout + 1
        waiting: set[asyncio.Task[Any]] = set(self._settling)
        if poller is not None and not poller.done() and poller is not asyncio.current_task():
            waiting.add(poller)
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=bound)
            for task in late:
                task.cancel()
        if self._state is not ConnectionState.CLOSED:
            self._set_state(ConnectionState.CLOSED)  # from here on, requests are refused
        # A request under way (another task's) ends first, or within its timeout.
        try:
            await asyncio.wait_for(self._turns.take(), bound)
            taken = True
        except (TimeoutError, asyncio.TimeoutError):
            taken = False
        try:
            channel, self._channel = self._channel, None
            if channel is not None:
                channel.close()
                await channel.wait_closed(2.0)
        finally:
            if taken:
                self._turns.give()
        self._closed_event().set()

    def _closed_event(self) -> asyncio.Event:
        if self._closed is None:
            self._closed = asyncio.Event()
        return self._closed

    def _drop_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.abort()

    # -- the connection -----------------------------------------------------------------

    async def _open(self, doing: str) -> Channel:
        """A new connection (TCP, then TLS with the hardened context), through the
        handshake gate. Raises the core's TLS errors as they are, and
        ConnectionFailedError / HandshakeClosedError for transport faults."""
        old = self._channel
        if old is not None and self._state is ConnectionState.CONNECTED:
            # After the first connection, a new one means the previous one was lost.
            error = ConnectionFailedError(
                f"the connection to {self._target} was closed; opening a new one"
            )
            error.__cause__ = old.fault
            self._lost(error)
        loop = asyncio.get_running_loop()
        queued = loop.time()
        async with self._gate.slot():
            waited = loop.time() - queued
            deadline = loop.time() + self._options.connect_timeout
            sock = await self._dial(deadline, waited)
            channel = Channel(loop)
            channel.sock = sock
            try:
                await self._handshake(sock, channel, deadline, waited)
            except BaseException:
                sock.close()
                channel.abort()
                raise
        info = channel.tls_info
        if info is not None:
            self._tls_info = info
        return channel

    async def _dial(self, deadline: float, waited: float) -> socket.socket:
        """The TCP connection (every address of the host in turn)."""
        loop = asyncio.get_running_loop()
        host, port = self._connect_host, self._connect_port
        if self._proxy is not None:
            from .._io.proxy import open_tunnel

            return await open_tunnel(
                self._proxy, host, port, timeout=max(deadline - loop.time(), 0.001)
            )
        try:
            ipaddress.ip_address(host)
        except ValueError:
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(host, port, type=socket.SOCK_STREAM),
                    max(deadline - loop.time(), 0.001),
                )
            except (TimeoutError, asyncio.TimeoutError):
                raise ConnectionFailedError(
                    f"could not resolve {host} within {self._options.connect_timeout:g} s"
                    + overload_hint(self._lag, waited)
                ) from None
            except OSError as exc:
                raise ConnectionFailedError(f"could not resolve {host}: {exc}") from exc
            addresses: list[tuple[int, Any]] = [(info[0], info[4]) for info in infos]
        else:
            addresses = [(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))]
        failures: list[str] = []
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setblocking(False)
            # A request is one small write: send it now, not when the last one's ACK
            # comes (Nagle). asyncio sets this for the sockets it makes, not for ours.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await asyncio.wait_for(
                    loop.sock_connect(sock, address), max(deadline - loop.time(), 0.001)
                )
            except (TimeoutError, asyncio.TimeoutError):
                sock.close()
                raise ConnectionFailedError(
                    f"could not connect to {self._target} within "
                    f"{self._options.connect_timeout:g} s" + overload_hint(self._lag, waited)
                ) from None
            except OSError as exc:
                sock.close()
                failures.append(f"{address[0]}: {exc.strerror or exc}")
                last: OSError = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        error = ConnectionFailedError(
            f"could not connect to {self._target}: {'; '.join(failures) or 'no address'}"
        )
        if failures:
            raise error from last
        raise error

    async def _handshake(
        self, sock: socket.socket, channel: Channel, deadline: float, waited: float
    ) -> None:
        """TLS on the connected socket. A connection closed or reset during the
        handshake (no TLS alert: no policy decision was made) is HandshakeClosedError,
        a transport fault the callers retry; refusals are the core's own errors."""
        loop = asyncio.get_running_loop()
        remaining = max(deadline - loop.time(), 0.001)
        host = self.hostname
        try:
            await loop.create_connection(
                lambda: channel,
                sock=sock,
                ssl=self.ssl_context,
                server_hostname=host,
                ssl_handshake_timeout=remaining,
            )
        except IoTHubTLSError as exc:
            refusal = self._refusal(exc)  # TLS 1.2: the device certificate refused
            if refusal is not None:
                raise refusal from exc
            raise  # refusals and the hardened socket's HandshakeClosedError, unchanged
        except ConnectionAbortedError as exc:
            if "handshake" in str(exc):  # asyncio's ssl_handshake_timeout
                raise HandshakeTimeoutError(
                    None,
                    f"TLS handshake with {host} via {self._target} did not complete within "
                    f"{self._options.connect_timeout:g} s: the server accepted the TCP "
                    "connection but did not finish the handshake. Check that the port speaks "
                    "TLS and that no proxy or firewall holds the connection."
                    + overload_hint(self._lag, waited),
                ) from exc
            raise self._closed_in_handshake(exc) from exc
        except (ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
            raise self._closed_in_handshake(exc) from exc
        except ssl.SSLError as exc:  # pragma: no cover - the hardened object translates
            raise ConnectionFailedError(f"TLS with {self._target} failed: {exc}") from exc
        except OSError as exc:
            raise ConnectionFailedError(f"connection to {self._target} failed: {exc}") from exc

    def _closed_in_handshake(self, exc: BaseException) -> HandshakeClosedError:
        what = "reset" if isinstance(exc, ConnectionResetError) else "closed"
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return HandshakeClosedError(
            None,
            f"TLS handshake with {self.hostname} via {self._target} failed: the server "
            f"{what} the connection during the handshake ({detail}). A server that only "
            "speaks TLS 1.0/1.1, accepts none of IoT Hub's recommended suites, or requires "
            "a client certificate may do this; so may a firewall",
        )

    def _lost(self, reason: BaseException) -> None:
        if self._state is ConnectionState.CONNECTED:
            self._set_state(ConnectionState.DISCONNECTED, reason)
        if self._state is not ConnectionState.CLOSED:
            self._set_state(ConnectionState.CONNECTING)

    # -- the request loop ---------------------------------------------------------------

    @property
    def _max_attempts(self) -> int:
        return self._retry.max_attempts or 1  # never None: checked in HttpsOptions

    def _backoff(self, retry: int) -> float:
        """The wait before retry number ``retry`` of an operation (each operation starts
        the schedule afresh)."""
        return self._retry.delay(retry, self._draws.random())

    async def _call(
        self,
        request: proto.HttpRequest,
        operation: str,
        expected: tuple[int, ...],
        timeout: float | None = None,
        first: Response | _Broken | None = None,
    ) -> Response:
        """The request until it succeeds, or fails for good (retries, token renewal and
        error mapping as :class:`~.options.HttpsOptions` says). ``first``: the outcome of
        a first attempt made already (:meth:`_submit`)."""
        renewed = False
        replaced_stale = False
        attempt = 1
        while True:
            outcome: Response | _Broken
            if first is not None:
                outcome, first = first, None
            else:
                try:
                    outcome = await self._exchange(request, operation, timeout)
                except _Broken as broken:
                    outcome = broken
            if isinstance(outcome, _Broken):
                exc = outcome.error
                self._lost(exc)
                # HandshakeClosedError: the peer closed or reset the connection (or let
                # it stall) during the handshake without a TLS alert, i.e. before any
                # policy decision — a transport fault. Refusals (version, suites,
                # certificates, policy violations) are other classes and not caught.
                if not isinstance(exc, ConnectionFailedError | HandshakeClosedError) or (
                    isinstance(exc, ProxyAuthenticationError)  # fixed by the URL, not time
                ):
                    raise exc from exc.__cause__
                if outcome.reused and not replaced_stale and isinstance(exc, ConnectionFailedError):
                    # A kept-alive connection that sat idle can be dead without our
                    # knowing (a NAT or load balancer forgot it): that says nothing about
                    # the hub. Send once more, at once, on a new connection.
                    replaced_stale = True
                    logger.debug("%s: the kept-alive connection was dead (%s)", operation, exc)
                    continue
                if attempt >= self._max_attempts:
                    raise exc from exc.__cause__
                delay = self._backoff(attempt)
                logger.info("%s: %s; retrying in %.2f s", operation, exc, delay)
                await self._sleep(delay)
                attempt += 1
                continue
            response = outcome
            self._set_state(ConnectionState.CONNECTED)
            status = response.status
            if status in expected:
                return response
            if status == 401 and self._tokens is not None and not renewed:
                # The hub refused the token (expired by its clock, key rolled): try once
                # with a fresh one before reporting the failure.
                self._tokens.renew()
                self._token_text = None
                renewed = True
                continue
            headers = response.headers
            retry_after = proto.parse_retry_after(proto._get(headers, "Retry-After"))
            info = proto.parse_error(headers, response.body)
            if (status == 429 or status >= 500) and attempt < self._max_attempts:
                delay = retry_after if retry_after is not None else self._backoff(attempt)
                if delay <= self._retry.max_delay:
                    logger.info(
                        "%s: HTTP %d (%s); retrying in %.2f s", operation, status, info.code, delay
                    )
                    await self._sleep(delay)
                    attempt += 1
                    continue
            raise proto.error_for_status(status, info, operation=operation, retry_after=retry_after)

    def _encode(self, request: proto.HttpRequest) -> bytes:
        headers = request.headers
        tokens = self._tokens
        if tokens is not None:
            text = self._token_text
            if text is None or not self._own_tokens or tokens.needs_renewal():
                text = self._token_text = tokens.token()
            headers = {**headers, "Authorization": text}
        return self._writer.encode(request.method, request.path, headers, request.body)

    async def _exchange(
        self, request: proto.HttpRequest, operation: str, timeout: float | None
    ) -> Response:
        """One request and its response on the kept-alive connection (a new one if it
        is gone). Failures come as :class:`_Broken`, translated."""
        if self._state is ConnectionState.CLOSED:
            raise ClientError("the client is not connected: call connect() first")
        data = self._encode(request)
        wait = max(self._options.operation_timeout if timeout is None else timeout, 0.001)
        await self._turns.take()
        try:
            if self.state is ConnectionState.CLOSED:  # closed while waiting for its turn
                raise ClientError("the client was closed")
            channel = self._channel
            if channel is not None:
                await channel.settle()
            if channel is None or channel.closed:
                if channel is not None:
                    refusal = self._refusal(channel.fault)
                    if refusal is not None:  # TLS 1.3: refused after the handshake
                        self._channel = None
                        raise _Broken(refusal, False)
                try:
                    channel = self._channel = await self._open(operation)
                except (ConnectionFailedError, HandshakeClosedError) as exc:
                    raise _Broken(exc, False) from None
                except IoTHubTLSError as exc:  # a refusal
                    raise _Broken(exc, False) from None
            reused = channel.requests_sent > 0
            answered: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
            channel.send(request.method, data, wait, answered.set_result)
            try:
                outcome = await answered
            except asyncio.CancelledError:
                channel.abort()  # its response would answer the next request
                raise
        finally:
            self._turns.give()
        return self._response(outcome, request, operation, wait, reused)

    def _response(
        self, outcome: Outcome, request: proto.HttpRequest, operation: str, wait: float,
        reused: bool,
    ) -> Response:  # fmt: skip
        """The response, else the failure raised: :class:`_Broken` (translated) for a
        lost connection, OperationTimeoutError for no answer in time."""
        if isinstance(outcome, Response):
            return outcome
        if isinstance(outcome, Lost):
            doing = f"{request.method} {request.path.split('?')[0]}"
            error = self._translate(outcome.fault, doing)
            if error is not outcome.fault and error.__cause__ is None:
                error.__cause__ = outcome.fault  # the original, chained
            raise _Broken(error, reused)
        raise OperationTimeoutError(
            f"{operation}: no response from {self._target} within {wait:g} s"
            + overload_hint(self._lag, 0.0)
        )

    def _submit(
        self,
        request: proto.HttpRequest,
        operation: str,
        expected: tuple[int, ...],
        timeout: float | None,
        finished: Callable[[Response | BaseException], None],
    ) -> None:
        """:meth:`_call` started from a plain callback on the loop (the synchronous
        facade hands each request over this way): ``finished`` is called on the loop
        with the response or the error.

        When the kept-alive connection is there and free, the request goes out from
        this callback and its answer is taken in the connection's: no task, no extra
        turn of the loop, which is most of a synchronous request's cost beyond TLS.
        Anything but the expected answer continues in :meth:`_call` (as a task) from
        where this first attempt left it."""
        channel = self._channel
        if (
            self._state is not ConnectionState.CONNECTED
            or channel is None
            or not channel.alive()
            or not self._turns.try_take()
        ):
            self._finish_in_task(self._call(request, operation, expected, timeout), finished)
            return
        try:
            data = self._encode(request)
        except BaseException as exc:
            self._turns.give()
            finished(exc)
            return
        wait = max(self._options.operation_timeout if timeout is None else timeout, 0.001)
        reused = channel.requests_sent > 0

        def answered(outcome: Outcome) -> None:
            self._turns.give()
            first: Response | _Broken
            try:
                first = self._response(outcome, request, operation, wait, reused)
            except _Broken as broken:
                first = broken
            except BaseException as exc:  # no answer in time
                finished(exc)
                return
            if isinstance(first, Response) and first.status in expected:
                self._set_state(ConnectionState.CONNECTED)
                finished(first)
                return
            self._finish_in_task(self._call(request, operation, expected, timeout, first), finished)

        channel.send(request.method, data, wait, answered)

    def _finish_in_task(
        self,
        call: Awaitable[Response],
        finished: Callable[[Response | BaseException], None],
    ) -> None:
        async def run() -> None:
            try:
                response = await call
            except BaseException as exc:  # handed over, raised by the caller
                finished(exc)
            else:
                finished(response)

        asyncio.get_running_loop().create_task(run())

    def _refusal(self, fault: BaseException | None) -> AuthenticationError | None:
        """The error for a TLS alert by which the hub refused the device certificate."""
        if fault is None:
            return None
        for item in _chain(fault):
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
                failure.__cause__ = fault
                return failure
        return None

    def _translate(self, exc: BaseException | None, doing: str) -> BaseException:
        """What the application sees of a failed exchange: TLS and policy errors as
        themselves, never a bare :mod:`ssl` exception.

        Refusals (the handshake's policy errors, the hub refusing the device
        certificate) come out as they are; the request loop never retries them. A TLS
        error on an established connection — EOF without close_notify, a reset under
        the TLS layer, a record that fails its MAC check — is the network's fault: it
        becomes :class:`ConnectionFailedError`, which the request loop retries."""
        target = self._target
        if exc is None:
            return ConnectionFailedError(
                f"{doing}: {target} closed the connection before answering"
            )
        refusal = self._refusal(exc)
        if refusal is not None:
            return refusal
        chain = _chain(exc)
        for item in chain:
            if isinstance(item, IoTHubTLSError):
                return item
        for item in chain:
            if isinstance(item, ssl.SSLError):
                detail = getattr(item, "reason", None) or type(item).__name__
                return ConnectionFailedError(
                    f"{doing}: the TLS connection to {target} broke ({detail}: {item})"
                )
        if isinstance(exc, HttpProtocolError):
            return ConnectionFailedError(
                f"{doing}: {target} did not answer with valid HTTP/1.1 ({exc})"
            )
        return ConnectionFailedError(f"{doing}: connection to {target} failed: {exc}")

    # -- telemetry ----------------------------------------------------------------------

    async def send_telemetry(
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
        await self._call(request, "send telemetry", (204, 200), timeout)

    async def send_batch(self, messages: Iterable[Message], timeout: float | None = None) -> None:
        """Send several messages in one request (at most 256 KB in all)."""
        request = proto.batch_request(self.device_id, messages, self._options.api_version)
        await self._call(request, "send batch", (204, 200), timeout)

    # -- cloud-to-device ----------------------------------------------------------------

    async def _receive_once(self) -> C2DMessage | None:
        request = proto.receive_request(self.device_id, self._options.api_version)
        response = await self._call(request, "receive cloud-to-device", (200, 204))
        return proto.parse_c2d(
            response.status, response.headers, response.body, settler=self._settler
        )

    async def receive_c2d(self, timeout: float | None = None) -> C2DMessage:
        """The next cloud-to-device message, locked for this device: settle it with
        ``complete()``, ``reject()`` or ``abandon()`` within one minute.

        The hub is asked at once, then every ``HttpsOptions.c2d_poll_interval`` seconds
        until a message arrives or ``timeout`` (default
        ``HttpsOptions.operation_timeout``) passes; ``timeout=0`` asks once.

        :raises OperationTimeoutError: no message arrived in time.
        """
        wait = self._options.operation_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait, 0.0)
        while True:
            message = await self._receive_once()
            if message is not None:
                return message
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise OperationTimeoutError(f"no cloud-to-device message arrived within {wait:g} s")
            await self._sleep(min(self._options.c2d_poll_interval, remaining))

    async def c2d_messages(self) -> AsyncIterator[C2DMessage]:
        """Every cloud-to-device message, as the hub hands them out (``async for message
        in client.c2d_messages(): ...``): the hub is asked again at once after a
        message, else after ``HttpsOptions.c2d_poll_interval`` seconds. Ends when the
        client is closed; a failed request is raised here."""
        closed = self._closed_event()
        while not closed.is_set():
            message = await self._receive_once()
            if message is not None:
                yield message
                continue
            try:
                await asyncio.wait_for(closed.wait(), self._options.c2d_poll_interval)
            except (TimeoutError, asyncio.TimeoutError):
                pass

    def _settler(self, message: C2DMessage, how: Settlement) -> None:
        """Settle a received message: in the background on the client's loop (the loop
        cannot wait), else waiting for the hub's answer."""
        loop = self._loop
        if loop is None or not loop.is_running():
            raise ClientError("cannot settle the message: the client's event loop is not running")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            task = loop.create_task(self._settle(message, how))
            self._settling.add(task)
            task.add_done_callback(self._settled)
            return
        asyncio.run_coroutine_threadsafe(self._settle(message, how), loop).result()

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self._report(error)

    async def _settle(self, message: C2DMessage, how: Settlement) -> None:
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
        await self._call(request, f"{how.value} cloud-to-device message", (204, 200))

    # -- on_c2d: polling as a task on the loop ------------------------------------------

    def _c2d_callback_changed(self) -> None:
        """Poll for messages while ``on_c2d`` is set and the client is connected."""
        if self.on_c2d is None or self._state is ConnectionState.CLOSED:
            self._stop_polling()
            return
        self._polling = True
        if self._poller is not None and not self._poller.done():
            return  # still running: it goes on
        self._poller = asyncio.get_running_loop().create_task(
            self._poll(), name=f"iothub-tls-https-c2d-{self.device_id}"
        )

    def _stop_polling(self) -> None:
        self._polling = False
        wake = self._poll_wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._options.c2d_poll_interval
        while self._polling:
            try:
                message = await self._receive_once()
            except ClientError as exc:
                if not self._polling:
                    return
                self._report(exc)
                message = None
            except Exception as exc:  # a bug must not end polling silently
                self._report(exc)
                message = None
            if message is not None:
                self._incoming_c2d(message)
                continue  # more may be waiting
            if not self._polling:
                return
            self._poll_wake = loop.create_future()
            try:
                await asyncio.wait({self._poll_wake}, timeout=interval)
            finally:
                self._poll_wake = None

    # -- what HTTPS does not have -------------------------------------------------------

    async def get_twin(self, timeout: float | None = None) -> dict[str, Any]:
        """IoT Hub has no device twin over HTTPS: raises ``UnsupportedOperationError``."""
        raise unsupported("HTTPS", "device twin", "use MQTT or AMQP for the twin")

    async def patch_reported(
        self, patch: Mapping[str, Any], timeout: float | None = None
    ) -> int | None:
        """IoT Hub has no device twin over HTTPS: raises ``UnsupportedOperationError``."""
        raise unsupported("HTTPS", "device twin", "use MQTT or AMQP for the twin")

    def _desired_callback_changed(self) -> None:
        if self.on_desired_update is not None:
            self._on_desired_update = None
            raise unsupported("HTTPS", "desired-property updates", "use MQTT or AMQP for the twin")

    def on_method(self, name: str | None, handler: MethodHandler | None) -> None:
        """IoT Hub has no direct methods over HTTPS: raises ``UnsupportedOperationError``."""
        raise unsupported("HTTPS", "direct methods", "use MQTT or AMQP for direct methods")
