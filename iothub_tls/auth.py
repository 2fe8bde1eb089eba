"""Device credentials for Azure IoT Hub: connection strings, SAS tokens and X.509 identities.

Three independent pieces live here:

* :class:`ConnectionString` parses the ``HostName=...;DeviceId=...;SharedAccessKey=...``
  strings that the Azure portal and ``az iot hub device-identity connection-string show``
  print, validates them, and derives the values a transport needs (the host to connect
  to, the MQTT client id, the SAS resource URI).
* :func:`generate_sas_token`, :class:`SasToken` and :class:`SasTokenProvider` implement IoT
  Hub security tokens::

      SharedAccessSignature sr={URL-encoded resource URI}&sig={signature}&se={expiry}[&skn={policy}]

  where ``signature = base64(HMAC-SHA256(base64decode(key), URL-encoded resource URI + "\\n"
  + expiry))`` and ``expiry`` is in seconds since the Unix epoch. The resource URI starts
  with the hub's host name (no scheme), e.g. ``myhub.azure-devices.net/devices/device1``,
  and a token grants access to every endpoint whose URI has it as a prefix *by path
  segment* (``/a/b`` covers ``/a/b/c`` but not ``/a/bc``).
* :class:`ClientIdentity` holds a device certificate (with its chain) and private key for
  mutual TLS, validated when it is built, and loads them into an :class:`ssl.SSLContext`
  without ever writing the plaintext key to persistent storage.

Secrets never appear in ``repr()``/``str()`` output or in exception messages: the shared
access key, the token signature and private key material are always left out.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import hmac
import ipaddress
import math
import os
import re
import secrets
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias
from urllib.parse import quote, unquote

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.x509.oid import NameOID

from .errors import ConnectionStringError, IdentityError, SasTokenError

__all__ = [
    "ClientIdentity",
    "ConnectionString",
    "SasToken",
    "SasTokenProvider",
    "generate_sas_token",
]

StrPath: TypeAlias = "str | os.PathLike[str]"
"""A filesystem path accepted by :meth:`ClientIdentity.from_files`."""

_SupportedKey: TypeAlias = "rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey"

# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------

_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _is_plausible_host(name: str) -> bool:
    """True for a bare DNS name (``hub.azure-devices.net``, ``localhost``) or an IP literal."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return True
    if not name or len(name) > 253:
        return False
    return all(_DNS_LABEL.fullmatch(label) for label in name.split("."))


def _decode_base64_key(key: str | bytes) -> bytes:
    """Decode a base64 shared access key strictly; raise :class:`binascii.Error` (or
    :class:`ValueError`) without any key material in the message when it is not valid."""
    raw = key.encode("ascii") if isinstance(key, str) else bytes(key)
    decoded = base64.b64decode(raw.strip(), validate=True)
    if not decoded:
        raise ValueError("empty key")
    return decoded


# --------------------------------------------------------------------------------------
# Connection strings
# --------------------------------------------------------------------------------------

_HOST_NAME = "HostName"
_DEVICE_ID = "DeviceId"
_MODULE_ID = "ModuleId"
_SHARED_ACCESS_KEY = "SharedAccessKey"
_SHARED_ACCESS_KEY_NAME = "SharedAccessKeyName"
_SHARED_ACCESS_SIGNATURE = "SharedAccessSignature"
_X509 = "x509"
_GATEWAY_HOST_NAME = "GatewayHostName"

_CS_KEYS = (
    _HOST_NAME,
    _DEVICE_ID,
    _MODULE_ID,
    _SHARED_ACCESS_KEY,
    _SHARED_ACCESS_KEY_NAME,
    _SHARED_ACCESS_SIGNATURE,
    _X509,
    _GATEWAY_HOST_NAME,
)

_FORBIDDEN_IN_ID = re.compile(r"[/\s\x00-\x1f\x7f]")


def _check_identifier(name: str, value: str) -> None:
    """Reject device/module ids that would break the resource URI or the MQTT client id."""
    if not value:
        raise ConnectionStringError(f"{name} is empty")
    if len(value) > 128:
        raise ConnectionStringError(f"{name} is longer than 128 characters")
    if _FORBIDDEN_IN_ID.search(value) or not value.isascii():
        raise ConnectionStringError(
            f"{name} {value!r} contains a character IoT Hub does not allow in identities "
            "('/', whitespace, control or non-ASCII characters)"
        )


def _unknown_key_message(index: int, name: str) -> str:
    """Describe an unknown connection-string key without echoing text that may be secret.

    A value pasted without its ``SharedAccessKey=`` prefix looks like an unknown key
    (base64 keys contain ``=``), so the name is echoed only when it is recognisably a
    misspelt key name.
    """
    valid = ", ".join(_CS_KEYS)
    lowered = {k.lower(): k for k in _CS_KEYS}
    if name.lower() in lowered:
        return (
            f"key {name!r} must be written {lowered[name.lower()]!r}: connection string "
            "keys are case-sensitive"
        )
    close = difflib.get_close_matches(name, _CS_KEYS, n=1, cutoff=0.75)
    if close:
        # Suggest, but do not echo: a key glued to its name would still match closely.
        return f"unknown key in segment {index}: did you mean {close[0]!r}?"
    return (
        f"unknown key in segment {index} (not shown, it may contain secret material); "
        f"valid keys are {valid}"
    )


