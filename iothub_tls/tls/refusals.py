"""Refusals that explain themselves: OpenSSL's failure, translated into the matching
:mod:`iothub_tls.errors` class with the rule that was broken and what to do.

The explanations are data: each row of :data:`TLS_REFUSALS` (a :class:`Refusal`) says how
a refusal shows (the OpenSSL reasons or verify code that select it), what the message
says happened, its cause and its fix. :func:`explain_handshake_error` builds its messages
from these rows, and the documentation's troubleshooting page is rendered from the same
rows, so the two cannot drift. The MQTT CONNACK codes
(:data:`iothub_tls.mqtt.conventions.CONNACK_REFUSALS`) and the HTTPS statuses
(:data:`iothub_tls.https.conventions.HTTP_REFUSALS`) are tables of the same rows.

The hardened socket and object call :func:`explain_handshake_error` at the boundary
(``do_handshake``) and chain the result to the original :mod:`ssl` exception.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from ..errors import (
    CertificateVerificationError,
    CipherSuiteError,
    HandshakeClosedError,
    HandshakeTimeoutError,
    PolicyViolation,
    ProtocolVersionError,
    TLSHandshakeError,
)
from ..policy import CipherProfile, TlsPolicy, iana_name

__all__ = ["TLS_REFUSALS", "Refusal", "explain_handshake_error", "policy_violation"]


@dataclass(frozen=True)
class Refusal:
    """One row of a refusal table: how a refusal is recognised, what the message says
    happened, why it happens and what to do.

    :ivar key: the row's name, unique in its table (the anchor on the documentation page).
    :ivar signals: what selects the row, as the peer or OpenSSL shows it: OpenSSL reason
        codes (``TLSV1_ALERT_PROTOCOL_VERSION``), verify error names, ``CONNACK 5``,
        ``HTTP 401``.
    :ivar error: the exception class raised.
    :ivar says: what happened, as the message says it (lower case: it follows a colon).
    :ivar cause: why it happens (a sentence).
    :ivar fix: what to do about it (a sentence).
    :ivar code: the number that selects the row, where there is one: the OpenSSL verify
        code, the CONNACK return code, the HTTP status.
    :ivar when: the condition that tells rows with the same signals apart.
    :ivar exceptions: the Python exceptions that select the row, besides ``signals``.
    :ivar retryable: whether the clients try again (with their back-off) after it; said
        by the CONNACK and HTTP tables, whose clients act on it.
    """

    key: str
    signals: tuple[str, ...]
    error: type[Exception]
    says: str
    cause: str
    fix: str
    code: int | None = None
    when: str = ""
    exceptions: tuple[type[BaseException], ...] = ()
    retryable: bool = False

    def explain(self) -> str:
        """The cause and the fix, as the messages end."""
        return f"{self.cause}. {self.fix}"


_CIPHER_SIGNALS = (
    "SSLV3_ALERT_HANDSHAKE_FAILURE",
    "NO_SHARED_CIPHER",
    "NO_CIPHERS_AVAILABLE",
    "NO_SUITABLE_SIGNATURE_ALGORITHM",
    "NO_SHARED_SIGNATURE_ALGORITHMS",
    "TLSV1_ALERT_INSUFFICIENT_SECURITY",
    "WRONG_CIPHER_RETURNED",
)
_PROBE = "Run iothub-tls probe HOST:PORT to see which versions and suites the server accepts"

#: Every handshake refusal the library explains, in the order the page presents them.
TLS_REFUSALS: tuple[Refusal, ...] = (
    Refusal(
        key="protocol-version",
        signals=(
            "UNSUPPORTED_PROTOCOL",
            "TLSV1_ALERT_PROTOCOL_VERSION",
            "WRONG_SSL_VERSION",
            "NO_PROTOCOLS_AVAILABLE",
            "VERSION_TOO_LOW",
        ),
        error=ProtocolVersionError,
        says="the server does not accept TLS 1.2 or later",
        cause="IoT Hub policy requires TLS 1.2 or later (TLS 1.0 and 1.1 were retired on "
        "2025-08-31); this device never offers older versions",
        fix="Upgrade the server or gateway to TLS 1.2+",
    ),
    Refusal(
        key="certificate-expected",
        signals=_CIPHER_SIGNALS,
        error=TLSHandshakeError,
        says="the server agreed on a cipher suite and then ended the handshake",
        cause="It most likely requires a device certificate that was not presented or that "
        "it does not accept",
        fix="Pass the registered certificate as identity=ClientIdentity.from_files(...)",
    ),
    Refusal(
        key="no-shared-cipher-ecc-only",
        signals=_CIPHER_SIGNALS,
        when="the policy is CipherProfile.ECC_ONLY",
        error=CipherSuiteError,
        says="no cipher suite in common",
        cause="ECC-only mode needs an ECDSA certificate from the server: this device offers "
        "only the ECDHE-ECDSA suites and ECDSA signatures in TLS 1.3",
        fix="Use CipherProfile.STRONG if the server has only an RSA certificate",
    ),
    Refusal(
        key="no-shared-cipher",
        signals=_CIPHER_SIGNALS,
        when="the policy is CipherProfile.STRONG",
        error=CipherSuiteError,
        says="no cipher suite in common",
        cause="This device offers only IoT Hub's recommended cipher suites and the server "
        "accepts none of them",
        fix="The server must enable ECDHE with AES-GCM or AES-CBC-SHA2 suites",
    ),
    Refusal(
        key="handshake-timeout",
        signals=(),
        exceptions=(TimeoutError,),
        error=HandshakeTimeoutError,
        says="the handshake did not complete in time",
        cause="The server accepted the TCP connection but did not finish the handshake",
        fix="Check that the port speaks TLS and that no proxy or firewall holds the connection",
    ),
    Refusal(
        key="handshake-closed",
        signals=("UNEXPECTED_EOF_WHILE_READING", "EOF"),
        exceptions=(ssl.SSLEOFError, ssl.SSLZeroReturnError),
        error=HandshakeClosedError,
        says="the server closed the connection during the handshake",
        cause="A server that only speaks TLS 1.0/1.1, accepts none of IoT Hub's "
        "recommended suites, or requires a client certificate may do this",
        fix=_PROBE,
    ),
    Refusal(
        key="handshake-reset",
        signals=(),
        exceptions=(ConnectionResetError, BrokenPipeError),
        error=HandshakeClosedError,
        says="the server reset the connection during the handshake",
        cause="A server that only speaks TLS 1.0/1.1 or refuses every suite this device "
        "offers may do this; so may a firewall",
        fix=_PROBE,
    ),
    Refusal(
        key="not-tls",
        signals=(
            "WRONG_VERSION_NUMBER",
            "HTTP_REQUEST",
            "RECORD_LAYER_FAILURE",
            "PACKET_LENGTH_TOO_LONG",
        ),
        error=TLSHandshakeError,
        says="the server did not answer with TLS",
        cause="The port does not speak TLS, or a proxy intercepts the connection",
        fix="Check the port (IoT Hub: 8883 MQTT, 5671 AMQP, 443 HTTPS and WebSockets) and "
        "that no proxy intercepts the connection",
    ),
    Refusal(
        key="device-certificate-refused",
        signals=(
            "TLSV1_ALERT_UNKNOWN_CA",
            "SSLV3_ALERT_BAD_CERTIFICATE",
            "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
            "SSLV3_ALERT_CERTIFICATE_EXPIRED",
            "SSLV3_ALERT_CERTIFICATE_REVOKED",
            "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
            "TLSV13_ALERT_CERTIFICATE_REQUIRED",
            "TLSV1_ALERT_ACCESS_DENIED",
        ),
        error=TLSHandshakeError,
        says="the server refused this device's certificate",
        cause="The hub knows neither the certificate's thumbprint nor the CA that issued it, "
        "or the certificate has expired or was revoked",
        fix="Register the device's certificate (its thumbprint, or the CA that issued it) "
        "with the hub, check it has not expired, and pass it as "
        "identity=ClientIdentity.from_files(...)",
    ),
    # -- the server's certificate (OpenSSL X509_V_ERR_* verify codes) -------------------
    Refusal(
        key="certificate-not-yet-valid",
        code=9,
        signals=("X509_V_ERR_CERT_NOT_YET_VALID",),
        error=CertificateVerificationError,
        says="the certificate is not valid yet",
        cause="The device clock is behind (a device without a battery-backed clock or NTP), "
        "or the certificate was issued moments ago",
        fix="Check the device clock (NTP) before anything else",
    ),
    Refusal(
        key="certificate-expired",
        code=10,
        signals=("X509_V_ERR_CERT_HAS_EXPIRED",),
        error=CertificateVerificationError,
        says="the certificate has expired",
        cause="The device clock is ahead, or the server's certificate really expired",
        fix="Check the device clock (NTP); if the clock is right the server's certificate "
        "must be renewed",
    ),
    Refusal(
        key="self-signed",
        code=18,
        signals=("X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT",),
        error=CertificateVerificationError,
        says="the server presented a self-signed certificate that is not one of the pinned roots",
        cause="The server is not IoT Hub: a test server, a gateway with a certificate of its "
        "own, or a proxy that intercepts TLS",
        fix="Connect to the hub itself; to trust a private server on purpose, pin its "
        "certificate with TlsPolicy(roots=RootSet.from_pem_file(...))",
    ),
    Refusal(
        key="root-not-pinned",
        code=19,
        signals=("X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN",),
        error=CertificateVerificationError,
        says="the chain ends at a root that is not pinned",
        cause="The hub migrated to another root, or a proxy re-signs TLS with a root of its own",
        fix="If the hub migrated roots, add the new root with TlsPolicy(roots=...), no code "
        "change needed",
    ),
    Refusal(
        key="no-pinned-issuer",
        code=20,
        signals=("X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY",),
        error=CertificateVerificationError,
        says="the chain does not lead to a pinned root",
        cause="The hub migrated to a root that is not pinned, or the server did not send its "
        "intermediate certificates",
        fix="If the hub migrated roots, add the new root with TlsPolicy(roots=...)",
    ),
    Refusal(
        key="incomplete-chain",
        code=21,
        signals=("X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE",),
        error=CertificateVerificationError,
        says="the server sent an incomplete chain",
        cause="An intermediate certificate is missing from what the server sent",
        fix="The server must send its intermediate certificates",
    ),
    Refusal(
        key="hostname-mismatch",
        code=62,
        signals=("X509_V_ERR_HOSTNAME_MISMATCH",),
        error=CertificateVerificationError,
        says="the certificate does not match the host name",
        cause="The device connects to a name or an IP address the certificate was not issued for",
        fix="Connect to the name the hub's certificate is issued for (e.g. "
        "<hub>.azure-devices.net), never an IP address",
    ),
    Refusal(
        key="server-key-too-small",
        code=66,
        signals=("X509_V_ERR_EE_KEY_TOO_SMALL",),
        error=CertificateVerificationError,
        says="the server's key is too weak",
        cause="IoT Hub uses RSA 2048+ or ECDSA P-256+ keys: a smaller one is not IoT Hub's",
        fix="The server must use a key of at least RSA 2048 or ECDSA P-256",
    ),
    Refusal(
        key="ca-key-too-small",
        code=67,
        signals=("X509_V_ERR_CA_KEY_TOO_SMALL",),
        error=CertificateVerificationError,
        says="the server's CA key is too weak",
        cause="A certificate authority in the chain has a key below RSA 2048 or ECDSA P-256",
        fix="The server's certificate must be issued by a CA with a stronger key",
    ),
    Refusal(
        key="weak-digest",
        code=68,
        signals=("X509_V_ERR_CA_MD_TOO_WEAK",),
        error=CertificateVerificationError,
        says="the chain uses a weak signature digest (SHA-1 or MD5)",
        cause="A certificate in the chain is signed with a digest OpenSSL no longer trusts",
        fix="The server's certificate must be reissued with SHA-256 or better",
    ),
    Refusal(
        key="certificate-not-verified",
        signals=("CERTIFICATE_VERIFY_FAILED",),
        when="any other verify code",
        error=CertificateVerificationError,
        says="the server certificate chain could not be verified",
        cause="OpenSSL's verify message, quoted in the error, says which check failed",
        fix="Run iothub-tls probe HOST:PORT to see the chain the server sends",
    ),
    # -- after the handshake: what the policy checks itself (PolicyViolation) -----------
    Refusal(
        key="ecc-only-not-ecdsa",
        signals=(),
        error=PolicyViolation,
        says="the server presented a certificate that is not ECDSA",
        cause="ECC-only mode needs an ECDSA certificate from the server; the check after the "
        "handshake refuses any other kind the handshake let through",
        fix="Use CipherProfile.STRONG for servers without an ECC certificate",
    ),
    Refusal(
        key="fragment-length-not-honoured",
        signals=(),
        error=PolicyViolation,
        says="the server did not honour max_fragment_length",
        cause="This device requires it (require_max_fragment_length=True)",
        fix="Set it to False to accept 16 KiB records, or use a server that supports RFC 6066 "
        "max_fragment_length",
    ),
    Refusal(
        key="system-anchor-not-allowed",
        signals=(),
        error=PolicyViolation,
        says="the server's chain is anchored at a root the system store trusts but the "
        "policy does not",
        cause="Trust.SYSTEM takes the chain from the operating system's store, and it must "
        "still end at one of the policy's roots",
        fix="Add that root to TlsPolicy(roots=...) if the hub migrated to it",
    ),
    Refusal(
        key="system-anchor-unreadable",
        signals=(),
        error=PolicyViolation,
        says="the verified chain could not be read on this platform",
        cause="Trust.SYSTEM needs the verified chain to check its anchor",
        fix="Use Trust.PINNED",
    ),
)

_ROWS = {row.key: row for row in TLS_REFUSALS}

_BY_VERIFY_CODE = {row.code: row for row in TLS_REFUSALS if row.code is not None}


def policy_violation(key: str, detail: str = "") -> PolicyViolation:
    """The :class:`PolicyViolation` of row ``key`` of :data:`TLS_REFUSALS` (a check made
    after the handshake): what happened, then ``detail`` (this connection's facts, e.g.
    ``" (hub presented an RSA-2048 certificate)"``), the cause and the fix."""
    row = _ROWS[key]
    if row.error is not PolicyViolation:
        raise ValueError(f"{key} is not a policy check")
    return PolicyViolation(f"{row.says}{detail}. {row.explain()}")


def _selects(key: str, reason: str) -> bool:
    return reason in _ROWS[key].signals


def _refusal(
    exc: BaseException, reason: str, policy: TlsPolicy, agreed: str | None
) -> Refusal | None:
    """The row that explains ``exc``, or None when no row does."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _BY_VERIFY_CODE.get(exc.verify_code, _ROWS["certificate-not-verified"])
    if isinstance(exc, _ROWS["handshake-timeout"].exceptions):
        return _ROWS["handshake-timeout"]
    if _selects("protocol-version", reason):
        return _ROWS["protocol-version"]
    if _selects("no-shared-cipher", reason):
        # A server that chose a suite and then ended the handshake has no cipher problem.
        if agreed:
            return _ROWS["certificate-expected"]
        if policy.ciphers is CipherProfile.ECC_ONLY:
            return _ROWS["no-shared-cipher-ecc-only"]
        return _ROWS["no-shared-cipher"]
    closed = _ROWS["handshake-closed"]
    if isinstance(exc, closed.exceptions) or reason in closed.signals:
        return closed
    if isinstance(exc, _ROWS["handshake-reset"].exceptions):
        return _ROWS["handshake-reset"]
    for key in ("not-tls", "device-certificate-refused"):
        if _selects(key, reason):
            return _ROWS[key]
    return None


