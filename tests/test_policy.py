"""TlsPolicy validation, the cipher table and the shipped roots."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import ssl
from pathlib import Path

import certifi
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import iothub_tls as it
from iothub_tls import roots as roots_module
from iothub_tls.policy import CIPHER_SUITES, ECC_SUITES, STRONG_SUITES, WEAK_SUITES, iana_name
from tests.conftest import new_root

# -- policy ----------------------------------------------------------------------------------


def test_defaults_are_the_guidance():
    p = it.TlsPolicy()
    assert p.min_version is ssl.TLSVersion.TLSv1_2
    assert p.max_version is None
    assert p.ciphers is it.CipherProfile.STRONG
    assert p.roots is it.AZURE_GLOBAL
    assert p.trust is it.Trust.PINNED
    assert p.max_fragment_length is None and not p.require_max_fragment_length
    assert p.session_resumption is True


def test_policy_is_frozen_and_variants_are_validated():
    p = it.TlsPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.min_version = ssl.TLSVersion.TLSv1_3  # type: ignore[misc]
    q = dataclasses.replace(p, ciphers=it.CipherProfile.ECC_ONLY, max_fragment_length=1024)
    assert q.ecc_only and q.max_fragment_length == 1024
    with pytest.raises(it.PolicyError):
        dataclasses.replace(p, max_fragment_length=100)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"min_version": ssl.TLSVersion.TLSv1_1}, "retired TLS 1.0 and 1.1"),
        ({"min_version": ssl.TLSVersion.TLSv1}, "requires TLS 1.2 or later"),
        ({"min_version": ssl.TLSVersion.SSLv3}, "not allowed"),
        ({"min_version": ssl.TLSVersion.MINIMUM_SUPPORTED}, "not allowed"),
        ({"min_version": "1.2"}, "must be an ssl.TLSVersion"),
        ({"max_version": ssl.TLSVersion.TLSv1_1}, "not allowed"),
        ({"min_version": ssl.TLSVersion.TLSv1_3, "max_version": ssl.TLSVersion.TLSv1_2}, "below"),
        ({"max_version": 772}, "must be an ssl.TLSVersion"),
        ({"ciphers": "STRONG"}, "must be a CipherProfile"),
        ({"roots": [it.AZURE_GLOBAL]}, "must be a RootSet"),
        ({"trust": "system"}, "Trust.PINNED or Trust.SYSTEM"),
        ({"max_fragment_length": 256}, "512, 1024, 2048 or 4096"),
        ({"max_fragment_length": 8192}, "512, 1024, 2048 or 4096"),
        ({"max_fragment_length": "512"}, "512, 1024, 2048 or 4096"),
        ({"max_fragment_length": True}, "512, 1024, 2048 or 4096"),
        ({"require_max_fragment_length": True}, "needs max_fragment_length"),
        ({"session_resumption": "yes"}, "True or False"),
    ],
)
def test_invalid_policies_are_refused(kwargs, message):
    with pytest.raises(it.PolicyError, match=re.escape(message)) as err:
        it.TlsPolicy(**kwargs)
    assert isinstance(err.value, ValueError)


def test_create_ssl_context_refuses_a_non_policy():
    with pytest.raises(it.PolicyError, match="must be a TlsPolicy"):
        it.create_ssl_context({"min_version": "1.2"})  # type: ignore[arg-type]


# -- the cipher table ------------------------------------------------------------------------

DESIGN_STRONG = [
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384",
]


def test_cipher_table_shape():
    assert [s.iana for s in STRONG_SUITES] == DESIGN_STRONG
    assert [s.iana for s in ECC_SUITES] == DESIGN_STRONG[:4]
    assert len(WEAK_SUITES) == 10 and len(CIPHER_SUITES) == 18
    assert len({s.iana for s in CIPHER_SUITES}) == 18
    assert not any(s.strong for s in WEAK_SUITES)


@pytest.mark.parametrize("suite", CIPHER_SUITES, ids=lambda s: s.iana)
def test_each_openssl_name_is_the_iana_suite(suite):
    """OpenSSL knows every name in the table and maps it to the same suite (RFC ids)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers(suite.openssl + ":@SECLEVEL=0")
    names = [c for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"]
    assert [c["name"] for c in names] == [suite.openssl]
    assert iana_name(suite.openssl) == suite.iana
    auth = names[0]["auth"]
    assert auth == ("auth-ecdsa" if suite.authentication == "ECDSA" else "auth-rsa")


def test_iana_name_passes_tls13_names_through():
    assert iana_name("TLS_AES_128_GCM_SHA256") == "TLS_AES_128_GCM_SHA256"


# -- roots -----------------------------------------------------------------------------------


def _certifi_der() -> dict[str, bytes]:
    blocks = re.findall(
        rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----",
        Path(certifi.where()).read_bytes(),
        re.S,
    )
    out = {}
    for block in blocks:
        # decode without parsing: certifi holds roots newer cryptography refuses to parse
        der = ssl.PEM_cert_to_DER_cert(block.decode())
        out[hashlib.sha256(der).hexdigest()] = der
    return out


@pytest.mark.parametrize("root_set", [it.AZURE_GLOBAL, it.AZURE_ECC], ids=lambda r: r.name)
def test_shipped_roots_are_der_identical_to_certifi(root_set):
    certifi_roots = _certifi_der()
    for cert, fp in zip(root_set, root_set.fingerprints, strict=True):
        der = cert.public_bytes(serialization.Encoding.DER)
        assert hashlib.sha256(der).hexdigest() == fp
        assert certifi_roots[fp] == der


def test_shipped_root_names_and_fingerprints():
    assert it.AZURE_GLOBAL.common_names == (
        "DigiCert Global Root G2",
        "Microsoft RSA Root Certificate Authority 2017",
    )
    assert it.AZURE_ECC.common_names == (
        "DigiCert Global Root G3",
        "Microsoft ECC Root Certificate Authority 2017",
    )
    assert it.AZURE_GLOBAL.fingerprints[0] == (
        "cb3ccbb76031e5e0138f8dd39a23f9de47ffc35e43c1144cea27d46a5ab1cb5f"
    )


def test_root_sets_combine_without_duplicates():
    both = it.AZURE_GLOBAL + it.AZURE_ECC
    assert len(both) == 4
    assert len(both + it.AZURE_GLOBAL) == 4
    assert next(iter(both)) in it.AZURE_GLOBAL
    ctx = it.create_ssl_context(it.TlsPolicy(roots=both))
    assert len(ctx.get_ca_certs()) == 4


def _tampered_package(tmp_path: Path, mutate) -> Path:
    package = Path(roots_module.__file__).parent
    for pem_file in package.glob("*.pem"):
        (tmp_path / pem_file.name).write_bytes(pem_file.read_bytes())
    target = tmp_path / "digicert_global_root_g2.pem"
    target.write_bytes(mutate(target.read_bytes()))
    return tmp_path


def test_tampered_shipped_root_is_an_error(tmp_path, monkeypatch):
    other = new_root("DigiCert Global Root G2")  # same name, different key: a substitution
    folder = _tampered_package(tmp_path, lambda _: other.cert_pem)
    monkeypatch.setattr(roots_module, "_read_shipped", lambda name: (folder / name).read_bytes())
    with pytest.raises(it.RootIntegrityError, match="was altered: reinstall"):
        roots_module.load_shipped("AZURE_GLOBAL")


def test_truncated_shipped_root_is_an_error(tmp_path, monkeypatch):
    folder = _tampered_package(tmp_path, lambda data: data[: len(data) // 2])
    monkeypatch.setattr(roots_module, "_read_shipped", lambda name: (folder / name).read_bytes())
    with pytest.raises(it.RootIntegrityError, match="damaged"):
        roots_module.load_shipped("AZURE_GLOBAL")


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "is not PEM data"),
        (b"hello", "is not PEM data"),
        (
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "certificate 1 in the root certificate data is corrupt",
        ),
    ],
)
def test_bad_root_pem(data, message):
    with pytest.raises(it.RootStoreError, match=message):
        it.RootSet.from_pem(data)


