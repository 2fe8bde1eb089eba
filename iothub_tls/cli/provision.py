"""``iothub-tls provision``: register a device with a Device Provisioning Service."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._output import EXIT_NOT_COMPLIANT, EXIT_OK, error, print_json

if TYPE_CHECKING:
    from . import Subparsers

_HELP = """\
Register a device with an Azure IoT Hub Device Provisioning Service (DPS) through the
library's hardened TLS, and print where the service assigned it: status, hub, device id,
substatus, etag, the payload the service returned, and (for a symmetric key) the
device's connection string for that hub.

Authenticate with the key of an individual enrollment (--key), the key of an enrollment
group (--group-key: the device key is derived from it and the registration id), or an
X.509 certificate and its private key (--cert, --cert-key; the certificate's subject CN
is the registration id). With --state, the local hub running on that state directory
('iothub-tls serve --dps') supplies the endpoint, port, ID scope and root.

Exit codes: 0 assigned, 1 checked and refused (credentials refused, registration failed
or disabled, an assigned hub outside --allowed-hub, a TLS refusal), 2 could not check
(usage error, unreachable endpoint, timeout, throttled until the timeout).
"""


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "provision",
        help="register a device with a Device Provisioning Service and print its hub",
        description=_HELP,
        epilog=(
            "examples:\n"
            "  iothub-tls provision --id-scope 0ne00012345 --registration-id sensor-7 \\\n"
            '      --group-key "$GROUP_KEY"\n'
            "  iothub-tls provision --state .iothub-tls-hub --registration-id cam-2 \\\n"
            "      --cert cam-2.pem --cert-key cam-2.key --transport https --json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--registration-id", required=True, metavar="ID")
    parser.add_argument("--id-scope", metavar="SCOPE", help="the service's ID scope")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--key", metavar="BASE64", help="an individual enrollment's key")
    auth.add_argument(
        "--group-key", metavar="BASE64", help="an enrollment group's key (derives the device key)"
    )
    auth.add_argument("--cert", type=Path, metavar="PEM", help="device certificate (X.509)")
    parser.add_argument("--cert-key", type=Path, metavar="PEM", help="the certificate's key")
    parser.add_argument(
        "--endpoint",
        metavar="HOST",
        help="the service's host name (default: global.azure-devices-provisioning.net)",
    )
    parser.add_argument("--port", type=int, metavar="PORT", help="default 8883 / 443")
    parser.add_argument(
        "--connect-host", metavar="ADDR", help="dial this address instead of the endpoint"
    )
    parser.add_argument("--transport", choices=("mqtt", "https"), default="mqtt")
    parser.add_argument(
        "--root",
        type=Path,
        action="append",
        default=[],
        metavar="PEM",
        help="pin this root (repeatable; default: IoT Hub's roots)",
    )
    parser.add_argument(
        "--allowed-hub",
        action="append",
        metavar="PATTERN",
        help="a hub name pattern the device may be assigned to (repeatable; e.g. "
        "'*.azure-devices.net'); an assignment elsewhere exits 1",
    )
    parser.add_argument("--payload", metavar="JSON", help="JSON data sent with the registration")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument(
        "--state", type=Path, metavar="DIR", help="use the local hub running on DIR"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Endpoint, port, scope, roots: from the arguments, else the local hub's hub.json."""
    found: dict[str, Any] = {}
    if args.state is not None:
        from ..hub.hub import read_endpoint

        hub = read_endpoint(args.state)
        dps = hub.get("dps")
        if not isinstance(dps, dict):
            raise ValueError(
                f"the hub running on {args.state} has no DPS door: start it with "
                f"'iothub-tls serve --state {args.state} --dps'"
            )
        found = {
            "endpoint": dps.get("hostname"),
            "port": dps.get("port"),
            "id_scope": dps.get("idScope"),
            "host": hub.get("address"),
            "roots": [Path(hub["root"])],
        }
    return {
        "endpoint": args.endpoint or found.get("endpoint"),
        "port": args.port or found.get("port"),
        "id_scope": args.id_scope or found.get("id_scope"),
        "host": args.connect_host or found.get("host"),
        "roots": args.root or found.get("roots") or [],
    }


