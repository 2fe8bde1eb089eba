"""One device scenario suite, run against MQTT, AMQP and HTTPS alike.

Every case is written once against the :class:`iothub_tls.DeviceClient` surface and runs
on each transport against the local hub's real front doors (and, for the refusal
matrix, against TLS servers with the wrong root, TLS 1.1 only, weak suites only, or an
RSA certificate for an ECC-only device). Where IoT Hub offers no such operation on a
transport (a twin over HTTPS, rejecting a message over MQTT), the case asserts the
specific error that says so.
"""

from __future__ import annotations

import dataclasses
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import iothub_tls as it
from iothub_tls.hub.hub import HubOptions, LocalHub

pytest.importorskip("paho.mqtt.client")
pytest.importorskip("proton")
pytest.importorskip("urllib3")

from iothub_tls.amqp import AmqpDeviceClient, AmqpOptions
from iothub_tls.https import HttpsDeviceClient, HttpsOptions
from iothub_tls.mqtt import MqttDeviceClient, MqttOptions
from iothub_tls.testing.faultproxy import FaultProxy
from iothub_tls.testing.server import TLSServer
from tests.conftest import HOST, PKI

TRANSPORTS = ("mqtt", "amqp", "https")
CLASSES: dict[str, type[Any]] = {
    "mqtt": MqttDeviceClient,
    "amqp": AmqpDeviceClient,
    "https": HttpsDeviceClient,
}
WAIT = 10.0
FAST_RETRY = it.RetryPolicy(initial_delay=0.05, max_delay=0.2, max_attempts=20, healthy_after=0.5)


def options_for(transport: str, **overrides: Any) -> Any:
    """Short timeouts and retries, the same on every transport."""
    common: dict[str, Any] = {"operation_timeout": 5.0, "retry": FAST_RETRY}
    common.update(overrides)
    if transport == "mqtt":
        return MqttOptions(**common)
    if transport == "amqp":
        return AmqpOptions(**common)
    return HttpsOptions(c2d_poll_interval=0.05, **common)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    options = HubOptions(
        state_dir=tmp_path_factory.mktemp("hub"),
        hostname=HOST,
        mqtt_port=0,
        amqp_port=0,
        https_port=0,
    )
    with LocalHub(options) as running:
        assert set(running.doors) == set(TRANSPORTS), running.unavailable
        yield running


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


_counter = iter(range(1_000_000))


def new_device(hub: LocalHub, transport: str, *, x509: bool = False) -> it.ClientIdentity | str:
    """Register a fresh device; its connection string (SAS) or identity (X.509)."""
    device_id = f"{transport}-{'x509' if x509 else 'sas'}-{next(_counter)}"
    creds = hub.add_device(device_id, x509=x509)
    if x509:
        assert creds.certfile is not None and creds.keyfile is not None
        identity = it.ClientIdentity.from_files(creds.certfile, creds.keyfile)
        return identity
    return creds.connection_string


def hub_policy(hub: LocalHub, **kwargs: Any) -> it.TlsPolicy:
    return it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path), **kwargs)


def client_for(
    hub: LocalHub,
    transport: str,
    *,
    x509: bool = False,
    port: int | None = None,
    policy: it.TlsPolicy | None = None,
    **options: Any,
) -> Any:
    cls = CLASSES[transport]
    made = new_device(hub, transport, x509=x509)
    common: dict[str, Any] = {
        "policy": policy or hub_policy(hub),
        "host": "127.0.0.1",
        "port": port or hub.ports[transport],
        "options": options_for(transport, **options),
    }
    if isinstance(made, it.ClientIdentity):
        device_id = made.device_id
        assert device_id is not None
        return cls.from_x509(HOST, device_id, made, **common)
    return cls.from_connection_string(made, **common)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- the surface itself -------------------------------------------------------------------