@dataclass(frozen=True)
class ConnectionString:
    """A parsed, validated IoT Hub *device* (or module) connection string.

    Build it with :meth:`parse`; constructing it directly runs the same validation. The
    shared access key is kept but never printed: ``repr()`` omits it and ``str()`` shows
    ``SharedAccessKey=<redacted>``.

    ``GatewayHostName`` (IoT Edge, protocol gateways) changes where the device connects,
    not who it is: :attr:`hostname` is the gateway (TLS server, SNI, certificate check),
    while :attr:`resource_uri` — what SAS tokens are signed for — keeps the hub's
    ``HostName``, as the Azure IoT SDKs do.
    """

    host_name: str
    device_id: str
    module_id: str | None = None
    shared_access_key: str | None = field(default=None, repr=False)
    shared_access_key_name: str | None = None
    x509: bool = False
    gateway_host_name: str | None = None
    #: a ready-made token (``SharedAccessSignature sr=...&sig=...&se=...``): used until it
    #: expires, never renewed (the device has no key to sign a new one)
    shared_access_signature: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.host_name:
            raise ConnectionStringError(
                "HostName is missing: expected HostName=<hub>.azure-devices.net"
            )
        if not _is_plausible_host(self.host_name):
            raise ConnectionStringError(
                f"HostName {self.host_name!r} is not a valid DNS name: give the bare host "
                "name, e.g. HostName=myhub.azure-devices.net (no scheme, port or path)"
            )
        if self.gateway_host_name is not None and not _is_plausible_host(self.gateway_host_name):
            raise ConnectionStringError(
                f"GatewayHostName {self.gateway_host_name!r} is not a valid DNS name or IP "
                "address (no scheme, port or path)"
            )
        if not self.device_id:
            raise ConnectionStringError("DeviceId is missing: expected DeviceId=<device id>")
        _check_identifier("DeviceId", self.device_id)
        if self.module_id is not None:
            _check_identifier("ModuleId", self.module_id)
        if self.shared_access_key_name is not None and not self.shared_access_key_name:
            raise ConnectionStringError("SharedAccessKeyName is empty")
        given = [
            name
            for name, present in (
                (_SHARED_ACCESS_KEY, self.shared_access_key is not None),
                (_SHARED_ACCESS_SIGNATURE, self.shared_access_signature is not None),
                ("x509=true", self.x509),
            )
            if present
        ]
        if len(given) > 1:
            raise ConnectionStringError(
                f"{' and '.join(given)} are all set: a device authenticates with one of a "
                "symmetric key, a SAS token or an X.509 certificate; keep one of them"
            )
        if not given:
            raise ConnectionStringError(
                "neither SharedAccessKey, SharedAccessSignature nor x509=true is set: add "
                "the device's SharedAccessKey, or x509=true and pass a ClientIdentity"
            )
        if self.shared_access_signature is not None:
            self._check_signature(self.shared_access_signature)
        if self.shared_access_key is not None:
            if not self.shared_access_key:
                raise ConnectionStringError("SharedAccessKey is empty")
            try:
                _decode_base64_key(self.shared_access_key)
            except (ValueError, UnicodeError):
                # ``from None``: the original error is dropped so that nothing derived
                # from the key travels with the traceback.
                raise ConnectionStringError(
                    "SharedAccessKey is not valid base64: copy the device's primary or "
                    "secondary key exactly as the portal shows it"
                ) from None

    def _check_signature(self, text: str) -> None:
        try:
            token = SasToken.parse(text)
        except SasTokenError as exc:
            raise ConnectionStringError(
                f"SharedAccessSignature is not a SAS token: {exc}"
            ) from None
        if not _resource_covers(token.resource_uri, self.resource_uri):
            raise ConnectionStringError(
                f"the SharedAccessSignature is for {token.resource_uri!r}, not for this "
                f"device ({self.resource_uri!r}): use a token made for the device"
            )

    @classmethod
    def parse(cls, text: str) -> ConnectionString:
        """Parse ``Key=Value`` pairs separated by ``;``.

        Values may contain ``=`` (base64 keys end with it); keys are case-sensitive, as
        Azure writes them. Surrounding whitespace and a trailing ``;`` are tolerated.

        :raises ConnectionStringError: naming the bad part; the key is never included.
        """
        if not isinstance(text, str):
            raise ConnectionStringError(
                f"a connection string must be a str, not {type(text).__name__}"
            )
        stripped = text.strip()
        if not stripped:
            raise ConnectionStringError("the connection string is empty")
        segments = stripped.split(";")
        if segments[-1].strip() == "":
            segments.pop()
        values: dict[str, str] = {}
        for index, raw in enumerate(segments, start=1):
            segment = raw.strip()
            if not segment:
                raise ConnectionStringError(
                    f"segment {index} is empty (two ';' in a row): expected Key=Value"
                )
            name, sep, value = segment.partition("=")
            name, value = name.strip(), value.strip()
            if not sep:
                raise ConnectionStringError(
                    f"segment {index} has no '=': every part must be Key=Value"
                )
            if name not in _CS_KEYS:
                raise ConnectionStringError(_unknown_key_message(index, name))
            if name in values:
                raise ConnectionStringError(f"duplicate key {name!r}")
            if not value and name != _SHARED_ACCESS_KEY:
                raise ConnectionStringError(f"{name} is empty")
            values[name] = value

        if _HOST_NAME not in values:
            raise ConnectionStringError(
                "HostName is missing: expected HostName=<hub>.azure-devices.net"
            )
        if _DEVICE_ID not in values:
            hint = (
                " (this looks like a hub-level policy connection string; a device needs "
                "its own device connection string)"
                if _SHARED_ACCESS_KEY_NAME in values
                else ""
            )
            raise ConnectionStringError(f"DeviceId is missing{hint}")

        x509_flag = False
        if _X509 in values:
            flag = values[_X509].lower()
            if flag not in ("true", "false"):
                raise ConnectionStringError(
                    f"x509 must be 'true' or 'false', not {values[_X509][:20]!r}"
                )
            x509_flag = flag == "true"

        return cls(
            host_name=values[_HOST_NAME],
            device_id=values[_DEVICE_ID],
            module_id=values.get(_MODULE_ID),
            shared_access_key=values.get(_SHARED_ACCESS_KEY),
            shared_access_key_name=values.get(_SHARED_ACCESS_KEY_NAME),
            x509=x509_flag,
            gateway_host_name=values.get(_GATEWAY_HOST_NAME),
            shared_access_signature=values.get(_SHARED_ACCESS_SIGNATURE),
        )

    @classmethod
    def coerce(cls, value: str | ConnectionString) -> ConnectionString:
        """``value`` itself when it is one already, else :meth:`parse` of it."""
        return value if isinstance(value, ConnectionString) else cls.parse(value)

    def check_identity(self, identity: ClientIdentity | None) -> None:
        """Check that the credentials agree: ``x509=true`` needs a device certificate,
        and a ``SharedAccessKey`` excludes one.

        :raises IdentityError: saying which way to fix it.
        """
        if self.x509 and identity is None:
            raise IdentityError(
                "the connection string says x509=true: pass "
                "identity=ClientIdentity.from_files(device_cert, device_key)"
            )
        if not self.x509 and identity is not None:
            raise IdentityError(
                "the connection string has a SharedAccessKey (or SharedAccessSignature) and "
                "an X.509 identity was given: use x509=true for certificate "
                "authentication, or drop identity"
            )

    @property
    def hostname(self) -> str:
        """The host to open the TLS connection to (and send as SNI): the gateway when
        ``GatewayHostName`` is set, else the hub."""
        return self.gateway_host_name or self.host_name

    @property
    def client_id(self) -> str:
        """The MQTT client id: ``device`` or ``device/module``."""
        if self.module_id is None:
            return self.device_id
        return f"{self.device_id}/{self.module_id}"

    @property
    def resource_uri(self) -> str:
        """The SAS resource URI (not URL-encoded): ``{HostName}/devices/{device}`` or
        ``{HostName}/devices/{device}/modules/{module}``. Always the hub's HostName, even
        behind a gateway."""
        uri = f"{self.host_name}/devices/{self.device_id}"
        if self.module_id is not None:
            uri += f"/modules/{self.module_id}"
        return uri

    def __str__(self) -> str:
        parts = [f"{_HOST_NAME}={self.host_name}", f"{_DEVICE_ID}={self.device_id}"]
        if self.module_id is not None:
            parts.append(f"{_MODULE_ID}={self.module_id}")
        if self.shared_access_key_name is not None:
            parts.append(f"{_SHARED_ACCESS_KEY_NAME}={self.shared_access_key_name}")
        if self.shared_access_key is not None:
            parts.append(f"{_SHARED_ACCESS_KEY}=<redacted>")
        if self.shared_access_signature is not None:
            parts.append(f"{_SHARED_ACCESS_SIGNATURE}=<redacted>")
        if self.x509:
            parts.append(f"{_X509}=true")
        if self.gateway_host_name is not None:
            parts.append(f"{_GATEWAY_HOST_NAME}={self.gateway_host_name}")
        return ";".join(parts)


