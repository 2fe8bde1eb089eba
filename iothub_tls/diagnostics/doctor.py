"""Is this device platform able to comply with IoT Hub's TLS guidance? The checks
behind ``iothub-tls doctor``, callable from Python: :func:`run_checks`.

Every check that can be exercised is exercised: TLS 1.2, TLS 1.3, each recommended
suite, max fragment length, ECDSA-only signatures and reading the verified chain are
real handshakes through :func:`iothub_tls.create_ssl_context`, in memory, against a
throwaway server whose certificates are made on the spot. Nothing goes over the network.
"""

from __future__ import annotations

import datetime as dt
import enum
import importlib.metadata
import platform
import re
import ssl
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from ..errors import FeatureUnavailableError, IoTHubTLSError
from ..policy import STRONG_SUITES, CipherProfile, TlsPolicy
from ..roots import AZURE_ECC, AZURE_GLOBAL, RootSet, load_shipped, pem, spki_sha256
from ..testing.pki import CertificateAuthority, KeyType
from ..tls import _openssl
from ..tls.context import create_ssl_context
from ..tls.info import TlsInfo, tls_info

__all__ = ["Check", "Status", "certifi_roots", "run_checks"]

_HOST = "doctor.iothub-tls.invalid"


class Status(str, enum.Enum):
    OK = "ok"
    WARNING = "warning"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: Status
    detail: str
    remedy: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "detail": self.detail,
            "remedy": self.remedy,
        }


def run_checks(
    *,
    pkcs11_key: str | None = None,
    pkcs11_module: str | None = None,
    pin: str | None = None,
) -> list[Check]:
    """All checks, in report order. With ``pkcs11_key`` (an RFC 7512 URI), also whether
    that key loads and signs (``pin`` is never shown)."""
    checks = [_python(), _openssl_version()]
    checks += _handshake_checks()
    checks += hardware_checks(pkcs11_key=pkcs11_key, pkcs11_module=pkcs11_module, pin=pin)
    checks += [
        _roots(name, shipped)
        for name, shipped in (("AZURE_GLOBAL", AZURE_GLOBAL), ("AZURE_ECC", AZURE_ECC))
    ]
    checks.append(_system_store())
    checks.append(certifi_roots())
    checks.append(_clock())
    checks += _packages()
    return checks


# -- platform ------------------------------------------------------------------------------


def _python() -> Check:
    impl = platform.python_implementation()
    detail = f"{impl} {platform.python_version()}"
    if impl != "CPython":
        return Check(
            "python",
            Status.WARNING,
            detail,
            "the OpenSSL shim (max fragment length, ECC-only in TLS 1.3) needs "
            "CPython; use CPython 3.10 or later",
        )
    return Check("python", Status.OK, detail)


def _openssl_version() -> Check:
    version = ssl.OPENSSL_VERSION
    info = ssl.OPENSSL_VERSION_INFO
    if "LibreSSL" in version:
        return Check(
            "openssl",
            Status.WARNING,
            version,
            "LibreSSL lacks the OpenSSL functions the shim uses; use a Python "
            "built against OpenSSL 3",
        )
    if info[:3] < (1, 1, 1):
        return Check(
            "openssl",
            Status.FAIL,
            version,
            "OpenSSL older than 1.1.1 has no TLS 1.3; use a Python built against OpenSSL 3",
        )
    if info[:2] < (3, 0):
        return Check(
            "openssl",
            Status.WARNING,
            f"{version} (end of life since 2023-09-11)",
            "OpenSSL 1.1.1 gets no security fixes; use a Python built against OpenSSL 3",
        )
    return Check("openssl", Status.OK, version)


# -- real handshakes in memory --------------------------------------------------------------


@dataclass
class _Lab:
    root: RootSet
    root_name: str
    server: ssl.SSLContext


def _lab(directory: Path) -> _Lab:
    """A throwaway PKI (root -> RSA and ECDSA leaves) and a server context using both."""
    ca = CertificateAuthority.root("iothub-tls doctor root", key_type=KeyType.EC, days=2)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.set_ciphers(":".join(s.openssl for s in STRONG_SUITES))
    for key_type in KeyType:
        issued = ca.server(_HOST, key_type=key_type, days=1)
        written = issued.write(directory, key_type.value)
        server.load_cert_chain(written.certificate, written.private_key)
    root = RootSet.from_pem(ca.issued.cert_pem)
    return _Lab(root, ca.common_name, server)


