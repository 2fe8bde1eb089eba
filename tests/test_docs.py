"""The documentation says what the code does: its Python examples run as written against
the local hub, the transport pages present their modules' public names, and no page
describes a surface that is gone.

Examples are the ```` ```python ```` blocks of the pages in ``PAGES`` (README.md and
every page of docs/). An HTML comment right before a block (invisible on the rendered
page) can prepare and check it::

    <!-- doctest
    before: _svc.c2d(b"reboot")            # run first, in the example's namespace
    after: assert _svc.telemetry()          # run last: what the example did
    variants: amqp https                    # run again with the transport renamed
    skip: why this block cannot run here    # e.g. it needs a real IoT Hub
    -->

Each example runs in a fresh directory against a fresh local hub (the registry and PKI
are shared) named ``myhub.azure-devices.net``, with ``cs`` (the connection string of the
SAS device ``thermostat-1``) and ``key`` (its key) defined. The clients it builds
through the public factories connect to the hub's door for their transport and pin the
hub's root (instead of Azure's), unless the example gives ``host``, ``port`` or its own
roots: that is the only difference between the local hub and IoT Hub that examples do not
spell out. A skipped example (a real hub's name, hardware, another SDK) is still compiled:
a syntax error fails.

Shell examples (```` ```sh ```` blocks, and the ``$`` lines of ```` ```console ````
blocks) are not run, but every ``iothub-tls`` command they show is parsed by the real
command-line parser: a command or option that does not exist fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import json
import re
import shlex
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import iothub_tls as it
from iothub_tls.hub.hub import HubOptions, LocalHub

pytest.importorskip("paho.mqtt.client")
pytest.importorskip("proton")
pytest.importorskip("urllib3")

from iothub_tls import aio
from iothub_tls.amqp import AmqpDeviceClient
from iothub_tls.https import HttpsDeviceClient
from iothub_tls.mqtt import MqttDeviceClient

ROOT = Path(__file__).resolve().parent.parent
PAGES = (
    "README.md",
    *(p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "docs").glob("*.md"))),
)
HUB_HOST = "myhub.azure-devices.net"
DEVICE = "thermostat-1"
X509_DEVICE = "thermostat-2"
CLASSES: dict[str, type[Any]] = {
    "mqtt": MqttDeviceClient,
    "amqp": AmqpDeviceClient,
    "https": HttpsDeviceClient,
}
#: every client class an example may build, with the door it goes to
REDIRECTED: tuple[tuple[str, type[Any]], ...] = (
    *CLASSES.items(),
    ("mqtt", aio.MqttDeviceClient),
)
_BLOCK = re.compile(
    r"(?:<!--\s*doctest(?P<directive>.*?)-->\n)?```python\n(?P<code>.*?)^```", re.S | re.M
)
_KEYS = ("before", "after", "variants", "skip")


@dataclass(frozen=True)
class Example:
    page: str
    line: int
    code: str
    before: str = ""
    after: str = ""
    skip: str | None = None
    variants: tuple[str, ...] = ()

    @property
    def transport(self) -> str | None:
        found = re.search(r"from iothub_tls\.(mqtt|amqp|https) import", self.code)
        return found.group(1) if found else None


def _parse(page: str) -> list[Example]:
    text = (ROOT / page).read_text(encoding="utf-8")
    found = []
    for match in _BLOCK.finditer(text):
        fields: dict[str, str] = {}
        for raw in (match.group("directive") or "").strip().splitlines():
            key, sep, value = raw.strip().partition(":")
            if not sep or key.strip() not in _KEYS:
                raise AssertionError(f"{page}: unknown doctest directive line {raw!r}")
            key = key.strip()
            fields[key] = f"{fields[key]}\n{value.strip()}" if key in fields else value.strip()
        if "skip" in fields and not fields["skip"]:
            raise AssertionError(f"{page}: a skipped example must say why")
        found.append(
            Example(
                page,
                text.count("\n", 0, match.start("code")) + 1,
                match.group("code"),
                before=fields.get("before", ""),
                after=fields.get("after", ""),
                skip=fields.get("skip"),
                variants=tuple(fields.get("variants", "").split()),
            )
        )
    return found


def _cases() -> Iterator[Any]:
    for page in PAGES:
        for example in _parse(page):
            for variant in (None, *example.variants):
                name = f"{page.split('/')[-1]}:{example.line}"
                if variant:
                    name += f"-{variant}"
                marks = [pytest.mark.skip(reason=example.skip)] if example.skip else []
                yield pytest.param(example, variant, id=name, marks=marks)


def _rename(code: str, source: str | None, target: str | None) -> str:
    """The example with its transport renamed (``mqtt`` -> ``amqp``, ``Mqtt`` ->
    ``Amqp``)."""
    if not target or not source:
        return code
    for old, new in ((source, target), (source.capitalize(), target.capitalize())):
        code = code.replace(old, new)
    return code


# -- the local hub ----------------------------------------------------------------------


@dataclass(frozen=True)
class Registered:
    state_dir: Path
    connection_string: str
    key: str
    certfile: Path
    keyfile: Path


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Registered:
    """The hub's state directory with its PKI and two devices, made once."""
    state = tmp_path_factory.mktemp("docs-hub")
    hub = LocalHub(HubOptions(state_dir=state, hostname=HUB_HOST))
    sas = hub.add_device(DEVICE)
    x509 = hub.add_device(X509_DEVICE, x509=True)
    assert x509.certfile is not None and x509.keyfile is not None
    key = sas.connection_string.split("SharedAccessKey=", 1)[1]
    return Registered(state, sas.connection_string, key, x509.certfile, x509.keyfile)


