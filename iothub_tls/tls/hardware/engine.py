"""The ENGINE backend: PKCS#11 keys through libp11's ``pkcs11`` OpenSSL engine.

Before the engine is asked for the key, :mod:`.pkcs11` looks at the token directly, so
that each failure has its own error: the module does not load, no such token, a missing
or wrong PIN (tried once, so a mistake costs one attempt of the token's retry counter),
no such key or certificate. Then the engine (one per module, loaded once, kept for the
life of the process, ``QUIET`` so it prints nothing) loads the key as an ``EVP_PKEY``
whose signatures are made by the token.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import secrets
import threading
from typing import Any

from ...errors import (
    FeatureUnavailableError,
    HardwareKeyError,
    HardwareModuleError,
    HardwareObjectNotFoundError,
    HardwareSigningError,
    TokenNotFoundError,
    TokenPinError,
    TokenRemovedError,
)
from . import _UNREACHABLE, HardwareKey, KeyRequest
from ._crypto import Crypto, crypto
from .pkcs11 import (
    CKO_CERTIFICATE,
    CKO_PRIVATE_KEY,
    CKR_PIN_EXPIRED,
    CKR_PIN_INCORRECT,
    CKR_PIN_INVALID,
    CKR_PIN_LEN_RANGE,
    CKR_PIN_LOCKED,
    Pkcs11Error,
    Pkcs11Module,
    TokenInfo,
    module_lock,
)
from .uri import Pkcs11Uri

__all__ = [
    "ENGINE_ID",
    "TPM2_PKCS11_MODULES",
    "available",
    "find_module",
    "load_key",
    "sign_test",
]

ENGINE_ID = "pkcs11"
_DEBIAN = "libengine-pkcs11-openssl"
vp, c_int, c_char_p = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p

_ENGINE_FUNCTIONS: tuple[tuple[str, Any, list[Any]], ...] = (
    ("ENGINE_by_id", vp, [c_char_p]),
    ("ENGINE_ctrl_cmd_string", c_int, [vp, c_char_p, c_char_p, c_int]),
    ("ENGINE_init", c_int, [vp]),
    ("ENGINE_finish", c_int, [vp]),
    ("ENGINE_free", c_int, [vp]),
    ("ENGINE_load_private_key", vp, [vp, c_char_p, vp, vp]),
    ("UI_null", vp, []),
)

# Where distributions put PKCS#11 modules (p11-kit's proxy first: it offers every
# module registered on the system).
_MODULE_DIRS = (
    "/usr/lib/x86_64-linux-gnu/pkcs11",
    "/usr/lib/aarch64-linux-gnu/pkcs11",
    "/usr/lib/arm-linux-gnueabihf/pkcs11",
    "/usr/lib64/pkcs11",
    "/usr/lib/pkcs11",
)

#: Where distributions install tpm2-pkcs11 (a TPM 2.0 presented as a PKCS#11 token).
TPM2_PKCS11_MODULES = (
    *(f"{d}/libtpm2_pkcs11.so" for d in _MODULE_DIRS),
    "/usr/lib/x86_64-linux-gnu/libtpm2_pkcs11.so.1",
    "/usr/lib/aarch64-linux-gnu/libtpm2_pkcs11.so.1",
)

_lock = threading.Lock()
_engines: dict[str, int] = {}  # module path -> initialised ENGINE*, kept for the process
_status: dict[str, tuple[bool, str]] = {}


def _bound() -> Crypto:
    lib = crypto("PKCS#11 keys (OpenSSL ENGINE API)")
    missing = [n for n, r, a in _ENGINE_FUNCTIONS if not lib.bind(n, r, a)]
    if missing:
        raise FeatureUnavailableError(
            "PKCS#11 keys (OpenSSL ENGINE API)",
            f"this OpenSSL was built without engines ({', '.join(missing)} missing); "
            "OpenSSL 1.1.1 and distribution builds of 3.x have them",
        )
    return lib


def available(kind: str) -> tuple[bool, str]:
    """Whether libp11's engine loads here (once per process)."""
    if kind != "pkcs11":
        return False, "the engine backend loads PKCS#11 keys only"
    with _lock:
        if kind not in _status:
            _status[kind] = _probe()
        return _status[kind]


def _probe() -> tuple[bool, str]:
    try:
        lib = _bound()
    except FeatureUnavailableError as exc:
        return False, _UNREACHABLE + exc.reason
    engine = lib.ENGINE_by_id(ENGINE_ID.encode())
    reasons = lib.errors()
    if not engine:
        return False, (
            f"OpenSSL's {ENGINE_ID!r} engine is not installed "
            f"(apt-get install {_DEBIAN}; {'; '.join(reasons[-1:]) or 'ENGINE_by_id failed'})"
        )
    lib.ENGINE_free(engine)
    return True, f"OpenSSL engine {ENGINE_ID!r} (libp11)"


