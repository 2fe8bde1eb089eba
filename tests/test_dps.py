"""The Device Provisioning Service: iothub_tls.dps's client against the local hub's DPS
door, over MQTT and HTTPS, through real TLS on loopback.

Every registration that is accepted has failing twins: a wrong key, an unknown
registration, a wrong ID scope, a disabled enrollment, a failed assignment, throttling,
a registration that does not finish in time, an assignment to a hub outside the
policy's trust, and the TLS refusal matrix (wrong root, TLS 1.1, ECC-only against an
RSA-only door, an expired certificate, the wrong host name) against the DPS door.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import iothub_tls as it
from iothub_tls.auth.sas import SasToken
from iothub_tls.cli import main
from iothub_tls.dps import (
    ProvisioningClient,
    ProvisioningError,
    Registration,
    RegistrationDisabledError,
    RegistrationFailedError,
    UntrustedAssignmentError,
    derive_device_key,
)
from iothub_tls.dps import aio as dps_aio
from iothub_tls.dps import conventions as dps
from iothub_tls.hub import DeviceRegistry, HubTlsProfile, ServerCredential
from iothub_tls.hub.dps import DpsEndpoint, ProvisioningService
from iothub_tls.hub.hub import HubOptions, LocalHub
from iothub_tls.testing.pki import Issued, KeyType
from iothub_tls.testing.ports import free_port
from iothub_tls.testing.proxies import Dante, TinyProxy
from tests.brokers import require_binary
from tests.conftest import HOST, NOW, new_root

TRANSPORTS = ["mqtt", "https"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    options = HubOptions(
        tmp_path_factory.mktemp("hub"),
        hostname="localhost",
        mqtt_port=0,
        amqp_port=None,
        https_port=0,
        dps_port=0,
    )
    running = LocalHub(options)
    running.dps.retry_after = 0  # polls at once (retry-after=0) unless a test says otherwise
    with running:
        yield running


@pytest.fixture
def policy(hub: LocalHub) -> it.TlsPolicy:
    return it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path))


_ids = iter(range(1_000_000))


def _logged(hub: LocalHub, registration_id: str, timeout: float = 5.0) -> list[Any]:
    """The DPS door's log lines for ``registration_id``, once there is one (the door
    writes them on the hub's thread, possibly after the device has its answer)."""
    deadline = time.monotonic() + timeout
    while True:
        events = list(hub.log.events)
        found = [e for e in events if e.protocol == "Dps" and e.device_id == registration_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def _rid(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


def _client(
    hub: LocalHub,
    rid: str,
    transport: str,
    *,
    key: str | None = None,
    identity: it.ClientIdentity | None = None,
    **kwargs: Any,
) -> ProvisioningClient:
    options: dict[str, Any] = {
        "endpoint": "localhost",
        "port": hub.ports["dps"],
        "transport": transport,
        "policy": it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path)),
        **kwargs,
    }
    scope = options.pop("id_scope", hub.dps.id_scope)
    if identity is not None:
        return ProvisioningClient.from_x509(scope, rid, identity, **options)
    assert key is not None
    return ProvisioningClient.from_symmetric_key(scope, rid, key, **options)


def _sends(hub: LocalHub, registration: Registration, transport: str = "mqtt") -> None:
    """The registration becomes a connected device client of the hub in one call."""
    device = registration.connect(transport, port=hub.ports[transport])
    try:
        body = f"from {registration.device_id}".encode()
        device.send_telemetry(body)
        got = hub.state.wait_for_telemetry(
            lambda t: t.device_id == registration.device_id and t.payload == body, timeout=10
        )
        assert got is not None
    finally:
        device.close()


# -- conventions: both sides from one module --------------------------------------------------


def test_derive_device_key_is_hmac_sha256_of_the_registration_id():
    group_key = base64.b64encode(b"k" * 32).decode()
    expected = base64.b64encode(hmac.new(b"k" * 32, b"sensor-7", hashlib.sha256).digest()).decode()
    assert derive_device_key(group_key, "sensor-7") == expected
    assert derive_device_key(group_key, "sensor-8") != expected
    with pytest.raises(it.PolicyError, match="not valid base64"):
        derive_device_key("not base64!", "sensor-7")


