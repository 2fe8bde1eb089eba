"""Device credentials for Azure IoT Hub: connection strings (:mod:`.connection_string`),
SAS tokens (:mod:`.sas`) and X.509 identities (:mod:`.identity`). Secrets never appear in
``repr()``/``str()`` output or in exception messages."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .connection_string import ConnectionString
from .sas import SasToken, SasTokenProvider, generate_sas_token

if TYPE_CHECKING:
    from .identity import ClientIdentity, StrPath, thumbprints

__all__ = [
    "ClientIdentity",
    "ConnectionString",
    "SasToken",
    "SasTokenProvider",
    "StrPath",
    "generate_sas_token",
    "thumbprints",
]

# X.509 identities need cryptography's certificate parser: :mod:`.identity` is imported on
# first use of one of its names, so a SAS device or a bare context does not load it.
_IDENTITY_NAMES = frozenset({"ClientIdentity", "StrPath", "thumbprints"})

if not TYPE_CHECKING:  # hidden from type checkers, which see the imports above

    def __getattr__(name: str) -> Any:
        if name in _IDENTITY_NAMES:
            from . import identity

            value = getattr(identity, name)
            globals()[name] = value
            return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*globals(), *_IDENTITY_NAMES})
