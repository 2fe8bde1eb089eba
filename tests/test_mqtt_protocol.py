"""IoT Hub's MQTT conventions (``iothub_tls.mqtt.conventions``), checked without any I/O.

Expected strings are written out by hand from Microsoft's MQTT article and the SDKs'
behaviour, not computed with the functions under test.
"""

from __future__ import annotations

import pytest

from iothub_tls import errors
from iothub_tls._io.backoff import RetryPolicy
from iothub_tls.mqtt.conventions import (
    API_VERSION,
    MAX_MESSAGE_BYTES,
    METHODS_FILTER,
    TWIN_DESIRED_FILTER,
    TWIN_RESPONSE_FILTER,
    WEBSOCKET_PATH,
    ConnectRefusedError,
    MethodRequest,
    MqttOptions,
    QueueFullError,
    RequestTracker,
    TwinResponse,
    c2d_filter,
    check_message_size,
    connack_error,
    decode_property_bag,
    encode_property_bag,
    is_permanent,
    method_response_topic,
    parse_c2d,
    parse_desired_patch,
    parse_method_request,
    parse_twin_response,
    telemetry_topic,
    twin_error,
    twin_get_topic,
    twin_patch_topic,
    username,
)

HUB = "myhub.azure-devices.net"

# ------------------------------------------------------------------------- CONNECT


def test_username_for_a_device_carries_the_api_version() -> None:
    assert API_VERSION == "2021-04-12"
    assert username(HUB, "dev1") == "myhub.azure-devices.net/dev1/?api-version=2021-04-12"


def test_username_for_a_module_and_the_client_type_is_percent_encoded() -> None:
    assert username(HUB, "dev1/mod1", device_client_type="iothub-tls/0.1.0 my app") == (
        "myhub.azure-devices.net/dev1/mod1/?api-version=2021-04-12"
        "&DeviceClientType=iothub-tls%2F0.1.0%20my%20app"
    )


def test_constants_match_the_documented_endpoints() -> None:
    assert WEBSOCKET_PATH == "/$iothub/websocket"
    assert TWIN_RESPONSE_FILTER == "$iothub/twin/res/#"
    assert TWIN_DESIRED_FILTER == "$iothub/twin/PATCH/properties/desired/#"
    assert METHODS_FILTER == "$iothub/methods/POST/#"
    assert c2d_filter("dev1") == "devices/dev1/messages/devicebound/#"


# ------------------------------------------------------------------------- property bags


def test_property_bag_encoding_escapes_reserved_characters_rfc2396_style() -> None:
    bag = encode_property_bag({"a b": "x/y", "$.ct": "application/json", "k&=": "v&=+"})
    # space -> %20 (never "+"), "$" -> %24, "/" -> %2F, "&" and "=" escaped, "+" -> %2B
    assert bag == "a%20b=x%2Fy&%24.ct=application%2Fjson&k%26%3D=v%26%3D%2B"


def test_property_bag_null_and_empty_values() -> None:
    assert encode_property_bag({"prop1": None, "prop2": "", "prop3": "a string"}) == (
        "prop1&prop2=&prop3=a%20string"
    )


def test_decoding_the_documented_cloud_to_device_example() -> None:
    # Microsoft's article shows the bag with a leading "?"; the hub sends it without.
    expected = {"prop1": None, "prop2": "", "prop3": "a string"}
    assert decode_property_bag("?prop1&prop2=&prop3=a%20string") == expected
    assert decode_property_bag("prop1&prop2=&prop3=a%20string") == expected


def test_decoding_keeps_plus_and_round_trips() -> None:
    assert decode_property_bag("a=1+1") == {"a": "1+1"}
    props = {"ünï": "çødé ✓", "x": "=&?#/", "$.mid": "m-1", "n": None}
    assert decode_property_bag(encode_property_bag(props)) == props
    assert decode_property_bag("") == {}


# ------------------------------------------------------------------------- telemetry


def test_telemetry_topic_without_properties_keeps_the_trailing_slash() -> None:
    assert telemetry_topic("dev1") == "devices/dev1/messages/events/"


def test_telemetry_topic_with_application_and_system_properties() -> None:
    topic = telemetry_topic(
        "dev1",
        properties={"alert": "high temp"},
        message_id="m-1",
        correlation_id="c-1",
        content_type="application/json",
        content_encoding="utf-8",
    )
    assert topic == (
        "devices/dev1/messages/events/alert=high%20temp&%24.mid=m-1&%24.cid=c-1"
        "&%24.ct=application%2Fjson&%24.ce=utf-8"
    )


def test_telemetry_topic_for_a_module() -> None:
    assert telemetry_topic("dev1", "mod1", {"a": "b"}) == (
        "devices/dev1/modules/mod1/messages/events/a=b"
    )


