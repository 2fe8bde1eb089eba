"""One local hub holds many idle, authenticated MQTT device connections on its one I/O
thread: a thousand devices connect over TLS with their SAS tokens, and the hub's threads
are the same before and after; work handed over from another thread (a cloud-to-device
message) still reaches the one device it is for, and every connection's end is logged.

The devices are raw asyncio connections speaking MQTT with the codec the client and the
hub share (iothub_tls.mqtt.packets), all from this test's one event loop."""

from __future__ import annotations

import asyncio
import os
import resource
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import iothub_tls as it
from iothub_tls.auth import generate_sas_token
from iothub_tls.hub import DeviceRegistry
from iothub_tls.hub.hub import HubOptions, LocalHub
from iothub_tls.mqtt import conventions as mqttc
from iothub_tls.mqtt import packets
from tests.conftest import HOST

DEVICES = 1000
#: TLS handshakes this test runs at once (a gateway's handshake gate)
AT_ONCE = 50


def _raise_open_file_limit(wanted: int) -> None:
    """The test process holds both ends of every connection."""
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
    """One device's MQTT connection: CONNECT sent at once, packets collected."""

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
            else:
                self.received.put_nowait(packet)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(f"closed before CONNACK: {exc}"))

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


def hub_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("iothub-tls-hub"))


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_one_hub_holds_a_thousand_idle_mqtt_devices_on_one_thread(hub: LocalHub) -> None:
    port = hub.ports["mqtt"]
    door = hub.doors["mqtt"]
    ctx = it.create_ssl_context(it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path)))

    async def open_device(n: int, gate: asyncio.Semaphore) -> Device:
        device_id = f"dev-{n}"
        key = hub.registry.get(device_id).primary_key  # type: ignore[union-attr]
        token = generate_sas_token(f"{HOST}/devices/{device_id}", key)
        connect = packets.connect(
            device_id,
            username=mqttc.username(HOST, device_id),
            password=token.encode(),
            keepalive=600,
        )
        async with gate:
            loop = asyncio.get_running_loop()
            _, device = await loop.create_connection(
                lambda: Device(device_id, connect),
                "127.0.0.1",
                port,
                ssl=ctx,
                server_hostname=HOST,
            )
            await asyncio.wait_for(device.connack, 30)
        return device

    async def main() -> None:
        threads_before = threading.active_count()
        assert hub_threads() == ["iothub-tls-hub"]
        gate = asyncio.Semaphore(AT_ONCE)
        devices = await asyncio.gather(*(open_device(n, gate) for n in range(DEVICES)))
        assert [d.connack.result().return_code for d in devices] == [0] * DEVICES

        # A thousand connections held: still the hub's one I/O thread, nothing more.
        assert door.open_connections == DEVICES
        assert len(door.connected_devices()) == DEVICES  # type: ignore[attr-defined]
        assert hub_threads() == ["iothub-tls-hub"]
        assert threading.active_count() == threads_before
        connects = [e for e in hub.log.events if e.operation == "deviceConnect"]
        assert len(connects) == DEVICES and all(e.result == "Success" for e in connects)

        # Work from another thread reaches the one device it is for, among a thousand.
        target = devices[DEVICES // 2]
        target.send(packets.subscribe(1, [(mqttc.c2d_filter(target.device_id), 1)]))
        suback = await asyncio.wait_for(target.received.get(), 10)
        assert isinstance(suback, packets.SubAck) and suback.granted == (1,)
        sender = threading.Thread(
            target=hub.state.enqueue_c2d, args=(target.device_id, b"to one of a thousand")
        )
        sender.start()
        sender.join()
        message = await asyncio.wait_for(target.received.get(), 10)
        assert isinstance(message, packets.Publish)
        assert message.payload == b"to one of a thousand"
        assert message.topic.startswith(f"devices/{target.device_id}/messages/devicebound/")
        assert all(d.received.empty() for d in devices)

        for device in devices:
            assert device.transport is not None
            device.transport.close()
        await asyncio.gather(*(d.closed for d in devices))
        await wait_until(lambda: door.open_connections == 0, "the hub to see every end")
        await wait_until(
            lambda: (
                len([e for e in hub.log.events if e.operation == "deviceDisconnect"]) == DEVICES
            ),
            "a disconnect line per device",
        )
        assert hub_threads() == ["iothub-tls-hub"]

    asyncio.run(main())


def test_a_refused_device_among_many_is_refused_alone(hub: LocalHub) -> None:
    """A wrong key is answered with CONNACK 5 and a log line, on the same loop that
    keeps the others: the hub's thread count does not move either way."""
    port = hub.ports["mqtt"]
    ctx = it.create_ssl_context(it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path)))

    async def main() -> None:
        threads_before = threading.active_count()
        loop = asyncio.get_running_loop()
        token = generate_sas_token(f"{HOST}/devices/dev-1", DeviceRegistry.new_key())
        connect = packets.connect(
            "dev-1", username=mqttc.username(HOST, "dev-1"), password=token.encode()
        )
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
