"""The HTTPS device client against the local compliance endpoint, over real TLS on
loopback: every operation of IoT Hub's device REST API, SAS and X.509 devices, and for
each accepted connection the refusals that must happen instead (old TLS, weak suites,
wrong root, ECC-only against an RSA hub, bad credentials, unknown device)."""

from __future__ import annotations

import io
import json
import socket
import ssl
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest

import iothub_tls as it
from iothub_tls.https import (
    DeviceNotFoundError,
    HttpsDeviceClient,
    HttpsOptions,
    HubServerError,
    Message,
    MessageLockLostError,
    MessageTooLargeError,
    RetryPolicy,
    ThrottledError,
)
from iothub_tls.hub import (
    ConnectionEvent,
    ConnectionLog,
    DeviceNotRegisteredError,
    DeviceRegistry,
    HttpsEndpoint,
    HubState,
    HubTlsProfile,
    RegistryError,
    ServerCredential,
)
from iothub_tls.testing.faultproxy import FaultProxy
from iothub_tls.testing.pki import Issued
from iothub_tls.testing.relay import RecordRelay
from tests.conftest import HOST, PKI, new_root

# -- fixtures --------------------------------------------------------------------------------


@dataclass
class Devices:
    """Device certificates: registered by thumbprint, CA-signed, and two that must fail."""

    x509: Issued  # registered by thumbprint
    ca_signed: Issued  # CN = device id, issued by the registered CA
    unregistered: Issued  # chains to the trusted root, thumbprint not registered
    foreign: Issued  # issued by a CA the endpoint does not trust


class FakeClock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def devices(pki: PKI) -> Devices:
    foreign_ca = new_root("Foreign Device CA")
    return Devices(
        x509=pki.intermediate.issue(cn="dev-x509", client=True, key_type="ec"),
        ca_signed=pki.intermediate.issue(cn="dev-ca", client=True),
        unregistered=pki.intermediate.issue(cn="dev-x509", client=True, key_type="ec"),
        foreign=foreign_ca.issue(cn="dev-x509", client=True, key_type="ec"),
    )


def _cred(issued: Issued) -> ServerCredential:
    return ServerCredential.from_pem(issued.cert_chain_pem, issued.key_pem)


@pytest.fixture
def profile(pki: PKI) -> HubTlsProfile:
    """What IoT Hub serves: TLS 1.2+, strong suites, RSA and ECDSA, device certs asked."""
    return HubTlsProfile((_cred(pki.rsa_leaf), _cred(pki.ec_leaf)), client_ca_pem=pki.root.cert_pem)


@pytest.fixture
def registry(pki: PKI, devices: Devices) -> DeviceRegistry:
    reg = DeviceRegistry(HOST)
    reg.add_sas_device("dev-sas")
    reg.add_x509_device(
        "dev-x509",
        it.ClientIdentity.from_pem(
            devices.x509.cert_chain_pem, devices.x509.key_pem
        ).thumbprint_sha256,
    )
    reg.add_ca_device("dev-ca")
    reg.add_certificate_authority(pki.intermediate.cert_pem)
    reg.add_policy("device")
    return reg


@pytest.fixture
def endpoints(
    profile: HubTlsProfile, registry: DeviceRegistry, start_door: Callable[..., Any]
) -> Callable[..., HttpsEndpoint]:
    """Factory: ``endpoints(profile=None, **options)`` -> a started endpoint, stopped after."""

    def make(custom: HubTlsProfile | None = None, **options: object) -> HttpsEndpoint:
        return start_door(HttpsEndpoint, custom or profile, registry, **options)  # type: ignore[no-any-return]

    return make


@pytest.fixture
def endpoint(endpoints: Callable[..., HttpsEndpoint]) -> HttpsEndpoint:
    return endpoints()


def sas_cs(registry: DeviceRegistry, device_id: str = "dev-sas", host: str = HOST) -> str:
    device = registry.get(device_id)
    assert device is not None and device.primary_key
    return f"HostName={host};DeviceId={device_id};SharedAccessKey={device.primary_key}"


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client_for(pki: PKI, sleeps: list[float]) -> Iterator[Callable[..., HttpsDeviceClient]]:
    """Factory: a client for ``endpoint`` (connects to 127.0.0.1:port, SNI = the hub)."""
    made: list[HttpsDeviceClient] = []

    def make(
        endpoint: HttpsEndpoint,
        cs: str,
        *,
        policy: it.TlsPolicy | None = None,
        retry: RetryPolicy | None = None,
        sas_ttl: float = 3600.0,
        connect: bool = True,
        **kwargs: object,
    ) -> HttpsDeviceClient:
        kwargs.setdefault("sleep", sleeps.append)
        options = HttpsOptions(
            operation_timeout=10,
            connect_timeout=10,
            retry=retry or RetryPolicy(initial_delay=0.01, max_delay=5, max_attempts=3),
            sas_ttl=sas_ttl,
        )
        client = HttpsDeviceClient.from_connection_string(
            cs,
            policy=policy or pki.policy(),
            host="127.0.0.1",
            port=endpoint.port,
            options=options,
            **kwargs,
        )
        made.append(client)
        if connect:
            client.connect()
        return client

    yield make
    for client in made:
        client.close()


def identity(issued: Issued) -> it.ClientIdentity:
    return it.ClientIdentity.from_pem(issued.cert_chain_pem, issued.key_pem)


def x509_cs(device_id: str) -> str:
    return f"HostName={HOST};DeviceId={device_id};x509=true"


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until the endpoint's thread has done what the client cannot see (a refused
    handshake is logged after the alert went out)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def last_event(endpoint: HttpsEndpoint) -> ConnectionEvent:
    """The most recent connection attempt's outcome (deviceConnect) on ``endpoint``."""

    def connects() -> list[ConnectionEvent]:
        return [e for e in endpoint.connections if e.operation == "deviceConnect"]

    wait_for(lambda: bool(connects()))
    return connects()[-1]


# -- telemetry ---------------------------------------------------------------------------------


