"""``iothub-tls audit``: connection logs in every accepted form give the verdicts IoT
Hub's rules call for; rows that cannot be read are counted with their line numbers; the
local hub's own log audits to what its clients did; the HTML report renders in a real
browser without a single request; memory does not grow with the log."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

import iothub_tls as it
from iothub_tls.audit import AuditInputError, AuditPolicy, Verdict, audit
from iothub_tls.audit.fields import field_of, normalize_time, normalize_tls
from iothub_tls.audit.render import to_html
from iothub_tls.audit.rules import judge
from iothub_tls.cli import main
from iothub_tls.policy import ECC_SUITES, STRONG_SUITES, WEAK_SUITES
from iothub_tls.testing.fleetlogs import (
    EXTENDED_COLUMNS,
    KQL_NAMED_COLUMNS,
    Fleet,
    write_azure_jsonl,
    write_azure_records,
    write_kql_csv,
    write_kql_json,
    write_kql_tables,
    write_local,
)
from tests.browser import Chromium, png_pixels

ROWS = 3000


def verdicts(report) -> dict[str, str]:
    return {d.device_id: d.verdict.value for d in report.devices if d.device_id}


# -- names and values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("DeviceId", "device"),
        ("TLSVersion", "tls"),
        ("props_json_deviceId", "device"),
        ("props_json.tlsVersion", "tls"),
        ("props_json_protocol", "protocol"),
        ("CipherSuite", "suite"),
        ("TimeGenerated [UTC]", "time"),
        ("OperationName", "operation"),
        ("maskedIpAddress", "caller"),
        ("properties_s", "properties"),
        ("SomethingElse", None),
        ("props_json", None),
    ],
)
def test_column_names_as_kql_exports_spell_them(name, field):
    assert field_of(name) == field


@pytest.mark.parametrize(
    ("raw", "version"),
    [
        ("1.2", "1.2"),
        ("TLSv1.2", "1.2"),
        ("TLS 1.1", "1.1"),
        ("Tls12", "1.2"),
        ("TLS1_3", "1.3"),
        ("TLSv1", "1.0"),
        ("1.0", "1.0"),
        ("SSLv3", "SSL3"),
        ("", ""),
        ("null", ""),
        ("TLSv9.9", None),
        ("fast", None),
    ],
)
def test_tls_versions_as_logs_spell_them(raw, version):
    assert normalize_tls(raw) == version


def test_times_become_ordered_utc_strings():
    assert normalize_time("2025-08-30T10:21:33.1234567Z") == "2025-08-30T10:21:33.1234567Z"
    assert normalize_time("2025-08-30 12:21:33+02:00") == "2025-08-30T10:21:33.000000Z"
    assert normalize_time("8/30/2025, 10:21:33.123 PM") == "2025-08-30T22:21:33.123000Z"
    assert normalize_time("") == ""
    assert normalize_time("yesterday") is None
    assert normalize_time("2025-02-30 00:00:00+01:00") is None


# -- the rules, from the one cipher table -------------------------------------------------


def test_every_suite_of_the_table_judged_by_its_row():
    strong, ecc = AuditPolicy(), AuditPolicy(ecc_only=True)
    for suite in STRONG_SUITES:
        for name in (suite.iana, suite.openssl):
            assert judge(strong, "MQTT", "1.2", name)[0] is Verdict.COMPLIANT, name
            expected = Verdict.COMPLIANT if suite in ECC_SUITES else Verdict.WILL_BE_REFUSED
            assert judge(ecc, "MQTT", "1.2", name)[0] is expected, name
    for suite in WEAK_SUITES:
        for name in (suite.iana, suite.openssl):
            verdict, reason = judge(strong, "AMQP", "1.2", name)
            assert verdict is Verdict.WILL_BE_REFUSED
            assert reason == f"weak suite {suite.iana}"


def test_version_and_missing_evidence_rules():
    policy = AuditPolicy()
    assert judge(policy, "MQTT", "1.1", "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA") == (
        Verdict.WILL_BE_REFUSED,
        "TLS 1.1",
    )
    assert judge(policy, "MQTT", "1.3", "TLS_AES_128_GCM_SHA256")[0] is Verdict.COMPLIANT
    assert judge(policy, "MQTT", "1.3", "")[0] is Verdict.COMPLIANT
    verdict, reason = judge(policy, "HTTPS", "", "")
    assert verdict is Verdict.UNKNOWN and "HTTPS" in reason
    verdict, reason = judge(policy, "MQTT", "1.2", "")
    assert verdict is Verdict.UNKNOWN and "cipher suite not logged" in reason
    verdict, reason = judge(policy, "MQTT", "1.2", "TLS_RSA_WITH_3DES_EDE_CBC_SHA")
    assert verdict is Verdict.WILL_BE_REFUSED and "not one of IoT Hub's strong" in reason
    tls13 = AuditPolicy(min_tls="1.3")
    assert judge(tls13, "MQTT", "1.2", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256")[0] is (
        Verdict.WILL_BE_REFUSED
    )


def test_policy_refuses_a_minimum_below_12():
    with pytest.raises(it.PolicyError, match="not a policy IoT Hub has"):
        AuditPolicy(min_tls="1.1")


# -- every format ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return Fleet(40)


def _gzip(path: Path, name: str) -> Path:
    target = path.with_name(name)
    target.write_bytes(gzip.compress(path.read_bytes()))
    return target


FORMATS = {
    "azure resource log, JSON lines": (lambda p, f: write_azure_jsonl(p, f, ROWS), True),
    "azure resource log, gzip, named .json": (
        lambda p, f: write_azure_jsonl(p, f, ROWS, compress=True),
        True,
    ),
    "azure records document, pretty": (lambda p, f: write_azure_records(p, f, ROWS), True),
    "azure records document, one line": (
        lambda p, f: write_azure_records(p, f, ROWS, indent=None),
        True,
    ),
    "kql csv, the guidance's columns": (lambda p, f: write_kql_csv(p, f, ROWS), False),
    "kql csv, more columns": (lambda p, f: write_kql_csv(p, f, ROWS, EXTENDED_COLUMNS), True),
    "kql csv, unnamed projection (props_json_*)": (
        lambda p, f: write_kql_csv(p, f, ROWS, KQL_NAMED_COLUMNS),
        True,
    ),
    "kql json (az cli), the guidance's columns": (lambda p, f: write_kql_json(p, f, ROWS), False),
    "kql json (az cli), more columns": (
        lambda p, f: write_kql_json(p, f, ROWS, EXTENDED_COLUMNS),
        True,
    ),
    "log analytics api tables": (
        lambda p, f: write_kql_tables(p, f, ROWS, KQL_NAMED_COLUMNS),
        True,
    ),
    "local hub log": (lambda p, f: write_local(p, f, ROWS), True),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_gives_the_fleets_verdicts(tmp_path, fleet, name):
    write, suites_logged = FORMATS[name]
    path = write(tmp_path / "connections.json", fleet)
    report = audit([str(path)])
    assert report.rejected == 0
    assert report.rows == ROWS
    assert report.connections == ROWS
    assert verdicts(report) == fleet.expected(suites_logged=suites_logged)
    refused = [d for d in report.devices if d.verdict is Verdict.WILL_BE_REFUSED]
    assert report.devices[: len(refused)] == refused, "sorted by risk"
    for device in refused:
        profile = fleet.profiles[device.device_id]
        reasons = [f.reason for f in device.reasons()]
        if profile.name in ("tls11", "fallback"):
            assert "TLS 1.1" in reasons
        elif profile.name == "tls10":
            assert reasons == ["TLS 1.0"]
        elif profile.name == "weak":
            assert reasons == ["weak suite TLS_RSA_WITH_AES_128_GCM_SHA256"]


def test_ecc_only_policy(tmp_path, fleet):
    path = write_kql_csv(tmp_path / "c.csv", fleet, ROWS, EXTENDED_COLUMNS)
    report = audit([str(path)], AuditPolicy(ecc_only=True))
    assert verdicts(report) == fleet.expected(ecc_only=True)
    rsa = next(d for d in report.devices if d.device_id.startswith("dev-rsa-"))
    assert rsa.reasons()[0].reason.startswith("RSA suite TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256")


def test_counts_and_last_seen_per_version_and_suite(tmp_path, fleet):
    path = write_azure_jsonl(tmp_path / "a.jsonl", fleet, ROWS)
    report = audit([str(path)])
    device = next(d for d in report.devices if d.device_id.startswith("dev-fallback-"))
    mine = [c for c in fleet.connections(ROWS) if c.device == device.device_id]
    for version in ("1.1", "1.2"):
        used = [c for c in mine if c.tls == version]
        assert device.tls[version].connections == len(used)
        assert device.tls[version].last_seen == used[-1].iso
    weak = [c for c in mine if c.suite == "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA"]
    assert device.suites["TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA"].connections == len(weak)
    assert device.last_seen == mine[-1].iso
    assert device.protocols == {"MQTT": len(mine)}
    finding = device.reasons()[0]
    assert finding.tally.connections == len(weak) and finding.tally.last_seen == weak[-1].iso


def test_order_of_rows_does_not_change_last_seen(tmp_path, fleet):
    path = write_azure_jsonl(tmp_path / "a.jsonl", fleet, ROWS)
    lines = path.read_text().splitlines()
    shuffled = tmp_path / "newest-first.jsonl"
    shuffled.write_text("\n".join(reversed(lines)) + "\n")
    forward, backward = audit([str(path)]), audit([str(shuffled)])
    assert [d.as_dict() for d in forward.devices] == [d.as_dict() for d in backward.devices]


def test_timeline_turns_hours_into_days_for_long_logs(tmp_path, monkeypatch):
    """The timeline is kept per hour until the log spans too many hours, then per day:
    it grows with the days a log covers, never with its rows."""
    import iothub_tls.audit.aggregate as aggregate

    monkeypatch.setattr(aggregate, "MAX_PERIODS", 48)
    fleet = Fleet(40, step=dt.timedelta(minutes=20))
    path = write_azure_jsonl(tmp_path / "a.jsonl", fleet, ROWS)  # ~42 days
    report = audit([str(path)])
    periods = {period for period, _ in report.timeline}
    assert all(len(p) == 10 for p in periods) and len(periods) == 42
    assert sum(report.timeline.values()) == ROWS
    assert "deviceConnect events per day" in to_html(report)


def test_several_inputs_add_up(tmp_path, fleet):
    a = write_azure_jsonl(tmp_path / "a.jsonl", fleet, ROWS)
    b = write_kql_csv(tmp_path / "b.csv", fleet, ROWS, EXTENDED_COLUMNS)
    report = audit([str(a), str(b)])
    assert report.connections == 2 * ROWS
    assert [i.format for i in report.inputs] == ["JSON lines", "CSV"]


def test_disconnects_and_other_operations_are_not_judged(tmp_path, fleet):
    path = write_azure_jsonl(tmp_path / "a.jsonl", fleet, ROWS, disconnects=True)
    report = audit([str(path)])
    assert report.connections == ROWS
    assert report.other_operations == {"deviceDisconnect": ROWS}
    assert verdicts(report) == fleet.expected()


def test_gzip_is_told_by_its_magic_bytes_not_its_name(tmp_path, fleet):
    plain = write_kql_csv(tmp_path / "c.csv", fleet, ROWS, EXTENDED_COLUMNS)
    zipped = _gzip(plain, "export.csv")  # gzip data, .csv name
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    misnamed = tmp_path / "export.csv.gz"  # plain text, .gz name
    misnamed.write_bytes(plain.read_bytes())
    for path in (zipped, misnamed):
        report = audit([str(path)])
        assert report.rows == ROWS, path
    assert audit([str(zipped)]).inputs[0].format == "CSV, gzip"


def test_columns_in_any_order_and_a_bom(tmp_path, fleet):
    path = write_kql_csv(tmp_path / "c.csv", fleet, ROWS, tuple(reversed(EXTENDED_COLUMNS)))
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert verdicts(audit([str(bom)])) == fleet.expected()


@pytest.mark.parametrize("separator", [";", "\t"])
def test_other_csv_separators(tmp_path, separator):
    path = tmp_path / "export.csv"
    path.write_text(separator.join(("DeviceId", "TLSVersion")) + "\ndev-a" + separator + "1.1\n")
    report = audit([str(path)])
    assert [(d.device_id, d.reasons()[0].reason) for d in report.devices] == [("dev-a", "TLS 1.1")]


def test_local_hub_log_variants_learned_on_the_way(tmp_path):
    """Lines of another layout (a refused handshake: no device, no SNI) mixed into a
    log of successes are read too, and audited per client address."""
    lines = []
    for i in range(500):
        event = it_event(f"dev-{i % 5}", "TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256", i)
        lines.append(json.dumps(event))
        if i % 50 == 0:
            refused = it_event(None, None, None, i, reason="TLS handshake failed: NO_SHARED_CIPHER")
            lines.append(json.dumps(refused))
    path = tmp_path / "hub.log"
    path.write_text("\n".join(lines) + "\n")
    report = audit([str(path)])
    assert report.rejected == 0 and report.rows == 510
    client = next(d for d in report.devices if d.device_id is None)
    assert client.caller == "10.1.2.3" and client.connections == 10
    assert client.verdict is Verdict.WILL_BE_REFUSED
    assert "no strong cipher suite" in client.reasons()[0].reason
    assert {d.device_id for d in report.devices if d.device_id} == {f"dev-{i}" for i in range(5)}


def it_event(device, tls, cipher, i, reason=None):
    from iothub_tls.hub.log import ConnectionEvent

    return ConnectionEvent(
        "deviceConnect",
        "Mqtt",
        "Failure" if reason else "Success",
        device_id=device,
        tls_version=tls,
        cipher=cipher,
        sni=None if reason else "localhost",
        reason=reason,
        caller=f"10.1.2.3:{40000 + i}",
        time=f"2025-08-01T00:{i // 60 % 60:02d}:{i % 60:02d}.000Z",
    ).to_json()


# -- several processes ---------------------------------------------------------------------


def _with_bad_lines(path: Path, every: int, bad: str) -> None:
    lines = path.read_text().splitlines()
    for i in range(every, len(lines), every):
        lines[i] = bad
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("kind", ["jsonl", "csv", "csv-multiline"])
def test_several_processes_give_the_same_audit(tmp_path, fleet, monkeypatch, kind):
    import iothub_tls.audit as audit_module

    if kind == "jsonl":
        path = write_azure_jsonl(tmp_path / "a.jsonl", fleet, ROWS)
        _with_bad_lines(path, 97, "not JSON at all")
    else:
        path = write_kql_csv(tmp_path / "c.csv", fleet, ROWS, EXTENDED_COLUMNS)
        _with_bad_lines(path, 89, "2025-08-01T00:00:00Z,dev-x,Mqtt,TLS 9,X")
        if kind == "csv-multiline":  # a quoted field holding newlines, mid-file
            lines = path.read_text().splitlines()
            lines[ROWS // 2] = '2025-08-01T00:00:00Z,"dev\nwith\nnewlines",Mqtt,1.2,X'
            path.write_text("\n".join(lines) + "\n")
    one = audit([str(path)], jobs=1)
    monkeypatch.setattr(audit_module, "MIN_PARALLEL_BYTES", 1)
    two = audit([str(path)], jobs=2)
    three = audit([str(path)], jobs=3)
    for other in (two, three):
        assert [d.as_dict() for d in other.devices] == [d.as_dict() for d in one.devices]
        assert other.inputs[0].as_dict() == one.inputs[0].as_dict()
        assert other.timeline == one.timeline
    assert one.inputs[0].rejected > 20


def test_times_with_an_offset_take_the_slow_path_once(tmp_path, fleet):
    """Lines whose times carry a +02:00 offset match no template: they are read by
    json, their times turned to UTC, and the layout is not relearned on every line."""
    path = write_azure_jsonl(tmp_path / "a.jsonl", fleet, ROWS)
    text = re.sub(
        r'"time": "(\d{4}-\d\d-\d\d)T(\d\d):(\d\d:\d\d\.\d+)0Z"',
        lambda m: f'"time": "{m[1]}T{int(m[2]) + 2:02d}:{m[3]}+02:00"',
        path.read_text(),
    )
    shifted = tmp_path / "offset.jsonl"
    shifted.write_text(text)
    plain, offset = audit([str(path)]), audit([str(shifted)])
    assert verdicts(offset) == fleet.expected()
    for a, b in zip(plain.devices, offset.devices, strict=True):
        assert a.device_id == b.device_id and a.last_seen[:19] == b.last_seen[:19]


# -- rows that cannot be read -----------------------------------------------------------


def test_bad_json_lines_are_counted_with_their_line_numbers(tmp_path, fleet):
    path = write_azure_jsonl(tmp_path / "a.jsonl", fleet, 400)
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    bad_version = dict(record, properties=record["properties"].replace('"1.', '"9.'))
    other = dict(record, category="DeviceTelemetry", properties='{"messageSize":"12"}')
    inserted = {
        10: "this is not JSON",
        55: json.dumps(bad_version),
        120: lines[5][: len(lines[5]) // 2],  # cut short
        300: json.dumps(dict(record, time="the day before yesterday")),
        301: json.dumps(other),
    }
    for number in sorted(inserted):
        lines.insert(number - 1, inserted[number])
    path.write_text("\n".join(lines) + "\n")
    report = audit([str(path)])
    stats = report.inputs[0]
    assert stats.rejected == len(inserted)
    assert stats.lines == sorted(inserted)
    assert stats.reasons == {
        "not JSON": 2,
        "unreadable TLS version": 1,
        "unreadable time": 1,
        "not a connection record": 1,
    }
    assert report.rows == 400


def test_listed_line_numbers_are_capped_the_count_is_not(tmp_path, fleet):
    path = write_kql_csv(tmp_path / "c.csv", fleet, 200, EXTENDED_COLUMNS)
    lines = path.read_text().splitlines()
    for i in range(60):
        lines.insert(2 + i * 3, "2025-08-01T00:00:00Z,dev-x,Mqtt,TLS 7,TLS_FOO")
    path.write_text("\r\n".join(lines) + "\r\n")
    stats = audit([str(path)]).inputs[0]
    assert stats.rejected == 60
    assert len(stats.lines) == 20 and stats.lines[0] == 3 and stats.lines[1] == 6
    assert stats.as_dict()["rejectedLinesTruncated"] is True


def test_bad_csv_rows(tmp_path, fleet):
    path = write_kql_csv(tmp_path / "c.csv", fleet, 50, EXTENDED_COLUMNS)
    lines = path.read_text().splitlines()
    lines.insert(4, "only,three,columns")  # line 5
    lines.insert(9, "31/31/2025 99:00,dev-1,Mqtt,1.2,TLS_AES_128_GCM_SHA256")  # line 10
    path.write_text("\n".join(lines) + "\n")
    stats = audit([str(path)]).inputs[0]
    assert stats.lines == [5, 10]
    assert set(stats.reasons) == {"3 columns, the header has 5", "unreadable time"}


def test_a_json_document_cut_short_keeps_what_was_read(tmp_path, fleet):
    path = write_azure_records(tmp_path / "r.json", fleet, 100)
    text = path.read_text()
    path.write_text(text[: len(text) * 3 // 4])
    report = audit([str(path)])
    assert 60 < report.rows < 80
    stats = report.inputs[0]
    assert stats.rejected == 1 and "JSON ends early or breaks" in next(iter(stats.reasons))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary data"),
        (b"name,age\nalice,3\n", "no DeviceId column"),
        (b'{"hello": "world"}\n{"foo": 1}\n', "no connection rows"),
        (b"[1, 2, 3]", "no connection rows"),
    ],
)
def test_not_a_log_at_all(tmp_path, content, message):
    path = tmp_path / "input"
    path.write_bytes(content)
    with pytest.raises(AuditInputError, match=message):
        audit([str(path)])


def test_a_gzip_file_cut_short_cannot_be_read(tmp_path, fleet):
    path = write_azure_jsonl(tmp_path / "a.jsonl.gz", fleet, ROWS, compress=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AuditInputError, match="cannot read"):
        audit([str(path)])


def test_missing_file(tmp_path):
    with pytest.raises(AuditInputError, match="no such file"):
        audit([str(tmp_path / "nope.csv")])


# -- the command ---------------------------------------------------------------------------


def test_exit_codes(tmp_path, fleet, capsys):
    mixed = write_azure_jsonl(tmp_path / "mixed.jsonl", fleet, ROWS)
    good = tmp_path / "good.jsonl"
    good.write_text(
        "\n".join(
            line
            for line in mixed.read_text().splitlines()
            if "dev-tls13-" in line or "dev-ecc-" in line
        )
        + "\n"
    )
    https = tmp_path / "https.jsonl"
    https.write_text(
        "\n".join(line for line in mixed.read_text().splitlines() if "dev-https-" in line) + "\n"
    )
    assert main(["audit", str(good)]) == 0
    assert main(["audit", str(mixed)]) == 1
    assert main(["audit", str(https)]) == 1
    assert main(["audit", str(https), "--allow-unknown"]) == 0
    capsys.readouterr()
    assert main(["audit", str(tmp_path / "missing.csv")]) == 2
    assert "iothub-tls audit: error:" in capsys.readouterr().err
    assert main(["audit", str(good), "--min-tls", "1.1"]) == 2  # not a choice


def test_terminal_table(tmp_path, fleet, capsys):
    path = write_azure_jsonl(tmp_path / "a.jsonl", fleet, ROWS)
    assert main(["audit", str(path), "--limit", "3"]) == 1
    out = capsys.readouterr().out
    assert "policy: TLS 1.2 or later, strong suites only" in out
    table = [line for line in out.splitlines() if line.startswith(("will-be-refused", "unknown"))]
    assert len(table) == 3 and all(line.startswith("will-be-refused") for line in table)
    assert "(showing 3 of 40 devices" in out


def test_json_and_csv_outputs(tmp_path, fleet, capsys):
    path = write_azure_jsonl(tmp_path / "a.jsonl", fleet, ROWS)
    assert main(["audit", str(path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["exitCode"] == 1
    assert doc["summary"]["devices"] == 40 and doc["summary"]["connections"] == ROWS
    assert {d["deviceId"]: d["verdict"] for d in doc["devices"]} == fleet.expected()
    assert sum(row["connections"] for row in doc["timeline"]) == ROWS
    assert main(["audit", str(path), "--csv"]) == 1
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["deviceId"]: r["verdict"] for r in rows} == fleet.expected()
    tls11 = next(r for r in rows if r["deviceId"].startswith("dev-tls11-"))
    assert tls11["tlsVersions"].startswith("1.1:") and tls11["reasons"] == "TLS 1.1"


def test_json_error_is_json(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "missing"), "--json"]) == 2
    assert "no such file" in json.loads(capsys.readouterr().out)["error"]


def test_standard_input(tmp_path, fleet):
    path = write_kql_csv(tmp_path / "c.csv", fleet, ROWS, compress=True)
    result = subprocess.run(
        [sys.executable, "-m", "iothub_tls", "audit", "-", "--csv"],
        input=path.read_bytes(),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout.decode())))
    assert {r["deviceId"]: r["verdict"] for r in rows} == fleet.expected(suites_logged=False)


def test_help_explains_itself(capsys):
    assert main(["audit", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("will-be-refused", "unknown", "compliant", "examples:", "--ecc-only", "--html"):
        assert text in out
    assert "project DeviceId = props_json.deviceId" in out


def test_docs_present_every_option():
    from iothub_tls.cli import build_parser

    parser = build_parser()
    audit_parser = parser._subparsers._group_actions[0].choices["audit"]  # type: ignore[union-attr]
    docs = (Path(__file__).resolve().parent.parent / "docs" / "audit.md").read_text()
    options = [o for a in audit_parser._actions for o in a.option_strings if o.startswith("--")]
    assert len(options) > 8
    for option in options:
        if option != "--help":
            assert f"`{option}" in docs, f"docs/audit.md does not present {option}"


def test_library_imports_no_comparison_or_browser_code():
    code = (
        "import sys, iothub_tls.audit, iothub_tls.audit.render, iothub_tls.cli.audit; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('duckdb', 'selenium', 'playwright', 'pyppeteer', 'tests', 'bench')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    source = "".join(
        p.read_text() for p in Path(it.__file__).parent.joinpath("audit").rglob("*.py")
    )
    assert "duckdb" not in source and "chromium" not in source.lower()


# -- the local hub's own log ----------------------------------------------------------------


class Serve:
    """``iothub-tls serve --log FILE --json`` as a real process on free ports."""

    def __init__(self, state: Path, log: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "iothub_tls",
                "serve",
                "--state",
                str(state),
                "--log",
                str(log),
                "--json",
                "--mqtt-port",
                "0",
                "--amqp-port",
                "0",
                "--https-port",
                "0",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        text = ""
        while True:
            line = self.proc.stderr.readline()
            assert line, text + self.proc.stderr.read()
            text += line
            if line.rstrip() == "}":
                break
        self.summary = json.loads(text[text.index("{") :])
        self.root = Path(self.summary["root"])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.communicate(timeout=20)
        assert self.proc.returncode == 0

    def device(self, name: str) -> dict:
        return next(d for d in self.summary["devices"] if d["deviceId"] == name)


def _client_class(protocol: str) -> type:
    if protocol == "mqtt":
        from iothub_tls.mqtt import MqttDeviceClient

        return MqttDeviceClient
    if protocol == "amqp":
        from iothub_tls.amqp import AmqpDeviceClient

        return AmqpDeviceClient
    from iothub_tls.https import HttpsDeviceClient

    return HttpsDeviceClient


def _legacy_handshake(root: Path, port: int, version: ssl.TLSVersion, ciphers: str) -> str:
    """The demo's legacy client: a bare handshake at ``version`` offering ``ciphers``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
        ctx.maximum_version = version
    ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", port), 10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                return f"accepted {tls.version()}"
        except ssl.SSLError as exc:
            return exc.reason or str(exc)


