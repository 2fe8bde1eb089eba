"""Both sides of IoT Hub's AMQP conventions come from one module
(:mod:`iothub_tls.amqp.conventions`): what the device client encodes, the local hub
decodes to the same values, and back. Every round trip crosses AMQP's wire format
(proton's encoder and decoder), for any printable names and values, including
``+ % & = ?``, empty values and non-ASCII text."""

from __future__ import annotations

import json
import uuid
from typing import Any

import proton as _proton
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iothub_tls.amqp import conventions as amqpc
from iothub_tls.amqp.message import AmqpMessage, decode, encode

# proton types message fields loosely (Optional unions); the tests read them directly
proton: Any = _proton

_TRICKY = "+%&=?/#$ ;,\"'\\é°中"
text = st.text(
    alphabet=st.one_of(st.sampled_from(_TRICKY), st.characters(blacklist_categories=("Cs", "Cc"))),
    max_size=20,
)
names = text.filter(bool)
properties = st.dictionaries(names, text, max_size=6)  # values may be empty
optional = st.one_of(st.none(), names)
payloads = st.binary(max_size=64)
identities = st.from_regex(r"[A-Za-z0-9\-.%_*?!(),:=@$'+&]{1,40}", fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(names.filter(lambda n: n != "$version"), json_values, max_size=5)


def wire(message: AmqpMessage) -> AmqpMessage:
    """``message`` as the peer reads it: encoded and decoded by proton."""
    return decode(encode(message))


# -- telemetry and cloud-to-device --------------------------------------------------------------


@given(
    payload=payloads,
    props=properties,
    message_id=optional,
    correlation_id=optional,
    content_type=optional,
    content_encoding=optional,
)
def test_telemetry_client_to_hub(
    payload: bytes,
    props: dict[str, str],
    message_id: str | None,
    correlation_id: str | None,
    content_type: str | None,
    content_encoding: str | None,
) -> None:
    sent = amqpc.telemetry_message(
        payload,
        props,
        message_id=message_id,
        correlation_id=correlation_id,
        content_type=content_type,
        content_encoding=content_encoding,
    )
    read = amqpc.parse_telemetry(wire(sent))
    assert read == amqpc.TelemetryContent(
        payload, props, message_id, correlation_id, content_type, content_encoding
    )
    system = {
        "message-id": message_id,
        "correlation-id": correlation_id,
        "content-type": content_type,
        "content-encoding": content_encoding,
    }
    assert read.system_properties == {k: v for k, v in system.items() if v is not None}


def test_telemetry_properties_must_be_text() -> None:
    with pytest.raises(TypeError, match=r"must map str to str .* 'n': int"):
        amqpc.telemetry_message(b"x", {"n": 1})  # type: ignore[dict-item]


@given(
    device_id=identities,
    payload=payloads,
    props=properties,
    message_id=optional,
    correlation_id=optional,
    delivery_count=st.integers(0, 100),
)
def test_c2d_hub_to_client(
    device_id: str,
    payload: bytes,
    props: dict[str, str],
    message_id: str | None,
    correlation_id: str | None,
    delivery_count: int,
) -> None:
    sent = amqpc.c2d_message(
        device_id,
        payload,
        props,
        message_id=message_id,
        correlation_id=correlation_id,
        delivery_count=delivery_count,
    )
    read = amqpc.parse_c2d(wire(sent))
    assert read == amqpc.C2DContent(
        payload,
        props,
        message_id,
        correlation_id,
        to=amqpc.link_address(amqpc.LinkKind.C2D, device_id),
        delivery_count=delivery_count,
    )


# -- addresses ----------------------------------------------------------------------------------


@given(
    kind=st.sampled_from(amqpc.LinkKind),
    device_id=identities,
    module_id=st.one_of(st.none(), identities),
)
def test_link_addresses_round_trip(
    kind: amqpc.LinkKind, device_id: str, module_id: str | None
) -> None:
    address = amqpc.link_address(kind, device_id, module_id)
    assert amqpc.parse_address(address) == amqpc.Address(kind, device_id, module_id)
    with_host = amqpc.parse_address(f"amqps://hub.example{address}")
    assert with_host == amqpc.Address(kind, device_id, module_id, "hub.example")
    assert with_host.client_id == device_id + (f"/{module_id}" if module_id else "")


@pytest.mark.parametrize(
    "address",
    ["/devices/d/messages/other", "/devices/d", "devices/d/twin", "/devices/d/methods", "$cbs"],
)
def test_other_addresses_are_not_device_links(address: str) -> None:
    assert amqpc.parse_address(address) is None


def test_twin_link_properties_pair_the_links() -> None:
    properties = amqpc.link_properties(amqpc.LinkKind.TWIN, "1234", "iothub-tls/1")
    assert properties == {
        "com.microsoft:channel-correlation-id": "twin:1234",
        "com.microsoft:api-version": amqpc.API_VERSION,
        "com.microsoft:client-version": "iothub-tls/1",
    }
    methods = amqpc.link_properties(amqpc.LinkKind.METHODS, "1234")
    assert methods["com.microsoft:channel-correlation-id"] == "methods:1234"
    symbols = {proton.symbol(k): v for k, v in properties.items()}
    assert amqpc.channel_correlation_id(symbols) == "twin:1234"
    assert amqpc.channel_correlation_id({}) is None


# -- device twin --------------------------------------------------------------------------------


@given(correlation_id=names, patch=json_objects)
def test_twin_requests_client_to_hub(correlation_id: str, patch: dict[str, Any]) -> None:
    body = json.dumps(patch).encode("utf-8")
    op = amqpc.TwinOperation
    expected = {
        op.GET: amqpc.TwinRequest(op.GET, None, correlation_id),
        op.PATCH: amqpc.TwinRequest(op.PATCH, amqpc.REPORTED_PROPERTIES, correlation_id, body),
        op.PUT: amqpc.TwinRequest(op.PUT, amqpc.DESIRED_NOTIFICATIONS, correlation_id),
        op.DELETE: amqpc.TwinRequest(op.DELETE, amqpc.DESIRED_NOTIFICATIONS, correlation_id),
    }
    for operation, request in expected.items():
        sent = amqpc.twin_request(
            operation, correlation_id, body if operation is op.PATCH else None
        )
        assert amqpc.parse_twin_request(wire(sent)) == request


@given(
    correlation_id=names,
    status=st.integers(100, 599),
    version=st.one_of(st.none(), st.integers(1, 2**62)),
    document=st.one_of(st.none(), json_objects),
)
def test_twin_responses_hub_to_client(
    correlation_id: str, status: int, version: int | None, document: dict[str, Any] | None
) -> None:
    body = b"" if document is None else json.dumps(document).encode("utf-8")
    sent = amqpc.twin_response(correlation_id, status, body, version)
    assert amqpc.parse_twin_message(wire(sent)) == amqpc.TwinResponse(
        correlation_id, status, version, body
    )


@given(patch=json_objects, version=st.integers(1, 2**62))
def test_desired_updates_hub_to_client(patch: dict[str, Any], version: int) -> None:
    read = amqpc.parse_twin_message(wire(amqpc.desired_update(patch, version)))
    assert read == amqpc.DesiredUpdate({**patch, "$version": version}, version)


def test_twin_wire_types_are_the_sdks() -> None:
    """status an AMQP int, version a long, annotation keys symbols (C SDK checks)."""
    raw = proton.Message()
    raw.decode(encode(amqpc.twin_response("c", 204, b"", 7)))
    assert type(raw.annotations[proton.symbol("status")]) is proton.int32
    assert type(raw.annotations[proton.symbol("version")]) is int
    request = proton.Message()
    request.decode(encode(amqpc.twin_request(amqpc.TwinOperation.GET, "c")))
    assert request.annotations == {proton.symbol("operation"): "GET"}
    assert bytes(request.body) == b" " and request.inferred  # one data section


def test_unreadable_twin_messages() -> None:
    assert amqpc.parse_twin_request(AmqpMessage(correlation_id="c")) is None  # no operation
    no_id = AmqpMessage(annotations={"operation": "GET"})
    assert amqpc.parse_twin_request(no_id) is None
    assert amqpc.parse_twin_message(AmqpMessage(body=b"[1]")) is None  # no id, not an object
    answer = amqpc.parse_twin_message(AmqpMessage(correlation_id="c"))
    assert answer == amqpc.TwinResponse("c", 200)  # no status: 200, as the Java SDK reads it


# -- direct methods -----------------------------------------------------------------------------


@given(name=names, payload=payloads, status=st.integers(0, 999), answer=payloads)
def test_method_call_and_answer_round_trip(
    name: str, payload: bytes, status: int, answer: bytes
) -> None:
    correlation_id = uuid.uuid4()
    call = amqpc.parse_method_request(wire(amqpc.method_request(name, correlation_id, payload)))
    assert call == amqpc.MethodCall(name, str(correlation_id), correlation_id, payload)
    assert isinstance(call.correlation_id, uuid.UUID)  # kept as the uuid it came as
    result = amqpc.parse_method_response(
        wire(amqpc.method_response(call.correlation_id, status, answer))
    )
    assert result == amqpc.MethodResult(str(correlation_id), status, answer)


def test_method_wire_types_are_the_sdks() -> None:
    correlation_id = uuid.uuid4()
    raw = proton.Message()
    raw.decode(encode(amqpc.method_response(correlation_id, 200, b"{}")))
    assert type(raw.properties["IoThub-status"]) is proton.int32
    assert raw.correlation_id == correlation_id


def test_unreadable_method_messages() -> None:
    assert amqpc.parse_method_request(AmqpMessage(correlation_id=uuid.uuid4())) is None
    assert amqpc.parse_method_request(AmqpMessage(properties={"IoThub-methodname": "m"})) is None
    assert amqpc.parse_method_response(AmqpMessage(correlation_id="c")) is None
    no_id = AmqpMessage(properties={"IoThub-status": 200})
    assert amqpc.parse_method_response(no_id) is None