def test_telemetry_with_properties_message_id_and_content_type(endpoint, registry, client_for):
    client = client_for(endpoint, sas_cs(registry))
    client.send_telemetry(
        b'{"temperature": 21.5}',
        properties={"alert": "false", "zone": "b-12"},
        message_id="msg-0001",
        correlation_id="corr-7",
        content_type="application/json",
        content_encoding="utf-8",
    )
    (seen,) = endpoint.received
    assert seen.device_id == "dev-sas"
    assert seen.body == b'{"temperature": 21.5}'
    assert dict(seen.properties) == {"alert": "false", "zone": "b-12"}
    assert (seen.message_id, seen.correlation_id) == ("msg-0001", "corr-7")
    assert (seen.content_type, seen.content_encoding) == ("application/json", "utf-8")
    assert seen.batch is False and seen.auth_type == "sas"
    info = client.tls_info
    assert info is not None
    assert info.version == "TLSv1.3"
    assert info.sni == HOST  # the hub's name, although we connected to 127.0.0.1
    assert info.anchor == "iothub-tls Test Root G2"
    event = last_event(endpoint)
    assert (event.result, event.device_id, event.protocol) == ("Success", "dev-sas", "Https")
    assert (event.tls_version, event.sni) == ("TLSv1.3", HOST)
    # The hub's shared state saw it too (the view `serve` and the other front doors share).
    (shared,) = endpoint.state.telemetry
    assert (shared.protocol, shared.payload) == ("Https", b'{"temperature": 21.5}')
    assert shared.system_properties["iothub-messageid"] == "msg-0001"


def test_text_body_is_sent_as_utf8(endpoint, registry, client_for):
    client = client_for(endpoint, sas_cs(registry))
    client.send_telemetry("température")
    assert endpoint.received[-1].body == "température".encode()


def test_batch_keeps_each_message_and_its_properties(endpoint, registry, client_for):
    client = client_for(endpoint, sas_cs(registry))
    client.send_batch(
        [
            Message(b"\x00\x01binary", {"n": "1"}, message_id="b-1"),
            Message("two", {"n": "2"}, message_id="b-2", content_type="text/plain"),
            Message(b"three"),
        ]
    )
    seen = endpoint.received
    assert [m.body for m in seen] == [b"\x00\x01binary", b"two", b"three"]
    assert [dict(m.properties) for m in seen] == [{"n": "1"}, {"n": "2"}, {}]
    assert [m.message_id for m in seen] == ["b-1", "b-2", None]
    assert seen[1].content_type == "text/plain"
    assert all(m.batch for m in seen)


def test_device_id_with_reserved_characters_is_url_encoded(endpoint, registry, client_for):
    registry.add_sas_device("line#3:press")
    client = client_for(endpoint, sas_cs(registry, "line#3:press"))
    client.send_telemetry(b"x")
    assert endpoint.received[-1].device_id == "line#3:press"


def test_too_large_message_is_refused_before_sending(endpoint, registry, client_for):
    client = client_for(endpoint, sas_cs(registry))
    with pytest.raises(MessageTooLargeError, match="at most 262144 bytes") as err:
        client.send_telemetry(b"x" * (256 * 1024 + 1))
    assert err.value.status is None  # found locally, never sent
    assert endpoint.received == ()


# -- cloud-to-device ----------------------------------------------------------------------------


def test_c2d_receive_and_complete(endpoint, registry, client_for):
    client = client_for(endpoint, sas_cs(registry))
    with pytest.raises(it.OperationTimeoutError, match="no cloud-to-device message"):
        client.receive_c2d(0)  # 204: empty queue
    message_id = endpoint.enqueue_c2d(
        "dev-sas", b"reboot", {"priority": "high"}, message_id="c2d-1", correlation_id="job-9"
    )
    msg = client.receive_c2d()
    assert msg is not None
    assert (msg.payload, msg.message_id, msg.correlation_id) == (b"reboot", message_id, "job-9")
    assert dict(msg.properties) == {"priority": "high"}
    assert msg.delivery_count == 0
    assert msg.system_properties["iothub-to"] == "/devices/dev-sas/messages/deviceBound"
    assert msg.lock_token and '"' not in msg.lock_token
    with pytest.raises(it.OperationTimeoutError):
        client.receive_c2d(0)  # locked: invisible to a second receive
    msg.complete()
    assert endpoint.state.pending_c2d("dev-sas") == 0
    assert [m.message_id for m in endpoint.state.completed] == ["c2d-1"]
    with pytest.raises(it.ClientError, match="already settled"):
        msg.complete()
    # the hub refuses a lock token that was already used (the same token, sent again)
    replay = it.C2DMessage(b"", lock_token=msg.lock_token, settler=client._settle)
    with pytest.raises(MessageLockLostError, match="HTTP 412") as err:
        replay.complete()
    assert (err.value.status, err.value.error_code) == (412, "DeviceMessageLockLost")
    assert isinstance(err.value, it.DeliveryError)


def test_c2d_reject_dead_letters(endpoint, registry, client_for):
    client = client_for(endpoint, sas_cs(registry))
    endpoint.enqueue_c2d("dev-sas", b"bad command", message_id="c2d-r")
    msg = client.receive_c2d(0)
    msg.reject()
    with pytest.raises(it.OperationTimeoutError):
        client.receive_c2d(0)  # never delivered again
    assert [m.message_id for m in endpoint.state.dead_letters] == ["c2d-r"]
    assert endpoint.state.completed == []


def test_c2d_abandon_requeues_with_a_new_lock(endpoint, registry, client_for):
    client = client_for(endpoint, sas_cs(registry))
    endpoint.enqueue_c2d("dev-sas", b"later")
    first = client.receive_c2d(0)
    first.abandon()
    second = client.receive_c2d(0)
    assert second.message_id == first.message_id
    assert second.delivery_count == 1
    assert second.lock_token != first.lock_token
    stale = it.C2DMessage(b"", lock_token=first.lock_token, settler=client._settle)
    with pytest.raises(MessageLockLostError):
        stale.complete()  # the first lock is gone
    second.complete()
    assert endpoint.state.pending_c2d("dev-sas") == 0


