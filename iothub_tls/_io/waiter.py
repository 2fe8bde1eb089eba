"""A one-shot answer from the I/O loop to one blocked thread.

A synchronous ``send_telemetry`` waits for its message's PUBACK: the caller's thread
blocks while the loop's thread sends the message and settles the wait. A
``concurrent.futures.Future`` does this job with a condition variable, a re-entrant
lock, a list of waiters and done-callbacks; :class:`ThreadWaiter` does it with two plain
locks, and offers the part of the ``Future`` interface the clients use (``done``,
``cancelled``, ``running``, ``set_running_or_notify_cancel``, ``cancel``,
``set_result``, ``set_exception``). Its states are a ``Future``'s: pending, running
(the message left the queue: it can no longer be withdrawn), cancelled, finished.
"""

from __future__ import annotations

import threading

__all__ = ["ThreadWaiter"]

_PENDING, _RUNNING, _CANCELLED, _FINISHED = range(4)


class ThreadWaiter:
    """Settled once by the loop (or cancelled once by the waiting thread); see the
    module docstring."""

    __slots__ = ("_error", "_guard", "_settled", "_state")

    def __init__(self) -> None:
        self._state = _PENDING
        self._error: BaseException | None = None
        self._guard = threading.Lock()  # state changes: the loop's thread vs the waiter's
        self._settled = threading.Lock()  # held until the waiter is settled or cancelled
        self._settled.acquire()

    def done(self) -> bool:
        return self._state >= _CANCELLED

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def running(self) -> bool:
        return self._state == _RUNNING

    def set_running_or_notify_cancel(self) -> bool:
        """Pending -> running, as ``Future.set_running_or_notify_cancel``: False when
        the waiter was cancelled first."""
        with self._guard:
            if self._state == _CANCELLED:
                return False
            if self._state != _PENDING:
                raise RuntimeError(f"the waiter is not pending (state {self._state})")
            self._state = _RUNNING
            return True

    def cancel(self) -> bool:
        """Withdraw a waiter that is still pending; True if it is (now) cancelled."""
        with self._guard:
            if self._state == _PENDING:
                self._state = _CANCELLED
                self._settled.release()
                return True
            return self._state == _CANCELLED

    def set_result(self, result: object = None) -> None:
        self._settle(None)

    def set_exception(self, error: BaseException) -> None:
        self._settle(error)

    def _settle(self, error: BaseException | None) -> None:
        with self._guard:
            if self._state >= _CANCELLED:  # cancelled meanwhile: nobody waits any more
                return
            self._error = error
            self._state = _FINISHED
            self._settled.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until settled or cancelled (True), or until ``timeout`` seconds passed
        (False)."""
        if self._settled.acquire(True, -1 if timeout is None else max(timeout, 0.0)):
            self._settled.release()  # any later wait returns at once
            return True
        return False

    def exception(self) -> BaseException | None:
        """The error it was settled with (None: settled with success, or not yet)."""
        return self._error