def run(args: argparse.Namespace) -> int:
    import iothub_tls as it

    from ..dps import ProvisioningClient, derive_device_key
    from ..errors import (
        AuthenticationError,
        CertificateVerificationError,
        ClientError,
        HandshakeClosedError,
        IoTHubTLSError,
        PolicyViolation,
        ProvisioningError,
        ThrottledError,
        TLSHandshakeError,
    )

    as_json = args.json
    try:
        settings = _settings(args)
        if not settings["id_scope"]:
            raise ValueError("give the service's --id-scope (or --state of a local hub)")
        payload = json.loads(args.payload) if args.payload is not None else None
        options: dict[str, Any] = {"transport": args.transport}
        for name in ("endpoint", "port", "host"):
            if settings[name]:
                options[name] = settings[name]
        if settings["roots"]:
            roots = it.RootSet.from_pem_file(settings["roots"][0])
            for extra in settings["roots"][1:]:
                roots = roots + it.RootSet.from_pem_file(extra)
            options["policy"] = it.TlsPolicy(roots=roots)
        if args.allowed_hub:
            options["allowed_hubs"] = args.allowed_hub
        key: str | None = None
        if args.cert is not None:
            if args.cert_key is None:
                raise ValueError("--cert needs --cert-key (the certificate's private key)")
            identity = it.ClientIdentity.from_files(args.cert, args.cert_key)
            client = ProvisioningClient.from_x509(
                settings["id_scope"], args.registration_id, identity, **options
            )
        else:
            if args.group_key:
                key = derive_device_key(args.group_key, args.registration_id)
            else:
                key = args.key
            if not key:
                raise ValueError("give --key, --group-key or --cert with --cert-key")
            client = ProvisioningClient.from_symmetric_key(
                settings["id_scope"], args.registration_id, key, **options
            )
    except (ValueError, OSError) as exc:  # bad arguments, files, JSON (PolicyError too)
        return error("provision", str(exc), as_json=as_json)
    try:
        registration = client.register(payload, timeout=args.timeout)
        if registration.assigned_hub and args.allowed_hub:
            registration.device_client(args.transport)  # refuses a hub outside the patterns
    except (ThrottledError, HandshakeClosedError) as exc:  # could not check
        return error("provision", str(exc), as_json=as_json)
    except (
        AuthenticationError,
        ProvisioningError,
        CertificateVerificationError,
        PolicyViolation,
        TLSHandshakeError,
    ) as exc:
        return _refused(exc, getattr(exc, "registration", None), as_json)
    except (ClientError, IoTHubTLSError, OSError) as exc:  # unreachable, timed out
        return error("provision", str(exc), as_json=as_json)
    doc: dict[str, Any] = {
        "registration": registration.as_json(),
        "operationId": registration.operation_id,
    }
    if key is not None:
        doc["connectionString"] = (
            f"HostName={registration.assigned_hub};DeviceId={registration.device_id};"
            f"SharedAccessKey={key}"
        )
    if as_json:
        print_json(doc)
        return EXIT_OK
    state = doc["registration"]
    print(f"{args.registration_id}: {registration.status}")
    for label, name in (
        ("hub", "assignedHub"),
        ("device id", "deviceId"),
        ("substatus", "substatus"),
        ("etag", "etag"),
    ):
        if state.get(name) is not None:
            print(f"  {label:<10} {state[name]}")
    if registration.payload is not None:
        print(f"  {'payload':<10} {json.dumps(registration.payload)}")
    if "connectionString" in doc:
        print(f"  {'connect':<10} {doc['connectionString']}")
    return EXIT_OK


def _refused(exc: BaseException, registration: Any, as_json: bool) -> int:
    import sys

    if as_json:
        doc: dict[str, Any] = {"refused": str(exc), "error": type(exc).__name__}
        if registration is not None and hasattr(registration, "as_json"):
            doc["registration"] = registration.as_json()
        print_json(doc)
    sys.stderr.write(f"iothub-tls provision: refused: {exc}\n")
    return EXIT_NOT_COMPLIANT
