"""Probe a TLS endpoint: what does it accept, and does it comply with IoT Hub's guidance?

:func:`probe` makes one short TLS handshake per question — each protocol version alone,
each of the 18 TLS 1.2 suites of the cipher table alone, the certificate against the
roots, ECDSA-only, each max fragment length, no SNI — a few at a time on a small thread
pool, and returns a :class:`ProbeResult`. The result types and the verdict
(:func:`evaluate`, :func:`is_compliant`) are pure: they can be built and judged without
any network, and ``ProbeResult.as_dict()`` is what ``iothub-tls probe --json`` prints.

A probe must be able to *offer* what a device never would (TLS 1.0, weak suites): the
contexts that do that are built here, privately, and never leave this module. Device
connections are made only by :func:`iothub_tls.create_ssl_context`.

A compliant endpoint accepts no TLS below 1.2, none of the weak suites, at least one of
the 8 recommended suites, and presents a chain that verifies against the roots.

Every handshake names itself with the ALPN protocol id :data:`PROBE_ALPN`
(``iothub-tls-probe``), so a server's logs can tell a compliance check from a device
(the local hub counts probes apart); SNI stays the real host name. The connection that
checks the endpoint is reachable carries the first handshake, so a probe opens no
connection without a ClientHello.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import socket
import ssl
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from ..errors import (
    ConnectionFailedError,
    FeatureUnavailableError,
    HandshakeTimeoutError,
    OperationTimeoutError,
)
from ..policy import CIPHER_SUITES, ECC_SUITES, MAX_FRAGMENT_LENGTHS, STRONG_SUITES, WEAK_SUITES
from ..roots import AZURE_GLOBAL, RootSet, common_name
from ..tls._openssl import shim as _shim
from ..tls._openssl import shim_status
from ..tls.info import key_description, negotiated_fragment_length, verified_chain_der
from .clienthello import PROBE_ALPN

__all__ = [
    "DEFAULT_PORT",
    "FRAGMENT_LENGTHS",
    "PROBE_ALPN",
    "PROTOCOLS",
    "CertificateReport",
    "Finding",
    "ProbeResult",
    "Severity",
    "evaluate",
    "is_compliant",
    "parse_target",
    "probe",
]

#: Port probed when the target names none: IoT Hub serves HTTPS, MQTT and AMQP over
#: WebSockets on 443 (MQTT is also on 8883, AMQP on 5671).
DEFAULT_PORT = 443
#: Protocol versions probed, named as ``ssl.SSLSocket.version()`` names them.
PROTOCOLS: tuple[str, ...] = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
#: RFC 6066 max fragment lengths probed, in bytes.
FRAGMENT_LENGTHS: tuple[int, ...] = tuple(sorted(MAX_FRAGMENT_LENGTHS))
#: A certificate expiring within this many days earns a warning.
EXPIRY_WARNING_DAYS = 30
_MAX_WORKERS = 32

_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
_LEGACY = ("TLSv1", "TLSv1.1")
_ECDSA_SIGALGS = "ECDSA+SHA256:ECDSA+SHA384:ECDSA+SHA512"


# -- results (pure) -------------------------------------------------------------------------


class Severity(str, enum.Enum):
    """How much a finding matters. Only ``FAIL`` findings make an endpoint non-compliant."""

    FAIL = "fail"
    WARN = "warn"
    INFO = "info"


@dataclass(frozen=True)
class Finding:
    """One observation about the endpoint. ``code`` is stable (documented in
    docs/cli.md); ``message`` explains it for people."""

    severity: Severity
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"severity": self.severity.value, "code": self.code, "message": self.message}


@dataclass(frozen=True)
class CertificateReport:
    """The server certificate, as a device would see it."""

    #: "RSA" or "EC" (None when no handshake completed)
    leaf_key_type: str | None
    leaf_key_bits: int | None
    #: subject CNs, leaf first: the verified chain up to the anchor when verified, else
    #: the certificates OpenSSL could link from what the server sent
    chain: tuple[str, ...]
    #: expiry of the leaf, ISO 8601 UTC ("2027-01-31T12:00:00Z")
    not_after: str | None
    #: the chain verifies against the roots and matches the host (or --sni) name, with
    #: the checks a device makes (RFC 5280 strict, 2048-bit RSA / 224-bit EC minimum)
    verified: bool
    #: subject CN of the root that anchored the verified chain
    anchor: str | None
    #: why it did not verify (None when verified)
    error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "leaf_key_type": self.leaf_key_type,
            "leaf_key_bits": self.leaf_key_bits,
            "chain": list(self.chain),
            "not_after": self.not_after,
            "verified": self.verified,
            "anchor": self.anchor,
            "error": self.error,
        }


@dataclass(frozen=True)
class ProbeResult:
    """Everything :func:`probe` found out about one endpoint."""

    host: str
    port: int
    #: the server name sent in SNI (None for an IP address without ``sni=``)
    sni: str | None
    #: "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3" -> accepted
    protocols: Mapping[str, bool]
    #: IANA name -> accepted in TLS 1.2, for all 18 suites of the cipher table
    cipher_suites: Mapping[str, bool]
    certificate: CertificateReport
    #: an ECDSA leaf is served when the client offers only ECDSA (ECC-only devices work)
    ecdsa_certificate: bool
    #: 512, 1024, 2048, 4096 -> the server honoured that RFC 6066 max fragment length
    max_fragment_length: Mapping[int, bool]
    #: handshakes without SNI fail or get a different certificate
    sni_required: bool
    findings: tuple[Finding, ...] = field(default=())

    @property
    def compliant(self) -> bool:
        return is_compliant(self.protocols, self.cipher_suites, self.certificate)

    @property
    def accepted_suites(self) -> tuple[str, ...]:
        return tuple(name for name, ok in self.cipher_suites.items() if ok)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (exactly the keys ``iothub-tls probe --json`` prints)."""
        return {
            "host": self.host,
            "port": self.port,
            "sni": self.sni,
            "protocols": {name: bool(self.protocols.get(name)) for name in PROTOCOLS},
            "cipher_suites": {s.iana: bool(self.cipher_suites.get(s.iana)) for s in CIPHER_SUITES},
            "certificate": self.certificate.as_dict(),
            "ecdsa_certificate": self.ecdsa_certificate,
            "max_fragment_length": {
                str(n): bool(self.max_fragment_length.get(n)) for n in FRAGMENT_LENGTHS
            },
            "sni_required": self.sni_required,
            "compliant": self.compliant,
            "findings": [f.as_dict() for f in self.findings],
        }