def test_leaf_is_not_a_root():
    leaf = new_root().issue("example.test").cert
    with pytest.raises(it.RootStoreError, match="not a root certificate"):
        it.RootSet([leaf])


def test_root_file_errors(tmp_path):
    with pytest.raises(it.RootStoreError, match="cannot read the root certificate file"):
        it.RootSet.from_pem_file(tmp_path / "missing.pem")
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(it.RootStoreError, match=r"bad\.pem"):
        it.RootSet.from_pem_file(bad)
    good = tmp_path / "private-root.pem"
    good.write_bytes(new_root("Private Root").cert_pem)
    assert it.RootSet.from_pem_file(good).common_names == ("Private Root",)


def test_empty_root_set_is_refused():
    with pytest.raises(it.RootStoreError, match="at least one"):
        it.RootSet([])


@pytest.mark.parametrize("data", [7329322839, 7, None, 1.5, [1, 2], object()])
def test_root_pem_of_another_type_is_a_type_error(data):
    # bytes(7329322839) allocated 7 GB before it failed; bytes([1, 2]) was parsed as PEM
    with pytest.raises(TypeError, match="PEM data must be str or bytes, not"):
        it.RootSet.from_pem(data)


def test_root_pem_as_bytearray_or_memoryview():
    pem = new_root("Buffer Root").cert_pem
    for data in (bytearray(pem), memoryview(pem)):
        assert it.RootSet.from_pem(data).common_names == ("Buffer Root",)


