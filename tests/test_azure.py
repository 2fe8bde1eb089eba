"""Microsoft's azure-iot-device SDK with the policy, through both routes of
``iothub_tls.azure``: the SDK's own options (``client_kwargs``) and the hardened
context inside its transports (``harden``).

The SDK tests run the real SDK (2.x, with the paho-mqtt 1.6 it pins, so in their own
virtualenv) against a real Mosquitto. The SDK always connects to port 8883 (443 for
WebSockets and HTTPS) and has no port option, so each test gives the broker a loopback
address of its own (127.x.y.z:8883) and names it in the connection string as
``GatewayHostName`` — the SDK's documented way to reach a hub through another host (IoT
Edge); ``HostName`` stays ``localhost``. The broker's password file holds exactly the
username and SAS token this SDK client sends, so a wrong key is refused. An independent
paho subscriber on a second listener observes what arrives.

Without the SDK installed only the pure ``client_kwargs`` tests run; the rest skip,
naming the ``azure`` extra.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import importlib.util
import json
import os
import queue
import random
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest

import iothub_tls as it
from iothub_tls import azure as itaz
from iothub_tls.policy import ECC_SUITES, STRONG_SUITES
from iothub_tls.testing.pki import ORGANIZATION, CertificateAuthority, Issued
from tests.brokers import Mosquitto, MosquittoListener, require_binary, wait_for_port
from tests.conftest import new_root

SDK_REASON = (
    "needs the 'azure' extra: pip install 'iothub-tls[azure]' (azure-iot-device pins "
    "paho-mqtt < 2, so use a virtualenv of its own)"
)
HUB = "localhost"
DEVICE = "dev1"
MQTT_PORT = 8883  # fixed in azure-iot-device 2.x (443 with websockets=True)
HTTPS_PORT = 443  # fixed in azure-iot-device 2.x


def _tls12_names(cipher_string: str) -> set[str]:
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.set_ciphers(cipher_string)
    return {c["name"] for c in probe.get_ciphers() if c["protocol"] != "TLSv1.3"}


def _chain(exc: BaseException | None) -> list[BaseException]:
    """The exception and everything it was raised from (causes, contexts, and the
    exceptions requests and urllib3 keep in ``args`` / ``reason``)."""
    seen: list[BaseException] = []
    todo: list[object] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
    return seen


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException:
    found = [e for e in _chain(exc) if isinstance(e, kind)]
    assert found, f"no {kind.__name__} in {[type(e).__name__ for e in _chain(exc)]}"
    return found[0]


# =============================================================================================
# client_kwargs: pure, no SDK needed
# =============================================================================================


def test_client_kwargs_carry_the_default_policy():
    kwargs = itaz.client_kwargs()
    assert set(kwargs) == {"server_verification_cert", "cipher"}
    assert it.RootSet.from_pem(kwargs["server_verification_cert"]) == it.AZURE_GLOBAL
    assert kwargs["cipher"].endswith(":@SECLEVEL=2")
    assert _tls12_names(kwargs["cipher"]) == {s.openssl for s in STRONG_SUITES}


def test_client_kwargs_ecc_only_offer_only_the_ecdsa_suites(pki):
    kwargs = itaz.client_kwargs(pki.policy(ciphers=it.CipherProfile.ECC_ONLY))
    assert _tls12_names(kwargs["cipher"]) == {s.openssl for s in ECC_SUITES}
    assert len(ECC_SUITES) == 4
    assert it.RootSet.from_pem(kwargs["server_verification_cert"]) == pki.roots


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"min_version": ssl.TLSVersion.TLSv1_3}, "min_version=TLSv1_3 cannot be expressed"),
        ({"max_fragment_length": 1024}, "max_fragment_length=1024 cannot be expressed"),
        ({"trust": it.Trust.SYSTEM}, "Trust.SYSTEM cannot be expressed"),
    ],
)
def test_client_kwargs_refuse_what_the_sdk_cannot_enforce(change, message):
    with pytest.raises(it.PolicyError, match=message) as err:
        itaz.client_kwargs(it.TlsPolicy(**change))
    assert "harden(client, policy)" in str(err.value)


def test_client_kwargs_accept_a_tls12_ceiling_and_refuse_non_policies():
    assert itaz.client_kwargs(it.TlsPolicy(max_version=ssl.TLSVersion.TLSv1_2))
    with pytest.raises(it.PolicyError, match="policy must be a TlsPolicy, got dict"):
        itaz.client_kwargs({"ciphers": "ALL"})  # type: ignore[arg-type]


def test_harden_without_the_sdk_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "azure.iot.device.constant", None)
    for call in (lambda: itaz.harden(object()), lambda: itaz.tls_info(object())):
        with pytest.raises(it.MissingDependencyError) as err:
            call()
        assert "pip install 'iothub-tls[azure]'" in str(err.value)
        assert err.value.extra == "azure" and err.value.package == "azure-iot-device"


# =============================================================================================
# The real SDK
# =============================================================================================


@pytest.fixture(scope="module")
def sdk() -> ModuleType:
    return pytest.importorskip("azure.iot.device", reason=SDK_REASON)


@pytest.fixture(scope="module")
def aio(sdk: ModuleType) -> ModuleType:
    return pytest.importorskip("azure.iot.device.aio", reason=SDK_REASON)


def _gateway_address(*ports: int, name: str | None = None) -> str:
    """A loopback address (127.x.y.z) where ``ports`` are free: the SDK's ports are fixed,
    so every test gets an address of its own. ``name``: that host name instead."""
    rng = random.SystemRandom()
    for _ in range(100):
        addr = f"127.{rng.randint(100, 254)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}"
        try:
            for port in ports:
                with socket.socket() as s:
                    # as the servers do: a closed connection's TIME_WAIT is no conflict
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((name or addr, port))
        except PermissionError:
            message = f"binding port {ports} needs root (the SDK's ports are fixed)"
            if os.environ.get("CI") == "true":
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
        except OSError:
            if name is None:
                continue
            raise
        return name or addr
    raise RuntimeError("no free loopback address for the SDK's fixed ports")


def _https_gateway() -> str:
    """Where the HTTPS tests serve. urllib3 1.26 (which azure-iot-device < 2.14 pins)
    sends no server name for an IP address, so its clients cannot check a certificate
    for one: with it, use localhost (127.0.0.1:443 must be free)."""
    import urllib3

    if int(urllib3.__version__.split(".")[0]) < 2:
        return _gateway_address(HTTPS_PORT, name="localhost")
    return _gateway_address(HTTPS_PORT)


@pytest.fixture
def gateway() -> str:
    return _gateway_address(MQTT_PORT)


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def connection_string(gateway: str, key: str, device: str = DEVICE) -> str:
    return f"HostName={HUB};DeviceId={device};SharedAccessKey={key};GatewayHostName={gateway}"


def _mqtt_transport(client: Any) -> Any:
    stage = client._mqtt_pipeline._pipeline
    while type(stage).__name__ != "MQTTTransportStage":
        stage = stage.next
    return stage.transport


def sdk_context(client: Any) -> ssl.SSLContext:
    """The context the SDK's paho client will connect with (inspection only)."""
    return _mqtt_transport(client)._mqtt_client._ssl_context


