"""The one ctypes shim into the OpenSSL that Python's :mod:`ssl` is linked against.

Python's ``ssl`` cannot set the TLS max fragment length, restrict signature
algorithms, or (before 3.13) return the verified chain. This module reaches the
``SSL_CTX*`` / ``SSL*`` behind an ``ssl.SSLContext`` / ``ssl.SSLSocket`` and calls
libssl directly. It is careful because a wrong pointer would crash the interpreter:

* only CPython, only a ``_ssl`` extension module that is a shared library (``__file__``),
  and only when ``OpenSSL_version_num()`` seen through it equals
  ``ssl.OPENSSL_VERSION_NUMBER`` (the same libssl Python uses);
* every pointer read out of a Python object is validated before use:
  ``SSL_CTX_get_options(ctx) == context.options`` and ``SSL_get_SSL_CTX(ssl) == ctx``.

Where any of this fails, :func:`shim` raises :class:`FeatureUnavailableError` naming
the feature the caller asked for; nothing is skipped silently.
"""

from __future__ import annotations

import ctypes
import ssl
import sys
import threading
from typing import Any

from ..errors import FeatureUnavailableError

__all__ = ["OpenSSLShim", "options_restype", "shim", "shim_status"]

# SSL_ctrl / SSL_CTX_ctrl commands (openssl/ssl.h, stable across 1.1.1 and 3.x)
_SSL_CTRL_SET_SIGALGS_LIST = 98
_SSL_CTRL_SET_CLIENT_SIGALGS_LIST = 102
_SSL_CTRL_CHAIN_CERT = 89

# Python versions whose PySSLContext / PySSLSocket start with the OpenSSL pointer right
# after the object header (Modules/_ssl.c, 3.8 through 3.14).
_KNOWN_PYTHON = ((3, 8), (3, 14))


_LIBRESSL_REASON = (
    "LibreSSL is not supported for ECC-only mode or max_fragment_length: it is a separate "
    "implementation that reports the same OpenSSL version number (0x20000000) whatever its "
    "release and does not provide the OpenSSL 1.1.1 interfaces these features go through "
    "(RFC 6066 max_fragment_length, signature algorithm lists); use a CPython built with "
    "OpenSSL 1.1.1 or 3.x"
)


def options_restype(version_number: int, version_text: str) -> Any:
    """The ctypes type ``SSL_CTX_get_options`` returns in this libssl, or a string saying
    why the shim cannot be used with it. OpenSSL 3.x declares ``uint64_t``; 1.1.1 declares
    ``unsigned long``, which is 32 bits on ARMv7, i386 and 64-bit Windows: reading it as
    64 bits there takes a garbage upper half and fails the pointer check."""
    if version_text.startswith("LibreSSL"):
        return _LIBRESSL_REASON
    if version_number >= 0x30000000:
        return ctypes.c_uint64
    if version_number >= 0x10101000:
        return ctypes.c_ulong
    return f"{version_text} is too old: OpenSSL 1.1.1 or later is needed"


