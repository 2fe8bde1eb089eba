"""Every script in samples/ runs as its docstring shows, against the local hub.

Each sample runs as a subprocess of this interpreter, given the connection string of a
device registered with a fresh local hub (by ``--connection-string`` or the
``IOTHUB_DEVICE_CONNECTION_STRING`` variable the sample documents), the hub's root with
``--root`` and the hub's door with ``--host``/``--port`` — the options each sample's
docstring gives for the local hub. A sample passes when it exits 0 AND the hub saw what
the sample says it does: the telemetry with its properties, the cloud-to-device messages
settled as the sample settles them, the direct method answered.

azure_sdk_harden.py needs Microsoft's azure-iot-device SDK, which pins paho-mqtt < 2: it
runs in the SDK's own environment (scripts/test runs this file in .venv-azure too) and
skips elsewhere, naming the extra, as tests/test_azure.py does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iothub_tls.hub.hub import DeviceCredentials, HubOptions, LocalHub

pytest.importorskip("proton")
pytest.importorskip("urllib3")

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
DEVICE = "thermostat-1"
X509_DEVICE = "thermostat-2"
TIMEOUT = 90


@dataclass
class Hub:
    """A running local hub and its two devices' credentials."""

    hub: LocalHub
    sas: DeviceCredentials
    x509: DeviceCredentials

    @property
    def state(self) -> Any:
        return self.hub.state


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    options = HubOptions(state_dir=tmp_path / "hub", mqtt_port=0, amqp_port=0, https_port=0)
    with LocalHub(options) as running:
        yield Hub(running, running.add_device(DEVICE), running.add_device(X509_DEVICE, x509=True))


def _run(
    sample: str, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IOTHUB_DEVICE_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, str(SAMPLES / sample), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=environment,
        cwd=cwd,
    )


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _telemetry(hub: Hub | LocalHub, device_id: str = DEVICE) -> list[Any]:
    return [m for m in hub.state.telemetry if m.device_id == device_id]


