"""The test PKI: a small certificate factory for test suites, benchmarks and labs.

It makes what a local IoT Hub look-alike and its devices need: a root CA, optionally an
intermediate CA (IoT Hub's own chains are root -> intermediate -> leaf), server
certificates with RSA or ECDSA keys for chosen host names and IP addresses, and device
certificates whose subject CN is the device id (what IoT Hub expects of CA-signed X.509
devices). ``iothub-tls certs`` is a thin command line over this module, the local hub
and ``iothub-tls demo`` reuse it, and so do this project's tests and benchmarks.

For tests of refusals it also makes what a correct PKI never should, each only when
asked for by name:

* a validity window of your choosing (``not_before`` / ``not_after``): expired and
  not-yet-valid certificates;
* deliberately weak keys (``key_size=1024, allow_weak_key=True``);
* a server certificate without subjectAltName (``issue(cn="host")``), a client
  certificate without CN (``issue(client=True)``), a self-signed leaf
  (:func:`self_signed`);
* a certificate for a key you bring (``key=``), of any type ``cryptography`` can
  certify (Ed25519, DSA, secp256k1...), so that the code under test can refuse it.

RSA key generation takes tens of milliseconds; a test suite that makes hundreds of
leaves hands its CAs a :class:`KeyPool`, which generates a few keys per kind once per
process and deals them out again (CA keys are always new).

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

    # in a test suite: shared keys, an expired server certificate
    keys = KeyPool()
    root = CertificateAuthority.root("Test Root", key_pool=keys)
    expired = root.issue("hub.test", not_before=past, not_after=yesterday)
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import os
import re
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .._io.fs import private_directory
from ..auth import thumbprints
from ..roots import common_name

__all__ = [
    "DEFAULT_CA_DAYS",
    "DEFAULT_LEAF_DAYS",
    "ORGANIZATION",
    "AnyPrivateKey",
    "CertificateAuthority",
    "Issued",
    "KeyPool",
    "KeyType",
    "PKIDirectory",
    "PrivateKey",
    "PublicKey",
    "WrittenFiles",
    "check_device_id",
    "self_signed",
    "thumbprints",
]

#: Keys this module generates, and the only kinds a CA may have.
PrivateKey: TypeAlias = "rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey"
#: Public halves of :data:`PrivateKey`.
PublicKey: TypeAlias = "rsa.RSAPublicKey | ec.EllipticCurvePublicKey"
#: Any key a leaf may be issued for when you bring it (``key=``): also DSA, Ed25519,
#: Ed448 and other curves, which the code under test is expected to refuse.
AnyPrivateKey: TypeAlias = (
    "rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | dsa.DSAPrivateKey "
    "| ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey"
)
_ANY_PRIVATE_KEY = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    dsa.DSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

#: Validity of CA certificates made without an explicit ``days``.
DEFAULT_CA_DAYS = 3650
#: Validity of server and device certificates made without an explicit ``days``.
DEFAULT_LEAF_DAYS = 365
#: The organisation (O) of every subject this module makes.
ORGANIZATION = "iothub-tls test PKI"
# Certificates start an hour in the past so that a device whose clock lags a little
# still accepts a certificate made a moment ago.
_BACKDATE = dt.timedelta(hours=1)

_RSA_SIZES = (2048, 3072, 4096)
_WEAK_RSA_SIZES = range(1024, 2048)
_CURVES: dict[int, type[ec.EllipticCurve]] = {256: ec.SECP256R1, 384: ec.SECP384R1}


class KeyType(enum.Enum):
    """Kind of key a certificate gets. Where a ``key_type`` is taken, the values
    ``"rsa"`` and ``"ec"`` are accepted as well."""

    #: RSA (2048 bits unless ``key_size`` says otherwise): what most IoT Hub chains use.
    RSA = "rsa"
    #: ECDSA on P-256 (or P-384 with ``key_size=384``): the hub's ECC certificates.
    EC = "ec"

    @classmethod
    def of(cls, value: KeyType | str) -> KeyType:
        """``value`` as a KeyType (``KeyType.EC`` or ``"ec"``...).

        :raises ValueError: for anything else.
        """
        if isinstance(value, KeyType):
            return value
        if isinstance(value, str):
            for member in cls:
                if member.value == value.lower():
                    return member
        raise ValueError(
            f"unknown key type {value!r}: use KeyType.RSA or KeyType.EC ('rsa' or 'ec')"
        )

    def check_size(self, key_size: int | None = None, *, allow_weak: bool = False) -> int:
        """The key size this type makes for ``key_size`` (``None``: the default, RSA-2048
        or P-256).

        :raises ValueError: for a size this type does not make; for RSA below 2048 bits
            unless ``allow_weak`` (a deliberately weak key for a refusal test).
        """
        if key_size is not None and (isinstance(key_size, bool) or not isinstance(key_size, int)):
            raise ValueError(f"key_size must be a number of bits, not {key_size!r}")
        if self is KeyType.RSA:
            bits = key_size or 2048
            if bits in _RSA_SIZES or (allow_weak and bits in _WEAK_RSA_SIZES):
                return bits
            weak = ", or pass allow_weak_key=True for a deliberately weak test key"
            hint = f"{weak} (1024 to 2047 bits)" if bits in _WEAK_RSA_SIZES else ""
            raise ValueError(
                f"RSA key size {bits} is not supported: use 2048, 3072 or 4096 bits "
                f"(IoT Hub and OpenSSL's default security level need at least 2048){hint}"
            )
        size = key_size or 256
        if size not in _CURVES:
            raise ValueError(f"EC key size {size} is not supported: use 256 (P-256) or 384 (P-384)")
        return size

    def generate(self, key_size: int | None = None, *, allow_weak: bool = False) -> PrivateKey:
        """A new private key of this type (sizes as :meth:`check_size` accepts them)."""
        bits = self.check_size(key_size, allow_weak=allow_weak)
        if self is KeyType.RSA:
            return rsa.generate_private_key(public_exponent=65537, key_size=bits)
        return ec.generate_private_key(_CURVES[bits]())


KeyTypeLike: TypeAlias = "KeyType | Literal['rsa', 'ec']"


class KeyPool:
    """Keys generated once per process and dealt out again, so that a test suite making
    hundreds of certificates does not spend its time generating RSA keys.

    For each kind and size, the first ``size`` requests make new keys; later ones get
    those again in turn. Certificates issued from one pool may therefore share a key:
    when a test needs a key nobody else has, it passes ``key=`` (or uses a CA without a
    pool). Safe to share between threads.
    """

    def __init__(self, size: int = 4) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"a key pool holds 1 or more keys per kind (got {size!r})")
        self.size = size
        self._keys: dict[tuple[KeyType, int], list[PrivateKey]] = {}
        self._turn: dict[tuple[KeyType, int], int] = {}
        self._lock = threading.Lock()

    def key(
        self,
        key_type: KeyTypeLike = KeyType.RSA,
        key_size: int | None = None,
        *,
        allow_weak_key: bool = False,
    ) -> PrivateKey:
        """A key of this kind: a new one until the pool holds ``size`` of them, then one
        of those (in turn)."""
        kind = KeyType.of(key_type)
        bits = kind.check_size(key_size, allow_weak=allow_weak_key)
        with self._lock:
            keys = self._keys.setdefault((kind, bits), [])
            turn = self._turn.get((kind, bits), 0)
            self._turn[(kind, bits)] = turn + 1
            if turn < self.size:
                keys.append(kind.generate(bits, allow_weak=True))  # size checked above
                return keys[-1]
            return keys[turn % self.size]

    def __repr__(self) -> str:
        return f"<KeyPool size={self.size} kinds={len(self._keys)}>"


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
    if not isinstance(name, str):
        raise ValueError(f"a subjectAltName must be a DNS name or an IP address, not {name!r}")
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


def _name(cn: str | None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    if cn is not None:
        if not isinstance(cn, str) or not cn:
            raise ValueError(f"a common name must be a non-empty string, not {cn!r}")
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attributes)


def _check_days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"validity must be a whole number of days, 1 or more (got {days!r})")
    return days


def _aware(value: dt.datetime, name: str) -> dt.datetime:
    if not isinstance(value, dt.datetime):
        raise ValueError(f"{name} must be a datetime, not {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{name} must be timezone-aware (e.g. datetime.now(timezone.utc)), got {value}"
        )
    return value


def _validity(
    days: int | None,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
    default_days: int,
) -> tuple[dt.datetime, dt.datetime]:
    """The (start, end) of a certificate: ``days`` from ``not_before`` (default: an hour
    ago), or up to ``not_after``."""
    if days is not None and not_after is not None:
        raise ValueError("give the validity as days= or as not_after=, not both")
    start = _utcnow() - _BACKDATE if not_before is None else _aware(not_before, "not_before")
    if not_after is None:
        return start, start + dt.timedelta(days=_check_days(default_days if days is None else days))
    end = _aware(not_after, "not_after")
    if end <= start:
        raise ValueError(
            f"not_after ({end:%Y-%m-%d %H:%M:%S%z}) must be later than not_before "
            f"({start:%Y-%m-%d %H:%M:%S%z})"
        )
    return start, end


def _signature_hash(key: AnyPrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None  # EdDSA signs the message itself
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_usage(*, ca: bool, key_encipherment: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        # RSA key transport suites need keyEncipherment (RFC 5246 7.4.2).
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_certificate(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public: CertificatePublicKeyTypes,
    signer: AnyPrivateKey,
    names: Sequence[str],
    client: bool,
    start: dt.datetime,
    end: dt.datetime,
    authority: x509.AuthorityKeyIdentifier | None,
) -> x509.Certificate:
    """The one place where an end-entity certificate is built."""
    sans = [_general_name(n) for n in names]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False, key_encipherment=isinstance(public, rsa.RSAPublicKey)),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    if authority is not None:
        builder = builder.add_extension(authority, critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer, _signature_hash(signer))


def _leaf_key(
    key: AnyPrivateKey | None,
    key_type: KeyTypeLike | None,
    key_size: int | None,
    allow_weak_key: bool,
    pool: KeyPool | None,
) -> AnyPrivateKey:
    if key is not None:
        if key_type is not None or key_size is not None or allow_weak_key:
            raise ValueError("give either key= or key_type=/key_size=, not both")
        if not isinstance(key, _ANY_PRIVATE_KEY):
            raise ValueError(
                f"key must be an RSA, EC, DSA, Ed25519 or Ed448 private key, "
                f"not {type(key).__name__}"
            )
        return key
    kind = KeyType.of(key_type if key_type is not None else KeyType.RSA)
    if pool is not None:
        return pool.key(kind, key_size, allow_weak_key=allow_weak_key)
    return kind.generate(key_size, allow_weak=allow_weak_key)


class WrittenFiles(NamedTuple):
    """Where :meth:`Issued.write` put a certificate and its key (unpacks as
    ``cert, key = issued.write(...)``)."""

    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class Issued:
    """A certificate, its private key, and the CA certificates between it and the root
    (nearest first; empty for a root or a leaf issued directly by the root).

    Short names kept for test suites: :attr:`cert`, :attr:`key`, :attr:`cert_chain_pem`.
    Make a variant with :func:`dataclasses.replace` (e.g. ``replace(leaf, chain=())``
    for a server that forgets its intermediate).
    """

    certificate: x509.Certificate
    private_key: AnyPrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.chain, tuple):
            object.__setattr__(self, "chain", tuple(self.chain))

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes) -> Issued:
        """An Issued from PEM: the certificate followed by its intermediates, and its
        unencrypted private key.

        :raises ValueError: when there is no certificate, or the key does not belong to it.
        """
        certs = x509.load_pem_x509_certificates(chain_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, _ANY_PRIVATE_KEY):
            raise ValueError(f"{type(key).__name__} keys are not supported")
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        leaf_spki = certs[0].public_key().public_bytes(der, spki)
        if key.public_key().public_bytes(der, spki) != leaf_spki:
            raise ValueError(
                f"the key does not belong to the certificate {common_name(certs[0])!r}"
            )
        return cls(certs[0], key, tuple(certs[1:]))

    @property
    def common_name(self) -> str:
        return common_name(self.certificate)

    @property
    def cert(self) -> x509.Certificate:
        """Same as :attr:`certificate`."""
        return self.certificate

    @property
    def key(self) -> AnyPrivateKey:
        """Same as :attr:`private_key`."""
        return self.private_key

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
    def cert_chain_pem(self) -> bytes:
        """Same as :attr:`chain_pem`."""
        return self.chain_pem

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

    def __repr__(self) -> str:
        return f"<Issued {self.common_name!r} chain={len(self.chain)}>"

    def write(
        self, directory: str | os.PathLike[str], stem: str, *, force: bool = False
    ) -> WrittenFiles:
        """Write ``STEM.pem`` (certificate and intermediates) and ``STEM.key`` (mode 0600),
        creating ``directory`` (mode 0700) when it does not exist.

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


