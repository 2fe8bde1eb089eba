"""Azure IoT Hub over HTTPS (port 443) through the hardened TLS context.

Two things live in :mod:`iothub_tls.https`:

* :class:`HttpsDeviceClient` — IoT Hub's device REST API (telemetry, batches,
  cloud-to-device receive / complete / reject / abandon) over one kept-alive TLS
  connection whose only TLS configuration is :func:`iothub_tls.create_ssl_context`; a
  new connection resumes the previous TLS session. It is a facade over
  :class:`iothub_tls.aio.HttpsDeviceClient`: every synchronous client in a process shares
  one I/O thread (``iothub-tls-io``) and one callback thread (``iothub-tls-callbacks``),
  and polling for ``on_c2d`` is a task on that loop, not a thread. It needs no
  third-party HTTP library (:mod:`.http11` writes and reads the messages).
* :class:`~.adapter.HardenedAdapter` — a ``requests`` transport adapter that uses a
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

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from .._io.backoff import RetryPolicy
from .._io.facade import SyncFacade
from .._io.loop import shared_loop
from ..auth import ClientIdentity, ConnectionString, SasTokenProvider
from ..device import C2DMessage, Message, Settlement
from ..errors import (
    BadRequestError,
    DeviceNotFoundError,
    HubServerError,
    InvalidMessageError,
    MessageLockLostError,
    MessageTooLargeError,
    ThrottledError,
    UnexpectedResponseError,
)
from ..policy import TlsPolicy
from ..tls.context import HardenedSSLContext
from . import conventions as proto
from .aio import HttpsDeviceClient as AsyncHttpsDeviceClient
from .conventions import API_VERSION
from .options import HttpsOptions

__all__ = [
    "API_VERSION",
    "BadRequestError",
    "C2DMessage",
    "DeviceNotFoundError",
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

_T = TypeVar("_T")


def _sleep_off_the_loop(sleep: Callable[[float], None]) -> Callable[[float], Any]:
    """The asyncio client's ``sleep`` for the synchronous ``sleep``: time.sleep becomes
    asyncio.sleep; any other function (it may block) runs in the loop's executor."""
    if sleep is time.sleep:
        return asyncio.sleep

    async def wait(seconds: float) -> None:
        await asyncio.get_running_loop().run_in_executor(None, sleep, seconds)

    return wait


class _Wakeup:
    """A calling thread's pipe, on which the loop wakes it with one byte.

    Waking a thread by writing to a pipe it reads is a synchronous wake-up: the kernel
    tends to run the reader where the writer runs. Releasing a lock is not, and on a
    virtual machine waking a thread on another CPU costs an interrupt between CPUs: on
    a 2-vCPU machine a round trip to the I/O thread took a median 22 us of CPU with a
    lock, 9 us with a pipe. One pipe (two descriptors) per thread that calls, made on its
    first call and closed when the thread is gone."""

    __slots__ = ("pid", "read_fd", "write_fd")

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.pid = os.getpid()

    def __del__(self) -> None:
        # Only once nothing can write any more: every pending callback holds this object.
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


_threads = threading.local()


def _hand_over(
    loop: asyncio.AbstractEventLoop, start: Callable[[Callable[[Any], None]], Any]
) -> Any:
    """Call ``start(finished)`` on ``loop``; wait until the loop calls ``finished(x)``,
    and return ``x``."""
    wakeup: _Wakeup | None = getattr(_threads, "wakeup", None)
    if wakeup is None or wakeup.pid != os.getpid():  # first call, or a forked child
        wakeup = _threads.wakeup = _Wakeup()
    outcome: list[Any] = []

    def finished(value: Any) -> None:
        outcome.append(value)
        with contextlib.suppress(OSError):
            os.write(wakeup.write_fd, b"\0")

    loop.call_soon_threadsafe(start, finished)
    while True:
        os.read(wakeup.read_fd, 1)
        if outcome:  # (a byte left by a call that was interrupted is skipped)
            return outcome[0]


