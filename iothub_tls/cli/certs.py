"""``iothub-tls certs``: make a test PKI (root, intermediate, server and device
certificates) on disk. See docs/cli.md for the layout and how to use it with IoT Hub."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..testing.pki import (
    DEFAULT_CA_DAYS,
    DEFAULT_LEAF_DAYS,
    Issued,
    KeyType,
    PKIDirectory,
    WrittenFiles,
)
from ..tls.info import key_description
from ._output import EXIT_OK, error, print_json, table

if TYPE_CHECKING:
    from . import Subparsers

_HELP = """\
Create a test PKI in a directory, for labs and tests (never for production devices):

  DIR/root.pem, root.key                  root CA (trust it on devices, or upload it
                                          to IoT Hub to register CA-signed devices)
  DIR/intermediate.pem, intermediate.key  issuing CA, with --intermediate
  DIR/servers/NAME.pem, NAME.key          server certificate + intermediate
  DIR/devices/ID.pem, ID.key              device certificate (CN = device id)
                                          + intermediate

Certificates are PEM; private keys are unencrypted PKCS#8 PEM with mode 0600. Existing
files are never overwritten without --force. Leaves are issued by the intermediate when
there is one, else by the root.

Exit codes: 0 created, 2 nothing created (files exist, no PKI in DIR yet, bad name).
"""

_EPILOG = """\
examples:
  iothub-tls certs init lab-pki --intermediate
  iothub-tls certs server lab-pki localhost 127.0.0.1 --key ec
  iothub-tls certs device lab-pki thermostat-42
