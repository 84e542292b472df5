"""How `minictr` prints figures and tables for a person: sizes in K/M/G, columns that line up
whatever their cells hold (a 64-character name, a stale cache entry's longer key)."""

from __future__ import annotations

from collections.abc import Sequence


def size_text(size: int) -> str:
    """Bytes as `docker stats` shows them: 64M, 1.5G, 812K (binary units, one decimal)."""
    for unit, letter in ((2**30, "G"), (2**20, "M"), (2**10, "K")):
        if size >= unit:
            return f"{size / unit:.1f}".removesuffix(".0") + letter
    return f"{size}B"


def print_table(rows: Sequence[Sequence[str]], numbers: tuple[int, ...] = ()) -> None:
    """Columns two spaces apart, each as wide as its widest cell: words left-aligned, the
    `numbers` columns right-aligned; the last column (a command, a list) as it is."""
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    for row in rows:
        cells = [cell.rjust(width) if index in numbers else cell.ljust(width)
                 for index, (cell, width) in enumerate(zip(row[:-1], widths, strict=False))]
        print("  ".join([*cells, row[-1]]))
