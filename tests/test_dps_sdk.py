"""Microsoft's azure-iot-device ``ProvisioningDeviceClient`` against the local hub's DPS
door, unchanged: it registers (symmetric key, enrollment-group key, X.509 individual
and group enrollments), and its ``IoTHubDeviceClient`` then connects to the hub it was
assigned to and sends a message the hub receives.

The SDK always dials port 8883 of ``provisioning_host`` (and of the assigned hub) and
has no port option, so the test gives the DPS door and the hub's MQTT door loopback
addresses of their own (127.x.y.z:8883 each; binding 8883 needs root, which CI is); the
addresses are the host names, and the hub's certificates name them. The SDK trusts the
hub's root through its ``server_verification_cert`` option (and nothing else: its MQTT
transport loads only that certificate).

The SDK pins paho-mqtt < 2, so these tests run in the virtualenv of tests/test_azure.py
(scripts/test: ``.venv-azure``). Without the SDK they skip, except under CI=true.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iothub_tls.dps import derive_device_key
from iothub_tls.hub.hub import HubOptions, LocalHub
from iothub_tls.testing.pki import CertificateAuthority, KeyType

SDK_REASON = (
    "needs Microsoft's azure-iot-device SDK (tests/requirements-azure.txt, in a virtualenv "
    "of its own: scripts/test makes .venv-azure)"
)
PORT = 8883  # fixed in azure-iot-device 2.x, for DPS and for the hub


def _require_sdk() -> Any:
    try:
        import azure.iot.device as sdk
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SDK_REASON}: {exc}", pytrace=False)
        pytest.skip(f"{SDK_REASON}: {exc}")
    return sdk


def _free_address(taken: set[str]) -> str:
    """A loopback address whose port 8883 is free (the SDK's port is fixed)."""
    rng = random.SystemRandom()
    for _ in range(100):
        addr = f"127.{rng.randint(100, 254)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}"
        if addr in taken:
            continue
        try:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((addr, PORT))
        except PermissionError:
            message = "binding port 8883 needs root (the SDK's port is fixed)"
            if os.environ.get("CI") == "true":
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
        except OSError:
            continue
        return addr
    raise RuntimeError("no loopback address with port 8883 free")


@pytest.fixture(scope="module")
def sdk() -> Any:
    return _require_sdk()


@pytest.fixture(scope="module")
def hub(sdk: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    hub_address = _free_address(set())
    dps_address = _free_address({hub_address})
    options = HubOptions(
        tmp_path_factory.mktemp("hub"),
        hostname=hub_address,
        bind=hub_address,
        mqtt_port=PORT,
        amqp_port=None,
        https_port=None,
        dps_port=PORT,
        dps_hostname=dps_address,
        dps_bind=dps_address,
    )
    running = LocalHub(options)
    running.dps.retry_after = 1  # the SDK waits whole seconds between polls
    with running:
        assert set(running.doors) == {"mqtt", "dps"}
        yield running


@pytest.fixture
def root_pem(hub: LocalHub) -> str:
    return hub.root_pem_path.read_text()


def _dps_host(hub: LocalHub) -> str:
    assert hub.options.dps_hostname is not None
    return hub.options.dps_hostname


def _sends_to_the_assigned_hub(sdk: Any, hub: LocalHub, device: Any, device_id: str) -> None:
    """The SDK device client connects to the assigned hub and a message arrives."""
    device.connect()
    try:
        text = f"hello from {device_id} {time.monotonic_ns()}"
        device.send_message(text)
        got = hub.state.wait_for_telemetry(
            lambda t: t.device_id == device_id and t.payload == text.encode(), timeout=10
        )
        assert got is not None, f"the hub received no message from {device_id}"
        assert got.protocol == "Mqtt"
    finally:
        device.shutdown()


def test_sdk_registers_with_an_individual_symmetric_key_and_connects(sdk, hub, root_pem):
    enrollment = hub.dps.add_individual_enrollment("sdk-sym-1", device_id="sdk-device-1")
    client = sdk.ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=_dps_host(hub),
        registration_id="sdk-sym-1",
        id_scope=hub.dps.id_scope,
        symmetric_key=enrollment.primary_key,
        server_verification_cert=root_pem,
    )
    client.provisioning_payload = {"model": "thermostat"}
    result = client.register()
    state = result.registration_state
    assert result.status == "assigned"
    assert (state.assigned_hub, state.device_id) == (hub.options.hostname, "sdk-device-1")
    assert state.sub_status == "initialAssignment"
    assert hub.registry.get("sdk-device-1").primary_key == enrollment.primary_key
    device = sdk.IoTHubDeviceClient.create_from_symmetric_key(
        enrollment.primary_key,
        state.assigned_hub,
        state.device_id,
        server_verification_cert=root_pem,
        connection_retry=False,
    )
    _sends_to_the_assigned_hub(sdk, hub, device, "sdk-device-1")
    # The door logged the SDK's registration with its TLS like every other door.
    logged = [e for e in hub.log.events if e.protocol == "Dps" and e.device_id == "sdk-sym-1"]
    assert logged and logged[0].result == "Success" and logged[0].tls_version


def test_sdk_registers_with_a_key_derived_from_an_enrollment_group(sdk, hub, root_pem):
    group = hub.dps.add_enrollment_group("sdk-group", payload={"site": "lab"})
    key = derive_device_key(group.primary_key, "sdk-grp-device")
    client = sdk.ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=_dps_host(hub),
        registration_id="sdk-grp-device",
        id_scope=hub.dps.id_scope,
        symmetric_key=key,
        server_verification_cert=root_pem,
    )
    result = client.register()
    assert result.status == "assigned"
    # the SDK hands the returned payload over as the JSON text it received
    assert json.loads(result.registration_state.response_payload) == {"site": "lab"}
    device = sdk.IoTHubDeviceClient.create_from_symmetric_key(
        key, result.registration_state.assigned_hub, "sdk-grp-device",
        server_verification_cert=root_pem, connection_retry=False,
    )  # fmt: skip
    _sends_to_the_assigned_hub(sdk, hub, device, "sdk-grp-device")


