"""``iothub-tls hub`` against a real ``iothub-tls serve`` subprocess (state directory,
free ports), with real devices receiving what each command sent, the commands' exit
codes, ``serve``'s log file rotation and probe marking, and the quickstart of
docs/cli.md executed command by command as written there."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import iothub_tls as it

pytest.importorskip("paho.mqtt.client")
pytest.importorskip("proton")
pytest.importorskip("urllib3")

from iothub_tls.amqp import AmqpDeviceClient
from iothub_tls.mqtt import MqttDeviceClient
from iothub_tls.testing.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "iothub_tls"]
WAIT = 10.0


def _summary(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """``serve --json``'s start-up document (the first thing on stderr)."""
    text = ""
    while True:
        line = proc.stderr.readline() if proc.stderr else ""
        if not line:
            proc.kill()
            raise AssertionError(f"serve did not start: {text}")
        text += line
        if line.rstrip() == "}":
            return dict(json.loads(text[text.index("{") :]))


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    state = tmp_path_factory.mktemp("state")
    proc = subprocess.Popen(
        [*CLI, "serve", "--state", str(state), "--json",
         "--mqtt-port", "0", "--amqp-port", "0", "--https-port", "0",
         "--device", "cli-mqtt", "--device", "cli-amqp", "--device", "cli-idle"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        summary = _summary(proc)
        summary["state"] = state
        yield summary
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def hub_cli(state: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "hub", "--state", str(state), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def device(serve: dict[str, Any], cls: Any, device_id: str) -> Any:
    cs = next(d for d in serve["devices"] if d["deviceId"] == device_id)["connectionString"]
    protocol = "mqtt" if cls is MqttDeviceClient else "amqp"
    return cls.from_connection_string(
        cs,
        policy=it.TlsPolicy(roots=it.RootSet.from_pem_file(serve["root"])),
        host="127.0.0.1",
        port=serve["ports"][protocol],
    )


def test_serve_json_names_the_service_connection_string(serve):
    text = serve["service"]["connectionString"]
    assert re.fullmatch(
        r"HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey=[A-Za-z0-9+/=]{44}",
        text,
    )
    written = json.loads((serve["state"] / "hub.json").read_text())
    assert written["service"]["connectionString"] == text
    assert written["ports"] == serve["ports"]


def test_devices(serve):
    done = hub_cli(serve["state"], "devices", "--json")
    assert done.returncode == 0, done.stderr
    devices = {d["deviceId"]: d for d in json.loads(done.stdout)["devices"]}
    assert {"cli-mqtt", "cli-amqp", "cli-idle"} <= set(devices)
    assert devices["cli-idle"]["authentication"]["type"] == "sas"
    assert devices["cli-idle"]["connectionState"] == "Disconnected"
    text = hub_cli(serve["state"], "devices")
    assert text.returncode == 0
    assert re.search(r"^cli-idle\s+sas\s+enabled\s+Disconnected\s+0$", text.stdout, re.M)


def test_c2d_twin_and_method_reach_an_mqtt_device(serve):
    updates: list[dict[str, Any]] = []
    with device(serve, MqttDeviceClient, "cli-mqtt") as client:
        client.on_desired_update = updates.append
        client.on_method("echo", lambda request: (200, {"echo": request.payload}))
        done = hub_cli(serve["state"], "c2d", "cli-mqtt", "hello", "--property", "a=1", "--json")
        assert done.returncode == 0, done.stderr
        sent = json.loads(done.stdout)
        message = client.receive_c2d(WAIT)
        assert (message.payload, message.properties["a"]) == (b"hello", "1")
        assert message.message_id == sent["messageId"]
        done = hub_cli(serve["state"], "twin", "cli-mqtt", "--desired", '{"interval": 5}')
        assert done.returncode == 0, done.stderr
        twin = json.loads(done.stdout)
        assert twin["properties"]["desired"]["interval"] == 5
        assert twin["connectionState"] == "Connected"
        deadline = time.monotonic() + WAIT
        while not updates and time.monotonic() < deadline:
            time.sleep(0.01)
        done = hub_cli(
            serve["state"], "method", "cli-mqtt", "echo", "--payload", '{"x": 1}', "--timeout", "10"
        )
    assert updates and updates[0]["interval"] == 5
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"status": 200, "payload": {"echo": {"x": 1}}}


def test_c2d_twin_and_method_reach_an_amqp_device(serve):
    updates: list[dict[str, Any]] = []
    with device(serve, AmqpDeviceClient, "cli-amqp") as client:
        client.on_desired_update = updates.append
        client.on_method("fail", lambda request: (503, {"busy": True}))
        assert hub_cli(serve["state"], "c2d", "cli-amqp", "über").returncode == 0
        message = client.receive_c2d(WAIT)
        message.complete()
        assert message.payload == "über".encode()
        time.sleep(0.3)  # the twin links settle
        patched = hub_cli(serve["state"], "twin", "cli-amqp", "--desired", '{"m": "x"}')
        assert patched.returncode == 0, patched.stderr
        deadline = time.monotonic() + WAIT
        while not updates and time.monotonic() < deadline:
            time.sleep(0.01)
        failed = hub_cli(
            serve["state"], "method", "cli-amqp", "fail", "--timeout", "10",
            "--connect-timeout", "5",
        )  # fmt: skip
    assert updates and updates[0]["m"] == "x"
    # The device answered 503: printed, and exit 1.
    assert failed.returncode == 1
    assert json.loads(failed.stdout) == {"status": 503, "payload": {"busy": True}}
    assert "answered status 503" in failed.stderr


def test_refusals_exit_1(serve):
    offline = hub_cli(serve["state"], "method", "cli-idle", "echo", "--json")
    assert offline.returncode == 1
    assert json.loads(offline.stdout)["errorCode"] == "DeviceNotOnline"
    assert "HTTP 404" in offline.stderr
    unknown = hub_cli(serve["state"], "twin", "no-such-device", "--json")
    assert unknown.returncode == 1
    answer = json.loads(unknown.stdout)
    assert (answer["status"], answer["errorCode"]) == (404, "DeviceNotFound")
    assert hub_cli(serve["state"], "c2d", "no-such-device", "x").returncode == 1


def test_usage_errors_and_no_hub_exit_2(serve, tmp_path):
    nothing = hub_cli(tmp_path, "devices", "--json")
    assert nothing.returncode == 2
    assert "no local hub is running" in json.loads(nothing.stdout)["error"]
    assert "[Errno" not in nothing.stderr
    for args in (
        ("method", "cli-idle", "echo", "--payload", "{not json"),
        ("method", "cli-idle", "echo", "--timeout", "3"),
        ("twin", "cli-idle", "--desired", "[1]"),
        ("c2d", "cli-idle", "x", "--property", "novalue"),
        ("frobnicate",),
    ):
        done = hub_cli(serve["state"], *args)
        assert done.returncode == 2, (args, done.stderr)
        assert "error" in done.stderr


def test_every_action_has_help():
    for action in ("devices", "c2d", "twin", "method", "connection-string"):
        done = subprocess.run([*CLI, "hub", action, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "--json" in done.stdout


# -- serve's log ----------------------------------------------------------------------------------


def test_serve_log_file_rotates_and_marks_probes(tmp_path):
    log = tmp_path / "connections.log"
    proc = subprocess.Popen(
        [*CLI, "serve", "--state", str(tmp_path / "state"), "--json",
         "--mqtt-port", "0", "--amqp-port", "off", "--https-port", "off",
         "--log", str(log), "--log-max-bytes", "2000", "--log-backups", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        summary = _summary(proc)
        port = summary["ports"]["mqtt"]
        probed = subprocess.run(
            [*CLI, "probe", f"127.0.0.1:{port}", "--sni", "localhost",
             "--roots", summary["root"], "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert probed.returncode == 0, probed.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0
    stats = json.loads(out)["stats"]  # stdout has the statistics only: the log went to FILE
    files = [log, log.with_name("connections.log.1"), log.with_name("connections.log.2")]
    assert all(f.exists() for f in files)
    assert all(f.stat().st_size <= 2000 for f in files)
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert records and all(r["probe"] is True for r in records)
    assert stats["probeHandshakes"] >= 20 and stats["failedConnections"] == {}


# -- the quickstart of docs/cli.md, as written ----------------------------------------------------


def _quickstart_blocks() -> list[list[str]]:
    """The console blocks of the quickstart: each a list of commands (``$ `` lines)."""
    text = (ROOT / "docs" / "cli.md").read_text()
    start = text.index("### Quickstart: a device and its service side")
    end = text.find("\n---", start)
    section = text[start : end if end != -1 else len(text)]
    blocks = re.findall(r"```console\n(.*?)```", section, re.S)
    return [[line[2:] for line in block.splitlines() if line.startswith("$ ")] for block in blocks]


def _documented_output(section_block: int) -> list[str]:
    text = (ROOT / "docs" / "cli.md").read_text()
    start = text.index("### Quickstart: a device and its service side")
    block = re.findall(r"```console\n(.*?)```", text[start:], re.S)[section_block]
    return [
        line for line in block.splitlines() if not line.startswith("$ ") and line != "..."
    ]


def test_the_quickstart_runs_as_documented(tmp_path):
    blocks = _quickstart_blocks()
    assert [len(b) for b in blocks] == [1, 1, 4], blocks
    # The documented ports may be taken on this machine: the same commands on free ports.
    ports = {old: str(free_port()) for old in ("8883", "5671", "8443")}

    def local(command: str) -> str:
        for old, new in ports.items():
            command = re.sub(rf"\b{old}\b", new, command)
        return command

    (tmp_path / "samples").symlink_to(ROOT / "samples")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("IOTHUB_DEVICE_CONNECTION_STRING", None)

    def start(command: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["bash", "-c", "exec " + local(command)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    hub = start(blocks[0][0])
    sample: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / ".iothub-tls-hub" / "hub.json").exists():
            assert hub.poll() is None, hub.communicate()
            assert time.monotonic() < deadline, "the hub did not start"
            time.sleep(0.05)
        sample = start(blocks[1][0])
        # Wait until the device is connected before the service side acts.
        deadline = time.monotonic() + 30
        while True:
            listed = subprocess.run(
                ["bash", "-c", local("iothub-tls hub --state .iothub-tls-hub devices --json")],
                cwd=tmp_path, env=env, capture_output=True, text=True,
            )  # fmt: skip
            found = json.loads(listed.stdout)["devices"]
            states = {d["deviceId"]: d["connectionState"] for d in found}
            if states.get("thermostat-1") == "Connected":
                break
            assert sample.poll() is None, sample.communicate()
            assert time.monotonic() < deadline, states
            time.sleep(0.1)
        time.sleep(0.3)  # the sample's subscriptions settle
        results = []
        for command in blocks[2]:
            done = subprocess.run(
                ["bash", "-c", local(command)],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            results.append(done.stdout)
        assert re.search(r"^thermostat-1\s+sas\s+enabled\s+Connected", results[0], re.M)
        assert json.loads(results[3]) == {"status": 200, "payload": {"echo": {"ping": 1}}}
        time.sleep(0.5)
    finally:
        outputs = []
        for proc in (sample, hub):
            if proc is None:
                continue
            proc.send_signal(signal.SIGINT)
            try:
                outputs.append(proc.communicate(timeout=15))
            except subprocess.TimeoutExpired:
                proc.kill()
                outputs.append(proc.communicate())
    device_out = outputs[0][0]
    for line in _documented_output(1):
        assert line in device_out.splitlines(), (line, device_out)
    assert shlex.split(blocks[0][0])[:2] == ["iothub-tls", "serve"]
