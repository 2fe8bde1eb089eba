"""Private keys that never leave the hardware: PKCS#11 tokens (HSMs, secure elements,
smart cards, a TPM presented as a token) and TPM 2.0 keys, used by the OpenSSL behind
Python's :mod:`ssl`.

Two backends, one private interface. Each backend module exports the same three
functions, and :func:`backend` picks, once per kind of key, the first backend that works
here (as truststore picks its platform backend once):

``available(kind) -> (bool, reason)``
    whether this backend can load ``kind`` keys ("pkcs11" or "tpm2") on this machine.
``load_key(request) -> HardwareKey``
    load the key named by a :class:`KeyRequest`; raises the
    :class:`~iothub_tls.errors.HardwareKeyError` that says what is wrong.
``sign_test(key) -> None``
    make the hardware sign (and verify the signature with the public half).

* :mod:`.engine` — OpenSSL's ENGINE API with libp11's ``pkcs11`` engine (OpenSSL 1.1.1
  and 3.x; deprecated in 3.0 but present in every distribution build). PKCS#11 URIs.
* :mod:`.provider` — OpenSSL 3's provider and ``OSSL_STORE`` APIs with the ``tpm2``
  provider (tpm2-openssl). TSS2 key files and persistent handles.

A :class:`HardwareKey` owns one reference to an ``EVP_PKEY`` whose private half is in the
hardware; :meth:`OpenSSLShim.use_hardware_key` installs it into an ``SSL_CTX``. Engines
and providers, once loaded, stay loaded for the life of the process: OpenSSL keys made by
them call into their code, so unloading could never be proven safe.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ...errors import FeatureUnavailableError, HardwareModuleError

__all__ = ["BACKENDS", "HardwareKey", "KeyRequest", "backend", "backend_status"]

#: Kinds of key and the backends that may load them, in order of preference.
BACKENDS: dict[str, tuple[str, ...]] = {"pkcs11": ("engine",), "tpm2": ("provider",)}


@dataclass(frozen=True)
class KeyRequest:
    """What to load. ``locator`` is a PKCS#11 URI (kind "pkcs11") or a TSS2 key file path
    or ``handle:0x81......`` (kind "tpm2"). ``pin`` never appears in a repr."""

    kind: str
    locator: Any
    module: str | None = None
    pin: bytes | None = field(default=None, repr=False)
    want_certificate: bool = False


class HardwareKey:
    """An ``EVP_PKEY*`` backed by hardware, and what was learnt loading it.

    :ivar route: how it was loaded ("pkcs11 engine", "tpm2 provider").
    :ivar description: the key's name without any secret (a redacted URI or a path).
    :ivar public_der: the SubjectPublicKeyInfo of the key, DER.
    :ivar certificate_der: the certificate found next to the key (PKCS#11), or None.
    """

    def __init__(
        self,
        *,
        route: str,
        description: str,
        pkey: int,
        public_der: bytes,
        free: Callable[[int], None],
        certificate_der: bytes | None = None,
        diagnose: Callable[[HardwareKey], BaseException | None] | None = None,
        keepalive: tuple[Any, ...] = (),
    ) -> None:
        self.route = route
        self.description = description
        self._pkey = pkey
        self._free = free
        self.public_der = public_der
        self.certificate_der = certificate_der
        self._diagnose = diagnose
        self._keepalive = keepalive
        self._lock = threading.Lock()

    @property
    def pkey(self) -> int:
        if not self._pkey:
            raise ValueError("the hardware key was released")
        return self._pkey

    def diagnose(self) -> BaseException | None:
        """After a failed handshake: the error to raise when the hardware is the cause
        (the token was removed, the key no longer signs), or None when the key works."""
        if self._diagnose is None:
            return None
        return self._diagnose(self)

    def __repr__(self) -> str:
        return f"<HardwareKey {self.route} {self.description}>"

    def __del__(self) -> None:
        pkey, self._pkey = getattr(self, "_pkey", 0), 0
        if pkey:
            with contextlib.suppress(Exception):  # at interpreter shutdown ctypes may be gone
                self._free(pkey)


_lock = threading.Lock()
_chosen: dict[str, ModuleType | str] = {}


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def backend(kind: str) -> ModuleType:
    """The backend module for ``kind`` keys, chosen once.

    :raises FeatureUnavailableError: when OpenSSL itself cannot be reached (static
        ``_ssl``, LibreSSL, an unverified Python).
    :raises HardwareModuleError: when no backend is installed (the reasons of each).
    """
    with _lock:
        if kind not in _chosen:
            reasons = []
            for name in BACKENDS[kind]:
                module = _module(name)
                ok, reason = module.available(kind)
                if ok:
                    _chosen[kind] = module
                    break
                reasons.append(f"{name}: {reason}")
            else:
                _chosen[kind] = "; ".join(reasons)
        found = _chosen[kind]
    if isinstance(found, str):
        if found.startswith(tuple(f"{n}: {_UNREACHABLE}" for n in BACKENDS[kind])):
            raise FeatureUnavailableError(f"{kind} keys", found.split(_UNREACHABLE, 1)[1])
        raise HardwareModuleError(f"{kind} keys cannot be used here: {found}")
    return found


#: prefix of a reason meaning OpenSSL cannot be reached at all (FeatureUnavailableError)
_UNREACHABLE = "OpenSSL unreachable: "


def backend_status(kind: str) -> tuple[bool, str]:
    """(usable, which backend or why not) — for ``doctor``; never raises."""
    reasons = []
    for name in BACKENDS[kind]:
        ok, reason = _module(name).available(kind)
        if ok:
            return True, f"{name}: {reason}"
        reasons.append(f"{name}: {reason.removeprefix(_UNREACHABLE)}")
    return False, "; ".join(reasons)


def _reset() -> None:
    with _lock:
        _chosen.clear()
