"""AMQP 1.0 over the hardened TLS connection: :class:`AmqpDeviceClient` for IoT Hub and
the generic :class:`AmqpConnection` it is built on.

The TLS socket comes from :func:`iothub_tls.create_ssl_context` (same policy, same
checks and the same :class:`~iothub_tls.TlsInfo` as MQTT and HTTPS); python-qpid-proton's
engine (connection, transport, SASL) runs *inside* that socket and does no TLS itself.
One I/O thread per connection moves bytes between the socket and the engine, sends
heartbeats (the transport's idle-timeout tick), renews the SAS token on the live
connection and reconnects after the connection is lost, waiting as
``AmqpOptions.retry`` (a :class:`~iothub_tls.RetryPolicy`) says.

Install the extra: ``pip install 'iothub-tls[amqp]'``.

IoT Hub authentication, as the Azure IoT SDKs do it:

* **SAS key** — SASL ANONYMOUS, then claims-based security: a ``put-token`` request on
  the ``$cbs`` node with ``name`` = the token's resource (``{hub}/devices/{id}``), type
  ``servicebus.windows.net:sastoken``; the links attach only after status 200. A new
  token is put on the same connection before the current one expires.
* **X.509** — the device certificate in the TLS handshake (``identity=``) and *no SASL
  layer*, as the C, C# and Java SDKs connect; ``sasl_external=True`` sends SASL
  EXTERNAL instead, for gateways and brokers that require a SASL layer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

from .._io.backoff import Backoff, RetryPolicy
from .._io.base import ClientBase, check_host, check_port
from .._io.lifecycle import Connectable
from .._io.poller import readable
from ..auth import ClientIdentity, ConnectionString, SasTokenProvider
from ..device import (
    C2DMessage,
    ConnectionState,
    Message,
    Settlement,
    Settler,
    check_model_id,
    decode_twin_document,
    encode_reported_patch,
)
from ..errors import (
    AuthenticationError,
    CertificateVerificationError,
    CipherSuiteError,
    ClientError,
    ConnectionFailedError,
    DeliveryError,
    NotAuthorizedError,
    OperationTimeoutError,
    PolicyError,
    PolicyViolation,
    ProtocolVersionError,
)
from ..policy import TlsPolicy
from ..tls.context import HardenedSSLContext, create_ssl_context
from ..tls.info import TlsInfo
from . import conventions as amqpc
from .message import AmqpMessage
from .methods import MethodChannel
from .twin import TwinChannel

__all__ = [
    "AMQPS_PORT",
    "AmqpConnection",
    "AmqpDelivery",
    "AmqpDeviceClient",
    "AmqpMessage",
    "AmqpOptions",
    "AmqpReceiver",
    "AmqpSender",
    "C2DMessage",
    "RetryPolicy",
]

logger = logging.getLogger("iothub_tls.amqp")

#: AMQP over TLS (IANA "amqps"); IoT Hub listens on it.
AMQPS_PORT = 5671
_SASL_CHOICES = ("ANONYMOUS", "EXTERNAL", "PLAIN")
_T = TypeVar("_T")


def _engine() -> Any:
    """Import the proton-based engine lazily (the ``amqp`` extra is optional)."""
    from . import engine as _amqp_engine

    return _amqp_engine


#: AmqpOptions.retry by default: the first wait up to 0.5 s, doubling to 30 s.
_DEFAULT_RECONNECT = RetryPolicy(initial_delay=0.5, max_delay=30.0)


@dataclass(frozen=True)
class AmqpOptions:
    """Tuning of :class:`AmqpConnection` and :class:`AmqpDeviceClient`; every field has
    a default suited to IoT Hub. Make variants with :func:`dataclasses.replace`.

    :param idle_timeout: seconds of silence after which the peer is considered dead
        (announced in the open frame); empty frames are sent so that the peer's own idle
        timeout never fires.
    :param connect_timeout: limit for TCP + TLS + SASL + open + CBS + attach together; a
        peer that stalls any of them fails with a timeout error naming the stage.
    :param operation_timeout: default limit for a message's disposition, a settlement or
        a :meth:`AmqpDeviceClient.receive_c2d`.
    :param retry: how to re-establish a lost connection (CBS and links included): a
        :class:`~iothub_tls.RetryPolicy` (default: waits of up to 0.5 s doubling
        to 30 s, with full jitter, never giving up, starting again after a connection
        healthy for 60 s), or None not to reconnect. Refused credentials and TLS policy
        refusals are never retried.
    :param renew_margin: put a new SAS token on ``$cbs`` when this fraction of the
        current token's lifetime is left.
    :param sas_ttl: lifetime of the SAS tokens the device client generates.
    :param c2d_credit: cloud-to-device messages the device client lets the hub send
        ahead (link credit); each settlement gives one credit back.
    """

    idle_timeout: float = 120.0
    connect_timeout: float = 30.0
    operation_timeout: float = 30.0
    retry: RetryPolicy | None = _DEFAULT_RECONNECT
    renew_margin: float = 0.2
    sas_ttl: float = 3600.0
    c2d_credit: int = 10

    def __post_init__(self) -> None:
        for name in (
            "idle_timeout",
            "connect_timeout",
            "operation_timeout",
            "sas_ttl",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not (
                isinstance(value, int | float) and math.isfinite(value) and value > 0
            ):
                raise PolicyError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise PolicyError(
                f"retry must be a RetryPolicy (or None not to reconnect), not {self.retry!r}"
            )
        if not (isinstance(self.renew_margin, int | float) and 0 < self.renew_margin < 1):
            raise PolicyError(f"renew_margin must be in (0, 1), not {self.renew_margin!r}")
        if isinstance(self.c2d_credit, bool) or not (
            isinstance(self.c2d_credit, int) and self.c2d_credit >= 1
        ):
            raise PolicyError(f"c2d_credit must be a positive integer, not {self.c2d_credit!r}")


# ---------------------------------------------------------------------------------------
# deliveries and links
# ---------------------------------------------------------------------------------------


class AmqpDelivery:
    """A received message, to be settled once with :meth:`accept`, :meth:`reject` or
    :meth:`release`. A delivery not settled before the connection is lost is
    delivered again by the peer; settling it then raises :class:`DeliveryError`."""

    def __init__(
        self,
        connection: AmqpConnection,
        generation: int,
        handle: Any,
        key: str,
        message: AmqpMessage,
    ) -> None:
        self._connection = connection
        self._generation = generation
        self._handle = handle
        self._key = key
        self.message = message
        self.settled: str | None = None

    def accept(self, timeout: float | None = None) -> None:
        """Disposition *accepted*: the message was processed."""
        self._settle("ACCEPTED", timeout)

    def reject(self, timeout: float | None = None) -> None:
        """Disposition *rejected*: the message is invalid (brokers dead-letter it)."""
        self._settle("REJECTED", timeout)

    def release(self, timeout: float | None = None) -> None:
        """Disposition *released*: not processed; the peer may deliver it again."""
        self._settle("RELEASED", timeout)

    def _settle(self, outcome: str, timeout: float | None) -> None:
        if self.settled is not None:
            raise DeliveryError(f"this message was already settled ({self.settled})")
        self._connection._settle(self, outcome, timeout)
        self.settled = outcome.lower()

    def __repr__(self) -> str:
        return f"<AmqpDelivery {self._key} id={self.message.message_id!r} settled={self.settled}>"


class AmqpSender:
    """A sending link kept attached by an :class:`AmqpConnection`."""

    def __init__(self, connection: AmqpConnection, key: str, address: str) -> None:
        self._connection = connection
        self.key = key
        self.address = address

    def send(self, message: AmqpMessage | bytes | str, timeout: float | None = None) -> None:
        """Send and wait for the peer's disposition.

        :raises DeliveryError: the peer rejected, released or modified the message.
        :raises OperationTimeoutError: no disposition within ``timeout``.
        """
        if not isinstance(message, AmqpMessage):
            message = AmqpMessage(body=message)
        self._connection._send(self.key, message, timeout)


class AmqpReceiver:
    """A receiving link kept attached by an :class:`AmqpConnection`; ``credit`` messages
    are prefetched, and a credit is given back as each one is settled."""

    def __init__(
        self,
        connection: AmqpConnection,
        key: str,
        address: str,
        on_message: Callable[[AmqpMessage], None] | None = None,
        on_delivery: Callable[[AmqpDelivery], None] | None = None,
    ) -> None:
        self._connection = connection
        self.key = key
        self.address = address
        self._queue: queue.Queue[AmqpDelivery] = queue.Queue()
        self._on_message = on_message
        self._on_delivery = on_delivery

    def receive(self, timeout: float | None = None) -> AmqpDelivery | None:
        """The next message, or None when none arrived within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                delivery = self._queue.get(timeout=remaining)
            except queue.Empty:
                self._connection._raise_if_dead()
                return None
            if delivery._generation == self._connection._generation:
                return delivery
            # received on a connection that has since been lost: the peer redelivers


