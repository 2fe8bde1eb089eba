"""A small certificate factory for test and lab set-ups.

It makes what a local IoT Hub look-alike and its devices need: a root CA, optionally an
intermediate CA (IoT Hub's own chains are root -> intermediate -> leaf), server
certificates with RSA or ECDSA keys for chosen host names and IP addresses, and device
certificates whose subject CN is the device id (what IoT Hub expects of CA-signed X.509
devices). ``iothub-tls certs`` is a thin command line over this module and the local
compliance endpoint reuses it.

Everything is written as PEM; private keys are unencrypted PKCS#8 in files of mode 0600,
and nothing is ever overwritten unless asked to. These certificates are for tests and
labs, never for production devices.

::

    from iothub_tls.testing.pki import CertificateAuthority, KeyType, PKIDirectory

    root = CertificateAuthority.root("Lab Root CA")
    issuing = root.intermediate("Lab Issuing CA")
    server = issuing.server("localhost", "127.0.0.1", key_type=KeyType.EC)
    device = issuing.device("thermostat-42")

    pki = PKIDirectory("lab-pki")
    pki.init(intermediate=True)            # root.pem/.key, intermediate.pem/.key
    files = pki.add_server(["localhost"])  # servers/localhost.pem/.key
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .._io.fs import private_directory
from ..auth import thumbprints
from ..roots import common_name

__all__ = [
    "DEFAULT_CA_DAYS",
    "DEFAULT_LEAF_DAYS",
    "CertificateAuthority",
    "Issued",
    "KeyType",
    "PKIDirectory",
    "WrittenFiles",
    "check_device_id",
    "thumbprints",
]

PrivateKey: TypeAlias = "rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey"
PublicKey: TypeAlias = "rsa.RSAPublicKey | ec.EllipticCurvePublicKey"

#: Validity of CA certificates made without an explicit ``days``.
DEFAULT_CA_DAYS = 3650
#: Validity of server and device certificates made without an explicit ``days``.
DEFAULT_LEAF_DAYS = 365
_ORGANIZATION = "iothub-tls test PKI"
# Leaves start an hour in the past so that a device whose clock lags a little still
# accepts a certificate made a moment ago.
_BACKDATE = dt.timedelta(hours=1)


class KeyType(enum.Enum):
    """Kind of key a certificate gets."""

    #: RSA (2048 bits unless ``key_size`` says otherwise): what most IoT Hub chains use.
    RSA = "rsa"
    #: ECDSA on P-256 (or P-384 with ``key_size=384``): the hub's ECC certificates.
    EC = "ec"

    def generate(self, key_size: int | None = None) -> PrivateKey:
        """A new private key of this type."""
        if self is KeyType.RSA:
            bits = key_size or 2048
            if bits not in (2048, 3072, 4096):
                raise ValueError(
                    f"RSA key size {bits} is not supported: use 2048, 3072 or 4096 bits "
                    "(IoT Hub and OpenSSL's default security level need at least 2048)"
                )
            return rsa.generate_private_key(public_exponent=65537, key_size=bits)
        curves: dict[int, ec.EllipticCurve] = {256: ec.SECP256R1(), 384: ec.SECP384R1()}
        size = key_size or 256
        if size not in curves:
            raise ValueError(f"EC key size {size} is not supported: use 256 (P-256) or 384 (P-384)")
        return ec.generate_private_key(curves[size])


# IoT Hub device ids: up to 128 case-sensitive characters, ASCII letters and digits plus
# - : . + % _ # * ? ! ( ) , = @ ; $ '
_DEVICE_ID = re.compile(r"[A-Za-z0-9\-:.+%_#*?!(),=@;$']{1,128}")


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if IoT Hub accepts it as a device id, else raise ValueError."""
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise ValueError(
            f"{device_id!r} is not a valid IoT Hub device id: use 1 to 128 ASCII letters, "
            "digits and - : . + % _ # * ? ! ( ) , = @ ; $ '"
        )
    if device_id in (".", ".."):
        raise ValueError(f"{device_id!r} cannot be used as a device id (it names a directory)")
    return device_id


