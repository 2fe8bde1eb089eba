"""Microsoft's service SDK, azure-iot-hub, pointed at the local hub unchanged.

``IoTHubRegistryManager`` talks REST (msrest over requests) to ``https://{HostName}``
for the registry, twins and direct methods, and AMQP (uamqp, its own C stack and TLS) to
``amqps://{HostName}:5671/messages/devicebound`` for cloud-to-device messages, with CBS
on the service policy. It has no port option, so each test module gives the hub a
loopback address of its own (127.x.y.z) on ports 443 and 5671 and uses that address as
``HostName`` (binding 443 needs root, which CI is). The SDK is told to trust the hub's
root the way each of its stacks reads trust: ``REQUESTS_CA_BUNDLE`` for requests, and
``certifi.where()`` for uamqp (which reads only certifi's bundle).

azure-iot-hub pulls uamqp, msrest and azure-core, so it runs in a virtualenv of its
own (scripts/test: ``.venv-azure-hub`` from tests/requirements-azure-hub.txt). Without
the SDK these tests skip, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import iothub_tls as it
from iothub_tls.hub.hub import HubOptions, LocalHub

SDK_REASON = (
    "needs Microsoft's azure-iot-hub SDK (tests/requirements-azure-hub.txt, in a virtualenv "
    "of its own: scripts/test makes .venv-azure-hub)"
)
HTTPS_PORT, AMQP_PORT = 443, 5671  # fixed in azure-iot-hub
WAIT = 10.0


def _require_sdk() -> Any:
    try:
        import azure.iot.hub as sdk
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SDK_REASON}: {exc}", pytrace=False)
        pytest.skip(f"{SDK_REASON}: {exc}")
    return sdk


def _hub_address() -> str:
    """A loopback address whose ports 443 and 5671 are free (the SDK's are fixed)."""
    rng = random.SystemRandom()
    for _ in range(100):
        addr = f"127.{rng.randint(100, 254)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}"
        try:
            for port in (HTTPS_PORT, AMQP_PORT):
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((addr, port))
        except PermissionError:
            message = "binding ports 443 and 5671 needs root (the SDK's ports are fixed)"
            if os.environ.get("CI") == "true":
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
        except OSError:
            continue
        return addr
    raise RuntimeError("no loopback address with ports 443 and 5671 free")


@pytest.fixture(scope="module")
def sdk() -> Any:
    return _require_sdk()


@pytest.fixture(scope="module")
def hub(sdk: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    address = _hub_address()
    options = HubOptions(
        tmp_path_factory.mktemp("hub"),
        hostname=address,
        bind=address,
        mqtt_port=0,
        amqp_port=AMQP_PORT,
        https_port=HTTPS_PORT,
    )
    with LocalHub(options) as running:
        assert set(running.doors) == {"mqtt", "amqp", "https"}, running.unavailable
        yield running


@pytest.fixture
def trust_hub(hub: LocalHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's two stacks trust the hub's root (and only it)."""
    import certifi

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(hub.root_pem_path))
    monkeypatch.setattr(certifi, "where", lambda: str(hub.root_pem_path))


@pytest.fixture
def registry(sdk: Any, hub: LocalHub, trust_hub: None) -> Iterator[Any]:
    manager = sdk.IoTHubRegistryManager.from_connection_string(
        hub.service_connection_string.format()
    )
    yield manager
    manager.amqp_svc_client.disconnect_sync()


_ids = iter(range(1_000_000))


def _device_client(hub: LocalHub, transport: str, device_id: str, key: str) -> Any:
    from iothub_tls.amqp import AmqpDeviceClient
    from iothub_tls.https import HttpsDeviceClient, HttpsOptions
    from iothub_tls.mqtt import MqttDeviceClient

    cls = {"mqtt": MqttDeviceClient, "amqp": AmqpDeviceClient, "https": HttpsDeviceClient}
    extra: dict[str, Any] = {}
    if transport == "https":
        extra["options"] = HttpsOptions(c2d_poll_interval=0.05)
    host = hub.options.hostname
    return cls[transport].from_connection_string(
        f"HostName={host};DeviceId={device_id};SharedAccessKey={key}",
        policy=it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path)),
        port=hub.ports[transport],
        **extra,
    )


@pytest.fixture
def sdk_device(
    registry: Any, hub: LocalHub
) -> Callable[[str], tuple[Any, Any]]:
    """``sdk_device(transport)`` -> (the SDK's Device, our client with its key): a device
    created through the SDK, whose keys the hub generated."""

    def make(transport: str) -> tuple[Any, Any]:
        device_id = f"sdk-{transport}-{next(_ids)}"
        made = registry.create_device_with_sas(device_id, None, None, "enabled")
        key = made.authentication.symmetric_key.primary_key
        return made, _device_client(hub, transport, device_id, key)

    return make


def _wait(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_the_sdk_is_the_tested_version(sdk):
    from azure.iot.hub import constant

    assert constant.VERSION == "2.7.0"


def test_create_and_get_a_device_with_sas(registry, hub):
    made = registry.create_device_with_sas("sdk-created", None, None, "enabled")
    assert made.device_id == "sdk-created" and made.status == "enabled"
    assert made.authentication.type == "sas"
    keys = made.authentication.symmetric_key
    assert keys.primary_key and keys.secondary_key and keys.primary_key != keys.secondary_key
    assert hub.registry.get("sdk-created").primary_key == keys.primary_key
    got = registry.get_device("sdk-created")
    assert got.etag == made.etag and got.connection_state == "Disconnected"
    assert got.generation_id == made.generation_id
    assert "sdk-created" in [d.device_id for d in registry.get_devices()]
    registry.delete_device("sdk-created", made.etag)
    assert hub.registry.get("sdk-created") is None


def test_create_with_given_keys_and_by_thumbprint(registry, hub):
    import base64

    key = base64.b64encode(os.urandom(32)).decode()
    made = registry.create_device_with_sas("sdk-keys", key, None, "disabled")
    assert made.authentication.symmetric_key.primary_key == key
    assert made.status == "disabled" and not hub.registry.get("sdk-keys").enabled
    thumb = "AB" * 20
    x509 = registry.create_device_with_x509("sdk-x509", thumb, None, "enabled")
    assert x509.authentication.type == "selfSigned"
    assert x509.authentication.x509_thumbprint.primary_thumbprint == thumb
    assert hub.registry.get("sdk-x509").thumbprints == (thumb,)


@pytest.mark.parametrize("transport", ["mqtt", "amqp", "https"])
def test_send_c2d_message_reaches_the_device(registry, sdk_device, transport):
    made, client = sdk_device(transport)
    with client:
        registry.send_c2d_message(
            made.device_id,
            "from the sdk",
            {"prop": "v", "messageId": "sdk-1", "correlationId": "c"},
        )
        message = client.receive_c2d(WAIT)
        message.complete()
    assert message.payload == b"from the sdk"
    assert message.properties["prop"] == "v"
    assert (message.message_id, message.correlation_id) == ("sdk-1", "c")


@pytest.mark.parametrize("transport", ["mqtt", "amqp"])
def test_update_twin_reaches_the_device(sdk, registry, sdk_device, transport):
    from azure.iot.hub.models import Twin, TwinProperties

    made, client = sdk_device(transport)
    updates: list[dict[str, Any]] = []
    with client:
        client.on_desired_update = updates.append
        client.patch_reported({"firmware": "2.0"})
        time.sleep(0.3)  # the desired-properties subscription settles
        twin = registry.get_twin(made.device_id)
        assert twin.properties.reported["firmware"] == "2.0"
        patch = Twin(tags={"site": "lab"}, properties=TwinProperties(desired={"interval": 9}))
        updated = registry.update_twin(made.device_id, patch, twin.etag)
        _wait(lambda: bool(updates), "the desired patch at the device")
    assert updated.properties.desired["interval"] == 9 and updated.tags == {"site": "lab"}
    assert updated.etag != twin.etag and updated.version == twin.version + 1  # one update
    assert updates[0]["interval"] == 9
    assert updates[0]["$version"] == updated.properties.desired["$version"]


@pytest.mark.parametrize("transport", ["mqtt", "amqp"])
def test_invoke_device_method_reaches_the_device(sdk, registry, sdk_device, transport):
    from azure.iot.hub.models import CloudToDeviceMethod

    made, client = sdk_device(transport)
    with client:
        client.on_method("echo", lambda request: (200, {"echo": request.payload}))
        call = CloudToDeviceMethod(
            method_name="echo",
            payload={"a": [1, 2]},
            response_timeout_in_seconds=10,
            connect_timeout_in_seconds=5,
        )
        result = registry.invoke_device_method(made.device_id, call)
    assert (result.status, result.payload) == (200, {"echo": {"a": [1, 2]}})


def test_refusals_reach_the_sdk_as_its_errors(sdk, registry, hub, trust_hub):
    from azure.iot.hub.models import CloudToDeviceMethod
    from msrest.exceptions import HttpOperationError

    with pytest.raises(HttpOperationError) as err:
        registry.get_device("no-such-device")
    assert err.value.response.status_code == 404
    assert err.value.response.headers["iothub-errorcode"] == "DeviceNotFound"
    made = registry.create_device_with_sas("sdk-offline", None, None, "enabled")
    with pytest.raises(HttpOperationError) as err:
        registry.invoke_device_method(made.device_id, CloudToDeviceMethod(method_name="echo"))
    assert err.value.response.status_code == 404
    assert err.value.response.headers["iothub-errorcode"] == "DeviceNotOnline"
    wrong = hub.service_connection_string.format().replace(
        hub.service_connection_string.shared_access_key, "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk="
    )
    other = sdk.IoTHubRegistryManager.from_connection_string(wrong)
    try:
        with pytest.raises(HttpOperationError) as err:
            other.get_devices()
        assert err.value.response.status_code == 401
        from uamqp.errors import AuthenticationException

        # the hub answers the put-token 401; uamqp reports it as this
        with pytest.raises(AuthenticationException, match="Token authentication failed"):
            other.send_c2d_message(made.device_id, "refused")
    finally:
        other.amqp_svc_client.disconnect_sync()
    assert hub.state.pending_c2d(made.device_id) == 0


def test_c2d_to_an_unknown_device_fails_in_the_sdk(registry, hub):
    with pytest.raises(Exception, match="C2D message send failure") as err:
        registry.send_c2d_message("no-such-device", "lost")
    assert type(err.value) is Exception  # what azure-iot-hub raises for a rejected message
    assert Path(hub.state_dir).exists()
