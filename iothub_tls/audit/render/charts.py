"""Inline SVG charts, drawn here (no library, no script): a stacked column chart and a
horizontal bar chart. Every label is escaped; every shape has a ``<title>`` so a
pointer shows its number."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

__all__ = ["bars", "stacked_columns"]

_FONT = 'font-family="system-ui, sans-serif"'


def _nice_max(value: int) -> int:
    """The next 1, 2 or 5 x 10^n at or above ``value`` (at least 1)."""
    if value <= 1:
        return 1
    magnitude = 1
    while magnitude * 10 < value:
        magnitude *= 10
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def _short(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:g}M"
    if n >= 1000:
        return f"{n / 1000:g}k"
    return str(n)


def stacked_columns(
    labels: Sequence[str],
    series: Mapping[str, Sequence[int]],
    colors: Mapping[str, str],
    *,
    title: str,
    width: int = 960,
    height: int = 300,
) -> str:
    """One column per label, stacked by series (in the mapping's order), with a y axis,
    every n-th x label and a legend."""
    left, right, top, bottom = 56, 12, 28, 58
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum(values[i] for values in series.values()) for i in range(len(labels))]
    top_value = _nice_max(max(totals, default=0))
    out = [
        f'<svg viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}" {_FONT}>',
        f"<title>{escape(title)}</title>",
    ]
    for k in range(5):
        value = top_value * k // 4
        y = top + plot_h - plot_h * k / 4
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" '
            f'stroke="#e0e0e0" stroke-width="1"/>'
        )
        out.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" '
            f'fill="#555">{_short(value)}</text>'
        )
    count = max(len(labels), 1)
    slot = plot_w / count
    bar = max(min(slot * 0.8, 40), 1.0)
    every = max(1, round(count / 12))
    for i, label in enumerate(labels):
        x = left + slot * i + (slot - bar) / 2
        y = top + plot_h
        for name, values in series.items():
            value = values[i]
            if not value:
                continue
            h = plot_h * value / top_value
            y -= h
            out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{colors.get(name, "#888")}"><title>{escape(label)}: {escape(name)} '
                f"{value:,}</title></rect>"
            )
        if i % every == 0:
            cx = left + slot * i + slot / 2
            out.append(
                f'<text x="{cx:.1f}" y="{top + plot_h + 16}" font-size="11" '
                f'text-anchor="middle" fill="#555">{escape(label)}</text>'
            )
    out.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" '
        'stroke="#999" stroke-width="1"/>'
    )
    x = left
    for name in series:
        out.append(
            f'<rect x="{x}" y="{height - 22}" width="12" height="12" '
            f'fill="{colors.get(name, "#888")}"/>'
            f'<text x="{x + 16}" y="{height - 12}" font-size="12" fill="#333">'
            f"{escape(name)}</text>"
        )
        x += 24 + 8 * len(name)
    out.append("</svg>")
    return "".join(out)


def bars(
    items: Sequence[tuple[str, int, str]],
    *,
    title: str,
    width: int = 460,
    label_width: int = 250,
) -> str:
    """Horizontal bars: ``(label, value, colour)`` each, in the given order."""
    row, top = 26, 8
    height = top * 2 + row * max(len(items), 1)
    plot_w = width - label_width - 70
    top_value = max((v for _, v, _ in items), default=0) or 1
    out = [
        f'<svg viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}" {_FONT}>',
        f"<title>{escape(title)}</title>",
    ]
    for i, (label, value, color) in enumerate(items):
        y = top + row * i
        w = plot_w * value / top_value
        shown = label if len(label) <= 40 else label[:39] + "…"
        out.append(
            f'<text x="{label_width - 8}" y="{y + 16}" font-size="12" text-anchor="end" '
            f'fill="#333">{escape(shown)}<title>{escape(label)}</title></text>'
            f'<rect x="{label_width}" y="{y + 4}" width="{max(w, 1 if value else 0):.1f}" '
            f'height="16" fill="{color}"><title>{escape(label)}: {value:,}</title></rect>'
            f'<text x="{label_width + w + 6:.1f}" y="{y + 16}" font-size="12" '
            f'fill="#333">{value:,}</text>'
        )
    out.append("</svg>")
    return "".join(out)
