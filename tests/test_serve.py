"""``iothub-tls serve``: the local hub's front doors under its TLS profiles, checked by an
independent scanner, its connection log and statistics, and its start-up errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

import iothub_tls as it
from iothub_tls.cli import main
from iothub_tls.hub.hub import HubOptions, LocalHub, StateDirectoryError
from iothub_tls.policy import ECC_SUITES, STRONG_SUITES, WEAK_SUITES
from tests.brokers import require_binary
from tests.scanners import sslscan

STRONG = {s.iana for s in STRONG_SUITES}
RSA_STRONG = STRONG - {s.iana for s in ECC_SUITES}


@pytest.fixture(scope="module")
def default_hub(tmp_path_factory):
    hub = LocalHub(
        HubOptions(tmp_path_factory.mktemp("hub"), mqtt_port=0, amqp_port=0, https_port=0)
    )
    with hub:
        yield hub


@pytest.fixture(scope="module")
def legacy_hub(tmp_path_factory):
    options = HubOptions(
        tmp_path_factory.mktemp("legacy"),
        mqtt_port=0,
        amqp_port=0,
        https_port=0,
        min_version=ssl.TLSVersion.TLSv1,
        legacy_ciphers=True,
        certificate="rsa",
    )
    with LocalHub(options) as hub:
        yield hub


@pytest.mark.parametrize("door", ["mqtt", "amqp", "https"])
def test_default_profile_as_sslscan_sees_it(default_hub, door):
    protocols, suites = sslscan(default_hub.ports[door], "localhost")
    assert protocols == {"TLSv1.2", "TLSv1.3"}
    assert suites == STRONG  # dual certificate: ECDSA and RSA suites


@pytest.mark.parametrize("door", ["mqtt", "amqp", "https"])
def test_legacy_profile_as_sslscan_sees_it(legacy_hub, door):
    protocols, suites = sslscan(legacy_hub.ports[door], "localhost")
    assert protocols == {"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"}
    assert suites == RSA_STRONG | {s.iana for s in WEAK_SUITES}


def _legacy_client(hub, version=ssl.TLSVersion.TLSv1, ciphers="ALL"):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(hub.root_pem_path))
    with warnings.catch_warnings():  # a legacy client on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
        ctx.maximum_version = min(version, ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
    return ctx


def _wait_events(hub, count, timeout=5.0):
    deadline = time.monotonic() + timeout
    while len(hub.log.events) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return hub.log.events


def _event_of(hub, address, after=0, timeout=5.0):
    """The log line of the connection made from ``address``, among the lines after the
    first ``after`` (other tests' scanners may still be logging on the same hub, and an
    earlier connection may have had the same source port)."""
    caller = f"{address[0]}:{address[1]}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in list(hub.log.events)[after:] if e.caller == caller]
        if found:
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no connection log line for {caller}")


def test_tls10_accepted_by_legacy_hub_refused_by_default(default_hub, legacy_hub):
    for hub, accepted in ((legacy_hub, True), (default_hub, False)):
        ctx = _legacy_client(hub)
        before = len(hub.log.events)
        with socket.create_connection(("127.0.0.1", hub.ports["https"]), 5) as raw:
            caller = raw.getsockname()
            if accepted:
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    assert tls.version() == "TLSv1"
                    tls.sendall(
                        b"GET /devices/x/messages/deviceBound?api-version=2021-04-12 "
                        b"HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                    )
                    assert tls.recv(100).startswith(b"HTTP/1.1 401")
            else:
                with pytest.raises(ssl.SSLError, match=r"UNSUPPORTED_PROTOCOL|PROTOCOL_VERSION"):
                    ctx.wrap_socket(raw, server_hostname="localhost")
        event = _event_of(hub, caller, before)
        assert event.protocol == "Https" and event.operation == "deviceConnect"
        if accepted:
            assert event.tls_version == "TLSv1" and event.sni == "localhost"
        else:
            # OpenSSL refuses the version before it reads the SNI extension
            assert event.result == "Failure" and "UNSUPPORTED_PROTOCOL" in event.reason


def test_weak_suite_refused_by_default_hub_and_logged(default_hub):
    before = len(default_hub.log.events)
    ctx = _legacy_client(default_hub, ssl.TLSVersion.TLSv1_2, "AES128-SHA")
    with socket.create_connection(("127.0.0.1", default_hub.ports["mqtt"]), 5) as raw:
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            ctx.wrap_socket(raw, server_hostname="localhost")
    event = _wait_events(default_hub, before + 1)[before]
    assert event.result == "Failure" and "NO_SHARED_CIPHER" in event.reason


def test_log_and_stats_count_successful_connections(tmp_path):
    mqtt = pytest.importorskip("paho.mqtt.client")
    with LocalHub(HubOptions(tmp_path, mqtt_port=0, amqp_port=None, https_port=None)) as hub:
        creds = hub.add_device("dev-1")
        cs = it.ConnectionString.parse(creds.connection_string)
        roots = it.RootSet.from_pem_file(hub.root_pem_path)
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            client = (
                mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev-1")
                if hasattr(mqtt, "CallbackAPIVersion")
                else mqtt.Client(client_id="dev-1")
            )
            client.tls_set_context(
                it.create_ssl_context(
                    it.TlsPolicy(
                        roots=roots, max_version=version, min_version=ssl.TLSVersion.TLSv1_2
                    )
                )
            )
            client.username_pw_set(
                "localhost/dev-1/?api-version=2021-04-12",
                it.generate_sas_token(cs.resource_uri, cs.shared_access_key),
            )
            client.connect("localhost", hub.ports["mqtt"])
            client.loop_start()
            deadline = time.monotonic() + 5
            while not client.is_connected() and time.monotonic() < deadline:
                time.sleep(0.02)
            client.disconnect()
            client.loop_stop()
        _wait_events(hub, 4)
        stats = hub.log.stats()
    assert stats["successfulConnections"] == 2
    assert stats["byTlsVersion"] == {"TLSv1.2": 1, "TLSv1.3": 1}
    assert sum(stats["byCipherSuite"].values()) == 2
    connects = [e.to_json() for e in hub.log.events if e.operation == "deviceConnect"]
    assert [c["tlsVersion"] for c in connects] == ["TLSv1.2", "TLSv1.3"]
    assert all(c["deviceId"] == "dev-1" and c["result"] == "Success" for c in connects)


def test_state_directory_survives_restarts(tmp_path):
    first = LocalHub(HubOptions(tmp_path, mqtt_port=None, amqp_port=None, https_port=None))
    creds = first.add_device("keeps-key")
    root = first.root_pem_path.read_bytes()
    second = LocalHub(HubOptions(tmp_path, mqtt_port=None, amqp_port=None, https_port=None))
    assert second.add_device("keeps-key").connection_string == creds.connection_string
    assert second.root_pem_path.read_bytes() == root


def test_unusable_state_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StateDirectoryError, match="choose a writable directory"):
        LocalHub(HubOptions(blocker / "state"))


# -- the command ----------------------------------------------------------------------------


def test_serve_reports_a_taken_port(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = main(
            [
                "serve",
                "--state",
                str(tmp_path),
                "--mqtt-port",
                str(port),
                "--amqp-port",
                "off",
                "--https-port",
                "off",
            ]
        )
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port} for Mqtt" in capsys.readouterr().err


def test_serve_runs_until_interrupted(tmp_path):
    """The real command in a subprocess: starts, prints the summary, logs a connection
    as a JSON line on stdout, stops cleanly on SIGINT with the statistics."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "iothub_tls",
            "serve",
            "--state",
            str(tmp_path),
            "--mqtt-port",
            "0",
            "--amqp-port",
            "off",
            "--https-port",
            "0",
            "--device",
            "d1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = ""
        while "Ctrl-C stops" not in banner:
            line = proc.stderr.readline()
            assert line, proc.stderr.read()
            banner += line
        port = int(banner.split("HTTPS")[1].split(":")[1].split()[0])
        ctx = it.create_ssl_context(
            it.TlsPolicy(roots=it.RootSet.from_pem_file(tmp_path / "pki" / "root.pem"))
        )
        with socket.create_connection(("127.0.0.1", port), 5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(
                    b"GET /devices/d1/messages/deviceBound?api-version=2021-04-12 "
                    b"HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                )
                tls.recv(100)
        record = json.loads(proc.stdout.readline())
        assert record["operationName"] == "deviceConnect" and record["protocol"] == "Https"
        assert record["tlsVersion"] == "TLSv1.3" and record["sni"] == "localhost"
    finally:
        proc.send_signal(2)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "successful connections" in err
    assert "device d1: HostName=localhost;DeviceId=d1;SharedAccessKey=" in banner


# -- CA-signed X.509 devices, as `serve --device NAME:x509` creates them ---------------------
#
# The hub's PKI is root -> intermediate -> device; the registry knows only the root. Every
# door must link the device's certificate to that root through the intermediate the
# device presents, and identify the device by its certificate's CN.


@pytest.fixture(scope="module")
def x509_hub(tmp_path_factory):
    hub = LocalHub(
        HubOptions(tmp_path_factory.mktemp("x509"), mqtt_port=0, amqp_port=0, https_port=0)
    )
    hub.add_device("cam-1", x509=True)
    hub.add_device("cam-2", x509=True)
    with hub:
        yield hub


def _x509_client(hub, protocol, device_id, files_of):
    """A device client of ``protocol`` for ``device_id``, presenting the certificate of
    ``files_of`` (a device of the hub's PKI)."""
    files = hub.pki.device_files(files_of)
    identity = it.ClientIdentity.from_files(files.certificate, files.private_key)
    policy = it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path))
    cs = f"HostName=localhost;DeviceId={device_id};x509=true"
    port = hub.ports[protocol]
    if protocol == "mqtt":
        pytest.importorskip("paho.mqtt.client")
        from iothub_tls.mqtt import MqttDeviceClient

        return MqttDeviceClient.from_connection_string(
            cs, policy=policy, identity=identity, host="127.0.0.1", port=port
        )
    if protocol == "amqp":
        from iothub_tls.amqp import AmqpDeviceClient

        return AmqpDeviceClient.from_connection_string(
            cs, policy=policy, identity=identity, host="127.0.0.1", port=port
        )
    from iothub_tls.https import HttpsDeviceClient

    return HttpsDeviceClient.from_connection_string(
        cs, policy=policy, identity=identity, host="127.0.0.1", port=port
    )


