"""Turn a :class:`~iothub_tls.TlsPolicy` into an ``ssl.SSLContext``.

:func:`create_ssl_context` is the only place the library builds client TLS. It returns a
:class:`HardenedSSLContext`: a real ``ssl.SSLContext`` subclass, so paho-mqtt, urllib3,
requests, httpx and asyncio take it unchanged, and because its ``sslsocket_class`` and
``sslobject_class`` are ours, the post-handshake policy checks run inside *their*
handshakes too. The context also refuses later changes that would weaken it (turning
off verification, lowering the TLS version, adding trust anchors to a pinned context).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

from ..errors import FeatureUnavailableError, HandshakeClosedError, PolicyError, PolicyViolation
from ..policy import MAX_FRAGMENT_LENGTHS, CipherProfile, TlsPolicy, Trust
from ..roots import spki_sha256
from ._openssl import shim
from .info import TlsInfo, inspect_connection, resumed_info, verified_chain_der
from .refusals import explain_handshake_error, policy_violation
from .sessions import (
    TICKET_READS,
    Key,
    Remembered,
    SessionCache,
    capture,
    offer,
    session_key,
    session_ticket,
)

if TYPE_CHECKING:
    from ..auth import ClientIdentity

__all__ = ["HardenedSSLContext", "HardenedSSLObject", "HardenedSSLSocket", "create_ssl_context"]

logger = logging.getLogger("iothub_tls")

# ECC-only: in TLS 1.3 the cipher suite says nothing about the certificate, so the
# signature algorithms offered decide it. Offering only ECDSA makes the server present
# its ECDSA certificate, or fail (RFC 8446 4.2.3).
_ECDSA_SIGALGS = "ECDSA+SHA256:ECDSA+SHA384:ECDSA+SHA512"
# What the device may use to sign its own CertificateVerify (mutual TLS): its key may be
# RSA even in ECC-only mode. RSA-PKCS#1 is kept for TLS 1.2 servers only.
_CLIENT_SIGALGS = (
    "ECDSA+SHA256:ECDSA+SHA384:ECDSA+SHA512:"
    "RSA-PSS+SHA256:RSA-PSS+SHA384:RSA-PSS+SHA512:RSA+SHA256:RSA+SHA384:RSA+SHA512"
)
# Options that must stay set whatever a caller does to the context later.
# (Protocol versions are held by minimum_version, not by the deprecated OP_NO_TLS* bits.)
_REQUIRED_OPTIONS = ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
# OpenSSL security level 2: RSA/DH keys of 2048 bits or more, ECC of 224 bits or more,
# no SHA-1 signatures in the chain. Nothing may lower it once the context is built.
_MIN_SECURITY_LEVEL = 2
# verify_flags a caller may add. X509_STRICT must stay set; TRUSTED_FIRST only orders
# chain building; PARTIAL_CHAIN lets a non-self-signed certificate in the trust store be
# an anchor, and the store only ever holds self-signed roots (RootSet refuses anything
# else, load_verify_locations is refused); the CRL checks only add refusals. Every other
# bit (VERIFY_ALLOW_PROXY_CERTS, or raw X509_V_FLAG_* values such as NO_CHECK_TIME or
# IGNORE_CRITICAL) loosens verification.
_ALLOWED_VERIFY_FLAGS = (
    ssl.VERIFY_X509_STRICT
    | ssl.VERIFY_X509_TRUSTED_FIRST
    | ssl.VERIFY_X509_PARTIAL_CHAIN
    | ssl.VERIFY_CRL_CHECK_LEAF
    | ssl.VERIFY_CRL_CHECK_CHAIN
)
# SSL_OP_* bits that loosen a client's TLS 1.2/1.3 when newly set (openssl/ssl.h; the
# same values in 1.1.1 and 3.x where both have them). Python exports few of them.
_WEAKENING_OPTIONS: dict[int, str] = {
    1 << 2: "OP_LEGACY_SERVER_CONNECT (servers without RFC 5746 secure renegotiation)",
    1 << 10: "OP_ALLOW_NO_DHE_KEX (TLS 1.3 resumption without (EC)DHE: no forward secrecy)",
    1 << 18: "OP_ALLOW_UNSAFE_LEGACY_RENEGOTIATION (CVE-2009-3555)",
    1 << 19: "OP_NO_ENCRYPT_THEN_MAC (MAC-then-encrypt for the CBC suites, RFC 7366)",
}
if ssl.OPENSSL_VERSION_INFO >= (3, 0):  # bits 0 and 7 mean nothing (or else) in 1.1.1
    _WEAKENING_OPTIONS[1 << 0] = (
        "OP_NO_EXTENDED_MASTER_SECRET (RFC 7627, the triple handshake attack)"
    )
    _WEAKENING_OPTIONS[1 << 7] = (
        "OP_IGNORE_UNEXPECTED_EOF (a truncated connection would look like a clean close)"
    )


def _base_get(ctx: ssl.SSLContext, name: str) -> Any:
    """Read an attribute through ssl.SSLContext's own descriptor (bypassing our guards)."""
    return getattr(ssl.SSLContext, name).__get__(ctx)


