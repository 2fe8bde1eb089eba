"""The HTTPS door's HTTP/1.1 request heads (iothub_tls.hub.http1): pure parsing first,
then the same refusals and keep-alive rules over a real TLS connection to the door,
where each refusal is its status, a JSON body saying why, and the connection closed."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest

import iothub_tls as it
from iothub_tls.hub import DeviceRegistry, HubTlsProfile, ServerCredential, http1
from iothub_tls.hub.https import HttpsEndpoint
from tests.conftest import HOST, PKI

# -- pure ------------------------------------------------------------------------------------


def test_a_request_head_is_read_with_its_fields():
    data = (
        b"\r\nPOST /devices/d/messages/events?api-version=1 HTTP/1.1\r\n"
        b"Host: hub\r\nContent-Length:  5 \r\niothub-app-k: v\r\nIOTHUB-APP-K: w\r\n\r\n"
    )
    assert http1.head_end(data) == len(data)
    head = http1.parse_head(data)
    assert (head.method, head.target, head.version) == (
        "POST",
        "/devices/d/messages/events?api-version=1",
        (1, 1),
    )
    assert head.headers.get("content-length") == "5"  # trimmed, any case
    assert head.headers.get_all("iothub-app-k") == ["v", "w"]
    assert head.headers.get("Iothub-App-K") == "v"  # the first
    assert head.headers.as_dict()["IOTHUB-APP-K"] == "w"
    assert head.keep_alive and not head.expects_continue


def test_a_head_is_incomplete_until_its_empty_line():
    assert http1.head_end(b"") == -1
    assert http1.head_end(b"\r\n\r\n") == -1  # empty lines before a request are skipped
    assert http1.head_end(b"GET / HTTP/1.1\r\nHost: h\r\n") == -1
    assert http1.head_end(b"GET / HTTP/1.1\nHost: h\n\nrest") == len(b"GET / HTTP/1.1\nHost: h\n\n")


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        ("HTTP/1.1", None, True),
        ("HTTP/1.1", "close", False),
        ("HTTP/1.1", "Close", False),
        ("HTTP/1.0", None, False),
        ("HTTP/1.0", "keep-alive", True),
    ],
)
def test_keep_alive_follows_the_version_and_connection(version, connection, keep_alive):
    fields = f"Connection: {connection}\r\n" if connection else ""
    head = http1.parse_head(f"GET / {version}\r\n{fields}\r\n".encode())
    assert head.keep_alive is keep_alive


def test_expect_100_continue_only_from_http_1_1():
    assert http1.parse_head(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").expects_continue
    assert not http1.parse_head(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").expects_continue


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"GET /\r\n\r\n", 400, "bad request line"),
        (b"GET  / HTTP/1.1\r\n\r\n", 400, "bad request line"),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400, "bad request line"),
        (b"GET / HTTX/1.1\r\n\r\n", 400, "bad HTTP version"),
        (b"GET / HTTP/2.0\r\n\r\n", 505, "HTTP version HTTP/2.0 is not supported"),
        (b"G(T / HTTP/1.1\r\n\r\n", 400, "bad request method"),
        (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400, "bad header field line"),
        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400, "bad header field line"),
        (b"GET / HTTP/1.1\r\nA: b\r\n  folded\r\n\r\n", 400, "folded over several lines"),
        (
            b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % n for n in range(101)) + b"\r\n",
            431,
            "more than 100 header fields",
        ),
    ],
    ids=[
        "two-words",
        "double-space",
        "four-words",
        "not-http",
        "http-2",
        "bad-method",
        "space-before-colon",
        "no-colon",
        "obs-fold",
        "101-fields",
    ],
)
def test_bad_heads_are_refused_with_the_status_rfc_9112_names(data, status, message):
    with pytest.raises(http1.HeadError) as refused:
        http1.parse_head(data)
    assert refused.value.status == status
    assert message in refused.value.message


def test_an_incomplete_head_beyond_its_bounds_is_refused_before_it_ends():
    with pytest.raises(http1.HeadError) as line:
        http1.check_incomplete(b"GET /" + b"a" * http1.MAX_REQUEST_LINE)
    assert line.value.status == 414
    with pytest.raises(http1.HeadError) as head:
        http1.check_incomplete(b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 30000)
    assert head.value.status == 431
    http1.check_incomplete(b"GET / HTTP/1.1\r\nA: b\r\n")  # within bounds: wait for more


# -- over TLS --------------------------------------------------------------------------------


@pytest.fixture
def endpoint(pki: PKI, start_door: Callable[..., Any]) -> HttpsEndpoint:
    creds = tuple(
        ServerCredential.from_pem(issued.cert_chain_pem, issued.key_pem)
        for issued in (pki.rsa_leaf, pki.ec_leaf)
    )
    registry = DeviceRegistry(HOST)
    registry.add_sas_device("dev-sas")
    door: HttpsEndpoint = start_door(HttpsEndpoint, HubTlsProfile(creds), registry)
    return door


def raw_tls(endpoint: HttpsEndpoint, pki: PKI) -> ssl.SSLSocket:
    ctx = it.create_ssl_context(pki.policy())
    raw = socket.create_connection(("127.0.0.1", endpoint.port), 10)
    return ctx.wrap_socket(raw, server_hostname=HOST)


def read_until_closed(tls: ssl.SSLSocket) -> bytes:
    data = b""
    while True:
        try:
            chunk = tls.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            return data
        if not chunk:
            return data
        data += chunk


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split what the door sent into (status, headers, body) by Content-Length."""
    found = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        found.append((status, headers, data[:length]))
        data = data[length:]
    return found


