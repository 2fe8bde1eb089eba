"""The probe engine against real TLS servers on loopback, cross-checked with sslscan.

Servers: compliant (RSA + ECDSA, the 8 recommended suites), legacy (TLS 1.0+ and all
18 suites of the table), ECC-only, RSA-only, SNI-required (refuses, or serves another
certificate, without SNI), a stalling server, a non-TLS port, nothing listening. Each
result is asserted field by field; the verdict logic is also tested without sockets.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from collections.abc import Iterator

import pytest

import iothub_tls as it
from iothub_tls.diagnostics import probe as scan
from iothub_tls.diagnostics.probe import CertificateReport, Severity
from iothub_tls.policy import CIPHER_SUITES, ECC_SUITES, STRONG_SUITES, WEAK_SUITES
from iothub_tls.testing.pki import Issued, self_signed
from iothub_tls.testing.ports import free_port
from iothub_tls.testing.server import TLSServer
from tests.conftest import HOST, KEYS, NOW
from tests.scanners import sslscan

ROOT_CN = "iothub-tls Test Root G2"
ISSUING_CN = "iothub-tls Test Issuing CA"
STRONG = ":".join(s.openssl for s in STRONG_SUITES)
ALL_18 = ":".join(s.openssl for s in CIPHER_SUITES)
ECDSA_STRONG = ":".join(s.openssl for s in ECC_SUITES)
RSA_STRONG = {s.iana for s in STRONG_SUITES if s.authentication == "RSA"}
ECDSA_IANA = {s.iana for s in ECC_SUITES}
ALL_MFL = {512: True, 1024: True, 2048: True, 4096: True}

# The legacy server offers TLS 1.0 on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")


class SNIRequiredServer(TLSServer):
    """A TLSServer that refuses handshakes without SNI (unrecognized_name alert), or,
    given ``default``, answers them with that other certificate instead."""

    def __init__(self, certs: list[Issued], *, default: Issued | None = None, **kwargs: object):
        super().__init__(certs, **kwargs)  # type: ignore[arg-type]
        named = self.context
        self.no_sni_seen = 0
        if default is None:

            def refuse(conn: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> int | None:
                if name is None:
                    self.no_sni_seen += 1
                    return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
                return None

            named.sni_callback = refuse
            return
        # Handshakes start on a context holding only ``default``; SNI switches them to
        # the real certificates.
        fallback = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        (self._dir / "default.pem").write_bytes(default.cert_chain_pem)
        (self._dir / "default.key").write_bytes(default.key_pem)
        fallback.load_cert_chain(self._dir / "default.pem", self._dir / "default.key")

        def switch(conn: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> int | None:
            if name is None:
                self.no_sni_seen += 1
            else:
                conn.context = named
            return None

        fallback.sni_callback = switch
        self.context = fallback


class PlainServer:
    """Accepts TCP and answers like an HTTP server: a port that does not speak TLS."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(32)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self._sock.close()


@pytest.fixture(scope="module")
def leaves(pki) -> dict[str, Issued]:
    """RSA and ECDSA leaves valid for 200 days (no expiry warning), and an expired one."""
    later = NOW + dt.timedelta(days=200)
    return {
        "rsa": pki.intermediate.issue(HOST, "localhost", not_after=later),
        "ec": pki.intermediate.issue(HOST, "localhost", key_type="ec", not_after=later),
        "expired": pki.intermediate.issue(
            HOST, not_before=NOW - dt.timedelta(days=60), not_after=NOW - dt.timedelta(days=1)
        ),
    }


PROFILES = {
    "compliant": (("rsa", "ec"), {"ciphers": STRONG}),
    "legacy": (("rsa",), {"ciphers": ALL_18, "min_version": ssl.TLSVersion.TLSv1}),
    "ecc-only": (("ec",), {"ciphers": ECDSA_STRONG}),
    "rsa-only": (("rsa",), {"ciphers": STRONG}),
}


@pytest.fixture(scope="module")
def servers(leaves) -> Iterator[dict[str, TLSServer]]:
    made = {
        name: TLSServer([leaves[k] for k in keys], **kwargs)  # type: ignore[arg-type]
        for name, (keys, kwargs) in PROFILES.items()
    }
    yield made
    for server in made.values():
        server.close()


def probe(server_port: int, pki, **kwargs: object) -> scan.ProbeResult:
    kwargs.setdefault("sni", HOST)
    kwargs.setdefault("roots", pki.roots)
    return scan.probe("127.0.0.1", server_port, **kwargs)  # type: ignore[arg-type]


