"""``iothub-tls demo``: the whole stack against a local hub, in one process."""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import ssl
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._output import EXIT_NOT_COMPLIANT, EXIT_OK, print_json, table

if TYPE_CHECKING:
    from ..device import DeviceClient
    from ..hub.hub import LocalHub
    from ..tls.info import TlsInfo
    from . import Subparsers

_HELP = """\
Start a local IoT Hub (the endpoint of 'iothub-tls serve') on free loopback ports with a
fresh test PKI, then, for each installed transport (MQTT, AMQP, HTTPS), connect a
device with the default policy pinned to the hub's root, send telemetry and receive a
cloud-to-device message. Reconnect to show TLS session resumption, connect an ECC-only
device, and show legacy clients (TLS 1.1, a weak cipher suite) being refused. Prints
what each connection negotiated next to the hub's connection log.

No network beyond loopback, no Azure account; finishes in seconds.
Exit codes: 0 every expected outcome happened, 1 something did not.
"""

_TIMEOUT = 10.0


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="run the stack against a local hub: devices connect, legacy clients are refused",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep the hub's state (PKI, registry) in DIR instead of a temporary directory",
    )
    return parser


@dataclass
class Outcome:
    """One step of the demo: what was expected and what happened."""

    step: str
    protocol: str
    expected: str
    ok: bool
    detail: str = ""
    info: dict[str, Any] | None = None


@dataclass
class Demo:
    hub: LocalHub
    outcomes: list[Outcome] = field(default_factory=list)

    def record(self, step: str, protocol: str, expected: str, action: Callable[[], Any]) -> Any:
        """Run one step; an exception is a failed outcome, never a crash of the demo."""
        try:
            result = action()
        except Exception as exc:
            self.outcomes.append(
                Outcome(step, protocol, expected, False, f"{type(exc).__name__}: {exc}")
            )
            return None
        info = getattr(result, "as_dict", None)
        self.outcomes.append(
            Outcome(step, protocol, expected, True, info=info() if callable(info) else None)
        )
        return result


# -- the device side --------------------------------------------------------------------------


def _client_class(protocol: str) -> type[DeviceClient]:
    if protocol == "mqtt":
        from ..mqtt.client import MqttDeviceClient

        return MqttDeviceClient
    if protocol == "amqp":
        from ..amqp.client import AmqpDeviceClient

        return AmqpDeviceClient
    from ..https.client import HttpsDeviceClient

    return HttpsDeviceClient


def _device_round_trip(
    demo: Demo,
    protocol: str,
    policy: Any,
    *,
    x509: bool = False,
    device_id: str | None = None,
    reconnect: bool = False,
) -> TlsInfo:
    """Connect, send telemetry, receive one C2D message; return the TLS report."""
    from ..auth import ClientIdentity

    hub = demo.hub
    creds = hub.add_device(device_id or f"demo-{protocol}", x509=x509)
    identity = (
        ClientIdentity.from_files(creds.certfile, creds.keyfile)
        if creds.certfile and creds.keyfile
        else None
    )
    client = _client_class(protocol).from_connection_string(
        creds.connection_string,
        policy=policy,
        identity=identity,
        host="127.0.0.1",
        port=hub.ports[protocol],
    )
    try:
        client.connect()
        if reconnect:  # a second connection with the same context resumes the session
            client.close()
            client.connect()
        marker = f"{protocol}-{time.monotonic_ns()}"
        client.send_telemetry(json.dumps({"demo": marker}).encode(), properties={"demo": "yes"})
        arrived = hub.state.wait_for_telemetry(lambda m: marker.encode() in m.payload, _TIMEOUT)
        if arrived is None:
            raise RuntimeError("the hub did not receive the telemetry")
        if arrived.properties.get("demo") != "yes":
            raise RuntimeError(f"telemetry properties lost: {arrived.properties}")
        hub.state.enqueue_c2d(creds.device_id, f"hello {protocol}".encode(), {"kind": "demo"})
        message = client.receive_c2d(timeout=_TIMEOUT)
        if message.payload != f"hello {protocol}".encode():
            raise RuntimeError(f"unexpected cloud-to-device message: {message!r}")
        message.complete()
        info = client.tls_info
        if info is None:
            raise RuntimeError("the client has no TLS report")
        return info
    finally:
        with contextlib.suppress(Exception):
            client.close()


# -- legacy clients ---------------------------------------------------------------------------


def _legacy_attempt(hub: LocalHub, protocol: str, *, version: ssl.TLSVersion, ciphers: str) -> str:
    """A pre-2025 client (TLS 1.1, or a weak suite) tries the hub; returns the refusal."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(hub.root_pem_path))
    with warnings.catch_warnings():  # a legacy client, on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
        ctx.maximum_version = version
    ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", hub.ports[protocol]), _TIMEOUT) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=hub.options.hostname) as tls:
                raise RuntimeError(f"the hub accepted {tls.version()} {tls.cipher()}")
        except ssl.SSLError as exc:
            return exc.reason or str(exc)


# -- the run ----------------------------------------------------------------------------------


def _installed(protocol: str) -> str | None:
    """None when the transport's library is importable, else the install hint."""
    module = {"mqtt": None, "amqp": "proton", "https": None}[protocol]
    if module is None:  # MQTT over TCP and HTTPS need nothing beyond the core
        return None
    try:
        __import__(module)
    except ImportError:
        return f"pip install 'iothub-tls[{protocol}]'"
    return None


