"""An AMQP 1.0 connection on an asyncio event loop, with links that survive reconnects:
:class:`AmqpConnection` of :mod:`iothub_tls.amqp.aio`, the layer the device client is
built on.

Each (re)connection is a :class:`~iothub_tls.amqp.wire.Wire`: asyncio's TLS connection
with the hardened context, and python-qpid-proton's engine driven over it without I/O
(:mod:`.engine`). This module keeps what outlives one connection: the declared links
(attached again on every connection), messages waiting for their disposition (sent
again after a reconnection: at-least-once), receivers, the SAS token's renewal (a loop
timer), and the connection's life.

One supervisor task per connection makes the connection, serves it until it ends and,
after a loss, reconnects as ``AmqpOptions.retry`` says (a
:class:`~iothub_tls._io.backoff.Backoff` over a :class:`~iothub_tls.RetryPolicy`). Each
attempt's set-up (TCP, TLS, SASL, open, CBS put-token, link attach) runs inside the
process's :class:`~iothub_tls._io.loop.HandshakeGate`, and its timeout starts when the
gate lets it through.

All state is the loop's: every method runs on the loop, except :meth:`_settle`, which
a thread may call (it runs the settlement on the loop and waits), and :meth:`_post_item`,
which threads schedule with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any

from .._io.backoff import Backoff
from .._io.loop import HandshakeGate, LoopLag, overload_hint
from .._io.proxy import Proxy, proxy_for
from ..auth import ClientIdentity, SasTokenProvider
from ..device import ConnectionState
from ..errors import (
    ClientError,
    ConnectionFailedError,
    DeliveryError,
    OperationTimeoutError,
    PolicyError,
)
from ..policy import TlsPolicy
from ..tls.context import HardenedSSLContext, create_ssl_context
from ..tls.info import TlsInfo
from .links import AmqpDelivery, AmqpReceiver, AmqpSender, Outgoing, resolve
from .message import AmqpMessage
from .options import AMQPS_PORT, PERMANENT, AmqpOptions, check_sasl
from .wire import Wire, open_wire

__all__ = ["AmqpConnection"]

logger = logging.getLogger("iothub_tls.amqp")

StateCallback = Callable[[ConnectionState, "BaseException | None"], None]

#: How long a clean close waits for the peer's close frame, then for the TCP close.
_CLOSE_WAIT = 2.0
_LINGER = 1.0


def _engine() -> Any:
    """Import the proton-based engine lazily (the ``amqp`` extra is optional)."""
    from . import engine as amqp_engine

    return amqp_engine


def _as_client_error(error: BaseException) -> ClientError:
    if isinstance(error, ClientError):
        return error
    failed = ConnectionFailedError(f"the AMQP connection failed: {error}")
    failed.__cause__ = error
    return failed


def renewal_delay(expires_at: float, ttl: float, margin: float, now: float, draw: float) -> float:
    """Seconds from ``now`` until a SAS token that expires at ``expires_at`` (``ttl``
    seconds long) is renewed: when ``margin`` of its life is left (0.2: at 80 % of its
    life), brought forward by ``draw`` (uniform in [0, 1)) times half that margin, so
    that tokens made together are not all renewed together."""
    reserve = margin * ttl
    return max(0.0, expires_at - reserve - reserve / 2 * min(max(draw, 0.0), 1.0) - now)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (a message whose sender stopped waiting)."""
    if not future.cancelled():
        future.exception()


