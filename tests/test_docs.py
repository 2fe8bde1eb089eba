"""The documentation says what the code does: its Python examples run as written against
the local hub, the transport pages present their modules' public names, and no page
describes a surface that is gone.

Examples are the ```` ```python ```` blocks of the pages in ``PAGES``. An HTML comment
right before a block (invisible on the rendered page) can prepare and check it::

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
spell out.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
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
    "docs/clients.md",
    "docs/migration.md",
    "docs/mqtt.md",
    "docs/amqp.md",
    "docs/https.md",
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


def test_examples_are_found() -> None:
    """The parser sees the blocks (a broken fence would silently drop examples)."""
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        assert len(_parse(page)) == text.count("```python\n"), page


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
