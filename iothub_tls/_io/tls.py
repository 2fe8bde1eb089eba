"""TLS for the asyncio clients: the hardened context's SSLObject over a plain transport.

asyncio's own TLS transport (``create_connection(ssl=...)``) keeps a 256 KiB read buffer
per connection; a gateway holding thousands of devices would spend most of its memory
there. :class:`TlsLayer` does the same job with the hardened context's
:class:`~iothub_tls.tls.context.HardenedSSLObject` over two memory BIOs: records are
decrypted as they arrive and handed to the protocol above (MQTT, AMQP, HTTP, a
WebSocket), and what that protocol writes is encrypted into the transport below. The
policy checks, the refusal translation and the session resumption are the context's, as
with every other connection the library makes.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from typing import TYPE_CHECKING, Any, cast

from ..errors import HandshakeClosedError, HandshakeTimeoutError
from ..tls.context import HardenedSSLContext
from ..tls.refusals import explain_handshake_error
from .loop import wait_for

if TYPE_CHECKING:
    from .proxy import Proxy

__all__ = ["TlsLayer", "open_tls"]

# A TLS record carries at most 16 KiB of plaintext: reading in such chunks keeps the
# per-connection memory at what is in flight.
_READ_CHUNK = 16 * 1024
# What the socket is read into before the bytes go to the connection's memory BIO: one
# buffer per thread (an event loop runs on one thread and copies out of it before it
# reads the next socket), instead of the fresh 256 KiB bytes object (an mmap, a
# shrinking mremap and a munmap) asyncio allocates for every read of a plain protocol.
_RECEIVE_BUFFER = 64 * 1024
_local = threading.local()


def _receive_buffer() -> memoryview:
    try:
        view: memoryview = _local.buffer
    except AttributeError:
        view = _local.buffer = memoryview(bytearray(_RECEIVE_BUFFER))
    return view


class TlsLayer(asyncio.BufferedProtocol, asyncio.Transport):
    """A TLS client connection over ``transport``, carrying ``inner``'s bytes. To
    ``inner`` it is its transport (``write``, ``close``, ``abort``, ``get_extra_info``).

    It reads the socket through the buffered-protocol interface (``get_buffer`` /
    ``buffer_updated``) into a buffer shared by the thread's connections."""

    def __init__(
        self,
        inner: asyncio.Protocol,
        context: HardenedSSLContext,
        server_hostname: str,
        handshake_timeout: float,
    ) -> None:
        asyncio.Transport.__init__(self)
        self._inner = inner
        self._context = context
        self._hostname = server_hostname
        self._timeout = handshake_timeout
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=server_hostname
        )
        self._transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[None] = loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._lost = False
        self._buffer: memoryview | None = None

    # -- the transport below ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance(transport, asyncio.Transport): uvloop's transports have the
        # methods without deriving from asyncio's classes.
        self._transport = cast("asyncio.Transport", transport)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._timeout, self._handshake_timed_out)
        self._step()

    def get_buffer(self, sizehint: int) -> memoryview:
        self._buffer = buffer = _receive_buffer()
        return buffer

    def buffer_updated(self, nbytes: int) -> None:
        buffer, self._buffer = self._buffer, None
        assert buffer is not None
        self.data_received(buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        self._incoming.write(data)
        if not self.handshake.done():
            self._step()
            if not self.handshake.done():
                return
        self._read()

    def eof_received(self) -> bool | None:
        self._incoming.write_eof()
        if not self.handshake.done():
            self._step()
        else:
            self._read()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._timer is not None:
            self._timer.cancel()
        if not self.handshake.done():
            if not self._incoming.eof:
                self._incoming.write_eof()
            self._step()  # an EOF mid-handshake: the context explains it
            if not self.handshake.done():
                self._fail(
                    HandshakeClosedError(
                        None, f"TLS handshake with {self._hostname} failed: the connection "
                        f"was lost ({exc})"
                    )
                )  # fmt: skip
            return
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -- the handshake ------------------------------------------------------------------

    def _step(self) -> None:
        try:
            self._ssl.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            self._flush()
            return
        except BaseException as exc:  # the hardened object raised the explained refusal
            self._flush()  # our alert, if OpenSSL wrote one
            self._fail(exc)
            return
        self._flush()
        if self._timer is not None:
            self._timer.cancel()
        if not self.handshake.done():
            self.handshake.set_result(None)
        self._inner.connection_made(self)
        if self._incoming.pending:
            self._read()

    def _handshake_timed_out(self) -> None:
        if self.handshake.done():
            return
        error = explain_handshake_error(
            TimeoutError(f"no handshake within {self._timeout:g} s"),
            self._context.policy,
            self._hostname,
        )
        if not isinstance(error, HandshakeTimeoutError):  # pragma: no cover - always is
            error = HandshakeTimeoutError(None, str(error))
        self._fail(error)

    def _fail(self, error: BaseException) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.handshake.done():
            self.handshake.set_exception(error)
        if self._transport is not None and not self._lost:
            self._transport.abort()

    # -- data ---------------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                chunk = self._ssl.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                chunk = b""
            except (ssl.SSLError, OSError) as exc:  # a broken record, an alert
                self._inner.connection_lost(exc)
                self._lost = True
                if self._transport is not None:
                    self._transport.abort()
                return
            if not chunk:  # the peer's close_notify (Python returns b"" for it)
                self._flush()
                if self._transport is not None:
                    self._transport.close()
                return
            self._inner.data_received(chunk)
            if len(chunk) < _READ_CHUNK and not self._incoming.pending:
                # The record is used up and no other has arrived: asking again would only
                # raise SSLWantReadError (and hand the GIL to a thread woken by the data).
                break
        self._flush()  # tickets and key updates are answered at once

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    # -- what the inner protocol sees as its transport ----------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not self.handshake.done():
            return
        self._ssl.write(data)
        self._flush()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.handshake.done() and not self.handshake.exception():
            try:
                self._ssl.unwrap()  # close_notify
            except (ssl.SSLError, OSError):
                pass
            self._flush()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def is_closing(self) -> bool:
        return self._closing or self._transport is None or self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "sslcontext":
            return self._context
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)


async def open_tls(
    inner: asyncio.Protocol,
    host: str,
    port: int,
    *,
    context: HardenedSSLContext,
    server_hostname: str,
    connect_timeout: float,
    handshake_timeout: float,
    proxy: Proxy | None = None,
) -> TlsLayer:
    """TCP to ``host:port`` (within ``connect_timeout``; OSError or TimeoutError), or a
    tunnel to it through ``proxy`` (:class:`~iothub_tls.ProxyError`), then TLS with
    ``context`` for the server named ``server_hostname`` (within ``handshake_timeout``;
    the context's own refusal errors); returns once the handshake completed and
    ``inner`` is attached. Through a proxy, TLS runs end to end with the hub: the proxy
    carries only the encrypted stream."""
    loop = asyncio.get_running_loop()
    layer = TlsLayer(inner, context, server_hostname, handshake_timeout)
    if proxy is None:
        await wait_for(loop.create_connection(lambda: layer, host, port), connect_timeout)
    else:
        from .proxy import open_tunnel

        sock = await open_tunnel(proxy, host, port, timeout=connect_timeout)
        try:
            await loop.create_connection(lambda: layer, sock=sock)
        except BaseException:
            sock.close()
            raise
    await layer.handshake
    return layer