def test_c2d_lock_expiry_makes_the_token_useless(endpoints, registry, client_for):
    endpoint = endpoints(state=HubState(lock_seconds=0.2))
    client = client_for(endpoint, sas_cs(registry))
    endpoint.enqueue_c2d("dev-sas", b"slow")
    msg = client.receive_c2d(0)
    time.sleep(0.3)  # let the lock lapse (nothing about timing is asserted)
    with pytest.raises(MessageLockLostError, match="lock expired"):
        msg.complete()
    again = client.receive_c2d(0)
    assert again.delivery_count == 1
    assert again.lock_token != msg.lock_token


def test_c2d_message_queued_in_the_shared_state_reaches_the_https_device(
    endpoints, registry, client_for
):
    state = HubState()
    endpoint = endpoints(state=state)
    state.enqueue_c2d("dev-sas", b"queued elsewhere in the hub", {"via": "state"})
    msg = client_for(endpoint, sas_cs(registry)).receive_c2d(0)
    assert dict(msg.properties) == {"via": "state"}


def test_receive_with_timeout_polls_until_a_message_arrives(endpoint, registry, pki):
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        endpoint.enqueue_c2d("dev-sas", b"arrived while polling")

    client = HttpsDeviceClient.from_connection_string(
        sas_cs(registry),
        policy=pki.policy(),
        host="127.0.0.1",
        port=endpoint.port,
        sleep=sleep,
        options=HttpsOptions(c2d_poll_interval=2),
    )
    with client:
        msg = client.receive_c2d(timeout=30)
    assert msg.payload == b"arrived while polling"
    assert waits == [2]


def test_enqueue_for_unknown_device_is_refused(endpoint):
    with pytest.raises(DeviceNotRegisteredError, match="'ghost' is not registered"):
        endpoint.enqueue_c2d("ghost", b"x")


# -- SAS tokens -----------------------------------------------------------------------------


def test_sas_token_is_renewed_before_it_expires(endpoints, registry, client_for):
    start = time.time()
    hub_clock, device_clock = FakeClock(start), FakeClock(start)
    endpoint = endpoints(clock=hub_clock)
    client = client_for(endpoint, sas_cs(registry), sas_ttl=60, clock=device_clock)
    client.send_telemetry(b"1")
    first_expiry = client._aio._tokens.expires_at
    # 55 s later the first token has 5 s left (< 20 % of 60 s): a new one is made...
    hub_clock.advance(55)
    device_clock.advance(55)
    client.send_telemetry(b"2")
    assert client._aio._tokens.expires_at > first_expiry
    # ...so at 70 s, when the first token is long expired at the hub, sends still work.
    hub_clock.advance(15)
    device_clock.advance(15)
    client.send_telemetry(b"3")
    assert [m.body for m in endpoint.received] == [b"1", b"2", b"3"]


def test_expired_sas_token_is_refused(endpoints, registry, client_for):
    start = time.time()
    hub_clock = FakeClock(start + 3600)  # the hub's clock is an hour ahead of the device's
    endpoint = endpoints(clock=hub_clock)
    client = client_for(endpoint, sas_cs(registry), sas_ttl=60, clock=lambda: start)
    with pytest.raises(it.AuthenticationError, match="expired") as err:
        client.send_telemetry(b"x")
    assert (err.value.status, err.value.error_code) == (401, "IotHubUnauthorizedAccess")
    assert "device clock" in str(err.value)
    assert endpoint.received == ()
    event = last_event(endpoint)
    assert event.result == "Failure" and "expired" in (event.reason or "")


def test_bad_sas_key_is_refused(endpoint, registry, client_for):
    wrong = DeviceRegistry.new_key()
    client = client_for(endpoint, f"HostName={HOST};DeviceId=dev-sas;SharedAccessKey={wrong}")
    with pytest.raises(it.AuthenticationError, match="HTTP 401") as err:
        client.send_telemetry(b"x")
    assert err.value.status == 401
    assert "signature does not match" in (last_event(endpoint).reason or "")
    assert endpoint.received == ()


def test_secondary_key_is_accepted(endpoint, registry, client_for):
    secondary = DeviceRegistry.new_key()
    registry.add(replace(registry.get("dev-sas"), secondary_key=secondary), replace_existing=True)
    client = client_for(endpoint, f"HostName={HOST};DeviceId=dev-sas;SharedAccessKey={secondary}")
    client.send_telemetry(b"with the secondary key")
    assert endpoint.received[-1].body == b"with the secondary key"


def test_unknown_device_with_device_key_is_401(endpoint, client_for):
    key = DeviceRegistry.new_key()
    client = client_for(endpoint, f"HostName={HOST};DeviceId=ghost;SharedAccessKey={key}")
    with pytest.raises(it.AuthenticationError, match="HTTP 401"):
        client.send_telemetry(b"x")
    assert "'ghost' is not registered" in (last_event(endpoint).reason or "")


def test_unknown_device_with_policy_token_is_404(endpoint, registry, client_for):
    key = registry.add_policy("device")
    cs = f"HostName={HOST};DeviceId=ghost;SharedAccessKeyName=device;SharedAccessKey={key}"
    client = client_for(endpoint, cs)
    with pytest.raises(DeviceNotFoundError, match="HTTP 404") as err:
        client.send_telemetry(b"x")
    assert (err.value.status, err.value.error_code) == (404, "DeviceNotFound")
    assert isinstance(err.value, LookupError)


def test_policy_token_for_a_registered_device_is_accepted(endpoint, registry, client_for):
    key = registry.add_policy("device")
    cs = f"HostName={HOST};DeviceId=dev-sas;SharedAccessKeyName=device;SharedAccessKey={key}"
    client_for(endpoint, cs).send_telemetry(b"via policy")
    assert endpoint.received[-1].device_id == "dev-sas"


def test_token_for_another_device_is_refused(endpoint, registry, client_for):
    registry.add_sas_device("other")
    # dev-sas's key, but the request is for "other": the token's resource does not match.
    device = registry.get("dev-sas")
    cs = f"HostName={HOST};DeviceId=other;SharedAccessKey={device.primary_key}"
    with pytest.raises(it.AuthenticationError):
        client_for(endpoint, cs).send_telemetry(b"x")


def test_disabled_device_is_refused(endpoint, registry, client_for):
    registry.set_enabled("dev-sas", False)
    with pytest.raises(it.AuthenticationError):
        client_for(endpoint, sas_cs(registry)).send_telemetry(b"x")
    assert "disabled" in (last_event(endpoint).reason or "")