# ---------------------------------------------------------------------------------------
# the connection
# ---------------------------------------------------------------------------------------


@dataclass
class _Send:
    key: str
    payload: bytes
    future: Future[None]
    abandoned: bool = False
    generation: int = 0  # the connection it was last sent on


_PERMANENT = (
    AuthenticationError,
    NotAuthorizedError,
    CertificateVerificationError,
    PolicyViolation,
    PolicyError,
    ProtocolVersionError,
    CipherSuiteError,
)


class AmqpConnection(Connectable):
    """An AMQP 1.0 connection over the hardened TLS context, with links that survive
    reconnects.

    Declare links with :meth:`sender` / :meth:`receiver` (before or after
    :meth:`connect`); they are attached on every (re)connection. ``sasl`` is one of
    ``"ANONYMOUS"``, ``"EXTERNAL"`` (the TLS client certificate is the identity: pass
    ``identity``), ``"PLAIN"`` (``username``/``password``) or None for no SASL layer.
    ``cbs_token_provider`` enables claims-based security: its token is put on ``$cbs``
    before the links attach and renewed on the live connection before it expires.

    :param host: where to connect (TCP).
    :param server_hostname: the name sent in SNI and checked against the certificate
        (default: ``host``).
    :param open_hostname: the ``hostname`` of the AMQP open frame (default:
        ``server_hostname``).
    :param options: timeouts, reconnection and token renewal (:class:`AmqpOptions`).
    """

    def __init__(
        self,
        host: str,
        port: int = AMQPS_PORT,
        *,
        policy: TlsPolicy | None = None,
        identity: ClientIdentity | None = None,
        context: HardenedSSLContext | None = None,
        server_hostname: str | None = None,
        open_hostname: str | None = None,
        sasl: str | None = "ANONYMOUS",
        username: str | None = None,
        password: str | None = None,
        cbs_token_provider: SasTokenProvider | None = None,
        cbs_audience: str | None = None,
        container_id: str | None = None,
        options: AmqpOptions | None = None,
        on_state: Callable[[ConnectionState, BaseException | None], None] | None = None,
    ) -> None:
        if sasl is not None and sasl not in _SASL_CHOICES:
            raise PolicyError(
                f"unsupported SASL mechanism {sasl!r}: use one of {', '.join(_SASL_CHOICES)} "
                "or None for no SASL layer"
            )
        if sasl == "PLAIN" and (username is None or password is None):
            raise PolicyError("SASL PLAIN needs both username and password")
        if sasl != "PLAIN" and (username is not None or password is not None):
            raise PolicyError(
                f"username/password are only sent with SASL PLAIN, not {sasl!r}: pass "
                "sasl='PLAIN' or remove them"
            )
        if (
            sasl == "EXTERNAL"
            and identity is None
            and (context is None or context.identity is None)
        ):
            raise PolicyError(
                "SASL EXTERNAL authenticates with the TLS client certificate: pass identity="
                "ClientIdentity.from_files(cert, key)"
            )
        if context is not None and (policy is not None or identity is not None):
            raise PolicyError("pass either context or policy/identity, not both")
        options = options or AmqpOptions()
        if not isinstance(options, AmqpOptions):
            raise PolicyError(f"options must be an AmqpOptions, not {type(options).__name__}")
        self._engine = _engine()  # MissingDependencyError now, not in the I/O thread
        self.host = host
        self.port = int(port)
        self._context = context or create_ssl_context(policy, identity=identity)
        self.server_hostname = server_hostname or host
        self._open_hostname = open_hostname or self.server_hostname
        self._sasl = self._engine.SaslConfig(sasl, username, password)
        self._provider = cbs_token_provider
        self._audience = cbs_audience or (
            cbs_token_provider.resource_uri if cbs_token_provider else None
        )
        self._container_id = container_id or uuid.uuid4().hex
        self.options = options
        self.operation_timeout = options.operation_timeout
        self._connect_timeout = options.connect_timeout

        self._lock = threading.Lock()
        self._specs: dict[str, Any] = {}
        self._receivers: dict[str, AmqpReceiver] = {}
        self._commands: deque[Callable[[Any], None]] = deque()
        self._sends: list[_Send] = []
        self._wake_r, self._wake_w = _wake_pair()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._ready = threading.Event()
        self._first: Future[None] | None = None
        self._dead: BaseException | None = None
        self._generation = 0
        self._protocol: Any = None
        self._tls_info: TlsInfo | None = None
        self._last_error: BaseException | None = None
        self._reconnects = 0
        self._token_puts = 0
        self._backoff: Backoff | None = None
        self._attached = threading.Condition()
        self._attached_keys: set[str] = set()  # links the peer attached, this connection
        self._ready_hooks: list[Callable[[bool], None]] = []
        self._on_state = on_state

    def _state(self, state: ConnectionState, reason: BaseException | None = None) -> None:
        if self._on_state is not None:
            self._on_state(state, reason)

    # -- links ----------------------------------------------------------------------------

    def sender(
        self, address: str, *, name: str | None = None, properties: Mapping[str, Any] | None = None
    ) -> AmqpSender:
        """Declare a sending link to ``address``."""
        key = name or f"snd-{address}-{uuid.uuid4().hex[:8]}"
        spec = self._engine.LinkSpec(key, address, True, key, dict(properties or {}))
        self._declare(spec)
        return AmqpSender(self, key, address)

    def receiver(
        self,
        address: str,
        *,
        credit: int = 10,
        name: str | None = None,
        properties: Mapping[str, Any] | None = None,
        on_message: Callable[[AmqpMessage], None] | None = None,
        on_delivery: Callable[[AmqpDelivery], None] | None = None,
    ) -> AmqpReceiver:
        """Declare a receiving link from ``address`` with ``credit`` messages prefetched.

        With ``on_message``, each message is accepted as it arrives and handed to
        ``on_message`` on the I/O thread (for protocol code that must not block: it
        only hands the message on); :meth:`AmqpReceiver.receive` then gets nothing.
        With ``on_delivery``, each unsettled delivery is handed over instead (on the I/O
        thread too): whoever takes it settles it.
        """
        if not (isinstance(credit, int) and credit >= 1):
            raise PolicyError(f"credit must be a positive integer, not {credit!r}")
        key = name or f"rcv-{address}-{uuid.uuid4().hex[:8]}"
        spec = self._engine.LinkSpec(key, address, False, key, dict(properties or {}), credit)
        handle = AmqpReceiver(self, key, address, on_message, on_delivery)
        self._receivers[key] = handle
        self._declare(spec)
        return handle

    def _declare(self, spec: Any) -> None:
        with self._lock:
            if spec.key in self._specs:
                raise PolicyError(f"a link named {spec.key!r} already exists")
            self._specs[spec.key] = spec
        if self._thread is not None:
            self._command(lambda proto: proto.add_link(spec))

    def _wait_attached(self, keys: Collection[str], timeout: float) -> bool:
        """Wait until the peer attached the links ``keys`` on the current connection;
        False when it did not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._attached:
            while not set(keys) <= self._attached_keys:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._dead is not None:
                    return False
                self._attached.wait(min(remaining, 0.5))
            return True

    def _on_ready_hook(self, hook: Callable[[bool], None]) -> None:
        """Call ``hook(reconnected)`` on the I/O thread each time the connection (CBS
        and every declared link included) is ready, before unsettled messages are sent
        again. The hook must not block."""
        self._ready_hooks.append(hook)

    # -- state ----------------------------------------------------------------------------

    @property
    def tls_info(self) -> TlsInfo | None:
        """What the current (or last) TLS connection negotiated."""
        return self._tls_info

    @property
    def connected(self) -> bool:
        return self._ready.is_set() and self._dead is None

    @property
    def _running(self) -> bool:
        """The I/O thread runs: connected, or reconnecting."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def reconnects(self) -> int:
        """How many times the connection was re-established."""
        return self._reconnects

    @property
    def token_puts(self) -> int:
        """How many CBS put-token requests were accepted (first one and renewals)."""
        return self._token_puts

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            if isinstance(self._dead, ClientError):
                raise self._dead
            raise ConnectionFailedError(f"the AMQP connection failed: {self._dead}") from (
                self._dead
            )
        if self._thread is None:
            raise ConnectionFailedError("not connected: call connect() first")

    # -- lifecycle ------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect, authenticate and attach the declared links.

        :raises ConnectionFailedError: TCP connection refused or lost during set-up.
        :raises iothub_tls.TLSHandshakeError: (and subclasses) TLS refused; a peer that
            stalls the handshake raises :class:`~iothub_tls.HandshakeTimeoutError`.
        :raises AuthenticationError: SASL or the CBS put-token was refused.
        :raises OperationTimeoutError: the peer stalled SASL, open, CBS or attach.
        """
        if self._thread is not None and self._thread.is_alive():
            raise ConnectionFailedError("already connected: call close() before connect()")
        if self._thread is not None:  # connected before and closed: start afresh
            self._wake_r, self._wake_w = _wake_pair()
            self._closing.clear()
            self._ready.clear()
            self._dead = None
            self._last_error = None
        self._first = Future()
        self._thread = threading.Thread(
            target=self._main, name=f"iothub-tls-amqp-{self.host}:{self.port}", daemon=True
        )
        self._thread.start()
        try:
            self._first.result()
        except BaseException:
            self._thread.join(5)
            raise

    def close(self, timeout: float = 5.0) -> None:
        """Close the connection (an AMQP close, then TLS close_notify) and stop the I/O
        thread. Messages still waiting for a disposition fail with
        :class:`ConnectionFailedError`."""
        self._closing.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._wake_r.close()
        self._wake_w.close()

    # -- operations (user threads) --------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _command(self, fn: Callable[[Any], None]) -> None:
        with self._lock:
            self._commands.append(fn)
        self._wake()

    def _call(self, fn: Callable[[Any], _T], timeout: float) -> _T:
        """Run ``fn(protocol)`` in the I/O thread and return its result."""
        done: Future[_T] = Future()

        def run(proto: Any) -> None:
            try:
                done.set_result(fn(proto))
            except BaseException as exc:  # handed to the caller
                done.set_exception(exc)

        self._command(run)
        try:
            return done.result(timeout)
        except FutureTimeout:
            raise OperationTimeoutError(self._timeout_text("the I/O thread", timeout)) from None

    def _post(self, key: str, message: AmqpMessage) -> _Send:
        """Queue ``message`` on link ``key`` without waiting; ``future`` of the result
        completes with its disposition (it is sent again after a reconnection until it
        has one, unless ``abandoned``)."""
        self._raise_if_dead()
        item = _Send(key, bytes(message._to_proton().encode()), Future())
        with self._lock:
            self._sends.append(item)
        self._command(lambda proto: self._submit(proto, item))
        return item

    def _send(self, key: str, message: AmqpMessage, timeout: float | None) -> None:
        timeout = self.operation_timeout if timeout is None else timeout
        item = self._post(key, message)
        try:
            item.future.result(timeout)
        except FutureTimeout:
            self._abandon(item)
            raise OperationTimeoutError(
                self._timeout_text("the disposition of the message", timeout)
            ) from None

    def _abandon(self, item: _Send) -> None:
        """Stop sending ``item`` (its caller gave up waiting)."""
        item.abandoned = True
        with self._lock:
            if item in self._sends:
                self._sends.remove(item)

    def _timeout_text(self, what: str, timeout: float) -> str:
        if self.connected:
            return f"{what} did not arrive within {timeout:g} s"
        last = f" (last error: {self._last_error})" if self._last_error else ""
        return (
            f"{what} did not arrive within {timeout:g} s: the connection to "
            f"{self.host}:{self.port} is being re-established{last}"
        )

    def _submit(self, proto: Any, item: _Send) -> None:
        if proto is not None and proto.ready and not item.abandoned:
            if item.generation != self._generation:
                item.generation = self._generation
                proto.send(item.key, item.payload, item)

    def _settle(self, delivery: AmqpDelivery, outcome: str, timeout: float | None) -> None:
        timeout = self.operation_timeout if timeout is None else timeout

        def run(proto: Any) -> None:
            if proto is None or delivery._generation != self._generation:
                raise DeliveryError(
                    f"cannot settle ({outcome.lower()}): the connection on which the message "
                    "arrived was lost; the peer will deliver it again"
                )
            proto.settle(delivery._handle, self._engine.Outcome[outcome])
            proto.flow(delivery._key, 1)

        self._raise_if_dead()
        if delivery._generation != self._generation or not self.connected:
            run(None)  # raises: the message will be delivered again
        self._call(run, timeout)

    # -- the I/O thread -------------------------------------------------------------------

    def _main(self) -> None:
        policy = self.options.retry
        backoff = self._backoff = Backoff(policy) if policy is not None else None
        first = self._first
        assert first is not None
        while True:
            self._state(ConnectionState.CONNECTING)
            try:
                self._run_once()
                error: BaseException | None = None
            except BaseException as exc:  # reported to the caller / pending operations
                error = exc
            was_ready = self._ready.is_set()
            self._ready.clear()
            self._protocol = None
            with self._attached:
                self._attached_keys.clear()
            if self._closing.is_set() or error is None:
                self._finish(ConnectionFailedError("the AMQP connection was closed"), None)
                return
            self._last_error = error
            if not first.done():
                first.set_exception(error)
                self._finish(error, error)
                return
            if was_ready:
                self._state(ConnectionState.DISCONNECTED, _as_client_error(error))
            if backoff is None or isinstance(error, _PERMANENT):
                self._finish(error, error)
                return
            backoff.lost()  # after a healthy connection the schedule starts again
            delay = backoff.next_delay()
            if delay is None:
                gave_up = ConnectionFailedError(
                    f"gave up reconnecting to {self.host}:{self.port} after "
                    f"{backoff.attempts} attempts without a healthy connection "
                    f"(RetryPolicy.max_attempts); last error: {error}"
                )
                gave_up.__cause__ = error
                logger.error("%s", gave_up)
                self._finish(gave_up, gave_up)
                return
            logger.warning(
                "AMQP connection to %s:%s lost (%s); reconnecting in %.1f s",
                self.host,
                self.port,
                error,
                delay,
            )
            if self._closing.wait(delay):
                self._finish(ConnectionFailedError("the AMQP connection was closed"), None)
                return

    def _finish(self, error: BaseException, reason: BaseException | None) -> None:
        """No more connections: fail whatever still waits. ``reason``: why, for the
        CLOSED state (None when closed on purpose)."""
        self._state(ConnectionState.CLOSED, reason)
        self._dead = error
        with self._lock:
            sends, self._sends = self._sends, []
            self._commands.clear()
        for item in sends:
            if not item.future.done():
                item.future.set_exception(_as_client_error(error))

    def _run_once(self) -> None:
        began = time.monotonic()
        setup_deadline = began + self._connect_timeout
        tls = self._open_tls(setup_deadline)
        try:
            self._generation += 1
            self._tls_info = getattr(tls, "tls_info", None)
            self._drive(tls, setup_deadline)
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def _open_tls(self, deadline: float) -> ssl.SSLSocket:
        where = f"{self.host}:{self.port}"
        try:
            raw = socket.create_connection((self.host, self.port), self._connect_timeout)
        except OSError as exc:
            raise ConnectionFailedError(f"could not connect to {where}: {exc}") from exc
        try:
            raw.settimeout(max(0.05, deadline - time.monotonic()))
            return self._context.wrap_socket(raw, server_hostname=self.server_hostname)
        except BaseException:
            raw.close()
            raise

    def _new_protocol(self) -> Any:
        eng = self._engine
        engine = eng.Engine(
            container_id=self._container_id,
            hostname=self._open_hostname,
            sasl=self._sasl,
            idle_timeout=self.options.idle_timeout,
        )
        with self._lock:
            specs = list(self._specs.values())
        return eng.ClientProtocol(
            engine,
            specs,
            peer=f"{self.server_hostname} ({self.host}:{self.port})",
            cbs_audience=self._audience if self._provider else None,
        )

    def _drive(self, tls: ssl.SSLSocket, setup_deadline: float) -> None:
        eng = self._engine
        proto = self._new_protocol()
        self._protocol = proto
        with self._attached:
            self._attached_keys.clear()
        tls.setblocking(False)
        token = self._provider.token() if self._provider else None
        renew_at = self._renew_time() if self._provider else math.inf
        proto.open(token)
        outbuf = b""
        write_error: OSError | None = None
        closing_since: float | None = None
        while True:
            # commands from user threads
            with self._lock:
                commands, self._commands = self._commands, deque()
            for fn in commands:
                fn(proto)
            if self._closing.is_set() and closing_since is None:
                closing_since = time.monotonic()
                proto.close()
            # renew the SAS token on the live connection
            if self._provider is not None and proto.ready and time.time() >= renew_at:
                proto.put_token(self._provider.renew())
                renew_at = self._renew_time()
            now = time.monotonic()
            deadline = proto.engine.tick(now)
            for event in proto.events():
                if isinstance(event, eng.Ready):
                    self._on_ready(proto)
                elif isinstance(event, eng.Attached):
                    with self._attached:
                        self._attached_keys.add(event.key)
                        self._attached.notify_all()
                elif isinstance(event, eng.TokenAccepted):
                    self._token_puts += 1
                elif isinstance(event, eng.Settled):
                    self._on_settled(event)
                elif isinstance(event, eng.Received):
                    self._on_received(event)
            # write
            if not outbuf and write_error is None:
                outbuf = proto.engine.output()
            if outbuf:
                try:
                    n = tls.send(outbuf)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    n = 0
                except OSError as exc:
                    # the peer went away: let the engine read what it said before that
                    write_error, outbuf, n = exc, b"", 0
                    self._read(tls, proto)
                    proto.engine.feed_eof()
                    continue
                proto.engine.consumed(n)
                outbuf = outbuf[n:]
                if not outbuf:
                    continue  # there may be more
            if proto.failed is not None:
                if closing_since is not None:
                    return
                raise proto.failed
            if write_error is not None:
                raise ConnectionFailedError(
                    f"connection to {self.host}:{self.port} lost: {write_error}"
                ) from write_error
            if closing_since is not None and (
                proto.engine.closed or time.monotonic() - closing_since > 2.0
            ):
                with contextlib.suppress(OSError, ValueError):
                    tls.setblocking(True)
                    tls.settimeout(1.0)
                    tls.unwrap()
                return
            if not proto.ready and not self._ready.is_set() and now > setup_deadline:
                raise OperationTimeoutError(
                    f"{self.server_hostname} ({self.host}:{self.port}) did not complete the "
                    f"AMQP connection set-up within {self._connect_timeout:g} s: TLS succeeded, "
                    f"then the server stalled waiting for {proto.stage}. Check that the port "
                    "speaks AMQP 1.0 and that the SASL / CBS settings match the server"
                )
            # wait
            waits = [setup_deadline - now if not proto.ready else 1.0, 1.0]
            if deadline:
                waits.append(deadline - now)
            if renew_at < math.inf:
                waits.append(renew_at - time.time())
            wait = max(0.0, min(waits))
            if tls.pending():
                wait = 0.0
            ready = readable(
                [tls.fileno(), self._wake_r.fileno()], [tls.fileno()] if outbuf else [], wait
            )
            if self._wake_r.fileno() in ready:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            if tls.fileno() in ready or tls.pending():
                self._read(tls, proto)

    def _read(self, tls: ssl.SSLSocket, proto: Any) -> None:
        while True:
            try:
                data = tls.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return
            except OSError as exc:
                proto.engine.feed_eof()
                logger.debug("read from %s failed: %s", self.host, exc)
                return
            if not data:
                proto.engine.feed_eof()
                return
            proto.engine.feed(data)
            if not tls.pending():
                return

    def _renew_time(self) -> float:
        provider = self._provider
        assert provider is not None
        return provider.expires_at - self.options.renew_margin * provider.ttl

    def _on_ready(self, proto: Any) -> None:
        first = self._first
        assert first is not None
        if self._ready.is_set():
            return
        if first.done():
            self._reconnects += 1
            logger.info("AMQP connection to %s:%s re-established", self.host, self.port)
        if self._backoff is not None:
            self._backoff.connected()
        self._ready.set()
        self._last_error = None
        self._state(ConnectionState.CONNECTED)
        for hook in list(self._ready_hooks):
            try:
                hook(first.done())
            except Exception:  # a hook's bug must not take the connection down
                logger.exception("an AMQP ready hook failed")
        # (re)send what has no disposition yet: at-least-once across reconnects
        with self._lock:
            pending = [item for item in self._sends if not item.abandoned]
        for item in pending:
            self._submit(proto, item)
        if not first.done():
            first.set_result(None)

    def _on_settled(self, event: Any) -> None:
        item = event.ref
        assert isinstance(item, _Send)
        with self._lock:
            if item in self._sends:
                self._sends.remove(item)
        if item.future.done():
            return
        outcome = event.outcome.value
        if outcome == "accepted":
            item.future.set_result(None)
            return
        reason = f" ({event.reason})" if event.reason else ""
        error = DeliveryError(
            f"{self.server_hostname} did not accept the message: {outcome}{reason}"
        )
        error.outcome = outcome
        item.future.set_exception(error)

    def _on_received(self, event: Any) -> None:
        handle = self._receivers.get(event.key)
        if handle is None:
            return
        message = AmqpMessage._from_proton(event.message)
        if handle._on_message is not None:
            proto = self._protocol
            if proto is not None:
                proto.settle(event.delivery, self._engine.Outcome.ACCEPTED)
                proto.flow(event.key, 1)
            handle._on_message(message)
            return
        delivery = AmqpDelivery(self, self._generation, event.delivery, event.key, message)
        if handle._on_delivery is not None:
            handle._on_delivery(delivery)
            return
        handle._queue.put(delivery)


def _wake_pair() -> tuple[socket.socket, socket.socket]:
    """A socket pair that interrupts the I/O thread's select()."""
    read, write = socket.socketpair()
    read.setblocking(False)
    write.setblocking(False)
    return read, write