def _door(hub: Hub, transport: str) -> list[str]:
    """The options each sample's docstring gives for the local hub."""
    return [
        "--root",
        str(hub.hub.root_pem_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(hub.hub.ports[transport]),
    ]


def test_every_sample_is_tested() -> None:
    tested = {
        "mqtt_telemetry.py",
        "amqp_telemetry.py",
        "https_telemetry.py",
        "azure_sdk_harden.py",
    }
    assert {p.name for p in SAMPLES.glob("*.py")} == tested


# -- MQTT ----------------------------------------------------------------------------------


def test_mqtt_sample_sends_telemetry(hub: Hub) -> None:
    out = _ok(
        _run(
            "mqtt_telemetry.py",
            *_door(hub, "mqtt"),
            "--connection-string",
            hub.sas.connection_string,
            "--count",
            "3",
            "--interval",
            "0",
        )
    )
    assert "connected to" in out and "TLSv1." in out
    for n in (1, 2, 3):
        assert f"message {n} acknowledged by the hub" in out
    sent = _telemetry(hub)
    assert [json.loads(m.payload)["n"] for m in sent] == [1, 2, 3]
    assert all(m.properties.get("sample") == "mqtt_telemetry" for m in sent)
    assert all(m.protocol.lower().startswith("mqtt") for m in sent)


def test_mqtt_sample_takes_the_connection_string_from_the_environment(hub: Hub) -> None:
    env = {"IOTHUB_DEVICE_CONNECTION_STRING": hub.sas.connection_string}
    out = _ok(
        _run("mqtt_telemetry.py", *_door(hub, "mqtt"), "--count", "1", "--interval", "0", env=env)
    )
    assert "message 1 acknowledged by the hub" in out
    assert len(_telemetry(hub)) == 1


def test_mqtt_sample_without_a_connection_string_is_a_usage_error(hub: Hub) -> None:
    done = _run("mqtt_telemetry.py", *_door(hub, "mqtt"))
    assert done.returncode == 2
    assert "IOTHUB_DEVICE_CONNECTION_STRING" in done.stderr
    assert _telemetry(hub) == []


def test_mqtt_sample_as_an_x509_device(hub: Hub) -> None:
    device = hub.x509
    out = _ok(
        _run(
            "mqtt_telemetry.py",
            *_door(hub, "mqtt"),
            "--connection-string",
            hub.x509.connection_string,
            "--cert",
            str(device.certfile),
            "--key",
            str(device.keyfile),
            "--count",
            "1",
        )
    )
    assert "message 1 acknowledged by the hub" in out
    assert len(_telemetry(hub, X509_DEVICE)) == 1


def test_mqtt_sample_answers_methods_twin_and_c2d_while_it_waits(hub: Hub) -> None:
    """docs/cli.md's quickstart: the sample with --wait, driven from the service side."""
    process = subprocess.Popen(
        [
            sys.executable,
            str(SAMPLES / "mqtt_telemetry.py"),
            *_door(hub, "mqtt"),
            "--connection-string",
            hub.sas.connection_string,
            "--count",
            "1",
            "--wait",
            "6",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        # waits for the device to connect and answer
        status, body = hub.state.invoke_method(
            DEVICE, "echo", b'{"ping": 1}', timeout=30.0, connect_timeout=30.0
        )
        assert (status, json.loads(body)) == (200, {"echo": {"ping": 1}})
        hub.state.enqueue_c2d(DEVICE, b"hello", {"priority": "high"})
        hub.state.patch_desired(DEVICE, {"interval": 5})
        out, err = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "method echo called with {'ping': 1}" in out
    assert "cloud-to-device message: b'hello' properties={'priority': 'high'}" in out
    assert '"interval": 5' in out


def test_mqtt_sample_refuses_a_hub_outside_its_roots(hub: Hub) -> None:
    """The twin of the runs above: without --root the sample pins Azure's roots, and the
    local hub's certificate is refused with the reason (exit 1, nothing sent)."""
    done = _run(
        "mqtt_telemetry.py",
        "--host",
        "127.0.0.1",
        "--port",
        str(hub.hub.ports["mqtt"]),
        "--connection-string",
        hub.sas.connection_string,
        "--count",
        "1",
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "CertificateVerificationError" in done.stderr
    assert "Pinned roots: DigiCert Global Root G2" in done.stderr
    assert _telemetry(hub) == []


# -- AMQP ----------------------------------------------------------------------------------


def test_amqp_sample_sends_and_settles_as_it_says(hub: Hub) -> None:
    """Telemetry accepted; a C2D message with action=reject is dead-lettered, one with
    action=retry is abandoned once and then completed, any other is completed."""
    hub.state.enqueue_c2d(DEVICE, b"drop me", {"action": "reject"})
    hub.state.enqueue_c2d(DEVICE, b"twice", {"action": "retry"})
    hub.state.enqueue_c2d(DEVICE, b"plain", {})
    out = _ok(
        _run(
            "amqp_telemetry.py",
            *_door(hub, "amqp"),
            "--connection-string",
            hub.sas.connection_string,
            "--count",
            "2",
            "--wait",
            "3",
        )
    )
    assert "sent 2 messages, each accepted by the hub" in out
    sent = _telemetry(hub)
    assert sorted(m.properties["seq"] for m in sent) == ["0", "1"]
    assert all(m.properties["sample"] == "amqp" for m in sent)
    assert [m.payload for m in hub.state.dead_letters] == [b"drop me"]
    completed = {m.payload: m for m in hub.state.completed}
    assert set(completed) == {b"twice", b"plain"}
    assert completed[b"twice"].delivery_count == 2  # abandoned once, then completed
    assert out.count("received b'twice'") == 2


def test_amqp_sample_takes_the_connection_string_from_the_environment(hub: Hub) -> None:
    env = {"IOTHUB_DEVICE_CONNECTION_STRING": hub.sas.connection_string}
    _ok(_run("amqp_telemetry.py", *_door(hub, "amqp"), "--count", "1", "--wait", "0", env=env))
    assert len(_telemetry(hub)) == 1


# -- HTTPS ---------------------------------------------------------------------------------


def test_https_sample_sends_telemetry_and_a_batch_and_completes_c2d(hub: Hub) -> None:
    hub.state.enqueue_c2d(DEVICE, b"reboot", {"reason": "update"})
    out = _ok(
        _run(
            "https_telemetry.py",
            *_door(hub, "https"),
            "--connection-string",
            hub.sas.connection_string,
            "--wait",
            "5",
        )
    )
    assert "sent 3 messages and a batch of 3" in out
    assert "received b'reboot' properties={'reason': 'update'}" in out
    sent = _telemetry(hub)
    assert sorted(m.properties["seq"] for m in sent) == [str(n) for n in range(6)]
    assert [m.payload for m in hub.state.completed] == [b"reboot"]


def test_https_sample_as_an_x509_device(hub: Hub) -> None:
    device = hub.x509
    _ok(
        _run(
            "https_telemetry.py",
            *_door(hub, "https"),
            "--connection-string",
            hub.x509.connection_string,
            "--cert",
            str(device.certfile),
            "--key",
            str(device.keyfile),
            "--wait",
            "0",
        )
    )
    assert len(_telemetry(hub, X509_DEVICE)) == 6


# -- azure-iot-device ------------------------------------------------------------------------

SDK_PORT = 8883  # the SDK has no port option


def _free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("route", ["harden", "kwargs"])
def test_azure_sdk_sample_sends_through_the_policy(tmp_path: Path, route: str) -> None:
    """The SDK connects to port 8883 of the connection string's GatewayHostName (IoT Edge's
    way to reach a hub through another host): the local hub listens there."""
    pytest.importorskip(
        "azure.iot.device", reason="needs azure-iot-device: pip install 'iothub-tls[azure]'"
    )
    if not _free(SDK_PORT):
        message = f"127.0.0.1:{SDK_PORT} is taken (the SDK's port is fixed)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    options = HubOptions(
        state_dir=tmp_path / "hub", mqtt_port=SDK_PORT, amqp_port=None, https_port=None
    )
    with LocalHub(options) as hub:
        cs = f"{hub.add_device(DEVICE).connection_string};GatewayHostName=127.0.0.1"
        out = _ok(
            _run(
                "azure_sdk_harden.py",
                "--roots",
                str(hub.root_pem_path),
                "--route",
                route,
                "--count",
                "2",
                env={"IOTHUB_DEVICE_CONNECTION_STRING": cs},
            )
        )
        assert "sent message 1" in out
        sent = _telemetry(hub)
        assert [json.loads(m.payload) for m in sent] == [
            {"n": 0, "route": route},
            {"n": 1, "route": route},
        ]
