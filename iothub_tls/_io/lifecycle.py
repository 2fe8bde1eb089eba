"""The connect/close life cycle the device clients share: ``with client:`` connects on
entry and closes on exit, whatever happened in between."""

from __future__ import annotations

from typing import Any, TypeVar

_C = TypeVar("_C", bound="Connectable")


class Connectable:
    """Mixin: subclasses implement ``connect()`` and ``close()``."""

    def connect(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _C) -> _C:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
