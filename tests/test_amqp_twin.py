"""The device twin and direct methods over AMQP 1.0:
:class:`iothub_tls.amqp.AmqpDeviceClient` against the local hub's AMQP door
(:class:`iothub_tls.hub.amqp.AmqpEndpoint`) over real TLS on loopback.

Covered: get twin, patch reported (the version increments, malformed patches are 400),
desired-property updates (subscribed on a live connection and at connect), methods by
name (payload and status), unknown method 404, a handler that raises 500, twin and
methods after a reconnection (and a twin answer lost with the connection), links to
another device's twin or method address, timeouts on both sides — and the hub answering
a twin GET, a reported PATCH and a method call to a client written with proton alone
(not this package's client or conventions), so the hub cannot merely agree with our
own client's mistakes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import queue
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import proton as _proton
import pytest

import iothub_tls as it
from iothub_tls._io.backoff import RetryPolicy
from iothub_tls.amqp import AmqpConnection, AmqpDeviceClient, AmqpOptions
from iothub_tls.amqp import conventions as amqpc
from iothub_tls.amqp.message import AmqpMessage
from iothub_tls.auth import SasTokenProvider
from iothub_tls.device import MethodRequest
from iothub_tls.hub import DeviceRegistry, HubTlsProfile, ServerCredential
from iothub_tls.hub.amqp import AmqpEndpoint
from tests.conftest import HOST, PKI
from tests.faultproxy import FaultProxy

# proton types message fields loosely (Optional unions); the tests read them directly
proton: Any = _proton

QUICK = AmqpOptions(connect_timeout=10, operation_timeout=10)


@pytest.fixture
def registry() -> DeviceRegistry:
    reg = DeviceRegistry(HOST)
    reg.add_sas_device("dev-sas")
    reg.add_sas_device("dev-other")
    return reg


@pytest.fixture
def endpoint(pki: PKI, registry: DeviceRegistry, start_door: Callable[..., Any]) -> AmqpEndpoint:
    profile = HubTlsProfile(
        (
            ServerCredential.from_pem(pki.rsa_leaf.cert_chain_pem, pki.rsa_leaf.key_pem),
            ServerCredential.from_pem(pki.ec_leaf.cert_chain_pem, pki.ec_leaf.key_pem),
        )
    )
    return start_door(AmqpEndpoint, profile, registry)  # type: ignore[no-any-return]


def sas_string(registry: DeviceRegistry, device_id: str = "dev-sas") -> str:
    device = registry.get(device_id)
    assert device is not None
    return f"HostName={HOST};DeviceId={device_id};SharedAccessKey={device.primary_key}"


def client_for(
    port: int, pki: PKI, registry: DeviceRegistry, *, options: AmqpOptions = QUICK
) -> AmqpDeviceClient:
    return AmqpDeviceClient.from_connection_string(
        sas_string(registry), policy=pki.policy(), host="127.0.0.1", port=port, options=options
    )


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


# -- device twin ------------------------------------------------------------------------------


def test_get_twin_returns_the_hub_s_document(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    endpoint.state.patch_desired("dev-sas", {"fan": {"speed": 3}, "mode": "eco"})
    endpoint.state.patch_desired("dev-other", {"mode": "other device's"})
    with client_for(endpoint.port, pki, registry) as client:
        twin = client.get_twin()
        assert twin == {
            "desired": {"fan": {"speed": 3}, "mode": "eco", "$version": 2},
            "reported": {"$version": 1},
        }
        assert client.get_twin() == twin  # the links stay attached for the next request


def test_patch_reported_increments_the_version(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    with client_for(endpoint.port, pki, registry) as client:
        assert client.patch_reported({"firmware": "1.2.0", "temp": {"max": 40}}) == 2
        assert client.patch_reported({"temp": {"min": -5}, "firmware": None}) == 3
        reported = client.get_twin()["reported"]
    assert reported == {"temp": {"max": 40, "min": -5}, "$version": 3}
    assert endpoint.state.twin("dev-sas").reported == {"temp": {"max": 40, "min": -5}}
    assert endpoint.state.twin("dev-other").reported == {}


def test_patch_reported_refuses_a_patch_that_is_not_json(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    with client_for(endpoint.port, pki, registry) as client:
        with pytest.raises(TypeError, match="not JSON-serialisable"):
            client.patch_reported({"when": object()})
        # the hub's side of the same rule: a PATCH body that is not a JSON object is a 400
        # (the twin channel lives on the I/O loop, under the asyncio client)
        channel = client._aio._twin_channel
        with pytest.raises(it.DeliveryError, match=r"twin PATCH as malformed \(status 400\)"):
            client._run(channel.request(amqpc.TwinOperation.PATCH, b"[1, 2]", None))
        assert client.patch_reported({"ok": True}) == 2  # the twin links stay usable


def test_desired_updates_on_a_live_connection(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    patches: queue.Queue[dict[str, Any]] = queue.Queue()
    with client_for(endpoint.port, pki, registry) as client:
        endpoint.state.patch_desired("dev-sas", {"before": "subscribing"})  # not delivered
        client.on_desired_update = patches.put  # subscribes before returning
        endpoint.state.patch_desired("dev-sas", {"fan": "on", "limits": {"max": 9}})
        endpoint.state.patch_desired("dev-other", {"fan": "another device's"})
        endpoint.state.patch_desired("dev-sas", {"fan": None})
        assert patches.get(timeout=10) == {"fan": "on", "limits": {"max": 9}, "$version": 3}
        assert patches.get(timeout=10) == {"fan": None, "$version": 4}
        with pytest.raises(queue.Empty):
            patches.get(timeout=0.3)


def test_desired_updates_subscribed_at_connect(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    patches: queue.Queue[dict[str, Any]] = queue.Queue()
    client = client_for(endpoint.port, pki, registry)
    client.on_desired_update = patches.put  # not connected: subscribed by connect()
    with client:
        endpoint.state.patch_desired("dev-sas", {"mode": "eco"})
        assert patches.get(timeout=10) == {"mode": "eco", "$version": 2}


# -- direct methods ---------------------------------------------------------------------------


def test_method_answered_with_payload_and_status(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    calls: list[MethodRequest] = []

    def reboot(request: MethodRequest) -> tuple[int, Any]:
        calls.append(request)
        return 202, {"rebooting_in": request.payload["delay"], "name": "é°中"}

    with client_for(endpoint.port, pki, registry) as client:
        client.on_method("reboot", reboot)  # attaches the method links before returning
        status, body = endpoint.state.invoke_method("dev-sas", "reboot", b'{"delay": 3}')
        assert status == 202
        assert json.loads(body) == {"rebooting_in": 3, "name": "é°中"}
        status, body = endpoint.state.invoke_method("dev-sas", "reboot", b'{"delay": 0}')
        assert (status, json.loads(body)["rebooting_in"]) == (202, 0)
    assert [(c.name, c.payload) for c in calls] == [
        ("reboot", {"delay": 3}),
        ("reboot", {"delay": 0}),
    ]
    assert len({c.request_id for c in calls}) == 2  # each call has its own request id


def test_a_catch_all_handler_answers_methods_without_their_own(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    with client_for(endpoint.port, pki, registry) as client:
        client.on_method(None, lambda request: (200, {"caught": request.name}))
        client.on_method("own", lambda request: (201, None))
        assert endpoint.state.invoke_method("dev-sas", "any") == (200, b'{"caught": "any"}')
        assert endpoint.state.invoke_method("dev-sas", "own") == (201, b"")
        client.on_method(None, None)
        assert endpoint.state.invoke_method("dev-sas", "any")[0] == 404


def test_unknown_method_is_404_and_a_raising_handler_500(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(request: MethodRequest) -> tuple[int, Any]:
        raise RuntimeError("sensor offline")

    with client_for(endpoint.port, pki, registry) as client:
        client.on_method("broken", broken)
        status, body = endpoint.state.invoke_method("dev-sas", "no-such-method", b"{}")
        assert status == 404
        assert json.loads(body) == {
            "error": "this device has no handler for method 'no-such-method'"
        }
        status, body = endpoint.state.invoke_method("dev-sas", "broken", b"null")
        assert status == 500
        assert json.loads(body) == {"error": "the handler of method 'broken' failed"}
        status, body = endpoint.state.invoke_method("dev-sas", "broken", b"{not json")
        assert status == 400 and b"not valid JSON" in body
    assert any("sensor offline" in r.getMessage() for r in caplog.records)


def test_method_calls_are_only_routed_to_a_device_with_method_links(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    with client_for(endpoint.port, pki, registry) as client:
        client.get_twin()  # connected, twin links attached, no method links
        with pytest.raises(LookupError, match="'dev-sas' is not connected for direct methods"):
            endpoint.state.invoke_method("dev-sas", "reboot", b"{}", timeout=1)
        client.on_method("reboot", lambda request: (200, None))
        assert endpoint.state.invoke_method("dev-sas", "reboot", b"{}") == (200, b"")
    wait_for(lambda: not endpoint.state._method_routes)  # the route ends with the connection
    with pytest.raises(LookupError):
        endpoint.state.invoke_method("dev-sas", "reboot", b"{}", timeout=1)


# -- reconnection -----------------------------------------------------------------------------


def reconnecting(proxy: FaultProxy, pki: PKI, registry: DeviceRegistry) -> AmqpDeviceClient:
    policy = RetryPolicy(initial_delay=0.05, max_delay=0.2, jitter=False)
    return client_for(proxy.port, pki, registry, options=replace(QUICK, retry=policy))


def reconnected(client: AmqpDeviceClient, count: int) -> Callable[[], bool]:
    connection = client.connection
    return lambda: connection.reconnects == count and connection.connected


def test_twin_and_methods_survive_a_reconnection(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    patches: queue.Queue[dict[str, Any]] = queue.Queue()
    with FaultProxy(endpoint.port) as proxy:
        client = reconnecting(proxy, pki, registry)
        client.on_method("ping", lambda request: (200, {"pong": request.payload}))
        with client:
            client.on_desired_update = patches.put
            assert client.patch_reported({"boot": 1}) == 2
            for drop in (1, 2):
                proxy.reset()
                wait_for(reconnected(client, drop))
                # methods: the links were attached again, so the hub routes the call
                status, body = endpoint.state.invoke_method("dev-sas", "ping", str(drop).encode())
                assert (status, json.loads(body)) == (200, {"pong": drop})
                # twin: a request after the reconnection is answered; it also follows the
                # renewed desired-properties subscription on the same link
                assert client.patch_reported({"boot": drop + 1}) == drop + 2
                endpoint.state.patch_desired("dev-sas", {"drop": drop})
                assert patches.get(timeout=10) == {"drop": drop, "$version": drop + 1}
        assert proxy.faults == 2
    assert endpoint.state.twin("dev-sas").reported == {"boot": 3}


def test_a_twin_answer_lost_with_the_connection_is_asked_for_again(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    with FaultProxy(endpoint.port) as proxy:
        client = reconnecting(proxy, pki, registry)
        with client:
            client.get_twin()
            proxy.muted = True  # the hub's answer (and disposition) never reach the device
            result: queue.Queue[object] = queue.Queue()

            def patch() -> None:
                try:
                    result.put(client.patch_reported({"sent": "while muted"}, timeout=20))
                except Exception as exc:
                    result.put(exc)

            worker = threading.Thread(target=patch)
            worker.start()
            wait_for(lambda: endpoint.state.twin("dev-sas").reported.get("sent") is not None)
            proxy.muted = False
            proxy.reset()  # the device reconnects and sends the request again
            worker.join(30)
            assert result.get_nowait() == 3  # applied twice: at least once, as telemetry
    assert client.connection.reconnects == 1
    assert endpoint.state.twin("dev-sas").reported == {"sent": "while muted"}


def test_a_twin_request_accepted_but_not_answered_is_sent_again_after_a_reconnection(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub settled the request, then its answer was lost: the transfer is done, so
    only the twin bookkeeping can know that the request must be sent again."""
    lost: list[AmqpMessage] = []
    send_on = endpoint._send_on

    def lose_the_first_answer(conn: Any, link: Any, message: AmqpMessage) -> None:
        if "status" in message.annotations and not lost:
            lost.append(message)
            return
        send_on(conn, link, message)

    monkeypatch.setattr(endpoint, "_send_on", lose_the_first_answer)
    endpoint.state.patch_desired("dev-sas", {"asked": "twice"})
    with FaultProxy(endpoint.port) as proxy:
        client = reconnecting(proxy, pki, registry)
        with client:
            result: queue.Queue[object] = queue.Queue()
            worker = threading.Thread(target=lambda: result.put(client.get_twin(timeout=20)))
            worker.start()
            wait_for(lambda: bool(lost))
            proxy.reset()
            worker.join(30)
            assert result.get_nowait() == {
                "desired": {"asked": "twice", "$version": 2},
                "reported": {"$version": 1},
            }
    assert client.connection.reconnects == 1 and len(lost) == 1


