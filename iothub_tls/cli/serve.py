"""``iothub-tls serve``: a local IoT Hub compliance endpoint."""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._output import EXIT_OK, error, print_json, table

if TYPE_CHECKING:
    from ..hub.hub import LocalHub
    from . import Subparsers

_HELP = """\
Run a local IoT Hub endpoint on your desk: MQTT (8883), AMQP (5671) and HTTPS (443)
front doors sharing one hub TLS profile, a device registry and a test PKI kept in a
state directory. Devices connect to it exactly as to IoT Hub (connection strings, SAS
tokens or X.509 certificates) while it enforces the hub's TLS policy and logs, per
connection, the TLS version and cipher suite the device used - one JSON line shaped
like IoT Hub's Connections diagnostic log - so you can see which devices would be
refused before IoT Hub refuses them.

Simulate a hub from before 2025-08-31 with --min-tls 1.0 and --legacy-ciphers.

Devices pin the hub's root: it is printed at start (and lives in STATE/pki/root.pem).
Stop with Ctrl-C; the connection statistics are printed then (and every
--stats-interval seconds with --stats). Handshakes made by 'iothub-tls probe' are
marked "probe": true in the log and counted apart, not as device failures.

The service side of IoT Hub is served too: its REST API (devices, twins, direct
methods, cloud-to-device) on the HTTPS door, and the cloud-to-device sender of the
service SDKs on the AMQP door, for the shared access policy iothubowner whose
connection string is printed at start. 'iothub-tls hub --state STATE ...' uses it.

A Device Provisioning Service door (--dps) registers devices enrolled with --enroll /
--enroll-group (or from Python: LocalHub.dps) and assigns them to this hub.

Exit codes: 0 stopped cleanly, 2 could not start (port taken, unusable state directory).
"""

_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


def _port(text: str) -> int | None:
    if text.lower() in ("off", "none", "-"):
        return None
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("a port is 0..65535 (0 = any free port, off = disabled)")
    return value