def _connects_of(hub, protocol, start):
    door = hub.doors[protocol]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [e for e in door.connections[start:] if e.operation == "deviceConnect"]
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"no {protocol} connection was logged")


@pytest.mark.parametrize("protocol", ["mqtt", "amqp", "https"])
def test_ca_signed_device_through_an_intermediate_on_every_door(x509_hub, protocol):
    start = len(x509_hub.doors[protocol].connections)
    body = f"from cam-1 over {protocol}".encode()
    client = _x509_client(x509_hub, protocol, "cam-1", "cam-1")
    try:
        client.connect()
        client.send_telemetry(body)
    finally:
        client.close()
    got = x509_hub.state.wait_for_telemetry(lambda t: t.payload == body)
    assert got.device_id == "cam-1" and got.protocol.lower() == protocol
    [event] = _connects_of(x509_hub, protocol, start)
    files = x509_hub.pki.device_files("cam-1")
    thumbprint = it.ClientIdentity.from_files(files.certificate, files.private_key)
    assert (event.result, event.device_id) == ("Success", "cam-1")
    assert event.client_cert_thumbprint == thumbprint.thumbprint_sha1
    seen = next(m for m in x509_hub.doors[protocol].received if m.body == body)
    assert seen.auth_type == "certificateAuthority"


