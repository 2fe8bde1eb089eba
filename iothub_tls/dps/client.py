"""The synchronous Device Provisioning Service client: a facade over
:class:`iothub_tls.dps.aio.ProvisioningClient` on the process's shared I/O loop."""

from __future__ import annotations

from typing import Any

from .._io.loop import shared_loop
from ..auth import ClientIdentity
from ..tls.info import TlsInfo
from . import aio
from .conventions import Registration

__all__ = ["ProvisioningClient"]


class ProvisioningClient:
    """Registers one device with the Device Provisioning Service.

    ::

        client = ProvisioningClient.from_symmetric_key(id_scope, "sensor-7", key)
        registration = client.register(timeout=60)
        device = registration.connect("mqtt")      # a connected MqttDeviceClient

    The keywords are those of :class:`iothub_tls.dps.aio.ProvisioningClient`
    (``policy``, ``endpoint``, ``port``, ``transport``, ``proxy``, ``host``,
    ``allowed_hubs``, ``sas_ttl``). The work runs on the shared I/O loop; ``register``
    blocks the calling thread only.
    """

    def __init__(self, id_scope: str, registration_id: str, **kwargs: Any) -> None:
        self._io = shared_loop()
        self._aio = aio.ProvisioningClient(id_scope, registration_id, **kwargs)

    @classmethod
    def from_symmetric_key(
        cls, id_scope: str, registration_id: str, key: str, **kwargs: Any
    ) -> ProvisioningClient:
        """A client for an individual enrollment's key, or the key derived from an
        enrollment group's key (:func:`~iothub_tls.dps.derive_device_key`)."""
        return cls(id_scope, registration_id, key=key, **kwargs)

    @classmethod
    def from_x509(
        cls, id_scope: str, registration_id: str, identity: ClientIdentity, **kwargs: Any
    ) -> ProvisioningClient:
        """A client for an X.509 enrollment (the certificate's subject CN is the
        registration id)."""
        return cls(id_scope, registration_id, identity=identity, **kwargs)

    @property
    def id_scope(self) -> str:
        return self._aio.id_scope

    @property
    def registration_id(self) -> str:
        return self._aio.registration_id

    @property
    def tls_info(self) -> TlsInfo | None:
        """What the last connection to the provisioning endpoint negotiated."""
        return self._aio.tls_info

    def register(self, payload: Any = None, timeout: float = 60.0) -> Registration:
        """Register the device; see :meth:`iothub_tls.dps.aio.ProvisioningClient.register`."""
        return self._io.run(self._aio.register(payload, timeout))

    def __repr__(self) -> str:
        return repr(self._aio)