def accepted(mapping) -> set:
    return {k for k, v in mapping.items() if v}


def codes(result: scan.ProbeResult, severity: Severity | None = None) -> list[str]:
    return [f.code for f in result.findings if severity is None or f.severity is severity]


def _not_after(issued: Issued) -> str:
    return issued.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the four server profiles ---------------------------------------------------------------


def test_compliant_server(pki, servers, leaves):
    server = servers["compliant"]
    result = probe(server.port, pki)
    data = result.as_dict()
    assert list(data) == [
        "host",
        "port",
        "sni",
        "protocols",
        "cipher_suites",
        "certificate",
        "ecdsa_certificate",
        "max_fragment_length",
        "sni_required",
        "compliant",
        "findings",
    ]
    assert data["host"] == "127.0.0.1" and data["port"] == server.port and data["sni"] == HOST
    assert data["protocols"] == {"TLSv1": False, "TLSv1.1": False, "TLSv1.2": True, "TLSv1.3": True}
    assert data["cipher_suites"] == {s.iana: s.strong for s in CIPHER_SUITES}
    assert data["certificate"] == {
        # With both certificates loaded, OpenSSL prefers the ECDSA one for a client
        # that offers everything.
        "leaf_key_type": "EC",
        "leaf_key_bits": 256,
        "chain": [HOST, ISSUING_CN, ROOT_CN],
        "not_after": _not_after(leaves["ec"]),
        "verified": True,
        "anchor": ROOT_CN,
        "error": None,
    }
    assert data["ecdsa_certificate"] is True
    assert data["max_fragment_length"] == {"512": True, "1024": True, "2048": True, "4096": True}
    assert data["sni_required"] is False
    assert data["compliant"] is True and result.compliant
    assert data["findings"] == []


def test_legacy_server(pki, servers, leaves):
    result = probe(servers["legacy"].port, pki)
    assert result.protocols == {"TLSv1": True, "TLSv1.1": True, "TLSv1.2": True, "TLSv1.3": True}
    # RSA certificate only: every suite of the table but the four ECDSA ones.
    assert accepted(result.cipher_suites) == {s.iana for s in CIPHER_SUITES} - ECDSA_IANA
    assert result.certificate == CertificateReport(
        "RSA", 2048, (HOST, ISSUING_CN, ROOT_CN), _not_after(leaves["rsa"]), True, ROOT_CN, None
    )
    assert result.ecdsa_certificate is False
    assert result.max_fragment_length == ALL_MFL
    assert result.sni_required is False
    assert result.compliant is False
    assert codes(result, Severity.FAIL) == ["legacy-protocol", "weak-cipher-suite"]
    assert codes(result) == [
        "legacy-protocol",
        "weak-cipher-suite",
        "no-ecdsa-certificate",
    ]
    legacy, weak = result.findings[0].message, result.findings[1].message
    assert "accepts TLSv1, TLSv1.1" in legacy and "2025-08-31" in legacy
    assert "accepts 10 cipher suite(s)" in weak
    assert all(s.iana in weak for s in WEAK_SUITES)


def test_ecc_only_server(pki, servers, leaves):
    result = probe(servers["ecc-only"].port, pki)
    assert result.protocols == {"TLSv1": False, "TLSv1.1": False, "TLSv1.2": True, "TLSv1.3": True}
    assert accepted(result.cipher_suites) == ECDSA_IANA
    # IoT Hub's ECC leaf chains to RSA CAs; so does this one.
    assert result.certificate == CertificateReport(
        "EC", 256, (HOST, ISSUING_CN, ROOT_CN), _not_after(leaves["ec"]), True, ROOT_CN, None
    )
    assert result.ecdsa_certificate is True
    assert result.max_fragment_length == ALL_MFL
    assert result.sni_required is False
    assert result.compliant is True
    assert codes(result) == []


def test_rsa_only_server(pki, servers, leaves):
    result = probe(servers["rsa-only"].port, pki)
    assert result.protocols == {"TLSv1": False, "TLSv1.1": False, "TLSv1.2": True, "TLSv1.3": True}
    assert accepted(result.cipher_suites) == RSA_STRONG
    assert result.certificate == CertificateReport(
        "RSA", 2048, (HOST, ISSUING_CN, ROOT_CN), _not_after(leaves["rsa"]), True, ROOT_CN, None
    )
    assert result.ecdsa_certificate is False
    assert result.compliant is True  # ECC readiness is information, not compliance
    assert codes(result) == ["no-ecdsa-certificate"]
    assert "ECC-only mode cannot connect" in result.findings[0].message


