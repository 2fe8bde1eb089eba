"""Trust anchors: :class:`RootSet` and the root sets shipped with the package.

IoT Hub's guidance: trust roots, never intermediates or leaves (those rotate with
little notice), and be able to migrate roots by configuration alone. A ``RootSet``
holds only self-signed CA certificates; the shipped ones are checked against their
pinned SHA-256 fingerprints every time they are loaded.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable, Iterator
from os import PathLike
from typing import TYPE_CHECKING

from ..errors import RootIntegrityError, RootStoreError
from . import pem

if TYPE_CHECKING:
    from cryptography import x509

__all__ = ["AZURE_ECC", "AZURE_GLOBAL", "RootSet", "common_name", "load_shipped", "spki_sha256"]

# The largest system CA bundles are well under 1 MiB; a bigger file is not a root file (and
# /dev/zero or a FIFO would otherwise be read until memory runs out).
_MAX_ROOT_FILE = 16 << 20


def common_name(cert: x509.Certificate) -> str:
    """Subject CN of a certificate (the full RFC 4514 subject when it has no CN)."""
    from cryptography.x509.oid import NameOID

    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        value = cns[0].value
        return value if isinstance(value, str) else value.decode()
    return cert.subject.rfc4514_string()


def spki_sha256(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's SubjectPublicKeyInfo: identifies a root by its key,
    so a re-issued copy of the same root in an OS store still matches."""
    from cryptography.hazmat.primitives import serialization

    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def _der(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.DER)


def _pem(der: bytes) -> str:
    """PEM text of one DER certificate: base64 in 64-character lines (RFC 7468)."""
    body = base64.b64encode(der).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


class RootSet:
    """An immutable, ordered set of root CA certificates (no duplicates).

    Iterating yields :class:`cryptography.x509.Certificate`; ``a + b`` combines two sets.

    A set holds its roots as DER. Roots given as certificates or PEM are parsed and
    checked when the set is made; the shipped sets are checked by fingerprint instead and
    parsed on first use (iteration, ``spki_fingerprints``), so a device that only builds a
    context never loads a certificate parser.
    """

    __slots__ = ("_certs", "_ders", "_fingerprints", "_name", "_names", "_spki")

    _ders: tuple[bytes, ...]
    _fingerprints: tuple[str, ...]
    _certs: tuple[x509.Certificate, ...] | None
    _names: tuple[str, ...] | None
    _spki: frozenset[str] | None
    _name: str

    def __init__(self, certificates: Iterable[x509.Certificate], *, name: str = "custom"):
        from cryptography import x509

        certs: list[x509.Certificate] = []
        ders: list[bytes] = []
        seen: set[bytes] = set()
        for cert in certificates:
            if not isinstance(cert, x509.Certificate):
                raise TypeError(
                    f"a RootSet holds cryptography x509.Certificate objects, not "
                    f"{type(cert).__name__} (use RootSet.from_pem for PEM data)"
                )
            der = _der(cert)
            if der in seen:
                continue
            pem.check_readable(cert, f"root {len(certs) + 1}", RootStoreError)
            _check_is_root(cert)
            seen.add(der)
            ders.append(der)
            certs.append(cert)
        if not certs:
            raise RootStoreError("a RootSet needs at least one root certificate")
        self._set(tuple(ders), name, certs=tuple(certs))

    def _set(
        self,
        ders: tuple[bytes, ...],
        name: str,
        *,
        certs: tuple[x509.Certificate, ...] | None = None,
        names: tuple[str, ...] | None = None,
    ) -> None:
        self._ders = ders
        self._fingerprints = tuple(hashlib.sha256(d).hexdigest() for d in ders)
        self._certs = certs
        self._names = names
        self._spki = None
        self._name = name

    @classmethod
    def _checked(
        cls, ders: tuple[bytes, ...], name: str, *, names: tuple[str, ...] | None = None
    ) -> RootSet:
        """A set of roots that were already checked (shipped and fingerprint-verified, or
        taken from other RootSets): nothing is parsed now."""
        roots = cls.__new__(cls)
        roots._set(ders, name, names=names)
        return roots

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

    def _parsed(self) -> tuple[x509.Certificate, ...]:
        certs = self._certs
        if certs is None:
            from cryptography import x509

            certs = tuple(x509.load_der_x509_certificate(d) for d in self._ders)
            self._certs = certs  # same result in any thread: a race only parses twice
        return certs

    @property
    def name(self) -> str:
        return self._name

    @property
    def fingerprints(self) -> tuple[str, ...]:
        """SHA-256 fingerprints (lowercase hex) of the roots' DER, in order."""
        return self._fingerprints

    @property
    def spki_fingerprints(self) -> frozenset[str]:
        if self._spki is None:
            self._spki = frozenset(spki_sha256(c) for c in self._parsed())
        return self._spki

    @property
    def common_names(self) -> tuple[str, ...]:
        if self._names is None:
            self._names = tuple(common_name(c) for c in self._parsed())
        return self._names

    def to_pem(self) -> str:
        """All roots as concatenated PEM (what ``load_verify_locations(cadata=)`` takes)."""
        return "".join(_pem(d) for d in self._ders)

    def to_der(self) -> bytes:
        return b"".join(self._ders)

    def __iter__(self) -> Iterator[x509.Certificate]:
        return iter(self._parsed())

    def __len__(self) -> int:
        return len(self._ders)

    def __contains__(self, cert: object) -> bool:
        from cryptography import x509

        if not isinstance(cert, x509.Certificate):
            return False
        return hashlib.sha256(_der(cert)).hexdigest() in self._fingerprints

    def __add__(self, other: object) -> RootSet:
        if not isinstance(other, RootSet):
            return NotImplemented
        # Both sides were checked when they were made: combine without parsing again.
        ders = tuple(dict.fromkeys((*self._ders, *other._ders)))
        names: dict[bytes, str] = {}
        parsed: dict[bytes, x509.Certificate] = {}
        for roots in (self, other):
            if roots._names is not None:
                names.update(zip(roots._ders, roots._names, strict=True))
            if roots._certs is not None:
                parsed.update(zip(roots._ders, roots._certs, strict=True))
        combined = RootSet._checked(
            ders,
            f"{self._name}+{other._name}",
            names=tuple(names[d] for d in ders) if all(d in names for d in ders) else None,
        )
        if all(d in parsed for d in ders):
            combined._certs = tuple(parsed[d] for d in ders)
        return combined

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RootSet) and self._fingerprints == other._fingerprints

    def __hash__(self) -> int:
        return hash(self._fingerprints)

    def __repr__(self) -> str:
        return f"RootSet({self._name!r}: {', '.join(self.common_names)})"


