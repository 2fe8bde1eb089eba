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
