"""A small, read-only PKCS#11 client (ctypes) for what OpenSSL's engine cannot say.

The engine signs; this module answers the questions before and after: does the module
load, which tokens are present, does the PIN open the token, is the key (and a
certificate) on it, and, after a failed handshake, is the token still there. It calls
only ``C_GetFunctionList``, ``C_Initialize``/``C_Finalize``, ``C_GetSlotList``,
``C_GetTokenInfo``, ``C_OpenSession``/``C_CloseSession``, ``C_Login``,
``C_FindObjects*`` and ``C_GetAttributeValue``: it creates, changes and exports nothing
(a private key's value is never asked for).

A PKCS#11 module is initialised once per process. When the module is already in use (the
engine loaded a key from it), ``C_Initialize`` answers CKR_CRYPTOKI_ALREADY_INITIALIZED:
this module then never calls ``C_Finalize`` (nor ``C_Logout``), which would end the
engine's sessions too.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .uri import Pkcs11Uri

__all__ = ["Pkcs11Error", "Pkcs11Module", "TokenInfo", "module_lock"]

CK_ULONG = ctypes.c_ulong
CK_RV = CK_ULONG
vp = ctypes.c_void_p

CKR_OK = 0x0
CKR_DEVICE_REMOVED = 0x32
CKR_PIN_INCORRECT = 0xA0
CKR_PIN_INVALID = 0xA1
CKR_PIN_LEN_RANGE = 0xA2
CKR_PIN_EXPIRED = 0xA3
CKR_PIN_LOCKED = 0xA4
CKR_TOKEN_NOT_PRESENT = 0xE0
CKR_TOKEN_NOT_RECOGNIZED = 0xE1
CKR_USER_ALREADY_LOGGED_IN = 0x100
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
CKR_SLOT_ID_INVALID = 0x3

CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4
CKF_OS_LOCKING_OK = 0x2
CKF_LOGIN_REQUIRED = 0x4
CKF_TOKEN_INITIALIZED = 0x400
CKU_USER = 1

CKA_CLASS = 0x0
CKA_LABEL = 0x3
CKA_VALUE = 0x11
CKA_ID = 0x102
CKO_CERTIFICATE = 1
CKO_PRIVATE_KEY = 3

_NAMES = {
    CKR_DEVICE_REMOVED: "CKR_DEVICE_REMOVED",
    CKR_PIN_INCORRECT: "CKR_PIN_INCORRECT",
    CKR_PIN_INVALID: "CKR_PIN_INVALID",
    CKR_PIN_LEN_RANGE: "CKR_PIN_LEN_RANGE",
    CKR_PIN_EXPIRED: "CKR_PIN_EXPIRED",
    CKR_PIN_LOCKED: "CKR_PIN_LOCKED",
    CKR_TOKEN_NOT_PRESENT: "CKR_TOKEN_NOT_PRESENT",
    CKR_TOKEN_NOT_RECOGNIZED: "CKR_TOKEN_NOT_RECOGNIZED",
    CKR_SLOT_ID_INVALID: "CKR_SLOT_ID_INVALID",
    0x5: "CKR_GENERAL_ERROR",
    0x6: "CKR_FUNCTION_FAILED",
    0x30: "CKR_DEVICE_ERROR",
    0x31: "CKR_DEVICE_MEMORY",
    0xB3: "CKR_SESSION_HANDLE_INVALID",
    0x82: "CKR_OBJECT_HANDLE_INVALID",
}

# One lock for everything that touches a PKCS#11 module or the engine in this process.
module_lock = threading.RLock()


class Pkcs11Error(OSError):
    """A PKCS#11 call failed; ``rv`` is the CKR_* code."""

    def __init__(self, function: str, rv: int) -> None:
        self.function = function
        self.rv = rv
        super().__init__(f"{function} failed: {_NAMES.get(rv, f'CKR {rv:#x}')}")


