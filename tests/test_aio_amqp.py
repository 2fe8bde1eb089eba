"""The asyncio AMQP client against the local hub: the same surface as the synchronous
one, with await, on the application's own event loop (no thread of its own), coroutine
callbacks and handlers, C2D settled through the delivery, a shared handshake gate, and
refusals the same as the synchronous client's."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("proton")

import iothub_tls as it
from iothub_tls.aio import AmqpDeviceClient, HandshakeGate
from iothub_tls.amqp import AmqpOptions
from iothub_tls.amqp import conventions as amqpc
from iothub_tls.hub.hub import HubOptions, LocalHub
from tests.conftest import HOST, PKI
from tests.faultproxy import FaultProxy
from tests.tlsserver import TLSServer

WAIT = 10.0
QUICK = AmqpOptions(
    connect_timeout=10,
    operation_timeout=10,
    retry=it.RetryPolicy(initial_delay=0.05, max_delay=0.2, jitter=False),
)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    options = HubOptions(
        state_dir=tmp_path_factory.mktemp("hub"),
        hostname=HOST,
        mqtt_port=None,
        amqp_port=0,
        https_port=None,
    )
    with LocalHub(options) as running:
        assert "amqp" in running.doors, running.unavailable
        yield running


def policy_for(hub: LocalHub) -> it.TlsPolicy:
    return it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path))


def client_for(
    hub: LocalHub, device_id: str, *, port: int | None = None, **kwargs: Any
) -> AmqpDeviceClient:
    creds = hub.add_device(device_id)
    kwargs.setdefault("options", QUICK)
    return AmqpDeviceClient.from_connection_string(
        creds.connection_string,
        policy=policy_for(hub),
        host="127.0.0.1",
        port=port or hub.ports["amqp"],
        **kwargs,
    )


def iothub_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("iothub-tls-")}


def test_telemetry_c2d_twin_and_methods_with_await(hub: LocalHub) -> None:
    async def main() -> None:
        before = iothub_threads()
        client = client_for(hub, "amqp-aio-1")
        seen_states: list[it.ConnectionState] = []

        async def on_state(state: it.ConnectionState, reason: BaseException | None) -> None:
            seen_states.append(state)

        async def reboot(request: it.MethodRequest) -> tuple[int, Any]:
            await asyncio.sleep(0)  # a coroutine handler
            return 200, {"delay": request.payload["delay"]}

        desired: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        client.on_connection_state_change = on_state
        client.on_desired_update = desired.put_nowait  # subscribed by connect()
        client.on_method("reboot", reboot)  # the method links attach with the others
        async with client:
            assert client.connected and client.tls_info is not None
            assert client.tls_info.sni == HOST
            await client.send_telemetry(b'{"t": 1}', {"unit": "C"}, message_id="m-1")
            got = await asyncio.to_thread(
                hub.state.wait_for_telemetry, lambda m: m.device_id == "amqp-aio-1"
            )
            assert got is not None and got.properties == {"unit": "C"}
            assert got.protocol.lower() == "amqp"

            hub.state.enqueue_c2d("amqp-aio-1", b"one")
            hub.state.enqueue_c2d("amqp-aio-1", b"two")
            received = []
            async for message in client.c2d_messages():
                received.append(message.payload)
                message.complete()  # settled through the delivery, on the loop
                if len(received) == 2:
                    break
            assert received == [b"one", b"two"]
            with pytest.raises(it.OperationTimeoutError, match="no cloud-to-device message"):
                await client.receive_c2d(0.2)

            version = await client.patch_reported({"fw": "2.0"})
            twin = await client.get_twin()
            assert twin["reported"]["fw"] == "2.0" and twin["reported"]["$version"] == version
            hub.state.patch_desired("amqp-aio-1", {"rate": 5})
            patch = await asyncio.wait_for(desired.get(), WAIT)
            assert patch["rate"] == 5 and "$version" in patch

            status, body = await asyncio.to_thread(
                hub.state.invoke_method, "amqp-aio-1", "reboot", b'{"delay": 4}'
            )
            assert (status, body) == (200, b'{"delay": 4}')
            # no thread of the library's own: everything ran on this loop
            assert iothub_threads() <= before | {"iothub-tls-resolve_0"}
        await asyncio.sleep(0)
        assert seen_states[:2] == [it.ConnectionState.CONNECTING, it.ConnectionState.CONNECTED]
        assert seen_states[-1] is it.ConnectionState.CLOSED
        assert not client.connected

    asyncio.run(main())


def test_c2d_reject_and_abandon_through_the_delivery(hub: LocalHub) -> None:
    async def main() -> None:
        async with client_for(hub, "amqp-aio-settle") as client:
            hub.state.enqueue_c2d("amqp-aio-settle", b"bad")
            bad = await client.receive_c2d(WAIT)
            bad.reject()
            with pytest.raises(it.ClientError, match="already settled"):
                bad.complete()
            hub.state.enqueue_c2d("amqp-aio-settle", b"again")
            first = await client.receive_c2d(WAIT)
            first.abandon()
            second = await client.receive_c2d(WAIT)
            assert second.payload == b"again"
            assert (second.delivery_count or 0) > (first.delivery_count or 0)
            second.complete()
        assert [m.payload for m in hub.state.dead_letters if m.device_id == "amqp-aio-settle"] == [
            b"bad"
        ]

    asyncio.run(main())


def test_methods_and_desired_updates_set_on_a_live_connection(hub: LocalHub) -> None:
    async def main() -> None:
        async with client_for(hub, "amqp-aio-live") as client:
            desired: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            client.on_desired_update = desired.put_nowait  # subscribes in the background
            client.on_method(None, lambda request: (201, {"called": request.name}))
            await client.get_twin()  # the twin links are up; the subscription follows
            for _ in range(200):
                links = client.connection._attached.keys
                if {"link-rcv-methods", "link-snd-methods"} <= links:
                    break
                await asyncio.sleep(0.02)
            status, body = await asyncio.to_thread(
                hub.state.invoke_method, "amqp-aio-live", "anything"
            )
            assert (status, body) == (201, b'{"called": "anything"}')
            await asyncio.sleep(0.2)  # the PUT of the subscription is answered
            hub.state.patch_desired("amqp-aio-live", {"mode": "eco"})
            patch = await asyncio.wait_for(desired.get(), WAIT)
            assert patch["mode"] == "eco"

    asyncio.run(main())


def test_reconnects_and_resends_after_a_cut(hub: LocalHub) -> None:
    async def main() -> None:
        states: list[it.ConnectionState] = []
        with FaultProxy(hub.ports["amqp"]) as proxy:
            client = client_for(hub, "amqp-aio-cut", port=proxy.port)
            client.on_connection_state_change = lambda state, reason: states.append(state)
            async with client:
                proxy.reset()
                await client.send_telemetry(b"after the cut", timeout=WAIT)
                assert client.connection.reconnects == 1
                info = client.tls_info
                assert info is not None and info.session_reused  # the session resumed
            assert proxy.faults == 1
        S = it.ConnectionState
        assert states[:3] == [S.CONNECTING, S.CONNECTED, S.DISCONNECTED]
        assert states[-2:] == [S.CONNECTED, S.CLOSED]

    asyncio.run(main())


def test_many_clients_share_a_handshake_gate(hub: LocalHub) -> None:
    async def main() -> None:
        gate = HandshakeGate(limit=2)
        clients = [client_for(hub, f"amqp-aio-gate-{n}", gate=gate) for n in range(6)]
        await asyncio.gather(*(c.connect() for c in clients))
        assert all(c.connected for c in clients)
        await asyncio.gather(*(c.send_telemetry(b"x") for c in clients))
        await asyncio.gather(*(c.close() for c in clients))
        assert gate.waiting == 0 and not any(c.connected for c in clients)

    asyncio.run(main())


def test_refusals_are_the_same_as_the_synchronous_client(hub: LocalHub, pki: PKI) -> None:
    async def main() -> None:
        client = AmqpDeviceClient.from_symmetric_key(
            HOST, "amqp-aio-refused", "a2V5", host="127.0.0.1", port=hub.ports["amqp"]
        )  # the default policy pins Azure's roots: the hub's test root is refused
        with pytest.raises(it.CertificateVerificationError, match="certificate verify failed"):
            await client.connect()
        assert client.state is it.ConnectionState.CLOSED

        wrong_key = AmqpDeviceClient.from_symmetric_key(
            HOST,
            hub.add_device("amqp-aio-wrong-key").device_id,
            "d3Jvbmcta2V5",
            policy=policy_for(hub),
            host="127.0.0.1",
            port=hub.ports["amqp"],
            options=QUICK,
        )
        with pytest.raises(it.AuthenticationError, match=r"put-token status 401") as refused:
            await wrong_key.connect()
        assert wrong_key.failure is refused.value and wrong_key.reconnect_count == 0

        server = TLSServer([pki.rsa_leaf], stall=True)  # accepts TCP, never answers TLS
        try:
            stalled = AmqpDeviceClient.from_symmetric_key(
                HOST,
                "amqp-aio-stalled",
                "a2V5",
                policy=pki.policy(),
                host="127.0.0.1",
                port=server.port,
                options=AmqpOptions(connect_timeout=0.5),
            )
            with pytest.raises(it.HandshakeTimeoutError, match="did not complete in time"):
                await stalled.connect()
        finally:
            server.close()

    asyncio.run(main())


def test_a_coroutine_callback_that_raises_reaches_on_background_exception(
    hub: LocalHub,
) -> None:
    async def main() -> None:
        errors: list[BaseException] = []
        client = client_for(hub, "amqp-aio-bg")

        async def on_c2d(message: it.C2DMessage) -> None:
            message.complete()
            raise RuntimeError(f"cannot handle {message.payload!r}")

        client.on_c2d = on_c2d
        client.on_background_exception = errors.append
        async with client:
            hub.state.enqueue_c2d("amqp-aio-bg", b"boom")
            for _ in range(200):
                if errors:
                    break
                await asyncio.sleep(0.02)
            await client.send_telemetry(b"still working")
        assert [str(e) for e in errors] == ["cannot handle b'boom'"]

    asyncio.run(main())


def test_model_id_is_announced_on_the_device_links(hub: LocalHub) -> None:
    model = "dtmi:com:example:Thermostat;1"
    client = client_for(hub, "amqp-aio-pnp", model_id=model)
    specs = client.connection._specs
    for link in ("link-snd-events", "link-rcv-devicebound"):
        assert specs[link].properties[amqpc.MODEL_ID_PROPERTY] == model

    async def main() -> None:
        async with client:
            await client.send_telemetry(b"pnp")

    asyncio.run(main())
    with pytest.raises(it.PolicyError, match="model"):
        client_for(hub, "amqp-aio-bad-model", model_id="not a dtmi")


def test_operations_before_connect_and_after_close_fail_clearly(hub: LocalHub) -> None:
    async def main() -> None:
        client = client_for(hub, "amqp-aio-closed")
        with pytest.raises(it.ConnectionFailedError, match="not connected: call connect"):
            await client.send_telemetry(b"too early")
        async with client:
            with pytest.raises(it.ConnectionFailedError, match="already connected"):
                await client.connect()
        with pytest.raises(it.ConnectionFailedError, match="the AMQP connection was closed"):
            await client.get_twin()
        assert client.failure is None  # closed on purpose
        await client.connect()  # closed, then connected again: the same client works
        await client.send_telemetry(b"again")
        await client.close()

    asyncio.run(main())


def test_sas_renewal_is_due_at_80_percent_of_the_life_brought_forward_by_jitter() -> None:
    from iothub_tls.amqp.connection import renewal_delay

    # a one-hour token made at t=1000: renewed at 80 % of its life without jitter ...
    assert renewal_delay(4600, 3600, 0.2, 1000, 0.0) == 2880
    # ... and up to half the 20 % reserve earlier with it, never later
    assert renewal_delay(4600, 3600, 0.2, 1000, 1.0) == 2520
    draws = [renewal_delay(4600, 3600, 0.2, 1000, d / 10) for d in range(10)]
    assert len(set(draws)) == 10 and all(2520 <= d <= 2880 for d in draws)
    # a token already past its renewal point is renewed at once
    assert renewal_delay(4600, 3600, 0.2, 4500, 0.5) == 0.0


def test_a_large_message_arrives_through_the_tls_layer(hub: LocalHub) -> None:
    """TLS runs in the library's own layer (records read 16 KiB at a time, no 256 KiB
    buffer per connection): a message many records long arrives whole, both ways."""
    from iothub_tls._io.tls import TlsLayer

    big = bytes(range(256)) * 800  # 200 KiB

    async def main() -> None:
        async with client_for(hub, "amqp-aio-big") as client:
            assert isinstance(client.connection._wire.transport, TlsLayer)
            hub.state.enqueue_c2d("amqp-aio-big", big)
            message = await client.receive_c2d(WAIT)
            assert message.payload == big
            message.complete()
            await client.send_telemetry(big)

    asyncio.run(main())
