"""One AMQP connection's TLS connection, with the engine driven over it: :class:`Wire`.

:func:`open_wire` makes the TCP and TLS connection with asyncio
(:func:`iothub_tls._io.tls.open_tls`: the hardened context's SSLObject over memory
BIOs, so the core's checks run inside the handshake and its refusals come out unchanged,
a stalled handshake is :class:`~iothub_tls.HandshakeTimeoutError`, and a connection
holds no 256 KiB read buffer). The :class:`Wire` then feeds what it
receives to the client's AMQP engine (:class:`~iothub_tls.amqp.engine.ClientProtocol`),
hands each event to its owner and writes what the engine has to send, in the same turn
of the loop. The engine's next deadline (heartbeat, idle timeout) is one loop timer:
nothing polls.

A wire lives for one connection; :class:`~iothub_tls.amqp.connection.AmqpConnection`
makes a new one for every (re)connection. Everything here runs on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._io.loop import LoopLag, overload_hint, wait_for
from .._io.tls import open_tls
from ..errors import ConnectionFailedError, HandshakeTimeoutError, IoTHubTLSError
from ..tls.context import HardenedSSLContext
from ..tls.info import TlsInfo

if TYPE_CHECKING:
    from .._io.proxy import Proxy

__all__ = ["Wire", "open_wire"]


class Wire(asyncio.Protocol):
    """One TLS connection and the AMQP engine driven over it.

    ``on_event`` is called on the loop with each of the engine's
    :data:`~iothub_tls.amqp.engine.ClientEvent` values. ``done`` completes when the AMQP
    connection is over (with the error that ended it, or None), ``lost`` when the
    transport is gone.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_event: Callable[[Any], None], where: str
    ) -> None:
        self.loop = loop
        self.where = where
        self.transport: asyncio.Transport | None = None
        self.protocol: Any = None  # the ClientProtocol, from start() until stop()
        self.done: asyncio.Future[BaseException | None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self._on_event = on_event
        self._pumping = False
        self._again = False
        self._kicked = False
        self._tick: asyncio.TimerHandle | None = None
        self._tick_at = 0.0

    # -- the transport's side ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.protocol is not None:
            self.protocol.engine.feed(data)
            self.pump()

    def eof_received(self) -> bool:
        if self.protocol is not None:
            self.protocol.engine.feed_eof()
            self.pump()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        proto = self.protocol
        if proto is not None and not self.done.done():
            proto.engine.feed_eof()  # let the engine say why, if it can
            self.pump()
            error = proto.failed or ConnectionFailedError(
                f"connection to {self.where} lost"
                + (f": {type(exc).__name__}: {exc}" if exc is not None else "")
            )
            if exc is not None and error.__cause__ is None:
                error.__cause__ = exc
            self.end(error)
        self.end(None)
        self.stop()

    # -- the owner's side -------------------------------------------------------------------

    @property
    def tls_info(self) -> TlsInfo | None:
        if self.transport is None:
            return None
        found = getattr(self.transport.get_extra_info("ssl_object"), "tls_info", None)
        return found if isinstance(found, TlsInfo) else None

    def start(self, protocol: Any, token: str | None) -> None:
        """Open the AMQP connection (SASL, open, CBS with ``token``) on this wire."""
        self.protocol = protocol
        protocol.open(token)
        self.pump()

    def stop(self) -> None:
        """Stop driving the engine (nothing more is fed to it or reported)."""
        self.protocol = None
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None

    def end(self, error: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_result(error)

    def abort(self) -> None:
        """Drop the connection now (no close frame, no close_notify)."""
        self.end(None)
        self.stop()
        if self.transport is not None:
            self.transport.abort()

    async def close(self, close_wait: float, linger: float) -> None:
        """A clean close: the AMQP close frame, the peer's answer (up to ``close_wait``
        seconds), then TLS close_notify and the TCP close (up to ``linger`` more)."""
        proto = self.protocol
        if proto is not None and not self.done.done():
            proto.close()
            self.pump()
            waits: set[asyncio.Future[Any]] = {self.done}
            await asyncio.wait(waits, timeout=close_wait)
        self.stop()
        transport = self.transport
        if transport is None:
            return
        transport.close()
        lost: set[asyncio.Future[Any]] = {self.lost}
        await asyncio.wait(lost, timeout=linger)
        if not self.lost.done():
            transport.abort()

    # -- the engine -------------------------------------------------------------------------

    def kick(self) -> None:
        """Pump the engine soon: once, however many commands this turn of the loop
        brings."""
        if self._kicked or self.protocol is None:
            return
        self._kicked = True
        self.loop.call_soon(self._kicked_pump)

    def _kicked_pump(self) -> None:
        self._kicked = False
        self.pump()

    def pump(self) -> None:
        """Run the engine: its timers, its events, then write what it has to send; again
        until it is quiet. A call from an event handler only asks for one more round."""
        if self._pumping:
            self._again = True
            return
        proto = self.protocol
        if proto is None:
            return
        engine = proto.engine
        self._pumping = True
        try:
            deadline = engine.tick(self.loop.time())
            while True:
                self._again = False
                events = proto.events()
                for event in events:
                    self._on_event(event)
                    if self.protocol is not proto:
                        return  # a handler ended this connection
                out = engine.output()
                if out:
                    self._write(out)
                    engine.consumed(len(out))
                if not events and not out and not self._again:
                    break
        finally:
            self._pumping = False
        if proto.failed is not None:
            self.end(proto.failed)
            return
        self._schedule_tick(deadline)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _schedule_tick(self, deadline: float) -> None:
        """One loop timer for the engine's next deadline (heartbeat or idle timeout); a
        later deadline leaves the timer alone (the tick then finds the new one)."""
        if deadline <= 0:
            return
        if self._tick is not None:
            if self._tick_at <= deadline:
                return
            self._tick.cancel()
        self._tick_at = deadline
        self._tick = self.loop.call_at(deadline, self._on_tick)

    def _on_tick(self) -> None:
        self._tick = None
        self.pump()


async def open_wire(
    on_event: Callable[[Any], None],
    *,
    host: str,
    port: int,
    context: HardenedSSLContext,
    server_hostname: str,
    budget: float,
    lag: LoopLag | None,
    waited: float,
    websockets: bool = False,
    proxy: Proxy | None = None,
) -> Wire:
    """TCP and TLS to ``host:port`` within ``budget`` seconds: a wire ready for AMQP.
    With ``websockets``, the WebSocket upgrade too (:mod:`.websocket`: AMQP over
    WebSockets); with ``proxy``, TCP is a tunnel through that proxy.

    :raises iothub_tls.TLSHandshakeError: (and the core's other refusals) unchanged;
        a stalled handshake as :class:`~iothub_tls.HandshakeTimeoutError`.
    :raises ConnectionFailedError: TCP failed or took too long, or the WebSocket upgrade
        was refused.
    :raises iothub_tls.ProxyError: the proxy could not be reached or refused the tunnel.
    """
    loop = asyncio.get_running_loop()
    where = f"{host}:{port}"
    wire = Wire(loop, on_event, where)
    budget = max(0.05, budget)
    inner: asyncio.Protocol = wire
    if websockets:
        from .websocket import websocket_layer

        inner = ws = websocket_layer(wire, server_hostname)
    started = loop.time()
    try:
        layer = await open_tls(
            inner,
            host,
            port,
            context=context,
            server_hostname=server_hostname,
            connect_timeout=budget,
            handshake_timeout=budget,
            proxy=proxy,
        )
        if websockets:
            try:
                await wait_for(ws.upgraded, max(0.05, budget - (loop.time() - started)))
            except BaseException:
                layer.abort()
                raise
    except IoTHubTLSError as exc:
        # the core's TLS refusals, unchanged (a stalled handshake: say if we were slow)
        if isinstance(exc, HandshakeTimeoutError) and (hint := overload_hint(lag, waited)):
            raise HandshakeTimeoutError(None, f"{exc}.{hint}") from exc
        raise
    except (TimeoutError, asyncio.TimeoutError):
        raise ConnectionFailedError(
            f"could not connect to {where} within {budget:g} s" + overload_hint(lag, waited)
        ) from None
    except OSError as exc:
        raise ConnectionFailedError(f"could not connect to {where}: {exc}") from exc
    return wire
