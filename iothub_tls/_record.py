"""Small immutable records for modules a device imports at start-up.

``@dataclass(frozen=True)`` generates and compiles six methods per class when its module
is imported: about 0.4 ms a class on a small machine, which the MQTT codec (a dozen
packet types) and the topic conventions paid on every start of a device. A
:class:`Record` subclass lists its fields in ``_fields`` (its ``__slots__`` too) and
assigns them in its own
``__init__`` (through ``object.__setattr__``); equality (same type, equal fields), hashing, the
repr and the refusal of assignment come from here, as a frozen dataclass has them.
Public, configurable values (policies, options, messages) stay dataclasses: users make
variants of them with ``dataclasses.replace``.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from typing import Any, ClassVar

__all__ = ["Record"]

_set = object.__setattr__


class Record:
    """Base of an immutable record (see the module docstring)."""

    __slots__ = ()
    #: the fields, in order (what the constructor takes and the repr shows)
    _fields: ClassVar[tuple[str, ...]] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            assert isinstance(other, Record)
            return self._values() == other._values()
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.__class__, self._values()))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__qualname__}({shown})"

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, self._values())