def _wait_lines(path: Path, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} has fewer than {count} lines")


def test_the_demos_clients_audited_from_the_local_hubs_log(tmp_path):
    """The demo's run against the local hub, with the hub's log going to a file: devices
    of the default policy on each installed transport, then the demo's legacy clients
    (TLS 1.1, a weak suite) on each door. The audit of that log finds the devices
    compliant and the legacy clients refused, for the reasons OpenSSL gave."""
    log = tmp_path / "hub.log"
    names = ["demo-mqtt", "demo-amqp", "demo-https"]
    hub = Serve(tmp_path / "state", log, *(a for n in names for a in ("--device", n)))
    try:
        roots = it.RootSet.from_pem_file(hub.root)
        policy = it.TlsPolicy(roots=roots)
        connected = []
        for protocol, name in zip(("mqtt", "amqp", "https"), names, strict=True):
            try:
                cls = _client_class(protocol)
            except ImportError:  # that transport's extra is not installed
                continue
            client = cls.from_connection_string(
                hub.device(name)["connectionString"],
                policy=policy,
                host="127.0.0.1",
                port=hub.summary["ports"][protocol],
            )
            with client:
                client.send_telemetry(b'{"audit": true}')
            connected.append(name)
        assert connected, "no transport installed"
        refusals = []
        for port in hub.summary["ports"].values():
            refusals.append(_legacy_handshake(hub.root, port, ssl.TLSVersion.TLSv1_1, "ALL"))
            refusals.append(_legacy_handshake(hub.root, port, ssl.TLSVersion.TLSv1_2, "AES128-SHA"))
        assert not [r for r in refusals if r.startswith("accepted")], refusals
        _wait_lines(log, len(connected) + len(refusals))
    finally:
        hub.stop()

    report = audit([str(log)])
    assert report.rejected == 0
    by_name = {d.name: d for d in report.devices}
    for name in connected:
        assert by_name[name].verdict is Verdict.COMPLIANT, by_name[name].as_dict()
    legacy = by_name["(unidentified client 127.0.0.1)"]
    assert legacy.verdict is Verdict.WILL_BE_REFUSED
    reasons = {f.reason: f.tally.connections for f in legacy.reasons()}
    doors = len(hub.summary["ports"])
    assert reasons == {
        "offered only TLS versions below 1.2 (handshake refused: UNSUPPORTED_PROTOCOL)": doors,
        "offered no strong cipher suite (handshake refused: NO_SHARED_CIPHER)": doors,
    }
    assert report.devices[0] is legacy
    assert main(["audit", str(log)]) == 1


