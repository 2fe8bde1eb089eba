"""What the device clients share whatever their transport: the factories
(``from_connection_string``, ``from_symmetric_key``, ``from_x509``) and the checks of
their host and port. The callbacks, states and routing of the asyncio clients are in
:mod:`.aiobase`; the synchronous clients are facades over those (:mod:`.facade`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import PolicyError, UnsupportedOperationError

if TYPE_CHECKING:
    from ..auth import ClientIdentity, ConnectionString

logger = logging.getLogger("iothub_tls")

_Self = TypeVar("_Self", bound="Factories")


class Factories:
    """The three factories every device client has (sync and asyncio); each client's
    constructor takes ``(connection_string, **its keywords)``."""

    @classmethod
    def from_connection_string(
        cls: type[_Self], connection_string: str | ConnectionString, **kwargs: Any
    ) -> _Self:
        """A client for the device (or module) of ``HostName=...;DeviceId=...;`` and one
        of ``SharedAccessKey=...``, ``SharedAccessSignature=...`` or ``x509=true`` (then
        with ``identity=``); ``ModuleId``, ``SharedAccessKeyName`` and
        ``GatewayHostName`` are honoured.

        :raises ConnectionStringError: naming the malformed part (never the key).
        :raises IdentityError: x509=true without ``identity``, or a key and an identity.
        """
        from ..auth import ConnectionString

        return _build(cls, ConnectionString.coerce(connection_string), kwargs)

    @classmethod
    def from_symmetric_key(
        cls: type[_Self],
        host_name: str,
        device_id: str,
        key: str,
        *,
        module_id: str | None = None,
        **kwargs: Any,
    ) -> _Self:
        """A client for a device (or module) that authenticates with its symmetric key
        (SAS tokens are made from it and renewed)."""
        from ..auth import ConnectionString

        cs = ConnectionString(
            host_name=host_name, device_id=device_id, module_id=module_id, shared_access_key=key
        )
        return _build(cls, cs, kwargs)

    @classmethod
    def from_x509(
        cls: type[_Self],
        host_name: str,
        device_id: str,
        identity: ClientIdentity,
        *,
        module_id: str | None = None,
        **kwargs: Any,
    ) -> _Self:
        """A client for a device (or module) that authenticates with its X.509
        certificate (mutual TLS)."""
        from ..auth import ConnectionString

        cs = ConnectionString(
            host_name=host_name, device_id=device_id, module_id=module_id, x509=True
        )
        return _build(cls, cs, {**kwargs, "identity": identity})


def _build(cls: type[_Self], cs: ConnectionString, kwargs: dict[str, Any]) -> _Self:
    # each client's constructor takes (connection_string, **its keywords)
    constructor: Any = cls
    built: _Self = constructor(cs, **kwargs)
    return built


def check_port(port: object, default: int) -> int:
    """``port`` (None: ``default``) as a valid TCP port, else :class:`PolicyError`."""
    if port is None:
        return default
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise PolicyError(f"port must be an int between 1 and 65535, not {port!r}")
    return port


def check_host(host: object) -> str | None:
    """``host`` (where to dial instead of the hub's name), else :class:`PolicyError`."""
    if host is not None and (not isinstance(host, str) or not host.strip()):
        raise PolicyError(f"host must be a non-empty host name or address, not {host!r}")
    return host


def unsupported(transport: str, what: str, use: str) -> UnsupportedOperationError:
    """The error for an operation IoT Hub does not offer over ``transport``."""
    return UnsupportedOperationError(f"IoT Hub offers no {what} over {transport}: {use}")
