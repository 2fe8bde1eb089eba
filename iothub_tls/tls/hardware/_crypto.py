"""libcrypto, the half of OpenSSL that holds keys, engines and providers, bound once.

The library is the one Python's ``_ssl`` is linked against, found among the libraries
already loaded (``dladdr`` of a libcrypto symbol reached through ``_ssl``, then
``dlopen(RTLD_NOLOAD)``: nothing new is loaded), and used only when its
``OpenSSL_version_num()`` equals ``ssl.OPENSSL_VERSION_NUMBER``. Every function is bound
with its C signature before use; a missing symbol is a reason, never a crash.
"""

from __future__ import annotations

import ctypes
import os
import ssl
import threading
from typing import Any

from .._openssl import shim

__all__ = ["Crypto", "crypto", "crypto_status"]

vp, c_int, c_long, c_char_p, c_size_t = (
    ctypes.c_void_p,
    ctypes.c_int,
    ctypes.c_long,
    ctypes.c_char_p,
    ctypes.c_size_t,
)

# name, restype, argtypes: what every backend may use
_COMMON: tuple[tuple[str, Any, list[Any]], ...] = (
    ("OpenSSL_version_num", ctypes.c_ulong, []),
    ("ERR_get_error", ctypes.c_ulong, []),
    ("ERR_error_string_n", None, [ctypes.c_ulong, c_char_p, c_size_t]),
    ("ERR_clear_error", None, []),
    ("EVP_PKEY_free", None, [vp]),
    ("EVP_PKEY_up_ref", c_int, [vp]),
    ("i2d_PUBKEY", c_int, [vp, ctypes.POINTER(vp)]),
    ("X509_free", None, [vp]),
    ("i2d_X509", c_int, [vp, ctypes.POINTER(vp)]),
    ("EVP_MD_CTX_new", vp, []),
    ("EVP_MD_CTX_free", None, [vp]),
    ("EVP_DigestSignInit", c_int, [vp, ctypes.POINTER(vp), vp, vp, vp]),
    ("EVP_DigestSign", c_int, [vp, c_char_p, ctypes.POINTER(c_size_t), c_char_p, c_size_t]),
    ("EVP_DigestVerifyInit", c_int, [vp, ctypes.POINTER(vp), vp, vp, vp]),
    ("EVP_DigestVerify", c_int, [vp, c_char_p, c_size_t, c_char_p, c_size_t]),
    ("EVP_sha256", vp, []),
)


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", c_char_p),
        ("dli_fbase", vp),
        ("dli_sname", c_char_p),
        ("dli_saddr", vp),
    ]


def _libcrypto_path(ssl_lib: ctypes.CDLL) -> str | None:
    """The file of the libcrypto that ``_ssl`` resolved ``OpenSSL_version_num`` to."""
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except (AttributeError, OSError):
        return None
    dladdr.restype = c_int
    dladdr.argtypes = [vp, ctypes.POINTER(_DlInfo)]
    address = ctypes.cast(ssl_lib.OpenSSL_version_num, vp).value
    info = _DlInfo()
    if not address or not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


