"""The test suite's TLS peers: :mod:`iothub_tls.testing.server` and
:mod:`iothub_tls.testing.relay`, under the names the tests import."""

from __future__ import annotations

from iothub_tls.testing.ports import free_port, wait_port
from iothub_tls.testing.relay import RecordLog, RecordRelay
from iothub_tls.testing.server import Accepted, HubLikeServer, OpenSSLServer, TLSServer

__all__ = [
    "Accepted",
    "HubLikeServer",
    "OpenSSLServer",
    "RecordLog",
    "RecordRelay",
    "TLSServer",
    "free_port",
    "wait_port",
]