def is_compliant(
    protocols: Mapping[str, bool],
    cipher_suites: Mapping[str, bool],
    certificate: CertificateReport,
) -> bool:
    """IoT Hub's TLS guidance, as an endpoint check: no TLS below 1.2, no weak suite, at
    least one of the recommended suites, and a chain that verifies to the roots."""
    return (
        not any(protocols.get(v) for v in _LEGACY)
        and not any(cipher_suites.get(s.iana) for s in WEAK_SUITES)
        and any(cipher_suites.get(s.iana) for s in STRONG_SUITES)
        and certificate.verified
    )


def evaluate(
    protocols: Mapping[str, bool],
    cipher_suites: Mapping[str, bool],
    certificate: CertificateReport,
    *,
    ecdsa_certificate: bool,
    max_fragment_length: Mapping[int, bool],
    sni_required: bool,
    now: dt.datetime | None = None,
) -> list[Finding]:
    """The findings for an endpoint that accepted what the arguments say. ``FAIL``
    findings are exactly the reasons :func:`is_compliant` is false."""
    found: list[Finding] = []
    legacy = [v for v in _LEGACY if protocols.get(v)]
    if legacy:
        found.append(
            Finding(
                Severity.FAIL,
                "legacy-protocol",
                f"accepts {', '.join(legacy)}: IoT Hub retired TLS 1.0 and 1.1 on 2025-08-31 "
                "and requires TLS 1.2 or later; disable the old versions on the server",
            )
        )
    weak = [s.iana for s in WEAK_SUITES if cipher_suites.get(s.iana)]
    if weak:
        found.append(
            Finding(
                Severity.FAIL,
                "weak-cipher-suite",
                f"accepts {len(weak)} cipher suite(s) outside IoT Hub's recommended list: "
                f"{', '.join(weak)}; allow only the ECDHE suites with AES-GCM or AES-CBC-SHA2",
            )
        )
    if not any(cipher_suites.get(s.iana) for s in STRONG_SUITES):
        reason = (
            "does not accept TLS 1.2 at all"
            if not protocols.get("TLSv1.2")
            else "accepts none of the 8 recommended TLS 1.2 cipher suites"
        )
        found.append(
            Finding(
                Severity.FAIL,
                "no-strong-suite",
                f"{reason}: devices limited to TLS 1.2 and IoT Hub's recommended suites "
                "cannot connect",
            )
        )
    if not certificate.verified:
        found.append(
            Finding(
                Severity.FAIL,
                "certificate-not-verified",
                f"the certificate chain does not verify against the roots: {certificate.error}",
            )
        )
    if certificate.not_after is not None:
        expires = dt.datetime.fromisoformat(certificate.not_after.replace("Z", "+00:00"))
        left = expires - (now or dt.datetime.now(dt.timezone.utc))
        if dt.timedelta(0) <= left < dt.timedelta(days=EXPIRY_WARNING_DAYS):
            found.append(
                Finding(
                    Severity.WARN,
                    "certificate-expires-soon",
                    f"the server certificate expires in {left.days} day(s) "
                    f"({certificate.not_after})",
                )
            )
    if any(protocols.values()) and not protocols.get("TLSv1.3"):
        found.append(
            Finding(
                Severity.INFO,
                "no-tls13",
                "TLS 1.3 is not accepted; IoT Hub offers it and devices prefer it",
            )
        )
    if not ecdsa_certificate:
        found.append(
            Finding(
                Severity.INFO,
                "no-ecdsa-certificate",
                "no ECDSA certificate is served when only ECDSA is offered: devices in ECC-only "
                "mode cannot connect (use CipherProfile.STRONG for this endpoint)",
            )
        )
    honoured = [n for n in FRAGMENT_LENGTHS if max_fragment_length.get(n)]
    if len(honoured) < len(FRAGMENT_LENGTHS):
        what = (
            f"only {', '.join(map(str, honoured))} of 512/1024/2048/4096"
            if honoured
            else "none of 512/1024/2048/4096"
        )
        found.append(
            Finding(
                Severity.INFO,
                "max-fragment-length",
                f"honours {what} bytes as max fragment length (RFC 6066): devices that require "
                "a smaller fragment length cannot connect",
            )
        )
    if sni_required:
        found.append(
            Finding(
                Severity.INFO,
                "sni-required",
                "handshakes without SNI fail or get another certificate (as on IoT Hub's TLS 1.3 "
                "endpoints): devices must send the host name in SNI (iothub-tls always does)",
            )
        )
    return found


