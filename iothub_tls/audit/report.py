"""From folded counters to the audit: one :class:`DeviceReport` per device (or per
unidentified client address), sorted by risk, with the fleet's timeline and suites."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .aggregate import KEY_FIELDS, Aggregator, InputStats
from .fields import normalize_protocol, normalize_tls
from .rules import AuditPolicy, Verdict, judge, judge_refusal, suite_kind

__all__ = ["AuditReport", "DeviceReport", "Finding", "build_report"]

_FAILURE_RESULTS = frozenset({"failure", "failed", "error", "fail"})
_SUCCESS_TYPES = frozenset({"", "success", "succeeded", "0", "200", "ok", "none", "null"})


def _failed(result: str, level: str, resulttype: str) -> bool:
    if result.strip().lower() in _FAILURE_RESULTS:
        return True
    if level.strip().lower() in ("error", "critical"):
        return True
    return resulttype.strip().lower() not in _SUCCESS_TYPES


def _is_connect(operation: str, category: str) -> bool:
    return operation.strip().lower() in ("", "deviceconnect") and category.strip().lower() in (
        "",
        "connections",
    )


@dataclass
class Tally:
    """Connections and the last time one thing (a version, a suite, a reason) was seen."""

    connections: int = 0
    last_seen: str = ""

    def add(self, count: int, when: str) -> None:
        self.connections += count
        if when > self.last_seen:
            self.last_seen = when


@dataclass
class Finding:
    """Why a device got its verdict: one reason, how often, when last."""

    verdict: Verdict
    reason: str
    protocols: set[str] = field(default_factory=set)
    tally: Tally = field(default_factory=Tally)

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "reason": self.reason,
            "protocols": sorted(self.protocols),
            "connections": self.tally.connections,
            "lastSeen": self.tally.last_seen or None,
        }


@dataclass
class DeviceReport:
    """One device (``device_id``) or one unidentified client address (``caller``)."""

    device_id: str | None
    caller: str | None = None
    connections: int = 0
    failed: int = 0
    last_seen: str = ""
    protocols: Counter[str] = field(default_factory=Counter)
    tls: dict[str, Tally] = field(default_factory=dict)
    suites: dict[str, Tally] = field(default_factory=dict)
    findings: dict[tuple[Verdict, str], Finding] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.device_id is not None:
            return self.device_id
        return f"(unidentified client {self.caller or 'without address'})"

    @property
    def verdict(self) -> Verdict:
        if not self.findings:
            return Verdict.UNKNOWN
        return min((f.verdict for f in self.findings.values()), key=lambda v: v.risk)

    def reasons(self, verdict: Verdict | None = None) -> list[Finding]:
        chosen = verdict or self.verdict
        found = [f for f in self.findings.values() if f.verdict is chosen]
        return sorted(found, key=lambda f: (-f.tally.connections, f.reason))

    @property
    def at_risk(self) -> int:
        """Connections that the policy refuses."""
        return sum(f.tally.connections for f in self.reasons(Verdict.WILL_BE_REFUSED))

    def record(
        self, count: int, when: str, protocol: str, tls: str, suite: str, failed: bool
    ) -> None:
        self.connections += count
        if failed:
            self.failed += count
        if when > self.last_seen:
            self.last_seen = when
        if protocol:
            self.protocols[protocol] += count
        self.tls.setdefault(tls or "not logged", Tally()).add(count, when)
        if suite:
            self.suites.setdefault(suite_kind(suite)[0], Tally()).add(count, when)
        else:
            self.suites.setdefault("not logged", Tally()).add(count, when)

    def find(self, verdict: Verdict, reason: str, protocol: str, count: int, when: str) -> None:
        finding = self.findings.get((verdict, reason))
        if finding is None:
            finding = self.findings[(verdict, reason)] = Finding(verdict, reason)
        if protocol:
            finding.protocols.add(protocol)
        finding.tally.add(count, when)

    def as_dict(self) -> dict[str, Any]:
        def tallies(items: dict[str, Tally]) -> list[dict[str, Any]]:
            ordered = sorted(items.items(), key=lambda kv: (-kv[1].connections, kv[0]))
            return [
                {"name": k, "connections": t.connections, "lastSeen": t.last_seen or None}
                for k, t in ordered
            ]

        return {
            "deviceId": self.device_id,
            "caller": self.caller,
            "verdict": self.verdict.value,
            "reasons": [f.reason for f in self.reasons()],
            "findings": [
                f.as_dict() for f in sorted(self.findings.values(), key=lambda f: f.verdict.risk)
            ],
            "protocols": dict(self.protocols.most_common()),
            "tlsVersions": tallies(self.tls),
            "cipherSuites": tallies(self.suites),
            "connections": self.connections,
            "failedConnections": self.failed,
            "lastSeen": self.last_seen or None,
        }


@dataclass
class AuditReport:
    policy: AuditPolicy
    devices: list[DeviceReport]
    inputs: list[InputStats]
    #: (period: hour "YYYY-MM-DDTHH" or day "YYYY-MM-DD", TLS version or "not logged")
    #: -> deviceConnect rows
    timeline: Counter[tuple[str, str]]
    #: IANA suite (or "not logged") -> (kind, connections)
    suites: dict[str, tuple[str, int]]
    #: rows that were not deviceConnect events of the Connections category, by operation
    other_operations: Counter[str]
    first_seen: str = ""
    last_seen: str = ""

    @property
    def by_verdict(self) -> dict[Verdict, int]:
        counts = Counter(d.verdict for d in self.devices)
        return {v: counts.get(v, 0) for v in Verdict}

    @property
    def connections(self) -> int:
        return sum(d.connections for d in self.devices)

    @property
    def rows(self) -> int:
        return sum(i.rows for i in self.inputs)

    @property
    def rejected(self) -> int:
        return sum(i.rejected for i in self.inputs)

    def exit_code(self, *, allow_unknown: bool = False) -> int:
        """0 every device complies, 1 some will be refused (or cannot be shown to
        comply, unless ``allow_unknown``)."""
        counts = self.by_verdict
        if counts[Verdict.WILL_BE_REFUSED]:
            return 1
        if counts[Verdict.UNKNOWN] and not allow_unknown:
            return 1
        return 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": {
                "minTls": self.policy.min_tls,
                "eccOnly": self.policy.ecc_only,
                "description": self.policy.describe(),
            },
            "summary": {
                "devices": len(self.devices),
                "byVerdict": {v.value: n for v, n in self.by_verdict.items()},
                "connections": self.connections,
                "rows": self.rows,
                "rejectedRows": self.rejected,
                "otherOperations": dict(self.other_operations.most_common()),
                "firstSeen": self.first_seen or None,
                "lastSeen": self.last_seen or None,
            },
            "inputs": [i.as_dict() for i in self.inputs],
            "devices": [d.as_dict() for d in self.devices],
            "cipherSuites": [
                {"name": name, "kind": kind, "connections": n}
                for name, (kind, n) in sorted(self.suites.items(), key=lambda kv: -kv[1][1])
            ],
            "timeline": [
                {"period": period, "tlsVersion": version, "connections": n}
                for (period, version), n in sorted(self.timeline.items())
            ],
        }


def _sort_key(device: DeviceReport) -> tuple[Any, ...]:
    return (device.verdict.risk, -device.at_risk, -device.connections, device.name)


def build_report(aggregator: Aggregator, policy: AuditPolicy) -> AuditReport:
    """Judge every device the aggregator saw against ``policy``."""
    devices: dict[str, DeviceReport] = {}
    timeline: Counter[tuple[str, str]] = Counter()
    suites: dict[str, tuple[str, int]] = {}
    other: Counter[str] = Counter()
    tls_cache: dict[str, str] = {}

    def tls_of(raw: str) -> str:
        found = tls_cache.get(raw)
        if found is None:
            found = tls_cache[raw] = normalize_tls(raw) or ""
        return found

    for folded in aggregator.folded():
        layout = folded.layout
        for key, count in folded.counts.items():
            row = layout.canonical(key)
            if not _is_connect(row["operation"], row["category"]):
                other[row["operation"] or row["category"] or "unknown"] += count
                continue
            when = folded.last.get(key, "")
            protocol = normalize_protocol(row["protocol"])
            tls = tls_of(row["tls"])
            suite = row["suite"].strip()
            name, kind = suite_kind(suite) if suite else ("not logged", None)
            previous = suites.get(name, ("", 0))[1]
            suites[name] = (kind.value if kind else "not logged", previous + count)
            if not row["device"]:
                continue  # counted as an unidentified client below
            device = devices.get(row["device"])
            if device is None:
                device = devices[row["device"]] = DeviceReport(row["device"])
            failed = _failed(row["result"], row["level"], row["resulttype"])
            device.record(count, when, protocol, tls, suite, failed)
            verdict, reason = judge(policy, protocol, tls, suite)
            if verdict is not Verdict.COMPLIANT:
                device.find(verdict, reason, protocol, count, when)
            else:
                device.find(verdict, "TLS and cipher suite accepted", protocol, count, when)
        for hour_key, count in folded.hours.items():
            hour, *rest = hour_key
            names = [f for f in ("tls", "operation", "category") if f in layout.fields]
            named = dict(zip(names, rest, strict=True))
            if not _is_connect(named.get("operation", ""), named.get("category", "")):
                continue
            timeline[(hour, tls_of(named.get("tls", "")) or "not logged")] += count

    _unidentified(aggregator, policy, devices)
    ordered = sorted(devices.values(), key=_sort_key)
    return AuditReport(
        policy=policy,
        devices=ordered,
        inputs=list(aggregator.inputs),
        timeline=timeline,
        suites=suites,
        other_operations=other,
        first_seen=aggregator.earliest,
        last_seen=aggregator.latest,
    )


def _unidentified(
    aggregator: Aggregator, policy: AuditPolicy, devices: dict[str, DeviceReport]
) -> None:
    """Rows without a device: grouped by the client's address. A TLS version or suite
    they used is judged as for a device; a handshake the hub refused is judged from
    OpenSSL's reason; anything else says nothing about TLS."""
    for entry, count in aggregator.unidentified.items():
        caller, *values, reason = entry
        row = dict(zip(KEY_FIELDS, values, strict=True))
        if not _is_connect(row["operation"], row["category"]):
            continue
        when = aggregator.unidentified_last.get(entry, "")
        label = f"\0{caller}"
        device = devices.get(label)
        if device is None:
            device = devices[label] = DeviceReport(None, caller=caller or None)
        protocol = normalize_protocol(row["protocol"])
        tls = normalize_tls(row["tls"]) or ""
        suite = row["suite"].strip()
        failed = _failed(row["result"], row["level"], row["resulttype"])
        device.record(count, when, protocol, tls, suite, failed)
        refusal = judge_refusal(reason) if reason else None
        if tls or suite:
            verdict, why = judge(policy, protocol, tls, suite)
            if verdict is Verdict.COMPLIANT:
                why = "TLS and cipher suite accepted"
        elif refusal is not None:
            verdict, why = refusal
        else:
            verdict = Verdict.UNKNOWN
            why = (
                f"connection failed without TLS details: {reason}"
                if reason
                else ("no device id, TLS version or cipher suite logged")
            )
        device.find(verdict, why, protocol, count, when)

