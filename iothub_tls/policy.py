"""The TLS policy: what IoT Hub's TLS guidance asks of a device, as one immutable value.

The cipher-suite table below is the single source of truth for the client contexts,
``probe``, the local compliance endpoint and the documentation.
"""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass, field

from .errors import PolicyError
from .roots import AZURE_GLOBAL, RootSet

__all__ = [
    "CIPHER_SUITES",
    "ECC_SUITES",
    "MAX_FRAGMENT_LENGTHS",
    "STRONG_SUITES",
    "WEAK_SUITES",
    "CipherProfile",
    "CipherSuite",
    "TlsPolicy",
    "Trust",
    "iana_name",
]


@dataclass(frozen=True)
class CipherSuite:
    """One TLS 1.2 cipher suite, named as IANA and OpenSSL name it."""

    iana: str
    openssl: str
    strong: bool
    #: "ECDSA" or "RSA": the kind of server certificate the suite needs.
    authentication: str


def _suite(iana: str, openssl: str, strong: bool) -> CipherSuite:
    return CipherSuite(iana, openssl, strong, "ECDSA" if "_ECDSA_" in iana else "RSA")


#: Every suite the guidance names, strong first (the order the client offers them in:
#: ECDSA before RSA, GCM before CBC, 128-bit before 256-bit as IoT Hub lists them).
CIPHER_SUITES: tuple[CipherSuite, ...] = (
    _suite("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256", True),
    _suite("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "ECDHE-ECDSA-AES256-GCM-SHA384", True),
    _suite("TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256", "ECDHE-ECDSA-AES128-SHA256", True),
    _suite("TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384", "ECDHE-ECDSA-AES256-SHA384", True),
    _suite("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "ECDHE-RSA-AES128-GCM-SHA256", True),
    _suite("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "ECDHE-RSA-AES256-GCM-SHA384", True),
    _suite("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256", "ECDHE-RSA-AES128-SHA256", True),
    _suite("TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384", "ECDHE-RSA-AES256-SHA384", True),
    # Weak: accepted by hubs before 2025-08-31; never offered by a device context.
    _suite("TLS_DHE_RSA_WITH_AES_256_GCM_SHA384", "DHE-RSA-AES256-GCM-SHA384", False),
    _suite("TLS_DHE_RSA_WITH_AES_128_GCM_SHA256", "DHE-RSA-AES128-GCM-SHA256", False),
    _suite("TLS_RSA_WITH_AES_256_GCM_SHA384", "AES256-GCM-SHA384", False),
    _suite("TLS_RSA_WITH_AES_128_GCM_SHA256", "AES128-GCM-SHA256", False),
    _suite("TLS_RSA_WITH_AES_256_CBC_SHA256", "AES256-SHA256", False),
    _suite("TLS_RSA_WITH_AES_128_CBC_SHA256", "AES128-SHA256", False),
    _suite("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA", "ECDHE-RSA-AES128-SHA", False),
    _suite("TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA", "ECDHE-RSA-AES256-SHA", False),
    _suite("TLS_RSA_WITH_AES_128_CBC_SHA", "AES128-SHA", False),
    _suite("TLS_RSA_WITH_AES_256_CBC_SHA", "AES256-SHA", False),
)
STRONG_SUITES: tuple[CipherSuite, ...] = tuple(s for s in CIPHER_SUITES if s.strong)
ECC_SUITES: tuple[CipherSuite, ...] = tuple(s for s in STRONG_SUITES if s.authentication == "ECDSA")
WEAK_SUITES: tuple[CipherSuite, ...] = tuple(s for s in CIPHER_SUITES if not s.strong)

_IANA_BY_OPENSSL = {s.openssl: s.iana for s in CIPHER_SUITES}

#: RFC 6066 max_fragment_length values and their extension codes.
MAX_FRAGMENT_LENGTHS: dict[int, int] = {512: 1, 1024: 2, 2048: 3, 4096: 4}


def iana_name(openssl_name: str) -> str:
    """IANA name of a suite given its OpenSSL name. TLS 1.3 suites are already named
    the IANA way by OpenSSL; unknown names are returned unchanged."""
    return _IANA_BY_OPENSSL.get(openssl_name, openssl_name)


class CipherProfile(enum.Enum):
    """Which of the strong suites a device offers."""

    #: The 8 suites IoT Hub recommends (ECDSA and RSA servers).
    STRONG = "strong"
    #: Only the 4 ECDHE-ECDSA suites and ECDSA signatures: the hub must present its ECC
    #: certificate (less compute, memory and bandwidth on the device).
    ECC_ONLY = "ecc-only"

    @property
    def suites(self) -> tuple[CipherSuite, ...]:
        return ECC_SUITES if self is CipherProfile.ECC_ONLY else STRONG_SUITES

    @property
    def openssl_cipher_string(self) -> str:
        return ":".join(s.openssl for s in self.suites)


class Trust(enum.Enum):
    """Where the trust anchors come from."""

    #: Anchors are exactly the policy's roots; the system store is never consulted.
    PINNED = "pinned"
    #: The operating system's store verifies (through truststore), and the verified
    #: chain must still end at one of the policy's roots.
    SYSTEM = "system"


_ALLOWED_VERSIONS = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)


@dataclass(frozen=True)
class TlsPolicy:
    """The device's TLS configuration. Defaults are IoT Hub's guidance.

    Make variants with :func:`dataclasses.replace`; every value is validated once, here.
    """

    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion | None = None
    ciphers: CipherProfile = CipherProfile.STRONG
    roots: RootSet = field(default=AZURE_GLOBAL)
    trust: Trust = Trust.PINNED
    max_fragment_length: int | None = None
    require_max_fragment_length: bool = False
    session_resumption: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.min_version, ssl.TLSVersion):
            raise PolicyError(f"min_version must be an ssl.TLSVersion, got {self.min_version!r}")
        if self.min_version not in _ALLOWED_VERSIONS:
            raise PolicyError(
                f"min_version {self.min_version.name} is not allowed: IoT Hub retired "
                "TLS 1.0 and 1.1 on 2025-08-31 and requires TLS 1.2 or later; use "
                "ssl.TLSVersion.TLSv1_2 (default) or TLSv1_3"
            )
        if self.max_version is not None:
            if not isinstance(self.max_version, ssl.TLSVersion):
                raise PolicyError(
                    f"max_version must be an ssl.TLSVersion or None, got {self.max_version!r}"
                )
            if self.max_version not in _ALLOWED_VERSIONS:
                raise PolicyError(
                    f"max_version {self.max_version.name} is not allowed: use None (the "
                    "newest TLS available, preferred), TLSv1_3 or TLSv1_2"
                )
            if self.max_version < self.min_version:
                raise PolicyError(
                    f"max_version {self.max_version.name} is below min_version "
                    f"{self.min_version.name}: no TLS version would be left"
                )
        if not isinstance(self.ciphers, CipherProfile):
            raise PolicyError(
                f"ciphers must be a CipherProfile (STRONG or ECC_ONLY), got {self.ciphers!r}"
            )
        if not isinstance(self.roots, RootSet):
            raise PolicyError(
                "roots must be a RootSet (for example AZURE_GLOBAL, "
                f"RootSet.from_pem_file(path)), got {type(self.roots).__name__}"
            )
        if not isinstance(self.trust, Trust):
            raise PolicyError(f"trust must be Trust.PINNED or Trust.SYSTEM, got {self.trust!r}")
        mfl = self.max_fragment_length
        if mfl is not None and (
            isinstance(mfl, bool) or not isinstance(mfl, int) or mfl not in MAX_FRAGMENT_LENGTHS
        ):
            raise PolicyError(
                f"max_fragment_length {mfl!r} is not supported: RFC 6066 allows only "
                "512, 1024, 2048 or 4096 bytes (or None to leave records at 16 KiB)"
            )
        if self.require_max_fragment_length and mfl is None:
            raise PolicyError(
                "require_max_fragment_length=True needs max_fragment_length "
                "(512, 1024, 2048 or 4096)"
            )
        for name in ("require_max_fragment_length", "session_resumption"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(f"{name} must be True or False")

    @property
    def cipher_suites(self) -> tuple[CipherSuite, ...]:
        """The TLS 1.2 suites this policy offers, in order of preference."""
        return self.ciphers.suites

    @property
    def ecc_only(self) -> bool:
        return self.ciphers is CipherProfile.ECC_ONLY
