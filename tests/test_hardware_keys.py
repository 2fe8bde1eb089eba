"""Device keys that never leave the hardware: SoftHSM2 (PKCS#11, through OpenSSL's pkcs11
engine) and a software TPM 2.0 (swtpm behind tpm2-abrmd, through the tpm2 provider and
through tpm2-pkcs11), in real mutual TLS handshakes against ``openssl s_server -Verify``
and against the local hub's three doors, and every error that names what is wrong.

The tokens and the TPM are made per test run in temporary directories; the processes
(swtpm, dbus-daemon, tpm2-abrmd, s_server) are started on free loopback ports and stopped
after. Without the Debian packages the tests skip with the list of what is missing,
except under CI=true, where that is a failure.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import iothub_tls as it
from iothub_tls.testing.hardware import (
    ENGINE_SO,
    SOFTHSM2_MODULE,
    SoftHsm,
    SoftwareTpm,
    missing_tools,
)
from iothub_tls.testing.pki import CertificateAuthority, KeyType
from iothub_tls.testing.ports import free_port, wait_port
from iothub_tls.tls.hardware.uri import UriError, parse_pkcs11_uri

PIN = "735190"
WRONG_PIN = "246802"
HOST = "localhost"
TPM2_PROVIDER = "/usr/lib/x86_64-linux-gnu/ossl-modules/tpm2.so"


def require(tools: list[str], files: dict[str, str] | None = None) -> None:
    missing = missing_tools(tools)
    missing += [
        f"{path} ({pkg})" for path, pkg in (files or {}).items() if not os.path.exists(path)
    ]
    if missing:
        message = f"needs {', '.join(missing)}: apt-get install the packages named"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


# -- the PKI and a verifying server -----------------------------------------------------


@dataclass
class Lab:
    root: CertificateAuthority
    ca: CertificateAuthority  # issues the devices' and the server's certificates
    other_ca: CertificateAuthority
    directory: Path

    @property
    def policy(self) -> it.TlsPolicy:
        return it.TlsPolicy(roots=it.RootSet.from_pem(self.root.issued.cert_pem))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    root = CertificateAuthority.root("hardware test root", key_type=KeyType.EC, days=2)
    return Lab(
        root,
        root.intermediate("hardware test issuing CA", key_type=KeyType.EC, days=2),
        CertificateAuthority.root("some other root", key_type=KeyType.EC, days=2),
        tmp_path_factory.mktemp("hwlab"),
    )


class VerifyingServer:
    """``openssl s_server -Verify 2 -verify_return_error``: a handshake completes only
    with a client certificate that chains to the lab's root, signed for by its key."""

    def __init__(self, lab: Lab) -> None:
        directory = lab.directory / uuid.uuid4().hex
        directory.mkdir()
        server = lab.ca.server(HOST, key_type=KeyType.EC, days=1)
        files = server.write(directory, "server")
        cafile = directory / "clients.pem"
        # the root and the issuing CA, as a hub knows the CA a device's certificate comes
        # from (a token often holds the device certificate alone)
        cafile.write_bytes(lab.root.issued.cert_pem + lab.ca.issued.cert_pem)
        intermediates = directory / "intermediates.pem"
        intermediates.write_bytes(lab.ca.issued.cert_pem)
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["openssl", "s_server", "-accept", str(self.port), "-cert", str(files.certificate),
             "-key", str(files.private_key), "-cert_chain", str(intermediates),
             "-Verify", "2", "-verify_return_error",
             "-CAfile", str(cafile), "-naccept", "16", "-quiet", "-rev"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_port(self.port, proc=self.proc)

    def connect(self, ctx: ssl.SSLContext) -> str:
        """One handshake and a line sent; returns the TLS version."""
        with socket.create_connection(("127.0.0.1", self.port), 10) as raw:
            with ctx.wrap_socket(raw, server_hostname=HOST) as tls:
                tls.sendall(b"hello from the device\n")
                # -rev answers each line reversed: a round trip through the session
                assert tls.recv(100).startswith(b"ecived eht morf olleh")
                return str(tls.version())

    def close(self) -> str:
        self.proc.kill()
        _, err = self.proc.communicate(timeout=5)
        return err.decode(errors="replace")


@pytest.fixture
def server(lab: Lab) -> Iterator[VerifyingServer]:
    running = VerifyingServer(lab)
    yield running
    running.close()


def certify(ca: CertificateAuthority, csr: bytes) -> list[x509.Certificate]:
    return list(ca.device_from_csr(csr, days=1))


def certify_tpm_key(
    ca: CertificateAuthority, tpm: SoftwareTpm, keyfile: Path, device_id: str
) -> list[x509.Certificate]:
    """The tpm2 provider's requests carry ECDSA parameters cryptography refuses to parse:
    certify the key's public half instead."""
    public = serialization.load_pem_public_key(tpm.public_key(keyfile))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return list(ca.device_for_key(device_id, public, days=1))


# -- SoftHSM2 -------------------------------------------------------------------------


@dataclass
class Token:
    hsm: SoftHsm
    label: str
    key_label: str
    key_id: str

    @property
    def uri(self) -> str:
        return f"pkcs11:token={self.label};object={self.key_label};type=private"

    def identity(self, **kwargs: object) -> it.ClientIdentity:
        options: dict[str, object] = {"module": SOFTHSM2_MODULE, "pin": PIN}
        options.update(kwargs)
        return it.ClientIdentity.from_pkcs11(self.uri, **options)  # type: ignore[arg-type]


@dataclass
class Tokens:
    hsm: SoftHsm
    with_cert: Token  # the device certificate imported next to the key
    bare: Token  # the key only
    removable: Token  # deleted by one test
    hub: Token  # certified by the local hub's PKI
    chains: dict[str, list[x509.Certificate]]


@pytest.fixture(scope="module")
def tokens(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tokens]:
    require(
        ["softhsm2-util", "pkcs11-tool", "openssl"],
        {SOFTHSM2_MODULE: "softhsm2", ENGINE_SO: "libengine-pkcs11-openssl"},
    )
    hsm = SoftHsm(tmp_path_factory.mktemp("softhsm"))
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ.update(hsm.env)  # SoftHSM reads it when the module is first initialised
    made = {}
    chains: dict[str, list[x509.Certificate]] = {}
    for name in ("with_cert", "bare", "removable", "hub"):
        token = Token(hsm, f"itls-{name}-{uuid.uuid4().hex[:6]}", "iothub", "01")
        hsm.init_token(token.label, PIN)
        hsm.generate_key(token.label, PIN, token.key_label, token.key_id)
        made[name] = token
        if name != "hub":
            chains[name] = certify(lab.ca, hsm.csr(token.uri, PIN, f"dev-{name}"))
    hsm.import_certificate(
        made["with_cert"].label, PIN, "iothub", "01",
        chains["with_cert"][0].public_bytes(serialization.Encoding.DER),
    )  # fmt: skip
    yield Tokens(hsm, made["with_cert"], made["bare"], made["removable"], made["hub"], chains)
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


def test_uri_parsing_is_rfc_7512() -> None:
    uri = parse_pkcs11_uri(
        "pkcs11:token=My%20Token;object=dev;id=%01%A2;type=private"
        "?module-path=/usr/lib/m.so&pin-value=s3cr%65t"
    )
    assert (uri.token, uri.object, uri.id, uri.type) == ("My Token", "dev", b"\x01\xa2", "private")
    assert uri.module_path == "/usr/lib/m.so"
    assert uri.pin_value == "s3cret"
    assert "s3cr" not in repr(uri) and "s3cr" not in str(uri)
    assert (
        uri.redacted()
        == "pkcs11:token=My%20Token;object=dev;id=%01%A2;type=private?module-path=/usr/lib/m.so"
    )
    with pytest.raises(UriError, match="starts with 'pkcs11:'"):
        parse_pkcs11_uri("file:/key.pem")
    with pytest.raises(UriError, match="unknown path attribute 'tokn'"):
        parse_pkcs11_uri("pkcs11:tokn=x")
    with pytest.raises(UriError, match="type must be one of"):
        parse_pkcs11_uri("pkcs11:type=secret")
    with pytest.raises(UriError, match="either pin-value or pin-source"):
        parse_pkcs11_uri("pkcs11:token=a?pin-value=1&pin-source=file:/p")
    with pytest.raises(UriError, match="appears twice"):
        parse_pkcs11_uri("pkcs11:token=a;token=b")


def test_softhsm_key_and_certificate_from_the_token(
    tokens: Tokens, server: VerifyingServer, lab: Lab
) -> None:
    identity = tokens.with_cert.identity()  # no certificate given: read from the token
    assert identity.device_id == "dev-with_cert"
    assert identity.key_type == "EC"
    assert identity.key_location.startswith("pkcs11 engine pkcs11:token=itls-with_cert")
    ctx = it.create_ssl_context(lab.policy, identity=identity)
    assert server.connect(ctx) == "TLSv1.3"
    ctx12 = it.create_ssl_context(
        it.TlsPolicy(roots=lab.policy.roots, max_version=ssl.TLSVersion.TLSv1_2), identity=identity
    )
    assert server.connect(ctx12) == "TLSv1.2"
    seen = server.close()
    assert "CN = dev-with_cert" in seen  # the server verified the token's certificate


def test_softhsm_key_with_a_certificate_file(
    tokens: Tokens, server: VerifyingServer, lab: Lab, tmp_path: Path
) -> None:
    chain = tokens.chains["bare"]
    pem_file = tmp_path / "device.pem"
    pem_file.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    identity = tokens.bare.identity(certificate=pem_file)
    assert identity.chain == tuple(chain)  # leaf and intermediate
    ctx = it.create_ssl_context(lab.policy, identity=identity)
    for _ in range(3):  # the engine signs every handshake
        ctx.forget_sessions()
        assert server.connect(ctx) == "TLSv1.3"


def test_the_server_refuses_a_certificate_from_another_ca(
    tokens: Tokens, server: VerifyingServer, lab: Lab
) -> None:
    """The twin of the passing handshakes: the same server and key, a certificate it does
    not trust, and the handshake fails."""
    foreign = certify(lab.other_ca, tokens.hsm.csr(tokens.bare.uri, PIN, "dev-foreign"))
    identity = tokens.bare.identity(certificate=foreign)
    ctx = it.create_ssl_context(lab.policy, identity=identity)
    with pytest.raises(ssl.SSLError, match=r"UNKNOWN_CA|unknown ca"):
        server.connect(ctx)  # TLS 1.3: the refusal arrives with the first read


def test_module_not_found(tokens: Tokens) -> None:
    with pytest.raises(it.HardwareModuleError, match=r"/nonexistent/libtoken\.so does not exist"):
        tokens.bare.identity(module="/nonexistent/libtoken.so")


def test_a_file_that_is_not_a_pkcs11_module(tokens: Tokens, tmp_path: Path) -> None:
    fake = tmp_path / "libfake.so"
    fake.write_bytes(b"not a library")
    with pytest.raises(it.HardwareModuleError, match="does not load"):
        tokens.bare.identity(module=fake)


def test_token_absent(tokens: Tokens) -> None:
    with pytest.raises(
        it.TokenNotFoundError, match=r"label 'no-such-token' is not present.*itls-bare"
    ):
        it.ClientIdentity.from_pkcs11(
            "pkcs11:token=no-such-token;object=iothub", module=SOFTHSM2_MODULE, pin=PIN
        )


def test_wrong_pin_never_shows_the_pin(tokens: Tokens, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(
        it.TokenPinError, match=r"wrong PIN for the token with label 'itls-bare-[0-9a-f]+'"
    ) as info:
        tokens.bare.identity(pin=WRONG_PIN)
    shown = [str(info.value), repr(info.value), caplog.text, *map(str, info.value.args)]
    assert not any(WRONG_PIN in text or PIN in text for text in shown)
    # the right PIN, then an identity's repr: no PIN either
    identity = tokens.bare.identity(certificate=tokens.chains["bare"])
    assert PIN not in repr(identity) and PIN not in identity.key_location
    uri_pin = tokens.bare.uri + f"?pin-value={PIN}"
    identity = it.ClientIdentity.from_pkcs11(
        uri_pin, module=SOFTHSM2_MODULE, certificate=tokens.chains["bare"]
    )
    assert PIN not in repr(identity) and PIN not in caplog.text


def test_missing_pin(tokens: Tokens) -> None:
    with pytest.raises(it.TokenPinError, match="needs a PIN"):
        tokens.bare.identity(pin=None)


def test_pin_from_a_file(tokens: Tokens, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    identity = it.ClientIdentity.from_pkcs11(
        tokens.bare.uri + f"?pin-source=file:{pin_file}",
        module=SOFTHSM2_MODULE,
        certificate=tokens.chains["bare"],
    )
    assert identity.device_id == "dev-bare"


def test_key_not_found(tokens: Tokens) -> None:
    with pytest.raises(it.HardwareObjectNotFoundError, match="no private key with label 'absent'"):
        it.ClientIdentity.from_pkcs11(
            f"pkcs11:token={tokens.bare.label};object=absent", module=SOFTHSM2_MODULE, pin=PIN
        )


def test_certificate_not_on_the_token(tokens: Tokens) -> None:
    with pytest.raises(it.HardwareObjectNotFoundError, match="no certificate with label 'iothub'"):
        tokens.bare.identity()  # the bare token holds no certificate


def test_certificate_that_does_not_match_the_key(tokens: Tokens) -> None:
    other = tokens.chains["removable"]  # certifies another token's key
    with pytest.raises(it.KeyMismatchError, match=r"CN=dev-removable\) does not belong to the key"):
        tokens.bare.identity(certificate=other)


def test_a_uri_naming_a_certificate_is_refused(tokens: Tokens) -> None:
    with pytest.raises(it.HardwareKeyError, match="name the private key"):
        it.ClientIdentity.from_pkcs11(f"pkcs11:token={tokens.bare.label};type=cert", pin=PIN)


def test_token_removed_between_two_handshakes(
    tokens: Tokens, server: VerifyingServer, lab: Lab, tmp_path: Path
) -> None:
    token = tokens.removable
    identity = token.identity(certificate=tokens.chains["removable"])
    ctx = it.create_ssl_context(lab.policy, identity=identity)
    assert server.connect(ctx) == "TLSv1.3"
    directory = tokens.hsm.token_directory(token.label)
    shutil.move(directory, tmp_path / "removed-token")
    try:
        ctx.forget_sessions()  # a full handshake: the key must sign
        with pytest.raises(
            it.TokenRemovedError, match=r"label 'itls-removable.*is no longer present"
        ) as info:
            server.connect(ctx)
        assert isinstance(info.value, ssl.SSLError)  # callers' except ssl.SSLError still catch it
        assert isinstance(info.value.__cause__, ssl.SSLError)
    finally:
        shutil.move(tmp_path / "removed-token", directory)


def test_without_the_openssl_shim_it_is_feature_unavailable(tokens: Tokens, no_shim: None) -> None:
    with pytest.raises(it.FeatureUnavailableError, match="statically linked"):
        tokens.bare.identity(certificate=tokens.chains["bare"])


# -- the local hub's three doors --------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    pytest.importorskip("paho.mqtt.client")
    pytest.importorskip("proton")
    pytest.importorskip("urllib3")
    from iothub_tls.hub.hub import HubOptions, LocalHub

    options = HubOptions(
        state_dir=tmp_path_factory.mktemp("hub"),
        hostname=HOST,
        mqtt_port=0,
        amqp_port=0,
        https_port=0,
    )
    with LocalHub(options) as running:
        yield running


def _send_through_the_hub(hub: object, identity: it.ClientIdentity, transport: str) -> None:
    from iothub_tls.amqp import AmqpDeviceClient
    from iothub_tls.https import HttpsDeviceClient
    from iothub_tls.hub.hub import LocalHub
    from iothub_tls.mqtt import MqttDeviceClient

    assert isinstance(hub, LocalHub)
    device_id = identity.device_id
    assert device_id is not None
    hub.registry.add_ca_device(device_id) if hub.registry.get(device_id) is None else None
    hub.registry.save()
    cls = {"mqtt": MqttDeviceClient, "amqp": AmqpDeviceClient, "https": HttpsDeviceClient}[
        transport
    ]
    policy = it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path))
    client = cls.from_x509(
        HOST, device_id, identity, policy=policy, host="127.0.0.1", port=hub.ports[transport]
    )
    payload = f"from the hardware over {transport}".encode()
    with client:
        client.send_telemetry(payload, {"route": transport})
        got = hub.state.wait_for_telemetry(
            lambda m: m.device_id == device_id and m.payload == payload
        )
    assert got is not None and got.protocol.lower() == transport


@pytest.mark.parametrize("transport", ["mqtt", "amqp", "https"])
def test_softhsm_device_sends_telemetry_through_the_local_hub(
    tokens: Tokens, hub: object, transport: str
) -> None:
    from iothub_tls.hub.hub import LocalHub

    assert isinstance(hub, LocalHub)
    token = tokens.hub
    chain = certify(hub.pki.issuer(), tokens.hsm.csr(token.uri, PIN, "softhsm-device"))
    identity = token.identity(certificate=chain)
    _send_through_the_hub(hub, identity, transport)


# -- TPM 2.0 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftwareTpm]:
    require(
        ["swtpm", "dbus-daemon", "tpm2-abrmd", "tpm2_getcap", "openssl"],
        {TPM2_PROVIDER: "tpm2-openssl",
         "/usr/lib/x86_64-linux-gnu/libtss2-tcti-tabrmd.so.0": "libtss2-tcti-tabrmd0"},
    )  # fmt: skip
    running = SoftwareTpm(tmp_path_factory.mktemp("swtpm")).start()
    saved = {k: os.environ.get(k) for k in running.env}
    os.environ.update(running.env)  # the provider and tpm2-pkcs11 read them when first loaded
    yield running
    running.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_tpm2_provider_key_file(
    tpm: SoftwareTpm, server: VerifyingServer, lab: Lab, tmp_path: Path
) -> None:
    keyfile = tpm.generate_key(tmp_path / "device.tss2.pem")
    assert keyfile.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    chain = certify_tpm_key(lab.ca, tpm, keyfile, "tpm-device")
    identity = it.ClientIdentity.from_tpm2(keyfile, certificate=chain)
    assert identity.key_location == f"tpm2 provider {keyfile}"
    ctx = it.create_ssl_context(lab.policy, identity=identity)
    for _ in range(3):
        ctx.forget_sessions()
        assert server.connect(ctx) == "TLSv1.3"
    assert "CN = tpm-device" in server.close()


def test_tpm2_key_file_that_does_not_exist(tpm: SoftwareTpm, lab: Lab, tmp_path: Path) -> None:
    chain = [lab.ca.device("x", key_type=KeyType.EC, days=1).certificate]
    with pytest.raises(it.HardwareKeyError, match=r"TSS2 key file .* does not exist"):
        it.ClientIdentity.from_tpm2(tmp_path / "missing.pem", certificate=chain)


def test_tpm2_file_that_is_not_a_tpm_key(tpm: SoftwareTpm, lab: Lab, tmp_path: Path) -> None:
    issued = lab.ca.device("soft", key_type=KeyType.EC, days=1)
    keyfile = tmp_path / "software.pem"
    keyfile.write_bytes(b"-----BEGIN TSS2 PRIVATE KEY-----\nAAAA\n-----END TSS2 PRIVATE KEY-----\n")
    with pytest.raises(it.HardwareObjectNotFoundError, match="could not load a key from"):
        it.ClientIdentity.from_tpm2(keyfile, certificate=[issued.certificate])


def test_tpm2_certificate_that_does_not_match(tpm: SoftwareTpm, lab: Lab, tmp_path: Path) -> None:
    keyfile = tpm.generate_key(tmp_path / "k.pem")
    other = lab.ca.device("other-device", key_type=KeyType.EC, days=1)
    with pytest.raises(it.KeyMismatchError, match="CN=other-device"):
        it.ClientIdentity.from_tpm2(keyfile, certificate=[other.certificate])


def test_tpm2_persistent_handle_must_be_persistent(tpm: SoftwareTpm, lab: Lab) -> None:
    with pytest.raises(it.HardwareKeyError, match="not a persistent TPM handle"):
        it.ClientIdentity.from_tpm2(0x80000001, certificate=[lab.ca.certificate])


@pytest.mark.parametrize("transport", ["mqtt", "amqp", "https"])
def test_tpm_device_sends_telemetry_through_the_local_hub(
    tpm: SoftwareTpm, hub: object, transport: str, tmp_path: Path
) -> None:
    from iothub_tls.hub.hub import LocalHub

    assert isinstance(hub, LocalHub)
    keyfile = tpm.generate_key(tmp_path / "hub-device.pem")
    chain = certify_tpm_key(hub.pki.issuer(), tpm, keyfile, f"tpm-device-{transport}")
    _send_through_the_hub(hub, it.ClientIdentity.from_tpm2(keyfile, certificate=chain), transport)


# -- doctor -----------------------------------------------------------------------------


def test_doctor_reports_the_routes_and_whether_a_key_signs(
    tokens: Tokens, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from iothub_tls.cli import main

    monkeypatch.setenv("ITLS_TEST_PIN", PIN)
    args = ["doctor", "--json", "--pkcs11-key", tokens.bare.uri, "--pkcs11-module", SOFTHSM2_MODULE]
    main([*args, "--pin-env", "ITLS_TEST_PIN"])
    out = capsys.readouterr().out
    checks = {c["name"]: c for c in __import__("json").loads(out)["checks"]}
    assert checks["pkcs11-keys"]["status"] == "ok"
    assert tokens.bare.label in checks["pkcs11-module"]["detail"]
    assert checks["pkcs11-key"]["status"] == "ok" and "signs" in checks["pkcs11-key"]["detail"]
    assert PIN not in out
    # the failing twin: a wrong PIN is a failure that says so, and is not printed
    monkeypatch.setenv("ITLS_TEST_PIN", WRONG_PIN)
    assert main([*args, "--pin-env", "ITLS_TEST_PIN"]) == 1
    out = capsys.readouterr().out
    checks = {c["name"]: c for c in __import__("json").loads(out)["checks"]}
    assert checks["pkcs11-key"]["status"] == "fail"
    assert "TokenPinError" in checks["pkcs11-key"]["detail"]
    assert WRONG_PIN not in out and PIN not in out