# -- X.509 devices ------------------------------------------------------------------------------


def test_x509_thumbprint_device_sends_without_authorization(endpoint, devices, client_for):
    ident = identity(devices.x509)
    client = client_for(endpoint, x509_cs("dev-x509"), identity=ident)
    assert client._aio._tokens is None  # no SAS: no Authorization header
    client.send_telemetry(b"mtls", properties={"k": "v"})
    seen = endpoint.received[-1]
    assert (seen.device_id, seen.auth_type) == ("dev-x509", "selfSigned")
    event = last_event(endpoint)
    assert event.client_cert_thumbprint == ident.thumbprint_sha1
    assert (event.result, event.device_id) == ("Success", "dev-x509")
    endpoint.enqueue_c2d("dev-x509", b"to the x509 device")
    client.receive_c2d(0).complete()


def test_x509_ca_signed_device(endpoint, devices, client_for):
    client = client_for(endpoint, x509_cs("dev-ca"), identity=identity(devices.ca_signed))
    client.send_telemetry(b"ca")
    assert endpoint.received[-1].auth_type == "certificateAuthority"


def test_x509_certificate_with_unregistered_thumbprint_is_401(endpoint, devices, client_for):
    client = client_for(endpoint, x509_cs("dev-x509"), identity=identity(devices.unregistered))
    with pytest.raises(it.AuthenticationError, match="HTTP 401"):
        client.send_telemetry(b"x")
    assert "not one registered" in (last_event(endpoint).reason or "")


def test_ca_device_whose_cn_is_another_device_is_401(endpoint, devices, client_for):
    client = client_for(endpoint, x509_cs("dev-ca"), identity=identity(devices.x509))
    with pytest.raises(it.AuthenticationError):
        client.send_telemetry(b"x")
    assert "subject CN 'dev-x509' is not the device id" in (last_event(endpoint).reason or "")


def test_device_certificate_from_an_untrusted_ca_fails_the_handshake(endpoint, devices, client_for):
    client = client_for(endpoint, x509_cs("dev-x509"), identity=identity(devices.foreign))
    with pytest.raises(
        it.AuthenticationError, match="refused the device certificate during the TLS"
    ):
        client.send_telemetry(b"x")
    event = last_event(endpoint)
    assert event.result == "Failure" and event.tls_version is None
    assert "CERTIFICATE_VERIFY_FAILED" in (event.reason or "")


def test_x509_device_without_certificate_is_401(endpoint, client_for, pki):
    # A SAS-less request with no client certificate: nothing identifies the device.
    import urllib3

    ctx = it.create_ssl_context(pki.policy())
    pool = urllib3.HTTPSConnectionPool(
        "127.0.0.1", endpoint.port, ssl_context=ctx, server_hostname=HOST, retries=False
    )
    response = pool.request(
        "POST", "/devices/dev-x509/messages/events?api-version=2021-04-12", body=b"x"
    )
    assert response.status == 401
    assert response.headers["iothub-errorcode"] == "IotHubUnauthorizedAccess"
    assert "no credentials" in json.loads(response.data)["Message"]


def test_malformed_authorization_header_is_named(endpoint, pki):
    import urllib3

    pool = urllib3.HTTPSConnectionPool(
        "127.0.0.1",
        endpoint.port,
        ssl_context=it.create_ssl_context(pki.policy()),
        server_hostname=HOST,
        retries=False,
    )
    response = pool.request("POST", EVENTS, body=b"x", headers={"Authorization": "hunter2"})
    assert response.status == 401
    assert json.loads(response.data)["Message"].endswith(
        ";the Authorization header is not a SAS token (it must start with 'SharedAccessSignature ')"
    )


# -- TLS refusals -----------------------------------------------------------------------------


def test_tls11_only_hub_is_refused(endpoints, profile, registry, client_for):
    legacy = replace(
        profile,
        min_version=ssl.TLSVersion.TLSv1,
        max_version=ssl.TLSVersion.TLSv1_1,
        legacy_ciphers=True,
    )
    endpoint = endpoints(legacy)
    client = client_for(endpoint, sas_cs(registry), connect=False)
    with pytest.raises(it.ProtocolVersionError, match=r"TLS 1\.2 or later"):
        client.connect()
    event = last_event(endpoint)
    assert event.result == "Failure" and "UNSUPPORTED_PROTOCOL" in (event.reason or "")
    assert endpoint.received == ()


def test_weak_suites_only_hub_is_refused(endpoints, profile, registry, client_for):
    weak = replace(
        profile,
        max_version=ssl.TLSVersion.TLSv1_2,
        strong_ciphers=False,
        legacy_ciphers=True,
    )
    endpoint = endpoints(weak)
    with pytest.raises(it.CipherSuiteError, match="no cipher suite in common"):
        client_for(endpoint, sas_cs(registry)).send_telemetry(b"x")
    assert last_event(endpoint).result == "Failure"
    assert "SHARED_CIPHER" in (last_event(endpoint).reason or "")


def test_legacy_hub_that_also_serves_strong_suites_gets_a_strong_one(
    endpoints, profile, registry, client_for
):
    legacy = replace(profile, max_version=ssl.TLSVersion.TLSv1_2, legacy_ciphers=True)
    endpoint = endpoints(legacy)
    client = client_for(endpoint, sas_cs(registry))
    client.send_telemetry(b"x")
    assert client.tls_info.version == "TLSv1.2"
    assert client.tls_info.iana_cipher in {s.iana for s in it.TlsPolicy().cipher_suites}


def test_wrong_root_is_refused(endpoint, registry, client_for):
    other_root = new_root("Some Other Root")
    policy = it.TlsPolicy(roots=it.RootSet.from_pem(other_root.cert_pem))
    with pytest.raises(it.CertificateVerificationError, match="certificate verify failed"):
        client_for(endpoint, sas_cs(registry), policy=policy).send_telemetry(b"x")
    assert endpoint.received == ()


def test_default_pinned_azure_roots_refuse_a_test_hub(endpoint, registry, client_for):
    with pytest.raises(it.CertificateVerificationError, match="DigiCert Global Root G2"):
        client_for(endpoint, sas_cs(registry), policy=it.TlsPolicy()).connect()


