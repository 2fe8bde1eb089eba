"""The one reader of PEM certificates (and the blocks around them) in the package.

Root sets, device identities, ``thumbprint`` and ``doctor`` all read certificates through
here, so a file that one of them accepts is accepted by the others, and every refusal
says the same thing: not PEM (or DER, with the command to convert it), no certificate
block, a corrupt certificate, a key or name that cannot be read. Each caller passes the
error class its own API documents (``RootStoreError``, ``IdentityError``, ...).
"""

from __future__ import annotations

import base64
import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509

# cryptography is imported by the functions that parse: finding PEM blocks (what the
# shipped roots need at import time) costs no certificate parser.

__all__ = [
    "certificate_ders",
    "check_path",
    "load_certificates",
    "not_pem_message",
    "pem_blocks",
    "read_limited",
]

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----\r?\n?",
    re.DOTALL,
)
CERTIFICATE_LABELS = ("CERTIFICATE", "X509 CERTIFICATE")


def as_bytes(data: object, what: str) -> bytes:
    """PEM text as bytes. Anything but str and bytes-like is a TypeError: ``bytes(n)``
    of an int would allocate n bytes, and a list is no PEM either."""
    if isinstance(data, str):
        return data.encode("utf-8", "replace")
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"{what} must be str or bytes, not {type(data).__name__}")


def pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """Every PEM block in ``data`` as (label, whole block including the armour)."""
    return [(m.group(1).decode("ascii"), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def certificate_ders(data: bytes) -> list[bytes]:
    """The DER of every certificate block in PEM ``data``, decoded but not parsed (the
    shipped roots are checked by fingerprint, which needs no certificate parser).
    A block that is not valid base64 raises ``ValueError``."""
    ders = []
    for label, block in pem_blocks(data):
        if label in CERTIFICATE_LABELS:
            body = b"".join(block.splitlines()[1:-1])
            ders.append(base64.b64decode(body, validate=True))
    return ders


def not_pem_message(data: bytes, where: str, kind: str) -> str:
    """Why ``data`` is not PEM, and how to convert DER."""
    if data[:1] == b"\x30":
        converter = (
            "openssl x509 -inform der" if kind == "certificate" else "openssl pkey -inform der"
        )
        return (
            f"{where} looks like DER (binary), not PEM: convert it with "
            f"'{converter} -in FILE -out FILE.pem'"
        )
    return f"{where} is not PEM data (no '-----BEGIN ...-----' line): expected a PEM {kind}"


def check_path(path: object, what: str) -> None:
    """``open()`` takes an int as a file descriptor (and closes it afterwards): a path
    must be str, bytes or os.PathLike."""
    if not isinstance(path, str | bytes | os.PathLike):
        raise TypeError(
            f"the {what} file must be a path (str or os.PathLike), not {type(path).__name__}"
        )


def read_limited(
    path: str | bytes | os.PathLike[str], what: str, limit: int, error: type[Exception]
) -> bytes:
    """The file's bytes, refused (``error``) when unreadable or larger than ``limit``
    (so /dev/zero or a FIFO is not read until memory runs out)."""
    check_path(path, what)
    shown = os.fsdecode(os.fspath(path))
    try:
        with open(path, "rb") as fh:
            data: bytes = fh.read(limit + 1)
    except OSError as exc:
        raise error(
            f"cannot read the {what} file {shown!r}: {exc.strerror or exc}; check the path "
            "and that this process may read it"
        ) from exc
    if len(data) > limit:
        size = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit >> 10} KiB"
        raise error(f"the {what} file {shown!r} is larger than {size}: it is not a PEM {what} file")
    return data


def check_readable(cert: x509.Certificate, label: str, error: type[Exception]) -> None:
    """cryptography parses a certificate's parts only when asked: ask now, so a broken
    key, name or extension is ``error`` here and not an UnsupportedAlgorithm later."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.x509.oid import NameOID

    what = "subject or issuer name"
    try:
        cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cert.issuer.rfc4514_string()
        what = "extensions"
        _ = cert.extensions
        what = "public key"
        cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise error(
            f"{label} has a {what} that cannot be read ({exc}): the algorithm is unknown or "
            "the certificate is corrupt; re-export or re-issue it (IoT Hub uses RSA 2048+ "
            "or EC P-256/P-384/P-521 keys)"
        ) from None


def load_certificates(data: bytes, where: str, error: type[Exception]) -> list[x509.Certificate]:
    """Every certificate in PEM ``data``, in order; ``error`` when there is none or one
    cannot be read."""
    from cryptography import x509

    blocks = pem_blocks(data)
    if not blocks:
        raise error(not_pem_message(data, where, "certificate"))
    cert_blocks = [block for label, block in blocks if label in CERTIFICATE_LABELS]
    if not cert_blocks:
        found = ", ".join(sorted({label for label, _ in blocks}))
        raise error(
            f"no certificate in {where} (found only: {found}): expected "
            "'-----BEGIN CERTIFICATE-----' blocks"
        )
    certs = []
    for number, block in enumerate(cert_blocks, start=1):
        label = f"certificate {number} in {where}"
        try:
            cert = x509.load_pem_x509_certificate(block)
        except ValueError as exc:
            raise error(f"{label} is corrupt and cannot be parsed ({exc})") from exc
        check_readable(cert, label, error)
        certs.append(cert)
    return certs
