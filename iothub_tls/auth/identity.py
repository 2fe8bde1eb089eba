"""X.509 device identities: :class:`ClientIdentity` holds a device certificate (with its
chain) and private key for mutual TLS, validated when it is built, and loads them into an
:class:`ssl.SSLContext` without ever writing the plaintext key to persistent storage.
Private key material never appears in ``repr()``/``str()`` or in error messages.

The key may also stay in hardware (:meth:`ClientIdentity.from_pkcs11`,
:meth:`ClientIdentity.from_tpm2`): OpenSSL then asks the token or the TPM to sign, through
:mod:`iothub_tls.tls.hardware`, and the key is never exported.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import ssl
import tempfile
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.x509.oid import NameOID

from ..errors import (
    FeatureUnavailableError,
    HardwareKeyError,
    IdentityError,
    KeyMismatchError,
)
from ..roots import pem

if TYPE_CHECKING:
    from ..tls.hardware import HardwareKey

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


def _check_public_key_type(public: object, where: str) -> None:
    """The rules of :func:`_check_key_type`, for a key known only by its public half."""
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < 2048:
            raise IdentityError(
                f"the RSA key {where} has {public.key_size} bits, which is too small: IoT Hub "
                "and OpenSSL's default security level require at least 2048 bits"
            )
        return
    if isinstance(public, ec.EllipticCurvePublicKey):
        if public.curve.name not in _EC_CURVES:
            raise IdentityError(
                f"the EC key {where} uses curve {public.curve.name}, which TLS with IoT Hub "
                "does not support: use P-256 (secp256r1), P-384 or P-521"
            )
        return
    raise IdentityError(
        f"the key {where} is a {type(public).__name__}: IoT Hub authenticates X.509 devices "
        "with RSA (2048 bits or more) or ECDSA (P-256/P-384/P-521) keys"
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
    _key: _SupportedKey | HardwareKey

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
        hardware = _hardware_key(private_key)
        if hardware is not None:
            public = serialization.load_der_public_key(hardware.public_der)
            _check_public_key_type(public, f"in {hardware.description}")
            key: Any = hardware
            key_der = _public_der(public)
        else:
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
            if hardware is not None:
                raise KeyMismatchError(
                    f"the device certificate (CN={cn}) does not belong to the key in "
                    f"{hardware.description}: use the certificate issued for that key"
                )
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

    @classmethod
    def from_pkcs11(
        cls,
        key_uri: str,
        *,
        certificate: _CertificateSource | None = None,
        module: StrPath | None = None,
        pin: bytes | str | None = None,
    ) -> ClientIdentity:
        """An identity whose private key stays in a PKCS#11 token (HSM, secure element,
        smart card, a TPM through tpm2-pkcs11). OpenSSL's ``pkcs11`` engine asks the
        token to sign; the key is never exported.

        :param key_uri: an RFC 7512 URI naming the token and the key, e.g.
            ``pkcs11:token=device;object=iothub;type=private``.
        :param certificate: the device certificate (and intermediates): a PEM file path,
            PEM data or a ``cryptography`` certificate. None: read the certificate with
            the key's label / id from the token.
        :param module: the token's PKCS#11 library; default: the URI's ``module-path``,
            else p11-kit's proxy.
        :param pin: the user PIN (or ``pin-value`` / ``pin-source`` in the URI). It is
            tried once, and never appears in a message, log or repr.
        :raises HardwareKeyError: a subclass saying what is wrong (module, token, PIN,
            key, certificate, mismatch).
        :raises FeatureUnavailableError: when this Python's OpenSSL cannot load engines.
        """
        from ..tls.hardware import KeyRequest, backend
        from ..tls.hardware.uri import UriError, parse_pkcs11_uri

        try:
            uri = parse_pkcs11_uri(key_uri)
        except UriError as exc:
            raise HardwareKeyError(f"not a usable PKCS#11 URI: {exc}") from None
        if uri.type not in (None, "private"):
            raise HardwareKeyError(
                f"the URI names a {uri.type!r} object: name the private key (type=private)"
            )
        secret = _pin_bytes(pin, uri.pin_value, uri.pin_source)
        chain = None if certificate is None else _certificate_chain(certificate)
        request = KeyRequest(
            "pkcs11",
            uri,
            module=None if module is None else os.fspath(module),
            pin=secret,
            want_certificate=chain is None,
        )
        hardware = backend("pkcs11").load_key(request)
        if chain is None:
            assert hardware.certificate_der is not None
            try:
                chain = [x509.load_der_x509_certificate(hardware.certificate_der)]
            except ValueError as exc:
                raise HardwareKeyError(
                    f"the certificate object on the token for {uri} is not a readable X.509 "
                    f"certificate ({exc}): import the device certificate again, or pass "
                    "certificate=..."
                ) from None
        return cls(chain, hardware)

    @classmethod
    def from_tpm2(
        cls,
        key: StrPath | int,
        *,
        certificate: _CertificateSource,
        pin: bytes | str | None = None,
        module: StrPath | None = None,
    ) -> ClientIdentity:
        """An identity whose private key stays in a TPM 2.0.

        :param key: a TSS2 key file (``-----BEGIN TSS2 PRIVATE KEY-----``, made by
            ``openssl genpkey -provider tpm2`` or ``tpm2tss-genkey``), a persistent handle
            (``0x81000001`` or ``"handle:0x81000001"``), both through OpenSSL's ``tpm2``
            provider; or a ``pkcs11:`` URI of a tpm2-pkcs11 token (through the
            ``pkcs11`` engine and ``libtpm2_pkcs11``).
        :param certificate: the device certificate (and intermediates): a PEM file path,
            PEM data or a ``cryptography`` certificate.
        :param pin: the tpm2-pkcs11 token's user PIN (``pkcs11:`` keys only).
        :param module: the tpm2-pkcs11 library (``pkcs11:`` keys only).
        :raises HardwareKeyError: a subclass saying what is wrong.
        :raises FeatureUnavailableError: when this OpenSSL has no provider API (1.1.1).
        """
        if isinstance(key, str) and key[:7].lower() == "pkcs11:":
            from ..tls.hardware.engine import TPM2_PKCS11_MODULES

            chosen = module
            if chosen is None:
                chosen = next((m for m in TPM2_PKCS11_MODULES if os.path.isfile(m)), None)
                if chosen is None:
                    raise HardwareKeyError(
                        "the tpm2-pkcs11 module is not installed (apt-get install "
                        "libtpm2-pkcs11-1), or pass module=..."
                    )
            return cls.from_pkcs11(key, certificate=certificate, module=chosen, pin=pin)
        if pin is not None or module is not None:
            raise TypeError("pin= and module= apply to pkcs11: URIs of tpm2-pkcs11 tokens only")
        from ..tls.hardware import KeyRequest, backend

        chain = _certificate_chain(certificate)
        hardware = backend("tpm2").load_key(KeyRequest("tpm2", _tpm2_locator(key)))
        return cls(chain, hardware)

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
        return "RSA" if isinstance(self.certificate.public_key(), rsa.RSAPublicKey) else "EC"

    @property
    def key_location(self) -> str:
        """Where the private key is: ``"memory"``, or the hardware route and the key's
        name without any secret (``"pkcs11 engine pkcs11:token=...;type=private"``)."""
        hardware = _hardware_key(self._key)
        if hardware is None:
            return "memory"
        return f"{hardware.route} {hardware.description}"

    def _hardware_failure(self) -> BaseException | None:
        """After a failed handshake: the hardware's own error (token removed, key no
        longer signs), or None (software key, or the hardware key still works)."""
        hardware = _hardware_key(self._key)
        return None if hardware is None else hardware.diagnose()

    # -- loading into OpenSSL ---------------------------------------------------------

    def _load_hardware(self, ctx: ssl.SSLContext, hardware: HardwareKey) -> None:
        from ..tls._openssl import shim

        chain = [c.public_bytes(serialization.Encoding.DER) for c in self._chain]
        try:
            shim("hardware keys (PKCS#11, TPM 2.0)").use_hardware_key(ctx, chain, hardware.pkey)
        except FeatureUnavailableError:
            raise
        except OSError as exc:
            if "mismatch" in str(exc):
                raise KeyMismatchError(
                    f"OpenSSL says the device certificate does not belong to the key in "
                    f"{hardware.description} ({exc})"
                ) from None
            raise IdentityError(
                f"OpenSSL refused the device certificate or the key in "
                f"{hardware.description}: {exc}"
            ) from None
        # The context keeps the identity (and so the key, its engine or provider) alive.

    def _bundle(self, password: bytes) -> bytes:
        """The chain and the key re-encrypted under ``password``, as one PEM document."""
        parts: Iterable[bytes] = (c.public_bytes(serialization.Encoding.PEM) for c in self._chain)
        from ..tls.hardware import HardwareKey

        software = self._key
        if isinstance(software, HardwareKey):
            raise TypeError("a hardware key has no private bytes")
        key = software.private_bytes(
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

        A hardware key is installed as OpenSSL's key object instead (nothing is written).

        :raises IdentityError: when OpenSSL refuses the certificate or key.
        """
        hardware = _hardware_key(self._key)
        if hardware is not None:
            self._load_hardware(ctx, hardware)
            return
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
        where = "" if _hardware_key(self._key) is None else f", key_location={self.key_location!r}"
        return (
            f"ClientIdentity(device_id={self.device_id!r}, key_type={self.key_type!r}, "
            f"thumbprint_sha256={self.thumbprint_sha256!r}, chain_length={len(self._chain)}"
            f"{where})"
        )


