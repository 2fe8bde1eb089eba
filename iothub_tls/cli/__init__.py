"""The ``iothub-tls`` command line.

One module per command under ``iothub_tls/cli/``. A command module exposes::

    def register(subparsers: Subparsers) -> argparse.ArgumentParser: ...
    def run(args: argparse.Namespace) -> int: ...

``register`` adds the command's parser (with its ``--help`` text and ``--json``) and
returns it; ``run`` does the work and returns the exit code. Adding a command is one
line: its module name in :data:`COMMANDS`. Every listed module is imported to build the
parser, so a command imports optional dependencies inside ``run``, never at module
level (a missing extra must not break the other commands).

Exit codes, for every command: 0 OK / compliant, 1 checked and not compliant, 2 could
not check (usage error, unreachable host, timeout, unreadable input).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, TypeAlias

from ..errors import IoTHubTLSError
from ._output import EXIT_UNABLE, error

__all__ = ["COMMANDS", "Command", "Subparsers", "build_parser", "main"]

#: The command modules, in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = (
    "demo",
    "serve",
    "hub",
    "provision",
    "doctor",
    "probe",
    "audit",
    "certs",
    "thumbprint",
)

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class Command(Protocol):
    """What a module listed in :data:`COMMANDS` provides."""

    def register(self, subparsers: Subparsers) -> argparse.ArgumentParser: ...

    def run(self, args: argparse.Namespace) -> int: ...


_DESCRIPTION = """\
Check and prepare TLS for Azure IoT Hub devices: see the whole stack work against a
local hub (demo), run that hub for your own devices (serve) and act as its service side
(hub: C2D, twins, direct methods), register a device with a provisioning service
(provision), is this platform able to comply (doctor), does an
endpoint comply (probe), which devices of a fleet will be refused, from the hub's
connection logs (audit), make a test PKI (certs), and show what IoT Hub registers for a
certificate (thumbprint).

Every command has --help and --json. Exit codes: 0 OK / compliant, 1 checked and
not compliant, 2 could not check (usage error, unreachable, timeout).
"""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="iothub-tls",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"iothub-tls {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        module: Command = importlib.import_module(f"{__name__}.{name}")
        command_parser = module.register(subparsers)
        command_parser.set_defaults(_run=module.run, _command=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit
    code instead of exiting, also for usage errors (2) and ``--help`` (0)."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # argparse exits on --help, --version and usage errors
        return 0 if exc.code in (0, None) else EXIT_UNABLE
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_usage(sys.stderr)
        sys.stderr.write("iothub-tls: error: name a command (see iothub-tls --help)\n")
        return EXIT_UNABLE
    try:
        return int(run(args))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except (IoTHubTLSError, OSError) as exc:
        # Commands report their expected failures themselves; this is the safety net
        # that still keeps the promise "2 = could not check" with a readable message.
        return error(args._command, str(exc), as_json=bool(getattr(args, "json", False)))