def test_every_client_satisfies_the_protocol(transport: str) -> None:
    """mypy checks the signatures (tests/typing_conformance.py); this checks the names."""
    cls = CLASSES[transport]
    client = cls.from_symmetric_key(HOST, "dev", "a2V5")
    assert isinstance(client, it.DeviceClient)
    assert cls.transport == transport
    for factory in ("from_connection_string", "from_symmetric_key", "from_x509"):
        assert callable(getattr(cls, factory))


def test_the_three_factories_build_the_same_device(transport: str) -> None:
    cls = CLASSES[transport]
    key = "c2VjcmV0LWtleS1mb3ItdGVzdHM="
    a = cls.from_connection_string(f"HostName={HOST};DeviceId=dev-1;SharedAccessKey={key}")
    b = cls.from_symmetric_key(HOST, "dev-1", key)
    assert (a.device_id, a.module_id) == (b.device_id, b.module_id) == ("dev-1", None)
    token = it.generate_sas_token(f"{HOST}/devices/dev-1", key, ttl=600)
    c = cls.from_connection_string(
        f"HostName={HOST};DeviceId=dev-1;SharedAccessSignature={token}"
    )
    assert c.device_id == "dev-1"


def test_a_bad_port_is_the_same_error_everywhere(transport: str) -> None:
    cls = CLASSES[transport]
    with pytest.raises(it.PolicyError, match="port"):
        cls.from_symmetric_key(HOST, "dev", "a2V5", port=70000)


# -- telemetry -----------------------------------------------------------------------------


@pytest.mark.parametrize("as_message", [False, True], ids=["arguments", "Message"])
def test_telemetry_with_properties_reaches_the_hub(
    hub: LocalHub, transport: str, as_message: bool
) -> None:
    with client_for(hub, transport) as client:
        properties = {"unit": "°C" if transport != "https" else "C", "a+b": "1&2"}
        if transport == "https":  # HTTPS headers carry only token characters
            properties = {"unit": "C", "a+b": "1"}
        fields = {
            "message_id": f"m-{transport}",
            "correlation_id": "c-1",
            "content_type": "application/json",
            "content_encoding": "utf-8",
        }
        if as_message:
            client.send_telemetry(it.Message(b'{"t": 21.5}', properties, **fields))
        else:
            client.send_telemetry(b'{"t": 21.5}', properties, **fields)
        got = hub.state.wait_for_telemetry(lambda m: m.device_id == client.device_id)
    assert got is not None
    assert got.payload == b'{"t": 21.5}'
    assert got.properties == properties
    assert got.protocol.lower() == transport


def test_telemetry_refuses_a_message_and_arguments_together(hub: LocalHub, transport: str) -> None:
    client = client_for(hub, transport)
    with pytest.raises(TypeError, match="either a Message"):
        client.send_telemetry(it.Message(b"x"), {"k": "v"})


# -- cloud-to-device -----------------------------------------------------------------------


def test_c2d_complete(hub: LocalHub, transport: str) -> None:
    with client_for(hub, transport) as client:
        hub.state.enqueue_c2d(client.device_id, b"reboot", {"reason": "update"}, message_id="c-1")
        message = client.receive_c2d(WAIT)
        assert isinstance(message, it.C2DMessage)
        assert (message.payload, message.properties, message.message_id) == (
            b"reboot",
            {"reason": "update"},
            "c-1",
        )
        assert message.transport == transport
        message.complete()
        assert message.settled is it.Settlement.COMPLETE
        wait_until(
            lambda: any(m.payload == b"reboot" for m in hub.state.completed), "the completion"
        )
        with pytest.raises(it.ClientError, match="already settled"):
            message.complete()


def test_c2d_reject_and_abandon(hub: LocalHub, transport: str) -> None:
    with client_for(hub, transport) as client:
        hub.state.enqueue_c2d(client.device_id, b"bad")
        message = client.receive_c2d(WAIT)
        if transport == "mqtt":
            for settle in (message.reject, message.abandon):
                with pytest.raises(it.UnsupportedOperationError, match="AMQP or HTTPS"):
                    settle()
            return
        message.reject()
        wait_until(lambda: any(m.payload == b"bad" for m in hub.state.dead_letters), "dead letter")

        hub.state.enqueue_c2d(client.device_id, b"again")
        first = client.receive_c2d(WAIT)
        first.abandon()
        second = client.receive_c2d(WAIT)
        assert second.payload == b"again"
        assert (second.delivery_count or 0) > (first.delivery_count or 0)
        second.complete()