# --------------------------------------------------------------------------------------
# SAS tokens
# --------------------------------------------------------------------------------------

_SAS_PREFIX = "SharedAccessSignature "
_SAS_FIELDS = ("sr", "sig", "se", "skn")


def _encode_resource(resource_uri: str) -> str:
    """URL-encode a resource URI the way the IoT Hub SDKs do (every reserved character,
    including ``/``, is percent-encoded)."""
    return quote(resource_uri, safe="")


def _signing_key(key: str | bytes) -> bytes:
    try:
        return _decode_base64_key(key)
    except (ValueError, UnicodeError):
        raise SasTokenError(
            "the signing key is not valid base64: pass the device (or policy) key "
            "exactly as IoT Hub shows it"
        ) from None


def _sign(signing_key: bytes, string_to_sign: str) -> bytes:
    return hmac.new(signing_key, string_to_sign.encode("utf-8"), hashlib.sha256).digest()


def _split_resource(uri: str) -> tuple[str, list[str]]:
    """Split ``host/a/b`` into (lower-cased host, path segments); a scheme and trailing
    slashes are ignored."""
    uri = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://", "", uri.strip()).rstrip("/")
    host, _, path = uri.partition("/")
    return host.lower(), path.split("/") if path else []


def _resource_covers(granted: str, requested: str) -> bool:
    """True when a token for ``granted`` authorizes ``requested``: same host (compared
    case-insensitively) and ``granted``'s path is a prefix of ``requested``'s by segment."""
    g_host, g_path = _split_resource(granted)
    r_host, r_path = _split_resource(requested)
    return g_host == r_host and r_path[: len(g_path)] == g_path