def test_topics_usernames_and_paths_round_trip():
    user = dps.mqtt_username("0ne0000ABCD", "dev-1", client_version="iothub-tls/1 x")
    assert user.startswith("0ne0000ABCD/registrations/dev-1/api-version=2019-03-31&ClientVersion=")
    scope, rid, params = dps.parse_mqtt_username(user)  # type: ignore[misc]
    assert (scope, rid, params["ClientVersion"]) == ("0ne0000ABCD", "dev-1", "iothub-tls/1 x")
    assert dps.parse_request_topic(dps.register_topic("7")) == dps.DpsRequest("register", "7")
    assert dps.parse_request_topic(dps.operation_status_topic("8", "4.a&b")) == dps.DpsRequest(
        "status", "8", "4.a&b"
    )
    assert dps.parse_response_topic(dps.response_topic(202, "9", 3)) == dps.DpsResponse(202, "9", 3)
    assert dps.parse_request_topic("$dps/registrations/PUT/iotdps-register/?x=1") is None
    assert dps.parse_path(dps.register_path("s", "r").split("?")[0]) == ("s", "r", None)
    assert dps.parse_path(dps.operation_path("s", "r", "o/p").split("?")[0]) == ("s", "r", "o/p")
    state = dps.Registration("r", "assigned", "hub", "dev", "initialAssignment", {"a": 1}, "e")
    operation = dps.parse_operation(dps.operation_body("op", "assigned", state))
    assert operation.registration == dataclasses.replace(state, operation_id="op")
    assert "_origin" not in repr(state)


def test_the_client_signs_its_token_for_the_registration(hub):
    client = dps_aio.ProvisioningClient(hub.dps.id_scope, "dev-x", key=DeviceRegistry.new_key())
    token = SasToken.parse(client._token() or "")
    assert token.resource_uri == f"{hub.dps.id_scope}/registrations/dev-x"
    assert token.key_name == "registration"


# -- registrations that are accepted ------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_individual_symmetric_key_registers_and_connects(hub, transport):
    rid = _rid("ind")
    enrollment = hub.dps.add_individual_enrollment(rid, device_id=f"{rid}-dev", payload={"x": 1})
    client = _client(hub, rid, transport, key=enrollment.primary_key)
    registration = client.register(payload={"fw": "1.0"})
    assert registration.status == "assigned"
    assert (registration.assigned_hub, registration.device_id) == ("localhost", f"{rid}-dev")
    assert registration.substatus == "initialAssignment"
    assert registration.payload == {"x": 1} and registration.etag
    assert client.tls_info is not None and client.tls_info.version == "TLSv1.3"
    assert hub.registry.get(f"{rid}-dev").primary_key == enrollment.primary_key
    _sends(hub, registration)
    # its secondary key registers too
    again = _client(hub, rid, transport, key=enrollment.secondary_key).register()
    assert again.device_id == f"{rid}-dev"
    _sends(hub, again, "https")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_group_symmetric_key_registers_devices_with_derived_keys(hub, transport):
    group = hub.dps.add_enrollment_group(_rid("grp"))
    rid = _rid("member")
    key = derive_device_key(group.primary_key, rid)
    registration = _client(hub, rid, transport, key=key).register()
    assert registration.device_id == rid
    assert hub.registry.get(rid).primary_key == key
    _sends(hub, registration)
    # the group key itself is not a device key
    with pytest.raises(it.AuthenticationError, match="derived from the group key"):
        _client(hub, _rid("member"), transport, key=group.primary_key).register()


