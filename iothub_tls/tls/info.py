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


def inspect_connection(sslobj: ssl.SSLSocket | ssl.SSLObject) -> TlsInfo:
    """Build a :class:`TlsInfo` from a live, handshaken TLS socket or object."""
    version = sslobj.version()
    cipher = sslobj.cipher()
    der = sslobj.getpeercert(binary_form=True)
    if version is None or cipher is None or not der:
        raise ValueError("the TLS handshake has not completed on this connection")
    # The certificate parser is imported here, on the first report, not with the package:
    # a device pays for it once it has a connection to describe.
    from cryptography import x509

    leaf = x509.load_der_x509_certificate(der)
    key_type, key_bits = key_description(leaf)
    chain_der = verified_chain_der(sslobj) or []
    chain = tuple(common_name(x509.load_der_x509_certificate(c)) for c in chain_der)
    return TlsInfo(
        version=version,
        cipher=cipher[0],
        iana_cipher=iana_name(cipher[0]),
        server_key_type=key_type,
        server_key_bits=key_bits,
        # OpenSSL's verified chain always ends at the trust anchor that verified it.
        anchor=chain[-1] if chain else None,
        chain=chain or (common_name(leaf),),
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