def test_receive_c2d_times_out_with_the_same_error(hub: LocalHub, transport: str) -> None:
    with client_for(hub, transport) as client:
        started = time.monotonic()
        with pytest.raises(it.OperationTimeoutError, match="no cloud-to-device message"):
            client.receive_c2d(0.3)
        assert time.monotonic() - started < WAIT


def test_on_c2d_and_background_exceptions(hub: LocalHub, transport: str) -> None:
    got: list[it.C2DMessage] = []
    errors: list[BaseException] = []
    with client_for(hub, transport) as client:
        client.on_background_exception = errors.append

        def on_c2d(message: it.C2DMessage) -> None:
            got.append(message)
            message.complete()
            if message.payload == b"boom":
                raise RuntimeError("application bug")

        client.on_c2d = on_c2d
        hub.state.enqueue_c2d(client.device_id, b"boom")
        hub.state.enqueue_c2d(client.device_id, b"after")
        wait_until(lambda: len(got) == 2, "two messages through on_c2d")
        wait_until(lambda: len(errors) == 1, "the callback's exception")
        assert isinstance(errors[0], RuntimeError) and str(errors[0]) == "application bug"
        assert [m.payload for m in got] == [b"boom", b"after"]
        client.send_telemetry(b"still working")


# -- connection state ----------------------------------------------------------------------


def test_connection_state_across_a_cut(hub: LocalHub, transport: str) -> None:
    states: list[tuple[it.ConnectionState, BaseException | None]] = []
    lock = threading.Lock()

    def record(state: it.ConnectionState, reason: BaseException | None) -> None:
        with lock:
            states.append((state, reason))

    S = it.ConnectionState
    with FaultProxy(hub.ports[transport]) as proxy:
        client = client_for(hub, transport, port=proxy.port)
        client.on_connection_state_change = record
        client.connect()
        wait_until(lambda: [s for s, _ in states] == [S.CONNECTING, S.CONNECTED], "connected")
        proxy.reset()
        if transport == "https":  # no standing connection: the next request sees the cut
            client.send_telemetry(b"after the cut")
        wait_until(lambda: states[-1][0] is S.CONNECTED and len(states) >= 4, "reconnected")
        client.close()
    wait_until(lambda: states[-1] == (S.CLOSED, None), "closed")
    sequence = [s for s, _ in states]
    assert sequence[:3] == [S.CONNECTING, S.CONNECTED, S.DISCONNECTED]
    assert sequence[-2:] == [S.CONNECTED, S.CLOSED]
    lost = states[2][1]
    assert isinstance(lost, it.ClientError | OSError), lost
    assert client.connected is False


# -- twin and methods ----------------------------------------------------------------------


def test_twin_and_desired_updates(hub: LocalHub, transport: str) -> None:
    with client_for(hub, transport) as client:
        if transport == "https":
            for call in (client.get_twin, lambda: client.patch_reported({"a": 1})):
                with pytest.raises(it.UnsupportedOperationError, match="MQTT or AMQP"):
                    call()
            with pytest.raises(it.UnsupportedOperationError, match="MQTT or AMQP"):
                client.on_desired_update = print
            return
        updates: list[dict[str, Any]] = []
        client.on_desired_update = updates.append
        version = client.patch_reported({"firmware": "1.2.3", "nested": {"x": None}})
        twin = client.get_twin()
        assert twin["reported"]["firmware"] == "1.2.3"
        assert version is None or twin["reported"]["$version"] == version
        time.sleep(0.2)  # the desired-properties subscription settles
        hub.state.patch_desired(client.device_id, {"interval": 5})
        wait_until(lambda: bool(updates), "a desired-properties update")
        assert updates[0]["interval"] == 5 and "$version" in updates[0]