def _identity(hub: LocalHub, tmp_path: Path, rid: str) -> tuple[it.ClientIdentity, bytes]:
    issued = hub.pki.issuer().device(rid, key_type=KeyType.EC)
    files = issued.write(tmp_path, rid)
    return it.ClientIdentity.from_files(files.certificate, files.private_key), issued.cert_pem


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_x509_individual_and_group_enrollments_register_and_connect(hub, transport, tmp_path):
    rid = _rid("x509")
    identity, cert_pem = _identity(hub, tmp_path, rid)
    hub.dps.add_individual_enrollment(rid, certificate_pem=cert_pem)
    registration = _client(hub, rid, transport, identity=identity).register()
    assert hub.registry.get(rid).auth_type == "selfSigned"
    _sends(hub, registration)
    group = hub.dps.add_enrollment_group(_rid("ca"), ca_pem=hub.pki.intermediate_cert.read_bytes())
    try:
        member = _rid("x509m")
        identity, _ = _identity(hub, tmp_path, member)
        registration = _client(hub, member, transport, identity=identity).register()
        assert hub.registry.get(member).auth_type == "certificateAuthority"
        _sends(hub, registration, "https")
        # the registration id is the certificate's CN: another id is refused
        with pytest.raises(it.AuthenticationError):
            _client(hub, _rid("not-the-cn"), transport, identity=identity).register()
    finally:
        hub.dps.remove(group.name, group=True)
    # without the group, the member's certificate is not enrolled any more
    with pytest.raises(it.AuthenticationError):
        _client(hub, member, transport, identity=identity).register()


def test_asyncio_client_registers_on_the_applications_loop(hub):
    rid = _rid("aio")
    enrollment = hub.dps.add_individual_enrollment(rid)

    async def main() -> Registration:
        client = dps_aio.ProvisioningClient.from_symmetric_key(
            hub.dps.id_scope, rid, enrollment.primary_key, endpoint="localhost",
            port=hub.ports["dps"], transport="https",
            policy=it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path)),
        )  # fmt: skip
        registration = await client.register()
        async with registration.device_client("mqtt", aio=True, port=hub.ports["mqtt"]) as dev:
            await dev.send_telemetry(b"aio")
        return registration

    registration = asyncio.run(main())
    assert registration.device_id == rid
    assert hub.state.wait_for_telemetry(lambda t: t.device_id == rid, timeout=5) is not None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_polls_after_the_retry_after_the_service_sends(hub, transport):
    rid = _rid("poll")
    enrollment = hub.dps.add_individual_enrollment(rid)
    waits: list[float] = []
    hub.dps.retry_after = 2
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await real_sleep(0)

    try:
        registration = _client(
            hub, rid, transport, key=enrollment.primary_key, sleep=sleep
        ).register()
    finally:
        hub.dps.retry_after = 0
    assert registration.status == "assigned"
    assert waits == [2]  # what the door's retry-after said, once, before the poll


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_key_unknown_registration_and_wrong_scope_are_refused(hub, transport):
    rid = _rid("refused")
    enrollment = hub.dps.add_individual_enrollment(rid)
    cases = [
        (rid, DeviceRegistry.new_key(), {}, "signature does not match"),
        (_rid("unknown"), enrollment.primary_key, {}, "no enrollment admits"),
        (rid, enrollment.primary_key, {"id_scope": "0neWRONG00"}, "unknown ID scope"),
    ]
    for registration_id, key, extra, reason in cases:
        with pytest.raises(it.AuthenticationError) as err:
            _client(hub, registration_id, transport, key=key, **extra).register()
        if transport == "https":
            assert "401" in str(err.value) and reason in str(err.value)
        else:
            assert isinstance(err.value, it.ConnectRefusedError)
            assert "CONNACK 5" in str(err.value) and "ID scope" in str(err.value)
            logged = _logged(hub, registration_id)
            assert reason in (logged[-1].reason or "")
        assert hub.registry.get(registration_id) is None
        assert "sig=" not in str(err.value)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_disabled_enrollment_is_reported_and_no_device_is_made(hub, transport):
    rid = _rid("disabled")
    enrollment = hub.dps.add_individual_enrollment(rid, enabled=False)
    with pytest.raises(RegistrationDisabledError, match="enable the enrollment") as err:
        _client(hub, rid, transport, key=enrollment.primary_key).register()
    assert err.value.registration.status == "disabled"
    assert hub.registry.get(rid) is None
    hub.dps.set_enabled(rid, True)
    assert _client(hub, rid, transport, key=enrollment.primary_key).register().status == "assigned"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_failed_assignment_says_why(hub, transport):
    rid = _rid("failed")
    hub.registry.add_ca_device(rid)  # the device id is taken by an X.509 device
    enrollment = hub.dps.add_individual_enrollment(rid)
    with pytest.raises(RegistrationFailedError, match=r"X\.509 credential") as err:
        _client(hub, rid, transport, key=enrollment.primary_key).register()
    assert err.value.registration.status == "failed"
    assert err.value.registration.error_code
    assert hub.registry.get(rid).auth_type == "certificateAuthority"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_throttling_is_waited_out_then_reported(hub, transport):
    rid = _rid("throttled")
    enrollment = hub.dps.add_individual_enrollment(rid)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    hub.dps.fail_next(429, times=2, retry_after=3)
    registration = _client(hub, rid, transport, key=enrollment.primary_key, sleep=sleep).register()
    assert registration.status == "assigned"
    assert waits == [3, 3, 0]  # the 429s' retry-after twice, then the poll's
    hub.dps.fail_next(429, times=1, retry_after=30)
    with pytest.raises(it.ThrottledError, match="429") as err:
        _client(hub, rid, transport, key=enrollment.primary_key, sleep=sleep).register(timeout=5)
    assert err.value.retry_after == 30


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_registration_still_assigning_when_time_runs_out(hub, transport):
    rid = _rid("slow")
    enrollment = hub.dps.add_individual_enrollment(rid)
    hub.dps.retry_after = 60
    try:
        with pytest.raises(it.OperationTimeoutError, match="still 'assigning'"):
            _client(hub, rid, transport, key=enrollment.primary_key).register(timeout=2)
    finally:
        hub.dps.retry_after = 0