"""


def _key_type(text: str) -> KeyType:
    try:
        return KeyType(text.lower())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a key type: use rsa or ec") from None


def _days(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 36500:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days from 1 to 36500")
    return int(text)


def _common(parser: argparse.ArgumentParser, *, days: int, key_help: str) -> None:
    parser.add_argument("directory", metavar="DIR", help="directory of the test PKI")
    parser.add_argument(
        "--key",
        type=_key_type,
        default=KeyType.RSA,
        metavar="{rsa,ec}",
        help=f"{key_help}: rsa (2048 bits, default) or ec (ECDSA P-256)",
    )
    parser.add_argument(
        "--days",
        type=_days,
        default=days,
        metavar="N",
        help=f"validity in days from now (default {days})",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace existing certificates and keys"
    )
    parser.add_argument("--json", action="store_true", help="print what was created as JSON")


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "certs",
        help="create a test PKI: root, intermediate, server and device certificates",
        description=_HELP,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(title="actions", metavar="ACTION", dest="action", required=True)

    init = actions.add_parser(
        "init",
        help="create the root CA (and an intermediate CA)",
        description="Create DIR/root.pem and root.key (and with --intermediate, "
        "DIR/intermediate.pem and .key, an issuing CA signed by the root).",
    )
    _common(init, days=DEFAULT_CA_DAYS, key_help="CA key type")
    init.add_argument(
        "--intermediate",
        action="store_true",
        help="also create an intermediate CA that issues the leaves (as IoT Hub's own "
        "chains are root -> intermediate -> leaf)",
    )
    init.add_argument(
        "--root-name",
        default="iothub-tls Test Root CA",
        metavar="CN",
        help="subject CN of the root (default %(default)r)",
    )
    init.add_argument(
        "--intermediate-name",
        default="iothub-tls Test Issuing CA",
        metavar="CN",
        help="subject CN of the intermediate (default %(default)r)",
    )

    server = actions.add_parser(
        "server",
        help="issue a server certificate for host names / IP addresses",
        description="Issue DIR/servers/NAME.pem (certificate + intermediate) and NAME.key "
        "for the given DNS names and IP addresses (subjectAltName; the first is the CN "
        "and the file name).",
    )
    _common(server, days=DEFAULT_LEAF_DAYS, key_help="server key type")
    server.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        help="DNS name (a wildcard only as '*.' in front) or IP address",
    )

    device = actions.add_parser(
        "device",
        help="issue a device certificate with CN = device id",
        description="Issue DIR/devices/ID.pem (certificate + intermediate) and ID.key: a "
        "TLS client certificate whose subject CN is the IoT Hub device id, and print its "
        "thumbprints.",
    )
    _common(device, days=DEFAULT_LEAF_DAYS, key_help="device key type")
    device.add_argument(
        "device_id",
        metavar="DEVICE_ID",
        help="IoT Hub device id (1-128 ASCII letters, digits and "
        "- : . + %% _ # * ? ! ( ) , = @ ; $ ')",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    pki = PKIDirectory(args.directory)
    made: list[tuple[str, Issued, WrittenFiles]]
    try:
        if args.action == "init":
            created = pki.init(
                intermediate=args.intermediate,
                key_type=args.key,
                days=args.days,
                root_name=args.root_name,
                intermediate_name=args.intermediate_name,
                force=args.force,
            )
            kinds = ["root CA", "intermediate CA"]
            made = [(kinds[i], issued, files) for i, (issued, files) in enumerate(created)]
        elif args.action == "server":
            issued, files = pki.add_server(
                args.names, key_type=args.key, days=args.days, force=args.force
            )
            made = [("server", issued, files)]
        else:
            issued, files = pki.add_device(
                args.device_id, key_type=args.key, days=args.days, force=args.force
            )
            made = [("device", issued, files)]
    except (OSError, ValueError) as exc:
        return error(f"certs {args.action}", str(exc), as_json=args.json)

    entries = [_entry(kind, issued, files) for kind, issued, files in made]
    if args.json:
        print_json({"directory": str(pki.path), "created": entries})
        return EXIT_OK
    print(
        table(
            ["CREATED", "SUBJECT", "KEY", "EXPIRES", "CERTIFICATE", "PRIVATE KEY (0600)"],
            [
                (
                    e["kind"],
                    e["subject"],
                    e["key"],
                    e["not_after"],
                    e["certificate"],
                    e["private_key"],
                )
                for e in entries
            ],
        )
    )
    print()
    print(
        table(
            ["THUMBPRINTS", "SHA-1", "SHA-256"],
            [(e["subject"], e["sha1"], e["sha256"]) for e in entries],
        )
    )
    print()
    print(_next_steps(args, pki))
    return EXIT_OK


def _entry(kind: str, issued: Issued, files: WrittenFiles) -> dict[str, Any]:
    key_type, bits = key_description(issued.certificate)
    return {
        "kind": kind,
        "subject": issued.common_name,
        "key": f"{key_type}-{bits}",
        "not_after": issued.certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "certificate": str(files.certificate),
        "private_key": str(files.private_key),
        "sha1": issued.thumbprint_sha1,
        "sha256": issued.thumbprint_sha256,
    }


def _next_steps(args: argparse.Namespace, pki: PKIDirectory) -> str:
    d = pki.path
    if args.action == "init":
        return (
            f"Next: 'iothub-tls certs server {d} localhost' for a local endpoint, "
            f"'iothub-tls certs device {d} DEVICE_ID' for devices.\n"
            f"Devices trust {pki.root_cert} via TlsPolicy(roots=RootSet.from_pem_file(...)); "
            "to register CA-signed devices, upload it to IoT Hub (Certificates)."
        )
    if args.action == "server":
        return (
            f"Check it with: iothub-tls probe HOST:PORT --sni {args.names[0]} "
            f"--roots {pki.root_cert}"
        )
    files = pki.device_files(args.device_id)
    return (
        f"Register '{args.device_id}' in IoT Hub as X.509 CA signed (with {pki.root_cert} "
        "uploaded and verified) or X.509 self-signed with the thumbprint above; connect "
        f"with ClientIdentity.from_files({str(files.certificate)!r}, "
        f"{str(files.private_key)!r})."
    )