def credentials(client: Any, key: str | None) -> tuple[str, str]:
    """The MQTT username and password (SAS token) this SDK client will send. When
    ``key`` is given, the token is checked with this package's own SAS code first."""
    username = _mqtt_transport(client)._username
    password = str(client._mqtt_pipeline.pipeline_configuration.sastoken)
    assert username.startswith(f"{HUB}/{DEVICE}/?api-version=")
    assert "DeviceClientType=azure-iot-device-iothub-py" in username
    if key is not None:
        it.SasToken.parse(password).verify(key, resource_uri=f"{HUB}/devices/{DEVICE}")
    return username, password


def _paho_client(client_id: str) -> Any:
    mqtt = pytest.importorskip("paho.mqtt.client")
    if hasattr(mqtt, "CallbackAPIVersion"):
        return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    return mqtt.Client(client_id=client_id)


@dataclass
class Hub:
    """Mosquitto with the SDK's listener on ``gateway:8883`` and an observer on 127.0.0.1."""

    broker: Mosquitto
    gateway: str
    root: CertificateAuthority
    messages: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)
    observer: Any = None

    def observe(self, topic: str = "devices/#") -> None:
        subscribed = threading.Event()
        sub = _paho_client("observer")
        sub.tls_set_context(ssl.create_default_context(cadata=self.root.cert_pem.decode()))
        sub.on_message = lambda _c, _u, m: self.messages.put((m.topic, m.payload))
        sub.on_subscribe = lambda *_a: subscribed.set()
        sub.connect("localhost", self.broker.port)
        sub.loop_start()
        sub.subscribe(topic, qos=1)
        assert subscribed.wait(10), "the observer's subscription was not acknowledged"
        self.observer = sub

    def next_message(self, timeout: float = 10) -> tuple[str, bytes]:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        if self.observer is not None:
            self.observer.loop_stop()
            self.observer.disconnect()
        self.broker.stop()


@pytest.fixture
def hub_factory(tmp_path: Path, pki: Any) -> Iterator[Callable[..., Hub]]:
    """``hub_factory(gateway, leaf, users={...}, ...)`` -> a running :class:`Hub`.

    ``users``: the password file of the SDK's listener (exact username and SAS token);
    ``client_ca``: require a device certificate from this CA instead; ``anonymous``: no
    credentials at all (only for the sample, whose SAS token is made inside it)."""
    hubs: list[Hub] = []

    def start(
        gateway: str,
        leaf: Issued,
        *,
        users: dict[str, str] | None = None,
        tls_max: str | None = None,
        client_ca: CertificateAuthority | None = None,
        root: CertificateAuthority | None = None,
        protocol: str = "mqtt",
        port: int = MQTT_PORT,
        anonymous: bool = False,
    ) -> Hub:
        require_binary("mosquitto")
        work = tmp_path / f"hub{len(hubs)}"
        certfile, keyfile = leaf.write(work, "server")
        cafile = None
        if client_ca is not None:
            cafile = work / "device-ca.pem"
            cafile.write_bytes(client_ca.cert_pem)
        observer = MosquittoListener(
            tls=True, certfile=certfile, keyfile=keyfile, tls_max_version=tls_max
        )
        broker = Mosquitto([observer], users=users, workdir=work / "mosquitto")
        sdk_listener = MosquittoListener(
            port=port,
            tls=True,
            certfile=certfile,
            keyfile=keyfile,
            cafile=cafile,
            protocol=protocol,  # type: ignore[arg-type]
            require_certificate=client_ca is not None and protocol == "mqtt",
            use_identity_as_username=client_ca is not None,
            password_file=users is not None,
            allow_anonymous=anonymous,
        )
        lines = sdk_listener.config_lines(broker.password_path if users else None, None)
        # tests/brokers.py binds 127.0.0.1; the SDK's listener needs its own address.
        lines[0] = f"listener {port} {gateway}"
        broker.extra_config = lines
        hub = Hub(broker, gateway, root or pki.root)
        hubs.append(hub)
        broker.start()
        wait_for_port(port, host=gateway)
        hub.observe()
        return hub

    yield start
    for hub in hubs:
        hub.close()


