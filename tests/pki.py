"""Test-time PKI: roots, intermediates and leaves generated with cryptography.

Nothing here is committed as a certificate; every test run makes its own, so nothing
can expire in the repository.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
NOW = dt.datetime.now(dt.timezone.utc)


@functools.cache
def _cached_key(kind: str, size: int, slot: int) -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=size)
    curve = {256: ec.SECP256R1(), 384: ec.SECP384R1()}[size]
    return ec.generate_private_key(curve)


_slots: dict[tuple[str, int], int] = {}


def new_key(kind: str = "rsa", size: int | None = None, *, fresh: bool = False) -> PrivateKey:
    """A key. Keys are drawn from a small per-process pool (RSA generation is slow);
    ``fresh=True`` always makes a new one."""
    size = size or (2048 if kind == "rsa" else 256)
    if fresh:
        return _cached_key.__wrapped__(kind, size, 0)
    slot = _slots.get((kind, size), 0) % 4
    _slots[(kind, size)] = slot + 1
    return _cached_key(kind, size, slot)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "iothub-tls tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey, password: bytes | None = None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


@dataclass
class Issued:
    """A certificate with its key and the chain above it (excluding the root)."""

    cert: x509.Certificate
    key: PrivateKey
    chain: list[x509.Certificate] = field(default_factory=list)

    @property
    def cert_chain_pem(self) -> bytes:
        return pem(self.cert) + b"".join(pem(c) for c in self.chain)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)

    def write(self, directory: Path, stem: str) -> tuple[str, str]:
        directory.mkdir(parents=True, exist_ok=True)
        certfile, keyfile = directory / f"{stem}.crt", directory / f"{stem}.key"
        certfile.write_bytes(self.cert_chain_pem)
        keyfile.write_bytes(self.key_pem)
        keyfile.chmod(0o600)
        return str(certfile), str(keyfile)


class CA:
    """A certificate authority (root, or intermediate when ``parent`` is given)."""

    def __init__(
        self,
        cn: str = "iothub-tls Test Root",
        *,
        key_type: str = "rsa",
        parent: CA | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> None:
        self.key = new_key(key_type, fresh=True)
        self.parent = parent
        issuer_key = parent.key if parent else self.key
        issuer_name = parent.cert.subject if parent else _name(cn)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(issuer_name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - dt.timedelta(days=1))
            .not_valid_after(not_after or NOW + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
        )
        if parent:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),
                critical=False,
            )
        self.cert = builder.sign(issuer_key, hashes.SHA256())

    @property
    def chain(self) -> list[x509.Certificate]:
        """This CA and its parents up to (not including) the root."""
        if self.parent is None:
            return []
        return [self.cert, *self.parent.chain]

    @property
    def cert_pem(self) -> bytes:
        return pem(self.cert)

    def intermediate(
        self, cn: str = "iothub-tls Test Intermediate", *, key_type: str = "rsa"
    ) -> CA:
        return CA(cn, key_type=key_type, parent=self)

    def issue(
        self,
        *hostnames: str,
        cn: str | None = None,
        key_type: str = "rsa",
        key_size: int | None = None,
        client: bool = False,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        key: PrivateKey | None = None,
    ) -> Issued:
        """A leaf: a TLS server certificate for ``hostnames``, or a client (device)
        certificate with CN = ``cn`` when ``client`` is true."""
        key = key or new_key(key_type, key_size)
        subject_cn = cn or (hostnames[0] if hostnames else "device")
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(subject_cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - dt.timedelta(hours=1))
            .not_valid_after(not_after or NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if hostnames:
            names: list[x509.GeneralName] = []
            for h in hostnames:
                try:
                    import ipaddress

                    names.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    names.append(x509.DNSName(h))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert, key, self.chain)


def self_signed(hostname: str, key_type: str = "rsa") -> Issued:
    """A self-signed server certificate (not a CA): what a misconfigured server shows."""
    key = new_key(key_type)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostname))
        .issuer_name(_name(hostname))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(hours=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)