# -- hardware keys -----------------------------------------------------------------------

_CertificateSource: TypeAlias = "StrPath | bytes | x509.Certificate | Sequence[x509.Certificate]"


def _is_hardware(key: object) -> bool:
    return type(key).__name__ == "HardwareKey" and hasattr(key, "public_der")


def _hardware_key(key: object) -> HardwareKey | None:
    if not _is_hardware(key):
        return None
    from ..tls.hardware import HardwareKey

    return key if isinstance(key, HardwareKey) else None


def _certificate_chain(source: object) -> list[x509.Certificate]:
    """The device certificate (and intermediates) from a path, PEM data or objects."""
    if isinstance(source, x509.Certificate):
        return [source]
    if isinstance(source, (list, tuple)):
        return list(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _load_certificates(bytes(source), "certificate")
    if isinstance(source, str) and "-----BEGIN" in source:
        return _load_certificates(source.encode("utf-8"), "certificate")
    if isinstance(source, (str, os.PathLike)):
        return _load_certificates(_read_file(source, "certificate"), repr(os.fspath(source)))
    raise TypeError(
        "certificate must be a PEM file path, PEM data or a cryptography x509.Certificate, "
        f"not {type(source).__name__}"
    )


_MAX_PIN_FILE = 4096


def _pin_bytes(pin: object, pin_value: str | None, pin_source: str | None) -> bytes | None:
    """The PIN as bytes: the argument, else the URI's pin-value, else pin-source's file.
    Nothing here ever puts the PIN in a message."""
    if pin is not None:
        if isinstance(pin, str):
            return pin.encode("utf-8")
        if isinstance(pin, (bytes, bytearray, memoryview)):
            return bytes(pin)
        raise TypeError(f"pin must be str or bytes, not {type(pin).__name__}")
    if pin_value is not None:
        return pin_value.encode("utf-8")
    if pin_source is not None:
        path = pin_source[5:] if pin_source.startswith("file:") else pin_source
        if pin_source.startswith(("|", "exec:")) or "://" in pin_source:
            raise HardwareKeyError(
                f"pin-source {pin_source!r} is not supported: use file:/path/to/pin-file"
            )
        data = pem.read_limited(path, "PIN file (pin-source)", _MAX_PIN_FILE, HardwareKeyError)
        return data.splitlines()[0] if data.strip() else b""
    return None


def _tpm2_locator(key: object) -> str:
    """``handle:0x81...`` for a persistent handle, else the key file's path."""
    if isinstance(key, bool):
        raise TypeError("key must be a TSS2 key file path or a persistent handle, not bool")
    if isinstance(key, int):
        handle = key
    elif isinstance(key, str) and key.lower().startswith(("handle:", "0x")):
        text = key.split(":", 1)[1] if key.lower().startswith("handle:") else key
        try:
            handle = int(text, 16 if text.lower().startswith("0x") else 10)
        except ValueError:
            raise HardwareKeyError(f"{key!r} is not a TPM handle (e.g. 0x81000001)") from None
    elif isinstance(key, (str, os.PathLike)):
        path = os.fspath(key)
        if not os.path.isfile(path):
            raise HardwareKeyError(
                f"the TSS2 key file {path!r} does not exist: create the key with "
                "'openssl genpkey -provider tpm2 -algorithm EC -pkeyopt group:P-256 -out FILE'"
            )
        return os.path.abspath(path)
    else:
        raise TypeError(
            f"key must be a TSS2 key file path or a persistent handle, not {type(key).__name__}"
        )
    if not 0x81000000 <= handle <= 0x81FFFFFF:
        raise HardwareKeyError(
            f"{handle:#x} is not a persistent TPM handle (0x81000000-0x81FFFFFF): make the "
            "key persistent with tpm2_evictcontrol, or pass its TSS2 key file"
        )
    return f"handle:{handle:#010x}"
