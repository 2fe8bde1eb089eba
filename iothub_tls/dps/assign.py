"""From an assigned registration to a device client of the assigned hub."""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

from ..errors import (
    CertificateVerificationError,
    PolicyError,
    PolicyViolation,
    ProvisioningError,
    UntrustedAssignmentError,
)

if TYPE_CHECKING:
    from .conventions import Registration

__all__ = ["connect", "device_client", "hub_allowed"]

_TRANSPORTS = ("mqtt", "amqp", "https")


def hub_allowed(hub: str, patterns: tuple[str, ...] | None) -> bool:
    """True when ``hub`` matches one of ``patterns`` (fnmatch, case-insensitive); None
    allows every name."""
    if patterns is None:
        return True
    name = hub.lower().rstrip(".")
    return any(fnmatch.fnmatchcase(name, p.lower()) for p in patterns)


def _client_class(transport: str, aio: bool) -> Any:
    if transport not in _TRANSPORTS:
        raise PolicyError(f"transport must be one of {', '.join(_TRANSPORTS)}, not {transport!r}")
    if aio:
        from .. import aio as module

        return {
            "mqtt": module.MqttDeviceClient,
            "amqp": module.AmqpDeviceClient,
            "https": module.HttpsDeviceClient,
        }[transport]
    if transport == "mqtt":
        from ..mqtt import MqttDeviceClient

        return MqttDeviceClient
    if transport == "amqp":
        from ..amqp import AmqpDeviceClient

        return AmqpDeviceClient
    from ..https import HttpsDeviceClient

    return HttpsDeviceClient


def device_client(
    registration: Registration, transport: str, *, aio: bool, kwargs: dict[str, Any]
) -> Any:
    """See :meth:`Registration.device_client`."""
    hub, device_id = registration.assigned_hub, registration.device_id
    if registration.status != "assigned" or not hub or not device_id:
        raise ProvisioningError(
            f"registration {registration.registration_id!r} is {registration.status!r}, not "
            "assigned to a hub: there is no hub to connect to"
        )
    origin = registration._origin
    if origin is None:
        raise ProvisioningError(
            f"this registration of {registration.registration_id!r} was not made by a "
            "ProvisioningClient of this process, so it holds no credential: build the "
            f"client with from_symmetric_key({hub!r}, {device_id!r}, key) or from_x509(...)"
        )
    if not hub_allowed(hub, origin.allowed_hubs):
        raise UntrustedAssignmentError(
            f"the provisioning service assigned {registration.registration_id!r} to {hub!r}, "
            f"which is not one of the allowed hubs ({', '.join(origin.allowed_hubs)}): the "
            "device does not connect there. Check the enrollment's hub in the provisioning "
            "service, or add the hub to allowed_hubs"
        )
    cls = _client_class(transport, aio)
    options = {"policy": origin.policy, **kwargs}
    if origin.key is not None:
        return cls.from_symmetric_key(hub, device_id, origin.key, **options)
    return cls.from_x509(hub, device_id, origin.identity, **options)


def connect(registration: Registration, transport: str, kwargs: dict[str, Any]) -> Any:
    """See :meth:`Registration.connect`."""
    client = device_client(registration, transport, aio=False, kwargs=kwargs)
    try:
        client.connect()
    except (CertificateVerificationError, PolicyViolation) as exc:
        error = UntrustedAssignmentError(
            f"the provisioning service assigned {registration.registration_id!r} to "
            f"{registration.assigned_hub!r}, and that hub is outside the policy's trust: {exc}"
        )
        error.registration = registration
        raise error from exc
    return client
