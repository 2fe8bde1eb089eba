"""The local endpoint's device registry: who may connect, and with which credentials.

Like IoT Hub's identity registry, a device authenticates with one of:

* **SAS** — a primary and/or secondary symmetric key; the device signs tokens with it
  (:meth:`DeviceRegistry.verify_sas`).
* **X.509 thumbprint** ("self-signed" in the portal) — the SHA-1 or SHA-256 thumbprint
  of a primary and/or secondary device certificate (:meth:`DeviceRegistry.verify_certificate`).
* **X.509 CA** — any certificate whose verified chain contains one of the registry's
  certificate authorities and whose subject CN is the device id.

Shared access *policies* (name -> key and permissions, e.g. ``device`` with
DeviceConnect, ``iothubowner`` with every permission) sign tokens, as on a hub: a
DeviceConnect policy's token can connect any device (a valid one for a device that is not
registered is the case IoT Hub answers with 404 DeviceNotFound), and a ServiceConnect /
RegistryRead / RegistryWrite policy's token, for the hub's host name, calls the service
API (:meth:`DeviceRegistry.verify_service_sas`).

The registry can persist itself as ``devices.json`` in a state directory (written
atomically, mode 0600: it holds keys).
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from .._io.fs import private_directory
from ..auth import SasToken
from ..auth import thumbprints as _thumbprints
from ..errors import AuthenticationError, IoTHubTLSError, NotAuthorizedError, SasTokenError
from ..roots import common_name

__all__ = [
    "ALL_PERMISSIONS",
    "DEVICE_CONNECT",
    "REGISTRY_READ",
    "REGISTRY_WRITE",
    "SERVICE_CONNECT",
    "Device",
    "DeviceNotRegisteredError",
    "DeviceRegistry",
    "RegistryError",
    "TokenSource",
    "certificate_thumbprints",
]

STATE_FILE = "devices.json"

#: IoT Hub's shared access policy permissions.
REGISTRY_READ = "RegistryRead"
REGISTRY_WRITE = "RegistryWrite"
SERVICE_CONNECT = "ServiceConnect"
DEVICE_CONNECT = "DeviceConnect"
ALL_PERMISSIONS = (REGISTRY_READ, REGISTRY_WRITE, SERVICE_CONNECT, DEVICE_CONNECT)
_FORMAT = 1
_ID = re.compile(r"[A-Za-z0-9\-.+%_#*?!(),:=@$']{1,128}")
_HEX = re.compile(r"[0-9A-F]+")


class RegistryError(IoTHubTLSError, ValueError):
    """Invalid registry input (device id, key, thumbprint, certificate) or an unreadable
    state file."""


class DeviceNotRegisteredError(IoTHubTLSError, LookupError):
    """Valid shared-access-policy credentials for a device id the registry does not
    hold (IoT Hub: 404 DeviceNotFound)."""


class TokenSource(enum.Enum):
    """Where a device's SAS token came from: refusals name it in the device's terms
    (MQTT has no Authorization header)."""

    AUTHORIZATION_HEADER = "the Authorization header"  # HTTPS
    MQTT_PASSWORD = "the MQTT password"  # noqa: S105 - a description, not a secret
    CBS_PUT_TOKEN = "the $cbs put-token"  # noqa: S105 - AMQP; a description, not a secret

    @property
    def how_to_send(self) -> str:
        """How a device sends a token this way ("send a SAS token ...")."""
        return {
            TokenSource.AUTHORIZATION_HEADER: "in the Authorization header",
            TokenSource.MQTT_PASSWORD: "as the MQTT password",
            TokenSource.CBS_PUT_TOKEN: "with a $cbs put-token",
        }[self]

    @property
    def how_to_omit(self) -> str:
        """What an X.509 device leaves out instead."""
        return {
            TokenSource.AUTHORIZATION_HEADER: "send no Authorization header",
            TokenSource.MQTT_PASSWORD: "send no MQTT password",
            TokenSource.CBS_PUT_TOKEN: "put no token on $cbs",
        }[self]


def _check_device_id(device_id: str) -> None:
    if not isinstance(device_id, str) or not _ID.fullmatch(device_id):
        raise RegistryError(
            f"device id {device_id!r} is not valid: 1-128 ASCII letters, digits and "
            "-.+%_#*?!(),:=@$' characters (IoT Hub's rule)"
        )


def _check_key(key: str, what: str) -> str:
    try:
        raw = base64.b64decode(key, validate=True)
    except (ValueError, binascii.Error, TypeError):
        raw = b""
    if len(raw) < 16:
        raise RegistryError(
            f"{what} must be base64 of at least 16 bytes (IoT Hub generates 32); "
            "use DeviceRegistry.new_key()"
        )
    return key


def normalize_thumbprint(text: str) -> str:
    """Upper-case hex without separators; SHA-1 (40 digits) or SHA-256 (64 digits)."""
    if not isinstance(text, str):
        raise RegistryError(f"a thumbprint must be text, not {type(text).__name__}")
    cleaned = re.sub(r"[\s:]", "", text).upper()
    if not _HEX.fullmatch(cleaned) or len(cleaned) not in (40, 64):
        raise RegistryError(
            f"thumbprint {text[:80]!r} is not a SHA-1 (40 hex digits) or SHA-256 "
            "(64 hex digits) certificate thumbprint; 'iothub-tls thumbprint CERT' prints both"
        )
    return cleaned


def certificate_thumbprints(der: bytes) -> tuple[str, str]:
    """(SHA-1, SHA-256) thumbprints of a DER certificate, as IoT Hub shows them."""
    return _thumbprints(der)


def _new_generation_id() -> str:
    """18 digits, as IoT Hub's generation ids look (a timestamp-like number)."""
    return str(638_000_000_000_000_000 + secrets.randbelow(10**15))


