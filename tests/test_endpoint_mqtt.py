"""The local hub's MQTT front door, driven by a plain paho-mqtt client over real TLS."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from urllib.parse import unquote

import pytest

import iothub_tls as it
from iothub_tls.auth import generate_sas_token
from iothub_tls.hub.mqtt import MqttEndpoint
from iothub_tls.hub.profile import HubTlsProfile, ServerCredential
from iothub_tls.hub.registry import DeviceRegistry
from iothub_tls.hub.state import HubState
from iothub_tls.mqtt import packets as codec
from tests.conftest import new_root

mqtt = pytest.importorskip("paho.mqtt.client")
HUB = "localhost"


@pytest.fixture(scope="module")
def hub_pki():
    root = new_root("Local Hub Root")
    device_ca = new_root("Device Root", key_type="ec")
    return {
        "root": root,
        "server": root.issue(HUB),
        "device_ca": device_ca,
        "device": device_ca.issue(cn="cert-device", client=True, key_type="ec"),
    }


@pytest.fixture
def hub(hub_pki):
    registry = DeviceRegistry(HUB)
    key = registry.add_sas_device("sas-device").primary_key
    device = hub_pki["device"]
    registry.add_x509_device(
        "cert-device",
        it.ClientIdentity.from_pem(device.cert_chain_pem, device.key_pem).thumbprint_sha256,
    )
    server = hub_pki["server"]
    profile = HubTlsProfile(
        (ServerCredential.from_pem(server.cert_chain_pem, server.key_pem),),
        client_ca_pem=hub_pki["device_ca"].cert_pem,
    )
    state = HubState()
    endpoint = MqttEndpoint(profile, registry, state)
    endpoint.start()
    endpoint.sas_key = key  # type: ignore[attr-defined]
    yield endpoint
    endpoint.stop()


def _client(hub_pki, client_id, *, identity=None):
    if hasattr(mqtt, "CallbackAPIVersion"):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    else:
        client = mqtt.Client(client_id=client_id)
    roots = it.RootSet.from_pem(hub_pki["root"].cert_pem)
    client.tls_set_context(it.create_ssl_context(it.TlsPolicy(roots=roots), identity=identity))
    client.messages = []
    client.connack = threading.Event()
    client.rc = None

    def on_connect(c, userdata, flags, rc, *args):
        # paho 2 reports MQTT 3.1.1 return codes as MQTT 5 reason codes
        value = int(getattr(rc, "value", rc))
        c.rc = {133: 2, 134: 4, 135: 5}.get(value, value)
        c.connack.set()

    client.on_connect = on_connect
    client.on_message = lambda c, u, m: c.messages.append((m.topic, m.payload))
    return client


def _connect(client, port):
    client.connect(HUB, port)
    client.loop_start()
    assert client.connack.wait(5)
    return client.rc


def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _sas_client(hub_pki, hub, key=None):
    client = _client(hub_pki, "sas-device")
    token = generate_sas_token(f"{HUB}/devices/sas-device", key or hub.sas_key)
    client.username_pw_set(f"{HUB}/sas-device/?api-version=2021-04-12", token)
    return client


def test_sas_device_sends_telemetry_and_is_logged(hub_pki, hub):
    client = _sas_client(hub_pki, hub)
    assert _connect(client, hub.port) == 0
    # written by hand, as IoT Hub's MQTT article shows it: percent-encoded, $ as %24
    bag = "temp%20unit=%C2%B0C&%24.mid=m-1&%24.ct=application%2Fjson"
    client.publish(f"devices/sas-device/messages/events/{bag}", b'{"t":1}', qos=1).wait_for_publish(
        5
    )
    got = hub.state.wait_for_telemetry(lambda m: m.device_id == "sas-device")
    client.disconnect()
    client.loop_stop()
    assert got.payload == b'{"t":1}'
    assert got.properties == {"temp unit": "°C"}
    assert got.system_properties == {"$.mid": "m-1", "$.ct": "application/json"}
    (seen,) = hub.received
    assert (seen.message_id, seen.content_type) == ("m-1", "application/json")
    assert seen.auth_type == "sas"
    assert "+" not in bag and "%20" in bag
    assert _wait(lambda: any(e.operation == "deviceDisconnect" for e in hub.log.events))
    connect = next(e for e in hub.log.events if e.operation == "deviceConnect")
    record = connect.to_json()
    assert record["deviceId"] == "sas-device" and record["result"] == "Success"
    assert record["tlsVersion"] == "TLSv1.3" and record["cipherSuite"].startswith("TLS_AES_")
    assert record["sni"] == HUB and record["protocol"] == "Mqtt"
    assert hub.log.stats()["byTlsVersion"] == {"TLSv1.3": 1}


def test_wrong_sas_key_is_not_authorized(hub_pki, hub):
    client = _sas_client(hub_pki, hub, key=DeviceRegistry.new_key())
    assert _connect(client, hub.port) == 5
    client.loop_stop()
    assert _wait(lambda: any(e.result == "Failure" for e in hub.log.events))
    failure = next(e for e in hub.log.events if e.result == "Failure")
    assert "signature" in failure.reason and failure.device_id == "sas-device"


def test_malformed_password_is_reported_as_the_mqtt_password(hub_pki, hub):
    client = _client(hub_pki, "sas-device")
    client.username_pw_set(f"{HUB}/sas-device/?api-version=2021-04-12", "hunter2")
    assert _connect(client, hub.port) == 5
    client.loop_stop()
    [failure] = [e for e in hub.log.events if e.result == "Failure"]
    assert failure.reason == (
        "not authorized: the MQTT password is not a SAS token (it must start with "
        "'SharedAccessSignature ')"
    )


def test_no_password_and_no_certificate_says_what_mqtt_needs(hub_pki, hub):
    client = _client(hub_pki, "sas-device")
    client.username_pw_set(f"{HUB}/sas-device/?api-version=2021-04-12")
    assert _connect(client, hub.port) == 5
    client.loop_stop()
    [failure] = [e for e in hub.log.events if e.result == "Failure"]
    assert failure.reason == (
        "not authorized: no credentials for device 'sas-device': send a SAS token as the "
        "MQTT password or present the device certificate in TLS"
    )


def test_username_must_name_the_hub_and_device(hub_pki, hub):
    client = _client(hub_pki, "sas-device")
    token = generate_sas_token(f"{HUB}/devices/sas-device", hub.sas_key)
    client.username_pw_set("otherhub/sas-device/?api-version=2021-04-12", token)
    assert _connect(client, hub.port) == 5
    client.loop_stop()
    assert "must start with 'localhost/sas-device/'" in hub.log.events[-1].reason


def test_x509_device_by_thumbprint(hub_pki, hub):
    device = hub_pki["device"]
    identity = it.ClientIdentity.from_pem(device.cert_chain_pem, device.key_pem)
    client = _client(hub_pki, "cert-device", identity=identity)
    client.username_pw_set(f"{HUB}/cert-device/?api-version=2021-04-12")
    assert _connect(client, hub.port) == 0
    client.disconnect()
    client.loop_stop()
    # written on the hub's thread, possibly after the client has its CONNACK
    assert _wait(lambda: any(e.result == "Success" for e in hub.log.events))
    event = next(e for e in hub.log.events if e.result == "Success")
    assert event.client_cert_thumbprint == identity.thumbprint_sha1


def test_x509_device_with_someone_elses_certificate(hub_pki, hub):
    other = hub_pki["device_ca"].issue(cn="cert-device", client=True, key_type="ec")
    identity = it.ClientIdentity.from_pem(other.cert_chain_pem, other.key_pem)
    client = _client(hub_pki, "cert-device", identity=identity)
    client.username_pw_set(f"{HUB}/cert-device/?api-version=2021-04-12")
    assert _connect(client, hub.port) == 5
    client.loop_stop()
    assert "is not one registered" in hub.log.events[-1].reason


def test_c2d_twin_and_methods(hub_pki, hub):
    client = _sas_client(hub_pki, hub)
    assert _connect(client, hub.port) == 0
    for topic, qos in [
        ("devices/sas-device/messages/devicebound/#", 1),
        ("$iothub/twin/res/#", 0),
        ("$iothub/twin/PATCH/properties/desired/#", 0),
        ("$iothub/methods/POST/#", 0),
    ]:
        client.subscribe(topic, qos)
    assert _wait(lambda: len(hub.connected_devices()) == 1)
    time.sleep(0.2)
    hub.state.enqueue_c2d("sas-device", b"reboot", {"reason": "update now"})
    assert _wait(lambda: any("devicebound" in t for t, _ in client.messages))
    topic, payload = next((t, p) for t, p in client.messages if "devicebound" in t)
    bag = dict(
        (unquote(k), unquote(v))
        for k, _, v in (p.partition("=") for p in topic.split("devicebound/", 1)[1].split("&"))
    )
    assert payload == b"reboot" and bag["reason"] == "update now"
    assert bag["$.to"] == "/devices/sas-device/messages/deviceBound"
    assert set(bag) == {"reason", "$.to", "$.mid"}
    assert _wait(lambda: len(hub.state.completed) == 1)  # PUBACK completes

    client.publish("$iothub/twin/PATCH/properties/reported/?$rid=7", json.dumps({"fw": "1.2"}))
    assert _wait(
        lambda: any(t.startswith("$iothub/twin/res/204/?$rid=7") for t, _ in client.messages)
    )
    client.publish("$iothub/twin/GET/?$rid=8", b"")
    assert _wait(lambda: any(t == "$iothub/twin/res/200/?$rid=8" for t, _ in client.messages))
    doc = json.loads(next(p for t, p in client.messages if t == "$iothub/twin/res/200/?$rid=8"))
    assert doc["reported"]["fw"] == "1.2" and doc["reported"]["$version"] == 2

    hub.state.patch_desired("sas-device", {"interval": 30})
    assert _wait(lambda: any("desired/?$version=2" in t for t, _ in client.messages))

    def answer(c, userdata, message):
        c.messages.append((message.topic, message.payload))
        if message.topic.startswith("$iothub/methods/POST/reboot/"):
            rid = message.topic.split("$rid=")[1]
            c.publish(f"$iothub/methods/res/200/?$rid={rid}", b'{"ok":true}')

    client.on_message = answer
    assert hub.state.invoke_method("sas-device", "reboot", b"{}", timeout=5) == (
        200,
        b'{"ok":true}',
    )
    client.disconnect()
    client.loop_stop()


def test_publishing_to_a_foreign_topic_closes_the_connection(hub_pki, hub):
    client = _sas_client(hub_pki, hub)
    assert _connect(client, hub.port) == 0
    client.publish("devices/another-device/messages/events/", b"x", qos=1)
    assert _wait(lambda: any(e.operation == "deviceDisconnect" for e in hub.log.events))
    client.loop_stop()
    assert "does not accept" in hub.log.events[-1].reason


@pytest.mark.parametrize("legacy", [False, True])
def test_tls10_client_against_default_and_legacy_profiles(hub_pki, legacy):
    server = hub_pki["server"]
    profile = HubTlsProfile(
        (ServerCredential.from_pem(server.cert_chain_pem, server.key_pem),),
        min_version=ssl.TLSVersion.TLSv1 if legacy else ssl.TLSVersion.TLSv1_2,
        legacy_ciphers=legacy,
    )
    endpoint = MqttEndpoint(profile, DeviceRegistry(HUB))
    with endpoint:
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(cadata=hub_pki["root"].cert_pem.decode())
        with pytest.warns(DeprecationWarning):
            old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1
        old.set_ciphers("ALL:@SECLEVEL=0")
        with socket.create_connection(("127.0.0.1", endpoint.port), 5) as raw:
            if legacy:
                with old.wrap_socket(raw, server_hostname=HUB) as tls:
                    assert tls.version() == "TLSv1"
                    tls.sendall(codec.connack(0))  # not a CONNECT: the hub just hangs up
            else:
                with pytest.raises(ssl.SSLError):
                    old.wrap_socket(raw, server_hostname=HUB)
        assert _wait(lambda: endpoint.log.events)
        event = endpoint.log.events[0]
    if legacy:
        assert event.tls_version == "TLSv1"
        assert event.reason.startswith("no MQTT CONNECT received: unexpected packet type 2")
    else:
        assert event.result == "Failure" and "UNSUPPORTED_PROTOCOL" in event.reason


# -- the codec ---------------------------------------------------------------------------


def test_codec_round_trip_and_errors():
    decoder = codec.Decoder()
    frame = codec.publish("devices/d/messages/events/", b"x" * 300, qos=1, packet_id=9)
    # a client PUBLISH has the same layout as ours: feed it back in two pieces
    packets = decoder.feed(frame[:3]) + decoder.feed(frame[3:])
    assert packets == [codec.Publish("devices/d/messages/events/", b"x" * 300, 1, 9)]
    with pytest.raises(codec.MqttProtocolError, match="QoS 2"):
        codec.Decoder().feed(bytes([0x34, 5, 0, 1, 97, 0, 1]))
    with pytest.raises(codec.MqttProtocolError, match="remaining length"):
        codec.Decoder().feed(bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]))
    with pytest.raises(codec.MqttProtocolError, match="exceeds"):
        codec.Decoder(max_packet=10).feed(bytes([0x30, 20]))
    with pytest.raises(codec.MqttProtocolError, match=r"MQTT 3\.1\.1"):
        codec.Decoder().feed(bytes([0x10, 10, 0, 4]) + b"MQTT" + bytes([5, 0, 0, 0]))