def _size(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="run a local IoT Hub endpoint that enforces and logs TLS per device",
        description=_HELP,
        epilog=(
            "examples:\n"
            "  iothub-tls serve --device thermostat-1 --device camera-2:x509\n"
            "  iothub-tls serve --min-tls 1.0 --legacy-ciphers --cert rsa   # a legacy hub\n"
            "  iothub-tls serve --mqtt-port 0 --amqp-port off --https-port 8443 --stats"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--state",
        type=Path,
        default=Path(".iothub-tls-hub"),
        help="state directory: PKI, device registry (default: %(default)s)",
    )
    parser.add_argument(
        "--hostname",
        default="localhost",
        help="the hub's host name in certificates, usernames and SAS tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--bind",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s, loopback only)",
    )
    parser.add_argument(
        "--mqtt-port",
        type=_port,
        default=8883,
        metavar="PORT",
        help="MQTT over TLS (default: %(default)s; 0 = any, off = disabled)",
    )
    parser.add_argument(
        "--amqp-port",
        type=_port,
        default=5671,
        metavar="PORT",
        help="AMQP 1.0 over TLS (default: %(default)s)",
    )
    parser.add_argument(
        "--https-port",
        type=_port,
        default=443,
        metavar="PORT",
        help="HTTPS device REST API (default: %(default)s)",
    )
    parser.add_argument(
        "--min-tls",
        choices=sorted(_VERSIONS),
        default="1.2",
        help="lowest TLS version accepted (default: 1.2, IoT Hub today; "
        "1.0 simulates a legacy hub)",
    )
    parser.add_argument(
        "--legacy-ciphers",
        action="store_true",
        help="also accept the 10 weak suites hubs accepted before 2025-08-31",
    )
    parser.add_argument(
        "--cert",
        choices=("rsa", "ecdsa", "dual"),
        default="dual",
        help="server certificate: RSA, ECDSA or both as IoT Hub serves (default: %(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive,
        default=1000,
        metavar="N",
        help="connections each door holds at once; beyond, a connection is closed before "
        "TLS and logged as refused (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="NAME[:x509]",
        help="register a device (SAS key, or ':x509' for a certificate from "
        "the hub's PKI) and print its connection string; repeatable",
    )
    dps = parser.add_argument_group(
        "Device Provisioning Service",
        "a DPS door (its MQTT and HTTPS device API on one port) that assigns devices to "
        "this hub; 'iothub-tls provision --state STATE' registers through it",
    )
    dps.add_argument("--dps", action="store_true", help="open the DPS door")
    dps.add_argument(
        "--dps-port",
        type=_port,
        default=8884,
        metavar="PORT",
        help="its port (default: %(default)s; the Azure SDKs dial 8883: give the door an "
        "address of its own with --dps-bind and --dps-hostname)",
    )
    dps.add_argument("--dps-bind", metavar="ADDR", help="its address (default: --bind)")
    dps.add_argument(
        "--dps-hostname", metavar="NAME", help="its host name in certificates (default: --hostname)"
    )
    dps.add_argument("--id-scope", metavar="SCOPE", help="its ID scope (default: kept in STATE)")
    dps.add_argument(
        "--enroll",
        action="append",
        default=[],
        metavar="ID[:x509]",
        help="an individual enrollment (symmetric key, or ':x509' for a certificate from "
        "the hub's PKI) whose credentials are printed; repeatable; implies --dps",
    )
    dps.add_argument(
        "--enroll-group",
        action="append",
        default=[],
        metavar="NAME[:x509]",
        help="an enrollment group (symmetric key, or ':x509' for devices whose "
        "certificates the hub's PKI issues); repeatable; implies --dps",
    )
    parser.add_argument(
        "--log",
        type=Path,
        metavar="FILE",
        help="append the connection log (JSON lines) to FILE instead of stdout",
    )
    parser.add_argument(
        "--log-max-bytes",
        type=_size,
        default=10 * 1024 * 1024,
        metavar="N",
        help="with --log: start a new file when FILE would grow past N bytes, keeping "
        "--log-backups older ones as FILE.1, FILE.2 ... (default: %(default)s; 0 = never)",
    )
    parser.add_argument(
        "--log-backups",
        type=_size,
        default=5,
        metavar="N",
        help="with --log: rotated files kept (default: %(default)s)",
    )
    parser.add_argument(
        "--stats",
        action="store_true",
        help="print successful connections by TLS version and cipher suite "
        "every --stats-interval seconds",
    )
    parser.add_argument("--stats-interval", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument(
        "--json", action="store_true", help="print the start-up summary and statistics as JSON"
    )
    return parser


def build_hub(args: argparse.Namespace, log_stream: Any) -> LocalHub:
    from ..hub.hub import HubOptions, LocalHub

    options = HubOptions(
        state_dir=args.state,
        hostname=args.hostname,
        bind=args.bind,
        mqtt_port=args.mqtt_port,
        amqp_port=args.amqp_port,
        https_port=args.https_port,
        min_version=_VERSIONS[args.min_tls],
        legacy_ciphers=args.legacy_ciphers,
        certificate=args.cert,
        max_connections=args.max_connections,
        **_dps_options(args),
    )
    return LocalHub(options, log_stream=log_stream)


def _dps_options(args: argparse.Namespace) -> dict[str, Any]:
    enabled = (
        getattr(args, "dps", False)
        or getattr(args, "enroll", None)
        or getattr(args, "enroll_group", None)
    )
    if not enabled:
        return {}
    return {
        "dps_port": args.dps_port,
        "dps_bind": args.dps_bind,
        "dps_hostname": args.dps_hostname,
        "id_scope": args.id_scope,
    }


def _enroll(hub: LocalHub, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The enrollments asked for with --enroll / --enroll-group, with their secrets."""
    from ..testing.pki import KeyType

    made = []
    for spec in args.enroll:
        name, _, kind = spec.partition(":")
        if kind.lower() == "x509":
            files = hub.pki.device_files(name)
            if not files.certificate.exists():
                hub.pki.add_device(name, key_type=KeyType.EC)
            hub.dps.add_individual_enrollment(name, certificate_pem=files.certificate.read_bytes())
            made.append(
                {"registrationId": name, "certificate": str(files.certificate),
                 "key": str(files.private_key)}
            )  # fmt: skip
        else:
            enrollment = hub.dps.add_individual_enrollment(name)
            made.append({"registrationId": name, "primaryKey": enrollment.primary_key})
    for spec in args.enroll_group:
        name, _, kind = spec.partition(":")
        if kind.lower() == "x509":
            ca = (
                hub.pki.intermediate_cert
                if hub.pki.intermediate_cert.exists()
                else hub.pki.root_cert
            )
            hub.dps.add_enrollment_group(name, ca_pem=ca.read_bytes())
            made.append({"groupId": name, "caCertificate": str(ca)})
        else:
            enrollment = hub.dps.add_enrollment_group(name)
            made.append({"groupId": name, "primaryKey": enrollment.primary_key})
    return made


def _fit_open_file_limit(doors: int, max_connections: int) -> str | None:
    """Raise this process's open-file limit so every door can hold ``max_connections``
    (one descriptor each, plus the process's own); a warning when the hard limit is
    lower."""
    import resource

    wanted = doors * max_connections + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return None
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        return (
            f"the open-file limit ({target}) is below what {doors} doors x "
            f"--max-connections {max_connections} need ({wanted}): a flood can exhaust it "
            "first; raise 'ulimit -Hn' or lower --max-connections"
        )
    return None


def _summary(hub: LocalHub, devices: list[dict[str, Any]]) -> dict[str, Any]:
    return {**hub.describe(), "devices": devices}


def _print_summary(summary: dict[str, Any]) -> None:
    out = sys.stderr  # stdout carries the connection log
    out.write(f"local IoT Hub '{summary['hostname']}': {summary['profileSummary']}\n")
    rows = [(p.upper(), f"{summary['bind']}:{port}") for p, port in summary["ports"].items()]
    rows += [(p.upper(), f"unavailable: {why}") for p, why in summary["unavailable"].items()]
    out.write(table(("PROTOCOL", "LISTENING"), rows) + "\n")
    out.write(f"each door holds at most {summary['maxConnections']} connections at once\n")
    out.write(f"devices pin this root: {summary['root']}\n")
    if "https" in summary["ports"]:
        out.write(f"service (iothubowner): {summary['service']['connectionString']}\n")
    if "dps" in summary:
        dps = summary["dps"]
        out.write(
            f"DPS: ID scope {dps['idScope']} at {dps['hostname']}:{dps['port']} "
            f"('iothub-tls provision --state STATE --registration-id ID ...')\n"
        )
        for entry in dps.get("enrolled", []):
            name = entry.get("registrationId") or f"group {entry['groupId']}"
            secret = (
                entry.get("primaryKey") or entry.get("certificate") or entry.get("caCertificate")
            )
            out.write(f"  enrollment {name}: {secret}\n")
    for device in summary["devices"]:
        out.write(f"device {device['deviceId']}: {device['connectionString']}\n")
        if device.get("certificate"):
            out.write(f"  certificate {device['certificate']}  key {device['key']}\n")
    out.write("connection log follows (one JSON line per connection); Ctrl-C stops\n")
    out.flush()


def _print_stats(hub: LocalHub, as_json: bool) -> None:
    stats = hub.log.stats()
    if as_json:
        print_json({"stats": stats})
        return
    rows = [("TLS version", k, v) for k, v in sorted(stats["byTlsVersion"].items())]
    rows += [("cipher suite", k, v) for k, v in sorted(stats["byCipherSuite"].items())]
    rows += [("failed", k, v) for k, v in sorted(stats["failedConnections"].items())]
    rows += [("probe", "handshakes", stats["probeHandshakes"])] if stats["probeHandshakes"] else []
    sys.stderr.write(
        f"successful connections: {stats['successfulConnections']}\n"
        + (table(("BY", "VALUE", "COUNT"), rows) + "\n" if rows else "")
    )
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    from ..hub.frontdoor import PortInUseError, PrivilegedPortError
    from ..hub.hub import StateDirectoryError
    from ..hub.log import RotatingLogFile

    log_file = None
    try:
        if args.log and args.log_max_bytes and not args.log_backups:
            return error(
                "serve", "--log-max-bytes needs --log-backups 1 or more", as_json=args.json
            )
        log_file = (
            RotatingLogFile(args.log, max_bytes=args.log_max_bytes, backups=args.log_backups)
            if args.log
            else None
        )
        hub = build_hub(args, log_file or sys.stdout)
        devices = []
        for spec in args.device:
            name, _, kind = spec.partition(":")
            creds = hub.add_device(name, x509=kind.lower() == "x509")
            devices.append(
                {
                    "deviceId": creds.device_id,
                    "connectionString": creds.connection_string,
                    **(
                        {"certificate": str(creds.certfile), "key": str(creds.keyfile)}
                        if creds.certfile
                        else {}
                    ),
                }
            )
        enrolled = _enroll(hub, args)
        doors = sum(1 for p in (args.mqtt_port, args.amqp_port, args.https_port) if p is not None)
        limit_warning = _fit_open_file_limit(doors, args.max_connections)
        hub.start()
    except PrivilegedPortError as exc:
        if log_file:
            log_file.close()
        flag = f"--{exc.protocol.lower()}-port"
        return error(
            "serve",
            f"{exc.strerror}; choose another port with {flag}, e.g. {flag} {exc.port + 8000}",
            as_json=args.json,
        )
    except (PortInUseError, StateDirectoryError, ValueError, OSError) as exc:
        if log_file:
            log_file.close()
        return error("serve", str(exc), as_json=args.json)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        summary = _summary(hub, devices)
        if "dps" in summary:
            summary["dps"]["enrolled"] = enrolled
        if limit_warning:
            sys.stderr.write(f"warning: {limit_warning}\n")
        if args.json:
            sys.stderr.write(json.dumps(summary, indent=2) + "\n")
        else:
            _print_summary(summary)
        while not stop.wait(args.stats_interval if args.stats else 3600):
            if args.stats:
                _print_stats(hub, args.json)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        hub.stop()
        _print_stats(hub, args.json)
        if log_file:
            log_file.close()
    return EXIT_OK