# -- authorization ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "sender"),
    [
        ("/devices/dev-other/twin", True),
        ("/devices/dev-other/twin", False),
        ("/devices/dev-other/methods/devicebound", False),
        (f"amqps://{HOST}/devices/dev-other/methods/devicebound", True),
    ],
)
def test_a_device_cannot_attach_another_device_s_twin_or_methods(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI, address: str, sender: bool
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
    if sender:
        conn.sender(address)
    else:
        conn.receiver(address)
    with pytest.raises(
        it.NotAuthorizedError,
        match=rf"refused the link to '{address}' \(amqp:unauthorized-access: this connection "
        r"is authenticated for dev-sas, not for device 'dev-other'\)",
    ):
        conn.connect()
    conn.close()
    with client_for(endpoint.port, pki, registry) as client:
        assert client.get_twin()["reported"] == {"$version": 1}


# -- timeouts ---------------------------------------------------------------------------------


def test_twin_request_without_an_answer_times_out(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    with FaultProxy(endpoint.port) as proxy:
        with client_for(proxy.port, pki, registry) as client:
            client.get_twin()
            proxy.muted = True
            with pytest.raises(
                it.OperationTimeoutError,
                match=r"the hub's answer to the twin GET did not arrive within 0.5 s",
            ):
                client.get_twin(timeout=0.5)
            with pytest.raises(
                it.OperationTimeoutError, match=r"answer to the twin PATCH did not arrive"
            ):
                client.patch_reported({"a": 1}, timeout=0.5)
            assert len(client._aio._twin_channel.pending) == 0  # nothing left behind
            proxy.muted = False


def test_a_method_handler_slower_than_the_call_times_out_at_the_hub(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    release = threading.Event()

    def slow(request: MethodRequest) -> tuple[int, Any]:
        release.wait(10)
        return 200, "late"

    with client_for(endpoint.port, pki, registry) as client:
        client.on_method("slow", slow)
        with pytest.raises(TimeoutError, match="'dev-sas' did not answer method 'slow'"):
            endpoint.state.invoke_method("dev-sas", "slow", b"{}", timeout=0.5)
        release.set()
        client.on_method("fast", lambda request: (200, "quick"))
        # the late answer to the first call is dropped; the next call gets its own answer
        assert endpoint.state.invoke_method("dev-sas", "fast", b"{}") == (200, b'"quick"')


def test_twin_on_a_closed_client_fails_clearly(
    endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI
) -> None:
    client = client_for(endpoint.port, pki, registry)
    with pytest.raises(it.ConnectionFailedError, match="not connected: call connect"):
        client.get_twin()
    with client:
        client.get_twin()
    with pytest.raises(it.ConnectionFailedError, match="the AMQP connection was closed"):
        client.patch_reported({"a": 1})


# -- interop: a client written with proton alone ----------------------------------------------


def _sas_token(key: str, resource: str, ttl: int = 3600) -> str:
    """A SAS token computed here, independently of iothub_tls.auth."""
    expiry = int(time.time()) + ttl
    encoded = urllib.parse.quote(resource, safe="")
    mac = hmac.new(base64.b64decode(key), f"{encoded}\n{expiry}".encode(), hashlib.sha256)
    sig = urllib.parse.quote(base64.b64encode(mac.digest()).decode(), safe="")
    return f"SharedAccessSignature sr={encoded}&sig={sig}&se={expiry}"


class ProtonOnlyDevice:
    """A device written against proton's engine and Python's ssl only: its own I/O loop,
    its own messages (annotations, correlation ids, types as the C SDK sends them)."""

    def __init__(self, port: int, root_pem: bytes) -> None:
        context = ssl.create_default_context(cadata=root_pem.decode("ascii"))
        raw = socket.create_connection(("127.0.0.1", port), 10)
        self.tls = context.wrap_socket(raw, server_hostname=HOST)
        self.tls.setblocking(False)
        self.transport = proton.Transport()
        sasl = self.transport.sasl()
        sasl.allowed_mechs("ANONYMOUS")
        self.connection = proton.Connection()
        self.connection.hostname = HOST
        self.collector = proton.Collector()
        self.connection.collect(self.collector)
        self.transport.bind(self.connection)
        self.received: dict[str, list[Any]] = {}
        self.connection.open()
        self.session = self.connection.session()
        self.session.open()

    def close(self) -> None:
        self.tls.close()

    def pump(self, done: Callable[[], bool], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "no answer from the hub"
            pending = self.transport.pending()
            if pending > 0:
                try:
                    sent = self.tls.send(self.transport.peek(pending))
                    self.transport.pop(sent)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            try:
                data = self.tls.recv(65536)
                if data:
                    self.transport.push(data)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                time.sleep(0.005)
            while (event := self.collector.peek()) is not None:
                if event.type == proton.Event.DELIVERY and event.link.is_receiver:
                    delivery = event.delivery
                    if delivery.readable and not delivery.partial:
                        message = proton.Message()
                        message.decode(event.link.recv(delivery.pending))
                        event.link.advance()
                        delivery.update(proton.Delivery.ACCEPTED)
                        delivery.settle()
                        event.link.flow(1)
                        self.received.setdefault(event.link.name, []).append(message)
                self.collector.pop()

    def link(self, name: str, address: str, *, sender: bool, channel: str = "") -> Any:
        link = self.session.sender(name) if sender else self.session.receiver(name)
        (link.target if sender else link.source).address = address
        (link.source if sender else link.target).address = name
        if channel:
            link.properties = {
                proton.symbol("com.microsoft:channel-correlation-id"): channel,
                proton.symbol("com.microsoft:api-version"): "2019-10-01",
            }
        link.open()
        if not sender:
            link.flow(5)
        self.pump(lambda: bool(link.state & proton.Endpoint.REMOTE_ACTIVE))
        return link

    def send(self, link: Any, message: Any) -> None:
        link.delivery(uuid.uuid4().bytes)
        link.send(message.encode())
        link.advance()
        self.pump(lambda: self.transport.pending() <= 0)

    def answer(self, name: str) -> Any:
        self.pump(lambda: bool(self.received.get(name)))
        return self.received[name].pop(0)


@pytest.fixture
def proton_device(endpoint: AmqpEndpoint, registry: DeviceRegistry, pki: PKI) -> Iterator[Any]:
    device = ProtonOnlyDevice(endpoint.port, pki.root.cert_pem)
    registered = registry.get("dev-sas")
    assert registered is not None and registered.primary_key is not None
    key = registered.primary_key
    cbs_out = device.link("cbs-out", "$cbs", sender=True)
    device.link("cbs-in", "$cbs", sender=False)
    put = proton.Message(body=_sas_token(key, f"{HOST}/devices/dev-sas"))
    put.id = "put-1"
    put.reply_to = "cbs"
    put.properties = {
        "operation": "put-token",
        "type": "azure-devices.net:sastoken",
        "name": f"{HOST}/devices/dev-sas",
    }
    device.send(cbs_out, put)
    assert device.answer("cbs-in").properties["status-code"] == 200
    yield device
    device.close()


def test_interop_twin_get_and_patch_with_a_proton_only_client(
    proton_device: ProtonOnlyDevice, endpoint: AmqpEndpoint
) -> None:
    endpoint.state.patch_desired("dev-sas", {"interop": True})
    device = proton_device
    device.link("twin-in", "/devices/dev-sas/twin", sender=False, channel="twin:abc")
    twin_out = device.link("twin-out", "/devices/dev-sas/twin", sender=True, channel="twin:abc")

    get = proton.Message(body=b" ")
    get.inferred = True  # one data section, as the C SDK sends it
    get.correlation_id = "c-sdk-style-1"
    get.annotations = {proton.symbol("operation"): "GET"}
    device.send(twin_out, get)
    answer = device.answer("twin-in")
    assert answer.correlation_id == "c-sdk-style-1"
    status = answer.annotations[proton.symbol("status")]
    assert status == 200 and type(status) is proton.int32  # the C SDK requires an AMQP int
    assert json.loads(bytes(answer.body)) == {
        "desired": {"interop": True, "$version": 2},
        "reported": {"$version": 1},
    }

    patch = proton.Message(body=b'{"from": "proton"}')
    patch.inferred = True
    patch.correlation_id = "c-sdk-style-2"
    patch.annotations = {
        proton.symbol("operation"): "PATCH",
        proton.symbol("resource"): "/properties/reported",
    }
    device.send(twin_out, patch)
    answer = device.answer("twin-in")
    assert answer.correlation_id == "c-sdk-style-2"
    assert answer.annotations[proton.symbol("status")] == 204
    version = answer.annotations[proton.symbol("version")]
    assert version == 2 and type(version) is int  # an AMQP long (the C SDK's check)
    assert endpoint.state.twin("dev-sas").reported == {"from": "proton"}


def test_interop_method_call_with_a_proton_only_client(
    proton_device: ProtonOnlyDevice, endpoint: AmqpEndpoint
) -> None:
    device = proton_device
    address = "/devices/dev-sas/methods/devicebound"
    methods_out = device.link("methods-out", address, sender=True, channel="methods:x")
    device.link("methods-in", address, sender=False, channel="methods:x")
    result: queue.Queue[tuple[int, bytes]] = queue.Queue()
    caller = threading.Thread(
        target=lambda: result.put(endpoint.state.invoke_method("dev-sas", "light", b'{"on":1}'))
    )
    caller.start()
    request = device.answer("methods-in")
    assert request.properties["IoThub-methodname"] == "light"
    assert isinstance(request.correlation_id, uuid.UUID)  # what the C SDK insists on
    assert json.loads(bytes(request.body)) == {"on": 1}
    response = proton.Message(body=b'{"lit": true}')
    response.inferred = True
    response.correlation_id = request.correlation_id
    response.properties = {"IoThub-status": proton.int32(201)}
    device.send(methods_out, response)
    caller.join(10)
    assert result.get_nowait() == (201, b'{"lit": true}')
