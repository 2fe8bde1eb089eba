"""Every device client through real proxies: tinyproxy (HTTP CONNECT, with and without
Basic authentication) and Dante (SOCKS5 with and without user name / password, SOCKS4),
to the local hub's doors (MQTT 8883, AMQP 5671, HTTPS 443, MQTT and AMQP over WebSockets
on the HTTPS door). TLS runs end to end through every tunnel: the hub's name in SNI and
verification, the hub's certificate in ``tls_info``, the TLS refusals unchanged; the
proxy's refusals are ``ProxyError`` naming the proxy, never its password."""

from __future__ import annotations

import logging
import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import iothub_tls as it
from iothub_tls._io.proxy import Proxy, proxy_for
from iothub_tls.amqp import AmqpDeviceClient, AmqpOptions
from iothub_tls.https import HttpsDeviceClient, HttpsOptions
from iothub_tls.hub.hub import HubOptions, LocalHub
from iothub_tls.mqtt import MqttDeviceClient, MqttOptions
from iothub_tls.testing.ports import free_port
from iothub_tls.testing.proxies import Dante, TinyProxy
from iothub_tls.testing.relay import RecordRelay

from .brokers import require_binary
from .conftest import HOST, new_root

SECRET = "pr0xy-S3cret-do-not-log"
USER = "alice"
NO_RETRY = it.RetryPolicy(max_attempts=1)

#: transport name -> (client class, keywords, the hub door it reaches)
TRANSPORTS: dict[str, tuple[type[Any], dict[str, Any], str]] = {
    "mqtt": (MqttDeviceClient, {"options": MqttOptions(retry=NO_RETRY)}, "mqtt"),
    "mqtt-ws": (
        MqttDeviceClient,
        {"websockets": True, "options": MqttOptions(retry=NO_RETRY)},
        "https",
    ),
    "amqp": (AmqpDeviceClient, {"options": AmqpOptions(retry=None)}, "amqp"),
    "amqp-ws": (
        AmqpDeviceClient,
        {"websockets": True, "options": AmqpOptions(retry=None)},
        "https",
    ),
    "https": (HttpsDeviceClient, {"options": HttpsOptions(retry=NO_RETRY)}, "https"),
}


def _hub(tmp: Path, certificate: str = "dual") -> LocalHub:
    return LocalHub(
        HubOptions(
            state_dir=tmp,
            hostname=HOST,
            mqtt_port=0,
            amqp_port=0,
            https_port=0,
            certificate=certificate,
        )
    )


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    with _hub(tmp_path_factory.mktemp("hub")) as running:
        assert {"mqtt", "amqp", "https"} <= set(running.doors), running.unavailable
        yield running


@pytest.fixture(scope="module")
def rsa_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    with _hub(tmp_path_factory.mktemp("rsa-hub"), certificate="rsa") as running:
        yield running


def _ports(*hubs: LocalHub) -> list[int]:
    return [port for h in hubs for port in h.ports.values()]


@pytest.fixture(scope="module")
def tinyproxy(
    hub: LocalHub, rsa_hub: LocalHub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TinyProxy]:
    require_binary("tinyproxy")
    with TinyProxy(tmp_path_factory.mktemp("tp"), connect_ports=_ports(hub, rsa_hub)) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def tinyproxy_auth(hub: LocalHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyProxy]:
    require_binary("tinyproxy")
    proxy = TinyProxy(
        tmp_path_factory.mktemp("tpa"), users={USER: SECRET}, connect_ports=_ports(hub)
    )
    with proxy:
        yield proxy


@pytest.fixture(scope="module")
def dante(
    hub: LocalHub, rsa_hub: LocalHub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Dante]:
    require_binary("danted")
    with Dante(tmp_path_factory.mktemp("dante"), allow_ports=_ports(hub, rsa_hub)) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def dante_auth(hub: LocalHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dante]:
    require_binary("danted")
    if os.geteuid() != 0:
        pytest.skip(
            "danted checks SOCKS5 passwords against system accounts: the test adds a "
            "temporary one, which needs root"
        )
    with Dante(
        tmp_path_factory.mktemp("dante-auth"), users={USER: SECRET}, allow_ports=_ports(hub)
    ) as proxy:
        yield proxy


def _proxy_url(kind: str, request: pytest.FixtureRequest) -> tuple[str, TinyProxy | Dante]:
    if kind == "http":
        tp: TinyProxy = request.getfixturevalue("tinyproxy")
        return tp.url(), tp
    if kind == "http-auth":
        tpa: TinyProxy = request.getfixturevalue("tinyproxy_auth")
        return tpa.url(USER, SECRET), tpa
    if kind == "socks5":
        d: Dante = request.getfixturevalue("dante")
        return d.url(), d
    if kind == "socks5-auth":
        da: Dante = request.getfixturevalue("dante_auth")
        return da.url(USER, SECRET), da
    assert kind == "socks4"
    d4: Dante = request.getfixturevalue("dante")
    return d4.socks4_url(), d4


