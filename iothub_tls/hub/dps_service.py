"""The local Device Provisioning Service's enrollments and registrations, sans I/O:
:class:`ProvisioningService` authenticates a device (a SAS token signed with its
enrollment's key, or with the key derived from its group's key; or its TLS client
certificate, whose subject CN is the registration id), starts its registration and
assigns it at the first poll, creating the device in the hub's registry with the same
credential. Its enrollments live in ``STATE/dps.json``. The door that serves it on the
network is :mod:`.dps`."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import logging
import os
import secrets
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ..auth.sas import SasToken
from ..dps import conventions as dps
from ..errors import SasTokenError
from ..roots import common_name
from .registry import DeviceRegistry, RegistryError, certificate_thumbprints, normalize_thumbprint

__all__ = ["DPS_FILE", "Enrollment", "ProvisioningService", "Refusal"]

logger = logging.getLogger("iothub_tls.hub")

#: Where the enrollments are kept (in the hub's state directory; mode 0600: keys).
DPS_FILE = "dps.json"
_FORMAT = 1
_ATTESTATIONS = ("symmetricKey", "x509")


class Refusal(Exception):
    """A request the service answers with an error status."""

    def __init__(self, status: int, error_code: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.retry_after = retry_after


def now_iso() -> str:
    return (
        dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def _pem_certificate(pem: bytes | str, what: str) -> x509.Certificate:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise RegistryError(f"{what} is not a PEM certificate: {exc}") from None


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


@dataclass(frozen=True)
class Enrollment:
    """One enrollment: ``group`` False for an individual enrollment (``name`` is the
    registration id), True for an enrollment group (``name`` is the group's id).

    ``attestation`` is "symmetricKey" (``primary_key`` / ``secondary_key``) or "x509"
    (an individual enrollment's ``thumbprints``; a group's ``ca_pem``). ``device_id``
    (individual only) is the hub device id, default the registration id; ``iot_hub``
    the hub to assign to, default this hub; ``payload`` is returned to the device with
    its registration (as a custom allocation's answer would be)."""

    name: str
    group: bool
    attestation: str
    primary_key: str | None = field(default=None, repr=False)
    secondary_key: str | None = field(default=None, repr=False)
    thumbprints: tuple[str, ...] = ()
    ca_pem: str | None = field(default=None, repr=False)
    device_id: str | None = None
    iot_hub: str | None = None
    enabled: bool = True
    payload: Any = None

    def __post_init__(self) -> None:
        if self.attestation not in _ATTESTATIONS:
            raise RegistryError(
                f"attestation must be symmetricKey or x509, not {self.attestation!r}"
            )
        if self.attestation == "symmetricKey" and not self.primary_key:
            raise RegistryError(f"enrollment {self.name!r} has no symmetric key")
        if self.attestation == "x509":
            if self.group and not self.ca_pem:
                raise RegistryError(f"enrollment group {self.name!r} has no CA certificate")
            if not self.group and not self.thumbprints:
                raise RegistryError(f"enrollment {self.name!r} has no certificate thumbprint")
        if self.group and self.device_id is not None:
            raise RegistryError(
                "an enrollment group has no device id (each device's is its registration id)"
            )

    @property
    def kind(self) -> str:
        return "enrollmentGroup" if self.group else "individualEnrollment"

    def keys_for(self, registration_id: str) -> list[str]:
        """The symmetric keys a device's token may be signed with."""
        keys = [k for k in (self.primary_key, self.secondary_key) if k]
        if self.group:
            return [dps.derive_device_key(k, registration_id) for k in keys]
        return keys

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "attestation": self.attestation,
            "primaryKey": self.primary_key,
            "secondaryKey": self.secondary_key,
            "thumbprints": list(self.thumbprints),
            "caCertificate": self.ca_pem,
            "deviceId": self.device_id,
            "iotHub": self.iot_hub,
            "status": "enabled" if self.enabled else "disabled",
            "payload": self.payload,
        }

    def describe(self) -> dict[str, Any]:
        """What ``serve`` prints: everything but the keys."""
        doc = self.as_json()
        doc.pop("primaryKey")
        doc.pop("secondaryKey")
        doc.pop("caCertificate")
        return {k: v for k, v in doc.items() if v not in (None, [])}

    @classmethod
    def from_json(cls, data: Any) -> Enrollment:
        if not isinstance(data, dict):
            raise RegistryError("an enrollment must be a JSON object")
        return cls(
            name=str(data.get("name", "")),
            group=data.get("kind") == "enrollmentGroup",
            attestation=str(data.get("attestation", "")),
            primary_key=data.get("primaryKey"),
            secondary_key=data.get("secondaryKey"),
            thumbprints=tuple(data.get("thumbprints") or ()),
            ca_pem=data.get("caCertificate"),
            device_id=data.get("deviceId"),
            iot_hub=data.get("iotHub"),
            enabled=data.get("status", "enabled") != "disabled",
            payload=data.get("payload"),
        )


@dataclass
class _Operation:
    operation_id: str
    registration_id: str
    enrollment: Enrollment
    key: str | None  # the key the device authenticated with (SAS)
    leaf: bytes | None  # its certificate (X.509)
    payload: Any
    result: dps.Registration | None = None


@dataclass
class _Fault:
    status: int
    remaining: int
    retry_after: int | None


class ProvisioningService:
    """The enrollments and registrations of the local DPS (thread-safe).

    :param registry: the hub's device registry, where assigned devices are created.
    :param hub_host: this hub's host name (what devices are assigned to).
    :param state_dir: where ``dps.json`` lives (None: memory only).
    :param id_scope: the service's ID scope (default: made once and kept in dps.json).
    :param retry_after: seconds the service tells devices to wait before polling (an
        integer, as DPS sends it). A registration is "assigning" until its first poll.
    """

    def __init__(
        self,
        registry: DeviceRegistry,
        hub_host: str,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        id_scope: str | None = None,
        retry_after: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.hub_host = hub_host.lower()
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.retry_after = retry_after
        self._clock = clock
        self._lock = threading.Lock()
        self._enrollments: dict[tuple[bool, str], Enrollment] = {}
        self._operations: dict[str, _Operation] = {}
        self._registrations: dict[str, dps.Registration] = {}
        self._faults: deque[_Fault] = deque()
        self._trust_listeners: list[Callable[[str], None]] = []
        stored_scope = self._load()
        scope = id_scope or stored_scope or "0ne" + secrets.token_hex(4).upper()
        self.id_scope = dps.check_id_scope(scope)
        if scope != stored_scope:
            self.save()

    # -- enrollments ----------------------------------------------------------------------

    def add_individual_enrollment(
        self,
        registration_id: str,
        *,
        primary_key: str | None = None,
        secondary_key: str | None = None,
        certificate_pem: bytes | str | None = None,
        device_id: str | None = None,
        iot_hub: str | None = None,
        enabled: bool = True,
        payload: Any = None,
    ) -> Enrollment:
        """Enroll one device: with a symmetric key (generated when neither a key nor a
        certificate is given) or with its X.509 certificate (by thumbprint; a certificate
        that does not chain to a CA the door trusts is trusted as its own anchor)."""
        dps.check_registration_id(registration_id)
        if certificate_pem is not None:
            if primary_key or secondary_key:
                raise RegistryError("give a symmetric key or a certificate, not both")
            cert = _pem_certificate(certificate_pem, "certificate_pem")
            sha1, _ = certificate_thumbprints(cert.public_bytes(serialization.Encoding.DER))
            enrollment = Enrollment(
                registration_id, False, "x509", thumbprints=(sha1,), device_id=device_id,
                iot_hub=iot_hub, enabled=enabled, payload=payload,
            )  # fmt: skip
            self._trust(_pem(cert))
        else:
            enrollment = Enrollment(
                registration_id, False, "symmetricKey",
                primary_key=primary_key or DeviceRegistry.new_key(),
                secondary_key=secondary_key or DeviceRegistry.new_key(),
                device_id=device_id, iot_hub=iot_hub, enabled=enabled, payload=payload,
            )  # fmt: skip
        return self._put(enrollment)

    def add_enrollment_group(
        self,
        group_id: str,
        *,
        primary_key: str | None = None,
        secondary_key: str | None = None,
        ca_pem: bytes | str | None = None,
        iot_hub: str | None = None,
        enabled: bool = True,
        payload: Any = None,
    ) -> Enrollment:
        """Enroll a group: devices with a key derived from the group's key
        (:func:`~iothub_tls.dps.derive_device_key`), or devices whose certificate chains
        to ``ca_pem`` (the door then trusts that CA; for the device to connect to this
        hub afterwards, the hub's doors must trust it too: use the hub's own PKI)."""
        dps.check_registration_id(group_id)
        if ca_pem is not None:
            if primary_key or secondary_key:
                raise RegistryError("give a symmetric key or a CA certificate, not both")
            ca = _pem_certificate(ca_pem, "ca_pem")
            enrollment = Enrollment(
                group_id, True, "x509", ca_pem=_pem(ca), iot_hub=iot_hub, enabled=enabled,
                payload=payload,
            )  # fmt: skip
            self._trust(_pem(ca))
        else:
            enrollment = Enrollment(
                group_id, True, "symmetricKey",
                primary_key=primary_key or DeviceRegistry.new_key(),
                secondary_key=secondary_key or DeviceRegistry.new_key(),
                iot_hub=iot_hub, enabled=enabled, payload=payload,
            )  # fmt: skip
        return self._put(enrollment)

    def set_enabled(self, name: str, enabled: bool, *, group: bool = False) -> Enrollment:
        with self._lock:
            current = self._enrollments.get((group, name))
            if current is None:
                raise LookupError(f"no {'enrollment group' if group else 'enrollment'} {name!r}")
            updated = self._enrollments[(group, name)] = replace(current, enabled=enabled)
        self.save()
        return updated

    def remove(self, name: str, *, group: bool = False) -> None:
        with self._lock:
            if self._enrollments.pop((group, name), None) is None:
                raise LookupError(f"no {'enrollment group' if group else 'enrollment'} {name!r}")
        self.save()

    @property
    def enrollments(self) -> tuple[Enrollment, ...]:
        with self._lock:
            return tuple(self._enrollments.values())

    def registration(self, registration_id: str) -> dps.Registration | None:
        """The last registration state of ``registration_id``."""
        with self._lock:
            return self._registrations.get(registration_id)

    def _put(self, enrollment: Enrollment) -> Enrollment:
        with self._lock:
            self._enrollments[(enrollment.group, enrollment.name)] = enrollment
        self.save()
        return enrollment

    # -- trust (the door's TLS) --------------------------------------------------------

    def trusted_pem(self) -> str:
        """The CAs (and enrolled self-signed certificates) the door's TLS accepts."""
        out = []
        for enrollment in self.enrollments:
            if enrollment.ca_pem:
                out.append(enrollment.ca_pem)
        return "".join(out)

    def on_trust(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(pem)`` with each certificate enrolled from now on."""
        self._trust_listeners.append(listener)

    def _trust(self, pem: str) -> None:
        for listener in list(self._trust_listeners):
            listener(pem)

    # -- faults -----------------------------------------------------------------------

    def fail_next(self, status: int = 429, *, times: int = 1, retry_after: int | None = 1) -> None:
        """Answer the next ``times`` authenticated requests with ``status`` (429 with
        ``retry-after``: the service throttling; 500, 503)."""
        if not 400 <= status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        with self._lock:
            self._faults.append(_Fault(status, times, retry_after))

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            if not self._faults:
                return None
            fault = self._faults[0]
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._faults.popleft()
            return fault

    # -- authentication ------------------------------------------------------------------

    def authenticate(
        self, id_scope: str, registration_id: str, token: str | None, chain: tuple[bytes, ...]
    ) -> tuple[Enrollment, str | None]:
        """The enrollment that admits this device, and the key it signed with (None for
        X.509). An individual enrollment is preferred to a group, as DPS does.

        :raises Refusal: 401 saying why.
        """
        if id_scope != self.id_scope:
            raise Refusal(401, 401002, f"unknown ID scope {id_scope!r}")
        try:
            dps.check_registration_id(registration_id)
        except ValueError as exc:
            raise Refusal(400, 400004, str(exc)) from None
        enrollments = self.enrollments
        individual = [e for e in enrollments if not e.group and e.name == registration_id]
        groups = [e for e in enrollments if e.group]
        if token is not None:
            return self._by_token(registration_id, token, individual + groups)
        if chain:
            return self._by_certificate(registration_id, chain, individual + groups), None
        raise Refusal(
            401, 401002,
            f"no credentials for {registration_id!r}: send a SAS token or present the "
            "device certificate",
        )  # fmt: skip

    def _by_token(
        self, registration_id: str, text: str, candidates: list[Enrollment]
    ) -> tuple[Enrollment, str]:
        try:
            token = SasToken.parse(text)
        except SasTokenError as exc:
            raise Refusal(401, 401002, f"not a SAS token: {exc}") from None
        if token.key_name not in (None, dps.SAS_KEY_NAME):
            raise Refusal(
                401, 401002,
                f"the SAS token names key {token.key_name!r}: a device's token has "
                f"skn={dps.SAS_KEY_NAME}",
            )  # fmt: skip
        resource = dps.resource_uri(self.id_scope, registration_id)
        now = self._clock()
        problems = []
        for enrollment in candidates:
            if enrollment.attestation != "symmetricKey":
                continue
            for key in enrollment.keys_for(registration_id):
                try:
                    token.verify(key, resource_uri=resource, now=now)
                except SasTokenError as exc:
                    problems.append(str(exc))
                    continue
                if token.resource_uri.lower() != resource.lower():
                    problems.append(f"the token is for {token.resource_uri!r}, not {resource!r}")
                    continue
                return enrollment, key
        individual = any(not e.group and e.attestation == "symmetricKey" for e in candidates)
        if not individual:
            raise Refusal(
                401,
                401002,
                f"no enrollment admits {registration_id!r}: it has no individual enrollment "
                "with a symmetric key, and no enrollment group's derived key signed its token",
            )
        best = next((p for p in problems if "signature" not in p), problems[0])
        raise Refusal(401, 401002, f"the SAS token of {registration_id!r} was refused: {best}")

    def _by_certificate(
        self, registration_id: str, chain: tuple[bytes, ...], candidates: list[Enrollment]
    ) -> Enrollment:
        leaf = x509.load_der_x509_certificate(chain[0])
        cn = common_name(leaf)
        if cn != registration_id:
            raise Refusal(
                401, 401002,
                f"the certificate's subject CN {cn!r} is not the registration id "
                f"{registration_id!r} (X.509 devices register under their CN)",
            )  # fmt: skip
        sha1, sha256 = certificate_thumbprints(chain[0])
        for enrollment in candidates:
            if enrollment.attestation != "x509":
                continue
            if not enrollment.group:
                if sha1 in enrollment.thumbprints or sha256 in enrollment.thumbprints:
                    return enrollment
                continue
            assert enrollment.ca_pem is not None
            ca = _pem_certificate(enrollment.ca_pem, "CA")
            ca_der = ca.public_bytes(serialization.Encoding.DER)
            if ca_der in chain[1:]:
                return enrollment
            for der in chain[:-1] or chain:
                try:
                    x509.load_der_x509_certificate(der).verify_directly_issued_by(ca)
                except (InvalidSignature, ValueError, TypeError):
                    continue
                return enrollment
        raise Refusal(
            401, 401002,
            f"no X.509 enrollment admits the certificate of {registration_id!r} (SHA-256 "
            f"thumbprint {sha256})",
        )  # fmt: skip

    # -- registering ---------------------------------------------------------------------

    def register(
        self, enrollment: Enrollment, registration_id: str, key: str | None,
        leaf: bytes | None, payload: Any,
    ) -> tuple[int, bytes, int | None]:  # fmt: skip
        """Start a registration: (202, the "assigning" operation, retry-after)."""
        fault = self._take_fault()
        if fault is not None:
            raise Refusal(
                fault.status,
                fault.status * 1000 + 1,
                "injected by the local hub",
                fault.retry_after,
            )
        operation = _Operation(
            operation_id=f"4.{secrets.token_hex(8)}.{uuid.uuid4()}",
            registration_id=registration_id,
            enrollment=enrollment,
            key=key,
            leaf=leaf,
            payload=payload,
        )
        with self._lock:
            self._operations[operation.operation_id] = operation
        logger.info("DPS: %s registers (%s %s)", registration_id, enrollment.kind, enrollment.name)
        return 202, dps.operation_body(operation.operation_id, "assigning"), self.retry_after

    def status(self, registration_id: str, operation_id: str) -> tuple[int, bytes, int | None]:
        """Poll a registration: 200 with its state (assigned at the first poll)."""
        fault = self._take_fault()
        if fault is not None:
            raise Refusal(
                fault.status,
                fault.status * 1000 + 1,
                "injected by the local hub",
                fault.retry_after,
            )
        with self._lock:
            operation = self._operations.get(operation_id)
        if operation is None or operation.registration_id != registration_id:
            raise Refusal(
                404, 404201, f"no registration operation {operation_id!r} for {registration_id!r}"
            )
        if operation.result is None:  # the first poll after the register request
            operation.result = self._assign(operation)
        result = operation.result
        return 200, dps.operation_body(operation_id, result.status, result), None

    def _assign(self, operation: _Operation) -> dps.Registration:
        enrollment = operation.enrollment
        rid = operation.registration_id
        now = now_iso()
        with self._lock:
            previous = self._registrations.get(rid)
        created = previous.created if previous is not None else now
        base = dps.Registration(rid, "assigning", created=created, last_updated=now)
        current = self._enrollment_now(enrollment)
        if current is None or not current.enabled:
            result = replace(base, status="disabled")
        else:
            hub = (current.iot_hub or self.hub_host).lower()
            device_id = current.device_id or rid
            try:
                if hub == self.hub_host:
                    self._create_device(current, device_id, operation)
            except RegistryError as exc:
                result = replace(base, status="failed", error_code=409203, error_message=str(exc))
            else:
                result = replace(
                    base,
                    status="assigned",
                    assigned_hub=hub,
                    device_id=device_id,
                    substatus="initialAssignment",
                    etag=base64.b64encode(uuid.uuid4().bytes).decode("ascii"),
                    payload=current.payload,
                )
        with self._lock:
            self._registrations[rid] = result
        logger.info("DPS: %s is %s", rid, result.status)
        return result

    def _enrollment_now(self, enrollment: Enrollment) -> Enrollment | None:
        """The enrollment as it is now (it may have been disabled since)."""
        with self._lock:
            return self._enrollments.get((enrollment.group, enrollment.name))

    def _create_device(self, enrollment: Enrollment, device_id: str, operation: _Operation) -> None:
        registry = self.registry
        existing = registry.get(device_id)
        if enrollment.attestation == "symmetricKey":
            key = operation.key
            assert key is not None
            if existing is not None and not existing.primary_key:
                raise RegistryError(
                    f"device {device_id!r} exists in {self.hub_host} with an X.509 "
                    "credential; this enrollment gives it a symmetric key"
                )
            if existing is None or existing.primary_key != key:
                keys = enrollment.keys_for(operation.registration_id)
                secondary = next((k for k in keys if k != key), None)
                registry.add(
                    _device_with_key(device_id, key, secondary, existing),
                    replace_existing=True,
                )
        else:
            if existing is not None and existing.primary_key:
                raise RegistryError(
                    f"device {device_id!r} exists in {self.hub_host} with a symmetric key; "
                    "this enrollment gives it an X.509 certificate"
                )
            assert operation.leaf is not None
            sha1, _ = certificate_thumbprints(operation.leaf)
            if enrollment.group:
                assert enrollment.ca_pem is not None
                registry.add_certificate_authority(enrollment.ca_pem)
                if existing is None:
                    registry.add_ca_device(device_id)
            elif existing is None or normalize_thumbprint(sha1) not in existing.thumbprints:
                from .registry import Device

                registry.add(Device(device_id, thumbprints=(sha1,)), replace_existing=True)
        if registry.state_dir is not None:
            registry.save()

    # -- persistence -------------------------------------------------------------------

    def _load(self) -> str | None:
        if self.state_dir is None:
            return None
        path = self.state_dir / DPS_FILE
        try:
            data = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{path} is not readable: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise RegistryError(f"{path} was not written by this version of the hub")
        for item in data.get("enrollments") or ():
            enrollment = Enrollment.from_json(item)
            self._enrollments[(enrollment.group, enrollment.name)] = enrollment
        scope = data.get("idScope")
        return scope if isinstance(scope, str) else None

    def save(self) -> Path | None:
        """Write ``dps.json`` atomically (mode 0600: it holds the enrollment keys)."""
        if self.state_dir is None:
            return None
        data = {
            "format": _FORMAT,
            "idScope": self.id_scope,
            "enrollments": [e.as_json() for e in self.enrollments],
        }
        path = self.state_dir / DPS_FILE
        fd, tmp = tempfile.mkstemp(prefix=".dps-", dir=self.state_dir)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path


def _device_with_key(device_id: str, key: str, secondary: str | None, existing: Any) -> Any:
    from .registry import Device

    generation = existing.generation_id if existing is not None else ""
    return Device(device_id, key, secondary, generation_id=generation)