def test_direct_methods_by_name_and_catch_all(hub: LocalHub, transport: str) -> None:
    with client_for(hub, transport) as client:
        if transport == "https":
            with pytest.raises(it.UnsupportedOperationError, match="MQTT or AMQP"):
                client.on_method("reboot", lambda request: (200, None))
            return
        seen: list[it.MethodRequest] = []

        def reboot(request: it.MethodRequest) -> tuple[int, Any]:
            seen.append(request)
            return 200, {"rebooting": request.payload["delay"]}

        def other(request: it.MethodRequest) -> tuple[int, Any]:
            return 201, {"called": request.name}

        client.on_method("reboot", reboot)
        client.on_method(None, other)
        time.sleep(0.2)  # the method subscription / links settle
        status, body = hub.state.invoke_method(client.device_id, "reboot", b'{"delay": 3}')
        assert (status, body) == (200, b'{"rebooting": 3}')
        assert seen[0].name == "reboot" and seen[0].payload == {"delay": 3}
        status, body = hub.state.invoke_method(client.device_id, "anything")
        assert (status, body) == (201, b'{"called": "anything"}')
        client.on_method(None, None)
        status, _ = hub.state.invoke_method(client.device_id, "anything")
        assert status == 404


# -- X.509 ---------------------------------------------------------------------------------


def test_x509_device(hub: LocalHub, transport: str) -> None:
    with client_for(hub, transport, x509=True) as client:
        client.send_telemetry(b"x509 hello")
        assert client.tls_info is not None and client.tls_info.version in ("TLSv1.2", "TLSv1.3")
        got = hub.state.wait_for_telemetry(lambda m: m.device_id == client.device_id)
    assert got is not None and got.payload == b"x509 hello"


# -- the refusal matrix --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Refusal:
    name: str
    server: Callable[[PKI], TLSServer]
    policy: Callable[[PKI], it.TlsPolicy]
    error: type[BaseException]
    message: str


REFUSALS = [
    Refusal(
        "wrong-root",
        lambda pki: TLSServer([pki.rsa_leaf]),
        lambda pki: it.TlsPolicy(),  # pinned to Azure's roots, not the test root
        it.CertificateVerificationError,
        "certificate verify failed",
    ),
    Refusal(
        "tls1.1-only",
        lambda pki: TLSServer(
            [pki.rsa_leaf],
            min_version=ssl.TLSVersion.TLSv1_1,
            max_version=ssl.TLSVersion.TLSv1_1,
        ),
        lambda pki: pki.policy(),
        it.ProtocolVersionError,
        "TLS 1.2 or later",
    ),
    Refusal(
        "weak-suites-only",
        lambda pki: TLSServer(
            [pki.rsa_leaf],
            max_version=ssl.TLSVersion.TLSv1_2,
            ciphers="AES128-GCM-SHA256:AES256-SHA",
        ),
        lambda pki: pki.policy(),
        it.CipherSuiteError,
        "no cipher suite in common",
    ),
    Refusal(
        "ecc-only-vs-rsa",
        lambda pki: TLSServer([pki.rsa_leaf]),
        lambda pki: pki.policy(ciphers=it.CipherProfile.ECC_ONLY),
        it.CipherSuiteError,
        "ECC-only mode",
    ),
]


@pytest.mark.parametrize("refusal", REFUSALS, ids=[r.name for r in REFUSALS])
def test_refusal_matrix(pki: PKI, transport: str, refusal: Refusal, tmp_path: Path) -> None:
    server = refusal.server(pki)
    try:
        client = CLASSES[transport].from_symmetric_key(
            HOST,
            "dev-refused",
            "a2V5",
            policy=refusal.policy(pki),
            host="127.0.0.1",
            port=server.port,
            options=options_for(transport),
        )
        started = time.monotonic()
        with pytest.raises(refusal.error, match=refusal.message):
            client.connect()
        assert time.monotonic() - started < WAIT  # refused, never retried
        assert client.connected is False
    finally:
        server.close()
