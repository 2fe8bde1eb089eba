"""Where a device client runs the application's callbacks: one thread per client,
started with the first callback, one callback at a time in arrival order.

A slow or failing callback never stalls or kills a connection: the I/O side only
queues work here. An exception raised by a callback goes to the client's
``on_background_exception`` (itself run here); only when that is not set, or raises
too, is it logged. A client whose application registers no callback (a gateway holding
many devices, say) never starts the thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("iothub_tls")

_Item = tuple[Callable[..., Any], tuple[Any, ...]]


class Dispatcher:
    """Runs callbacks in submission order on one thread, started on first use.

    ``report(exc)`` is called (on the same thread) with what a callback raised.
    """

    def __init__(self, name: str, report: Callable[[BaseException], None]) -> None:
        self._name = name
        self._report = report
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._queue: queue.SimpleQueue[_Item | None] | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``, starting the thread if it is not running."""
        work = self._queue
        if work is None:
            with self._lock:
                if self._queue is None:
                    self._queue = queue.SimpleQueue()
                    self._thread = threading.Thread(
                        target=self._run,
                        args=(self._queue,),
                        name=f"iothub-tls-{self._name}-callbacks",
                        daemon=True,
                    )
                    self._thread.start()
                work = self._queue
        work.put((fn, args))

    @property
    def on_thread(self) -> bool:
        """True when called from the callback thread itself."""
        return threading.current_thread() is self._thread

    def stop(self, timeout: float = 5.0) -> None:
        """Run what is queued, then end the thread (waiting up to ``timeout``). A later
        :meth:`submit` starts a new one."""
        with self._lock:
            thread, self._thread = self._thread, None
            work, self._queue = self._queue, None
        if thread is None or work is None:
            return
        work.put(None)
        if threading.current_thread() is not thread:
            thread.join(timeout)

    def _run(self, work: queue.SimpleQueue[_Item | None]) -> None:
        while True:
            item = work.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception as exc:
                try:
                    self._report(exc)
                except Exception:
                    logger.exception(
                        "a callback (%s) raised, and so did on_background_exception",
                        getattr(fn, "__name__", fn),
                    )