class AttachedLinks:
    """The links the peer has attached on the current connection, and who waits for
    which of them (a connection's, or one device's on a shared connection)."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self._waiters: list[tuple[frozenset[str], asyncio.Future[None]]] = []

    def clear(self) -> None:
        """A new connection: nothing is attached on it yet."""
        self.keys.clear()

    def add(self, key: str) -> None:
        self.keys.add(key)
        for wanted, waiter in list(self._waiters):
            if wanted <= self.keys and not waiter.done():
                waiter.set_result(None)

    async def wait(
        self,
        keys: Collection[str],
        timeout: float,
        finished: asyncio.Future[Any] | None,
        *,
        attached_will_do: bool = True,
    ) -> bool:
        """Wait until the links ``keys`` are attached; False when they were not within
        ``timeout`` seconds, or ``finished`` (the connection's end) came first. With
        ``attached_will_do=False``, links attached already count only once another one
        is attached (the caller is not ready to use them yet)."""
        wanted = frozenset(keys)
        if attached_will_do and wanted <= self.keys:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (wanted, waiter)
        self._waiters.append(entry)
        waits: set[asyncio.Future[Any]] = {waiter}
        if finished is not None:
            waits.add(finished)
        try:
            await asyncio.wait(waits, timeout=max(timeout, 0.0), return_when="FIRST_COMPLETED")
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
        return waiter.done() and not waiter.cancelled()


class _Reporting:
    """What a connection, and a device's view of a shared one, report the same way: its
    state (told to ``on_state``), its reconnections, its put-tokens and why it stopped."""

    _state_now: ConnectionState
    _on_state: StateCallback | None
    _reconnects: int
    _token_puts: int
    _failure: BaseException | None

    @property
    def state(self) -> ConnectionState:
        return self._state_now

    @property
    def reconnects(self) -> int:
        """How many times it came back (after a lost connection, or a detach of a
        device's links on a shared connection)."""
        return self._reconnects

    @property
    def failure(self) -> BaseException | None:
        """The error that made it stop for good (refused credentials or certificate,
        ``RetryPolicy.max_attempts`` used up); None otherwise."""
        return self._failure

    @property
    def token_puts(self) -> int:
        """How many CBS put-token requests were accepted (first one and renewals)."""
        return self._token_puts

    def _state(self, state: ConnectionState, reason: BaseException | None = None) -> None:
        self._state_now = state
        if self._on_state is not None:
            try:
                self._on_state(state, reason)
            except Exception:  # a callback's bug must not take the connection down
                logger.exception("the on_state callback of %r failed", self)


class AmqpConnection(_Reporting):
    """An AMQP 1.0 connection over the hardened TLS context, with links that survive
    reconnects, for asyncio applications.

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
    :param on_state: called on the loop with ``(state, reason)`` at each
        :class:`~iothub_tls.ConnectionState` change; it must not block.
    :param gate: the :class:`~iothub_tls._io.loop.HandshakeGate` that bounds the
        connection set-ups running at once (share one among a process's connections).
    :param lag: the loop's :class:`~iothub_tls._io.loop.LoopLag`, to say so in a timeout
        when the process, not the peer, was slow.
    :param websockets: AMQP over WebSockets (path ``/$iothub/websocket``, subprotocol
        ``AMQPWSB10``; pass the port, usually 443).
    :param proxy: a proxy URL (``http://``, ``socks5://``, ``socks4://``) or ``"env"``
        (:mod:`iothub_tls._io.proxy`); TLS runs end to end through it.
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
        on_state: StateCallback | None = None,
        gate: HandshakeGate | None = None,
        lag: LoopLag | None = None,
        websockets: bool = False,
        proxy: str | Proxy | None = None,
    ) -> None:
        check_sasl(sasl, username, password, identity, context)
        if websockets:
            from .websocket import require_websockets

            require_websockets()
        if context is not None and (policy is not None or identity is not None):
            raise PolicyError("pass either context or policy/identity, not both")
        options = options or AmqpOptions()
        if not isinstance(options, AmqpOptions):
            raise PolicyError(f"options must be an AmqpOptions, not {type(options).__name__}")
        self._engine = _engine()  # MissingDependencyError now, not on the loop
        self.host = host
        self.port = int(port)
        #: AMQP over WebSockets (``wss://{host}/$iothub/websocket``, ``AMQPWSB10``)
        self.websockets = bool(websockets)
        #: the proxy the connection goes through (None: direct)
        self.proxy = proxy_for(proxy, host, self.port)
        # One context for the connection's lifetime: it remembers TLS sessions, so every
        # reconnection resumes (fewer bytes and less CPU on both sides).
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
        self._on_state = on_state
        self._gate = gate or HandshakeGate()
        self._lag = lag
        # declared links (kept across connections)
        self._specs: dict[str, Any] = {}
        self._receivers: dict[str, AmqpReceiver] = {}
        self._ready_hooks: list[Callable[[bool], None]] = []
        # the life cycle (loop only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._closing_signal: asyncio.Future[None] | None = None
        self._finished: asyncio.Future[None] | None = None
        self._closing = False
        self._dead: BaseException | None = None
        self._failure: BaseException | None = None
        self._last_error: BaseException | None = None
        self._backoff: Backoff | None = None
        self._gate_wait = False
        self._state_now = ConnectionState.CLOSED
        # the current connection (loop only)
        self._wire: Wire | None = None
        self._protocol: Any = None
        self._generation = 0
        self._ready = False
        self._ready_signal: asyncio.Future[None] | None = None
        self._tls_info: TlsInfo | None = None
        self._attached = AttachedLinks()
        self._sends: dict[Outgoing, None] = {}  # waiting for a disposition, in order
        self._renew_handle: asyncio.TimerHandle | None = None
        # counters
        self._reconnects = 0
        self._token_puts = 0

    # -- what it is -----------------------------------------------------------------------

    @property
    def tls_info(self) -> TlsInfo | None:
        """What the current (or last) TLS connection negotiated."""
        return self._tls_info

    @property
    def ssl_context(self) -> HardenedSSLContext:
        return self._context

    @property
    def connected(self) -> bool:
        return self._ready and self._dead is None

    @property
    def _running(self) -> bool:
        """The supervisor runs: connected, or reconnecting."""
        return self._task is not None and not self._task.done()

    def __repr__(self) -> str:
        return (
            f"<AmqpConnection {self.server_hostname} via {self.host}:{self.port}"
            f"{' (websockets)' if self.websockets else ''}"
            f"{f' through {self.proxy.url}' if self.proxy else ''} {self._state_now.value}>"
        )

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            if isinstance(self._dead, ClientError):
                raise self._dead
            raise ConnectionFailedError(f"the AMQP connection failed: {self._dead}") from (
                self._dead
            )
        if self._task is None:
            raise ConnectionFailedError("not connected: call connect() first")

    def _timeout_text(self, what: str, timeout: float) -> str:
        hint = overload_hint(self._lag, 0.0)
        if self.connected:
            return f"{what} did not arrive within {timeout:g} s{hint}"
        last = f" (last error: {self._last_error})" if self._last_error else ""
        return (
            f"{what} did not arrive within {timeout:g} s: the connection to "
            f"{self.host}:{self.port} is being re-established{last}{hint}"
        )

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
        ``on_message`` on the loop (for protocol code that must not block: it only
        hands the message on); :meth:`AmqpReceiver.receive` then gets nothing. With
        ``on_delivery``, each unsettled delivery is handed over instead (on the loop
        too): whoever takes it settles it.
        """
        if isinstance(credit, bool) or not (isinstance(credit, int) and credit >= 1):
            raise PolicyError(f"credit must be a positive integer, not {credit!r}")
        key = name or f"rcv-{address}-{uuid.uuid4().hex[:8]}"
        spec = self._engine.LinkSpec(key, address, False, key, dict(properties or {}), credit)
        handle = AmqpReceiver(self, key, address, on_message, on_delivery)
        self._declare(spec)
        self._receivers[key] = handle
        return handle

    def _declare(self, spec: Any) -> None:
        if spec.key in self._specs:
            raise PolicyError(f"a link named {spec.key!r} already exists")
        self._specs[spec.key] = spec
        if self._protocol is not None:
            self._protocol.add_link(spec)  # attached now if the others already are
            self._kick()

    async def _wait_attached(self, keys: Collection[str], timeout: float) -> bool:
        """Wait until the peer attached the links ``keys`` on the current connection;
        False when it did not within ``timeout`` seconds (or the connection ended)."""
        return await self._attached.wait(keys, timeout, self._finished)

    def _on_ready_hook(self, hook: Callable[[bool], None]) -> None:
        """Call ``hook(reconnected)`` on the loop each time the connection (CBS and every
        declared link included) is ready, before unsettled messages are sent again. The
        hook must not block."""
        self._ready_hooks.append(hook)

    # -- life cycle -----------------------------------------------------------------------

    async def __aenter__(self) -> AmqpConnection:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, authenticate and attach the declared links.

        :raises ConnectionFailedError: TCP connection refused or lost during set-up, or
            already connected.
        :raises iothub_tls.TLSHandshakeError: (and subclasses) TLS refused; a peer that
            stalls the handshake raises :class:`~iothub_tls.HandshakeTimeoutError`.
        :raises AuthenticationError: SASL or the CBS put-token was refused.
        :raises OperationTimeoutError: the peer stalled SASL, open, CBS or attach.
        """
        if self._running:
            raise ConnectionFailedError("already connected: call close() before connect()")
        loop = self._loop = asyncio.get_running_loop()
        self._closing = False
        self._dead = None
        self._failure = None
        self._last_error = None
        self._ready = False
        self._first = loop.create_future()
        self._closing_signal = loop.create_future()
        self._finished = loop.create_future()
        self._task = loop.create_task(
            self._supervise(), name=f"iothub-tls-amqp-{self.host}:{self.port}"
        )
        try:
            await asyncio.shield(self._first)
        except asyncio.CancelledError:
            await self.close()
            raise

    async def close(self, timeout: float = 5.0) -> None:
        """Close the connection (an AMQP close, then TLS close_notify) and stop.
        Messages still waiting for a disposition fail with
        :class:`~iothub_tls.ConnectionFailedError`."""
        self._closing = True
        task = self._task
        if task is None:
            return
        signal = self._closing_signal
        if signal is not None and not signal.done():
            signal.set_result(None)
        if task.done():
            return
        if self._gate_wait:  # not started yet: nothing to close cleanly
            task.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the supervisor -------------------------------------------------------------------

    async def _supervise(self) -> None:
        policy = self.options.retry
        backoff = self._backoff = Backoff(policy) if policy is not None else None
        first = self._first
        assert first is not None
        try:
            while True:
                self._state(ConnectionState.CONNECTING)
                error: BaseException | None = None
                try:
                    await self._run_once()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # reported to the caller / pending operations
                    error = exc
                was_ready = self._ready
                self._drop_connection()
                if self._closing or error is None:
                    self._finish(ConnectionFailedError("the AMQP connection was closed"), None)
                    return
                self._last_error = error
                if not first.done():
                    self._finish(error, error)
                    return
                if was_ready:
                    self._state(ConnectionState.DISCONNECTED, _as_client_error(error))
                if backoff is None or isinstance(error, PERMANENT):
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
                if await self._pause(delay):
                    self._finish(ConnectionFailedError("the AMQP connection was closed"), None)
                    return
        except asyncio.CancelledError:
            self._drop_connection()
            self._finish(ConnectionFailedError("the AMQP connection was closed"), None)
            if not self._closing:
                raise
        except BaseException as exc:  # pragma: no cover - a bug must not leave callers hanging
            logger.exception("the AMQP connection's task failed")
            self._drop_connection()
            self._finish(exc, exc)
            raise

    async def _pause(self, delay: float) -> bool:
        """Wait between attempts; True when close() was called meanwhile."""
        signal = self._closing_signal
        if self._closing or signal is None:
            return True
        await asyncio.wait({signal}, timeout=delay)
        return self._closing

    def _finish(self, error: BaseException, reason: BaseException | None) -> None:
        """No more connections: fail whatever still waits. ``reason``: why, for the
        CLOSED state (None when closed on purpose)."""
        self._dead = error
        self._failure = reason
        self._ready = False
        first = self._first
        if first is not None and not first.done():
            first.set_exception(error)
            _retrieve(first)
        sends, self._sends = list(self._sends), {}
        for item in sends:
            resolve(item.waiter, _as_client_error(error))
        finished = self._finished
        if finished is not None and not finished.done():
            finished.set_result(None)
        self._state(ConnectionState.CLOSED, reason)

    async def _run_once(self) -> None:
        """One connection: set it up (inside the handshake gate), then serve it until
        it ends. Returns after a clean close; raises what ended it otherwise."""
        loop = asyncio.get_running_loop()
        queued = loop.time()
        self._gate_wait = True
        try:
            async with self._gate.slot():
                self._gate_wait = False
                waited = loop.time() - queued
                deadline = loop.time() + self._connect_timeout
                wire = await open_wire(
                    self._on_event,
                    host=self.host,
                    port=self.port,
                    context=self._context,
                    server_hostname=self.server_hostname,
                    budget=deadline - loop.time(),
                    lag=self._lag,
                    waited=waited,
                    websockets=self.websockets,
                    proxy=self.proxy,
                )
                if self._closing:
                    wire.abort()
                    return
                await self._set_up(wire, deadline, waited)
        finally:
            self._gate_wait = False
        if self._ready:
            await self._serve(wire)

    def _new_protocol(self) -> Any:
        eng = self._engine
        engine = eng.Engine(
            container_id=self._container_id,
            hostname=self._open_hostname,
            sasl=self._sasl,
            idle_timeout=self.options.idle_timeout,
        )
        return eng.ClientProtocol(
            engine,
            list(self._specs.values()),
            peer=f"{self.server_hostname} ({self.host}:{self.port})",
            cbs_audience=self._audience if self._provider else None,
        )

    async def _set_up(self, wire: Wire, deadline: float, waited: float) -> None:
        """SASL, open, CBS and attach on ``wire``, until the connection is ready."""
        loop = asyncio.get_running_loop()
        self._generation += 1
        self._wire = wire
        self._tls_info = wire.tls_info
        self._attached.clear()
        proto = self._protocol = self._new_protocol()
        ready = self._ready_signal = loop.create_future()
        try:
            token = self._provider.token() if self._provider else None
        except BaseException:
            wire.abort()
            raise
        wire.start(proto, token)
        signal = self._closing_signal
        assert signal is not None
        waits: set[asyncio.Future[Any]] = {ready, wire.done, signal}
        done, _ = await asyncio.wait(
            waits, timeout=max(0.0, deadline - loop.time()), return_when="FIRST_COMPLETED"
        )
        if ready in done or self._ready:
            return
        if wire.done in done:
            raise self._ended(wire)
        wire.abort()
        if signal in done:
            return  # closed while connecting
        raise OperationTimeoutError(
            f"{self.server_hostname} ({self.host}:{self.port}) did not complete the AMQP "
            f"connection set-up within {self._connect_timeout:g} s: TLS succeeded, then the "
            f"server stalled waiting for {proto.stage}. Check that the port speaks AMQP 1.0 "
            "and that the SASL / CBS settings match the server" + overload_hint(self._lag, waited)
        )

    def _ended(self, wire: Wire) -> BaseException:
        """Why the connection on ``wire`` ended."""
        error = wire.done.result() if wire.done.done() else None
        if error is not None:
            return error
        return ConnectionFailedError(f"the connection to {self.host}:{self.port} was closed")

    async def _serve(self, wire: Wire) -> None:
        """Until the connection ends: return after close(), raise what ended it."""
        signal = self._closing_signal
        assert signal is not None
        waits: set[asyncio.Future[Any]] = {wire.done, signal}
        done, _ = await asyncio.wait(waits, return_when="FIRST_COMPLETED")
        if wire.done in done and not self._closing:
            raise self._ended(wire)
        await wire.close(_CLOSE_WAIT, _LINGER)

    def _drop_connection(self) -> None:
        """Forget the current connection (aborting its transport if still open)."""
        wire, self._wire = self._wire, None
        self._protocol = None
        self._ready = False
        self._attached.clear()
        if self._renew_handle is not None:
            self._renew_handle.cancel()
            self._renew_handle = None
        if wire is not None:
            wire.stop()
            if not wire.lost.done():
                wire.abort()

    def _kick(self) -> None:
        """Pump the current connection's engine soon."""
        if self._wire is not None:
            self._wire.kick()

    # -- the engine's events --------------------------------------------------------------

    def _on_event(self, event: Any) -> None:
        eng = self._engine
        if isinstance(event, eng.Received):
            self._on_received(event)
        elif isinstance(event, eng.Settled):
            self._on_settled(event)
        elif isinstance(event, eng.Attached):
            self._attached.add(event.key)
        elif isinstance(event, eng.Ready):
            self._on_ready()
        elif isinstance(event, eng.TokenAccepted):
            self._token_puts += 1
            self._schedule_renewal()

    def _on_ready(self) -> None:
        first = self._first
        assert first is not None
        if self._ready:
            return
        reconnected = first.done()
        if reconnected:
            self._reconnects += 1
            logger.info("AMQP connection to %s:%s re-established", self.host, self.port)
        if self._backoff is not None:
            self._backoff.connected()
        self._ready = True
        self._last_error = None
        self._state(ConnectionState.CONNECTED)
        for hook in list(self._ready_hooks):
            try:
                hook(reconnected)
            except Exception:  # a hook's bug must not take the connection down
                logger.exception("an AMQP ready hook failed")
        # (re)send what has no disposition yet: at-least-once across reconnects
        for item in list(self._sends):
            self._submit(item)
        if self._ready_signal is not None and not self._ready_signal.done():
            self._ready_signal.set_result(None)
        if not first.done():
            first.set_result(None)

    # -- the SAS token --------------------------------------------------------------------

    def _schedule_renewal(self) -> None:
        """Put a fresh token when ``renew_margin`` of the current one's life is left,
        less a random part of half that margin (renewals of devices that connected
        together spread out instead of arriving at the hub at once)."""
        provider, loop = self._provider, self._loop
        if provider is None or loop is None or not provider.renewable:
            return  # a ready-made token: the hub ends the connection when it expires
        if self._renew_handle is not None:
            self._renew_handle.cancel()
        delay = renewal_delay(
            provider.expires_at,
            provider.ttl,
            self.options.renew_margin,
            time.time(),
            random.random(),  # noqa: S311 - jitter, not a secret
        )
        self._renew_handle = loop.call_later(delay, self._renew, self._protocol)

    def _renew(self, proto: Any) -> None:
        self._renew_handle = None
        provider = self._provider
        if provider is None or proto is not self._protocol or not self._ready:
            return
        try:
            token = provider.renew()
        except ClientError as exc:
            if self._wire is not None:
                self._wire.end(exc)
            return
        proto.put_token(token)
        self._kick()

    # -- messages -------------------------------------------------------------------------

    def _post(self, key: str, message: AmqpMessage) -> Outgoing:
        """Queue ``message`` on link ``key`` without waiting; its ``waiter`` (an asyncio
        future) completes with the disposition."""
        self._raise_if_dead()
        assert self._loop is not None
        waiter: asyncio.Future[None] = self._loop.create_future()
        waiter.add_done_callback(_retrieve)
        item = Outgoing(key, bytes(message._to_proton().encode()), waiter)
        self._sends[item] = None
        self._submit(item)
        return item

    def _post_item(self, item: Outgoing) -> None:
        """Queue a message a thread made (scheduled on the loop with
        ``call_soon_threadsafe``)."""
        if item.waiter.done():
            return
        if self._dead is not None or self._task is None:
            try:
                self._raise_if_dead()
            except ClientError as exc:
                resolve(item.waiter, exc)
            return
        self._sends[item] = None
        self._submit(item)

    async def _send(self, key: str, message: AmqpMessage, timeout: float | None) -> None:
        timeout = self.operation_timeout if timeout is None else timeout
        item = self._post(key, message)
        waiter = item.waiter
        assert isinstance(waiter, asyncio.Future)
        # (not wait_for: the error a waiter holds may itself be a TimeoutError)
        await asyncio.wait({waiter}, timeout=max(timeout, 0.0))
        if not waiter.done():
            self._abandon(item)
            raise OperationTimeoutError(
                self._timeout_text("the disposition of the message", timeout)
            )
        waiter.result()

    def _abandon(self, item: Outgoing) -> None:
        """Stop sending ``item`` (its sender gave up waiting)."""
        item.abandoned = True
        self._sends.pop(item, None)

    def _submit(self, item: Outgoing) -> None:
        proto = self._protocol
        if proto is not None and self._ready and not item.abandoned:
            if item.generation != self._generation:
                item.generation = self._generation
                proto.send(item.key, item.payload, item)
                self._kick()

    def _on_settled(self, event: Any) -> None:
        item = event.ref
        assert isinstance(item, Outgoing)
        self._sends.pop(item, None)
        outcome = event.outcome.value
        if outcome == "accepted":
            resolve(item.waiter)
            return
        reason = f" ({event.reason})" if event.reason else ""
        error = DeliveryError(
            f"{self.server_hostname} did not accept the message: {outcome}{reason}"
        )
        error.outcome = outcome
        resolve(item.waiter, error)

    def _on_received(self, event: Any) -> None:
        handle = self._receivers.get(event.key)
        if handle is None:
            return
        message = AmqpMessage._from_proton(event.message)
        try:
            if handle._on_message is not None:
                proto = self._protocol
                proto.settle(event.delivery, self._engine.Outcome.ACCEPTED)
                proto.flow(event.key, 1)
                handle._on_message(message)
                return
            delivery = AmqpDelivery(self, self._generation, event.delivery, event.key, message)
            if handle._on_delivery is not None:
                handle._on_delivery(delivery)
                return
        except Exception:  # a handler's bug must not take the connection down
            logger.exception("the handler of messages on link %s failed", event.key)
            return
        handle._deliveries().put_nowait(delivery)

    def _settle(self, delivery: AmqpDelivery, outcome: str, timeout: float | None) -> None:
        """Settle ``delivery``: now on the loop, else on the loop while the calling
        thread waits (up to ``timeout``)."""
        loop = self._loop
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop or loop is None or loop.is_closed():
            self._settle_now(delivery, outcome)
            return
        self._raise_if_dead()
        wait = self.operation_timeout if timeout is None else timeout
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            if not done.set_running_or_notify_cancel():
                return
            try:
                self._settle_now(delivery, outcome)
            except BaseException as exc:  # handed to the waiting thread
                done.set_exception(exc)
            else:
                done.set_result(None)

        loop.call_soon_threadsafe(run)
        try:
            # exception() hands back the settlement's own error instead of raising it,
            # so only this wait's timeout is a TimeoutError here
            error = done.exception(wait)
        except concurrent.futures.TimeoutError:
            done.cancel()
            raise OperationTimeoutError(
                self._timeout_text(f"the settlement ({outcome.lower()})", wait)
            ) from None
        if error is not None:
            raise error

    def _settle_now(self, delivery: AmqpDelivery, outcome: str) -> None:
        self._raise_if_dead()
        proto = self._protocol
        if proto is None or delivery._generation != self._generation or not self._ready:
            raise DeliveryError(
                f"cannot settle ({outcome.lower()}): the connection on which the message "
                "arrived was lost; the peer will deliver it again"
            )
        proto.settle(delivery._handle, self._engine.Outcome[outcome])
        proto.flow(delivery._key, 1)
        self._kick()
