"""One I/O loop for every synchronous device client in a process.

The synchronous clients are thin facades over the asyncio ones: their I/O runs on one
asyncio event loop, on one daemon thread (``iothub-tls-io``), whatever the number of
clients, so a gateway holding a thousand devices runs a handful of threads, not a
thousand. Application callbacks of the synchronous clients run on one more thread
(``iothub-tls-callbacks``), never on the loop, so a slow callback cannot stall the I/O
of every device.

Storm control lives here too: :class:`HandshakeGate` bounds how many TLS handshakes
(and MQTT/AMQP connection set-ups) run at once in the process, and each connection
attempt's timeout starts when it passes the gate, so devices waiting their turn are not
failed for the wait. :class:`LoopLag` measures how late the loop runs its callbacks, so
a timeout caused by this process being overloaded says so instead of blaming the server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger("iothub_tls")

_T = TypeVar("_T")

#: TLS handshakes (with the MQTT CONNECT / AMQP set-up that follows) in flight at once
#: per process. Each costs the client about 1-7 ms of CPU; beyond a few dozen at once a
#: gateway only makes every one of them slower, until their timeouts fire together.
DEFAULT_HANDSHAKE_LIMIT = 32


class HandshakeGate:
    """At most ``limit`` connection set-ups at once on one event loop."""

    def __init__(self, limit: int = DEFAULT_HANDSHAKE_LIMIT) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"the handshake limit must be an int >= 1, not {limit!r}")
        self.limit = limit
        self._semaphore: asyncio.Semaphore | None = None
        self.waiting = 0

    def _get(self) -> asyncio.Semaphore:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.limit)
        return self._semaphore

    @contextlib.asynccontextmanager
    async def slot(self) -> Any:
        semaphore = self._get()
        self.waiting += 1
        try:
            await semaphore.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            semaphore.release()


class LoopLag:
    """How late an event loop runs what it was asked to run at a given time: the largest
    delay over the last few seconds (a busy loop delays every timer)."""

    INTERVAL = 0.25
    WINDOW = 8  # samples kept: about two seconds

    def __init__(self) -> None:
        self._samples: list[float] = []
        self._handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._schedule(loop)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        due = loop.time() + self.INTERVAL
        self._handle = loop.call_at(due, self._tick, loop, due)

    def _tick(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        self._samples.append(max(0.0, loop.time() - due))
        del self._samples[: -self.WINDOW]
        self._schedule(loop)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    @property
    def seconds(self) -> float:
        return max(self._samples, default=0.0)


def overload_hint(lag: LoopLag | None, waited: float) -> str:
    """What to add to a timeout message when this process, not the peer, was slow."""
    seconds = lag.seconds if lag is not None else 0.0
    if seconds < 0.5 and waited < 1.0:
        return ""
    return (
        f" This process was busy (its event loop ran {seconds:.1f} s late, and the attempt "
        f"waited {waited:.1f} s for a connection slot): the client side may be the "
        "bottleneck; spread connections out or give the process more CPU"
    )


class SharedLoop:
    """The process's I/O loop for synchronous clients (see the module docstring)."""

    def __init__(self, handshake_limit: int = DEFAULT_HANDSHAKE_LIMIT) -> None:
        self.loop = asyncio.new_event_loop()
        # Name resolution (getaddrinfo) is the one blocking call asyncio hands to a thread:
        # one resolver thread, started when first needed, not one per CPU.
        self.loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="iothub-tls-resolve")
        )
        self.gate = HandshakeGate(handshake_limit)
        self.lag = LoopLag()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="iothub-tls-io", daemon=True)
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.lag.start(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    @property
    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Run ``coro`` on the loop; its result as a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the loop and wait for its result (from any other thread)."""
        if self.on_loop_thread:
            coro.close()
            raise RuntimeError(
                "a blocking client call was made on the iothub-tls I/O thread; call it from "
                "another thread (callbacks of the synchronous clients never run on it)"
            )
        return self.submit(coro).result()

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)


class CallbackThread:
    """One thread that runs the synchronous clients' callbacks, in submission order."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.thread is None:
            with self._lock:
                if self.thread is None:
                    self.thread = threading.Thread(
                        target=self._run, name="iothub-tls-callbacks", daemon=True
                    )
                    self.thread.start()
        self._queue.put((fn, args))

    @property
    def on_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def _run(self) -> None:
        while True:
            fn, args = self._queue.get()
            try:
                fn(*args)
            except Exception:  # the submitter wraps what it hands over; a bug must not
                logger.exception("an iothub-tls callback failed")  # end this thread


_lock = threading.Lock()
_shared: dict[str, Any] = {}


def _current() -> dict[str, Any]:
    pid = os.getpid()
    if _shared.get("pid") != pid:  # first use, or a forked child: its own loop
        _shared.clear()
        _shared["pid"] = pid
    return _shared


def shared_loop() -> SharedLoop:
    """The process's shared I/O loop, started on first use."""
    with _lock:
        state = _current()
        loop: SharedLoop | None = state.get("loop")
        if loop is None:
            loop = state["loop"] = SharedLoop()
        return loop


def callback_thread() -> CallbackThread:
    """The process's callback thread for the synchronous clients."""
    with _lock:
        state = _current()
        runner: CallbackThread | None = state.get("callbacks")
        if runner is None:
            runner = state["callbacks"] = CallbackThread()
        return runner


async def wait_for(awaitable: Awaitable[_T], timeout: float | None) -> _T:
    """``asyncio.wait_for`` that leaves the awaitable's own TimeoutError subclasses
    (HandshakeTimeoutError, ...) alone: only our deadline becomes a plain TimeoutError."""
    if timeout is None:
        return await awaitable
    scope = getattr(asyncio, "timeout", None)
    if scope is not None:
        # Python 3.11+: the deadline cancels the awaiting task itself (no second task,
        # no asyncio.wait); an expired deadline raises a plain TimeoutError, the
        # awaitable's own TimeoutError subclasses pass through.
        async with scope(timeout):
            return await awaitable
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise TimeoutError
    return task.result()
