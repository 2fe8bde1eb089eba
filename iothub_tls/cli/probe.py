"""``iothub-tls probe HOST[:PORT]``: does this endpoint comply, and what does it accept?"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..diagnostics.probe import (
    DEFAULT_PORT,
    FRAGMENT_LENGTHS,
    PROTOCOLS,
    ProbeResult,
    parse_target,
    probe,
)
from ..errors import IoTHubTLSError
from ..policy import CIPHER_SUITES
from ..roots import AZURE_GLOBAL, RootSet
from ._output import EXIT_NOT_COMPLIANT, EXIT_OK, error, print_json, table, yes_no

if TYPE_CHECKING:
    from . import Subparsers

_HELP = """\
Probe a TLS endpoint with one short handshake per question and report what it accepts:
the TLS versions 1.0 to 1.3, each of the 18 TLS 1.2 cipher suites of IoT Hub's guidance
(8 recommended, 10 weak) offered alone, the certificate chain against the roots, whether
an ECDSA certificate is served to an ECDSA-only client, which max fragment lengths
(512..4096) are honoured, and whether SNI is required.

The endpoint complies when it accepts no TLS below 1.2, no weak suite, at least one
recommended suite, and presents a chain that verifies against the roots for its name.

Exit codes: 0 compliant, 1 not compliant, 2 could not check (bad arguments, host
unreachable, no TLS answer within --timeout).
"""

_EPILOG = f"""\
examples:
  iothub-tls probe myhub.azure-devices.net            port {DEFAULT_PORT} by default
  iothub-tls probe myhub.azure-devices.net:8883 --json
  iothub-tls probe 127.0.0.1:8883 --sni localhost --roots lab-pki/root.pem
"""


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "probe",
        help="check whether a TLS endpoint complies and what it accepts",
        description=_HELP,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "target",
        metavar="HOST[:PORT]",
        help=f"host name or IP address, optionally with a port (default {DEFAULT_PORT}); "
        "IPv6 with a port as [ADDRESS]:PORT",
    )
    parser.add_argument(
        "--sni",
        metavar="NAME",
        help="server name to send in SNI and to check the certificate against "
        "(default: HOST; none for an IP address)",
    )
    parser.add_argument(
        "--roots",
        metavar="PEM",
        help="PEM file with the trust anchors to verify the chain against "
        "(default: the pinned Azure roots, DigiCert Global Root G2 and Microsoft RSA "
        "Root Certificate Authority 2017)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=5.0,
        help="seconds allowed for each connection and handshake (default 5)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 300:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 300 seconds")
    return value


def run(args: argparse.Namespace) -> int:
    try:
        host, port = parse_target(args.target)
    except ValueError as exc:
        return error("probe", str(exc), as_json=args.json)
    try:
        roots = RootSet.from_pem_file(args.roots) if args.roots else AZURE_GLOBAL
        result = probe(host, port, sni=args.sni, roots=roots, timeout=args.timeout)
    except (IoTHubTLSError, ValueError) as exc:
        return error("probe", str(exc), as_json=args.json)
    if args.json:
        print_json(result.as_dict())
    else:
        print(render(result, roots))
    return EXIT_OK if result.compliant else EXIT_NOT_COMPLIANT


def render(result: ProbeResult, roots: RootSet) -> str:
    """The human-readable report."""
    sni = f", SNI {result.sni}" if result.sni else ", no SNI"
    verdict = "COMPLIANT" if result.compliant else "NOT COMPLIANT"
    lines = [f"{result.host}:{result.port}{sni}: {verdict}", ""]
    lines.append(
        table(
            ["PROTOCOL", "ACCEPTED"],
            [(v, yes_no(result.protocols.get(v))) for v in PROTOCOLS],
        )
    )
    lines.append("")
    lines.append(
        table(
            ["TLS 1.2 CIPHER SUITE", "KIND", "ACCEPTED"],
            [
                (
                    s.iana,
                    "recommended" if s.strong else "weak",
                    yes_no(result.cipher_suites.get(s.iana)),
                )
                for s in CIPHER_SUITES
            ],
        )
    )
    cert = result.certificate
    key = f"{cert.leaf_key_type}-{cert.leaf_key_bits}" if cert.leaf_key_type else "-"
    verified = f"yes, anchored at {cert.anchor}" if cert.verified else f"no: {cert.error}"
    mfl = ", ".join(f"{n} {yes_no(result.max_fragment_length.get(n))}" for n in FRAGMENT_LENGTHS)
    lines.append("")
    lines.append(
        table(
            ["CERTIFICATE", "VALUE"],
            [
                ("leaf key", key),
                ("chain", " -> ".join(cert.chain) or "-"),
                ("expires", cert.not_after or "-"),
                (f"verified ({', '.join(roots.common_names)})", verified),
                ("ECDSA certificate for ECDSA-only clients", yes_no(result.ecdsa_certificate)),
                ("max fragment length honoured", mfl),
                ("SNI required", yes_no(result.sni_required)),
            ],
        )
    )
    lines.append("")
    if not result.findings:
        lines.append("No findings.")
    else:
        lines.append(
            table(
                ["SEVERITY", "FINDING", "DETAIL"],
                [(f.severity.value, f.code, f.message) for f in result.findings],
            )
        )
    return "\n".join(lines)
