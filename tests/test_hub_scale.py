"""One local hub holds many idle, authenticated MQTT device connections on its one I/O
thread: a thousand devices connect over TLS with their SAS tokens, and the hub's threads
are the same before and after; work handed over from another thread (a cloud-to-device
message) still reaches the one device it is for, and every connection's end is logged.

The devices are raw asyncio connections speaking MQTT with the codec the client and the
hub share (iothub_tls.mqtt.packets), all from one event loop in a process of their own
(this module, run with ``python -m tests.test_hub_scale``), so the test process holds
the hub alone."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import iothub_tls as it
from iothub_tls.auth import generate_sas_token
from iothub_tls.hub import DeviceRegistry
from iothub_tls.hub.hub import HubOptions, LocalHub
from iothub_tls.mqtt import conventions as mqttc
from iothub_tls.mqtt import packets
from tests.conftest import HOST

REPO = Path(__file__).resolve().parent.parent
DEVICES = 1000
#: TLS handshakes this test runs at once (a gateway's handshake gate)
AT_ONCE = 50


def _raise_open_file_limit(wanted: int) -> None:
    """The hub's end of every connection here, the devices' in the fleet process (which
    inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            message = (
                f"needs {wanted} open files and the hard limit is {hard}: raise it "
                "(ulimit -Hn) to run this test"
            )
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.fixture
def hub(tmp_path: Any) -> Iterator[LocalHub]:
    _raise_open_file_limit(2 * DEVICES + 512)
    options = HubOptions(
        state_dir=tmp_path,
        hostname=HOST,
        mqtt_port=0,
        amqp_port=None,
        https_port=None,
        max_connections=DEVICES + 10,
    )
    hub = LocalHub(options)
    for n in range(DEVICES):
        hub.registry.add_sas_device(f"dev-{n}")
    hub.registry.save()
    with hub:
        yield hub


class Device(asyncio.Protocol):
    """One device's MQTT connection: CONNECT sent at once, packets collected (a QoS 1
    message is acknowledged)."""

    def __init__(self, device_id: str, connect: bytes) -> None:
        self.device_id = device_id
        self.connect = connect
        self.decoder = packets.Decoder(from_server=True)
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[packets.ConnAck] = loop.create_future()
        self.received: asyncio.Queue[packets.Packet] = asyncio.Queue()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.connect)

    def data_received(self, data: bytes) -> None:
        for packet in self.decoder.feed(data):
            if isinstance(packet, packets.ConnAck) and not self.connack.done():
                self.connack.set_result(packet)
                continue
            if isinstance(packet, packets.Publish) and packet.packet_id is not None:
                self.send(packets.puback(packet.packet_id))
            self.received.put_nowait(packet)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(f"closed before CONNACK: {exc}"))

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


def device_connect(device_id: str, key: str, keepalive: int = 600) -> bytes:
    token = generate_sas_token(f"{HOST}/devices/{device_id}", key)
    return packets.connect(
        device_id,
        username=mqttc.username(HOST, device_id),
        password=token.encode(),
        keepalive=keepalive,
    )