class Crypto:
    """Bound libcrypto functions. ``bind`` adds optional ones (engine, provider, store)."""

    def __init__(self) -> None:
        ssl_lib: ctypes.CDLL = shim("hardware keys (PKCS#11, TPM 2.0)").lib
        path = _libcrypto_path(ssl_lib)
        lib = ssl_lib
        if path is not None:
            mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LOCAL", 0)
            try:
                lib = ctypes.CDLL(path, mode=mode)  # already loaded: only a new handle
            except OSError:
                lib = ssl_lib
        self.lib = lib
        self.path = path or "(reached through the _ssl module)"
        self._lock = threading.Lock()
        self._f: dict[str, Any] = {}
        for name, restype, argtypes in _COMMON:
            if not self.bind(name, restype, argtypes):
                raise OSError(f"libcrypto has no {name}")
        seen = self._f["OpenSSL_version_num"]()
        if seen != ssl.OPENSSL_VERSION_NUMBER:
            raise OSError(
                f"the libcrypto found at {self.path} is version {seen:#x}, not the "
                f"{ssl.OPENSSL_VERSION_NUMBER:#x} Python's ssl module uses"
            )

    def bind(self, name: str, restype: Any, argtypes: list[Any]) -> bool:
        """Bind ``name``; False when this libcrypto does not export it."""
        with self._lock:
            if name in self._f:
                return True
            try:
                func = getattr(self.lib, name)
            except AttributeError:
                return False
            func.restype = restype
            func.argtypes = argtypes
            self._f[name] = func
            return True

    def has(self, name: str) -> bool:
        return name in self._f

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_f"][name]
        except KeyError:
            raise AttributeError(f"libcrypto function {name} is not bound") from None

    # -- helpers every backend needs ------------------------------------------------------

    def errors(self) -> list[str]:
        """Empty this thread's OpenSSL error queue, oldest first."""
        out: list[str] = []
        buf = ctypes.create_string_buffer(256)
        for _ in range(64):
            code = self.ERR_get_error()
            if not code:
                break
            self.ERR_error_string_n(code, buf, len(buf))
            out.append(buf.value.decode("ascii", "replace"))
        return out

    def public_der(self, pkey: int) -> bytes:
        """SubjectPublicKeyInfo DER of an ``EVP_PKEY*`` (only the public half exists here)."""
        size = self.i2d_PUBKEY(pkey, None)
        if size <= 0:
            raise OSError("; ".join(self.errors()) or "i2d_PUBKEY failed")
        buf = ctypes.create_string_buffer(size)
        cursor = vp(ctypes.addressof(buf))
        if self.i2d_PUBKEY(pkey, ctypes.byref(cursor)) != size:
            raise OSError("i2d_PUBKEY wrote an unexpected length")
        return buf.raw

    def x509_der(self, x509: int) -> bytes:
        size = self.i2d_X509(x509, None)
        if size <= 0:
            raise OSError("; ".join(self.errors()) or "i2d_X509 failed")
        buf = ctypes.create_string_buffer(size)
        cursor = vp(ctypes.addressof(buf))
        if self.i2d_X509(x509, ctypes.byref(cursor)) != size:
            raise OSError("i2d_X509 wrote an unexpected length")
        return buf.raw

    def sign_and_verify(self, pkey: int, message: bytes) -> bytes:
        """Sign ``message`` with SHA-256 through ``pkey`` (the hardware does the private
        operation), verify the signature with the same key's public half, return it.

        :raises OSError: with OpenSSL's reasons when signing or verifying fails.
        """
        self.errors()
        ctx = self.EVP_MD_CTX_new()
        if not ctx:
            raise MemoryError("EVP_MD_CTX_new failed")
        try:
            if self.EVP_DigestSignInit(ctx, None, self.EVP_sha256(), None, pkey) != 1:
                raise OSError("; ".join(self.errors()) or "EVP_DigestSignInit failed")
            size = c_size_t(0)
            if self.EVP_DigestSign(ctx, None, ctypes.byref(size), message, len(message)) != 1:
                raise OSError("; ".join(self.errors()) or "EVP_DigestSign (size) failed")
            sig = ctypes.create_string_buffer(max(size.value, 1))
            if self.EVP_DigestSign(ctx, sig, ctypes.byref(size), message, len(message)) != 1:
                raise OSError("; ".join(self.errors()) or "the key did not sign")
        finally:
            self.EVP_MD_CTX_free(ctx)
        signature = sig.raw[: size.value]
        ctx = self.EVP_MD_CTX_new()
        if not ctx:
            raise MemoryError("EVP_MD_CTX_new failed")
        try:
            if self.EVP_DigestVerifyInit(ctx, None, self.EVP_sha256(), None, pkey) != 1:
                raise OSError("; ".join(self.errors()) or "EVP_DigestVerifyInit failed")
            ok = self.EVP_DigestVerify(ctx, signature, len(signature), message, len(message))
            if ok != 1:
                raise OSError("; ".join(self.errors()) or "the signature did not verify")
        finally:
            self.EVP_MD_CTX_free(ctx)
        return signature


_lock = threading.Lock()
_state: dict[str, Crypto | str] = {}


def crypto(feature: str) -> Crypto:
    """The bound libcrypto, or :class:`FeatureUnavailableError` naming ``feature``."""
    from ...errors import FeatureUnavailableError

    shim(feature)  # the shim's verdict first (a static _ssl, LibreSSL, an unverified Python)
    with _lock:
        if "crypto" not in _state:
            try:
                _state["crypto"] = Crypto()
            except FeatureUnavailableError as exc:
                _state["crypto"] = exc.reason
            except OSError as exc:
                _state["crypto"] = str(exc)
        found = _state["crypto"]
    if isinstance(found, str):
        raise FeatureUnavailableError(feature, found)
    return found


def crypto_status() -> tuple[bool, str]:
    """(usable, where libcrypto is or why not) — for ``doctor``."""
    from ...errors import FeatureUnavailableError

    try:
        return True, crypto("hardware keys").path
    except FeatureUnavailableError as exc:
        return False, exc.reason
