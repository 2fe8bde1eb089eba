"""``iothub-tls audit``: which devices of a fleet IoT Hub's TLS policy refuses, from the
hub's connection logs."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ._output import EXIT_UNABLE, error

if TYPE_CHECKING:
    from . import Subparsers

_HELP = """\
Read IoT Hub connection logs and tell, device by device, which will be refused by a
hub that accepts only TLS 1.2+ and its strong cipher suites (IoT Hub since 2025-08-31),
or by an ECC-only hub (--ecc-only): the TLS versions and suites each device used, how
often and when last, and a verdict:

  will-be-refused  a logged connection used TLS 1.0/1.1 or a weak suite (the reason
                   says which)
  unknown          no TLS evidence: IoT Hub logs no TLS version for HTTPS, or the
                   export has no cipher suite for a TLS 1.2 connection
  compliant        every logged connection used what the policy accepts

Accepted inputs (any mix, gzip or not, detected by content; - reads standard input):
  - Log Analytics exports (CSV or JSON) of the query in IoT Hub's TLS guidance:
      AzureDiagnostics | where Category == "Connections"
      | where OperationName == "deviceConnect"
      | extend props_json = parse_json(properties_s)
      | project DeviceId = props_json.deviceId, TLSVersion = props_json.tlsVersion
    or of one projecting more (TimeGenerated, Protocol, CipherSuite = props_json.cipherSuite);
  - Azure Monitor resource logs archived to a storage account (JSON lines, or
    {"records": [...]} documents);
  - the local hub's connection log ('iothub-tls serve --log FILE').
Rows that cannot be read are counted and reported with their line numbers.

Exit codes: 0 every device complies, 1 some device will be refused (or has no TLS
evidence, unless --allow-unknown), 2 an input could not be read or is not a log.
"""

_EXAMPLES = """\
examples:
  iothub-tls audit connections.csv
  iothub-tls audit insights-logs-connections/*.json.gz --html tls-audit.html
  iothub-tls audit hub.log --ecc-only --csv > not-ecc-ready.csv
  az monitor log-analytics query -w WORKSPACE --analytics-query @query.kql | iothub-tls audit -
"""


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "audit",
        help="find the devices IoT Hub's TLS policy will refuse, from the hub's connection logs",
        description=_HELP,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="connection logs (- = stdin)")
    parser.add_argument(
        "--min-tls",
        choices=("1.2", "1.3"),
        default="1.2",
        help="lowest TLS version the hub accepts (default: %(default)s)",
    )
    parser.add_argument(
        "--ecc-only",
        action="store_true",
        help="judge against a hub offering only the four ECDHE-ECDSA suites",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the whole report as JSON")
    output.add_argument("--csv", action="store_true", help="print one CSV row per device")
    parser.add_argument(
        "--html",
        type=Path,
        metavar="REPORT.html",
        help="also write a self-contained HTML report (charts and the device table)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=100,
        metavar="N",
        help="devices shown in the terminal table, riskiest first (default: %(default)s; 0 = all)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=0,
        metavar="N",
        help="processes reading one large plain JSON lines or CSV file "
        "(default: 0 = one per CPU; 1 = this process only)",
    )
    parser.add_argument(
        "--allow-unknown",
        action="store_true",
        help="exit 0 when no device will be refused, even if some have no TLS evidence",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from ..audit import AuditInputError, AuditPolicy, audit
    from ..audit.render import to_csv, to_html, to_json, to_text

    jobs = args.jobs if args.jobs > 0 else min(os.cpu_count() or 1, 8)
    policy = AuditPolicy(min_tls=args.min_tls, ecc_only=args.ecc_only)
    try:
        report = audit(args.files, policy, jobs=jobs)
    except AuditInputError as exc:
        return error("audit", str(exc), as_json=args.json)
    code = report.exit_code(allow_unknown=args.allow_unknown)
    if args.html is not None:
        try:
            args.html.write_text(to_html(report), encoding="utf-8")
        except OSError as exc:
            why = f"cannot write {args.html}: {exc.strerror or exc}"
            return error("audit", why, as_json=args.json)
        if not (args.json or args.csv):
            sys.stderr.write(f"wrote {args.html}\n")
    if args.json:
        sys.stdout.write(to_json(report, exit_code=code))
    elif args.csv:
        sys.stdout.write(to_csv(report))
    else:
        sys.stdout.write(to_text(report, limit=args.limit))
    sys.stdout.flush()
    return code if code in (0, 1) else EXIT_UNABLE