def test_tls12_only_server_gets_an_information_finding(pki, tls_server, leaves):
    server = tls_server([leaves["rsa"]], ciphers=STRONG, max_version=ssl.TLSVersion.TLSv1_2)
    result = probe(server.port, pki)
    assert result.protocols == {"TLSv1": False, "TLSv1.1": False, "TLSv1.2": True, "TLSv1.3": False}
    assert result.compliant is True
    assert codes(result) == ["no-tls13", "no-ecdsa-certificate"]


def test_weak_suites_only_server_is_not_compliant(pki, tls_server, leaves):
    weak = ":".join(s.openssl for s in WEAK_SUITES)
    server = tls_server([leaves["rsa"]], ciphers=weak, max_version=ssl.TLSVersion.TLSv1_2)
    result = probe(server.port, pki)
    assert accepted(result.cipher_suites) == {s.iana for s in WEAK_SUITES}
    # The certificate is still judged (a device-like check, TLS 1.2 with any suite).
    assert result.certificate.verified is True
    assert result.compliant is False
    assert codes(result, Severity.FAIL) == ["weak-cipher-suite", "no-strong-suite"]
    assert "none of the 8 recommended" in result.findings[1].message


def test_tls11_only_server(pki, tls_server, leaves):
    v11 = ssl.TLSVersion.TLSv1_1
    server = tls_server([leaves["rsa"]], min_version=v11, max_version=v11)
    result = probe(server.port, pki)
    assert accepted(result.protocols) == {"TLSv1.1"}
    assert accepted(result.cipher_suites) == set()  # the suite probes speak TLS 1.2
    cert = result.certificate
    # The leaf is still shown (from a TLS 1.1 handshake), but a device could not check it.
    assert (cert.leaf_key_type, cert.leaf_key_bits, cert.chain) == (
        "RSA",
        2048,
        (HOST, ISSUING_CN, ROOT_CN),
    )
    assert cert.verified is False
    assert cert.error.startswith("no TLS 1.2+ handshake to check it with")
    assert codes(result, Severity.FAIL) == [
        "legacy-protocol",
        "no-strong-suite",
        "certificate-not-verified",
    ]
    assert "does not accept TLS 1.2 at all" in result.findings[1].message


# -- certificates ---------------------------------------------------------------------------


def test_chain_not_anchored_at_the_roots(pki, servers):
    """Default roots (the Azure ones): the test chain does not verify."""
    result = probe(servers["compliant"].port, pki, roots=it.AZURE_GLOBAL)
    cert = result.certificate
    assert cert.verified is False and cert.anchor is None
    assert cert.error == "unable to get local issuer certificate (OpenSSL verify code 20)"
    assert cert.chain == (HOST, ISSUING_CN)  # what could be linked from what was sent
    assert cert.leaf_key_type == "EC"
    assert result.compliant is False
    assert codes(result, Severity.FAIL) == ["certificate-not-verified"]
    assert "unable to get local issuer certificate" in result.findings[0].message


def test_name_mismatch_is_not_verified(pki, servers):
    result = probe(servers["compliant"].port, pki, sni="other.iothub-tls.test")
    assert result.sni == "other.iothub-tls.test"
    assert result.certificate.verified is False
    assert "verify code 62" in result.certificate.error
    assert "other.iothub-tls.test" in result.certificate.error
    assert result.compliant is False


def test_ip_address_target_sends_no_sni_and_checks_the_ip(pki, servers):
    result = scan.probe("127.0.0.1", servers["compliant"].port, roots=pki.roots)
    assert result.sni is None
    assert result.sni_required is False
    assert result.certificate.verified is False
    assert "verify code 64" in result.certificate.error  # IP address mismatch


def test_host_name_target_is_the_sni(pki, servers):
    result = scan.probe("localhost", servers["compliant"].port, roots=pki.roots)
    assert result.host == "localhost" and result.sni == "localhost"
    assert result.certificate.verified is True and result.compliant is True


def test_expired_certificate(pki, tls_server, leaves):
    server = tls_server([leaves["expired"]], ciphers=STRONG)
    result = probe(server.port, pki)
    cert = result.certificate
    assert cert.verified is False
    assert cert.error == "certificate has expired (OpenSSL verify code 10)"
    assert cert.not_after == _not_after(leaves["expired"])
    assert codes(result, Severity.FAIL) == ["certificate-not-verified"]


def test_certificate_expiring_soon_is_a_warning(pki, tls_server):
    soon = pki.intermediate.issue(HOST, not_after=NOW + dt.timedelta(days=10))
    server = tls_server([soon], ciphers=STRONG)
    result = probe(server.port, pki)
    assert result.compliant is True
    assert codes(result, Severity.WARN) == ["certificate-expires-soon"]