def test_a_legacy_hub_logs_what_the_policy_will_refuse(tmp_path):
    """A hub from before 2025-08-31 (serve --min-tls 1.0 --legacy-ciphers) accepts a
    TLS 1.1 device and a weak-suite device; its log names them, and the audit says
    they will be refused, and why, while a modern device complies."""
    mqtt = pytest.importorskip("paho.mqtt.client")
    log = tmp_path / "legacy.log"
    names = ("legacy-tls11", "legacy-weak", "modern")
    hub = Serve(
        tmp_path / "state",
        log,
        "--min-tls",
        "1.0",
        "--legacy-ciphers",
        "--cert",
        "rsa",
        *(a for n in names for a in ("--device", n)),
    )
    try:
        contexts = {
            "legacy-tls11": _legacy_context(hub.root, ssl.TLSVersion.TLSv1_1, "ALL"),
            "legacy-weak": _legacy_context(hub.root, ssl.TLSVersion.TLSv1_2, "AES128-SHA"),
            "modern": it.create_ssl_context(it.TlsPolicy(roots=it.RootSet.from_pem_file(hub.root))),
        }
        for name in names:
            cs = it.ConnectionString.parse(hub.device(name)["connectionString"])
            client = (
                mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)
                if hasattr(mqtt, "CallbackAPIVersion")
                else mqtt.Client(client_id=name)
            )
            client.tls_set_context(contexts[name])
            client.username_pw_set(
                f"localhost/{name}/?api-version=2021-04-12",
                it.generate_sas_token(cs.resource_uri, cs.shared_access_key),
            )
            client.connect("localhost", hub.summary["ports"]["mqtt"])
            client.loop_start()
            deadline = time.monotonic() + 10
            while not client.is_connected() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert client.is_connected(), name
            client.disconnect()
            client.loop_stop()
        _wait_lines(log, 2 * len(names))
    finally:
        hub.stop()

    report = audit([str(log)])
    got = {d.device_id: (d.verdict.value, [f.reason for f in d.reasons()]) for d in report.devices}
    assert got == {
        "legacy-tls11": ("will-be-refused", ["TLS 1.1"]),
        "legacy-weak": ("will-be-refused", ["weak suite TLS_RSA_WITH_AES_128_CBC_SHA"]),
        "modern": ("compliant", ["TLS and cipher suite accepted"]),
    }
    assert report.other_operations == {"deviceDisconnect": 3}


