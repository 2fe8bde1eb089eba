"""Waiting for a socket without ``select()``'s limit.

``select()`` cannot watch descriptors numbered 1024 or above (FD_SETSIZE), which a
process reaches with a few hundred connections or many open files. ``poll()`` has no
such limit; where it does not exist (Windows) ``selectors`` stands in, behind the same
interface. Timeouts are in milliseconds, as ``poll()`` takes them.
"""

from __future__ import annotations

import math
import select
import selectors
from collections.abc import Sequence
from typing import Protocol


class Poller(Protocol):
    """The part of ``select.poll`` objects the network thread uses."""

    def register(self, fd: int, eventmask: int = ..., /) -> None: ...

    def modify(self, fd: int, eventmask: int, /) -> None: ...

    def unregister(self, fd: int, /) -> None: ...

    def poll(self, timeout: float | None = ..., /) -> list[tuple[int, int]]: ...


if hasattr(select, "poll"):
    IN, OUT = select.POLLIN, select.POLLOUT
    #: Anything but "writable" makes paho read: data, the peer's close, an error.
    READABLE = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | select.POLLNVAL
else:  # pragma: no cover - Windows
    IN, OUT = selectors.EVENT_READ, selectors.EVENT_WRITE
    READABLE = selectors.EVENT_READ


class SelectorPoller:
    """``selectors.DefaultSelector`` behind the ``poll`` interface, for platforms
    without ``select.poll`` (Windows)."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()

    @staticmethod
    def _events(mask: int) -> int:
        return (selectors.EVENT_READ if mask & IN else 0) | (
            selectors.EVENT_WRITE if mask & OUT else 0
        )

    def register(self, fd: int, eventmask: int = IN, /) -> None:
        self._selector.register(fd, self._events(eventmask))

    def modify(self, fd: int, eventmask: int, /) -> None:
        self._selector.modify(fd, self._events(eventmask))

    def unregister(self, fd: int, /) -> None:
        self._selector.unregister(fd)

    def poll(self, timeout: float | None = None, /) -> list[tuple[int, int]]:
        seconds = None if timeout is None else max(timeout, 0) / 1000
        return [
            (key.fd, (IN if events & selectors.EVENT_READ else 0)
             | (OUT if events & selectors.EVENT_WRITE else 0))
            for key, events in self._selector.select(seconds)
        ]  # fmt: skip

    def close(self) -> None:
        self._selector.close()


def new_poller() -> Poller:
    return select.poll() if hasattr(select, "poll") else SelectorPoller()


def millis(seconds: float) -> int:
    """A poll timeout: whole milliseconds, rounded up so a deadline is not missed."""
    return 0 if seconds <= 0 else math.ceil(seconds * 1000)


def readable(read: Sequence[int], write: Sequence[int], seconds: float) -> set[int]:
    """Like ``select.select(read, write, [], seconds)[0]`` (waking also when a ``write``
    descriptor becomes writable), without select's limit on descriptor numbers."""
    poller = new_poller()
    try:
        for fd in set(read) | set(write):
            poller.register(fd, (READABLE if fd in read else 0) | (OUT if fd in write else 0))
        return {fd for fd, events in poller.poll(millis(seconds)) if events & READABLE}
    finally:
        close = getattr(poller, "close", None)
        if close is not None:
            close()
