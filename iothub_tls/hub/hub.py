"""The local IoT Hub: one TLS profile, one device registry, one test PKI and one
connection log behind MQTT, AMQP and HTTPS front doors. ``iothub-tls serve`` runs it;
``iothub-tls demo`` and the tests start it in-process.

The hub also serves IoT Hub's service side (:mod:`.service`: registry, twins, direct
methods, cloud-to-device) on its HTTPS door, and the service's cloud-to-device sender
on its AMQP door, for the shared access policy ``iothubowner`` it creates in its state
directory. While it runs, ``STATE/hub.json`` says where it listens and holds that
policy's connection string, which is how ``iothub-tls hub --state STATE`` finds it."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .._io.fs import private_directory
from ..errors import IoTHubTLSError
from ..testing.pki import CertificateAuthority, KeyType, PKIDirectory
from .frontdoor import DEFAULT_MAX_CONNECTIONS, TlsFrontDoor
from .log import ConnectionLog
from .loop import HubLoop
from .mqtt import MqttEndpoint
from .profile import HubTlsProfile, ServerCredential
from .registry import ALL_PERMISSIONS, DeviceRegistry
from .service_conventions import SERVICE_POLICY, ServiceConnectionString
from .state import HubState

__all__ = [
    "ENDPOINT_FILE",
    "DeviceCredentials",
    "HubOptions",
    "LocalHub",
    "StateDirectoryError",
    "read_endpoint",
]

#: Where a running hub says where it listens (in its state directory).
ENDPOINT_FILE = "hub.json"
_ENDPOINT_FORMAT = 1

PROTOCOLS = ("mqtt", "amqp", "https")
CERTIFICATE_CHOICES = ("rsa", "ecdsa", "dual")


class StateDirectoryError(IoTHubTLSError, OSError):
    """The hub's state directory cannot be created, read or written."""


@dataclass(frozen=True)
class HubOptions:
    """How the local hub runs. A port of 0 picks a free one; None disables the door.
    ``max_connections`` caps each door's concurrent connections."""

    state_dir: Path
    hostname: str = "localhost"
    bind: str = "127.0.0.1"
    mqtt_port: int | None = 8883
    amqp_port: int | None = 5671
    https_port: int | None = 443
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    legacy_ciphers: bool = False
    certificate: str = "dual"
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: The Device Provisioning Service door (MQTT and HTTPS on one port; None: off), the
    #: host name its certificate names (default: ``hostname``), the address it listens
    #: on (default: ``bind``) and its ID scope (default: made once, kept in dps.json).
    dps_port: int | None = None
    dps_hostname: str | None = None
    dps_bind: str | None = None
    id_scope: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_connections, bool) or not isinstance(self.max_connections, int):
            raise TypeError("max_connections must be an int")
        if self.max_connections < 1:
            raise ValueError(
                f"max_connections must be a whole number >= 1, not {self.max_connections}"
            )
        if self.certificate not in CERTIFICATE_CHOICES:
            raise ValueError(
                f"certificate must be one of {', '.join(CERTIFICATE_CHOICES)}, "
                f"not {self.certificate!r}"
            )

    def port_of(self, protocol: str) -> int | None:
        port: int | None = getattr(self, f"{protocol}_port")
        return port


@dataclass(frozen=True)
class DeviceCredentials:
    """What a device needs to connect to the local hub."""

    device_id: str
    connection_string: str
    certfile: Path | None = None
    keyfile: Path | None = None


