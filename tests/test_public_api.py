"""The public surface is deliberate: ``__all__`` and docs/api.md list the same names,
every name resolves, and the core imports no transport library."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import iothub_tls

DOCS = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_all_matches_the_documentation():
    documented = set(re.findall(r"^\| `([A-Za-z0-9_]+)` \|", DOCS.read_text(), re.M))
    documented.add("__version__")
    assert documented == set(iothub_tls.__all__)
    for name in iothub_tls.__all__:
        assert getattr(iothub_tls, name) is not None


def test_core_imports_no_transport_library():
    code = (
        "import sys, iothub_tls; "
        "print(sorted(m for m in ('paho', 'proton', 'urllib3', 'requests', 'httpx', "
        "'azure') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


_LIBRARY_WARNING = """
import logging
{setup}
import iothub_tls
# a record on one of the library's loggers, as its clients write them (e.g. a lost
# connection); what is under test is the logger configuration the package sets up
logging.getLogger("iothub_tls.mqtt").warning("lost the connection to hub.example; reconnecting")
assert logging.getLogger("iothub_tls.mqtt").isEnabledFor(logging.WARNING)
print("done")
"""


def _run_desired_not_json(setup: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _LIBRARY_WARNING.format(setup=setup)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_library_warnings_stay_quiet_when_the_application_configures_no_logging():
    """A library adds a NullHandler to its top logger, so Python's last-resort handler
    never prints its records to stderr behind the application's back."""
    out = _run_desired_not_json("")
    assert out.stdout.strip() == "done"
    assert out.stderr == ""


def test_library_warnings_reach_a_configured_handler():
    """The twin: the same warning is there for an application that configures logging."""
    out = _run_desired_not_json("logging.basicConfig(level=logging.WARNING)")
    assert out.stdout.strip() == "done"
    assert "lost the connection to hub.example; reconnecting" in out.stderr