@dataclass(frozen=True)
class Device:
    """One registered device. Keys are base64 text; thumbprints are normalized hex."""

    device_id: str
    primary_key: str | None = field(default=None, repr=False)
    secondary_key: str | None = field(default=None, repr=False)
    thumbprints: tuple[str, ...] = ()
    #: Authenticates with a certificate chaining to one of the registry's CAs.
    x509_ca: bool = False
    enabled: bool = True
    #: IoT Hub's ``generationId``: tells a re-created device from the one deleted before
    #: it under the same id (made at registration when not given).
    generation_id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        _check_device_id(self.device_id)
        if not self.generation_id:
            object.__setattr__(self, "generation_id", _new_generation_id())
        for name in ("primary_key", "secondary_key"):
            value = getattr(self, name)
            if value is not None:
                _check_key(value, f"{name} of {self.device_id!r}")
        object.__setattr__(
            self, "thumbprints", tuple(normalize_thumbprint(t) for t in self.thumbprints)
        )
        if not (self.primary_key or self.secondary_key or self.thumbprints or self.x509_ca):
            raise RegistryError(
                f"device {self.device_id!r} has no credential: give a SAS key, an X.509 "
                "thumbprint, or x509_ca=True"
            )

    @property
    def auth_type(self) -> str:
        """ "sas", "selfSigned" or "certificateAuthority" (IoT Hub's names)."""
        if self.primary_key or self.secondary_key:
            return "sas"
        return "selfSigned" if self.thumbprints else "certificateAuthority"

    def as_json(self) -> dict[str, Any]:
        return {
            "deviceId": self.device_id,
            "status": "enabled" if self.enabled else "disabled",
            "primaryKey": self.primary_key,
            "secondaryKey": self.secondary_key,
            "thumbprints": list(self.thumbprints),
            "x509CA": self.x509_ca,
            "generationId": self.generation_id,
        }

    @classmethod
    def from_json(cls, data: Any) -> Device:
        if not isinstance(data, dict):
            raise RegistryError("a device entry must be a JSON object")
        return cls(
            device_id=data.get("deviceId", ""),
            primary_key=data.get("primaryKey"),
            secondary_key=data.get("secondaryKey"),
            thumbprints=tuple(data.get("thumbprints") or ()),
            x509_ca=bool(data.get("x509CA", False)),
            enabled=data.get("status", "enabled") != "disabled",
            generation_id=str(data.get("generationId") or ""),
        )


