"""What ``import iothub_tls`` and ``create_ssl_context()`` load, in a fresh interpreter.

A device that only needs a context should not pay for a certificate parser, a transport
library or asyncio at start-up. Each test runs a small program in a new process and
compares ``sys.modules`` before and after; each has a twin showing that the detection
sees the heavy modules when they really are loaded (ClientIdentity, iterating a root set,
the first connection report).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import iothub_tls as it
from tests.conftest import HOST

#: Exactly the package's modules that `import iothub_tls` runs: the core (errors, policy,
#: roots, tls, auth without X.509 identities) and the shared client surface. A module added
#: here is a cost every device pays at start-up: add it on purpose.
CORE_MODULES = {
    "iothub_tls",
    "iothub_tls._io",
    "iothub_tls._io.backoff",
    "iothub_tls.auth",
    "iothub_tls.auth._common",
    "iothub_tls.auth.connection_string",
    "iothub_tls.auth.sas",
    "iothub_tls.device",
    "iothub_tls.errors",
    "iothub_tls.policy",
    "iothub_tls.roots",
    "iothub_tls.roots.pem",
    "iothub_tls.tls",
    "iothub_tls.tls._openssl",
    "iothub_tls.tls.context",
    "iothub_tls.tls.info",
    "iothub_tls.tls.refusals",
    "iothub_tls.tls.sessions",
}
#: Standard-library packages a bare import must not drag in: the event loop and its
#: executors, and what the certificate parser (email) and importlib.resources (zipfile,
#: tempfile, shutil) used to bring.
HEAVY_STDLIB = ("asyncio", "concurrent", "email", "http", "zipfile", "tempfile", "shutil")
TRANSPORTS = ("paho", "proton", "cproton", "urllib3", "requests", "httpx", "wsproto", "azure")

_PRELUDE = """
import json, sys
_before = set(sys.modules)
def loaded():
    return sorted(set(sys.modules) - _before)
def report(**extra):
    print(json.dumps({"loaded": loaded(), **extra}))
"""


def run_fresh(body: str, *args: str) -> dict[str, object]:
    """Run ``body`` (after the prelude) in a new interpreter; its JSON report."""
    program = _PRELUDE + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", program, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def loaded(report: dict[str, object]) -> list[str]:
    modules = report["loaded"]
    assert isinstance(modules, list)
    return [str(m) for m in modules]


def _of(modules: list[str], *packages: str) -> list[str]:
    return [m for m in modules if m.split(".")[0] in packages]


def test_import_loads_only_the_core_and_the_standard_library():
    modules = loaded(run_fresh("import iothub_tls\nreport()"))
    assert {m for m in modules if m.split(".")[0] == "iothub_tls"} == CORE_MODULES
    outside = {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names) - {"iothub_tls"}
    assert outside == set(), f"third-party modules imported by `import iothub_tls`: {outside}"
    assert _of(modules, "cryptography", "_cffi_backend") == []
    assert _of(modules, *TRANSPORTS, "truststore", "certifi") == []
    assert _of(modules, *HEAVY_STDLIB) == []


def test_default_context_needs_no_certificate_parser():
    report = run_fresh(
        """
        import iothub_tls as it
        contexts = [
            it.create_ssl_context(),
            it.create_ssl_context(it.TlsPolicy(roots=it.AZURE_GLOBAL + it.AZURE_ECC)),
            it.create_ssl_context(
                it.TlsPolicy(ciphers=it.CipherProfile.ECC_ONLY, max_fragment_length=1024)
            ),
        ]
        report(
            anchors=[len(c.get_ca_certs()) for c in contexts],
            names=list((it.AZURE_GLOBAL + it.AZURE_ECC).common_names),
            text=repr(contexts[0].policy),
        )
        """
    )
    modules = loaded(report)
    assert _of(modules, "cryptography", "_cffi_backend", *TRANSPORTS, "asyncio") == []
    assert report["anchors"] == [2, 4, 2]
    assert report["names"] == [
        "DigiCert Global Root G2",
        "Microsoft RSA Root Certificate Authority 2017",
        "DigiCert Global Root G3",
        "Microsoft ECC Root Certificate Authority 2017",
    ]
    assert "DigiCert Global Root G2" in str(report["text"])


def test_client_identity_loads_the_parser_on_first_use():
    """Twin: the detection sees cryptography.x509 when a name that needs it is used."""
    report = run_fresh(
        """
        import sys
        import iothub_tls
        before = "cryptography.x509" in sys.modules
        from iothub_tls import ClientIdentity
        from iothub_tls.auth.identity import ClientIdentity as Defined
        same = ClientIdentity is Defined and iothub_tls.ClientIdentity is Defined
        report(before=before, same=same)
        """
    )
    assert report["before"] is False
    assert report["same"] is True
    assert "cryptography.x509" in loaded(report)


def test_lazy_names_are_listed_and_unknown_names_still_fail():
    assert "ClientIdentity" in dir(it)
    assert {"ClientIdentity", "thumbprints", "StrPath"} <= set(dir(it.auth))
    with pytest.raises(AttributeError, match="has no attribute 'ClientIdentiy'"):
        it.ClientIdentiy  # noqa: B018 - the attribute access is the test
    with pytest.raises(AttributeError, match=r"iothub_tls\.auth' has no attribute 'nothing'"):
        it.auth.nothing  # noqa: B018


def test_shipped_roots_parse_on_first_iteration():
    """Twin: iterating a shipped set parses it, into the certificates the files hold."""
    report = run_fresh(
        """
        import hashlib, sys
        import iothub_tls as it
        before = "cryptography.x509" in sys.modules
        from cryptography.hazmat.primitives.serialization import Encoding
        certs = list(it.AZURE_GLOBAL)
        report(
            before=before,
            fingerprints=[hashlib.sha256(c.public_bytes(Encoding.DER)).hexdigest() for c in certs],
            expected=list(it.AZURE_GLOBAL.fingerprints),
            spki=len(it.AZURE_GLOBAL.spki_fingerprints),
        )
        """
    )
    assert report["before"] is False
    assert report["fingerprints"] == report["expected"]
    assert report["spki"] == 2
    assert "cryptography.x509" in loaded(report)


_FIRST_CONNECTION = """
import socket, ssl, sys
import iothub_tls as it
from iothub_tls.roots import RootSet
from iothub_tls.tls import _openssl
port, host, root_pem, shim = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
if shim == "off":
    _openssl._disable_for_tests("simulated: no OpenSSL shim")