@dataclass(frozen=True)
class SasToken:
    """A parsed IoT Hub security token.

    ``resource_uri`` is decoded (``hub.azure-devices.net/devices/dev1``); ``signature`` is
    the base64 HMAC (it is a credential until ``expiry``, so it is left out of ``repr``);
    ``expiry`` is in seconds since the epoch; ``key_name`` is the ``skn`` policy name, or
    None for a token signed with a device key. ``encoded_resource_uri`` keeps the ``sr``
    text exactly as it was received, because that text is what was signed (SDKs differ in
    the case of percent-escapes); when None, the SDKs' encoding of ``resource_uri`` is used.

    ``str(token)`` gives the ``SharedAccessSignature ...`` form to send to the hub.
    """

    resource_uri: str
    signature: str = field(repr=False)
    expiry: int
    key_name: str | None = None
    encoded_resource_uri: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> SasToken:
        """Parse ``SharedAccessSignature sr=...&sig=...&se=...[&skn=...]`` (fields in any
        order).

        :raises SasTokenError: when the text is not a well-formed token.
        """
        if not isinstance(text, str):
            raise SasTokenError(f"a SAS token must be a str, not {type(text).__name__}")
        text = text.strip()
        if not text.startswith(_SAS_PREFIX):
            raise SasTokenError("not a SAS token: it must start with 'SharedAccessSignature '")
        fields: dict[str, str] = {}
        for part in text[len(_SAS_PREFIX) :].strip().split("&"):
            name, sep, value = part.partition("=")
            if not sep:
                raise SasTokenError(
                    "malformed SAS token: every field must be name=value, separated by '&'"
                )
            if name not in _SAS_FIELDS:
                # Echo only short names: a mangled ``sig`` field could carry the signature.
                shown = f" {name!r}" if name.isalpha() and len(name) <= 10 else ""
                raise SasTokenError(
                    f"malformed SAS token: unknown field{shown} "
                    "(expected sr, sig, se and optionally skn)"
                )
            if name in fields:
                raise SasTokenError(f"malformed SAS token: duplicate field {name!r}")
            fields[name] = value
        missing = [n for n in ("sr", "sig", "se") if not fields.get(n)]
        if missing:
            raise SasTokenError(f"malformed SAS token: missing {', '.join(missing)}")
        if not fields["se"].isdigit() or not fields["se"].isascii():
            raise SasTokenError(
                f"malformed SAS token: se must be an integer number of seconds since the "
                f"epoch, not {fields['se'][:20]!r}"
            )
        signature = unquote(fields["sig"])
        try:
            digest = base64.b64decode(signature, validate=True)
        except (ValueError, binascii.Error):
            raise SasTokenError("malformed SAS token: sig is not valid base64") from None
        if len(digest) != hashlib.sha256().digest_size:
            raise SasTokenError("malformed SAS token: sig is not an HMAC-SHA256 value")
        key_name = unquote(fields["skn"]) if "skn" in fields else None
        if key_name == "":
            raise SasTokenError("malformed SAS token: skn is empty")
        return cls(
            resource_uri=unquote(fields["sr"]),
            signature=signature,
            expiry=int(fields["se"]),
            key_name=key_name,
            encoded_resource_uri=fields["sr"],
        )

    @property
    def string_to_sign(self) -> str:
        """``URL-encoded resource URI + "\\n" + expiry``: the text the signature covers."""
        encoded = self.encoded_resource_uri or _encode_resource(self.resource_uri)
        return f"{encoded}\n{self.expiry}"

    def expires_in(self, now: float | None = None) -> float:
        """Seconds until the token expires (negative once it has)."""
        return self.expiry - (time.time() if now is None else now)

    def verify(
        self,
        key: str | bytes,
        *,
        resource_uri: str | None = None,
        now: float | None = None,
    ) -> None:
        """Check the token as IoT Hub would: signature, expiry, and (when ``resource_uri``
        is given) that the token's resource covers it.

        :param key: the base64 key the token should have been signed with.
        :param resource_uri: the resource being accessed; the token covers it when the
            hosts match (case-insensitively) and the token's path is a prefix of it by
            segment, so a device token also authorizes ``.../devices/dev1/messages/events``.
        :raises SasTokenError: with a message saying which check failed.
        """
        expected = _sign(_signing_key(key), self.string_to_sign)
        try:
            presented = base64.b64decode(self.signature, validate=True)
        except (ValueError, binascii.Error):
            raise SasTokenError("malformed SAS token: sig is not valid base64") from None
        if not hmac.compare_digest(expected, presented):
            raise SasTokenError(
                "SAS token signature does not match: it was not signed with this key for "
                "this resource and expiry (wrong key, or the token was altered)"
            )
        remaining = self.expires_in(now)
        if remaining <= 0:
            raise SasTokenError(
                f"SAS token expired {-remaining:.0f} s ago (se={self.expiry}): generate a new token"
            )
        if resource_uri is not None and not _resource_covers(self.resource_uri, resource_uri):
            raise SasTokenError(
                f"SAS token resource mismatch: the token is for {self.resource_uri!r}, "
                f"which does not cover {resource_uri!r}"
            )

    def __str__(self) -> str:
        encoded = self.encoded_resource_uri or _encode_resource(self.resource_uri)
        token = f"{_SAS_PREFIX}sr={encoded}&sig={quote(self.signature, safe='')}&se={self.expiry}"
        if self.key_name is not None:
            token += f"&skn={quote(self.key_name, safe='')}"
        return token


def _check_ttl(ttl: float) -> None:
    if not (isinstance(ttl, (int, float)) and math.isfinite(ttl) and ttl >= 1):
        raise SasTokenError(f"ttl must be a finite number of seconds >= 1, not {ttl!r}")


def _make_token(
    resource_uri: str,
    signing_key: bytes,
    policy_name: str | None,
    ttl: float,
    now: float,
) -> SasToken:
    if not resource_uri:
        raise SasTokenError(
            "resource_uri is empty: expected e.g. myhub.azure-devices.net/devices/dev1"
        )
    if policy_name == "":
        raise SasTokenError("policy_name is empty: pass None for a device key")
    expiry = int(now + ttl)
    encoded = _encode_resource(resource_uri)
    signature = base64.b64encode(_sign(signing_key, f"{encoded}\n{expiry}")).decode("ascii")
    return SasToken(
        resource_uri=resource_uri,
        signature=signature,
        expiry=expiry,
        key_name=policy_name,
        encoded_resource_uri=encoded,
    )


