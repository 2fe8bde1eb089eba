"""AmqpGateway: many SAS devices over one AMQP connection, against the local hub on
loopback (real TLS, real AMQP, the hub's own multiplexed door).

Each accepted device has its failing twins: a bad key and a disabled device among a
hundred good ones, a link to another device's address, a device whose links the hub
detaches, an X.509 device, a malformed proxy; and the connection-level facts are checked on both
sides (one TLS handshake, one line per device in the hub's connection log with the
shared connection's TLS details, one handshake per connection after a restart).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("proton")

import iothub_tls as it
from iothub_tls.aio import AmqpGateway
from iothub_tls.amqp import AmqpGateway as SyncAmqpGateway
from iothub_tls.amqp import AmqpOptions
from iothub_tls.amqp.aio_gateway import DEVICES_PER_CONNECTION, GatewayDeviceClient
from iothub_tls.amqp.connection import renewal_delay
from iothub_tls.amqp.shared import renewal_draw
from iothub_tls.hub.amqp import AmqpEndpoint
from iothub_tls.hub.hub import HubOptions, LocalHub
from iothub_tls.hub.log import ConnectionEvent
from iothub_tls.testing.proxies import Dante, TinyProxy
from tests.brokers import require_binary
from tests.conftest import HOST

WAIT = 20.0
QUICK = AmqpOptions(
    connect_timeout=20,
    operation_timeout=20,
    retry=it.RetryPolicy(initial_delay=0.05, max_delay=0.3, jitter=False),
)
States = list[tuple[it.ConnectionState, "BaseException | None"]]


def start_hub(state_dir: Path) -> LocalHub:
    options = HubOptions(
        state_dir=state_dir, hostname=HOST, mqtt_port=None, amqp_port=0, https_port=None
    )
    hub = LocalHub(options)
    hub.start()
    assert "amqp" in hub.doors, hub.unavailable
    return hub


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    running = start_hub(tmp_path_factory.mktemp("hub"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def own_hub(tmp_path: Path) -> Iterator[LocalHub]:
    """A hub of the test's own (for tests that restart its AMQP door)."""
    running = start_hub(tmp_path / "hub")
    try:
        yield running
    finally:
        running.stop()


def door_of(hub: LocalHub) -> AmqpEndpoint:
    door = hub.doors["amqp"]
    assert isinstance(door, AmqpEndpoint)
    return door


def gateway_for(hub: LocalHub, **kwargs: Any) -> AmqpGateway:
    kwargs.setdefault("options", QUICK)
    return AmqpGateway(
        HOST,
        policy=it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path)),
        host="127.0.0.1",
        port=hub.ports["amqp"],
        **kwargs,
    )


def register(hub: LocalHub, prefix: str, count: int) -> list[str]:
    """Connection strings of ``count`` new SAS devices ``{prefix}-{n}``."""
    return [hub.add_device(f"{prefix}-{n}").connection_string for n in range(count)]


def record_states(device: GatewayDeviceClient) -> States:
    seen: States = []
    device.on_connection_state_change = lambda state, reason: seen.append((state, reason))
    return seen