class HttpsDeviceClient(SyncFacade):
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
    :param sleep: how to wait between retries and polls (called off the I/O loop).
    :param proxy: reach the hub through a proxy: ``"http://[user:password@]host:port"``
        (HTTP CONNECT), ``"socks5://[user:password@]host:port"``, ``"socks4://host:port"``,
        or ``"env"`` for ``HTTPS_PROXY``/``NO_PROXY``. TLS still runs end to end with the
        hub; a proxy refusal is :class:`~iothub_tls.ProxyError`.
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
        proxy: str | None = None,
    ) -> None:
        io = shared_loop()
        self._attach(
            AsyncHttpsDeviceClient(
                connection_string,
                policy=policy,
                identity=identity,
                host=host,
                port=port,
                options=options,
                sas_token_provider=sas_token_provider,
                clock=clock,
                sleep=_sleep_off_the_loop(sleep),
                proxy=proxy,
                gate=io.gate,
                lag=io.lag,
            )
        )
        self._aio: AsyncHttpsDeviceClient

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """``coro`` on the shared loop, waited for. A request costs a few dozen
        microseconds of CPU, so the hop is kept lean: one wake-up of the loop, one of
        this thread (no concurrent future, no done-callback round)."""
        io = self._io
        if io.on_loop_thread:
            return io.run(coro)  # refused there, with the reason

        def start(finished: Callable[[Any], None]) -> None:
            async def run() -> None:
                try:
                    result = await coro
                except BaseException as exc:  # handed to the caller, raised there
                    finished((False, exc))
                else:
                    finished((True, result))

            io.loop.create_task(run())

        ok, value = _hand_over(io.loop, start)
        if not ok:
            raise value
        result: _T = value
        return result

    # -- what it is ---------------------------------------------------------------------

    @property
    def connection_string(self) -> ConnectionString:
        return self._aio.connection_string

    @property
    def hostname(self) -> str:
        """The hub's name: sent in SNI and checked in its certificate."""
        return self._aio.hostname

    @property
    def ssl_context(self) -> HardenedSSLContext:
        """The hardened context every connection of this client uses."""
        return self._aio.ssl_context

    @property
    def options(self) -> HttpsOptions:
        return self._aio.options

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
        aio = self._aio
        request = proto.events_request(aio.device_id, message, aio.options.api_version)
        self._send(request, "send telemetry", timeout)

    def send_batch(self, messages: Iterable[Message], timeout: float | None = None) -> None:
        """Send several messages in one request (at most 256 KB in all)."""
        aio = self._aio
        request = proto.batch_request(aio.device_id, messages, aio.options.api_version)
        self._send(request, "send batch", timeout)

    def _send(self, request: proto.HttpRequest, operation: str, timeout: float | None) -> None:
        """A request built here (its refusals raised in this thread), sent from the loop
        (:meth:`AsyncHttpsDeviceClient._submit`), its outcome waited for."""
        io = self._io
        if io.on_loop_thread:  # refused there, with the reason
            io.run(self._aio._call(request, operation, (204, 200), timeout))
        aio = self._aio
        outcome = _hand_over(
            io.loop,
            lambda finished: aio._submit(request, operation, (204, 200), timeout, finished),
        )
        if isinstance(outcome, BaseException):
            raise outcome

    # -- cloud-to-device ----------------------------------------------------------------

    def receive_c2d(self, timeout: float | None = None) -> C2DMessage:
        """The next cloud-to-device message, locked for this device: settle it with
        ``complete()``, ``reject()`` or ``abandon()`` within one minute.

        The hub is asked at once, then every ``HttpsOptions.c2d_poll_interval`` seconds
        until a message arrives or ``timeout`` (default
        ``HttpsOptions.operation_timeout``) passes; ``timeout=0`` asks once.

        :raises OperationTimeoutError: no message arrived in time.
        """
        return self._run(self._aio.receive_c2d(timeout))

    def _settle(self, message: C2DMessage, how: Settlement) -> None:
        """Settle ``message`` and wait for the hub's answer (a :data:`Settler`)."""
        self._run(self._aio._settle(message, how))


def __getattr__(name: str) -> Any:
    if name == "HardenedAdapter":  # built on first use: importing this imports no requests
        from . import adapter

        return adapter.HardenedAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