def _policy(hub: LocalHub, **kwargs: Any) -> it.TlsPolicy:
    return it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path), **kwargs)


def _client(
    hub: LocalHub,
    transport: str,
    proxy: str | None,
    *,
    device_id: str | None = None,
    policy: it.TlsPolicy | None = None,
    port: int | None = None,
) -> Any:
    cls, kwargs, door = TRANSPORTS[transport]
    device_id = device_id or f"px-{transport}-{uuid.uuid4().hex[:6]}"
    creds = hub.add_device(device_id)
    return cls.from_connection_string(
        creds.connection_string,
        policy=policy or _policy(hub),
        host="127.0.0.1",
        port=port or hub.ports[door],
        proxy=proxy,
        **kwargs,
    )


# -- the matrix: telemetry and C2D through each proxy on each transport -------------------


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("kind", ["http", "http-auth", "socks5", "socks5-auth", "socks4"])
def test_telemetry_and_c2d_through_the_proxy(
    hub: LocalHub, transport: str, kind: str, request: pytest.FixtureRequest
) -> None:
    url, proxy = _proxy_url(kind, request)
    _, _, door = TRANSPORTS[transport]
    before = len(proxy.log_text)
    device_id = f"px-{kind}-{transport}"
    client = _client(hub, transport, url, device_id=device_id)
    marker = uuid.uuid4().hex
    with client:
        client.send_telemetry(marker.encode(), {"through": kind})
        hub.state.enqueue_c2d(device_id, b"to the device " + marker.encode(), {"k": "v"})
        message = client.receive_c2d(timeout=10)
        if transport != "mqtt" and transport != "mqtt-ws":
            message.complete()
        info = client.tls_info
    got = hub.state.wait_for_telemetry(lambda t: t.payload == marker.encode(), timeout=5)
    assert got is not None and got.device_id == device_id and got.properties["through"] == kind
    assert message.payload == b"to the device " + marker.encode()
    # TLS was end to end with the hub: its name, its certificate, its root
    assert info is not None
    assert info.sni == HOST
    assert info.anchor == "iothub-tls Local Hub Root"
    assert info.version in ("TLSv1.2", "TLSv1.3")
    # ...and the bytes went through the proxy, to the door's port
    log = proxy.log_text[before:]
    port = hub.ports[door]
    if isinstance(proxy, TinyProxy):
        assert f"CONNECT 127.0.0.1:{port}" in log, log[-2000:]
    else:
        assert f"127.0.0.1.{port}" in log and "tcp/connect" in log, log[-2000:]
    # the hub logged the device as it logs every connection (MqttWs/AmqpWs on 443)
    protocols = {"mqtt": "Mqtt", "mqtt-ws": "MqttWs", "amqp": "Amqp", "amqp-ws": "AmqpWs"}
    expected = protocols.get(transport, "Https")
    assert any(
        e.device_id == device_id and e.protocol == expected and e.result == "Success"
        for e in hub.log.events
    ), [e for e in hub.log.events if e.device_id == device_id]


def test_the_proxy_forwards_only_tls_records(hub: LocalHub, tmp_path: Path) -> None:
    """Between the proxy and the hub there is nothing but TLS records, from the
    ClientHello on: the proxy never sees the device's plaintext (here: its telemetry)."""
    require_binary("tinyproxy")
    require_binary("danted")
    with RecordRelay(hub.ports["mqtt"]) as relay:
        allowed = [relay.port]
        with (
            TinyProxy(tmp_path / "tp", connect_ports=allowed) as tp,
            Dante(tmp_path / "dante", allow_ports=allowed) as socks,
        ):
            for url in (tp.url(), socks.url()):
                marker = f"plaintext-{uuid.uuid4().hex}"
                with _client(hub, "mqtt", url, port=relay.port) as client:
                    client.send_telemetry(marker)
                assert hub.state.wait_for_telemetry(lambda t, m=marker: t.payload == m.encode())
        relay.wait_idle()
        assert len(relay.logs) == 2, "a connection did not go through the relay"
        for up, down in relay.logs:
            for direction in (up, down):
                assert direction.records, "no TLS record seen"
                assert all(kind in (20, 21, 22, 23) for kind, _ in direction.records)
                assert sum(5 + n for _, n in direction.records) == direction.total_bytes
            assert up.records[0][0] == 22  # the ClientHello came first