def test_hostname_is_verified_although_connecting_to_an_address(endpoint, registry, client_for):
    # Connecting to 127.0.0.1 does not switch off the check: the SNI/expected name is
    # the connection string's HostName, which the hub certificate does not carry.
    device = registry.get("dev-sas")
    cs = f"HostName=other-hub.example;DeviceId=dev-sas;SharedAccessKey={device.primary_key}"
    with pytest.raises(it.CertificateVerificationError, match="does not match the host name"):
        client_for(endpoint, cs).connect()


def test_ecc_only_device_against_rsa_only_hub_is_refused(
    endpoints, profile, pki, registry, client_for
):
    endpoint = endpoints(replace(profile, certificates=(_cred(pki.rsa_leaf),)))
    policy = pki.policy(ciphers=it.CipherProfile.ECC_ONLY)
    with pytest.raises(it.CipherSuiteError, match="ECC-only mode needs an ECDSA certificate"):
        client_for(endpoint, sas_cs(registry), policy=policy).send_telemetry(b"x")
    assert last_event(endpoint).result == "Failure"


@pytest.mark.parametrize("max_version", [ssl.TLSVersion.TLSv1_2, None])
def test_ecc_only_device_against_dual_hub_gets_the_ecdsa_certificate(
    endpoint, endpoints, profile, pki, registry, client_for, max_version
):
    target = endpoints(replace(profile, max_version=max_version)) if max_version else endpoint
    client = client_for(
        target, sas_cs(registry), policy=pki.policy(ciphers=it.CipherProfile.ECC_ONLY)
    )
    client.send_telemetry(b"ecc")
    info = client.tls_info
    assert info.server_key_type == "EC"
    if max_version:
        assert info.iana_cipher.startswith("TLS_ECDHE_ECDSA_WITH_")


def test_rsa_only_hub_accepts_the_default_device(endpoints, profile, pki, registry, client_for):
    endpoint = endpoints(
        replace(profile, certificates=(_cred(pki.rsa_leaf),), max_version=ssl.TLSVersion.TLSv1_2)
    )
    client = client_for(endpoint, sas_cs(registry))
    client.send_telemetry(b"rsa")
    assert client.tls_info.server_key_type == "RSA"
    assert client.tls_info.iana_cipher.startswith("TLS_ECDHE_RSA_WITH_AES_")


# -- retries and status mapping ---------------------------------------------------------------


def test_429_retry_after_is_honoured(endpoint, registry, client_for, sleeps):
    endpoint.fail_next(429, retry_after=2)
    client_for(endpoint, sas_cs(registry)).send_telemetry(b"after throttling")
    assert sleeps == [2.0]
    assert endpoint.received[-1].body == b"after throttling"


def test_429_retry_after_beyond_the_bound_is_raised_at_once(endpoint, registry, client_for, sleeps):
    endpoint.fail_next(429, retry_after=120)
    with pytest.raises(ThrottledError, match="wait 120 s") as err:
        client_for(endpoint, sas_cs(registry)).send_telemetry(b"x")
    assert err.value.retry_after == 120.0 and err.value.status == 429
    assert err.value.error_code == "ThrottlingException"
    assert sleeps == []


def test_5xx_is_retried_with_bounded_backoff(endpoint, registry, client_for, sleeps):
    endpoint.fail_next(503, times=1)
    client = client_for(endpoint, sas_cs(registry))
    client.send_telemetry(b"after a 503")
    assert len(sleeps) == 1 and 0 < sleeps[0] <= 0.01
    sleeps.clear()
    endpoint.fail_next(500, times=10)
    with pytest.raises(HubServerError, match=r"HTTP 500.*retries exhausted") as err:
        client.send_telemetry(b"lost")
    assert err.value.status == 500
    assert len(sleeps) == 2  # attempts=3: two waits, then the error
    assert all(0 < s <= 0.02 for s in sleeps)
    assert [m.body for m in endpoint.received] == [b"after a 503"]


def test_403_is_not_authorized(endpoint, registry, client_for):
    endpoint.fail_next(403)
    with pytest.raises(it.NotAuthorizedError, match="HTTP 403") as err:
        client_for(endpoint, sas_cs(registry)).send_telemetry(b"x")
    assert err.value.error_code == "IotHubQuotaExceeded"


def test_connection_refused_is_connection_failed_after_retries(registry, client_for, sleeps):
    from iothub_tls.testing.ports import free_port

    class Closed:
        port = free_port()

    with pytest.raises(it.ConnectionFailedError, match=r"127\.0\.0\.1"):
        client_for(Closed, sas_cs(registry)).send_telemetry(b"x")
    assert len(sleeps) == 2


def test_endpoint_answers_413_for_an_oversized_request(endpoint, registry, pki):
    import urllib3

    token = it.generate_sas_token(f"{HOST}/devices/dev-sas", registry.get("dev-sas").primary_key)
    pool = urllib3.HTTPSConnectionPool(
        "127.0.0.1",
        endpoint.port,
        ssl_context=it.create_ssl_context(pki.policy()),
        server_hostname=HOST,
        retries=False,
    )
    response = pool.request(
        "POST",
        "/devices/dev-sas/messages/events?api-version=2021-04-12",
        body=b"x" * (300 * 1024),
        headers={"Authorization": token},
    )
    assert response.status == 413
    assert response.headers["iothub-errorcode"] == "MessageTooLarge"
    missing_version = pool.request(
        "POST", "/devices/dev-sas/messages/events", body=b"x", headers={"Authorization": token}
    )
    assert missing_version.status == 400
    assert "api-version" in json.loads(missing_version.data)["Message"]
    wrong_method = pool.request(
        "GET",
        "/devices/dev-sas/messages/events?api-version=2021-04-12",
        headers={"Authorization": token},
    )
    assert wrong_method.status == 405


# -- hostile requests ---------------------------------------------------------------------------
#
# Raw TLS sockets send what no well-behaved client sends. Each refusal is the HTTP status
# RFC 9112 names for it, the connection is closed after the answer, and the door goes on
# serving a good device.

EVENTS = "/devices/dev-sas/messages/events?api-version=2021-04-12"