@pytest.mark.parametrize("protocol", ["mqtt", "amqp", "https"])
def test_ca_signed_certificate_of_another_device_is_refused_on_every_door(x509_hub, protocol):
    """The failing twin: a valid chain to the registered root, but its CN is cam-1."""
    start = len(x509_hub.doors[protocol].connections)
    client = _x509_client(x509_hub, protocol, "cam-2", "cam-1")
    try:
        with pytest.raises(it.AuthenticationError):
            client.connect()
            client.send_telemetry(b"must not arrive")
    finally:
        client.close()
    [event] = _connects_of(x509_hub, protocol, start)
    assert (event.result, event.device_id) == ("Failure", "cam-2")
    assert "subject CN 'cam-1' is not the device id 'cam-2'" in event.reason
    assert not [m for m in x509_hub.doors[protocol].received if m.body == b"must not arrive"]


@pytest.fixture
def mosquitto_pub():
    """Debian's mosquitto_pub (mosquitto-clients): an MQTT client that is not ours."""
    return require_binary("mosquitto_pub")


def test_mosquitto_pub_as_a_ca_signed_device(x509_hub, mosquitto_pub):
    files = x509_hub.pki.device_files("cam-2")
    start = len(x509_hub.doors["mqtt"].connections)
    command = [
        mosquitto_pub,
        "-h", "localhost",
        "-p", str(x509_hub.ports["mqtt"]),
        "-V", "mqttv311",
        "-i", "cam-2",
        "-u", "localhost/cam-2/?api-version=2021-04-12",
        "--cafile", str(x509_hub.root_pem_path),
        "--cert", str(files.certificate),
        "--key", str(files.private_key),
        "-q", "1",
        "-t", "devices/cam-2/messages/events/source=mosquitto_pub",
        "-m", "hello from mosquitto_pub",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    got = x509_hub.state.wait_for_telemetry(lambda t: t.payload == b"hello from mosquitto_pub")
    assert (got.device_id, got.properties) == ("cam-2", {"source": "mosquitto_pub"})
    [event] = _connects_of(x509_hub, "mqtt", start)
    assert (event.result, event.device_id) == ("Success", "cam-2")


SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _start_serve(state, *extra, **popen):
    """``iothub-tls serve`` in a subprocess; returns (process, banner lines on stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "iothub_tls", "serve", "--state", str(state), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    banner = ""
    while "Ctrl-C stops" not in banner:
        line = proc.stderr.readline()
        if not line:
            proc.kill()
            raise AssertionError(f"serve did not start: {banner}{proc.stderr.read()}")
        banner += line
    return proc, banner


def _stop_serve(proc):
    proc.send_signal(2)
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def test_mqtt_sample_as_a_ca_signed_device_against_serve(tmp_path):
    pytest.importorskip("paho.mqtt.client")
    proc, banner = _start_serve(
        tmp_path,
        "--mqtt-port", "0", "--amqp-port", "off", "--https-port", "off",
        "--device", "sensor-9:x509",
    )  # fmt: skip
    try:
        port = banner.split("MQTT")[1].split(":")[1].split()[0]
        cs = banner.split("device sensor-9: ")[1].splitlines()[0]
        cert = banner.split("  certificate ")[1].split()[0]
        key = banner.split("  key ")[1].split()[0]
        assert cs == "HostName=localhost;DeviceId=sensor-9;x509=true"
        env = dict(os.environ, PYTHONPATH=str(SAMPLES.parent))
        env.pop("IOTHUB_DEVICE_CONNECTION_STRING", None)
        command = [
            sys.executable, str(SAMPLES / "mqtt_telemetry.py"),
            "--connection-string", cs, "--cert", cert, "--key", key,
            "--root", str(tmp_path / "pki" / "root.pem"),
            "--host", "127.0.0.1", "--port", port,
            "--count", "2", "--interval", "0",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    finally:
        out, _ = _stop_serve(proc)
    assert done.returncode == 0, done.stderr
    assert "message 2 acknowledged by the hub" in done.stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    connect = next(r for r in records if r["operationName"] == "deviceConnect")
    assert (connect["deviceId"], connect["result"], connect["protocol"]) == (
        "sensor-9",
        "Success",
        "Mqtt",
    )


# -- the connection cap ------------------------------------------------------------------------


def test_max_connections_reaches_every_door(tmp_path):
    hub = LocalHub(HubOptions(tmp_path, mqtt_port=0, amqp_port=0, https_port=0, max_connections=7))
    with hub:
        assert {p: d.max_connections for p, d in hub.doors.items()} == {
            "mqtt": 7,
            "amqp": 7,
            "https": 7,
        }
        assert hub.describe()["maxConnections"] == 7
    with pytest.raises(ValueError, match="max_connections must be a whole number >= 1, not 0"):
        HubOptions(tmp_path, max_connections=0)


def test_serve_refuses_a_max_connections_below_one(tmp_path, capsys):
    code = main(["serve", "--state", str(tmp_path), "--max-connections", "0"])
    assert code == 2
    assert "--max-connections: '0' is not a whole number >= 1" in capsys.readouterr().err


def _open_file_limit(pid):
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc")


@pytest.mark.parametrize("hard", [None, 200], ids=["raised", "hard-limit-too-low"])
def test_serve_fits_the_open_file_limit_to_its_doors(tmp_path, hard):
    """Three doors x 100 connections need 364 descriptors: serve raises a soft limit of
    128 to that, or says what to do when the hard limit does not allow it."""
    import resource

    def low_limit():
        top = resource.getrlimit(resource.RLIMIT_NOFILE)[1] if hard is None else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, top))

    if hard is None and resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 364:
        pytest.skip("the hard open-file limit of this machine is below 364")
    command = [
        sys.executable, "-m", "iothub_tls", "serve", "--state", str(tmp_path),
        "--mqtt-port", "0", "--amqp-port", "0", "--https-port", "0",
        "--max-connections", "100",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=low_limit,
    )
    try:
        banner = ""
        while "Ctrl-C stops" not in banner:
            line = proc.stderr.readline()
            assert line, banner + proc.stderr.read()
            banner += line
        limit = _open_file_limit(proc.pid)
    finally:
        _stop_serve(proc)
    assert "each door holds at most 100 connections at once" in banner
    if hard is None:
        assert limit == 364 and "warning" not in banner
    else:
        assert limit == 200
        assert (
            "warning: the open-file limit (200) is below what 3 doors x --max-connections 100 "
            "need (364)" in banner
        )


# -- what serve creates, and who may run it ------------------------------------------------------


def test_serve_state_directories_are_private_under_umask_0(tmp_path):
    state = tmp_path / "parent" / "state"
    proc, _ = _start_serve(
        state,
        "--mqtt-port", "0", "--amqp-port", "off", "--https-port", "off",
        "--device", "cam-1:x509", "--device", "sas-1",
        preexec_fn=lambda: os.umask(0),
    )  # fmt: skip
    _stop_serve(proc)
    assert proc.returncode == 0
    directories = [tmp_path / "parent", state, *(p for p in state.rglob("*") if p.is_dir())]
    assert {str(d.relative_to(tmp_path)) for d in directories} >= {
        "parent",
        "parent/state",
        "parent/state/pki",
        "parent/state/pki/servers",
        "parent/state/pki/devices",
    }
    for directory in directories:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    for secret in [*state.rglob("*.key"), state / "devices.json"]:
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret


NOBODY = 65534


def _python_for_nobody(env):
    """An interpreter the unprivileged user can run with this package importable (the
    test's own, or the system's with our import paths), or skip."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    if os.geteuid() != 0:
        pytest.skip("dropping to an unprivileged user needs root")
    for candidate in dict.fromkeys([sys.executable, shutil.which("python3")]):
        if candidate is None:
            continue
        probe = subprocess.run(
            [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
             candidate, "-c", "import iothub_tls.hub.hub"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if probe.returncode == 0:
            return setpriv, candidate
    pytest.skip("no Python interpreter with this package is usable by an unprivileged user")


def test_serve_on_a_privileged_port_as_an_unprivileged_user():
    """The real thing: serve started as 'nobody' on port 443 is refused by the kernel
    (EACCES), and says that the port is privileged and which flag picks another."""
    start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if start.exists() and int(start.read_text()) <= 443:
        pytest.skip("port 443 is not privileged here (net.ipv4.ip_unprivileged_port_start)")
    import sysconfig

    repo = Path(__file__).resolve().parent.parent
    paths = [str(repo), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    setpriv, python = _python_for_nobody(env)
    work = Path(tempfile.mkdtemp(prefix="iothub-tls-nobody-"))
    try:
        os.chown(work, NOBODY, NOBODY)
        done = subprocess.run(
            [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
             python, "-m", "iothub_tls", "serve", "--state", str(work / "state"),
             "--mqtt-port", "0", "--amqp-port", "0", "--https-port", "443"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        shutil.rmtree(work)
    assert done.returncode == 2, done.stderr
    assert (
        "cannot listen on 127.0.0.1:443 for Https: port 443 is privileged (below 1024) and "
        "this user may not listen on it"
    ) in done.stderr
    assert "choose another port with --https-port, e.g. --https-port 8443" in done.stderr
    assert "stop what uses it" not in done.stderr
