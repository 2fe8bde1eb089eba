"""An existing azure-iot-device application, given IoT Hub's TLS policy with one line.

This is the SDK's classic "send a few messages" device. The only change to it is the
line marked ``ONE LINE``::

    # before
    client = IoTHubDeviceClient.create_from_connection_string(conn_str)
    # after: TLS 1.3 when the hub offers it, pinned roots, strong suites, ECC-only,
    # fragment length, post-handshake checks, a TLS report
    client = harden(IoTHubDeviceClient.create_from_connection_string(conn_str), policy)

``--route kwargs`` shows the other route, the SDK's own options (TLS 1.2 only)::

    client = IoTHubDeviceClient.create_from_connection_string(conn_str, **client_kwargs(policy))

Run it::

    export IOTHUB_DEVICE_CONNECTION_STRING='HostName=myhub.azure-devices.net;DeviceId=dev1;...'
    python samples/azure_sdk_harden.py
    python samples/azure_sdk_harden.py --ecc-only --max-fragment-length 1024
    python samples/azure_sdk_harden.py --route kwargs
    python samples/azure_sdk_harden.py --roots private-root.pem   # another trust anchor

Needs ``pip install 'iothub-tls[azure]'`` in an environment of its own (azure-iot-device
2.x pins paho-mqtt < 2). Exit status: 0 sent, 1 failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import iothub_tls as it

ENV_CONNECTION_STRING = "IOTHUB_DEVICE_CONNECTION_STRING"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Send telemetry with Microsoft's azure-iot-device SDK under IoT Hub's "
        "TLS policy.",
        epilog=f"The connection string may also come from ${ENV_CONNECTION_STRING}.",
    )
    parser.add_argument(
        "--connection-string",
        default=os.environ.get(ENV_CONNECTION_STRING),
        help="device connection string (HostName=...;DeviceId=...;SharedAccessKey=...)",
    )
    parser.add_argument(
        "--route",
        choices=("harden", "kwargs"),
        default="harden",
        help="harden: the full policy inside the SDK (default); kwargs: the SDK's own "
        "server_verification_cert and cipher options (TLS 1.2 only)",
    )
    parser.add_argument("--ecc-only", action="store_true", help="only ECDSA suites/signatures")
    parser.add_argument(
        "--max-fragment-length",
        type=int,
        choices=(512, 1024, 2048, 4096),
        help="ask the hub for TLS records of at most this size (harden only)",
    )
    parser.add_argument(
        "--roots", help="PEM file of trust anchors to pin instead of IoT Hub's roots"
    )
    parser.add_argument("--count", type=int, default=3, help="messages to send (default 3)")
    parser.add_argument("--websockets", action="store_true", help="MQTT over WebSockets (443)")
    args = parser.parse_args(argv)
    if not args.connection_string:
        parser.error(f"give --connection-string or set ${ENV_CONNECTION_STRING}")
    return args


def build_policy(args: argparse.Namespace) -> it.TlsPolicy:
    return it.TlsPolicy(
        ciphers=it.CipherProfile.ECC_ONLY if args.ecc_only else it.CipherProfile.STRONG,
        max_fragment_length=args.max_fragment_length,
        roots=it.RootSet.from_pem_file(args.roots) if args.roots else it.AZURE_GLOBAL,
    )


def explain(exc: BaseException) -> str:
    """The SDK wraps transport errors; show the TLS reason underneath when there is one."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, it.IoTHubTLSError | OSError) and seen is not exc:
            return f"{exc}: {seen}"
        seen = seen.__cause__ or seen.__context__
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from azure.iot.device import IoTHubDeviceClient, Message
        from azure.iot.device.exceptions import ClientError

        from iothub_tls.azure import client_kwargs, harden, tls_info
    except ImportError:
        print("needs azure-iot-device: pip install 'iothub-tls[azure]'", file=sys.stderr)
        return 2
    conn_str = args.connection_string
    options: dict[str, Any] = {"websockets": args.websockets, "connection_retry": False}
    try:
        policy = build_policy(args)
        if args.route == "harden":
            # ONE LINE: the application's own factory call, wrapped in harden().
            client = harden(
                IoTHubDeviceClient.create_from_connection_string(conn_str, **options), policy
            )
        else:
            # ONE LINE: the same call with the SDK's own TLS options from the policy.
            client = IoTHubDeviceClient.create_from_connection_string(
                conn_str, **client_kwargs(policy), **options
            )
    except (it.PolicyError, ValueError) as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2

    try:
        client.connect()
        print(f"connected: {tls_info(client)}")
        for n in range(args.count):
            message = Message(json.dumps({"n": n, "route": args.route}))
            message.content_type = "application/json"
            message.content_encoding = "utf-8"
            client.send_message(message)
            print(f"sent message {n}")
    except ClientError as exc:
        print(f"failed: {explain(exc)}", file=sys.stderr)
        return 1
    finally:
        client.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