@pytest.fixture
def sync_clients() -> Iterator[list[Any]]:
    """Clients to shut down after the test (stops the SDK's threads)."""
    made: list[Any] = []
    yield made
    for client in made:
        with contextlib.suppress(Exception):
            client.shutdown()


def leaf_for(pki: Any, gateway: str, key_type: str = "rsa") -> Issued:
    """A server certificate for the gateway address (and localhost, for the observer),
    under the session's test root."""
    return pki.intermediate.issue(gateway, "localhost", key_type=key_type)


# -- the SDK and the version gate --------------------------------------------------------------


def test_installed_sdk_is_a_tested_version(sdk):
    from azure.iot.device import constant

    assert constant.VERSION in itaz.TESTED_SDK_VERSIONS


def test_an_untested_sdk_version_is_refused_and_nothing_is_patched(
    sdk, gateway, monkeypatch, sync_clients
):
    client = sdk.IoTHubDeviceClient.create_from_connection_string(
        connection_string(gateway, _key())
    )
    sync_clients.append(client)
    before = sdk_context(client)
    monkeypatch.setattr(itaz, "TESTED_SDK_VERSIONS", ("2.99.0",))
    with pytest.raises(itaz.IncompatibleDependencyError) as err:
        itaz.harden(client)
    message = str(err.value)
    assert f"azure-iot-device 2.99.0, but {sdk.constant.VERSION} is installed" in message
    assert "client_kwargs(policy)" in message
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, it.IoTHubTLSError)
    assert sdk_context(client) is before
    assert not itaz.is_hardened(client)
    with pytest.raises(itaz.IncompatibleDependencyError):
        itaz.harden(sdk.IoTHubDeviceClient)
    assert not itaz.is_hardened(sdk.IoTHubDeviceClient)


def test_harden_refuses_what_is_not_an_iot_hub_client(sdk):
    from azure.iot.device import ProvisioningDeviceClient

    with pytest.raises(TypeError, match="expected an azure-iot-device IoT Hub client"):
        itaz.harden(object())
    with pytest.raises(TypeError, match="got ProvisioningDeviceClient"):
        itaz.harden(ProvisioningDeviceClient)
    with pytest.raises(it.PolicyError, match="policy must be a TlsPolicy"):
        itaz.harden(sdk.IoTHubDeviceClient, policy="strong")  # type: ignore[arg-type]


# -- client_kwargs inside the SDK --------------------------------------------------------------


