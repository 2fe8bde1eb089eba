"""Helpers the credential modules share: host names and base64 keys."""

from __future__ import annotations

import base64
import re

_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _is_plausible_host(name: str) -> bool:
    """True for a bare DNS name (``hub.azure-devices.net``, ``localhost``) or an IP literal."""
    if name and len(name) <= 253 and all(_DNS_LABEL.fullmatch(x) for x in name.split(".")):
        return True
    import ipaddress  # (only for what is not a DNS name: an IPv6 literal, say)

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _decode_base64_key(key: str | bytes) -> bytes:
    """Decode a base64 shared access key strictly; raise :class:`binascii.Error` (or
    :class:`ValueError`) without any key material in the message when it is not valid."""
    raw = key.encode("ascii") if isinstance(key, str) else bytes(key)
    decoded = base64.b64decode(raw.strip(), validate=True)
    if not decoded:
        raise ValueError("empty key")
    return decoded
