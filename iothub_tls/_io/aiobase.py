"""What the asyncio device clients share above their transports: callbacks, connection
states, the cloud-to-device queue, direct-method routing and ``async with``.

Everything here runs on the client's event loop. Where application code runs depends on
who uses the client:

* an asyncio application (:mod:`iothub_tls.aio`): callbacks and handlers run on its
  loop; a callback or handler may be a coroutine function, and then runs as a task;
* a synchronous client (the facades in :mod:`iothub_tls.mqtt` etc.): they run on the
  process's callback thread (:func:`~iothub_tls._io.loop.callback_thread`), never on the
  I/O loop, so they may block.

What a callback or handler raises goes to ``on_background_exception`` (or, without one,
to the log at ERROR on the ``iothub_tls`` logger).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

from ..device import C2DMessage, ConnectionState, MethodHandler, MethodRouter
from ..errors import OperationTimeoutError
from .base import Factories
from .loop import callback_thread

logger = logging.getLogger("iothub_tls")

StateCallback = Callable[[ConnectionState, "BaseException | None"], Any]


class Runner:
    """Where a client's callbacks run: on its event loop (asyncio applications)."""

    def __init__(self, report: Callable[[BaseException], None]) -> None:
        self.report = report
        self._tasks: set[asyncio.Future[Any]] = set()  # keep running tasks referenced

    def _start(self, awaitable: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def run(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` (on the loop); a coroutine it returns runs as a task."""
        try:
            result = fn(*args)
        except Exception as exc:
            self.report(exc)
            return
        if inspect.isawaitable(result):
            self._start(result).add_done_callback(self._done)

    def _done(self, task: asyncio.Future[Any]) -> None:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self.report(error)

    def call_method(
        self,
        router: MethodRouter,
        name: str,
        request_id: str,
        payload: bytes,
        respond: Callable[[int, bytes], None],
    ) -> None:
        prepared = router.prepare(name, request_id, payload)
        if isinstance(prepared[0], int):
            respond(*prepared)
            return
        handler, request = prepared
        try:
            result = handler(request)
        except Exception as exc:
            respond(*router.failed(name, exc))
            return
        if not inspect.isawaitable(result):
            respond(*router.finish(name, result))
            return

        async def finish(awaitable: Awaitable[Any]) -> None:
            try:
                value = await awaitable
            except Exception as exc:
                respond(*router.failed(name, exc))
                return
            respond(*router.finish(name, value))

        self._start(finish(result))


class ThreadRunner(Runner):
    """Callbacks on the process's callback thread (synchronous clients)."""

    def __init__(
        self, report: Callable[[BaseException], None], loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(report)
        self._loop = loop
        self._thread = callback_thread()

    def run(self, fn: Callable[..., Any], *args: Any) -> None:
        def call() -> None:
            try:
                fn(*args)
            except Exception as exc:
                self.report(exc)

        self._thread.submit(call)

    def call_method(
        self,
        router: MethodRouter,
        name: str,
        request_id: str,
        payload: bytes,
        respond: Callable[[int, bytes], None],
    ) -> None:
        loop = self._loop

        def call() -> None:
            status, body = router.invoke(name, request_id, payload)
            loop.call_soon_threadsafe(respond, status, body)

        self._thread.submit(call)


class AsyncClientBase(Factories):
    """Callbacks and routing common to every asyncio device client."""

    #: "mqtt", "amqp" or "https"
    transport: ClassVar[str] = ""

    def __init__(self, operation_timeout: float) -> None:
        self._on_c2d: Callable[[C2DMessage], Any] | None = None
        self.on_connection_state_change: StateCallback | None = None
        """Called with ``(state, reason)`` at every :class:`ConnectionState` change;
        ``reason`` is the error behind a DISCONNECTED or a CLOSED that was not asked
        for, else None."""
        self.on_background_exception: Callable[[BaseException], Any] | None = None
        """Called with any exception raised by another callback or a method handler
        (without it, such exceptions are logged)."""
        self._on_desired_update: Callable[[dict[str, Any]], Any] | None = None
        self._state = ConnectionState.CLOSED
        self._operation_timeout = operation_timeout
        self._runner: Runner = Runner(self._report_now)
        self._c2d_queue: asyncio.Queue[C2DMessage] | None = None
        self._methods = MethodRouter(report=self._report)

    def _run_callbacks_on_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        """Used by the synchronous facades: callbacks go to the callback thread."""
        self._runner = ThreadRunner(self._report_now, loop)

    # -- state --------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """The current :class:`ConnectionState`."""
        return self._state

    def _set_state(self, state: ConnectionState, reason: BaseException | None = None) -> None:
        if state is self._state and reason is None:
            return
        self._state = state
        callback = self.on_connection_state_change
        if callback is not None:
            self._runner.run(callback, state, reason)

    # -- exceptions from callbacks ------------------------------------------------------

    def _report_now(self, exc: BaseException) -> None:
        handler = self.on_background_exception
        if handler is not None:
            try:
                result = handler(exc)
                if inspect.isawaitable(result):
                    self._runner._start(result)
                return
            except Exception as second:
                logger.error(
                    "on_background_exception of %s raised %s: %s", self, type(second).__name__,
                    second, exc_info=second,
                )  # fmt: skip
        logger.error(
            "a callback of %s raised %s: %s (set on_background_exception to handle it)",
            self,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )

    def _report(self, exc: BaseException) -> None:
        """Hand ``exc`` to ``on_background_exception`` where callbacks run."""
        self._runner.run(self._report_now, exc)

    # -- cloud-to-device ----------------------------------------------------------------

    @property
    def on_c2d(self) -> Callable[[C2DMessage], Any] | None:
        """Called with each cloud-to-device message; while it is None, messages wait for
        ``receive_c2d`` (and the ``c2d_messages()`` iterator)."""
        return self._on_c2d

    @on_c2d.setter
    def on_c2d(self, callback: Callable[[C2DMessage], Any] | None) -> None:
        if callback is not None and not callable(callback):
            raise TypeError("on_c2d must be callable or None")
        self._on_c2d = callback
        self._c2d_callback_changed()

    def _c2d_callback_changed(self) -> None:
        """Hook: a transport that must fetch messages for the callback starts here."""

    def _queue(self) -> asyncio.Queue[C2DMessage]:
        if self._c2d_queue is None:
            self._c2d_queue = asyncio.Queue()
        return self._c2d_queue

    def _incoming_c2d(self, message: C2DMessage) -> None:
        callback = self._on_c2d
        if callback is not None:
            self._runner.run(callback, message)
        else:
            self._queue().put_nowait(message)

    async def _receive_c2d(self, timeout: float | None) -> C2DMessage:
        wait = self._operation_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(self._queue().get(), max(wait, 0.0))
        except (TimeoutError, asyncio.TimeoutError):
            raise OperationTimeoutError(
                f"no cloud-to-device message arrived within {wait:g} s"
            ) from None

    async def c2d_messages(self) -> AsyncIterator[C2DMessage]:
        """Every cloud-to-device message, as it arrives (``async for message in
        client.c2d_messages(): ...``); ends when the client is closed."""
        queue = self._queue()
        while True:
            getter = asyncio.ensure_future(queue.get())
            closed = asyncio.ensure_future(self._closed_event().wait())
            done, _ = await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                closed.cancel()
                yield getter.result()
                continue
            getter.cancel()
            return

    def _closed_event(self) -> asyncio.Event:
        """Hook: set when the client is closed."""
        raise NotImplementedError

    # -- twin and methods ---------------------------------------------------------------

    @property
    def on_desired_update(self) -> Callable[[dict[str, Any]], Any] | None:
        """Called with each desired-properties patch (a dict including ``$version``).
        Patches sent while the device was offline are not replayed: call ``get_twin()``
        when the state becomes CONNECTED again."""
        return self._on_desired_update

    @on_desired_update.setter
    def on_desired_update(self, callback: Callable[[dict[str, Any]], Any] | None) -> None:
        if callback is not None and not callable(callback):
            raise TypeError("on_desired_update must be callable or None")
        self._on_desired_update = callback
        self._desired_callback_changed()

    def _desired_callback_changed(self) -> None:
        """Hook: a transport that subscribes to desired updates on demand does it here."""

    def _incoming_desired(self, patch: dict[str, Any]) -> None:
        callback = self._on_desired_update
        if callback is not None:
            self._runner.run(callback, patch)

    def on_method(self, name: str | None, handler: MethodHandler | None) -> None:
        """Answer direct method ``name`` (``None``: every method without a handler of
        its own) with ``handler(request) -> (status, payload)`` (in asyncio, the handler
        may be a coroutine function); ``handler=None`` removes it. Unknown methods are
        answered 404; a handler that raises, 500 (the exception goes to
        ``on_background_exception``)."""
        self._methods.register(name, handler)
        self._methods_changed()

    def _methods_changed(self) -> None:
        """Hook: a transport that attaches method links on demand does it here."""

    def _incoming_method(
        self, name: str, request_id: str, payload: bytes, respond: Callable[[int, bytes], None]
    ) -> None:
        """Run the handler where callbacks run, then ``respond(status, body)`` on the
        loop."""
        self._runner.call_method(self._methods, name, request_id, payload, respond)
