"""Tests of iothub_tls.auth: connection strings, SAS tokens and X.509 client identities.

Everything runs offline: keys and certificates are generated at test time, TLS handshakes
run over in-memory BIOs.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import os
import shutil
import ssl
import stat
import subprocess
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib import parse

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iothub_tls.auth import (
    ClientIdentity,
    ConnectionString,
    SasToken,
    SasTokenProvider,
    generate_sas_token,
)
from iothub_tls.errors import (
    AuthenticationError,
    ConnectionStringError,
    IdentityError,
    SasTokenError,
)

# A recognisable 32-byte key, so a leak of the key (or of the key without its padding)
# is easy to spot in any message.
SECRET = base64.b64encode(b"super-secret-device-key-32bytes!").decode()
assert SECRET.endswith("=")
HUB = "myhub.azure-devices.net"
NOW = 1_700_000_000.0


def _all_text(exc: BaseException) -> str:
    """Everything an application could log about an exception, causes included."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + repr(exc)


SHORT_SECRET = base64.b64encode(b"short-secret-16b").decode()


def _assert_no_secret(text: str) -> None:
    for secret in (SECRET, SHORT_SECRET):
        assert secret not in text
        assert secret.rstrip("=") not in text
        assert secret[:12] not in text


# ======================================================================================
# ConnectionString
# ======================================================================================


class TestConnectionStringParse:
    def test_device_with_key(self) -> None:
        cs = ConnectionString.parse(f"HostName={HUB};DeviceId=dev1;SharedAccessKey={SECRET}")
        assert cs.host_name == HUB
        assert cs.device_id == "dev1"
        assert cs.module_id is None
        assert cs.shared_access_key == SECRET
        assert cs.shared_access_key_name is None
        assert cs.x509 is False
        assert cs.gateway_host_name is None
        assert cs.hostname == HUB
        assert cs.client_id == "dev1"
        assert cs.resource_uri == f"{HUB}/devices/dev1"

    def test_module(self) -> None:
        cs = ConnectionString.parse(
            f"HostName={HUB};DeviceId=dev1;ModuleId=filter;SharedAccessKey={SECRET}"
        )
        assert cs.module_id == "filter"
        assert cs.client_id == "dev1/filter"
        assert cs.resource_uri == f"{HUB}/devices/dev1/modules/filter"

    def test_gateway_host_name(self) -> None:
        # The TLS server is the gateway; the SAS resource stays the hub's HostName.
        cs = ConnectionString.parse(
            f"HostName={HUB};DeviceId=dev1;SharedAccessKey={SECRET};GatewayHostName=edge.local"
        )
        assert cs.gateway_host_name == "edge.local"
        assert cs.hostname == "edge.local"
        assert cs.resource_uri == f"{HUB}/devices/dev1"

    def test_gateway_ip_address(self) -> None:
        cs = ConnectionString.parse(
            f"HostName={HUB};DeviceId=d;x509=true;GatewayHostName=192.168.1.10"
        )
        assert cs.hostname == "192.168.1.10"

    @pytest.mark.parametrize("flag", ["true", "True", "TRUE"])
    def test_x509(self, flag: str) -> None:
        cs = ConnectionString.parse(f"HostName={HUB};DeviceId=dev1;x509={flag}")
        assert cs.x509 is True
        assert cs.shared_access_key is None

    def test_x509_false_with_key(self) -> None:
        cs = ConnectionString.parse(
            f"HostName={HUB};DeviceId=dev1;SharedAccessKey={SECRET};x509=false"
        )
        assert cs.x509 is False

    def test_policy_key_name(self) -> None:
        cs = ConnectionString.parse(
            f"HostName={HUB};SharedAccessKeyName=device;SharedAccessKey={SECRET};DeviceId=d"
        )
        assert cs.shared_access_key_name == "device"

    def test_whitespace_and_trailing_semicolon(self) -> None:
        cs = ConnectionString.parse(
            f"  \n HostName={HUB}; DeviceId=dev1 ;SharedAccessKey={SECRET};  \n"
        )
        assert cs.device_id == "dev1"
        assert cs.shared_access_key == SECRET

    def test_values_may_contain_equals(self) -> None:
        key = base64.b64encode(b"0123456789abcdef").decode()  # 16 bytes -> '==' padding
        assert key.endswith("==")
        cs = ConnectionString.parse(f"HostName={HUB};DeviceId=a=b;SharedAccessKey={key}")
        assert cs.device_id == "a=b"
        assert cs.shared_access_key == key

    def test_localhost_and_ipv4_are_plausible_hosts(self) -> None:
        assert ConnectionString.parse("HostName=localhost;DeviceId=d;x509=true").hostname == (
            "localhost"
        )
        assert ConnectionString.parse("HostName=127.0.0.1;DeviceId=d;x509=true").host_name == (
            "127.0.0.1"
        )

    def test_frozen_and_equal(self) -> None:
        text = f"HostName={HUB};DeviceId=dev1;SharedAccessKey={SECRET}"
        cs = ConnectionString.parse(text)
        assert cs == ConnectionString.parse(text)
        with pytest.raises(dataclasses.FrozenInstanceError):
            cs.device_id = "other"  # type: ignore[misc]

    def test_direct_construction_is_validated(self) -> None:
        with pytest.raises(ConnectionStringError, match="not valid base64"):
            ConnectionString(host_name=HUB, device_id="d", shared_access_key="@@@")
        cs = ConnectionString(host_name=HUB, device_id="d", x509=True)
        assert cs.resource_uri == f"{HUB}/devices/d"

    def test_is_a_value_error(self) -> None:
        with pytest.raises(ValueError):
            ConnectionString.parse("")


