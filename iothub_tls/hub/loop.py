"""The local hub's one I/O thread: an asyncio event loop shared by every front door of a
hub (accepting, TLS, the MQTT, AMQP and HTTPS protocol state of every connection),
whatever the number of connections.

Other threads (tests, the service API, ``iothub-tls hub`` commands) reach connections
through :meth:`HubLoop.post` only: the hub's :class:`~.state.HubState` calls its
listeners on the caller's thread, and the doors hand the work over to the loop
(``call_soon_threadsafe``). Work that may block — the service API, where a direct-method
call waits for the device's answer, which arrives on this very loop — runs on a few
worker threads started when first needed, never on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["HubLoop"]

logger = logging.getLogger("iothub_tls.hub")

_T = TypeVar("_T")

#: Threads for blocking service requests (direct-method calls wait for the device).
DEFAULT_WORKERS = 4


class HubLoop:
    """One asyncio event loop on one daemon thread; :meth:`start` / :meth:`stop`.

    :param name: the thread's name (the hub's threads are told apart by it).
    :param workers: at most this many threads run blocking work (:meth:`in_worker`);
        none is started before the first such work.
    """

    def __init__(self, *, name: str = "iothub-tls-hub", workers: int = DEFAULT_WORKERS) -> None:
        self.name = name
        self.workers = workers
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # -- life cycle -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        loop = self.loop
        return loop is not None and loop.is_running()

    def start(self) -> None:
        """Start the loop's thread (again after a :meth:`stop`)."""
        with self._lock:
            if self.thread is not None:
                return
            loop = asyncio.new_event_loop()
            loop.set_exception_handler(_log_loop_error)
            ready = threading.Event()
            thread = threading.Thread(
                target=self._run, args=(loop, ready), name=self.name, daemon=True
            )
            self.loop, self.thread = loop, thread
            thread.start()
            ready.wait()

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            # What still runs (a service request waiting for its worker) is cancelled
            # and awaited, as asyncio.run() does, so nothing is destroyed pending.
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and wait for its thread (what still runs on it is dropped)."""
        with self._lock:
            loop, thread, pool = self.loop, self.thread, self._pool
            self.thread = self._pool = None
        if loop is None or thread is None:
            return
        if self.on_loop_thread:
            raise RuntimeError("the hub's I/O loop cannot be stopped from its own thread")
        with contextlib.suppress(RuntimeError):  # already closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    @property
    def on_loop_thread(self) -> bool:
        return self.thread is not None and threading.current_thread() is self.thread

    # -- from other threads -----------------------------------------------------------------

    def post(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on the loop soon (from any thread); False when the loop does
        not run (the work is dropped, as it would be for a connection that is gone)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return False
        try:
            if self.on_loop_thread:
                loop.call_soon(fn, *args)
            else:
                loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed meanwhile
            return False
        return True

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = 30.0) -> _T:
        """Run ``coro`` on the loop and wait for its result (not from the loop's thread)."""
        loop = self.loop
        if loop is None or self.thread is None:
            coro.close()
            raise RuntimeError("the hub's I/O loop is not running")
        if self.on_loop_thread:
            coro.close()
            raise RuntimeError("a blocking call was made on the hub's I/O thread")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    def call(self, fn: Callable[..., _T], *args: Any, timeout: float | None = 30.0) -> _T:
        """Call ``fn(*args)`` on the loop and return its result (directly when already
        on the loop's thread)."""
        if self.on_loop_thread:
            return fn(*args)

        async def call() -> _T:
            return fn(*args)

        return self.run(call(), timeout)

    # -- blocking work ------------------------------------------------------------------------

    async def in_worker(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run the blocking ``fn(*args)`` on a worker thread; await its result."""
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.workers, thread_name_prefix=f"{self.name}-worker"
                )
            pool = self._pool
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """What the loop could not hand to anyone (a callback's bug): the hub's log, not
    asyncio's default print to stderr."""
    error = context.get("exception")
    logger.error(
        "hub I/O loop: %s",
        context.get("message", "unexpected error"),
        exc_info=(type(error), error, error.__traceback__) if error is not None else None,
    )
