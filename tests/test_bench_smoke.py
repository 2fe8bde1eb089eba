"""The benchmark harness in smoke mode (tiny sizes), so it never rots.

It checks that one command produces the markdown table and the JSON document with the
expected structure, and the facts the comparisons rest on (the ECC and RSA variants
really got different certificates, reconnects really resumed, fragment length was
really negotiated). It never asserts a timing: smoke numbers mean nothing.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.brokers import require_binary

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = [
    "context_creation",
    "handshake",
    "resumption",
    "resumed_handshake",
    "fragment",
    "mqtt_throughput",
    "gateway",
    "first_puback",
    "amqp_multiplex",
]
HEADLINE_KEYS = {"measure", "value", "unit", "low", "high", "target", "met", "note"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    require_binary("mosquitto")
    from bench.run import main

    out = tmp_path_factory.mktemp("bench")
    return main(["--smoke", "--out", str(out)]), out


def test_smoke_run_writes_table_and_json(smoke_run: tuple[int, Path]) -> None:
    code, out = smoke_run
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == 1 and doc["smoke"] is True
    for key in ("cpu", "cores", "python", "openssl", "paho-mqtt", "mosquitto"):
        assert doc["machine"][key], key
    assert list(doc["benchmarks"]) == BENCHMARKS
    for name, bench in doc["benchmarks"].items():
        assert bench["skipped"] is None, (name, bench["skipped"])
        assert bench["title"] and bench["method"], name
        assert bench["headlines"], name
        for headline in bench["headlines"]:
            assert set(headline) == HEADLINE_KEYS, name
        for table in bench["tables"]:
            assert table["rows"] and all(set(row) <= set(table["columns"]) for row in table["rows"])
    assert {row["benchmark"] for row in doc["summary"]} == {
        b["title"] for b in doc["benchmarks"].values()
    }

    md = (out / "results.md").read_text()
    assert "Smoke run" in md
    assert "| benchmark | measure | result | spread | target | met |" in md
    for bench in doc["benchmarks"].values():
        assert f"## {bench['title']}" in md


def test_targets_are_reported_with_their_verdict(smoke_run: tuple[int, Path]) -> None:
    _, out = smoke_run
    doc = json.loads((out / "results.json").read_text())
    targets = {row["measure"]: row for row in doc["summary"] if row.get("target")}
    assert "create_ssl_context() faster than the certifi context" in targets
    assert any("resumed reconnect, server→client bytes" in m for m in targets)
    assert any("MqttDeviceClient overhead vs raw paho" in m for m in targets)
    assert any("client vs paho" in m for m in targets)
    assert all(isinstance(row["met"], bool) for row in targets.values())


def test_comparisons_compare_what_they_claim(smoke_run: tuple[int, Path]) -> None:
    _, out = smoke_run
    benches = json.loads((out / "results.json").read_text())["benchmarks"]

    handshake = benches["handshake"]["data"]
    for cell in handshake.values():
        assert cell["STRONG (RSA)"]["server_key"] == "RSA-2048"
        assert cell["ECC_ONLY (ECDSA)"]["server_key"] == "ECDSA P-256"

    contexts = benches["context_creation"]["data"]
    assert contexts["create_ssl_context()"]["roots_loaded"] == 2
    assert contexts["create_default_context(cafile=certifi)"]["roots_loaded"] > 100

    for version in ("TLS 1.2", "TLS 1.3"):
        resumption = benches["resumption"]["data"][version]
        assert resumption["ratios"]["every_reconnect_resumed"] is True
        assert resumption["full"]["resumed_share"] == 0

        fragment = benches["fragment"]["data"]
        for mfl in (512, 1024, 2048, 4096):
            cell = fragment[f"{version} / {mfl}"]
            assert cell["negotiated"] == mfl
            assert mfl < cell["largest_record"] <= mfl + 64
        assert fragment[f"{version} / none"]["largest_record"] > 16384

    resumed = benches["resumed_handshake"]["data"]["resumed_share"]
    assert all(share == 1.0 for share in resumed.values()), resumed

    boot = benches["first_puback"]["data"]["programs"]
    assert set(boot) == {"MqttDeviceClient", "MqttDeviceClient, RootSet.from_pem_file", "raw paho"}
    assert all(p["start -> first PUBACK"]["n"] == 2 for p in boot.values())

    for run in benches["gateway"]["data"]["runs"]:
        # both stacks came back and delivered what they queued while the broker was down
        assert run["back"] == run["n"], run
        assert run["acknowledged"] == run["n"], run
        assert run["received_by_subscriber"] == run["n"], run
        assert run["broker_protocol_errors"] == 0, run


def test_one_command_as_a_script(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--smoke", "--only", "fragment", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "results.json").read_text())
    assert list(doc["benchmarks"]) == ["fragment"]
    assert (tmp_path / "results.md").read_text().startswith("# Benchmark results")


def test_unknown_benchmark_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.run import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--smoke", "--only", "handshakes"])
    assert exit_info.value.code == 2
    assert (
        "unknown benchmark(s) handshakes; choose from context_creation" in capsys.readouterr().err
    )


def test_hub_flood_script_at_tiny_size() -> None:
    """bench/hub_flood.py against a real `serve`: 6 silent TLS connections on a door
    capped at 4. Facts only (who was held, who refused, what was logged), no numbers."""
    command = [
        sys.executable, "bench/hub_flood.py", "--connections", "6", "--rounds", "1",
        "--max-connections", "4", "--settle", "5", "--json",
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    [round_] = result["rounds"]
    assert (round_["held_open"], round_["refused_at_handshake"]) == (4, 2)
    assert result["refusals_logged"] == 2
    before, during, after = round_["threads"]
    assert during == before and after == before  # no thread per served connection


def test_import_time_script_at_tiny_size():
    """bench/import_time.py in fresh interpreters: every measure has its samples, the
    handshake really happened (the child checks the anchor), and the attribution shows
    the package imported without cryptography.x509. Facts only, no numbers."""
    done = subprocess.run(
        [sys.executable, "bench/import_time.py", "--rounds", "3", "--attribution", "1", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    current = result["trees"]["current"]
    assert set(current) == {"import", "start -> context", "start -> first handshake", "x509 later"}
    assert all(summary["n"] == 3 for summary in current.values())
    attribution = result["attribution_us"]["current"]
    assert "iothub_tls" in attribution
    assert "cryptography.x509" not in attribution


# -- bench/ stands on the package alone ---------------------------------------------------


def _test_imports(source: str) -> list[str]:
    """Modules of this repository's ``tests`` package that ``source`` imports, at any
    depth (inside functions too), absolute or relative."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:  # from ..tests import x: out of bench/ into the repository
                names = [f"{'.' * node.level}{node.module or ''}"]
            else:
                names = [node.module or ""] if node.level == 0 else []
        else:
            continue
        found += [n for n in names if n == "tests" or n.startswith(("tests.", ".."))]
    return found