def find_module(uri: Pkcs11Uri, module: str | None) -> str:
    """The PKCS#11 module to use: ``module``, else the URI's module-path / module-name,
    else p11-kit's proxy."""
    if module is not None:
        return os.fspath(module)
    if uri.module_path is not None:
        return uri.module_path
    names = [uri.module_name] if uri.module_name else ["p11-kit-proxy"]
    for name in names:
        for directory in _MODULE_DIRS:
            for candidate in (f"{name}.so", f"lib{name}.so", name):
                path = os.path.join(directory, candidate)
                if os.path.isfile(path):
                    return path
    if uri.module_name:
        raise HardwareModuleError(
            f"PKCS#11 module {uri.module_name!r} (module-name in the URI) was not found in "
            f"{', '.join(_MODULE_DIRS)}: pass module='/path/to/module.so'"
        )
    raise HardwareModuleError(
        "no PKCS#11 module given and p11-kit's proxy is not installed: pass "
        "module='/path/to/module.so' (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so) or put "
        "module-path=... in the URI"
    )


def _open_module(path: str) -> Pkcs11Module:
    try:
        return Pkcs11Module(path)
    except FileNotFoundError:
        raise HardwareModuleError(
            f"the PKCS#11 module {path} does not exist: install the token's PKCS#11 "
            "library or correct the path"
        ) from None
    except OSError as exc:
        raise HardwareModuleError(f"the PKCS#11 module {path} does not load: {exc}") from None


def _pin_error(uri: Pkcs11Uri, exc: Pkcs11Error) -> TokenPinError:
    where = uri.token_text()
    if exc.rv == CKR_PIN_INCORRECT:
        return TokenPinError(f"wrong PIN for {where}: the token refused it (CKR_PIN_INCORRECT)")
    if exc.rv == CKR_PIN_LOCKED:
        return TokenPinError(
            f"the PIN of {where} is locked after too many wrong attempts: unlock it with "
            "the security officer PIN"
        )
    if exc.rv == CKR_PIN_EXPIRED:
        return TokenPinError(f"the PIN of {where} has expired: set a new one")
    if exc.rv in (CKR_PIN_INVALID, CKR_PIN_LEN_RANGE):
        return TokenPinError(f"the token refused the PIN's format ({exc}) for {where}")
    return TokenPinError(f"logging in to {where} failed: {exc}")


# A token stays logged in while the engine holds its key, so C_Login cannot check a PIN
# a second time: a keyed digest of the PIN that opened it is kept (never the PIN), and a
# later load with another PIN is refused as the token would refuse it.
_PIN_KEY = secrets.token_bytes(32)
_pins: dict[tuple[str, str, str], bytes] = {}


def _remember_or_compare_pin(
    path: str, token: TokenInfo, pin: bytes, checked: bool, uri: Pkcs11Uri
) -> None:
    key = (path, token.serial, token.label)
    digest = hmac.new(_PIN_KEY, pin, hashlib.sha256).digest()
    if checked:
        _pins[key] = digest
        return
    known = _pins.get(key)
    if known is not None and not hmac.compare_digest(known, digest):
        raise TokenPinError(
            f"wrong PIN for {uri.token_text()}: it differs from the PIN this process opened "
            "the token with"
        )


def _inspect(
    module: Pkcs11Module, request: KeyRequest, uri: Pkcs11Uri
) -> tuple[TokenInfo, bytes | None]:
    """Check token, PIN, key and certificate directly; read the certificate if asked."""
    with module.initialized():
        try:
            tokens = module.tokens()
        except Pkcs11Error as exc:
            raise HardwareKeyError(f"{module.path} cannot list its tokens: {exc}") from None
        matching = [t for t in tokens if t.matches(uri)]
        if not matching:
            present = ", ".join(repr(t.label) for t in tokens) or "none"
            raise TokenNotFoundError(
                f"{uri.token_text()} is not present in {module.path} (tokens present: "
                f"{present}): insert the token, or correct the URI"
            )
        if len(matching) > 1:
            raise TokenNotFoundError(
                f"{len(matching)} tokens match {uri.redacted(query=False)}: add serial=... "
                "or token=... to the URI to name one"
            )
        token = matching[0]
        with module.session(token) as session:
            if token.login_required:
                if request.pin is None:
                    raise TokenPinError(
                        f"{uri.token_text()} needs a PIN to use its private key: pass pin=... "
                        "(or pin-source=file:... in the URI)"
                    )
                try:
                    checked = module.login(session, request.pin)
                except Pkcs11Error as exc:
                    raise _pin_error(uri, exc) from None
                _remember_or_compare_pin(module.path, token, request.pin, checked, uri)
            keys = module.find(session, CKO_PRIVATE_KEY, uri)
            if not keys:
                raise HardwareObjectNotFoundError(
                    f"no private key with {uri.object_text()} on {uri.token_text()}: check "
                    "object=... / id=... in the URI (pkcs11-tool --list-objects --login "
                    "shows what the token holds)"
                )
            if len(keys) > 1:
                raise HardwareObjectNotFoundError(
                    f"{len(keys)} private keys match {uri.object_text()} on "
                    f"{uri.token_text()}: add id=... or object=... to the URI to name one"
                )
            certificate = None
            if request.want_certificate:
                certs = module.find(session, CKO_CERTIFICATE, uri)
                if not certs:
                    raise HardwareObjectNotFoundError(
                        f"no certificate with {uri.object_text()} on {uri.token_text()}: "
                        "import the device certificate into the token with the same label "
                        "and id as the key, or pass certificate=..."
                    )
                certificate = module.value(session, certs[0])
    return token, certificate