# -- through a proxy (tinyproxy: HTTP CONNECT, danted: SOCKS5) ------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_registration_through_a_proxy(hub, tmp_path, transport, kind):
    require_binary("tinyproxy" if kind == "http" else "danted")
    port = hub.ports["dps"]
    server: TinyProxy | Dante = (
        TinyProxy(tmp_path / "proxy", connect_ports=[port])
        if kind == "http"
        else Dante(tmp_path / "proxy", allow_ports=[port])
    )
    rid = _rid(f"proxied-{kind}")
    enrollment = hub.dps.add_individual_enrollment(rid)
    with server:
        client = _client(hub, rid, transport, key=enrollment.primary_key, proxy=server.url())
        registration = client.register(timeout=10)
        log = server.log_text
    assert registration.status == "assigned" and registration.device_id == rid
    # TLS ran end to end with the provisioning endpoint, through the proxy's tunnel
    assert client.tls_info is not None and client.tls_info.sni == "localhost"
    assert client.tls_info.anchor == "iothub-tls Local Hub Root"
    if kind == "http":  # the proxy was asked for the endpoint by name
        assert f"CONNECT localhost:{port}" in log, log[-2000:]
    else:
        assert f".{port}" in log and "tcp/connect" in log, log[-2000:]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_proxy_that_refuses_the_tunnel_is_named(hub, tmp_path, transport):
    require_binary("tinyproxy")
    rid = _rid("refused-tunnel")
    enrollment = hub.dps.add_individual_enrollment(rid)
    with TinyProxy(tmp_path / "proxy", connect_ports=[443]) as server:  # 443 only
        client = _client(hub, rid, transport, key=enrollment.primary_key, proxy=server.url())
        with pytest.raises(it.ProxyError, match="refused to open a tunnel") as caught:
            client.register(timeout=10)
    assert caught.value.status == 403 and server.url() in str(caught.value)


def test_a_proxy_that_is_down(hub):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = _client(hub, "down", "mqtt", key=DeviceRegistry.new_key(), proxy=url)
    with pytest.raises(it.ProxyError, match="could not connect to the proxy"):
        client.register(timeout=5)


def test_a_malformed_proxy_is_refused_before_any_io(hub):
    with pytest.raises(it.PolicyError, match="proxy"):
        _client(hub, "p", "mqtt", key=DeviceRegistry.new_key(), proxy="ftp://proxy:21")


