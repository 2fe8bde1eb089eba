"""Trust anchors: :class:`RootSet` and the root sets shipped with the package.

IoT Hub's guidance: trust roots, never intermediates or leaves (those rotate with
little notice), and be able to migrate roots by configuration alone. A ``RootSet``
holds only self-signed CA certificates; the shipped ones are checked against their
pinned SHA-256 fingerprints every time they are loaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from importlib import resources
from os import PathLike

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ..errors import RootIntegrityError, RootStoreError
from . import pem

__all__ = ["AZURE_ECC", "AZURE_GLOBAL", "RootSet", "common_name", "load_shipped", "spki_sha256"]

# The largest system CA bundles are well under 1 MiB; a bigger file is not a root file (and
# /dev/zero or a FIFO would otherwise be read until memory runs out).
_MAX_ROOT_FILE = 16 << 20


def common_name(cert: x509.Certificate) -> str:
    """Subject CN of a certificate (the full RFC 4514 subject when it has no CN)."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        value = cns[0].value
        return value if isinstance(value, str) else value.decode()
    return cert.subject.rfc4514_string()


def spki_sha256(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's SubjectPublicKeyInfo: identifies a root by its key,
    so a re-issued copy of the same root in an OS store still matches."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


class RootSet:
    """An immutable, ordered set of root CA certificates (no duplicates).

    Iterating yields :class:`cryptography.x509.Certificate`; ``a + b`` combines two sets.
    """

    __slots__ = ("_certs", "_fingerprints", "_name")

    def __init__(self, certificates: Iterable[x509.Certificate], *, name: str = "custom"):
        certs: list[x509.Certificate] = []
        seen: set[bytes] = set()
        for cert in certificates:
            if not isinstance(cert, x509.Certificate):
                raise TypeError(
                    f"a RootSet holds cryptography x509.Certificate objects, not "
                    f"{type(cert).__name__} (use RootSet.from_pem for PEM data)"
                )
            der = cert.public_bytes(serialization.Encoding.DER)
            if der in seen:
                continue
            pem.check_readable(cert, f"root {len(certs) + 1}", RootStoreError)
            _check_is_root(cert)
            seen.add(der)
            certs.append(cert)
        if not certs:
            raise RootStoreError("a RootSet needs at least one root certificate")
        self._certs = tuple(certs)
        self._fingerprints = tuple(
            hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).hexdigest()
            for c in self._certs
        )
        self._name = name

    @classmethod
    def from_pem(cls, data: bytes | str, *, name: str = "custom") -> RootSet:
        """Roots from PEM text holding one or more ``CERTIFICATE`` blocks."""
        raw = pem.as_bytes(data, "PEM data")
        return cls(
            pem.load_certificates(raw, "the root certificate data", RootStoreError), name=name
        )

    @classmethod
    def from_pem_file(cls, path: str | PathLike[str]) -> RootSet:
        """Roots from a PEM file (for an emergency root migration: no code change)."""
        data = pem.read_limited(path, "root certificate", _MAX_ROOT_FILE, RootStoreError)
        try:
            return cls.from_pem(data, name=str(path))
        except RootStoreError as exc:
            raise RootStoreError(f"{str(path)!r}: {exc}") from exc

    @property
    def name(self) -> str:
        return self._name

    @property
    def fingerprints(self) -> tuple[str, ...]:
        """SHA-256 fingerprints (lowercase hex) of the roots' DER, in order."""
        return self._fingerprints

    @property
    def spki_fingerprints(self) -> frozenset[str]:
        return frozenset(spki_sha256(c) for c in self._certs)

    @property
    def common_names(self) -> tuple[str, ...]:
        return tuple(common_name(c) for c in self._certs)

    def to_pem(self) -> str:
        """All roots as concatenated PEM (what ``load_verify_locations(cadata=)`` takes)."""
        return "".join(
            c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in self._certs
        )

    def to_der(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self._certs)

    def __iter__(self) -> Iterator[x509.Certificate]:
        return iter(self._certs)

    def __len__(self) -> int:
        return len(self._certs)

    def __contains__(self, cert: object) -> bool:
        if not isinstance(cert, x509.Certificate):
            return False
        fp = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        return fp in self._fingerprints

    def __add__(self, other: object) -> RootSet:
        if not isinstance(other, RootSet):
            return NotImplemented
        return RootSet((*self._certs, *other._certs), name=f"{self._name}+{other._name}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RootSet) and self._fingerprints == other._fingerprints

    def __hash__(self) -> int:
        return hash(self._fingerprints)

    def __repr__(self) -> str:
        return f"RootSet({self._name!r}: {', '.join(self.common_names)})"


def _check_is_root(cert: x509.Certificate) -> None:
    """Refuse anything but a self-issued CA certificate: pinning an intermediate or a
    leaf breaks the day IoT Hub rotates it."""
    name = common_name(cert)
    if cert.subject != cert.issuer:
        raise RootStoreError(
            f"{name!r} is not a root certificate (issued by "
            f"{cert.issuer.rfc4514_string()!r}); pin roots only, never intermediates or "
            "leaves, which IoT Hub rotates with little notice"
        )
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return  # v1/legacy roots carry no extensions; self-issued is enough
    if not basic.ca:
        raise RootStoreError(f"{name!r} is not a CA certificate (basicConstraints CA=false)")


# name of the PEM file inside this package -> expected SHA-256 of its DER
_SHIPPED: dict[str, tuple[tuple[str, str], ...]] = {
    "AZURE_GLOBAL": (
        (
            "digicert_global_root_g2.pem",
            "cb3ccbb76031e5e0138f8dd39a23f9de47ffc35e43c1144cea27d46a5ab1cb5f",
        ),
        (
            "microsoft_rsa_root_2017.pem",
            "c741f70f4b2a8d88bf2e71c14122ef53ef10eba0cfa5e64cfa20f418853073e0",
        ),
    ),
    "AZURE_ECC": (
        (
            "digicert_global_root_g3.pem",
            "31ad6648f8104138c738f39ea4320133393e3a18cc02296ef97c2ac9ef6731d0",
        ),
        (
            "microsoft_ecc_root_2017.pem",
            "358df39d764af9e1b766e9c972df352ee15cfac227af6ad1d70e8e4a6edcba02",
        ),
    ),
}


def load_shipped(set_name: str) -> RootSet:
    """Load a shipped root set ("AZURE_GLOBAL" or "AZURE_ECC") afresh from the package,
    checking every fingerprint again (``doctor`` uses it)."""
    certs = []
    for filename, expected in _SHIPPED[set_name]:
        try:
            data = resources.files(__name__).joinpath(filename).read_bytes()
            cert = x509.load_pem_x509_certificate(data)
        except (OSError, ValueError) as exc:
            raise RootIntegrityError(
                f"shipped root {filename} is missing or unreadable ({exc}); "
                "the installation is damaged: reinstall iothub-tls"
            ) from exc
        actual = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        if actual != expected:
            raise RootIntegrityError(
                f"shipped root {filename} has SHA-256 {actual}, expected {expected}; "
                "the file was altered: reinstall iothub-tls"
            )
        certs.append(cert)
    return RootSet(certs, name=set_name)


#: DigiCert Global Root G2 and Microsoft RSA Root Certificate Authority 2017: the roots
#: every IoT Hub in the global Azure cloud chains to (RSA and ECC leaf certificates).
AZURE_GLOBAL: RootSet = load_shipped("AZURE_GLOBAL")
#: DigiCert Global Root G3 and Microsoft ECC Root Certificate Authority 2017: opt-in,
#: for readiness should Azure migrate to all-ECC chains.
AZURE_ECC: RootSet = load_shipped("AZURE_ECC")