def _engine_for(lib: Crypto, module_path: str) -> int:
    """The engine instance for a module: loaded, configured and initialised once."""
    with _lock:
        found = _engines.get(module_path)
        if found:
            return found
        lib.errors()
        engine = lib.ENGINE_by_id(ENGINE_ID.encode())
        if not engine:
            raise HardwareModuleError(
                f"OpenSSL's {ENGINE_ID!r} engine is not installed (apt-get install {_DEBIAN})"
            )
        ok = False
        try:
            # QUIET: libp11 would otherwise print its errors to stderr (a library stays quiet)
            lib.ENGINE_ctrl_cmd_string(engine, b"QUIET", None, 1)
            if lib.ENGINE_ctrl_cmd_string(engine, b"MODULE_PATH", os.fsencode(module_path), 0) != 1:
                raise HardwareModuleError(
                    f"the {ENGINE_ID} engine refused the module path {module_path}: "
                    + "; ".join(lib.errors())
                )
            if lib.ENGINE_init(engine) != 1:
                raise HardwareModuleError(
                    f"the {ENGINE_ID} engine could not start: " + "; ".join(lib.errors())
                )
            lib.errors()
            ok = True
        finally:
            # ENGINE_init took a functional reference (kept); drop the structural one
            lib.ENGINE_free(engine)
            if not ok:
                lib.errors()
        _engines[module_path] = engine
        return int(engine)


def load_key(request: KeyRequest) -> HardwareKey:
    """Load the PKCS#11 key a URI names (see the module docstring for the checks)."""
    lib = _bound()
    uri: Pkcs11Uri = request.locator
    path = find_module(uri, request.module)
    with module_lock:
        module = _open_module(path)
        _token, certificate = _inspect(module, request, uri)
        engine = _engine_for(lib, path)
        key_uri = uri.redacted(type="private", query=False)
        lib.errors()
        pin_set = False
        if request.pin is not None:
            if lib.ENGINE_ctrl_cmd_string(engine, b"PIN", request.pin, 0) != 1:
                lib.errors()
                raise HardwareKeyError(f"the {ENGINE_ID} engine did not accept a PIN")
            pin_set = True
        try:
            pkey = lib.ENGINE_load_private_key(engine, key_uri.encode(), lib.UI_null(), None)
            reasons = lib.errors()
        finally:
            if pin_set:  # the engine keeps no copy of the PIN beyond this load
                lib.ENGINE_ctrl_cmd_string(engine, b"PIN", b"", 0)
                lib.errors()
        if not pkey:
            text = "; ".join(reasons) or "ENGINE_load_private_key failed"
            if "PIN" in text:
                raise TokenPinError(
                    f"the {ENGINE_ID} engine could not log in to {uri.token_text()}: {text}"
                )
            raise HardwareKeyError(
                f"the {ENGINE_ID} engine could not load {key_uri} from {path}: {text}"
            )
        try:
            public = lib.public_der(pkey)
        except OSError as exc:
            lib.EVP_PKEY_free(pkey)
            raise HardwareKeyError(f"the key {key_uri} has no usable public half: {exc}") from None
    return HardwareKey(
        route="pkcs11 engine",
        description=uri.redacted(type="private"),
        pkey=int(pkey),
        public_der=public,
        free=lib.EVP_PKEY_free,
        certificate_der=certificate,
        diagnose=lambda key: _diagnose(key, path, uri),
        keepalive=(engine, module),
    )


def sign_test(key: HardwareKey) -> None:
    """Sign and verify a test message through the token.

    :raises HardwareSigningError: with OpenSSL's reasons when the token does not sign.
    """
    lib = _bound()
    with module_lock:
        try:
            lib.sign_and_verify(key.pkey, b"iothub-tls hardware key self-test")
        except OSError as exc:
            raise HardwareSigningError(
                None, f"the key {key.description} did not sign: {exc}"
            ) from None


def _diagnose(key: HardwareKey, path: str, uri: Pkcs11Uri) -> BaseException | None:
    """After a failed handshake: is the token still there, does the key still sign?"""
    try:
        sign_test(key)
        return None
    except HardwareSigningError as failed:
        signing = failed
    try:
        with module_lock:
            module = Pkcs11Module(path)
            with module.initialized():
                present = [t for t in module.tokens() if t.matches(uri)]
    except (OSError, HardwareKeyError):
        present = []
    if not present:
        return TokenRemovedError(
            None,
            f"{uri.token_text()} holding the device key ({key.description}) is no longer "
            f"present in {path}: reinsert the token (or restore it) and load the identity "
            "again with ClientIdentity.from_pkcs11(...)",
        )
    return signing
