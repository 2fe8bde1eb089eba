"""Interleaved repetition and robust summaries.

Shared machines are noisy: a neighbour's burst of work can slow one variant and not the
other. So variants are never measured one after the other in blocks. Every round runs
each variant a few times, in a rotated order, and ratios are taken per round (both
sides saw the same weather) before their median is reported with the spread across
rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

#: One call = one observation: a number, or several named numbers (metrics).
Sample = Callable[[], "float | Mapping[str, float]"]


@dataclass(frozen=True)
class Summary:
    """Median and spread of one variant's samples."""

    n: int
    median: float
    p25: float
    p75: float
    low: float
    high: float

    def as_dict(self, scale: float = 1.0, digits: int = 3) -> dict[str, float | int]:
        return {
            "n": self.n,
            "median": round(self.median * scale, digits),
            "p25": round(self.p25 * scale, digits),
            "p75": round(self.p75 * scale, digits),
            "min": round(self.low * scale, digits),
            "max": round(self.high * scale, digits),
        }


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("no samples")
    ordered = sorted(values)
    if len(ordered) >= 4:
        q = statistics.quantiles(ordered, n=4, method="inclusive")
        p25, p75 = q[0], q[2]
    else:
        p25, p75 = ordered[0], ordered[-1]
    return Summary(
        n=len(ordered),
        median=statistics.median(ordered),
        p25=p25,
        p75=p75,
        low=ordered[0],
        high=ordered[-1],
    )


@dataclass(frozen=True)
class Ratio:
    """A ratio of two variants: the median of the per-round (or per-run) ratios;
    ``low``-``high`` their interquartile range (their full range below 4 rounds)."""

    value: float
    low: float
    high: float
    rounds: int
    smallest: float
    largest: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Ratio:
        if not values:
            raise ValueError("no ratios")
        s = summarize(values)
        return cls(
            value=s.median, low=s.p25, high=s.p75, rounds=s.n, smallest=s.low, largest=s.high
        )

    def as_dict(self, digits: int = 3) -> dict[str, float | int]:
        return {
            "value": round(self.value, digits),
            "p25": round(self.low, digits),
            "p75": round(self.high, digits),
            "min": round(self.smallest, digits),
            "max": round(self.largest, digits),
            "rounds": self.rounds,
        }


class Interleaved:
    """Samples of several variants taken round by round (see the module docstring).

    A variant returning a plain number records metric ``"value"``."""

    def __init__(self) -> None:
        # rounds[r][variant][metric] -> samples
        self.rounds: list[dict[str, dict[str, list[float]]]] = []

    def run(
        self,
        variants: Mapping[str, Sample],
        *,
        rounds: int,
        per_round: int | Mapping[str, int],
        warmup: int = 1,
    ) -> Interleaved:
        """Run ``rounds`` rounds; in each, every variant produces ``per_round`` samples
        (a number, or one per variant). Each call of a variant returns one sample (it
        measures itself, so it can choose its clock). The order rotates every round."""
        names = list(variants)
        for name in names:
            for _ in range(warmup):
                variants[name]()
        for r in range(rounds):
            shift = r % len(names)
            order = names[shift:] + names[:shift]
            taken: dict[str, dict[str, list[float]]] = {name: {} for name in names}
            for name in order:
                count = per_round if isinstance(per_round, int) else per_round[name]
                for _ in range(count):
                    observed = variants[name]()
                    metrics = observed if isinstance(observed, Mapping) else {"value": observed}
                    for metric, value in metrics.items():
                        taken[name].setdefault(metric, []).append(float(value))
            self.rounds.append(taken)
        return self

    def samples(self, name: str, metric: str = "value") -> list[float]:
        return [v for taken in self.rounds for v in taken[name].get(metric, [])]

    def summary(self, name: str, metric: str = "value") -> Summary:
        return summarize(self.samples(name, metric))

    def ratio(self, a: str, b: str, metric: str = "value") -> Ratio:
        """Per round, median(a) / median(b); then the median and spread of those."""
        per_round = []
        for taken in self.rounds:
            xs, ys = taken[a].get(metric, []), taken[b].get(metric, [])
            if xs and ys and statistics.median(ys) > 0:
                per_round.append(statistics.median(xs) / statistics.median(ys))
        if not per_round:
            raise ValueError(f"no round has samples of both {a!r} and {b!r}")
        return Ratio.of(per_round)


def ratio_of_runs(pairs: Sequence[tuple[float, float]]) -> Ratio:
    """Ratio of two quantities measured together several times: ``(a, b)`` per run."""
    return Ratio.of([a / b for a, b in pairs if b > 0])
