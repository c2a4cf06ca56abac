"""Tables of run results, for Markdown reports and for the terminal.

One formatting rule set for every table, so the same figure reads the same in ``report.md``, in a
leaderboard and in ``vitdistill compare``: accuracies as percentages, large counts with a unit,
missing values as ``-``.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

from vitdistill.report.profile import format_count

MISSING = "-"
_PERCENT_SUFFIXES = ("top1", "top5", "agreement", "ece")


def _scalar(value: Any) -> Any:
    """Unwrap a 0-d tensor or array (as the engine may log it) into a Python number."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def format_value(key: str, value: Any) -> str:
    """Format one cell; ``key`` decides whether a number is a fraction to show as a percentage.

    Rows keep accuracies as fractions in 0..1 (what the engine computes); readers expect
    ``93.41``, so keys ending in ``top1``, ``top5``, ``agreement`` or ``ece`` are shown x100 with 2 decimals.
    Numbers above 10,000 (parameters, FLOPs, img/s) get a unit; floats keep 2 decimals from 1 up,
    4 below 1, and 3 significant digits below 0.01, so a small loss or a learning rate of 5e-05 is
    not flattened to 0.00. Wall times (``*wall_s``) get one decimal.
    """
    if value is None:
        return MISSING
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, Real):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if key.endswith(_PERCENT_SUFFIXES):
        return f"{100 * float(value):.2f}"
    if key.endswith("wall_s"):  # seconds of a run: a tenth is plenty, 0.9100 s reads as false precision
        return f"{float(value):.1f}"
    if isinstance(value, Integral):
        return format_count(value) if abs(value) > 10_000 else str(int(value))
    value = float(value)
    if abs(value) >= 10_000:
        return format_count(value)
    if value == 0 or abs(value) >= 1:
        return f"{value:.2f}"
    if abs(value) >= 0.01:
        return f"{value:.4f}"
    return f"{value:.3g}"


def _is_number(value: Any) -> bool:
    value = _scalar(value)
    return isinstance(value, Real) and not isinstance(value, bool)


def _cells(rows: list[dict], columns: list[tuple[str, str]]) -> tuple[list[list[str]], list[bool]]:
    """Formatted cells per row, and per column whether it is numeric (so right-aligned)."""
    cells = [[format_value(key, row.get(key)) for key, _ in columns] for row in rows]
    numeric = []
    for key, _ in columns:
        present = [row[key] for row in rows if row.get(key) is not None]
        numeric.append(bool(present) and all(_is_number(v) for v in present))
    return cells, numeric


def _pad(text: str, width: int, right: bool) -> str:
    return text.rjust(width) if right else text.ljust(width)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A GitHub-flavoured Markdown table of ``rows``; ``columns`` are ``(key, header)`` pairs.

    Cells are padded so the raw file reads as a table too, and numeric columns are right-aligned
    (``---:``) so digits line up. ``|`` inside a value is escaped. Ends without a newline.
    """
    cells, numeric = _cells(rows, columns)
    cells = [[c.replace("|", "\\|") for c in row] for row in cells]
    headers = [header.replace("|", "\\|") for _, header in columns]
    widths = [max([3, len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(parts: list[str]) -> str:
        return "| " + " | ".join(parts) + " |"

    out = [line([_pad(h, w, r) for h, w, r in zip(headers, widths, numeric)])]
    out.append(line(["-" * (w - 1) + ":" if r else "-" * w for w, r in zip(widths, numeric)]))
    out += [line([_pad(c, w, r) for c, w, r in zip(row, widths, numeric)]) for row in cells]
    return "\n".join(out)


def text_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain-text table for terminals: same cell formatting as ``markdown_table``, no markup.

    Columns are separated by two spaces, numbers right-aligned, under a dashed rule.
    """
    cells, numeric = _cells(rows, columns)
    headers = [header for _, header in columns]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(parts: list[str]) -> str:
        return "  ".join(_pad(p, w, r) for p, w, r in zip(parts, widths, numeric)).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    return "\n".join(out)