def raw_tls(endpoint: HttpsEndpoint, pki: PKI, timeout: float = 10) -> ssl.SSLSocket:
    ctx = it.create_ssl_context(pki.policy())
    raw = socket.create_connection(("127.0.0.1", endpoint.port), timeout)
    return ctx.wrap_socket(raw, server_hostname=HOST)


def read_until_closed(tls: ssl.SSLSocket) -> bytes:
    """Everything the door sends until it closes the connection (a read timeout fails
    the test: the door kept the connection open)."""
    data = b""
    while True:
        try:
            chunk = tls.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            return data
        if not chunk:
            return data
        data += chunk


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def still_serves_a_good_device(endpoint, registry, client_for) -> None:
    client = client_for(endpoint, sas_cs(registry))
    client.send_telemetry(b"after the hostile request")
    assert endpoint.received[-1].body == b"after the hostile request"


@pytest.mark.parametrize(
    ("framing", "status", "message"),
    [
        ("Content-Length: -1", 400, "Content-Length '-1' is not a number of bytes"),
        ("Content-Length: +5", 400, "Content-Length '+5' is not a number of bytes"),
        ("Content-Length: five", 400, "Content-Length 'five' is not a number of bytes"),
        ("Content-Length: 5\r\nContent-Length: 6", 400, "conflicting Content-Length"),
        ("Content-Length: 5, 6", 400, "conflicting Content-Length"),
        ("Transfer-Encoding: chunked", 411, "Transfer-Encoding is not supported"),
        ("Transfer-Encoding: gzip, chunked", 411, "Transfer-Encoding is not supported"),
        ("Content-Length: 5\r\nTransfer-Encoding: chunked", 411, "Transfer-Encoding"),
        ("Content-Length: 2000000", 413, "request body of 2000000 bytes is too large"),
    ],
    ids=[
        "negative",
        "signed",
        "not-a-number",
        "two-conflicting-headers",
        "conflicting-list",
        "chunked",
        "gzip-chunked",
        "length-and-chunked",
        "over-1-MiB",
    ],
)
def test_hostile_body_framing_is_refused_and_closed(
    endpoint, registry, pki, client_for, framing, status, message
):
    token = it.generate_sas_token(f"{HOST}/devices/dev-sas", registry.get("dev-sas").primary_key)
    with raw_tls(endpoint, pki) as tls:
        tls.sendall(
            f"POST {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: {token}\r\n"
            f"{framing}\r\n\r\nhello".encode()
        )
        # A door that believed the framing would wait for (or read to) the end of a body
        # that never comes: keep the connection open for it, as a streaming attacker does.
        response = read_until_closed(tls)
    assert status_of(response) == status
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close\r\n" in head + b"\r\n"
    assert message in json.loads(body)["Message"]
    assert endpoint.received == ()
    still_serves_a_good_device(endpoint, registry, client_for)