class TestConnectionStringSecrecy:
    def test_repr_and_str_never_show_the_key(self) -> None:
        cs = ConnectionString.parse(
            f"HostName={HUB};DeviceId=dev1;ModuleId=m;SharedAccessKey={SECRET};"
            "GatewayHostName=gw.local"
        )
        for text in (repr(cs), str(cs), f"{cs}", f"{cs!r}", repr([cs])):
            _assert_no_secret(text)
        assert "SharedAccessKey=<redacted>" in str(cs)
        assert str(cs).startswith(f"HostName={HUB};DeviceId=dev1;ModuleId=m;")
        assert "shared_access_key=" not in repr(cs)
        assert "GatewayHostName=gw.local" in str(cs)

    def test_str_of_x509_string(self) -> None:
        cs = ConnectionString.parse(f"HostName={HUB};DeviceId=dev1;x509=true")
        assert str(cs) == f"HostName={HUB};DeviceId=dev1;x509=true"

    @pytest.mark.parametrize(
        "text",
        [
            f"HostName={HUB};DeviceId=d;SharedAccessKey={SECRET};x509=true",
            f"HostName={HUB};DeviceId=d;SharedAccessKey={SECRET};SharedAccessKey={SECRET}",
            f"HostName={HUB};SharedAccessKey={SECRET}",
            f"DeviceId=d;SharedAccessKey={SECRET}",
            f"HostName=https://{HUB};DeviceId=d;SharedAccessKey={SECRET}",
            f"HostName={HUB};DeviceId=d;SharedAccessKey={SECRET};x509=maybe",
            f"HostName={HUB};DeviceId=d;SharedAccessKey={SECRET};;",
            f"HostName={HUB};DeviceId=d;SharedAccessKey={SECRET}!!",
            f"HostName={HUB};DeviceId=d;SharedAccessKey=${SECRET}",
            # The key pasted without its name: base64 '=' makes it look like Key=Value.
            f"HostName={HUB};DeviceId=d;{SECRET}",
            f"HostName={HUB};DeviceId=d;SharedAccesKey={SECRET}",
            # A short (16-byte) key glued to its name still resembles "SharedAccessKey".
            f"HostName={HUB};DeviceId=d;SharedAccessKey{SHORT_SECRET}",
            f"HostName={HUB};DeviceId=d;SharedAccessKey {SECRET}",
        ],
    )
    def test_no_error_message_contains_the_key(self, text: str) -> None:
        with pytest.raises(ConnectionStringError) as info:
            ConnectionString.parse(text)
        _assert_no_secret(_all_text(info.value))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the connection string is empty"),
        ("   \n ", "the connection string is empty"),
        (f"HostName={HUB};DeviceId", "segment 2 has no '='"),
        (f"HostName={HUB};;DeviceId=d;x509=true", "segment 2 is empty"),
        (f"HostName={HUB};DeviceId=d;Colour=blue;x509=true", "unknown key in segment 3"),
        (f"hostname={HUB};DeviceId=d;x509=true", "key 'hostname' must be written 'HostName'"),
        (f"HostName={HUB};DeviceID=d;x509=true", "must be written 'DeviceId'"),
        (f"HostName={HUB};DeviceId=d;GatewayHostNme=g;x509=true", "did you mean 'GatewayHostName'"),
        (f"HostName={HUB};DeviceId=d;SharedAccessSignature=x", "is not a SAS token"),
        (f"HostName={HUB};DeviceId=a;DeviceId=b;x509=true", "duplicate key 'DeviceId'"),
        ("DeviceId=d;x509=true", "HostName is missing"),
        (f"HostName={HUB};x509=true", "DeviceId is missing"),
        (f"HostName={HUB};SharedAccessKeyName=iothubowner;SharedAccessKey={SECRET}", "hub-level"),
        (f"HostName={HUB};DeviceId=;x509=true", "DeviceId is empty"),
        ("HostName=;DeviceId=d;x509=true", "HostName is empty"),
        (f"HostName={HUB};DeviceId=d;ModuleId=;x509=true", "ModuleId is empty"),
        (f"HostName={HUB};DeviceId=d;SharedAccessKey=", "SharedAccessKey is empty"),
        (
            f"HostName={HUB};DeviceId=d;SharedAccessKey={SECRET};x509=true",
            "SharedAccessKey and x509=true are all set",
        ),
        (f"HostName={HUB};DeviceId=d", "neither SharedAccessKey, SharedAccessSignature nor x509"),
        (f"HostName={HUB};DeviceId=d;x509=false", "neither SharedAccessKey, SharedAccessSignature"),
        (f"HostName={HUB};DeviceId=d;x509=yes", "x509 must be 'true' or 'false', not 'yes'"),
        (f"HostName={HUB};DeviceId=d;SharedAccessKey=abc", "SharedAccessKey is not valid base64"),
        (
            f"HostName={HUB};DeviceId=d;SharedAccessKey=not*base64==",
            "SharedAccessKey is not valid base64",
        ),
        (f"HostName=https://{HUB};DeviceId=d;x509=true", "is not a valid DNS name"),
        (f"HostName={HUB}:8883;DeviceId=d;x509=true", "is not a valid DNS name"),
        (f"HostName={HUB}/;DeviceId=d;x509=true", "is not a valid DNS name"),
        ("HostName=my_hub.azure-devices.net;DeviceId=d;x509=true", "is not a valid DNS name"),
        ("HostName=-hub.azure-devices.net;DeviceId=d;x509=true", "is not a valid DNS name"),
        ("HostName=hub..azure-devices.net;DeviceId=d;x509=true", "is not a valid DNS name"),
        ("HostName=my hub.net;DeviceId=d;x509=true", "is not a valid DNS name"),
        (f"HostName={'a' * 64}.net;DeviceId=d;x509=true", "is not a valid DNS name"),
        (f"HostName={HUB};DeviceId=d;x509=true;GatewayHostName=gw:443", "GatewayHostName"),
        (f"HostName={HUB};DeviceId=a/b;x509=true", "DeviceId 'a/b' contains a character"),
        (f"HostName={HUB};DeviceId={'d' * 129};x509=true", "longer than 128"),
    ],
)
def test_connection_string_errors(text: str, message: str) -> None:
    with pytest.raises(ConnectionStringError) as info:
        ConnectionString.parse(text)
    assert message in str(info.value)


def test_connection_string_rejects_non_str() -> None:
    with pytest.raises(ConnectionStringError, match="must be a str"):
        ConnectionString.parse(b"HostName=x")  # type: ignore[arg-type]


# ======================================================================================
# SAS tokens
# ======================================================================================


def _expected_signature(key_b64: str, encoded_uri: str, expiry: int) -> str:
    """The documented formula, written independently of the library."""
    digest = hmac.new(
        base64.b64decode(key_b64), f"{encoded_uri}\n{expiry}".encode(), hashlib.sha256
    ).digest()
    return base64.b64encode(digest).decode()


def _documented_python_sample(uri: str, key: str, policy_name: str | None, now: float) -> str:
    """The Python sample of IoT Hub's security-token documentation, with the clock
    injected (``time()`` replaced by ``now``)."""
    ttl = now + 3600
    sign_key = f"{parse.quote_plus(uri)}\n{int(ttl)}"
    signature = base64.b64encode(
        hmac.new(base64.b64decode(key), sign_key.encode("utf-8"), hashlib.sha256).digest()
    )
    rawtoken: dict[str, Any] = {"sr": uri, "sig": signature, "se": str(int(ttl))}
    if policy_name is not None:
        rawtoken["skn"] = policy_name
    return "SharedAccessSignature " + parse.urlencode(rawtoken)


class TestGenerateSasToken:
    def test_known_answer(self) -> None:
        uri = f"{HUB}/devices/device1"
        token = generate_sas_token(uri, SECRET, now=NOW)
        expiry = int(NOW) + 3600
        encoded = "myhub.azure-devices.net%2Fdevices%2Fdevice1"
        sig = _expected_signature(SECRET, encoded, expiry)
        assert token == (
            f"SharedAccessSignature sr={encoded}&sig={parse.quote(sig, safe='')}&se={expiry}"
        )

    def test_matches_documented_python_sample(self) -> None:
        uri = f"{HUB}/devices/device1"
        assert generate_sas_token(uri, SECRET, now=NOW) == _documented_python_sample(
            uri, SECRET, None, NOW
        )
        assert generate_sas_token(
            uri, SECRET, policy_name="device", now=NOW
        ) == _documented_python_sample(uri, SECRET, "device", NOW)

    @pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
    def test_signature_matches_openssl_hmac(self) -> None:
        uri = f"{HUB}/devices/dev-42/modules/mod_1"
        token = SasToken.parse(generate_sas_token(uri, SECRET, ttl=600, now=NOW))
        message = f"{parse.quote(uri, safe='')}\n{int(NOW) + 600}".encode()
        out = subprocess.run(
            [
                "openssl",
                "dgst",
                "-sha256",
                "-mac",
                "HMAC",
                "-macopt",
                "hexkey:" + base64.b64decode(SECRET).hex(),
                "-binary",
            ],
            input=message,
            capture_output=True,
            check=True,
        ).stdout
        assert token.signature == base64.b64encode(out).decode()

    def test_policy_name_adds_skn(self) -> None:
        token = generate_sas_token(f"{HUB}/devices", SECRET, policy_name="registryRead", now=NOW)
        assert token.endswith("&skn=registryRead")
        assert SasToken.parse(token).key_name == "registryRead"

    def test_bytes_key_equals_str_key(self) -> None:
        uri = f"{HUB}/devices/d"
        assert generate_sas_token(uri, SECRET.encode(), now=NOW) == generate_sas_token(
            uri, SECRET, now=NOW
        )

    def test_ttl_and_default_clock(self) -> None:
        import time

        before = int(time.time())
        token = SasToken.parse(generate_sas_token(f"{HUB}/devices/d", SECRET, ttl=120))
        assert before + 120 <= token.expiry <= int(time.time()) + 120

    def test_expiry_is_truncated_to_whole_seconds(self) -> None:
        token = SasToken.parse(generate_sas_token(f"{HUB}/devices/d", SECRET, now=NOW + 0.9))
        assert token.expiry == int(NOW) + 3600

    @pytest.mark.parametrize("key", ["not base64!", "abc", "", b"\xff\xfe"])
    def test_bad_key(self, key: str | bytes) -> None:
        with pytest.raises(SasTokenError, match="signing key is not valid base64"):
            generate_sas_token(f"{HUB}/devices/d", key, now=NOW)

    @pytest.mark.parametrize("ttl", [0, -5, 0.5, float("nan"), float("inf")])
    def test_bad_ttl(self, ttl: float) -> None:
        with pytest.raises(SasTokenError, match="ttl must be"):
            generate_sas_token(f"{HUB}/devices/d", SECRET, ttl=ttl, now=NOW)

    def test_empty_resource(self) -> None:
        with pytest.raises(SasTokenError, match="resource_uri is empty"):
            generate_sas_token("", SECRET, now=NOW)

    def test_module_identity(self) -> None:
        cs = ConnectionString.parse(
            f"HostName={HUB};DeviceId=dev1;ModuleId=mod1;SharedAccessKey={SECRET}"
        )
        token = SasToken.parse(generate_sas_token(cs.resource_uri, SECRET, now=NOW))
        assert token.resource_uri == f"{HUB}/devices/dev1/modules/mod1"
        assert token.encoded_resource_uri == (
            "myhub.azure-devices.net%2Fdevices%2Fdev1%2Fmodules%2Fmod1"
        )
        token.verify(
            SECRET, resource_uri=f"{HUB}/devices/dev1/modules/mod1/messages/events", now=NOW
        )
        with pytest.raises(SasTokenError, match="resource mismatch"):
            token.verify(SECRET, resource_uri=f"{HUB}/devices/dev1/modules/mod2", now=NOW)
        with pytest.raises(SasTokenError, match="resource mismatch"):
            token.verify(SECRET, resource_uri=f"{HUB}/devices/dev1", now=NOW)

    def test_gateway_uses_hub_host_name_for_the_resource(self) -> None:
        cs = ConnectionString.parse(
            f"HostName={HUB};DeviceId=dev1;SharedAccessKey={SECRET};GatewayHostName=edge.lan"
        )
        token = SasToken.parse(generate_sas_token(cs.resource_uri, SECRET, now=NOW))
        assert token.resource_uri.startswith(HUB + "/")
        assert "edge.lan" not in str(token)


