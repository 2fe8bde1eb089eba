"""The asyncio MQTT client against the local hub: the same surface, with await, on the
application's own event loop (no thread of its own), coroutine callbacks and handlers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import iothub_tls as it
from iothub_tls.aio import HandshakeGate, MqttDeviceClient
from iothub_tls.hub.hub import HubOptions, LocalHub
from tests.conftest import HOST

WAIT = 10.0


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    options = HubOptions(
        state_dir=tmp_path_factory.mktemp("hub"),
        hostname=HOST,
        mqtt_port=0,
        amqp_port=None,
        https_port=None,
    )
    with LocalHub(options) as running:
        yield running


def client_for(hub: LocalHub, device_id: str, **kwargs: Any) -> MqttDeviceClient:
    creds = hub.add_device(device_id)
    return MqttDeviceClient.from_connection_string(
        creds.connection_string,
        policy=it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path)),
        host="127.0.0.1",
        port=hub.ports["mqtt"],
        **kwargs,
    )


def iothub_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("iothub-tls-")}


def test_telemetry_c2d_twin_and_methods_with_await(hub: LocalHub) -> None:
    async def main() -> None:
        before = iothub_threads()
        client = client_for(hub, "aio-1")
        seen_states: list[it.ConnectionState] = []

        async def on_state(state: it.ConnectionState, reason: BaseException | None) -> None:
            seen_states.append(state)

        async def reboot(request: it.MethodRequest) -> tuple[int, Any]:
            await asyncio.sleep(0)  # a coroutine handler
            return 200, {"delay": request.payload["delay"]}

        desired: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        client.on_connection_state_change = on_state
        client.on_desired_update = desired.put_nowait
        client.on_method("reboot", reboot)
        async with client:
            assert client.connected and client.tls_info is not None
            await client.send_telemetry(b'{"t": 1}', {"unit": "C"}, message_id="m-1")
            got = await asyncio.to_thread(
                hub.state.wait_for_telemetry, lambda m: m.device_id == "aio-1"
            )
            assert got is not None and got.properties == {"unit": "C"}

            hub.state.enqueue_c2d("aio-1", b"one")
            hub.state.enqueue_c2d("aio-1", b"two")
            received = []
            async for message in client.c2d_messages():
                received.append(message.payload)
                message.complete()
                if len(received) == 2:
                    break
            assert received == [b"one", b"two"]
            with pytest.raises(it.OperationTimeoutError):
                await client.receive_c2d(0.2)

            version = await client.patch_reported({"fw": "2.0"})
            twin = await client.get_twin()
            assert twin["reported"]["fw"] == "2.0" and twin["reported"]["$version"] == version
            await asyncio.sleep(0.2)
            hub.state.patch_desired("aio-1", {"rate": 5})
            patch = await asyncio.wait_for(desired.get(), WAIT)
            assert patch["rate"] == 5

            status, body = await asyncio.to_thread(
                hub.state.invoke_method, "aio-1", "reboot", b'{"delay": 4}'
            )
            assert (status, body) == (200, b'{"delay": 4}')
            # no thread of the library's own: everything ran on this loop
            assert iothub_threads() <= before | {"iothub-tls-resolve"}
        await asyncio.sleep(0)
        assert seen_states[:2] == [it.ConnectionState.CONNECTING, it.ConnectionState.CONNECTED]
        assert seen_states[-1] is it.ConnectionState.CLOSED

    asyncio.run(main())


def test_many_clients_share_a_handshake_gate(hub: LocalHub) -> None:
    async def main() -> None:
        gate = HandshakeGate(limit=2)
        clients = [client_for(hub, f"aio-gate-{n}", gate=gate) for n in range(6)]
        await asyncio.gather(*(c.connect() for c in clients))
        assert all(c.connected for c in clients)
        await asyncio.gather(*(c.send_telemetry(b"x") for c in clients))
        await asyncio.gather(*(c.close() for c in clients))
        assert gate.waiting == 0

    asyncio.run(main())


def test_refusals_are_the_same_as_the_synchronous_client(hub: LocalHub) -> None:
    async def main() -> None:
        client = MqttDeviceClient.from_symmetric_key(
            HOST, "aio-refused", "a2V5", host="127.0.0.1", port=hub.ports["mqtt"]
        )  # the default policy pins Azure's roots: the hub's test root is refused
        with pytest.raises(it.CertificateVerificationError, match="certificate verify failed"):
            await client.connect()
        assert client.state is it.ConnectionState.CLOSED

    asyncio.run(main())


def test_a_coroutine_callback_that_raises_reaches_on_background_exception(
    hub: LocalHub,
) -> None:
    async def main() -> None:
        errors: list[BaseException] = []
        client = client_for(hub, "aio-bg")

        async def on_c2d(message: it.C2DMessage) -> None:
            raise RuntimeError(f"cannot handle {message.payload!r}")

        client.on_c2d = on_c2d
        client.on_background_exception = errors.append
        async with client:
            hub.state.enqueue_c2d("aio-bg", b"boom")
            for _ in range(200):
                if errors:
                    break
                await asyncio.sleep(0.02)
        assert [str(e) for e in errors] == ["cannot handle b'boom'"]

    asyncio.run(main())
