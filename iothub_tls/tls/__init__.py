"""TLS for devices: the hardened context factory and its guards (:mod:`.context`), the
session memory (:mod:`.sessions`), refusals that explain themselves (:mod:`.refusals`),
what a connection negotiated (:mod:`.info`) and the one ctypes shim into OpenSSL
(:mod:`._openssl`). The public names are re-exported by :mod:`iothub_tls`."""

from __future__ import annotations

from .context import HardenedSSLContext, HardenedSSLObject, HardenedSSLSocket, create_ssl_context
from .info import TlsInfo, tls_info

__all__ = [
    "HardenedSSLContext",
    "HardenedSSLObject",
    "HardenedSSLSocket",
    "TlsInfo",
    "create_ssl_context",
    "tls_info",
]