class TestSasTokenParse:
    def test_round_trip(self) -> None:
        text = generate_sas_token(f"{HUB}/devices/dev1", SECRET, policy_name="device", now=NOW)
        token = SasToken.parse(text)
        assert token.resource_uri == f"{HUB}/devices/dev1"
        assert token.expiry == int(NOW) + 3600
        assert token.key_name == "device"
        assert str(token) == text
        assert token == SasToken.parse(text)

    def test_documentation_example(self) -> None:
        # Example token from IoT Hub's documentation (lower-case percent escapes).
        token = SasToken.parse(
            "SharedAccessSignature sr=myhub.azure-devices.net%2fdevices%2fdevice1"
            "&sig=13y8ejUk2z7PLmvtwR5RqlGBOVwiq7rQR3WZ5xZX3N4%3D&se=1456971697&skn=device"
        )
        assert token.resource_uri == "myhub.azure-devices.net/devices/device1"
        assert token.signature == "13y8ejUk2z7PLmvtwR5RqlGBOVwiq7rQR3WZ5xZX3N4="
        assert token.expiry == 1456971697
        assert token.key_name == "device"

    def test_fields_in_any_order_and_whitespace(self) -> None:
        text = generate_sas_token(f"{HUB}/devices/d", SECRET, now=NOW)
        fields = text.removeprefix("SharedAccessSignature ").split("&")
        shuffled = "  SharedAccessSignature " + "&".join(reversed(fields)) + "\n"
        token = SasToken.parse(shuffled)
        token.verify(SECRET, now=NOW)
        assert str(token) == text

    def test_repr_hides_signature(self) -> None:
        token = SasToken.parse(generate_sas_token(f"{HUB}/devices/d", SECRET, now=NOW))
        assert token.signature not in repr(token)
        assert "resource_uri=" in repr(token)

    def test_expires_in(self) -> None:
        token = SasToken.parse(generate_sas_token(f"{HUB}/devices/d", SECRET, ttl=60, now=NOW))
        assert token.expires_in(NOW) == 60
        assert token.expires_in(NOW + 100) == -40
        assert 0 < SasToken.parse(generate_sas_token(f"{HUB}/devices/d", SECRET)).expires_in()

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("sr=a&sig=b&se=1", "must start with 'SharedAccessSignature '"),
            ("Bearer abc", "must start with 'SharedAccessSignature '"),
            ("SharedAccessSignature sr=a&sig&se=1", "every field must be name=value"),
            (
                "SharedAccessSignature sr=a&sig=AAAA&se=1&foo=bar",
                "unknown field 'foo'",
            ),
            (
                "SharedAccessSignature sr=a&se=1&sigc2lnbmF0dXJlLXNlY3JldA==",
                "unknown field (expected",
            ),
            ("SharedAccessSignature sr=a&sr=b&sig=AAAA&se=1", "duplicate field 'sr'"),
            ("SharedAccessSignature sr=a&se=1", "missing sig"),
            ("SharedAccessSignature sig=AAAA", "missing sr, se"),
            ("SharedAccessSignature sr=&sig=AAAA&se=1", "missing sr"),
            ("SharedAccessSignature sr=a&sig=AAAA&se=soon", "se must be an integer"),
            ("SharedAccessSignature sr=a&sig=AAAA&se=-1", "se must be an integer"),
            ("SharedAccessSignature sr=a&sig=%%%%&se=1", "sig is not valid base64"),
            ("SharedAccessSignature sr=a&sig=AAAA&se=1", "sig is not an HMAC-SHA256 value"),
        ],
    )
    def test_malformed(self, text: str, message: str) -> None:
        with pytest.raises(SasTokenError) as info:
            SasToken.parse(text)
        assert message in str(info.value)

    def test_empty_skn(self) -> None:
        text = generate_sas_token(f"{HUB}/devices/d", SECRET, now=NOW) + "&skn="
        with pytest.raises(SasTokenError, match="skn is empty"):
            SasToken.parse(text)