async def eventually(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("the condition did not become true in time")
        await asyncio.sleep(0.05)


def received_from(hub: LocalHub, device_ids: set[str]) -> Counter[str]:
    return Counter(m.device_id for m in door_of(hub).received if m.device_id in device_ids)


def connects(hub: LocalHub, device_ids: set[str], result: str = "Success") -> list[ConnectionEvent]:
    return [
        e
        for e in hub.log.events
        if e.operation == "deviceConnect" and e.device_id in device_ids and e.result == result
    ]


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


# -- one connection, many devices ---------------------------------------------------------


def test_a_hundred_and_twenty_devices_share_one_tls_connection(hub: LocalHub) -> None:
    strings = register(hub, "mux-a", 120)
    ids = {f"mux-a-{n}" for n in range(120)}

    async def main() -> None:
        async with gateway_for(hub) as gw:
            devices = await asyncio.gather(*(gw.add_device(cs) for cs in strings))
            assert gw.handshakes == 1 and len(gw.connections) == 1
            [shared] = gw.connections
            assert shared.members == 120 and shared.connected
            info = devices[0].tls_info
            assert info is not None and info.sni == HOST and info.version == "TLSv1.3"
            assert all(d.tls_info is info and d.connected for d in devices)
            await asyncio.gather(
                *(
                    d.send_telemetry(f"from {d.device_id}".encode(), {"n": str(k)})
                    for k, d in enumerate(devices)
                )
            )
            got = {m.device_id: m for m in door_of(hub).received if m.device_id in ids}
            assert len(got) == 120
            for k, device in enumerate(devices):
                message = got[device.device_id]
                assert message.body == f"from {device.device_id}".encode()
                assert message.properties == {"n": str(k)}
                assert (message.tls_version, message.cipher) == (info.version, info.iana_cipher)
            # the hub saw one connection carrying every device's token ...
            assert max(door_of(hub).put_tokens) == 120
            # ... and logged one line per device, each with that connection's TLS details
            lines = connects(hub, ids)
            assert sorted(e.device_id or "" for e in lines) == sorted(ids)
            assert len({e.caller for e in lines}) == 1
            assert {(e.tls_version, e.cipher, e.sni) for e in lines} == {
                (info.version, info.cipher, HOST)
            }

    run(main())


def test_each_device_has_its_own_c2d_twin_and_methods(hub: LocalHub) -> None:
    strings = register(hub, "mux-b", 100)

    async def main() -> None:
        async with gateway_for(hub) as gw:
            devices = await asyncio.gather(*(gw.add_device(cs) for cs in strings))

            # cloud-to-device: each device gets its own message, settled its own way
            for device in devices:
                hub.state.enqueue_c2d(device.device_id, f"for {device.device_id}".encode())
            messages = await asyncio.gather(*(d.receive_c2d(WAIT) for d in devices))
            assert [m.payload for m in messages] == [f"for {d.device_id}".encode() for d in devices]
            for message in messages[2:]:
                message.complete()
            messages[0].reject()  # dead-lettered: never delivered again
            messages[1].abandon()  # delivered again, to the same device
            again = await devices[1].receive_c2d(WAIT)
            assert again.payload == b"for mux-b-1" and again.delivery_count == 1
            again.complete()
            with pytest.raises(it.OperationTimeoutError, match="no cloud-to-device message"):
                await devices[0].receive_c2d(0.5)

            # twin: each device patches and reads its own
            versions = await asyncio.gather(
                *(d.patch_reported({"slot": k}) for k, d in enumerate(devices))
            )
            twins = await asyncio.gather(*(d.get_twin() for d in devices))
            assert [t["reported"]["slot"] for t in twins] == list(range(100))
            assert [t["reported"]["$version"] for t in twins] == versions
            desired: dict[str, list[dict[str, Any]]] = {"mux-b-5": [], "mux-b-6": []}
            for device in devices[5:7]:
                device.on_desired_update = desired[device.device_id].append
            await eventually(lambda: all(d._twin_channel._desired_wanted for d in devices[5:7]))
            await asyncio.sleep(0.2)  # the subscriptions' answers
            hub.state.patch_desired("mux-b-5", {"rate": 5})
            await eventually(lambda: bool(desired["mux-b-5"]))
            assert desired["mux-b-5"][0]["rate"] == 5 and desired["mux-b-6"] == []

            # direct methods: each device answers its own calls
            for device in devices:
                device.on_method("whoami", lambda request, d=device: (200, {"me": d.device_id}))
            await asyncio.gather(*(d._method_channel.attach(WAIT) for d in devices))
            answers = await asyncio.gather(
                *(
                    asyncio.to_thread(hub.state.invoke_method, f"mux-b-{n}", "whoami", b"{}")
                    for n in range(0, 100, 10)
                )
            )
            assert answers == [(200, f'{{"me": "mux-b-{n}"}}'.encode()) for n in range(0, 100, 10)]

    run(main())


def wrong_key(connection_string: str) -> str:
    key = base64.b64encode(b"not the device's key, 32 bytes.").decode()
    head, _, _ = connection_string.rpartition("SharedAccessKey=")
    return f"{head}SharedAccessKey={key}"


def test_a_bad_key_and_a_disabled_device_fail_alone(hub: LocalHub) -> None:
    strings = register(hub, "mux-c", 100)
    strings[37] = wrong_key(strings[37])
    disabled = hub.add_device("mux-c-disabled").connection_string
    hub.registry.set_enabled("mux-c-disabled", False)
    good_ids = {f"mux-c-{n}" for n in range(100) if n != 37}

    async def main() -> None:
        async with gateway_for(hub) as gw:
            results = await asyncio.gather(
                *(gw.add_device(cs) for cs in [*strings, disabled]), return_exceptions=True
            )
            failed = {k: r for k, r in enumerate(results) if isinstance(r, BaseException)}
            assert sorted(failed) == [37, 100]
            assert isinstance(failed[37], it.AuthenticationError)
            assert "put-token status 401" in str(failed[37])
            assert "hub.iothub-tls.test/devices/mux-c-37" in str(failed[37])
            assert isinstance(failed[100], it.AuthenticationError)
            assert "mux-c-disabled' is disabled" in str(failed[100])
            # the refused devices are not kept; the others are connected, on one connection
            devices = [r for r in results if isinstance(r, GatewayDeviceClient)]
            assert {d.device_id for d in gw.devices} == good_ids
            assert gw.handshakes == 1 and all(d.connected for d in devices)
            states = {d.device_id: record_states(d) for d in devices}
            await asyncio.gather(
                *(d.send_telemetry(f"{d.device_id} #{k}") for d in devices for k in range(5))
            )
            assert received_from(hub, good_ids | {"mux-c-37"}) == Counter(
                {device_id: 5 for device_id in good_ids}
            )
            assert all(seen == [] for seen in states.values())  # nobody else was disturbed
        refusals = connects(hub, {"mux-c-37", "mux-c-disabled"}, "Failure")
        assert sorted(e.device_id or "" for e in refusals) == ["mux-c-37", "mux-c-disabled"]
        assert all("$cbs put-token refused" in (e.reason or "") for e in refusals)

    run(main())


def test_a_link_to_another_device_s_address_is_refused(hub: LocalHub) -> None:
    """A link is authorized by the token of the device its address names: a device's
    link to a device whose token is not on this connection (here: on another gateway's
    connection) is refused, and only the device that tried is affected."""
    strings = register(hub, "mux-d", 3)

    async def main() -> None:
        async with gateway_for(hub) as gw, gateway_for(hub) as elsewhere:
            a, c = await asyncio.gather(*(gw.add_device(cs) for cs in (strings[0], strings[2])))
            b = await elsewhere.add_device(strings[1])
            a_states = record_states(a)
            stolen = a.links.sender(b.events_address, name="stolen")
            with pytest.raises(
                it.NotAuthorizedError,
                match=(
                    r"refused the link to '/devices/mux-d-1/messages/events' "
                    r"\(amqp:unauthorized-access: this connection is authenticated for "
                    r"mux-d-0, mux-d-2, not for device 'mux-d-1'\)"
                ),
            ):
                await stolen.send(b"spoofed")
            # that device is done for (its failure says why); the others carry on
            assert isinstance(a.failure, it.NotAuthorizedError) and not a.connected
            assert a_states[-1][0] is it.ConnectionState.CLOSED
            with pytest.raises(it.NotAuthorizedError, match="unauthorized-access"):
                await a.send_telemetry(b"after")
            await b.send_telemetry(b"b is fine")
            await c.send_telemetry(b"c is fine")
            bodies = [m.body for m in door_of(hub).received if m.device_id.startswith("mux-d")]
            assert sorted(bodies) == [b"b is fine", b"c is fine"]
            assert gw.handshakes == elsewhere.handshakes == 1

    run(main())


def test_a_device_whose_links_the_hub_detaches_is_the_only_one_affected(hub: LocalHub) -> None:
    strings = register(hub, "mux-e", 10)

    async def main() -> None:
        async with gateway_for(hub) as gw:
            devices = await asyncio.gather(*(gw.add_device(cs) for cs in strings))
            states = [record_states(d) for d in devices]
            door = door_of(hub)

            # detached (IoT Hub ending a session): attached again after its back-off
            assert await asyncio.to_thread(door.detach_device, "mux-e-3") >= 2
            await eventually(lambda: devices[3].reconnect_count == 1 and devices[3].connected)
            assert [s for s, _ in states[3]] == [
                it.ConnectionState.DISCONNECTED,
                it.ConnectionState.CONNECTED,
            ]
            reason = states[3][0][1]
            assert isinstance(reason, it.ConnectionFailedError)
            assert "amqp:link:detach-forced" in str(reason)
            await devices[3].send_telemetry(b"3 is back")

            # detached as unauthorized (a disabled device): that device fails for good
            await asyncio.to_thread(
                door.detach_device,
                "mux-e-4",
                condition="amqp:unauthorized-access",
                description="the device was disabled",
            )
            await eventually(lambda: devices[4].failure is not None)
            assert isinstance(devices[4].failure, it.NotAuthorizedError)
            assert "the device was disabled" in str(devices[4].failure)
            assert devices[4].state is it.ConnectionState.CLOSED
            with pytest.raises(it.NotAuthorizedError, match="the device was disabled"):
                await devices[4].send_telemetry(b"4 is gone")

            # nobody else noticed; the connection is the same
            others = [d for k, d in enumerate(devices) if k not in (3, 4)]
            assert all(states[k] == [] for k in range(10) if k not in (3, 4))
            await asyncio.gather(*(d.send_telemetry(b"still here") for d in others))
            assert gw.handshakes == 1

    run(main())


def test_after_a_hub_restart_every_device_is_back_with_one_handshake_per_connection(
    own_hub: LocalHub,
) -> None:
    hub = own_hub
    strings = register(hub, "mux-r", 120)
    ids = {f"mux-r-{n}" for n in range(120)}

    async def main() -> None:
        async with gateway_for(hub, devices_per_connection=50) as gw:
            devices = await asyncio.gather(*(gw.add_device(cs) for cs in strings))
            # more devices than one connection takes: spread over 50 + 50 + 20
            assert [c.members for c in gw.connections] == [50, 50, 20]
            assert gw.handshakes == 3
            assert {d.shared_connection for d in devices[:50]} == {gw.connections[0]}
            assert len({e.caller for e in connects(hub, ids)}) == 3
            states = [record_states(d) for d in devices]
            c2d = hub.state.enqueue_c2d
            door = door_of(hub)
            await asyncio.to_thread(door.stop)
            await asyncio.to_thread(door.start)  # the same port
            await eventually(lambda: all(d.reconnect_count == 1 and d.connected for d in devices))
            assert gw.handshakes == 6  # one more per connection, not one per device
            assert [c.resumed for c in gw.connections] == [1, 1, 1]  # TLS sessions resumed
            assert all(d.tls_info is not None and d.tls_info.session_reused for d in devices)
            for seen in states:
                assert [s for s, _ in seen] == [
                    it.ConnectionState.DISCONNECTED,
                    it.ConnectionState.CONNECTED,
                ]
            await asyncio.gather(*(d.send_telemetry(b"after the restart") for d in devices))
            after = [m for m in door.received if m.body == b"after the restart"]
            assert sorted(m.device_id for m in after) == sorted(ids)
            c2d("mux-r-119", b"hello again")
            assert (await devices[119].receive_c2d(WAIT)).payload == b"hello again"

    run(main())


def test_x509_devices_are_refused_with_the_client_to_use(hub: LocalHub) -> None:
    creds = hub.add_device("mux-x509", x509=True)

    async def main() -> None:
        async with gateway_for(hub) as gw:
            with pytest.raises(
                it.PolicyError,
                match=r"X\.509 devices cannot share an AMQP connection .*AmqpDeviceClient",
            ):
                await gw.add_device(creds.connection_string)
            assert gw.connections == () and gw.devices == ()  # nothing was opened

    run(main())
    with pytest.raises(it.PolicyError, match=r"X\.509 devices cannot share"):
        with SyncAmqpGateway(HOST) as gw:
            gw.add_device(creds.connection_string)


# -- networks in the way: a proxy, WebSockets on 443 ----------------------------------------


@pytest.mark.parametrize("route", ["http-proxy", "socks5-proxy", "websockets"])
def test_devices_share_one_connection_through_a_proxy_or_websockets(
    tmp_path: Path, route: str
) -> None:
    """The shared connection goes through tinyproxy (HTTP CONNECT), danted (SOCKS5), or
    over WebSockets on the hub's HTTPS door: one handshake for all devices, TLS end to
    end with the hub, every device's telemetry delivered."""
    hub = LocalHub(
        HubOptions(state_dir=tmp_path / "hub", hostname=HOST, mqtt_port=None, amqp_port=0,
                   https_port=0)
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        stack.enter_context(hub)
        kwargs: dict[str, Any] = {}
        door = "https" if route == "websockets" else "amqp"
        if route == "http-proxy":
            require_binary("tinyproxy")
            proxy = TinyProxy(tmp_path / "proxy", connect_ports=[hub.ports[door]])
            kwargs["proxy"] = stack.enter_context(proxy).url()
        elif route == "socks5-proxy":
            require_binary("danted")
            socks = Dante(tmp_path / "proxy", allow_ports=[hub.ports[door]])
            kwargs["proxy"] = stack.enter_context(socks).url()
        else:
            kwargs["websockets"] = True
        strings = register(hub, f"mux-{route}", 20)
        ids = {f"mux-{route}-{n}" for n in range(20)}

        async def main() -> None:
            async with AmqpGateway(
                HOST,
                policy=it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path)),
                host="127.0.0.1",
                port=hub.ports[door],
                options=QUICK,
                **kwargs,
            ) as gw:
                devices = await asyncio.gather(*(gw.add_device(cs) for cs in strings))
                assert gw.handshakes == 1 and len(gw.connections) == 1
                info = devices[0].tls_info
                assert info is not None and info.sni == HOST
                assert info.anchor == "iothub-tls Local Hub Root"
                await asyncio.gather(*(d.send_telemetry(d.device_id.encode()) for d in devices))
            await eventually(lambda: len(received_from(hub, ids)) == 20)

        run(main())
        protocol = "AmqpWs" if route == "websockets" else "Amqp"
        lines = [e for e in connects(hub, ids) if e.protocol == protocol]
        assert sorted(e.device_id or "" for e in lines) == sorted(ids)