@pytest.mark.parametrize(
    ("properties", "kind", "fragment"),
    [
        ({"$.mid": "x"}, ValueError, "system properties"),
        ({"count": 3}, TypeError, "convert it with str()"),
        ({"": "x"}, TypeError, "non-empty str"),
        ([("a", "b")], TypeError, "mapping of str to str"),
    ],
)
def test_telemetry_properties_are_checked(properties: object, kind: type, fragment: str) -> None:
    with pytest.raises(kind, match=fragment):
        telemetry_topic("dev1", properties=properties)  # type: ignore[arg-type]


def test_an_empty_message_id_is_refused() -> None:
    with pytest.raises(TypeError, match="message_id must be a non-empty str"):
        telemetry_topic("dev1", message_id="")


def test_message_size_limit_is_256_kb_including_the_topic() -> None:
    topic = "devices/d/messages/events/"
    check_message_size(topic, b"x" * (MAX_MESSAGE_BYTES - len(topic)))
    with pytest.raises(ValueError, match=r"at most 262144 bytes"):
        check_message_size(topic, b"x" * (MAX_MESSAGE_BYTES - len(topic) + 1))


# ------------------------------------------------------------------------- C2D


def test_c2d_message_splits_application_and_system_properties() -> None:
    topic = (
        "devices/dev1/messages/devicebound/%24.mid=m-7&%24.to=%2Fdevices%2Fdev1%2Fmessages"
        "%2FdeviceBound&%24.ct=text%2Fplain&iothub-ack=full&color=blue&flag"
    )
    message = parse_c2d(topic, b"hello", "dev1")
    assert message is not None
    assert message.payload == b"hello"
    assert message.text == "hello"
    assert message.properties == {"color": "blue", "flag": None}
    assert message.system_properties == {
        "$.mid": "m-7",
        "$.to": "/devices/dev1/messages/deviceBound",
        "$.ct": "text/plain",
        "iothub-ack": "full",
    }
    assert (message.message_id, message.content_type) == ("m-7", "text/plain")
    assert (message.correlation_id, message.content_encoding) == (None, None)


def test_c2d_without_properties_and_for_another_device() -> None:
    message = parse_c2d("devices/dev1/messages/devicebound/", b"", "dev1")
    assert message is not None
    assert (message.properties, message.system_properties) == ({}, {})
    assert parse_c2d("devices/dev2/messages/devicebound/", b"", "dev1") is None
    assert parse_c2d("devices/dev1/messages/events/", b"", "dev1") is None


# ------------------------------------------------------------------------- twin


def test_twin_request_topics() -> None:
    assert twin_get_topic("42") == "$iothub/twin/GET/?$rid=42"
    assert twin_patch_topic("a b") == "$iothub/twin/PATCH/properties/reported/?$rid=a%20b"


def test_twin_response_topics_are_parsed() -> None:
    assert parse_twin_response("$iothub/twin/res/200/?$rid=1") == TwinResponse(200, "1")
    assert parse_twin_response("$iothub/twin/res/204/?$rid=x9&$version=6") == TwinResponse(
        204, "x9", 6
    )
    for bad in (
        "$iothub/twin/res/abc/?$rid=1",
        "$iothub/twin/res/200",
        "$iothub/twin/res/200/?$version=3",
        "$iothub/methods/res/200/?$rid=1",
    ):
        assert parse_twin_response(bad) is None


def test_desired_patch_topics() -> None:
    assert parse_desired_patch("$iothub/twin/PATCH/properties/desired/?$version=12") == (True, 12)
    assert parse_desired_patch("$iothub/twin/PATCH/properties/desired/") == (True, None)
    assert parse_desired_patch("$iothub/twin/res/200/?$rid=1") == (False, None)


@pytest.mark.parametrize("status", [200, 202, 204])
def test_twin_success_statuses(status: int) -> None:
    assert twin_error(status, "GET", b"") is None


def test_twin_error_statuses_map_to_specific_errors() -> None:
    forbidden = twin_error(403, "PATCH", b'{"message":"nope"}')
    assert isinstance(forbidden, errors.NotAuthorizedError)
    assert "status 403" in str(forbidden) and "nope" in str(forbidden)
    throttled = twin_error(429, "GET", b"")
    assert isinstance(throttled, errors.DeliveryError) and "throttled" in str(throttled)
    malformed = twin_error(400, "PATCH", b"bad json")
    assert isinstance(malformed, errors.DeliveryError) and "malformed" in str(malformed)
    failed = twin_error(500, "GET", b"")
    assert isinstance(failed, errors.DeliveryError) and "status 500" in str(failed)


# ------------------------------------------------------------------------- methods


def test_method_request_and_response_topics() -> None:
    assert parse_method_request("$iothub/methods/POST/reboot/?$rid=7") == MethodRequest(
        "reboot", "7"
    )
    assert parse_method_request("$iothub/methods/POST/set%20led/?$rid=8") == MethodRequest(
        "set led", "8"
    )
    assert parse_method_request("$iothub/methods/POST/reboot/") is None
    assert parse_method_request("$iothub/methods/POST//?$rid=1") is None
    assert method_response_topic(200, "7") == "$iothub/methods/res/200/?$rid=7"


