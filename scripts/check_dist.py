"""Build the sdist and the wheel as a release would, and check them as PyPI and a user would.

::

    python scripts/check_dist.py              # from the repository root, with build and twine
    python scripts/check_dist.py --keep DIR   # leave dist/, the unpacked sdist and its venv in DIR

1. ``python -m build``: the sdist, then the wheel built *from that sdist* (so the sdist
   holds everything the build needs);
2. ``twine check --strict``: the metadata and the long description render on PyPI;
3. the wheel: LICENSE, py.typed, the four shipped root PEMs, the ``iothub-tls`` entry
   point, the metadata this project promises (license expression, Project-URLs, Python
   classifiers, authors), a long description without relative links, and no tests,
   benchmarks, docs, scripts or bytecode;
4. the sdist: LICENSE, README, CHANGELOG, pyproject.toml, scripts/test, tests/, docs/,
   bench/, samples/ and the package, and nothing from a working copy (.git, .venv,
   __pycache__, dist);
5. the sdist's own tests: unpacked in a temporary directory, installed (runtime
   dependencies only, plus the test tools of its ``dev`` extra) into a fresh venv, its
   ``iothub_tls/`` source removed so the installed copy is what runs, and the core test
   files run there with pytest.

Exit 0 when everything holds; otherwise 1, with every problem listed.
"""

from __future__ import annotations

import argparse
import email
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import venv
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# tarfile's extraction filters exist from 3.10.12 / 3.11.4 on
_SAFE_EXTRACT: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
ROOT_PEMS = (
    "digicert_global_root_g2.pem",
    "digicert_global_root_g3.pem",
    "microsoft_ecc_root_2017.pem",
    "microsoft_rsa_root_2017.pem",
)
PROJECT_URLS = ("Homepage", "Documentation", "Source", "Issues", "Changelog")
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
#: Test files that need nothing but the runtime dependencies and the openssl binary.
CORE_TESTS = (
    "tests/test_policy.py",
    "tests/test_context.py",
    "tests/test_auth.py",
    "tests/test_public_api.py",
    "tests/test_import_cost.py",
    "tests/test_doctor_certifi.py",
    "tests/test_check_dist.py",
)
#: From the dev extra: what the core tests need besides the package.
TEST_TOOLS = {"pytest", "pytest-timeout", "hypothesis"}
SDIST_MUST_HOLD = (
    "PKG-INFO",
    "pyproject.toml",
    "LICENSE",
    "README.md",
    "CHANGELOG.md",
    "scripts/test",
    "scripts/check_dist.py",
    "tests/conftest.py",
    *CORE_TESTS,
    "docs/tls-policy.md",
    "bench/run.py",
    "bench/import_time.py",
    "samples/mqtt_telemetry.py",
    "iothub_tls/__init__.py",
    "iothub_tls/py.typed",
    *(f"iothub_tls/roots/{pem}" for pem in ROOT_PEMS),
)
_MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


class Problems(list[str]):
    def need(self, condition: bool, message: str) -> None:
        if not condition:
            self.append(message)


def run(command: Sequence[str | Path], **kwargs: object) -> None:
    shown = " ".join(str(c) for c in command)
    print(f"-- {shown}", flush=True)
    subprocess.run([str(c) for c in command], check=True, **kwargs)  # type: ignore[call-overload]


def build(out: Path) -> tuple[Path, Path]:
    run([sys.executable, "-m", "build", "--outdir", out, REPO])
    [sdist] = out.glob("*.tar.gz")
    [wheel] = out.glob("*.whl")
    run([sys.executable, "-m", "twine", "check", "--strict", sdist, wheel])
    return sdist, wheel


