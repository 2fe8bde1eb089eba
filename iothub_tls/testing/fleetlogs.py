"""Connection logs of a made-up fleet, in every form ``iothub-tls audit`` reads, written
when a test or benchmark runs (never stored), to check an audit against known answers.

Each device follows one :class:`Profile` (how it connects); the profile says what the
audit must conclude, written here from IoT Hub's rules and independently of the audit
code. Rows are in time order, devices interleaved, like a real hub's log.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..hub.log import ConnectionEvent

__all__ = [
    "AUTH_SAS",
    "EXTENDED_COLUMNS",
    "FALLBACK_SUITE",
    "GUIDANCE_COLUMNS",
    "GUIDANCE_QUERY",
    "KQL_NAMED_COLUMNS",
    "PROFILES",
    "RESOURCE_ID",
    "Connection",
    "Fleet",
    "Profile",
    "write_azure_jsonl",
    "write_azure_records",
    "write_kql_csv",
    "write_kql_json",
    "write_kql_tables",
    "write_local",
]

#: The guidance's query, verbatim (what the CSV/JSON export formats stand for).
GUIDANCE_QUERY = (
    'AzureDiagnostics | where ResourceProvider == "MICROSOFT.DEVICES" and ResourceType == '
    '"IOTHUBS" | where Category == "Connections" | where OperationName == "deviceConnect" | '
    "extend props_json = parse_json(properties_s) | project DeviceId = props_json.deviceId, "
    "TLSVersion = props_json.tlsVersion"
)
RESOURCE_ID = (
    "/SUBSCRIPTIONS/00000000-0000-0000-0000-000000000000/RESOURCEGROUPS/FLEET/PROVIDERS/"
    "MICROSOFT.DEVICES/IOTHUBS/FLEET-HUB"
)
AUTH_SAS = json.dumps(
    {"scope": "device", "type": "sas", "issuer": "iothub", "acceptingIpFilterRule": None},
    separators=(",", ":"),
)


@dataclass(frozen=True)
class Profile:
    """How a kind of device connects, and the verdicts that must follow."""

    name: str
    protocol: str  # as IoT Hub logs it: Mqtt, Amqp, Https, MqttWs
    tls: str | None  # as IoT Hub logs it: "1.2"; None = not logged (HTTPS)
    suite: str | None  # IANA name; None = not logged
    #: verdict with the default policy, with --ecc-only, and when the log has no suites
    verdict: str
    ecc_verdict: str
    verdict_without_suites: str
    #: every n-th connection of the device uses TLS 1.1 instead (a fallback path)
    fallback_every: int = 0


PROFILES: tuple[Profile, ...] = (
    Profile(
        "rsa",
        "Mqtt",
        "1.2",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "compliant",
        "will-be-refused",
        "unknown",
    ),
    Profile(
        "ecc",
        "Amqp",
        "1.2",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "compliant",
        "compliant",
        "unknown",
    ),
    Profile(
        "tls13", "Mqtt", "1.3", "TLS_AES_256_GCM_SHA384", "compliant", "compliant", "compliant"
    ),
    Profile(
        "tls11",
        "Mqtt",
        "1.1",
        "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
        "will-be-refused",
        "will-be-refused",
        "will-be-refused",
    ),
    Profile(
        "tls10",
        "Amqp",
        "1.0",
        "TLS_RSA_WITH_AES_128_CBC_SHA",
        "will-be-refused",
        "will-be-refused",
        "will-be-refused",
    ),
    Profile(
        "weak",
        "MqttWs",
        "1.2",
        "TLS_RSA_WITH_AES_128_GCM_SHA256",
        "will-be-refused",
        "will-be-refused",
        "unknown",
    ),
    Profile("https", "Https", None, None, "unknown", "unknown", "unknown"),
    Profile(
        "fallback",
        "Mqtt",
        "1.2",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        "will-be-refused",
        "will-be-refused",
        "will-be-refused",
        fallback_every=7,
    ),
)
FALLBACK_SUITE = "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA"


@dataclass(frozen=True)
class Connection:
    time: dt.datetime
    device: str
    profile: Profile
    tls: str | None
    suite: str | None

    @property
    def iso(self) -> str:
        return self.time.isoformat(timespec="microseconds") + "0Z"  # 7 digits, as Azure


class Fleet:
    """``devices`` devices, spread over the profiles, connecting ``rows`` times."""

    def __init__(
        self,
        devices: int = 64,
        *,
        start: dt.datetime = dt.datetime(2025, 8, 1, 0, 0, 0),
        step: dt.timedelta = dt.timedelta(seconds=7),
    ) -> None:
        self.devices = [f"dev-{PROFILES[i % len(PROFILES)].name}-{i:05d}" for i in range(devices)]
        self.profiles = {d: PROFILES[i % len(PROFILES)] for i, d in enumerate(self.devices)}
        self.start = start
        self.step = step

    def expected(self, *, ecc_only: bool = False, suites_logged: bool = True) -> dict[str, str]:
        """Device -> the verdict the audit must give."""
        if ecc_only:
            return {d: p.ecc_verdict for d, p in self.profiles.items()}
        if not suites_logged:
            return {d: p.verdict_without_suites for d, p in self.profiles.items()}
        return {d: p.verdict for d, p in self.profiles.items()}

    def connections(self, rows: int) -> Iterator[Connection]:
        seen: dict[str, int] = {}
        for i in range(rows):
            device = self.devices[(i * 7919) % len(self.devices)]
            profile = self.profiles[device]
            n = seen[device] = seen.get(device, 0) + 1
            tls, suite = profile.tls, profile.suite
            if profile.fallback_every and n % profile.fallback_every == 0:
                tls, suite = "1.1", FALLBACK_SUITE
            yield Connection(self.start + i * self.step, device, profile, tls, suite)


# -- writers ------------------------------------------------------------------------------


def _open(path: Path, compress: bool) -> IO[str]:
    if compress:
        return io.TextIOWrapper(gzip.open(path, "wb", compresslevel=1), encoding="utf-8")
    return path.open("w", encoding="utf-8", newline="")


def _azure_record(c: Connection, operation: str = "deviceConnect") -> dict[str, Any]:
    properties: dict[str, Any] = {
        "deviceId": c.device,
        "sdkVersion": "2021-04-12",
        "protocol": c.profile.protocol,
        "authType": AUTH_SAS,
        "maskedIpAddress": "203.0.113.XXX",
    }
    if c.tls is not None:
        properties["tlsVersion"] = c.tls
    if c.suite is not None:
        properties["cipherSuite"] = c.suite
    return {
        "time": c.iso,
        "resourceId": RESOURCE_ID,
        "operationName": operation,
        "category": "Connections",
        "level": "Information",
        "properties": json.dumps(properties, separators=(",", ":")),
        "location": "westeurope",
    }


_TIME_MARK = "@@time@@"


def _azure_line(c: Connection, operation: str, cache: dict[tuple[Any, ...], str]) -> str:
    """json.dumps(_azure_record(c)) + newline, made once per device and variant (the
    time is put in afterwards: writing ten million rows must not take an hour)."""
    key = (c.device, c.tls, c.suite, operation)
    shape = cache.get(key)
    if shape is None:
        marked = Connection(c.time, c.device, c.profile, c.tls, c.suite)
        record = _azure_record(marked, operation)
        record["time"] = _TIME_MARK
        shape = cache[key] = json.dumps(record) + "\n"
    return shape.replace(_TIME_MARK, c.iso, 1)


def write_azure_jsonl(
    path: Path, fleet: Fleet, rows: int, *, compress: bool = False, disconnects: bool = False
) -> Path:
    """Azure Monitor resource logs as archived to a storage account: one record a line
    (with ``disconnects``, each connect is followed by a deviceDisconnect record)."""
    cache: dict[tuple[Any, ...], str] = {}
    with _open(path, compress) as out:
        for c in fleet.connections(rows):
            out.write(_azure_line(c, "deviceConnect", cache))
            if disconnects:
                out.write(_azure_line(c, "deviceDisconnect", cache))
    return path


def write_azure_records(path: Path, fleet: Fleet, rows: int, *, indent: int | None = 2) -> Path:
    """One ``{"records": [...]}`` document (as streamed to Event Hubs / shown in the
    docs), pretty-printed by default."""
    records = [_azure_record(c) for c in fleet.connections(rows)]
    path.write_text(json.dumps({"records": records}, indent=indent), encoding="utf-8")
    return path


#: Column sets of Log Analytics exports: the guidance's query, and one projecting more.
GUIDANCE_COLUMNS = ("DeviceId", "TLSVersion")
EXTENDED_COLUMNS = ("TimeGenerated [UTC]", "DeviceId", "Protocol", "TLSVersion", "CipherSuite")
KQL_NAMED_COLUMNS = (
    "props_json_cipherSuite",
    "TimeGenerated",
    "props_json_deviceId",
    "props_json_protocol",
    "props_json_tlsVersion",
)


def _kql_value(c: Connection, column: str) -> str:
    name = column.lower().replace("props_json_", "").split(" ")[0]
    return {
        "deviceid": c.device,
        "tlsversion": c.tls or "",
        "protocol": c.profile.protocol,
        "ciphersuite": c.suite or "",
        "timegenerated": c.iso,
    }[name]


def write_kql_csv(
    path: Path,
    fleet: Fleet,
    rows: int,
    columns: tuple[str, ...] = GUIDANCE_COLUMNS,
    *,
    compress: bool = False,
) -> Path:
    """A Log Analytics CSV export (header: the query's column names)."""
    with _open(path, compress) as out:
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(columns)
        for c in fleet.connections(rows):
            writer.writerow([_kql_value(c, col) for col in columns])
    return path


def write_kql_json(
    path: Path, fleet: Fleet, rows: int, columns: tuple[str, ...] = GUIDANCE_COLUMNS
) -> Path:
    """``az monitor log-analytics query`` output: a JSON array of row objects."""
    out = [
        {**{col: _kql_value(c, col) or None for col in columns}, "TableName": "PrimaryResult"}
        for c in fleet.connections(rows)
    ]
    path.write_text(json.dumps(out, indent=2), encoding="utf-8")
    return path


def write_kql_tables(
    path: Path, fleet: Fleet, rows: int, columns: tuple[str, ...] = GUIDANCE_COLUMNS
) -> Path:
    """The Log Analytics query API's answer: ``{"tables": [{columns, rows}]}``."""
    doc = {
        "tables": [
            {
                "name": "PrimaryResult",
                "columns": [{"name": col, "type": "dynamic"} for col in columns],
                "rows": [
                    [_kql_value(c, col) or None for col in columns] for c in fleet.connections(rows)
                ],
            }
        ]
    }
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


_OPENSSL_VERSIONS = {"1.0": "TLSv1", "1.1": "TLSv1.1", "1.2": "TLSv1.2", "1.3": "TLSv1.3"}


def write_local(path: Path, fleet: Fleet, rows: int, *, compress: bool = False) -> Path:
    """The local hub's connection log, written through its own ConnectionEvent."""
    from iothub_tls.policy import CIPHER_SUITES

    openssl = {s.iana: s.openssl for s in CIPHER_SUITES}
    with _open(path, compress) as out:
        for c in fleet.connections(rows):
            event = ConnectionEvent(
                "deviceConnect",
                c.profile.protocol if c.profile.protocol != "MqttWs" else "Mqtt",
                "Success",
                device_id=c.device,
                tls_version=_OPENSSL_VERSIONS.get(c.tls or "", "TLSv1.2"),
                cipher=openssl.get(c.suite or "", c.suite),
                sni="fleet-hub.azure-devices.net",
                caller="198.51.100.7:50123",
                time=c.time.isoformat(timespec="milliseconds") + "Z",
            )
            out.write(json.dumps(event.to_json()) + "\n")
    return path
