"""IoT Hub device (and module) connection strings: ``HostName=...;DeviceId=...;`` and one
of ``SharedAccessKey=...``, ``SharedAccessSignature=...`` or ``x509=true``.

:class:`ConnectionString` parses the strings the Azure portal and ``az iot hub
device-identity connection-string show`` print, validates them, and derives what a
transport needs (the host to connect to, the MQTT client id, the SAS resource URI). The
key and signature never appear in ``repr()``/``str()`` or in error messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ConnectionStringError, IdentityError, SasTokenError
from ._common import _decode_base64_key, _is_plausible_host
from .sas import SasToken, _resource_covers

if TYPE_CHECKING:
    from .identity import ClientIdentity

__all__ = ["ConnectionString"]

_HOST_NAME = "HostName"
_DEVICE_ID = "DeviceId"
_MODULE_ID = "ModuleId"
_SHARED_ACCESS_KEY = "SharedAccessKey"
_SHARED_ACCESS_KEY_NAME = "SharedAccessKeyName"
_SHARED_ACCESS_SIGNATURE = "SharedAccessSignature"
_X509 = "x509"
_GATEWAY_HOST_NAME = "GatewayHostName"

_CS_KEYS = (
    _HOST_NAME,
    _DEVICE_ID,
    _MODULE_ID,
    _SHARED_ACCESS_KEY,
    _SHARED_ACCESS_KEY_NAME,
    _SHARED_ACCESS_SIGNATURE,
    _X509,
    _GATEWAY_HOST_NAME,
)

_FORBIDDEN_IN_ID = re.compile(r"[/\s\x00-\x1f\x7f]")


def _check_identifier(name: str, value: str) -> None:
    """Reject device/module ids that would break the resource URI or the MQTT client id."""
    if not value:
        raise ConnectionStringError(f"{name} is empty")
    if len(value) > 128:
        raise ConnectionStringError(f"{name} is longer than 128 characters")
    if _FORBIDDEN_IN_ID.search(value) or not value.isascii():
        raise ConnectionStringError(
            f"{name} {value!r} contains a character IoT Hub does not allow in identities "
            "('/', whitespace, control or non-ASCII characters)"
        )


def _unknown_key_message(index: int, name: str) -> str:
    """Describe an unknown connection-string key without echoing text that may be secret.

    A value pasted without its ``SharedAccessKey=`` prefix looks like an unknown key
    (base64 keys contain ``=``), so the name is echoed only when it is recognisably a
    misspelt key name.
    """
    valid = ", ".join(_CS_KEYS)
    lowered = {k.lower(): k for k in _CS_KEYS}
    if name.lower() in lowered:
        return (
            f"key {name!r} must be written {lowered[name.lower()]!r}: connection string "
            "keys are case-sensitive"
        )
    import difflib  # (an error message's suggestion: not at start-up)

    close = difflib.get_close_matches(name, _CS_KEYS, n=1, cutoff=0.75)
    if close:
        # Suggest, but do not echo: a key glued to its name would still match closely.
        return f"unknown key in segment {index}: did you mean {close[0]!r}?"
    return (
        f"unknown key in segment {index} (not shown, it may contain secret material); "
        f"valid keys are {valid}"
    )


@dataclass(frozen=True)
class ConnectionString:
    """A parsed, validated IoT Hub *device* (or module) connection string.

    Build it with :meth:`parse`; constructing it directly runs the same validation. The
    shared access key is kept but never printed: ``repr()`` omits it and ``str()`` shows
    ``SharedAccessKey=<redacted>``.

    ``GatewayHostName`` (IoT Edge, protocol gateways) changes where the device connects,
    not who it is: :attr:`hostname` is the gateway (TLS server, SNI, certificate check),
    while :attr:`resource_uri` — what SAS tokens are signed for — keeps the hub's
    ``HostName``, as the Azure IoT SDKs do.
    """

    host_name: str
    device_id: str
    module_id: str | None = None
    shared_access_key: str | None = field(default=None, repr=False)
    shared_access_key_name: str | None = None
    x509: bool = False
    gateway_host_name: str | None = None
    #: a ready-made token (``SharedAccessSignature sr=...&sig=...&se=...``): used until it
    #: expires, never renewed (the device has no key to sign a new one)
    shared_access_signature: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.host_name:
            raise ConnectionStringError(
                "HostName is missing: expected HostName=<hub>.azure-devices.net"
            )
        if not _is_plausible_host(self.host_name):
            raise ConnectionStringError(
                f"HostName {self.host_name!r} is not a valid DNS name: give the bare host "
                "name, e.g. HostName=myhub.azure-devices.net (no scheme, port or path)"
            )
        if self.gateway_host_name is not None and not _is_plausible_host(self.gateway_host_name):
            raise ConnectionStringError(
                f"GatewayHostName {self.gateway_host_name!r} is not a valid DNS name or IP "
                "address (no scheme, port or path)"
            )
        if not self.device_id:
            raise ConnectionStringError("DeviceId is missing: expected DeviceId=<device id>")
        _check_identifier("DeviceId", self.device_id)
        if self.module_id is not None:
            _check_identifier("ModuleId", self.module_id)
        if self.shared_access_key_name is not None and not self.shared_access_key_name:
            raise ConnectionStringError("SharedAccessKeyName is empty")
        given = [
            name
            for name, present in (
                (_SHARED_ACCESS_KEY, self.shared_access_key is not None),
                (_SHARED_ACCESS_SIGNATURE, self.shared_access_signature is not None),
                ("x509=true", self.x509),
            )
            if present
        ]
        if len(given) > 1:
            raise ConnectionStringError(
                f"{' and '.join(given)} are all set: a device authenticates with one of a "
                "symmetric key, a SAS token or an X.509 certificate; keep one of them"
            )
        if not given:
            raise ConnectionStringError(
                "neither SharedAccessKey, SharedAccessSignature nor x509=true is set: add "
                "the device's SharedAccessKey, or x509=true and pass a ClientIdentity"
            )
        if self.shared_access_signature is not None:
            self._check_signature(self.shared_access_signature)
        if self.shared_access_key is not None:
            if not self.shared_access_key:
                raise ConnectionStringError("SharedAccessKey is empty")
            try:
                _decode_base64_key(self.shared_access_key)
            except (ValueError, UnicodeError):
                # ``from None``: the original error is dropped so that nothing derived
                # from the key travels with the traceback.
                raise ConnectionStringError(
                    "SharedAccessKey is not valid base64: copy the device's primary or "
                    "secondary key exactly as the portal shows it"
                ) from None

    def _check_signature(self, text: str) -> None:
        try:
            token = SasToken.parse(text)
        except SasTokenError as exc:
            raise ConnectionStringError(
                f"SharedAccessSignature is not a SAS token: {exc}"
            ) from None
        if not _resource_covers(token.resource_uri, self.resource_uri):
            raise ConnectionStringError(
                f"the SharedAccessSignature is for {token.resource_uri!r}, not for this "
                f"device ({self.resource_uri!r}): use a token made for the device"
            )

    @classmethod
    def parse(cls, text: str) -> ConnectionString:
        """Parse ``Key=Value`` pairs separated by ``;``.

        Values may contain ``=`` (base64 keys end with it); keys are case-sensitive, as
        Azure writes them. Surrounding whitespace and a trailing ``;`` are tolerated.

        :raises ConnectionStringError: naming the bad part; the key is never included.
        """
        if not isinstance(text, str):
            raise ConnectionStringError(
                f"a connection string must be a str, not {type(text).__name__}"
            )
        stripped = text.strip()
        if not stripped:
            raise ConnectionStringError("the connection string is empty")
        segments = stripped.split(";")
        if segments[-1].strip() == "":
            segments.pop()
        values: dict[str, str] = {}
        for index, raw in enumerate(segments, start=1):
            segment = raw.strip()
            if not segment:
                raise ConnectionStringError(
                    f"segment {index} is empty (two ';' in a row): expected Key=Value"
                )
            name, sep, value = segment.partition("=")
            name, value = name.strip(), value.strip()
            if not sep:
                raise ConnectionStringError(
                    f"segment {index} has no '=': every part must be Key=Value"
                )
            if name not in _CS_KEYS:
                raise ConnectionStringError(_unknown_key_message(index, name))
            if name in values:
                raise ConnectionStringError(f"duplicate key {name!r}")
            if not value and name != _SHARED_ACCESS_KEY:
                raise ConnectionStringError(f"{name} is empty")
            values[name] = value

        if _HOST_NAME not in values:
            raise ConnectionStringError(
                "HostName is missing: expected HostName=<hub>.azure-devices.net"
            )
        if _DEVICE_ID not in values:
            hint = (
                " (this looks like a hub-level policy connection string; a device needs "
                "its own device connection string)"
                if _SHARED_ACCESS_KEY_NAME in values
                else ""
            )
            raise ConnectionStringError(f"DeviceId is missing{hint}")

        x509_flag = False
        if _X509 in values:
            flag = values[_X509].lower()
            if flag not in ("true", "false"):
                raise ConnectionStringError(
                    f"x509 must be 'true' or 'false', not {values[_X509][:20]!r}"
                )
            x509_flag = flag == "true"

        return cls(
            host_name=values[_HOST_NAME],
            device_id=values[_DEVICE_ID],
            module_id=values.get(_MODULE_ID),
            shared_access_key=values.get(_SHARED_ACCESS_KEY),
            shared_access_key_name=values.get(_SHARED_ACCESS_KEY_NAME),
            x509=x509_flag,
            gateway_host_name=values.get(_GATEWAY_HOST_NAME),
            shared_access_signature=values.get(_SHARED_ACCESS_SIGNATURE),
        )

    @classmethod
    def coerce(cls, value: str | ConnectionString) -> ConnectionString:
        """``value`` itself when it is one already, else :meth:`parse` of it."""
        return value if isinstance(value, ConnectionString) else cls.parse(value)

    def check_identity(self, identity: ClientIdentity | None) -> None:
        """Check that the credentials agree: ``x509=true`` needs a device certificate,
        and a ``SharedAccessKey`` excludes one.

        :raises IdentityError: saying which way to fix it.
        """
        if self.x509 and identity is None:
            raise IdentityError(
                "the connection string says x509=true: pass "
                "identity=ClientIdentity.from_files(device_cert, device_key)"
            )
        if not self.x509 and identity is not None:
            raise IdentityError(
                "the connection string has a SharedAccessKey (or SharedAccessSignature) and "
                "an X.509 identity was given: use x509=true for certificate "
                "authentication, or drop identity"
            )

    @property
    def hostname(self) -> str:
        """The host to open the TLS connection to (and send as SNI): the gateway when
        ``GatewayHostName`` is set, else the hub."""
        return self.gateway_host_name or self.host_name

    @property
    def client_id(self) -> str:
        """The MQTT client id: ``device`` or ``device/module``."""
        if self.module_id is None:
            return self.device_id
        return f"{self.device_id}/{self.module_id}"

    @property
    def resource_uri(self) -> str:
        """The SAS resource URI (not URL-encoded): ``{HostName}/devices/{device}`` or
        ``{HostName}/devices/{device}/modules/{module}``. Always the hub's HostName, even
        behind a gateway."""
        uri = f"{self.host_name}/devices/{self.device_id}"
        if self.module_id is not None:
            uri += f"/modules/{self.module_id}"
        return uri

    def __str__(self) -> str:
        parts = [f"{_HOST_NAME}={self.host_name}", f"{_DEVICE_ID}={self.device_id}"]
        if self.module_id is not None:
            parts.append(f"{_MODULE_ID}={self.module_id}")
        if self.shared_access_key_name is not None:
            parts.append(f"{_SHARED_ACCESS_KEY_NAME}={self.shared_access_key_name}")
        if self.shared_access_key is not None:
            parts.append(f"{_SHARED_ACCESS_KEY}=<redacted>")
        if self.shared_access_signature is not None:
            parts.append(f"{_SHARED_ACCESS_SIGNATURE}=<redacted>")
        if self.x509:
            parts.append(f"{_X509}=true")
        if self.gateway_host_name is not None:
            parts.append(f"{_GATEWAY_HOST_NAME}={self.gateway_host_name}")
        return ";".join(parts)
