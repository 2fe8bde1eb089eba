"""The local hub's Device Provisioning Service (DPS) door.

:class:`ProvisioningService` holds the enrollments (individual enrollments and
enrollment groups, each with a symmetric key or X.509: a device certificate's
thumbprint, or a CA) in ``STATE/dps.json`` and answers registrations: it authenticates
the device (SAS token for ``{idScope}/registrations/{registrationId}`` signed with the
enrollment's key or, for a group, with the key derived from the group's key; or the TLS
client certificate, whose subject CN is the registration id), then assigns it to this
hub (or to the hub its enrollment names), creating the device in the hub's registry
with the same credential. A registration is ``assigning`` first (the door answers 202
with ``retry-after``), then ``assigned``, ``failed`` (the device id is taken by a device
with another kind of credential) or ``disabled`` (its enrollment is disabled).

:class:`DpsEndpoint` serves DPS's device API on one TLS port, on the hub's I/O loop like
the other doors: a connection that starts with an MQTT CONNECT speaks DPS's MQTT
(``$dps/registrations/...``), any other speaks its REST API
(``PUT /{idScope}/registrations/{id}/register``, ``GET .../operations/{operationId}``).
Refused credentials are CONNACK 5 over MQTT and 401 over HTTPS; :meth:`fail_next`
makes the next requests answer 429 with a retry-after. The topics, paths and JSON are
:mod:`iothub_tls.dps.conventions`, the module the client uses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import email.utils
import http
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
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ..auth.sas import SasToken
from ..dps import conventions as dps
from ..errors import SasTokenError
from ..mqtt import packets as codec
from ..roots import common_name
from . import http1
from .frontdoor import DEFAULT_MAX_CONNECTIONS, HubFrontDoor, TlsMeta
from .log import ConnectionLog
from .loop import HubLoop
from .profile import HubTlsProfile
from .registry import DeviceRegistry, RegistryError, certificate_thumbprints, normalize_thumbprint
from .stream import TlsStream

__all__ = ["DPS_FILE", "DpsEndpoint", "Enrollment", "ProvisioningService"]

logger = logging.getLogger("iothub_tls.hub")

#: Where the enrollments are kept (in the hub's state directory; mode 0600: keys).
DPS_FILE = "dps.json"
_FORMAT = 1
_ATTESTATIONS = ("symmetricKey", "x509")
_MAX_REQUEST_BYTES = 64 * 1024
_LINGER = 2.0


class _Refusal(Exception):
    """A request the service answers with an error status."""

    def __init__(self, status: int, error_code: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.retry_after = retry_after


def _now_iso() -> str:
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

        :raises _Refusal: 401 saying why.
        """
        if id_scope != self.id_scope:
            raise _Refusal(401, 401002, f"unknown ID scope {id_scope!r}")
        try:
            dps.check_registration_id(registration_id)
        except ValueError as exc:
            raise _Refusal(400, 400004, str(exc)) from None
        enrollments = self.enrollments
        individual = [e for e in enrollments if not e.group and e.name == registration_id]
        groups = [e for e in enrollments if e.group]
        if token is not None:
            return self._by_token(registration_id, token, individual + groups)
        if chain:
            return self._by_certificate(registration_id, chain, individual + groups), None
        raise _Refusal(
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
            raise _Refusal(401, 401002, f"not a SAS token: {exc}") from None
        if token.key_name not in (None, dps.SAS_KEY_NAME):
            raise _Refusal(
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
        if not problems:
            raise _Refusal(401, 401002, f"no symmetric-key enrollment admits {registration_id!r}")
        best = next((p for p in problems if "signature" not in p), problems[0])
        raise _Refusal(401, 401002, f"the SAS token of {registration_id!r} was refused: {best}")

    def _by_certificate(
        self, registration_id: str, chain: tuple[bytes, ...], candidates: list[Enrollment]
    ) -> Enrollment:
        leaf = x509.load_der_x509_certificate(chain[0])
        cn = common_name(leaf)
        if cn != registration_id:
            raise _Refusal(
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
        raise _Refusal(
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
            raise _Refusal(
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
            raise _Refusal(
                fault.status,
                fault.status * 1000 + 1,
                "injected by the local hub",
                fault.retry_after,
            )
        with self._lock:
            operation = self._operations.get(operation_id)
        if operation is None or operation.registration_id != registration_id:
            raise _Refusal(
                404, 404201, f"no registration operation {operation_id!r} for {registration_id!r}"
            )
        if operation.result is None:  # the first poll after the register request
            operation.result = self._assign(operation)
        result = operation.result
        return 200, dps.operation_body(operation_id, result.status, result), None

    def _assign(self, operation: _Operation) -> dps.Registration:
        enrollment = operation.enrollment
        rid = operation.registration_id
        now = _now_iso()
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
                    replace_device(device_id, key, secondary, existing),
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


def replace_device(device_id: str, key: str, secondary: str | None, existing: Any) -> Any:
    from .registry import Device

    generation = existing.generation_id if existing is not None else ""
    return Device(device_id, key, secondary, generation_id=generation)


# -- the door ------------------------------------------------------------------------------------


class DpsEndpoint(HubFrontDoor):
    """DPS's device API (MQTT and HTTPS on one port) for :class:`ProvisioningService`.

    :param profile: the door's TLS (its certificate names the DPS host).
    :param service: enrollments and registrations.
    """

    protocol = "Dps"

    def __init__(
        self,
        profile: HubTlsProfile,
        registry: DeviceRegistry,
        service: ProvisioningService,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log: ConnectionLog | None = None,
        connect_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        hub_loop: HubLoop | None = None,
    ) -> None:
        super().__init__(
            profile,
            registry,
            None,
            host=host,
            port=port,
            log=log,
            handshake_timeout=connect_timeout,
            max_connections=max_connections,
            hub_loop=hub_loop,
        )
        self.service = service
        self.idle_timeout = idle_timeout
        extra = service.trusted_pem()
        if extra:
            self.context.load_verify_locations(cadata=extra)
        service.on_trust(self._trust)

    def _trust(self, pem: str) -> None:
        """A certificate was enrolled: later handshakes accept chains ending at it."""
        self.context.load_verify_locations(cadata=pem)

    def fail_next(self, status: int = 429, *, times: int = 1, retry_after: int | None = 1) -> None:
        """See :meth:`ProvisioningService.fail_next`."""
        self.service.fail_next(status, times=times, retry_after=retry_after)

    def open_session(self, stream: TlsStream, meta: TlsMeta) -> _Sniffer:
        return _Sniffer(self, stream, meta)


class _Sniffer:
    """The first decrypted byte says which protocol the client speaks: 0x10 is an MQTT
    CONNECT; anything else is HTTP."""

    def __init__(self, door: DpsEndpoint, stream: TlsStream, meta: TlsMeta) -> None:
        self.door, self.stream, self.meta = door, stream, meta
        self.session: _MqttSession | _HttpSession | None = None
        self.timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            door.handshake_timeout, self._expired
        )

    def _expired(self) -> None:
        self.timer = None
        if self.session is None:
            self.door.connected(
                self.meta, None, success=False, reason="no request received in time"
            )
            self.stream.abort()

    def data_received(self, data: bytes) -> None:
        if self.session is None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.session = (
                _MqttSession(self.door, self.stream, self.meta)
                if data[:1] == b"\x10"
                else _HttpSession(self.door, self.stream, self.meta)
            )
        self.session.data_received(data)

    def eof_received(self) -> None:
        if self.session is not None:
            self.session.eof_received()
        else:
            self.stream.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.session is not None:
            self.session.connection_lost(exc)
        else:
            self.door.connected(self.meta, None, success=False, reason="closed before any request")


class _MqttSession:
    """DPS over MQTT: CONNECT (authenticated at once), SUBSCRIBE to the response
    filter, PUBLISH register and status requests, answers on the response topic."""

    def __init__(self, door: DpsEndpoint, stream: TlsStream, meta: TlsMeta) -> None:
        self.door, self.stream, self.meta = door, stream, meta
        self.decoder = codec.Decoder()
        self.registration_id: str | None = None
        self.enrollment: Enrollment | None = None
        self.key: str | None = None
        self.subscribed = False
        self.ended = False
        self.next_id = 0

    def data_received(self, data: bytes) -> None:
        if self.ended:
            return
        try:
            received = self.decoder.feed(data)
        except codec.MqttProtocolError as exc:
            self._end(f"protocol error: {exc}")
            return
        for packet in received:
            if self.ended:
                return
            if self.enrollment is None:
                if isinstance(packet, codec.Connect):
                    self._connect(packet)
                else:
                    self._end("no MQTT CONNECT received", accepted=False)
                continue
            self._packet(packet)

    def eof_received(self) -> None:
        self._end("connection closed by the device", accepted=self.enrollment is not None)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.ended:
            self.ended = True
            if self.enrollment is not None:
                self.door.disconnected(self.meta, self.registration_id, "connection lost")

    def _end(self, reason: str, *, accepted: bool = True) -> None:
        if self.ended:
            return
        self.ended = True
        if accepted and self.enrollment is not None:
            self.door.disconnected(self.meta, self.registration_id, reason)
        elif not accepted:
            self.door.connected(self.meta, self.registration_id, success=False, reason=reason)
        self.stream.close()

    def _connect(self, connect: codec.Connect) -> None:
        door = self.door
        parsed = dps.parse_mqtt_username(connect.username or "")
        rid = connect.client_id
        self.registration_id = rid or None

        def refuse(code: int, reason: str) -> None:
            self.stream.write(codec.connack(code))
            self._end(reason, accepted=False)

        if parsed is None or parsed[1] != rid or "api-version" not in parsed[2]:
            refuse(
                5,
                f"username {connect.username!r} must be "
                f"{{idScope}}/registrations/{rid}/api-version=... (client id = registration id)",
            )
            return
        token = connect.password.decode("utf-8", "replace") if connect.password else None
        try:
            enrollment, key = door.service.authenticate(
                parsed[0], rid, token, self.meta.client_chain if token is None else ()
            )
        except _Refusal as exc:
            refuse(5, f"not authorized: {exc.message}")
            return
        self.enrollment, self.key = enrollment, key
        self.stream.write(codec.connack(0))
        door.connected(self.meta, rid, success=True)

    def _packet(self, packet: codec.Packet) -> None:
        if isinstance(packet, codec.Disconnect):
            self._end("client disconnected")
        elif isinstance(packet, codec.PingReq):
            self.stream.write(codec.pingresp())
        elif isinstance(packet, codec.Subscribe):
            granted = []
            for topic, qos in packet.topics:
                if topic == dps.RESPONSE_FILTER:
                    self.subscribed = True
                    granted.append(min(qos, 1))
                else:
                    granted.append(0x80)
            self.stream.write(codec.suback(packet.packet_id, granted))
        elif isinstance(packet, codec.Unsubscribe):
            self.subscribed = False
            self.stream.write(codec.unsuback(packet.packet_id))
        elif isinstance(packet, codec.Publish):
            self._publish(packet)
        elif isinstance(packet, codec.Connect):
            self._end("second CONNECT on one connection")

    def _publish(self, packet: codec.Publish) -> None:
        request = dps.parse_request_topic(packet.topic)
        if request is None:
            self._end(f"publish to a topic DPS does not accept: {packet.topic!r}")
            return
        if packet.qos == 1 and packet.packet_id is not None:
            self.stream.write(codec.puback(packet.packet_id))
        status, body, retry = _answer(
            self.door.service, self.enrollment, self.registration_id or "", self.key,
            self.meta.client_chain, request.kind, request.operation_id, packet.payload,
        )  # fmt: skip
        if not self.subscribed:
            return  # DPS answers on the response topic only to a subscriber
        self.next_id = self.next_id % 65535 + 1
        self.stream.write(
            codec.publish(
                dps.response_topic(status, request.request_id, retry),
                body,
                qos=1,
                packet_id=self.next_id,
            )
        )


def _answer(
    service: ProvisioningService,
    enrollment: Enrollment | None,
    registration_id: str,
    key: str | None,
    chain: tuple[bytes, ...],
    kind: str,
    operation_id: str | None,
    body: bytes,
) -> tuple[int, bytes, int | None]:
    """Answer a register request or a poll of an authenticated device."""
    try:
        if enrollment is None:
            raise _Refusal(401, 401002, "not authenticated")
        if kind == "register":
            try:
                claimed, payload = dps.parse_register_body(body)
            except (UnicodeDecodeError, ValueError) as exc:
                raise _Refusal(
                    400, 400004, f"the register request is not valid JSON: {exc}"
                ) from None
            if claimed is not None and claimed != registration_id:
                raise _Refusal(
                    400, 400004,
                    f"the body's registrationId {claimed!r} is not {registration_id!r}",
                )  # fmt: skip
            return service.register(
                enrollment, registration_id, key, chain[0] if chain else None, payload
            )
        assert operation_id is not None
        return service.status(registration_id, operation_id)
    except _Refusal as exc:
        tracking = uuid.uuid4().hex
        return (
            exc.status,
            dps.error_body(exc.error_code, exc.message, tracking, _now_iso()),
            exc.retry_after,
        )


class _HttpSession:
    """DPS's REST API with keep-alive: one request at a time, bodies by Content-Length."""

    def __init__(self, door: DpsEndpoint, stream: TlsStream, meta: TlsMeta) -> None:
        self.door, self.stream, self.meta = door, stream, meta
        self.buffer = bytearray()
        self.head: http1.RequestHead | None = None
        self.length = 0
        self.closed = False
        self.reported = False
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None
        self._idle()

    def _idle(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(self.door.idle_timeout, self._close)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.buffer += data
        while not self.closed:
            if self.head is None:
                end = http1.head_end(self.buffer)
                try:
                    if end < 0:
                        http1.check_incomplete(self.buffer)
                        if len(self.buffer) > _MAX_REQUEST_BYTES:
                            raise http1.HeadError(431, "request head too large")
                        return
                    head = http1.parse_head(bytes(self.buffer[:end]))
                except http1.HeadError as exc:
                    self._error(exc.status, exc.status * 1000 + 4, exc.message, close=True)
                    return
                del self.buffer[:end]
                length = head.headers.get("Content-Length") or "0"
                if head.headers.get("Transfer-Encoding") or not length.strip().isdigit():
                    self._error(411, 411004, "send the body with Content-Length", close=True)
                    return
                self.length = int(length)
                if self.length > _MAX_REQUEST_BYTES:
                    self._error(413, 413004, "request body too large", close=True)
                    return
                self.head = head
            if len(self.buffer) < self.length:
                return
            body = bytes(self.buffer[: self.length])
            del self.buffer[: self.length]
            head, self.head = self.head, None
            self._request(head, body)

    def eof_received(self) -> None:
        self._close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()

    def _request(self, head: http1.RequestHead, body: bytes) -> None:
        url = urlsplit(head.target)
        route = dps.parse_path(url.path)
        if route is None:
            self._error(404, 404001, f"no such resource: {url.path}", close=not head.keep_alive)
            return
        scope, rid, operation_id = route
        method = "PUT" if operation_id is None else "GET"
        if head.method != method:
            self._error(405, 405001, f"{head.method} is not allowed on {url.path}; use {method}")
            return
        if not parse_qs(url.query).get("api-version"):
            self._error(400, 400004, "the api-version query parameter is required")
            return
        service = self.door.service
        token = head.headers.get("Authorization")
        try:
            enrollment, key = service.authenticate(
                scope, rid, token, self.meta.client_chain if token is None else ()
            )
        except _Refusal as exc:
            self._outcome(rid, False, exc.message)
            self._error(exc.status, exc.error_code, exc.message, retry_after=exc.retry_after)
            return
        self._outcome(rid, True, None)
        status, answer, retry = _answer(
            service, enrollment, rid, key, self.meta.client_chain,
            "register" if operation_id is None else "status", operation_id, body,
        )  # fmt: skip
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if retry is not None:
            headers["Retry-After"] = str(retry)
        self._send(status, headers, answer, close=not head.keep_alive)

    def _outcome(self, rid: str, success: bool, reason: str | None) -> None:
        if not self.reported:
            self.reported = True
            self.door.connected(self.meta, rid, success=success, reason=reason)

    def _error(
        self, status: int, code: int, message: str, *, close: bool = False,
        retry_after: int | None = None,
    ) -> None:  # fmt: skip
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        body = dps.error_body(code, message, uuid.uuid4().hex, _now_iso())
        self._send(status, headers, body, close=close)

    def _send(self, status: int, headers: dict[str, str], body: bytes, *, close: bool) -> None:
        if self.closed:
            return
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        lines = [f"HTTP/1.1 {status} {phrase}", f"Date: {email.utils.formatdate(usegmt=True)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        if close:
            lines.append("Connection: close")
        self.stream.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        if close:
            self.closed = True
            if self.timer is not None:
                self.timer.cancel()
            self.stream.close(linger=_LINGER)
        else:
            self._idle()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.timer is not None:
                self.timer.cancel()
            self.stream.close()


# -- what LocalHub needs -------------------------------------------------------------------------


def door_profile(hub: Any) -> HubTlsProfile:
    """The DPS door's TLS: the hub's profile (versions, suites, certificate kinds, the
    hub's root for device certificates), with a certificate for the DPS host name when
    it is not the hub's."""
    from ..testing.pki import KeyType, PKIDirectory
    from .profile import ServerCredential

    options = hub.options
    name = (options.dps_hostname or options.hostname).lower()
    if name == options.hostname.lower():
        profile: HubTlsProfile = hub.profile
        return profile
    names = list(dict.fromkeys([name, "localhost", "127.0.0.1"]))
    wanted = {"rsa": [KeyType.RSA], "ecdsa": [KeyType.EC], "dual": [KeyType.RSA, KeyType.EC]}
    folder = hub.pki.path / PKIDirectory.SERVERS
    creds = []
    for key_type in wanted[options.certificate]:
        stem = f"dps-{name.replace(':', '_')}-{'ecdsa' if key_type is KeyType.EC else 'rsa'}"
        cert, key = folder / f"{stem}.pem", folder / f"{stem}.key"
        if not cert.exists() or not key.exists():
            hub.pki.issuer().server(*names, key_type=key_type).write(folder, stem, force=True)
        creds.append(ServerCredential.from_files(cert, key))
    base: HubTlsProfile = hub.profile
    return replace(base, certificates=tuple(creds))


def describe(hub: Any) -> dict[str, Any]:
    """The ``dps`` part of ``serve --json`` and ``hub.json``."""
    service: ProvisioningService = hub.dps
    door = hub.doors.get("dps")
    return {
        "idScope": service.id_scope,
        "hostname": hub.options.dps_hostname or hub.options.hostname,
        "port": door.port if door is not None else None,
        "enrollments": [e.describe() for e in service.enrollments],
    }