def check_wheel(wheel: Path, problems: Problems) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [dist_info] = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        metadata = email.message_from_bytes(archive.read(f"{dist_info}/METADATA"))
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    problems.need(f"{dist_info}/licenses/LICENSE" in names, "wheel: no LICENSE in .dist-info")
    problems.need("iothub_tls/py.typed" in names, "wheel: no iothub_tls/py.typed")
    for pem in ROOT_PEMS:
        problems.need(f"iothub_tls/roots/{pem}" in names, f"wheel: no shipped root {pem}")
    tops = {n.split("/")[0] for n in names}
    problems.need(
        tops == {"iothub_tls", dist_info}, f"wheel: unexpected top-level entries {sorted(tops)}"
    )
    stray = [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
    problems.need(not stray, f"wheel: bytecode {stray[:3]}")
    tests = [n for n in names if "/tests/" in n or n.split("/")[-1].startswith("test_")]
    problems.need(not tests, f"wheel: test files {tests[:3]}")
    problems.need(
        "iothub-tls = iothub_tls.cli:main" in entry_points, "wheel: no iothub-tls entry point"
    )
    check_metadata(metadata, problems)
    return metadata


def check_metadata(metadata: email.message.Message, problems: Problems) -> None:
    problems.need(metadata["License-Expression"] == "MIT", "metadata: License-Expression != MIT")
    problems.need(metadata.get_all("License-File") == ["LICENSE"], "metadata: License-File")
    problems.need(metadata["Requires-Python"] == ">=3.10", "metadata: Requires-Python")
    problems.need(bool(metadata["Author"] or metadata["Author-email"]), "metadata: no author")
    problems.need(
        bool(metadata["Maintainer"] or metadata["Maintainer-email"]), "metadata: no maintainer"
    )
    urls = {u.split(",")[0].strip() for u in metadata.get_all("Project-URL") or []}
    problems.need(urls == set(PROJECT_URLS), f"metadata: Project-URLs {sorted(urls)}")
    classifiers = set(metadata.get_all("Classifier") or [])
    for version in PYTHONS:
        problems.need(
            f"Programming Language :: Python :: {version}" in classifiers,
            f"metadata: no Python {version} classifier",
        )
    for wanted in (
        "Development Status :: 4 - Beta",
        "Intended Audience :: Developers",
        "Operating System :: POSIX :: Linux",
        "Topic :: Internet",
        "Topic :: Security",
        "Typing :: Typed",
    ):
        problems.need(wanted in classifiers, f"metadata: no classifier {wanted!r}")
    problems.need(
        metadata["Description-Content-Type"] == "text/markdown",
        "metadata: the long description is not markdown",
    )
    description = metadata.get_payload()
    problems.need("# iothub-tls" in str(description), "metadata: the README is not the description")
    relative = [
        target
        for target in _MARKDOWN_LINK.findall(str(description))
        if not target.startswith(("https://", "http://", "#", "mailto:"))
    ]
    problems.need(not relative, f"long description: relative links break on PyPI: {relative}")


def check_sdist(sdist: Path, problems: Problems) -> None:
    with tarfile.open(sdist) as archive:
        prefix = archive.getnames()[0].split("/")[0]
        names = {n.removeprefix(f"{prefix}/") for n in archive.getnames()}
    for wanted in SDIST_MUST_HOLD:
        problems.need(wanted in names, f"sdist: no {wanted}")
    for unwanted in (".git", ".venv", ".ci", "dist", "build", ".pytest_cache", ".mypy_cache"):
        found = [n for n in names if n == unwanted or n.startswith(f"{unwanted}/")]
        problems.need(not found, f"sdist: holds {unwanted}/")
    stray = [n for n in names if "__pycache__" in n or n.endswith(".pyc") or ".venv" in n]
    problems.need(not stray, f"sdist: working-copy files {stray[:3]}")


def test_tools(metadata: email.message.Message) -> list[str]:
    """The dev extra's requirements for the tools in TEST_TOOLS, as the wheel states them."""
    found = []
    for requirement in metadata.get_all("Requires-Dist") or []:
        spec, _, marker = requirement.partition(";")
        name = re.split(r"[<>=!~\[ (]", spec.strip(), maxsplit=1)[0].lower()
        if name in TEST_TOOLS and re.search(r"extra\s*==\s*['\"]dev['\"]", marker):
            found.append(spec.strip())
    return found


def test_from_sdist(
    sdist: Path, work: Path, metadata: email.message.Message, problems: Problems
) -> None:
    with tarfile.open(sdist) as archive:
        archive.extractall(work, **_SAFE_EXTRACT)
    [unpacked] = [p for p in work.iterdir() if p.is_dir() and p.name.startswith("iothub_tls-")]
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    tools = test_tools(metadata)
    problems.need(len(tools) == len(TEST_TOOLS), f"dev extra: test tools found {tools}")
    run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    run([python, "-m", "pip", "install", "-q", unpacked, *tools])
    # The tests must exercise the installed copy (built from this sdist), not the source.
    shutil.rmtree(unpacked / "iothub_tls")
    where = subprocess.run(
        [python, "-c", "import iothub_tls; print(iothub_tls.__file__)"],
        cwd=unpacked,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    problems.need(
        where.startswith(str(env_dir)), f"the tests would import {where}, not the installed copy"
    )
    done = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CORE_TESTS], cwd=unpacked
    )
    problems.need(done.returncode == 0, f"the core tests failed in the unpacked sdist ({done})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    parser.add_argument(
        "--no-tests", action="store_true", help="skip the tests from the unpacked sdist"
    )
    args = parser.parse_args(argv)
    problems = Problems()
    with tempfile.TemporaryDirectory(prefix="iothub-tls-dist-") as tmp:
        work = args.keep or Path(tmp)
        if args.keep:
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
        sdist, wheel = build(work / "dist")
        print(f"-- wheel {wheel.name}: {wheel.stat().st_size / 1024:.0f} KiB; "
              f"sdist {sdist.name}: {sdist.stat().st_size / 1024:.0f} KiB")  # fmt: skip
        metadata = check_wheel(wheel, problems)
        check_sdist(sdist, problems)
        if not args.no_tests:
            test_from_sdist(sdist, work / "unpacked", metadata, problems)
    for problem in problems:
        print(f"!! {problem}", file=sys.stderr)
    if problems:
        print(f"!! {len(problems)} problem(s) with the distributions", file=sys.stderr)
        return 1
    print("-- sdist and wheel: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