def _memory_handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> TlsInfo:
    """Complete a handshake between two contexts over memory BIOs; the client side runs
    the hardened context's checks. Returns the client's report."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=_HOST)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(32):
        for side, obj in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return tls_info(client)
    raise ssl.SSLError("the in-memory handshake did not complete")


def _handshake_checks() -> list[Check]:
    with tempfile.TemporaryDirectory(prefix="iothub-tls-doctor-") as tmp:
        try:
            lab = _lab(Path(tmp))
        except (ssl.SSLError, OSError, ValueError) as exc:
            return [
                Check(
                    "tls-handshakes",
                    Status.FAIL,
                    f"cannot set up the in-memory test server: {exc}",
                    "this Python's ssl module cannot load an RSA or ECDSA certificate; "
                    "use a Python built against OpenSSL 3",
                )
            ]
        return list(_exercise(lab))


def _attempt(name: str, action: Callable[[], str], remedy: str) -> Check:
    try:
        return Check(name, Status.OK, action())
    except _Unexpected as exc:
        return Check(name, Status.FAIL, str(exc), remedy)
    except FeatureUnavailableError as exc:
        return Check(name, Status.FAIL, f"unavailable: {exc.reason}", remedy)
    except (IoTHubTLSError, ssl.SSLError, OSError) as exc:
        return Check(name, Status.FAIL, f"{type(exc).__name__}: {exc}", remedy)


class _Unexpected(Exception):
    """A handshake completed but did not show what the check needs."""


def _exercise(lab: _Lab) -> Iterator[Check]:
    def connect(**policy: Any) -> TlsInfo:
        ctx = create_ssl_context(TlsPolicy(roots=lab.root, **policy))
        return _memory_handshake(ctx, lab.server)

    def version(name: str, **policy: Any) -> str:
        info = connect(**policy)
        if info.version != name:
            raise _Unexpected(f"negotiated {info.version} instead of {name}")
        return f"handshake with {info.iana_cipher}"

    yield _attempt(
        "tls1.2",
        lambda: version("TLSv1.2", max_version=ssl.TLSVersion.TLSv1_2),
        "this OpenSSL cannot speak TLS 1.2 with IoT Hub's suites; use a Python "
        "built against OpenSSL 3",
    )
    if not ssl.HAS_TLSv1_3:
        yield Check(
            "tls1.3",
            Status.WARNING,
            "this OpenSSL build has no TLS 1.3",
            "devices still comply with TLS 1.2; for TLS 1.3 use OpenSSL 1.1.1+",
        )
    else:
        yield _attempt(
            "tls1.3",
            lambda: version("TLSv1.3", min_version=ssl.TLSVersion.TLSv1_3),
            "TLS 1.3 is disabled in this OpenSSL (system crypto policy?); devices "
            "still comply with TLS 1.2",
        )

    for suite in STRONG_SUITES:

        def one_suite(openssl_name: str = suite.openssl) -> str:
            ctx = create_ssl_context(TlsPolicy(roots=lab.root, max_version=ssl.TLSVersion.TLSv1_2))
            ctx.set_ciphers(openssl_name)
            info = _memory_handshake(ctx, lab.server)
            if info.cipher != openssl_name:
                raise _Unexpected(f"negotiated {info.cipher} instead")
            return f"{info.version} handshake, {info.server_key_type} certificate"

        yield _attempt(
            f"suite {suite.iana}",
            one_suite,
            f"this OpenSSL does not offer {suite.openssl} (disabled by a system "
            "crypto policy or FIPS mode?); devices still work while other "
            "recommended suites are available",
        )

    shim_ok, shim_detail = _openssl.shim_status()
    if shim_ok:
        yield Check("openssl-shim", Status.OK, f"libssl reachable and validated ({shim_detail})")
    else:
        yield Check(
            "openssl-shim",
            Status.FAIL,
            f"unusable: {shim_detail}",
            "use CPython 3.10-3.14 with a dynamically linked OpenSSL 1.1.1 or 3.x "
            "(python.org, Debian/Ubuntu and the official Docker images are)",
        )

    def fragment_length() -> str:
        info = connect(max_fragment_length=512, require_max_fragment_length=True)
        return f"512-byte max fragment length negotiated ({info.version})"

    yield _attempt(
        "max-fragment-length",
        fragment_length,
        "leave TlsPolicy.max_fragment_length unset here, or fix openssl-shim",
    )

    def ecdsa_only() -> str:
        info = connect(ciphers=CipherProfile.ECC_ONLY, min_version=ssl.TLSVersion.TLSv1_3)
        if info.server_key_type != "EC":
            raise _Unexpected(f"the server chose its {info.server_key_type} certificate")
        return "TLS 1.3 with ECDSA signature algorithms only: ECDSA certificate chosen"

    yield _attempt(
        "ecdsa-signature-algorithms",
        ecdsa_only,
        "use CipherProfile.STRONG here (ECC-only needs it for TLS 1.3), or fix openssl-shim",
    )

    def chain() -> str:
        info = connect()
        if info.anchor != lab.root_name:
            raise _Unexpected(f"the verified chain cannot be read ({shim_detail})")
        return f"verified chain read: {' -> '.join(info.chain)}"

    yield _attempt(
        "verified-chain",
        chain,
        "TlsInfo.anchor stays empty and Trust.SYSTEM refuses every connection; "
        "use Trust.PINNED (default), or fix openssl-shim",
    )


# -- hardware keys ---------------------------------------------------------------------------


def hardware_checks(
    *,
    pkcs11_key: str | None = None,
    pkcs11_module: str | None = None,
    pin: str | None = None,
) -> list[Check]:
    """Can device keys in a PKCS#11 token or a TPM 2.0 be used here (engine / provider
    installed, module loadable) and, given a URI, does that key sign?"""
    from ..tls.hardware import backend_status

    checks = []
    for kind, name, remedy in (
        (
            "pkcs11",
            "pkcs11-keys",
            "only needed for keys in a PKCS#11 token: apt-get install libengine-pkcs11-openssl",
        ),
        (
            "tpm2",
            "tpm2-keys",
            "only needed for TPM 2.0 keys: apt-get install tpm2-openssl (or use a "
            "tpm2-pkcs11 token through pkcs11-keys)",
        ),
    ):
        ok, detail = backend_status(kind)
        checks.append(Check(name, Status.OK if ok else Status.WARNING, detail, remedy))
    if pkcs11_module is not None:
        checks.append(_pkcs11_module(pkcs11_module))
    if pkcs11_key is not None:
        checks.append(_pkcs11_key(pkcs11_key, pkcs11_module, pin))
    return checks


def _pkcs11_module(path: str) -> Check:
    from ..tls.hardware.pkcs11 import Pkcs11Error, Pkcs11Module

    try:
        module = Pkcs11Module(path)
        with module.initialized():
            tokens = module.tokens()
    except FileNotFoundError:
        return Check(
            "pkcs11-module",
            Status.FAIL,
            f"{path} does not exist",
            "install the token's PKCS#11 library or correct the path",
        )
    except (OSError, Pkcs11Error) as exc:
        return Check(
            "pkcs11-module",
            Status.FAIL,
            f"{path} does not load: {exc}",
            "check that this is the token's PKCS#11 library for this architecture",
        )
    labels = ", ".join(repr(t.label) for t in tokens) or "none"
    return Check("pkcs11-module", Status.OK, f"{path} loads; tokens present: {labels}")


def _pkcs11_key(uri: str, module: str | None, pin: str | None) -> Check:
    from ..errors import HardwareKeyError
    from ..tls.hardware import KeyRequest, backend
    from ..tls.hardware.uri import UriError, parse_pkcs11_uri

    try:
        parsed = parse_pkcs11_uri(uri)
    except UriError as exc:
        return Check(
            "pkcs11-key",
            Status.FAIL,
            f"not a PKCS#11 URI: {exc}",
            "write it as pkcs11:token=...;object=...",
        )
    try:
        chosen = backend("pkcs11")
        secret = None if pin is None else pin.encode("utf-8")
        if secret is None and parsed.pin_value is not None:
            secret = parsed.pin_value.encode("utf-8")
        key = chosen.load_key(KeyRequest("pkcs11", parsed, module=module, pin=secret))
        chosen.sign_test(key)
    except FeatureUnavailableError as exc:
        return Check("pkcs11-key", Status.FAIL, f"unavailable: {exc.reason}", "fix openssl-shim")
    except HardwareKeyError as exc:
        return Check(
            "pkcs11-key", Status.FAIL, f"{type(exc).__name__}: {exc}", "see docs/hardware-keys.md"
        )
    return Check(
        "pkcs11-key",
        Status.OK,
        f"{parsed} signs ({key.route}); the signature verifies with its public key",
    )


# -- roots ---------------------------------------------------------------------------------


def _roots(name: str, shipped: RootSet) -> Check:
    try:
        fresh = load_shipped(name)  # re-reads the PEM files and checks the fingerprints
    except IoTHubTLSError as exc:
        return Check(
            f"roots {name}",
            Status.FAIL,
            str(exc),
            "reinstall iothub-tls (pip install --force-reinstall iothub-tls)",
        )
    if fresh != shipped:
        return Check(
            f"roots {name}",
            Status.FAIL,
            "the root files changed since this process loaded them",
            "reinstall iothub-tls and restart the application",
        )
    return Check(
        f"roots {name}", Status.OK, f"{', '.join(fresh.common_names)}: SHA-256 fingerprints match"
    )


def _system_store_certificates() -> tuple[list[x509.Certificate], str]:
    """The OS trust store as OpenSSL / truststore on Linux see it."""
    context = ssl.create_default_context()
    where = ssl.get_default_verify_paths().cafile or "OpenSSL's default CA file"
    certs = _parse_all(context.get_ca_certs(binary_form=True), x509.load_der_x509_certificate)
    if certs:
        return certs, where
    try:
        from truststore import _openssl as ts_openssl  # the files truststore falls back to

        candidates = list(getattr(ts_openssl, "_CA_FILE_CANDIDATES", []))
    except ImportError:
        candidates = []
    for candidate in candidates:
        path = Path(candidate)
        if path.is_file():
            blocks = [block for label, block in pem.pem_blocks(path.read_bytes())
                      if label in pem.CERTIFICATE_LABELS]  # fmt: skip
            return _parse_all(blocks, x509.load_pem_x509_certificate), str(path)
    return [], ""


def _parse_all(
    items: Iterable[bytes], parse: Callable[[bytes], x509.Certificate]
) -> list[x509.Certificate]:
    """Parse what can be parsed: a system store may hold old roots that cryptography
    warns about (negative serial numbers) or refuses; they are not the Azure roots."""
    certs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for item in items:
            try:
                certs.append(parse(item))
            except ValueError:
                continue
    return certs


def _system_store() -> Check:
    name = "system-store"
    if sys.platform in ("darwin", "win32"):
        return Check(
            name,
            Status.WARNING,
            f"not inspected on {sys.platform}: Trust.SYSTEM asks the OS through "
            "truststore at connect time",
            "only matters with Trust.SYSTEM; the default Trust.PINNED does not "
            "use the system store",
        )
    try:
        certs, where = _system_store_certificates()
    except (OSError, ValueError) as exc:
        return Check(
            name,
            Status.WARNING,
            f"cannot read the system store: {exc}",
            "only matters with Trust.SYSTEM; install ca-certificates",
        )
    have = {spki_sha256(c) for c in certs}
    missing = [c for c in AZURE_GLOBAL if spki_sha256(c) not in have]
    if not certs:
        return Check(
            name,
            Status.WARNING,
            "no system CA store found",
            "only matters with Trust.SYSTEM: install ca-certificates, or keep "
            "the default Trust.PINNED",
        )
    if missing:
        names = ", ".join(repr(c) for c in RootSet(missing).common_names)
        return Check(
            name,
            Status.WARNING,
            f"{where} lacks {names}",
            "only matters with Trust.SYSTEM: update ca-certificates, or keep the "
            "default Trust.PINNED",
        )
    return Check(
        name, Status.OK, f"{where} holds the Azure roots ({len(certs)} CAs); Trust.SYSTEM usable"
    )


# -- Mozilla's root list, as certifi ships it ----------------------------------------------

#: certifi is released with every change to Mozilla's root list (several times a year); a
#: copy older than this says little about the roots trusted today.
_CERTIFI_STALE = dt.timedelta(days=400)


def _certifi_date(version: str) -> dt.date | None:
    """certifi versions are release dates: 2026.10.19 (or 2026.10.19.post1)."""
    match = re.match(r"(\d{4})\.(\d{1,2})\.(\d{1,2})", version)
    if not match:
        return None
    try:
        return dt.date(*(int(g) for g in match.groups()))
    except ValueError:
        return None


def certifi_roots(
    bundle: str | None = None, version: str | None = None, today: dt.date | None = None
) -> Check:
    """Are the shipped roots still in certifi's bundle, Mozilla's list of trusted roots?

    A root Mozilla removes or distrusts is an early sign that Azure will move IoT Hub's
    chains to another root: pinned devices then need the successor root before the hub
    switches (an emergency root migration). Compared by public key, so a re-issued copy
    of the same root still counts. ``bundle`` and ``version`` default to the installed
    certifi's; ``today`` to the clock."""
    name = "certifi-bundle"
    try:
        if bundle is None:
            import certifi

            bundle = certifi.where()
        if version is None:
            version = importlib.metadata.version("certifi")
    except (ImportError, importlib.metadata.PackageNotFoundError):
        return Check(
            name,
            Status.WARNING,
            "certifi is not installed: the pinned roots cannot be compared with "
            "Mozilla's current root list",
            "pip install --upgrade certifi",
        )
    try:
        data = Path(bundle).read_bytes()
    except OSError as exc:
        return Check(
            name,
            Status.WARNING,
            f"cannot read certifi's bundle {bundle}: {exc.strerror or exc}",
            "pip install --force-reinstall certifi",
        )
    blocks = [block for label, block in pem.pem_blocks(data) if label in pem.CERTIFICATE_LABELS]
    certs = _parse_all(blocks, x509.load_pem_x509_certificate)
    if not certs:
        return Check(
            name,
            Status.WARNING,
            f"certifi {version}: {bundle} holds no certificate",
            "pip install --force-reinstall certifi",
        )
    have = {spki_sha256(c) for c in certs}
    missing = [
        f"{root_name!r} ({set_name})"
        for set_name, roots in (("AZURE_GLOBAL", AZURE_GLOBAL), ("AZURE_ECC", AZURE_ECC))
        for cert, root_name in zip(roots, roots.common_names, strict=True)
        if spki_sha256(cert) not in have
    ]
    if missing:
        return Check(
            name,
            Status.WARNING,
            f"certifi {version} (Mozilla's root list) no longer holds {', '.join(missing)}: "
            "Mozilla removed or distrusted it, an early sign that Azure will move IoT Hub "
            "to another root",
            "devices pinned to it keep working until the hub changes its chain; follow "
            "Azure's IoT Hub certificate announcements, add the successor root by "
            "configuration (TlsPolicy(roots=AZURE_GLOBAL + RootSet.from_pem_file(...))) "
            "before the hub switches, and update iothub-tls",
        )
    released = _certifi_date(version)
    today = today or dt.datetime.now(dt.timezone.utc).date()
    if released is not None and today - released > _CERTIFI_STALE:
        return Check(
            name,
            Status.WARNING,
            f"certifi {version} holds the shipped roots, but it was released "
            f"{(today - released).days} days ago: this says little about Mozilla's list today",
            "pip install --upgrade certifi, then run doctor again",
        )
    count = len(AZURE_GLOBAL) + len(AZURE_ECC)
    return Check(
        name,
        Status.OK,
        f"certifi {version} (Mozilla's root list) still holds the {count} shipped roots",
    )


