"""The hub TLS profile: what the local compliance endpoint's TLS looks like to a device.

One immutable value, :class:`HubTlsProfile`, describes the server side of every front
door (HTTPS, AMQP, MQTT): TLS versions, cipher suites taken from the single table in
:mod:`iothub_tls.policy`, the server certificate(s) — RSA, ECDSA, or both as IoT Hub
serves them — and whether device certificates are requested. ``server_context()``
turns it into an ``ssl.SSLContext``; ``describe()`` says in one line what it is.

By default the profile is what IoT Hub serves today (TLS 1.2+, the eight recommended
suites). It can deliberately be made weaker to simulate a hub from before 2025-08-31
(``min_version=TLSv1``, ``legacy_ciphers=True``), so devices can be shown refusing it.

:func:`peer_tls` reads what a server-side handshake established about a device
(version, suite, SNI, the device certificate and its verified chain).
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from ..auth import ClientIdentity, StrPath
from ..errors import FeatureUnavailableError, IdentityError, PolicyError
from ..policy import STRONG_SUITES, WEAK_SUITES, CipherSuite, iana_name
from ..roots import common_name
from ..tls._openssl import shim
from ..tls.info import key_description, verified_chain_der
from .registry import certificate_thumbprints

logger = logging.getLogger("iothub_tls.hub")

__all__ = [
    "HubTlsProfile",
    "PeerTls",
    "ServerCredential",
    "peer_tls",
    "sni_of",
]

# RFC 7919 ffdhe2048: the DHE suites of a simulated legacy hub need a DH group, and
# this standard group is the only one OpenSSL 3 accepts without complaint.
_FFDHE2048 = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

_VERSIONS = (
    ssl.TLSVersion.TLSv1,
    ssl.TLSVersion.TLSv1_1,
    ssl.TLSVersion.TLSv1_2,
    ssl.TLSVersion.TLSv1_3,
)
_VERSION_TEXT = {
    ssl.TLSVersion.TLSv1: "1.0",
    ssl.TLSVersion.TLSv1_1: "1.1",
    ssl.TLSVersion.TLSv1_2: "1.2",
    ssl.TLSVersion.TLSv1_3: "1.3",
}
_VERSION_NAME = {
    ssl.TLSVersion.TLSv1: "TLSv1",
    ssl.TLSVersion.TLSv1_1: "TLSv1.1",
    ssl.TLSVersion.TLSv1_2: "TLSv1.2",
    ssl.TLSVersion.TLSv1_3: "TLSv1.3",
}
_SNI_ATTR = "_iothub_endpoint_sni"
_RSA_FIRST_SIGALGS = (
    "RSA-PSS+SHA256:RSA-PSS+SHA384:RSA-PSS+SHA512:RSA+SHA256:RSA+SHA384:RSA+SHA512:"
    "ECDSA+SHA256:ECDSA+SHA384:ECDSA+SHA512"
)


@dataclass(frozen=True)
class ServerCredential:
    """A server certificate (leaf first, then intermediates) with its private key.

    Validated when built (the key must match the leaf; RSA 2048+ or EC P-256+), loaded
    into OpenSSL without writing the plaintext key to disk.
    """

    identity: ClientIdentity = field(repr=False)

    @classmethod
    def from_pem(
        cls, cert_chain_pem: bytes | str, key_pem: bytes | str, password: bytes | str | None = None
    ) -> ServerCredential:
        try:
            return cls(ClientIdentity.from_pem(cert_chain_pem, key_pem, password))
        except IdentityError as exc:
            raise PolicyError(f"unusable server certificate: {exc}") from exc

    @classmethod
    def from_files(
        cls, certfile: StrPath, keyfile: StrPath | None = None, password: bytes | str | None = None
    ) -> ServerCredential:
        try:
            return cls(ClientIdentity.from_files(certfile, keyfile, password))
        except IdentityError as exc:
            raise PolicyError(f"unusable server certificate: {exc}") from exc

    @property
    def certificate(self) -> x509.Certificate:
        return self.identity.certificate

    @property
    def key_type(self) -> str:
        """ "RSA" or "EC"."""
        return self.identity.key_type

    @property
    def key_bits(self) -> int:
        return key_description(self.certificate)[1]

    @property
    def dns_names(self) -> tuple[str, ...]:
        try:
            san = self.certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
        except x509.ExtensionNotFound:
            return ()
        return tuple(san.get_values_for_type(x509.DNSName))

    def describe(self) -> str:
        kind = "ECDSA" if self.key_type == "EC" else "RSA"
        return f"{kind}-{self.key_bits} ({common_name(self.certificate)})"

    def __repr__(self) -> str:
        return f"ServerCredential({self.describe()})"


@dataclass(frozen=True)
class HubTlsProfile:
    """The server-side TLS of a (simulated) IoT Hub.

    :param certificates: one RSA and/or one ECDSA :class:`ServerCredential`. With both
        ("dual"), OpenSSL picks per handshake the one the device can verify, as IoT Hub
        does: ECC-only devices get the ECDSA certificate.
    :param min_version: TLS 1.2 (IoT Hub today) or 1.3; TLS 1.0/1.1 simulate a hub from
        before the 2025-08-31 retirement.
    :param max_version: None for the newest (TLS 1.3); TLSv1_1 makes a hub devices must
        refuse.
    :param strong_ciphers: serve IoT Hub's eight recommended TLS 1.2 suites.
    :param legacy_ciphers: also serve the ten weak suites legacy hubs accepted.
        (``strong_ciphers=False, legacy_ciphers=True`` simulates a server with only weak
        suites.) TLS 1.3 suites are OpenSSL's defaults, all AEAD.
    :param client_ca_pem: CA certificates (PEM) for device certificates. When given,
        devices are asked for a certificate (optional: SAS devices send none), and a
        certificate that does not chain to these CAs fails the handshake. A
        self-signed device certificate can be listed here as its own anchor.
    """

    certificates: tuple[ServerCredential, ...]
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion | None = None
    strong_ciphers: bool = True
    legacy_ciphers: bool = False
    client_ca_pem: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        creds = self.certificates
        if isinstance(creds, ServerCredential):
            creds = (creds,)
        creds = tuple(creds)
        object.__setattr__(self, "certificates", creds)
        if not creds or not all(isinstance(c, ServerCredential) for c in creds):
            raise PolicyError(
                "certificates must be one or two ServerCredential values (an RSA and/or "
                "an ECDSA certificate with its key)"
            )
        kinds = [c.key_type for c in creds]
        if len(set(kinds)) != len(kinds):
            raise PolicyError(
                "give at most one RSA and one ECDSA certificate: OpenSSL keeps one "
                f"certificate per key type (got {', '.join(kinds)})"
            )
        if self.min_version not in _VERSIONS:
            raise PolicyError(
                f"min_version must be ssl.TLSVersion.TLSv1, TLSv1_1, TLSv1_2 or TLSv1_3, "
                f"not {self.min_version!r}"
            )
        if self.max_version is not None:
            if self.max_version not in _VERSIONS:
                raise PolicyError(
                    f"max_version must be None or a TLSVersion from TLSv1 to TLSv1_3, "
                    f"not {self.max_version!r}"
                )
            if self.max_version < self.min_version:
                raise PolicyError(
                    f"max_version {self.max_version.name} is below min_version "
                    f"{self.min_version.name}: no TLS version would be left"
                )
        if not (self.strong_ciphers or self.legacy_ciphers):
            raise PolicyError(
                "no TLS 1.2 cipher suites: set strong_ciphers=True (IoT Hub's) and/or "
                "legacy_ciphers=True"
            )
        if self.client_ca_pem is not None:
            pem = self.client_ca_pem
            if isinstance(pem, str):
                pem = pem.encode("ascii")
                object.__setattr__(self, "client_ca_pem", pem)
            try:
                certs = x509.load_pem_x509_certificates(pem)
            except ValueError as exc:
                raise PolicyError(f"client_ca_pem holds no usable certificate: {exc}") from None
            if not certs:
                raise PolicyError("client_ca_pem holds no certificate")

    # -- what it is ---------------------------------------------------------------------

    @property
    def server_key(self) -> str:
        """ "RSA", "ECDSA" or "dual"."""
        kinds = {c.key_type for c in self.certificates}
        if kinds == {"RSA", "EC"}:
            return "dual"
        return "ECDSA" if kinds == {"EC"} else "RSA"

    @property
    def cipher_suites(self) -> tuple[CipherSuite, ...]:
        """The TLS 1.2 suites served (those a certificate of the profile can serve)."""
        kinds = {"ECDSA" if c.key_type == "EC" else "RSA" for c in self.certificates}
        chosen = (STRONG_SUITES if self.strong_ciphers else ()) + (
            WEAK_SUITES if self.legacy_ciphers else ()
        )
        return tuple(s for s in chosen if s.authentication in kinds)

    @property
    def legacy(self) -> bool:
        """True when the profile accepts something IoT Hub's policy forbids."""
        return self.min_version < ssl.TLSVersion.TLSv1_2 or self.legacy_ciphers

    @property
    def requests_client_certificates(self) -> bool:
        return self.client_ca_pem is not None

    @property
    def versions(self) -> tuple[str, ...]:
        """The versions served, named as ``ssl.SSLSocket.version()`` names them."""
        top = self.max_version or ssl.TLSVersion.TLSv1_3
        return tuple(_VERSION_NAME[v] for v in _VERSIONS if self.min_version <= v <= top)

    def describe(self) -> str:
        """One line for logs: versions, suites, certificates, client certificates."""
        top = self.max_version or ssl.TLSVersion.TLSv1_3
        low, high = _VERSION_TEXT[self.min_version], _VERSION_TEXT[top]
        versions = f"TLS {low}" if low == high else f"TLS {low}-{high}"
        if self.strong_ciphers and self.legacy_ciphers:
            suites = f"strong + {len(WEAK_SUITES)} weak suites"
        elif self.legacy_ciphers:
            suites = "weak suites only"
        else:
            suites = "strong suites only"
        certs = " + ".join(c.describe() for c in self.certificates)
        clients = (
            "device certificates requested"
            if self.requests_client_certificates
            else "no device certificates"
        )
        verdict = "LEGACY (not IoT Hub compliant)" if self.legacy else "IoT Hub policy"
        return f"{verdict}: {versions}, {suites}, server {self.server_key}: {certs}; {clients}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "versions": list(self.versions),
            "cipherSuites": [s.iana for s in self.cipher_suites],
            "serverKey": self.server_key,
            "certificates": [c.describe() for c in self.certificates],
            "clientCertificates": self.requests_client_certificates,
            "legacy": self.legacy,
        }

    # -- the context --------------------------------------------------------------------

    def server_context(self) -> ssl.SSLContext:
        """A new server ``ssl.SSLContext`` for this profile. It records the SNI each
        client sent (read it with :func:`peer_tls`)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():
            # TLS 1.0/1.1 are deprecated in Python: here they are simulated on purpose.
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = self.min_version
            ctx.maximum_version = self.max_version or ssl.TLSVersion.MAXIMUM_SUPPORTED
        # No compression (CRIME), no client-initiated renegotiation; the server picks the
        # suite in its own order (strong first), as IoT Hub does.
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        # Like IoT Hub, present the RSA certificate unless the device accepts only ECDSA:
        # RSA suites first in the server's order (TLS 1.2) and RSA signature algorithms
        # first (TLS 1.3, where the signature algorithm picks the certificate).
        served = sorted(
            self.cipher_suites or STRONG_SUITES, key=lambda s: s.authentication != "RSA"
        )
        suites = [s.openssl for s in served]
        # OpenSSL 3 speaks TLS 1.0/1.1 and the RSA key-exchange suites only at
        # security level 0; IoT Hub's own profile runs at level 2.
        level = 0 if self.legacy else 2
        ctx.set_ciphers(":".join(suites) + f":@SECLEVEL={level}")
        if self.server_key == "dual":
            try:
                shim("the hub's signature algorithm order").set_sigalgs(ctx, _RSA_FIRST_SIGALGS)
            except (FeatureUnavailableError, OSError) as exc:
                logger.warning("dual certificate: OpenSSL's own order applies (%s)", exc)
        if self.legacy_ciphers:
            _load_dh_group(ctx)
        for cred in self.certificates:
            cred.identity._load_into(ctx)
        if self.client_ca_pem is not None:
            ctx.load_verify_locations(cadata=self.client_ca_pem.decode("ascii"))
            ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.sni_callback = _remember_sni
        return ctx


def _load_dh_group(ctx: ssl.SSLContext) -> None:
    fd, path = tempfile.mkstemp(prefix="iothub-tls-dh-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(_FFDHE2048)
        ctx.load_dh_params(path)
    finally:
        os.unlink(path)


def _remember_sni(sslobj: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
    if name is not None:
        try:
            vars(sslobj)[_SNI_ATTR] = name
        except TypeError:  # an object without a __dict__: nothing to remember on
            pass


@dataclass(frozen=True)
class PeerTls:
    """What the server saw of one device's TLS connection."""

    version: str
    cipher: str
    iana_cipher: str
    sni: str | None
    #: The device certificate's thumbprints (upper-case hex), None without one.
    client_thumbprint_sha1: str | None = None
    client_thumbprint_sha256: str | None = None
    #: Subject CN of the device certificate.
    client_subject: str | None = None
    #: The device's chain as verified by TLS (DER, leaf first); empty without a
    #: certificate, just the leaf where the verified chain cannot be read.
    client_chain: tuple[bytes, ...] = field(default=(), repr=False)
    session_reused: bool = False


def sni_of(sock: ssl.SSLSocket | ssl.SSLObject) -> str | None:
    """The server name the client sent (SNI), recorded during the handshake — also
    after a failed one."""
    found = vars(sock).get(_SNI_ATTR)
    return found if isinstance(found, str) else None


def peer_tls(sock: ssl.SSLSocket | ssl.SSLObject) -> PeerTls:
    """Read a completed server-side handshake."""
    version = sock.version() or "unknown"
    cipher = sock.cipher()
    name = cipher[0] if cipher else "unknown"
    leaf = sock.getpeercert(binary_form=True)
    sha1 = sha256 = subject = None
    chain: tuple[bytes, ...] = ()
    if leaf:
        sha1, sha256 = certificate_thumbprints(leaf)
        subject = common_name(x509.load_der_x509_certificate(leaf))
        chain = tuple(verified_chain_der(sock) or [leaf])
    return PeerTls(
        version=version,
        cipher=name,
        iana_cipher=iana_name(name),
        sni=sni_of(sock),
        client_thumbprint_sha1=sha1,
        client_thumbprint_sha256=sha256,
        client_subject=subject,
        client_chain=chain,
        session_reused=bool(sock.session_reused),
    )
