"""The local hub's service side, driven in-process through its real HTTPS door by
:class:`ServiceClient`, with a real device on each transport receiving what was sent:
cloud-to-device (MQTT, AMQP, HTTPS), desired-property patches (MQTT, AMQP) and direct
methods (MQTT, AMQP); the refusals in IoT Hub's shapes; the pure conventions; the
ClientHello reader that marks ``probe`` handshakes; the rotating log file."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import iothub_tls as it
from iothub_tls.auth import generate_sas_token
from iothub_tls.diagnostics.clienthello import PROBE_ALPN, parse_client_hello
from iothub_tls.diagnostics.probe import probe
from iothub_tls.hub import service_conventions as svc
from iothub_tls.hub.hub import ENDPOINT_FILE, HubOptions, LocalHub, read_endpoint
from iothub_tls.hub.log import RotatingLogFile
from iothub_tls.hub.service_client import ServiceClient, ServiceRequestError
from tests.conftest import HOST

pytest.importorskip("paho.mqtt.client")
pytest.importorskip("proton")
pytest.importorskip("urllib3")

import urllib3

from iothub_tls.amqp import AmqpDeviceClient, AmqpOptions
from iothub_tls.https import HttpsDeviceClient, HttpsOptions
from iothub_tls.mqtt import MqttDeviceClient, MqttOptions

WAIT = 10.0
CLASSES: dict[str, Any] = {
    "mqtt": (MqttDeviceClient, MqttOptions),
    "amqp": (AmqpDeviceClient, AmqpOptions),
    "https": (HttpsDeviceClient, HttpsOptions),
}
_ids = iter(range(1_000_000))


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
        assert set(running.doors) == {"mqtt", "amqp", "https"}, running.unavailable
        yield running


@pytest.fixture
def service(hub: LocalHub) -> Iterator[ServiceClient]:
    with ServiceClient.from_state_dir(hub.state_dir, timeout=10) as client:
        yield client


def device(hub: LocalHub, transport: str, **options: Any) -> Any:
    cls, options_cls = CLASSES[transport]
    creds = hub.add_device(f"svc-{transport}-{next(_ids)}")
    extra = {"c2d_poll_interval": 0.05} if transport == "https" else {}
    return cls.from_connection_string(
        creds.connection_string,
        policy=it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path)),
        host="127.0.0.1",
        port=hub.ports[transport],
        options=options_cls(operation_timeout=5.0, **extra, **options),
    )


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def raw_request(hub: LocalHub, request: Any, authorization: str | None) -> Any:
    """One request on the HTTPS door, to see the exact answer (status, headers, body)."""
    ctx = it.create_ssl_context(it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path)))
    pool = urllib3.HTTPSConnectionPool(
        "127.0.0.1", hub.ports["https"], ssl_context=ctx, server_hostname=HOST, retries=False
    )
    headers = dict(request.headers)
    if authorization is not None:
        headers["Authorization"] = authorization
    try:
        body = request.body or None
        return pool.urlopen(request.method, request.path, body=body, headers=headers)
    finally:
        pool.close()


# -- what reaches devices ---------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["mqtt", "amqp", "https"])
def test_c2d_reaches_a_device_on_every_transport(hub, service, transport):
    with device(hub, transport) as client:
        message_id = service.send_c2d(
            client.device_id, "reboot now", {"priority": "high"}, correlation_id="c-1"
        )
        message = client.receive_c2d(WAIT)
        message.complete()
    assert message.payload == b"reboot now"
    assert message.properties["priority"] == "high"
    assert message.message_id == message_id and message_id
    assert message.correlation_id == "c-1"


@pytest.mark.parametrize("transport", ["mqtt", "amqp"])
def test_desired_patch_reaches_the_device_and_the_twin(hub, service, transport):
    updates: list[dict[str, Any]] = []
    with device(hub, transport) as client:
        client.on_desired_update = updates.append
        client.patch_reported({"firmware": "1.0"})
        time.sleep(0.3)  # the desired-properties subscription settles
        twin = service.update_twin(client.device_id, desired={"interval": 5, "mode": {"a": 1}})
        wait_until(lambda: bool(updates), "the desired patch at the device")
        device_twin = client.get_twin()
    assert updates[0]["interval"] == 5 and updates[0]["mode"] == {"a": 1}
    assert updates[0]["$version"] == twin["properties"]["desired"]["$version"] == 2
    assert twin["properties"]["desired"]["interval"] == 5
    assert twin["properties"]["reported"]["firmware"] == "1.0"
    assert twin["etag"] == svc.twin_etag(twin["version"])
    assert device_twin["desired"]["interval"] == 5
    assert service.get_twin(client.device_id)["connectionState"] == "Disconnected"


@pytest.mark.parametrize("transport", ["mqtt", "amqp"])
def test_direct_method_reaches_the_device(hub, service, transport):
    calls: list[it.MethodRequest] = []

    def echo(request: it.MethodRequest) -> tuple[int, Any]:
        calls.append(request)
        return 200, {"echo": request.payload}

    with device(hub, transport) as client:
        client.on_method("echo", echo)
        client.on_method("fail", lambda request: (500, {"why": "broken"}))
        # connect_timeout waits for the device's method subscription
        result = service.invoke_method(
            client.device_id, "echo", {"x": [1, 2]}, timeout=10, connect_timeout=5
        )
        failed = service.invoke_method(client.device_id, "fail", None, timeout=10)
        assert service.get_device(client.device_id)["connectionState"] == "Connected"
    assert (result.status, result.payload) == (200, {"echo": {"x": [1, 2]}})
    assert calls[0].name == "echo" and calls[0].payload == {"x": [1, 2]}
    assert (failed.status, failed.payload) == (500, {"why": "broken"})


def test_a_replaced_twin_reaches_the_device_as_a_merge_patch(hub, service):
    updates: list[dict[str, Any]] = []
    with device(hub, "mqtt") as client:
        client.on_desired_update = updates.append
        time.sleep(0.3)
        service.update_twin(client.device_id, desired={"a": 1, "b": 2}, tags={"site": "x"})
        twin = service.update_twin(client.device_id, desired={"a": 3}, replace=True)
        wait_until(lambda: len(updates) == 2, "two desired updates")
    assert twin["properties"]["desired"]["a"] == 3 and "b" not in twin["properties"]["desired"]
    assert twin["tags"] == {}  # PUT replaces the tags too
    assert updates[1]["a"] == 3 and updates[1]["b"] is None


# -- refusals in IoT Hub's shapes ---------------------------------------------------------------


def test_method_to_a_disconnected_device_is_404_device_not_online(hub, service):
    creds = hub.add_device("never-connected")
    with pytest.raises(ServiceRequestError) as err:
        service.invoke_method(creds.device_id, "echo", timeout=5)
    assert (err.value.status, err.value.error_code) == (404, "DeviceNotOnline")
    answer = raw_request(
        hub,
        svc.invoke_method_request(creds.device_id, svc.MethodCall("echo")),
        service.connection_string.token(),
    )
    assert answer.status == 404 and answer.headers["iothub-errorcode"] == "DeviceNotOnline"
    inner = json.loads(json.loads(answer.data)["Message"])
    assert inner["errorCode"] == 404103 and "isn't online" in inner["message"]


def test_unknown_device_is_404_in_iot_hubs_shape(hub, service):
    for call in (
        lambda: service.get_twin("no-such-device"),
        lambda: service.get_device("no-such-device"),
        lambda: service.send_c2d("no-such-device", "x"),
        lambda: service.invoke_method("no-such-device", "echo"),
    ):
        with pytest.raises(ServiceRequestError) as err:
            call()
        assert (err.value.status, err.value.error_code) == (404, "DeviceNotFound")
        assert "no-such-device not registered" in str(err.value)
    answer = raw_request(
        hub, svc.get_twin_request("no-such-device"), service.connection_string.token()
    )
    body = json.loads(answer.data)
    assert body["Message"] == "ErrorCode:DeviceNotFound;Device no-such-device not registered"
    assert body["ExceptionMessage"].startswith("Tracking ID:")


def test_wrong_service_key_is_401(hub, service):
    wrong = svc.ServiceConnectionString(
        HOST, svc.SERVICE_POLICY, base64.b64encode(b"k" * 32).decode()
    )
    client = ServiceClient(
        wrong,
        policy=it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path)),
        address="127.0.0.1",
        port=hub.ports["https"],
    )
    with client, pytest.raises(ServiceRequestError) as err:
        client.list_devices()
    assert (err.value.status, err.value.error_code) == (401, "IotHubUnauthorizedAccess")
    assert "signature does not match" in str(err.value)


def test_a_device_key_on_the_service_api_is_401(hub, service):
    creds = hub.add_device("device-key-user")
    cs = it.ConnectionString.parse(creds.connection_string)
    assert cs.shared_access_key is not None
    for resource in (HOST, cs.resource_uri):
        token = generate_sas_token(resource, cs.shared_access_key)
        answer = raw_request(hub, svc.get_twin_request(creds.device_id), token)
        assert answer.status == 401
        assert answer.headers["iothub-errorcode"] == "IotHubUnauthorizedAccess"
        assert b"signed with a device key" in answer.data


def test_a_policy_without_the_permission_is_401(hub, service):
    key = hub.registry.add_policy("devicesonly")  # DeviceConnect only
    token = generate_sas_token(HOST, key, policy_name="devicesonly")
    answer = raw_request(hub, svc.list_devices_request(), token)
    assert answer.status == 401
    assert b"no RegistryRead permission" in answer.data
    missing = raw_request(hub, svc.list_devices_request(), None)
    assert missing.status == 401 and b"no Authorization header" in missing.data


def test_bad_requests_are_400(hub, service):
    creds = hub.add_device("bad-requests")
    token = service.connection_string.token()
    cases = [
        (svc.update_twin_request(creds.device_id, {"properties": {"desired": {"a.b": 1}}}), b"a.b"),
        (svc.update_twin_request(creds.device_id, {"tags": [1]}), b"tags must be a JSON object"),
        (
            svc.HttpRequest(
                "POST",
                f"/twins/{creds.device_id}/methods?api-version={svc.API_VERSION}",
                {"Content-Type": "application/json"},
                b'{"methodName": "x", "responseTimeoutInSeconds": 1}',
            ),
            b"responseTimeoutInSeconds must be",
        ),
        (svc.HttpRequest("GET", f"/twins/{creds.device_id}", {}, b""), b"api-version"),
    ]
    for request, fragment in cases:
        answer = raw_request(hub, request, token)
        assert answer.status == 400, (request, answer.data)
        assert fragment in answer.data
    assert raw_request(hub, svc.HttpRequest("GET", "/nothing/here", {}, b""), token).status == 404


# -- the registry ------------------------------------------------------------------------------


def test_create_get_list_and_delete_a_sas_device(hub, service):
    made = service.create_device("made-by-service")
    keys = made["authentication"]["symmetricKey"]
    assert made["authentication"]["type"] == "sas"
    assert len(base64.b64decode(keys["primaryKey"])) == 32
    assert len(base64.b64decode(keys["secondaryKey"])) == 32
    assert made["status"] == "enabled" and made["etag"] and made["generationId"].isdigit()
    got = service.get_device("made-by-service")
    assert got["etag"] == made["etag"] and got["connectionState"] == "Disconnected"
    assert "made-by-service" in {d["deviceId"] for d in service.list_devices()}
    with pytest.raises(ServiceRequestError) as err:
        service.create_device("made-by-service")
    assert (err.value.status, err.value.error_code) == (409, "DeviceAlreadyExists")
    # The device the service made connects with the key the hub made.
    cs = service.connection_string_of("made-by-service")
    client = MqttDeviceClient.from_connection_string(
        cs,
        policy=it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path)),
        host="127.0.0.1",
        port=hub.ports["mqtt"],
    )
    with client:
        client.send_telemetry(b"made")
    with pytest.raises(ServiceRequestError) as err:
        service.delete_device("made-by-service", etag="not-the-etag")
    assert err.value.status == 412
    service.delete_device("made-by-service", etag=made["etag"])
    with pytest.raises(ServiceRequestError) as err:
        service.get_device("made-by-service")
    assert err.value.status == 404
    assert hub.registry.get("made-by-service") is None


def test_create_an_x509_device_by_thumbprint(hub, service):
    from iothub_tls.testing.pki import KeyType

    issued, files = hub.pki.add_device("thumb-dev", key_type=KeyType.EC)
    made = service.create_device(
        "thumb-dev", auth_type="selfSigned", primary_thumbprint=issued.thumbprint_sha1
    )
    assert made["authentication"]["type"] == "selfSigned"
    assert made["authentication"]["x509Thumbprint"] == {
        "primaryThumbprint": issued.thumbprint_sha1,
        "secondaryThumbprint": None,
    }
    assert made["authentication"]["symmetricKey"] == {"primaryKey": None, "secondaryKey": None}
    identity = it.ClientIdentity.from_files(files.certificate, files.private_key)
    client = AmqpDeviceClient.from_x509(
        HOST,
        "thumb-dev",
        identity,
        policy=it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path)),
        host="127.0.0.1",
        port=hub.ports["amqp"],
    )
    with client:
        client.send_telemetry(b"by thumbprint")
    assert hub.state.wait_for_telemetry(lambda m: m.device_id == "thumb-dev") is not None


def test_registry_changes_survive_a_restart(tmp_path):
    options = HubOptions(tmp_path, hostname=HOST, mqtt_port=None, amqp_port=None, https_port=0)
    with LocalHub(options) as first:
        key = first.service_connection_string.shared_access_key
        with ServiceClient.from_state_dir(tmp_path) as service:
            service.create_device("persisted")
        assert (tmp_path / ENDPOINT_FILE).stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / ENDPOINT_FILE).exists()
    with pytest.raises(OSError, match="no local hub is running"):
        read_endpoint(tmp_path)
    with LocalHub(options) as second:
        assert second.service_connection_string.shared_access_key == key
        with ServiceClient.from_state_dir(tmp_path) as service:
            assert service.get_device("persisted")["deviceId"] == "persisted"


# -- pure parts ----------------------------------------------------------------------------------


def test_service_connection_string_round_trip_and_refusals():
    key = base64.b64encode(b"s" * 32).decode()
    text = f"HostName=hub.example;SharedAccessKeyName=iothubowner;SharedAccessKey={key}"
    cs = svc.ServiceConnectionString.parse(text)
    assert cs.format() == text
    assert key not in repr(cs) and key not in str(cs)
    token = it.SasToken.parse(cs.token())
    assert token.key_name == "iothubowner" and token.resource_uri == "hub.example"
    token.verify(key, resource_uri="hub.example")
    with pytest.raises(it.ConnectionStringError, match="device connection string"):
        svc.ServiceConnectionString.parse(f"HostName=h;DeviceId=d;SharedAccessKey={key}")
    with pytest.raises(it.ConnectionStringError, match="has no SharedAccessKeyName"):
        svc.ServiceConnectionString.parse(f"HostName=h;SharedAccessKey={key}")


@pytest.mark.parametrize(
    ("method", "path", "operation", "device_id"),
    [
        ("GET", "/devices", svc.Operation.LIST_DEVICES, None),
        ("PUT", "/devices/a%2Fb", svc.Operation.PUT_DEVICE, "a/b"),
        ("DELETE", "/devices/d/commands", svc.Operation.PURGE_C2D, "d"),
        ("PATCH", "/twins/d", svc.Operation.UPDATE_TWIN, "d"),
        ("POST", "/twins/d/methods", svc.Operation.INVOKE_METHOD, "d"),
        ("POST", "/messages/deviceBound", svc.Operation.SEND_C2D, None),
    ],
)
def test_routes(method, path, operation, device_id):
    assert svc.parse_route(method, path) == svc.Route(operation, device_id)


def test_route_refusals():
    with pytest.raises(svc.RouteError) as err:
        svc.parse_route("POST", "/twins/d")
    assert err.value.status == 405 and "use GET, PATCH, PUT" in err.value.message
    for path in ("/", "/twins", "/twins/d/x", "/devices//x"):
        with pytest.raises(svc.RouteError) as err:
            svc.parse_route("GET", path)
        assert err.value.status == 404


def test_method_call_bounds():
    assert svc.MethodCall.from_json({"methodName": "m"}).response_timeout == 30
    legacy = svc.MethodCall.from_json({"methodName": "m", "timeoutInSeconds": 7})
    assert legacy.response_timeout == 7
    for bad, message in (
        ({}, "methodName"),
        ({"methodName": "m", "responseTimeoutInSeconds": 301}, "5..300"),
        ({"methodName": "m", "connectTimeoutInSeconds": -1}, "0..300"),
        ({"methodName": "m", "responseTimeoutInSeconds": True}, "5..300"),
    ):
        with pytest.raises(ValueError, match=message):
            svc.MethodCall.from_json(bad)


def test_c2d_target_round_trip():
    assert svc.parse_c2d_target(svc.c2d_target("a/b c")) == "a/b c"
    assert svc.parse_c2d_target("/devices/d/messages/events") is None
    assert svc.parse_c2d_target(None) is None


def test_service_error_shapes_parse():
    nested = svc.method_error_body(404103, "not online", "abc", 0)
    info = svc.parse_service_error({}, nested)
    assert (info.code, info.message, info.tracking_id) == ("404103", "not online", "abc")
    info = svc.parse_service_error({"iothub-errorcode": "DeviceNotOnline"}, nested)
    assert info.code == "DeviceNotOnline"


# -- probe handshakes in the connection log -------------------------------------------------------


def _client_hello(alpn: list[str] | None, server_name: str | None = "localhost") -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_client_hello_reader():
    hello = parse_client_hello(_client_hello([PROBE_ALPN, "http/1.1"]))
    assert hello is not None and hello.from_probe
    assert hello.alpn == (PROBE_ALPN, "http/1.1") and hello.server_name == "localhost"
    device = parse_client_hello(_client_hello(["mqtt"], None))
    assert device is not None and not device.from_probe and device.server_name is None
    assert parse_client_hello(_client_hello(None)) == parse_client_hello(_client_hello([]))
    whole = _client_hello([PROBE_ALPN])
    for cut in (0, 4, 5, 40, len(whole) - 1):
        assert parse_client_hello(whole[:cut]) is None
    assert parse_client_hello(b"GET / HTTP/1.1\r\n\r\n") is None


def test_probe_handshakes_are_marked_and_counted_apart(tmp_path):
    with LocalHub(HubOptions(tmp_path, mqtt_port=0, amqp_port=0, https_port=0)) as hub:
        roots = it.RootSet.from_pem_file(hub.root_pem_path)
        for door in ("mqtt", "amqp", "https"):
            assert probe("127.0.0.1", hub.ports[door], sni="localhost", roots=roots).compliant
        # A device with a weak suite only is still a device failure.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(hub.root_pem_path))
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("AES128-GCM-SHA256")
        with socket.create_connection(("127.0.0.1", hub.ports["mqtt"]), 5) as raw:
            with pytest.raises(ssl.SSLError):
                ctx.wrap_socket(raw, server_hostname="localhost")
        wait_until(lambda: hub.log.stats()["failedConnections"] == {"Mqtt": 1}, "the failure")
        stats = hub.log.stats()
        events = list(hub.log.events)
    probes = [e for e in events if e.probe]
    assert len(probes) == stats["probeHandshakes"] >= 3 * 20
    assert all(e.to_json()["probe"] is True for e in probes)
    assert all(e.sni == "localhost" for e in probes if e.sni is not None)
    assert stats["failedConnections"] == {"Mqtt": 1} and stats["successfulConnections"] == 0
    assert [e.to_json()["probe"] for e in events if not e.probe] == [False]


# -- the log file ---------------------------------------------------------------------------------


def test_rotating_log_file(tmp_path):
    path = tmp_path / "hub.log"
    line = json.dumps({"n": "x" * 40}) + "\n"  # 52 bytes
    with RotatingLogFile(path, max_bytes=120, backups=2) as log:
        for _ in range(7):
            log.write(line)
            log.flush()
    assert path.stat().st_mode & 0o777 == 0o600
    files = [path, path.with_name("hub.log.1"), path.with_name("hub.log.2")]
    assert [f.read_text().count("\n") for f in files] == [1, 2, 2]  # 7 lines, 2 dropped
    assert not path.with_name("hub.log.3").exists()
    with pytest.raises(ValueError, match="at least one backup"):
        RotatingLogFile(tmp_path / "x.log", max_bytes=10, backups=0)


def test_unknown_hub_state_dir_names_serve(tmp_path):
    with pytest.raises(OSError, match=r"iothub-tls serve --state"):
        ServiceClient.from_state_dir(tmp_path / "none")


def test_endpoint_file_describes_the_running_hub(hub):
    data = read_endpoint(hub.state_dir)
    assert data["ports"] == hub.ports and data["hostname"] == HOST
    assert Path(data["root"]) == hub.root_pem_path.resolve()
    assert data["service"]["connectionString"] == hub.service_connection_string.format()
    assert hub.describe()["service"] == data["service"]