# -- the proxy refuses ----------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["mqtt", "amqp-ws", "https"])
def test_http_proxy_authentication_refused_is_a_proxy_error(
    hub: LocalHub,
    tinyproxy_auth: TinyProxy,
    transport: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="iothub_tls")
    # no credentials: 407
    client = _client(hub, transport, tinyproxy_auth.url())
    with pytest.raises(it.ProxyAuthenticationError, match="requires authentication") as caught:
        client.connect()
    client.close()
    error = caught.value
    assert error.status == 407
    assert error.proxy == tinyproxy_auth.url()
    assert f"127.0.0.1:{tinyproxy_auth.port}" in str(error)
    assert HOST not in str(error)  # the proxy refused, not the hub
    assert isinstance(error, it.ConnectionFailedError)
    # wrong credentials: refused, the password never shown
    wrong = "not-" + SECRET
    client = _client(hub, transport, tinyproxy_auth.url(USER, wrong))
    with pytest.raises(
        it.ProxyAuthenticationError, match="refused the credentials of 'alice'"
    ) as caught:
        client.connect()
    assert wrong not in repr(client)
    client.close()
    assert caught.value.status in (401, 407)
    assert wrong not in str(caught.value) and "***" in caught.value.proxy
    assert wrong not in caplog.text and SECRET not in caplog.text
    restored = pickle.loads(pickle.dumps(caught.value))
    assert (
        isinstance(restored, it.ProxyAuthenticationError) and restored.status == caught.value.status
    )


def test_the_password_appears_in_no_repr_error_or_log(
    hub: LocalHub, tinyproxy_auth: TinyProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="iothub_tls")
    url = tinyproxy_auth.url(USER, SECRET)
    for transport in TRANSPORTS:
        client = _client(hub, transport, url)
        with client:
            client.send_telemetry(b"x")
            text = repr(client)
        assert SECRET not in text
        if transport == "mqtt":
            assert f"via http://{USER}:***@127.0.0.1:{tinyproxy_auth.port}" in text
    assert SECRET not in repr(Proxy.parse(url))
    assert SECRET not in caplog.text


def test_socks5_authentication_refused_is_a_proxy_error(hub: LocalHub, dante_auth: Dante) -> None:
    client = _client(hub, "amqp", dante_auth.url())
    with pytest.raises(it.ProxyAuthenticationError, match="requires a user name and password"):
        client.connect()
    client.close()
    wrong = "wrong-" + SECRET
    client = _client(hub, "mqtt-ws", dante_auth.url(USER, wrong))
    with pytest.raises(it.ProxyAuthenticationError, match="refused the credentials") as caught:
        client.connect()
    client.close()
    assert wrong not in str(caught.value)
    assert f"socks5://{dante_auth.accounts[USER]}:***@127.0.0.1:{dante_auth.port}" in str(
        caught.value
    )


@pytest.mark.parametrize("transport", ["mqtt", "amqp", "https", "mqtt-ws"])
def test_http_proxy_that_refuses_connect_to_the_port(
    hub: LocalHub, tmp_path: Path, transport: str
) -> None:
    require_binary("tinyproxy")
    # this proxy allows CONNECT to 443 only (as many corporate proxies do)
    with TinyProxy(tmp_path / "tp", connect_ports=[443]) as proxy:
        client = _client(hub, transport, proxy.url())
        with pytest.raises(it.ProxyError, match="refused to open a tunnel") as caught:
            client.connect()
        client.close()
        log = proxy.log_text
    assert caught.value.status == 403
    assert "may not allow CONNECT to that port" in str(caught.value)
    assert not isinstance(caught.value, it.ProxyAuthenticationError)
    assert "Refused CONNECT method on port" in log


def test_socks_proxy_that_refuses_the_destination(hub: LocalHub, tmp_path: Path) -> None:
    require_binary("danted")
    with Dante(tmp_path / "dante", allow_ports=[443]) as proxy:
        for url, why in (
            (proxy.url(), "not allowed by ruleset"),
            (proxy.socks4_url(), "request rejected or failed"),
        ):
            client = _client(hub, "amqp", url)
            with pytest.raises(it.ProxyError, match="refused to open a tunnel") as caught:
                client.connect()
            client.close()
            assert f"127.0.0.1:{proxy.port}" in str(caught.value)
            assert why in str(caught.value)
            assert not isinstance(caught.value, it.ProxyAuthenticationError)


@pytest.mark.parametrize("scheme", ["http", "socks5", "socks4"])
@pytest.mark.parametrize("transport", ["mqtt", "amqp", "https", "amqp-ws"])
def test_a_proxy_that_is_down(hub: LocalHub, scheme: str, transport: str) -> None:
    port = free_port()  # nothing listens there
    client = _client(hub, transport, f"{scheme}://127.0.0.1:{port}")
    with pytest.raises(it.ProxyError, match="could not connect to the proxy") as caught:
        client.connect()
    client.close()
    assert f"{scheme}://127.0.0.1:{port}" in str(caught.value)
    assert "Connection refused" in str(caught.value)
    assert not isinstance(caught.value, it.ProxyAuthenticationError)


