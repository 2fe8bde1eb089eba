"""IoT Hub semantics over AMQP 1.0: :class:`iothub_tls.amqp.AmqpDeviceClient` against the
local endpoint's AMQP front door (:class:`iothub_tls.hub.amqp.AmqpEndpoint`), over
real TLS on loopback.

Covered: CBS put-token accepted and refused (bad signature, expired token), renewal
on the live connection (and the connection that ends when a token is not renewed),
telemetry with properties, C2D complete / reject / abandon, X.509 devices with and
without SASL EXTERNAL, links to another device's address, reconnect after the endpoint
restarts, peers that stall the TLS or the AMQP handshake, and TLS refusals.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest

import iothub_tls as it
from iothub_tls._io.backoff import RetryPolicy
from iothub_tls.amqp import AmqpConnection, AmqpDeviceClient, AmqpMessage, AmqpOptions
from iothub_tls.auth import SasTokenProvider
from iothub_tls.hub import (
    ConnectionEvent,
    DeviceRegistry,
    HubTlsProfile,
    ServerCredential,
)
from iothub_tls.hub.amqp import AmqpEndpoint
from tests.conftest import HOST, PKI
from tests.faultproxy import FaultProxy
from tests.pki import CA, Issued
from tests.tlsserver import TLSServer

# -- fixtures --------------------------------------------------------------------------------


@dataclass
class Devices:
    x509: Issued  # registered by thumbprint
    unregistered: Issued  # chains to the trusted root, thumbprint not registered


@pytest.fixture(scope="module")
def devices(pki: PKI) -> Devices:
    return Devices(
        x509=pki.intermediate.issue(cn="dev-x509", client=True, key_type="ec"),
        unregistered=pki.intermediate.issue(cn="dev-x509", client=True, key_type="ec"),
    )


def _cred(issued: Issued) -> ServerCredential:
    return ServerCredential.from_pem(issued.cert_chain_pem, issued.key_pem)


def _identity(issued: Issued) -> it.ClientIdentity:
    return it.ClientIdentity.from_pem(issued.cert_chain_pem, issued.key_pem)


@pytest.fixture
def profile(pki: PKI) -> HubTlsProfile:
    """What IoT Hub serves: TLS 1.2+, strong suites, RSA and ECDSA, device certs asked."""
    return HubTlsProfile((_cred(pki.rsa_leaf), _cred(pki.ec_leaf)), client_ca_pem=pki.root.cert_pem)


@pytest.fixture
def registry(devices: Devices) -> DeviceRegistry:
    reg = DeviceRegistry(HOST)
    reg.add_sas_device("dev-sas")
    reg.add_sas_device("dev-other")
    reg.add_x509_device("dev-x509", _identity(devices.x509).thumbprint_sha256)
    return reg


@pytest.fixture
def endpoints(
    profile: HubTlsProfile, registry: DeviceRegistry, start_door: Callable[..., Any]
) -> Callable[..., AmqpEndpoint]:
    """Factory: ``endpoints(profile=None, **options)`` -> a started endpoint, stopped after."""

    def make(custom: HubTlsProfile | None = None, **options: object) -> AmqpEndpoint:
        return start_door(AmqpEndpoint, custom or profile, registry, **options)  # type: ignore[no-any-return]

    return make


@pytest.fixture
def endpoint(endpoints: Callable[..., AmqpEndpoint]) -> AmqpEndpoint:
    return endpoints()


def sas_string(registry: DeviceRegistry, device_id: str = "dev-sas") -> str:
    device = registry.get(device_id)
    assert device is not None
    return f"HostName={HOST};DeviceId={device_id};SharedAccessKey={device.primary_key}"


QUICK = AmqpOptions(connect_timeout=10, operation_timeout=10)


def client_for(
    endpoint: AmqpEndpoint, pki: PKI, cs: str, *, options: AmqpOptions = QUICK, **kwargs: object
) -> AmqpDeviceClient:
    kwargs.setdefault("policy", pki.policy())
    return AmqpDeviceClient.from_connection_string(  # type: ignore[arg-type]
        cs, host="127.0.0.1", port=endpoint.port, options=options, **kwargs
    )


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def connects(endpoint: AmqpEndpoint, result: str) -> list[ConnectionEvent]:
    """The ``deviceConnect`` events with ``result`` ("Success" or "Failure")."""
    return [
        e for e in endpoint.connections if e.operation == "deviceConnect" and e.result == result
    ]


# -- SAS devices: CBS -------------------------------------------------------------------------


def test_cbs_put_token_and_telemetry_with_properties(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    with client_for(endpoint, pki, sas_string(registry)) as client:
        client.send_telemetry(
            b'{"t": 21.5}',
            {"alert": "false", "site": "north"},
            content_type="application/json",
            content_encoding="utf-8",
            message_id="msg-1",
            correlation_id="corr-1",
        )
        info = client.tls_info
        assert info is not None and info.version == "TLSv1.3" and info.sni == HOST
        assert it.tls_info(client) == info
    [received] = endpoint.received
    assert received.device_id == "dev-sas"
    assert received.body == b'{"t": 21.5}'
    assert dict(received.properties) == {"alert": "false", "site": "north"}
    assert received.message_id == "msg-1" and received.correlation_id == "corr-1"
    assert received.content_type == "application/json"
    assert received.content_encoding == "utf-8"
    assert received.auth_type == "sas" and received.tls_version == "TLSv1.3"
    [event] = connects(endpoint, "Success")
    assert event.protocol == "Amqp" and event.device_id == "dev-sas"
    assert event.tls_version == "TLSv1.3" and event.sni == HOST
    assert event.client_cert_thumbprint is None
    assert event.to_json()["cipherSuite"].startswith("TLS_")
    wait_for(lambda: any(e.operation == "deviceDisconnect" for e in endpoint.connections))


def test_telemetry_without_system_properties_records_them_as_absent(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    """No content type, encoding or correlation id: absent (None) in what the hub
    records (and the device receives), not the text "None"."""
    endpoint.enqueue_c2d("dev-sas", b"bare command")
    with client_for(endpoint, pki, sas_string(registry)) as client:
        client.send_telemetry(b"bare")
        c2d = client.receive_c2d(timeout=10)  # the client reads them the same way
        c2d.complete()
    assert c2d.payload == b"bare command"
    assert c2d.content_type is None and c2d.content_encoding is None
    [received] = endpoint.received
    assert received.body == b"bare"
    assert received.content_type is None and received.content_encoding is None
    assert received.correlation_id is None
    [telemetry] = endpoint.state.telemetry
    assert "None" not in telemetry.system_properties.values()
    assert not {"content-type", "content-encoding"} & set(telemetry.system_properties)


def test_cbs_refuses_a_token_with_a_bad_signature(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    wrong_key = DeviceRegistry.new_key()
    cs = f"HostName={HOST};DeviceId=dev-sas;SharedAccessKey={wrong_key}"
    client = client_for(endpoint, pki, cs)
    with pytest.raises(
        it.AuthenticationError, match=r"put-token status 401 .*signature does not match"
    ):
        client.connect()
    client.close()
    [event] = connects(endpoint, "Failure")
    assert event.device_id == "dev-sas" and "signature does not match" in (event.reason or "")
    assert endpoint.received == ()


class _MalformedTokens(SasTokenProvider):
    """Hands out text that is not a SAS token at all."""

    def token(self) -> str:
        return "hunter2"

    def renew(self) -> str:
        return "hunter2"


def test_cbs_refusal_of_a_malformed_token_names_the_put_token(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    cs = it.ConnectionString.parse(sas_string(registry))
    provider = _MalformedTokens(cs.resource_uri, cs.shared_access_key)
    client = client_for(endpoint, pki, sas_string(registry), sas_token_provider=provider)
    with pytest.raises(it.AuthenticationError, match=r"put-token status 401"):
        client.connect()
    client.close()
    [event] = connects(endpoint, "Failure")
    assert event.reason == (
        "$cbs put-token refused: the $cbs put-token is not a SAS token (it must start "
        "with 'SharedAccessSignature ')"
    )


def test_cbs_refuses_an_expired_token(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    cs = it.ConnectionString.parse(sas_string(registry))
    two_hours_ago = SasTokenProvider.from_connection_string(
        cs, ttl=3600, clock=lambda: time.time() - 7200
    )
    client = client_for(endpoint, pki, sas_string(registry), sas_token_provider=two_hours_ago)
    with pytest.raises(it.AuthenticationError, match=r"put-token status 401 .*expired"):
        client.connect()
    client.close()
    [event] = connects(endpoint, "Failure")
    assert "expired" in (event.reason or "")


def test_token_is_renewed_on_the_live_connection(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    cs = it.ConnectionString.parse(sas_string(registry))
    provider = SasTokenProvider.from_connection_string(cs, ttl=3)
    first_expiry = provider.expires_at
    with client_for(endpoint, pki, sas_string(registry), sas_token_provider=provider) as client:
        wait_for(lambda: client.connection.token_puts >= 2)
        # the endpoint closes a connection whose token expired without renewal: past the
        # first token's expiry, the same connection still works
        wait_for(lambda: time.time() > first_expiry + 0.5)
        client.send_telemetry(b"after the first token expired")
        assert client.connection.reconnects == 0
        assert max(endpoint.put_tokens) >= 2
    assert [m.body for m in endpoint.received] == [b"after the first token expired"]
    assert len(connects(endpoint, "Success")) == 1


class _NoRenewal(SasTokenProvider):
    """Claims its token lasts a day, so the client never renews it."""

    @property
    def expires_at(self) -> int:
        return int(time.time()) + 86400


def test_a_token_that_is_not_renewed_ends_the_connection(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    cs = it.ConnectionString.parse(sas_string(registry))
    device = registry.get("dev-sas")
    assert device is not None and device.primary_key is not None
    provider = _NoRenewal(cs.resource_uri, device.primary_key, ttl=2)
    client = client_for(endpoint, pki, sas_string(registry), sas_token_provider=provider)
    with client:
        client.send_telemetry(b"while the token is valid")
        with pytest.raises(it.AuthenticationError, match="expired and was not renewed"):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    client.send_telemetry(b"until it expires", timeout=2)
                except it.OperationTimeoutError as exc:
                    # a send in flight when the hub hung up waits for the reconnect,
                    # which then fails for good: its message already says why
                    assert "expired and was not renewed" in str(exc)
                time.sleep(0.2)
    assert endpoint.received[0].body == b"while the token is valid"


def test_a_link_to_another_device_is_not_authorized(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    cs = it.ConnectionString.parse(sas_string(registry))
    conn = AmqpConnection(
        "127.0.0.1",
        endpoint.port,
        policy=pki.policy(),
        server_hostname=HOST,
        cbs_token_provider=SasTokenProvider.from_connection_string(cs),
        options=replace(QUICK, retry=None),
    )
    conn.sender("/devices/dev-other/messages/events")
    with pytest.raises(
        it.NotAuthorizedError, match="authenticated for dev-sas, not for device 'dev-other'"
    ):
        conn.connect()
    conn.close()


def test_links_without_any_credentials_are_refused(endpoint: AmqpEndpoint, pki: PKI) -> None:
    conn = AmqpConnection(
        "127.0.0.1",
        endpoint.port,
        policy=pki.policy(),
        server_hostname=HOST,
        options=replace(QUICK, retry=None),
    )
    conn.sender("/devices/dev-sas/messages/events")
    with pytest.raises(it.NotAuthorizedError, match=r"no credentials for device 'dev-sas'"):
        conn.connect()
    conn.close()


def test_oversized_telemetry_is_rejected(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    with client_for(endpoint, pki, sas_string(registry)) as client:
        with pytest.raises(it.MessageTooLargeError, match="at most 262144 bytes") as found:
            client.send_telemetry(b"x" * (300 * 1024))
        assert found.value.status is None  # found before sending
        # a client that does not check first: the hub rejects the message
        with pytest.raises(it.DeliveryError, match="did not accept the message: rejected"):
            client._events.send(AmqpMessage(body=b"x" * (300 * 1024)))
        client.send_telemetry(b"small")  # the link and connection stay usable
    assert [m.body for m in endpoint.received] == [b"small"]


# -- cloud-to-device --------------------------------------------------------------------------


def test_c2d_complete_reject_abandon(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    first = endpoint.enqueue_c2d(
        "dev-sas", b"one", {"k": "1"}, message_id="c2d-1", correlation_id="corr-9"
    )
    endpoint.enqueue_c2d("dev-sas", b"two", message_id="c2d-2")
    endpoint.enqueue_c2d("dev-sas", b"three", message_id="c2d-3")
    with client_for(endpoint, pki, sas_string(registry)) as client:
        one = client.receive_c2d(timeout=10)
        assert (one.payload, one.properties, one.message_id) == (b"one", {"k": "1"}, first)
        assert one.correlation_id == "corr-9"
        assert one.system_properties["to"] == "/devices/dev-sas/messages/devicebound"
        one.complete()
        two = client.receive_c2d(timeout=10)
        assert two.message_id == "c2d-2"
        two.reject()
        three = client.receive_c2d(timeout=10)
        assert three.message_id == "c2d-3"
        three.abandon()
        again = client.receive_c2d(timeout=10)
        assert (again.message_id, again.payload) == ("c2d-3", b"three")
        again.complete()
        with pytest.raises(it.ClientError, match="already settled"):
            again.complete()
        with pytest.raises(it.OperationTimeoutError, match="no cloud-to-device message"):
            client.receive_c2d(timeout=0.3)
    state = endpoint.state
    wait_for(lambda: len(state.completed) == 2)
    assert [m.message_id for m in state.completed] == ["c2d-1", "c2d-3"]
    assert [m.message_id for m in state.dead_letters] == ["c2d-2"]
    assert state.pending_c2d("dev-sas") == 0
    assert state.completed[1].delivery_count == 2  # abandoned once, delivered again


def test_messages_without_a_content_type_have_none(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    """proton reads an absent content-type as the text "None"; neither side may."""
    endpoint.enqueue_c2d("dev-sas", b"plain c2d")
    with client_for(endpoint, pki, sas_string(registry)) as client:
        client.send_telemetry(b"plain telemetry", message_id="m-1")
        message = client.receive_c2d(timeout=10)
        assert (message.content_type, message.content_encoding) == (None, None)
        message.complete()
    [received] = endpoint.received
    assert (received.content_type, received.content_encoding) == (None, None)
    assert endpoint.state.telemetry[0].system_properties == {"message-id": "m-1"}


def test_unsettled_c2d_returns_to_the_queue_when_the_device_disconnects(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    endpoint.enqueue_c2d("dev-sas", b"later", message_id="c2d-later")
    with client_for(endpoint, pki, sas_string(registry)) as client:
        assert client.receive_c2d(timeout=10).message_id == "c2d-later"
    with client_for(endpoint, pki, sas_string(registry)) as client:
        message = client.receive_c2d(timeout=10)
        assert message.message_id == "c2d-later"
        message.complete()
    wait_for(lambda: [m.message_id for m in endpoint.state.completed] == ["c2d-later"])


def test_c2d_abandoned_too_often_is_dead_lettered(
    endpoints: Callable[..., AmqpEndpoint], registry: DeviceRegistry, pki: PKI
) -> None:
    strict = endpoints(max_delivery_count=2)
    strict.enqueue_c2d("dev-sas", b"poison", message_id="c2d-poison")
    with client_for(strict, pki, sas_string(registry)) as client:
        client.receive_c2d(timeout=10).abandon()
        second = client.receive_c2d(timeout=10)
        assert second.message_id == "c2d-poison"
        second.abandon()  # the second release: dead-lettered, not delivered again
        with pytest.raises(it.OperationTimeoutError):
            client.receive_c2d(timeout=0.5)
    assert [m.message_id for m in strict.state.dead_letters] == ["c2d-poison"]


# -- X.509 devices ----------------------------------------------------------------------------


X509_CS = f"HostName={HOST};DeviceId=dev-x509;x509=true"


@pytest.mark.parametrize("sasl_external", [False, True], ids=["no-sasl", "sasl-external"])
def test_x509_device(
    endpoint: AmqpEndpoint, pki: PKI, devices: Devices, sasl_external: bool
) -> None:
    identity = _identity(devices.x509)
    with client_for(
        endpoint, pki, X509_CS, identity=identity, sasl_external=sasl_external
    ) as client:
        client.send_telemetry(b"signed by my key", {"via": "x509"})
    [received] = endpoint.received
    assert (received.device_id, received.auth_type) == ("dev-x509", "selfSigned")
    [event] = connects(endpoint, "Success")
    assert event.device_id == "dev-x509"
    assert event.client_cert_thumbprint == identity.thumbprint_sha1


@pytest.mark.parametrize(
    ("sasl_external", "message"),
    [
        (False, "is not one registered for device 'dev-x509'"),
        (True, "refused SASL EXTERNAL authentication"),
    ],
    ids=["no-sasl", "sasl-external"],
)
def test_x509_device_with_an_unregistered_certificate(
    endpoint: AmqpEndpoint, pki: PKI, devices: Devices, sasl_external: bool, message: str
) -> None:
    client = client_for(
        endpoint,
        pki,
        X509_CS,
        identity=_identity(devices.unregistered),
        sasl_external=sasl_external,
    )
    with pytest.raises(it.AuthenticationError, match=message):
        client.connect()
    client.close()
    wait_for(lambda: len(endpoint.connections) == 1)
    [event] = connects(endpoint, "Failure")
    assert event.client_cert_thumbprint == _identity(devices.unregistered).thumbprint_sha1


def test_x509_connection_string_needs_an_identity(pki: PKI) -> None:
    with pytest.raises(it.IdentityError, match="x509=true: pass identity="):
        AmqpDeviceClient.from_connection_string(X509_CS, policy=pki.policy())


# -- reconnect ----------------------------------------------------------------------------------


def test_reconnects_after_the_endpoint_restarts(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    client = client_for(
        endpoint,
        pki,
        sas_string(registry),
        options=replace(QUICK, retry=RetryPolicy(initial_delay=0.5, max_delay=0.5)),
    )
    endpoint.enqueue_c2d("dev-sas", b"received before the restart", message_id="c2d-old")
    with client:
        client.send_telemetry(b"before")
        unsettled = client.receive_c2d(timeout=10)
        endpoint.stop()
        endpoint.start()  # same port
        client.send_telemetry(b"after", timeout=20)  # waits through the reconnect
        assert client.connection.reconnects == 1
        info = client.tls_info
        assert info is not None and info.session_reused  # the TLS session was resumed
        with pytest.raises(it.DeliveryError, match="was lost; the peer will deliver it again"):
            unsettled.complete()
        again = client.receive_c2d(timeout=10)  # redelivered on the new connection
        assert again.message_id == "c2d-old"
        again.complete()
        with pytest.raises(it.ConnectionFailedError, match="already connected"):
            client.connect()
    client.connect()  # closed, then connected again: the same client works
    client.send_telemetry(b"after close and connect")
    client.close()
    assert [m.body for m in endpoint.received] == [b"before", b"after", b"after close and connect"]
    assert len(connects(endpoint, "Success")) == 3


def reconnect_waits(records: list[logging.LogRecord]) -> list[float]:
    """The wait the client chose before each reconnection, from its log records."""
    return [
        float(r.args[-1])  # type: ignore[index]
        for r in records
        if r.name == "iothub_tls.amqp" and "reconnecting in" in str(r.msg)
    ]


def test_backoff_starts_again_after_each_healthy_connection(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    """Six drops, each after a connection that stayed up longer than healthy_after: every
    reconnection waits the first, shortest delay (jitter off to make it exact)."""
    policy = RetryPolicy(initial_delay=0.05, max_delay=5.0, jitter=False, healthy_after=0.2)
    caplog.set_level(logging.INFO, logger="iothub_tls.amqp")
    with FaultProxy(endpoint.port) as proxy:
        client = client_for(
            proxy, pki, sas_string(registry), options=replace(QUICK, retry=policy)
        )
        with client:
            for drop in range(1, 7):
                time.sleep(0.3)  # healthy: up for longer than healthy_after
                proxy.reset()
                wait_for(
                    lambda n=drop: client.connection.reconnects == n and client.connection.connected
                )
                client.send_telemetry(f"after drop {drop}".encode())
        assert proxy.faults == 6
    assert reconnect_waits(caplog.records) == [0.05] * 6
    assert [m.body for m in endpoint.received] == [f"after drop {n}".encode() for n in range(1, 7)]


def test_backoff_grows_while_connections_do_not_stay_up(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    """The twin: drops that come before healthy_after continue the schedule."""
    policy = RetryPolicy(initial_delay=0.05, max_delay=5.0, jitter=False, healthy_after=60)
    caplog.set_level(logging.INFO, logger="iothub_tls.amqp")
    with FaultProxy(endpoint.port) as proxy:
        client = client_for(
            proxy, pki, sas_string(registry), options=replace(QUICK, retry=policy)
        )
        with client:
            for drop in range(1, 5):
                proxy.reset()
                wait_for(
                    lambda n=drop: client.connection.reconnects == n and client.connection.connected
                )
    assert reconnect_waits(caplog.records) == [0.05, 0.1, 0.2, 0.4]


def test_reconnection_gives_up_after_max_attempts(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    policy = RetryPolicy(initial_delay=0.01, max_delay=0.05, max_attempts=3)
    with FaultProxy(endpoint.port) as proxy:
        client = client_for(
            proxy, pki, sas_string(registry), options=replace(QUICK, retry=policy)
        )
        with client:
            proxy.refusing = True  # every attempt: TCP accepted, closed at once
            proxy.reset()
            with pytest.raises(it.ConnectionFailedError, match=r"gave up .* after 3 attempts"):
                client.send_telemetry(b"x", timeout=10)
        assert proxy.accepted == 1 + 3  # the first connection, then three attempts


# -- handshakes that fail ---------------------------------------------------------------------


def test_tls_stall_fails_with_handshake_timeout(
    pki: PKI, tls_server: Callable[..., TLSServer], registry: DeviceRegistry
) -> None:
    server = tls_server([pki.rsa_leaf], stall=True)
    client = AmqpDeviceClient.from_connection_string(
        sas_string(registry),
        policy=pki.policy(),
        host="127.0.0.1",
        port=server.port,
        options=AmqpOptions(connect_timeout=1.0),
    )
    with pytest.raises(it.HandshakeTimeoutError, match="did not complete in time"):
        client.connect()
    client.close()


def test_amqp_stall_fails_with_operation_timeout(
    pki: PKI, tls_server: Callable[..., TLSServer], registry: DeviceRegistry
) -> None:
    server = tls_server([pki.rsa_leaf], payload=b"")  # TLS completes, then silence
    client = AmqpDeviceClient.from_connection_string(
        sas_string(registry),
        policy=pki.policy(),
        host="127.0.0.1",
        port=server.port,
        options=AmqpOptions(connect_timeout=1.0),
    )
    with pytest.raises(
        it.OperationTimeoutError, match="stalled waiting for the SASL mechanisms frame"
    ):
        client.connect()
    client.close()


def test_tls_refusals_are_logged(
    endpoints: Callable[..., AmqpEndpoint], pki: PKI, registry: DeviceRegistry
) -> None:
    legacy = endpoints(
        HubTlsProfile(
            (_cred(pki.rsa_leaf),),
            min_version=ssl.TLSVersion.TLSv1,
            max_version=ssl.TLSVersion.TLSv1_1,
            legacy_ciphers=True,
        )
    )
    client = client_for(legacy, pki, sas_string(registry))
    with pytest.raises(it.ProtocolVersionError, match=r"does not accept TLS 1\.2 or later"):
        client.connect()
    client.close()
    wait_for(lambda: len(legacy.connections) == 1)
    [event] = connects(legacy, "Failure")
    assert event.reason == "TLS handshake failed: UNSUPPORTED_PROTOCOL"


def test_weak_suites_only_endpoint_is_refused(
    endpoints: Callable[..., AmqpEndpoint], pki: PKI, registry: DeviceRegistry
) -> None:
    weak = endpoints(
        HubTlsProfile(
            (_cred(pki.rsa_leaf),),
            strong_ciphers=False,
            legacy_ciphers=True,
            max_version=ssl.TLSVersion.TLSv1_2,
        )
    )
    client = client_for(weak, pki, sas_string(registry))
    with pytest.raises(it.CipherSuiteError, match="no cipher suite in common"):
        client.connect()
    client.close()


def test_ecc_only_device_gets_the_ecdsa_certificate_and_refuses_rsa_only(
    endpoints: Callable[..., AmqpEndpoint],
    endpoint: AmqpEndpoint,
    pki: PKI,
    registry: DeviceRegistry,
) -> None:
    ecc = pki.policy(ciphers=it.CipherProfile.ECC_ONLY)
    with client_for(endpoint, pki, sas_string(registry), policy=ecc) as client:
        assert client.tls_info is not None and client.tls_info.server_key_type == "EC"
    rsa_only = endpoints(HubTlsProfile((_cred(pki.rsa_leaf),)))
    client = client_for(rsa_only, pki, sas_string(registry), policy=ecc)
    with pytest.raises(it.CipherSuiteError, match="ECC-only mode needs an ECDSA certificate"):
        client.connect()
    client.close()


def test_wrong_root_is_refused(endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI) -> None:
    other = it.TlsPolicy(roots=it.RootSet.from_pem(CA("Not The Hub's Root").cert_pem))
    client = client_for(endpoint, pki, sas_string(registry), policy=other)
    with pytest.raises(it.CertificateVerificationError, match="certificate verify failed"):
        client.connect()
    client.close()


def test_generic_message_round_trip_through_the_device_links(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    """AmqpConnection with explicit addresses (the layer the device client is built on)."""
    cs = it.ConnectionString.parse(sas_string(registry))
    conn = AmqpConnection(
        "127.0.0.1",
        endpoint.port,
        policy=pki.policy(),
        server_hostname=HOST,
        cbs_token_provider=SasTokenProvider.from_connection_string(cs),
        options=QUICK,
    )
    sender = conn.sender(f"amqps://{HOST}/devices/dev-sas/messages/events")
    endpoint.enqueue_c2d("dev-sas", b"hello device")
    with conn:
        sender.send(AmqpMessage(body=b"hello hub", properties={"p": "1"}))
        # a link declared on the live connection is attached right away
        receiver = conn.receiver("/devices/dev-sas/messages/devicebound", credit=1)
        delivery = receiver.receive(timeout=10)
        assert delivery is not None and delivery.message.body == b"hello device"
        delivery.accept()
    assert endpoint.received[0].properties == {"p": "1"}


# -- heartbeats and a stalled open ------------------------------------------------------------


def test_heartbeats_keep_an_idle_connection_alive(
    endpoints: Callable[..., AmqpEndpoint], registry: DeviceRegistry, pki: PKI
) -> None:
    """Both sides enforce a 1 s idle timeout; the transport's tick sends empty frames, so
    three idle seconds neither side notices."""
    strict = endpoints(idle_timeout=1.0)
    with client_for(
        strict, pki, sas_string(registry), options=replace(QUICK, idle_timeout=1.0)
    ) as client:
        time.sleep(3)
        client.send_telemetry(b"still here")
        assert client.connection.reconnects == 0
    assert [m.body for m in strict.received] == [b"still here"]


class _SilentAfterSasl:
    """A TLS server that answers SASL (ANONYMOUS: ok) and then never sends the AMQP open."""

    def __init__(self, pki: PKI) -> None:
        from iothub_tls.amqp.engine import SaslCode, SaslServer

        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ServerCredential.from_pem(
            pki.rsa_leaf.cert_chain_pem, pki.rsa_leaf.key_pem
        ).identity._load_into(self._ctx)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._held: list[ssl.SSLSocket] = []

        def serve() -> None:
            with contextlib.suppress(OSError):
                raw, _ = self._sock.accept()
                tls = self._ctx.wrap_socket(raw, server_side=True)
                self._held.append(tls)
                sasl = SaslServer(["ANONYMOUS"])
                while sasl.state in ("header", "mechanisms"):
                    sasl.feed(tls.recv(4096))
                    tls.sendall(sasl.take_output())
                sasl.outcome(SaslCode.OK)
                tls.sendall(sasl.take_output())

        threading.Thread(target=serve, daemon=True).start()

    def close(self) -> None:
        self._sock.close()
        for tls in self._held:
            tls.close()


def test_amqp_open_stall_fails_with_operation_timeout(pki: PKI, registry: DeviceRegistry) -> None:
    server = _SilentAfterSasl(pki)
    try:
        client = AmqpDeviceClient.from_connection_string(
            sas_string(registry),
            policy=pki.policy(),
            host="127.0.0.1",
            port=server.port,
            options=AmqpOptions(connect_timeout=1.0),
        )
        with pytest.raises(
            it.OperationTimeoutError, match="stalled waiting for the AMQP open frame"
        ):
            client.connect()
        client.close()
    finally:
        server.close()


# -- configuration errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: AmqpOptions(connect_timeout=0), it.PolicyError, "connect_timeout must be"),
        (
            lambda: AmqpOptions(renew_margin=1.5),
            it.PolicyError,
            r"renew_margin must be in \(0, 1\)",
        ),
        (lambda: AmqpOptions(c2d_credit=0), it.PolicyError, "c2d_credit must be a positive"),
        (
            lambda: AmqpConnection("h", sasl="SCRAM-SHA-1"),
            it.PolicyError,
            "unsupported SASL mechanism 'SCRAM-SHA-1'",
        ),
        (
            lambda: AmqpConnection("h", sasl="PLAIN", username="u"),
            it.PolicyError,
            "PLAIN needs both username and password",
        ),
        (
            lambda: AmqpConnection("h", username="u", password="p"),
            it.PolicyError,
            "only sent with SASL PLAIN",
        ),
        (
            lambda: AmqpConnection("h", sasl="EXTERNAL"),
            it.PolicyError,
            "EXTERNAL authenticates with the TLS client certificate",
        ),
    ],
    ids=["timeout", "renew-margin", "credit", "mechanism", "plain", "password", "external"],
)
def test_bad_configuration_is_refused_before_any_io(
    make: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        make()


def test_sas_key_and_identity_together_are_refused(
    registry: DeviceRegistry, devices: Devices
) -> None:
    with pytest.raises(it.IdentityError, match=r"an X\.509 identity was given"):
        AmqpDeviceClient.from_connection_string(
            sas_string(registry), identity=_identity(devices.x509)
        )


def test_missing_proton_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import iothub_tls.amqp

    monkeypatch.setitem(sys.modules, "proton", None)  # "import proton" raises ImportError
    monkeypatch.delitem(sys.modules, "iothub_tls.amqp.engine")
    monkeypatch.delattr(iothub_tls.amqp, "engine")
    with pytest.raises(it.MissingDependencyError, match=r"pip install 'iothub-tls\[amqp\]'"):
        AmqpConnection("h")


def test_client_and_endpoint_work_with_descriptor_numbers_above_1023(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    """select() cannot watch descriptor 1024 or above: a gateway or a busy hub would
    stall. Both sides of the connection here get numbers of 1100 or more."""
    from tests.descriptors import descriptors_taken_below

    with descriptors_taken_below(1100) as held:  # every number below 1100 is taken
        assert len(held) >= 1000
        with client_for(endpoint, pki, sas_string(registry)) as client:
            client.send_telemetry(b"high descriptor")
            endpoint.enqueue_c2d("dev-sas", b"back down")
            message = client.receive_c2d(timeout=10)
            message.complete()
    assert message.payload == b"back down"
    assert [m.body for m in endpoint.received] == [b"high descriptor"]


# -- one I/O thread for every connection ------------------------------------------------------


def test_many_clients_run_on_the_one_shared_io_thread(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    """No thread per connection: twenty connected devices add at most the shared I/O
    thread, the callback thread and the name-resolver thread to the process (the
    endpoint's own threads, which serve each connection, are told apart by name)."""
    from iothub_tls._io.loop import shared_loop

    def library_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if not t.name.lower().startswith("amqp-")}

    before = library_threads()
    ids = [f"dev-many-{n}" for n in range(20)]
    for device_id in ids:
        registry.add_sas_device(device_id)
    clients = [client_for(endpoint, pki, sas_string(registry, d)) for d in ids]
    states: list[it.ConnectionState] = []
    clients[0].on_connection_state_change = lambda state, reason: states.append(state)
    try:
        for client in clients:
            client.connect()
        for client in clients:
            client.send_telemetry(b"from one of many")
        wait_for(lambda: it.ConnectionState.CONNECTED in states)  # a callback ran too
        added = library_threads() - before
        assert {t.name for t in added} <= {
            "iothub-tls-io",
            "iothub-tls-callbacks",
            "iothub-tls-resolve_0",
        }, sorted(t.name for t in added)
        io = shared_loop()
        assert io.thread.name == "iothub-tls-io" and io.thread.is_alive()
        # every connection is driven by the shared loop, none by a thread of its own
        assert all(c.connection._aio._loop is io.loop for c in clients)
        assert not [t for t in threading.enumerate() if t.name.startswith("iothub-tls-amqp")]
    finally:
        for client in clients:
            client.close()
    assert len(endpoint.received) == len(ids)


def test_a_failing_message_handler_does_not_take_the_connection_down(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    cs = it.ConnectionString.parse(sas_string(registry))
    seen: list[bytes] = []

    def handler(message: AmqpMessage) -> None:
        seen.append(message.body)
        if message.body == b"first":
            raise RuntimeError("handler bug")

    conn = AmqpConnection(
        "127.0.0.1",
        endpoint.port,
        policy=pki.policy(),
        server_hostname=HOST,
        cbs_token_provider=SasTokenProvider.from_connection_string(cs),
        options=QUICK,
    )
    conn.receiver("/devices/dev-sas/messages/devicebound", credit=5, on_message=handler)
    with conn:
        endpoint.enqueue_c2d("dev-sas", b"first")
        endpoint.enqueue_c2d("dev-sas", b"second")
        wait_for(lambda: seen == [b"first", b"second"])
        assert conn.connected and conn.reconnects == 0
    assert any("handler bug" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
