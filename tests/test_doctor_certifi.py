"""doctor's ``certifi-bundle`` check: are the shipped roots still in Mozilla's root list,
as the installed certifi ships it?

The bundles without a root are made here from certifi's own bundle, minus that root's
PEM block, so the check reads a real Mozilla list that lost one root, as it would the
day Mozilla distrusts it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import ssl
from pathlib import Path

import certifi
import pytest

import iothub_tls as it
from iothub_tls.cli import main
from iothub_tls.diagnostics.doctor import Status, certifi_roots
from iothub_tls.roots import common_name, pem

CERTIFI_VERSION = importlib.metadata.version("certifi")
TODAY = dt.date(2026, 12, 1)
G2 = "DigiCert Global Root G2"
ECC_2017 = "Microsoft ECC Root Certificate Authority 2017"


def bundle_without(tmp_path: Path, *roots: it.RootSet) -> str:
    """certifi's bundle without the PEM blocks of ``roots`` (matched by DER SHA-256)."""
    unwanted = {fp for root_set in roots for fp in root_set.fingerprints}
    data = Path(certifi.where()).read_bytes()
    kept, dropped = [], 0
    for label, block in pem.pem_blocks(data):
        der = ssl.PEM_cert_to_DER_cert(block.decode("ascii"))
        if label == "CERTIFICATE" and hashlib.sha256(der).hexdigest() in unwanted:
            dropped += 1
            continue
        kept.append(block)
    assert dropped == len(unwanted), "certifi's bundle should hold every shipped root"
    path = tmp_path / "cacert.pem"
    path.write_bytes(b"".join(kept))
    return str(path)


def test_installed_certifi_holds_the_shipped_roots():
    check = certifi_roots(today=TODAY)
    assert check.status is Status.OK, check
    assert check.detail == (
        f"certifi {CERTIFI_VERSION} (Mozilla's root list) still holds the 4 shipped roots"
    )
    assert check.remedy is None


def test_a_pinned_root_gone_from_the_bundle_is_a_warning_naming_it(tmp_path):
    [g2] = [c for c in it.AZURE_GLOBAL if common_name(c) == G2]
    bundle = bundle_without(tmp_path, it.RootSet([g2]))
    check = certifi_roots(bundle, CERTIFI_VERSION, today=TODAY)
    assert check.status is Status.WARNING
    assert f"no longer holds '{G2}' (AZURE_GLOBAL)" in check.detail
    assert "Microsoft RSA Root" not in check.detail  # only the missing one is named
    assert "an early sign that Azure will move IoT Hub to another root" in check.detail
    assert check.remedy is not None
    assert "RootSet.from_pem_file" in check.remedy
    assert "keep working until the hub changes its chain" in check.remedy


def test_every_missing_root_is_named_with_its_set(tmp_path):
    bundle = bundle_without(tmp_path, it.AZURE_ECC)
    check = certifi_roots(bundle, CERTIFI_VERSION, today=TODAY)
    assert check.status is Status.WARNING
    assert "'DigiCert Global Root G3' (AZURE_ECC)" in check.detail
    assert f"'{ECC_2017}' (AZURE_ECC)" in check.detail
    assert "AZURE_GLOBAL" not in check.detail


def test_an_old_certifi_says_little_and_is_a_warning():
    check = certifi_roots(certifi.where(), "2019.11.28", today=TODAY)
    assert check.status is Status.WARNING
    assert "certifi 2019.11.28 holds the shipped roots, but it was released" in check.detail
    assert check.remedy == "pip install --upgrade certifi, then run doctor again"
    # its twin: a recent release of the same bundle is fine
    assert certifi_roots(certifi.where(), "2026.10.19", today=TODAY).status is Status.OK


@pytest.mark.parametrize(
    "content,phrase",
    [(None, "cannot read certifi's bundle"), (b"", "holds no certificate")],
)
def test_an_unusable_bundle_is_a_warning(tmp_path, content, phrase):
    path = tmp_path / "cacert.pem"
    if content is not None:
        path.write_bytes(content)
    check = certifi_roots(str(path), CERTIFI_VERSION, today=TODAY)
    assert check.status is Status.WARNING
    assert phrase in check.detail
    assert check.remedy == "pip install --force-reinstall certifi"


def test_doctor_command_reports_a_distrusted_root_without_failing(tmp_path, monkeypatch, capsys):
    """The whole command with certifi pointing at a bundle that lost DigiCert Global
    Root G2: the line is a warning with its remedy, and the platform still complies."""
    bundle = bundle_without(tmp_path, it.AZURE_GLOBAL)
    monkeypatch.setattr(certifi, "where", lambda: bundle)
    assert main(["doctor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    check = next(c for c in data["checks"] if c["name"] == "certifi-bundle")
    assert check["status"] == "warning"
    assert f"'{G2}' (AZURE_GLOBAL)" in check["detail"]
    assert "'Microsoft RSA Root Certificate Authority 2017' (AZURE_GLOBAL)" in check["detail"]

    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    line = next(row for row in text.splitlines() if "certifi-bundle" in row)
    assert line.split()[0] == "warning"
    assert "-> devices pinned to it keep working" in text