def test_bad_arguments_are_refused_before_any_io(hub):
    key = DeviceRegistry.new_key()
    with pytest.raises(it.PolicyError, match="transport must be 'mqtt' or 'https'"):
        _client(hub, "a", "amqp", key=key)
    with pytest.raises(it.PolicyError, match="ID scope"):
        _client(hub, "a", "mqtt", key=key, id_scope="not a scope")
    with pytest.raises(it.PolicyError, match="registration id"):
        _client(hub, "a/b", "mqtt", key=key)


def test_an_endpoint_nobody_listens_on(hub):
    client = _client(hub, "nobody", "https", key=DeviceRegistry.new_key(), port=1)
    with pytest.raises(it.ConnectionFailedError, match="could not connect"):
        client.register(timeout=5)


# -- assignments outside the policy's trust ----------------------------------------------------


def test_assignment_to_a_hub_outside_allowed_hubs_is_refused(hub):
    rid = _rid("elsewhere")
    enrollment = hub.dps.add_individual_enrollment(rid, iot_hub="evil.example.net")
    client = _client(
        hub,
        rid,
        "mqtt",
        key=enrollment.primary_key,
        allowed_hubs=["*.azure-devices.net", "localhost"],
    )
    registration = client.register()
    assert registration.assigned_hub == "evil.example.net"
    with pytest.raises(UntrustedAssignmentError, match="not one of the allowed hubs"):
        registration.connect("mqtt")
    assert hub.registry.get(rid) is None  # the local DPS manages only its own hub


def test_assignment_to_a_hub_whose_certificate_the_policy_does_not_trust(hub, tmp_path):
    with LocalHub(
        HubOptions(tmp_path / "other", hostname="other.test", mqtt_port=0, amqp_port=None,
                   https_port=None)
    ) as other:  # fmt: skip
        rid = _rid("other")
        enrollment = hub.dps.add_individual_enrollment(rid, iot_hub="other.test")
        other.registry.add_sas_device(rid, enrollment.primary_key)
        registration = _client(hub, rid, "mqtt", key=enrollment.primary_key).register()
        assert registration.assigned_hub == "other.test"
        with pytest.raises(UntrustedAssignmentError, match="outside the policy's trust") as err:
            registration.connect("mqtt", host="127.0.0.1", port=other.ports["mqtt"])
        assert isinstance(err.value.__cause__, it.CertificateVerificationError)


def test_a_registration_without_its_client_cannot_connect():
    parsed = dps.parse_operation(
        dps.operation_body("op", "assigned", dps.Registration("r", "assigned", "h", "d"))
    )
    assert parsed.registration is not None
    with pytest.raises(ProvisioningError, match="holds no credential"):
        parsed.registration.device_client("mqtt")


# -- the DPS door: persistence, ports, the hub's description ------------------------------------


def test_enrollments_and_id_scope_survive_a_restart(tmp_path):
    options = HubOptions(tmp_path, mqtt_port=None, amqp_port=None, https_port=None, dps_port=0)
    first = LocalHub(options)
    enrollment = first.dps.add_enrollment_group("persisted")
    scope = first.dps.id_scope
    assert (tmp_path / "dps.json").stat().st_mode & 0o777 == 0o600
    second = LocalHub(options)
    assert second.dps.id_scope == scope
    [again] = second.dps.enrollments
    assert again.primary_key == enrollment.primary_key
    with second:
        described = json.loads((tmp_path / "hub.json").read_text())["dps"]
        assert described["idScope"] == scope and described["port"] == second.ports["dps"]
        assert "primaryKey" not in json.dumps(described)


def test_the_door_answers_http_it_does_not_know(hub):
    import http.client

    context = ssl.create_default_context(cafile=str(hub.root_pem_path))
    conn = http.client.HTTPSConnection("localhost", hub.ports["dps"], context=context, timeout=5)
    try:
        conn.request("GET", "/nothing/here")
        response = conn.getresponse()
        body = json.loads(response.read())
        assert response.status == 404 and body["errorCode"] == 404001
        conn.request("PUT", f"/{hub.dps.id_scope}/registrations/x/register")  # no api-version
        response = conn.getresponse()
        assert response.status == 400 and "api-version" in json.loads(response.read())["message"]
    finally:
        conn.close()