def parse_target(target: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address -> (host, port).

    :raises ValueError: with a message saying what is wrong.
    """
    text = target.strip()
    if not text:
        raise ValueError("no host given: expected HOST or HOST:PORT")
    if "/" in text or " " in text:
        raise ValueError(
            f"{target!r}: expected HOST or HOST:PORT, not a URL (for "
            "https://hub.example/ write hub.example:443)"
        )
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{target!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{target!r}: expected ':PORT' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(
                f"{target!r}: write an IPv6 address with a port as [ADDRESS]:PORT"
            ) from None
    if not host:
        raise ValueError(f"{target!r}: the host name is empty")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{target!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


# -- scanning (I/O) -------------------------------------------------------------------------


@dataclass
class _Outcome:
    ok: bool = False
    timed_out: bool = False
    #: the handshake failed on certificate verification (error holds OpenSSL's reason)
    verify_failed: bool = False
    version: str | None = None
    leaf_der: bytes | None = None
    chain_der: list[bytes] | None = None
    fragment_length: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class _Job:
    name: str
    context: ssl.SSLContext
    server_hostname: str | None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _scan_context(
    *,
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1,
    maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    ciphers: str = "ALL",
) -> ssl.SSLContext:
    """A client context that offers whatever the question needs, including what no
    device may offer (TLS 1.0/1.1 and weak suites need OpenSSL's security level 0), and
    does not verify: it observes. Private to the scanner."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        # Offering TLS 1.0/1.1 is the point of the scan; ssl warns about it.
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = minimum
        ctx.maximum_version = maximum
    ctx.set_ciphers(f"{ciphers}:@SECLEVEL=0")
    ctx.set_alpn_protocols([PROBE_ALPN])
    return ctx


def _verifying_context(roots: RootSet) -> ssl.SSLContext:
    """Verifies like a device: only the roots as anchors, the host name, RFC 5280 strict
    checks and OpenSSL security level 2 (RSA >= 2048, no SHA-1 signatures); TLS 1.2+
    with any suite, so a weak-suite server's certificate can still be judged."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.hostname_checks_common_name = False
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.set_ciphers("ALL:@SECLEVEL=2")
    ctx.load_verify_locations(cadata=roots.to_pem())
    ctx.set_alpn_protocols([PROBE_ALPN])
    return ctx


def _connect(
    host: str, port: int, timeout: float
) -> tuple[socket.AddressFamily, Any, socket.socket]:
    """Resolve and connect once; every handshake then goes to the same address (a DNS
    name may point at several front ends). Returns the connected socket too: the first
    handshake uses it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectionFailedError(
            f"cannot resolve {host!r} ({exc.strerror}): check the host name and DNS"
        ) from exc
    last: OSError | None = None
    for family, _type, proto, _canon, sockaddr in infos:
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
        except OSError as exc:
            last = exc
            sock.close()
            continue
        return family, sockaddr, sock
    if isinstance(last, TimeoutError):
        raise OperationTimeoutError(
            f"{host}:{port} did not accept a TCP connection within {timeout:g} s: check "
            "the host, the port and any firewall in between (or raise --timeout)"
        ) from last
    reason = (last.strerror or str(last)) if last else "no address"
    raise ConnectionFailedError(
        f"cannot connect to {host}:{port} ({reason}): check the host, the port and that "
        "the server is running"
    ) from last


def _handshake(
    family: socket.AddressFamily,
    address: Any,
    job: _Job,
    timeout: float,
    connected: socket.socket | None = None,
) -> _Outcome:
    """One handshake on a new connection (or on ``connected``, already connected)."""
    outcome = _Outcome()
    sock = connected or socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        if connected is None:
            sock.connect(address)
        with job.context.wrap_socket(sock, server_hostname=job.server_hostname) as tls:
            outcome.ok = True
            outcome.version = tls.version()
            outcome.leaf_der = tls.getpeercert(binary_form=True)
            outcome.chain_der = verified_chain_der(tls)
            outcome.fragment_length = negotiated_fragment_length(tls)
    except ssl.SSLCertVerificationError as exc:
        outcome.verify_failed = True
        outcome.error = f"{exc.verify_message} (OpenSSL verify code {exc.verify_code})"
    except TimeoutError:
        outcome.timed_out = True
        outcome.error = f"no answer within {timeout:g} s"
    except ssl.SSLError as exc:
        outcome.error = exc.reason or str(exc)
    except OSError as exc:
        outcome.error = exc.strerror or str(exc)
    finally:
        sock.close()
    return outcome


def _shim_applied(action: Callable[[], None]) -> bool:
    """Run a shim call on a scanning context; False where the shim cannot work here."""
    try:
        action()
    except (FeatureUnavailableError, OSError):
        return False
    return True


def _fragment_request(ctx: ssl.SSLContext, length: int) -> Callable[[], None]:
    def request() -> None:
        code = MAX_FRAGMENT_LENGTHS[length]
        _shim("max fragment length probe").set_max_fragment_length(ctx, code)

    return request


def probe(
    host: str,
    port: int = DEFAULT_PORT,
    *,
    sni: str | None = None,
    roots: RootSet = AZURE_GLOBAL,
    timeout: float = 5.0,
    workers: int = 8,
) -> ProbeResult:
    """Probe ``host:port``.

    :param sni: server name to send (default: ``host``, or none when ``host`` is an IP
        address); the certificate is checked against it.
    :param roots: trust anchors for the certificate check (default: the pinned Azure roots).
    :param timeout: seconds allowed for each connection and handshake.
    :param workers: handshakes run at the same time (1 to 32).
    :raises ConnectionFailedError: the host cannot be resolved or refuses connections.
    :raises OperationTimeoutError: the host does not accept a TCP connection in time.
    :raises HandshakeTimeoutError: the host accepts connections but never answers a
        TLS handshake.
    """
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be 1 to 65535, got {port!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    if not 1 <= workers <= _MAX_WORKERS:
        raise ValueError(f"workers must be 1 to {_MAX_WORKERS}, got {workers!r}")
    name = sni or host
    sent_sni = None if (sni is None and _is_ip(host)) else name

    jobs: list[_Job] = []
    for version in PROTOCOLS:
        v = _VERSIONS[version]
        jobs.append(_Job(f"protocol {version}", _scan_context(minimum=v, maximum=v), name))
    v12 = ssl.TLSVersion.TLSv1_2
    for suite in CIPHER_SUITES:
        ctx = _scan_context(minimum=v12, maximum=v12, ciphers=suite.openssl)
        jobs.append(_Job(f"suite {suite.iana}", ctx, name))
    jobs.append(_Job("certificate", _verifying_context(roots), name))
    jobs.append(_Job("inspect", _inspecting_context(roots), name))
    jobs.append(_Job("no SNI", _inspecting_context(roots), None))
    ecdsa_ctx = _scan_context(minimum=v12, ciphers=":".join(s.openssl for s in ECC_SUITES))
    ecdsa_tls13 = _shim_applied(
        lambda: _shim("ECDSA-only probe").set_sigalgs(ecdsa_ctx, _ECDSA_SIGALGS)
    )
    if not ecdsa_tls13:
        # Without the shim only TLS 1.2 can restrict the certificate type (by suite).
        ecdsa_ctx.maximum_version = v12
    jobs.append(_Job("ECDSA only", ecdsa_ctx, name))
    mfl_ok = True
    for length in FRAGMENT_LENGTHS:
        ctx = _scan_context()
        mfl_ok = mfl_ok and _shim_applied(_fragment_request(ctx, length))
        if mfl_ok:
            jobs.append(_Job(f"fragment {length}", ctx, name))

    family, address, first = _connect(host, port, timeout)

    def run(index: int, job: _Job) -> _Outcome:
        return _handshake(family, address, job, timeout, first if index == 0 else None)

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="iothub-tls-probe") as pool:
            results = list(pool.map(run, range(len(jobs)), jobs))
    finally:
        first.close()
    out = {job.name: result for job, result in zip(jobs, results, strict=True)}

    timed_out = [job.name for job, r in zip(jobs, results, strict=True) if r.timed_out]
    if len(timed_out) == len(jobs):
        raise HandshakeTimeoutError(
            None,
            f"{host}:{port} accepts TCP connections but answered no TLS handshake within "
            f"{timeout:g} s: check that the port speaks TLS (not plain MQTT/HTTP) and that "
            "no proxy holds the connection",
        )

    protocols = {v: out[f"protocol {v}"].ok for v in PROTOCOLS}
    suites = {s.iana: out[f"suite {s.iana}"].ok for s in CIPHER_SUITES}
    certificate = _certificate_report(out["certificate"], out["inspect"], results)
    ecdsa = out["ECDSA only"]
    ecdsa_certificate = ecdsa.ok and _leaf_key_type(ecdsa.leaf_der) == "EC"
    fragments = {}
    for n in FRAGMENT_LENGTHS:
        got = out.get(f"fragment {n}")
        fragments[n] = got is not None and got.ok and got.fragment_length == n
    inspect, bare = out["inspect"], out["no SNI"]
    sni_required = (
        sent_sni is not None
        and inspect.ok
        and (
            (not bare.ok and not bare.timed_out) or (bare.ok and bare.leaf_der != inspect.leaf_der)
        )
    )
    findings = evaluate(
        protocols,
        suites,
        certificate,
        ecdsa_certificate=ecdsa_certificate,
        max_fragment_length=fragments,
        sni_required=sni_required,
    )
    if not any(r.ok for r in results):
        errors = sorted({r.error for r in results if r.error})
        findings.insert(
            0,
            Finding(
                Severity.FAIL,
                "no-handshake",
                f"no TLS handshake succeeded ({'; '.join(errors[:3])}): check that the port "
                "speaks TLS and does not require a client certificate",
            ),
        )
    if not mfl_ok or not ecdsa_tls13:
        findings.append(
            Finding(
                Severity.WARN,
                "shim-unavailable",
                "max fragment length and TLS 1.3 ECDSA-only could not be probed: "
                f"{shim_status()[1]}",
            )
        )
    if timed_out:
        findings.append(
            Finding(
                Severity.WARN,
                "handshake-timeout",
                f"{len(timed_out)} handshake(s) got no answer within {timeout:g} s and count as "
                f"refused: {', '.join(timed_out)}",
            )
        )
    return ProbeResult(
        host=host,
        port=port,
        sni=sent_sni,
        protocols=protocols,
        cipher_suites=suites,
        certificate=certificate,
        ecdsa_certificate=ecdsa_certificate,
        max_fragment_length=fragments,
        sni_required=sni_required,
        findings=tuple(findings),
    )


def _inspecting_context(roots: RootSet) -> ssl.SSLContext:
    """Any version, any suite, no verification — but with the roots loaded, so that
    OpenSSL still builds (and reports) as much of the chain as it can link."""
    ctx = _scan_context()
    ctx.load_verify_locations(cadata=roots.to_pem())
    return ctx


def _leaf_key_type(der: bytes | None) -> str | None:
    if not der:
        return None
    return key_description(x509.load_der_x509_certificate(der))[0]


def _certificate_report(
    verify: _Outcome, inspect: _Outcome, everything: Sequence[_Outcome]
) -> CertificateReport:
    leaf_der = verify.leaf_der or inspect.leaf_der
    if leaf_der is None:
        leaf_der = next((r.leaf_der for r in everything if r.leaf_der), None)
    if leaf_der is None:
        error = verify.error or inspect.error or "no handshake completed"
        return CertificateReport(
            None, None, (), None, False, None, f"no certificate received: {error}"
        )
    leaf = x509.load_der_x509_certificate(leaf_der)
    key_type, bits = key_description(leaf)
    not_after = leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    chain_der = (verify.chain_der if verify.ok else inspect.chain_der) or [leaf_der]
    chain = tuple(common_name(x509.load_der_x509_certificate(d)) for d in chain_der)
    if verify.ok:
        anchor = chain[-1] if verify.chain_der else None
        return CertificateReport(key_type, bits, chain, not_after, True, anchor, None)
    error = verify.error or "unknown error"
    if not verify.verify_failed:
        error = f"no TLS 1.2+ handshake to check it with ({error})"
    return CertificateReport(key_type, bits, chain, not_after, False, None, error)
