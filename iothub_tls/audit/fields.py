"""Names and values as connection logs spell them, turned into one vocabulary.

A column or key name (``DeviceId``, ``props_json_deviceId``, ``TimeGenerated [UTC]``,
``properties.tlsVersion``) maps to a canonical *field*; a value (``TLSv1.2``, ``Tls12``,
``1.2``) maps to a canonical TLS version; a suite named the IANA or the OpenSSL way maps
to the row of the cipher table in :mod:`iothub_tls.policy`. Everything here is pure.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Final

__all__ = [
    "FIELDS",
    "TIME_ISO",
    "field_of",
    "normalize_protocol",
    "normalize_time",
    "normalize_tls",
]

#: The canonical fields a connection row can carry. The first nine form the key rows
#: are aggregated by; ``time``, ``caller`` and ``reason`` are read per row.
FIELDS: Final = (
    "device",
    "protocol",
    "tls",
    "suite",
    "operation",
    "category",
    "result",
    "level",
    "resulttype",
    "time",
    "caller",
    "reason",
)

#: The field holding the JSON text of an Azure Monitor record's details.
PROPERTIES: Final = "properties"

_ALIASES: Final[dict[str, str]] = {
    # device
    "deviceid": "device",
    "device": "device",
    "devicename": "device",
    # transport protocol (MQTT, AMQP, HTTPS)
    "protocol": "protocol",
    "transport": "protocol",
    "transporttype": "protocol",
    # TLS version
    "tlsversion": "tls",
    "tls": "tls",
    "tlsprotocol": "tls",
    "sslprotocol": "tls",
    # cipher suite
    "ciphersuite": "suite",
    "cipher": "suite",
    "tlscipher": "suite",
    "tlsciphersuite": "suite",
    "ciphersuitename": "suite",
    # event
    "operationname": "operation",
    "operation": "operation",
    "category": "category",
    "result": "result",
    "status": "result",
    "level": "level",
    "resulttype": "resulttype",
    "time": "time",
    "timegenerated": "time",
    "timestamp": "time",
    "eventtime": "time",
    "calleripaddress": "caller",
    "maskedipaddress": "caller",
    "ipaddress": "caller",
    "caller": "caller",
    "reason": "reason",
    "resultdescription": "reason",
    "errormessage": "reason",
    # Azure Monitor's JSON-in-a-string details (properties_s once in Log Analytics)
    "properties": PROPERTIES,
    "propertiess": PROPERTIES,
}
#: What a KQL export prefixes projected names with (``props_json.deviceId`` becomes the
#: column ``props_json_deviceId``), normalized.
_PREFIXES: Final = ("propsjson", "props", "properties", "property", "json")
_NOT_ALNUM = re.compile(r"[^0-9a-z]")
_UNIT_SUFFIX = re.compile(r"\s*\[[^\]]*\]\s*$")  # "TimeGenerated [UTC]"


def field_of(name: str) -> str | None:
    """The canonical field a column or key name stands for, or None."""
    key = _NOT_ALNUM.sub("", _UNIT_SUFFIX.sub("", name).lower())
    found = _ALIASES.get(key)
    if found is not None:
        return found
    for prefix in _PREFIXES:
        if key.startswith(prefix) and key != prefix:
            found = _ALIASES.get(key[len(prefix) :])
            if found is not None and found != PROPERTIES:
                return found
    return None


# -- TLS versions -------------------------------------------------------------------------

_EMPTY: Final = frozenset({"", "null", "none", "-", "n/a", "na", "unknown"})
_TLS_DIGITS: Final[dict[str, str]] = {
    "1": "1.0",
    "10": "1.0",
    "11": "1.1",
    "12": "1.2",
    "13": "1.3",
}
_TLS_TEXT = re.compile(r"(?:tls|ssl)?v?\s*([0-9][0-9._]*)")


def normalize_tls(raw: str) -> str | None:
    """``"1.2"``, ``"TLSv1.2"``, ``"TLS 1.2"``, ``"Tls12"``, ``"TLS1_2"`` -> ``"1.2"``;
    ``"TLSv1"`` -> ``"1.0"``; SSL 3 -> ``"SSL3"``; nothing logged -> ``""``;
    anything else -> None (the row is malformed)."""
    text = raw.strip().lower()
    if text in _EMPTY:
        return ""
    if text.startswith("ssl"):
        return "SSL3" if re.fullmatch(r"sslv?\s*3(?:\.0)?", text) else None
    match = _TLS_TEXT.fullmatch(text)
    if match is None:
        return None
    digits = match.group(1).replace("_", "").replace(".", "")
    return _TLS_DIGITS.get(digits)


#: TLS versions in order, oldest first (for comparisons with a policy's minimum).
TLS_ORDER: Final = ("SSL3", "1.0", "1.1", "1.2", "1.3")


# -- protocols ----------------------------------------------------------------------------

_PROTOCOLS: Final[dict[str, str]] = {
    "mqtt": "MQTT",
    "mqtts": "MQTT",
    "mqttws": "MQTT-WS",
    "mqttwebsocket": "MQTT-WS",
    "mqttwebsockets": "MQTT-WS",
    "amqp": "AMQP",
    "amqps": "AMQP",
    "amqpws": "AMQP-WS",
    "amqpwebsocket": "AMQP-WS",
    "amqpwebsockets": "AMQP-WS",
    "http": "HTTPS",
    "https": "HTTPS",
    "http1": "HTTPS",
}


def normalize_protocol(raw: str) -> str:
    """``Mqtt`` -> ``MQTT``, ``MqttWs`` -> ``MQTT-WS``, ``Https`` -> ``HTTPS``; an
    unknown name is kept as written, nothing logged -> ``""``."""
    text = raw.strip()
    if text.lower() in _EMPTY:
        return ""
    return _PROTOCOLS.get(_NOT_ALNUM.sub("", text.lower()), text)


# -- times --------------------------------------------------------------------------------

#: A UTC ISO 8601 time as IoT Hub and the local hub write it. Rows whose time matches
#: are kept as written: such strings order like the instants they name (to the second).
TIME_ISO: Final = (
    r"[0-9]{4}-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9](?:\.[0-9]{1,9})?"
    r"(?:Z|\+00:00)"
)
_TIME_ISO = re.compile(TIME_ISO)
_TIME_ANY = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d)(?::(\d\d)(?:[.,](\d+))?)?\s*"
    r"(Z|UTC|[+-]\d\d:?\d\d)?",
    re.IGNORECASE,
)
# Log Analytics' portal export in a US locale: "8/30/2025, 10:21:33.123 AM"
_TIME_US = re.compile(
    r"(\d{1,2})/(\d{1,2})/(\d{4}),?\s+(\d{1,2}):(\d\d)(?::(\d\d)(?:\.(\d+))?)?\s*([AaPp][Mm])?"
)


def normalize_time(raw: str) -> str | None:
    """A time as an ISO 8601 UTC string (``2025-08-30T10:21:33.123000Z``) that orders
    like the instant; ``""`` when nothing was logged; None when unreadable."""
    text = raw.strip()
    if text.lower() in _EMPTY:
        return ""
    if _TIME_ISO.fullmatch(text):
        return text
    try:
        match = _TIME_ANY.fullmatch(text)
        if match:
            year, month, day, hour, minute = (int(match.group(i)) for i in range(1, 6))
            second = int(match.group(6) or 0)
            micro = int((match.group(7) or "0")[:6].ljust(6, "0"))
            zone = (match.group(8) or "Z").upper()
            offset = dt.timedelta(0)
            if zone not in ("Z", "UTC"):
                sign = -1 if zone[0] == "-" else 1
                digits = zone[1:].replace(":", "")
                offset = sign * dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
            moment = dt.datetime(year, month, day, hour, minute, second, micro) - offset
            return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        match = _TIME_US.fullmatch(text)
        if match:
            month, day, year, hour, minute = (int(match.group(i)) for i in range(1, 6))
            second = int(match.group(6) or 0)
            micro = int((match.group(7) or "0")[:6].ljust(6, "0"))
            half = (match.group(8) or "").upper()
            if half == "PM" and hour < 12:
                hour += 12
            elif half == "AM" and hour == 12:
                hour = 0
            moment = dt.datetime(year, month, day, hour, minute, second, micro)
            return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:  # 2025-02-30 and the like
        return None
    return None
