"""The verdict rules: what the hub's TLS policy does to a device that connects the way
its log says it did.

The strong, weak and ECC suites come from the cipher table in :mod:`iothub_tls.policy`
(looked up by IANA or OpenSSL name); TLS 1.3 suites are recognised by their IANA form
(``TLS_AES_128_GCM_SHA256``: no key exchange in the name), all of them AEAD and accepted.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass

from ..errors import PolicyError
from ..policy import CIPHER_SUITES, CipherSuite
from .fields import TLS_ORDER

__all__ = ["AuditPolicy", "SuiteKind", "Verdict", "judge", "suite_kind"]


class Verdict(enum.Enum):
    """What the policy does to a device, from the connections it logged."""

    #: Every logged connection used a version and suite the policy accepts.
    COMPLIANT = "compliant"
    #: At least one logged connection used something the policy refuses.
    WILL_BE_REFUSED = "will-be-refused"
    #: Some connections carry no TLS evidence (HTTPS in IoT Hub's logs, a suite not
    #: logged): neither refused nor shown to comply.
    UNKNOWN = "unknown"

    @property
    def risk(self) -> int:
        """Sort order: the riskiest first."""
        return {Verdict.WILL_BE_REFUSED: 0, Verdict.UNKNOWN: 1, Verdict.COMPLIANT: 2}[self]


@dataclass(frozen=True)
class AuditPolicy:
    """The hub policy devices are judged against. Defaults: IoT Hub since 2025-08-31
    (TLS 1.2 or later, the eight strong suites)."""

    #: "1.2" or "1.3".
    min_tls: str = "1.2"
    #: Judge against a hub that offers only the four ECDHE-ECDSA suites.
    ecc_only: bool = False

    def __post_init__(self) -> None:
        if self.min_tls not in ("1.2", "1.3"):
            raise PolicyError(
                f"min_tls {self.min_tls!r} is not a policy IoT Hub has: use '1.2' "
                "(IoT Hub since 2025-08-31) or '1.3'"
            )

    def describe(self) -> str:
        suites = "ECDHE-ECDSA suites only" if self.ecc_only else "strong suites only"
        return f"TLS {self.min_tls} or later, {suites}"


class SuiteKind(enum.Enum):
    STRONG_ECDSA = "strong (ECDSA)"
    STRONG_RSA = "strong (RSA)"
    WEAK = "weak"
    TLS13 = "TLS 1.3"
    UNKNOWN = "not in IoT Hub's list"


_BY_NAME: dict[str, CipherSuite] = {}
for _suite in CIPHER_SUITES:
    _BY_NAME[_suite.iana.upper()] = _suite
    _BY_NAME[_suite.openssl.upper()] = _suite
_TLS13_NAME = re.compile(r"TLS_(?:AES|CHACHA20|SM4)_[A-Z0-9_]+")


@functools.lru_cache(maxsize=1024)
def suite_kind(name: str) -> tuple[str, SuiteKind]:
    """(IANA name, kind) of a suite named the IANA or the OpenSSL way."""
    text = name.strip().upper()
    found = _BY_NAME.get(text)
    if found is not None:
        if not found.strong:
            return found.iana, SuiteKind.WEAK
        kind = SuiteKind.STRONG_ECDSA if found.authentication == "ECDSA" else SuiteKind.STRONG_RSA
        return found.iana, kind
    if _TLS13_NAME.fullmatch(text) and "_WITH_" not in text:
        return text, SuiteKind.TLS13
    return name.strip(), SuiteKind.UNKNOWN


def _below(version: str, minimum: str) -> bool:
    return TLS_ORDER.index(version) < TLS_ORDER.index(minimum)


def _version_text(version: str) -> str:
    return "SSL 3.0" if version == "SSL3" else f"TLS {version}"


def judge(policy: AuditPolicy, protocol: str, tls: str, suite: str) -> tuple[Verdict, str]:
    """The verdict on connections that used ``tls`` (canonical, "" when not logged) and
    ``suite`` (as logged, "" when not logged) over ``protocol``, with its reason."""
    if tls and _below(tls, policy.min_tls):
        return Verdict.WILL_BE_REFUSED, _version_text(tls)
    if suite:
        iana, kind = suite_kind(suite)
        if kind is SuiteKind.WEAK:
            return Verdict.WILL_BE_REFUSED, f"weak suite {iana}"
        if kind is SuiteKind.UNKNOWN:
            return Verdict.WILL_BE_REFUSED, f"suite {iana} is not one of IoT Hub's strong suites"
        if kind is SuiteKind.STRONG_RSA and policy.ecc_only:
            return Verdict.WILL_BE_REFUSED, f"RSA suite {iana} (ECC-only accepts ECDHE-ECDSA)"
        if kind is SuiteKind.TLS13 and tls and tls != "1.3":
            return Verdict.WILL_BE_REFUSED, f"TLS 1.3 suite {iana} logged with TLS {tls}"
        if kind is not SuiteKind.TLS13 and tls == "1.3":
            return Verdict.COMPLIANT, "TLS 1.3"
        if kind is not SuiteKind.TLS13 and policy.min_tls == "1.3":
            return Verdict.WILL_BE_REFUSED, f"TLS 1.2 suite {iana} (policy requires TLS 1.3)"
        return Verdict.COMPLIANT, "TLS 1.3" if kind is SuiteKind.TLS13 else iana
    if tls == "1.3":
        return Verdict.COMPLIANT, "TLS 1.3"
    if tls:
        return Verdict.UNKNOWN, f"{_version_text(tls)}, cipher suite not logged"
    if protocol == "HTTPS":
        return Verdict.UNKNOWN, "HTTPS: IoT Hub logs no TLS version for HTTPS connections"
    where = f"{protocol}: " if protocol else ""
    return Verdict.UNKNOWN, f"{where}no TLS version or cipher suite logged"


def judge_refusal(reason: str) -> tuple[Verdict, str] | None:
    """A handshake the hub refused, as the local hub logs it (OpenSSL's reason), as a
    verdict on the unidentified client that tried it; None when it says nothing
    about TLS versions or suites."""
    text = reason.upper()
    if "TLS HANDSHAKE FAILED" not in text and "SSL" not in text:
        return None
    for marker in (
        "UNSUPPORTED_PROTOCOL",
        "WRONG_VERSION_NUMBER",
        "PROTOCOL_VERSION",
        "VERSION_TOO_LOW",
    ):
        if marker in text:
            return Verdict.WILL_BE_REFUSED, (
                f"offered only TLS versions below 1.2 (handshake refused: {marker})"
            )
    if "NO_SHARED_CIPHER" in text or "NO_CIPHERS" in text:
        return Verdict.WILL_BE_REFUSED, (
            "offered no strong cipher suite (handshake refused: NO_SHARED_CIPHER)"
        )
    return None
