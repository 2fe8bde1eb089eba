"""iothub_tls.https: the REST protocol as pure data, the client's construction and
error mapping, and the hardened context inside requests, urllib3 and httpx — each
library talking to the local endpoint over real TLS, accepted and refused."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

import iothub_tls as it
from iothub_tls.https import (
    BadRequestError,
    C2DMessage,
    DeviceNotFoundError,
    HttpsDeviceClient,
    HttpsOptions,
    HubServerError,
    InvalidMessageError,
    Message,
    MessageLockLostError,
    MessageTooLargeError,
    RetryPolicy,
    ThrottledError,
    UnexpectedResponseError,
)
from iothub_tls.https import conventions as proto
from iothub_tls.https.http11 import HttpProtocolError, RequestWriter, ResponseReader
from iothub_tls.hub import DeviceRegistry, HttpsEndpoint, HubTlsProfile, ServerCredential
from tests.conftest import HOST, PKI

# -- requests as data -------------------------------------------------------------------------


def test_telemetry_request_carries_properties_as_headers():
    message = Message(
        b"payload",
        {"temp": "21.5", "unit": "C"},
        message_id="m-1",
        correlation_id="c-1",
        content_type="application/json",
        content_encoding="utf-8",
    )
    request = proto.events_request("dev 1/a#b", message)
    assert request.method == "POST"
    assert request.path == "/devices/dev%201%2Fa%23b/messages/events?api-version=2021-04-12"
    assert request.body == b"payload"
    headers = request.headers
    assert headers["iothub-app-temp"] == "21.5" and headers["iothub-app-unit"] == "C"
    assert headers["iothub-messageid"] == "m-1"
    assert headers["iothub-correlationid"] == "c-1"
    assert headers["iothub-contenttype"] == "application/json"
    assert headers["iothub-contentencoding"] == "utf-8"
    assert headers["iothub-to"] == "/devices/dev%201%2Fa%23b/messages/events"
    assert headers["Content-Type"] == "application/octet-stream"


def test_batch_body_format_and_round_trip():
    messages = [Message(b"\xff\x00", {"a": "1"}, message_id="x"), Message(b"plain")]
    request = proto.batch_request("dev", messages)
    assert request.headers["Content-Type"] == "application/vnd.microsoft.iothub.json"
    body = json.loads(request.body)
    assert body == [
        {
            "body": base64.b64encode(b"\xff\x00").decode(),
            "properties": {"iothub-messageid": "x", "iothub-app-a": "1"},
        },
        {"body": base64.b64encode(b"plain").decode()},
    ]
    parsed = proto.parse_batch(request.body)
    assert [(m.payload, dict(m.properties), m.message_id) for m in parsed] == [
        (b"\xff\x00", {"a": "1"}, "x"),
        (b"plain", {}, None),
    ]


def test_batch_item_with_text_body_is_read_as_utf8():
    body = json.dumps([{"body": "héllo", "base64Encoded": False}]).encode()
    assert proto.parse_batch(body)[0].payload == "héllo".encode()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not JSON"),
        (b"[]", "non-empty JSON array"),
        (b'[{"nobody": 1}]', "no string 'body'"),
        (b'[{"body": "***"}]', "not base64"),
    ],
)
def test_bad_batch_bodies_are_refused(body, message):
    with pytest.raises(InvalidMessageError, match=message):
        proto.parse_batch(body)


def test_settlement_requests():
    complete = proto.complete_request("dev", "lock-1")
    reject = proto.reject_request("dev", "lock-1")
    abandon = proto.abandon_request("dev", "lock-1")
    assert (complete.method, complete.path) == (
        "DELETE",
        "/devices/dev/messages/deviceBound/lock-1?api-version=2021-04-12",
    )
    assert (reject.method, reject.path) == (
        "DELETE",
        "/devices/dev/messages/deviceBound/lock-1?api-version=2021-04-12&reject",
    )
    assert (abandon.method, abandon.path) == (
        "POST",
        "/devices/dev/messages/deviceBound/lock-1/abandon?api-version=2021-04-12",
    )
    assert complete.headers["If-Match"] == '"lock-1"'
    receive = proto.receive_request("dev", api_version="2020-03-13")
    assert receive.path == "/devices/dev/messages/deviceBound?api-version=2020-03-13"
    with pytest.raises(InvalidMessageError, match="lock_token"):
        proto.complete_request("dev", "")


def test_c2d_response_is_parsed():
    headers = {
        "ETag": '"3f1c"',
        "iothub-messageid": "mid",
        "IoTHub-SequenceNumber": "42",  # header names are case-insensitive
        "iothub-deliverycount": "2",
        "iothub-app-Priority": "high",
        "ContentType": "text/plain",
        "iothub-enqueuedtime": "2026-01-01T00:00:00Z",
    }
    message = proto.parse_c2d(200, headers, b"body")
    assert isinstance(message, C2DMessage)
    assert message.lock_token == "3f1c"
    assert message.delivery_count == 2 and message.transport == "https"
    assert message.system_properties["iothub-sequencenumber"] == "42"
    assert message.system_properties["iothub-enqueuedtime"] == "2026-01-01T00:00:00Z"
    assert dict(message.properties) == {"Priority": "high"}
    assert message.content_type == "text/plain"
    assert proto.parse_c2d(204, {}, b"") is None
    with pytest.raises(UnexpectedResponseError, match="no ETag"):
        proto.parse_c2d(200, {}, b"x")
    # What the endpoint sends is what the client reads.
    again = proto.parse_c2d(200, proto.c2d_headers(message), b"body")
    assert again is not None
    fields = ("payload", "properties", "message_id", "content_type", "delivery_count",
              "lock_token", "system_properties")  # fmt: skip
    assert [getattr(again, f) for f in fields] == [getattr(message, f) for f in fields]


def test_error_body_is_parsed():
    body = proto.error_body("DeviceNotFound", "Device abc not registered", "0a1b2c")
    info = proto.parse_error({}, body)
    assert info == proto.HubErrorInfo("DeviceNotFound", "Device abc not registered", "0a1b2c")
    from_header = proto.parse_error({"iothub-errorcode": "ServerBusy"}, b"")
    assert from_header.code == "ServerBusy"
    plain = proto.parse_error({}, b"<html>gateway timeout</html>")
    assert plain.code is None and "gateway timeout" in plain.message


@pytest.mark.parametrize(
    ("status", "cls", "bases"),
    [
        (400, BadRequestError, (it.ClientError,)),
        (401, it.AuthenticationError, (it.ClientError,)),
        (403, it.NotAuthorizedError, (it.ClientError,)),
        (404, DeviceNotFoundError, (it.ClientError, LookupError)),
        (412, MessageLockLostError, (it.DeliveryError,)),
        (413, MessageTooLargeError, (it.DeliveryError, ValueError)),
        (429, ThrottledError, (it.ClientError,)),
        (500, HubServerError, (it.ClientError,)),
        (503, HubServerError, (it.ClientError,)),
        (418, UnexpectedResponseError, (it.ClientError,)),
    ],
)
def test_status_mapping(status, cls, bases):
    info = proto.HubErrorInfo("Code", "text", "track-1")
    exc = proto.error_for_status(status, info, operation="send telemetry", retry_after=3)
    assert type(exc) is cls
    assert isinstance(exc, bases) and isinstance(exc, it.IoTHubTLSError)
    assert (exc.status, exc.error_code, exc.tracking_id) == (status, "Code", "track-1")
    assert str(exc).startswith(f"send telemetry failed with HTTP {status} (Code: text)")
    if status == 429:
        assert exc.retry_after == 3


def test_retry_after_header_forms():
    assert proto.parse_retry_after("7") == 7.0
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert proto.parse_retry_after(date, now=1_000_000) == 30.0
    assert proto.parse_retry_after(None) is None
    assert proto.parse_retry_after("soon") is None


# -- HTTP/1.1 without I/O (iothub_tls.https.http11) ----------------------------------------

BASE = {"Host": HOST, "User-Agent": "iothub-tls/test", "Accept": "application/json"}
BASE_ACCEPT = "Accept: application/json"


def test_request_is_one_piece_with_content_length():
    writer = RequestWriter(BASE)
    request = proto.events_request("dev", Message(b"body", {"k": "v"}))
    data = writer.encode(request.method, request.path, request.headers, request.body)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /devices/dev/messages/events?api-version=2021-04-12 HTTP/1.1"
    assert lines[1:4] == [
        f"Host: {HOST}",
        "User-Agent: iothub-tls/test",
        "Accept: application/json",
    ]
    assert "iothub-app-k: v" in lines and lines[-1] == "Content-Length: 4"
    assert body == b"body"
    # POST without a body still says so; GET and DELETE carry no Content-Length
    assert writer.encode("POST", "/a", {}).endswith(b"Content-Length: 0\r\n\r\n")
    assert b"Content-Length" not in writer.encode("DELETE", "/a", {"If-Match": '"x"'})


@pytest.mark.parametrize(
    ("method", "target", "headers", "message"),
    [
        ("POST", "/a", {"X": "v\r\nInjected: yes"}, "header 'X' holds CR, LF or NUL"),
        ("POST", "/a", {"X": "v\nInjected: yes"}, "header 'X' holds CR, LF or NUL"),
        ("POST", "/a", {"X": "v\rx"}, "header 'X' holds CR, LF or NUL"),
        ("POST", "/a", {"X": "v\x00"}, "header 'X' holds CR, LF or NUL"),
        ("POST", "/a", {"Bad Name": "v"}, "not an HTTP token"),
        ("POST", "/a", {"X": "é"}, "not ASCII"),
        ("POST", "/a HTTP/1.1\r\nX: y", {}, "not a valid request target"),
        ("GET /", "/a", {}, "not a valid request"),
        ("POST", "a", {}, "not a valid request"),
    ],
)
def test_request_writer_refuses_what_would_split_the_request(method, target, headers, message):
    with pytest.raises(ValueError, match=message):
        RequestWriter(BASE).encode(method, target, headers, b"x")
    with pytest.raises(ValueError, match="holds CR, LF or NUL"):
        RequestWriter({"Host": "h\r\nX: y"})


def _read(data: bytes, method: str = "GET", pieces: int = 1):
    reader = ResponseReader()
    reader.start(method)
    size = max(1, len(data) // pieces)
    found = None
    for start in range(0, len(data), size):
        got = reader.feed(data[start : start + size])
        if got is not None:
            assert found is None, "two responses"
            found = got
    return found, reader


@pytest.mark.parametrize("pieces", [1, 3, 1000])
def test_response_framings(pieces):
    # Content-Length
    ok, _ = _read(b'HTTP/1.1 200 OK\r\nETag: "t"\r\nContent-Length: 5\r\n\r\nhello', pieces=pieces)
    assert (ok.status, ok.reason, ok.headers["ETag"], ok.body, ok.keep_alive) == (
        200, "OK", '"t"', b"hello", True
    )  # fmt: skip
    # 204 and HEAD: no body, whatever the headers say
    empty, reader = _read(b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n", pieces=pieces)
    assert (empty.status, empty.body, empty.keep_alive) == (204, b"", True)
    assert not reader.waiting
    head, _ = _read(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", "HEAD", pieces)
    assert head.body == b""
    # chunked, with an extension and a trailer; an interim 100 first
    chunked, _ = _read(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=x\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: 1\r\n\r\n",
        pieces=pieces,
    )
    assert (chunked.status, chunked.body, chunked.keep_alive) == (200, b"hello world", True)
    # Connection: close, HTTP/1.0, and folded and repeated headers
    closing, _ = _read(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nX: a\r\nX: b\r\nY: one\r\n two\r\n"
        b"Content-Length: 0\r\n\r\n",
        pieces=pieces,
    )
    assert closing.keep_alive is False
    assert (closing.headers["X"], closing.headers["Y"]) == ("a, b", "one two")
    old, _ = _read(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", pieces=pieces)
    assert old.keep_alive is False


def test_a_body_read_to_the_close():
    reader = ResponseReader()
    reader.start("GET")
    assert reader.feed(b"HTTP/1.1 200 OK\r\n\r\npart one, ") is None
    assert reader.feed(b"part two") is None
    response = reader.eof()
    assert response is not None and response.body == b"part one, part two"
    assert response.keep_alive is False
    # a response cut short by the close is no response
    reader = ResponseReader()
    reader.start("GET")
    assert reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort") is None
    assert reader.eof() is None


def test_bytes_beyond_the_response_end_end_keep_alive():
    response, reader = _read(b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert response.status == 204 and response.keep_alive is False
    reader.start("GET")  # the connection is not reused; the reader starts clean


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x status line"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "not an HTTP/1.x response"),  # no need to wait
        (b"HTX", "not an HTTP/1.x response"),
        (b"HTTP/2 200\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nBad Name: v\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\n folded first\r\n\r\n", "starts with whitespace"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-length: 2\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "too large"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxy", "not followed by CRLF"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000, "head is larger"),
    ],
)  # fmt: skip
def test_malformed_responses_are_refused(data, message):
    reader = ResponseReader()
    reader.start("GET")
    with pytest.raises(HttpProtocolError, match=message):
        reader.feed(data)


def test_bytes_nobody_asked_for_are_refused():
    reader = ResponseReader()
    with pytest.raises(HttpProtocolError, match="sent 8 bytes unasked"):
        reader.feed(b"HTTP/1.1")
    with pytest.raises(HttpProtocolError, match="unasked"):
        reader.start("GET")  # they are not the answer to the next request either


@given(
    status=st.sampled_from([200, 400, 401, 404, 412, 429, 503]),
    headers=st.dictionaries(
        st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True).filter(
            lambda n: n.lower() not in ("content-length", "transfer-encoding", "connection")
        ),
        st.from_regex(r"[ -~]{0,40}", fullmatch=True).map(str.strip),
        max_size=8,
    ),
    body=st.binary(max_size=3000),
    chunked=st.booleans(),
    cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=6),
)
def test_any_response_reads_the_same_however_it_arrives(status, headers, body, chunked, cuts):
    lines = [f"HTTP/1.1 {status} Reason", *(f"{k}: {v}" for k, v in headers.items())]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        framed = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 700]), body[i : i + 700])
                          for i in range(0, len(body), 700)) + b"0\r\n\r\n"  # fmt: skip
    else:
        lines.append(f"Content-Length: {len(body)}")
        framed = body
    data = ("\r\n".join(lines) + "\r\n\r\n").encode() + framed
    reader = ResponseReader()
    reader.start("GET")
    pieces, start = [], 0
    for cut in sorted(set(cuts)):
        pieces.append(data[start:cut])
        start = max(start, cut)
    pieces.append(data[start:])
    results = [reader.feed(piece) for piece in pieces if piece]
    (response,) = [r for r in results if r is not None]
    assert results[-1] is response  # complete only when the last byte arrived
    assert (response.status, response.body, response.keep_alive) == (status, body, True)
    got = {k: v for k, v in response.headers.items() if k.lower() != "transfer-encoding"}
    got.pop("Content-Length", None)
    assert got == headers


# -- messages refused before sending -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"properties": {"has space": "v"}}, "property name 'has space' cannot be sent"),
        ({"properties": {"k": "two words"}}, "value of property 'k'"),
        ({"properties": {"iothub-messageid": "x"}}, "reserved"),
        ({"message_id": "x" * 129}, "message_id"),
        ({"message_id": "a b"}, "message_id"),
        ({"content_type": "text/plain\r\nX: y"}, "printable ASCII"),
    ],
)
def test_invalid_messages(kwargs, message):
    with pytest.raises(InvalidMessageError, match=message):
        proto.check_message(Message(b"x", **kwargs))
    with pytest.raises(InvalidMessageError, match=message):  # and the request refuses it
        proto.events_request("d", Message(b"x", **kwargs))


def test_message_body_types_and_size():
    assert Message("é").payload == "é".encode()
    with pytest.raises(TypeError, match="bytes or str"):
        Message(12)  # type: ignore[arg-type]
    assert Message(b"1234", {"ab": "cd"}, message_id="m").size == 4 + 4 + 1
    with pytest.raises(MessageTooLargeError, match="split it"):
        proto.events_request("d", Message(b"x" * proto.MAX_MESSAGE_BYTES, {"k": "v"}))
    with pytest.raises(MessageTooLargeError, match="several batches"):
        proto.batch_request("d", [Message(b"x" * 200_000), Message(b"x" * 100_000)])
    with pytest.raises(InvalidMessageError, match="at least one"):
        proto.batch_request("d", [])


# -- the client's construction ----------------------------------------------------------------

KEY = base64.b64encode(b"k" * 32).decode()


def test_client_refuses_what_https_cannot_do():
    with pytest.raises(it.UnsupportedOperationError, match="module identities"):
        HttpsDeviceClient.from_connection_string(
            f"HostName={HOST};DeviceId=d;ModuleId=m;SharedAccessKey={KEY}"
        )
    with pytest.raises(it.IdentityError, match="x509=true: pass identity="):
        HttpsDeviceClient.from_connection_string(f"HostName={HOST};DeviceId=d;x509=true")
    with pytest.raises(it.PolicyError, match="port"):
        HttpsDeviceClient.from_connection_string(
            f"HostName={HOST};DeviceId=d;SharedAccessKey={KEY}", port=0
        )


def test_retry_policy_of_the_https_client():
    cs = f"HostName={HOST};DeviceId=d;SharedAccessKey={KEY}"
    client = HttpsDeviceClient.from_connection_string(cs)
    assert client.options.retry == RetryPolicy(initial_delay=0.5, max_delay=30, max_attempts=4)
    with pytest.raises(it.PolicyError, match=r"finite RetryPolicy\.max_attempts"):
        HttpsOptions(retry=RetryPolicy(max_attempts=None))
    with pytest.raises(it.PolicyError, match="retry must be a RetryPolicy"):
        HttpsOptions(retry=4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="options must be HttpsOptions"):
        HttpsDeviceClient.from_connection_string(cs, options=RetryPolicy())


def test_client_repr_has_no_secret():
    client = HttpsDeviceClient.from_connection_string(
        f"HostName={HOST};DeviceId=d;SharedAccessKey={KEY}", host="127.0.0.1", port=8443
    )
    assert KEY not in repr(client)
    assert "via 127.0.0.1:8443 (sas, closed)" in repr(client)
    assert client.tls_info is None


def test_the_client_needs_no_http_library(monkeypatch, pki, dual_hub, lib_registry):
    # Its HTTP/1.1 is its own (iothub_tls.https.http11): urllib3, requests and h11 may be
    # missing, and the client still talks to the hub.
    # Submodules too: an earlier test may have imported requests.adapters, which Python
    # would then find in sys.modules without importing its parent.
    for name in [m for m in sys.modules if m.split(".")[0] in ("urllib3", "requests", "h11")]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in ("urllib3", "requests", "h11"):
        monkeypatch.setitem(sys.modules, name, None)
    key = lib_registry.get(DEVICE).primary_key
    client = HttpsDeviceClient.from_connection_string(
        f"HostName={HOST};DeviceId={DEVICE};SharedAccessKey={key}",
        policy=pki.policy(),
        host="127.0.0.1",
        port=dual_hub.port,
    )
    before = len(dual_hub.received)
    with client:
        client.send_telemetry(b"without urllib3")
    assert dual_hub.received[before].body == b"without urllib3"
    # The requests adapter does need requests, and names the extra that brings it.
    from iothub_tls.https import adapter

    with pytest.raises(it.MissingDependencyError, match=r"pip install 'iothub-tls\[requests\]'"):
        adapter._hardened_adapter_class()


def test_importing_the_module_imports_neither_requests_nor_urllib3():
    code = (
        "import sys, iothub_tls.https as h;"
        "print('requests' in sys.modules, 'urllib3' in sys.modules);"
        "h.HardenedAdapter; print('requests' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False", "True"]


# -- the endpoint, for the library tests ----------------------------------------------------------

DEVICE = "lib-dev"


@pytest.fixture(scope="module")
def lib_registry() -> DeviceRegistry:
    registry = DeviceRegistry(HOST)
    registry.add_sas_device(DEVICE)
    return registry


def _endpoint(pki: PKI, registry: DeviceRegistry, *leaves) -> Iterator[HttpsEndpoint]:
    profile = HubTlsProfile(
        tuple(ServerCredential.from_pem(leaf.cert_chain_pem, leaf.key_pem) for leaf in leaves)
    )
    with HttpsEndpoint(profile, registry) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def dual_hub(pki, lib_registry) -> Iterator[HttpsEndpoint]:
    yield from _endpoint(pki, lib_registry, pki.rsa_leaf, pki.ec_leaf)


@pytest.fixture(scope="module")
def rsa_hub(pki, lib_registry) -> Iterator[HttpsEndpoint]:
    yield from _endpoint(pki, lib_registry, pki.rsa_leaf)


def _url(endpoint: HttpsEndpoint) -> str:
    # "localhost" is in the test certificate, so libraries can use a normal URL.
    return (
        f"https://localhost:{endpoint.port}/devices/{DEVICE}/messages/events?api-version=2021-04-12"
    )


def _auth(registry: DeviceRegistry) -> dict[str, str]:
    key = registry.get(DEVICE).primary_key
    return {"Authorization": it.generate_sas_token(f"{HOST}/devices/{DEVICE}", key)}


def _chain(exc: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            reason = getattr(exc, "reason", None)
            nxt = reason if isinstance(reason, BaseException) else None
        if nxt is None and exc.args and isinstance(exc.args[0], BaseException):
            nxt = exc.args[0]
        exc = nxt
    return seen


ECC_ONLY = {"ciphers": it.CipherProfile.ECC_ONLY}


# -- requests ---------------------------------------------------------------------------------


def test_requests_plain_adapter_with_the_context_fails_loudly(pki, dual_hub, lib_registry):
    requests = pytest.importorskip("requests")
    from requests.adapters import HTTPAdapter

    ctx = it.create_ssl_context(pki.policy())

    class ContextAdapter(HTTPAdapter):  # the recipe found in many answers online
        def init_poolmanager(self, *args, **kwargs):
            kwargs["ssl_context"] = ctx
            super().init_poolmanager(*args, **kwargs)

    with requests.Session() as session:
        session.mount("https://", ContextAdapter())
        with pytest.raises(it.PolicyError, match=r"load_verify_locations\(\) is not allowed"):
            session.post(_url(dual_hub), data=b"x", headers=_auth(lib_registry))
    assert dual_hub.received == () or all(m.body != b"x" for m in dual_hub.received)


def test_requests_hardened_adapter_sends_and_reports(pki, dual_hub, lib_registry):
    requests = pytest.importorskip("requests")
    from iothub_tls.https import HardenedAdapter

    before = len(dual_hub.received)
    with requests.Session() as session:
        session.mount("https://", HardenedAdapter(pki.policy()))
        response = session.post(
            _url(dual_hub), data=b"via requests", headers=_auth(lib_registry), stream=True
        )
        info = it.tls_info(response.raw.connection)
        response.close()
    assert response.status_code == 204
    assert dual_hub.received[before].body == b"via requests"
    assert (info.version, info.sni, info.anchor) == (
        "TLSv1.3",
        "localhost",
        "iothub-tls Test Root G2",
    )


def test_requests_hardened_adapter_keeps_ecc_only_refusal(pki, rsa_hub, lib_registry):
    requests = pytest.importorskip("requests")
    from iothub_tls.https import HardenedAdapter

    with requests.Session() as session:
        session.mount("https://", HardenedAdapter(pki.policy(**ECC_ONLY)))
        with pytest.raises(requests.exceptions.SSLError) as err:
            session.post(_url(rsa_hub), data=b"x", headers=_auth(lib_registry))
    assert any(isinstance(e, it.CipherSuiteError) for e in _chain(err.value))
    assert "ECC-only mode needs an ECDSA certificate" in str(err.value)


def test_requests_hardened_adapter_keeps_pinning(dual_hub, lib_registry):
    requests = pytest.importorskip("requests")
    from iothub_tls.https import HardenedAdapter

    with requests.Session() as session:
        session.mount("https://", HardenedAdapter())  # pinned to the Azure roots
        with pytest.raises(requests.exceptions.SSLError) as err:
            session.post(_url(dual_hub), data=b"x", headers=_auth(lib_registry))
    assert any(isinstance(e, it.CertificateVerificationError) for e in _chain(err.value))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"verify": False}, "verify=False is not allowed"),
        ({"verify": "/srv/extra-ca.pem"}, "RootSet.from_pem_file"),
        ({"cert": ("c.pem", "k.pem")}, "identity=ClientIdentity"),
    ],
)
def test_requests_hardened_adapter_refuses_weakening(pki, dual_hub, kwargs, message):
    requests = pytest.importorskip("requests")
    from iothub_tls.https import HardenedAdapter

    with requests.Session() as session:
        session.mount("https://", HardenedAdapter(pki.policy()))
        with pytest.raises(it.PolicyError, match=message):
            session.get(_url(dual_hub), **kwargs)


def test_requests_environment_ca_bundle_is_left_out(
    pki, dual_hub, lib_registry, monkeypatch, tmp_path
):
    requests = pytest.importorskip("requests")
    from iothub_tls.https import HardenedAdapter

    bundle = tmp_path / "corporate-ca.pem"
    bundle.write_bytes(pki.root.cert_pem)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    with requests.Session() as session:
        # The pinned Azure roots stay the only anchors: the environment's bundle (which
        # holds the test root) is not added, so the test hub is still refused...
        session.mount("https://", HardenedAdapter())
        with pytest.raises(requests.exceptions.SSLError):
            session.post(_url(dual_hub), data=b"x", headers=_auth(lib_registry))
        # ...and a policy that pins the test root works with the variable set.
        session.mount("https://", HardenedAdapter(pki.policy()))
        ok = session.post(_url(dual_hub), data=b"env", headers=_auth(lib_registry))
    assert ok.status_code == 204


def test_hardened_adapter_takes_a_ready_context_only_from_us(pki):
    pytest.importorskip("requests")
    import ssl

    from iothub_tls.https import HardenedAdapter

    ctx = it.create_ssl_context(pki.policy())
    assert HardenedAdapter(context=ctx).ssl_context is ctx
    with pytest.raises(it.PolicyError, match="create_ssl_context"):
        HardenedAdapter(context=ssl.create_default_context())  # type: ignore[arg-type]
    with pytest.raises(it.PolicyError, match="not both"):
        HardenedAdapter(pki.policy(), context=ctx)


# -- urllib3 ----------------------------------------------------------------------------------


def test_urllib3_pool_manager_sends_and_reports(pki, dual_hub, lib_registry):
    urllib3 = pytest.importorskip("urllib3")
    with urllib3.PoolManager(ssl_context=it.create_ssl_context(pki.policy(**ECC_ONLY))) as pm:
        response = pm.request(
            "POST",
            _url(dual_hub),
            body=b"via urllib3",
            headers=_auth(lib_registry),
            preload_content=False,
            retries=False,
        )
        info = it.tls_info(response.connection)
        response.release_conn()
    assert response.status == 204
    assert info.server_key_type == "EC"  # the dual hub served its ECDSA certificate
    assert info.sni == "localhost"


def test_urllib3_keeps_ecc_only_refusal(pki, rsa_hub, lib_registry):
    urllib3 = pytest.importorskip("urllib3")
    with urllib3.PoolManager(ssl_context=it.create_ssl_context(pki.policy(**ECC_ONLY))) as pm:
        with pytest.raises(urllib3.exceptions.SSLError) as err:
            pm.request("POST", _url(rsa_hub), body=b"x", headers=_auth(lib_registry), retries=False)
    assert any(isinstance(e, it.CipherSuiteError) for e in _chain(err.value))


def test_urllib3_ca_certs_argument_is_refused_loudly(pki, dual_hub):
    urllib3 = pytest.importorskip("urllib3")
    import certifi

    pm = urllib3.PoolManager(
        ssl_context=it.create_ssl_context(pki.policy()), ca_certs=certifi.where()
    )
    with pytest.raises(it.PolicyError, match="would defeat pinning"):
        pm.request("GET", _url(dual_hub), retries=False)


# -- httpx --------------------------------------------------------------------------------------


def test_httpx_sends_and_reports(pki, dual_hub, lib_registry):
    httpx = pytest.importorskip("httpx")
    with httpx.Client(verify=it.create_ssl_context(pki.policy())) as client:
        response = client.post(_url(dual_hub), content=b"via httpx", headers=_auth(lib_registry))
        # httpcore's "ssl_object" is the bare _ssl object; "socket" is the SSLSocket.
        info = it.tls_info(response.extensions["network_stream"].get_extra_info("socket"))
    assert response.status_code == 204
    assert info.version == "TLSv1.3" and info.anchor == "iothub-tls Test Root G2"


def test_httpx_keeps_ecc_only_refusal(pki, rsa_hub, lib_registry):
    httpx = pytest.importorskip("httpx")
    with httpx.Client(verify=it.create_ssl_context(pki.policy(**ECC_ONLY))) as client:
        with pytest.raises(httpx.ConnectError) as err:
            client.post(_url(rsa_hub), content=b"x", headers=_auth(lib_registry))
    assert any(isinstance(e, it.CipherSuiteError) for e in _chain(err.value))


def test_httpx_async_runs_the_checks_on_ssl_objects(pki, dual_hub, rsa_hub, lib_registry):
    httpx = pytest.importorskip("httpx")

    async def main() -> tuple[int, it.TlsInfo, BaseException]:
        ctx = it.create_ssl_context(pki.policy(**ECC_ONLY))
        async with httpx.AsyncClient(verify=ctx) as client:
            ok = await client.post(_url(dual_hub), content=b"async", headers=_auth(lib_registry))
            ssl_object = ok.extensions["network_stream"].get_extra_info("ssl_object")
            try:
                await client.post(_url(rsa_hub), content=b"x", headers=_auth(lib_registry))
            except httpx.ConnectError as exc:
                refused: BaseException = exc
            else:
                raise AssertionError("the RSA-only hub was accepted in ECC-only mode")
            return ok.status_code, it.tls_info(ssl_object), refused

    status, info, refused = asyncio.run(main())
    assert status == 204 and info.server_key_type == "EC"
    assert any(isinstance(e, (it.CipherSuiteError, it.PolicyViolation)) for e in _chain(refused))