# -- the TLS refusal matrix against the DPS endpoint -------------------------------------------


def _cred(issued: Issued) -> ServerCredential:
    return ServerCredential.from_pem(issued.cert_chain_pem, issued.key_pem)


@pytest.fixture
def bare_door(pki, start_door):
    """A DPS door with a chosen TLS profile (the hub's service, its own registry)."""

    def make(profile: HubTlsProfile) -> tuple[DpsEndpoint, ProvisioningService]:
        registry = DeviceRegistry(HOST)
        service = ProvisioningService(registry, HOST)
        service.retry_after = 0
        door = start_door(DpsEndpoint, profile, registry, service)
        return door, service  # type: ignore[return-value]

    return make


def _register_at(door: DpsEndpoint, service: ProvisioningService, policy: it.TlsPolicy,
                 transport: str, endpoint: str = HOST) -> Registration:  # fmt: skip
    rid = _rid("matrix")
    enrollment = service.add_individual_enrollment(rid)
    client = ProvisioningClient.from_symmetric_key(
        service.id_scope, rid, enrollment.primary_key, endpoint=endpoint, host="127.0.0.1",
        port=door.port, transport=transport, policy=policy,
    )  # fmt: skip
    return client.register(timeout=10)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_tls_refusal_matrix_against_the_dps_door(pki, bare_door, transport):
    good = HubTlsProfile((_cred(pki.rsa_leaf), _cred(pki.ec_leaf)))
    door, service = bare_door(good)
    # the accepted twin: the pinned root, TLS 1.2+, the right host
    assert _register_at(door, service, pki.policy(), transport).status == "assigned"
    # wrong root
    with pytest.raises(it.CertificateVerificationError):
        _register_at(
            door,
            service,
            it.TlsPolicy(roots=it.RootSet.from_pem(new_root("Other").cert_pem)),
            transport,
        )
    # wrong host name
    with pytest.raises(it.CertificateVerificationError, match=r"(?i)hostname|host name"):
        _register_at(door, service, pki.policy(), transport, endpoint="dps.elsewhere.test")
    # a door that speaks only TLS 1.1
    door11, service11 = bare_door(
        HubTlsProfile((_cred(pki.rsa_leaf),), min_version=ssl.TLSVersion.TLSv1,
                      max_version=ssl.TLSVersion.TLSv1_1, legacy_ciphers=True)
    )  # fmt: skip
    with pytest.raises(it.ProtocolVersionError, match=r"TLS 1\.2 or later"):
        _register_at(door11, service11, pki.policy(), transport)
    # ECC-only device, RSA-only door
    rsa_door, rsa_service = bare_door(HubTlsProfile((_cred(pki.rsa_leaf),)))
    with pytest.raises((it.CipherSuiteError, it.PolicyViolation)):
        _register_at(
            rsa_door, rsa_service, pki.policy(ciphers=it.CipherProfile.ECC_ONLY), transport
        )
    # ... which the same device passes at a door with an ECDSA certificate
    assert (
        _register_at(door, service, pki.policy(ciphers=it.CipherProfile.ECC_ONLY), transport).status
        == "assigned"
    )
    # an expired door certificate
    expired = pki.intermediate.issue(
        HOST, not_before=NOW - dt.timedelta(days=30), not_after=NOW - dt.timedelta(days=1)
    )
    old_door, old_service = bare_door(HubTlsProfile((_cred(expired),)))
    with pytest.raises(it.CertificateVerificationError, match=r"(?i)expired"):
        _register_at(old_door, old_service, pki.policy(), transport)


# -- the command line: serve --dps, provision ----------------------------------------------------