def test_other_refusals_before_any_io(hub: LocalHub) -> None:
    with pytest.raises(it.PolicyError, match="proxy"):
        AmqpGateway(HOST, proxy="ftp://proxy.example:21")
    with pytest.raises(it.PolicyError, match="proxy"):
        SyncAmqpGateway(HOST, proxy="http://")
    with pytest.raises(it.PolicyError, match="devices_per_connection must be a positive int"):
        AmqpGateway(HOST, devices_per_connection=0)
    gw = gateway_for(hub)
    assert gw.devices_per_connection == DEVICES_PER_CONNECTION == 1000
    other_hub = "HostName=other.azure-devices.net;DeviceId=d;SharedAccessKey=" + "A" * 44
    with pytest.raises(it.PolicyError, match=r"belongs to other\.azure-devices\.net"):
        gw.new_device(other_hub)
    with pytest.raises(it.PolicyError, match="connection string, or device_id= and key="):
        gw.new_device(device_id="only-an-id")
    [cs] = register(hub, "mux-twice", 1)
    gw.new_device(cs)
    with pytest.raises(it.PolicyError, match="already on this gateway"):
        gw.new_device(cs)


def test_remove_device_detaches_its_links_and_frees_its_place(hub: LocalHub) -> None:
    strings = register(hub, "mux-f", 3)
    key = strings[1].rpartition("SharedAccessKey=")[2]

    async def main() -> None:
        async with gateway_for(hub, devices_per_connection=3) as gw:
            devices = await asyncio.gather(*(gw.add_device(cs) for cs in strings))
            for device in devices:
                device.on_method("ping", lambda request: (200, "pong"))
            await asyncio.gather(*(d._method_channel.attach(WAIT) for d in devices))
            [shared] = gw.connections
            await gw.remove_device(devices[1])
            assert gw.devices == (devices[0], devices[2]) and shared.members == 2
            assert devices[1].state is it.ConnectionState.CLOSED
            with pytest.raises(it.ConnectionFailedError, match="mux-f-1 was closed"):
                await devices[1].send_telemetry(b"removed")

            async def routed() -> bool:
                try:
                    await asyncio.to_thread(hub.state.invoke_method, "mux-f-1", "ping", b"", 0.5)
                except LookupError:
                    return False
                except TimeoutError:
                    pass  # the detach had not reached the hub yet
                return True

            for _ in range(40):  # the hub sees its method link go
                if not await routed():
                    break
            else:
                raise AssertionError("the removed device's method link is still routed")
            assert await asyncio.to_thread(hub.state.invoke_method, "mux-f-2", "ping") == (
                200,
                b'"pong"',
            )
            with pytest.raises(it.PolicyError, match="not a device of this gateway"):
                await gw.remove_device(devices[1])
            # its place is free again: the same device (by id and key) joins that connection
            back = await gw.add_device(device_id="mux-f-1", key=key)
            assert back.shared_connection is shared and gw.handshakes == 1
            await back.send_telemetry(b"back")

    run(main())