def generate_sas_token(
    resource_uri: str,
    key: str | bytes,
    *,
    policy_name: str | None = None,
    ttl: float = 3600,
    now: float | None = None,
) -> str:
    """Create an IoT Hub security token.

    :param resource_uri: unencoded, starting with the hub host name, e.g.
        ``myhub.azure-devices.net/devices/dev1`` (see :attr:`ConnectionString.resource_uri`).
    :param key: the base64 device key (or shared access policy key), as text or bytes.
    :param policy_name: the shared access policy name (``skn``); None for a device key.
    :param ttl: lifetime in seconds; the expiry is ``int(now + ttl)``.
    :param now: the current time in seconds since the epoch (default: ``time.time()``).
    :returns: ``SharedAccessSignature sr=...&sig=...&se=...`` (``&skn=...`` with a policy).
    :raises SasTokenError: when the key is not valid base64 or ``ttl`` is not positive.
    """
    _check_ttl(ttl)
    token = _make_token(
        resource_uri,
        _signing_key(key),
        policy_name,
        ttl,
        time.time() if now is None else now,
    )
    return str(token)


class SasTokenProvider:
    """Hands out a cached SAS token and renews it before it expires.

    A new token is generated when less than ``renew_margin * ttl`` seconds of the current
    one remain (default: in the last 20 % of its life), so a client that asks for
    :meth:`token` before each (re)connection, or polls :meth:`needs_renewal`, never
    presents an expired token. Thread-safe. The key is decoded once and kept privately;
    ``repr()`` does not show it.

    :param clock: returns the current time in seconds since the epoch (tests inject one).
    :raises SasTokenError: for a key that is not valid base64, ``ttl`` < 1 s, or a
        ``renew_margin`` outside [0, 1).
    """

    __slots__ = (
        "_clock",
        "_key",
        "_lock",
        "_policy_name",
        "_renew_margin",
        "_resource_uri",
        "_token",
        "_ttl",
    )

    def __init__(
        self,
        resource_uri: str,
        key: str | bytes,
        *,
        policy_name: str | None = None,
        ttl: float = 3600,
        renew_margin: float = 0.2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_ttl(ttl)
        if not (isinstance(renew_margin, (int, float)) and 0 <= renew_margin < 1):
            raise SasTokenError(f"renew_margin must be in [0, 1), not {renew_margin!r}")
        self._resource_uri = resource_uri
        self._key: bytes | None = _signing_key(key)
        self._policy_name = policy_name
        self._ttl = float(ttl)
        self._renew_margin = float(renew_margin)
        self._clock = clock
        self._lock = threading.Lock()
        self._token = _make_token(resource_uri, self._key, policy_name, self._ttl, clock())

    @classmethod
    def from_connection_string(
        cls,
        connection_string: ConnectionString,
        *,
        ttl: float = 3600,
        renew_margin: float = 0.2,
        clock: Callable[[], float] = time.time,
    ) -> SasTokenProvider:
        """A provider for the device or module of a connection string (its
        ``SharedAccessKeyName``, if any, becomes the token's ``skn``).

        A ``SharedAccessSignature`` connection string gives a provider of that one token
        (:meth:`from_token`).

        :raises ConnectionStringError: for an ``x509=true`` connection string.
        """
        if connection_string.shared_access_signature is not None:
            return cls.from_token(connection_string.shared_access_signature, clock=clock)
        if connection_string.shared_access_key is None:
            raise ConnectionStringError(
                "this connection string has no SharedAccessKey (x509=true): authenticate "
                "with a ClientIdentity instead of SAS tokens"
            )
        return cls(
            connection_string.resource_uri,
            connection_string.shared_access_key,
            policy_name=connection_string.shared_access_key_name,
            ttl=ttl,
            renew_margin=renew_margin,
            clock=clock,
        )

    @classmethod
    def from_token(cls, token: str, *, clock: Callable[[], float] = time.time) -> SasTokenProvider:
        """A provider of one ready-made token, used until it expires. It cannot be renewed
        (there is no key): once it has expired, :meth:`token` raises
        ``AuthenticationError`` saying that a fresh one is needed.

        :raises SasTokenError: ``token`` is not a SAS token.
        """
        parsed = SasToken.parse(token)
        provider = cls.__new__(cls)
        provider._resource_uri = parsed.resource_uri
        provider._key = None
        provider._policy_name = parsed.key_name
        provider._ttl = float(max(parsed.expiry - clock(), 1))
        provider._renew_margin = 0.0
        provider._clock = clock
        provider._lock = threading.Lock()
        provider._token = parsed
        return provider

    @property
    def renewable(self) -> bool:
        """False for a provider of one ready-made token (:meth:`from_token`)."""
        return self._key is not None

    @property
    def resource_uri(self) -> str:
        """The resource the tokens are signed for."""
        return self._resource_uri

    @property
    def ttl(self) -> float:
        """Lifetime of each new token, in seconds."""
        return self._ttl

    @property
    def expires_at(self) -> int:
        """Expiry (seconds since the epoch) of the current cached token."""
        return self._token.expiry

    def needs_renewal(self, now: float | None = None) -> bool:
        """True when the cached token has less than ``renew_margin * ttl`` seconds left
        (or has expired)."""
        if self._key is None:  # a ready-made token: nothing to renew it with
            return False
        current = self._clock() if now is None else now
        remaining = self._token.expiry - current
        return remaining <= 0 or remaining < self._renew_margin * self._ttl

    def token(self) -> str:
        """The current token, regenerated first if :meth:`needs_renewal`.

        :raises AuthenticationError: a ready-made token has expired.
        """
        with self._lock:
            now = self._clock()
            if self._key is None:
                if self._token.expiry <= now:
                    raise self._expired()
            elif self.needs_renewal(now):
                self._token = self._make(now)
            return str(self._token)

    def renew(self) -> str:
        """Generate a fresh token now (e.g. after the hub refused the current one).

        :raises AuthenticationError: for a ready-made token (it cannot be renewed).
        """
        with self._lock:
            if self._key is None:
                raise self._expired()
            self._token = self._make(self._clock())
            return str(self._token)

    def _expired(self) -> Exception:
        from .errors import AuthenticationError

        return AuthenticationError(
            f"the SharedAccessSignature for {self._resource_uri} expired (or was refused) at "
            f"{self._token.expiry}: it cannot be renewed without the device key; give the "
            "client a fresh token, or the SharedAccessKey so that tokens are made as needed"
        )

    def _make(self, now: float) -> SasToken:
        assert self._key is not None
        return _make_token(self._resource_uri, self._key, self._policy_name, self._ttl, now)

    def __repr__(self) -> str:
        return (
            f"SasTokenProvider(resource_uri={self._resource_uri!r}, "
            f"policy_name={self._policy_name!r}, ttl={self._ttl:g}, "
            f"expires_at={self._token.expiry})"
        )


# --------------------------------------------------------------------------------------
# X.509 client identity
# --------------------------------------------------------------------------------------

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----\r?\n?",
    re.DOTALL,
)
_EC_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def _to_bytes(data: bytes | str, what: str) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise IdentityError(f"{what} must be bytes or str, not {type(data).__name__}")