async def fleet(port: int, root: Path, keys: dict[str, str], subscriber: str) -> None:
    """The devices' side, in a process of its own (``python -m tests.test_hub_scale``):
    its memory (asyncio's TLS transports keep a 256 KiB buffer each) and its threads are
    not the test's. Says, one JSON line each: ``{"connected": N, "refused": [...]}``
    once every device has its CONNACK (and ``subscriber`` its SUBACK); ``{"received":
    {...}}`` for every message a device gets; ``{"closed": N}`` after ``close`` on stdin."""
    loop = asyncio.get_running_loop()
    ctx = it.create_ssl_context(it.TlsPolicy(roots=it.RootSet.from_pem_file(root)))
    gate = asyncio.Semaphore(AT_ONCE)

    def say(line: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    async def open_device(device_id: str) -> Device:
        connect = device_connect(device_id, keys[device_id])
        async with gate:
            _, device = await loop.create_connection(
                lambda: Device(device_id, connect), "127.0.0.1", port, ssl=ctx,
                server_hostname=HOST,
            )  # fmt: skip
            await asyncio.wait_for(device.connack, 60)
        return device

    devices = await asyncio.gather(*(open_device(d) for d in keys))
    by_id = {d.device_id: d for d in devices}
    by_id[subscriber].send(packets.subscribe(1, [(mqttc.c2d_filter(subscriber), 1)]))
    suback = await asyncio.wait_for(by_id[subscriber].received.get(), 30)
    assert isinstance(suback, packets.SubAck) and suback.granted == (1,), suback
    refused = [d.device_id for d in devices if d.connack.result().return_code != 0]
    say({"connected": len(devices) - len(refused), "refused": refused})

    async def relay(device: Device) -> None:
        while True:
            packet = await device.received.get()
            if isinstance(packet, packets.Publish):
                say({"received": {"device": device.device_id, "topic": packet.topic,
                                  "payload": packet.payload.decode()}})  # fmt: skip

    relays = [asyncio.create_task(relay(d)) for d in devices]
    await loop.run_in_executor(None, sys.stdin.readline)  # "close"
    for device in devices:
        assert device.transport is not None
        device.transport.close()
    await asyncio.gather(*(d.closed for d in devices))
    await asyncio.sleep(0.1)  # what arrived last is said before the end
    for task in relays:
        task.cancel()
    say({"closed": len(devices)})


def hub_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("iothub-tls-hub"))


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_one_hub_holds_a_thousand_idle_mqtt_devices_on_one_thread(
    hub: LocalHub, tmp_path: Path
) -> None:
    door = hub.doors["mqtt"]
    keys = {f"dev-{n}": hub.registry.get(f"dev-{n}").primary_key for n in range(DEVICES)}  # type: ignore[union-attr]
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(keys))
    target = f"dev-{DEVICES // 2}"
    threads_before = threading.active_count()
    assert hub_threads() == ["iothub-tls-hub"]
    fleet = subprocess.Popen(
        [sys.executable, "-m", "tests.test_hub_scale", str(hub.ports["mqtt"]),
         str(hub.root_pem_path), str(keys_file), target],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert fleet.stdin is not None and fleet.stdout is not None
    try:
        assert json.loads(fleet.stdout.readline()) == {"connected": DEVICES, "refused": []}

        # A thousand connections held: still the hub's one I/O thread, nothing more.
        assert door.open_connections == DEVICES
        assert len(door.connected_devices()) == DEVICES  # type: ignore[attr-defined]
        assert hub_threads() == ["iothub-tls-hub"]
        assert threading.active_count() == threads_before
        connects = [e for e in hub.log.events if e.operation == "deviceConnect"]
        assert len(connects) == DEVICES and all(e.result == "Success" for e in connects)

        # Work from another thread reaches the one device it is for, among a thousand.
        sender = threading.Thread(
            target=hub.state.enqueue_c2d, args=(target, b"to one of a thousand")
        )
        sender.start()
        sender.join()
        received = json.loads(fleet.stdout.readline())["received"]
        assert (received["device"], received["payload"]) == (target, "to one of a thousand")
        assert received["topic"].startswith(f"devices/{target}/messages/devicebound/")
        wait_for(lambda: len(hub.state.completed) == 1, "the device's PUBACK")

        fleet.stdin.write("close\n")
        fleet.stdin.flush()
        # the next line: no other device received anything
        assert json.loads(fleet.stdout.readline()) == {"closed": DEVICES}
        assert fleet.wait(30) == 0
    finally:
        if fleet.poll() is None:
            fleet.kill()
            fleet.wait()
    wait_for(lambda: door.open_connections == 0, "the hub to see every end")
    wait_for(
        lambda: len([e for e in hub.log.events if e.operation == "deviceDisconnect"]) == DEVICES,
        "a disconnect line per device",
    )
    assert hub_threads() == ["iothub-tls-hub"]


def test_a_refused_device_among_many_is_refused_alone(hub: LocalHub) -> None:
    """A wrong key is answered with CONNACK 5 and a log line, on the same loop that
    keeps the others: the hub's thread count does not move either way."""
    port = hub.ports["mqtt"]
    ctx = it.create_ssl_context(it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path)))

    async def main() -> None:
        threads_before = threading.active_count()
        loop = asyncio.get_running_loop()
        connect = device_connect("dev-1", DeviceRegistry.new_key())  # not its key
        _, device = await loop.create_connection(
            lambda: Device("dev-1", connect), "127.0.0.1", port, ssl=ctx, server_hostname=HOST
        )
        assert (await asyncio.wait_for(device.connack, 10)).return_code == 5
        await asyncio.wait_for(device.closed, 10)
        assert threading.active_count() == threads_before
        [failure] = [e for e in hub.log.events if e.result == "Failure"]
        assert failure.device_id == "dev-1" and "signature" in (failure.reason or "")

    asyncio.run(main())


def test_tls_errors_of_the_scale_test_are_real_refusals(hub: LocalHub) -> None:
    """The twin of the thousand: a device that does not trust the hub's root never gets
    a CONNACK (the handshake fails), so the CONNACKs counted above are real sessions."""
    port = hub.ports["mqtt"]
    wrong = it.create_ssl_context(it.TlsPolicy())  # the Azure roots, not the hub's

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(ssl.SSLCertVerificationError):
            await loop.create_connection(
                lambda: Device("dev-2", b""), "127.0.0.1", port, ssl=wrong, server_hostname=HOST
            )

    asyncio.run(main())


if __name__ == "__main__":
    asyncio.run(
        fleet(int(sys.argv[1]), Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text()),
              sys.argv[4])
    )  # fmt: skip