# -- clock ---------------------------------------------------------------------------------


def _package_date() -> dt.datetime:
    """When this copy of the package was built or installed (its files' modification
    time): a clock earlier than that has certainly been reset."""
    here = Path(__file__).resolve().parent.parent
    stamps = [p.stat().st_mtime for p in here.glob("*.py")]
    return dt.datetime.fromtimestamp(max(stamps), dt.timezone.utc)


def _clock(now: dt.datetime | None = None) -> Check:
    now = now or dt.datetime.now(dt.timezone.utc)
    shown = now.strftime("%Y-%m-%d %H:%M UTC")
    remedy = (
        "set the clock (enable NTP, e.g. timedatectl set-ntp true, or an RTC); certificate "
        "checks and SAS token expiry depend on it"
    )
    roots = [*AZURE_GLOBAL, *AZURE_ECC]
    newest_root = max(roots, key=lambda c: c.not_valid_before_utc)
    if now < newest_root.not_valid_before_utc:
        return Check(
            "clock",
            Status.FAIL,
            f"{shown} is before the shipped root {RootSet([newest_root]).common_names[0]!r} "
            f"became valid ({newest_root.not_valid_before_utc:%Y-%m-%d})",
            remedy,
        )
    built = _package_date()
    if now < built - dt.timedelta(days=1):
        return Check(
            "clock",
            Status.FAIL,
            f"{shown} is before this installation of iothub-tls was made ({built:%Y-%m-%d})",
            remedy,
        )
    first_expiry = min(AZURE_GLOBAL, key=lambda c: c.not_valid_after_utc)
    if now > first_expiry.not_valid_after_utc:
        return Check(
            "clock",
            Status.FAIL,
            f"{shown} is after the pinned root "
            f"{RootSet([first_expiry]).common_names[0]!r} expires "
            f"({first_expiry.not_valid_after_utc:%Y-%m-%d})",
            f"if the clock is right, update iothub-tls for new roots; else {remedy}",
        )
    return Check("clock", Status.OK, f"{shown} (plausible)")