# -- SNI --------------------------------------------------------------------------------------


def test_server_refusing_handshakes_without_sni(pki, leaves):
    server = SNIRequiredServer([leaves["rsa"], leaves["ec"]], ciphers=STRONG)
    try:
        result = probe(server.port, pki)
        assert server.no_sni_seen >= 1
    finally:
        server.close()
    assert result.sni_required is True
    assert result.compliant is True
    assert result.certificate.verified is True
    assert codes(result) == ["sni-required"]


def test_server_with_another_certificate_without_sni(pki, leaves):
    server = SNIRequiredServer(
        [leaves["rsa"]], default=self_signed("default.invalid", key_pool=KEYS), ciphers=STRONG
    )
    try:
        result = probe(server.port, pki)
        assert server.no_sni_seen >= 1
    finally:
        server.close()
    assert result.sni_required is True
    assert result.compliant is True
    assert result.certificate.verified is True
    assert result.certificate.leaf_key_type == "RSA"
    assert codes(result) == ["no-ecdsa-certificate", "sni-required"]


def test_sni_twin_without_sni_requirement(pki, servers):
    result = probe(servers["rsa-only"].port, pki)
    assert result.sni_required is False


# -- could not check --------------------------------------------------------------------------


def test_nothing_listening():
    port = free_port()
    with pytest.raises(it.ConnectionFailedError) as err:
        scan.probe("127.0.0.1", port, timeout=2)
    assert f"cannot connect to 127.0.0.1:{port} (Connection refused)" in str(err.value)


def test_unknown_host():
    with pytest.raises(it.ConnectionFailedError) as err:
        scan.probe("no-such-host.invalid", 443, timeout=2)
    assert "cannot resolve 'no-such-host.invalid'" in str(err.value)


def test_server_that_never_answers(pki, leaves):
    server = TLSServer([leaves["rsa"]], stall=True)
    try:
        with pytest.raises(it.HandshakeTimeoutError) as err:
            probe(server.port, pki, timeout=0.3)
    finally:
        server.close()
    assert "answered no TLS handshake within 0.3 s" in str(err.value)
    assert isinstance(err.value, TimeoutError)


def test_port_that_does_not_speak_tls(pki):
    server = PlainServer()
    try:
        result = probe(server.port, pki)
    finally:
        server.close()
    assert not any(result.protocols.values()) and not any(result.cipher_suites.values())
    assert result.certificate.verified is False
    assert result.certificate.leaf_key_type is None
    assert result.certificate.error.startswith("no certificate received")
    assert result.compliant is False
    assert codes(result, Severity.FAIL)[0] == "no-handshake"
    assert "speaks TLS" in result.findings[0].message


def test_invalid_arguments():
    with pytest.raises(ValueError, match="port must be 1 to 65535"):
        scan.probe("127.0.0.1", 0)
    with pytest.raises(ValueError, match="timeout must be positive"):
        scan.probe("127.0.0.1", 443, timeout=0)
    with pytest.raises(ValueError, match="workers must be 1 to 32"):
        scan.probe("127.0.0.1", 443, workers=100)


# -- without the OpenSSL shim -----------------------------------------------------------------


def test_without_the_shim_fragment_lengths_are_unknown(pki, servers, no_shim):
    result = probe(servers["ecc-only"].port, pki)
    assert result.max_fragment_length == {512: False, 1024: False, 2048: False, 4096: False}
    # ECDSA readiness is still seen through the TLS 1.2 ECDSA suites.
    assert result.ecdsa_certificate is True
    assert result.compliant is True
    assert codes(result, Severity.WARN) == ["shim-unavailable"]
    assert "simulated" in result.findings[-1].message


def test_probe_does_not_touch_the_device_api(pki, servers):
    """Scanning offers TLS 1.0 and weak suites on its own contexts; a device context
    made afterwards is exactly as strict as ever."""
    probe(servers["legacy"].port, pki)
    ctx = it.create_ssl_context(pki.policy())
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    offered = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert offered == {s.openssl for s in STRONG_SUITES}


# -- pure parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target,expected",
    [
        ("hub.azure-devices.net", ("hub.azure-devices.net", 443)),
        ("hub.azure-devices.net:8883", ("hub.azure-devices.net", 8883)),
        ("127.0.0.1:5671", ("127.0.0.1", 5671)),
        ("[::1]:8883", ("::1", 8883)),
        ("[::1]", ("::1", 443)),
        ("::1", ("::1", 443)),
    ],
)
def test_parse_target(target, expected):
    assert scan.parse_target(target) == expected