# -- TLS refusals through the tunnel: the same as direct -----------------------------------


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_wrong_root_is_refused_through_the_proxy(
    hub: LocalHub, transport: str, kind: str, request: pytest.FixtureRequest
) -> None:
    url, _ = _proxy_url(kind, request)
    other = it.TlsPolicy(roots=it.RootSet.from_pem(new_root("Not The Hub's Root").cert_pem))
    client = _client(hub, transport, url, policy=other)
    with pytest.raises(it.CertificateVerificationError, match="certificate verify failed"):
        client.connect()
    client.close()


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_ecc_only_refuses_an_rsa_hub_through_the_proxy(
    hub: LocalHub, rsa_hub: LocalHub, transport: str, kind: str, request: pytest.FixtureRequest
) -> None:
    url, _ = _proxy_url(kind, request)
    ecc = _policy(rsa_hub, ciphers=it.CipherProfile.ECC_ONLY)
    client = _client(rsa_hub, transport, url, policy=ecc)
    with pytest.raises(it.CipherSuiteError, match="ECC-only mode needs an ECDSA certificate"):
        client.connect()
    client.close()
    # the twin that passes: the same proxy, the hub with an ECDSA certificate
    ok = _client(hub, transport, url, policy=_policy(hub, ciphers=it.CipherProfile.ECC_ONLY))
    with ok:
        assert ok.tls_info is not None and ok.tls_info.server_key_type == "EC"


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("proxy.example:3128", "has no scheme"),
        ("ftp://proxy.example:21", "unsupported scheme 'ftp'"),
        ("https://proxy.example:443", "TLS to the proxy itself"),
        ("http://:3128", "names no host"),
        ("http://proxy.example:99999", "not a valid URL"),
        ("http://proxy.example:3128/path", "has a path or query"),
        ("socks4://user:" + SECRET + "@proxy.example:1080", "SOCKS4 has no passwords"),
        ("", "empty string"),
    ],
)
def test_malformed_proxy_urls_are_policy_errors(url: str, says: str) -> None:
    with pytest.raises(it.PolicyError, match=says) as caught:
        MqttDeviceClient.from_connection_string(
            f"HostName={HOST};DeviceId=d;SharedAccessKey=AAAA", proxy=url
        )
    assert SECRET not in str(caught.value)
    with pytest.raises(it.PolicyError, match="proxy must be a URL string"):
        HttpsDeviceClient.from_connection_string(
            f"HostName={HOST};DeviceId=d;SharedAccessKey=AAAA",
            proxy=3128,  # type: ignore[arg-type]
        )


def test_environment_proxy_only_when_asked(
    hub: LocalHub, dante: Dante, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("HTTPS_PROXY", dante.url())
    # not asked: direct, whatever the environment says
    before = len(dante.log_text)
    with _client(hub, "mqtt", None) as client:
        client.send_telemetry(b"direct")
    assert f"127.0.0.1.{hub.ports['mqtt']}" not in dante.log_text[before:]
    # asked: through HTTPS_PROXY
    with _client(hub, "amqp", "env") as client:
        client.send_telemetry(b"through the environment's proxy")
    assert f"127.0.0.1.{hub.ports['amqp']}" in dante.log_text[before:]
    # NO_PROXY names the host: direct again
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.0/8")
    before = len(dante.log_text)
    with _client(hub, "https", "env") as client:
        client.send_telemetry(b"bypassed")
    assert f"127.0.0.1.{hub.ports['https']}" not in dante.log_text[before:]


def test_no_proxy_rules() -> None:
    env = {"HTTPS_PROXY": "http://u:pw@proxy:3128", "NO_PROXY": ".corp.example, 10.0.0.0/8,h:8883"}
    assert proxy_for("env", "hub.corp.example", 8883, env) is None
    assert proxy_for("env", "corp.example", 8883, env) is None
    assert proxy_for("env", "10.1.2.3", 443, env) is None
    assert proxy_for("env", "h", 8883, env) is None
    found = proxy_for("env", "h", 443, env)
    assert found is not None and found.url == "http://u:***@proxy:3128"
    assert proxy_for("env", "hub.azure-devices.net", 443, env) == found
    assert proxy_for("env", "x", 1, {"https_proxy": "proxy:8080"}) == Proxy("http", "proxy", 8080)
    assert proxy_for("env", "x", 1, {"HTTPS_PROXY": "socks5://p", "NO_PROXY": "*"}) is None
    assert proxy_for("env", "x", 1, {}) is None
    assert proxy_for(None, "x", 1, env) is None
    with pytest.raises(it.PolicyError, match="HTTPS_PROXY in the environment"):
        proxy_for("env", "x", 1, {"HTTPS_PROXY": "gopher://p:70"})
