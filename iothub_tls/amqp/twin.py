"""The device twin over AMQP: the twin link pair of one :class:`AmqpConnection`, the
requests waiting for their answers, and the desired-properties subscription.

Wire conventions (addresses, annotations, correlation) are in :mod:`.conventions`;
this module keeps the bookkeeping: requests by correlation-id with their deadlines,
answers matched to them, requests sent again after a reconnection when the answer
was lost with the old connection, and the subscription renewed on every new
connection. User threads wait here; the connection's I/O thread only completes
futures (it never blocks in this module).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..device import twin_error
from ..errors import ClientError, DeliveryError, OperationTimeoutError
from . import conventions as amqpc
from .message import AmqpMessage

if TYPE_CHECKING:
    from .client import AmqpConnection, _Send

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
    deadline: float  # time.monotonic()
    answer: Future[amqpc.TwinResponse] = field(default_factory=Future)
    sent: _Send | None = None  # the last transfer of the request


class PendingRequests:
    """Twin requests by correlation-id, each with a deadline. Thread-safe: user threads
    add and remove, the I/O thread answers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, Pending] = {}

    def add(self, request: Pending) -> None:
        with self._lock:
            self._pending[request.correlation_id] = request

    def pop(self, correlation_id: str) -> Pending | None:
        with self._lock:
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
        with self._lock:
            gone = [r for r in self._pending.values() if r.deadline <= now]
            for request in gone:
                del self._pending[request.correlation_id]
        return gone

    def unanswered(self) -> list[Pending]:
        """Requests sent (the hub settled their transfer) and not answered yet."""
        with self._lock:
            return [
                r
                for r in self._pending.values()
                if r.sent is not None and r.sent.future.done() and not r.answer.done()
            ]

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


class TwinChannel:
    """The twin links of one device on ``connection``, attached on first use and kept
    attached across reconnections.

    :param on_desired: called on the I/O thread with each desired-properties patch; it
        must only hand the patch on (to a callback thread).
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
        self._lock = threading.Lock()
        self._declared = False
        self._desired_wanted = False
        self.pending = PendingRequests()
        connection._on_ready_hook(self._on_ready)

    # -- links --------------------------------------------------------------------------

    def attach(self, timeout: float) -> None:
        """Declare the twin links (once) and, on a live connection, wait until the hub
        attached both: the receiver first, so that no answer can precede it."""
        with self._lock:
            declare, self._declared = not self._declared, True
        connection = self._connection
        if declare:
            properties = amqpc.link_properties(
                amqpc.LinkKind.TWIN, str(uuid.uuid4()), self._client_version
            )
            connection.receiver(
                self.address,
                name=RECEIVER,
                credit=10,
                properties=properties,
                on_message=self._on_message,
            )
            connection.sender(self.address, name=SENDER, properties=properties)
        if connection._running and not connection._wait_attached((RECEIVER, SENDER), timeout):
            connection._raise_if_dead()
            raise OperationTimeoutError(
                connection._timeout_text(f"the attach of the twin links {self.address}", timeout)
            )

    # -- requests -----------------------------------------------------------------------

    def request(
        self, operation: amqpc.TwinOperation, body: bytes | None, timeout: float | None
    ) -> amqpc.TwinResponse:
        """Send a twin request and wait for the hub's answer.

        :raises OperationTimeoutError: no answer within ``timeout``.
        :raises NotAuthorizedError: status 401/403.
        :raises DeliveryError: another error status, or the hub refused the transfer.
        """
        connection = self._connection
        connection._raise_if_dead()
        wait = connection.operation_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        self.attach(wait)
        correlation_id = str(uuid.uuid4())
        request = Pending(
            operation,
            correlation_id,
            amqpc.twin_request(operation, correlation_id, body),
            deadline,
        )
        self.pending.add(request)
        try:
            self._send(request)
            response = self._wait(request, deadline, wait)
        finally:
            self.pending.pop(correlation_id)
            if request.sent is not None and not request.sent.future.done():
                connection._abandon(request.sent)
        error = twin_error(response.status, operation.value, response.body)
        if error is not None:
            raise error
        return response

    def _send(self, request: Pending) -> None:
        """Transfer ``request`` (again); a refused transfer fails the request."""
        sent = self._connection._post(SENDER, request.message)
        request.sent = sent

        def settled(outcome: Future[None]) -> None:
            error = outcome.exception()
            if error is not None and not request.answer.done():
                if isinstance(error, DeliveryError):
                    error = DeliveryError(f"the hub refused the twin {request.operation}: {error}")
                request.answer.set_exception(error)

        sent.future.add_done_callback(settled)

    def _wait(self, request: Pending, deadline: float, wait: float) -> amqpc.TwinResponse:
        connection = self._connection
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OperationTimeoutError(
                    connection._timeout_text(
                        f"the hub's answer to the twin {request.operation.value}", wait
                    )
                )
            try:
                return request.answer.result(min(remaining, 0.5))
            except FutureTimeout:
                connection._raise_if_dead()  # no answer can come any more

    # -- desired properties -------------------------------------------------------------

    def subscribe_desired(self, timeout: float) -> None:
        """Ask for desired-property updates (PUT): now on a live connection, else when
        :meth:`resume` runs after connect; again after every reconnection. Idempotent."""
        with self._lock:
            wanted, self._desired_wanted = self._desired_wanted, True
        if wanted:
            return
        if not self._connection._running:
            self.attach(timeout)  # declared now, attached (and subscribed) on connect
            return
        try:
            self.request(amqpc.TwinOperation.PUT, None, timeout)
        except BaseException:
            with self._lock:
                self._desired_wanted = False
            raise

    def resume(self, timeout: float) -> None:
        """After connect(): subscribe to desired-property updates if they are wanted."""
        with self._lock:
            wanted = self._desired_wanted
        if wanted:
            self.request(amqpc.TwinOperation.PUT, None, timeout)

    # -- the I/O thread -----------------------------------------------------------------

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
        for request in self.pending.expire(time.monotonic()):
            if not request.answer.done():
                request.answer.set_exception(
                    OperationTimeoutError(
                        f"the hub did not answer the twin {request.operation.value}"
                    )
                )
        for request in self.pending.unanswered():
            self._resend(request)
        with self._lock:
            wanted = self._desired_wanted
        if wanted:
            self._renew_subscription()

    def _resend(self, request: Pending) -> None:
        try:
            self._send(request)
        except ClientError as exc:
            if not request.answer.done():
                request.answer.set_exception(exc)

    def _renew_subscription(self) -> None:
        correlation_id = str(uuid.uuid4())
        request = Pending(
            amqpc.TwinOperation.PUT,
            correlation_id,
            amqpc.twin_request(amqpc.TwinOperation.PUT, correlation_id),
            time.monotonic() + self._connection.operation_timeout,
        )

        def answered(answer: Future[amqpc.TwinResponse]) -> None:
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
            request.answer.set_exception(exc)
