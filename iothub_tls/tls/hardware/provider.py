"""The provider backend: TPM 2.0 keys through OpenSSL 3's ``tpm2`` provider (tpm2-openssl)
and ``OSSL_STORE``.

The provider is loaded into OpenSSL's default library context once (it connects to the
TPM named by ``TPM2OPENSSL_TCTI``, else the kernel's ``/dev/tpmrm0``) and stays loaded.
The key is loaded with ``OSSL_STORE_open_ex`` from a TSS2 key file or a persistent handle.

Why a bridge: in OpenSSL 3.0 a TLS handshake fetches its signature algorithm with the
``SSL_CTX``'s property query, which Python leaves empty, so it finds the *default*
provider's ECDSA and hands it a public-only copy of the TPM key ("missing private key").
Setting a process-wide ``?provider=tpm2`` preference instead would route every digest,
cipher and random number of the process through the TPM. So the TLS stack is given a
small "foreign" EC key whose sign operation (an ``EC_KEY_METHOD``) asks the TPM key to
sign with an explicit ``provider=tpm2`` query: only the device key's signatures go to
the TPM. EC keys (P-256, P-384) only; RSA keys in a TPM go through tpm2-pkcs11
(:meth:`ClientIdentity.from_tpm2` with a ``pkcs11:`` URI).
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

from ...errors import (
    FeatureUnavailableError,
    HardwareKeyError,
    HardwareModuleError,
    HardwareObjectNotFoundError,
    HardwareSigningError,
    TokenRemovedError,
)
from . import _UNREACHABLE, HardwareKey, KeyRequest
from ._crypto import Crypto, crypto

__all__ = ["PROVIDER_NAME", "available", "load_key", "sign_test"]

PROVIDER_NAME = "tpm2"
_DEBIAN = "tpm2-openssl"
_PROPQ = b"provider=tpm2"
_OSSL_STORE_INFO_PKEY = 4
_EVP_PKEY_EC = 408
_EVP_PKEY_RSA = 6
_OPENSSL_MODULES_DIR = 8  # OpenSSL_version(OPENSSL_MODULES_DIR), openssl/crypto.h

vp, c_int, c_char_p, c_size_t, c_uint = (
    ctypes.c_void_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_uint,
)

# int (*sign)(int type, const unsigned char *dgst, int dlen, unsigned char *sig,
#             unsigned int *siglen, const BIGNUM *kinv, const BIGNUM *r, EC_KEY *eckey)
_SIGN = ctypes.CFUNCTYPE(c_int, c_int, vp, c_int, vp, ctypes.POINTER(c_uint), vp, vp, vp)

_FUNCTIONS: tuple[tuple[str, Any, list[Any]], ...] = (
    ("OpenSSL_version", c_char_p, [c_int]),
    ("OSSL_PROVIDER_load", vp, [vp, c_char_p]),
    ("OSSL_PROVIDER_available", c_int, [vp, c_char_p]),
    ("OSSL_STORE_open_ex", vp, [c_char_p, vp, c_char_p, vp, vp, vp, vp, vp]),
    ("OSSL_STORE_expect", c_int, [vp, c_int]),
    ("OSSL_STORE_load", vp, [vp]),
    ("OSSL_STORE_eof", c_int, [vp]),
    ("OSSL_STORE_close", c_int, [vp]),
    ("OSSL_STORE_INFO_get_type", c_int, [vp]),
    ("OSSL_STORE_INFO_get1_PKEY", vp, [vp]),
    ("OSSL_STORE_INFO_free", None, [vp]),
    ("EVP_PKEY_get_base_id", c_int, [vp]),
    ("EVP_PKEY_CTX_new_from_pkey", vp, [vp, vp, c_char_p]),
    ("EVP_PKEY_CTX_free", None, [vp]),
    ("EVP_PKEY_sign_init", c_int, [vp]),
    ("EVP_PKEY_sign", c_int, [vp, vp, ctypes.POINTER(c_size_t), vp, c_size_t]),
    ("EVP_PKEY_new", vp, []),
    ("EVP_PKEY_set1_EC_KEY", c_int, [vp, vp]),
    ("EVP_PKEY_get1_EC_KEY", vp, [vp]),
    ("d2i_PUBKEY", vp, [vp, ctypes.POINTER(vp), ctypes.c_long]),
    ("EC_KEY_free", None, [vp]),
    ("EC_KEY_OpenSSL", vp, []),
    ("EC_KEY_METHOD_new", vp, [vp]),
    ("EC_KEY_METHOD_set_sign", None, [vp, vp, vp, vp]),
    ("EC_KEY_set_method", c_int, [vp, vp]),
    ("ECDSA_size", c_int, [vp]),
)

_lock = threading.Lock()
_sign_lock = threading.Lock()  # one TPM command at a time from this process
_state: dict[str, Any] = {}
# EC_KEY* of a bridge key -> EVP_PKEY* of the TPM key it signs with. Entries are removed
# when the HardwareKey is released; a bridge used after that fails to sign (no crash).
_bridged: dict[int, int] = {}


def _bound() -> Crypto:
    lib = crypto("TPM 2.0 keys (OpenSSL provider API)")
    missing = [n for n, r, a in _FUNCTIONS if not lib.bind(n, r, a)]
    if missing:
        raise FeatureUnavailableError(
            "TPM 2.0 keys through the tpm2 provider",
            "this OpenSSL has no provider API (OpenSSL 3.0 or later is needed; on 1.1.1 "
            "use the tpm2-pkcs11 route: ClientIdentity.from_tpm2('pkcs11:...'))",
        )
    return lib


def _modules_dir(lib: Crypto) -> str:
    env = os.environ.get("OPENSSL_MODULES")
    if env:
        return env
    text = (lib.OpenSSL_version(_OPENSSL_MODULES_DIR) or b"").decode("utf-8", "replace")
    # 'MODULESDIR: "/usr/lib/x86_64-linux-gnu/ossl-modules"'
    return text.partition('"')[2].rstrip('"') or text


def available(kind: str) -> tuple[bool, str]:
    """Whether the tpm2 provider is installed (without connecting to a TPM)."""
    if kind != "tpm2":
        return False, "the provider backend loads TPM 2.0 keys only"
    try:
        lib = _bound()
    except FeatureUnavailableError as exc:
        return False, _UNREACHABLE + exc.reason
    directory = _modules_dir(lib)
    path = os.path.join(directory, f"{PROVIDER_NAME}.so")
    if not os.path.isfile(path):
        return False, (
            f"OpenSSL's {PROVIDER_NAME!r} provider is not installed ({path} is missing; "
            f"apt-get install {_DEBIAN})"
        )
    return True, f"OpenSSL provider {PROVIDER_NAME!r} ({path})"


def _provider(lib: Crypto) -> int:
    """Load the tpm2 provider once (the default provider stays first for everything
    else: it is activated before, and nothing here changes the default properties)."""
    with _lock:
        if "provider" in _state:
            return int(_state["provider"])
        # TSS2 logs errors to stderr unless told otherwise; a library stays quiet.
        os.environ.setdefault("TSS2_LOG", "all+none")
        lib.errors()
        lib.OSSL_PROVIDER_available(None, b"default")  # activates the fallback provider
        prov = lib.OSSL_PROVIDER_load(None, PROVIDER_NAME.encode())
        reasons = lib.errors()
        if not prov:
            tcti = os.environ.get("TPM2OPENSSL_TCTI", "the default (/dev/tpmrm0, /dev/tpm0)")
            raise HardwareModuleError(
                f"OpenSSL's {PROVIDER_NAME!r} provider did not start: "
                f"{'; '.join(reasons) or 'OSSL_PROVIDER_load failed'}. It connects to the "
                f"TPM through TPM2OPENSSL_TCTI ({tcti}): check that the TPM (or its resource "
                f"manager) is reachable, and that {_DEBIAN} is installed"
            )
        _state["provider"] = prov
        method = lib.EC_KEY_METHOD_new(lib.EC_KEY_OpenSSL())
        if not method:
            raise MemoryError("EC_KEY_METHOD_new failed")
        lib.EC_KEY_METHOD_set_sign(method, ctypes.cast(_sign_callback, vp), None, None)
        _state["method"] = method  # like the provider: kept for the life of the process
        return int(prov)


def _store_load(lib: Crypto, locator: str) -> int:
    uri = locator if locator.startswith("handle:") else "file:" + locator
    lib.errors()
    # No property query: the default provider's "file" loader reads the PEM and the tpm2
    # provider's TSS2 decoder turns it into a TPM key; "handle:" is the tpm2 provider's.
    store = lib.OSSL_STORE_open_ex(uri.encode(), None, None, None, None, None, None, None)
    if not store:
        reasons = "; ".join(lib.errors()) or "OSSL_STORE_open_ex failed"
        raise HardwareObjectNotFoundError(f"the TPM key {locator} could not be opened: {reasons}")
    pkey = None
    try:
        lib.OSSL_STORE_expect(store, _OSSL_STORE_INFO_PKEY)
        for _ in range(16):  # a store yields few objects; never loop forever
            if lib.OSSL_STORE_eof(store):
                break
            info = lib.OSSL_STORE_load(store)
            if not info:
                break
            try:
                if lib.OSSL_STORE_INFO_get_type(info) == _OSSL_STORE_INFO_PKEY:
                    pkey = lib.OSSL_STORE_INFO_get1_PKEY(info)
            finally:
                lib.OSSL_STORE_INFO_free(info)
            if pkey:
                break
    finally:
        lib.OSSL_STORE_close(store)
    if not pkey:
        reasons = "; ".join(lib.errors()) or "no private key in it"
        raise HardwareObjectNotFoundError(
            f"the tpm2 provider could not load a key from {locator}: {reasons}. A TSS2 key "
            "file is made by 'openssl genpkey -provider tpm2 ...'; a handle must be persistent "
            "(tpm2_evictcontrol)"
        )
    return int(pkey)


def _bridge(lib: Crypto, tpm_key: int, public: bytes) -> tuple[int, int]:
    """A foreign EC key with the TPM key's public half whose signatures the TPM makes.
    Returns (EVP_PKEY*, EC_KEY*)."""
    buf = ctypes.create_string_buffer(public, len(public))
    cursor = vp(ctypes.addressof(buf))
    soft = lib.d2i_PUBKEY(None, ctypes.byref(cursor), len(public))
    if not soft:
        raise HardwareKeyError(
            "the TPM key's public half could not be decoded: " + "; ".join(lib.errors())
        )
    try:
        eckey = lib.EVP_PKEY_get1_EC_KEY(soft)
    finally:
        lib.EVP_PKEY_free(soft)
    if not eckey:
        raise HardwareKeyError("the TPM key is not an EC key: " + "; ".join(lib.errors()))
    try:
        if lib.EC_KEY_set_method(eckey, _state["method"]) != 1:
            raise HardwareKeyError("EC_KEY_set_method failed: " + "; ".join(lib.errors()))
        bridge = lib.EVP_PKEY_new()
        if not bridge:
            raise MemoryError("EVP_PKEY_new failed")
        if lib.EVP_PKEY_set1_EC_KEY(bridge, eckey) != 1:
            lib.EVP_PKEY_free(bridge)
            raise HardwareKeyError("EVP_PKEY_set1_EC_KEY failed: " + "; ".join(lib.errors()))
    finally:
        lib.EC_KEY_free(eckey)  # the EVP_PKEY holds its own reference
    with _lock:
        _bridged[int(eckey)] = tpm_key
    return int(bridge), int(eckey)


def _sign(
    kind: int,
    dgst: int | None,
    dlen: int,
    sig: int | None,
    siglen: Any,
    kinv: Any,
    r: Any,
    eckey: int | None,
) -> int:
    """ECDSA_sign for a bridge key: the TPM signs the digest. Never raises (a ctypes
    callback must not): a failure returns 0 and leaves OpenSSL's reasons queued."""
    try:
        lib = crypto("TPM 2.0 keys")
        tpm_key = _bridged.get(int(eckey or 0))
        if not tpm_key or not dgst or not sig or dlen <= 0:
            return 0
        with _sign_lock:
            ctx = lib.EVP_PKEY_CTX_new_from_pkey(None, tpm_key, _PROPQ)
            if not ctx:
                return 0
            try:
                if lib.EVP_PKEY_sign_init(ctx) != 1:
                    return 0
                size = c_size_t(0)
                if lib.EVP_PKEY_sign(ctx, None, ctypes.byref(size), dgst, dlen) != 1:
                    return 0
                room = lib.ECDSA_size(eckey)
                out = ctypes.create_string_buffer(max(size.value, 1))
                if lib.EVP_PKEY_sign(ctx, out, ctypes.byref(size), dgst, dlen) != 1:
                    return 0
                if room <= 0 or size.value > room:
                    return 0
                ctypes.memmove(sig, out, size.value)
                siglen[0] = size.value
                return 1
            finally:
                lib.EVP_PKEY_CTX_free(ctx)
    except BaseException:
        return 0