class LocalHub:
    """Build with :class:`HubOptions`; ``start()`` opens the front doors.

    The doors share one I/O thread (:attr:`io`, an asyncio event loop) for every
    connection; a few worker threads, started when first needed, answer the service
    API's requests (a direct-method call blocks until the device answers)."""

    def __init__(self, options: HubOptions, *, log_stream: IO[str] | None = None) -> None:
        self.options = options
        self.state_dir = Path(options.state_dir)
        try:
            private_directory(self.state_dir)  # keys and the registry: 0700
            probe = self.state_dir / ".writable"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StateDirectoryError(
                exc.errno,
                f"state directory {self.state_dir} is not usable ({exc.strerror}): "
                "choose a writable directory with --state",
            ) from exc
        self.pki = PKIDirectory(self.state_dir / "pki")
        try:
            self._ensure_pki()
            self.registry = DeviceRegistry.open(self.state_dir, options.hostname)
            if self.registry.policy_key(SERVICE_POLICY) is None:
                # IoT Hub's owner policy: every permission, the service API's credential.
                self.registry.add_policy(SERVICE_POLICY, permissions=ALL_PERMISSIONS)
                self.registry.save()
        except (OSError, ValueError) as exc:
            raise StateDirectoryError(
                None, f"state directory {self.state_dir} holds unusable files: {exc}"
            ) from exc
        root_pem = self.pki.root_cert.read_bytes()
        # Devices with certificates from this PKI authenticate by CN (CA-signed devices).
        self.registry.add_certificate_authority(root_pem)
        self.profile = HubTlsProfile(
            self._server_credentials(),
            min_version=options.min_version,
            legacy_ciphers=options.legacy_ciphers,
            client_ca_pem=root_pem,
        )
        self.state = HubState()
        self.log = ConnectionLog(log_stream)
        self.doors: dict[str, TlsFrontDoor] = {}
        self.unavailable: dict[str, str] = {}
        #: the hub's I/O loop and its thread, shared by the doors
        self.io = HubLoop(name="iothub-tls-hub")
        self._endpoint_id: str | None = None
        self._dps: Any = None

    @property
    def dps(self) -> Any:
        """The Device Provisioning Service (:class:`~.dps.ProvisioningService`):
        enrollments are added here, before or while the hub runs."""
        if self._dps is None:
            from .dps import ProvisioningService

            self._dps = ProvisioningService(
                self.registry,
                self.options.hostname,
                state_dir=self.state_dir,
                id_scope=self.options.id_scope,
            )
        return self._dps

    # -- PKI ----------------------------------------------------------------------------

    @property
    def root_pem_path(self) -> Path:
        """The root devices must pin (``TlsPolicy(roots=RootSet.from_pem_file(...))``)."""
        return self.pki.root_cert

    def _ensure_pki(self) -> None:
        if not self.pki.root_cert.exists():
            self.pki.init(intermediate=True, root_name="iothub-tls Local Hub Root")

    def _server_credentials(self) -> tuple[ServerCredential, ...]:
        names = list(dict.fromkeys([self.options.hostname, "localhost", "127.0.0.1"]))
        wanted = {
            "rsa": [KeyType.RSA],
            "ecdsa": [KeyType.EC],
            "dual": [KeyType.RSA, KeyType.EC],
        }[self.options.certificate]
        issuer: CertificateAuthority | None = None
        creds = []
        folder = self.pki.path / PKIDirectory.SERVERS
        for key_type in wanted:
            stem = f"{self.options.hostname}-{'ecdsa' if key_type is KeyType.EC else 'rsa'}"
            cert, key = folder / f"{stem}.pem", folder / f"{stem}.key"
            if not cert.exists() or not key.exists():
                issuer = issuer or self.pki.issuer()
                issuer.server(*names, key_type=key_type).write(folder, stem, force=True)
            creds.append(ServerCredential.from_files(cert, key))
        return tuple(creds)

    # -- the service side -----------------------------------------------------------------

    @property
    def service_connection_string(self) -> ServiceConnectionString:
        """The ``iothubowner`` policy's connection string (a credential: every
        permission on this hub)."""
        key = self.registry.policy_key(SERVICE_POLICY)
        assert key is not None  # made in __init__
        return ServiceConnectionString(self.registry.hub_host, SERVICE_POLICY, key)

    # -- devices ------------------------------------------------------------------------

    def add_device(self, device_id: str, *, x509: bool = False) -> DeviceCredentials:
        """Register a device (SAS key, or a certificate from the hub's PKI) and return its
        connection string (and certificate files)."""
        host = self.options.hostname
        existing = self.registry.get(device_id)
        if x509:
            files = self.pki.device_files(device_id)
            if not files.certificate.exists():
                self.pki.add_device(device_id, key_type=KeyType.EC)
            if existing is None:
                self.registry.add_ca_device(device_id)  # identified by its certificate's CN
            elif not existing.x509_ca:
                raise ValueError(f"device {device_id!r} is already registered with a SAS key")
            self.registry.save()
            return DeviceCredentials(
                device_id,
                f"HostName={host};DeviceId={device_id};x509=true",
                files.certificate,
                files.private_key,
            )
        if existing is not None and not existing.primary_key:
            raise ValueError(f"device {device_id!r} is already registered with a certificate")
        device = existing or self.registry.add_sas_device(device_id)
        self.registry.save()
        return DeviceCredentials(
            device_id, f"HostName={host};DeviceId={device_id};SharedAccessKey={device.primary_key}"
        )

    # -- life cycle ---------------------------------------------------------------------

    def _door(self, protocol: str, port: int) -> TlsFrontDoor:
        common: dict[str, Any] = {
            "host": self.options.bind,
            "port": port,
            "log": self.log,
            "max_connections": self.options.max_connections,
            "hub_loop": self.io,
        }
        if protocol == "mqtt":
            return MqttEndpoint(self.profile, self.registry, self.state, **common)
        if protocol == "https":
            from .https import HttpsEndpoint

            return HttpsEndpoint(self.profile, self.registry, self.state, **common)
        from .amqp import AmqpEndpoint  # needs python-qpid-proton

        return AmqpEndpoint(self.profile, self.registry, self.state, **common)

    def start(self) -> None:
        """Open every enabled front door. A door whose library is missing is reported in
        :attr:`unavailable`; a port that cannot be bound stops everything and raises."""
        try:
            self.io.start()
            for protocol in PROTOCOLS:
                port = self.options.port_of(protocol)
                if port is None:
                    continue
                try:
                    door = self._door(protocol, port)
                except ImportError as exc:
                    self.unavailable[protocol] = str(exc)
                    continue
                door.start()
                self.doors[protocol] = door
            https = self.doors.get("https")
            if https is not None:  # MQTT and AMQP over WebSockets on 443, as IoT Hub does
                from .https import HttpsEndpoint

                assert isinstance(https, HttpsEndpoint)
                https.serve_websockets(mqtt=self.doors.get("mqtt"), amqp=self.doors.get("amqp"))
            if self.options.dps_port is not None:
                from .dps import DpsEndpoint, door_profile

                dps_door = DpsEndpoint(
                    door_profile(self), self.registry, self.dps,
                    host=self.options.dps_bind or self.options.bind,
                    port=self.options.dps_port, log=self.log,
                    max_connections=self.options.max_connections, hub_loop=self.io,
                )  # fmt: skip
                dps_door.start()
                self.doors["dps"] = dps_door
            self._write_endpoint()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for door in self.doors.values():
            with contextlib.suppress(Exception):
                door.stop()
        self.doors.clear()
        self.io.stop()
        self._remove_endpoint()

    def _dial_address(self) -> str:
        """Where a client on this machine reaches the doors."""
        bind = self.options.bind
        wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - a lookup
        return wildcard.get(bind, bind)

    def _write_endpoint(self) -> None:
        """``STATE/hub.json``: where this hub listens, its root and its service
        connection string (mode 0600: a credential), written atomically."""
        self._endpoint_id = uuid.uuid4().hex
        data = {
            "format": _ENDPOINT_FORMAT,
            "id": self._endpoint_id,
            "pid": os.getpid(),
            "hostname": self.options.hostname,
            "address": self._dial_address(),
            "ports": self.ports,
            "root": str(self.root_pem_path.resolve()),
            "service": {"connectionString": self.service_connection_string.format()},
        }
        if "dps" in self.doors:
            from .dps import describe

            data["dps"] = describe(self)
        fd, tmp = tempfile.mkstemp(prefix=".hub-", dir=self.state_dir)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2)
            os.replace(tmp, self.state_dir / ENDPOINT_FILE)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _remove_endpoint(self) -> None:
        """Remove ``hub.json`` if it is still this hub's (another may have started on
        the same state directory since)."""
        if self._endpoint_id is None:
            return
        path = self.state_dir / ENDPOINT_FILE
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text("utf-8")).get("id") == self._endpoint_id:
                path.unlink()
        self._endpoint_id = None

    def __enter__(self) -> LocalHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def ports(self) -> dict[str, int]:
        return {protocol: door.port for protocol, door in self.doors.items()}

    def describe(self) -> dict[str, Any]:
        described = {
            "hostname": self.options.hostname,
            "bind": self.options.bind,
            "ports": self.ports,
            "maxConnections": self.options.max_connections,
            "unavailable": self.unavailable,
            "profile": self.profile.as_dict(),
            "profileSummary": self.profile.describe(),
            "root": str(self.root_pem_path),
            "stateDir": str(self.state_dir),
            "service": {"connectionString": self.service_connection_string.format()},
        }
        if "dps" in self.doors:
            from .dps import describe

            described["dps"] = describe(self)
        return described


def read_endpoint(state_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``STATE/hub.json`` says about the hub running on ``state_dir``.

    :raises StateDirectoryError: when no hub runs there (no file) or the file is not one
        a hub wrote.
    """
    path = Path(state_dir) / ENDPOINT_FILE
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise StateDirectoryError(
            None,
            f"no local hub is running on {state_dir} ({path} does not exist): start one "
            f"with 'iothub-tls serve --state {state_dir}'",
        ) from None
    except (OSError, ValueError) as exc:
        raise StateDirectoryError(None, f"{path} is not readable: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != _ENDPOINT_FORMAT:
        raise StateDirectoryError(None, f"{path} was not written by this version of the hub")
    return data