def test_client_kwargs_become_the_sdks_context_which_replaces_the_os_store(
    sdk, pki, gateway, sync_clients
):
    policy = pki.policy(ciphers=it.CipherProfile.ECC_ONLY)
    client = sdk.IoTHubDeviceClient.create_from_connection_string(
        connection_string(gateway, _key()), **itaz.client_kwargs(policy)
    )
    sync_clients.append(client)
    ctx = sdk_context(client)
    assert {c["name"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"} == {
        s.openssl for s in ECC_SUITES
    }
    # PROTOCOL_TLSv1_2: exactly TLS 1.2, whatever the policy would allow.
    assert ctx.protocol is ssl.PROTOCOL_TLSv1_2
    # MQTT trusts exactly server_verification_cert: the OS store is not loaded.
    assert [c["subject"] for c in ctx.get_ca_certs()] == [
        ((("organizationName", ORGANIZATION),), (("commonName", "iothub-tls Test Root G2"),))
    ]


# -- telemetry through both routes, sync and asyncio -------------------------------------------


ROUTES = ["client_kwargs", "harden"]


def make_client(cls: Any, route: str, cs: str, policy: it.TlsPolicy, **kwargs: Any) -> Any:
    """An existing application's factory call, plus the one-line change of each route."""
    if route == "client_kwargs":
        return cls.create_from_connection_string(cs, **itaz.client_kwargs(policy), **kwargs)
    return itaz.harden(cls.create_from_connection_string(cs, **kwargs), policy)


@pytest.mark.broker
@pytest.mark.parametrize("route", ROUTES)
def test_sync_client_telemetry_arrives(sdk, pki, gateway, hub_factory, sync_clients, route):
    key = _key()
    client = make_client(
        sdk.IoTHubDeviceClient, route, connection_string(gateway, key), pki.policy()
    )
    sync_clients.append(client)
    hub = hub_factory(gateway, leaf_for(pki, gateway), users=dict([credentials(client, key)]))
    client.connect()
    message = sdk.Message(b'{"temperature": 21.5}')
    client.send_message(message)
    topic, payload = hub.next_message()
    assert topic.startswith(f"devices/{DEVICE}/messages/events/")
    assert payload == b'{"temperature": 21.5}'
    info = itaz.tls_info(client)
    assert info.sni == gateway
    assert info.server_key_type == "RSA"
    if route == "harden":
        # The broker allows TLS 1.3, and the hardened context takes it.
        assert info.version == "TLSv1.3"
        assert info.anchor == "iothub-tls Test Root G2"
        assert info.chain == (gateway, "iothub-tls Test Issuing CA", "iothub-tls Test Root G2")
        assert itaz.is_hardened(client)
    else:
        # The SDK's own context is PROTOCOL_TLSv1_2: never TLS 1.3, even when offered.
        assert info.version == "TLSv1.2"
        assert info.cipher in {s.openssl for s in STRONG_SUITES}
        assert not itaz.is_hardened(client)
    client.disconnect()


@pytest.mark.broker
@pytest.mark.parametrize("route", ROUTES)
def test_asyncio_client_telemetry_arrives(sdk, aio, pki, gateway, hub_factory, route):
    key = _key()
    client = make_client(
        aio.IoTHubDeviceClient, route, connection_string(gateway, key), pki.policy()
    )
    hub = hub_factory(gateway, leaf_for(pki, gateway), users=dict([credentials(client, key)]))

    async def run() -> it.TlsInfo:
        try:
            await client.connect()
            await client.send_message("from asyncio")
            return itaz.tls_info(client)
        finally:
            await client.shutdown()

    info = asyncio.run(run())
    assert hub.next_message() == (f"devices/{DEVICE}/messages/events/", b"from asyncio")
    assert info.version == ("TLSv1.3" if route == "harden" else "TLSv1.2")


@pytest.mark.broker
def test_harden_reports_tls12_from_a_tls12_only_broker(
    sdk, pki, gateway, hub_factory, sync_clients
):
    key = _key()
    client = itaz.harden(
        sdk.IoTHubDeviceClient.create_from_connection_string(connection_string(gateway, key)),
        pki.policy(),
    )
    sync_clients.append(client)
    hub_factory(
        gateway, leaf_for(pki, gateway), users=dict([credentials(client, key)]), tls_max="tlsv1.2"
    )
    client.connect()
    info = itaz.tls_info(client)
    assert info.version == "TLSv1.2"
    assert info.iana_cipher in {s.iana for s in STRONG_SUITES}


@pytest.mark.broker
def test_harden_brings_fragment_length_ecc_and_resumption_to_the_sdk(
    sdk, pki, gateway, hub_factory, sync_clients
):
    key = _key()
    policy = pki.policy(ciphers=it.CipherProfile.ECC_ONLY, max_fragment_length=512)
    client = itaz.harden(
        sdk.IoTHubDeviceClient.create_from_connection_string(connection_string(gateway, key)),
        policy,
    )
    sync_clients.append(client)
    hub = hub_factory(gateway, leaf_for(pki, gateway, "ec"), users=dict([credentials(client, key)]))
    client.connect()
    first = itaz.tls_info(client)
    assert (first.version, first.server_key_type, first.max_fragment_length) == (
        "TLSv1.3",
        "EC",
        512,
    )
    assert not first.session_reused
    client.send_message("one")
    assert hub.next_message()[1] == b"one"
    # The SDK reconnects through the same context: the TLS session is resumed.
    client.disconnect()
    client.connect()
    second = itaz.tls_info(client)
    assert second.session_reused
    assert second.anchor == "iothub-tls Test Root G2"
    client.send_message("two")
    assert hub.next_message()[1] == b"two"


@pytest.mark.broker
@pytest.mark.parametrize("route", ROUTES)
def test_a_wrong_key_is_refused_by_the_broker(sdk, pki, gateway, hub_factory, sync_clients, route):
    registered = sdk.IoTHubDeviceClient.create_from_connection_string(
        connection_string(gateway, _key())
    )
    sync_clients.append(registered)
    impostor = make_client(
        sdk.IoTHubDeviceClient,
        route,
        connection_string(gateway, _key()),
        pki.policy(),
        connection_retry=False,
    )
    sync_clients.append(impostor)
    hub_factory(gateway, leaf_for(pki, gateway), users=dict([credentials(registered, None)]))
    with pytest.raises(sdk.exceptions.CredentialError):
        impostor.connect()
    with pytest.raises(it.ClientError, match="no live MQTT connection"):
        itaz.tls_info(impostor)


def test_harden_covers_module_clients_and_both_transports(sdk, aio, pki, gateway):
    cs = connection_string(gateway, _key()) + ";ModuleId=mod1"
    policy = pki.policy(ciphers=it.CipherProfile.ECC_ONLY)
    sync_module = itaz.harden(sdk.IoTHubModuleClient.create_from_connection_string(cs), policy)
    async_module = itaz.harden(aio.IoTHubModuleClient.create_from_connection_string(cs), policy)
    try:
        for client in (sync_module, async_module):
            mqtt_ctx, https_ctx = sdk_context(client), _https_adapter_context(client)
            assert isinstance(mqtt_ctx, it.HardenedSSLContext)
            assert mqtt_ctx is https_ctx  # one policy, one session cache
            assert mqtt_ctx.policy == policy
    finally:
        sync_module.shutdown()
        asyncio.run(async_module.shutdown())


# -- refusals through each route ---------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize("route", ROUTES)
def test_ecc_only_is_refused_by_an_rsa_only_broker(
    sdk, pki, gateway, hub_factory, sync_clients, route
):
    key = _key()
    client = make_client(
        sdk.IoTHubDeviceClient,
        route,
        connection_string(gateway, key),
        pki.policy(ciphers=it.CipherProfile.ECC_ONLY),
        connection_retry=False,
    )
    sync_clients.append(client)
    hub = hub_factory(
        gateway, leaf_for(pki, gateway, "rsa"), users=dict([credentials(client, key)])
    )
    with pytest.raises(sdk.exceptions.ConnectionFailedError) as err:
        client.connect()
    if route == "harden":
        refusal = _find(err.value, it.CipherSuiteError)
        assert "ECC-only mode needs an ECDSA certificate from the server" in str(refusal)
        assert "Use CipherProfile.STRONG if the server has only an RSA certificate" in str(refusal)
    else:
        # The SDK's own context: OpenSSL's bare alert, nothing more.
        refusal = _find(err.value, ssl.SSLError)
        assert refusal.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"
    assert not client.connected
    # What the broker saw: in TLS 1.2 no suite in common; in TLS 1.3 (harden) the suites
    # match but the ECDSA-only signature algorithms leave its RSA key nothing to sign with.
    expected = "no suitable signature algorithm" if route == "harden" else "no shared cipher"
    assert expected in hub.broker.log_text()


@pytest.mark.broker
@pytest.mark.parametrize("route", ROUTES)
def test_pinning_refuses_a_broker_anchored_at_another_root(
    sdk, pki, gateway, hub_factory, sync_clients, route
):
    key = _key()
    client = make_client(
        sdk.IoTHubDeviceClient,
        route,
        connection_string(gateway, key),
        pki.policy(),
        connection_retry=False,
    )
    sync_clients.append(client)
    other = new_root("Some Other Root")
    hub_factory(
        gateway,
        other.issue(gateway, "localhost"),
        users=dict([credentials(client, key)]),
        root=other,
    )
    # Both routes: the SDK files it as a TLS failure (our message keeps OpenSSL's
    # CERTIFICATE_VERIFY_FAILED reason, which is what the SDK looks for).
    with pytest.raises(sdk.exceptions.ClientError, match="TLS exchanges") as err:
        client.connect()
    if route == "harden":
        refusal = _find(err.value, it.CertificateVerificationError)
        assert "Pinned roots: iothub-tls Test Root G2" in str(refusal)
    else:
        refusal = _find(err.value, ssl.SSLCertVerificationError)
    assert refusal.verify_code == 20
    assert not client.connected


# -- X.509 devices -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def device_ca() -> CertificateAuthority:
    return new_root("iothub-tls Test Device CA")


@pytest.mark.broker
def test_harden_presents_the_clients_own_x509_certificate(
    sdk, pki, gateway, hub_factory, device_ca, tmp_path, sync_clients
):
    cert, key = device_ca.issue(cn="dev-x509", client=True).write(tmp_path, "device")
    client = itaz.harden(
        sdk.IoTHubDeviceClient.create_from_x509_certificate(
            sdk.X509(cert, key), HUB, "dev-x509", gateway_hostname=gateway
        ),
        pki.policy(ciphers=it.CipherProfile.ECC_ONLY),
    )
    sync_clients.append(client)
    hub = hub_factory(gateway, leaf_for(pki, gateway, "ec"), client_ca=device_ca)
    client.connect()
    client.send_message("signed")
    assert hub.next_message() == ("devices/dev-x509/messages/events/", b"signed")
    assert itaz.tls_info(client).version == "TLSv1.3"
    assert "as dev-x509" in hub.broker.log_text()


def test_an_identity_other_than_the_clients_certificate_is_refused(
    sdk, device_ca, tmp_path, gateway
):
    cert, key = device_ca.issue(cn="dev-x509", client=True).write(tmp_path, "device")
    other = device_ca.issue(cn="dev-other", client=True)
    client = sdk.IoTHubDeviceClient.create_from_x509_certificate(
        sdk.X509(cert, key), HUB, "dev-x509", gateway_hostname=gateway
    )
    try:
        identity = it.ClientIdentity.from_pem(other.cert_chain_pem, other.key_pem)
        with pytest.raises(
            it.IdentityError, match="is not the certificate the client was created with"
        ):
            itaz.harden(client, identity=identity)
        assert not itaz.is_hardened(client)
        same = it.ClientIdentity.from_files(cert, key)
        assert itaz.is_hardened(itaz.harden(client, identity=same))
    finally:
        client.shutdown()


# -- options the hardened context would override -----------------------------------------------


def test_sdk_options_contradicting_the_policy_are_refused(sdk, pki, gateway, sync_clients):
    cs = connection_string(gateway, _key())
    other_root = new_root("Edge Root").cert_pem.decode()
    pinned = sdk.IoTHubDeviceClient.create_from_connection_string(
        cs, server_verification_cert=other_root
    )
    ecc = sdk.IoTHubDeviceClient.create_from_connection_string(
        cs, cipher=[s.openssl for s in ECC_SUITES]
    )
    both = sdk.IoTHubDeviceClient.create_from_connection_string(
        cs, **itaz.client_kwargs(pki.policy())
    )
    sync_clients.extend([pinned, ecc, both])
    with pytest.raises(it.PolicyError, match="created with server_verification_cert"):
        itaz.harden(pinned, pki.policy())
    with pytest.raises(it.PolicyError, match=r"that is CipherProfile\.ECC_ONLY"):
        itaz.harden(ecc, pki.policy())
    # The same values in the policy are accepted (the routes combine).
    assert itaz.is_hardened(
        itaz.harden(pinned, it.TlsPolicy(roots=it.RootSet.from_pem(other_root)))
    )
    assert itaz.is_hardened(itaz.harden(ecc, pki.policy(ciphers=it.CipherProfile.ECC_ONLY)))
    assert itaz.is_hardened(itaz.harden(both, pki.policy()))


# -- scope and reversibility -------------------------------------------------------------------


def test_hardening_a_class_hardens_only_its_new_clients(sdk, aio, pki, gateway, sync_clients):
    cs = connection_string(gateway, _key())
    before = sdk.IoTHubDeviceClient.create_from_connection_string(cs)
    sync_clients.append(before)
    try:
        assert itaz.harden(sdk.IoTHubDeviceClient, pki.policy()) is sdk.IoTHubDeviceClient
        assert itaz.is_hardened(sdk.IoTHubDeviceClient)
        after = sdk.IoTHubDeviceClient.create_from_connection_string(cs)
        sync_clients.append(after)
        assert itaz.is_hardened(after)
        assert isinstance(sdk_context(after), it.HardenedSSLContext)
        assert sdk_context(after).policy == pki.policy()
        assert not itaz.is_hardened(before)
        other = aio.IoTHubDeviceClient.create_from_connection_string(cs)
        assert not itaz.is_hardened(other)  # another class: untouched
        assert not isinstance(sdk_context(other), it.HardenedSSLContext)
        asyncio.run(other.shutdown())
    finally:
        itaz.unharden(sdk.IoTHubDeviceClient)
    assert not itaz.is_hardened(sdk.IoTHubDeviceClient)
    later = sdk.IoTHubDeviceClient.create_from_connection_string(cs)
    sync_clients.append(later)
    assert not itaz.is_hardened(later)
    assert sdk_context(later).protocol is ssl.PROTOCOL_TLSv1_2


@pytest.mark.broker
def test_a_hardened_class_connects_its_clients_with_the_policy(sdk, aio, pki, gateway, hub_factory):
    key = _key()
    itaz.harden(aio.IoTHubDeviceClient, pki.policy(max_fragment_length=1024))
    try:
        client = aio.IoTHubDeviceClient.create_from_connection_string(
            connection_string(gateway, key)
        )
    finally:
        itaz.unharden(aio.IoTHubDeviceClient)
    hub = hub_factory(gateway, leaf_for(pki, gateway), users=dict([credentials(client, key)]))

    async def run() -> it.TlsInfo:
        try:
            await client.connect()
            await client.send_message("class-wide")
            return itaz.tls_info(client)
        finally:
            await client.shutdown()

    info = asyncio.run(run())
    assert (info.version, info.max_fragment_length) == ("TLSv1.3", 1024)
    assert hub.next_message()[1] == b"class-wide"


@pytest.mark.broker
def test_unharden_gives_the_client_the_sdks_context_back(
    sdk, pki, gateway, hub_factory, sync_clients
):
    key = _key()
    client = itaz.harden(
        sdk.IoTHubDeviceClient.create_from_connection_string(connection_string(gateway, key)),
        pki.policy(),
    )
    sync_clients.append(client)
    hub_factory(gateway, leaf_for(pki, gateway), users=dict([credentials(client, key)]))
    client.connect()
    assert itaz.tls_info(client).version == "TLSv1.3"
    with pytest.raises(it.ClientError, match=r"harden\(\) needs a client that is not connected"):
        itaz.harden(client, pki.policy(ciphers=it.CipherProfile.ECC_ONLY))
    with pytest.raises(it.ClientError, match=r"unharden\(\) needs a client that is not connected"):
        itaz.unharden(client)
    client.disconnect()
    itaz.unharden(client)
    assert not itaz.is_hardened(client)
    # Back to the SDK's context: it trusts the OS store, not the test root.
    with pytest.raises(sdk.exceptions.ClientError, match="TLS exchanges"):
        client.connect()


# -- the HTTPS transport -----------------------------------------------------------------------


class _StorageInfoHandler(http.server.BaseHTTPRequestHandler):
    """IoT Hub's file-upload endpoint, just enough of it: checks the SAS token."""

    key = ""
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        token = it.SasToken.parse(self.headers["Authorization"])
        token.verify(self.key, resource_uri=f"{HUB}/devices/{DEVICE}")
        self.seen.append(
            {
                "path": self.path,
                "host": self.headers["Host"],
                "body": body,
                "tls": self.request.version(),
                "cipher": self.request.cipher()[0],
            }
        )
        reply = json.dumps(
            {
                "correlationId": "c-1",
                "hostName": "storage.local",
                "containerName": "uploads",
                "blobName": body["blobName"],
                "sasToken": "?sig=x",
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def https_hub(
    gateway: str, leaf: Issued, key: str, tmp_path: Path
) -> Iterator[list[dict[str, Any]]]:
    """A real TLS (TLS 1.2 and 1.3) HTTPS server on ``gateway:443``."""
    certfile, keyfile = leaf.write(tmp_path / "https", "server")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certfile, keyfile)
    handler = type("Handler", (_StorageInfoHandler,), {"key": key, "seen": []})
    server = http.server.ThreadingHTTPServer((gateway, HTTPS_PORT), handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler.seen
    finally:
        server.shutdown()
        server.server_close()


def _https_adapter_context(client: Any) -> ssl.SSLContext:
    """The context the (hardened) HTTPS adapter will hand to urllib3."""
    stage = client._http_pipeline._pipeline
    while type(stage).__name__ != "HTTPTransportStage":
        stage = stage.next
    return stage.transport._http_adapter._context


def _https_context(client: Any) -> ssl.SSLContext:
    """The context the SDK's HTTPS transport handed to urllib3 (inspection only)."""
    stage = client._http_pipeline._pipeline
    while type(stage).__name__ != "HTTPTransportStage":
        stage = stage.next
    return stage.transport._http_adapter.poolmanager.connection_pool_kw["ssl_context"]


@pytest.mark.parametrize("route", ROUTES)
def test_https_transport_through_each_route(sdk, pki, tmp_path, monkeypatch, sync_clients, route):
    import certifi

    # requests' bundle: these variables first, else certifi's.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)

    gateway = _https_gateway()
    key = _key()
    client = make_client(
        sdk.IoTHubDeviceClient, route, connection_string(gateway, key), pki.policy()
    )
    sync_clients.append(client)
    with https_hub(gateway, leaf_for(pki, gateway), key, tmp_path) as seen:
        storage = client.get_storage_info_for_blob("reading.json")
    assert storage["blobName"] == "reading.json" and storage["correlationId"] == "c-1"
    assert seen[0]["path"].startswith(f"/devices/{DEVICE}/files?api-version=")
    assert seen[0]["host"] == HUB
    anchors = _https_context(client).get_ca_certs()
    if route == "harden":
        # The server saw TLS 1.3: the SDK's own context (exactly TLS 1.2) was not used.
        assert seen[0]["tls"] == "TLSv1.3"
        assert len(anchors) == 1
    else:
        assert seen[0]["tls"] == "TLSv1.2"
        # requests loaded certifi's whole bundle into the SDK's context on top of
        # server_verification_cert: for HTTPS the pinned root is one anchor among many.
        bundle = Path(certifi.where()).read_text().count("-----BEGIN CERTIFICATE-----")
        assert len(anchors) == bundle + 1


@pytest.mark.parametrize("route", ROUTES)
def test_https_trust_beyond_server_verification_cert(
    sdk, pki, tmp_path, monkeypatch, sync_clients, route
):
    """The SDK's HTTPS transport goes through requests, which loads its own CA bundle
    (certifi, or REQUESTS_CA_BUNDLE) into the SDK's context on every request: with
    client_kwargs a server anchored at a root in that bundle is accepted; the hardened
    context never takes anchors from requests."""
    gateway = _https_gateway()
    key = _key()
    other = new_root("A Root In Requests Bundle")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(other.cert_pem)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    client = make_client(
        sdk.IoTHubDeviceClient, route, connection_string(gateway, key), pki.policy()
    )
    sync_clients.append(client)
    with https_hub(gateway, other.issue(gateway), key, tmp_path) as seen:
        if route == "client_kwargs":
            assert client.get_storage_info_for_blob("a.json")["blobName"] == "a.json"
            assert len(seen) == 1
        else:
            with pytest.raises(sdk.exceptions.ClientError) as err:
                client.get_storage_info_for_blob("a.json")
            assert _find(err.value, it.CertificateVerificationError).verify_code == 20
            assert seen == []


# -- MQTT over WebSockets ----------------------------------------------------------------------


@pytest.mark.broker
def test_harden_covers_mqtt_over_websockets(sdk, pki, hub_factory, sync_clients):
    gateway = _gateway_address(HTTPS_PORT)
    key = _key()
    client = itaz.harden(
        sdk.IoTHubDeviceClient.create_from_connection_string(
            connection_string(gateway, key), websockets=True
        ),
        pki.policy(),
    )
    sync_clients.append(client)
    hub = hub_factory(
        gateway,
        leaf_for(pki, gateway),
        users=dict([credentials(client, key)]),
        protocol="websockets",
        port=HTTPS_PORT,
    )
    client.connect()
    client.send_message("over websockets")
    assert hub.next_message()[1] == b"over websockets"
    info = itaz.tls_info(client)
    assert (info.version, info.anchor) == ("TLSv1.3", "iothub-tls Test Root G2")


def test_mqtt_over_websockets_to_the_local_hubs_https_door(sdk, tmp_path, sync_clients):
    """The SDK with websockets=True against iothub-tls's own local hub: MQTT over
    WebSockets on the hub's HTTPS door (443), as on IoT Hub; telemetry, C2D, the
    connection log (MqttWs); the same door refuses the SDK with a wrong key."""
    from iothub_tls.hub.hub import HubOptions, LocalHub

    _gateway_address(HTTPS_PORT, name=HUB)  # localhost:443 must be free (the SDK's port)
    options = HubOptions(
        state_dir=tmp_path / "hub",
        hostname=HUB,
        bind="127.0.0.1",
        mqtt_port=0,
        amqp_port=None,
        https_port=HTTPS_PORT,
    )
    with LocalHub(options) as hub:
        creds = hub.add_device(DEVICE)
        policy = it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path))
        client = itaz.harden(
            sdk.IoTHubDeviceClient.create_from_connection_string(
                creds.connection_string, websockets=True, connection_retry=False
            ),
            policy,
        )
        sync_clients.append(client)
        client.connect()
        client.send_message("over websockets to the local hub")
        got = hub.state.wait_for_telemetry(lambda t: t.device_id == DEVICE, timeout=10)
        assert got is not None and got.payload == b"over websockets to the local hub"
        hub.state.enqueue_c2d(DEVICE, b"back over websockets", {"k": "v"})
        message = client.receive_message(timeout=10)
        assert message is not None and message.data == b"back over websockets"
        assert message.custom_properties.get("k") == "v"
        info = itaz.tls_info(client)
        assert info.anchor == "iothub-tls Local Hub Root" and info.sni == HUB
        client.shutdown()
        sync_clients.remove(client)
        connected = [e for e in hub.log.events if e.device_id == DEVICE]
        assert connected[0].protocol == "MqttWs" and connected[0].result == "Success"
        # the failing twin: the same door, the same SDK, a key the hub does not know
        impostor = itaz.harden(
            sdk.IoTHubDeviceClient.create_from_connection_string(
                f"HostName={HUB};DeviceId={DEVICE};SharedAccessKey={_key()}",
                websockets=True,
                connection_retry=False,
            ),
            policy,
        )
        sync_clients.append(impostor)
        with pytest.raises(sdk.exceptions.CredentialError):
            impostor.connect()
        refused = [e for e in hub.log.events if e.device_id == DEVICE and e.result == "Failure"]
        assert refused and refused[-1].protocol == "MqttWs"
        assert "signature" in (refused[-1].reason or "").lower()


# -- the sample and the docs ------------------------------------------------------------------


ROOT = Path(__file__).resolve().parent.parent


def _sample() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "azure_sdk_harden", ROOT / "samples" / "azure_sdk_harden.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.broker
@pytest.mark.parametrize(("route", "version"), [("harden", "TLSv1.3"), ("kwargs", "TLSv1.2")])
def test_sample_sends_through_each_route(
    sdk, pki, gateway, hub_factory, tmp_path, capsys, route, version
):
    roots = tmp_path / "roots.pem"
    roots.write_bytes(pki.root.cert_pem)
    # The sample makes its SAS token itself: this listener takes any credentials.
    hub = hub_factory(gateway, leaf_for(pki, gateway), anonymous=True)
    cs = connection_string(gateway, _key())
    argv = ["--connection-string", cs, "--roots", str(roots), "--count", "2", "--route", route]
    assert _sample().main(argv) == 0
    assert f"connected: {version} " in capsys.readouterr().out
    for n in range(2):
        topic, payload = hub.next_message()
        assert topic.startswith(f"devices/{DEVICE}/messages/events/")
        assert json.loads(payload) == {"n": n, "route": route}


@pytest.mark.broker
def test_sample_explains_a_refusal(sdk, pki, gateway, hub_factory, tmp_path, capsys):
    roots = tmp_path / "roots.pem"
    roots.write_bytes(pki.root.cert_pem)
    hub = hub_factory(gateway, leaf_for(pki, gateway, "rsa"), anonymous=True)
    argv = ["--connection-string", connection_string(gateway, _key()), "--roots", str(roots)]
    assert _sample().main([*argv, "--ecc-only"]) == 1
    assert "ECC-only mode needs an ECDSA certificate" in capsys.readouterr().err
    assert _sample().main([*argv, "--route", "kwargs", "--max-fragment-length", "1024"]) == 2
    assert "max_fragment_length=1024 cannot be expressed" in capsys.readouterr().err
    assert "no suitable signature algorithm" in hub.broker.log_text()


def test_docs_present_the_whole_public_surface():
    text = (ROOT / "docs" / "azure-iot-device.md").read_text()
    for name in itaz.__all__:
        assert f"`{name}" in text, f"docs/azure-iot-device.md does not present {name}"
    for version in itaz.TESTED_SDK_VERSIONS:
        assert version in text
