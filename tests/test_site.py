"""The documentation site builds without a warning, presents every public name, and its
troubleshooting page lists every refusal the library explains.

The site is built once, with ``mkdocs build --strict`` (mkdocs.yml turns every broken
link, missing anchor, unresolved cross-reference and docstring the reference cannot
parse into a failure), into a temporary directory; the tests read the HTML it wrote. They
need the ``docs`` extra (``pip install -e '.[docs]'``; scripts/test runs them in
.venv-docs): without mkdocs they skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import html
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_hooks() -> Any:
    """scripts/docs_site.py, the site's hooks: which modules and tables it renders."""
    spec = importlib.util.spec_from_file_location("docs_site", ROOT / "scripts" / "docs_site.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


docs_site = _load_hooks()


def _require_mkdocs() -> None:
    try:
        for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
            importlib.import_module(name)
    except ImportError as exc:
        message = (
            f"the documentation site needs {exc.name}: pip install -e '.[docs]' "
            "(scripts/test builds the site in .venv-docs)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_mkdocs()
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stderr}"
    assert "WARNING" not in built.stderr, built.stderr
    return out


def _page(site: Path, uri: str) -> str:
    """The HTML of the page made from ``uri`` (``clients.md`` -> clients/index.html)."""
    stem = uri.removesuffix(".md")
    if stem == "index" or stem.endswith("/index"):
        path = site / f"{stem}.html"
    else:
        path = site / stem / "index.html"
    return path.read_text(encoding="utf-8")


def _text(page: str) -> str:
    """What a reader sees: the page's text without its tags, entities decoded."""
    article = page.split('<article class="md-content__inner', 1)[-1]
    return html.unescape(re.sub(r"<[^>]+>", "", article))


def _ids(page: str) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', page))


# -- the API reference ----------------------------------------------------------------


@pytest.mark.parametrize("module", list(docs_site.REFERENCE))
def test_every_public_name_has_a_reference_entry(site: Path, module: str) -> None:
    page_uri, _title = docs_site.REFERENCE[module]
    ids = _ids(_page(site, page_uri))
    names = importlib.import_module(module).__all__
    assert names, module
    missing = [name for name in names if f"{module}.{name}" not in ids]
    assert missing == [], f"{page_uri} has no entry for {missing}"


def test_every_public_module_has_a_reference_page() -> None:
    """The public modules of the package are the reference's: a package's own ``__all__``,
    or, for a namespace without one (diagnostics, testing), its modules'."""
    import pkgutil

    import iothub_tls

    public: set[str] = {"iothub_tls"}
    for info in pkgutil.iter_modules(iothub_tls.__path__, "iothub_tls."):
        if info.name.rsplit(".", 1)[-1].startswith("_") or info.name in _NOT_LIBRARY:
            continue
        module = importlib.import_module(info.name)
        if hasattr(module, "__all__"):
            public.add(info.name)
        elif info.ispkg:
            public |= {
                sub.name
                for sub in pkgutil.iter_modules(module.__path__, f"{info.name}.")
                if sub.name in _NAMESPACE_MODULES
            }
    assert public == set(docs_site.REFERENCE) - _MODULES_OF_PACKAGES


#: Not a library surface: the command line (its page is cli.md) and ``python -m``.
_NOT_LIBRARY = {"iothub_tls.cli", "iothub_tls.__main__"}
#: The modules of the namespaces without an ``__all__`` of their own that are public
#: (api.md's module table names them); diagnostics.clienthello is probe's parser.
_NAMESPACE_MODULES = {
    "iothub_tls.diagnostics.probe",
    "iothub_tls.diagnostics.doctor",
    "iothub_tls.testing.pki",
    "iothub_tls.testing.hardware",
}
#: Modules inside a package with an ``__all__`` that the docs send readers to as well.
_MODULES_OF_PACKAGES = {"iothub_tls.hub.hub", "iothub_tls.hub.service_client"}


def test_the_reference_shows_docstrings(site: Path) -> None:
    """An entry is the docstring, not only a name: spot-check one class and one function."""
    text = _text(_page(site, "reference/iothub_tls.md"))
    policy_doc = importlib.import_module("iothub_tls").TlsPolicy.__doc__
    assert policy_doc is not None
    first_line = " ".join(policy_doc.split("\n\n")[0].split())
    assert first_line[:60] in " ".join(text.split())
    assert "generate_sas_token(" in text  # a signature


# -- the troubleshooting page -----------------------------------------------------------


def _all_rows() -> list[Any]:
    """Every row of every table (the page splits the TLS table in three sections)."""
    tables = sorted(set(docs_site.TABLES.values()))
    return [
        row
        for module, attribute in tables
        for row in getattr(importlib.import_module(module), attribute)
    ]


def test_troubleshooting_lists_every_refusal(site: Path) -> None:
    page = _page(site, "troubleshooting.md")
    text = " ".join(_text(page).split())
    ids = _ids(page)
    rows = _all_rows()
    assert len(rows) >= 30  # TLS, certificate verify codes, CONNACK 1-5, HTTP statuses
    for row in rows:
        assert row.key in ids, f"no entry for {row.key}"
        for part in (row.says, row.cause, row.fix):
            sentence = " ".join(part.split())
            assert sentence[1:] in text, f"{row.key}: {sentence!r} is not on the page"
        for signal in row.signals:
            assert signal in text, f"{row.key}: {signal} is not on the page"
        for exc in row.exceptions:
            assert exc.__name__ in text
        assert f"{row.error.__module__}.{row.error.__name__}" in page  # linked to its entry
        if row.code is not None and row.error.__name__ == "CertificateVerificationError":
            assert f"verify code {row.code}" in text


def test_troubleshooting_keeps_no_marker(site: Path) -> None:
    page = _page(site, "troubleshooting.md")
    assert "refusals:" not in _text(page)
    source = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    assert set(re.findall(r"<!-- refusals: ([a-z]+) -->", source)) == set(docs_site.TABLES)


def test_the_messages_are_made_of_the_rows() -> None:
    """The page's words are the messages' words: one refusal per table, raised by the
    library, carries its row's cause and fix (no mkdocs needed)."""
    import ssl

    import iothub_tls as it
    from iothub_tls.https.conventions import HubErrorInfo, error_for_status
    from iothub_tls.mqtt.conventions import connack_error
    from iothub_tls.tls.refusals import TLS_REFUSALS, explain_handshake_error

    version = ssl.SSLError(1, "[SSL: TLSV1_ALERT_PROTOCOL_VERSION] tlsv1 alert protocol version")
    version.reason = "TLSV1_ALERT_PROTOCOL_VERSION"
    error = explain_handshake_error(version, it.TlsPolicy(), "myhub.azure-devices.net")
    [row] = [r for r in TLS_REFUSALS if r.key == "protocol-version"]
    assert isinstance(error, it.ProtocolVersionError)
    assert row.cause in str(error) and row.fix in str(error)

    refused = connack_error(5, "myhub.azure-devices.net")
    assert refused is not None
    connack_row = next(r for r in docs_site._rows("connack") if r.code == 5)
    assert connack_row.fix in str(refused[0])

    http = error_for_status(404, HubErrorInfo("DeviceNotFound", "no", "t"), operation="send")
    http_row = next(r for r in docs_site._rows("http") if r.code == 404)
    assert isinstance(http, it.DeviceNotFoundError)
    assert http_row.cause in str(http) and http_row.fix in str(http)


# -- the pages ------------------------------------------------------------------------------


def test_home_is_the_readme_with_links_kept_on_the_site(site: Path) -> None:
    page = _page(site, "index.md")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    title = readme.splitlines()[0].removeprefix("# ")
    assert f">{title}<" in page
    # README's links to docs/ pages on GitHub lead to the site's pages instead
    assert docs_site.REPOSITORY + "docs/" in readme
    assert docs_site.REPOSITORY + "docs/" not in page
    assert 'href="clients/"' in page


def test_every_page_is_in_the_nav(site: Path) -> None:
    """No page of docs/ is left out of the navigation (strict mode warns about pages
    outside the nav only as INFO)."""
    from mkdocs.config import load_config

    def uris(node: Any) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [u for item in node for u in uris(item)]
        if isinstance(node, dict):
            return [u for value in node.values() for u in uris(value)]
        return []

    nav = set(uris(load_config(str(ROOT / "mkdocs.yml"))["nav"]))
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    generated = {"index.md", "reference/index.md"} | {
        page for page, _title in docs_site.REFERENCE.values()
    }
    assert nav == pages | generated
    for uri in nav:
        assert _page(site, uri)