@pytest.mark.parametrize(
    "target,message",
    [
        ("", "no host given"),
        ("host:0", "port must be a number from 1 to 65535"),
        ("host:70000", "port must be a number from 1 to 65535"),
        ("host:https", "port must be a number"),
        (":8883", "host name is empty"),
        ("[::1:8883", "missing ']'"),
        ("fe80::1::2:80", "[ADDRESS]:PORT"),
        ("https://hub/", "not a URL"),
    ],
)
def test_parse_target_errors(target, message):
    with pytest.raises(ValueError) as err:
        scan.parse_target(target)
    assert message in str(err.value)


def _verified() -> CertificateReport:
    return CertificateReport(
        "RSA", 2048, ("leaf", "root"), "2030-01-01T00:00:00Z", True, "root", None
    )


def _judge(protocols=None, suites=None, cert=None, **kwargs):
    protocols = protocols or {"TLSv1": False, "TLSv1.1": False, "TLSv1.2": True, "TLSv1.3": True}
    suites = suites if suites is not None else {s.iana: s.strong for s in CIPHER_SUITES}
    cert = cert or _verified()
    kwargs.setdefault("ecdsa_certificate", True)
    kwargs.setdefault("max_fragment_length", ALL_MFL)
    kwargs.setdefault("sni_required", False)
    kwargs.setdefault("now", dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    findings = scan.evaluate(protocols, suites, cert, **kwargs)
    return scan.is_compliant(protocols, suites, cert), findings


def test_verdict_of_a_clean_endpoint():
    assert _judge() == (True, [])


@pytest.mark.parametrize(
    "change,code",
    [
        ({"protocols": {"TLSv1": True, "TLSv1.2": True}}, "legacy-protocol"),
        ({"protocols": {"TLSv1.1": True, "TLSv1.2": True}}, "legacy-protocol"),
        ({"suites": {s.iana: True for s in CIPHER_SUITES}}, "weak-cipher-suite"),
        ({"suites": {}}, "no-strong-suite"),
        (
            {"cert": CertificateReport("RSA", 2048, ("leaf",), None, False, None, "boom")},
            "certificate-not-verified",
        ),
    ],
)
def test_each_failure_alone_breaks_compliance(change, code):
    compliant, findings = _judge(**change)
    assert compliant is False
    assert [f.code for f in findings if f.severity is Severity.FAIL] == [code]


def test_information_and_warnings_do_not_break_compliance():
    soon = CertificateReport("EC", 256, ("l", "r"), "2026-01-10T00:00:00Z", True, "r", None)
    compliant, findings = _judge(
        protocols={"TLSv1.2": True, "TLSv1.3": False},
        cert=soon,
        ecdsa_certificate=False,
        max_fragment_length={512: False, 1024: False, 2048: True, 4096: True},
        sni_required=True,
    )
    assert compliant is True
    assert [(f.severity, f.code) for f in findings] == [
        (Severity.WARN, "certificate-expires-soon"),
        (Severity.INFO, "no-tls13"),
        (Severity.INFO, "no-ecdsa-certificate"),
        (Severity.INFO, "max-fragment-length"),
        (Severity.INFO, "sni-required"),
    ]
    assert "expires in 9 day(s)" in findings[0].message
    assert "only 2048, 4096 of 512/1024/2048/4096" in findings[3].message


def test_result_json_has_all_keys_even_for_partial_maps():
    result = scan.ProbeResult(
        host="h",
        port=1,
        sni=None,
        protocols={},
        cipher_suites={},
        certificate=CertificateReport(None, None, (), None, False, None, "x"),
        ecdsa_certificate=False,
        max_fragment_length={},
        sni_required=False,
    )
    data = result.as_dict()
    assert list(data["protocols"]) == ["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]
    assert len(data["cipher_suites"]) == 18 and not any(data["cipher_suites"].values())
    assert list(data["max_fragment_length"]) == ["512", "1024", "2048", "4096"]
    assert data["compliant"] is False


# -- cross-check with sslscan -----------------------------------------------------------------


@pytest.mark.parametrize("profile", list(PROFILES))
def test_probe_agrees_with_sslscan(pki, servers, profile):
    server = servers[profile]
    theirs_protocols, theirs_suites = sslscan(server.port, HOST)
    result = probe(server.port, pki)
    assert accepted(result.protocols) == theirs_protocols
    assert set(result.accepted_suites) == theirs_suites
    assert theirs_suites  # sslscan really saw suites: the comparison is not vacuous
