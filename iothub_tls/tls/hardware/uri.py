"""RFC 7512 ``pkcs11:`` URIs, parsed without I/O.

``pkcs11:token=device;object=iothub;type=private?pin-source=file:/run/pin`` names a token
(by label, serial, manufacturer or model, or a slot id), an object on it (label and/or
CKA_ID) and, in the query, where the module and the PIN are. Values are percent-decoded;
``id`` is bytes. A PIN given in the URI (``pin-value``) is kept out of ``repr()`` and out
of :meth:`Pkcs11Uri.redacted`, which is what messages and logs show.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

__all__ = ["Pkcs11Uri", "UriError", "parse_pkcs11_uri"]

_PATH_ATTRIBUTES = {
    "token",
    "manufacturer",
    "serial",
    "model",
    "library-manufacturer",
    "library-description",
    "library-version",
    "slot-description",
    "slot-manufacturer",
    "slot-id",
    "object",
    "id",
    "type",
}
_QUERY_ATTRIBUTES = {"pin-source", "pin-value", "module-name", "module-path"}
_TYPES = {"private", "public", "cert", "secret-key", "data"}
# RFC 7512 2.3: pk11-pchar / pk11-qchar, plus percent escapes
_PCHAR = re.compile(r"(?:[A-Za-z0-9\-._~:\[\]@!$'()*+,=&]|%[0-9A-Fa-f]{2})*")
_QCHAR = re.compile(r"(?:[A-Za-z0-9\-._~:\[\]@!$'()*+,=/?|]|%[0-9A-Fa-f]{2})*")


class UriError(ValueError):
    """Not a usable RFC 7512 PKCS#11 URI."""


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of a ``pkcs11:`` URI this library uses."""

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    slot_id: int | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    module_path: str | None = None
    module_name: str | None = None
    pin_source: str | None = None
    pin_value: str | None = dataclasses.field(default=None, repr=False)

    @property
    def names_token(self) -> bool:
        return any(
            v is not None
            for v in (self.token, self.manufacturer, self.serial, self.model, self.slot_id)
        )

    @property
    def names_object(self) -> bool:
        return self.object is not None or self.id is not None

    def token_text(self) -> str:
        """How messages name the token."""
        parts = []
        if self.token is not None:
            parts.append(f"label {self.token!r}")
        if self.serial is not None:
            parts.append(f"serial {self.serial!r}")
        if self.manufacturer is not None:
            parts.append(f"manufacturer {self.manufacturer!r}")
        if self.model is not None:
            parts.append(f"model {self.model!r}")
        if self.slot_id is not None:
            parts.append(f"slot {self.slot_id}")
        return "the token with " + ", ".join(parts) if parts else "the first token"

    def object_text(self) -> str:
        parts = []
        if self.object is not None:
            parts.append(f"label {self.object!r}")
        if self.id is not None:
            parts.append(f"id {self.id.hex()}")
        return ", ".join(parts) or "any label"

    def redacted(self, *, type: str | None = None, query: bool = True) -> str:
        """The URI without the PIN (what messages, logs and the engine see); ``type``
        replaces the object type."""
        path: list[str] = []
        for name, value in (
            ("token", self.token),
            ("manufacturer", self.manufacturer),
            ("serial", self.serial),
            ("model", self.model),
            ("slot-id", None if self.slot_id is None else str(self.slot_id)),
            ("object", self.object),
        ):
            if value is not None:
                path.append(f"{name}={quote(value, safe='')}")
        if self.id is not None:
            path.append("id=" + "".join(f"%{b:02X}" for b in self.id))
        kind = type or self.type
        if kind is not None:
            path.append(f"type={kind}")
        text = "pkcs11:" + ";".join(path)
        extra = [
            f"{name}={quote(value, safe='/:')}"
            for name, value in (
                ("module-path", self.module_path),
                ("module-name", self.module_name),
                ("pin-source", self.pin_source),
            )
            if value is not None
        ]
        if query and extra:
            text += "?" + "&".join(extra)
        return text

    def __str__(self) -> str:
        return self.redacted()


def _decode(value: str, name: str, pattern: re.Pattern[str]) -> bytes:
    if not pattern.fullmatch(value):
        raise UriError(f"the value of {name!r} has characters RFC 7512 requires percent-encoded")
    return unquote_to_bytes(value)


def _text(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UriError(f"the value of {name!r} is not UTF-8 text") from None


def parse_pkcs11_uri(text: str) -> Pkcs11Uri:
    """Parse an RFC 7512 URI.

    :raises UriError: naming the part that is wrong (the PIN is never quoted).
    """
    if not isinstance(text, str):
        raise UriError(f"a PKCS#11 URI must be text, not {type(text).__name__}")
    if not text[:7].lower() == "pkcs11:":
        raise UriError("a PKCS#11 URI starts with 'pkcs11:' (RFC 7512), e.g. "
                       "pkcs11:token=device;object=iothub;type=private")  # fmt: skip
    body = text[7:]
    path, _, query = body.partition("?")
    values: dict[str, object] = {}
    for part in filter(None, path.split(";")):
        name, eq, raw = part.partition("=")
        if not eq:
            raise UriError(f"path attribute {name!r} has no value (write {name}=...)")
        if name not in _PATH_ATTRIBUTES:
            if name.startswith("x-"):
                continue  # vendor-specific (RFC 7512 2.3): not ours to interpret
            raise UriError(
                f"unknown path attribute {name!r}: RFC 7512 knows "
                f"{', '.join(sorted(_PATH_ATTRIBUTES))}"
            )
        key = name.replace("-", "_")
        if key in values:
            raise UriError(f"path attribute {name!r} appears twice")
        decoded = _decode(raw, name, _PCHAR)
        if name == "id":
            values["id"] = decoded
        elif name == "slot-id":
            digits = _text(decoded, name)
            if not digits.isdigit():
                raise UriError(f"slot-id must be a decimal number, not {digits!r}")
            values["slot_id"] = int(digits)
        elif name == "type":
            kind = _text(decoded, name)
            if kind not in _TYPES:
                raise UriError(f"type must be one of {', '.join(sorted(_TYPES))}, not {kind!r}")
            values["type"] = kind
        elif name in ("token", "manufacturer", "serial", "model", "object"):
            values[key] = _text(decoded, name)
    for part in filter(None, query.split("&")):
        name, eq, raw = part.partition("=")
        if not eq:
            raise UriError(f"query attribute {name!r} has no value")
        if name not in _QUERY_ATTRIBUTES:
            if name.startswith("x-"):
                continue
            raise UriError(
                f"unknown query attribute {name!r}: RFC 7512 knows "
                f"{', '.join(sorted(_QUERY_ATTRIBUTES))}"
            )
        key = name.replace("-", "_")
        if key in values:
            raise UriError(f"query attribute {name!r} appears twice")
        # the PIN's own characters are never quoted in a message
        pattern = _QCHAR
        if name == "pin-value" and not pattern.fullmatch(raw):
            raise UriError("pin-value has characters RFC 7512 requires percent-encoded")
        values[key] = _text(_decode(raw, name, pattern), name if name != "pin-value" else "pin")
    if "pin_value" in values and "pin_source" in values:
        raise UriError("give either pin-value or pin-source, not both")
    return Pkcs11Uri(**values)  # type: ignore[arg-type]