# -- SAS tokens -------------------------------------------------------------------------------


def test_renewals_of_a_thousand_devices_are_spread_over_the_window() -> None:
    """The schedule the shared connection uses: a thousand devices whose tokens were made
    in the same second renew over the whole window (360 s for one-hour tokens), at most
    four in any second (2.8 on average), where random draws bunch up to twice that."""
    now, ttl, margin = 1_700_000_000.0, 3600.0, 0.2
    times = [
        now + renewal_delay(now + ttl, ttl, margin, now, renewal_draw(slot)) for slot in range(1000)
    ]
    assert max(Counter(int(t) for t in times).values()) <= 4
    draws = random.Random(20).random
    bunched = [now + renewal_delay(now + ttl, ttl, margin, now, draws()) for _ in range(1000)]
    assert max(Counter(int(t) for t in bunched).values()) >= 8
    window = margin * ttl / 2  # renewals happen in the half-margin before 80 % of the life
    assert min(times) >= now + ttl - margin * ttl - window
    assert max(times) <= now + ttl - margin * ttl
    assert max(times) - min(times) > 0.99 * window
    # evenly for any number of devices: the largest gap stays under 2.7 / n of the window
    for n in (7, 100, 1000):
        draws = sorted(renewal_draw(slot) for slot in range(n))
        gaps = [b - a for a, b in zip([0.0, *draws], [*draws, 1.0], strict=True)]
        assert max(gaps) < 2.7 / n
    with pytest.raises(ValueError, match="slot must be >= 0"):
        renewal_draw(-1)


