"""CSV files with a header row, as the factory hands them over (SIM manifests, production-line
device lists): a UTF-8 BOM, blank lines and ``#`` comment lines are skipped, cells are trimmed,
header names lower-cased; each row comes with its line number, so a bad one is reported by line
and skipped, never half-applied."""

from __future__ import annotations

import io
from collections.abc import Callable

Row = tuple[int, dict[str, str] | str]  # line, its fields by column, or why it is unreadable


class TableError(ValueError):
    """The text is not such a table at all (the message names the line where it can)."""


def read_table(text: str, check_header: Callable[[list[str]], str | None],
               no_header: str) -> list[Row]:
    """Every data row; ``check_header(names)`` says what is wrong with the header, if anything;
    ``no_header`` is the complaint when there is none."""
    import csv  # only a gateway with a SIM manifest, at start, pays for the module

    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")), strict=True)
    header: list[str] | None = None
    rows: list[Row] = []
    try:
        for cells in reader:
            if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
                continue
            if header is None:
                header = [c.strip().lower() for c in cells]
                if (why := check_header(header)) is not None:
                    raise TableError(f"line {reader.line_num}: {why}")
                continue
            if len(cells) != len(header):
                rows.append((reader.line_num, f"{len(cells)} fields, the header has {len(header)}"))
                continue
            rows.append((reader.line_num, {k: v.strip() for k, v in zip(header, cells,
                                                                         strict=True)}))
    except csv.Error as exc:
        raise TableError(f"line {reader.line_num}: not CSV: {exc}") from None
    if header is None:
        raise TableError(no_header)
    return rows