class OpenSSLShim:
    """Bound libssl functions plus pointer access with validation."""

    def __init__(self) -> None:
        if sys.implementation.name != "cpython":
            raise OSError(f"needs CPython, this is {sys.implementation.name}")
        if not (_KNOWN_PYTHON[0] <= sys.version_info[:2] <= _KNOWN_PYTHON[1]):
            raise OSError(
                f"the layout of _ssl objects in Python {sys.version_info[0]}."
                f"{sys.version_info[1]} has not been verified"
            )
        options_type = options_restype(ssl.OPENSSL_VERSION_NUMBER, ssl.OPENSSL_VERSION)
        if isinstance(options_type, str):
            raise OSError(options_type)
        import _ssl

        path = getattr(_ssl, "__file__", None)
        if not path:
            raise OSError("Python's _ssl module is built in (statically linked)")
        lib = ctypes.CDLL(path)
        try:
            version_num = lib.OpenSSL_version_num
        except AttributeError:
            raise OSError(
                "libssl symbols are not reachable through the _ssl module "
                "(OpenSSL older than 1.1.0, or not dynamically linked)"
            ) from None
        version_num.restype = ctypes.c_ulong
        version_num.argtypes = []
        seen = version_num()
        if seen != ssl.OPENSSL_VERSION_NUMBER:
            raise OSError(
                f"the libssl reached through ctypes ({seen:#x}) is not the one Python's ssl "
                f"module reports ({ssl.OPENSSL_VERSION_NUMBER:#x})"
            )
        vp, c_int, c_long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
        self._f = {
            name: self._bind(lib, name, restype, argtypes)
            for name, restype, argtypes in (
                ("SSL_CTX_get_options", options_type, [vp]),
                ("SSL_CTX_ctrl", c_long, [vp, c_int, c_long, vp]),
                ("SSL_CTX_set_tlsext_max_fragment_length", c_int, [vp, ctypes.c_uint8]),
                ("SSL_get_SSL_CTX", vp, [vp]),
                ("SSL_get_session", vp, [vp]),
                ("SSL_SESSION_get_max_fragment_length", ctypes.c_uint8, [vp]),
                (
                    "SSL_SESSION_get0_ticket",
                    None,
                    [vp, ctypes.POINTER(vp), ctypes.POINTER(ctypes.c_size_t)],
                ),
                ("SSL_get0_verified_chain", vp, [vp]),
                ("SSL_SESSION_has_ticket", c_int, [vp]),
                ("SSL_SESSION_is_resumable", c_int, [vp]),
                ("SSL_SESSION_dup", vp, [vp]),
                ("SSL_set_session", c_int, [vp, vp]),
                ("SSL_SESSION_free", None, [vp]),
                ("OPENSSL_sk_num", c_int, [vp]),
                ("OPENSSL_sk_value", vp, [vp, c_int]),
                ("i2d_X509", c_int, [vp, ctypes.POINTER(vp)]),
                # hardware keys: install a certificate chain and an EVP_PKEY
                ("d2i_X509", vp, [vp, ctypes.POINTER(vp), c_long]),
                ("X509_free", None, [vp]),
                ("SSL_CTX_use_certificate", c_int, [vp, vp]),
                ("SSL_CTX_use_PrivateKey", c_int, [vp, vp]),
                ("SSL_CTX_check_private_key", c_int, [vp]),
                ("ERR_get_error", ctypes.c_ulong, []),
                ("ERR_error_string_n", None, [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t]),
            )
        }
        self.lib = lib
        # The server's key without a certificate parser: names differ between OpenSSL
        # 3.x and 1.1.1, so these are optional (without them the caller parses).
        self._peer_key = self._optional_peer_key(lib)
        self._ctx_offset = object.__basicsize__
        self._ssl_offset = object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)
        self.version = ssl.OPENSSL_VERSION

    @classmethod
    def _optional_peer_key(cls, lib: ctypes.CDLL) -> tuple[Any, bool, Any, Any, Any] | None:
        """(get peer certificate, whether it returns a reference to free, X509_get0_pubkey,
        the key's base id, its bits), or None where this libssl has no such functions."""
        vp = ctypes.c_void_p
        try:
            try:  # OpenSSL 3.x
                cert = cls._bind(lib, "SSL_get0_peer_certificate", vp, [vp])
                owned = False
                base_id = cls._bind(lib, "EVP_PKEY_get_base_id", ctypes.c_int, [vp])
                bits = cls._bind(lib, "EVP_PKEY_get_bits", ctypes.c_int, [vp])
            except OSError:  # OpenSSL 1.1.1
                cert = cls._bind(lib, "SSL_get_peer_certificate", vp, [vp])
                owned = True
                base_id = cls._bind(lib, "EVP_PKEY_base_id", ctypes.c_int, [vp])
                bits = cls._bind(lib, "EVP_PKEY_bits", ctypes.c_int, [vp])
            pubkey = cls._bind(lib, "X509_get0_pubkey", vp, [vp])
        except OSError:
            return None
        return cert, owned, pubkey, base_id, bits

    @staticmethod
    def _bind(lib: ctypes.CDLL, name: str, restype: Any, argtypes: list[Any]) -> Any:
        try:
            func = getattr(lib, name)
        except AttributeError:
            raise OSError(f"libssl has no {name} (OpenSSL 1.1.1 or later is needed)") from None
        func.restype = restype
        func.argtypes = argtypes
        return func

    # -- pointers -----------------------------------------------------------------------

    def ctx_pointer(self, ctx: ssl.SSLContext) -> int:
        """``SSL_CTX*`` of a context, validated against its options. A context's
        ``SSL_CTX`` is the same for its whole life: the validated pointer is kept in the
        context's own ``__dict__`` (so it goes with the context) and later calls return
        it at once."""
        if not isinstance(ctx, ssl.SSLContext):
            raise TypeError("expected an ssl.SSLContext")
        state = getattr(ctx, "__dict__", None)
        if state is not None:
            known = state.get("_iothub_ssl_ctx")
            if known is not None:
                return int(known)
        ptr = ctypes.c_void_p.from_address(id(ctx) + self._ctx_offset).value
        # through ssl.SSLContext's own descriptor, not a subclass's override
        options = getattr(ssl.SSLContext, "options").__get__(ctx)  # noqa: B009
        if not ptr or self._f["SSL_CTX_get_options"](ptr) != int(options):
            raise OSError("the SSL_CTX pointer of the context could not be validated")
        if state is not None:
            state["_iothub_ssl_ctx"] = ptr
        return int(ptr)

    def ssl_pointer(self, sslobj: Any) -> int:
        """``SSL*`` of an SSLSocket / SSLObject, validated against its context."""
        inner = getattr(sslobj, "_sslobj", None)
        if inner is None or type(inner).__name__ != "_SSLSocket":
            raise OSError("the object has no live _ssl._SSLSocket (closed or not TLS)")
        ctx_ptr = self.ctx_pointer(inner.context)
        ptr = ctypes.c_void_p.from_address(id(inner) + self._ssl_offset).value
        if not ptr or self._f["SSL_get_SSL_CTX"](ptr) != ctx_ptr:
            raise OSError("the SSL pointer of the socket could not be validated")
        return int(ptr)

    # -- features -----------------------------------------------------------------------

    def set_max_fragment_length(self, ctx: ssl.SSLContext, code: int) -> None:
        """Ask for RFC 6066 max_fragment_length (code 1..4 = 512..4096 bytes)."""
        if not 1 <= code <= 4:
            raise ValueError("max_fragment_length code must be 1..4")
        if self._f["SSL_CTX_set_tlsext_max_fragment_length"](self.ctx_pointer(ctx), code) != 1:
            raise OSError("SSL_CTX_set_tlsext_max_fragment_length failed")

    def set_sigalgs(self, ctx: ssl.SSLContext, sigalgs: str, *, client: str | None = None) -> None:
        """Restrict the signature algorithms offered (and so the server certificate type
        in TLS 1.3). ``client`` sets the list used for the device's own CertificateVerify."""
        ptr = self.ctx_pointer(ctx)
        for cmd, value in (
            (_SSL_CTRL_SET_SIGALGS_LIST, sigalgs),
            (_SSL_CTRL_SET_CLIENT_SIGALGS_LIST, client),
        ):
            if value is None:
                continue
            buf = ctypes.create_string_buffer(value.encode("ascii"))
            if self._f["SSL_CTX_ctrl"](ptr, cmd, 0, ctypes.cast(buf, ctypes.c_void_p)) != 1:
                raise OSError(f"OpenSSL refused the signature algorithm list {value!r}")

    def session_ticket(self, sslobj: Any) -> bytes:
        """The session ticket the connection holds now (b"" if none): a new value means a
        TLS 1.3 NewSessionTicket arrived. Far cheaper than ``SSLSocket.session``, which
        serialises the whole session."""
        session = self._f["SSL_get_session"](self.ssl_pointer(sslobj))
        if not session:
            return b""
        tick = ctypes.c_void_p()
        length = ctypes.c_size_t()
        self._f["SSL_SESSION_get0_ticket"](session, ctypes.byref(tick), ctypes.byref(length))
        if not tick.value or not length.value:
            return b""
        return ctypes.string_at(tick.value, length.value)

    def session_copy(self, sslobj: Any, *, need_ticket: bool) -> int | None:
        """A private copy (``SSL_SESSION_dup``) of the connection's current session, an
        ``SSL_SESSION*`` the caller must hand to :meth:`free_session`; None when there is
        nothing to resume (``need_ticket``: only a session with a ticket counts, as in
        TLS 1.3). Python's ``SSLSocket.session`` copies the session too, through
        ``i2d``/``d2i_SSL_SESSION``, which parses the server's certificate again (and, on
        CPython 3.10-3.11, 3.12 before 3.12.7 and 3.13.0, leaks the copy: CPython
        gh-116810); ``SSL_SESSION_dup`` shares the parsed certificate by reference. The
        copy is never attached to a live connection, so what OpenSSL does to a session in
        use (a fatal alert marks it not resumable) cannot touch it."""
        session = self._f["SSL_get_session"](self.ssl_pointer(sslobj))
        if not session:
            return None
        usable = self._f["SSL_SESSION_has_ticket" if need_ticket else "SSL_SESSION_is_resumable"]
        if usable(session) != 1:
            return None
        copy = self._f["SSL_SESSION_dup"](session)
        if not copy:
            raise OSError("SSL_SESSION_dup failed")
        return int(copy)

    def offer_session(self, sslobj: Any, session: int) -> None:
        """Offer a copy of ``session`` (from :meth:`session_copy`, which stays the
        caller's) on a connection whose handshake has not started: ``SSL_SESSION_dup``,
        ``SSL_set_session`` (which takes its own reference), ``SSL_SESSION_free`` of the
        copy's first reference."""
        ssl_ptr = self.ssl_pointer(sslobj)
        copy = self._f["SSL_SESSION_dup"](session)
        if not copy:
            raise OSError("SSL_SESSION_dup failed")
        try:
            if self._f["SSL_set_session"](ssl_ptr, copy) != 1:
                raise OSError("SSL_set_session refused the remembered TLS session")
        finally:
            self._f["SSL_SESSION_free"](copy)

    def free_session(self, session: int) -> None:
        """Drop a reference taken by :meth:`session_copy`."""
        self._f["SSL_SESSION_free"](session)

    def openssl_errors(self) -> list[str]:
        """Empty this thread's OpenSSL error queue, oldest first, as OpenSSL's strings."""
        out: list[str] = []
        buf = ctypes.create_string_buffer(256)
        for _ in range(64):  # the queue holds at most 16; never loop forever
            code = self._f["ERR_get_error"]()
            if not code:
                break
            self._f["ERR_error_string_n"](code, buf, len(buf))
            out.append(buf.value.decode("ascii", "replace"))
        return out

    def use_hardware_key(self, ctx: ssl.SSLContext, chain_der: list[bytes], pkey: int) -> None:
        """Present ``chain_der`` (leaf first) and sign with ``pkey``, an ``EVP_PKEY*`` whose
        private half stays in a token or TPM. The context takes its own references to the
        certificates and the key (``SSL_CTX_use_*``, ``SSL_CTX_ctrl`` ADD0/ADD1 chain).

        :raises OSError: with OpenSSL's reasons when it refuses the certificate or key
            (``key values mismatch`` when the key does not belong to the leaf).
        """
        if not chain_der or not pkey:
            raise ValueError("a certificate and a key are needed")
        ptr = self.ctx_pointer(ctx)
        self.openssl_errors()  # start from an empty queue: the reasons below are ours
        certs = [self._x509(der) for der in chain_der]
        try:
            if self._f["SSL_CTX_use_certificate"](ptr, certs[0]) != 1:
                raise OSError("; ".join(self.openssl_errors()) or "SSL_CTX_use_certificate failed")
            for cert in certs[1:]:
                # SSL_CTRL_CHAIN_CERT (89), arg 1 = add1: the context takes its own reference
                if self._f["SSL_CTX_ctrl"](ptr, _SSL_CTRL_CHAIN_CERT, 1, cert) != 1:
                    raise OSError(
                        "; ".join(self.openssl_errors()) or "adding a chain certificate failed"
                    )
            if self._f["SSL_CTX_use_PrivateKey"](ptr, pkey) != 1:
                raise OSError("; ".join(self.openssl_errors()) or "SSL_CTX_use_PrivateKey failed")
            if self._f["SSL_CTX_check_private_key"](ptr) != 1:
                raise OSError("; ".join(self.openssl_errors()) or "key values mismatch")
        finally:
            for cert in certs:
                self._f["X509_free"](cert)

    def _x509(self, der: bytes) -> int:
        buf = ctypes.create_string_buffer(der, len(der))
        cursor = ctypes.c_void_p(ctypes.addressof(buf))
        cert = self._f["d2i_X509"](None, ctypes.byref(cursor), len(der))
        if not cert:
            self.openssl_errors()
            raise OSError("OpenSSL could not decode a certificate of the chain")
        return int(cert)

    def peer_key(self, sslobj: Any) -> tuple[int, int] | None:
        """(OpenSSL base id, bits) of the key in the server's certificate, read from
        the connection without parsing the certificate again; None when the connection
        has no peer certificate or this libssl lacks the functions."""
        if self._peer_key is None:
            return None
        get_cert, owned, get_pubkey, get_base_id, get_bits = self._peer_key
        cert = get_cert(self.ssl_pointer(sslobj))
        if not cert:
            return None
        try:
            key = get_pubkey(cert)
            if not key:
                return None
            return int(get_base_id(key)), int(get_bits(key))
        finally:
            if owned:
                self._f["X509_free"](cert)

    def negotiated_max_fragment_length(self, sslobj: Any) -> int | None:
        """Fragment length the server agreed to, in bytes, or None."""
        session = self._f["SSL_get_session"](self.ssl_pointer(sslobj))
        if not session:
            return None
        code = int(self._f["SSL_SESSION_get_max_fragment_length"](session))
        return 256 << code if 1 <= code <= 4 else None

    def verified_chain(self, sslobj: Any) -> list[bytes]:
        """DER of the chain OpenSSL verified, leaf first, anchor last ([] if none)."""
        stack = self._f["SSL_get0_verified_chain"](self.ssl_pointer(sslobj))
        if not stack:
            return []
        out = []
        for i in range(self._f["OPENSSL_sk_num"](stack)):
            x509 = self._f["OPENSSL_sk_value"](stack, i)
            size = self._f["i2d_X509"](x509, None)
            if size <= 0:
                raise OSError("i2d_X509 failed")
            buf = ctypes.create_string_buffer(size)
            cursor = ctypes.c_void_p(ctypes.addressof(buf))
            if self._f["i2d_X509"](x509, ctypes.byref(cursor)) != size:
                raise OSError("i2d_X509 wrote an unexpected length")
            out.append(buf.raw)
        return out


_lock = threading.Lock()
_state: dict[str, Any] = {}


def _load() -> OpenSSLShim | str:
    with _lock:
        if "shim" not in _state:
            try:
                candidate = OpenSSLShim()
                # End-to-end self test on a throwaway context before anyone relies on it.
                candidate.ctx_pointer(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
                loaded: OpenSSLShim | str = candidate
            except (OSError, ImportError) as exc:
                loaded = str(exc)
            _state["shim"] = loaded
        result: OpenSSLShim | str = _state["shim"]
        return result


def shim(feature: str) -> OpenSSLShim:
    """The shim, or :class:`FeatureUnavailableError` naming ``feature``."""
    loaded = _load()
    if isinstance(loaded, str):
        raise FeatureUnavailableError(feature, loaded)
    return loaded


def shim_status() -> tuple[bool, str]:
    """(usable, OpenSSL version or the reason it is not) — for ``doctor``."""
    loaded = _load()
    if isinstance(loaded, str):
        return False, loaded
    return True, loaded.version


def _disable_for_tests(reason: str) -> None:
    """Simulate a platform where the shim cannot work (used by tests and ``doctor``)."""
    with _lock:
        _state["shim"] = reason


def _reset() -> None:
    with _lock:
        _state.clear()
