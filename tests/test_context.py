"""The hardened context, handshake by handshake, in the spirit of badssl.com.

Every case is a real TLS handshake on loopback against a server whose certificates
were generated for this run. Each accepted connection has failing twins, each refusal
asserted by its error type and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import datetime as dt
import json
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

import iothub_tls as it
import iothub_tls.tls.context
from iothub_tls.policy import WEAK_SUITES
from iothub_tls.testing.pki import self_signed
from iothub_tls.testing.relay import RecordRelay
from iothub_tls.testing.server import OpenSSLServer
from tests.conftest import HOST, KEYS, NOW, connect, new_root

V12, V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3


# -- accepted -------------------------------------------------------------------------------


@pytest.mark.parametrize("version,name", [(V12, "TLSv1.2"), (V13, "TLSv1.3")])
def test_accepted_connection_reports_everything(pki, tls_server, version, name):
    server = tls_server([pki.rsa_leaf], max_version=version)
    ctx = it.create_ssl_context(pki.policy())
    with connect(ctx, server.port) as tls:
        info = it.tls_info(tls)
    assert isinstance(ctx, ssl.SSLContext)
    assert info.version == name
    if version is V12:
        assert info.cipher in {s.openssl for s in it.CipherProfile.STRONG.suites}
        assert info.iana_cipher.startswith("TLS_ECDHE_RSA_WITH_AES_")
    else:
        assert info.cipher == info.iana_cipher
        assert info.cipher.startswith("TLS_AES_") or info.cipher.startswith("TLS_CHACHA20")
    assert info.server_key_type == "RSA"
    assert info.server_key_bits == 2048
    assert info.chain == (HOST, "iothub-tls Test Issuing CA", "iothub-tls Test Root G2")
    assert info.anchor == "iothub-tls Test Root G2"
    assert info.sni == HOST
    assert info.max_fragment_length is None
    assert info.session_reused is False
    assert server.accepted[-1].version == name


def test_defaults_follow_the_guidance():
    ctx = it.create_ssl_context()
    assert ctx.minimum_version == V12
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    offered = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert offered == {s.openssl for s in it.CipherProfile.STRONG.suites}
    # pinned: exactly the two Azure roots, never the system store
    anchors = {c["subject"][-1][0][1] for c in ctx.get_ca_certs()}
    assert anchors == {"DigiCert Global Root G2", "Microsoft RSA Root Certificate Authority 2017"}
    assert ctx.keylog_filename is None
    assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION


def test_ecc_profile_offers_only_the_four_ecdsa_suites():
    ctx = it.create_ssl_context(it.TlsPolicy(ciphers=it.CipherProfile.ECC_ONLY))
    offered = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert sorted(offered) == sorted(s.openssl for s in it.CipherProfile.ECC_ONLY.suites)
    assert all("ECDSA" in name for name in offered) and len(offered) == 4


def test_debug_log_carries_the_report(pki, tls_server, caplog):
    server = tls_server([pki.rsa_leaf])
    with caplog.at_level(logging.DEBUG, logger="iothub_tls"):
        connect(it.create_ssl_context(pki.policy()), server.port).close()
    assert any("TLS connection to " + HOST in r.getMessage() for r in caplog.records)


# -- refused: protocol versions and suites --------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_legacy_protocol_server_is_refused(pki, tls_server, version):
    server = tls_server([pki.rsa_leaf], min_version=version, max_version=version)
    with pytest.raises(it.ProtocolVersionError) as err:
        connect(it.create_ssl_context(pki.policy()), server.port)
    assert "TLS 1.2 or later" in str(err.value)
    assert isinstance(err.value, ssl.SSLError)
    assert err.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"


@pytest.mark.parametrize("suite", WEAK_SUITES, ids=lambda s: s.iana)
def test_each_weak_suite_is_refused(pki, tls_server, suite):
    server = tls_server([pki.rsa_leaf], max_version=V12, ciphers=suite.openssl)
    with pytest.raises(it.CipherSuiteError) as err:
        connect(it.create_ssl_context(pki.policy()), server.port)
    message = str(err.value)
    assert "recommended cipher suites" in message
    assert "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" in message
    assert server.wait_accepted()[-1].version is None  # the server never completed either


@pytest.mark.parametrize("suite", WEAK_SUITES, ids=lambda s: s.iana)
def test_weak_suite_is_accepted_by_a_legacy_client_twin(pki, tls_server, suite):
    """The weak-suite server really does serve that suite: only our policy refuses it."""
    server = tls_server([pki.rsa_leaf], max_version=V12, ciphers=suite.openssl)
    legacy = ssl.create_default_context(cadata=pki.root.cert_pem.decode())
    legacy.set_ciphers(suite.openssl + ":@SECLEVEL=0")
    with connect(legacy, server.port) as tls:
        assert tls.cipher()[0] == suite.openssl


# -- refused: certificates ------------------------------------------------------------------


def _verify_refusal(pki, tls_server, certs, code, *, host=HOST, policy=None, **profile):
    server = tls_server(certs, **profile)
    with pytest.raises(it.CertificateVerificationError) as err:
        connect(it.create_ssl_context(policy or pki.policy()), server.port, host)
    assert err.value.verify_code == code
    assert isinstance(err.value, ssl.SSLCertVerificationError)
    return str(err.value)


def test_expired_certificate(pki, tls_server):
    leaf = pki.intermediate.issue(
        HOST, not_before=NOW - dt.timedelta(days=60), not_after=NOW - dt.timedelta(days=1)
    )
    assert "device clock" in _verify_refusal(pki, tls_server, [leaf], 10)


def test_not_yet_valid_certificate(pki, tls_server):
    leaf = pki.intermediate.issue(HOST, not_before=NOW + dt.timedelta(days=1))
    assert "not valid yet" in _verify_refusal(pki, tls_server, [leaf], 9)


def test_wrong_host(pki, tls_server):
    message = _verify_refusal(pki, tls_server, [pki.rsa_leaf], 62, host="other.iothub-tls.test")
    assert "does not match the host name" in message


def test_self_signed(pki, tls_server):
    message = _verify_refusal(pki, tls_server, [self_signed(HOST, key_pool=KEYS)], 18)
    assert "self-signed" in message


def test_root_not_pinned(pki, tls_server):
    other = new_root("Some Other Root")
    message = _verify_refusal(pki, tls_server, [other.intermediate().issue(HOST)], 20)
    assert "TlsPolicy(roots=...)" in message and "iothub-tls Test Root G2" in message


def test_default_policy_refuses_a_private_root(pki, tls_server):
    message = _verify_refusal(pki, tls_server, [pki.rsa_leaf], 20, policy=it.TlsPolicy())
    assert "DigiCert Global Root G2" in message


def test_incomplete_chain(pki, tls_server):
    leaf = dataclasses.replace(pki.intermediate.issue(HOST), chain=())  # no intermediate
    _verify_refusal(pki, tls_server, [leaf], 20)


def test_weak_rsa_1024_leaf(pki, tls_server):
    leaf = pki.intermediate.issue(HOST, key_size=1024, allow_weak_key=True)
    # the server must drop to SECLEVEL 0 to even load such a key
    assert "too weak" in _verify_refusal(pki, tls_server, [leaf], 66, ciphers="ALL")


def test_pinned_intermediate_is_refused_at_configuration():
    inter = new_root("Root").intermediate("Issuing")
    with pytest.raises(it.RootStoreError, match="pin roots only"):
        it.RootSet.from_pem(inter.cert_pem)


# -- ECC-only -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [V12, V13])
def test_ecc_only_refused_by_rsa_only_server(pki, tls_server, version):
    server = tls_server([pki.rsa_leaf], max_version=version)
    with pytest.raises(it.CipherSuiteError) as err:
        connect(it.create_ssl_context(pki.policy(ciphers=it.CipherProfile.ECC_ONLY)), server.port)
    assert "ECC-only mode needs an ECDSA certificate" in str(err.value)


@pytest.mark.parametrize("version", [V12, V13])
def test_ecc_only_accepts_ecdsa_leaf_under_rsa_root(pki, tls_server, version):
    # the RSA-rooted chain with an ECDSA leaf is exactly what IoT Hub serves
    server = tls_server([pki.ec_leaf], max_version=version)
    ctx = it.create_ssl_context(pki.policy(ciphers=it.CipherProfile.ECC_ONLY))
    with connect(ctx, server.port) as tls:
        info = it.tls_info(tls)
    assert info.server_key_type == "EC" and info.server_key_bits == 256
    assert info.anchor == "iothub-tls Test Root G2"
    if version is V12:
        assert "ECDSA" in info.iana_cipher


@pytest.mark.parametrize("version", [V12, V13])
def test_dual_certificate_server_gives_ecc_only_its_ecdsa_leaf(pki, tls_server, version):
    server = tls_server([pki.rsa_leaf, pki.ec_leaf], max_version=version)
    ecc = it.create_ssl_context(pki.policy(ciphers=it.CipherProfile.ECC_ONLY))
    with connect(ecc, server.port) as tls:
        assert it.tls_info(tls).server_key_type == "EC"


def test_rsa_leaf_in_ecc_mode_is_a_policy_violation(pki, tls_server):
    """OpenSSL already refuses RSA servers in ECC-only mode; the post-handshake check is
    the second lock. Run it on a live RSA connection."""
    server = tls_server([pki.rsa_leaf])
    with connect(it.create_ssl_context(pki.policy()), server.port) as tls:
        ecc = it.create_ssl_context(pki.policy(ciphers=it.CipherProfile.ECC_ONLY))
        with pytest.raises(it.PolicyViolation, match="presented an RSA-2048 certificate"):
            ecc._after_handshake(tls, (HOST, server.port))


# -- max fragment length --------------------------------------------------------------------


@pytest.mark.parametrize("version", [V12, V13])
@pytest.mark.parametrize("mfl", [512, 4096])
def test_fragment_length_on_the_wire(pki, tls_server, version, mfl):
    payload = b"x" * 65536
    server = tls_server([pki.rsa_leaf], max_version=version, payload=payload)
    results = {}
    for asked in (mfl, None):
        with RecordRelay(server.port) as relay:
            ctx = it.create_ssl_context(pki.policy(max_fragment_length=asked))
            with connect(ctx, relay.port, read=False) as tls:
                got = b""
                while len(got) < len(payload):
                    got += tls.recv(65536)
                info = it.tls_info(tls)
            relay.wait_idle()
            down = relay.logs[0][1]
            app = [length for ctype, length in down.records if ctype == 23]
            results[asked] = (info.max_fragment_length, max(app))
    negotiated, largest = results[mfl]
    assert negotiated == mfl
    # plaintext <= mfl; the AEAD tag, explicit nonce (1.2) or content type (1.3) add < 64 B
    assert mfl < largest <= mfl + 64 or largest == mfl
    assert results[None][0] is None and results[None][1] > 16000


def test_required_fragment_length_not_honoured_is_a_violation(pki, tls_server):
    server = tls_server([pki.rsa_leaf])
    with connect(it.create_ssl_context(pki.policy()), server.port) as plain:
        strict = it.create_ssl_context(
            pki.policy(max_fragment_length=1024, require_max_fragment_length=True)
        )
        with pytest.raises(it.PolicyViolation, match="did not honour max_fragment_length=1024"):
            strict._after_handshake(plain, (HOST, server.port))


def test_required_fragment_length_honoured_is_accepted(pki, tls_server):
    server = tls_server([pki.rsa_leaf])
    ctx = it.create_ssl_context(
        pki.policy(max_fragment_length=1024, require_max_fragment_length=True)
    )
    with connect(ctx, server.port) as tls:
        assert it.tls_info(tls).max_fragment_length == 1024


# -- resumption -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [V12, V13])
def test_second_connection_resumes_with_fewer_bytes(pki, tls_server, version):
    server = tls_server([pki.rsa_leaf], max_version=version)
    ctx = it.create_ssl_context(pki.policy())
    with RecordRelay(server.port) as relay:
        infos = []
        for _ in range(2):
            with connect(ctx, relay.port) as tls:
                infos.append(it.tls_info(tls))
        relay.wait_idle()
        # same payload both times: the difference is the handshake
        full, resumed = (down.total_bytes for _, down in relay.logs)
    assert [i.session_reused for i in infos] == [False, True]
    assert server.wait_accepted(2)[-1].session_reused
    # a resumed handshake carries no certificate chain
    assert resumed < full * 0.5, (full, resumed)
    assert infos[1].anchor == infos[0].anchor and infos[1].chain == infos[0].chain


def test_resumption_off_means_full_handshakes(pki, tls_server):
    server = tls_server([pki.rsa_leaf])
    ctx = it.create_ssl_context(pki.policy(session_resumption=False))
    reused = []
    for _ in range(2):
        with connect(ctx, server.port) as tls:
            reused.append(it.tls_info(tls).session_reused)
    assert reused == [False, False]


def test_session_is_not_offered_to_another_host(pki, tls_server):
    server = tls_server([pki.rsa_leaf])
    ctx = it.create_ssl_context(pki.policy())
    connect(ctx, server.port, HOST).close()
    with connect(ctx, server.port, "localhost") as tls:
        assert it.tls_info(tls).session_reused is False


def _session_property_reads(run):
    """Calls of the ``session`` getters of SSLSocket / SSLObject made by ``run()`` in this
    thread (both are Python properties in ssl.py, so the profiler sees them)."""
    getters = {ssl.SSLSocket.session.fget.__code__, ssl.SSLObject.session.fget.__code__}
    reads = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in getters:
            reads.append(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return reads


@pytest.mark.parametrize("version", [V12, V13])
def test_resumption_never_reads_the_leaking_session_property(pki, tls_server, version):
    """Each read of SSLSocket.session leaks a native SSL_SESSION (~6 KB) on CPython
    3.10-3.11, 3.12 before 3.12.7 and 3.13.0 (CPython gh-116810). TLS 1.3 brings a new
    ticket with every connection, so capturing it that way leaked once per handshake.
    With the shim the session is kept serialised and offered through libssl directly."""
    server = tls_server([pki.rsa_leaf], max_version=version)
    ctx = it.create_ssl_context(pki.policy())
    reused = []

    def connections():
        for _ in range(6):
            with connect(ctx, server.port) as tls:
                reused.append(it.tls_info(tls).session_reused)

    assert _session_property_reads(connections) == []
    assert reused == [False, True, True, True, True, True]  # resumption still works
    assert all(a.session_reused for a in server.wait_accepted(6)[1:])


def test_asyncio_resumption_never_reads_the_leaking_session_property(pki, tls_server):
    server = tls_server([pki.rsa_leaf])
    ctx = it.create_ssl_context(pki.policy())
    reused = []

    async def connections():
        for _ in range(4):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", server.port, ssl=ctx, server_hostname=HOST
            )
            await reader.readline()
            reused.append(it.tls_info(writer).session_reused)
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    assert _session_property_reads(lambda: asyncio.run(connections())) == []
    assert reused == [False, True, True, True]


def test_hardened_handshakes_do_not_grow_native_memory(pki, tls_server, tmp_path):
    """RSS over 300 TLS 1.3 handshakes through one hardened context, measured in a fresh
    process by bench/handshake_memory.py. The bound (2 KB per handshake) is generous:
    the leak it guards against added about 6 KB per handshake, a plain context adds 0."""
    server = tls_server([pki.rsa_leaf])
    roots = tmp_path / "root.pem"
    roots.write_bytes(pki.root.cert_pem)
    script = Path(__file__).resolve().parent.parent / "bench" / "handshake_memory.py"
    args = ["--port", str(server.port), "--roots", str(roots), "--warmup", "50"]
    out = subprocess.run(
        [sys.executable, str(script), "--child", "hardened-shared", *args, "--handshakes", "300"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    result = json.loads(out.stdout)
    assert result["resumed"] == 300
    assert result["bytes_per_handshake"] < 2048, result


# -- a foreign peer: openssl s_server --------------------------------------------------------


@pytest.mark.parametrize("flag,name", [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
def test_openssl_s_server_interop(pki, flag, name):
    with OpenSSLServer(pki.ec_leaf, flag) as server:
        ctx = it.create_ssl_context(
            pki.policy(ciphers=it.CipherProfile.ECC_ONLY, max_fragment_length=2048)
        )
        with connect(ctx, server.port, read=False) as tls:
            info = it.tls_info(tls)
    assert info.version == name
    assert info.server_key_type == "EC"
    assert info.max_fragment_length == 2048
    assert info.anchor == "iothub-tls Test Root G2"


def test_openssl_s_server_legacy_refusal(pki):
    with OpenSSLServer(pki.rsa_leaf, "-tls1_1", "-cipher", "ALL:@SECLEVEL=0") as server:
        with pytest.raises(it.ProtocolVersionError):
            connect(it.create_ssl_context(pki.policy()), server.port, read=False)


def test_openssl_s_server_rsa_refuses_ecc_only(pki):
    with OpenSSLServer(pki.rsa_leaf, "-tls1_3") as server:
        with pytest.raises(it.CipherSuiteError, match="ECDSA certificate"):
            connect(
                it.create_ssl_context(pki.policy(ciphers=it.CipherProfile.ECC_ONLY)),
                server.port,
                read=False,
            )


# -- a peer that stalls ---------------------------------------------------------------------


def test_stalled_handshake_times_out(pki, tls_server):
    server = tls_server([pki.rsa_leaf], stall=True)
    with pytest.raises(it.HandshakeTimeoutError) as err:
        connect(it.create_ssl_context(pki.policy()), server.port, timeout=0.5)
    assert isinstance(err.value, TimeoutError)
    assert "did not complete in time" in str(err.value)


# -- mutual TLS -----------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["rsa", "ec"])
@pytest.mark.parametrize("profile", [it.CipherProfile.STRONG, it.CipherProfile.ECC_ONLY])
def test_mutual_tls_presents_the_device_certificate(pki, tls_server, key_type, profile):
    device = new_root("Device Root", key_type=key_type)
    issued = device.issue(cn="device-001", client=True, key_type=key_type)
    identity = it.ClientIdentity.from_pem(issued.cert_chain_pem, issued.key_pem)
    server = tls_server(
        [pki.rsa_leaf, pki.ec_leaf], client_ca=device.cert_pem, require_client_cert=True
    )
    ctx = it.create_ssl_context(pki.policy(ciphers=profile), identity=identity)
    connect(ctx, server.port).close()
    seen = server.accepted[-1]
    assert seen.error is None
    from cryptography import x509

    assert x509.load_der_x509_certificate(seen.client_cert).subject == issued.cert.subject


def test_mutual_tls_without_identity_is_refused(pki, tls_server):
    device = new_root("Device Root")
    server = tls_server(
        [pki.rsa_leaf], max_version=V12, client_ca=device.cert_pem, require_client_cert=True
    )
    with pytest.raises(it.TLSHandshakeError, match="requires a device certificate") as err:
        connect(it.create_ssl_context(pki.policy()), server.port)
    assert not isinstance(err.value, it.CipherSuiteError)  # the suites were fine


# -- the context refuses to be weakened ------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        lambda c: setattr(c, "verify_mode", ssl.CERT_NONE),
        lambda c: setattr(c, "verify_mode", ssl.CERT_OPTIONAL),
        lambda c: setattr(c, "check_hostname", False),
        lambda c: setattr(c, "minimum_version", ssl.TLSVersion.TLSv1_1),
        lambda c: setattr(c, "maximum_version", ssl.TLSVersion.TLSv1_1),
        lambda c: setattr(c, "options", c.options & ~ssl.OP_NO_COMPRESSION),
        lambda c: setattr(c, "keylog_filename", "/tmp/keys.log"),
        lambda c: c.set_ciphers("AES128-SHA"),
        lambda c: c.set_ciphers("ALL"),
        lambda c: c.load_default_certs(),
        lambda c: c.set_default_verify_paths(),
        lambda c: c.load_verify_locations(cadata=new_root("Extra").cert_pem.decode()),
    ],
    ids=[
        "CERT_NONE",
        "CERT_OPTIONAL",
        "check_hostname",
        "min_tls1.1",
        "max_tls1.1",
        "options",
        "keylog",
        "weak_cipher",
        "all_ciphers",
        "load_default_certs",
        "default_verify_paths",
        "extra_anchor",
    ],
)
def test_weakening_the_context_is_refused(change):
    ctx = it.create_ssl_context()
    before = (
        ctx.verify_mode,
        ctx.check_hostname,
        ctx.minimum_version,
        ctx.options,
        len(ctx.get_ca_certs()),
        len(ctx.get_ciphers()),
    )
    with pytest.raises(it.PolicyError, match="not allowed on a HardenedSSLContext"):
        change(ctx)
    after = (
        ctx.verify_mode,
        ctx.check_hostname,
        ctx.minimum_version,
        ctx.options,
        len(ctx.get_ca_certs()),
        len(ctx.get_ciphers()),
    )
    assert after == before


def test_tightening_the_context_is_allowed():
    ctx = it.create_ssl_context()
    ctx.minimum_version = V13
    ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    ctx.verify_mode = ssl.CERT_REQUIRED  # what urllib3 does on every connection
    ctx.options |= ssl.OP_NO_TICKET
    assert ctx.minimum_version == V13


def _full_state(ctx):
    return (
        ctx.security_level,
        sorted(c["name"] for c in ctx.get_ciphers()),
        int(ctx.verify_flags),
        ctx.hostname_checks_common_name,
        int(ctx.options),
        ctx.sslsocket_class,
        ctx.sslobject_class,
    )


def test_set_ciphers_cannot_lower_the_security_level(pki, tls_server):
    weakening = "ECDHE-RSA-AES128-GCM-SHA256:@SECLEVEL=0"  # allowed names, level 0
    leaf = pki.intermediate.issue(HOST, key_size=1024, allow_weak_key=True)
    server = tls_server([leaf], ciphers="ALL")  # the server drops to SECLEVEL 0 to load it
    ctx = it.create_ssl_context(pki.policy())
    before = _full_state(ctx)
    with pytest.raises(it.PolicyError, match="lowers the OpenSSL security level to 0") as err:
        ctx.set_ciphers(weakening)
    assert "not allowed on a HardenedSSLContext" in str(err.value)
    assert _full_state(ctx) == before and ctx.security_level == 2
    with pytest.raises(it.CertificateVerificationError) as refused:
        connect(ctx, server.port)
    assert refused.value.verify_code == 66  # EE_KEY_TOO_SMALL
    # the failing twin: a plain context given the same string accepts the RSA-1024 leaf
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    plain.load_verify_locations(cadata=pki.root.cert_pem.decode())
    plain.set_ciphers(weakening)
    with connect(plain, server.port) as tls:
        assert tls.getpeercert(binary_form=True) == leaf.cert.public_bytes(Encoding.DER)


def test_common_name_matching_cannot_be_turned_on(pki, tls_server):
    cn_only = pki.intermediate.issue(cn=HOST)  # no subjectAltName: only a CN could match
    server = tls_server([cn_only])
    ctx = it.create_ssl_context(pki.policy())
    with pytest.raises(it.PolicyError, match="never the subject CN"):
        ctx.hostname_checks_common_name = True
    assert ctx.hostname_checks_common_name is False
    with pytest.raises(it.CertificateVerificationError) as refused:
        connect(ctx, server.port)
    assert refused.value.verify_code == 62  # hostname mismatch
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    plain.load_verify_locations(cadata=pki.root.cert_pem.decode())
    plain.hostname_checks_common_name = True
    with connect(plain, server.port) as tls:
        assert tls.version() is not None


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256:@SECLEVEL=1"), "security level to 1"),
        (lambda c: c.set_ciphers("ALL:@SECLEVEL=3"), "suites outside the policy"),
        (lambda c: setattr(c, "verify_flags", ssl.VERIFY_X509_TRUSTED_FIRST), "X509_STRICT"),
        (lambda c: setattr(c, "verify_flags", ssl.VERIFY_DEFAULT), "X509_STRICT"),
        (
            lambda c: setattr(c, "verify_flags", c.verify_flags | ssl.VERIFY_ALLOW_PROXY_CERTS),
            "loosen",
        ),
        (
            lambda c: setattr(c, "verify_flags", c.verify_flags | 0x200000),
            "loosen",
        ),  # NO_CHECK_TIME
        (lambda c: setattr(c, "hostname_checks_common_name", True), "subject CN"),
        (lambda c: setattr(c, "options", c.options | (1 << 10)), "ALLOW_NO_DHE_KEX"),
        (lambda c: setattr(c, "options", c.options | (1 << 19)), "ENCRYPT_THEN_MAC"),
        (lambda c: setattr(c, "options", c.options | (1 << 18)), "UNSAFE_LEGACY"),
        (lambda c: setattr(c, "sslsocket_class", ssl.SSLSocket), "policy checks"),
        (lambda c: setattr(c, "sslobject_class", ssl.SSLObject), "policy checks"),
    ],
    ids=[
        "seclevel1",
        "all_ciphers_seclevel3",
        "no_strict",
        "verify_default",
        "proxy_certs",
        "no_check_time",
        "cn_matching",
        "no_dhe_kex",
        "no_etm",
        "unsafe_renegotiation",
        "socket_class",
        "object_class",
    ],
)
def test_weakening_security_level_flags_and_classes_is_refused(change, message):
    ctx = it.create_ssl_context()
    before = _full_state(ctx)
    with pytest.raises(it.PolicyError, match="not allowed on a HardenedSSLContext") as err:
        change(ctx)
    assert message in str(err.value)
    assert _full_state(ctx) == before


def test_tightening_security_level_and_flags_is_allowed(pki, tls_server):
    ctx = it.create_ssl_context(pki.policy())
    ctx.set_ciphers("ECDHE-RSA-AES256-GCM-SHA384:@SECLEVEL=3")
    assert ctx.security_level == 3
    ctx.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")  # keeps level 3
    assert ctx.security_level == 3
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.hostname_checks_common_name = False
    ctx.sslsocket_class = type("Mine", (it.tls.context.HardenedSSLSocket,), {})
    # level 3 wants RSA 3072+: the 2048-bit test leaf is now refused, as asked
    server = tls_server([pki.rsa_leaf])
    with pytest.raises(it.CertificateVerificationError) as refused:
        connect(ctx, server.port)
    assert refused.value.verify_code == 66


def test_server_side_and_missing_hostname_are_refused():
    ctx = it.create_ssl_context()
    with socket.socket() as raw:
        with pytest.raises(it.PolicyError, match="server_hostname is required"):
            ctx.wrap_socket(raw)
        with pytest.raises(it.PolicyError, match="clients"):
            ctx.wrap_socket(raw, server_side=True)


# -- the shim missing -----------------------------------------------------------------------


def test_without_shim_requested_protections_fail_loudly(no_shim):
    with pytest.raises(it.FeatureUnavailableError, match="ECC-only mode"):
        it.create_ssl_context(it.TlsPolicy(ciphers=it.CipherProfile.ECC_ONLY))
    with pytest.raises(it.FeatureUnavailableError, match="max_fragment_length") as err:
        it.create_ssl_context(it.TlsPolicy(max_fragment_length=512))
    assert "statically linked" in str(err.value)


def test_without_shim_the_default_policy_still_connects(pki, tls_server, no_shim):
    server = tls_server([pki.rsa_leaf])
    with connect(it.create_ssl_context(pki.policy()), server.port) as tls:
        info = it.tls_info(tls)
    assert info.version == "TLSv1.3"
    # the verified chain comes from Python's get_verified_chain(), not the shim
    assert info.chain == (HOST, "iothub-tls Test Issuing CA", "iothub-tls Test Root G2")
    assert info.anchor == "iothub-tls Test Root G2"


def test_verified_chain_without_the_shim_anchors_system_trust(
    pki, tls_server, tmp_path, monkeypatch, no_shim
):
    """Trust.SYSTEM checks the anchor of the verified chain: it must work without the
    shim (Python 3.13 hands the chain out as DER bytes, 3.10-3.12 as certificate
    objects), and still refuse an anchor outside the policy's roots."""
    bundle = tmp_path / "system-store.pem"
    bundle.write_bytes(pki.root.cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # the "OS store" for this test
    server = tls_server([pki.rsa_leaf])
    allowed = it.create_ssl_context(pki.policy(trust=it.Trust.SYSTEM))
    with connect(allowed, server.port) as tls:
        info = it.tls_info(tls)
    assert info.anchor == "iothub-tls Test Root G2"
    assert info.chain == (HOST, "iothub-tls Test Issuing CA", "iothub-tls Test Root G2")
    trusted_elsewhere = it.create_ssl_context(it.TlsPolicy(trust=it.Trust.SYSTEM))
    with pytest.raises(it.PolicyViolation, match="system store trusts but the policy does not"):
        connect(trusted_elsewhere, server.port)


def test_chain_to_der_takes_bytes_and_certificate_objects(pki, tls_server):
    from iothub_tls.tls.info import chain_to_der

    server = tls_server([pki.rsa_leaf])
    with connect(it.create_ssl_context(pki.policy()), server.port) as tls:
        objects = tls._sslobj.get_verified_chain()  # _ssl.Certificate objects (3.10+)
        expected = [
            c.public_bytes(Encoding.DER) for c in (pki.rsa_leaf.cert, *pki.rsa_leaf.chain)
        ] + [pki.root.cert.public_bytes(Encoding.DER)]
        assert chain_to_der(objects) == expected
        assert chain_to_der(expected) == expected  # Python 3.13's shape: DER bytes
        assert chain_to_der([bytearray(expected[0])]) == expected[:1]
        assert chain_to_der(None) is None
        assert chain_to_der([object()]) is None  # unknown shape: try the next source


# No 32-bit or LibreSSL platform is at hand: the choice the shim makes for them is pure
# logic on (OPENSSL_VERSION_NUMBER, OPENSSL_VERSION) and is tested as such.
@pytest.mark.parametrize(
    "number,text,expected",
    [
        (0x30000160, "OpenSSL 3.0.22 25 Aug 2026", ctypes.c_uint64),  # uint64_t
        (0x30500010, "OpenSSL 3.5.1 1 Jul 2025", ctypes.c_uint64),
        (0x1010117F, "OpenSSL 1.1.1w  11 Sep 2023", ctypes.c_ulong),  # unsigned long
        (0x1010100F, "OpenSSL 1.1.1  11 Sep 2018", ctypes.c_ulong),
    ],
)
def test_shim_reads_ssl_ctx_get_options_with_the_declared_width(number, text, expected):
    from iothub_tls.tls._openssl import options_restype

    assert options_restype(number, text) is expected


@pytest.mark.parametrize(
    "number,text,words",
    [
        (0x20000000, "LibreSSL 3.8.2", ["LibreSSL is not supported", "ECC-only", "fragment"]),
        (0x20000000, "LibreSSL 2.8.3", ["LibreSSL is not supported", "0x20000000"]),
        (0x1010007F, "OpenSSL 1.1.0g  2 Nov 2017", ["too old", "1.1.1 or later"]),
    ],
)
def test_shim_explains_the_libssl_it_cannot_use(number, text, words):
    from iothub_tls.tls._openssl import options_restype

    reason = options_restype(number, text)
    assert isinstance(reason, str)
    for word in words:
        assert word in reason
    if text.startswith("LibreSSL"):
        assert "1.1.1 or later is needed" not in reason  # the old, misleading message


def test_shim_on_this_platform_uses_the_width_it_selects():
    from iothub_tls.tls._openssl import options_restype, shim

    chosen = options_restype(ssl.OPENSSL_VERSION_NUMBER, ssl.OPENSSL_VERSION)
    assert shim("test")._f["SSL_CTX_get_options"].restype is chosen
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert shim("test").ctx_pointer(ctx)  # validated through SSL_CTX_get_options


def test_libressl_python_gets_a_refusal_naming_libressl(monkeypatch):
    from iothub_tls.tls import _openssl

    monkeypatch.setattr(ssl, "OPENSSL_VERSION", "LibreSSL 3.8.2")
    _openssl._reset()
    try:
        with pytest.raises(it.FeatureUnavailableError, match="LibreSSL is not supported"):
            it.create_ssl_context(it.TlsPolicy(ciphers=it.CipherProfile.ECC_ONLY))
    finally:
        monkeypatch.undo()
        _openssl._reset()
    assert _openssl.shim_status()[0] is True


# -- asyncio (wrap_bio / SSLObject) ----------------------------------------------------------


def test_asyncio_handshake_runs_the_same_checks(pki, tls_server):
    ok_server = tls_server([pki.ec_leaf])
    rsa_server = tls_server([pki.rsa_leaf])
    ctx = it.create_ssl_context(pki.policy(ciphers=it.CipherProfile.ECC_ONLY))

    async def main():
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", ok_server.port, ssl=ctx, server_hostname=HOST
        )
        await reader.read(6)
        info = it.tls_info(writer)
        writer.close()
        with pytest.raises(it.CipherSuiteError):
            await asyncio.open_connection(
                "127.0.0.1", rsa_server.port, ssl=ctx, server_hostname=HOST
            )
        return info

    info = asyncio.run(main())
    assert info.server_key_type == "EC"


