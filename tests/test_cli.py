"""The ``iothub-tls`` command line: help, usage errors, doctor, probe, certs, thumbprint.

Commands run in-process through ``main(argv)`` (one run goes through ``python -m``);
certificates made by ``certs`` are used in real handshakes through create_ssl_context.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import iothub_tls as it
from iothub_tls import roots as roots_module
from iothub_tls.cli import COMMANDS, main
from iothub_tls.diagnostics import doctor as doctor_module
from iothub_tls.policy import CIPHER_SUITES, STRONG_SUITES
from iothub_tls.testing.pki import Issued
from iothub_tls.testing.ports import free_port
from iothub_tls.testing.server import TLSServer
from tests.conftest import HOST, NOW, connect

STRONG = ":".join(s.openssl for s in STRONG_SUITES)
pytestmark = pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str) -> tuple[int, dict]:
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)


# -- help and usage -------------------------------------------------------------------------


HELP_CASES = {
    "iothub-tls": ([], ["doctor", "probe", "certs", "thumbprint", "Exit codes: 0 OK / compliant"]),
    "doctor": (["doctor"], ["TLS 1.2 and 1.3", "OpenSSL features", "system store", "--json"]),
    "probe": (["probe"], ["HOST[:PORT]", "--sni", "--roots", "--timeout", "complies when"]),
    "certs": (["certs"], ["root.pem", "devices/ID.pem", "mode 0600", "--force", "init"]),
    "certs init": (["certs", "init"], ["--intermediate", "--key", "--days", "--force", "--json"]),
    "certs server": (["certs", "server"], ["NAME", "subjectAltName", "--key", "--json"]),
    "certs device": (["certs", "device"], ["DEVICE_ID", "CN", "thumbprints", "--json"]),
    "thumbprint": (["thumbprint"], ["SHA-1 and SHA-256", "without colons", "--json"]),
}


@pytest.mark.parametrize("case", list(HELP_CASES))
def test_help_explains_each_command(capsys, case):
    argv, phrases = HELP_CASES[case]
    code, out, err = run(capsys, *argv, "--help")
    assert code == 0, err
    assert out.startswith(f"usage: {'iothub-tls ' if argv else ''}{case}")
    text = " ".join(out.split())
    for phrase in phrases:
        assert phrase in text, phrase


def test_every_registered_command_has_help(capsys):
    assert set(COMMANDS) == {
        "demo", "serve", "hub", "provision", "doctor", "probe", "audit", "certs", "thumbprint"
    }
    for name in COMMANDS:
        code, out, _ = run(capsys, name, "--help")
        assert code == 0 and out.startswith(f"usage: iothub-tls {name}")


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"iothub-tls {it.__version__}"


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "name a command"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        (["probe"], "the following arguments are required: HOST[:PORT]"),
        (["probe", "hub.example:99999"], "port must be a number from 1 to 65535"),
        (["probe", "https://hub.example/"], "not a URL"),
        (["probe", "hub.example", "--timeout", "soon"], "'soon' is not a number of seconds"),
        (["probe", "hub.example", "--timeout", "0"], "must be more than 0"),
        (["probe", "hub.example", "--bogus"], "unrecognized arguments: --bogus"),
        (["certs"], "the following arguments are required: ACTION"),
        (["certs", "server", "dir"], "the following arguments are required: NAME"),
        (["certs", "init", "dir", "--key", "dsa"], "'dsa' is not a key type: use rsa or ec"),
        (["certs", "init", "dir", "--days", "-5"], "not a number of days"),
        (["thumbprint"], "the following arguments are required: CERT"),
    ],
)
def test_usage_errors_return_2(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err


def test_python_dash_m_runs_the_same_cli():
    done = subprocess.run(
        [sys.executable, "-m", "iothub_tls", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0
    assert "usage: iothub-tls" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "iothub_tls", "probe"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert bad.returncode == 2 and "HOST[:PORT]" in bad.stderr


# -- doctor ---------------------------------------------------------------------------------

CORE_CHECKS = [
    "python",
    "openssl",
    "tls1.2",
    "tls1.3",
    *(f"suite {s.iana}" for s in STRONG_SUITES),
    "openssl-shim",
    "max-fragment-length",
    "ecdsa-signature-algorithms",
    "verified-chain",
    "pkcs11-keys",
    "tpm2-keys",
    "roots AZURE_GLOBAL",
    "roots AZURE_ECC",
    "system-store",
    "certifi-bundle",
    "clock",
    "wsproto",
    "python-qpid-proton",
    "urllib3",
    "truststore",
    "azure-iot-device",
]


def test_doctor_on_this_machine(capsys):
    code, data = run_json(capsys, "doctor")
    assert code == 0
    checks = {c["name"]: c for c in data["checks"]}
    assert list(checks) == CORE_CHECKS
    not_ok = {n: c for n, c in checks.items() if c["status"] != "ok"}
    assert not_ok == {}
    assert data["ok"] is True
    assert data["summary"] == {"ok": len(CORE_CHECKS), "warning": 0, "fail": 0}
    assert checks["tls1.3"]["detail"].startswith("handshake with TLS_")
    assert "EC certificate" in checks["suite TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"]["detail"]
    assert "RSA certificate" in checks["suite TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384"]["detail"]
    assert "512-byte" in checks["max-fragment-length"]["detail"]
    assert "iothub-tls doctor root" in checks["verified-chain"]["detail"]

    code, out, _ = run(capsys, "doctor")
    assert code == 0
    assert "0 failure(s): this platform can comply" in out
    assert re.search(r"\nok +roots AZURE_GLOBAL +DigiCert Global Root G2", out)


def test_doctor_with_a_broken_shim(capsys, no_shim):
    code, data = run_json(capsys, "doctor")
    assert code == 1
    checks = {c["name"]: c for c in data["checks"]}
    failed = [n for n, c in checks.items() if c["status"] == "fail"]
    assert failed == [
        "openssl-shim",
        "max-fragment-length",
        "ecdsa-signature-algorithms",
    ]
    # the verified chain is read through Python (3.10+), not the shim
    assert checks["verified-chain"]["status"] == "ok"
    assert checks["openssl-shim"]["detail"] == "unusable: simulated: _ssl is statically linked"
    assert "dynamically linked OpenSSL" in checks["openssl-shim"]["remedy"]
    assert (
        checks["max-fragment-length"]["detail"]
        == "unavailable: simulated: _ssl is statically linked"
    )
    assert "max_fragment_length unset" in checks["max-fragment-length"]["remedy"]
    assert "CipherProfile.STRONG" in checks["ecdsa-signature-algorithms"]["remedy"]
    # what does not need the shim still works
    assert checks["tls1.2"]["status"] == checks["tls1.3"]["status"] == "ok"
    assert data["ok"] is False

    code, out, _ = run(capsys, "doctor")
    assert code == 1
    line = next(row for row in out.splitlines() if "openssl-shim" in row)
    assert line.split()[0] == "fail"
    assert "-> use CPython" in out
    assert "this platform cannot comply until the failures are fixed" in out


def test_doctor_after_the_shim_is_restored(capsys):
    """Twin of the broken-shim case, run after it: nothing stays disabled."""
    code, _, _ = run(capsys, "doctor")
    assert code == 0


def test_doctor_detects_a_tampered_root(capsys, monkeypatch):
    name, _ = roots_module._SHIPPED["AZURE_ECC"][0]
    tampered = ((name, "00" * 32), roots_module._SHIPPED["AZURE_ECC"][1])
    monkeypatch.setitem(roots_module._SHIPPED, "AZURE_ECC", tampered)
    code, data = run_json(capsys, "doctor")
    assert code == 1
    check = next(c for c in data["checks"] if c["name"] == "roots AZURE_ECC")
    assert check["status"] == "fail"
    assert f"shipped root {name} has SHA-256" in check["detail"]
    assert "reinstall iothub-tls" in check["remedy"]


@pytest.mark.parametrize(
    "when,status,phrase",
    [
        (dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc), "fail", "before the shipped root"),
        (dt.datetime(2045, 1, 1, tzinfo=dt.timezone.utc), "fail", "expires"),
        (dt.datetime.now(dt.timezone.utc), "ok", "plausible"),
    ],
)
def test_doctor_clock(when, status, phrase):
    check = doctor_module._clock(when)
    assert check.status.value == status
    assert phrase in check.detail


def test_doctor_clock_before_the_installation(monkeypatch):
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30)
    monkeypatch.setattr(doctor_module, "_package_date", lambda: later)
    check = doctor_module._clock()
    assert check.status.value == "fail"
    assert "before this installation of iothub-tls" in check.detail
    assert "NTP" in check.remedy


# -- probe ----------------------------------------------------------------------------------


@pytest.fixture
def roots_file(pki, tmp_path) -> str:
    path = tmp_path / "roots.pem"
    path.write_bytes(pki.root.cert_pem)
    return str(path)


@pytest.fixture(scope="module")
def long_leaves(pki) -> dict[str, Issued]:
    later = NOW + dt.timedelta(days=200)
    return {
        "rsa": pki.intermediate.issue(HOST, "localhost", not_after=later),
        "ec": pki.intermediate.issue(HOST, "localhost", key_type="ec", not_after=later),
    }


def test_probe_compliant_server(capsys, tls_server, long_leaves, roots_file):
    server = tls_server([long_leaves["rsa"], long_leaves["ec"]], ciphers=STRONG)
    target = f"127.0.0.1:{server.port}"
    code, data = run_json(capsys, "probe", target, "--sni", HOST, "--roots", roots_file)
    assert code == 0
    assert set(data) == {
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
    }
    assert data["compliant"] is True and data["findings"] == []
    assert data["port"] == server.port and data["sni"] == HOST
    assert data["cipher_suites"] == {s.iana: s.strong for s in CIPHER_SUITES}

    code, out, _ = run(capsys, "probe", target, "--sni", HOST, "--roots", roots_file)
    assert code == 0
    assert out.startswith(f"127.0.0.1:{server.port}, SNI {HOST}: COMPLIANT")
    assert re.search(r"\nTLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 +recommended +yes\n", out)
    assert re.search(r"\nTLS_RSA_WITH_AES_128_CBC_SHA +weak +no\n", out)
    assert "yes, anchored at iothub-tls Test Root G2" in out


def test_probe_legacy_server_exits_1(capsys, tls_server, long_leaves, roots_file):
    server = tls_server(
        [long_leaves["rsa"]],
        ciphers=":".join(s.openssl for s in CIPHER_SUITES),
        min_version=ssl.TLSVersion.TLSv1,
    )
    target = f"127.0.0.1:{server.port}"
    code, data = run_json(capsys, "probe", target, "--sni", HOST, "--roots", roots_file)
    assert code == 1
    assert data["compliant"] is False
    assert data["protocols"]["TLSv1"] is True and data["protocols"]["TLSv1.1"] is True
    assert [f["code"] for f in data["findings"] if f["severity"] == "fail"] == [
        "legacy-protocol",
        "weak-cipher-suite",
    ]
    code, out, _ = run(capsys, "probe", target, "--sni", HOST, "--roots", roots_file)
    assert code == 1
    assert ": NOT COMPLIANT" in out.splitlines()[0]
    assert re.search(r"\nfail +legacy-protocol +accepts TLSv1, TLSv1.1", out)


def test_probe_default_roots_do_not_anchor_a_test_chain(capsys, tls_server, long_leaves):
    server = tls_server([long_leaves["rsa"]], ciphers=STRONG)
    code, data = run_json(capsys, "probe", f"127.0.0.1:{server.port}", "--sni", HOST)
    assert code == 1
    assert data["certificate"]["verified"] is False
    assert "verify code 20" in data["certificate"]["error"]


def test_probe_unreachable_exits_2(capsys):
    port = free_port()
    code, out, err = run(capsys, "probe", f"127.0.0.1:{port}", "--timeout", "2")
    assert code == 2
    assert out == ""
    assert (
        f"iothub-tls probe: error: cannot connect to 127.0.0.1:{port} (Connection refused)" in err
    )
    code, data = run_json(capsys, "probe", f"127.0.0.1:{port}", "--timeout", "2")
    assert code == 2 and "Connection refused" in data["error"]


def test_probe_timeout_exits_2(capsys, tls_server, long_leaves):
    server = tls_server([long_leaves["rsa"]], stall=True)
    code, _, err = run(capsys, "probe", f"127.0.0.1:{server.port}", "--timeout", "0.3")
    assert code == 2
    assert "answered no TLS handshake within 0.3 s" in err


def test_probe_bad_roots_file_exits_2(capsys, tmp_path):
    bad = tmp_path / "roots.pem"
    bad.write_text("not a certificate")
    code, _, err = run(capsys, "probe", "127.0.0.1:1", "--roots", str(bad))
    assert code == 2
    assert "is not PEM data" in err
    code, _, err = run(capsys, "probe", "127.0.0.1:1", "--roots", str(tmp_path / "missing.pem"))
    assert code == 2 and "cannot read the root certificate file" in err


# -- certs ----------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _load(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _issued(cert_path: Path, key_path: Path) -> Issued:
    """The files as the test server helper takes them."""
    return Issued.from_pem(cert_path.read_bytes(), key_path.read_bytes())


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    """A PKI made by the CLI: root + intermediate, RSA and EC servers, an EC device."""
    directory = tmp_path_factory.mktemp("pki") / "lab"
    assert main(["certs", "init", str(directory), "--intermediate"]) == 0
    assert main(["certs", "server", str(directory), HOST, "localhost", "127.0.0.1"]) == 0
    assert main(["certs", "server", str(directory), f"ecc.{HOST}", "--key", "ec"]) == 0
    assert (
        main(["certs", "device", str(directory), "thermostat-42", "--key", "ec", "--days", "2"])
        == 0
    )
    return directory


def test_certs_layout_and_modes(lab):
    expected = {
        "root.pem",
        "root.key",
        "intermediate.pem",
        "intermediate.key",
        f"servers/{HOST}.pem",
        f"servers/{HOST}.key",
        f"servers/ecc.{HOST}.pem",
        f"servers/ecc.{HOST}.key",
        "devices/thermostat-42.pem",
        "devices/thermostat-42.key",
    }
    found = {str(p.relative_to(lab)) for p in lab.rglob("*") if p.is_file()}
    assert found == expected
    for name in expected:
        mode = _mode(lab / name)
        assert mode == (0o600 if name.endswith(".key") else 0o644), name


def _under_umask_0(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``iothub-tls ARGS`` in a subprocess whose umask is 000 (what a careless service
    manager or container gives): nothing it creates may then be open to others."""
    return subprocess.run(
        [sys.executable, "-c", "import os, sys\nos.umask(0)\nfrom iothub_tls.cli import main\n"
         "sys.exit(main(sys.argv[1:]))", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip


def test_certs_directories_are_private_under_umask_0(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    existing.chmod(0o755)
    pki = existing / "nested" / "lab"
    for args in (
        ["certs", "init", str(pki), "--intermediate", "--key", "ec"],
        ["certs", "server", str(pki), "localhost", "--key", "ec"],
        ["certs", "device", str(pki), "sensor-1", "--key", "ec"],
    ):
        done = _under_umask_0(*args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    for directory in (existing / "nested", pki, pki / "servers", pki / "devices"):
        assert _mode(directory) == 0o700, directory
    for key in pki.rglob("*.key"):
        assert _mode(key) == 0o600, key
    assert _mode(existing) == 0o755  # a directory that existed is left as it was


def test_certs_contents(lab):
    (root,) = _load(lab / "root.pem")
    (inter,) = _load(lab / "intermediate.pem")
    assert root.subject == root.issuer
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert inter.issuer == root.subject
    assert inter.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0

    server, chain = _load(lab / f"servers/{HOST}.pem")
    assert chain == inter and server.issuer == inter.subject
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [HOST, "localhost"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert isinstance(server.public_key(), rsa.RSAPublicKey)
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    ecc_server = _load(lab / f"servers/ecc.{HOST}.pem")[0]
    assert isinstance(ecc_server.public_key(), ec.EllipticCurvePublicKey)

    device, _ = _load(lab / "devices/thermostat-42.pem")
    assert device.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "thermostat-42"
    eku = device.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    lifetime = device.not_valid_after_utc - device.not_valid_before_utc
    assert lifetime == dt.timedelta(days=2)  # --days 2


def test_certs_server_and_root_work_in_a_real_handshake(lab):
    issued = _issued(lab / f"servers/{HOST}.pem", lab / f"servers/{HOST}.key")
    policy = it.TlsPolicy(roots=it.RootSet.from_pem_file(lab / "root.pem"))
    with TLSServer([issued]) as server, connect(it.create_ssl_context(policy), server.port) as tls:
        info = it.tls_info(tls)
    assert info.chain == (HOST, "iothub-tls Test Issuing CA", "iothub-tls Test Root CA")
    assert info.anchor == "iothub-tls Test Root CA"
    assert info.server_key_type == "RSA"


def test_certs_ecdsa_server_serves_ecc_only_devices(lab):
    issued = _issued(lab / f"servers/ecc.{HOST}.pem", lab / f"servers/ecc.{HOST}.key")
    policy = it.TlsPolicy(
        roots=it.RootSet.from_pem_file(lab / "root.pem"), ciphers=it.CipherProfile.ECC_ONLY
    )
    with TLSServer([issued]) as server:
        with connect(it.create_ssl_context(policy), server.port, f"ecc.{HOST}") as tls:
            assert it.tls_info(tls).server_key_type == "EC"


def test_certs_server_is_refused_with_other_roots(lab, pki):
    """Twin: the same server against a device pinned to another root."""
    issued = _issued(lab / f"servers/{HOST}.pem", lab / f"servers/{HOST}.key")
    with TLSServer([issued]) as server, pytest.raises(it.CertificateVerificationError) as err:
        connect(it.create_ssl_context(pki.policy()), server.port)
    assert err.value.verify_code == 20


def test_certs_device_authenticates_with_mutual_tls(lab, pki):
    identity = it.ClientIdentity.from_files(
        lab / "devices/thermostat-42.pem", lab / "devices/thermostat-42.key"
    )
    assert identity.device_id == "thermostat-42" and identity.key_type == "EC"
    lab_root = (lab / "root.pem").read_bytes()
    with TLSServer([pki.rsa_leaf], client_ca=lab_root, require_client_cert=True) as server:
        with connect(it.create_ssl_context(pki.policy(), identity=identity), server.port):
            pass
        seen = server.wait_accepted()[-1]
    presented = x509.load_der_x509_certificate(seen.client_cert)
    assert presented.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "thermostat-42"


def test_certs_device_of_another_pki_is_refused(tmp_path, lab, pki):
    other = tmp_path / "other"
    assert main(["certs", "init", str(other), "--key", "ec"]) == 0
    assert main(["certs", "device", str(other), "intruder", "--key", "ec"]) == 0
    identity = it.ClientIdentity.from_files(
        other / "devices/intruder.pem", other / "devices/intruder.key"
    )
    lab_root = (lab / "root.pem").read_bytes()
    with TLSServer([pki.rsa_leaf], client_ca=lab_root, require_client_cert=True) as server:
        with pytest.raises((ssl.SSLError, OSError)):
            with connect(
                it.create_ssl_context(pki.policy(), identity=identity), server.port
            ) as tls:
                tls.recv(1)  # TLS 1.3: the refusal arrives after the client's handshake
        seen = server.wait_accepted()[-1]
    assert seen.error is not None and "certificate" in seen.error.lower()


def test_certs_refuse_to_overwrite(capsys, lab):
    key = lab / "devices/thermostat-42.key"
    before = key.read_bytes()
    code, _, err = run(capsys, "certs", "device", str(lab), "thermostat-42")
    assert code == 2
    assert f"{key} already exists: refusing to overwrite" in err
    assert "--force" in err
    assert key.read_bytes() == before
    code, _, err = run(capsys, "certs", "init", str(lab))
    assert code == 2 and "already holds a test PKI" in err


def test_certs_force_replaces(capsys, tmp_path):
    directory = tmp_path / "pki"
    assert main(["certs", "init", str(directory), "--key", "ec"]) == 0
    assert main(["certs", "device", str(directory), "dev-1", "--key", "ec"]) == 0
    before = (directory / "devices/dev-1.key").read_bytes()
    capsys.readouterr()
    code, data = run_json(
        capsys, "certs", "device", str(directory), "dev-1", "--key", "ec", "--force"
    )
    assert code == 0
    after = (directory / "devices/dev-1.key").read_bytes()
    assert after != before and _mode(directory / "devices/dev-1.key") == 0o600
    (entry,) = data["created"]
    assert entry["kind"] == "device" and entry["subject"] == "dev-1" and entry["key"] == "EC-256"
    assert entry["private_key"] == str(directory / "devices/dev-1.key")
    # issued directly by the root when there is no intermediate
    device, *chain = _load(directory / "devices/dev-1.pem")
    assert chain == [] and device.issuer == _load(directory / "root.pem")[0].subject


def test_certs_init_force_drops_a_stale_intermediate(tmp_path):
    directory = tmp_path / "pki"
    assert main(["certs", "init", str(directory), "--intermediate", "--key", "ec"]) == 0
    assert main(["certs", "init", str(directory), "--key", "ec", "--force"]) == 0
    assert not (directory / "intermediate.pem").exists()
    assert main(["certs", "server", str(directory), "localhost", "--key", "ec"]) == 0
    leaf, *chain = _load(directory / "servers/localhost.pem")
    assert chain == [] and leaf.issuer == _load(directory / "root.pem")[0].subject


@pytest.mark.parametrize(
    "argv,message",
    [
        (["device", "{d}", "has/slash"], "not a valid IoT Hub device id"),
        (["device", "{d}", "x" * 129], "not a valid IoT Hub device id"),
        (["server", "{d}", "bad_name!"], "neither a DNS name nor an IP address"),
        (["server", "{d}/../missing", "localhost"], "create the test PKI first"),
    ],
)
def test_certs_bad_input(capsys, lab, argv, message):
    code, _, err = run(capsys, "certs", *(a.format(d=lab) for a in argv))
    assert code == 2
    assert message in err


# -- thumbprint -----------------------------------------------------------------------------


def _openssl_fingerprint(path: Path, digest: str) -> str:
    out = subprocess.run(
        ["openssl", "x509", "-in", str(path), "-noout", "-fingerprint", f"-{digest}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip().split("=", 1)[1].replace(":", "").upper()


@pytest.mark.parametrize("name", ["devices/thermostat-42.pem", "root.pem", f"servers/{HOST}.pem"])
def test_thumbprint_matches_openssl(capsys, lab, name):
    path = lab / name
    code, data = run_json(capsys, "thumbprint", str(path))
    assert code == 0
    assert data["sha1"] == _openssl_fingerprint(path, "sha1")
    assert data["sha256"] == _openssl_fingerprint(path, "sha256")
    assert len(data["sha1"]) == 40 and len(data["sha256"]) == 64
    code, out, _ = run(capsys, "thumbprint", str(path))
    assert code == 0
    assert f"SHA-1    {data['sha1']}" in out and f"SHA-256  {data['sha256']}" in out


def test_thumbprint_matches_the_identity(capsys, lab):
    identity = it.ClientIdentity.from_files(
        lab / "devices/thermostat-42.pem", lab / "devices/thermostat-42.key"
    )
    code, data = run_json(capsys, "thumbprint", str(lab / "devices/thermostat-42.pem"))
    assert code == 0
    assert (data["sha1"], data["sha256"]) == (identity.thumbprint_sha1, identity.thumbprint_sha256)
    assert data["subject"] == "thermostat-42"
    assert [c["subject"] for c in data["chain"]] == ["iothub-tls Test Issuing CA"]


def test_thumbprint_bad_input(capsys, lab, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_bytes(os.urandom(64).replace(b"\x30", b"\x31"))
    code, _, err = run(capsys, "thumbprint", str(junk))
    assert code == 2 and "is not PEM data" in err

    code, _, err = run(capsys, "thumbprint", str(lab / "devices/thermostat-42.key"))
    assert code == 2 and "(found only: PRIVATE KEY)" in err

    der = tmp_path / "root.der"
    der.write_bytes(_load(lab / "root.pem")[0].public_bytes(serialization.Encoding.DER))
    code, _, err = run(capsys, "thumbprint", str(der))
    assert (
        code == 2
        and "looks like DER (binary), not PEM" in err
        and "openssl x509 -inform der" in err
    )

    damaged = tmp_path / "damaged.pem"
    damaged.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    code, _, err = run(capsys, "thumbprint", str(damaged))
    assert code == 2 and "certificate 1 in" in err and "damaged" in err

    code, out, err = run(capsys, "thumbprint", str(tmp_path / "missing.pem"), "--json")
    assert code == 2 and "cannot read" in err and "No such file" in err
    assert "error" in json.loads(out)


# -- the certificate factory behind certs ---------------------------------------------------


def test_testpki_api_builds_a_verifiable_chain():
    from iothub_tls.testing.pki import CertificateAuthority, KeyType

    root = CertificateAuthority.root("API Root", key_type=KeyType.EC)
    issuing = root.intermediate("API Issuing", key_type=KeyType.EC)
    server = issuing.server(HOST, key_type=KeyType.EC, days=3)
    device = issuing.device("dev-7", key_type=KeyType.EC)
    assert root.is_root and not issuing.is_root
    assert server.chain == (issuing.certificate,) and issuing.chain == ()
    assert device.common_name == "dev-7"
    with TLSServer([server]) as srv:
        policy = it.TlsPolicy(roots=it.RootSet.from_pem(root.issued.cert_pem))
        with connect(it.create_ssl_context(policy), srv.port) as tls:
            assert it.tls_info(tls).chain == (HOST, "API Issuing", "API Root")


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda t: t.KeyType.RSA.generate(1024), "RSA key size 1024 is not supported"),
        (lambda t: t.KeyType.EC.generate(521), "EC key size 521 is not supported"),
        (lambda t: t.CertificateAuthority.root(days=0, key_type=t.KeyType.EC), "1 or more"),
        (lambda t: t.CertificateAuthority.root(key_type=t.KeyType.EC).server(), "at least one"),
        (
            lambda t: (
                t.CertificateAuthority.root(key_type=t.KeyType.EC)
                .intermediate(key_type=t.KeyType.EC)
                .intermediate(key_type=t.KeyType.EC)
            ),
            "may not issue CAs",
        ),
        (lambda t: t.check_device_id(".."), "cannot be used as a device id"),
    ],
)
def test_testpki_api_refuses_bad_input(make, message):
    from iothub_tls.testing import pki as testpki

    with pytest.raises(ValueError) as err:
        make(testpki)
    assert message in str(err.value)
