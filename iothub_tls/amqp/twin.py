"""The device twin over AMQP: the twin link pair of one asyncio
:class:`~iothub_tls.amqp.aio.AmqpConnection`, the requests waiting for their answers, and
the desired-properties subscription.

Wire conventions (addresses, annotations, correlation) are in :mod:`.conventions`;
this module keeps the bookkeeping: requests by correlation-id with their deadlines,
answers matched to them, requests sent again after a reconnection when the answer
was lost with the old connection, and the subscription renewed on every new
connection. Everything here runs on the connection's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..device import twin_error
from ..errors import ClientError, DeliveryError, OperationTimeoutError
from . import conventions as amqpc
from .message import AmqpMessage

if TYPE_CHECKING:
    from .connection import AmqpConnection
    from .links import Outgoing

__all__ = ["PendingRequests", "TwinChannel"]

logger = logging.getLogger("iothub_tls.amqp")

SENDER = "link-snd-twin"
RECEIVER = "link-rcv-twin"


@dataclass(eq=False)
class Pending:
    """One twin request waiting for its answer."""

    operation: amqpc.TwinOperation
    correlation_id: str
    message: AmqpMessage
    deadline: float  # the loop's time
    answer: asyncio.Future[amqpc.TwinResponse]
    sent: Outgoing | None = None  # the last transfer of the request


class PendingRequests:
    """Twin requests by correlation-id, each with a deadline (on the loop only)."""

    def __init__(self) -> None:
        self._pending: dict[str, Pending] = {}

    def add(self, request: Pending) -> None:
        self._pending[request.correlation_id] = request

    def pop(self, correlation_id: str) -> Pending | None:
        return self._pending.pop(correlation_id, None)

    def answer(self, response: amqpc.TwinResponse) -> bool:
        """Complete the request ``response`` answers; False when none waits for it."""
        request = self.pop(response.correlation_id)
        if request is None:
            return False
        if not request.answer.done():
            request.answer.set_result(response)
        return True

    def expire(self, now: float) -> list[Pending]:
        """Remove and return the requests whose deadline passed."""
        gone = [r for r in self._pending.values() if r.deadline <= now]
        for request in gone:
            del self._pending[request.correlation_id]
        return gone

    def unanswered(self) -> list[Pending]:
        """Requests sent (the hub settled their transfer) and not answered yet."""
        return [
            r
            for r in self._pending.values()
            if r.sent is not None and r.sent.waiter.done() and not r.answer.done()
        ]

    def __len__(self) -> int:
        return len(self._pending)


def _fail(answer: asyncio.Future[Any], error: BaseException) -> None:
    if not answer.done():
        answer.set_exception(error)


class TwinChannel:
    """The twin links of one device on ``connection``, attached on first use and kept
    attached across reconnections.

    :param on_desired: called on the loop with each desired-properties patch; it must
        only hand the patch on.
    """

    def __init__(
        self,
        connection: AmqpConnection,
        address: str,
        *,
        client_version: str | None,
        on_desired: Callable[[dict[str, Any]], None],
    ) -> None:
        self._connection = connection
        self.address = address
        self._client_version = client_version
        self._on_desired = on_desired
        self._declared = False
        self._desired_wanted = False
        self.pending = PendingRequests()
        connection._on_ready_hook(self._on_ready)

    # -- links --------------------------------------------------------------------------

    def declare(self) -> None:
        """Declare the twin links (once): the receiver first, so that no answer can
        precede it. On a live connection they attach at once, else at connect."""
        if self._declared:
            return
        self._declared = True
        properties = amqpc.link_properties(
            amqpc.LinkKind.TWIN, str(uuid.uuid4()), self._client_version
        )
        connection = self._connection
        connection.receiver(
            self.address,
            name=RECEIVER,
            credit=10,
            properties=properties,
            on_message=self._on_message,
        )
        connection.sender(self.address, name=SENDER, properties=properties)

    async def attach(self, timeout: float) -> None:
        """Declare the twin links and, on a live connection, wait until the hub
        attached both."""
        self.declare()
        connection = self._connection
        if connection._running and not await connection._wait_attached((RECEIVER, SENDER), timeout):
            connection._raise_if_dead()
            raise OperationTimeoutError(
                connection._timeout_text(f"the attach of the twin links {self.address}", timeout)
            )

    # -- requests -----------------------------------------------------------------------

    async def request(
        self, operation: amqpc.TwinOperation, body: bytes | None, timeout: float | None
    ) -> amqpc.TwinResponse:
        """Send a twin request and wait for the hub's answer.

        :raises OperationTimeoutError: no answer within ``timeout``.
        :raises NotAuthorizedError: status 401/403.
        :raises DeliveryError: another error status, or the hub refused the transfer.
        """
        connection = self._connection
        connection._raise_if_dead()
        loop = asyncio.get_running_loop()
        wait = connection.operation_timeout if timeout is None else timeout
        deadline = loop.time() + wait
        await self.attach(wait)
        correlation_id = str(uuid.uuid4())
        request = Pending(
            operation,
            correlation_id,
            amqpc.twin_request(operation, correlation_id, body),
            deadline,
            loop.create_future(),
        )
        self.pending.add(request)
        try:
            self._send(request)
            response = await self._wait(request, deadline, wait)
        finally:
            self.pending.pop(correlation_id)
            if request.sent is not None and not request.sent.waiter.done():
                connection._abandon(request.sent)
        error = twin_error(response.status, operation.value, response.body)
        if error is not None:
            raise error
        return response

    def _send(self, request: Pending) -> None:
        """Transfer ``request`` (again); a refused transfer fails the request."""
        sent = self._connection._post(SENDER, request.message)
        request.sent = sent

        def settled(outcome: Any) -> None:
            if outcome.cancelled():
                return
            error = outcome.exception()
            if error is not None:
                if isinstance(error, DeliveryError):
                    error = DeliveryError(f"the hub refused the twin {request.operation}: {error}")
                _fail(request.answer, error)

        sent.waiter.add_done_callback(settled)

    async def _wait(self, request: Pending, deadline: float, wait: float) -> amqpc.TwinResponse:
        connection = self._connection
        remaining = deadline - asyncio.get_running_loop().time()
        waits: set[asyncio.Future[Any]] = {request.answer}
        if connection._finished is not None:
            waits.add(connection._finished)
        done, _ = await asyncio.wait(
            waits, timeout=max(remaining, 0.0), return_when="FIRST_COMPLETED"
        )
        if request.answer in done:
            return request.answer.result()
        if done:
            connection._raise_if_dead()  # no answer can come any more
        raise OperationTimeoutError(
            connection._timeout_text(
                f"the hub's answer to the twin {request.operation.value}", wait
            )
        )

    # -- desired properties -------------------------------------------------------------

    def want_desired(self) -> bool:
        """Mark desired-property updates as wanted (the links are declared); False when
        they already were."""
        if self._desired_wanted:
            return False
        self._desired_wanted = True
        self.declare()
        return True

    async def subscribe_desired(self, timeout: float) -> None:
        """Ask for desired-property updates (PUT): now on a live connection, else when
        :meth:`resume` runs after connect; again after every reconnection. Idempotent."""
        if not self.want_desired():
            return
        if not self._connection._running:
            return  # subscribed by resume() at connect
        try:
            await self.request(amqpc.TwinOperation.PUT, None, timeout)
        except BaseException:
            self._desired_wanted = False
            raise

    async def resume(self, timeout: float) -> None:
        """After connect(): subscribe to desired-property updates if they are wanted."""
        if self._desired_wanted:
            await self.request(amqpc.TwinOperation.PUT, None, timeout)

    # -- from the connection ------------------------------------------------------------

    def _on_message(self, message: AmqpMessage) -> None:
        parsed = amqpc.parse_twin_message(message)
        if isinstance(parsed, amqpc.TwinResponse):
            if not self.pending.answer(parsed):
                logger.debug("a twin answer nobody waits for (correlation-id %s)", parsed)
        elif isinstance(parsed, amqpc.DesiredUpdate):
            self._on_desired(parsed.patch)
        else:
            logger.warning(
                "ignoring a message on the twin link that is neither an answer nor a "
                "desired-properties patch"
            )

    def _on_ready(self, reconnected: bool) -> None:
        """A new connection is ready: answers lost with the old one are asked for again,
        and the desired-properties subscription is renewed."""
        if not reconnected:
            return
        loop = asyncio.get_running_loop()
        for request in self.pending.expire(loop.time()):
            _fail(
                request.answer,
                OperationTimeoutError(f"the hub did not answer the twin {request.operation.value}"),
            )
        for request in self.pending.unanswered():
            self._resend(request)
        if self._desired_wanted:
            self._renew_subscription(loop)

    def _resend(self, request: Pending) -> None:
        try:
            self._send(request)
        except ClientError as exc:
            _fail(request.answer, exc)

    def _renew_subscription(self, loop: asyncio.AbstractEventLoop) -> None:
        correlation_id = str(uuid.uuid4())
        request = Pending(
            amqpc.TwinOperation.PUT,
            correlation_id,
            amqpc.twin_request(amqpc.TwinOperation.PUT, correlation_id),
            loop.time() + self._connection.operation_timeout,
            loop.create_future(),
        )

        def answered(answer: asyncio.Future[amqpc.TwinResponse]) -> None:
            if answer.cancelled():
                return
            error = answer.exception()
            if error is None:
                response = answer.result()
                error = twin_error(response.status, "PUT", response.body)
            if error is not None:
                logger.warning("desired-properties updates were not renewed: %s", error)

        request.answer.add_done_callback(answered)
        self.pending.add(request)
        try:
            self._send(request)
        except ClientError as exc:
            self.pending.pop(correlation_id)
            _fail(request.answer, exc)