def self_signed(
    *names: str,
    cn: str | None = None,
    client: bool = False,
    key_type: KeyTypeLike | None = None,
    key_size: int | None = None,
    key: AnyPrivateKey | None = None,
    days: int | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    allow_weak_key: bool = False,
    key_pool: KeyPool | None = None,
) -> Issued:
    """A self-signed end-entity certificate (not a CA): what a misconfigured server or a
    device without a CA shows. Arguments as :meth:`CertificateAuthority.issue`.

    :raises ValueError: without a name or a ``cn``.
    """
    if not names and cn is None:
        raise ValueError("a self-signed certificate needs a DNS name, an IP address or a cn")
    private = _leaf_key(key, key_type, key_size, allow_weak_key, key_pool)
    subject = _name(cn if cn is not None else names[0])
    start, end = _validity(days, not_before, not_after, DEFAULT_LEAF_DAYS)
    cert = _leaf_certificate(
        subject=subject, issuer=subject, public=private.public_key(), signer=private,
        names=names, client=client, start=start, end=end, authority=None,
    )  # fmt: skip
    return Issued(cert, private)


class CertificateAuthority:
    """A CA that issues certificates: a root (:meth:`root`) or an intermediate
    (:meth:`intermediate`), or one loaded from PEM (:meth:`load`).

    With a ``key_pool``, the leaves it issues (and those of the intermediates it makes)
    draw their keys from that :class:`KeyPool`. Short names kept for test suites:
    :attr:`cert`, :attr:`key`, :attr:`cert_pem`.
    """

    def __init__(self, issued: Issued, *, key_pool: KeyPool | None = None) -> None:
        try:
            basic = issued.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            basic = None
        if basic is None or not basic.value.ca:
            raise ValueError(f"{issued.common_name!r} is not a CA certificate")
        if not isinstance(issued.private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError("only RSA and EC CA keys are supported")
        self._issued = issued
        self._key: PrivateKey = issued.private_key
        self.key_pool = key_pool

    # -- making CAs ---------------------------------------------------------------------

    @classmethod
    def root(
        cls,
        common_name: str = "iothub-tls Test Root CA",
        *,
        key_type: KeyTypeLike = KeyType.RSA,
        key_size: int | None = None,
        days: int | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        key_pool: KeyPool | None = None,
    ) -> CertificateAuthority:
        """A new self-signed root CA (valid ``days``, default :data:`DEFAULT_CA_DAYS`,
        from ``not_before``, default an hour ago; or up to ``not_after``). Its own key is
        always new; ``key_pool`` serves the leaves it issues."""
        key = KeyType.of(key_type).generate(key_size)
        start, end = _validity(days, not_before, not_after, DEFAULT_CA_DAYS)
        cert = (
            cls._ca_builder(common_name, key, start, end, path_length=None)
            .issuer_name(_name(common_name))
            .sign(key, _signature_hash(key))
        )
        return cls(Issued(cert, key), key_pool=key_pool)

    def intermediate(
        self,
        common_name: str = "iothub-tls Test Issuing CA",
        *,
        key_type: KeyTypeLike = KeyType.RSA,
        key_size: int | None = None,
        days: int | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> CertificateAuthority:
        """A new CA issued by this root (it may issue leaves, not further CAs), sharing
        this CA's key pool.

        :raises ValueError: when this CA is itself an intermediate.
        """
        if not self.is_root:
            raise ValueError(
                f"{self.common_name!r} is an intermediate CA and may not issue CAs "
                "(pathLenConstraint 0): make intermediates from the root"
            )
        key = KeyType.of(key_type).generate(key_size)
        start, end = _validity(days, not_before, not_after, DEFAULT_CA_DAYS)
        cert = (
            self._ca_builder(common_name, key, start, end, path_length=0)
            .issuer_name(self.certificate.subject)
            .add_extension(self._authority_key_id(), critical=False)
            .sign(self._key, _signature_hash(self._key))
        )
        return CertificateAuthority(Issued(cert, key, self._below()), key_pool=self.key_pool)

    @staticmethod
    def _ca_builder(
        cn: str, key: PrivateKey, start: dt.datetime, end: dt.datetime, *, path_length: int | None
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
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
        key_pool: KeyPool | None = None,
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
        return cls(Issued(cert, key, tuple(chain)), key_pool=key_pool)

    # -- what it is ---------------------------------------------------------------------

    @property
    def issued(self) -> Issued:
        return self._issued

    @property
    def certificate(self) -> x509.Certificate:
        return self._issued.certificate

    @property
    def private_key(self) -> PrivateKey:
        return self._key

    @property
    def cert(self) -> x509.Certificate:
        """Same as :attr:`certificate`."""
        return self._issued.certificate

    @property
    def key(self) -> PrivateKey:
        """Same as :attr:`private_key`."""
        return self._key

    @property
    def cert_pem(self) -> bytes:
        """This CA's certificate alone, PEM (what to trust, for a root)."""
        return self._issued.cert_pem

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

    def issue(
        self,
        *names: str,
        cn: str | None = None,
        client: bool = False,
        key_type: KeyTypeLike | None = None,
        key_size: int | None = None,
        key: AnyPrivateKey | None = None,
        days: int | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        allow_weak_key: bool = False,
    ) -> Issued:
        """An end-entity certificate, the general form of :meth:`server` and
        :meth:`device` with nothing checked beyond what X.509 needs.

        :param names: DNS names and IP addresses for the subjectAltName (none: no SAN).
        :param cn: the subject CN; default the first name; with neither, the subject
            has no CN.
        :param client: a TLS client (device) certificate (EKU clientAuth) instead of a
            server one (serverAuth).
        :param key_type: ``KeyType.RSA`` (default) or ``KeyType.EC`` (or ``"rsa"`` /
            ``"ec"``), with ``key_size`` bits (RSA 2048/3072/4096, EC 256/384).
        :param key: the certificate's key instead of a generated one: any key
            ``cryptography`` can certify (then no key_type/key_size).
        :param days: validity from ``not_before`` (default an hour ago), default
            :data:`DEFAULT_LEAF_DAYS`; or ``not_after``, the end (not both).
        :param allow_weak_key: allow RSA keys of 1024 to 2047 bits, for refusal tests.
        :raises ValueError: for a name that is neither a DNS name nor an IP address, an
            unsupported key size, a naive datetime, or a window that ends before it starts.
        """
        private = _leaf_key(key, key_type, key_size, allow_weak_key, self.key_pool)
        start, end = _validity(days, not_before, not_after, DEFAULT_LEAF_DAYS)
        cert = _leaf_certificate(
            subject=_name(cn if cn is not None else (names[0] if names else None)),
            issuer=self.certificate.subject, public=private.public_key(), signer=self._key,
            names=names, client=client, start=start, end=end,
            authority=self._authority_key_id(),
        )  # fmt: skip
        return Issued(cert, private, self._below())

    def server(
        self,
        *names: str,
        key_type: KeyTypeLike = KeyType.RSA,
        key_size: int | None = None,
        days: int | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Issued:
        """A TLS server certificate for DNS names and/or IP addresses (subjectAltName;
        the first name is also the CN)."""
        if not names:
            raise ValueError("a server certificate needs at least one DNS name or IP address")
        return self.issue(
            *names, key_type=key_type, key_size=key_size, days=days,
            not_before=not_before, not_after=not_after,
        )  # fmt: skip

    def device(
        self,
        device_id: str,
        *,
        key_type: KeyTypeLike = KeyType.RSA,
        key_size: int | None = None,
        days: int | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Issued:
        """A device (TLS client) certificate with subject CN = ``device_id``, as IoT Hub
        expects of CA-signed X.509 devices."""
        return self.issue(
            cn=check_device_id(device_id), client=True, key_type=key_type,
            key_size=key_size, days=days, not_before=not_before, not_after=not_after,
        )  # fmt: skip

    def device_from_csr(
        self,
        csr_pem: bytes,
        *,
        days: int | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
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
        return self.device_for_key(
            str(names[0].value), key, days=days, not_before=not_before, not_after=not_after
        )

    def device_for_key(
        self,
        device_id: str,
        public_key: PublicKey,
        *,
        days: int | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> tuple[x509.Certificate, ...]:
        """Certify a public key whose private half this CA never sees (in a token or a
        TPM): the leaf followed by the intermediates."""
        start, end = _validity(days, not_before, not_after, DEFAULT_LEAF_DAYS)
        cert = _leaf_certificate(
            subject=_name(check_device_id(device_id)), issuer=self.certificate.subject,
            public=public_key, signer=self._key, names=(), client=True, start=start,
            end=end, authority=self._authority_key_id(),
        )  # fmt: skip
        return (cert, *self._below())

    def _below(self) -> tuple[x509.Certificate, ...]:
        """The chain of what this CA issues: nothing for a root, else this CA and its own."""
        return () if self.is_root else (self.certificate, *self.chain)

    def _authority_key_id(self) -> x509.AuthorityKeyIdentifier:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key())


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