# -- libraries -----------------------------------------------------------------------------

# distribution, extra that brings it, supported range (inclusive minimum, exclusive maximum)
_PACKAGES: tuple[tuple[str, str | None, tuple[int, ...], tuple[int, ...] | None], ...] = (
    ("wsproto", "websockets", (1, 2), None),
    ("python-qpid-proton", "amqp", (0, 39), None),
    ("urllib3", "https", (2,), None),
    ("truststore", None, (0, 9), None),
)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def _range_text(low: tuple[int, ...], high: tuple[int, ...] | None) -> str:
    text = ">=" + ".".join(map(str, low))
    return text + (",<" + ".".join(map(str, high)) if high else "")


def _packages() -> list[Check]:
    checks = []
    for dist, extra, low, high in _PACKAGES:
        wanted = _range_text(low, high)
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            if extra is None:
                checks.append(
                    Check(
                        dist,
                        Status.WARNING,
                        "not installed",
                        f"Trust.SYSTEM needs it: pip install '{dist}{wanted}'",
                    )
                )
            else:
                checks.append(
                    Check(
                        dist,
                        Status.OK,
                        f"not installed (optional: pip install 'iothub-tls[{extra}]')",
                    )
                )
            continue
        found = _version_tuple(version)
        if found < low or (high is not None and found >= high):
            checks.append(
                Check(
                    dist,
                    Status.FAIL,
                    f"{version} is not supported ({wanted})",
                    f"pip install '{dist}{wanted}'",
                )
            )
        else:
            checks.append(Check(dist, Status.OK, version))
    checks.append(_azure_iot_device())
    return checks