class TestSasTokenVerify:
    URI = f"{HUB}/devices/dev1"

    @pytest.fixture
    def token(self) -> SasToken:
        return SasToken.parse(generate_sas_token(self.URI, SECRET, ttl=3600, now=NOW))

    def test_valid(self, token: SasToken) -> None:
        token.verify(SECRET, now=NOW)
        token.verify(SECRET.encode(), resource_uri=self.URI, now=NOW + 3599)

    def test_expired(self, token: SasToken) -> None:
        with pytest.raises(SasTokenError, match=r"SAS token expired 100 s ago .*new token"):
            token.verify(SECRET, now=NOW + 3700)

    def test_expired_exactly_at_expiry(self, token: SasToken) -> None:
        with pytest.raises(SasTokenError, match="expired"):
            token.verify(SECRET, now=float(token.expiry))

    def test_wrong_key(self, token: SasToken) -> None:
        other = base64.b64encode(b"another-key-another-key-another!").decode()
        with pytest.raises(SasTokenError, match="signature does not match"):
            token.verify(other, now=NOW)

    def test_tampered_expiry(self, token: SasToken) -> None:
        text = str(token).replace(f"se={token.expiry}", f"se={token.expiry + 86400}")
        with pytest.raises(SasTokenError, match="signature does not match"):
            SasToken.parse(text).verify(SECRET, now=NOW)

    def test_tampered_resource(self, token: SasToken) -> None:
        text = str(token).replace("dev1", "dev2")
        with pytest.raises(SasTokenError, match="signature does not match"):
            SasToken.parse(text).verify(SECRET, now=NOW)

    def test_tampered_signature(self, token: SasToken) -> None:
        sig = bytearray(base64.b64decode(token.signature))
        sig[0] ^= 1
        forged = dataclasses.replace(token, signature=base64.b64encode(bytes(sig)).decode())
        with pytest.raises(SasTokenError, match="signature does not match"):
            forged.verify(SECRET, now=NOW)

    def test_added_policy_name_keeps_signature_valid_only_for_same_text(
        self, token: SasToken
    ) -> None:
        # skn is not part of the signed string: adding it does not break the HMAC (IoT Hub
        # then checks the key of that policy instead).
        SasToken.parse(str(token) + "&skn=device").verify(SECRET, now=NOW)

    def test_bad_verification_key(self, token: SasToken) -> None:
        with pytest.raises(SasTokenError, match="signing key is not valid base64"):
            token.verify("###", now=NOW)

    @pytest.mark.parametrize(
        "resource",
        [
            f"{HUB}/devices/dev1",
            f"{HUB}/devices/dev1/",
            f"{HUB}/devices/dev1/messages/events",
            f"{HUB}/devices/dev1/modules/m1",
            "MyHub.Azure-Devices.NET/devices/dev1/messages/devicebound",
            f"amqps://{HUB}/devices/dev1",
        ],
    )
    def test_resource_covered(self, token: SasToken, resource: str) -> None:
        token.verify(SECRET, resource_uri=resource, now=NOW)

    @pytest.mark.parametrize(
        "resource",
        [
            f"{HUB}/devices/dev2",
            f"{HUB}/devices/dev10",  # prefix by character, not by segment
            f"{HUB}/devices/DEV1",  # device ids are case-sensitive
            f"{HUB}/devices",
            "otherhub.azure-devices.net/devices/dev1",
        ],
    )
    def test_resource_mismatch(self, token: SasToken, resource: str) -> None:
        with pytest.raises(SasTokenError, match="resource mismatch") as info:
            token.verify(SECRET, resource_uri=resource, now=NOW)
        assert repr(self.URI) in str(info.value)

    def test_hub_level_token_covers_all_devices(self) -> None:
        token = SasToken.parse(
            generate_sas_token(f"{HUB}/devices", SECRET, policy_name="device", now=NOW)
        )
        token.verify(SECRET, resource_uri=f"{HUB}/devices/any-device", now=NOW)

    def test_token_with_lower_case_escapes_verifies(self) -> None:
        # Other signers percent-encode with lower-case hex; the signature covers the sr
        # text as sent, so it must be verified against that text.
        encoded = "myhub.azure-devices.net%2fdevices%2fdev1"
        expiry = int(NOW) + 60
        sig = _expected_signature(SECRET, encoded, expiry)
        text = f"SharedAccessSignature sr={encoded}&sig={parse.quote(sig, safe='')}&se={expiry}"
        token = SasToken.parse(text)
        token.verify(SECRET, resource_uri=self.URI, now=NOW)
        assert str(token) == text

    def test_constructed_token(self) -> None:
        expiry = int(NOW) + 60
        sig = _expected_signature(SECRET, parse.quote(self.URI, safe=""), expiry)
        token = SasToken(resource_uri=self.URI, signature=sig, expiry=expiry)
        token.verify(SECRET, resource_uri=self.URI, now=NOW)
        assert SasToken.parse(str(token)) == token

    def test_errors_do_not_contain_the_key(self, token: SasToken) -> None:
        calls: list[Callable[[], None]] = [
            lambda: token.verify(SECRET, now=NOW + 10**6),
            lambda: token.verify(SECRET, resource_uri=f"{HUB}/devices/x", now=NOW),
            lambda: SasToken.parse(str(token).replace("dev1", "dev2")).verify(SECRET, now=NOW),
        ]
        for call in calls:
            with pytest.raises(SasTokenError) as info:
                call()
            _assert_no_secret(_all_text(info.value))


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TestSasTokenProvider:
    URI = f"{HUB}/devices/dev1"

    def test_caches_and_renews_before_expiry(self) -> None:
        clock = FakeClock(NOW)
        provider = SasTokenProvider(self.URI, SECRET, ttl=1000, clock=clock)
        first = provider.token()
        assert provider.expires_at == int(NOW) + 1000
        assert not provider.needs_renewal()
        clock.now = NOW + 799  # 201 s left > 20 % of 1000
        assert provider.token() == first
        assert not provider.needs_renewal()
        clock.now = NOW + 801  # 199 s left < 200
        assert provider.needs_renewal()
        second = provider.token()
        assert second != first
        assert provider.expires_at == int(NOW + 801) + 1000
        assert not provider.needs_renewal()
        SasToken.parse(second).verify(SECRET, resource_uri=self.URI, now=clock.now)

    def test_needs_renewal_with_explicit_now(self) -> None:
        provider = SasTokenProvider(self.URI, SECRET, ttl=100, renew_margin=0.5, clock=lambda: NOW)
        assert not provider.needs_renewal(NOW + 49)
        assert provider.needs_renewal(NOW + 51)
        assert provider.needs_renewal(NOW + 1000)

    def test_zero_margin_renews_at_expiry(self) -> None:
        clock = FakeClock(NOW)
        provider = SasTokenProvider(self.URI, SECRET, ttl=100, renew_margin=0, clock=clock)
        assert not provider.needs_renewal(NOW + 99)
        assert provider.needs_renewal(NOW + 100)

    def test_renew(self) -> None:
        clock = FakeClock(NOW)
        provider = SasTokenProvider(self.URI, SECRET, clock=clock)
        first = provider.token()
        clock.now += 5
        assert provider.renew() != first
        assert provider.expires_at == int(NOW) + 5 + 3600

    def test_policy_name(self) -> None:
        provider = SasTokenProvider(self.URI, SECRET, policy_name="device", clock=lambda: NOW)
        assert SasToken.parse(provider.token()).key_name == "device"
        assert provider.resource_uri == self.URI
        assert provider.ttl == 3600

    def test_from_connection_string(self) -> None:
        cs = ConnectionString.parse(
            f"HostName={HUB};DeviceId=dev1;ModuleId=m;SharedAccessKey={SECRET};"
            "GatewayHostName=edge.lan"
        )
        provider = SasTokenProvider.from_connection_string(cs, ttl=60, clock=lambda: NOW)
        token = SasToken.parse(provider.token())
        assert token.resource_uri == f"{HUB}/devices/dev1/modules/m"
        assert token.key_name is None
        token.verify(SECRET, resource_uri=cs.resource_uri, now=NOW)

    def test_from_x509_connection_string(self) -> None:
        cs = ConnectionString.parse(f"HostName={HUB};DeviceId=dev1;x509=true")
        with pytest.raises(ConnectionStringError, match="no SharedAccessKey"):
            SasTokenProvider.from_connection_string(cs)

    def test_repr_hides_key(self) -> None:
        provider = SasTokenProvider(self.URI, SECRET, clock=lambda: NOW)
        _assert_no_secret(repr(provider))
        assert base64.b64decode(SECRET).decode() not in repr(provider)
        assert "sig=" not in repr(provider)

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"ttl": 0}, "ttl must be"),
            ({"renew_margin": 1.0}, "renew_margin must be in"),
            ({"renew_margin": -0.1}, "renew_margin must be in"),
        ],
    )
    def test_bad_settings(self, kwargs: dict[str, float], message: str) -> None:
        with pytest.raises(SasTokenError, match=message):
            SasTokenProvider(self.URI, SECRET, **kwargs)  # type: ignore[arg-type]

    def test_bad_key(self) -> None:
        with pytest.raises(SasTokenError, match="not valid base64"):
            SasTokenProvider(self.URI, "nope!")


# ======================================================================================
# ClientIdentity
# ======================================================================================

_ONE_DAY = datetime.timedelta(days=1)


