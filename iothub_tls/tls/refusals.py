"""Handshake refusals that explain themselves: OpenSSL's failure, translated into the
matching :mod:`iothub_tls.errors` class with the rule that was broken and what to do.

The hardened socket and object call :func:`explain_handshake_error` at the boundary
(``do_handshake``) and chain the result to the original :mod:`ssl` exception.
"""

from __future__ import annotations

import ssl

from ..errors import (
    CertificateVerificationError,
    CipherSuiteError,
    HandshakeClosedError,
    HandshakeTimeoutError,
    ProtocolVersionError,
    TLSHandshakeError,
)
from ..policy import CipherProfile, TlsPolicy, iana_name

__all__ = ["explain_handshake_error"]


_VERSION_REASONS = {
    "UNSUPPORTED_PROTOCOL",
    "TLSV1_ALERT_PROTOCOL_VERSION",
    "WRONG_SSL_VERSION",
    "NO_PROTOCOLS_AVAILABLE",
    "VERSION_TOO_LOW",
}
_CIPHER_REASONS = {
    "SSLV3_ALERT_HANDSHAKE_FAILURE",
    "NO_SHARED_CIPHER",
    "NO_CIPHERS_AVAILABLE",
    "NO_SUITABLE_SIGNATURE_ALGORITHM",
    "NO_SHARED_SIGNATURE_ALGORITHMS",
    "TLSV1_ALERT_INSUFFICIENT_SECURITY",
    "WRONG_CIPHER_RETURNED",
}
_CLOSED_REASONS = {"UNEXPECTED_EOF_WHILE_READING", "EOF"}
_NOT_TLS_REASONS = {
    "WRONG_VERSION_NUMBER",
    "HTTP_REQUEST",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
}
# Alerts a server sends when it refuses the device's own certificate (mutual TLS).
_CLIENT_CERT_REASONS = {
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "TLSV1_ALERT_ACCESS_DENIED",
}

# OpenSSL X509_V_ERR_* codes -> what to do about them
_VERIFY_REMEDIES = {
    9: "the certificate is not valid yet: check the device clock (NTP) before anything else",
    10: "the certificate has expired: check the device clock (NTP); if the clock is right "
    "the server's certificate must be renewed",
    18: "the server presented a self-signed certificate that is not one of the pinned roots",
    19: "the chain ends at a root that is not pinned: if the hub migrated roots, add the new "
    "root with TlsPolicy(roots=...), no code change needed",
    20: "the chain does not lead to a pinned root (or the server did not send its "
    "intermediate certificates): if the hub migrated roots, add the new root with "
    "TlsPolicy(roots=...)",
    21: "the server sent an incomplete chain (a missing intermediate certificate): the "
    "server must send its intermediates",
    62: "the certificate does not match the host name: connect to the name the hub's "
    "certificate is issued for (e.g. <hub>.azure-devices.net), never an IP address",
    66: "the server's key is too weak (IoT Hub uses RSA 2048+ or ECDSA P-256+)",
    67: "the server's CA key is too weak",
    68: "the chain uses a weak signature digest (SHA-1 or MD5)",
}


