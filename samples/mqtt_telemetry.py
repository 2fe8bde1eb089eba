"""Send telemetry to Azure IoT Hub over MQTT through the hardened TLS configuration.

The device also answers the direct method ``echo``, prints desired-property updates and
cloud-to-device messages, and reports what TLS negotiated.

Symmetric key device::

    export IOTHUB_DEVICE_CONNECTION_STRING='HostName=myhub.azure-devices.net;DeviceId=dev1;...'
    python samples/mqtt_telemetry.py --count 5

X.509 device::

    python samples/mqtt_telemetry.py \\
        --connection-string 'HostName=myhub.azure-devices.net;DeviceId=dev1;x509=true' \\
        --cert dev1.pem --key dev1.key

Against the local hub (``iothub-tls serve``, which prints the device's connection string
and the root it is signed with)::

    python samples/mqtt_telemetry.py --root .iothub-tls-hub/pki/root.pem \
        --host 127.0.0.1 --port 8883 --connection-string "$(iothub-tls hub \
        --state .iothub-tls-hub connection-string thermostat-1)" --wait 60

The client is the shared device-client surface (docs/clients.md): replace
``iothub_tls.mqtt.MqttDeviceClient`` by ``iothub_tls.amqp.AmqpDeviceClient`` and drop
``websockets=`` to run it over AMQP.

Needs ``pip install 'iothub-tls[mqtt]'``. Exit status: 0 sent, 1 failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

ENV_CONNECTION_STRING = "IOTHUB_DEVICE_CONNECTION_STRING"
ENV_CERT = "IOTHUB_DEVICE_X509_CERT"
ENV_KEY = "IOTHUB_DEVICE_X509_KEY"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Send telemetry to Azure IoT Hub over MQTT (TLS 1.2+, IoT Hub's strong "
        "cipher suites, pinned roots).",
        epilog=f"The connection string may also come from ${ENV_CONNECTION_STRING}; the "
        f"X.509 certificate and key from ${ENV_CERT} and ${ENV_KEY}.",
    )
    parser.add_argument(
        "--connection-string",
        default=os.environ.get(ENV_CONNECTION_STRING),
        help="device connection string (HostName=...;DeviceId=...;SharedAccessKey=... or "
        "...;x509=true)",
    )
    parser.add_argument(
        "--cert", default=os.environ.get(ENV_CERT), help="X.509 device certificate (PEM)"
    )
    parser.add_argument("--key", default=os.environ.get(ENV_KEY), help="X.509 device key (PEM)")
    parser.add_argument("--count", type=int, default=3, help="messages to send (default 3)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between messages")
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        help="keep listening for methods / C2D this many seconds after sending",
    )
    parser.add_argument("--websockets", action="store_true", help="MQTT over WebSockets, port 443")
    parser.add_argument(
        "--ecc-only", action="store_true", help="offer only ECDHE-ECDSA suites and ECDSA signatures"
    )
    parser.add_argument(
        "--root",
        action="append",
        default=[],
        help="trust this root PEM file instead of the Azure roots (repeatable; "
        "for a private gateway or test hub)",
    )
    parser.add_argument(
        "--host", help="dial this address instead of the hub name (TLS still verifies the hub name)"
    )
    parser.add_argument("--port", type=int, help="default 8883, or 443 with --websockets")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the client's activity")
    args = parser.parse_args(argv)
    if not args.connection_string:
        parser.error(
            f"no connection string: pass --connection-string or set ${ENV_CONNECTION_STRING}"
        )
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    if args.count < 0:
        parser.error("--count must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )

    import iothub_tls as it
    from iothub_tls.mqtt import MqttDeviceClient

    try:
        roots = it.AZURE_GLOBAL
        if args.root:
            roots = it.RootSet.from_pem_file(args.root[0])
            for extra in args.root[1:]:
                roots = roots + it.RootSet.from_pem_file(extra)
        profile = it.CipherProfile.ECC_ONLY if args.ecc_only else it.CipherProfile.STRONG
        policy = it.TlsPolicy(roots=roots, ciphers=profile)
        identity = it.ClientIdentity.from_files(args.cert, args.key) if args.cert else None
        client = MqttDeviceClient.from_connection_string(
            args.connection_string,
            policy=policy,
            identity=identity,
            host=args.host,
            port=args.port,
            websockets=args.websockets,
        )
    except (it.IoTHubTLSError, ValueError) as exc:  # configuration errors explain themselves
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def echo(request: it.MethodRequest) -> tuple[int, Any]:
        print(f"method {request.name} called with {request.payload!r}")
        return 200, {"echo": request.payload}

    client.on_method("echo", echo)
    client.on_desired_update = lambda patch: print(f"desired properties: {json.dumps(patch)}")

    def on_c2d(message: it.C2DMessage) -> None:
        print(f"cloud-to-device message: {message.payload!r} properties={message.properties}")
        message.complete()  # over MQTT the hub completed it on arrival: this adds nothing

    client.on_c2d = on_c2d
    try:
        with client:
            print(f"connected to {client}: {client.tls_info}")
            for n in range(1, args.count + 1):
                body = json.dumps({"n": n, "time": time.time()})
                client.send_telemetry(
                    body,
                    {"sample": "mqtt_telemetry"},
                    content_type="application/json",
                    content_encoding="utf-8",
                    message_id=f"sample-{n}",
                )
                print(f"message {n} acknowledged by the hub")
                if n < args.count:
                    time.sleep(args.interval)
            if args.wait > 0:
                time.sleep(args.wait)
    except it.IoTHubTLSError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