def _legacy_context(root: Path, version: ssl.TLSVersion, ciphers: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
        ctx.maximum_version = version
    ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
    return ctx


# -- the HTML report in a real browser ------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    browser = Chromium()
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def html_report(tmp_path_factory, fleet) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("html")
    log = write_azure_jsonl(folder / "a.jsonl", fleet, ROWS, disconnects=True)
    page = folder / "report.html"
    assert main(["audit", str(log), "--html", str(page), "--json"]) == 1
    return page, audit([str(log)])


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.csp = ""

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "xlink:href", "action", "poster", "srcset", "data"):
                self.urls.append(value or "")
            if (
                tag == "meta"
                and name == "content"
                and ("http-equiv", "Content-Security-Policy") in attrs
            ):
                self.csp = value or ""


def test_html_is_self_contained(html_report):
    page, _ = html_report
    text = page.read_text()
    parser = _Links()
    parser.feed(text)
    assert parser.urls == []
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(parser.tags)
    assert "default-src 'none'" in parser.csp
    assert not re.search(r"https?://|//[a-z]|url\(|@import|@font-face", text, re.IGNORECASE)


def test_html_renders_in_chromium_without_a_request(chromium, html_report):
    page, report = html_report
    before = len(chromium.proxy.page_requests())
    dom = chromium.dump_dom(page)
    assert dom.count("<svg") == 3
    assert dom.count("<tr>") == len(report.devices) + 1  # header row
    counts = report.by_verdict
    assert f"<b>{counts[Verdict.WILL_BE_REFUSED]:,}</b><span>will be refused</span>" in dom
    assert "TLS_RSA_WITH_AES_128_GCM_SHA256" in dom
    assert "deviceDisconnect" in dom  # not judged, but said
    assert chromium.proxy.page_requests()[before:] == []


