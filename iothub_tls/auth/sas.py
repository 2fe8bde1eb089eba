"""IoT Hub security tokens (SAS)::

    SharedAccessSignature sr={URL-encoded resource URI}&sig={signature}&se={expiry}[&skn={policy}]

where ``signature = base64(HMAC-SHA256(base64decode(key), URL-encoded resource URI + "\\n"
+ expiry))`` and ``expiry`` is in seconds since the Unix epoch. The resource URI starts
with the hub's host name (no scheme), e.g. ``myhub.azure-devices.net/devices/device1``,
and a token grants access to every endpoint whose URI has it as a prefix *by path
segment* (``/a/b`` covers ``/a/b/c`` but not ``/a/bc``).

:func:`generate_sas_token` makes one, :class:`SasToken` parses and verifies one, and
:class:`SasTokenProvider` hands out a cached token and renews it before it expires. The
signature never appears in ``repr()`` or messages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from ..errors import AuthenticationError, ConnectionStringError, SasTokenError
from ._common import _decode_base64_key

if TYPE_CHECKING:
    from .connection_string import ConnectionString

__all__ = ["SasToken", "SasTokenProvider", "generate_sas_token"]

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
        return AuthenticationError(
            f"the SharedAccessSignature for {self._resource_uri} expired (or was refused) at "
            f"{self._token.expiry}: it cannot be renewed without the device key; build a new "
            "client from a connection string with a fresh SharedAccessSignature, or with the "
            "SharedAccessKey so that tokens are made as needed"
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
