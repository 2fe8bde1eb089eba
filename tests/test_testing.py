"""iothub_tls.testing: the test PKI's knobs for refusal tests, its key pool, and the
servers built on it (real handshakes; the PKI's CLI side is in test_cli.py)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import iothub_tls as it
from iothub_tls.testing.pki import (
    ORGANIZATION,
    CertificateAuthority,
    Issued,
    KeyPool,
    KeyType,
    WrittenFiles,
    self_signed,
)
from iothub_tls.testing.server import HubLikeServer, OpenSSLServer, TLSServer
from tests.conftest import HOST, KEYS, PKI, connect

UTC = dt.timezone.utc


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return names.get_values_for_type(x509.DNSName), [
        str(a) for a in names.get_values_for_type(x509.IPAddress)
    ]


def _cns(cert: x509.Certificate) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


# -- what a certificate says --------------------------------------------------------------


def test_server_certificate_names_purpose_and_chain(pki: PKI) -> None:
    leaf = pki.intermediate.issue(HOST, "localhost", "127.0.0.1", "::1")
    assert _sans(leaf.cert) == ([HOST, "localhost"], ["127.0.0.1", "::1"])
    assert _cns(leaf.cert) == [HOST]
    assert _eku(leaf.cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.chain == (pki.intermediate.certificate,)
    assert leaf.cert.issuer == pki.intermediate.cert.subject
    basic = leaf.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is False
    assert ORGANIZATION in leaf.cert.subject.rfc4514_string()


def test_client_certificate_and_the_odd_subjects(pki: PKI) -> None:
    device = pki.intermediate.issue(cn="device-7", client=True, key_type="ec")
    assert _eku(device.cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _cns(device.cert) == ["device-7"]
    with pytest.raises(x509.ExtensionNotFound):  # no names: no subjectAltName at all
        device.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert isinstance(device.key, ec.EllipticCurvePrivateKey)
    anonymous = pki.intermediate.issue(client=True)
    assert _cns(anonymous.cert) == []
    cn_only = pki.intermediate.issue(cn=HOST)
    assert _cns(cn_only.cert) == [HOST] and _eku(cn_only.cert) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_validity_window_is_what_was_asked(pki: PKI) -> None:
    start = dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
    end = dt.datetime(2020, 2, 2, 3, 4, 5, tzinfo=UTC)
    old = pki.intermediate.issue(HOST, not_before=start, not_after=end)
    assert (old.cert.not_valid_before_utc, old.cert.not_valid_after_utc) == (start, end)
    ten = pki.intermediate.issue(HOST, not_before=start, days=10)
    assert ten.cert.not_valid_after_utc - ten.cert.not_valid_before_utc == dt.timedelta(days=10)
    now = dt.datetime.now(UTC)
    default = pki.intermediate.issue(HOST)
    assert default.cert.not_valid_before_utc <= now <= default.cert.not_valid_after_utc


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"days": 3, "not_after": dt.datetime(2030, 1, 1, tzinfo=UTC)}, "not both"),
        ({"not_after": dt.datetime(2030, 1, 1)}, "not_after must be timezone-aware"),
        ({"not_before": dt.datetime(2030, 1, 1)}, "not_before must be timezone-aware"),
        (
            {
                "not_before": dt.datetime(2030, 1, 1, tzinfo=UTC),
                "not_after": dt.datetime(2029, 1, 1, tzinfo=UTC),
            },
            "must be later than not_before",
        ),
        ({"days": 0}, "1 or more"),
        ({"key_size": 1024}, "or pass allow_weak_key=True"),
        ({"key_size": 1000}, "RSA key size 1000 is not supported"),
        ({"key_type": "ec", "key_size": 521}, "EC key size 521 is not supported"),
        ({"key_type": "dsa"}, "unknown key type 'dsa'"),
        ({"key": ed25519.Ed25519PrivateKey.generate(), "key_type": "ec"}, "not both"),
        ({"key": x25519.X25519PrivateKey.generate()}, "not X25519PrivateKey"),
        ({"cn": ""}, "a common name must be a non-empty string"),
    ],
)
def test_bad_input_is_a_clear_value_error(
    pki: PKI, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        pki.intermediate.issue(HOST, **kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_bad_names_are_refused(pki: PKI) -> None:
    with pytest.raises(ValueError, match="neither a DNS name nor an IP address"):
        pki.intermediate.issue("not a host!")
    with pytest.raises(ValueError, match="needs a DNS name, an IP address or a cn"):
        self_signed()


def test_weak_rsa_key_only_when_asked() -> None:
    with pytest.raises(ValueError, match="RSA key size 1024 is not supported"):
        KeyType.RSA.generate(1024)
    weak = KeyType.RSA.generate(1024, allow_weak=True)
    assert isinstance(weak, rsa.RSAPrivateKey) and weak.key_size == 1024
    root = CertificateAuthority.root("Weak Keys Root", key_pool=KEYS)
    leaf = root.issue(HOST, key_size=1024, allow_weak_key=True)
    assert leaf.cert.public_key().key_size == 1024  # type: ignore[union-attr]


def test_certificates_for_keys_you_bring(pki: PKI) -> None:
    """What the code under test must refuse can still be certified."""
    for key in (
        ed25519.Ed25519PrivateKey.generate(),
        dsa.generate_private_key(key_size=1024),
        ec.generate_private_key(ec.SECP256K1()),
    ):
        issued = pki.intermediate.issue(cn="odd-device", client=True, key=key)
        assert issued.key is key
        assert issued.cert.public_key() == key.public_key()


def test_self_signed_leaf_is_its_own_issuer_and_no_ca() -> None:
    leaf = self_signed(HOST, key_type=KeyType.EC)
    assert leaf.cert.issuer == leaf.cert.subject and leaf.chain == ()
    assert not leaf.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    leaf.cert.verify_directly_issued_by(leaf.cert)
    with pytest.raises(ValueError, match="is not a CA certificate"):
        CertificateAuthority(leaf)


def test_short_names_are_the_long_ones(pki: PKI) -> None:
    leaf = pki.rsa_leaf
    assert leaf.cert is leaf.certificate and leaf.key is leaf.private_key
    assert leaf.cert_chain_pem == leaf.chain_pem == leaf.cert_pem + pki.intermediate.cert_pem
    ca = pki.intermediate
    assert ca.cert is ca.certificate and ca.key is ca.private_key
    assert ca.cert_pem == ca.issued.cert_pem
    assert "PRIVATE" not in repr(leaf) + repr(ca)


def test_issued_is_a_value(pki: PKI) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        pki.rsa_leaf.chain = ()  # type: ignore[misc]
    bare = dataclasses.replace(pki.rsa_leaf, chain=[])  # type: ignore[arg-type]
    assert bare.chain == () and bare.chain_pem == bare.cert_pem
    again = Issued.from_pem(pki.rsa_leaf.chain_pem, pki.rsa_leaf.key_pem)
    assert (again.cert, again.chain) == (pki.rsa_leaf.cert, pki.rsa_leaf.chain)
    with pytest.raises(ValueError, match="does not belong to the certificate"):
        Issued.from_pem(pki.rsa_leaf.chain_pem, pki.ec_leaf.key_pem)


def test_write_unpacks_and_protects_the_key(pki: PKI, tmp_path: Path) -> None:
    files = pki.ec_leaf.write(tmp_path / "new" / "dir", "server")
    assert isinstance(files, WrittenFiles)
    cert, key = files
    assert (cert, key) == (files.certificate, files.private_key)
    assert cert.read_bytes() == pki.ec_leaf.chain_pem and key.read_bytes() == pki.ec_leaf.key_pem
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "new" / "dir").stat().st_mode) == 0o700
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        pki.rsa_leaf.write(tmp_path / "new" / "dir", "server")
    assert cert.read_bytes() == pki.ec_leaf.chain_pem
    pki.rsa_leaf.write(tmp_path / "new" / "dir", "server", force=True)
    assert cert.read_bytes() == pki.rsa_leaf.chain_pem


# -- the key pool -------------------------------------------------------------------------


def test_key_pool_makes_size_keys_then_deals_them_again() -> None:
    pool = KeyPool(size=2)
    first = [pool.key(KeyType.EC) for _ in range(2)]
    assert first[0] is not first[1]
    assert [pool.key("ec") for _ in range(4)] == [*first, *first]
    assert pool.key("ec", 384) not in first  # each size has its own keys
    with pytest.raises(ValueError, match="1 or more"):
        KeyPool(size=0)


def test_key_pool_is_shared_by_threads() -> None:
    pool = KeyPool(size=3)
    got: list[object] = []
    workers = [threading.Thread(target=lambda: got.append(pool.key("ec"))) for _ in range(9)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len({id(k) for k in got}) == 3 and len(got) == 9


def test_a_ca_draws_leaf_keys_from_its_pool_never_its_own() -> None:
    pool = KeyPool(size=1)
    root = CertificateAuthority.root("Pool Root", key_type="ec", key_pool=pool)
    inter = root.intermediate("Pool Issuing", key_type="ec")
    assert inter.key_pool is pool
    a, b = root.issue(HOST, key_type="ec"), inter.issue(HOST, key_type="ec")
    assert a.key is b.key  # one key in the pool
    assert root.key is not a.key and inter.key is not a.key
    alone = CertificateAuthority.root("No Pool Root", key_type="ec")
    assert alone.issue(HOST, key_type="ec").key is not alone.issue(HOST, key_type="ec").key


# -- servers built on it ------------------------------------------------------------------


def test_expired_and_weak_servers_are_refused_and_the_good_twin_accepted(
    pki: PKI, tls_server
) -> None:
    now = dt.datetime.now(UTC)
    good = tls_server([pki.intermediate.issue(HOST, key_type="ec")])
    with connect(it.create_ssl_context(pki.policy()), good.port) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    past, yesterday = now - dt.timedelta(days=9), now - dt.timedelta(days=1)
    expired = pki.intermediate.issue(HOST, key_type="ec", not_before=past, not_after=yesterday)
    server = tls_server([expired])
    with pytest.raises(it.CertificateVerificationError) as refused:
        connect(it.create_ssl_context(pki.policy()), server.port)
    assert refused.value.verify_code == 10 and "device clock" in str(refused.value)
    assert server.wait_accepted()[0].error


def _offered_key(ctx: ssl.SSLContext, port: int) -> str:
    with connect(ctx, port, read=False) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    key = x509.load_der_x509_certificate(der).public_key()
    return "EC" if isinstance(key, ec.EllipticCurvePublicKey) else "RSA"


def test_hub_like_server_presents_rsa_unless_the_device_is_ecc_only(pki: PKI) -> None:
    with HubLikeServer([pki.rsa_leaf, pki.ec_leaf]) as hub:
        strong = it.create_ssl_context(pki.policy())
        ecc = it.create_ssl_context(pki.policy(ciphers=it.CipherProfile.ECC_ONLY))
        assert _offered_key(strong, hub.port) == "RSA"
        first = hub.next_finished()
        assert _offered_key(ecc, hub.port) == "EC"
        second = hub.next_finished()
    assert first.error is None and second.error is None
    assert first.version == second.version == "TLSv1.3"
    assert hub.accepted == [first, second]


def test_tls_server_refuses_to_start_without_a_certificate() -> None:
    with pytest.raises(ValueError, match="at least one certificate"):
        TLSServer([])
    with pytest.raises(ValueError, match="needs client_ca"):
        TLSServer([self_signed(HOST)], require_client_cert=True)


def test_openssl_server_requires_the_client_certificate_it_was_told_to(pki: PKI) -> None:
    device = pki.intermediate.issue(cn="device-1", client=True, key_type="ec")
    with OpenSSLServer(pki.ec_leaf, "-tls1_2", "-rev", client_ca=pki.root.cert_pem) as server:
        without = it.create_ssl_context(pki.policy())
        with pytest.raises(ssl.SSLError), connect(without, server.port, read=False) as tls:
            tls.sendall(b"x")
            tls.recv(1)
        identity = it.ClientIdentity.from_pem(device.chain_pem, device.key_pem)
        ctx = it.create_ssl_context(pki.policy(), identity=identity)
        with connect(ctx, server.port, read=False) as tls:
            assert tls.version() == "TLSv1.2"
            tls.sendall(b"ping\n")
            assert tls.recv(64) == b"gnip\n"  # -rev: each line back, reversed


@pytest.mark.parametrize("name", ["pki", "server", "relay", "faultproxy", "brokers", "ports"])
def test_the_page_presents_each_module_s_classes_and_functions(name: str) -> None:
    import importlib

    module = importlib.import_module(f"iothub_tls.testing.{name}")
    text = (Path(__file__).resolve().parent.parent / "docs" / "testing.md").read_text()
    own = [
        n
        for n in module.__all__
        if callable(getattr(module, n)) and getattr(module, n).__module__ == module.__name__
    ]
    assert own, name
    assert [n for n in own if f"`{n}" not in text] == []
