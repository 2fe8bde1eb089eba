"""Device credentials for Azure IoT Hub: connection strings (:mod:`.connection_string`),
SAS tokens (:mod:`.sas`) and X.509 identities (:mod:`.identity`). Secrets never appear in
``repr()``/``str()`` output or in exception messages."""

from __future__ import annotations

from .connection_string import ConnectionString
from .identity import ClientIdentity, StrPath, thumbprints
from .sas import SasToken, SasTokenProvider, generate_sas_token

__all__ = [
    "ClientIdentity",
    "ConnectionString",
    "SasToken",
    "SasTokenProvider",
    "StrPath",
    "generate_sas_token",
    "thumbprints",
]
