"""What every front door of the local hub shares, under floods: the connection cap (a
connection beyond it is closed before TLS, logged, and costs no thread), the deadline of
the TLS handshake (a silent or trickling client is dropped), and an accept loop that
survives running out of file descriptors. Each checked on the MQTT, AMQP and HTTPS
doors with raw sockets, then with a real device client that must still get in."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import iothub_tls as it
from iothub_tls.hub import DeviceRegistry, HubTlsProfile, ServerCredential
from iothub_tls.hub.frontdoor import DEFAULT_MAX_CONNECTIONS, HubFrontDoor
from iothub_tls.hub.https import HttpsEndpoint
from iothub_tls.hub.mqtt import MqttEndpoint
from iothub_tls.testing.pki import Issued
from tests.conftest import HOST, PKI

DOORS = ["mqtt", "amqp", "https"]


def _cred(issued: Issued) -> ServerCredential:
    return ServerCredential.from_pem(issued.cert_chain_pem, issued.key_pem)


@pytest.fixture
def profile(pki: PKI) -> HubTlsProfile:
    return HubTlsProfile((_cred(pki.rsa_leaf), _cred(pki.ec_leaf)))


@pytest.fixture
def registry() -> DeviceRegistry:
    reg = DeviceRegistry(HOST)
    reg.add_sas_device("dev-sas")
    return reg


def door_class(protocol: str) -> type[HubFrontDoor]:
    if protocol == "mqtt":
        return MqttEndpoint
    if protocol == "https":
        return HttpsEndpoint
    from iothub_tls.hub.amqp import AmqpEndpoint

    return AmqpEndpoint


@pytest.fixture
def door(
    profile: HubTlsProfile, registry: DeviceRegistry, start_door: Callable[..., Any]
) -> Callable[..., HubFrontDoor]:
    """Factory: ``door(protocol, max_connections=..., handshake_timeout=...)``."""

    def make(protocol: str, *, handshake_timeout: float = 30.0, **options: Any) -> HubFrontDoor:
        timeout = "connect_timeout" if protocol == "mqtt" else "handshake_timeout"
        options[timeout] = handshake_timeout
        return start_door(door_class(protocol), profile, registry, **options)  # type: ignore[no-any-return]

    return make


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for s in made:
        s.close()


def silent(door: HubFrontDoor, made: list[socket.socket]) -> socket.socket:
    """A TCP connection to the door that never sends a byte."""
    s = socket.create_connection(("127.0.0.1", door.port), 5)
    made.append(s)
    return s


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def closed_by_peer(s: socket.socket, timeout: float = 10.0) -> bool:
    """True when the door closed ``s`` (EOF or reset) within ``timeout``."""
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def connection_threads(protocol: str) -> list[threading.Thread]:
    name = {"mqtt": "Mqtt", "amqp": "Amqp", "https": "Https"}[protocol]
    return [t for t in threading.enumerate() if t.name.startswith(f"{name}-conn")]


def a_device_gets_in(protocol: str, door: HubFrontDoor, registry: DeviceRegistry, pki: PKI) -> None:
    """A well-behaved SAS device connects and its telemetry arrives."""
    key = registry.get("dev-sas").primary_key  # type: ignore[union-attr]
    cs = f"HostName={HOST};DeviceId=dev-sas;SharedAccessKey={key}"
    common: dict[str, Any] = {"policy": pki.policy(), "host": "127.0.0.1", "port": door.port}
    body = f"through the {protocol} door".encode()
    if protocol == "mqtt":
        from iothub_tls.mqtt import MqttDeviceClient

        client: Any = MqttDeviceClient.from_connection_string(cs, **common)
    elif protocol == "amqp":
        from iothub_tls.amqp import AmqpDeviceClient

        client = AmqpDeviceClient.from_connection_string(cs, **common)
    else:
        from iothub_tls.https import HttpsDeviceClient

        client = HttpsDeviceClient.from_connection_string(cs, **common)
    try:
        client.connect()
        client.send_telemetry(body)
    finally:
        client.close()
    assert door.received[-1].body == body


# -- the cap ----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", DOORS)
def test_a_connection_beyond_the_cap_is_closed_before_tls_and_logged(
    protocol, door, registry, pki, sockets
):
    hub = door(protocol, max_connections=20)
    held = [silent(hub, sockets) for _ in range(20)]
    wait_for(lambda: hub.open_connections == 20, "the door to hold 20 connections")
    # Silent connections are handshakes in progress: they cost the door no thread.
    assert connection_threads(protocol) == []

    extra = silent(hub, sockets)
    assert closed_by_peer(extra), "the 21st connection was not closed"
    wait_for(lambda: any(e.result == "Failure" for e in hub.connections), "the refusal log line")
    [refusal] = [e for e in hub.connections if e.result == "Failure"]
    assert refusal.reason == (
        "refused: the door already holds 20 connections (max_connections=20); "
        "closed before the TLS handshake"
    )
    assert refusal.tls_version is None
    assert refusal.caller == f"127.0.0.1:{extra.getsockname()[1]}"
    assert hub.log.stats()["failedConnections"] == {hub.protocol: 1}
    assert all(not closed_by_peer(s, 0.05) for s in held)  # the 20 are still held

    for s in held[:5]:
        s.close()
    wait_for(lambda: hub.open_connections == 15, "the door to notice the closed connections")
    a_device_gets_in(protocol, hub, registry, pki)


@pytest.mark.parametrize("protocol", DOORS)
def test_silent_connections_are_dropped_at_the_handshake_timeout(
    protocol, door, registry, pki, sockets
):
    """A flood of sockets that never send a ClientHello cannot hold a full door: each is
    dropped when the handshake deadline passes, and devices get in again."""
    hub = door(protocol, max_connections=5, handshake_timeout=0.5)
    held = [silent(hub, sockets) for _ in range(5)]
    assert all(closed_by_peer(s) for s in held)
    wait_for(lambda: hub.open_connections == 0, "the door to release the silent connections")
    reasons = {e.reason for e in hub.connections if e.result == "Failure"}
    assert reasons == {"TLS handshake failed: not completed within 0.5 s"}
    a_device_gets_in(protocol, hub, registry, pki)


def client_hello(pki: PKI) -> bytes:
    """The first flight of a real TLS client (its ClientHello), without a socket."""
    ctx = it.create_ssl_context(pki.policy())
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=HOST)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("protocol", DOORS)
def test_a_trickled_client_hello_is_dropped_at_the_handshake_deadline(protocol, door, pki, sockets):
    """One byte every 0.2 s, each well inside the timeout of a single read: only a
    deadline for the whole handshake ends it."""
    hub = door(protocol, handshake_timeout=1.0)
    hello = client_hello(pki)
    s = silent(hub, sockets)
    s.settimeout(0.2)
    closed = False
    for byte in hello[:60]:  # 12 s at most: the door must close long before
        try:
            s.sendall(bytes([byte]))
            closed = s.recv(1) == b""
        except TimeoutError:
            continue
        except OSError:
            closed = True
        if closed:
            break
    assert closed, "the door kept a trickling handshake open"
    wait_for(lambda: hub.connections, "the log line")
    assert hub.connections[-1].reason == "TLS handshake failed: not completed within 1 s"


def test_max_connections_must_be_positive(profile, registry):
    with pytest.raises(ValueError, match="max_connections must be a whole number >= 1"):
        MqttEndpoint(profile, registry, max_connections=0)
    assert MqttEndpoint(profile, registry).max_connections == DEFAULT_MAX_CONNECTIONS == 1000


# -- out of file descriptors ------------------------------------------------------------------

_LOW_FD_DOOR = """
import logging, resource, sys
logging.basicConfig(level=logging.WARNING)
from iothub_tls.hub.hub import HubOptions, LocalHub
from iothub_tls.testing.pki import Issued
from tests.conftest import HOST, PKI
hub = LocalHub(HubOptions(sys.argv[1], mqtt_port=0, amqp_port=None, https_port=None))
hub.start()
resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print(hub.ports["mqtt"], flush=True)
sys.stdin.readline()
hub.stop()
"""


def test_the_door_survives_running_out_of_file_descriptors(tmp_path, sockets):
    """A flood that exhausts the hub's open-file limit (accept() fails with EMFILE) must
    not end the door's accept loop: once the flood is gone, devices get in again."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOW_FD_DOOR, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        flood = []
        for _ in range(80):  # more than the 48 descriptors the hub may have
            s = socket.create_connection(("127.0.0.1", port), 5)
            sockets.append(s)
            flood.append(s)
        time.sleep(1.0)  # the hub accepts until EMFILE, the rest wait in the backlog
        for s in flood:
            s.close()
        ctx = it.create_ssl_context(
            it.TlsPolicy(roots=it.RootSet.from_pem_file(tmp_path / "pki" / "root.pem"))
        )
        deadline = time.monotonic() + 15
        while True:  # the hub works through the closed backlog first
            try:
                with socket.create_connection(("127.0.0.1", port), 5) as raw:
                    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                        assert tls.version() in ("TLSv1.2", "TLSv1.3")
                break
            except (OSError, ssl.SSLError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        proc.stdin.write("\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "out of file descriptors" in err
