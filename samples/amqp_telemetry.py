"""Send telemetry to Azure IoT Hub over AMQP 1.0 (port 5671) through the hardened TLS
configuration, then wait for cloud-to-device messages and settle them.

Against a real hub (pinned to the Azure roots, TLS 1.2+, IoT Hub's cipher suites)::

    pip install 'iothub-tls[amqp]'
    export IOTHUB_DEVICE_CONNECTION_STRING='HostName=<hub>.azure-devices.net;DeviceId=...;...'
    python samples/amqp_telemetry.py
    python samples/amqp_telemetry.py --ecc-only            # ask for the hub's ECC certificate

An X.509 device (connection string ending in ``x509=true``)::

    python samples/amqp_telemetry.py --cert device.pem --key device.key

Against the local compliance endpoint, which prints the device's connection string and
the root it is signed with::

    python samples/amqp_telemetry.py --root hub-root.pem --host 127.0.0.1 --port 5671

A message whose ``action`` property is ``reject`` is rejected (dead-lettered by the hub),
``retry`` is abandoned once (the hub delivers it again) and then completed, anything else
is completed.

Exit status: 0 sent (and settled what arrived), 1 the hub or the TLS policy refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import iothub_tls as it
from iothub_tls.amqp import AmqpDeviceClient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--connection-string",
        default=os.environ.get("IOTHUB_DEVICE_CONNECTION_STRING"),
        help="device connection string (default: $IOTHUB_DEVICE_CONNECTION_STRING)",
    )
    parser.add_argument("--cert", help="device certificate PEM (x509=true devices)")
    parser.add_argument("--key", help="device private key PEM")
    parser.add_argument("--root", help="pin this root (PEM) instead of the Azure roots")
    parser.add_argument("--host", help="connect to this address (TLS still checks the hub name)")
    parser.add_argument("--port", type=int, help="connect to this port instead of 5671")
    parser.add_argument("--ecc-only", action="store_true", help="offer only ECDHE-ECDSA suites")
    parser.add_argument("--count", type=int, default=3, help="telemetry messages to send")
    parser.add_argument("--wait", type=float, default=10.0, help="seconds to wait for C2D")
    parser.add_argument("--verbose", action="store_true", help="log reconnects and renewals")
    args = parser.parse_args(argv)
    if not args.connection_string:
        parser.error("give --connection-string or set IOTHUB_DEVICE_CONNECTION_STRING")
    if args.verbose:
        logging.basicConfig(level=logging.INFO)

    policy = it.TlsPolicy(
        ciphers=it.CipherProfile.ECC_ONLY if args.ecc_only else it.CipherProfile.STRONG,
        roots=it.RootSet.from_pem_file(args.root) if args.root else it.AZURE_GLOBAL,
    )
    identity = it.ClientIdentity.from_files(args.cert, args.key) if args.cert else None
    try:
        client = AmqpDeviceClient.from_connection_string(
            args.connection_string,
            policy=policy,
            identity=identity,
            host=args.host,
            port=args.port,
        )
        with client:  # TLS, SASL, $cbs put-token and link attach: a refusal explains itself
            print(f"connected: {client.tls_info}")
            for n in range(args.count):
                # returns once the hub's disposition (accepted) has arrived
                client.send_telemetry(
                    f'{{"reading": {n}, "temperature": {20.5 + n}}}',
                    properties={"sample": "amqp", "seq": str(n)},
                    content_type="application/json",
                    content_encoding="utf-8",
                )
            print(f"sent {args.count} messages, each accepted by the hub")
            retried: set[str | None] = set()
            while True:
                try:
                    message = client.receive_c2d(timeout=args.wait)
                except it.OperationTimeoutError:
                    print(f"no (more) cloud-to-device messages within {args.wait:g} s")
                    break
                action = message.properties.get("action")
                print(f"received {message.payload!r} properties={message.properties}")
                if action == "reject":
                    message.reject()
                elif action == "retry" and message.message_id not in retried:
                    retried.add(message.message_id)
                    message.abandon()
                else:
                    message.complete()
    except (it.IoTHubTLSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
