"""MkDocs hooks of the documentation site (``hooks:`` in mkdocs.yml).

The site adds no copy of any page. It generates, while it builds:

* the home page from README.md, its links to the repository's docs/ made relative;
* the API reference, one page per public module, from the module's ``__all__``
  (:data:`REFERENCE`): mkdocstrings renders each name from its docstring;
* the tables of docs/troubleshooting.md from the library's refusal tables (the rows its
  error messages are made of), in place of the ``<!-- refusals: NAME -->`` comments.

and shows the docstrings' Sphinx roles (``:class:`X```) as the code they name.

tests/test_site.py checks the built site against the same sources.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = "https://github.com/iothub-tls/iothub-tls/blob/main/"

#: The public modules, each with its reference page: module -> (page, title). Every
#: name of a module's ``__all__`` gets an entry. ``iothub_tls.diagnostics`` and
#: ``iothub_tls.testing`` are namespaces without names of their own: their modules are
#: listed instead.
REFERENCE: dict[str, tuple[str, str]] = {
    "iothub_tls": ("reference/iothub_tls.md", "iothub_tls"),
    "iothub_tls.policy": ("reference/policy.md", "iothub_tls.policy"),
    "iothub_tls.roots": ("reference/roots.md", "iothub_tls.roots"),
    "iothub_tls.tls": ("reference/tls.md", "iothub_tls.tls"),
    "iothub_tls.auth": ("reference/auth.md", "iothub_tls.auth"),
    "iothub_tls.errors": ("reference/errors.md", "iothub_tls.errors"),
    "iothub_tls.device": ("reference/device.md", "iothub_tls.device"),
    "iothub_tls.mqtt": ("reference/mqtt.md", "iothub_tls.mqtt"),
    "iothub_tls.amqp": ("reference/amqp.md", "iothub_tls.amqp"),
    "iothub_tls.https": ("reference/https.md", "iothub_tls.https"),
    "iothub_tls.aio": ("reference/aio.md", "iothub_tls.aio"),
    "iothub_tls.azure": ("reference/azure.md", "iothub_tls.azure"),
    "iothub_tls.dps": ("reference/dps.md", "iothub_tls.dps"),
    "iothub_tls.diagnostics.probe": ("reference/probe.md", "iothub_tls.diagnostics.probe"),
    "iothub_tls.diagnostics.doctor": ("reference/doctor.md", "iothub_tls.diagnostics.doctor"),
    "iothub_tls.audit": ("reference/audit.md", "iothub_tls.audit"),
    "iothub_tls.hub": ("reference/hub.md", "iothub_tls.hub"),
    "iothub_tls.hub.hub": ("reference/hub-hub.md", "iothub_tls.hub.hub"),
    "iothub_tls.hub.service_client": (
        "reference/service-client.md",
        "iothub_tls.hub.service_client",
    ),
    "iothub_tls.testing.pki": ("reference/testing-pki.md", "iothub_tls.testing.pki"),
    "iothub_tls.testing.hardware": (
        "reference/testing-hardware.md",
        "iothub_tls.testing.hardware",
    ),
}

#: The refusal tables, by the name the troubleshooting page's comments use: (module,
#: attribute). "tls", "certificate" and "policy" split the TLS table by the error raised:
#: the server's certificate (CertificateVerificationError), the checks after the
#: handshake (PolicyViolation) and the rest.
TABLES: dict[str, tuple[str, str]] = {
    "tls": ("iothub_tls.tls.refusals", "TLS_REFUSALS"),
    "certificate": ("iothub_tls.tls.refusals", "TLS_REFUSALS"),
    "policy": ("iothub_tls.tls.refusals", "TLS_REFUSALS"),
    "connack": ("iothub_tls.mqtt.conventions", "CONNACK_REFUSALS"),
    "http": ("iothub_tls.https.conventions", "HTTP_REFUSALS"),
}
#: Sphinx cross-reference roles in docstrings (``:class:`X```): markdown shows the role's
#: name before the code; the reference drops it and keeps the code.
_SPHINX_ROLE = re.compile(r":(?:class|meth|func|mod|data|attr|exc|obj|const):(?=<code>)")
#: ``:class:`~a.b.Name``` shows ``Name``, as Sphinx does
_SPHINX_SHORT = re.compile(r"<code>~\.?(?:\w+\.)*(?=\w+</code>)")
_MARKER = re.compile(r"^<!-- refusals: (?P<table>[a-z]+) -->$", re.M)
_REPO_DOC_LINK = re.compile(re.escape(REPOSITORY) + r"docs/(?P<page>[A-Za-z0-9_.-]+\.md)")


def public_names(module: str) -> list[str]:
    """The ``__all__`` of ``module``."""
    return list(importlib.import_module(module).__all__)


def reference_markdown(module: str) -> str:
    """The reference page of ``module``: its docstring, then every name of its
    ``__all__`` from its docstring."""
    _page, title = REFERENCE[module]
    members = "\n".join(f"        - {name}" for name in public_names(module))
    return (
        f"# `{title}`\n\n"
        f"::: {module}\n"
        "    options:\n"
        "      show_root_heading: false\n"
        "      show_root_toc_entry: false\n"
        "      members:\n"
        f"{members}\n"
    )


def reference_index() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings: one page per public module, with every name of",
        "its `__all__`. [The public API](../api.md) says which names to start from.",
        "",
        "| module | names |",
        "|---|---|",
    ]
    for module, (page, _title) in REFERENCE.items():
        count = len(public_names(module))
        lines.append(f"| [`{module}`]({Path(page).name}) | {count} |")
    return "\n".join(lines) + "\n"


def _rows(table: str) -> list[Any]:
    module, attribute = TABLES[table]
    rows = list(getattr(importlib.import_module(module), attribute))
    split = {"certificate": "CertificateVerificationError", "policy": "PolicyViolation"}
    if table in split:
        return [row for row in rows if row.error.__name__ == split[table]]
    if table == "tls":
        return [row for row in rows if row.error.__name__ not in split.values()]
    return rows


def _code(items: Iterable[str]) -> str:
    return ", ".join(f"`{item}`" for item in items)


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _prose(text: str) -> str:
    """``text`` as markdown shows it: ``<hub>`` is a placeholder, not an HTML tag."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def refusal_markdown(table: str) -> str:
    """One entry per row of ``table``: what the message says, the signals that select
    it, the exception, the cause, the fix."""
    out = []
    rows = _rows(table)
    for row in rows:
        title = _sentence(_prose(row.says))
        if row.when and sum(other.says == row.says for other in rows) > 1:
            title += f" ({row.when})"
        out.append(f"### {title} {{ #{row.key} }}\n")
        shows = list(row.signals)
        if row.code is not None and table == "certificate":
            shows.insert(0, f"verify code {row.code}")
        shows += [exc.__name__ for exc in row.exceptions]
        module = row.error.__module__
        error = f"[`{row.error.__name__}`][{module}.{row.error.__name__}]"
        facts = [f"**Raised as** {error}"]
        if shows:
            facts.append(f"**shows as** {_code(shows)}")
        if row.when and not title.endswith(f"({row.when})"):
            facts.append(f"**when** {row.when}")
        if table in ("connack", "http"):
            facts.append("**retried** by the client" if row.retryable else "**not retried**")
        out.append(" · ".join(facts) + "\n")
        out.append(f"**Cause.** {_prose(row.cause)}.\n")
        out.append(f"**Fix.** {_prose(row.fix)}.\n")
    return "\n".join(out)


def render_markers(markdown: str) -> str:
    """``markdown`` with each ``<!-- refusals: NAME -->`` replaced by the table."""
    return _MARKER.sub(lambda m: refusal_markdown(m.group("table")), markdown)


def home_markdown() -> str:
    """README.md as the site's home page: links to docs/ pages stay on the site."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return _REPO_DOC_LINK.sub(lambda m: m.group("page"), text)


# -- the hooks -------------------------------------------------------------------------


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    generated = {"index.md": home_markdown(), "reference/index.md": reference_index()}
    for module, (page, _title) in REFERENCE.items():
        generated[page] = reference_markdown(module)
    for uri, content in generated.items():
        files.append(File.generated(config, uri, content=content))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri == "troubleshooting.md":
        return render_markers(markdown)
    return markdown


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri.startswith("reference/"):
        return _SPHINX_SHORT.sub("<code>", _SPHINX_ROLE.sub("", html))
    return html
