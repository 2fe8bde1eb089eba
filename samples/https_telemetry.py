"""Send telemetry to Azure IoT Hub over HTTPS through the hardened TLS configuration,
then poll for a cloud-to-device message and complete it.

Against a real hub (pinned to the Azure roots, TLS 1.2+, IoT Hub's cipher suites)::

    export IOTHUB_DEVICE_CONNECTION_STRING='HostName=<hub>.azure-devices.net;DeviceId=...;...'
    python samples/https_telemetry.py
    python samples/https_telemetry.py --ecc-only            # ask for the hub's ECC certificate

An X.509 device (connection string ending in ``x509=true``)::

    python samples/https_telemetry.py --cert device.pem --key device.key

Against the local compliance endpoint (``iothub-tls serve --device thermostat-1``),
which prints the device's connection string and the root it is signed with::

    python samples/https_telemetry.py --root .iothub-tls-hub/pki/root.pem --port 443

Exit status: 0 sent (and settled any message), 1 the hub or the TLS policy refused.
"""

from __future__ import annotations

import argparse
import os
import sys

import iothub_tls as it
from iothub_tls.https import HttpsDeviceClient, HttpsOptions, Message


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
    parser.add_argument("--port", type=int, help="connect to this port instead of 443")
    parser.add_argument("--ecc-only", action="store_true", help="offer only ECDHE-ECDSA suites")
    parser.add_argument("--wait", type=float, default=10.0, help="seconds to poll for C2D")
    args = parser.parse_args(argv)
    if not args.connection_string:
        parser.error("give --connection-string or set IOTHUB_DEVICE_CONNECTION_STRING")

    policy = it.TlsPolicy(
        ciphers=it.CipherProfile.ECC_ONLY if args.ecc_only else it.CipherProfile.STRONG,
        roots=it.RootSet.from_pem_file(args.root) if args.root else it.AZURE_GLOBAL,
    )
    identity = it.ClientIdentity.from_files(args.cert, args.key) if args.cert else None
    client = HttpsDeviceClient.from_connection_string(
        args.connection_string,
        policy=policy,
        identity=identity,
        host=args.host,
        port=args.port,
        options=HttpsOptions(c2d_poll_interval=2),
    )
    try:
        with client:  # the TLS handshake happens here: a refusal explains itself
            print(f"connected: {client.tls_info}")
            for n in range(3):
                client.send_telemetry(
                    f'{{"reading": {n}, "temperature": {20.5 + n}}}',
                    properties={"sample": "https", "seq": str(n)},
                    message_id=f"sample-{n}",
                    content_type="application/json",
                    content_encoding="utf-8",
                )
            client.send_batch(
                [Message(f'{{"batched": {n}}}', {"seq": str(n)}) for n in range(3, 6)]
            )
            print("sent 3 messages and a batch of 3")
            try:
                message = client.receive_c2d(timeout=args.wait)
            except it.OperationTimeoutError:
                print(f"no cloud-to-device message within {args.wait:g} s")
            else:
                print(f"received {message.payload!r} properties={dict(message.properties)}")
                message.complete()
            print(f"last connection: {client.tls_info}")
    except (it.IoTHubTLSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