def explain_handshake_error(
    exc: BaseException, policy: TlsPolicy, host: str | None, *, agreed: str | None = None
) -> BaseException:
    """Translate an ssl handshake failure into the matching :mod:`iothub_tls.errors`
    class, keeping OpenSSL's reason and adding the rule and the remedy from
    :data:`TLS_REFUSALS`. ``agreed`` is the suite the server chose before failing, if it
    got that far."""
    where = f"TLS handshake with {host}" if host else "TLS handshake"
    reason = getattr(exc, "reason", None) or ""
    original = getattr(exc, "verify_message", None) or str(exc)
    errno = getattr(exc, "errno", None)
    row = _refusal(exc, reason, policy, agreed)
    new: Exception
    if isinstance(exc, ssl.SSLCertVerificationError) and row is not None:
        code = exc.verify_code
        verify = CertificateVerificationError(
            errno,
            # keeps OpenSSL's reason code: tools that sort failures by it still can
            f"{where} failed: certificate verify failed (CERTIFICATE_VERIFY_FAILED): "
            f"{exc.verify_message} (OpenSSL verify code {code}); {row.says}. "
            f"{row.explain()}. Pinned roots: {', '.join(policy.roots.common_names)}",
        )
        verify.verify_code = code
        verify.verify_message = exc.verify_message
        new = verify
    elif row is not None:
        # the reason OpenSSL gave; for a closed, reset or stalled connection, its words
        detail = original if row.exceptions else reason
        if row.key == "certificate-expected":
            detail += f"; it agreed on {iana_name(agreed or '')}"
        text = f"{where} failed: {row.says} ({detail}). {row.explain()}"
        if row.error is CipherSuiteError:
            text += f". This device offers {', '.join(s.iana for s in policy.cipher_suites)}"
        new = row.error(errno, text)
    elif isinstance(exc, ssl.SSLError):
        new = TLSHandshakeError(errno, f"{where} failed: {original}")
    else:
        return exc
    # keep OpenSSL's fields, as ssl.SSLError carries them
    vars(new).update(reason=reason or None, library=getattr(exc, "library", None))
    return new
