"""``iothub-tls doctor``: arguments and rendering of :mod:`iothub_tls.diagnostics.doctor`."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from ..diagnostics.doctor import Check, Status, run_checks
from ._output import EXIT_NOT_COMPLIANT, EXIT_OK, error, print_json, table

if TYPE_CHECKING:
    from . import Subparsers

_HELP = """\
Check that this platform can connect to IoT Hub the way its TLS guidance asks:
Python and OpenSSL versions; TLS 1.2 and 1.3 and each of the 8 recommended cipher
suites (real in-memory handshakes); the OpenSSL features iothub-tls reaches through
its shim (max fragment length, ECDSA-only signature algorithms); reading the verified
chain; the shipped root certificates intact, present in the system store and still
in Mozilla's root list as certifi ships it (a root removed there is an early sign of
a root migration); a plausible clock; the versions of the transport libraries; and
whether device keys in a PKCS#11 token or a TPM 2.0 can be used (with --pkcs11-key,
whether that key signs).

Each line is ok, warning or fail, with a remedy for anything not ok.
Exit codes: 0 no failure (warnings allowed), 1 at least one failure.
"""


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "doctor",
        help="check whether this platform can comply with IoT Hub's TLS guidance",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument(
        "--pkcs11-key",
        metavar="URI",
        help="also check that this PKCS#11 key (RFC 7512 URI) loads and signs",
    )
    parser.add_argument(
        "--pkcs11-module", metavar="PATH", help="the token's PKCS#11 library (default: p11-kit)"
    )
    parser.add_argument(
        "--pin-env",
        metavar="VAR",
        help="read the token's PIN from this environment variable (never from the command line)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    pin = None
    if args.pin_env:
        pin = os.environ.get(args.pin_env)
        if pin is None:
            return error(
                "doctor", f"the environment variable {args.pin_env} (--pin-env) is not set"
            )
    checks = run_checks(pkcs11_key=args.pkcs11_key, pkcs11_module=args.pkcs11_module, pin=pin)
    failed = any(c.status is Status.FAIL for c in checks)
    if args.json:
        print_json(
            {
                "ok": not failed,
                "summary": {s.value: sum(c.status is s for c in checks) for s in Status},
                "checks": [c.as_dict() for c in checks],
            }
        )
    else:
        print(render(checks))
    return EXIT_NOT_COMPLIANT if failed else EXIT_OK


def render(checks: list[Check]) -> str:
    rows: list[tuple[str, str, str]] = []
    for c in checks:
        rows.append((c.status.value, c.name, c.detail))
        if c.remedy and c.status is not Status.OK:
            rows.append(("", "", f"-> {c.remedy}"))
    counts = {s: sum(c.status is s for c in checks) for s in Status}
    verdict = (
        "this platform cannot comply until the failures are fixed"
        if counts[Status.FAIL]
        else "this platform can comply"
    )
    summary = (
        f"{counts[Status.OK]} ok, {counts[Status.WARNING]} warning(s), "
        f"{counts[Status.FAIL]} failure(s): {verdict}"
    )
    return table(["STATUS", "CHECK", "DETAIL"], rows) + "\n\n" + summary
