"""The asyncio HTTPS client against the local hub: the same surface, with await, on the
application's own event loop (no thread of its own), coroutine callbacks, polling as a
task; and the synchronous facade: many clients polling for cloud-to-device messages on
the shared loop add no thread per client."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import iothub_tls as it
from iothub_tls.aio import HandshakeGate, HttpsDeviceClient
from iothub_tls.https import HttpsDeviceClient as SyncHttpsDeviceClient
from iothub_tls.https import HttpsOptions, MessageLockLostError
from iothub_tls.hub.hub import HubOptions, LocalHub
from tests.conftest import HOST, PKI
from tests.tlsserver import TLSServer

WAIT = 10.0
FAST = HttpsOptions(c2d_poll_interval=0.05, operation_timeout=5.0)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    options = HubOptions(
        state_dir=tmp_path_factory.mktemp("hub"),
        hostname=HOST,
        mqtt_port=None,
        amqp_port=None,
        https_port=0,
    )
    with LocalHub(options) as running:
        yield running


def _common(hub: LocalHub) -> dict[str, Any]:
    return {
        "policy": it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path)),
        "host": "127.0.0.1",
        "port": hub.ports["https"],
    }


def client_for(hub: LocalHub, device_id: str, **kwargs: Any) -> HttpsDeviceClient:
    creds = hub.add_device(device_id)
    kwargs.setdefault("options", FAST)
    return HttpsDeviceClient.from_connection_string(
        creds.connection_string, **_common(hub), **kwargs
    )


def iothub_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("iothub-tls-")}


def test_telemetry_and_c2d_with_await(hub: LocalHub) -> None:
    async def main() -> None:
        before = iothub_threads()
        client = client_for(hub, "aio-https-1")
        states: list[it.ConnectionState] = []

        async def on_state(state: it.ConnectionState, reason: BaseException | None) -> None:
            states.append(state)

        client.on_connection_state_change = on_state
        async with client:
            assert client.connected and client.tls_info is not None
            assert client.tls_info.sni == HOST
            await client.send_telemetry(b'{"t": 1}', {"unit": "C"}, message_id="m-1")
            got = await asyncio.to_thread(
                hub.state.wait_for_telemetry, lambda m: m.device_id == "aio-https-1"
            )
            assert got is not None and got.properties == {"unit": "C"}
            assert got.payload == b'{"t": 1}' and got.protocol == "Https"

            hub.state.enqueue_c2d("aio-https-1", b"one")
            hub.state.enqueue_c2d("aio-https-1", b"two")
            received = []
            async for message in client.c2d_messages():
                received.append(message.payload)
                message.complete()  # on the loop: sent in the background
                if len(received) == 2:
                    break
            assert received == [b"one", b"two"]
            with pytest.raises(it.OperationTimeoutError, match="no cloud-to-device message"):
                await client.receive_c2d(0)
            # no thread of the library's own: everything ran on this loop
            assert iothub_threads() <= before | {"iothub-tls-resolve_0"}
        # close() waited for the settlements started on the loop
        assert [m.payload for m in hub.state.completed[-2:]] == [b"one", b"two"]
        assert hub.state.pending_c2d("aio-https-1") == 0
        await asyncio.sleep(0)
        assert states[:2] == [it.ConnectionState.CONNECTING, it.ConnectionState.CONNECTED]
        assert states[-1] is it.ConnectionState.CLOSED

    asyncio.run(main())


def test_twin_and_methods_are_refused_as_on_the_synchronous_client(hub: LocalHub) -> None:
    async def main() -> None:
        client = client_for(hub, "aio-https-twin")
        with pytest.raises(it.UnsupportedOperationError, match="MQTT or AMQP"):
            await client.get_twin()
        with pytest.raises(it.UnsupportedOperationError, match="MQTT or AMQP"):
            await client.patch_reported({"a": 1})
        with pytest.raises(it.UnsupportedOperationError, match="MQTT or AMQP"):
            client.on_method("reboot", lambda request: (200, None))
        with pytest.raises(it.UnsupportedOperationError, match="MQTT or AMQP"):
            client.on_desired_update = print
        assert client.on_desired_update is None

    asyncio.run(main())


def test_on_c2d_coroutine_callback_polls_as_a_task(hub: LocalHub) -> None:
    async def main() -> None:
        before = iothub_threads()
        client = client_for(hub, "aio-https-poll")
        got: asyncio.Queue[it.C2DMessage] = asyncio.Queue()

        async def on_c2d(message: it.C2DMessage) -> None:
            await got.put(message)

        client.on_c2d = on_c2d
        async with client:
            hub.state.enqueue_c2d("aio-https-poll", b"polled", {"k": "v"})
            message = await asyncio.wait_for(got.get(), WAIT)
            assert (message.payload, dict(message.properties)) == (b"polled", {"k": "v"})
            message.reject()
            assert iothub_threads() <= before | {"iothub-tls-resolve_0"}
            # polling stops when the callback is taken away, and starts again
            client.on_c2d = None
            await asyncio.sleep(0.2)
            hub.state.enqueue_c2d("aio-https-poll", b"not polled")
            await asyncio.sleep(0.3)
            assert got.empty() and hub.state.pending_c2d("aio-https-poll") == 1
            client.on_c2d = on_c2d
            again = await asyncio.wait_for(got.get(), WAIT)
            assert again.payload == b"not polled"
            again.complete()
        assert [m.payload for m in hub.state.dead_letters[-1:]] == [b"polled"]
        assert hub.state.completed[-1].payload == b"not polled"

    asyncio.run(main())


def test_a_failed_settlement_on_the_loop_reaches_on_background_exception(
    hub: LocalHub,
) -> None:
    async def main() -> None:
        errors: list[BaseException] = []
        client = client_for(hub, "aio-https-412")
        client.on_background_exception = errors.append
        async with client:
            hub.state.enqueue_c2d("aio-https-412", b"settled twice")
            message = await client.receive_c2d(WAIT)
            message.complete()
            with pytest.raises(it.ClientError, match="already settled"):
                message.complete()
            # the same lock token once more: the hub answers 412
            replay = it.C2DMessage(b"", lock_token=message.lock_token, settler=client._settler)
            replay.complete()
        (error,) = errors
        assert isinstance(error, MessageLockLostError) and error.status == 412

    asyncio.run(main())


def test_a_coroutine_callback_that_raises_reaches_on_background_exception(
    hub: LocalHub,
) -> None:
    async def main() -> None:
        errors: list[BaseException] = []
        client = client_for(hub, "aio-https-bg")

        async def on_c2d(message: it.C2DMessage) -> None:
            message.complete()
            raise RuntimeError(f"cannot handle {message.payload!r}")

        client.on_c2d = on_c2d
        client.on_background_exception = errors.append
        async with client:
            hub.state.enqueue_c2d("aio-https-bg", b"boom")
            for _ in range(500):
                if errors:
                    break
                await asyncio.sleep(0.02)
        assert [str(e) for e in errors] == ["cannot handle b'boom'"]

    asyncio.run(main())


def test_a_dropped_connection_is_replaced_and_resumes_the_session(hub: LocalHub) -> None:
    async def main() -> None:
        client = client_for(hub, "aio-https-drop")
        async with client:
            await client.send_telemetry(b"1")
            assert client.tls_info is not None and client.tls_info.session_reused is False
            await asyncio.to_thread(hub.doors["https"].drop_connections)  # type: ignore[attr-defined]
            await client.send_telemetry(b"2")
            assert client.tls_info.session_reused is True
            assert client.connected

    asyncio.run(main())


def test_many_clients_share_a_handshake_gate(hub: LocalHub) -> None:
    async def main() -> None:
        gate = HandshakeGate(limit=2)
        clients = [client_for(hub, f"aio-https-gate-{n}", gate=gate) for n in range(6)]
        await asyncio.gather(*(c.connect() for c in clients))
        assert all(c.connected for c in clients)
        await asyncio.gather(*(c.send_telemetry(b"x") for c in clients))
        await asyncio.gather(*(c.close() for c in clients))
        assert gate.waiting == 0

    asyncio.run(main())


def test_concurrent_operations_of_one_client_take_turns_on_its_connection(
    hub: LocalHub,
) -> None:
    async def main() -> None:
        client = client_for(hub, "aio-https-turns")
        async with client:
            await asyncio.gather(*(client.send_telemetry(b"%d" % n) for n in range(20)))
        got = [m.payload for m in hub.state.telemetry if m.device_id == "aio-https-turns"]
        assert sorted(got) == sorted(b"%d" % n for n in range(20))

    asyncio.run(main())


def test_refusals_are_the_same_as_the_synchronous_client(hub: LocalHub) -> None:
    async def main() -> None:
        client = HttpsDeviceClient.from_symmetric_key(
            HOST, "aio-https-refused", "a2V5", host="127.0.0.1", port=hub.ports["https"]
        )  # the default policy pins Azure's roots: the hub's test root is refused
        with pytest.raises(it.CertificateVerificationError, match="certificate verify failed"):
            await client.connect()
        assert client.state is it.ConnectionState.CLOSED
        with pytest.raises(it.ClientError, match=r"call connect\(\) first"):
            await client.send_telemetry(b"x")

    asyncio.run(main())


def test_a_server_that_never_answers_is_a_timeout(pki: PKI) -> None:
    options = HttpsOptions(operation_timeout=0.3)
    with TLSServer([pki.rsa_leaf], payload=b"") as server:  # TLS, then silence

        async def main() -> None:
            client = HttpsDeviceClient.from_symmetric_key(
                HOST, "dev", "a2V5", policy=pki.policy(), host="127.0.0.1",
                port=server.port, options=options,
            )  # fmt: skip
            async with client:
                with pytest.raises(
                    it.OperationTimeoutError, match=r"send telemetry: no response from .* 0\.3 s"
                ):
                    await client.send_telemetry(b"x")
                # not retried, and the connection is dropped: a late answer to the first
                # request must not be read as the answer to the next one
                assert len(server.accepted) == 1
                with pytest.raises(it.OperationTimeoutError):
                    await client.send_telemetry(b"y")
            assert len(server.wait_accepted(2)) == 2

        asyncio.run(main())


def test_the_synchronous_client_times_out_the_same_way(pki: PKI) -> None:
    options = HttpsOptions(operation_timeout=0.3)
    with TLSServer([pki.rsa_leaf], payload=b"") as server:
        client = SyncHttpsDeviceClient.from_symmetric_key(
            HOST, "dev", "a2V5", policy=pki.policy(), host="127.0.0.1", port=server.port,
            options=options,
        )  # fmt: skip
        with client:
            with pytest.raises(it.OperationTimeoutError, match="no response from"):
                client.send_telemetry(b"x")
            with pytest.raises(it.OperationTimeoutError, match="no response from"):
                client.send_telemetry(b"y", timeout=0.2)
        assert len(server.wait_accepted(2)) == 2


def test_a_server_that_does_not_speak_http_is_a_connection_failure(pki: PKI) -> None:
    options = HttpsOptions(retry=it.RetryPolicy(initial_delay=0.01, max_attempts=2))
    greeting = b"SSH-2.0-OpenSSH_9.6\r\n"  # what a wrong port might say after TLS
    with TLSServer([pki.rsa_leaf], payload=greeting) as server:
        client = SyncHttpsDeviceClient.from_symmetric_key(
            HOST, "dev", "a2V5", policy=pki.policy(), host="127.0.0.1", port=server.port,
            options=options,
        )  # fmt: skip
        with client:
            with pytest.raises(
                it.ConnectionFailedError, match=r"did not answer with valid HTTP/1\.1"
            ) as err:
                client.send_telemetry(b"x")
        assert not isinstance(err.value, ssl.SSLError)


def test_turns_go_in_arrival_order_and_survive_cancellation() -> None:
    from iothub_tls.https.channel import Turns

    async def main() -> None:
        turns = Turns()
        order: list[str] = []

        async def exchange(name: str) -> None:
            await turns.take()
            try:
                order.append(name)
                await asyncio.sleep(0.01)
            finally:
                turns.give()

        assert turns.try_take()  # a plain callback holds it
        tasks = [asyncio.create_task(exchange(n)) for n in ("a", "b", "c", "d")]
        await asyncio.sleep(0)
        tasks[1].cancel()  # gave up while waiting: never runs
        assert not turns.try_take()
        turns.give()  # "a" is handed the turn...
        tasks[0].cancel()  # ...and cancelled before it ran: the turn goes on to "c"
        await asyncio.gather(*tasks, return_exceptions=True)
        assert order == ["c", "d"]
        assert turns.try_take()  # free again

    asyncio.run(main())


# -- the synchronous facade on the shared loop --------------------------------------------------

ALLOWED = {"iothub-tls-io", "iothub-tls-callbacks", "iothub-tls-resolve_0"}


def client_threads() -> set[str]:
    """Every thread but the hub's own (its doors' accept and connection threads)."""
    return {t.name for t in threading.enumerate() if not t.name.lower().startswith("https-")}


def test_many_polling_clients_add_no_thread_per_client(hub: LocalHub) -> None:
    before = client_threads()
    got: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def on_c2d(message: it.C2DMessage) -> None:
        with lock:
            got.append((message.system_properties["iothub-to"], message.payload))
        message.complete()  # on the callback thread: waits for the hub's answer

    clients = []
    for n in range(12):
        creds = hub.add_device(f"sync-poll-{n}")
        client = SyncHttpsDeviceClient.from_connection_string(
            creds.connection_string, options=FAST, **_common(hub)
        )
        client.on_c2d = on_c2d
        client.connect()
        clients.append(client)
    try:
        for n in range(12):
            hub.state.enqueue_c2d(f"sync-poll-{n}", b"for %d" % n)
        deadline = time.monotonic() + WAIT
        while len(got) < 12 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(payload for _, payload in got) == sorted(b"for %d" % n for n in range(12))
        added = client_threads() - before
        # Twelve clients, each polling every 50 ms: the shared loop's thread, the callback
        # thread and at most the resolver, not a poller and a callback thread per client.
        assert added <= ALLOWED, added
    finally:
        for client in clients:
            client.close()
    assert all(hub.state.pending_c2d(f"sync-poll-{n}") == 0 for n in range(12))


def test_a_blocking_call_from_the_io_thread_is_refused(hub: LocalHub) -> None:
    creds = hub.add_device("sync-on-loop")
    client = SyncHttpsDeviceClient.from_connection_string(
        creds.connection_string, options=FAST, **_common(hub)
    )
    outcome: list[BaseException] = []

    def on_loop() -> None:
        try:
            client.send_telemetry(b"x")
        except RuntimeError as exc:
            outcome.append(exc)

    with client:
        done = threading.Event()
        client._io.call_soon(lambda: (on_loop(), done.set()))
        assert done.wait(WAIT)
    (error,) = outcome
    assert "blocking client call was made on the iothub-tls I/O thread" in str(error)