def test_tokens_are_renewed_on_the_shared_connection_before_they_expire(hub: LocalHub) -> None:
    strings = register(hub, "mux-t", 5)
    short = replace(QUICK, sas_ttl=4, renew_margin=0.5)

    async def main() -> None:
        async with gateway_for(hub, options=short) as gw:
            devices = await asyncio.gather(*(gw.add_device(cs) for cs in strings))
            loop = asyncio.get_running_loop()
            started = loop.time()
            # two renewals each: a token lives 4 s and is renewed 1-2 s before its end
            await eventually(lambda: all(d.links.token_puts >= 3 for d in devices))
            assert all(d.links.renewals >= 2 for d in devices)
            await asyncio.sleep(max(0.0, started + 4.5 - loop.time()))  # first tokens expired
            await asyncio.gather(*(d.send_telemetry(b"still authorized") for d in devices))
            assert all(d.connected for d in devices) and gw.handshakes == 1
            assert max(door_of(hub).put_tokens) >= 15

    run(main())


# -- the synchronous gateway -------------------------------------------------------------------


def test_the_synchronous_gateway_has_the_device_surface(hub: LocalHub) -> None:
    strings = register(hub, "mux-s", 5)
    strings[4] = wrong_key(strings[4])
    before = {t.name for t in threading.enumerate()}
    policy = it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path))
    with SyncAmqpGateway(
        HOST, policy=policy, host="127.0.0.1", port=hub.ports["amqp"], options=QUICK
    ) as gw:
        devices = [gw.add_device(cs) for cs in strings[:3]]
        late = gw.add_device(strings[3], connect=False)
        seen: list[it.ConnectionState] = []
        late.on_connection_state_change = lambda state, reason: seen.append(state)
        late.connect()
        with pytest.raises(it.AuthenticationError, match="put-token status 401"):
            gw.add_device(strings[4])
        assert len(gw.devices) == 4 and gw.connection_count == 1 and gw.handshakes == 1

        devices[0].send_telemetry(b"sync", {"unit": "C"}, message_id="sync-1")
        hub.state.enqueue_c2d("mux-s-1", b"to one")
        message = devices[1].receive_c2d(timeout=WAIT)
        assert message.payload == b"to one"
        message.complete()
        devices[2].on_method("ping", lambda request: (200, {"on": threading.current_thread().name}))
        status, body = hub.state.invoke_method("mux-s-2", "ping", b"{}")
        assert status == 200 and b"iothub-tls-callbacks" in body
        version = late.patch_reported({"fw": "1.2"})
        assert late.get_twin()["reported"]["$version"] == version
        assert devices[0].tls_info is not None and devices[0].tls_info.sni == HOST
        gw.remove_device(devices[0])
        assert len(gw.devices) == 3
        added = {t.name for t in threading.enumerate()} - before
        assert added <= {"iothub-tls-io", "iothub-tls-callbacks", "iothub-tls-resolve_0"}
    # state callbacks run on the callback thread: CLOSED may arrive just after close()
    asyncio.run(eventually(lambda: bool(seen) and seen[-1] is it.ConnectionState.CLOSED))
    got = [m for m in door_of(hub).received if m.device_id == "mux-s-0"]
    assert [(m.body, m.properties, m.message_id) for m in got] == [
        (b"sync", {"unit": "C"}, "sync-1")
    ]