def _base_set(ctx: ssl.SSLContext, name: str, value: Any) -> None:
    """Write an attribute through ssl.SSLContext's own descriptor (bypassing our guards)."""
    getattr(ssl.SSLContext, name).__set__(ctx, value)


def create_ssl_context(
    policy: TlsPolicy | None = None, *, identity: ClientIdentity | None = None
) -> HardenedSSLContext:
    """A client context enforcing ``policy`` (default: IoT Hub's guidance), presenting
    ``identity`` (an X.509 device certificate) when given."""
    return HardenedSSLContext(policy, identity=identity)


class HardenedSSLContext(ssl.SSLContext):
    """An ``ssl.SSLContext`` configured from a :class:`TlsPolicy` and locked against
    weakening. Build it with :func:`create_ssl_context`."""

    _sealed = False

    def __new__(
        cls, policy: TlsPolicy | None = None, *, identity: ClientIdentity | None = None
    ) -> HardenedSSLContext:
        return super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)

    def __init__(
        self, policy: TlsPolicy | None = None, *, identity: ClientIdentity | None = None
    ) -> None:
        super().__init__()
        policy = TlsPolicy() if policy is None else policy
        if not isinstance(policy, TlsPolicy):
            raise PolicyError(f"policy must be a TlsPolicy, got {type(policy).__name__}")
        self._policy = policy
        self._identity = identity
        self._sessions = SessionCache()
        # Only Trust.SYSTEM checks the anchor's key after the handshake; computing it
        # parses the roots, which a pinned context never needs.
        self._pinned_spki = (
            policy.roots.spki_fingerprints if policy.trust is Trust.SYSTEM else frozenset()
        )
        self.sslsocket_class = HardenedSSLSocket
        self.sslobject_class = HardenedSSLObject
        _configure(self, policy, identity)
        # What set_ciphers() restores if a later list turns out to weaken the context.
        self._cipherlist = _cipher_string(policy)
        self._system: Any = None
        if policy.trust is Trust.SYSTEM:
            self._system = _system_trust_delegate(self, policy, identity)
        self._sealed = True

    # -- what it is ---------------------------------------------------------------------

    @property
    def policy(self) -> TlsPolicy:
        return self._policy

    @property
    def identity(self) -> ClientIdentity | None:
        return self._identity

    def __repr__(self) -> str:
        p = self._policy
        return (
            f"<HardenedSSLContext {p.min_version.name}+ {p.ciphers.name} "
            f"{p.trust.name}:{p.roots.name} mfl={p.max_fragment_length}>"
        )

    # -- wrapping: offer the remembered session -----------------------------------------

    def wrap_socket(  # type: ignore[override]
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        if server_side:
            raise PolicyError("a HardenedSSLContext is for clients (devices) only")
        if not server_hostname:
            raise PolicyError(
                "server_hostname is required: the hub's name is sent in SNI (mandatory on "
                "IoT Hub's TLS 1.3 endpoints) and checked against its certificate"
            )
        target: Any = self._system if self._system is not None else super()
        return cast(
            ssl.SSLSocket,
            target.wrap_socket(
                sock,
                do_handshake_on_connect=do_handshake_on_connect,
                suppress_ragged_eofs=suppress_ragged_eofs,
                server_hostname=server_hostname,
                session=session,
            ),
        )

    def wrap_bio(  # type: ignore[override]
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if server_side:
            raise PolicyError("a HardenedSSLContext is for clients (devices) only")
        if not server_hostname:
            raise PolicyError(
                "server_hostname is required: the hub's name is sent in SNI and checked "
                "against its certificate"
            )
        target: Any = self._system if self._system is not None else super()
        obj = target.wrap_bio(incoming, outgoing, server_hostname=server_hostname, session=session)
        if session is not None:  # the caller's own; otherwise do_handshake offers ours
            obj.__dict__["_iothub_offered"] = True
        return cast(ssl.SSLObject, obj)

    # -- session memory -----------------------------------------------------------------

    def _recall(self, key: Key) -> Remembered | None:
        return self._sessions.recall(key)

    def _forget(self, key: Key) -> None:
        self._sessions.forget(key)

    def forget_sessions(self) -> None:
        """Drop every remembered TLS session (the next connections do full handshakes)."""
        self._sessions.clear()

    def _capture_session(
        self, conn: ssl.SSLSocket | ssl.SSLObject, key: Key, info: TlsInfo
    ) -> bool:
        entry = capture(conn, info)
        if entry is not None:
            self._sessions.remember(key, entry)
        return entry is not None

    def _offer_session(self, conn: ssl.SSLSocket | ssl.SSLObject, key: Key) -> Remembered | None:
        """Offer the session remembered for ``key``; the one offered, or None."""
        remembered = self._sessions.recall(key)
        if remembered is not None and offer(conn, remembered):
            return remembered
        return None

    # -- the checks ---------------------------------------------------------------------

    def _after_handshake(self, conn: ssl.SSLSocket | ssl.SSLObject, key: Key) -> TlsInfo:
        """Inspect a completed handshake, enforce what OpenSSL cannot, remember the
        session. Raises PolicyViolation (the caller closes the connection)."""
        # (popped: a long-lived connection must not keep a superseded session alive)
        offered: Remembered | None = conn.__dict__.pop("_iothub_offered_entry", None)
        if offered is not None and conn.session_reused:
            # The server resumed the session we offered: no certificate was exchanged,
            # the server's key, chain and anchor are those of the handshake that created
            # it (already checked then); the rest is read from this connection.
            info = resumed_info(conn, offered.info)
        else:
            info = inspect_connection(conn)
            remembered = self._recall(key)
            if info.session_reused and remembered is not None and info.anchor is None:
                # A resumed session exchanges no certificate: report the verified chain
                # of the handshake that created it.
                info = replace(info, chain=remembered.chain, anchor=remembered.anchor)
        policy = self._policy
        if policy.ecc_only and info.server_key_type != "EC":
            raise policy_violation(
                "ecc-only-not-ecdsa",
                f" ({info.sni} presented an {info.server_key_type}-{info.server_key_bits} "
                "certificate)",
            )
        if policy.require_max_fragment_length and (
            info.max_fragment_length != policy.max_fragment_length
        ):
            raise policy_violation(
                "fragment-length-not-honoured",
                f"={policy.max_fragment_length} (negotiated: {info.max_fragment_length or 'none'})",
            )
        if policy.trust is Trust.SYSTEM and not info.session_reused:
            self._check_system_anchor(conn, info)
        if policy.session_resumption and info.version == "TLSv1.2" and not info.session_reused:
            # TLS 1.2: the session exists now. TLS 1.3: the ticket comes later (read()).
            self._capture_session(conn, key, info)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("TLS connection to %s: %s", info.sni, info)
        return info

    def _check_system_anchor(self, conn: ssl.SSLSocket | ssl.SSLObject, info: TlsInfo) -> None:
        from cryptography import x509

        chain = verified_chain_der(conn)
        if not chain:
            raise policy_violation("system-anchor-unreadable")
        anchor = x509.load_der_x509_certificate(chain[-1])
        if spki_sha256(anchor) not in self._pinned_spki:
            raise policy_violation(
                "system-anchor-not-allowed",
                f" ({info.anchor!r}; the policy's roots: "
                f"{', '.join(self._policy.roots.common_names)})",
            )

    # -- refusals that explain themselves -----------------------------------------------

    def _explain(self, exc: BaseException, conn: ssl.SSLSocket | ssl.SSLObject) -> BaseException:
        hardware = self._hardware_failure(exc)
        if hardware is not None:
            return hardware
        agreed = None
        if not conn.__dict__.get("_iothub_offered"):
            # Without an offered session, a cipher is set only once the server's hello
            # was processed: the server agreed on it before failing.
            with contextlib.suppress(OSError, ValueError):
                agreed = conn.cipher()
        return explain_handshake_error(
            exc, self._policy, conn.server_hostname, agreed=agreed[0] if agreed else None
        )

    def _hardware_failure(self, exc: BaseException) -> BaseException | None:
        """When the device key is in a token or TPM and OpenSSL failed the handshake, ask
        the hardware: a removed token is :class:`TokenRemovedError`, not a generic
        handshake error. (Certificate verification and the network are never the key's
        fault.)"""
        identity = self._identity
        if (
            identity is None
            or not isinstance(exc, ssl.SSLError)
            or isinstance(exc, ssl.SSLCertVerificationError | ssl.SSLEOFError)
        ):
            return None
        return identity._hardware_failure()

    # -- locked against weakening -------------------------------------------------------

    def _refuse(self, what: str, why: str) -> None:
        raise PolicyError(f"{what} is not allowed on a HardenedSSLContext: {why}")

    @property
    def check_hostname(self) -> bool:
        return bool(_base_get(self, "check_hostname"))

    @check_hostname.setter
    def check_hostname(self, value: bool) -> None:
        if self._sealed and not value:
            self._refuse("check_hostname=False", "the hub's certificate must match its name")
        _base_set(self, "check_hostname", value)

    @property  # type: ignore[override]
    def verify_mode(self) -> ssl.VerifyMode:
        return ssl.VerifyMode(_base_get(self, "verify_mode"))

    @verify_mode.setter
    def verify_mode(self, value: ssl.VerifyMode) -> None:
        if self._sealed and value != ssl.CERT_REQUIRED:
            self._refuse(
                f"verify_mode={ssl.VerifyMode(value).name}",
                "the server certificate must always be verified",
            )
        _base_set(self, "verify_mode", value)

    @property  # type: ignore[override]
    def minimum_version(self) -> ssl.TLSVersion:
        return ssl.TLSVersion(_base_get(self, "minimum_version"))

    @minimum_version.setter
    def minimum_version(self, value: ssl.TLSVersion) -> None:
        if self._sealed and (
            value not in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)
            or value < self._policy.min_version
        ):
            self._refuse(
                f"minimum_version={ssl.TLSVersion(value).name}",
                f"the policy requires {self._policy.min_version.name} or later",
            )
        _base_set(self, "minimum_version", value)

    @property  # type: ignore[override]
    def maximum_version(self) -> ssl.TLSVersion:
        return ssl.TLSVersion(_base_get(self, "maximum_version"))

    @maximum_version.setter
    def maximum_version(self, value: ssl.TLSVersion) -> None:
        if (
            self._sealed
            and value != ssl.TLSVersion.MAXIMUM_SUPPORTED
            and (
                value not in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)
                or value < self._policy.min_version
            )
        ):
            self._refuse(
                f"maximum_version={ssl.TLSVersion(value).name}",
                f"the policy requires {self._policy.min_version.name} or later",
            )
        _base_set(self, "maximum_version", value)

    @property  # type: ignore[override]
    def options(self) -> ssl.Options:
        return ssl.Options(_base_get(self, "options"))

    @options.setter
    def options(self, value: ssl.Options) -> None:
        if self._sealed and (int(value) & _REQUIRED_OPTIONS) != _REQUIRED_OPTIONS:
            self._refuse(
                "clearing OP_NO_COMPRESSION or OP_NO_RENEGOTIATION",
                "they keep TLS compression (CRIME) and renegotiation off",
            )
        if self._sealed:
            added = int(value) & ~int(self.options)
            loosening = [why for bit, why in _WEAKENING_OPTIONS.items() if added & bit]
            if loosening:
                self._refuse(f"setting {', '.join(loosening)}", "it loosens the TLS protocol")
        _base_set(self, "options", value)

    @property  # type: ignore[override]
    def keylog_filename(self) -> str | None:
        return cast("str | None", _base_get(self, "keylog_filename"))

    @keylog_filename.setter
    def keylog_filename(self, value: str | None) -> None:
        if value is not None:
            self._refuse("keylog_filename", "it would write the session keys to a file")
        _base_set(self, "keylog_filename", value)

    def set_ciphers(self, cipherlist: str, /) -> None:
        """Narrow the TLS 1.2 suites. The whole result is checked, not only the names:
        the suites must stay within the policy and the security level may not drop
        (``@SECLEVEL=0`` would accept RSA-1024 keys and SHA-1 signatures)."""
        if not self._sealed:
            super().set_ciphers(cipherlist)
            return
        # First on a scratch context in the same state: this one never holds a weaker
        # setting, not even for a moment (another thread may be handshaking with it).
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ssl.SSLContext.set_ciphers(probe, f"DEFAULT:@SECLEVEL={self.security_level}")
        ssl.SSLContext.set_ciphers(probe, cipherlist)
        problem = self._cipher_problem(probe)
        if problem is None:
            level = self.security_level
            super().set_ciphers(cipherlist)
            problem = self._cipher_problem(self)  # the effective result, once more
            if problem is not None:
                ssl.SSLContext.set_ciphers(self, f"{self._cipherlist}:@SECLEVEL={level}")
        if problem is not None:
            self._refuse(f"set_ciphers({cipherlist!r})", problem)
        self._cipherlist = f"{cipherlist}:@SECLEVEL={self.security_level}"

    def _cipher_problem(self, ctx: ssl.SSLContext) -> str | None:
        """Why ``ctx``'s cipher settings are weaker than the policy allows, or None."""
        if ctx.security_level < _MIN_SECURITY_LEVEL:
            return (
                f"it lowers the OpenSSL security level to {ctx.security_level} (the policy "
                f"needs {_MIN_SECURITY_LEVEL} or more: RSA keys of 2048 bits or more, no SHA-1 "
                "signatures)"
            )
        allowed = {s.openssl for s in self._policy.cipher_suites}
        offered = {c["name"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"}
        if not offered <= allowed:
            return f"it offers suites outside the policy: {', '.join(sorted(offered - allowed))}"
        return None

    @property  # type: ignore[override]
    def verify_flags(self) -> ssl.VerifyFlags:
        return ssl.VerifyFlags(_base_get(self, "verify_flags"))

    @verify_flags.setter
    def verify_flags(self, value: ssl.VerifyFlags) -> None:
        if self._sealed:
            if not int(value) & ssl.VERIFY_X509_STRICT:
                self._refuse(
                    "clearing VERIFY_X509_STRICT",
                    "RFC 5280 strict chain checks stay on (they refuse malformed "
                    "certificates that lax parsing would accept)",
                )
            loosening = int(value) & ~int(_ALLOWED_VERIFY_FLAGS) & ~int(self.verify_flags)
            if loosening:
                self._refuse(
                    f"verify_flags bits {loosening:#x}",
                    "they loosen certificate verification (only VERIFY_X509_STRICT, "
                    "VERIFY_X509_TRUSTED_FIRST, VERIFY_X509_PARTIAL_CHAIN and the CRL "
                    "checks may be set)",
                )
        _base_set(self, "verify_flags", value)

    @property
    def hostname_checks_common_name(self) -> bool:
        return bool(_base_get(self, "hostname_checks_common_name"))

    @hostname_checks_common_name.setter
    def hostname_checks_common_name(self, value: bool) -> None:
        if self._sealed and value:
            self._refuse(
                "hostname_checks_common_name=True",
                "the hub's name is matched against its subjectAltName only, never the "
                "subject CN (RFC 6125 6.4.4)",
            )
        _base_set(self, "hostname_checks_common_name", value)

    @property
    def sslsocket_class(self) -> type[ssl.SSLSocket]:
        return cast("type[ssl.SSLSocket]", self.__dict__["_sslsocket_class"])

    @sslsocket_class.setter
    def sslsocket_class(self, value: type[ssl.SSLSocket]) -> None:
        self._check_connection_class("sslsocket_class", value)
        self.__dict__["_sslsocket_class"] = value

    @property
    def sslobject_class(self) -> type[ssl.SSLObject]:
        return cast("type[ssl.SSLObject]", self.__dict__["_sslobject_class"])

    @sslobject_class.setter
    def sslobject_class(self, value: type[ssl.SSLObject]) -> None:
        self._check_connection_class("sslobject_class", value)
        self.__dict__["_sslobject_class"] = value

    def _check_connection_class(self, name: str, value: type) -> None:
        if not (isinstance(value, type) and issubclass(value, _HandshakeChecks)):
            self._refuse(
                f"{name}={getattr(value, '__name__', value)!r}",
                "the policy checks (ECC-only leaf, required fragment length, the anchor in "
                "SYSTEM trust) run in the hardened socket classes; subclass "
                "HardenedSSLSocket / HardenedSSLObject instead",
            )

    # Not guarded, each for a reason:
    # * set_ecdh_curve / set groups: only narrows the groups offered; security level 2
    #   (which cannot drop) still refuses groups under 112-bit security.
    # * set_alpn_protocols / set_npn_protocols: choose the application protocol only.
    # * post_handshake_auth: lets the server ask for the device's own certificate
    #   later; the server's verification is unchanged.
    # * sni_callback / set_servername_callback, load_dh_params, num_tickets: server side
    #   only; a HardenedSSLContext refuses to be a server.
    # * load_cert_chain: the device's own identity; security level 2 refuses weak keys.
    # Calling ssl.SSLContext's own methods on the object bypasses every guard: the
    # guards stop weakening through the public API, as libraries and users reach it.

    def load_default_certs(self, purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH) -> None:
        if self._policy.trust is Trust.PINNED:
            self._refuse(
                "load_default_certs()",
                "the context is pinned to the policy's roots; the system store is never "
                "added to a pinned context (use Trust.SYSTEM if that is what you want)",
            )

    def set_default_verify_paths(self) -> None:
        self.load_default_certs()

    def load_verify_locations(
        self, cafile: Any = None, capath: Any = None, cadata: Any = None
    ) -> None:
        if self._sealed:
            self._refuse(
                "load_verify_locations()",
                "trust anchors are exactly the policy's roots; adding others (for example "
                "an HTTP library's CA bundle) would defeat pinning. Put extra roots in "
                "TlsPolicy(roots=...); with requests use iothub_tls.https.HardenedAdapter",
            )
        super().load_verify_locations(cafile, capath, cadata)


def _cipher_string(policy: TlsPolicy) -> str:
    return f"{policy.ciphers.openssl_cipher_string}:@SECLEVEL={_MIN_SECURITY_LEVEL}"


def _configure(ctx: ssl.SSLContext, policy: TlsPolicy, identity: ClientIdentity | None) -> None:
    """Apply the policy to a fresh client context. Every line cites its reason."""
    # Verify the server certificate and its name, always (IoT Hub guidance: the device
    # authenticates the hub; RFC 6125).
    _base_set(ctx, "verify_mode", ssl.CERT_REQUIRED)
    _base_set(ctx, "check_hostname", True)
    # Wildcards only in the left-most label, no CN fallback (RFC 6125 6.4.4).
    ctx.hostname_checks_common_name = False
    # TLS 1.2 minimum: IoT Hub retired TLS 1.0/1.1 on 2025-08-31. TLS 1.3 is preferred
    # and used whenever the hub offers it.
    _base_set(ctx, "minimum_version", policy.min_version)
    _base_set(ctx, "maximum_version", policy.max_version or ssl.TLSVersion.MAXIMUM_SUPPORTED)
    # No compression (CRIME), no renegotiation (IoT Hub never renegotiates; closes the
    # renegotiation attack surface). Tickets stay on: resumption saves a device ~75 % of
    # the handshake bytes.
    _base_set(ctx, "options", ctx.options | _REQUIRED_OPTIONS)
    # Only IoT Hub's recommended suites for TLS 1.2 (all ECDHE, all AEAD or SHA-2 CBC);
    # SECLEVEL=2 refuses RSA keys under 2048 bits and SHA-1 signatures in the chain.
    # TLS 1.3 suites are OpenSSL's defaults, all AEAD.
    ssl.SSLContext.set_ciphers(ctx, _cipher_string(policy))
    # RFC 5280 strict chain checks, as Python 3.13's default context does.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    # Never log session keys, whatever SSLKEYLOGFILE says.
    _base_set(ctx, "keylog_filename", None)
    # Trust anchors are exactly the pinned roots (never the system store). In SYSTEM
    # trust the delegate loads the OS store instead and the anchor is checked afterwards.
    if policy.trust is Trust.PINNED:
        ssl.SSLContext.load_verify_locations(ctx, cadata=policy.roots.to_pem())
    if policy.ciphers is CipherProfile.ECC_ONLY:
        # TLS 1.3 picks the certificate by signature algorithm, not by suite.
        shim("ECC-only mode (ECDSA signature algorithms)").set_sigalgs(
            ctx, _ECDSA_SIGALGS, client=_CLIENT_SIGALGS
        )
    if policy.max_fragment_length is not None:
        # RFC 6066: ask the server to send records of at most this size, so a device
        # with little RAM can use small receive buffers.
        shim("max_fragment_length").set_max_fragment_length(
            ctx, MAX_FRAGMENT_LENGTHS[policy.max_fragment_length]
        )
    if identity is not None:
        identity._load_into(ctx)


def _system_trust_delegate(
    owner: HardenedSSLContext, policy: TlsPolicy, identity: ClientIdentity | None
) -> Any:
    """A truststore context configured exactly like ``owner``: it verifies with the
    operating system's store; our socket classes still run the policy checks."""
    try:
        import truststore
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise FeatureUnavailableError(
            "Trust.SYSTEM", f"truststore is not installed ({exc})"
        ) from exc
    delegate = truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    inner = getattr(delegate, "_ctx", None)
    if not isinstance(inner, ssl.SSLContext):
        raise FeatureUnavailableError(
            "Trust.SYSTEM", "this truststore version is not supported (no inner context)"
        )
    _configure(inner, policy, identity)
    inner._iothub_owner = owner  # type: ignore[attr-defined]
    inner.sslsocket_class = type(
        "HardenedTruststoreSSLSocket", (_HandshakeChecks, inner.sslsocket_class), {}
    )
    inner.sslobject_class = type(
        "HardenedTruststoreSSLObject", (_HandshakeChecks, inner.sslobject_class), {}
    )
    return delegate


# -- the socket and object classes ----------------------------------------------------------


def _owner(conn: Any) -> HardenedSSLContext:
    ctx = conn.context
    return cast(HardenedSSLContext, getattr(ctx, "_iothub_owner", ctx))


class _HandshakeChecks:
    """Shared by the socket and object classes: translate refusals, run the policy
    checks after the handshake, capture TLS 1.3 tickets after reads."""

    _iothub_ticket_pending = False

    def do_handshake(self, *args: Any) -> None:
        conn = cast(Any, self)
        owner = _owner(conn)
        key = session_key(conn)
        state = conn.__dict__
        if "_iothub_offered" not in state:  # first call (non-blocking handshakes repeat)
            # SSLSocket keeps the session it was given in ``_session``; reading the
            # ``session`` property instead would serialise it (and leak, see
            # _capture_session). wrap_bio marks an SSLObject given a session.
            offered = getattr(conn, "_session", None) is not None
            if owner.policy.session_resumption and not offered:
                entry = owner._offer_session(conn, key)
                if entry is not None:
                    state["_iothub_offered_entry"] = entry
                    offered = True
            state["_iothub_offered"] = offered
        try:
            super().do_handshake(*args)  # type: ignore[misc]
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except (ssl.SSLError, TimeoutError, ConnectionResetError, BrokenPipeError) as exc:
            explained = owner._explain(exc, conn)
            if not isinstance(explained, HandshakeClosedError):
                # A refusal: start afresh next time. A dropped or stalled connection
                # (flaky network) keeps the session, so the retry can still resume.
                owner._forget(key)
            raise explained from exc
        try:
            info = owner._after_handshake(conn, key)
        except PolicyViolation:
            owner._forget(key)
            if isinstance(conn, ssl.SSLSocket):
                conn.close()  # fail closed (truststore does the same)
            raise
        conn.__dict__["_iothub_tls_info"] = info
        conn.__dict__["_iothub_session_key"] = key
        if owner.policy.session_resumption and info.version == "TLSv1.3":
            # The ticket (a new session) comes with a later record: catch it in read().
            state["_iothub_handshake_ticket"] = session_ticket(conn)
            state["_iothub_ticket_reads"] = 0
            conn._iothub_ticket_pending = True

    def read(self, *args: Any) -> Any:
        data = super().read(*args)  # type: ignore[misc]
        if self._iothub_ticket_pending:
            conn = cast(Any, self)
            state = conn.__dict__
            ticket = session_ticket(conn)
            # a new ticket arrived (without the shim: look at the session itself)
            if (ticket is None or (ticket and ticket != state["_iothub_handshake_ticket"])) and (
                _owner(conn)._capture_session(
                    conn, state["_iothub_session_key"], state["_iothub_tls_info"]
                )
            ):
                self._iothub_ticket_pending = False
            state["_iothub_ticket_reads"] += 1
            if state["_iothub_ticket_reads"] >= TICKET_READS:
                self._iothub_ticket_pending = False
        return data

    @property
    def tls_info(self) -> TlsInfo | None:
        """The report captured right after the handshake (None before it)."""
        found = cast(Any, self).__dict__.get("_iothub_tls_info")
        return found if isinstance(found, TlsInfo) else None


class HardenedSSLSocket(_HandshakeChecks, ssl.SSLSocket):
    """``ssl.SSLSocket`` that enforces the context's policy when its handshake completes."""


class HardenedSSLObject(_HandshakeChecks, ssl.SSLObject):
    """``ssl.SSLObject`` (asyncio, anyio/httpx, ``wrap_bio``) with the same checks."""