_DNS_NAME = re.compile(
    r"(\*\.)?([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if len(name) > 253 or not _DNS_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is neither a DNS name nor an IP address: server certificates need "
            "host names like hub.example.test (a wildcard only as '*.' in front) or IPs"
        )
    return x509.DNSName(name.lower())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _check_days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"validity must be a whole number of days, 1 or more (got {days!r})")
    return days


def _signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class WrittenFiles:
    """Where :meth:`Issued.write` put a certificate and its key."""

    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class Issued:
    """A certificate, its private key, and the CA certificates between it and the root
    (nearest first; empty for a root or a leaf issued directly by the root)."""

    certificate: x509.Certificate
    private_key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def common_name(self) -> str:
        return common_name(self.certificate)

    @property
    def cert_pem(self) -> bytes:
        """The certificate alone, PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def chain_pem(self) -> bytes:
        """The certificate followed by its intermediates: what a server or device sends."""
        return self.cert_pem + b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in self.chain
        )

    @property
    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def thumbprint_sha1(self) -> str:
        return thumbprints(self.certificate)[0]

    @property
    def thumbprint_sha256(self) -> str:
        return thumbprints(self.certificate)[1]

    def write(
        self, directory: str | os.PathLike[str], stem: str, *, force: bool = False
    ) -> WrittenFiles:
        """Write ``STEM.pem`` (certificate and intermediates) and ``STEM.key`` (mode 0600).

        :raises FileExistsError: when either file exists and ``force`` is false; nothing
            is written then.
        """
        folder = Path(directory)
        cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
        if not force:
            for path in (key_path, cert_path):
                if path.exists():
                    raise FileExistsError(
                        f"{path} already exists: refusing to overwrite a certificate or key "
                        "(pass force=True / --force to replace it)"
                    )
        private_directory(folder)  # keys live here: 0700, whatever the umask
        _write_atomically(key_path, self.key_pem, 0o600)
        _write_atomically(cert_path, self.chain_pem, 0o644)
        return WrittenFiles(cert_path, key_path)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary file created with ``mode`` (a key is never readable by
    others, not even for a moment) and rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CertificateAuthority:
    """A CA that issues certificates: a root (:meth:`root`) or an intermediate
    (:meth:`intermediate`), or one loaded from PEM (:meth:`load`)."""

    def __init__(self, issued: Issued) -> None:
        basic = issued.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        if not basic.value.ca:
            raise ValueError(f"{issued.common_name!r} is not a CA certificate")
        self._issued = issued

    # -- making CAs ---------------------------------------------------------------------

    @classmethod
    def root(
        cls,
        common_name: str = "iothub-tls Test Root CA",
        *,
        key_type: KeyType = KeyType.RSA,
        key_size: int | None = None,
        days: int = DEFAULT_CA_DAYS,
        not_before: dt.datetime | None = None,
    ) -> CertificateAuthority:
        """A new self-signed root CA."""
        key = key_type.generate(key_size)
        start = not_before or _utcnow() - _BACKDATE
        cert = (
            cls._ca_builder(common_name, key, start, _check_days(days), path_length=None)
            .issuer_name(_name(common_name))
            .sign(key, _signature_hash(key))
        )
        return cls(Issued(cert, key))

    def intermediate(
        self,
        common_name: str = "iothub-tls Test Issuing CA",
        *,
        key_type: KeyType = KeyType.RSA,
        key_size: int | None = None,
        days: int = DEFAULT_CA_DAYS,
        not_before: dt.datetime | None = None,
    ) -> CertificateAuthority:
        """A new CA issued by this root (it may issue leaves, not further CAs).

        :raises ValueError: when this CA is itself an intermediate.
        """
        if not self.is_root:
            raise ValueError(
                f"{self.common_name!r} is an intermediate CA and may not issue CAs "
                "(pathLenConstraint 0): make intermediates from the root"
            )
        key = key_type.generate(key_size)
        start = not_before or _utcnow() - _BACKDATE
        cert = (
            self._ca_builder(common_name, key, start, _check_days(days), path_length=0)
            .issuer_name(self.certificate.subject)
            .add_extension(self._authority_key_id(), critical=False)
            .sign(self.private_key, _signature_hash(self.private_key))
        )
        chain = () if self.is_root else (self.certificate, *self.chain)
        return CertificateAuthority(Issued(cert, key, chain))

    @staticmethod
    def _ca_builder(
        cn: str, key: PrivateKey, start: dt.datetime, days: int, *, path_length: int | None
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )

    @classmethod
    def load(
        cls,
        cert_pem: bytes,
        key_pem: bytes,
        *,
        chain: Sequence[x509.Certificate] = (),
    ) -> CertificateAuthority:
        """A CA from its PEM certificate and unencrypted PEM key. ``chain``: the CA
        certificates above it, nearest first, excluding the root.

        :raises ValueError: when the data is not a CA certificate with its matching key.
        """
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError("only RSA and EC CA keys are supported")
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
            raise ValueError(f"the key does not belong to the CA certificate {common_name(cert)!r}")
        return cls(Issued(cert, key, tuple(chain)))

    # -- what it is ---------------------------------------------------------------------

    @property
    def issued(self) -> Issued:
        return self._issued

    @property
    def certificate(self) -> x509.Certificate:
        return self._issued.certificate

    @property
    def private_key(self) -> PrivateKey:
        return self._issued.private_key

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """CA certificates above this one, nearest first, excluding the root."""
        return self._issued.chain

    @property
    def is_root(self) -> bool:
        return self.certificate.subject == self.certificate.issuer

    @property
    def common_name(self) -> str:
        return self._issued.common_name

    def __repr__(self) -> str:
        kind = "root" if self.is_root else "intermediate"
        return f"<CertificateAuthority {kind} {self.common_name!r}>"

    # -- issuing leaves -----------------------------------------------------------------

    def server(
        self,
        *names: str,
        key_type: KeyType = KeyType.RSA,
        key_size: int | None = None,
        days: int = DEFAULT_LEAF_DAYS,
        not_before: dt.datetime | None = None,
    ) -> Issued:
        """A TLS server certificate for DNS names and/or IP addresses (subjectAltName;
        the first name is also the CN)."""
        if not names:
            raise ValueError("a server certificate needs at least one DNS name or IP address")
        sans = [_general_name(n) for n in names]
        key = key_type.generate(key_size)
        builder = self._leaf_builder(
            names[0], key, not_before, days, ExtendedKeyUsageOID.SERVER_AUTH
        )
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return self._sign_leaf(builder, key)

    def device(
        self,
        device_id: str,
        *,
        key_type: KeyType = KeyType.RSA,
        key_size: int | None = None,
        days: int = DEFAULT_LEAF_DAYS,
        not_before: dt.datetime | None = None,
    ) -> Issued:
        """A device (TLS client) certificate with subject CN = ``device_id``, as IoT Hub
        expects of CA-signed X.509 devices."""
        key = key_type.generate(key_size)
        builder = self._leaf_builder(
            check_device_id(device_id), key, not_before, days, ExtendedKeyUsageOID.CLIENT_AUTH
        )
        return self._sign_leaf(builder, key)

    def device_from_csr(
        self,
        csr_pem: bytes,
        *,
        days: int = DEFAULT_LEAF_DAYS,
        not_before: dt.datetime | None = None,
    ) -> tuple[x509.Certificate, ...]:
        """Certify the key of a PKCS#10 request (one made inside a token or a TPM, whose
        private key this CA never sees): a device certificate with the request's CN as
        the device id. Returns the leaf followed by the intermediates, what the device
        presents.

        :raises ValueError: when the request's signature does not verify (it was not made
            with the key it carries), or it has no valid device id as its CN.
        """
        csr = x509.load_pem_x509_csr(csr_pem)
        if not csr.is_signature_valid:
            raise ValueError("the certificate request's signature does not verify")
        key = csr.public_key()
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise ValueError("only RSA and EC keys can be certified")
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names:
            raise ValueError("the certificate request has no CN (the device id)")
        return self.device_for_key(str(names[0].value), key, days=days, not_before=not_before)

    def device_for_key(
        self,
        device_id: str,
        public_key: PublicKey,
        *,
        days: int = DEFAULT_LEAF_DAYS,
        not_before: dt.datetime | None = None,
    ) -> tuple[x509.Certificate, ...]:
        """Certify a public key whose private half this CA never sees (in a token or a
        TPM): the leaf followed by the intermediates."""
        builder = self._leaf_builder(
            check_device_id(device_id), public_key, not_before, days,
            ExtendedKeyUsageOID.CLIENT_AUTH,
        )  # fmt: skip
        cert = builder.sign(self.private_key, _signature_hash(self.private_key))
        return (cert, *(() if self.is_root else (self.certificate, *self.chain)))

    def _leaf_builder(
        self,
        cn: str,
        key: PrivateKey | PublicKey,
        not_before: dt.datetime | None,
        days: int,
        purpose: x509.ObjectIdentifier,
    ) -> x509.CertificateBuilder:
        start = not_before or _utcnow() - _BACKDATE
        public = (
            key
            if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
            else key.public_key()
        )
        return (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.certificate.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=_check_days(days)))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    # RSA key transport suites need keyEncipherment (RFC 5246 7.4.2).
                    key_encipherment=isinstance(public, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(self._authority_key_id(), critical=False)
        )

    def _sign_leaf(self, builder: x509.CertificateBuilder, key: PrivateKey) -> Issued:
        cert = builder.sign(self.private_key, _signature_hash(self.private_key))
        chain = () if self.is_root else (self.certificate, *self.chain)
        return Issued(cert, key, chain)

    def _authority_key_id(self) -> x509.AuthorityKeyIdentifier:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key())


class PKIDirectory:
    """A test PKI on disk::

        DIR/root.pem                root CA certificate (what devices or IoT Hub trust)
        DIR/root.key                its private key (mode 0600)
        DIR/intermediate.pem/.key   the issuing CA, when made with intermediate=True
        DIR/servers/NAME.pem/.key   server certificate + intermediate, and its key
        DIR/devices/ID.pem/.key     device certificate + intermediate, and its key

    Leaves are issued by the intermediate when there is one, else by the root.
    """

    ROOT = "root"
    INTERMEDIATE = "intermediate"
    SERVERS = "servers"
    DEVICES = "devices"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def root_cert(self) -> Path:
        return self.path / f"{self.ROOT}.pem"

    @property
    def root_key(self) -> Path:
        return self.path / f"{self.ROOT}.key"

    @property
    def intermediate_cert(self) -> Path:
        return self.path / f"{self.INTERMEDIATE}.pem"

    @property
    def intermediate_key(self) -> Path:
        return self.path / f"{self.INTERMEDIATE}.key"

    def server_files(self, name: str) -> WrittenFiles:
        stem = _server_stem(name)
        folder = self.path / self.SERVERS
        return WrittenFiles(folder / f"{stem}.pem", folder / f"{stem}.key")

    def device_files(self, device_id: str) -> WrittenFiles:
        folder = self.path / self.DEVICES
        stem = check_device_id(device_id)
        return WrittenFiles(folder / f"{stem}.pem", folder / f"{stem}.key")

    def init(
        self,
        *,
        intermediate: bool = False,
        key_type: KeyType = KeyType.RSA,
        days: int = DEFAULT_CA_DAYS,
        root_name: str = "iothub-tls Test Root CA",
        intermediate_name: str = "iothub-tls Test Issuing CA",
        force: bool = False,
    ) -> list[tuple[Issued, WrittenFiles]]:
        """Create the root (and the intermediate) CA.

        :raises FileExistsError: when a CA already exists here and ``force`` is false.
        """
        if not force:
            for path in (
                self.root_cert,
                self.root_key,
                self.intermediate_cert,
                self.intermediate_key,
            ):
                if path.exists():
                    raise FileExistsError(
                        f"{path} already exists: this directory already holds a test PKI "
                        "(pass --force / force=True to replace its CAs; certificates they "
                        "issued will then no longer verify)"
                    )
        root = CertificateAuthority.root(root_name, key_type=key_type, days=days)
        made = [(root.issued, root.issued.write(self.path, self.ROOT, force=force))]
        if intermediate:
            inter = root.intermediate(intermediate_name, key_type=key_type, days=days)
            made.append(
                (inter.issued, inter.issued.write(self.path, self.INTERMEDIATE, force=force))
            )
        else:
            for stale in (self.intermediate_cert, self.intermediate_key):
                stale.unlink(missing_ok=True)  # only reachable with force
        return made

    def issuer(self) -> CertificateAuthority:
        """The CA that issues leaves: the intermediate if there is one, else the root.

        :raises FileNotFoundError: when the directory holds no test PKI yet.
        :raises ValueError: when its files are damaged or do not belong together.
        """
        root = self._load(self.root_cert, self.root_key, ())
        if not (self.intermediate_cert.exists() or self.intermediate_key.exists()):
            return root
        inter = self._load(self.intermediate_cert, self.intermediate_key, ())
        if inter.certificate.issuer != root.certificate.subject:
            raise ValueError(
                f"{self.intermediate_cert} was not issued by {self.root_cert}: the directory "
                f"mixes two test PKIs; re-create it with 'iothub-tls certs init --force'"
            )
        return inter

    def _load(
        self, cert: Path, key: Path, chain: tuple[x509.Certificate, ...]
    ) -> CertificateAuthority:
        for path in (cert, key):
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} does not exist: create the test PKI first with "
                    f"'iothub-tls certs init {self.path}'"
                )
        try:
            # An intermediate's PEM file holds only its own certificate: its chain
            # (nothing between it and the root) is empty.
            return CertificateAuthority.load(cert.read_bytes(), key.read_bytes(), chain=chain)
        except ValueError as exc:
            raise ValueError(f"{cert} / {key} is not a usable CA: {exc}") from exc

    def add_server(
        self,
        names: Sequence[str],
        *,
        key_type: KeyType = KeyType.RSA,
        days: int = DEFAULT_LEAF_DAYS,
        force: bool = False,
    ) -> tuple[Issued, WrittenFiles]:
        """Issue a server certificate for ``names``, written under ``servers/`` named
        after the first name."""
        if not names:
            raise ValueError("a server certificate needs at least one DNS name or IP address")
        target = self.server_files(names[0])
        _refuse_overwrite(target, force)
        issued = self.issuer().server(*names, key_type=key_type, days=days)
        return issued, issued.write(target.certificate.parent, target.certificate.stem, force=force)

    def add_device(
        self,
        device_id: str,
        *,
        key_type: KeyType = KeyType.RSA,
        days: int = DEFAULT_LEAF_DAYS,
        force: bool = False,
    ) -> tuple[Issued, WrittenFiles]:
        """Issue a device certificate (CN = ``device_id``) under ``devices/``."""
        target = self.device_files(device_id)
        _refuse_overwrite(target, force)
        issued = self.issuer().device(device_id, key_type=key_type, days=days)
        return issued, issued.write(target.certificate.parent, target.certificate.stem, force=force)


def _server_stem(name: str) -> str:
    _general_name(name)  # validates
    return name.lower().replace("*", "wildcard").replace(":", "_")


def _refuse_overwrite(target: WrittenFiles, force: bool) -> None:
    if force:
        return
    for path in (target.private_key, target.certificate):
        if path.exists():
            raise FileExistsError(
                f"{path} already exists: refusing to overwrite a certificate or key "
                "(pass --force / force=True to replace it)"
            )