_sign_callback = _SIGN(_sign)  # kept referenced: OpenSSL holds its address


def load_key(request: KeyRequest) -> HardwareKey:
    """Load a TPM key (``request.locator``: a key file path or ``handle:0x81...``)."""
    lib = _bound()
    locator = str(request.locator)
    _provider(lib)
    tpm_key = _store_load(lib, locator)
    try:
        kind = lib.EVP_PKEY_get_base_id(tpm_key)
        if kind != _EVP_PKEY_EC:
            name = "RSA" if kind == _EVP_PKEY_RSA else f"type {kind}"
            raise HardwareKeyError(
                f"the TPM key {locator} is an {name} key: through the tpm2 provider only EC "
                "keys (P-256, P-384) can sign in TLS on OpenSSL 3.0; use an EC key, or the "
                "tpm2-pkcs11 route (ClientIdentity.from_tpm2('pkcs11:...'))"
            )
        public = lib.public_der(tpm_key)
        bridge, eckey = _bridge(lib, tpm_key, public)
    except BaseException:
        lib.EVP_PKEY_free(tpm_key)
        raise

    def release(pkey: int) -> None:
        with _lock:
            _bridged.pop(eckey, None)
        lib.EVP_PKEY_free(pkey)
        lib.EVP_PKEY_free(tpm_key)

    return HardwareKey(
        route="tpm2 provider",
        description=locator,
        pkey=bridge,
        public_der=public,
        free=release,
        diagnose=_diagnose,
        keepalive=(_state["provider"], _state["method"]),
    )


def sign_test(key: HardwareKey) -> None:
    """Sign and verify through the same path TLS uses (the bridge and the TPM)."""
    lib = _bound()
    try:
        lib.sign_and_verify(key.pkey, b"iothub-tls hardware key self-test")
    except OSError as exc:
        raise HardwareSigningError(
            None, f"the TPM key {key.description} did not sign: {exc}"
        ) from None


def _diagnose(key: HardwareKey) -> BaseException | None:
    try:
        sign_test(key)
        return None
    except HardwareSigningError as exc:
        text = str(exc)
        if any(word in text.lower() for word in ("connect", "tcti", "io error", "try again")):
            return TokenRemovedError(
                None,
                f"the TPM holding the device key ({key.description}) is no longer reachable "
                f"({text}): check the TPM or its resource manager, then load the identity again",
            )
        return exc