def test_sdk_with_a_wrong_key_is_refused(sdk, hub, root_pem):
    group = hub.dps.add_enrollment_group("sdk-group-2")
    wrong = derive_device_key(group.primary_key, "someone-else")
    client = sdk.ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=_dps_host(hub),
        registration_id="sdk-wrong-key",
        id_scope=hub.dps.id_scope,
        symmetric_key=wrong,
        server_verification_cert=root_pem,
    )
    with pytest.raises(sdk.exceptions.ClientError) as err:
        client.register()
    assert hub.registry.get("sdk-wrong-key") is None
    refused = [e for e in hub.log.events if e.protocol == "Dps" and e.device_id == "sdk-wrong-key"]
    assert refused and refused[-1].result == "Failure"
    assert "no enrollment admits" in (refused[-1].reason or ""), err.value


def test_sdk_registration_of_a_disabled_enrollment_is_not_assigned(sdk, hub, root_pem):
    enrollment = hub.dps.add_individual_enrollment("sdk-disabled", enabled=False)
    client = sdk.ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=_dps_host(hub),
        registration_id="sdk-disabled",
        id_scope=hub.dps.id_scope,
        symmetric_key=enrollment.primary_key,
        server_verification_cert=root_pem,
    )
    # the SDK files a status other than assigned/failed as a service error (inside a
    # ClientError "Unexpected failure")
    with pytest.raises(sdk.exceptions.ClientError) as err:
        client.register()
    service_errors = [e for e in _causes(err.value) if isinstance(e, sdk.exceptions.ServiceError)]
    assert service_errors and "registration status disabled" in str(service_errors[0])
    assert hub.dps.registration("sdk-disabled").status == "disabled"
    assert hub.registry.get("sdk-disabled") is None


def test_sdk_does_not_trust_a_door_outside_its_root(sdk, hub):
    other = CertificateAuthority.root("Some Other Root")
    enrollment = hub.dps.add_individual_enrollment("sdk-other-root")
    client = sdk.ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=_dps_host(hub),
        registration_id="sdk-other-root",
        id_scope=hub.dps.id_scope,
        symmetric_key=enrollment.primary_key,
        server_verification_cert=other.cert_pem.decode(),
    )
    with pytest.raises(sdk.exceptions.ClientError) as err:
        client.register()
    assert "CERTIFICATE_VERIFY_FAILED" in repr(_causes(err.value))
    assert hub.dps.registration("sdk-other-root") is None


def _causes(exc: BaseException) -> list[BaseException]:
    seen = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _device_certificate(hub: LocalHub, tmp_path: Path, registration_id: str) -> tuple[str, str]:
    issued = hub.pki.issuer().device(registration_id, key_type=KeyType.EC)
    files = issued.write(tmp_path, registration_id)
    return str(files.certificate), str(files.private_key)


@pytest.mark.parametrize("kind", ["individual", "group"])
def test_sdk_registers_with_x509_and_connects(sdk, hub, root_pem, tmp_path, kind):
    rid = f"sdk-x509-{kind}"
    cert, key = _device_certificate(hub, tmp_path, rid)
    if kind == "individual":
        hub.dps.add_individual_enrollment(rid, certificate_pem=Path(cert).read_bytes())
    else:
        hub.dps.add_enrollment_group("sdk-x509-ca", ca_pem=hub.pki.intermediate_cert.read_bytes())
    x509 = sdk.X509(cert, key)
    try:
        _register_x509_and_connect(sdk, hub, root_pem, rid, x509, kind)
    finally:
        if kind == "group":  # the group would admit the next tests' certificates
            hub.dps.remove("sdk-x509-ca", group=True)


def _register_x509_and_connect(
    sdk: Any, hub: LocalHub, root_pem: str, rid: str, x509: Any, kind: str
) -> None:
    client = sdk.ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=_dps_host(hub),
        registration_id=rid,
        id_scope=hub.dps.id_scope,
        x509=x509,
        server_verification_cert=root_pem,
    )
    result = client.register()
    state = result.registration_state
    assert result.status == "assigned" and state.device_id == rid
    device_entry = hub.registry.get(rid)
    assert device_entry.auth_type == (
        "selfSigned" if kind == "individual" else "certificateAuthority"
    )
    device = sdk.IoTHubDeviceClient.create_from_x509_certificate(
        x509, state.assigned_hub, rid, server_verification_cert=root_pem, connection_retry=False
    )
    _sends_to_the_assigned_hub(sdk, hub, device, rid)


def test_sdk_with_an_unenrolled_certificate_is_refused(sdk, hub, root_pem, tmp_path):
    cert, key = _device_certificate(hub, tmp_path, "sdk-x509-unenrolled")
    client = sdk.ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=_dps_host(hub),
        registration_id="sdk-x509-unenrolled",
        id_scope=hub.dps.id_scope,
        x509=sdk.X509(cert, key),
        server_verification_cert=root_pem,
    )
    with pytest.raises(sdk.exceptions.ClientError):
        client.register()
    refused = [
        e for e in hub.log.events if e.protocol == "Dps" and e.device_id == "sdk-x509-unenrolled"
    ]
    assert refused and "no X.509 enrollment admits" in (refused[-1].reason or "")
    assert hub.registry.get("sdk-x509-unenrolled") is None