def test_bench_imports_no_test_module() -> None:
    sources = sorted((REPO / "bench").glob("**/*.py"))
    assert len(sources) > 10
    imports = {p.name: _test_imports(p.read_text(encoding="utf-8")) for p in sources}
    assert {name: found for name, found in imports.items() if found} == {}


@pytest.mark.parametrize(
    "source",
    [
        "from tests.brokers import Mosquitto",
        "import tests.pki as pki",
        "import tests",
        "def f():\n    from tests import conftest\n",
        "from ..tests import brokers",
    ],
)
def test_the_import_scan_sees_a_test_module(source: str) -> None:
    assert _test_imports(source) != []


def test_the_import_scan_lets_the_package_through() -> None:
    source = "from iothub_tls.testing.server import HubLikeServer\nfrom ._pki import HOST\n"
    assert _test_imports(source) == []


def test_amqp_multiplex_measured_one_connection_against_one_per_device(
    smoke_run: tuple[int, Path],
) -> None:
    """The facts the multiplexing comparison rests on: every stack ran, the gateway made
    one handshake for its devices (and one on the restart), the separate clients one each."""
    _, out = smoke_run
    runs = json.loads((out / "results.json").read_text())["benchmarks"]["amqp_multiplex"]
    measured = runs["data"]["runs"]
    assert [m.get("error") for stack in measured.values() for m in stack] == [None] * 3
    [gateway], [separate], [single] = measured["gateway"], measured["separate"], measured["single"]
    assert (gateway["handshakes"], gateway["handshakes_restart"]) == (1, 1)
    assert separate["handshakes"] == separate["handshakes_restart"] == separate["n"]
    assert gateway["resumed"] == separate["resumed"] == gateway["n"]
    assert single["msgs_per_s"] > 0