def test_expect_100_continue_with_a_refused_length_gets_no_100(endpoint, registry, pki, client_for):
    token = it.generate_sas_token(f"{HOST}/devices/dev-sas", registry.get("dev-sas").primary_key)
    with raw_tls(endpoint, pki) as tls:
        tls.sendall(
            f"POST {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: {token}\r\n"
            "Content-Length: 2000000\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        response = read_until_closed(tls)
    assert status_of(response) == 413  # not "100 Continue": the body is never invited
    still_serves_a_good_device(endpoint, registry, client_for)


@pytest.mark.parametrize("stalls_in", ["request-line", "headers", "body"])
def test_a_trickled_request_gets_408_at_the_whole_request_deadline(
    endpoints, registry, pki, client_for, stalls_in
):
    """One byte at a time, each well inside the idle timeout: only a deadline for the
    whole request (request line, headers, body) ends it."""
    endpoint = endpoints(request_timeout=1.0, idle_timeout=30.0)
    token = it.generate_sas_token(f"{HOST}/devices/dev-sas", registry.get("dev-sas").primary_key)
    head = f"POST {EVENTS} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: {token}\r\n"
    request = (head + "Content-Length: 4096\r\n\r\n").encode() + b"x" * 4096
    sent_at_once = {
        "request-line": 0,
        "headers": len(f"POST {EVENTS} HTTP/1.1\r\n"),
        "body": len(head) + len("Content-Length: 4096\r\n\r\n"),
    }[stalls_in]
    with raw_tls(endpoint, pki) as tls:
        if sent_at_once:
            tls.sendall(request[:sent_at_once])
        response = b""
        tls.settimeout(0.2)
        # 0.2 s per byte for at most 60 bytes (12 s): the door must answer long before.
        for byte in request[sent_at_once : sent_at_once + 60]:
            try:
                tls.sendall(bytes([byte]))
            except OSError:
                break  # the door closed the connection
            try:
                response = tls.recv(65536)
            except TimeoutError:
                continue  # no answer yet: trickle on
            break
        tls.settimeout(10)
        response += read_until_closed(tls)
    assert status_of(response) == 408
    assert b"\r\nConnection: close\r\n" in response
    message = json.loads(response.partition(b"\r\n\r\n")[2])["Message"]
    assert "did not arrive within 1 s of its first byte" in message
    assert endpoint.received == ()
    still_serves_a_good_device(endpoint, registry, client_for)


def test_idle_keep_alive_connection_is_closed_silently(endpoints, registry, pki, client_for):
    """Waiting for the next request is the idle timeout's business: no 408 for a
    connection that sent nothing."""
    endpoint = endpoints(request_timeout=5.0, idle_timeout=0.5)
    with raw_tls(endpoint, pki) as tls:
        assert read_until_closed(tls) == b""
    still_serves_a_good_device(endpoint, registry, client_for)


def test_request_timeout_must_be_positive(profile, registry):
    with pytest.raises(ValueError, match="request_timeout must be a positive number of seconds"):
        HttpsEndpoint(profile, registry, request_timeout=0)


# -- connections, resumption, the log ----------------------------------------------------------


def test_keep_alive_and_resumption_after_the_hub_drops_the_connection(
    endpoint, registry, client_for
):
    client = client_for(endpoint, sas_cs(registry))
    client.send_telemetry(b"1")
    client.send_telemetry(b"2")  # same connection (keep-alive)
    assert len(endpoint.connections) == 1  # one deviceConnect: one connection
    assert client.tls_info.session_reused is False
    endpoint.drop_connections()
    client.send_telemetry(b"3")  # new connection, resumed session
    assert client.tls_info.session_reused is True
    connects = [e for e in endpoint.connections if e.operation == "deviceConnect"]
    assert [e.result for e in connects] == ["Success", "Success"]
    assert any(e.operation == "deviceDisconnect" for e in endpoint.connections)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_resumed_handshake_costs_fewer_bytes(endpoints, profile, registry, pki, version):
    endpoint = endpoints(replace(profile, max_version=version))
    with RecordRelay(endpoint.port) as relay:
        client = HttpsDeviceClient.from_connection_string(
            sas_cs(registry), policy=pki.policy(), host="127.0.0.1", port=relay.port
        )
        with client:
            client.send_telemetry(b"full")
            endpoint.drop_connections()
            client.send_telemetry(b"resumed")
            assert client.tls_info.session_reused is True
        relay.wait_idle()
    # Everything the hub sent on each connection: the same 204 response, so the
    # difference is the handshake (certificate chain not sent again when resuming).
    full = relay.logs[0][1].total_bytes
    resumed = relay.logs[1][1].total_bytes
    print(f"{version.name}: hub -> device bytes, full {full}, resumed {resumed}")
    assert resumed < full / 2, (full, resumed)


def test_connection_log_records_refusals_with_sni(endpoints, profile, pki, registry, client_for):
    seen: list[ConnectionEvent] = []
    shared_log = ConnectionLog(io.StringIO())
    endpoint = endpoints(
        replace(profile, certificates=(_cred(pki.rsa_leaf),)),
        on_connection=seen.append,
        log=shared_log,
    )
    with pytest.raises(it.CipherSuiteError):
        client_for(
            endpoint, sas_cs(registry), policy=pki.policy(ciphers=it.CipherProfile.ECC_ONLY)
        ).connect()
    client = client_for(endpoint, sas_cs(registry))
    client.send_telemetry(b"ok")
    client.close()
    endpoint.drop_connections()
    wait_for(lambda: len(seen) == 3)
    refused, accepted, closed = sorted(seen, key=lambda e: (e.operation, e.result != "Failure"))
    assert (refused.operation, refused.result, refused.sni) == ("deviceConnect", "Failure", HOST)
    # TLS 1.3: an ECC-only device offers only ECDSA signatures; the hub has only RSA.
    assert refused.tls_version is None
    assert "NO_SUITABLE_SIGNATURE_ALGORITHM" in (refused.reason or "")
    assert (accepted.result, accepted.device_id, accepted.tls_version) == (
        "Success",
        "dev-sas",
        "TLSv1.3",
    )
    assert closed.operation == "deviceDisconnect"
    lines = [json.loads(line) for line in shared_log._stream.getvalue().splitlines()]
    assert [(r["operationName"], r["result"], r["protocol"]) for r in lines] == [
        ("deviceConnect", "Failure", "Https"),
        ("deviceConnect", "Success", "Https"),
        ("deviceDisconnect", "Success", "Https"),
    ]
    assert lines[1]["cipherSuite"].startswith("TLS_")  # IANA name
    assert shared_log.stats()["byTlsVersion"] == {"TLSv1.3": 1}


def test_a_failing_listener_does_not_break_the_endpoint(endpoints, registry, client_for):
    def broken(event: ConnectionEvent) -> None:
        raise RuntimeError("log sink is down")

    endpoint = endpoints(on_connection=broken)
    client_for(endpoint, sas_cs(registry)).send_telemetry(b"still fine")
    assert endpoint.received[-1].body == b"still fine"


# -- transport faults: tests/faultproxy.py between the device and the hub ------------------------


@pytest.fixture
def proxy(endpoint: HttpsEndpoint) -> Iterator[FaultProxy]:
    with FaultProxy(endpoint.port) as p:
        yield p


def test_reset_pooled_connection_never_reaches_the_application(
    endpoint, proxy, registry, client_for, sleeps
):
    """The pooled connection looks alive, and the network answers the next request on it
    with a RST (a NAT or load balancer forgot it). Each such request is sent again on a
    new connection: no ssl exception, no failed send, every message once."""
    client = client_for(proxy, sas_cs(registry))
    for n in range(1, 51):
        if n % 10 == 0:
            proxy.reset_on_next_request()
        client.send_telemetry(f"m{n}".encode())
    assert proxy.faults == 5 and proxy.accepted == 6  # five resets, five new connections
    assert [m.body for m in endpoint.received] == [f"m{n}".encode() for n in range(1, 51)]
    assert sleeps == []  # a dead pooled connection is replaced at once, without back-off


def test_corrupted_record_on_an_established_connection_is_sent_again(
    endpoint, proxy, registry, client_for
):
    client = client_for(proxy, sas_cs(registry))
    client.send_telemetry(b"first")
    proxy.flip_next()  # the hub's answer to the next request fails its MAC check
    client.send_telemetry(b"second")
    assert proxy.accepted == 2
    # The hub had processed the request whose answer was corrupted: at least once.
    assert [m.body for m in endpoint.received] == [b"first", b"second", b"second"]


def test_transport_fault_after_the_last_attempt_is_connection_failed_not_ssl(
    endpoints, profile, registry, client_for
):
    # TLS 1.2: no session ticket follows the handshake, so the corrupted record is the
    # answer to the request.
    endpoint = endpoints(replace(profile, max_version=ssl.TLSVersion.TLSv1_2))
    with FaultProxy(endpoint.port) as proxy:
        client = client_for(proxy, sas_cs(registry), retry=RetryPolicy(max_attempts=1))
        client.connect()  # a fresh connection, not one left idle by an earlier request
        proxy.flip_next()
        with pytest.raises(it.ConnectionFailedError, match=r"TLS connection .* broke") as err:
            client.send_telemetry(b"x")
    assert not isinstance(err.value, ssl.SSLError)
    assert "BAD_RECORD_MAC" in str(err.value)
    assert "BAD_RECORD_MAC" in str(err.value.__cause__)  # the original, chained


@pytest.mark.parametrize("after", [0, 100], ids=["before-server-hello", "mid-server-hello"])
def test_one_reset_during_the_handshake_is_retried(
    endpoint, proxy, registry, client_for, sleeps, after
):
    """A peer that resets the connection before any policy decision is a transport
    fault: the next attempt connects and the message is delivered."""
    client = client_for(
        proxy, sas_cs(registry), retry=RetryPolicy(initial_delay=0.01, max_attempts=3)
    )
    proxy.drop_handshakes(after=after, count=1)
    proxy.cut()  # the pooled connection goes: the send needs a new one
    client.send_telemetry(b"after one dropped handshake")
    assert proxy.faults == 2 and proxy.accepted == 3  # the cut, then the dropped handshake
    assert len(sleeps) == 1  # one back-off, then the second attempt
    assert [m.body for m in endpoint.received] == [b"after one dropped handshake"]


def test_handshake_resets_on_every_attempt_raise_handshake_closed(
    endpoint, proxy, registry, client_for, sleeps
):
    client = client_for(
        proxy, sas_cs(registry), retry=RetryPolicy(initial_delay=0.01, max_attempts=3)
    )
    proxy.drop_handshakes(after=100, count=3)
    proxy.cut()  # the pooled connection goes: the send needs a new one
    with pytest.raises(it.HandshakeClosedError, match="during the handshake"):
        client.send_telemetry(b"never")
    assert proxy.accepted == 4 and len(sleeps) == 2  # every attempt used
    assert endpoint.received == ()


@pytest.mark.parametrize(
    ("change", "policy", "error"),
    [
        (
            {"min_version": ssl.TLSVersion.TLSv1, "max_version": ssl.TLSVersion.TLSv1_1,
             "legacy_ciphers": True},
            {},
            it.ProtocolVersionError,
        ),
        (
            {"max_version": ssl.TLSVersion.TLSv1_2, "strong_ciphers": False,
             "legacy_ciphers": True},
            {},
            it.CipherSuiteError,
        ),
        ({}, {"ciphers": it.CipherProfile.ECC_ONLY}, it.CipherSuiteError),
        ({}, {"roots": it.AZURE_GLOBAL}, it.CertificateVerificationError),
    ],
    ids=["tls1.1-only", "weak-suites-only", "ecc-only-vs-rsa", "wrong-root"],
)  # fmt: skip
def test_policy_refusals_are_never_retried(
    endpoints, profile, pki, registry, client_for, sleeps, change, policy, error
):
    custom = replace(profile, **change)
    if "ciphers" in policy:
        custom = replace(custom, certificates=(_cred(pki.rsa_leaf),))
    endpoint = endpoints(custom)
    with FaultProxy(endpoint.port) as proxy:
        tls = it.TlsPolicy(**policy) if "roots" in policy else pki.policy(**policy)
        client = client_for(proxy, sas_cs(registry), policy=tls, connect=False)
        with pytest.raises(error):
            client.connect()
        assert proxy.accepted == 1  # one handshake, no second attempt
    assert sleeps == []


# -- profile and registry values ----------------------------------------------------------------


def test_profile_describes_itself(profile, pki):
    assert profile.server_key == "dual"
    assert profile.describe().startswith("IoT Hub policy: TLS 1.2-1.3, strong suites only")
    assert len(profile.cipher_suites) == 8
    legacy = replace(profile, min_version=ssl.TLSVersion.TLSv1, legacy_ciphers=True)
    assert legacy.legacy and legacy.describe().startswith("LEGACY")
    assert legacy.versions == ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
    rsa_only = replace(profile, certificates=(_cred(pki.rsa_leaf),))
    assert {s.authentication for s in rsa_only.cipher_suites} == {"RSA"}
    assert profile.as_dict()["serverKey"] == "dual"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"certificates": ()}, "one or two ServerCredential"),
        ({"max_version": ssl.TLSVersion.TLSv1_1}, "below min_version"),
        ({"strong_ciphers": False}, "no TLS 1.2 cipher suites"),
        ({"client_ca_pem": b"not a certificate"}, "client_ca_pem"),
    ],
)
def test_profile_refuses_bad_values(profile, change, message):
    with pytest.raises(it.PolicyError, match=message):
        replace(profile, **change)