@pytest.mark.parametrize("status", [-1, 1000, True, "200", 2.0])
def test_method_status_must_be_an_integer(status: object) -> None:
    with pytest.raises(ValueError, match="integer"):
        method_response_topic(status, "1")  # type: ignore[arg-type]


# ------------------------------------------------------------------------- request ids


def test_request_tracker_pairs_requests_by_id() -> None:
    tracker: RequestTracker[str] = RequestTracker("ab12")
    first = tracker.start("get", deadline=10)
    second = tracker.start("patch", deadline=20)
    assert first != second and first.startswith("ab12") and second.startswith("ab12")
    assert len(tracker) == 2
    assert tracker.finish(second) == "patch"
    assert tracker.finish(second) is None  # answered once only
    assert tracker.finish("unknown") is None
    assert list(tracker.pending()) == [(first, "get")]


def test_request_tracker_expires_and_drains() -> None:
    tracker: RequestTracker[int] = RequestTracker()
    tracker.start(1, deadline=5)
    tracker.start(2, deadline=15)
    tracker.start(3, deadline=25)
    assert tracker.next_deadline() == 5
    assert tracker.expire(now=4) == []
    assert tracker.expire(now=15) == [1, 2]
    assert tracker.next_deadline() == 25
    assert tracker.drain() == [3]
    assert len(tracker) == 0 and tracker.next_deadline() is None
    with pytest.raises(ValueError, match="alphanumeric"):
        RequestTracker("a&b")


# ------------------------------------------------------------------------- CONNACK


def test_connack_accepted() -> None:
    assert connack_error(0, HUB) is None


@pytest.mark.parametrize(
    ("code", "kind", "retryable", "fragment"),
    [
        (1, errors.ConnectionFailedError, False, "MQTT 3.1.1"),
        (2, errors.AuthenticationError, False, "identifier rejected"),
        (3, errors.ConnectionFailedError, True, "server unavailable"),
        (4, errors.AuthenticationError, False, "SharedAccessKey"),
        (5, ConnectRefusedError, False, "not authorized"),
        (9, errors.ConnectionFailedError, False, "unknown CONNACK code 9"),
    ],
)
def test_connack_refusals(code: int, kind: type, retryable: bool, fragment: str) -> None:
    refusal = connack_error(code, HUB)
    assert refusal is not None
    error, can_retry = refusal
    assert type(error) is kind
    assert can_retry is retryable
    assert fragment in str(error) and HUB in str(error)


def test_connack_5_is_both_an_authentication_and_an_authorization_error() -> None:
    refusal = connack_error(5, HUB)
    assert refusal is not None
    error = refusal[0]
    assert isinstance(error, errors.AuthenticationError)
    assert isinstance(error, errors.NotAuthorizedError)
    assert isinstance(error, errors.ClientError)


def test_queue_full_is_a_delivery_error() -> None:
    assert issubclass(QueueFullError, errors.DeliveryError)


def test_what_is_never_retried() -> None:
    permanent = [
        errors.CertificateVerificationError(1, "x"),
        errors.CipherSuiteError(1, "x"),
        errors.ProtocolVersionError(1, "x"),
        errors.PolicyViolation(1, "x"),
        errors.PolicyError("x"),
        errors.IdentityError("x"),
        errors.AuthenticationError("x"),
        errors.NotAuthorizedError("x"),
        ConnectRefusedError("x"),
    ]
    transient = [
        errors.HandshakeTimeoutError(1, "x"),
        errors.HandshakeClosedError(1, "x"),
        errors.TLSHandshakeError(1, "x"),
        errors.ConnectionFailedError("x"),
        errors.OperationTimeoutError("x"),
        ConnectionResetError(),
    ]
    assert all(is_permanent(e) for e in permanent)
    assert not any(is_permanent(e) for e in transient)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"keepalive": 2000}, "keepalive must be an int between 5 and 1177"),
        ({"keepalive": 1.5}, "keepalive"),
        ({"connect_timeout": 0}, "connect_timeout must be > 0"),
        ({"handshake_timeout": -1}, "handshake_timeout"),
        ({"operation_timeout": float("nan")}, "operation_timeout must be a finite number"),
        ({"queue_size": 0}, "queue_size must be an int >= 1"),
        ({"sas_ttl": 10}, "at least 60"),
        ({"retry": {"initial_delay": 1}}, "retry must be a RetryPolicy"),
        ({"product_info": 7}, "product_info must be a str or None"),
    ],
)
def test_mqtt_options_validation(kwargs: dict[str, object], fragment: str) -> None:
    """Bad options raise PolicyError (a ValueError), as AmqpOptions and HttpsOptions do."""
    with pytest.raises(errors.PolicyError, match=fragment) as caught:
        MqttOptions(**kwargs)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)


def test_mqtt_option_defaults_suit_iot_hub() -> None:
    options = MqttOptions()
    assert options.keepalive == 60
    assert options.retry == RetryPolicy()
    assert options.queue_size == 1000