class DeviceRegistry:
    """Devices, shared access policies and certificate authorities of one hub.

    :param hub_host: the hub's host name that SAS tokens are signed for
        (``myhub.azure-devices.net``; the ``HostName`` of the devices' connection strings).
    :param state_dir: where :meth:`save` writes ``devices.json`` (None: memory only).
    """

    def __init__(self, hub_host: str, *, state_dir: str | os.PathLike[str] | None = None) -> None:
        if not isinstance(hub_host, str) or not hub_host or "/" in hub_host:
            raise RegistryError(
                f"hub_host {hub_host!r} must be the hub's bare host name, e.g. "
                "myhub.azure-devices.net"
            )
        self.hub_host = hub_host.lower()
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._lock = threading.Lock()
        self._devices: dict[str, Device] = {}
        self._policies: dict[str, str] = {}
        self._permissions: dict[str, tuple[str, ...]] = {}
        self._cas: list[x509.Certificate] = []

    # -- contents -----------------------------------------------------------------------

    @staticmethod
    def new_key() -> str:
        """A fresh 32-byte base64 key, as IoT Hub generates them."""
        return base64.b64encode(secrets.token_bytes(32)).decode("ascii")

    def add(self, device: Device, *, replace_existing: bool = False) -> Device:
        """Register ``device``. :raises RegistryError: when the id exists (unless
        ``replace_existing``)."""
        if not isinstance(device, Device):
            raise RegistryError(f"expected a Device, got {type(device).__name__}")
        with self._lock:
            if device.device_id in self._devices and not replace_existing:
                raise RegistryError(
                    f"device {device.device_id!r} is already registered (pass "
                    "replace_existing=True to change its credentials)"
                )
            self._devices[device.device_id] = device
        return device

    def add_sas_device(
        self, device_id: str, primary_key: str | None = None, secondary_key: str | None = None
    ) -> Device:
        """Register a symmetric-key device (a primary key is generated when not given)."""
        return self.add(Device(device_id, primary_key or self.new_key(), secondary_key))

    def add_x509_device(self, device_id: str, *thumbprints: str) -> Device:
        """Register a device by the thumbprint(s) of its certificate(s)."""
        if not thumbprints:
            raise RegistryError("give the primary (and optionally secondary) thumbprint")
        return self.add(Device(device_id, thumbprints=tuple(thumbprints)))

    def add_ca_device(self, device_id: str) -> Device:
        """Register a device that authenticates with a CA-signed certificate."""
        return self.add(Device(device_id, x509_ca=True))

    def set_enabled(self, device_id: str, enabled: bool) -> Device:
        with self._lock:
            device = self._devices.get(device_id)
            if device is None:
                raise DeviceNotRegisteredError(f"device {device_id!r} is not registered")
            device = self._devices[device_id] = replace(device, enabled=enabled)
        return device

    def remove(self, device_id: str) -> None:
        with self._lock:
            if self._devices.pop(device_id, None) is None:
                raise DeviceNotRegisteredError(f"device {device_id!r} is not registered")

    def get(self, device_id: str) -> Device | None:
        with self._lock:
            return self._devices.get(device_id)

    @property
    def devices(self) -> tuple[Device, ...]:
        with self._lock:
            return tuple(self._devices.values())

    def add_policy(
        self,
        name: str,
        key: str | None = None,
        permissions: Sequence[str] = (DEVICE_CONNECT,),
    ) -> str:
        """Add (or replace) a shared access policy; returns its key.

        :param permissions: IoT Hub's permission names (:data:`ALL_PERMISSIONS`); the
            default, DeviceConnect, lets its tokens connect devices only.
        """
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
            raise RegistryError(f"policy name {name!r} must be 1-64 letters, digits, . _ -")
        unknown = [p for p in permissions if p not in ALL_PERMISSIONS]
        if unknown or not permissions:
            raise RegistryError(
                f"policy {name!r}: permissions must be some of {', '.join(ALL_PERMISSIONS)}, "
                f"not {list(permissions)!r}"
            )
        key = _check_key(key or self.new_key(), f"key of policy {name!r}")
        with self._lock:
            self._policies[name] = key
            self._permissions[name] = tuple(p for p in ALL_PERMISSIONS if p in permissions)
        return key

    def policy_key(self, name: str) -> str | None:
        """The key of policy ``name`` (None when there is no such policy)."""
        with self._lock:
            return self._policies.get(name)

    def policy_permissions(self, name: str) -> tuple[str, ...]:
        """The permissions of policy ``name`` (empty when there is no such policy)."""
        with self._lock:
            return self._permissions.get(name, ())

    def add_certificate_authority(self, pem: bytes | str) -> x509.Certificate:
        """Add a verified CA (portal: Certificates) for CA-signed devices."""
        data = pem.encode("ascii") if isinstance(pem, str) else pem
        try:
            cert = x509.load_pem_x509_certificate(data)
        except ValueError as exc:
            raise RegistryError(f"not a PEM certificate: {exc}") from None
        if not _is_ca(cert):
            raise RegistryError(
                f"{common_name(cert)!r} is not a CA certificate (BasicConstraints CA=TRUE)"
            )
        with self._lock:
            if cert not in self._cas:
                self._cas.append(cert)
        return cert

    @property
    def certificate_authorities(self) -> tuple[x509.Certificate, ...]:
        with self._lock:
            return tuple(self._cas)

    def certificate_authorities_pem(self) -> bytes:
        """The CAs as one PEM bundle (to put into a profile's ``client_ca_pem``)."""
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in self.certificate_authorities
        )

    # -- verification -------------------------------------------------------------------

    def resource_uri(self, device_id: str) -> str:
        return f"{self.hub_host}/devices/{device_id}"

    def verify_sas(
        self,
        device_id: str,
        authorization: str,
        *,
        now: float | None = None,
        source: TokenSource = TokenSource.AUTHORIZATION_HEADER,
    ) -> Device:
        """Check a SAS token for ``device_id`` as IoT Hub does: a device-key token (no
        ``skn``) signed with the device's primary or secondary key, or a policy token
        (``skn``) signed with that policy's key; not expired; for a resource covering
        ``{hub}/devices/{device_id}``.

        :param source: where the token came from, named in refusals.
        :raises AuthenticationError: saying which check failed.
        :raises DeviceNotRegisteredError: for a valid policy token and an unknown device.
        """
        current = time.time() if now is None else now
        try:
            token = SasToken.parse(authorization)
        except SasTokenError as exc:
            detail = str(exc).removeprefix("not a SAS token: ")
            raise AuthenticationError(f"{source.value} is not a SAS token ({detail})") from None
        resource = self.resource_uri(device_id)
        if token.key_name is not None:
            with self._lock:
                policy_key = self._policies.get(token.key_name)
                permissions = self._permissions.get(token.key_name, ())
            if policy_key is None:
                raise AuthenticationError(
                    f"the SAS token names policy {token.key_name!r}, which this hub does not have"
                )
            self._check_token(token, [policy_key], resource, current, f"policy {token.key_name!r}")
            if DEVICE_CONNECT not in permissions:
                raise AuthenticationError(
                    f"policy {token.key_name!r} has no DeviceConnect permission: it cannot "
                    "connect devices"
                )
            device = self.get(device_id)
            if device is None:
                raise DeviceNotRegisteredError(f"device {device_id!r} is not registered")
        else:
            device = self.get(device_id)
            if device is None:
                raise AuthenticationError(
                    f"device {device_id!r} is not registered, so its SAS token cannot be verified"
                )
            keys = [k for k in (device.primary_key, device.secondary_key) if k]
            if not keys:
                raise AuthenticationError(
                    f"device {device_id!r} authenticates with X.509 ({device.auth_type}), "
                    f"not SAS: present its certificate and {source.how_to_omit}"
                )
            self._check_token(token, keys, resource, current, f"device {device_id!r}")
        if not device.enabled:
            raise AuthenticationError(f"device {device_id!r} is disabled")
        return device

    @staticmethod
    def _check_token(
        token: SasToken, keys: Sequence[str], resource: str, now: float, whose: str
    ) -> None:
        problems: list[str] = []
        for key in keys:
            try:
                token.verify(key, resource_uri=resource, now=now)
                return
            except SasTokenError as exc:
                problems.append(str(exc))
        # Expiry and resource messages are more useful than the signature one.
        best = next((p for p in problems if "signature" not in p), problems[0])
        raise AuthenticationError(f"SAS token refused for {whose}: {best}")

    def verify_service_sas(
        self, authorization: str, permission: str, *, now: float | None = None
    ) -> str:
        """Check a token on the service API as IoT Hub does: signed with the key of the
        shared access policy it names (``skn``), for a resource covering the hub's host
        name, not expired, and the policy has ``permission``. Returns the policy name.

        :raises AuthenticationError: saying which check failed (a device-key token, an
            unknown policy, a bad signature, expiry, the resource).
        :raises NotAuthorizedError: the policy lacks ``permission``.
        """
        current = time.time() if now is None else now
        try:
            token = SasToken.parse(authorization)
        except SasTokenError as exc:
            detail = str(exc).removeprefix("not a SAS token: ")
            raise AuthenticationError(
                f"the Authorization header is not a SAS token ({detail})"
            ) from None
        if token.key_name is None:
            raise AuthenticationError(
                "the SAS token is signed with a device key (it has no skn): the service API "
                "takes a token of a shared access policy such as iothubowner"
            )
        with self._lock:
            policy_key = self._policies.get(token.key_name)
            permissions = self._permissions.get(token.key_name, ())
        if policy_key is None:
            raise AuthenticationError(
                f"the SAS token names policy {token.key_name!r}, which this hub does not have"
            )
        self._check_token(token, [policy_key], self.hub_host, current, f"policy {token.key_name!r}")
        if permission not in permissions:
            raise NotAuthorizedError(
                f"policy {token.key_name!r} has no {permission} permission "
                f"(it has {', '.join(permissions)})"
            )
        return token.key_name

    def verify_certificate(
        self,
        device_id: str,
        chain_der: Sequence[bytes],
        *,
        source: TokenSource = TokenSource.AUTHORIZATION_HEADER,
    ) -> Device:
        """Check a device certificate for ``device_id``: its thumbprint is registered, or
        (``x509_ca`` devices) its chain contains a registered CA and its CN is the id.

        :param chain_der: the client's chain as verified by TLS, leaf first (just the
            leaf when the verified chain cannot be read; then the leaf must be issued
            directly by a registered CA).
        :param source: how the device would have sent a SAS token instead (named when
            it sent neither).
        :raises AuthenticationError: saying why the certificate does not identify the device.
        """
        if not chain_der:
            raise AuthenticationError(
                f"no credentials for device {device_id!r}: send a SAS token "
                f"{source.how_to_send} or present the device certificate in TLS"
            )
        device = self.get(device_id)
        if device is None:
            raise AuthenticationError(f"device {device_id!r} is not registered")
        if not device.enabled:
            raise AuthenticationError(f"device {device_id!r} is disabled")
        sha1, sha256 = certificate_thumbprints(chain_der[0])
        if device.thumbprints:
            if sha1 in device.thumbprints or sha256 in device.thumbprints:
                return device
            raise AuthenticationError(
                f"the certificate presented (SHA-256 thumbprint {sha256}) is not one "
                f"registered for device {device_id!r}"
            )
        if device.x509_ca:
            leaf = x509.load_der_x509_certificate(chain_der[0])
            if common_name(leaf) != device_id:
                raise AuthenticationError(
                    f"the certificate's subject CN {common_name(leaf)!r} is not the device "
                    f"id {device_id!r} (CA-signed devices are identified by their CN)"
                )
            if self._chains_to_registered_ca(leaf, chain_der[1:]):
                return device
            raise AuthenticationError(
                f"the certificate of {device_id!r} does not chain to a certificate "
                "authority registered in this hub"
            )
        raise AuthenticationError(
            f"device {device_id!r} authenticates with a SAS key, not a certificate"
        )

    def _chains_to_registered_ca(self, leaf: x509.Certificate, above: Sequence[bytes]) -> bool:
        cas = self.certificate_authorities
        cas_der = {c.public_bytes(serialization.Encoding.DER) for c in cas}
        if any(der in cas_der for der in above):
            return True
        for ca in cas:
            try:
                leaf.verify_directly_issued_by(ca)
            except (InvalidSignature, ValueError, TypeError):
                continue
            return True
        return False

    # -- persistence --------------------------------------------------------------------

    def as_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "format": _FORMAT,
                "hubHost": self.hub_host,
                "devices": [d.as_json() for d in self._devices.values()],
                "policies": [
                    {"name": n, "key": k, "permissions": list(self._permissions[n])}
                    for n, k in self._policies.items()
                ],
                "certificateAuthorities": [
                    c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in self._cas
                ],
            }

    def save(self) -> Path:
        """Write ``devices.json`` into the state directory atomically (mode 0600)."""
        if self.state_dir is None:
            raise RegistryError("this registry has no state_dir to save to")
        private_directory(self.state_dir)
        target = self.state_dir / STATE_FILE
        data = json.dumps(self.as_json(), indent=2).encode("utf-8")
        fd, tmp = tempfile.mkstemp(prefix=".devices-", dir=self.state_dir)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def load(cls, state_dir: str | os.PathLike[str]) -> DeviceRegistry:
        """Read ``devices.json`` from ``state_dir``.

        :raises RegistryError: when the file is missing, not JSON or not a registry.
        """
        path = Path(state_dir) / STATE_FILE
        try:
            data = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise RegistryError(
                f"{path} does not exist: create the registry first (DeviceRegistry(...).save())"
            ) from None
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{path} is not a readable registry: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise RegistryError(f"{path} is not a registry file of format {_FORMAT}")
        registry = cls(str(data.get("hubHost", "")), state_dir=state_dir)
        for entry in _list(data, "devices", path):
            registry.add(Device.from_json(entry))
        for entry in _list(data, "policies", path):
            if not isinstance(entry, dict):
                raise RegistryError(f"{path}: a policy entry must be an object")
            permissions = entry.get("permissions", [DEVICE_CONNECT])
            if not isinstance(permissions, list):
                raise RegistryError(f"{path}: a policy's permissions must be a list")
            registry.add_policy(
                str(entry.get("name")), str(entry.get("key")), [str(p) for p in permissions]
            )
        for pem in _list(data, "certificateAuthorities", path):
            registry.add_certificate_authority(str(pem))
        return registry

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str], hub_host: str) -> DeviceRegistry:
        """Load the registry in ``state_dir``, or start an empty one for ``hub_host``."""
        if (Path(state_dir) / STATE_FILE).exists():
            return cls.load(state_dir)
        return cls(hub_host, state_dir=state_dir)

    def __repr__(self) -> str:
        return (
            f"DeviceRegistry(hub_host={self.hub_host!r}, devices={len(self._devices)}, "
            f"policies={sorted(self._policies)}, cas={len(self._cas)})"
        )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _list(data: dict[str, Any], key: str, path: Path) -> Iterable[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise RegistryError(f"{path}: {key!r} must be a list")
    return value