def run_demo(state_dir: Path) -> tuple[Demo, list[dict[str, Any]]]:
    from ..hub.hub import HubOptions, LocalHub
    from ..policy import CipherProfile, TlsPolicy
    from ..roots import RootSet

    hub = LocalHub(HubOptions(state_dir, mqtt_port=0, amqp_port=0, https_port=0))
    demo = Demo(hub)
    with hub:
        roots = RootSet.from_pem_file(hub.root_pem_path)
        policy = TlsPolicy(roots=roots)
        for protocol in ("mqtt", "amqp", "https"):
            missing = _installed(protocol)
            if missing or protocol not in hub.ports:
                demo.outcomes.append(
                    Outcome(
                        "device round trip",
                        protocol.upper(),
                        "skipped",
                        True,
                        f"not installed: {missing or hub.unavailable.get(protocol)}",
                    )
                )
                continue
            demo.record(
                "telemetry + C2D, X.509" if protocol == "amqp" else "telemetry + C2D, SAS",
                protocol.upper(),
                "connected",
                partial(_device_round_trip, demo, protocol, policy, x509=protocol == "amqp"),
            )
        if "mqtt" in hub.ports and not _installed("mqtt"):
            demo.record(
                "reconnect (session resumed)", "MQTT", "connected", lambda: _resumed(demo, policy)
            )
            ecc = TlsPolicy(roots=roots, ciphers=CipherProfile.ECC_ONLY)
            demo.record("ECC-only device", "MQTT", "connected", lambda: _ecc(demo, ecc))
        for protocol in hub.ports:
            demo.record(
                "legacy client, TLS 1.1",
                protocol.upper(),
                "refused",
                partial(_refused_by, hub, protocol, ssl.TLSVersion.TLSv1_1, "ALL"),
            )
            demo.record(
                "legacy client, weak suite",
                protocol.upper(),
                "refused",
                partial(_refused_by, hub, protocol, ssl.TLSVersion.TLSv1_2, "AES128-SHA"),
            )
        time.sleep(0.2)  # let the hub's threads write their last log lines
        log = [e.to_json() for e in hub.log.events]
    return demo, log


@dataclass(frozen=True)
class _Refusal:
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"refused": self.reason}


def _refused_by(hub: LocalHub, protocol: str, version: ssl.TLSVersion, ciphers: str) -> _Refusal:
    return _Refusal(_legacy_attempt(hub, protocol, version=version, ciphers=ciphers))


def _resumed(demo: Demo, policy: Any) -> TlsInfo:
    info = _device_round_trip(demo, "mqtt", policy, device_id="demo-mqtt-resume", reconnect=True)
    if not info.session_reused:
        raise RuntimeError("the reconnect did not resume the TLS session")
    return info


def _ecc(demo: Demo, policy: Any) -> TlsInfo:
    info = _device_round_trip(demo, "mqtt", policy, device_id="demo-mqtt-ecc")
    if info.server_key_type != "EC":
        raise RuntimeError(f"ECC-only device got a {info.server_key_type} certificate")
    return info


def _render(demo: Demo, log: list[dict[str, Any]]) -> str:
    rows = []
    for o in demo.outcomes:
        info = o.info or {}
        if "refused" in info:
            negotiated = f"refused by the hub: {info['refused']}"
        elif info:
            negotiated = (
                f"{info['version']} {info['iana_cipher']}, {info['server_key_type']}-"
                f"{info['server_key_bits']}, anchor {info['anchor']}, "
                f"resumed {'yes' if info['session_reused'] else 'no'}"
            )
        else:
            negotiated = o.detail
        rows.append(("ok" if o.ok else "FAIL", o.protocol, o.step, negotiated))
    out = [table(("RESULT", "PROTOCOL", "STEP", "NEGOTIATED"), rows), "", "hub connection log:"]
    out += [json.dumps(r) for r in log]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        state = args.keep or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="iothub-tls-demo-"))
        )
        started = time.monotonic()
        demo, log = run_demo(state)
        elapsed = time.monotonic() - started
    failed = [o for o in demo.outcomes if not o.ok]
    if args.json:
        print_json(
            {
                "ok": not failed,
                "seconds": round(elapsed, 2),
                "outcomes": [o.__dict__ for o in demo.outcomes],
                "log": log,
                "stats": demo.hub.log.stats(),
            }
        )
    else:
        sys.stdout.write(_render(demo, log) + "\n\n")
        stats = demo.hub.log.stats()
        sys.stdout.write(
            f"hub statistics: {stats['successfulConnections']} successful connections "
            f"{stats['byTlsVersion']}, refused {stats['failedConnections']}\n"
            f"{len(demo.outcomes) - len(failed)}/{len(demo.outcomes)} expected outcomes "
            f"in {elapsed:.1f} s: {'OK' if not failed else 'FAILED'}\n"
        )
    return EXIT_OK if not failed else EXIT_NOT_COMPLIANT