def explain_handshake_error(
    exc: BaseException, policy: TlsPolicy, host: str | None, *, agreed: str | None = None
) -> BaseException:
    """Translate an ssl handshake failure into the matching :mod:`iothub_tls.errors`
    class, keeping OpenSSL's reason and adding the rule and the remedy. ``agreed`` is the
    suite the server chose before failing, if it got that far."""
    where = f"TLS handshake with {host}" if host else "TLS handshake"
    reason = getattr(exc, "reason", None) or ""
    original = getattr(exc, "verify_message", None) or str(exc)
    errno = getattr(exc, "errno", None)
    new: OSError
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        remedy = _VERIFY_REMEDIES.get(code, "the server certificate chain could not be verified")
        new = CertificateVerificationError(
            errno,
            # keeps OpenSSL's reason code: tools that sort failures by it still can
            f"{where} failed: certificate verify failed (CERTIFICATE_VERIFY_FAILED): "
            f"{exc.verify_message} "
            f"(OpenSSL verify code {code}); {remedy}. Pinned roots: "
            f"{', '.join(policy.roots.common_names)}",
        )
        new.verify_code = code
        new.verify_message = exc.verify_message
    elif isinstance(exc, TimeoutError):
        new = HandshakeTimeoutError(
            errno,
            f"{where} did not complete in time ({original}): the server accepted the TCP "
            "connection but did not finish the handshake. Check that the port speaks TLS "
            "and that no proxy or firewall holds the connection",
        )
    elif reason in _VERSION_REASONS:
        new = ProtocolVersionError(
            errno,
            f"{where} failed: the server does not accept TLS 1.2 or later ({reason}). IoT Hub "
            "policy requires TLS 1.2 or later (TLS 1.0 and 1.1 were retired on "
            "2025-08-31); this device never offers older versions. Upgrade the server "
            "or gateway to TLS 1.2+",
        )
    elif reason in _CIPHER_REASONS and agreed:
        # The server chose a suite, then ended the handshake: not a cipher problem.
        new = TLSHandshakeError(
            errno,
            f"{where} failed: the server agreed on {iana_name(agreed)} and then ended the "
            f"handshake ({reason}): it most likely requires a device certificate that was not "
            "presented or that it does not accept. Pass the registered certificate as "
            "identity=ClientIdentity.from_files(...)",
        )
    elif reason in _CIPHER_REASONS:
        if policy.ciphers is CipherProfile.ECC_ONLY:
            rule = (
                "ECC-only mode needs an ECDSA certificate from the server: this device "
                "offers only the ECDHE-ECDSA suites "
                f"({', '.join(s.iana for s in policy.cipher_suites)}) and ECDSA signatures "
                "in TLS 1.3. Use CipherProfile.STRONG if the server has only an RSA "
                "certificate"
            )
        else:
            rule = (
                "this device offers only IoT Hub's recommended cipher suites "
                f"({', '.join(s.iana for s in policy.cipher_suites)}) and the server "
                "accepts none of them. The server must enable ECDHE with AES-GCM or "
                "AES-CBC-SHA2 suites"
            )
        new = CipherSuiteError(
            errno, f"{where} failed: no cipher suite in common ({reason}); {rule}"
        )
    elif isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError) or reason in _CLOSED_REASONS:
        new = HandshakeClosedError(
            errno,
            f"{where} failed: the server closed the connection during the handshake "
            f"({original}). A server that only speaks TLS 1.0/1.1, accepts none of IoT Hub's "
            "recommended suites, or requires a client certificate may do this",
        )
    elif isinstance(exc, ConnectionResetError | BrokenPipeError):
        new = HandshakeClosedError(
            errno,
            f"{where} failed: the server reset the connection during the handshake "
            f"({original}). A server that only speaks TLS 1.0/1.1 or refuses every "
            "suite this device offers may do this; so may a firewall",
        )
    elif reason in _NOT_TLS_REASONS:
        new = TLSHandshakeError(
            errno,
            f"{where} failed: the server did not answer with TLS ({reason}): check the port "
            "(IoT Hub: 8883 MQTT, 5671 AMQP, 443 HTTPS and WebSockets) and that no proxy "
            "intercepts the connection",
        )
    elif reason in _CLIENT_CERT_REASONS:
        new = TLSHandshakeError(
            errno,
            f"{where} failed: the server refused this device's certificate ({reason}). "
            "Register the device's certificate (its thumbprint, or the CA that issued it) "
            "with the hub, check it has not expired, and pass it as "
            "identity=ClientIdentity.from_files(...)",
        )
    elif isinstance(exc, ssl.SSLError):
        new = TLSHandshakeError(errno, f"{where} failed: {original}")
    else:
        return exc
    # keep OpenSSL's fields, as ssl.SSLError carries them
    vars(new).update(reason=reason or None, library=getattr(exc, "library", None))
    return new