def _serve_json(state: Path, *extra: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """``iothub-tls serve --json`` in a subprocess and the summary it prints first."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "iothub_tls",
            "serve",
            "--state",
            str(state),
            "--json",
            "--mqtt-port",
            "0",
            "--amqp-port",
            "off",
            "--https-port",
            "0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    text = ""
    while True:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        if not line:
            proc.kill()
            raise AssertionError(f"serve did not start: {text}{proc.stderr.read()}")  # type: ignore[union-attr]
        text += line
        if line == "}\n":
            return proc, json.loads(text[text.index("{") :])


def test_serve_dps_enrolls_and_provision_registers(tmp_path, capsys):
    proc, summary = _serve_json(
        tmp_path,
        "--dps",
        "--dps-port",
        "0",
        "--enroll",
        "cli-dev",
        "--enroll",
        "cli-cam:x509",
        "--enroll-group",
        "cli-fleet",
    )
    try:
        dps_doc = summary["dps"]
        assert dps_doc["port"] == summary["ports"]["dps"] and dps_doc["idScope"].startswith("0ne")
        enrolled = {e.get("registrationId") or e["groupId"]: e for e in dps_doc["enrolled"]}
        # an individual symmetric key, over MQTT
        code = main(
            [
                "provision",
                "--state",
                str(tmp_path),
                "--registration-id",
                "cli-dev",
                "--key",
                enrolled["cli-dev"]["primaryKey"],
                "--json",
            ]
        )
        out = json.loads(capsys.readouterr().out)
        assert code == 0, out
        assert out["registration"]["status"] == "assigned"
        assert out["connectionString"].startswith("HostName=localhost;DeviceId=cli-dev;")
        # a group key over HTTPS (the device key is derived)
        code = main(
            [
                "provision",
                "--state",
                str(tmp_path),
                "--registration-id",
                "cli-7",
                "--group-key",
                enrolled["cli-fleet"]["primaryKey"],
                "--transport",
                "https",
            ]
        )
        printed = capsys.readouterr().out
        assert code == 0 and "cli-7: assigned" in printed and "device id  cli-7" in printed
        # X.509 with the certificate serve made
        code = main(
            [
                "provision",
                "--state",
                str(tmp_path),
                "--registration-id",
                "cli-cam",
                "--cert",
                enrolled["cli-cam"]["certificate"],
                "--cert-key",
                enrolled["cli-cam"]["key"],
                "--json",
            ]
        )
        assert (
            code == 0
            and json.loads(capsys.readouterr().out)["registration"]["deviceId"] == "cli-cam"
        )
        # checked and refused: 1
        code = main(
            [
                "provision",
                "--state",
                str(tmp_path),
                "--registration-id",
                "cli-dev",
                "--key",
                DeviceRegistry.new_key(),
                "--json",
            ]
        )
        captured = capsys.readouterr()
        assert code == 1 and json.loads(captured.out)["error"] == "ConnectRefusedError"
        # an assignment outside --allowed-hub: 1
        code = main(
            [
                "provision",
                "--state",
                str(tmp_path),
                "--registration-id",
                "cli-dev",
                "--key",
                enrolled["cli-dev"]["primaryKey"],
                "--allowed-hub",
                "*.azure-devices.net",
            ]
        )
        assert code == 1 and "not one of the allowed hubs" in capsys.readouterr().err
    finally:
        proc.send_signal(2)
        proc.communicate(timeout=10)
    # could not check: 2 (no hub runs there any more; a usage error)
    assert (
        main(["provision", "--state", str(tmp_path), "--registration-id", "x", "--key", "a"]) == 2
    )
    assert "no local hub is running" in capsys.readouterr().err
    assert main(["provision", "--registration-id", "x", "--key", "a"]) == 2
    assert "--id-scope" in capsys.readouterr().err


def test_provision_unreachable_endpoint_could_not_check(capsys):
    code = main(
        [
            "provision",
            "--id-scope",
            "0ne00000000",
            "--registration-id",
            "x",
            "--key",
            DeviceRegistry.new_key(),
            "--endpoint",
            "localhost",
            "--port",
            "1",
            "--timeout",
            "5",
            "--json",
        ]
    )
    assert code == 2 and "could not connect" in json.loads(capsys.readouterr().out)["error"]