class Service:
    """What the hidden comments call (``_svc``): the service side of the example's hub."""

    def __init__(self, hub: LocalHub, registered: Registered) -> None:
        self.hub = hub
        self._registered = registered

    def c2d(self, payload: bytes, properties: dict[str, str] | None = None, **fields: Any) -> None:
        self.hub.state.enqueue_c2d(DEVICE, payload, properties, **fields)

    def desired(self, patch: dict[str, Any]) -> None:
        self.hub.state.patch_desired(DEVICE, patch)

    def invoke(self, name: str, payload: Any = None) -> tuple[int, Any]:
        """Call a method; a ``str`` payload is sent as it is (it may not be JSON)."""
        raw = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        status, body = self.hub.state.invoke_method(
            DEVICE, name, raw, timeout=10.0, connect_timeout=10.0
        )
        return status, json.loads(body) if body else None

    def telemetry(self) -> list[Any]:
        return [m for m in self.hub.state.telemetry if m.device_id == DEVICE]

    def dead_letters(self) -> list[Any]:
        return list(self.hub.state.dead_letters)

    def rest(self, path: str) -> tuple[it.TlsPolicy, str, bytes, str, None]:
        """For the HTTP library examples: the policy pinning the hub's root, the URL of
        ``path`` on its HTTPS door, a body, a SAS token of the device, no identity."""
        from iothub_tls.https import API_VERSION

        policy = it.TlsPolicy(roots=it.RootSet.from_pem_file(self.hub.root_pem_path))
        url = f"https://localhost:{self.hub.ports['https']}{path}?api-version={API_VERSION}"
        token = it.generate_sas_token(f"{HUB_HOST}/devices/{DEVICE}", self._registered.key)
        return policy, url, b"hello", token, None

    def write_identity(self, device_id: str, certfile: str, keyfile: str) -> None:
        assert device_id == X509_DEVICE
        shutil.copyfile(self._registered.certfile, certfile)
        shutil.copyfile(self._registered.keyfile, keyfile)

    def write_root(self, path: str) -> None:
        """The hub's root certificate, where the example reads it."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.hub.root_pem_path, path)

    def write_fleet_logs(self, csv_path: str, jsonl_gz_path: str) -> None:
        """Connection logs of a made-up fleet (tests/fleetlogs.py): the guidance's query
        exported as CSV, and archived resource logs (JSON lines, gzip)."""
        from tests import fleetlogs

        fleet = fleetlogs.Fleet(16)
        fleetlogs.write_kql_csv(Path(csv_path), fleet, 400)
        fleetlogs.write_azure_jsonl(Path(jsonl_gz_path), fleet, 400, compress=True)


@pytest.fixture
def hub(registered: Registered) -> Iterator[LocalHub]:
    options = HubOptions(
        state_dir=registered.state_dir,
        hostname=HUB_HOST,
        mqtt_port=0,
        amqp_port=0,
        https_port=0,
    )
    with LocalHub(options) as running:
        assert set(running.doors) == set(CLASSES), running.unavailable
        yield running


@pytest.fixture
def redirected(hub: LocalHub, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Clients built through the public factories go to ``hub``; the list collects them
    (to be closed after the example)."""
    built: list[Any] = []
    policy = it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root_pem_path))
    for transport, cls in REDIRECTED:
        for name in ("from_connection_string", "from_symmetric_key", "from_x509"):
            factory: Callable[..., Any] = getattr(cls, name)

            def redirect(
                *args: Any, _factory: Callable[..., Any] = factory, _t: str = transport, **kw: Any
            ) -> Any:
                kw.setdefault("host", "127.0.0.1")
                kw.setdefault("port", hub.ports[_t])
                given = kw.get("policy")
                if given is None:
                    kw["policy"] = policy
                elif given.roots.fingerprints == it.AZURE_GLOBAL.fingerprints:
                    # the example's policy, pinned to the hub's root instead of Azure's
                    kw["policy"] = dataclasses.replace(given, roots=policy.roots)
                client = _factory(*args, **kw)
                built.append(client)
                return client

            monkeypatch.setattr(cls, name, staticmethod(redirect))
    return built