# -- SYSTEM trust ---------------------------------------------------------------------------


def test_system_trust_requires_the_anchor_to_be_a_policy_root(
    pki, tls_server, tmp_path, monkeypatch
):
    bundle = tmp_path / "system-store.pem"
    bundle.write_bytes(pki.root.cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # the "OS store" for this test
    server = tls_server([pki.rsa_leaf])
    trusted_elsewhere = it.create_ssl_context(it.TlsPolicy(trust=it.Trust.SYSTEM))
    with pytest.raises(it.PolicyViolation, match="system store trusts but the policy does not"):
        connect(trusted_elsewhere, server.port)
    allowed = it.create_ssl_context(pki.policy(trust=it.Trust.SYSTEM))
    with connect(allowed, server.port) as tls:
        assert it.tls_info(tls).anchor == "iothub-tls Test Root G2"


# -- more refusals that explain themselves ----------------------------------------------------


def test_a_port_that_does_not_speak_tls(pki):
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def answer_http():
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        conn.close()

    threading.Thread(target=answer_http, daemon=True).start()
    try:
        with pytest.raises(it.TLSHandshakeError, match="did not answer with TLS"):
            connect(it.create_ssl_context(pki.policy()), listener.getsockname()[1])
    finally:
        listener.close()


def test_device_certificate_from_an_unknown_ca_is_explained(pki, tls_server):
    server = tls_server(
        [pki.rsa_leaf],
        max_version=V12,
        client_ca=new_root("Registered Device CA").cert_pem,
        require_client_cert=True,
    )
    stranger = new_root("Unregistered CA").issue(cn="device-9", client=True)
    identity = it.ClientIdentity.from_pem(stranger.cert_chain_pem, stranger.key_pem)
    with pytest.raises(it.TLSHandshakeError, match="refused this device's certificate") as err:
        connect(it.create_ssl_context(pki.policy(), identity=identity), server.port)
    assert err.value.reason == "TLSV1_ALERT_UNKNOWN_CA"


def test_a_stalled_attempt_keeps_the_session_for_the_next_reconnect(pki, tls_server):
    server = tls_server([pki.rsa_leaf], max_version=V12)
    ctx = it.create_ssl_context(pki.policy())
    connect(ctx, server.port).close()
    server.stall = True  # the network misbehaves once
    with pytest.raises(it.HandshakeTimeoutError):
        connect(ctx, server.port, timeout=0.3)
    server.stall = False
    with connect(ctx, server.port) as tls:
        assert it.tls_info(tls).session_reused is True


@pytest.mark.parametrize("version", [V12, V13])
def test_a_connection_dropped_mid_handshake_keeps_the_session_resumable(pki, tls_server, version):
    """The server closes the TCP connection in the middle of a resuming handshake (a
    flaky network, not a refusal): the context keeps what it remembers (it offered a
    copy of it), and the next attempt resumes."""
    server = tls_server([pki.rsa_leaf], max_version=version)
    ctx = it.create_ssl_context(pki.policy())
    connect(ctx, server.port).close()
    server.stall = True
    failures: list[BaseException] = []

    def attempt() -> None:
        try:
            connect(ctx, server.port, timeout=5)
        except BaseException as exc:  # reported below
            failures.append(exc)

    caller = threading.Thread(target=attempt)
    caller.start()
    deadline = time.monotonic() + 5
    while not server._held and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # the ClientHello (offering the session) is on its way
    server.stall = False
    server._held.pop().close()  # EOF in the middle of the handshake
    caller.join(10)
    assert len(failures) == 1 and isinstance(failures[0], it.HandshakeClosedError), failures
    with connect(ctx, server.port) as tls:
        assert it.tls_info(tls).session_reused is True


def test_a_refusal_forgets_the_session(pki, tls_server):
    server = tls_server([pki.rsa_leaf], max_version=V12)
    ctx = it.create_ssl_context(pki.policy())
    connect(ctx, server.port).close()
    assert ctx._recall((HOST, server.port)) is not None
    with pytest.raises(it.CertificateVerificationError):
        connect(ctx, server.port, host="localhost.invalid")
    assert ctx._recall(("localhost.invalid", server.port)) is None