_REQUIREMENT = re.compile(r"^\s*paho[-_.]mqtt\s*\(?([^;)]*)\)?\s*(;.*)?$", re.IGNORECASE)
_SPEC = re.compile(r"(>=|<=|==|!=|~=|>|<)\s*([0-9][0-9a-zA-Z.*]*)")


def _satisfies(version: tuple[int, ...], specifier: str) -> bool | None:
    """Whether ``version`` meets a simple PEP 440 specifier (None if it cannot tell)."""
    ops: dict[str, Callable[[tuple[int, ...], tuple[int, ...]], bool]] = {
        ">=": lambda a, b: a >= b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        "<": lambda a, b: a < b,
        "==": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
    }
    clauses = _SPEC.findall(specifier)
    if not clauses:
        return None
    for op, text in clauses:
        if op not in ops or "*" in text:
            return None
        other = _version_tuple(text)
        width = max(len(version), len(other))
        a = version + (0,) * (width - len(version))
        b = other + (0,) * (width - len(other))
        if not ops[op](a, b):
            return False
    return True


def _azure_iot_device() -> Check:
    name = "azure-iot-device"
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return Check(name, Status.OK, "not installed (only needed alongside the Azure SDK)")
    requirement = next(
        (
            m.group(1).strip()
            for r in importlib.metadata.requires(name) or []
            if (m := _REQUIREMENT.match(r)) and not (m.group(2) or "").strip()
        ),
        "",
    )
    try:
        paho = importlib.metadata.version("paho-mqtt")
    except importlib.metadata.PackageNotFoundError:
        return Check(
            name,
            Status.WARNING,
            f"{version}, requires paho-mqtt {requirement or '(any)'}, which is not installed",
            f"pip install 'paho-mqtt{requirement}'",
        )
    ok = _satisfies(_version_tuple(paho), requirement) if requirement else True
    detail = f"{version}, pulls paho-mqtt {requirement or '(any version)'}; installed {paho}"
    if ok is False:
        return Check(
            name,
            Status.WARNING,
            detail,
            "azure-iot-device and this paho-mqtt conflict; iothub-tls itself does not "
            "use paho-mqtt, so install the version azure-iot-device needs "
            f"(pip install 'paho-mqtt{requirement}') or use separate environments",
        )
    return Check(name, Status.OK, detail)
