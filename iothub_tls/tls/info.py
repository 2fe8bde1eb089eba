"""What a connection negotiated: :class:`TlsInfo` and :func:`tls_info`.

The device-side mirror of IoT Hub's connection metrics and diagnostic logs
(``tlsVersion``, cipher suite), plus what only the device can see: the server's key,
the root that anchored the verified chain, the fragment length and resumption.
"""

from __future__ import annotations

import ssl
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..errors import FeatureUnavailableError
from ..policy import iana_name
from ..roots import common_name
from ._openssl import shim

if TYPE_CHECKING:
    from cryptography import x509

__all__ = ["TlsInfo", "tls_info"]

# _ssl.ENCODING_DER (the argument of _ssl.Certificate.public_bytes); ssl exports no name
_ENCODING_DER: int = getattr(ssl, "_ssl").ENCODING_DER  # noqa: B009


@dataclass(frozen=True)
class TlsInfo:
    """The negotiated parameters of one TLS connection."""

    #: "TLSv1.2" or "TLSv1.3"
    version: str
    #: OpenSSL name of the cipher suite, e.g. "ECDHE-ECDSA-AES128-GCM-SHA256"
    cipher: str
    #: IANA name, e.g. "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"
    iana_cipher: str
    #: "EC" or "RSA" (the server leaf certificate's key)
    server_key_type: str
    server_key_bits: int
    #: subject CN of the root that anchored the verified chain (None if unknown)
    anchor: str | None
    #: subject CNs of the verified chain, leaf first, root last
    chain: tuple[str, ...]
    #: the server name sent in SNI (and checked against the certificate)
    sni: str | None
    #: negotiated RFC 6066 max fragment length in bytes, or None
    max_fragment_length: int | None
    session_reused: bool

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["chain"] = list(self.chain)
        return data

    def __str__(self) -> str:
        mfl = f", max fragment {self.max_fragment_length}" if self.max_fragment_length else ""
        resumed = ", resumed" if self.session_reused else ""
        return (
            f"{self.version} {self.iana_cipher}, server key {self.server_key_type}-"
            f"{self.server_key_bits}, anchored at {self.anchor or 'unknown root'}"
            f"{mfl}{resumed}"
        )


def key_description(cert: x509.Certificate) -> tuple[str, int]:
    """("EC"|"RSA"|other, bits) of a certificate's public key."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC", key.curve.key_size
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA", key.key_size
    return type(key).__name__.replace("PublicKey", "").replace("_", ""), 0


def chain_to_der(items: Any) -> list[bytes] | None:
    """DER of each certificate of a chain as Python hands it out: DER ``bytes`` (what
    ``SSLSocket.get_verified_chain()`` returns from Python 3.13 on) or certificate
    objects with ``public_bytes`` (``_ssl.Certificate``, what the C-level method returns
    since 3.10). None when an item is neither, so the caller can try another source."""
    if items is None:
        return None
    out: list[bytes] = []
    for item in items:
        if isinstance(item, bytes | bytearray | memoryview):
            out.append(bytes(item))
            continue
        public_bytes = getattr(item, "public_bytes", None)
        if not callable(public_bytes):
            return None
        der = public_bytes(_ENCODING_DER)
        if not isinstance(der, bytes):
            return None
        out.append(der)
    return out


def verified_chain_der(sslobj: ssl.SSLSocket | ssl.SSLObject) -> list[bytes] | None:
    """DER of the verified chain (leaf first, anchor last), or None where it cannot be
    read. Tried in turn: the public ``get_verified_chain()`` (Python 3.13+), the
    ``_ssl`` object's own ``get_verified_chain()`` (Python 3.10+), the OpenSSL shim."""
    getters = (
        getattr(sslobj, "get_verified_chain", None),
        getattr(getattr(sslobj, "_sslobj", None), "get_verified_chain", None),
    )
    for getter in getters:
        if not callable(getter):
            continue
        try:
            chain = chain_to_der(getter())
        except (OSError, ValueError, TypeError, AttributeError):  # ssl.SSLError is OSError
            chain = None
        if chain:
            return chain
    try:
        return shim("reading the verified chain").verified_chain(sslobj)
    except (FeatureUnavailableError, OSError):
        return None


def negotiated_fragment_length(sslobj: ssl.SSLSocket | ssl.SSLObject) -> int | None:
    try:
        return shim("reading the max fragment length").negotiated_max_fragment_length(sslobj)
    except (FeatureUnavailableError, OSError):
        return None


# OpenSSL's EVP_PKEY base ids (openssl/obj_mac.h: NID_rsaEncryption, NID_X9_62_id_ecPublicKey)
_KEY_TYPES = {6: "RSA", 408: "EC"}


def _subject_cn(subject: Any) -> str | None:
    """The first commonName of a subject as ``_ssl`` decodes it (RDNs of pairs)."""
    for rdn in subject:
        for name, value in rdn:
            if name == "commonName" and isinstance(value, str):
                return value
    return None