# checked, not parsed: what load_shipped() makes of the packaged roots
roots = RootSet._checked((ssl.PEM_cert_to_DER_cert(root_pem),), "test root")
ctx = it.create_ssl_context(it.TlsPolicy(roots=roots))
with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname=host) as tls:
        info = it.tls_info(tls)
report(info=info.as_dict())
"""


@pytest.mark.parametrize("leaf,key", [("ec_leaf", ("EC", 256)), ("rsa_leaf", ("RSA", 2048))])
def test_first_connection_report_is_complete_without_the_certificate_parser(
    pki, tls_server, leaf, key
):
    """A device on unparsed roots (as the shipped ones are) connects for real: its
    first handshake's report (the server's key, the verified chain, the anchor) comes
    from what OpenSSL and _ssl already decoded, so a device's start-up loads no
    certificate parser."""
    server = tls_server([getattr(pki, leaf)])
    args = (str(server.port), HOST, pki.root.cert_pem.decode())
    report = run_fresh(_FIRST_CONNECTION, *args, "on")
    assert _of(loaded(report), "cryptography", "_cffi_backend") == []
    info = report["info"]
    assert isinstance(info, dict)
    assert (info["server_key_type"], info["server_key_bits"]) == key
    assert info["chain"] == [HOST, "iothub-tls Test Issuing CA", "iothub-tls Test Root G2"]
    assert info["anchor"] == "iothub-tls Test Root G2"
    # Twin: without the shim the report is built by parsing the certificates (the
    # detection sees the parser then), and it is the same report.
    parsed = run_fresh(_FIRST_CONNECTION, *args, "off")
    assert "cryptography.x509" in loaded(parsed)
    assert parsed["info"] == info


def test_mqtt_client_import_loads_no_parser_and_nothing_it_does_not_use():
    """What a device on MQTT imports at start-up: the asyncio loop it runs on, and not
    the certificate parser, a transport library, difflib (a connection string's
    spelling hint), random (reconnection jitter) or pkgutil."""
    modules = loaded(run_fresh("from iothub_tls.mqtt import MqttDeviceClient\nreport()"))
    assert "asyncio" in modules  # the detection sees what is really loaded
    assert _of(modules, "cryptography", "_cffi_backend", *TRANSPORTS) == []
    assert _of(modules, "difflib", "random", "pkgutil", *HEAVY_STDLIB[2:]) == []


def _json_loaded(body: str) -> bool:
    """Whether ``body`` loads json (without the prelude, which needs json itself)."""
    program = f"import sys\n{body}\nprint('json' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1] == "True"


def test_json_is_loaded_by_the_first_payload_not_at_start_up():
    """JSON is for twin documents and method payloads: an MQTT device imports it with
    the first one it reads, not at start-up (the twin proves the check sees it)."""
    assert _json_loaded("from iothub_tls.mqtt import MqttDeviceClient") is False
    twin = "from iothub_tls.device import decode_twin_document\ndecode_twin_document(b'{}')"
    assert _json_loaded(f"from iothub_tls.mqtt import MqttDeviceClient\n{twin}") is True


def test_what_is_known_without_parsing_is_what_the_certificates_say():
    """Names, PEM and DER of the unparsed shipped sets (and of their sum) are those of
    the parsed certificates: what create_ssl_context() loads is what the files hold."""
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    fresh = [it.roots.load_shipped(name) for name in ("AZURE_GLOBAL", "AZURE_ECC")]
    for roots in (*fresh, fresh[0] + fresh[1]):
        parsed = list(roots)  # parses here, after the facts above were computed
        names = tuple(
            str(c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value) for c in parsed
        )
        assert roots.common_names == names
        assert roots.to_pem() == "".join(c.public_bytes(Encoding.PEM).decode() for c in parsed)
        assert roots.to_der() == b"".join(c.public_bytes(Encoding.DER) for c in parsed)
    assert fresh == [it.AZURE_GLOBAL, it.AZURE_ECC]


def test_the_testing_modules_load_on_demand_and_never_load_pytest():
    """``iothub_tls.testing`` is imported only when asked for, one module at a time, and
    none of its modules needs pytest (test suites other than ours use them)."""
    package = loaded(run_fresh("import iothub_tls.testing\nreport()"))
    assert [m for m in package if m.startswith("iothub_tls.testing")] == ["iothub_tls.testing"]
    assert _of(package, "cryptography", "pytest") == []
    every = loaded(
        run_fresh(
            """
            import pkgutil, importlib, iothub_tls.testing as t
            for info in pkgutil.iter_modules(t.__path__):
                importlib.import_module(f"iothub_tls.testing.{info.name}")
            report()
            """
        )
    )
    assert {"iothub_tls.testing.pki", "iothub_tls.testing.server"} <= set(every)
    assert "cryptography.x509" in every  # twin: the PKI does load the parser
    assert _of(every, "pytest", "_pytest") == []