def _name(cn: str | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "iothub-tls tests")]
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _sign_hash(key: Any) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _cert(
    cn: str | None,
    public_key: Any,
    issuer: tuple[x509.Certificate, Any] | None,
    *,
    ca: bool,
    self_key: Any = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name = issuer[0].subject if issuer else _name(cn)
    signing_key = issuer[1] if issuer else self_key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _ONE_DAY)
        .not_valid_after(now + 30 * _ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False,
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(signing_key, _sign_hash(signing_key))


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(
    key: Any,
    password: bytes | None = None,
    fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    data: bytes = key.private_bytes(serialization.Encoding.PEM, fmt, encryption)
    return data


class PKI:
    """A root CA, an intermediate, and device leaves of several key types."""

    def __init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = _cert(
            "Test Device Root", self.root_key.public_key(), None, ca=True, self_key=self.root_key
        )
        self.inter_key = ec.generate_private_key(ec.SECP256R1())
        self.inter = _cert(
            "Test Device Intermediate",
            self.inter_key.public_key(),
            (self.root, self.root_key),
            ca=True,
        )
        self.keys: dict[str, Any] = {
            "rsa2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "p256": ec.generate_private_key(ec.SECP256R1()),
            "p384": ec.generate_private_key(ec.SECP384R1()),
            "p521": ec.generate_private_key(ec.SECP521R1()),
        }
        self._leaves: dict[tuple[str, str | None], x509.Certificate] = {}

    def leaf(self, kind: str, cn: str | None = "dev1") -> x509.Certificate:
        if (kind, cn) not in self._leaves:
            self._leaves[kind, cn] = _cert(
                cn, self.keys[kind].public_key(), (self.inter, self.inter_key), ca=False
            )
        return self._leaves[kind, cn]

    def leaf_with_key(self, key: Any, cn: str = "odd-device") -> x509.Certificate:
        return _cert(cn, key.public_key(), (self.inter, self.inter_key), ca=False)

    def chain_pem(self, kind: str, cn: str | None = "dev1") -> bytes:
        return _pem(self.leaf(kind, cn)) + _pem(self.inter)


@pytest.fixture(scope="module")
def pki() -> PKI:
    return PKI()


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, bytes], Path]:
    def _write(name: str, data: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return _write


class TestClientIdentityConstruction:
    @pytest.mark.parametrize(
        ("kind", "key_type"), [("rsa2048", "RSA"), ("p256", "EC"), ("p384", "EC"), ("p521", "EC")]
    )
    def test_from_files(
        self, pki: PKI, write: Callable[[str, bytes], Path], kind: str, key_type: str
    ) -> None:
        certfile = write("dev.pem", pki.chain_pem(kind))
        keyfile = write("dev.key", _key_pem(pki.keys[kind]))
        identity = ClientIdentity.from_files(certfile, keyfile)
        assert identity.key_type == key_type
        assert identity.certificate == pki.leaf(kind)
        assert identity.chain == (pki.leaf(kind), pki.inter)
        assert identity.device_id == "dev1"
        # str paths work as well as Path objects
        assert ClientIdentity.from_files(str(certfile), str(keyfile)) == identity

    def test_key_in_the_certificate_file(
        self, pki: PKI, write: Callable[[str, bytes], Path]
    ) -> None:
        combined = _pem(pki.leaf("p256")) + _key_pem(pki.keys["p256"]) + _pem(pki.inter)
        identity = ClientIdentity.from_files(write("all.pem", combined))
        assert identity.chain == (pki.leaf("p256"), pki.inter)

    @pytest.mark.parametrize("as_str", [False, True])
    def test_from_pem(self, pki: PKI, as_str: bool) -> None:
        cert, key = pki.chain_pem("rsa2048"), _key_pem(pki.keys["rsa2048"])
        identity = (
            ClientIdentity.from_pem(cert.decode(), key.decode())
            if as_str
            else ClientIdentity.from_pem(cert, key)
        )
        assert identity.key_type == "RSA"
        assert len(identity.chain) == 2

    @pytest.mark.parametrize(
        "fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL]
    )
    @pytest.mark.parametrize("password", [b"s3cret", "s3cret"])
    def test_encrypted_key(
        self, pki: PKI, fmt: serialization.PrivateFormat, password: bytes | str
    ) -> None:
        key = _key_pem(pki.keys["p384"], b"s3cret", fmt)
        identity = ClientIdentity.from_pem(pki.chain_pem("p384"), key, password=password)
        assert identity.key_type == "EC"

    def test_password_for_unencrypted_key_is_ignored(self, pki: PKI) -> None:
        identity = ClientIdentity.from_pem(
            pki.chain_pem("p256"), _key_pem(pki.keys["p256"]), password="unused"
        )
        assert identity.key_type == "EC"

    def test_traditional_unencrypted_formats(self, pki: PKI) -> None:
        for kind in ("rsa2048", "p256"):
            key = _key_pem(pki.keys[kind], fmt=serialization.PrivateFormat.TraditionalOpenSSL)
            assert ClientIdentity.from_pem(pki.chain_pem(kind), key).certificate == pki.leaf(kind)

    def test_device_id_is_none_without_cn(self, pki: PKI) -> None:
        identity = ClientIdentity.from_pem(
            _pem(pki.leaf("p256", cn=None)), _key_pem(pki.keys["p256"])
        )
        assert identity.device_id is None

    def test_thumbprints_match_cryptography(self, pki: PKI) -> None:
        identity = ClientIdentity.from_pem(pki.chain_pem("p256"), _key_pem(pki.keys["p256"]))
        leaf = pki.leaf("p256")
        assert identity.thumbprint_sha1 == leaf.fingerprint(hashes.SHA1()).hex().upper()
        assert identity.thumbprint_sha256 == leaf.fingerprint(hashes.SHA256()).hex().upper()
        der = leaf.public_bytes(serialization.Encoding.DER)
        assert identity.thumbprint_sha256 == hashlib.sha256(der).hexdigest().upper()
        assert len(identity.thumbprint_sha1) == 40
        assert len(identity.thumbprint_sha256) == 64

    @pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
    @pytest.mark.parametrize("digest", ["sha1", "sha256"])
    def test_thumbprints_match_openssl(
        self, pki: PKI, write: Callable[[str, bytes], Path], digest: str
    ) -> None:
        certfile = write("dev.pem", pki.chain_pem("rsa2048"))
        identity = ClientIdentity.from_files(
            certfile, write("k.pem", _key_pem(pki.keys["rsa2048"]))
        )
        out = subprocess.run(
            ["openssl", "x509", "-noout", "-fingerprint", f"-{digest}", "-in", str(certfile)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        expected = out.strip().split("=", 1)[1].replace(":", "").upper()
        actual = identity.thumbprint_sha1 if digest == "sha1" else identity.thumbprint_sha256
        assert actual == expected

    def test_immutable(self, pki: PKI) -> None:
        identity = ClientIdentity.from_pem(pki.chain_pem("p256"), _key_pem(pki.keys["p256"]))
        with pytest.raises(AttributeError):
            identity._key = pki.keys["p384"]
        with pytest.raises(AttributeError):
            identity.foo = 1
        with pytest.raises(AttributeError):
            del identity._chain
        with pytest.raises(AttributeError):
            identity.certificate = pki.leaf("p384")  # type: ignore[misc]
        assert not hasattr(identity, "__dict__")

    def test_equality_and_hash(self, pki: PKI) -> None:
        a = ClientIdentity.from_pem(pki.chain_pem("p256"), _key_pem(pki.keys["p256"]))
        b = ClientIdentity.from_pem(pki.chain_pem("p256"), _key_pem(pki.keys["p256"]))
        c = ClientIdentity.from_pem(_pem(pki.leaf("p256")), _key_pem(pki.keys["p256"]))
        assert a == b and hash(a) == hash(b)
        assert a != c
        assert a != "identity"

    def test_repr_has_no_key_material(self, pki: PKI) -> None:
        key_pem = _key_pem(pki.keys["rsa2048"])
        identity = ClientIdentity.from_pem(pki.chain_pem("rsa2048"), key_pem)
        text = repr(identity) + str(identity)
        assert "PRIVATE" not in text
        for line in key_pem.decode().splitlines()[1:-1]:
            assert line not in text
        assert str(pki.keys["rsa2048"].private_numbers().d) not in text
        assert identity.thumbprint_sha256 in text
        assert "'dev1'" in text


class TestClientIdentityErrors:
    def test_unreadable_cert_file(self, tmp_path: Path) -> None:
        missing = tmp_path / "nope" / "device.pem"
        with pytest.raises(IdentityError) as info:
            ClientIdentity.from_files(missing)
        assert str(missing) in str(info.value)
        assert "cannot read the certificate file" in str(info.value)
        assert "check the path" in str(info.value)
        assert isinstance(info.value.__cause__, FileNotFoundError)

    def test_unreadable_key_file(
        self, pki: PKI, write: Callable[[str, bytes], Path], tmp_path: Path
    ) -> None:
        certfile = write("dev.pem", pki.chain_pem("p256"))
        with pytest.raises(IdentityError) as info:
            ClientIdentity.from_files(certfile, tmp_path)  # a directory
        assert "cannot read the private key file" in str(info.value)
        assert str(tmp_path) in str(info.value)
        assert isinstance(info.value.__cause__, OSError)

    def test_no_certificate_in_pem(self, pki: PKI) -> None:
        key = _key_pem(pki.keys["p256"])
        with pytest.raises(
            IdentityError, match=r"no certificate in cert_pem \(found only: PRIVATE KEY\)"
        ):
            ClientIdentity.from_pem(key, key)

    @pytest.mark.parametrize("garbage", [b"hello, I am not a certificate", b"", "\u00e9t\u00e9"])
    def test_garbage_certificate(self, pki: PKI, garbage: bytes | str) -> None:
        with pytest.raises(IdentityError, match="cert_pem is not PEM data"):
            ClientIdentity.from_pem(garbage, _key_pem(pki.keys["p256"]))

    def test_der_certificate(self, pki: PKI, write: Callable[[str, bytes], Path]) -> None:
        der = pki.leaf("p256").public_bytes(serialization.Encoding.DER)
        path = write("dev.der", der)
        with pytest.raises(IdentityError, match=r"looks like DER .*openssl x509 -inform der"):
            ClientIdentity.from_files(path, write("k.pem", _key_pem(pki.keys["p256"])))

    def test_corrupt_certificate_block(self, pki: PKI) -> None:
        bad = b"-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n"
        with pytest.raises(IdentityError, match="certificate 2 in cert_pem is corrupt"):
            ClientIdentity.from_pem(_pem(pki.leaf("p256")) + bad, _key_pem(pki.keys["p256"]))

    def test_key_missing_from_cert_file(
        self, pki: PKI, write: Callable[[str, bytes], Path]
    ) -> None:
        certfile = write("dev.pem", pki.chain_pem("p256"))
        with pytest.raises(IdentityError, match=r"no private key in .*pass keyfile="):
            ClientIdentity.from_files(certfile)

    def test_key_missing_from_key_pem(self, pki: PKI) -> None:
        with pytest.raises(IdentityError, match="no private key in key_pem"):
            ClientIdentity.from_pem(pki.chain_pem("p256"), pki.chain_pem("p256"))

    def test_garbage_key(self, pki: PKI, write: Callable[[str, bytes], Path]) -> None:
        with pytest.raises(IdentityError, match="key_pem is not PEM data"):
            ClientIdentity.from_pem(pki.chain_pem("p256"), b"garbage")
        keyfile = write("k.pem", b"\x30\x82\x01\x00garbage")
        with pytest.raises(IdentityError, match=r"looks like DER .*openssl pkey -inform der"):
            ClientIdentity.from_files(write("c.pem", pki.chain_pem("p256")), keyfile)

    def test_corrupt_key_block(self, pki: PKI) -> None:
        bad = b"-----BEGIN PRIVATE KEY-----\nAAAAAAAA\n-----END PRIVATE KEY-----\n"
        with pytest.raises(IdentityError, match="private key in key_pem is corrupt"):
            ClientIdentity.from_pem(pki.chain_pem("p256"), bad)

    def test_two_keys(self, pki: PKI) -> None:
        keys = _key_pem(pki.keys["p256"]) + _key_pem(pki.keys["p384"])
        with pytest.raises(IdentityError, match="contains 2 private keys"):
            ClientIdentity.from_pem(pki.chain_pem("p256"), keys)

    @pytest.mark.parametrize(
        "fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL]
    )
    def test_encrypted_key_without_password(
        self, pki: PKI, fmt: serialization.PrivateFormat
    ) -> None:
        key = _key_pem(pki.keys["p256"], b"s3cret", fmt)
        with pytest.raises(IdentityError) as info:
            ClientIdentity.from_pem(pki.chain_pem("p256"), key)
        assert "the private key in key_pem is encrypted: pass password=..." in str(info.value)

    def test_wrong_password(self, pki: PKI, write: Callable[[str, bytes], Path]) -> None:
        keyfile = write("k.pem", _key_pem(pki.keys["rsa2048"], b"right"))
        certfile = write("c.pem", pki.chain_pem("rsa2048"))
        with pytest.raises(IdentityError) as info:
            ClientIdentity.from_files(certfile, keyfile, password="hunter2-guess")
        assert "wrong password for the encrypted private key" in str(info.value)
        assert str(keyfile) in str(info.value)
        assert "hunter2-guess" not in str(info.value) + repr(info.value)

    def test_key_does_not_match_certificate(self, pki: PKI) -> None:
        with pytest.raises(IdentityError) as info:
            ClientIdentity.from_pem(pki.chain_pem("p256"), _key_pem(pki.keys["p384"]))
        assert "the private key does not match the device certificate (CN=dev1)" in str(info.value)

    def test_chain_out_of_order(self, pki: PKI) -> None:
        reordered = _pem(pki.inter) + _pem(pki.leaf("p256"))
        with pytest.raises(IdentityError, match="matches certificate 2 of the chain"):
            ClientIdentity.from_pem(reordered, _key_pem(pki.keys["p256"]))

    def test_rsa_too_small(self, pki: PKI) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        with pytest.raises(IdentityError, match="RSA key has 1024 bits, which is too small"):
            ClientIdentity.from_pem(_pem(pki.leaf_with_key(key)), _key_pem(key))

    def test_unsupported_curve(self, pki: PKI) -> None:
        key = ec.generate_private_key(ec.SECP256K1())
        with pytest.raises(IdentityError, match="curve secp256k1, which TLS with IoT Hub does not"):
            ClientIdentity.from_pem(_pem(pki.leaf_with_key(key)), _key_pem(key))

    def test_ed25519(self, pki: PKI) -> None:
        key = ed25519.Ed25519PrivateKey.generate()
        with pytest.raises(IdentityError, match="Ed25519 keys are not supported: IoT Hub"):
            ClientIdentity.from_pem(_pem(pki.leaf_with_key(key)), _key_pem(key))

    def test_dsa(self, pki: PKI) -> None:
        key = dsa.generate_private_key(key_size=1024)
        with pytest.raises(IdentityError, match="DSA keys are not supported"):
            ClientIdentity.from_pem(_pem(pki.leaf_with_key(key)), _key_pem(key))

    def test_wrong_input_type(self) -> None:
        with pytest.raises(IdentityError, match="cert_pem must be bytes or str"):
            ClientIdentity.from_pem(42, b"")  # type: ignore[arg-type]

    def test_direct_construction_needs_a_certificate(self, pki: PKI) -> None:
        with pytest.raises(IdentityError, match="no certificate given"):
            ClientIdentity([], pki.keys["p256"])

    def test_is_a_value_error(self) -> None:
        with pytest.raises(ValueError):
            ClientIdentity.from_pem(b"", b"")

    @pytest.mark.parametrize(
        "kind,oid,corrupted",
        [
            # id-ecPublicKey 1.2.840.10045.2.1 -> 1.2.840.10045.2.127
            ("p256", "06072A8648CE3D0201", "06072A8648CE3D027F"),
            # rsaEncryption 1.2.840.113549.1.1.1 -> 1.2.840.113549.1.1.127
            ("rsa2048", "06092A864886F70D010101", "06092A864886F70D01017F"),
        ],
    )
    def test_corrupted_key_algorithm_oid(
        self, pki: PKI, write: Callable[[str, bytes], Path], kind: str, oid: str, corrupted: str
    ) -> None:
        der = pki.leaf(kind).public_bytes(serialization.Encoding.DER)
        assert der.count(bytes.fromhex(oid)) == 1  # only in the SubjectPublicKeyInfo
        broken = x509.load_der_x509_certificate(
            der.replace(bytes.fromhex(oid), bytes.fromhex(corrupted))
        )
        key = _key_pem(pki.keys[kind])
        with pytest.raises(IdentityError, match="has a public key that cannot be read") as info:
            ClientIdentity.from_pem(_pem(broken) + _pem(pki.inter), key)
        assert "certificate 1 in cert_pem" in str(info.value)
        assert "Unknown key type" in str(info.value)
        with pytest.raises(IdentityError, match=r"certificate 1 in '.*dev\.pem'"):
            ClientIdentity.from_files(write("dev.pem", _pem(broken)), write("dev.key", key))
        with pytest.raises(IdentityError, match="certificate 1 of the chain"):
            ClientIdentity([broken, pki.inter], pki.keys[kind])

    @pytest.mark.parametrize("password", [7, 7329322839, 1.5, ["x"]])
    def test_password_of_another_type_is_a_type_error(self, pki: PKI, password: object) -> None:
        # bytes(7) was seven zero bytes, bytes(7329322839) seven gigabytes
        key = _key_pem(pki.keys["p256"], b"x")
        with pytest.raises(TypeError, match="password must be bytes or str, not"):
            ClientIdentity.from_pem(pki.chain_pem("p256"), key, password=password)  # type: ignore[arg-type]

    def test_password_as_bytearray_or_memoryview(self, pki: PKI) -> None:
        key = _key_pem(pki.keys["p256"], b"secret")
        for password in (bytearray(b"secret"), memoryview(b"secret")):
            identity = ClientIdentity.from_pem(pki.chain_pem("p256"), key, password=password)  # type: ignore[arg-type]
            assert identity.device_id == "dev1"

    @pytest.mark.parametrize("path", [None, 3, True, 1.5])
    def test_file_paths_of_another_type_are_type_errors(
        self, pki: PKI, write: Callable[[str, bytes], Path], path: object
    ) -> None:
        # an int would be opened as a file descriptor, and closed afterwards
        certfile = write("dev.pem", pki.chain_pem("p256"))
        with pytest.raises(TypeError, match="the certificate file must be a path"):
            ClientIdentity.from_files(path)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="the private key file must be a path"):
            ClientIdentity.from_files(certfile, path if path is not None else 0)  # type: ignore[arg-type]

    def test_int_path_does_not_touch_that_file_descriptor(
        self, pki: PKI, write: Callable[[str, bytes], Path]
    ) -> None:
        fd = os.open(write("other.txt", b"someone else's file"), os.O_RDONLY)
        try:
            with pytest.raises(TypeError):
                ClientIdentity.from_files(fd)  # type: ignore[arg-type]
            os.fstat(fd)  # still open: nothing read it or closed it
        finally:
            os.close(fd)

    def test_bytes_path_and_pathlike_are_paths(
        self, pki: PKI, write: Callable[[str, bytes], Path]
    ) -> None:
        key = _key_pem(pki.keys["p256"])
        certfile, keyfile = write("c.pem", pki.chain_pem("p256")), write("k.pem", key)
        by_bytes = ClientIdentity.from_files(os.fsencode(certfile), os.fsencode(keyfile))  # type: ignore[arg-type]
        assert by_bytes == ClientIdentity.from_files(certfile, keyfile)

    def test_oversized_file_is_refused_without_reading_it_all(self, tmp_path: Path) -> None:
        big = tmp_path / "huge.pem"
        with big.open("wb") as fh:
            fh.truncate(64 << 20)  # sparse: 64 MiB of zeros
        with pytest.raises(IdentityError, match="larger than 1 MiB"):
            ClientIdentity.from_files(big)

    def test_non_certificates_in_the_chain_are_type_errors(self, pki: PKI) -> None:
        with pytest.raises(TypeError, match="certificate 1 must be a cryptography"):
            ClientIdentity([pki.chain_pem("p256")], pki.keys["p256"])  # type: ignore[list-item]


# --------------------------------------------------------------------------------------
# Loading into ssl.SSLContext
# --------------------------------------------------------------------------------------


def _handshake(
    client: ssl.SSLObject,
    server: ssl.SSLObject,
    c_in: ssl.MemoryBIO,
    c_out: ssl.MemoryBIO,
    s_in: ssl.MemoryBIO,
    s_out: ssl.MemoryBIO,
) -> None:
    done = {"client": False, "server": False}
    for _ in range(50):
        for name, obj in (("client", client), ("server", server)):
            if done[name]:
                continue
            try:
                obj.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server sees the client certificate once it has read the
            # client's Finished; one more read round flushes it.
            return
    raise AssertionError("handshake did not complete")


@pytest.fixture(scope="module")
def server_ca() -> trustme.CA:
    return trustme.CA()


def _mutual_tls_peer(identity: ClientIdentity, pki: PKI, server_ca: trustme.CA) -> dict[str, Any]:
    """Run an in-memory mutual-TLS handshake; return the client cert the server saw."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ca.issue_cert("hub.test").configure_cert(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cadata=_pem(pki.root).decode())  # root only

    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    server_ca.configure_trust(client_ctx)
    identity._load_into(client_ctx)

    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="hub.test")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    _handshake(client, server, c_in, c_out, s_in, s_out)
    peer = server.getpeercert()
    assert peer
    return peer


class TestLoadInto:
    @pytest.mark.parametrize("kind", ["rsa2048", "p256", "p384"])
    def test_mutual_tls_with_chain(self, pki: PKI, server_ca: trustme.CA, kind: str) -> None:
        identity = ClientIdentity.from_pem(pki.chain_pem(kind), _key_pem(pki.keys[kind]))
        peer = _mutual_tls_peer(identity, pki, server_ca)
        # The server trusts only the root: the intermediate must have been sent too.
        assert ((("organizationName", "iothub-tls tests"),), (("commonName", "dev1"),)) == (
            peer["subject"]
        )

    def test_encrypted_key(self, pki: PKI, server_ca: trustme.CA) -> None:
        key = _key_pem(pki.keys["rsa2048"], b"pw")
        identity = ClientIdentity.from_pem(pki.chain_pem("rsa2048"), key, password=b"pw")
        assert (
            dict(x[0] for x in _mutual_tls_peer(identity, pki, server_ca)["subject"])["commonName"]
            == "dev1"
        )

    @pytest.mark.parametrize("kind", ["rsa2048", "p256", "p521"])
    def test_loads_into_client_context(self, pki: PKI, kind: str) -> None:
        identity = ClientIdentity.from_pem(
            pki.chain_pem(kind), _key_pem(pki.keys[kind], b"x"), password="x"
        )
        identity._load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))

    def test_ssl_error_becomes_identity_error(self, pki: PKI) -> None:
        identity = ClientIdentity.from_pem(pki.chain_pem("rsa2048"), _key_pem(pki.keys["rsa2048"]))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=3")  # requires RSA >= 3072 bits
        with pytest.raises(
            IdentityError, match="OpenSSL refused the device certificate or key"
        ) as info:
            identity._load_into(ctx)
        assert isinstance(info.value.__cause__, ssl.SSLError)


class SpyContext(ssl.SSLContext):
    """Records what ``load_cert_chain`` was given, and inspects the file while it exists."""

    calls: list[dict[str, Any]]

    def load_cert_chain(self, certfile: Any, keyfile: Any = None, password: Any = None) -> None:
        path = os.fspath(certfile)
        st = os.stat(path)
        parent = os.path.dirname(path)
        self.calls.append(
            {
                "path": path,
                "password": password,
                "keyfile": keyfile,
                "content": Path(path).read_bytes(),
                "file_mode": stat.S_IMODE(st.st_mode),
                "dir_mode": stat.S_IMODE(os.stat(parent).st_mode),
                "regular": stat.S_ISREG(st.st_mode),
            }
        )
        super().load_cert_chain(certfile, keyfile, password)


@pytest.fixture
def spy() -> Iterator[SpyContext]:
    ctx = SpyContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.calls = []
    yield ctx


def _check_bundle(call: dict[str, Any], pki: PKI, kind: str) -> None:
    content: bytes = call["content"]
    assert b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in content
    assert b"-----BEGIN PRIVATE KEY-----" not in content
    assert b"-----BEGIN RSA PRIVATE KEY-----" not in content
    assert b"-----BEGIN EC PRIVATE KEY-----" not in content
    assert _pem(pki.leaf(kind)) in content and _pem(pki.inter) in content
    assert content.index(_pem(pki.leaf(kind))) < content.index(_pem(pki.inter))
    assert isinstance(call["password"], bytes) and len(call["password"]) == 32
    assert call["keyfile"] is None


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="needs memfd_create")
class TestMemfd:
    def test_uses_anonymous_memory_file(self, pki: PKI, spy: SpyContext) -> None:
        identity = ClientIdentity.from_pem(pki.chain_pem("p256"), _key_pem(pki.keys["p256"]))
        identity._load_into(spy)
        (call,) = spy.calls
        assert call["path"].startswith("/proc/self/fd/")
        _check_bundle(call, pki, "p256")
        fd = int(call["path"].rsplit("/", 1)[1])
        with pytest.raises(OSError):
            os.fstat(fd)  # closed again (unless reused, which nothing here does)

    def test_fresh_password_each_time(self, pki: PKI, spy: SpyContext) -> None:
        identity = ClientIdentity.from_pem(pki.chain_pem("p256"), _key_pem(pki.keys["p256"]))
        identity._load_into(spy)
        identity._load_into(spy)
        assert spy.calls[0]["password"] != spy.calls[1]["password"]


class TestTempdirFallback:
    def _record_mkdtemp(self, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        created: list[str] = []
        real = tempfile.mkdtemp

        def mkdtemp(*args: Any, **kwargs: Any) -> str:
            path: str = real(*args, **kwargs)
            created.append(path)
            return path

        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
        return created

    def test_without_memfd(
        self, pki: PKI, spy: SpyContext, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delattr(os, "memfd_create", raising=False)
        created = self._record_mkdtemp(monkeypatch)
        identity = ClientIdentity.from_pem(pki.chain_pem("rsa2048"), _key_pem(pki.keys["rsa2048"]))
        identity._load_into(spy)
        (call,) = spy.calls
        _check_bundle(call, pki, "rsa2048")
        assert call["regular"]
        assert call["dir_mode"] == 0o700
        assert call["file_mode"] == 0o600
        assert created == [os.path.dirname(call["path"])]
        assert not os.path.exists(created[0])

    def test_memfd_failure_falls_back(
        self, pki: PKI, spy: SpyContext, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def broken(*args: Any) -> int:
            raise OSError(38, "Function not implemented")

        monkeypatch.setattr(os, "memfd_create", broken, raising=False)
        created = self._record_mkdtemp(monkeypatch)
        identity = ClientIdentity.from_pem(pki.chain_pem("p256"), _key_pem(pki.keys["p256"]))
        identity._load_into(spy)
        assert len(created) == 1 and not os.path.exists(created[0])
        _check_bundle(spy.calls[0], pki, "p256")

    def test_directory_removed_on_error(self, pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delattr(os, "memfd_create", raising=False)
        created = self._record_mkdtemp(monkeypatch)
        identity = ClientIdentity.from_pem(pki.chain_pem("rsa2048"), _key_pem(pki.keys["rsa2048"]))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=3")
        with pytest.raises(IdentityError):
            identity._load_into(ctx)
        assert len(created) == 1 and not os.path.exists(created[0])

    def test_fallback_handshake(
        self, pki: PKI, server_ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delattr(os, "memfd_create", raising=False)
        identity = ClientIdentity.from_pem(pki.chain_pem("p256"), _key_pem(pki.keys["p256"]))
        assert _mutual_tls_peer(identity, pki, server_ca)["subject"][1] == (("commonName", "dev1"),)


def test_connection_string_coerce_and_identity_agreement():
    text = "HostName=hub.azure-devices.net;DeviceId=d1;x509=true"
    cs = ConnectionString.coerce(text)
    assert ConnectionString.coerce(cs) is cs
    with pytest.raises(IdentityError, match="x509=true: pass identity="):
        cs.check_identity(None)
    sas = ConnectionString.coerce(
        "HostName=hub.azure-devices.net;DeviceId=d1;SharedAccessKey=" + "A" * 43 + "="
    )
    sas.check_identity(None)
    with pytest.raises(IdentityError, match=r"an X\.509 identity was given"):
        sas.check_identity(object())  # type: ignore[arg-type]


# -- SharedAccessSignature connection strings ----------------------------------------------


def _token_cs(resource: str, *, ttl: float = 600, now: float | None = None) -> str:
    token = generate_sas_token(resource, SECRET, ttl=ttl, now=now)
    return f"HostName={HUB};DeviceId=d1;SharedAccessSignature={token}"


def test_shared_access_signature_connection_string_uses_the_token_as_is():
    text = _token_cs(f"{HUB}/devices/d1")
    cs = ConnectionString.parse(text)
    token = text.split("SharedAccessSignature=", 1)[1]
    assert cs.shared_access_signature == token and cs.shared_access_key is None
    assert "sig=" not in str(cs) and "sig=" not in repr(cs)
    assert "SharedAccessSignature=<redacted>" in str(cs)
    provider = SasTokenProvider.from_connection_string(cs)
    assert provider.token() == token and not provider.renewable
    assert not provider.needs_renewal()


def test_a_token_for_the_whole_hub_covers_the_device():
    cs = ConnectionString.parse(_token_cs(HUB))
    assert cs.device_id == "d1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_token_cs(f"{HUB}/devices/other"), "not for this device"),
        (
            _token_cs(f"{HUB}/devices/d1") + f";SharedAccessKey={SECRET}",
            "SharedAccessKey and SharedAccessSignature are all set",
        ),
        (_token_cs(f"{HUB}/devices/d1") + ";x509=true", "are all set"),
    ],
)
def test_shared_access_signature_refusals(text: str, message: str) -> None:
    with pytest.raises(ConnectionStringError, match=message) as info:
        ConnectionString.parse(text)
    assert "sig=" not in str(info.value)


def test_an_expired_ready_made_token_asks_for_a_fresh_one():
    clock = [1_000_000.0]
    cs = ConnectionString.parse(_token_cs(f"{HUB}/devices/d1", ttl=60, now=clock[0]))
    provider = SasTokenProvider.from_connection_string(cs, clock=lambda: clock[0])
    assert provider.token().startswith("SharedAccessSignature ")
    clock[0] += 61
    with pytest.raises(AuthenticationError, match="cannot be renewed without the device key"):
        provider.token()
    with pytest.raises(AuthenticationError, match="build a new client from a connection string"):
        provider.renew()
