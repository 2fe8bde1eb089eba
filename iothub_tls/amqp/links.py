"""What an asyncio :class:`~iothub_tls.amqp.aio.AmqpConnection` hands out: senders,
receivers and received deliveries, plus one message on its way (:class:`Outgoing`).

They hold no protocol state of their own: each call goes to the connection, on its
event loop. A delivery can also be settled from another thread (the synchronous
facades do so): the settlement then runs on the loop and the caller waits for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import DeliveryError
from .message import AmqpMessage

if TYPE_CHECKING:
    from .connection import AmqpConnection

__all__ = ["AmqpDelivery", "AmqpReceiver", "AmqpSender", "Outgoing", "resolve"]

Waiter = asyncio.Future[None] | concurrent.futures.Future[None]


def resolve(waiter: Waiter, error: BaseException | None = None) -> None:
    """Complete a waiter unless it already is (timed out, cancelled)."""
    if waiter.done():
        return
    try:
        if error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(None)
    except (asyncio.InvalidStateError, concurrent.futures.InvalidStateError):
        pass  # cancelled by its owner in another thread meanwhile


class Outgoing:
    """A message on its way on link ``key``: ``waiter`` completes with the peer's
    disposition. It is sent again after a reconnection until it has one, unless
    ``abandoned`` (its sender stopped waiting). ``waiter`` is an asyncio future, or a
    thread-safe one for a synchronous sender."""

    __slots__ = ("abandoned", "generation", "key", "payload", "waiter")

    def __init__(self, key: str, payload: bytes, waiter: Waiter) -> None:
        self.key = key
        self.payload = payload
        self.waiter = waiter
        self.abandoned = False
        self.generation = 0  # the connection it was last sent on

    def __repr__(self) -> str:
        return f"<Outgoing {self.key} {len(self.payload)} bytes>"


class AmqpDelivery:
    """A received message, to be settled once with :meth:`accept`, :meth:`reject` or
    :meth:`release` (on the connection's event loop, or from any other thread, which
    then waits for the loop up to ``timeout``). A delivery not settled before the
    connection is lost is delivered again by the peer; settling it then raises
    :class:`~iothub_tls.DeliveryError`."""

    __slots__ = ("_connection", "_generation", "_handle", "_key", "message", "settled")

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
    """A sending link kept attached by an :class:`~iothub_tls.amqp.aio.AmqpConnection`."""

    def __init__(self, connection: AmqpConnection, key: str, address: str) -> None:
        self._connection = connection
        self.key = key
        self.address = address

    async def send(self, message: AmqpMessage | bytes | str, timeout: float | None = None) -> None:
        """Send and wait for the peer's disposition.

        :raises DeliveryError: the peer rejected, released or modified the message.
        :raises OperationTimeoutError: no disposition within ``timeout`` (default:
            ``options.operation_timeout``); the message is not sent again.
        """
        if not isinstance(message, AmqpMessage):
            message = AmqpMessage(body=message)
        await self._connection._send(self.key, message, timeout)

    def __repr__(self) -> str:
        return f"<AmqpSender {self.key} -> {self.address}>"


class AmqpReceiver:
    """A receiving link kept attached by an :class:`~iothub_tls.amqp.aio.AmqpConnection`;
    ``credit`` messages are prefetched, and a credit is given back as each one is
    settled."""

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
        self._on_message = on_message
        self._on_delivery = on_delivery
        self._queue: asyncio.Queue[AmqpDelivery] | None = None  # made on the loop

    def _deliveries(self) -> asyncio.Queue[AmqpDelivery]:
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._queue

    async def receive(self, timeout: float | None = None) -> AmqpDelivery | None:
        """The next message, or None when none arrived within ``timeout`` seconds.

        :raises ConnectionFailedError: (or the error that ended it) the connection is
            closed or failed for good.
        """
        connection = self._connection
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        queue = self._deliveries()
        while True:
            while not queue.empty():
                delivery = queue.get_nowait()
                if delivery._generation == connection._generation:
                    return delivery
                # received on a connection that has since been lost: the peer redelivers
            connection._raise_if_dead()
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return None
            getter = asyncio.ensure_future(queue.get())
            waits: set[asyncio.Future[Any]] = {getter}
            finished = connection._finished
            if finished is not None:
                waits.add(finished)
            done, _ = await asyncio.wait(waits, timeout=remaining, return_when="FIRST_COMPLETED")
            if getter in done:
                delivery = getter.result()
                if delivery._generation == connection._generation:
                    return delivery
                continue
            getter.cancel()

    def __repr__(self) -> str:
        return f"<AmqpReceiver {self.key} <- {self.address}>"