class CK_VERSION(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class CK_TOKEN_INFO(ctypes.Structure):
    _fields_ = [
        ("label", ctypes.c_char * 32),
        ("manufacturerID", ctypes.c_char * 32),
        ("model", ctypes.c_char * 16),
        ("serialNumber", ctypes.c_char * 16),
        ("flags", CK_ULONG),
        ("ulMaxSessionCount", CK_ULONG),
        ("ulSessionCount", CK_ULONG),
        ("ulMaxRwSessionCount", CK_ULONG),
        ("ulRwSessionCount", CK_ULONG),
        ("ulMaxPinLen", CK_ULONG),
        ("ulMinPinLen", CK_ULONG),
        ("ulTotalPublicMemory", CK_ULONG),
        ("ulFreePublicMemory", CK_ULONG),
        ("ulTotalPrivateMemory", CK_ULONG),
        ("ulFreePrivateMemory", CK_ULONG),
        ("hardwareVersion", CK_VERSION),
        ("firmwareVersion", CK_VERSION),
        ("utcTime", ctypes.c_char * 16),
    ]


class CK_ATTRIBUTE(ctypes.Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", vp), ("ulValueLen", CK_ULONG)]


class CK_C_INITIALIZE_ARGS(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", vp),
        ("DestroyMutex", vp),
        ("LockMutex", vp),
        ("UnlockMutex", vp),
        ("flags", CK_ULONG),
        ("pReserved", vp),
    ]


_F = ctypes.CFUNCTYPE
# CK_FUNCTION_LIST, in the order of pkcs11f.h, up to what is used here.
_FUNCTIONS: tuple[tuple[str, Any], ...] = (
    ("C_Initialize", _F(CK_RV, vp)),
    ("C_Finalize", _F(CK_RV, vp)),
    ("C_GetInfo", _F(CK_RV, vp)),
    ("C_GetFunctionList", _F(CK_RV, vp)),
    (
        "C_GetSlotList",
        _F(CK_RV, ctypes.c_ubyte, ctypes.POINTER(CK_ULONG), ctypes.POINTER(CK_ULONG)),
    ),
    ("C_GetSlotInfo", _F(CK_RV, CK_ULONG, vp)),
    ("C_GetTokenInfo", _F(CK_RV, CK_ULONG, ctypes.POINTER(CK_TOKEN_INFO))),
    ("C_GetMechanismList", _F(CK_RV, CK_ULONG, vp, vp)),
    ("C_GetMechanismInfo", _F(CK_RV, CK_ULONG, CK_ULONG, vp)),
    ("C_InitToken", _F(CK_RV, CK_ULONG, vp, CK_ULONG, vp)),
    ("C_InitPIN", _F(CK_RV, CK_ULONG, vp, CK_ULONG)),
    ("C_SetPIN", _F(CK_RV, CK_ULONG, vp, CK_ULONG, vp, CK_ULONG)),
    ("C_OpenSession", _F(CK_RV, CK_ULONG, CK_ULONG, vp, vp, ctypes.POINTER(CK_ULONG))),
    ("C_CloseSession", _F(CK_RV, CK_ULONG)),
    ("C_CloseAllSessions", _F(CK_RV, CK_ULONG)),
    ("C_GetSessionInfo", _F(CK_RV, CK_ULONG, vp)),
    ("C_GetOperationState", _F(CK_RV, CK_ULONG, vp, vp)),
    ("C_SetOperationState", _F(CK_RV, CK_ULONG, vp, CK_ULONG, CK_ULONG, CK_ULONG)),
    ("C_Login", _F(CK_RV, CK_ULONG, CK_ULONG, ctypes.c_char_p, CK_ULONG)),
    ("C_Logout", _F(CK_RV, CK_ULONG)),
    ("C_CreateObject", _F(CK_RV, CK_ULONG, vp, CK_ULONG, vp)),
    ("C_CopyObject", _F(CK_RV, CK_ULONG, CK_ULONG, vp, CK_ULONG, vp)),
    ("C_DestroyObject", _F(CK_RV, CK_ULONG, CK_ULONG)),
    ("C_GetObjectSize", _F(CK_RV, CK_ULONG, CK_ULONG, vp)),
    ("C_GetAttributeValue", _F(CK_RV, CK_ULONG, CK_ULONG, ctypes.POINTER(CK_ATTRIBUTE), CK_ULONG)),
    ("C_SetAttributeValue", _F(CK_RV, CK_ULONG, CK_ULONG, vp, CK_ULONG)),
    ("C_FindObjectsInit", _F(CK_RV, CK_ULONG, ctypes.POINTER(CK_ATTRIBUTE), CK_ULONG)),
    (
        "C_FindObjects",
        _F(CK_RV, CK_ULONG, ctypes.POINTER(CK_ULONG), CK_ULONG, ctypes.POINTER(CK_ULONG)),
    ),
    ("C_FindObjectsFinal", _F(CK_RV, CK_ULONG)),
)


class CK_FUNCTION_LIST(ctypes.Structure):
    _fields_ = [("version", CK_VERSION), *_FUNCTIONS]


def _text(field: bytes) -> str:
    return field.decode("utf-8", "replace").rstrip(" \x00")


@dataclass(frozen=True)
class TokenInfo:
    slot: int
    label: str
    manufacturer: str
    model: str
    serial: str
    login_required: bool

    def matches(self, uri: Pkcs11Uri) -> bool:
        return (
            (uri.token is None or uri.token == self.label)
            and (uri.manufacturer is None or uri.manufacturer == self.manufacturer)
            and (uri.model is None or uri.model == self.model)
            and (uri.serial is None or uri.serial == self.serial)
            and (uri.slot_id is None or uri.slot_id == self.slot)
        )


class Pkcs11Module:
    """A loaded PKCS#11 module (``dlopen``; refused if it has no ``C_GetFunctionList``)."""

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        self.path = path
        self._dll = ctypes.CDLL(path)  # OSError when it is not a loadable library
        try:
            get_list = self._dll.C_GetFunctionList
        except AttributeError:
            raise OSError(f"{path} is not a PKCS#11 module (no C_GetFunctionList)") from None
        get_list.restype = CK_RV
        get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(CK_FUNCTION_LIST))]
        table = ctypes.POINTER(CK_FUNCTION_LIST)()
        rv = get_list(ctypes.byref(table))
        if rv != CKR_OK or not table:
            raise Pkcs11Error("C_GetFunctionList", rv)
        self._f = table.contents
        if self._f.version.major != 2:
            raise OSError(
                f"{path} implements PKCS#11 {self._f.version.major}.{self._f.version.minor}; "
                "version 2.x is needed"
            )

    def _call(self, name: str, *args: Any) -> int:
        func = getattr(self._f, name)
        if not func:
            raise OSError(f"{self.path} does not implement {name}")
        return int(func(*args))

    def _check(self, name: str, *args: Any) -> None:
        rv = self._call(name, *args)
        if rv != CKR_OK:
            raise Pkcs11Error(name, rv)

    @contextmanager
    def initialized(self) -> Iterator[bool]:
        """Initialise the module for the block; yields True when this call did (and so
        finalises it after), False when it was already in use in this process."""
        with module_lock:
            args = CK_C_INITIALIZE_ARGS(flags=CKF_OS_LOCKING_OK)
            rv = self._call("C_Initialize", ctypes.byref(args))
            if rv not in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED):
                raise Pkcs11Error("C_Initialize", rv)
            owned = rv == CKR_OK
            try:
                yield owned
            finally:
                if owned:
                    self._call("C_Finalize", None)

    def tokens(self) -> list[TokenInfo]:
        """The tokens present now (call inside :meth:`initialized`)."""
        count = CK_ULONG(0)
        self._check("C_GetSlotList", 1, None, ctypes.byref(count))
        slots = (CK_ULONG * max(count.value, 1))()
        self._check("C_GetSlotList", 1, slots, ctypes.byref(count))
        found = []
        for slot in slots[: count.value]:
            info = CK_TOKEN_INFO()
            rv = self._call("C_GetTokenInfo", slot, ctypes.byref(info))
            if rv != CKR_OK:  # absent, removed or broken: not a token that can be used
                continue
            if not info.flags & CKF_TOKEN_INITIALIZED:
                continue
            found.append(
                TokenInfo(
                    int(slot),
                    _text(info.label),
                    _text(info.manufacturerID),
                    _text(info.model),
                    _text(info.serialNumber),
                    bool(info.flags & CKF_LOGIN_REQUIRED),
                )
            )
        return found

    @contextmanager
    def session(self, token: TokenInfo) -> Iterator[int]:
        handle = CK_ULONG(0)
        self._check(
            "C_OpenSession", token.slot, CKF_SERIAL_SESSION, None, None, ctypes.byref(handle)
        )
        try:
            yield int(handle.value)
        finally:
            self._call("C_CloseSession", handle.value)

    def login(self, session: int, pin: bytes) -> bool:
        """``C_Login`` as the user. Returns False when the token was already logged in
        (by the engine, in this process): the PIN was then not checked by the token."""
        rv = self._call("C_Login", session, CKU_USER, pin, len(pin))
        if rv not in (CKR_OK, CKR_USER_ALREADY_LOGGED_IN):
            raise Pkcs11Error("C_Login", rv)
        return rv == CKR_OK

    def find(self, session: int, cls: int, uri: Pkcs11Uri) -> list[int]:
        """Handles of objects of class ``cls`` matching the URI's label / id."""
        keep: list[Any] = []
        attrs: list[CK_ATTRIBUTE] = []

        def add(kind: int, value: bytes) -> None:
            buf = ctypes.create_string_buffer(value, len(value))
            keep.append(buf)
            attrs.append(CK_ATTRIBUTE(kind, ctypes.cast(buf, vp), len(value)))

        add(CKA_CLASS, bytes(CK_ULONG(cls)))
        if uri.object is not None:
            add(CKA_LABEL, uri.object.encode("utf-8"))
        if uri.id is not None:
            add(CKA_ID, uri.id)
        template = (CK_ATTRIBUTE * len(attrs))(*attrs)
        self._check("C_FindObjectsInit", session, template, len(attrs))
        try:
            handles = (CK_ULONG * 16)()
            count = CK_ULONG(0)
            self._check("C_FindObjects", session, handles, 16, ctypes.byref(count))
            return [int(h) for h in handles[: count.value]]
        finally:
            self._call("C_FindObjectsFinal", session)

    def value(self, session: int, handle: int, kind: int = CKA_VALUE) -> bytes:
        """An attribute of a public object (a certificate's DER)."""
        attr = CK_ATTRIBUTE(kind, None, 0)
        self._check("C_GetAttributeValue", session, handle, ctypes.byref(attr), 1)
        size = int(attr.ulValueLen)
        if size <= 0 or size > 1 << 20:
            raise OSError(f"unexpected attribute size {size}")
        buf = ctypes.create_string_buffer(size)
        attr = CK_ATTRIBUTE(kind, ctypes.cast(buf, vp), size)
        self._check("C_GetAttributeValue", session, handle, ctypes.byref(attr), 1)
        return buf.raw[: int(attr.ulValueLen)]
