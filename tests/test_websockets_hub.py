"""The local hub serves MQTT and AMQP over WebSockets on its HTTPS door, as IoT Hub does
on 443: ``GET /$iothub/websocket`` upgraded with the subprotocol ``mqtt`` or
``AMQPWSB10``, the same authentication and connection log as the MQTT and AMQP doors
(protocol ``MqttWs`` / ``AmqpWs``). Upgrades that cannot be served get their HTTP status
and a log line."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import iothub_tls as it
from iothub_tls.amqp import AmqpDeviceClient, AmqpOptions
from iothub_tls.https import HttpsDeviceClient
from iothub_tls.hub.hub import HubOptions, LocalHub
from iothub_tls.hub.log import ConnectionEvent
from iothub_tls.mqtt import MqttDeviceClient, MqttOptions

from .conftest import HOST

PATH = "/$iothub/websocket"


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
        yield running


def _policy(hub: LocalHub) -> it.TlsPolicy:
    return it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path))


def _raw(hub: LocalHub, request: bytes) -> tuple[bytes, ssl.SSLSocket]:
    """Send ``request`` over TLS to the HTTPS door; the answer's head and the socket."""
    context = ssl.create_default_context(cafile=str(hub.root_pem_path))
    sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", hub.ports["https"]), timeout=10),
        server_hostname=HOST,
    )
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data, sock