def test_root_with_a_corrupted_key_algorithm_is_refused_at_load():
    root = new_root("Odd Root")
    der = root.cert.public_bytes(serialization.Encoding.DER)
    rsa_oid = bytes.fromhex("06092A864886F70D010101")  # rsaEncryption, only in the SPKI
    assert der.count(rsa_oid) == 1
    broken = der.replace(rsa_oid, bytes.fromhex("06092A864886F70D01017F"))
    pem = x509.load_der_x509_certificate(broken).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(it.RootStoreError, match="public key that cannot be read") as err:
        it.RootSet.from_pem(pem)
    assert "Unknown key type" in str(err.value)
    with pytest.raises(it.RootStoreError, match="public key that cannot be read"):
        it.RootSet([x509.load_der_x509_certificate(broken)])


@pytest.mark.parametrize("path", [None, 3, 1.5])
def test_root_file_path_of_another_type_is_a_type_error(path):
    with pytest.raises(TypeError, match="the root certificate file must be a path"):
        it.RootSet.from_pem_file(path)


def test_root_file_int_path_does_not_touch_that_file_descriptor(tmp_path):
    other = tmp_path / "other.pem"
    other.write_bytes(new_root("Someone Else's Root").cert_pem)
    fd = os.open(other, os.O_RDONLY)
    try:
        with pytest.raises(TypeError):
            it.RootSet.from_pem_file(fd)
        os.fstat(fd)  # not read, not closed
    finally:
        os.close(fd)


def test_root_file_directory_and_oversized_file(tmp_path):
    with pytest.raises(
        it.RootStoreError, match=r"cannot read the root certificate file .*Is a directory"
    ):
        it.RootSet.from_pem_file(tmp_path)
    big = tmp_path / "huge.pem"
    with big.open("wb") as fh:
        fh.truncate(64 << 20)  # sparse: 64 MiB of zeros
    with pytest.raises(it.RootStoreError, match="larger than 16 MiB"):
        it.RootSet.from_pem_file(big)


def test_root_set_of_non_certificates_is_a_type_error():
    with pytest.raises(TypeError, match=r"holds cryptography x509\.Certificate objects, not bytes"):
        it.RootSet([new_root("Root").cert_pem])
