"""X.509 device identities: :class:`ClientIdentity` holds a device certificate (with its
chain) and private key for mutual TLS, validated when it is built, and loads them into an
:class:`ssl.SSLContext` without ever writing the plaintext key to persistent storage.
Private key material never appears in ``repr()``/``str()`` or in error messages.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import ssl
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.x509.oid import NameOID

from ..errors import IdentityError
from ..roots import pem

__all__ = ["ClientIdentity", "StrPath", "thumbprints"]

StrPath: TypeAlias = "str | os.PathLike[str]"
"""A filesystem path accepted by :meth:`ClientIdentity.from_files`."""

_SupportedKey: TypeAlias = "rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey"

_EC_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def _to_bytes(data: bytes | str, what: str) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise IdentityError(f"{what} must be bytes or str, not {type(data).__name__}")


# A device's chain and key take a few KiB: anything this large is not one (and /dev/zero
# or a FIFO would otherwise be read until memory runs out).
_MAX_IDENTITY_FILE = 1 << 20


def _read_file(path: StrPath, what: str) -> bytes:
    return pem.read_limited(path, what, _MAX_IDENTITY_FILE, IdentityError)


def _load_certificates(data: bytes, where: str) -> list[x509.Certificate]:
    return pem.load_certificates(data, where, IdentityError)


def _load_private_key(data: bytes, where: str, password: bytes | None, *, hint: str) -> Any:
    found = pem.pem_blocks(data)
    blocks = [(label, block) for label, block in found if label.endswith("PRIVATE KEY")]
    if not blocks:
        if not found:
            raise IdentityError(pem.not_pem_message(data, where, "private key"))
        raise IdentityError(f"no private key in {where}: {hint}")
    if len(blocks) > 1:
        raise IdentityError(
            f"{where} contains {len(blocks)} private keys: keep only the device's key"
        )
    label, block = blocks[0]
    encrypted = label == "ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in block
    if encrypted and password is None:
        raise IdentityError(
            f"the private key in {where} is encrypted: pass password=... "
            "(the passphrase it was exported with)"
        )
    try:
        return serialization.load_pem_private_key(block, password if encrypted else None)
    except ValueError as exc:
        if encrypted:
            raise IdentityError(
                f"wrong password for the encrypted private key in {where} (or the key is "
                "corrupt): check the passphrase"
            ) from None
        raise IdentityError(
            f"the private key in {where} is corrupt or in an unsupported format; "
            "re-export it as PEM (PKCS#8, PKCS#1 or SEC1)"
        ) from exc
    except TypeError as exc:  # an unexpected password/encryption combination
        raise IdentityError(f"cannot load the private key in {where}: {exc}") from None
    except Exception as exc:  # e.g. UnsupportedAlgorithm
        raise IdentityError(
            f"the private key in {where} uses an unsupported algorithm ({exc}); IoT Hub "
            "device certificates use RSA (2048 bits or more) or EC P-256/P-384/P-521 keys"
        ) from None


def _check_key_type(key: object) -> _SupportedKey:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise IdentityError(
                f"the RSA key has {key.key_size} bits, which is too small: IoT Hub and "
                "OpenSSL's default security level require at least 2048 bits; issue a new "
                "device certificate with an RSA 2048+ or EC P-256 key"
            )
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in _EC_CURVES:
            raise IdentityError(
                f"the EC key uses curve {key.curve.name}, which TLS with IoT Hub does not "
                "support: use P-256 (secp256r1), P-384 or P-521"
            )
        return key
    names: list[tuple[type, str]] = [
        (ed25519.Ed25519PrivateKey, "Ed25519"),
        (ed448.Ed448PrivateKey, "Ed448"),
        (dsa.DSAPrivateKey, "DSA"),
        (x25519.X25519PrivateKey, "X25519"),
        (x448.X448PrivateKey, "X448"),
    ]
    kind = next((n for cls, n in names if isinstance(key, cls)), type(key).__name__)
    raise IdentityError(
        f"{kind} keys are not supported: IoT Hub authenticates X.509 devices with RSA "
        "(2048 bits or more) or ECDSA (P-256/P-384/P-521) certificates; issue a new device "
        "certificate with one of those"
    )


def _public_der(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _subject_cn(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _password_bytes(password: bytes | str | None) -> bytes | None:
    if password is None:
        return None
    if isinstance(password, str):
        return password.encode("utf-8")
    if isinstance(password, bytes | bytearray | memoryview):
        return bytes(password)
    # bytes(7) would be seven zero bytes (and bytes(10**10) ten gigabytes)
    raise TypeError(f"password must be bytes or str, not {type(password).__name__}")


def thumbprints(certificate: x509.Certificate | bytes) -> tuple[str, str]:
    """(SHA-1, SHA-256) of a certificate's DER (a certificate or its DER bytes), in the
    form IoT Hub shows and registers them: upper-case hex without colons."""
    der = (
        certificate
        if isinstance(certificate, bytes)
        else certificate.public_bytes(serialization.Encoding.DER)
    )
    # SHA-1 here is an identifier IoT Hub registers, not a security decision.
    sha1 = hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()
    return sha1, hashlib.sha256(der).hexdigest().upper()


class ClientIdentity:
    """A device's X.509 identity for mutual TLS: the leaf certificate, any intermediates,
    and the private key.

    Build it with :meth:`from_files` or :meth:`from_pem`; both validate everything up
    front (readable, well-formed, supported key type, key matches the leaf) and raise
    :class:`~iothub_tls.errors.IdentityError` saying what to fix. Instances are immutable
    and hashable; ``repr()`` shows the device id and thumbprint, never key material.

    :param certificates: leaf first, then intermediates (as in a PEM chain file).
    :param private_key: the leaf's RSA (2048+ bits) or EC (P-256/P-384/P-521) key.
    """

    __slots__ = ("_chain", "_key")

    _chain: tuple[x509.Certificate, ...]
    _key: _SupportedKey

    def __init__(self, certificates: Sequence[x509.Certificate], private_key: object) -> None:
        chain = tuple(certificates)
        if not chain:
            raise IdentityError("no certificate given: the device certificate is required")
        for number, cert in enumerate(chain, start=1):
            if not isinstance(cert, x509.Certificate):
                raise TypeError(
                    f"certificate {number} must be a cryptography x509.Certificate, not "
                    f"{type(cert).__name__} (use from_pem or from_files for PEM data)"
                )
            pem.check_readable(cert, f"certificate {number} of the chain", IdentityError)
        key = _check_key_type(private_key)
        key_der = _public_der(key.public_key())
        if _public_der(chain[0].public_key()) != key_der:
            position = next(
                (
                    i
                    for i, c in enumerate(chain[1:], start=2)
                    if _public_der(c.public_key()) == key_der
                ),
                None,
            )
            if position is not None:
                raise IdentityError(
                    f"the private key matches certificate {position} of the chain, not the "
                    "first one: put the device (leaf) certificate first, then intermediates"
                )
            cn = _subject_cn(chain[0])
            raise IdentityError(
                f"the private key does not match the device certificate (CN={cn}): check "
                "that the certificate and key files belong together"
            )
        object.__setattr__(self, "_chain", chain)
        object.__setattr__(self, "_key", key)

    @classmethod
    def from_pem(
        cls,
        cert_pem: bytes | str,
        key_pem: bytes | str,
        password: bytes | str | None = None,
    ) -> ClientIdentity:
        """Build an identity from in-memory PEM data.

        :param cert_pem: the device certificate, optionally followed by intermediates.
        :param key_pem: the private key (PKCS#8, PKCS#1 or SEC1; encrypted or not).
        :param password: the passphrase of an encrypted key.
        """
        certs = _load_certificates(_to_bytes(cert_pem, "cert_pem"), "cert_pem")
        key = _load_private_key(
            _to_bytes(key_pem, "key_pem"),
            "key_pem",
            _password_bytes(password),
            hint="pass the device's private key PEM ('-----BEGIN PRIVATE KEY-----') as key_pem",
        )
        return cls(certs, key)

    @classmethod
    def from_files(
        cls,
        certfile: StrPath,
        keyfile: StrPath | None = None,
        password: bytes | str | None = None,
    ) -> ClientIdentity:
        """Build an identity from PEM files.

        :param certfile: the device certificate, optionally followed by intermediates.
        :param keyfile: the private key; None when it is in ``certfile`` too.
        :param password: the passphrase of an encrypted key.
        """
        cert_data = _read_file(certfile, "certificate")
        certs = _load_certificates(cert_data, repr(os.fspath(certfile)))
        if keyfile is None:
            key_data, where = cert_data, repr(os.fspath(certfile))
            hint = "the key is not in the certificate file; pass keyfile=..."
        else:
            key_data, where = _read_file(keyfile, "private key"), repr(os.fspath(keyfile))
            hint = "pass the file that holds the device's private key as keyfile"
        key = _load_private_key(key_data, where, _password_bytes(password), hint=hint)
        return cls(certs, key)

    # -- read-only view -------------------------------------------------------------

    @property
    def certificate(self) -> x509.Certificate:
        """The device (leaf) certificate."""
        return self._chain[0]

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The leaf followed by the intermediates, in the order sent to the server."""
        return self._chain

    @property
    def thumbprint_sha1(self) -> str:
        """SHA-1 of the leaf's DER, upper-case hex without colons, as IoT Hub shows it."""
        return thumbprints(self.certificate)[0]

    @property
    def thumbprint_sha256(self) -> str:
        """SHA-256 of the leaf's DER, upper-case hex without colons, as IoT Hub shows it."""
        return thumbprints(self.certificate)[1]

    @property
    def device_id(self) -> str | None:
        """The leaf's subject common name (IoT Hub's device id for CA-signed devices), or
        None when the subject has no CN."""
        return _subject_cn(self.certificate)

    @property
    def key_type(self) -> str:
        """``"RSA"`` or ``"EC"``."""
        return "RSA" if isinstance(self._key, rsa.RSAPrivateKey) else "EC"

    # -- loading into OpenSSL ---------------------------------------------------------

    def _bundle(self, password: bytes) -> bytes:
        """The chain and the key re-encrypted under ``password``, as one PEM document."""
        parts: Iterable[bytes] = (c.public_bytes(serialization.Encoding.PEM) for c in self._chain)
        key = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
        return b"".join(parts) + key

    def _load_into(self, ctx: ssl.SSLContext) -> None:
        """Load the chain and key into ``ctx`` with ``ctx.load_cert_chain``.

        :mod:`ssl` only loads from files, so the key is re-encrypted under a random
        one-time password and written, with the chain, to an anonymous in-memory file
        (``memfd_create``, opened via ``/proc/self/fd/N``). Where that is unavailable,
        the encrypted bundle goes to a fresh private directory (mode 0700) that is removed
        before returning. The plaintext key is never written anywhere.

        :raises IdentityError: when OpenSSL refuses the certificate or key.
        """
        onetime = secrets.token_bytes(32)
        bundle = self._bundle(onetime)
        try:
            if not self._load_via_memfd(ctx, bundle, onetime):
                self._load_via_tempdir(ctx, bundle, onetime)
        except ssl.SSLError as exc:
            raise IdentityError(
                f"OpenSSL refused the device certificate or key: {exc.reason or exc}; the "
                "context's security level may forbid this key size or signature algorithm"
            ) from exc

    @staticmethod
    def _load_via_memfd(ctx: ssl.SSLContext, bundle: bytes, password: bytes) -> bool:
        memfd_create = getattr(os, "memfd_create", None)
        if memfd_create is None:
            return False
        try:
            fd = memfd_create("iothub-tls-identity", getattr(os, "MFD_CLOEXEC", 0))
        except OSError:
            return False
        try:
            path = f"/proc/self/fd/{fd}"
            if not os.path.exists(path):
                return False
            view = memoryview(bundle)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            ctx.load_cert_chain(path, password=password)
            return True
        finally:
            os.close(fd)

    @staticmethod
    def _load_via_tempdir(ctx: ssl.SSLContext, bundle: bytes, password: bytes) -> None:
        directory = tempfile.mkdtemp(prefix="iothub-tls-")
        try:
            os.chmod(directory, 0o700)
            path = os.path.join(directory, "identity.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(bundle)
            ctx.load_cert_chain(path, password=password)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    # -- value semantics ----------------------------------------------------------------

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClientIdentity):
            return NotImplemented
        return self._chain == other._chain

    def __hash__(self) -> int:
        return hash(self._chain)

    def __repr__(self) -> str:
        return (
            f"ClientIdentity(device_id={self.device_id!r}, key_type={self.key_type!r}, "
            f"thumbprint_sha256={self.thumbprint_sha256!r}, chain_length={len(self._chain)})"
        )