def _upgrade(
    *,
    method: str = "GET",
    path: str = PATH,
    upgrade: str | None = "websocket",
    connection: str | None = "Upgrade",
    version: str | None = "13",
    key: str | None = "dGhlIHNhbXBsZSBub25jZQ==",
    protocol: str | None = "mqtt",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
    for name, value in (
        ("Upgrade", upgrade),
        ("Connection", connection),
        ("Sec-WebSocket-Version", version),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Protocol", protocol),
    ):
        if value is not None:
            lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _events_of_device(
    hub: LocalHub, device_id: str, count: int, timeout: float = 5.0
) -> list[ConnectionEvent]:
    """The device's first ``count`` log lines (a disconnection is logged on the hub's
    thread, possibly after the client has seen its connection close)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in list(hub.log.events) if e.device_id == device_id]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def _event_of(hub: LocalHub, caller: str, timeout: float = 5.0) -> ConnectionEvent:
    """The log line of the connection from ``caller`` (written on the hub's thread)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in list(hub.log.events) if e.caller == caller]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no connection log line for {caller}")
        time.sleep(0.02)


# -- accepted: MQTT and AMQP over WebSockets, authenticated and logged ----------------------


@pytest.mark.parametrize("protocol", ["MqttWs", "AmqpWs"])
def test_device_over_websockets_on_the_https_door(hub: LocalHub, protocol: str) -> None:
    device_id = f"ws-{protocol}-{uuid.uuid4().hex[:6]}"
    creds = hub.add_device(device_id)
    cls = MqttDeviceClient if protocol == "MqttWs" else AmqpDeviceClient
    client = cls.from_connection_string(
        creds.connection_string,
        policy=_policy(hub),
        host="127.0.0.1",
        port=hub.ports["https"],
        websockets=True,
    )
    with client:
        client.send_telemetry(b"over websockets", {"p": protocol})
        hub.state.enqueue_c2d(device_id, b"back over websockets", {})
        message = client.receive_c2d(timeout=10)
        if cls is AmqpDeviceClient:
            message.complete()
        twin = client.get_twin()
    assert message.payload == b"back over websockets"
    assert "reported" in twin
    got = hub.state.wait_for_telemetry(lambda t: t.device_id == device_id)
    assert got is not None and got.payload == b"over websockets"
    mine = _events_of_device(hub, device_id, count=2)
    assert [(e.operation, e.protocol, e.result) for e in mine] == [
        ("deviceConnect", protocol, "Success"),
        ("deviceDisconnect", protocol, "Success"),
    ]
    assert mine[0].tls_version in ("TLSv1.2", "TLSv1.3") and mine[0].sni == HOST
    # the device REST API still answers on the same door
    with HttpsDeviceClient.from_connection_string(
        creds.connection_string, policy=_policy(hub), host="127.0.0.1", port=hub.ports["https"]
    ) as https:
        https.send_telemetry(b"plain https")


@pytest.mark.parametrize("websocket_cls", [MqttDeviceClient, AmqpDeviceClient])
def test_wrong_key_over_websockets_is_refused_and_logged(
    hub: LocalHub, websocket_cls: type[MqttDeviceClient] | type[AmqpDeviceClient]
) -> None:
    device_id = f"ws-bad-{uuid.uuid4().hex[:6]}"
    hub.add_device(device_id)
    wrong = base64.b64encode(os.urandom(32)).decode()
    options: dict[str, object] = (
        {"options": MqttOptions(retry=None)}
        if websocket_cls is MqttDeviceClient
        else {"options": AmqpOptions(retry=None)}
    )
    client = websocket_cls.from_connection_string(
        f"HostName={HOST};DeviceId={device_id};SharedAccessKey={wrong}",
        policy=_policy(hub),
        host="127.0.0.1",
        port=hub.ports["https"],
        websockets=True,
        **options,  # type: ignore[arg-type]
    )
    with pytest.raises(it.AuthenticationError):
        client.connect()
    client.close()
    refused = [e for e in hub.log.events if e.device_id == device_id]
    assert refused and refused[0].result == "Failure"
    assert refused[0].protocol in ("MqttWs", "AmqpWs")
    assert refused[0].reason


def test_x509_device_over_mqtt_websockets(hub: LocalHub) -> None:
    device_id = f"ws-x509-{uuid.uuid4().hex[:6]}"
    creds = hub.add_device(device_id, x509=True)
    assert creds.certfile is not None and creds.keyfile is not None
    identity = it.ClientIdentity.from_files(creds.certfile, creds.keyfile)
    with MqttDeviceClient.from_connection_string(
        creds.connection_string,
        identity=identity,
        policy=_policy(hub),
        host="127.0.0.1",
        port=hub.ports["https"],
        websockets=True,
    ) as client:
        client.send_telemetry(b"x509 over websockets")
    event = next(e for e in hub.log.events if e.device_id == device_id)
    assert event.protocol == "MqttWs" and event.result == "Success"
    assert event.client_cert_thumbprint == identity.thumbprint_sha1.upper()


def test_the_upgrade_answer_follows_rfc_6455(hub: LocalHub) -> None:
    head, sock = _raw(hub, _upgrade(protocol="AMQPWSB10"))
    with sock:
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0] == "HTTP/1.1 101 Switching Protocols"
        headers = {
            k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }
        # RFC 6455 section 1.3's example key and its answer
        assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        assert headers["sec-websocket-protocol"] == "AMQPWSB10"
        assert headers["upgrade"].lower() == "websocket"


def test_a_text_message_ends_the_websocket(hub: LocalHub) -> None:
    head, sock = _raw(hub, _upgrade(protocol="mqtt"))
    with sock:
        assert head.startswith(b"HTTP/1.1 101 ")
        caller = f"127.0.0.1:{sock.getsockname()[1]}"
        # a masked text frame "hello" (RFC 6455 section 5.7's example)
        sock.sendall(bytes([0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58]))
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data[:1] == b"\x88"  # a close frame
    assert int.from_bytes(data[2:4], "big") == 1003
    event = _event_of(hub, caller)  # logged on the hub's thread, maybe after the close
    assert event.protocol == "MqttWs" and event.result == "Failure"
    assert "text WebSocket message" in (event.reason or "")


# -- refused upgrades: their status and a log line --------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status", "says", "header"),
    [
        (_upgrade(path="/$iothub/websockets"), 404, "no WebSocket endpoint at", None),
        (_upgrade(path="/devices/d/messages/events"), 404, "no WebSocket endpoint", None),
        (_upgrade(method="POST"), 405, "the upgrade is a GET", ("allow", "GET")),
        (_upgrade(upgrade=None), 426, "without 'Upgrade: websocket'", ("upgrade", "websocket")),
        (_upgrade(connection="keep-alive"), 426, "'Connection: Upgrade'", None),
        (_upgrade(version="8"), 426, "speaks version 13", ("sec-websocket-version", "13")),
        (_upgrade(key=None), 400, "Sec-WebSocket-Key is missing", None),
        (_upgrade(key="c2hvcnQ="), 400, "not 16 bytes", None),
        (_upgrade(protocol="wamp"), 400, "subprotocol wamp is not served", None),
        (_upgrade(protocol=None), 400, "subprotocol none is not served", None),
    ],
)
def test_refused_upgrades_get_their_status_and_a_log_line(
    hub: LocalHub,
    request_bytes: bytes,
    status: int,
    says: str,
    header: tuple[str, str] | None,
) -> None:
    head, sock = _raw(hub, request_bytes)
    with sock:
        caller = f"127.0.0.1:{sock.getsockname()[1]}"
        lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} "), lines[0]
    headers = {
        k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
    }
    assert headers.get("connection") == "close"
    if header is not None:
        assert headers.get(header[0]) == header[1]
    event = _event_of(hub, caller)
    assert event.operation == "deviceConnect" and event.result == "Failure"
    assert event.protocol == "Https"
    assert event.reason is not None and "WebSocket upgrade refused" in event.reason
    assert says in event.reason


def test_a_hub_without_an_mqtt_door_refuses_the_mqtt_subprotocol(tmp_path: Path) -> None:
    options = HubOptions(
        state_dir=tmp_path, hostname=HOST, mqtt_port=None, amqp_port=0, https_port=0
    )
    with LocalHub(options) as hub:
        head, sock = _raw(hub, _upgrade(protocol="mqtt"))
        sock.close()
        assert head.startswith(b"HTTP/1.1 400 ")
        reason = hub.log.events[-1].reason or ""
        assert "ask for AMQPWSB10" in reason
        creds = hub.add_device("amqp-only")
        with AmqpDeviceClient.from_connection_string(
            creds.connection_string,
            policy=_policy(hub),
            host="127.0.0.1",
            port=hub.ports["https"],
            websockets=True,
        ) as client:
            client.send_telemetry(b"amqp over websockets still served")
        client = MqttDeviceClient.from_connection_string(
            creds.connection_string,
            policy=_policy(hub),
            host="127.0.0.1",
            port=hub.ports["https"],
            websockets=True,
            options=MqttOptions(retry=None),
        )
        with pytest.raises(
            it.ConnectionFailedError, match=r"refused the WebSocket upgrade .*HTTP 400"
        ):
            client.connect()
        client.close()
