"""What a benchmark returns, and how results become markdown and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._stats import Ratio


@dataclass
class Headline:
    """One number the benchmark exists to show, with its spread and target."""

    measure: str
    value: float
    unit: str  # "x" (ratio), "%" (percent of the reference), or a plain unit
    low: float | None = None
    high: float | None = None
    target: str | None = None
    met: bool | None = None
    note: str = ""

    @classmethod
    def of_ratio(
        cls,
        measure: str,
        ratio: Ratio,
        *,
        percent: bool = False,
        target: str | None = None,
        met: bool | None = None,
        note: str = "",
    ) -> Headline:
        scale = 100.0 if percent else 1.0
        return cls(
            measure=measure,
            value=ratio.value * scale,
            unit="%" if percent else "x",
            low=ratio.low * scale,
            high=ratio.high * scale,
            target=target,
            met=met,
            note=note,
        )

    def text(self) -> str:
        return fmt(self.value, self.unit)

    def spread(self) -> str:
        if self.low is None or self.high is None:
            return ""
        return f"{fmt(self.low, self.unit)} to {fmt(self.high, self.unit)}"


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[dict[str, Any]]


@dataclass
class BenchResult:
    name: str
    title: str
    method: str
    tables: list[Table] = field(default_factory=list)
    headlines: list[Headline] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fmt(value: float, unit: str = "") -> str:
    """Numbers as a reader wants them: ratios with 2-3 significant digits."""
    if unit == "x":
        return f"{value:.3g}x" if value < 10 else f"{value:.0f}x"
    if unit == "%":
        return f"{value:.1f} %" if abs(value) < 100 else f"{value:.0f} %"
    if isinstance(value, int) or float(value).is_integer():
        text = f"{int(value):,}".replace(",", " ")
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | int):
        return fmt(value)
    return str(value).replace("|", "\\|")


def _md_table(columns: list[str], rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def summary_rows(results: list[BenchResult]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for result in results:
        if result.skipped:
            rows.append({"benchmark": result.title, "measure": f"skipped: {result.skipped}"})
            continue
        for h in result.headlines:
            rows.append(
                {
                    "benchmark": result.title,
                    "measure": h.measure,
                    "result": h.text(),
                    "spread": h.spread() or None,
                    "target": h.target,
                    "met": h.met,
                }
            )
    return rows


def markdown(results: list[BenchResult], machine: dict[str, Any], *, smoke: bool) -> str:
    lines = ["# Benchmark results", ""]
    if smoke:
        lines += ["**Smoke run (tiny sizes): the numbers below mean nothing.**", ""]
    lines += ["## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    lines += ["", "## Summary", ""]
    lines += [
        "Ratios are medians of per-round ratios (variants interleaved in each round); "
        "'spread' is their interquartile range (p25 to p75; the full range when there are "
        "fewer than 4 rounds). Byte counts are deterministic.",
        "",
    ]
    lines += _md_table(
        ["benchmark", "measure", "result", "spread", "target", "met"], summary_rows(results)
    )
    for result in results:
        lines += ["", f"## {result.title}", ""]
        if result.skipped:
            lines += [f"Skipped: {result.skipped}"]
            continue
        lines += [result.method, ""]
        for table in result.tables:
            lines += [f"**{table.title}**", ""]
            lines += _md_table(table.columns, table.rows)
            lines.append("")
        for note in result.notes:
            lines.append(f"- {note}")
        lines.append(f"\n_{result.seconds:.1f} s_")
    return "\n".join(lines) + "\n"


def write(
    out: Path,
    results: list[BenchResult],
    machine: dict[str, Any],
    *,
    smoke: bool,
    started: str,
    seconds: float,
) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "schema": 1,
        "started": started,
        "seconds": round(seconds, 1),
        "smoke": smoke,
        "machine": machine,
        "summary": summary_rows(results),
        "benchmarks": {r.name: r.as_dict() for r in results},
    }
    json_path = out / "results.json"
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    md_path = out / "results.md"
    md_path.write_text(markdown(results, machine, smoke=smoke))
    return md_path, json_path
