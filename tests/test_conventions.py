"""Both sides of each protocol come from one module: what the client encodes, the local
hub decodes to the same thing, and back — for any printable names and values,
including ``+``, ``%``, ``&``, ``=``, ``?``, ``/``, empty values and non-ASCII."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from iothub_tls.https import conventions as httpc
from iothub_tls.mqtt import conventions as mqttc

# printable text, with the characters that break naive encoders over-represented
_TRICKY = "+%&=?/#$ ;,\"'\\é°中"
text = st.text(
    alphabet=st.one_of(st.sampled_from(_TRICKY), st.characters(blacklist_categories=("Cs", "Cc"))),
    max_size=20,
)
name = text.filter(lambda s: s != "" and not s.startswith("$."))
values = st.one_of(st.none(), text)
app_bags = st.dictionaries(name, text, max_size=6)
device_ids = st.from_regex(r"[A-Za-z0-9\-.%_*?!(),:=@$']{1,40}", fullmatch=True)


@given(
    app=app_bags,
    mid=st.one_of(st.none(), text.filter(bool)),
    ct=st.one_of(st.none(), text.filter(bool)),
)
def test_mqtt_telemetry_client_to_hub(app: dict[str, str], mid: str | None, ct: str | None) -> None:
    topic = mqttc.telemetry_topic("dev", None, app, message_id=mid, content_type=ct)
    decoded = mqttc.parse_telemetry_topic(topic, "dev")
    assert decoded is not None
    got_app, got_system = decoded
    assert got_app == app
    expected_system = {k: v for k, v in (("$.mid", mid), ("$.ct", ct)) if v is not None}
    assert got_system == expected_system


@given(app=app_bags)
def test_mqtt_module_telemetry_is_not_the_device_s(app: dict[str, str]) -> None:
    topic = mqttc.telemetry_topic("dev", "mod", app)
    assert mqttc.parse_telemetry_topic(topic, "dev", "mod") == (app, {})
    assert mqttc.parse_telemetry_topic(topic, "dev") is None


@given(
    bag=st.dictionaries(name, values, max_size=6),
    system=st.dictionaries(
        st.sampled_from(["$.mid", "$.cid", "$.to", "$.exp", "$.ct", "iothub-ack"]),
        values,
        max_size=4,
    ),
)
def test_mqtt_c2d_hub_to_client(bag: dict[str, str | None], system: dict[str, str | None]) -> None:
    bag = {k: v for k, v in bag.items() if k != "iothub-ack"}
    topic = mqttc.c2d_topic("dev", {**bag, **system})
    message = mqttc.parse_c2d(topic, b"x", "dev")
    assert message is not None
    assert message.properties == bag
    assert message.system_properties == system


@given(bag=st.dictionaries(name, values, max_size=8))
def test_mqtt_property_bag_round_trip(bag: dict[str, str | None]) -> None:
    assert mqttc.decode_property_bag(mqttc.encode_property_bag(bag)) == bag


@given(
    rid=text.filter(bool),
    status=st.integers(0, 999),
    version=st.one_of(st.none(), st.integers(0, 2**31)),
)
def test_mqtt_twin_round_trips(rid: str, status: int, version: int | None) -> None:
    assert mqttc.parse_twin_request(mqttc.twin_get_topic(rid)) == mqttc.TwinRequest("GET", rid)
    assert mqttc.parse_twin_request(mqttc.twin_patch_topic(rid)) == mqttc.TwinRequest("PATCH", rid)
    response = mqttc.parse_twin_response(mqttc.twin_response_topic(status, rid, version))
    if status >= 100:  # IoT Hub's statuses are three digits
        assert response == mqttc.TwinResponse(status, rid, version)
    assert mqttc.parse_desired_patch(mqttc.desired_patch_topic(version or 0)) == (
        True,
        version or 0,
    )


@given(method=text.filter(bool), rid=text.filter(bool), status=st.integers(0, 999))
def test_mqtt_method_round_trips(method: str, rid: str, status: int) -> None:
    request = mqttc.parse_method_request(mqttc.method_request_topic(method, rid))
    assert request == mqttc.MethodRequest(method, rid)
    answer = mqttc.parse_method_response(mqttc.method_response_topic(status, rid))
    assert answer == mqttc.MethodResponse(status, rid)


def test_mqtt_the_reported_disagreement_is_gone() -> None:
    """``a+b=1&n``: the hub once read {'a b': '1', 'n': ''} where the client read
    {'a+b': '1', 'n': None}; both sides now read it the client's way."""
    hub_side = mqttc.parse_telemetry_topic("devices/d/messages/events/a+b=1&n", "d")
    assert hub_side == ({"a+b": "1", "n": None}, {})
    assert mqttc.decode_property_bag("a+b=1&n") == {"a+b": "1", "n": None}


# HTTPS: properties are header names and values, so only the characters HTTPS allows
_token = st.from_regex(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,16}", fullmatch=True)


@given(
    props=st.dictionaries(
        _token.filter(lambda s: not s.lower().startswith("iothub-")), _token, max_size=6
    ),
    body=st.binary(max_size=64),
    mid=st.one_of(
        st.none(), st.from_regex(r"[A-Za-z0-9\-:.+%_#*?!(),=@;$']{1,32}", fullmatch=True)
    ),
)
def test_https_telemetry_client_to_hub(props: dict[str, str], body: bytes, mid: str | None) -> None:
    message = httpc.Message(body, props, message_id=mid, content_type="application/json")
    request = httpc.events_request("dev", message)
    assert httpc.message_from_headers(request.headers, request.body) == message
    batch = httpc.batch_request("dev", [message, message])
    assert httpc.parse_batch(batch.body) == [message, message]


@given(props=st.dictionaries(_token, _token, max_size=6), body=st.binary(max_size=64))
def test_https_c2d_hub_to_client(props: dict[str, str], body: bytes) -> None:
    sent = httpc.C2DMessage(
        payload=body,
        lock_token="3f2504e0-4f89-11d3-9a0c-0305e82c3301",
        properties=props,
        message_id="m1",
        correlation_id="c1",
        content_type="text/plain",
        delivery_count=2,
    )
    got = httpc.parse_c2d(200, httpc.c2d_headers(sent), body)
    assert got is not None
    assert (got.payload, dict(got.properties), got.lock_token) == (body, props, sent.lock_token)
    assert (got.message_id, got.correlation_id, got.content_type, got.delivery_count) == (
        "m1",
        "c1",
        "text/plain",
        2,
    )
