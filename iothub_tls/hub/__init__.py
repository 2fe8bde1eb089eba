"""The local compliance endpoint: a simulated IoT Hub that enforces (or, on request,
deliberately breaks) IoT Hub's TLS policy and logs what each device negotiated.

* :class:`HubTlsProfile` / :class:`ServerCredential` — the server-side TLS every front
  door shares.
* :class:`DeviceRegistry` — devices, their SAS keys, thumbprints and CAs.
* :class:`HubState` — telemetry and cloud-to-device queues shared by the front doors.
* :class:`ConnectionLog` — one IoT Hub-style record per connection.
* :class:`HttpsEndpoint` — the device REST API over HTTPS.
"""

from .https import HttpsEndpoint, ReceivedMessage
from .log import ConnectionEvent, ConnectionLog
from .profile import HubTlsProfile, PeerTls, ServerCredential, peer_tls
from .registry import (
    Device,
    DeviceNotRegisteredError,
    DeviceRegistry,
    RegistryError,
    TokenSource,
)
from .state import HubState

__all__ = [
    "ConnectionEvent",
    "ConnectionLog",
    "Device",
    "DeviceNotRegisteredError",
    "DeviceRegistry",
    "HttpsEndpoint",
    "HubState",
    "HubTlsProfile",
    "PeerTls",
    "ReceivedMessage",
    "RegistryError",
    "ServerCredential",
    "TokenSource",
    "peer_tls",
]
