"""The asyncio clients on uvloop (libuv's event loop instead of asyncio's): each
transport connects through the hardened context, sends telemetry, receives and settles a
cloud-to-device message, and refuses a hub outside its pinned roots, exactly as on
asyncio's own loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

import iothub_tls as it
from iothub_tls import aio
from iothub_tls.https import HttpsOptions
from iothub_tls.hub.hub import HubOptions, LocalHub
from iothub_tls.testing.pki import CertificateAuthority
from tests.conftest import HOST

uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (pip install uvloop)")

WAIT = 10.0
TRANSPORTS = {
    "mqtt": (aio.MqttDeviceClient, {}),
    "amqp": (aio.AmqpDeviceClient, {}),
    "https": (aio.HttpsDeviceClient, {"options": HttpsOptions(c2d_poll_interval=0.05)}),
}


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
        yield running


def run_on_uvloop(main: Any) -> None:
    loop = uvloop.new_event_loop()
    try:
        assert "uvloop" in type(loop).__module__
        loop.run_until_complete(main())
    finally:
        loop.close()


def client_for(hub: LocalHub, transport: str, device_id: str, roots: it.RootSet) -> Any:
    cls, extra = TRANSPORTS[transport]
    creds = hub.add_device(device_id)
    return cls.from_connection_string(
        creds.connection_string,
        policy=it.TlsPolicy(roots=roots),
        host="127.0.0.1",
        port=hub.ports[transport],
        **extra,
    )


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_telemetry_and_c2d_on_uvloop(hub: LocalHub, transport: str) -> None:
    device_id = f"uvloop-{transport}"
    roots = it.RootSet.from_pem_file(hub.root_pem_path)

    async def main() -> None:
        async with client_for(hub, transport, device_id, roots) as client:
            assert client.tls_info is not None and client.tls_info.version == "TLSv1.3"
            await client.send_telemetry(b'{"t": 21.5}', {"unit": "C"})
            got = await asyncio.to_thread(
                hub.state.wait_for_telemetry, lambda m: m.device_id == device_id
            )
            assert got is not None and got.payload == b'{"t": 21.5}'
            assert got.properties == {"unit": "C"}
            hub.state.enqueue_c2d(device_id, b"reboot")
            message = await client.receive_c2d(WAIT)
            assert message.payload == b"reboot"
            message.complete()

    run_on_uvloop(main)


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_untrusted_hub_is_refused_on_uvloop(hub: LocalHub, transport: str) -> None:
    other = it.RootSet.from_pem(CertificateAuthority.root("Some Other Root").cert_pem)

    async def main() -> None:
        client = client_for(hub, transport, f"uvloop-refused-{transport}", other)
        with pytest.raises(it.CertificateVerificationError, match="does not lead to a pinned root"):
            await client.connect()
        await client.close()

    run_on_uvloop(main)