def _check_is_root(cert: x509.Certificate) -> None:
    """Refuse anything but a self-issued CA certificate: pinning an intermediate or a
    leaf breaks the day IoT Hub rotates it."""
    from cryptography import x509

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


# SHA-256 of a shipped root's DER -> its subject CN (what the fingerprint pins, spelled
# out: a set's names are known without parsing; tests check them against the parsed CN)
_SHIPPED_NAMES: dict[str, str] = {
    "cb3ccbb76031e5e0138f8dd39a23f9de47ffc35e43c1144cea27d46a5ab1cb5f": "DigiCert Global Root G2",
    "c741f70f4b2a8d88bf2e71c14122ef53ef10eba0cfa5e64cfa20f418853073e0": (
        "Microsoft RSA Root Certificate Authority 2017"
    ),
    "31ad6648f8104138c738f39ea4320133393e3a18cc02296ef97c2ac9ef6731d0": "DigiCert Global Root G3",
    "358df39d764af9e1b766e9c972df352ee15cfac227af6ad1d70e8e4a6edcba02": (
        "Microsoft ECC Root Certificate Authority 2017"
    ),
}


def _read_shipped(filename: str) -> bytes:
    """A PEM file of this package, through its loader (a plain directory or a zip), as
    ``pkgutil.get_data`` reads it, without importing pkgutil or importlib.resources:
    every ``import iothub_tls`` pays for this."""
    spec = __spec__
    get_data = getattr(spec.loader, "get_data", None) if spec is not None else None
    if get_data is None or spec is None or not spec.origin:
        raise OSError(f"the loader of {__name__} cannot read package data")
    data: bytes = get_data(os.path.join(os.path.dirname(spec.origin), filename))
    return data


def load_shipped(set_name: str) -> RootSet:
    """Load a shipped root set ("AZURE_GLOBAL" or "AZURE_ECC") afresh from the package,
    checking every fingerprint again (``doctor`` uses it).

    The check is on the DER bytes (SHA-256): a tampered, truncated or substituted file is
    a :class:`RootIntegrityError`. The certificates are parsed on first use only."""
    ders: list[bytes] = []
    for filename, expected in _SHIPPED[set_name]:
        try:
            data = _read_shipped(filename)
            found = pem.certificate_ders(data)
            if len(found) != 1:
                raise ValueError(f"{len(found)} certificate blocks instead of 1")
        except (OSError, ValueError) as exc:
            raise RootIntegrityError(
                f"shipped root {filename} is missing or unreadable ({exc}); "
                "the installation is damaged: reinstall iothub-tls"
            ) from exc
        actual = hashlib.sha256(found[0]).hexdigest()
        if actual != expected:
            raise RootIntegrityError(
                f"shipped root {filename} has SHA-256 {actual}, expected {expected}; "
                "the file was altered: reinstall iothub-tls"
            )
        ders.append(found[0])
    names = tuple(_SHIPPED_NAMES.get(hashlib.sha256(d).hexdigest(), "") for d in ders)
    return RootSet._checked(tuple(ders), set_name, names=names if all(names) else None)


#: DigiCert Global Root G2 and Microsoft RSA Root Certificate Authority 2017: the roots
#: every IoT Hub in the global Azure cloud chains to (RSA and ECC leaf certificates).
AZURE_GLOBAL: RootSet = load_shipped("AZURE_GLOBAL")
#: DigiCert Global Root G3 and Microsoft ECC Root Certificate Authority 2017: opt-in,
#: for readiness should Azure migrate to all-ECC chains.
AZURE_ECC: RootSet = load_shipped("AZURE_ECC")