def test_the_recording_proxy_sees_what_a_page_loads_and_the_csp_blocks_it(
    chromium, html_report, tmp_path
):
    """The failing twin: an external image is requested (and recorded) from a plain
    page, and not from the report page, whose CSP blocks it."""
    plain = tmp_path / "plain.html"
    plain.write_text('<p>x<img src="http://audit-probe.invalid/plain.png"></p>')
    chromium.dump_dom(plain)
    assert any("audit-probe.invalid/plain.png" in r for r in chromium.proxy.page_requests())
    page, _ = html_report
    injected = tmp_path / "injected.html"
    injected.write_text(
        page.read_text().replace(
            "<main>", '<main><img src="http://audit-probe.invalid/blocked.png">'
        )
    )
    chromium.dump_dom(injected)
    assert not any("blocked.png" in r for r in chromium.proxy.requests)


def test_html_screenshot(chromium, html_report, tmp_path):
    page, _ = html_report
    shot = chromium.screenshot(page, tmp_path / "report.png", width=800, height=900)
    width, height, colors = png_pixels(shot)
    assert (width, height) == (800, 900)
    red = {c for c in colors if c[0] > 150 and c[1] < 80 and c[2] < 80}
    green = {c for c in colors if c[1] > 100 and c[0] < 90 and c[2] < 90}
    assert len(colors) > 20 and red and green, "the charts and badges are drawn in colour"