def _described_natively(
    sslobj: ssl.SSLSocket | ssl.SSLObject,
) -> tuple[str, int, tuple[str, ...]] | None:
    """(key type, key bits, chain names) without a certificate parser: the key from
    libssl through the shim, the names from ``_ssl``'s own decoding of the verified
    chain (``_ssl.Certificate.get_info()``, Python 3.10+). None whenever anything is
    out of the ordinary (a key other than RSA or EC, a certificate without a CN or with
    a non-ASCII one, no verified chain): the caller parses the certificates then, so
    the report is the same either way."""
    try:
        key = shim("describing the server's key").peer_key(sslobj)
    except (FeatureUnavailableError, OSError):
        return None
    if key is None or key[0] not in _KEY_TYPES:
        return None
    getter = getattr(getattr(sslobj, "_sslobj", None), "get_verified_chain", None)
    if not callable(getter):
        return None
    try:
        certificates = getter()
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    names = []
    for certificate in certificates or ():
        get_info = getattr(certificate, "get_info", None)
        if not callable(get_info):
            return None
        try:
            name = _subject_cn(get_info().get("subject", ()))
        except (OSError, ValueError, TypeError, AttributeError):
            return None
        if name is None or not name.isascii():
            return None
        names.append(name)
    if not names:
        return None
    return _KEY_TYPES[key[0]], key[1], tuple(names)


def inspect_connection(sslobj: ssl.SSLSocket | ssl.SSLObject) -> TlsInfo:
    """Build a :class:`TlsInfo` from a live, handshaken TLS socket or object."""
    version = sslobj.version()
    cipher = sslobj.cipher()
    der = sslobj.getpeercert(binary_form=True)
    if version is None or cipher is None or not der:
        raise ValueError("the TLS handshake has not completed on this connection")
    described = _described_natively(sslobj)
    if described is not None:
        # What OpenSSL and _ssl already decoded: a device does not load a certificate
        # parser (tens of milliseconds of start-up) to describe its connection.
        key_type, key_bits, chain = described
        anchor: str | None = chain[-1]  # a verified chain ends at its trust anchor
    else:
        # The certificate parser is imported here, when needed, not with the package.
        from cryptography import x509

        leaf = x509.load_der_x509_certificate(der)
        key_type, key_bits = key_description(leaf)
        chain_der = verified_chain_der(sslobj) or []
        chain = tuple(common_name(x509.load_der_x509_certificate(c)) for c in chain_der)
        # OpenSSL's verified chain always ends at the trust anchor that verified it.
        anchor = chain[-1] if chain else None
        chain = chain or (common_name(leaf),)
    return TlsInfo(
        version=version,
        cipher=cipher[0],
        iana_cipher=iana_name(cipher[0]),
        server_key_type=key_type,
        server_key_bits=key_bits,
        anchor=anchor,
        chain=chain,
        sni=sslobj.server_hostname,
        max_fragment_length=negotiated_fragment_length(sslobj),
        session_reused=bool(sslobj.session_reused),
    )


def resumed_info(sslobj: ssl.SSLSocket | ssl.SSLObject, created: TlsInfo) -> TlsInfo:
    """The :class:`TlsInfo` of a connection that resumed the session whose first
    handshake ``created`` describes: a resumed handshake exchanges no certificate, so
    the server's key, the chain and the anchor are ``created``'s (the session holds that
    handshake's certificate); version, suite, fragment length and name are read here."""
    version = sslobj.version()
    cipher = sslobj.cipher()
    if version is None or cipher is None:
        raise ValueError("the TLS handshake has not completed on this connection")
    return TlsInfo(
        version=version,
        cipher=cipher[0],
        iana_cipher=iana_name(cipher[0]),
        server_key_type=created.server_key_type,
        server_key_bits=created.server_key_bits,
        anchor=created.anchor,
        chain=created.chain,
        sni=sslobj.server_hostname,
        max_fragment_length=negotiated_fragment_length(sslobj),
        session_reused=True,
    )


def _unwrap(obj: Any) -> Any:
    """Find the SSLSocket / SSLObject inside the objects users hold."""
    for _ in range(4):
        if isinstance(obj, ssl.SSLSocket | ssl.SSLObject):
            return obj
        owner = getattr(obj, "owner", None)  # a bare _ssl._SSLSocket (httpx's sync client)
        if isinstance(owner, ssl.SSLSocket | ssl.SSLObject):
            return owner
        cached = getattr(obj, "tls_info", None)
        if isinstance(cached, TlsInfo):
            return cached
        get_extra = getattr(obj, "get_extra_info", None)  # asyncio transports / streams
        if callable(get_extra):
            found = get_extra("ssl_object")
            if found is not None:
                obj = found
                continue
        for attr in ("sock", "_sock", "socket"):  # urllib3 connections, paho clients
            inner = getattr(obj, attr, None)
            if callable(inner) and attr == "socket":
                inner = inner()
            if inner is not None and inner is not obj:
                obj = inner
                break
        else:
            break
    return obj


def tls_info(obj: Any) -> TlsInfo:
    """The :class:`TlsInfo` of a connection.

    Accepts an ``ssl.SSLSocket`` or ``ssl.SSLObject`` (from any context), an asyncio
    transport or stream writer, a urllib3 connection, a paho client or one of this
    package's device clients. Connections made through a hardened context return the
    report captured right after their handshake.
    """
    target = _unwrap(obj)
    if isinstance(target, TlsInfo):
        return target
    if not isinstance(target, ssl.SSLSocket | ssl.SSLObject):
        raise TypeError(f"no TLS connection found in {type(obj).__name__}")
    cached = target.__dict__.get("_iothub_tls_info")
    if isinstance(cached, TlsInfo):
        return cached
    return inspect_connection(target)