def events_request(registry: DeviceRegistry, body: bytes, extra: str = "") -> bytes:
    key = registry.get("dev-sas").primary_key  # type: ignore[union-attr]
    token = it.generate_sas_token(f"{HOST}/devices/dev-sas", key)
    return (
        f"POST /devices/dev-sas/messages/events?api-version=2021-04-12 HTTP/1.1\r\n"
        f"Host: {HOST}\r\nAuthorization: {token}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def test_pipelined_requests_are_answered_in_order_on_one_connection(endpoint, pki):
    registry = endpoint.registry
    with raw_tls(endpoint, pki) as tls:
        tls.sendall(
            events_request(registry, b"first")
            + events_request(registry, b"second")
            + events_request(registry, b"third", "Connection: close\r\n")
        )
        answers = responses(read_until_closed(tls))
    assert [status for status, _, _ in answers] == [204, 204, 204]
    assert "connection" not in answers[0][1]
    assert answers[2][1]["connection"] == "close"
    assert [m.body for m in endpoint.received] == [b"first", b"second", b"third"]
    connects = [e for e in endpoint.connections if e.operation == "deviceConnect"]
    assert len(connects) == 1  # one connection, one log line


def test_an_http_1_0_request_is_answered_and_closed(endpoint, pki):
    request = events_request(endpoint.registry, b"old").replace(b"HTTP/1.1\r\n", b"HTTP/1.0\r\n", 1)
    with raw_tls(endpoint, pki) as tls:
        tls.sendall(request)
        [(status, headers, _)] = responses(read_until_closed(tls))
    assert (status, headers["connection"]) == (204, "close")


@pytest.mark.parametrize(
    ("request_", "status", "message"),
    [
        (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505, "not supported"),
        (b"BREW /pot HTTP/1.1\r\nHost: h\r\n\r\n", 501, "unsupported method 'BREW'"),
        (b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n", 400, "folded"),
        (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400, "bad header field line"),
    ],
    ids=["http-2", "unknown-method", "obs-fold", "space-before-colon"],
)
def test_refused_heads_are_answered_and_closed(endpoint, pki, request_, status, message):
    with raw_tls(endpoint, pki) as tls:
        tls.sendall(request_)
        [(got, headers, body)] = responses(read_until_closed(tls))
    assert (got, headers["connection"]) == (status, "close")
    assert message in json.loads(body)["Message"]
    assert endpoint.received == ()
