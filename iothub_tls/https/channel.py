"""One kept-alive TLS connection carrying HTTP/1.1 requests, for the asyncio client.

:class:`Channel` is the asyncio protocol of one connection: a request goes out, its
answer comes back to a callback (the response, or why there is none: :class:`Lost`,
:data:`TIMED_OUT`), one request at a time, with one deadline timer per connection.
Before a request on a connection that sat idle, :meth:`Channel.alive` /
:meth:`Channel.settle` look at the socket without reading it: asyncio learns of a close
a loop turn or two after it arrived. :class:`Turns` gives the connection to one
exchange at a time, in arrival order, from coroutines and from plain callbacks alike.

What the answers mean (retries, errors) is the client's business
(:mod:`iothub_tls.https.aio`); how the bytes look is :mod:`.http11`'s.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable

from ..tls.info import TlsInfo
from .http11 import HttpProtocolError, Response, ResponseReader

__all__ = ["TIMED_OUT", "Answer", "Channel", "Lost", "Outcome", "TimedOut", "Turns"]


class Lost:
    """Outcome: the connection ended before the response was complete; ``fault`` is why
    (None: the server closed it)."""

    __slots__ = ("fault",)

    def __init__(self, fault: BaseException | None) -> None:
        self.fault = fault


class TimedOut:
    """Outcome: no complete response within the operation's timeout."""

    __slots__ = ()


TIMED_OUT = TimedOut()

#: What a request comes to: its response, or why there is none.
Outcome = Response | Lost | TimedOut
Answer = Callable[[Outcome], None]


class Turns:
    """One exchange at a time on the connection, in arrival order. Unlike
    ``asyncio.Lock`` it can also be taken from a plain callback (:meth:`try_take`)."""

    def __init__(self) -> None:
        self._busy = False
        self._waiting: deque[asyncio.Future[None]] = deque()

    def try_take(self) -> bool:
        if self._busy:
            return False
        self._busy = True
        return True

    async def take(self) -> None:
        if self.try_take():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.give()  # handed over as we were cancelled: pass it on
            elif waiter in self._waiting:
                self._waiting.remove(waiter)
            raise

    def give(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # still busy: the turn is handed over
                return
        self._busy = False


class Channel(asyncio.Protocol):
    """One kept-alive TLS connection: a request out, its response in."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.reader = ResponseReader()
        self.answer: Answer | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0
        self.lost: asyncio.Future[None] = loop.create_future()
        #: the TCP socket under the TLS transport (to look at without reading)
        self.sock: socket.socket | None = None
        #: requests sent on this connection
        self.requests_sent = 0
        self._done = False
        #: why it ended, when it ended with an error
        self.fault: BaseException | None = None

    @property
    def closed(self) -> bool:
        """No further request may go out on it."""
        return self._done or self.transport is None or self.transport.is_closing()

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            response = self.reader.feed(data)
        except HttpProtocolError as exc:
            self._fail(exc)
            return
        if response is None:
            return
        answer, self.answer = self.answer, None
        if not response.keep_alive:
            self.close()
        if answer is not None:
            answer(response)

    def eof_received(self) -> bool:
        self._done = True
        answer = self.answer
        if answer is not None:
            response = self.reader.eof()
            if response is not None:  # a body that ended with the connection
                self.answer = None
                answer(response)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        if exc is not None and self.fault is None:
            self.fault = exc
        self._cancel_timer()
        answer, self.answer = self.answer, None
        if answer is not None:
            answer(Lost(self.fault))
        if not self.lost.done():
            self.lost.set_result(None)

    # -- requests -----------------------------------------------------------------------

    def send(self, method: str, data: bytes, timeout: float, answer: Answer) -> None:
        """Write one request; ``answer`` is called (on the loop, once) with its response,
        or with why there is none (:class:`Lost`, :class:`TimedOut`)."""
        assert self.transport is not None and not self.closed
        self.reader.start(method)
        self.requests_sent += 1
        self.answer = answer
        self.transport.write(data)
        loop = self.loop
        self.deadline = deadline = loop.time() + timeout
        # One timer per connection, not one per request: it stays armed while requests
        # come and go, and moves on to the current request's deadline when it fires.
        timer = self.timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self.timer = loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self.timer = None
        answer = self.answer
        if answer is None:
            return  # idle: armed again by the next request
        if self.loop.time() < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._check_deadline)
            return
        self.answer = None
        # A late response would be read as the answer to the next request: drop it all.
        self.abort()
        answer(TIMED_OUT)

    def _fail(self, exc: BaseException) -> None:
        self.fault = exc
        self.abort()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        """No more requests; close cleanly (TLS close_notify) once the writes are out."""
        self._done = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self._done = True
        if self.transport is not None:
            self.transport.abort()

    def alive(self) -> bool:
        """True when nothing says the connection ended, and no bytes wait to be read
        (:meth:`settle` handles those)."""
        if self.closed or self.sock is None:
            return False
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        return False

    async def settle(self) -> None:
        """Before a request on a connection that sat idle: make sure it is still there.

        asyncio learns that a connection ended one or two loop iterations after the
        bytes that say so arrived; a request sent in between would go out on a dead
        connection. So look at the socket (without reading): the peer's close is
        noticed now, and bytes waiting (a TLS alert refusing the device certificate, a
        session ticket) are given to the TLS layer first, so that a refusal is reported
        as one."""
        after: int | None = None  # loop turns still to give once waiting bytes were read
        for _ in range(12):
            if self.closed or self.sock is None:
                return
            try:
                waiting = self.sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                if not after:
                    return  # alive (and whatever had arrived was handled)
                after -= 1  # read just now: a close it caused takes two more turns
            except OSError as exc:  # reset (or closed under us)
                self.fault = self.fault or exc
                self._done = True
                return
            else:
                if not waiting:  # the peer closed, with nothing before its FIN
                    self._done = True
                    return
                after = 2
            await asyncio.sleep(0)  # let the loop hand the bytes to the TLS layer

    async def wait_closed(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            self.abort()

    @property
    def tls_info(self) -> TlsInfo | None:
        if self.transport is None:
            return None
        found = getattr(self.transport.get_extra_info("ssl_object"), "tls_info", None)
        return found if isinstance(found, TlsInfo) else None
