"""scripts/check_dist.py's checks refuse what they exist to catch.

scripts/test runs the script on the real sdist and wheel (they pass there); these tests
hand it small distributions with the faults it must name: a wheel without LICENSE or
py.typed, with tests or bytecode inside, metadata with relative README links or no
Project-URLs, an sdist without scripts/test or with a working copy's files.
"""

from __future__ import annotations

import email
import importlib.util
import io
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def check_dist() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_dist", REPO / "scripts" / "check_dist.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GOOD_METADATA = """\
Metadata-Version: 2.5
Name: iothub-tls
Version: 0.1.0
Project-URL: Homepage, https://github.com/iothub-tls/iothub-tls
Project-URL: Documentation, https://github.com/iothub-tls/iothub-tls/tree/main/docs
Project-URL: Source, https://github.com/iothub-tls/iothub-tls
Project-URL: Issues, https://github.com/iothub-tls/iothub-tls/issues
Project-URL: Changelog, https://github.com/iothub-tls/iothub-tls/blob/main/CHANGELOG.md
Author: iothub-tls authors
Maintainer: iothub-tls authors
License-Expression: MIT
License-File: LICENSE
Classifier: Development Status :: 4 - Beta
Classifier: Intended Audience :: Developers
Classifier: Operating System :: POSIX :: Linux
Classifier: Programming Language :: Python :: 3.10
Classifier: Programming Language :: Python :: 3.11
Classifier: Programming Language :: Python :: 3.12
Classifier: Programming Language :: Python :: 3.13
Classifier: Topic :: Internet
Classifier: Topic :: Security
Classifier: Typing :: Typed
Requires-Python: >=3.10
Requires-Dist: pytest>=7; extra == 'dev'
Requires-Dist: pytest-timeout; extra == 'dev'
Requires-Dist: hypothesis>=6; extra == 'dev'
Requires-Dist: paho-mqtt<3,>=1.6; extra == 'mqtt'
Description-Content-Type: text/markdown

# iothub-tls

See [the policy](https://github.com/iothub-tls/iothub-tls/blob/main/docs/tls-policy.md).
"""
PEMS = (
    "digicert_global_root_g2.pem",
    "digicert_global_root_g3.pem",
    "microsoft_ecc_root_2017.pem",
    "microsoft_rsa_root_2017.pem",
)


def make_wheel(path: Path, *, metadata: str = GOOD_METADATA, drop=(), add=()) -> Path:
    info = "iothub_tls-0.1.0.dist-info"
    files = {
        "iothub_tls/__init__.py": "",
        "iothub_tls/py.typed": "",
        **{f"iothub_tls/roots/{pem}": "" for pem in PEMS},
        f"{info}/METADATA": metadata,
        f"{info}/licenses/LICENSE": "MIT",
        f"{info}/entry_points.txt": "[console_scripts]\niothub-tls = iothub_tls.cli:main\n",
    }
    for name in drop:
        files.pop(name)
    files.update(dict.fromkeys(add, ""))
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def problems_of_wheel(check_dist: ModuleType, wheel: Path) -> list[str]:
    problems = check_dist.Problems()
    check_dist.check_wheel(wheel, problems)
    return list(problems)


def test_a_complete_wheel_passes(check_dist, tmp_path):
    assert problems_of_wheel(check_dist, make_wheel(tmp_path / "ok.whl")) == []


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"drop": ["iothub_tls-0.1.0.dist-info/licenses/LICENSE"]}, "wheel: no LICENSE"),
        ({"drop": ["iothub_tls/py.typed"]}, "wheel: no iothub_tls/py.typed"),
        (
            {"drop": ["iothub_tls/roots/microsoft_rsa_root_2017.pem"]},
            "wheel: no shipped root microsoft_rsa_root_2017.pem",
        ),
        ({"add": ["tests/test_policy.py"]}, "wheel: unexpected top-level entries"),
        ({"add": ["iothub_tls/tests/test_x.py"]}, "wheel: test files"),
        ({"add": ["iothub_tls/__pycache__/x.cpython-311.pyc"]}, "wheel: bytecode"),
    ],
)
def test_a_wheel_fault_is_named(check_dist, tmp_path, kwargs, expected):
    problems = problems_of_wheel(check_dist, make_wheel(tmp_path / "bad.whl", **kwargs))
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.parametrize(
    "old,new,expected",
    [
        (
            "(https://github.com/iothub-tls/iothub-tls/blob/main/docs/tls-policy.md)",
            "(docs/tls-policy.md)",
            "long description: relative links break on PyPI: ['docs/tls-policy.md']",
        ),
        ("License-Expression: MIT\n", "", "metadata: License-Expression != MIT"),
        ("Classifier: Programming Language :: Python :: 3.13\n", "", "metadata: no Python 3.13"),
        ("Project-URL: Issues, https://github.com/iothub-tls/iothub-tls/issues\n", "",
         "metadata: Project-URLs"),
        ("Author: iothub-tls authors\n", "", "metadata: no author"),
    ],
)  # fmt: skip
def test_a_metadata_fault_is_named(check_dist, old, new, expected):
    assert old in GOOD_METADATA
    problems = check_dist.Problems()
    check_dist.check_metadata(email.message_from_string(GOOD_METADATA.replace(old, new)), problems)
    assert any(p.startswith(expected) for p in problems), problems


def test_the_dev_extra_gives_the_test_tools(check_dist):
    tools = check_dist.test_tools(email.message_from_string(GOOD_METADATA))
    assert sorted(tools) == ["hypothesis>=6", "pytest-timeout", "pytest>=7"]


def make_sdist(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name in names:
            info = tarfile.TarInfo(f"iothub_tls-0.1.0/{name}")
            info.size = 0
            archive.addfile(info, io.BytesIO(b""))
    return path


def test_sdist_contents(check_dist, tmp_path):
    complete = list(check_dist.SDIST_MUST_HOLD)
    problems = check_dist.Problems()
    check_dist.check_sdist(make_sdist(tmp_path / "ok.tar.gz", complete), problems)
    assert list(problems) == []

    without = [n for n in complete if n != "scripts/test"] + [".venv/bin/python", "dist/x.whl"]
    problems = check_dist.Problems()
    check_dist.check_sdist(make_sdist(tmp_path / "bad.tar.gz", without), problems)
    assert "sdist: no scripts/test" in problems
    assert "sdist: holds .venv/" in problems
    assert "sdist: holds dist/" in problems
