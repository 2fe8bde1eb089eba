"""``iothub-tls hub``: the service side of a running local hub (``serve``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._output import EXIT_NOT_COMPLIANT, EXIT_OK, error, print_json, table

if TYPE_CHECKING:
    from ..hub.service_client import ServiceClient
    from . import Subparsers

_HELP = """\
Act as the service side of a local IoT Hub started with 'iothub-tls serve': list its
devices, send a cloud-to-device message, read a twin or patch its desired properties,
and invoke a direct method, through IoT Hub's service REST API on the hub's HTTPS door.
The hub's address, root and service connection string (policy iothubowner) are read
from its state directory (STATE/hub.json, written while the hub runs).

Exit codes: 0 done, 1 the hub refused or the operation failed there (unknown device,
device not connected, a method answering with a status of 400 or more), 2 could not
run it (no hub running on STATE, bad arguments).
"""


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text[:60]!r}") from None


def _json_object(text: str) -> dict[str, Any]:
    value = _json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"interval\": 5}'")
    return value


def _property(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _timeout(text: str) -> int:
    if not text.isdigit() or not 5 <= int(text) <= 300:
        raise argparse.ArgumentTypeError("a direct method timeout is 5..300 seconds")
    return int(text)


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "hub",
        help="act as the service side of a running local hub: devices, C2D, twins, methods",
        description=_HELP,
        epilog=(
            "examples:\n"
            "  iothub-tls hub --state .iothub-tls-hub devices\n"
            "  iothub-tls hub c2d thermostat-1 'reboot' --property priority=high\n"
            "  iothub-tls hub twin thermostat-1 --desired '{\"interval\": 5}'\n"
            "  iothub-tls hub method thermostat-1 echo --payload '{\"x\": 1}' --timeout 10"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--state",
        type=Path,
        default=Path(".iothub-tls-hub"),
        help="the running hub's state directory (default: %(default)s)",
    )
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print the answer as JSON")
    actions = parser.add_subparsers(title="actions", metavar="ACTION", dest="action")
    actions.required = True

    actions.add_parser(
        "devices",
        parents=[json_flag],
        help="list the registered devices and whether they are connected",
        description="List the hub's devices: id, authentication, status, connection state "
        "and cloud-to-device messages waiting.",
    )

    c2d = actions.add_parser(
        "c2d",
        parents=[json_flag],
        help="send a cloud-to-device message",
        description="Queue a cloud-to-device message for DEVICE; it reaches the device over "
        "whichever protocol it connects with.",
    )
    c2d.add_argument("device", metavar="DEVICE")
    c2d.add_argument("message", metavar="MESSAGE", help="the message body (UTF-8 text)")
    c2d.add_argument(
        "--property",
        action="append",
        default=[],
        type=_property,
        metavar="NAME=VALUE",
        help="an application property; repeatable",
    )
    c2d.add_argument("--message-id", help="the message id (default: one made by the hub)")
    c2d.add_argument("--correlation-id")

    twin = actions.add_parser(
        "twin",
        parents=[json_flag],
        help="print a device twin, or patch its desired properties first",
        description="Print DEVICE's twin. With --desired, merge that JSON object into the "
        "desired properties first (null removes a property); a connected device gets the "
        "patch.",
    )
    twin.add_argument("device", metavar="DEVICE")
    twin.add_argument(
        "--desired", type=_json_object, metavar="JSON", help="desired-properties patch"
    )

    method = actions.add_parser(
        "method",
        parents=[json_flag],
        help="invoke a direct method",
        description='Invoke direct method NAME on DEVICE and print {"status": ..., '
        '"payload": ...}. Exit 1 when the device is not connected or answers with a status '
        "of 400 or more.",
    )
    method.add_argument("device", metavar="DEVICE")
    method.add_argument("name", metavar="NAME")
    method.add_argument("--payload", type=_json_value, metavar="JSON", help="default: null")
    method.add_argument(
        "--timeout",
        type=_timeout,
        default=30,
        metavar="S",
        help="seconds the device has to answer, 5..300 (default: %(default)s)",
    )
    method.add_argument(
        "--connect-timeout",
        type=int,
        default=0,
        metavar="S",
        help="seconds to wait for the device to connect (default: 0)",
    )

    cs = actions.add_parser(
        "connection-string",
        parents=[json_flag],
        help="print a device's connection string",
        description="Print DEVICE's connection string (its primary key for SAS devices).",
    )
    cs.add_argument("device", metavar="DEVICE")
    return parser


def _client(args: argparse.Namespace) -> ServiceClient:
    from ..hub.service_client import ServiceClient

    return ServiceClient.from_state_dir(args.state)


def _devices(client: ServiceClient, args: argparse.Namespace) -> int:
    devices = client.list_devices()
    if args.json:
        print_json({"devices": devices})
        return EXIT_OK
    rows = [
        (
            d["deviceId"],
            d["authentication"]["type"],
            d["status"],
            d["connectionState"],
            d["cloudToDeviceMessageCount"],
        )
        for d in devices
    ]
    if rows:
        print(table(("DEVICE", "AUTH", "STATUS", "CONNECTION", "C2D QUEUED"), rows))
    else:
        print("no devices registered (add some with 'iothub-tls serve --device NAME')")
    return EXIT_OK


def _c2d(client: ServiceClient, args: argparse.Namespace) -> int:
    message_id = client.send_c2d(
        args.device,
        args.message,
        dict(args.property),
        message_id=args.message_id,
        correlation_id=args.correlation_id,
    )
    if args.json:
        print_json({"deviceId": args.device, "messageId": message_id, "queued": True})
    else:
        print(f"queued message {message_id} for {args.device}")
    return EXIT_OK


def _twin(client: ServiceClient, args: argparse.Namespace) -> int:
    if args.desired is not None:
        twin = client.update_twin(args.device, desired=args.desired)
    else:
        twin = client.get_twin(args.device)
    print_json(twin)
    return EXIT_OK


def _method(client: ServiceClient, args: argparse.Namespace) -> int:
    result = client.invoke_method(
        args.device,
        args.name,
        args.payload,
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
    )
    print_json(result.to_json())
    if result.status >= 400:
        sys.stderr.write(
            f"iothub-tls hub: method {args.name!r} on {args.device} answered status "
            f"{result.status}\n"
        )
        return EXIT_NOT_COMPLIANT
    return EXIT_OK


def _connection_string(client: ServiceClient, args: argparse.Namespace) -> int:
    text = client.connection_string_of(args.device)
    if args.json:
        print_json({"deviceId": args.device, "connectionString": text})
    else:
        print(text)
    return EXIT_OK


_ACTIONS = {
    "devices": _devices,
    "c2d": _c2d,
    "twin": _twin,
    "method": _method,
    "connection-string": _connection_string,
}


def run(args: argparse.Namespace) -> int:
    from ..errors import ClientError, IoTHubTLSError
    from ..hub.service_client import ServiceRequestError

    try:
        client = _client(args)
    except (IoTHubTLSError, OSError, KeyError, ValueError) as exc:
        return error("hub", _message(exc), as_json=args.json)
    try:
        with client:
            return _ACTIONS[args.action](client, args)
    except ServiceRequestError as exc:
        if args.json:
            print_json(
                {
                    "error": str(exc),
                    "status": exc.status,
                    "errorCode": exc.error_code,
                }
            )
        sys.stderr.write(f"iothub-tls hub: {exc}\n")
        return EXIT_NOT_COMPLIANT
    except (ClientError, OSError) as exc:
        return error("hub", _message(exc), as_json=args.json)


def _message(exc: BaseException) -> str:
    """An error's text (an OSError without errno would print "[Errno None] ...")."""
    if isinstance(exc, OSError) and exc.errno is None and exc.strerror:
        return exc.strerror
    return str(exc)
