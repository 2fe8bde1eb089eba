"""Direct methods over AMQP: the method link pair of one asyncio
:class:`~iothub_tls.amqp.aio.AmqpConnection`.

Requests arrive on the receiver link (accepted at once); each is handed to
``on_request(name, request_id, payload, respond)``, and ``respond(status, body)`` (on
the loop) sends the answer on the sender link with the request's correlation-id. The
wire conventions are in :mod:`.conventions`; the links are declared on first use and
re-attached after every reconnection like the connection's other links.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ClientError, OperationTimeoutError
from . import conventions as amqpc
from .message import AmqpMessage

if TYPE_CHECKING:
    from .connection import AmqpConnection

__all__ = ["MethodChannel", "RequestHandler"]

logger = logging.getLogger("iothub_tls.amqp")

SENDER = "link-snd-methods"
RECEIVER = "link-rcv-methods"

RequestHandler = Callable[[str, str, bytes, Callable[[int, bytes], None]], None]
"""``on_request(name, request_id, payload, respond)``: called on the loop, so it must
only hand the call on; ``respond(status, body)`` must be called on the loop."""


class MethodChannel:
    """The direct-method links of one device on ``connection``."""

    def __init__(
        self,
        connection: AmqpConnection,
        address: str,
        *,
        client_version: str | None,
        on_request: RequestHandler,
    ) -> None:
        self._connection = connection
        self.address = address
        self._client_version = client_version
        self._on_request = on_request
        self._declared = False

    def declare(self) -> None:
        """Declare the method links (once); on a live connection they attach at once,
        else at connect. From then on the hub routes method calls to this device."""
        if self._declared:
            return
        self._declared = True
        properties = amqpc.link_properties(
            amqpc.LinkKind.METHODS, str(uuid.uuid4()), self._client_version
        )
        connection = self._connection
        connection.sender(self.address, name=SENDER, properties=properties)
        connection.receiver(
            self.address,
            name=RECEIVER,
            credit=10,
            properties=properties,
            on_message=self._on_message,
        )

    async def attach(self, timeout: float) -> None:
        """Declare the method links and, on a live connection, wait until the hub
        attached both."""
        self.declare()
        connection = self._connection
        if connection._running and not await connection._wait_attached((SENDER, RECEIVER), timeout):
            connection._raise_if_dead()
            raise OperationTimeoutError(
                connection._timeout_text(
                    f"the attach of the direct-method links {self.address}", timeout
                )
            )

    def _on_message(self, message: AmqpMessage) -> None:
        call = amqpc.parse_method_request(message)
        if call is None:
            logger.warning("ignoring a message on the method link without a method name")
            return

        def respond(status: int, body: bytes) -> None:
            self._respond(call.correlation_id, call.name, status, body)

        self._on_request(call.name, call.request_id, call.payload, respond)

    def _respond(self, correlation_id: Any, name: str, status: int, body: bytes) -> None:
        try:
            sent = self._connection._post(
                SENDER, amqpc.method_response(correlation_id, status, body)
            )
        except ClientError as exc:
            logger.warning("the answer to method %r was not sent: %s", name, exc)
            return

        def settled(outcome: Any) -> None:
            if outcome.cancelled():
                return
            error = outcome.exception()
            if error is not None:
                logger.warning("the hub did not take the answer to method %r: %s", name, error)

        sent.waiter.add_done_callback(settled)
