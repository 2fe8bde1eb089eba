"""The MQTT client's callback thread: application callbacks run here, one at a time.

A slow or failing callback never stalls or kills the connection: the network thread
only queues work here, and an exception is logged. The thread starts with the first
callback, so a client whose application registers none (a gateway holding many
devices, say) runs on its network thread alone.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("iothub_tls.mqtt")

_Item = tuple[Callable[..., Any], tuple[Any, ...]]


class Dispatcher:
    """Runs callbacks in submission order on one thread, started on first use."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; dropped once :meth:`stop` was called."""
        if self._thread is None:
            with self._lock:
                if self._stopped:
                    return
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="iothub-tls-mqtt-callbacks", daemon=True
                    )
                    self._thread.start()
        self._queue.put((fn, args))

    def stop(self, timeout: float = 5.0) -> None:
        """Run what is queued, then end the thread (waiting up to ``timeout``)."""
        with self._lock:
            self._stopped = True
            thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        if threading.current_thread() is not thread:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:
                logger.exception("an MQTT callback (%s) raised", getattr(fn, "__name__", fn))