def _pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """All PEM blocks in ``data`` as (label, whole block including armour)."""
    return [(m.group(1).decode("ascii"), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def _not_pem_message(data: bytes, where: str, kind: str) -> str:
    if data[:1] == b"\x30":
        converter = (
            "openssl x509 -inform der" if kind == "certificate" else "openssl pkey -inform der"
        )
        return (
            f"{where} looks like DER (binary), not PEM: convert it with "
            f"'{converter} -in FILE -out FILE.pem'"
        )
    return f"{where} is not PEM data (no '-----BEGIN ...-----' line): expected a PEM {kind}"


# A device's chain and key take a few KiB: anything this large is not one (and /dev/zero
# or a FIFO would otherwise be read until memory runs out).
_MAX_IDENTITY_FILE = 1 << 20


def _check_path(path: object, what: str) -> None:
    # open() takes an int as a file descriptor (and closes it afterwards): never here.
    if not isinstance(path, str | bytes | os.PathLike):
        raise TypeError(
            f"the {what} file must be a path (str or os.PathLike), not {type(path).__name__}"
        )


def _read_file(path: StrPath, what: str) -> bytes:
    _check_path(path, what)
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_IDENTITY_FILE + 1)
        if len(data) > _MAX_IDENTITY_FILE:
            raise IdentityError(
                f"the {what} file {os.fspath(path)!r} is larger than "
                f"{_MAX_IDENTITY_FILE // 1024} KiB: it is not a PEM certificate or key"
            )
        return data
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise IdentityError(
            f"cannot read the {what} file {os.fspath(path)!r}: {reason}; check the path "
            "and that this process may read it"
        ) from exc


def _load_certificates(data: bytes, where: str) -> list[x509.Certificate]:
    blocks = _pem_blocks(data)
    if not blocks:
        raise IdentityError(_not_pem_message(data, where, "certificate"))
    cert_blocks = [block for label, block in blocks if label in ("CERTIFICATE", "X509 CERTIFICATE")]
    if not cert_blocks:
        found = ", ".join(sorted({label for label, _ in blocks}))
        raise IdentityError(
            f"no certificate in {where} (found only: {found}): pass the PEM file that "
            "holds the device certificate ('-----BEGIN CERTIFICATE-----')"
        )
    certs = []
    for number, block in enumerate(cert_blocks, start=1):
        try:
            cert = x509.load_pem_x509_certificate(block)
        except ValueError as exc:
            raise IdentityError(
                f"certificate {number} in {where} is corrupt and cannot be parsed ({exc}); "
                "re-export the certificate"
            ) from exc
        _check_readable(cert, f"certificate {number} in {where}")
        certs.append(cert)
    return certs


def _check_readable(cert: x509.Certificate, label: str) -> None:
    """cryptography parses a certificate's parts only when asked: ask now, so a broken
    key or name is an IdentityError here and not an UnsupportedAlgorithm later."""
    try:
        cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise IdentityError(
            f"{label} has a public key that cannot be read ({exc}): the key algorithm is "
            "unknown or the key is corrupt; IoT Hub device certificates use RSA (2048 bits "
            "or more) or EC P-256/P-384/P-521 keys. Re-export or re-issue the certificate"
        ) from None
    try:
        cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as exc:
        raise IdentityError(f"{label} has a malformed subject name ({exc})") from None


def _load_private_key(data: bytes, where: str, password: bytes | None, *, hint: str) -> Any:
    blocks = [(label, block) for label, block in _pem_blocks(data) if label.endswith("PRIVATE KEY")]
    if not blocks:
        if not _pem_blocks(data):
            raise IdentityError(_not_pem_message(data, where, "private key"))
        raise IdentityError(f"no private key in {where}: {hint}")
    if len(blocks) > 1:
        raise IdentityError(
            f"{where} contains {len(blocks)} private keys: keep only the device's key"
        )
    label, block = blocks[0]
    encrypted = label == "ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in block
    if encrypted and password is None:
        raise IdentityError(
            f"the private key in {where} is encrypted: pass password=... "
            "(the passphrase it was exported with)"
        )
    try:
        return serialization.load_pem_private_key(block, password if encrypted else None)
    except ValueError as exc:
        if encrypted:
            raise IdentityError(
                f"wrong password for the encrypted private key in {where} (or the key is "
                "corrupt): check the passphrase"
            ) from None
        raise IdentityError(
            f"the private key in {where} is corrupt or in an unsupported format; "
            "re-export it as PEM (PKCS#8, PKCS#1 or SEC1)"
        ) from exc
    except TypeError as exc:  # an unexpected password/encryption combination
        raise IdentityError(f"cannot load the private key in {where}: {exc}") from None
    except Exception as exc:  # e.g. UnsupportedAlgorithm
        raise IdentityError(
            f"the private key in {where} uses an unsupported algorithm ({exc}); IoT Hub "
            "device certificates use RSA (2048 bits or more) or EC P-256/P-384/P-521 keys"
        ) from None


def _check_key_type(key: object) -> _SupportedKey:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise IdentityError(
                f"the RSA key has {key.key_size} bits, which is too small: IoT Hub and "
                "OpenSSL's default security level require at least 2048 bits; issue a new "
                "device certificate with an RSA 2048+ or EC P-256 key"
            )
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in _EC_CURVES:
            raise IdentityError(
                f"the EC key uses curve {key.curve.name}, which TLS with IoT Hub does not "
                "support: use P-256 (secp256r1), P-384 or P-521"
            )
        return key
    names: list[tuple[type, str]] = [
        (ed25519.Ed25519PrivateKey, "Ed25519"),
        (ed448.Ed448PrivateKey, "Ed448"),
        (dsa.DSAPrivateKey, "DSA"),
        (x25519.X25519PrivateKey, "X25519"),
        (x448.X448PrivateKey, "X448"),
    ]
    kind = next((n for cls, n in names if isinstance(key, cls)), type(key).__name__)
    raise IdentityError(
        f"{kind} keys are not supported: IoT Hub authenticates X.509 devices with RSA "
        "(2048 bits or more) or ECDSA (P-256/P-384/P-521) certificates; issue a new device "
        "certificate with one of those"
    )


def _public_der(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _subject_cn(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _password_bytes(password: bytes | str | None) -> bytes | None:
    if password is None:
        return None
    if isinstance(password, str):
        return password.encode("utf-8")
    if isinstance(password, bytes | bytearray | memoryview):
        return bytes(password)
    # bytes(7) would be seven zero bytes (and bytes(10**10) ten gigabytes)
    raise TypeError(f"password must be bytes or str, not {type(password).__name__}")


def thumbprints(certificate: x509.Certificate | bytes) -> tuple[str, str]:
    """(SHA-1, SHA-256) of a certificate's DER (a certificate or its DER bytes), in the
    form IoT Hub shows and registers them: upper-case hex without colons."""
    der = (
        certificate
        if isinstance(certificate, bytes)
        else certificate.public_bytes(serialization.Encoding.DER)
    )
    # SHA-1 here is an identifier IoT Hub registers, not a security decision.
    sha1 = hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()
    return sha1, hashlib.sha256(der).hexdigest().upper()


class ClientIdentity:
    """A device's X.509 identity for mutual TLS: the leaf certificate, any intermediates,
    and the private key.

    Build it with :meth:`from_files` or :meth:`from_pem`; both validate everything up
    front (readable, well-formed, supported key type, key matches the leaf) and raise
    :class:`~iothub_tls.errors.IdentityError` saying what to fix. Instances are immutable
    and hashable; ``repr()`` shows the device id and thumbprint, never key material.

    :param certificates: leaf first, then intermediates (as in a PEM chain file).
    :param private_key: the leaf's RSA (2048+ bits) or EC (P-256/P-384/P-521) key.
    """

    __slots__ = ("_chain", "_key")

    _chain: tuple[x509.Certificate, ...]
    _key: _SupportedKey

    def __init__(self, certificates: Sequence[x509.Certificate], private_key: object) -> None:
        chain = tuple(certificates)
        if not chain:
            raise IdentityError("no certificate given: the device certificate is required")
        for number, cert in enumerate(chain, start=1):
            if not isinstance(cert, x509.Certificate):
                raise TypeError(
                    f"certificate {number} must be a cryptography x509.Certificate, not "
                    f"{type(cert).__name__} (use from_pem or from_files for PEM data)"
                )
            _check_readable(cert, f"certificate {number} of the chain")
        key = _check_key_type(private_key)
        key_der = _public_der(key.public_key())
        if _public_der(chain[0].public_key()) != key_der:
            position = next(
                (
                    i
                    for i, c in enumerate(chain[1:], start=2)
                    if _public_der(c.public_key()) == key_der
                ),
                None,
            )
            if position is not None:
                raise IdentityError(
                    f"the private key matches certificate {position} of the chain, not the "
                    "first one: put the device (leaf) certificate first, then intermediates"
                )
            cn = _subject_cn(chain[0])
            raise IdentityError(
                f"the private key does not match the device certificate (CN={cn}): check "
                "that the certificate and key files belong together"
            )
        object.__setattr__(self, "_chain", chain)
        object.__setattr__(self, "_key", key)

    @classmethod
    def from_pem(
        cls,
        cert_pem: bytes | str,
        key_pem: bytes | str,
        password: bytes | str | None = None,
    ) -> ClientIdentity:
        """Build an identity from in-memory PEM data.

        :param cert_pem: the device certificate, optionally followed by intermediates.
        :param key_pem: the private key (PKCS#8, PKCS#1 or SEC1; encrypted or not).
        :param password: the passphrase of an encrypted key.
        """
        certs = _load_certificates(_to_bytes(cert_pem, "cert_pem"), "cert_pem")
        key = _load_private_key(
            _to_bytes(key_pem, "key_pem"),
            "key_pem",
            _password_bytes(password),
            hint="pass the device's private key PEM ('-----BEGIN PRIVATE KEY-----') as key_pem",
        )
        return cls(certs, key)

    @classmethod
    def from_files(
        cls,
        certfile: StrPath,
        keyfile: StrPath | None = None,
        password: bytes | str | None = None,
    ) -> ClientIdentity:
        """Build an identity from PEM files.

        :param certfile: the device certificate, optionally followed by intermediates.
        :param keyfile: the private key; None when it is in ``certfile`` too.
        :param password: the passphrase of an encrypted key.
        """
        cert_data = _read_file(certfile, "certificate")
        certs = _load_certificates(cert_data, repr(os.fspath(certfile)))
        if keyfile is None:
            key_data, where = cert_data, repr(os.fspath(certfile))
            hint = "the key is not in the certificate file; pass keyfile=..."
        else:
            key_data, where = _read_file(keyfile, "private key"), repr(os.fspath(keyfile))
            hint = "pass the file that holds the device's private key as keyfile"
        key = _load_private_key(key_data, where, _password_bytes(password), hint=hint)
        return cls(certs, key)

    # -- read-only view -------------------------------------------------------------

    @property
    def certificate(self) -> x509.Certificate:
        """The device (leaf) certificate."""
        return self._chain[0]

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The leaf followed by the intermediates, in the order sent to the server."""
        return self._chain

    @property
    def thumbprint_sha1(self) -> str:
        """SHA-1 of the leaf's DER, upper-case hex without colons, as IoT Hub shows it."""
        return thumbprints(self.certificate)[0]

    @property
    def thumbprint_sha256(self) -> str:
        """SHA-256 of the leaf's DER, upper-case hex without colons, as IoT Hub shows it."""
        return thumbprints(self.certificate)[1]

    @property
    def device_id(self) -> str | None:
        """The leaf's subject common name (IoT Hub's device id for CA-signed devices), or
        None when the subject has no CN."""
        return _subject_cn(self.certificate)

    @property
    def key_type(self) -> str:
        """``"RSA"`` or ``"EC"``."""
        return "RSA" if isinstance(self._key, rsa.RSAPrivateKey) else "EC"

    # -- loading into OpenSSL ---------------------------------------------------------

    def _bundle(self, password: bytes) -> bytes:
        """The chain and the key re-encrypted under ``password``, as one PEM document."""
        parts: Iterable[bytes] = (c.public_bytes(serialization.Encoding.PEM) for c in self._chain)
        key = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
        return b"".join(parts) + key

    def _load_into(self, ctx: ssl.SSLContext) -> None:
        """Load the chain and key into ``ctx`` with ``ctx.load_cert_chain``.

        :mod:`ssl` only loads from files, so the key is re-encrypted under a random
        one-time password and written, with the chain, to an anonymous in-memory file
        (``memfd_create``, opened via ``/proc/self/fd/N``). Where that is unavailable,
        the encrypted bundle goes to a fresh private directory (mode 0700) that is removed
        before returning. The plaintext key is never written anywhere.

        :raises IdentityError: when OpenSSL refuses the certificate or key.
        """
        onetime = secrets.token_bytes(32)
        bundle = self._bundle(onetime)
        try:
            if not self._load_via_memfd(ctx, bundle, onetime):
                self._load_via_tempdir(ctx, bundle, onetime)
        except ssl.SSLError as exc:
            raise IdentityError(
                f"OpenSSL refused the device certificate or key: {exc.reason or exc}; the "
                "context's security level may forbid this key size or signature algorithm"
            ) from exc

    @staticmethod
    def _load_via_memfd(ctx: ssl.SSLContext, bundle: bytes, password: bytes) -> bool:
        memfd_create = getattr(os, "memfd_create", None)
        if memfd_create is None:
            return False
        try:
            fd = memfd_create("iothub-tls-identity", getattr(os, "MFD_CLOEXEC", 0))
        except OSError:
            return False
        try:
            path = f"/proc/self/fd/{fd}"
            if not os.path.exists(path):
                return False
            view = memoryview(bundle)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            ctx.load_cert_chain(path, password=password)
            return True
        finally:
            os.close(fd)

    @staticmethod
    def _load_via_tempdir(ctx: ssl.SSLContext, bundle: bytes, password: bytes) -> None:
        directory = tempfile.mkdtemp(prefix="iothub-tls-")
        try:
            os.chmod(directory, 0o700)
            path = os.path.join(directory, "identity.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(bundle)
            ctx.load_cert_chain(path, password=password)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    # -- value semantics ----------------------------------------------------------------

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClientIdentity):
            return NotImplemented
        return self._chain == other._chain

    def __hash__(self) -> int:
        return hash(self._chain)

    def __repr__(self) -> str:
        return (
            f"ClientIdentity(device_id={self.device_id!r}, key_type={self.key_type!r}, "
            f"thumbprint_sha256={self.thumbprint_sha256!r}, chain_length={len(self._chain)})"
        )