# -- the examples ------------------------------------------------------------------------


@pytest.mark.parametrize(("example", "variant"), list(_cases()))
def test_example_runs(
    example: Example,
    variant: str | None,
    hub: LocalHub,
    registered: Registered,
    redirected: list[Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {
        "__name__": "__doc_example__",
        "cs": registered.connection_string,
        "key": registered.key,
        "_svc": Service(hub, registered),
    }
    where = f"{example.page}:{example.line}"
    try:
        if example.before:
            exec(compile(example.before, f"{where} (before)", "exec"), namespace)
        code = _rename(example.code, example.transport, variant)
        exec(compile(code, where, "exec"), namespace)
        if example.after:
            exec(compile(example.after, f"{where} (after)", "exec"), namespace)
    finally:
        for client in redirected:
            if not inspect.iscoroutinefunction(client.close):  # asyncio: the example closes
                client.close()


@pytest.mark.parametrize(
    "example",
    [pytest.param(e, id=f"{e.page.split('/')[-1]}:{e.line}") for p in PAGES for e in _parse(p)],
)
def test_example_compiles(example: Example) -> None:
    """Every example, the skipped ones too, is valid Python (and so are its comments'
    ``before`` and ``after``): a syntax error fails even where the example cannot run."""
    where = f"{example.page}:{example.line}"
    compile(example.code, where, "exec")
    for variant in example.variants:
        compile(_rename(example.code, example.transport, variant), f"{where}-{variant}", "exec")
    compile(example.before, f"{where} (before)", "exec")
    compile(example.after, f"{where} (after)", "exec")


def test_examples_are_found() -> None:
    """The parser sees the blocks (a broken fence would silently drop examples)."""
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        assert len(_parse(page)) == text.count("```python\n"), page


# -- shell examples: the iothub-tls commands they show exist -----------------------------

_SHELL_BLOCK = re.compile(r"^```(?P<lang>console|sh|shell|bash)\n(?P<body>.*?)^```", re.S | re.M)
_SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")
_ENDS_COMMAND = {"|", "||", "&", "&&", ";", "(", ")"}
_REDIRECTS = {">", ">>", "<", "2>", "&>"}


@dataclass(frozen=True)
class ShellCommand:
    page: str
    line: int
    argv: tuple[str, ...]  # after ``iothub-tls`` (or ``python -m iothub_tls``)

    @property
    def id(self) -> str:
        return f"{self.page.split('/')[-1]}:{self.line}:{' '.join(self.argv[:2])}"


def _cli_argv(words: list[str]) -> tuple[str, ...] | None:
    """The arguments of an ``iothub-tls`` command line, or None for another program."""
    if words and Path(words[0]).name == "iothub-tls":
        return tuple(words[1:])
    if (
        len(words) >= 3
        and Path(words[0]).name.startswith("python")
        and words[1:3]
        == [
            "-m",
            "iothub_tls",
        ]
    ):
        return tuple(words[3:])
    return None


def _commands_in(line: str) -> Iterator[tuple[str, ...]]:
    """The ``iothub-tls`` commands of one shell line: each command of a pipeline or a
    list, and those inside ``$(...)``; comments and redirections left out."""
    for inner in _SUBSTITUTION.findall(line):
        yield from _commands_in(inner)
    lexer = shlex.shlex(_SUBSTITUTION.sub("SUBSTITUTED", line), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    redirected = False
    for token in [*lexer, ";"]:
        if redirected:
            redirected = False
        elif token in _REDIRECTS:
            redirected = True  # the next word is a file
        elif token in _ENDS_COMMAND:
            argv = _cli_argv(words)
            if argv is not None:
                yield argv
            words = []
        else:
            words.append(token)


def _shell_commands(page: str) -> list[ShellCommand]:
    text = (ROOT / page).read_text(encoding="utf-8")
    found = []
    for block in _SHELL_BLOCK.finditer(text):
        console = block.group("lang") == "console"
        first = text.count("\n", 0, block.start("body")) + 1
        lines = block.group("body").splitlines()
        index = 0
        while index < len(lines):
            number, line = first + index, lines[index]
            while line.endswith("\\") and index + 1 < len(lines):  # a continued line
                index += 1
                line = line[:-1] + " " + lines[index]
            index += 1
            if console:  # a prompt line is a command, the rest is its output
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            found += [ShellCommand(page, number, argv) for argv in _commands_in(line)]
    return found


_COMMANDS = [c for page in PAGES for c in _shell_commands(page)]


def _spelled_out(parser: argparse.ArgumentParser) -> None:
    """Options must be written in full in the docs: no abbreviation accepted (argparse
    takes ``--intermed`` for ``--intermediate`` by default)."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _spelled_out(sub)


@pytest.mark.parametrize("command", _COMMANDS, ids=lambda c: c.id)
def test_shell_example_is_a_real_command(command: ShellCommand) -> None:
    """The command line shown parses with the real parser: the command, its actions
    and options exist, and the arguments fit them."""
    from iothub_tls.cli import build_parser

    parser = build_parser()
    _spelled_out(parser)
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = parser.parse_args(list(command.argv))
        except SystemExit as exc:  # argparse's answer to --help (0) or a usage error (2)
            assert exc.code == 0, (
                f"{command.page}:{command.line}: iothub-tls {shlex.join(command.argv)}\n"
                f"{errors.getvalue()}"
            )
            return
    assert getattr(args, "_command", None), f"{command.page}:{command.line}: no command"


def test_shell_examples_are_found() -> None:
    """The finder sees every prompt line that runs iothub-tls (a broken fence or a
    changed prompt would silently drop commands)."""
    prompts = sum(
        line.startswith(("$ iothub-tls ", "iothub-tls "))
        for page in PAGES
        for block in _SHELL_BLOCK.finditer((ROOT / page).read_text(encoding="utf-8"))
        for line in block.group("body").splitlines()
    )
    assert prompts > 20
    assert len(_COMMANDS) >= prompts
    assert ("hub", "--state", ".iothub-tls-hub", "connection-string", "thermostat-1") in {
        c.argv for c in _COMMANDS
    }  # inside $(...)


# -- names and the old surface -------------------------------------------------------------


@pytest.mark.parametrize("package", ["mqtt", "amqp", "https"])
def test_transport_pages_present_their_public_names(package: str) -> None:
    import importlib

    module = importlib.import_module(f"iothub_tls.{package}")
    text = (ROOT / "docs" / f"{package}.md").read_text(encoding="utf-8")
    missing = [name for name in module.__all__ if f"`{name}" not in text]
    assert missing == []
    assert "clients.md" in text  # the shared surface is described once, there


# Names of the 0.1 surface: only the changelog (and the migration notes of the SDK
# comparison) may still speak of them.
_GONE = (
    "on_reconnect",
    "HttpsRetry",
    "ReconnectPolicy",
    "backoff_delay",
    "reconnect_delay",
    ", poll_interval=",
    "reconnect=",
    "mqtt.MethodHandler",
    "mqtt import MethodHandler",
    "send_message(",
    "client.complete(",
    "iothub_tls.endpoint",
    "iothub_tls.scan",
    "iothub_tls.testpki",
)
_SDK_PAGES = {"azure-iot-device.md", "migration.md", "azure_sdk_harden.py"}


def _current_pages() -> Iterator[Path]:
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").glob("*.md"))
    yield from sorted((ROOT / "samples").glob("*.py"))


@pytest.mark.parametrize("path", list(_current_pages()), ids=lambda p: p.name)
def test_no_page_describes_the_old_surface(path: Path) -> None:
    if path.name == "changes.md":
        return
    text = path.read_text(encoding="utf-8")
    # azure-iot-device's own calls (send_message) are what the SDK pages talk about
    gone = [n for n in _GONE if not (n == "send_message(" and path.name in _SDK_PAGES)]
    assert [name for name in gone if name in text] == []