# -- memory ---------------------------------------------------------------------------------


# The audit command, which then prints its own peak RSS. Not the child's ru_maxrss: a child
# spawned by vfork (as subprocess does) shares this test process's memory until it execs,
# and Linux keeps that high-water mark across exec, so ru_maxrss would be the pytest
# process's size. VmHWM is the peak of the audit's own address space.
_AUDIT_WITH_PEAK = """
import sys
from iothub_tls.cli import main
try:
    code = main(sys.argv[1:])
finally:
    with open("/proc/self/status") as status:
        peak = next(line for line in status if line.startswith("VmHWM:"))
    print(f"VmHWM {peak.split()[1]}", file=sys.stderr)
sys.exit(code)
"""


def _peak_rss_kib(path: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _AUDIT_WITH_PEAK, "audit", str(path), "--json", "--jobs", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1, done.stderr
    return int(done.stderr.strip().splitlines()[-1].split()[1])


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("write", "small", "large"),
    [
        (lambda p, f, n: write_kql_csv(p, f, n, EXTENDED_COLUMNS), 100_000, 2_000_000),
        (lambda p, f, n: write_azure_jsonl(p, f, n), 30_000, 300_000),
    ],
    ids=["kql-csv", "azure-jsonl"],
)
def test_memory_does_not_grow_with_the_log(tmp_path, write, small, large):
    """Ten to twenty times the rows (same 2,000 devices), read by one process: the peak RSS
    stays within a few MiB, where keeping the rows would take hundreds."""
    fleet = Fleet(2000)
    small_rss = _peak_rss_kib(write(tmp_path / "small", fleet, small))
    big = write(tmp_path / "large", fleet, large)
    large_rss = _peak_rss_kib(big)
    grown = large_rss - small_rss
    size_kib = big.stat().st_size // 1024
    assert grown < 24 * 1024, f"peak RSS grew {grown} KiB from {small:,} to {large:,} rows"
    assert large_rss < size_kib, "the audit holds less than the file"


def test_throughput_benchmark_harness(tmp_path):
    """bench/audit_throughput.py in smoke mode: it runs and reports what it claims
    (never a timing assertion: smoke numbers mean nothing)."""
    from bench.audit_throughput import main as bench_main

    assert bench_main(["--smoke", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    bench = doc["benchmarks"]["audit_throughput"]
    for key in ("azure-jsonl/20000", "kql-csv/20000"):
        variants = bench["data"][key]["variants"]
        assert all(v["samples"][0]["rows"] == 20_000 for v in variants.values()), key
    if bench["data"]["duckdb"]:
        assert {h["target"] for h in bench["headlines"]} == {">= 0.5x"}
