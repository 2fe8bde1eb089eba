"""``iothub-tls thumbprint CERT``: the thumbprints IoT Hub shows for a certificate."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cryptography import x509

from ..roots import common_name, pem
from ..testing.pki import thumbprints
from ._output import EXIT_OK, error, print_json, table

if TYPE_CHECKING:
    from . import Subparsers

_HELP = """\
Print the SHA-1 and SHA-256 thumbprints of a PEM certificate the way IoT Hub shows and
expects them: upper-case hexadecimal without colons. Register a self-signed device by
these thumbprints ("X.509 Self-Signed" authentication), or compare them with what the
portal shows for an uploaded CA certificate.

When the file holds a chain, the first certificate (the leaf) is the one IoT Hub
registers; the others are listed too.

Exit codes: 0 printed, 2 the file is missing or not a PEM certificate.
"""


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "thumbprint",
        help="print a certificate's SHA-1 / SHA-256 thumbprints as IoT Hub shows them",
        description=_HELP,
        epilog="example:\n  iothub-tls thumbprint lab-pki/devices/thermostat-42.pem",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("cert", metavar="CERT", help="PEM file holding the certificate")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def load_certificates(data: bytes, where: str) -> list[x509.Certificate]:
    """Every certificate in PEM ``data``; ValueError with a remedy when there is none or
    one is damaged."""
    return pem.load_certificates(data, where, ValueError)


def run(args: argparse.Namespace) -> int:
    try:
        with open(args.cert, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return error("thumbprint", f"cannot read {args.cert!r}: {exc.strerror}", as_json=args.json)
    try:
        certs = load_certificates(data, args.cert)
    except ValueError as exc:
        return error("thumbprint", str(exc), as_json=args.json)
    entries = []
    for cert in certs:
        sha1, sha256 = thumbprints(cert)
        entries.append({"subject": common_name(cert), "sha1": sha1, "sha256": sha256})
    if args.json:
        print_json({"file": args.cert, **entries[0], "chain": entries[1:]})
        return EXIT_OK
    first = entries[0]
    print(f"{args.cert}: {first['subject']}")
    print(f"SHA-1    {first['sha1']}")
    print(f"SHA-256  {first['sha256']}")
    if len(entries) > 1:
        print()
        print(
            table(
                ["ALSO IN THE FILE", "SHA-1", "SHA-256"],
                [(e["subject"], e["sha1"], e["sha256"]) for e in entries[1:]],
            )
        )
    return EXIT_OK
