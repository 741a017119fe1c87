"""The one place that formats tables for people: the CLI's summaries, the
demo, the compression and learngene reports and the benchmarks all print
through ``format_table``, so every table reads the same way."""

from __future__ import annotations

from typing import Any


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A plain fixed-width table: ``columns`` are (key, header, format spec);
    a missing or None cell is left blank. Columns are right-aligned, for
    numbers; a spec starting with ``<`` left-aligns one, for prose."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([("" if row.get(k) is None else format(row[k], f)) for k, _, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    left = [f.startswith("<") for _, _, f in columns]
    lines = ["  ".join(c.ljust(w) if lj else c.rjust(w) for c, w, lj in zip(r, widths, left)) for r in cells]
    if any(left):
        lines = [line.rstrip() for line in lines]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
