"""Azure IoT Hub Device Provisioning Service (DPS): register a device, learn its hub,
connect to it.

::

    from iothub_tls.dps import ProvisioningClient, derive_device_key

    key = derive_device_key(group_key, "sensor-7")          # enrollment group
    client = ProvisioningClient.from_symmetric_key("0ne00012345", "sensor-7", key)
    registration = client.register()                         # -> Registration
    device = registration.connect("mqtt")                    # connected MqttDeviceClient

The asyncio client is :class:`iothub_tls.dps.aio.ProvisioningClient` (same name, same
surface, ``await client.register()``), as the device clients' asyncio twins in
:mod:`iothub_tls.aio` carry their synchronous names; both speak DPS over MQTT (8883)
and HTTPS (443) through the library's hardened TLS.
"""

from __future__ import annotations

from ..errors import (
    ProvisioningError,
    RegistrationDisabledError,
    RegistrationFailedError,
    UntrustedAssignmentError,
)
from .client import ProvisioningClient
from .conventions import API_VERSION, GLOBAL_ENDPOINT, Registration, derive_device_key

__all__ = [
    "API_VERSION",
    "GLOBAL_ENDPOINT",
    "ProvisioningClient",
    "ProvisioningError",
    "Registration",
    "RegistrationDisabledError",
    "RegistrationFailedError",
    "UntrustedAssignmentError",
    "derive_device_key",
]