def test_profile_refuses_two_certificates_of_one_key_type(pki):
    with pytest.raises(it.PolicyError, match="at most one RSA and one ECDSA"):
        HubTlsProfile((_cred(pki.rsa_leaf), _cred(pki.rsa_leaf)))


def test_server_credential_refuses_a_key_of_another_certificate(pki):
    with pytest.raises(it.PolicyError, match="unusable server certificate"):
        ServerCredential.from_pem(pki.rsa_leaf.cert_chain_pem, pki.ec_leaf.key_pem)


def test_registry_persists_and_reloads(tmp_path, registry, pki):
    registry.state_dir = tmp_path
    path = registry.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds keys
    loaded = DeviceRegistry.load(tmp_path)
    assert loaded.hub_host == HOST
    assert {d.device_id for d in loaded.devices} == {"dev-sas", "dev-x509", "dev-ca"}
    assert loaded.get("dev-sas") == registry.get("dev-sas")
    assert loaded.certificate_authorities == registry.certificate_authorities
    token = it.generate_sas_token(f"{HOST}/devices/dev-sas", registry.get("dev-sas").primary_key)
    assert loaded.verify_sas("dev-sas", token).device_id == "dev-sas"
    assert DeviceRegistry.open(tmp_path, "ignored").hub_host == HOST


def test_registry_refuses_bad_input(tmp_path, registry):
    with pytest.raises(RegistryError, match="already registered"):
        registry.add_sas_device("dev-sas")
    with pytest.raises(RegistryError, match="not a SHA-1"):
        registry.add_x509_device("d2", "abcd")
    with pytest.raises(RegistryError, match="base64 of at least 16 bytes"):
        registry.add_sas_device("d3", "c2hvcnQ=")
    with pytest.raises(RegistryError, match="device id"):
        registry.add_sas_device("has space")
    with pytest.raises(RegistryError, match="does not exist"):
        DeviceRegistry.load(tmp_path)
    (tmp_path / "devices.json").write_text("{not json")
    with pytest.raises(RegistryError, match="not a readable registry"):
        DeviceRegistry.load(tmp_path)