def _as_client_error(error: BaseException) -> ClientError:
    if isinstance(error, ClientError):
        return error
    failed = ConnectionFailedError(f"the AMQP connection failed: {error}")
    failed.__cause__ = error
    return failed


# ---------------------------------------------------------------------------------------
# IoT Hub device client
# ---------------------------------------------------------------------------------------


def _settle_delivery(delivery: AmqpDelivery) -> Settler:
    """How a C2D message received over AMQP is settled: by its delivery's disposition
    (IoT Hub: accepted completes, rejected dead-letters, released requeues)."""

    def settle(_message: C2DMessage, how: Settlement) -> None:
        if how is Settlement.COMPLETE:
            delivery.accept()
        elif how is Settlement.REJECT:
            delivery.reject()
        else:
            delivery.release()

    return settle


class AmqpDeviceClient(ClientBase):
    """An IoT Hub device (or module) over AMQP 1.0 on port 5671.

    Build it with :meth:`from_connection_string`, :meth:`from_symmetric_key` or
    :meth:`from_x509`; use it as a context manager or call :meth:`connect` /
    :meth:`close`. Telemetry goes to ``/devices/{id}/messages/events``; cloud-to-device
    messages come from ``/devices/{id}/messages/devicebound``; the device twin
    (``/devices/{id}/twin``) and direct methods (``/devices/{id}/methods/devicebound``)
    use link pairs attached on first use — the first :meth:`get_twin` /
    :meth:`patch_reported`, setting :attr:`on_desired_update`, the first
    :meth:`on_method` — and re-attached after every reconnection.

    :param policy: the :class:`~iothub_tls.TlsPolicy` (default: IoT Hub's guidance).
    :param identity: the device certificate and key (X.509 authentication).
    :param host: / :param port: change only where the TCP connection goes (a local
        endpoint, a port forward); the TLS server name (SNI, certificate check) and the
        AMQP open hostname stay the hub's.
    :param options: :class:`AmqpOptions` (timeouts, retry, credit, token renewal).
    :param sas_token_provider: where SAS tokens come from (default: generated from the
        connection string's key, ``options.sas_ttl`` long).
    :param sasl_external: X.509 devices only: authenticate with SASL EXTERNAL instead of
        connecting without a SASL layer (IoT Hub and its SDKs use none).
    :param model_id: the IoT Plug and Play model the device implements (``dtmi:...``),
        announced on its links (``com.microsoft:model-id``).
    """

    transport = "amqp"

    def __init__(
        self,
        connection_string: ConnectionString,
        *,
        policy: TlsPolicy | None = None,
        identity: ClientIdentity | None = None,
        host: str | None = None,
        port: int | None = None,
        options: AmqpOptions | None = None,
        sas_token_provider: SasTokenProvider | None = None,
        sasl_external: bool = False,
        model_id: str | None = None,
    ) -> None:
        cs = ConnectionString.coerce(connection_string)
        options = AmqpOptions() if options is None else options
        if not isinstance(options, AmqpOptions):
            raise TypeError(f"options must be AmqpOptions, not {type(options).__name__}")
        cs.check_identity(identity)
        connect_host = check_host(host)
        port = check_port(port, AMQPS_PORT)
        provider = None
        if cs.x509:
            sasl: str | None = "EXTERNAL" if sasl_external else None
        else:
            if sasl_external:
                raise PolicyError("sasl_external=True needs an X.509 device (x509=true)")
            provider = sas_token_provider or SasTokenProvider.from_connection_string(
                cs, ttl=options.sas_ttl
            )
            sasl = "ANONYMOUS"
        super().__init__(f"amqp-{cs.client_id}", options.operation_timeout)
        from .. import __version__

        self.connection_string = cs
        kinds = amqpc.LinkKind
        self.events_address = amqpc.link_address(kinds.EVENTS, cs.device_id, cs.module_id)
        self.devicebound_address = amqpc.link_address(kinds.C2D, cs.device_id, cs.module_id)
        client_version = f"iothub-tls/{__version__}"
        link_properties: dict[str, Any] = {amqpc.CLIENT_VERSION_PROPERTY: client_version}
        if model_id is not None:
            # IoT Plug and Play: the model is announced on the links (as the Java SDK does)
            link_properties[amqpc.MODEL_ID_PROPERTY] = check_model_id(model_id)
        self._connection = AmqpConnection(
            connect_host or cs.hostname,
            port,
            policy=policy,
            identity=identity,
            server_hostname=cs.hostname,
            open_hostname=cs.host_name,
            sasl=sasl,
            cbs_token_provider=provider,
            cbs_audience=cs.resource_uri if provider else None,
            options=options,
            on_state=self._set_state,
        )
        self._events = self._connection.sender(
            self.events_address, name="link-snd-events", properties=link_properties
        )
        self._c2d = self._connection.receiver(
            self.devicebound_address,
            name="link-rcv-devicebound",
            credit=options.c2d_credit,
            properties=link_properties,
            on_delivery=self._c2d_delivery,
        )
        self._twin_channel = TwinChannel(
            self._connection,
            amqpc.link_address(kinds.TWIN, cs.device_id, cs.module_id),
            client_version=client_version,
            on_desired=self._incoming_desired,
        )
        self._method_channel = MethodChannel(
            self._connection,
            amqpc.link_address(kinds.METHODS, cs.device_id, cs.module_id),
            client_version=client_version,
            on_request=self._incoming_method,
        )

    # -- what it is ---------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        return self.connection_string.device_id

    @property
    def module_id(self) -> str | None:
        return self.connection_string.module_id

    @property
    def connected(self) -> bool:
        return self._connection.connected

    @property
    def tls_info(self) -> TlsInfo | None:
        """What the current TLS connection negotiated."""
        return self._connection.tls_info

    @property
    def connection(self) -> AmqpConnection:
        """The underlying AMQP connection (reconnect count, token renewals)."""
        return self._connection

    def __repr__(self) -> str:
        conn = self._connection
        return (
            f"<AmqpDeviceClient {self.connection_string.client_id} -> "
            f"{conn.server_hostname} via {conn.host}:{conn.port} ({self.state.value})>"
        )

    # -- lifecycle ------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect, authenticate (CBS put-token or certificate) and attach the links;
        with :attr:`on_desired_update` set, subscribe to desired-property updates.

        The first connection is not retried: its failure is raised here (TLS refusals as
        the core raised them). Later losses are healed in the background and reported to
        ``on_connection_state_change``."""
        self._connection.connect()
        try:
            self._twin_channel.resume(self._connection.operation_timeout)
        except BaseException:
            self._connection.close()
            raise

    def close(self) -> None:
        """Close the connection (messages waiting for the hub fail) and stop the
        callback thread; a later :meth:`connect` starts afresh."""
        self._connection.close()
        self._stop_callbacks()

    # -- messaging ------------------------------------------------------------------------

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
        """Send a device-to-cloud message and wait until the hub accepts it. ``payload``
        is bytes, text or a :class:`~iothub_tls.Message`; a message without an id gets a
        random one (IoT Hub deduplicates nothing, but the id traces a message).

        :raises DeliveryError: the hub rejected or released it.
        :raises OperationTimeoutError: no disposition within ``timeout`` (default:
            ``options.operation_timeout``); while reconnecting the message is sent
            again on the new connection (at-least-once).
        """
        message = Message.coerce(
            payload,
            properties,
            message_id=message_id,
            correlation_id=correlation_id,
            content_type=content_type,
            content_encoding=content_encoding,
        )
        message.check_size()
        amqp_message = amqpc.telemetry_message(
            message.payload,
            message.properties,
            message_id=message.message_id or str(uuid.uuid4()),
            correlation_id=message.correlation_id,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
        )
        self._events.send(amqp_message, timeout)

    def _c2d_delivery(self, delivery: AmqpDelivery) -> None:
        content = amqpc.parse_c2d(delivery.message)
        self._incoming_c2d(
            C2DMessage(
                content.payload,
                content.properties,
                message_id=content.message_id,
                correlation_id=content.correlation_id,
                content_type=content.content_type,
                content_encoding=content.content_encoding,
                delivery_count=delivery.message.delivery_count,
                system_properties={"to": content.to} if content.to else None,
                transport="amqp",
                settler=_settle_delivery(delivery),
            )
        )

    def receive_c2d(self, timeout: float | None = None) -> C2DMessage:
        """The next cloud-to-device message (those not taken by :attr:`on_c2d`). Settle
        it with ``complete()``, ``reject()`` or ``abandon()``; up to
        ``options.c2d_credit`` messages are prefetched, and each settlement lets the hub
        send one more. A message not settled before the connection is lost is delivered
        again.

        :raises OperationTimeoutError: none arrived within ``timeout`` seconds (default:
            ``options.operation_timeout``).
        """
        return self._receive_c2d(timeout)

    # -- device twin ----------------------------------------------------------------------

    def get_twin(self, timeout: float | None = None) -> dict[str, Any]:
        """The device twin: ``{"desired": {...}, "reported": {...}}``.

        :raises OperationTimeoutError: no answer within ``timeout`` (default:
            ``options.operation_timeout``).
        :raises NotAuthorizedError: status 401/403.
        :raises DeliveryError: another error status (429, 5xx, ...), or a twin document
            that is not a JSON object.
        """
        response = self._twin_channel.request(amqpc.TwinOperation.GET, None, timeout)
        return decode_twin_document(response.body)

    def patch_reported(self, patch: Mapping[str, Any], timeout: float | None = None) -> int | None:
        """Update reported properties (``None`` deletes one); return the twin's new
        reported ``$version`` when the hub says it.

        :raises TypeError: ``patch`` is not a JSON-serialisable mapping.
        :raises OperationTimeoutError: no answer within ``timeout``.
        :raises NotAuthorizedError: status 401/403.
        :raises DeliveryError: the hub refused it (e.g. 400, malformed).
        """
        body = encode_reported_patch(patch)
        response = self._twin_channel.request(amqpc.TwinOperation.PATCH, body, timeout)
        return response.version

    def _desired_callback_changed(self) -> None:
        """Setting ``on_desired_update`` subscribes to the updates (on a live connection,
        before the setter returns; else at connect)."""
        if self.on_desired_update is not None:
            self._start_desired_updates()

    def _start_desired_updates(self) -> None:
        """Attach the twin links and subscribe to desired-property updates (now on a live
        connection, else at connect); idempotent."""
        self._twin_channel.subscribe_desired(self._connection.operation_timeout)

    # -- direct methods -------------------------------------------------------------------

    def _methods_changed(self) -> None:
        """Registering a handler attaches the method links."""
        if self._methods:
            self._start_methods()

    def _start_methods(self) -> None:
        """Attach the method links (now on a live connection, else at connect);
        idempotent."""
        self._method_channel.attach(self._connection.operation_timeout)
