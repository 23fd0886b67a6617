"""Lookup tables (``lookups:`` in a manifest): CSV/TSV files read into frozen ``LookupTable``s.

The manifest layer's only file reading besides the manifest itself: the planner stays pure and
gets the parsed tables with the Manifest. Every problem names the table's file and the line in it
(``FILE:LINE: $.lookups.NAME: message``), as manifest problems name the manifest's.

Invariants:
- UTF-8 (a byte-order mark is tolerated), the stdlib ``csv`` module, a header row naming the columns.
- Each key appears once; key cells are compared without surrounding whitespace (as the scan strips
  DICOM padding), every other cell exactly as written.
- ``sha256`` is over the very bytes parsed.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterable
from pathlib import Path

from . import labels
from .errors import Problem
from .model import LookupRow, LookupTable

# Per table and column: invalid label values reported one by one up to this many, then counted.
MAX_VALUE_PROBLEMS = 10


def delimiter_for(file: str, delimiter: str | None) -> str:
    """The ``delimiter`` option, else a tab for ``.tsv`` files, else a comma."""
    if delimiter:
        return delimiter
    return "\t" if file.lower().endswith(".tsv") else ","


def read_table(
    name: str, path: Path, shown: str, key: str, delimiter: str | None, where: str
) -> tuple[LookupTable | None, list[Problem]]:
    """Read one table: (the table or None, its problems). A table with bad rows comes back too,
    without them, so that its columns can still be checked. ``shown`` is the file as messages name
    it, ``where`` the manifest path of its entry (``$.lookups.NAME``). Raises OSError when the file
    cannot be read, IsADirectoryError when it is not a regular file (a FIFO, a device)."""

    def problem(line: int | None, message: str) -> tuple[None, list[Problem]]:
        return None, [Problem(shown, line, where, message)]

    if not path.is_file():
        raise IsADirectoryError(0, "not a regular file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return problem(line, "the file is not UTF-8 text; save it as CSV UTF-8")
    sep = delimiter_for(str(path), delimiter)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    problems: list[Problem] = []
    rows: dict[str, LookupRow] = {}
    header: list[str] | None = None
    columns: tuple[str, ...] = ()
    key_at = -1
    start = 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue  # a blank line, or a spreadsheet's row of empty cells
            if header is None:
                header = cells
                columns = tuple(cells)
                dupes = sorted({c for c in columns if columns.count(c) > 1})
                if dupes:
                    return problem(
                        line, f"the header names column {dupes[0]!r} twice; give every column its own name"
                    )
                if key not in columns:
                    return problem(
                        line,
                        f"the key column {key!r} is not in the header ({_names(columns)}); fix "
                        f"lookups.{name}.key or the file"
                        + (
                            " (is it tab-separated? set delimiter)"
                            if len(columns) == 1 and sep != "\t"
                            else ""
                        ),
                    )
                key_at = columns.index(key)
                continue
            if len(cells) != len(columns):
                problems.append(
                    Problem(
                        shown,
                        line,
                        where,
                        f"the row has {len(cells)} field(s), the header {len(columns)}; every row needs "
                        "one field per column (quote a value that holds the delimiter)",
                    )
                )
                continue
            value = cells[key_at].strip()
            if not value:
                problems.append(
                    Problem(shown, line, where, f"the key column {key} is empty; fill it or delete the row")
                )
                continue
            first = rows.get(value)
            if first is not None:
                problems.append(
                    Problem(
                        shown,
                        line,
                        where,
                        f"duplicate key {value!r} in column {key} (first at line {first.line}); a key "
                        "maps to one row: remove or merge one of them",
                    )
                )
                continue
            rows[value] = LookupRow(line, dict(zip(columns, cells, strict=True)))
    except csv.Error as exc:
        return problem(reader.line_num or None, f"the file is not valid CSV ({exc}); fix it at this line")
    if header is None:
        return problem(1, "the file is empty; a lookup table needs a header row naming its columns")
    if not rows and not problems:
        problems.append(
            Problem(
                shown,
                1,
                where,
                f"lookup table {name} has no rows: every study it maps or filters will be held back or "
                "filtered out",
                "warning",
            )
        )
    table = LookupTable(name, str(path.resolve()), key, hashlib.sha256(raw).hexdigest(), columns, rows)
    return table, problems


def check_columns(
    table: LookupTable, shown: str, where: str, refs: Iterable[labels.LookupRef]
) -> list[Problem]:
    """Every column the templates pick exists, and each of its values is a valid XNAT label.

    ``where`` is the manifest path of the template (the problem is at the file's line, though).
    """
    problems = []
    for column in sorted({r.column for r in refs if r.table == table.name}):
        if column not in table.columns:
            problems.append(
                Problem(
                    shown,
                    1,
                    where,
                    f"the template picks column {column!r} of lookup table {table.name}, which its header "
                    f"lacks ({_names(table.columns)}); fix the template or the file",
                )
            )
            continue
        bad = [r for r in table.rows.values() if not _usable(r.values[column])]
        for r in bad[:MAX_VALUE_PROBLEMS]:
            problems.append(Problem(shown, r.line, where, _bad_value(table, column, r.values[column])))
        if len(bad) > MAX_VALUE_PROBLEMS:
            problems.append(
                Problem(
                    shown,
                    bad[MAX_VALUE_PROBLEMS].line,
                    where,
                    f"… and {len(bad) - MAX_VALUE_PROBLEMS} more row(s) whose column {column} is not a "
                    "valid XNAT label",
                )
            )
    return problems


def _usable(value: str) -> bool:
    return labels.is_valid_label(value) and len(value) <= labels.MAX_LABEL_BYTES


def _bad_value(table: LookupTable, column: str, value: str) -> str:
    if len(value) > labels.MAX_LABEL_BYTES:
        return (
            f"column {column} of lookup table {table.name} holds a value of {len(value)} characters; a "
            f"label becomes a folder name of at most {labels.MAX_LABEL_BYTES}: shorten it"
        )
    return (
        f"column {column} of lookup table {table.name} holds {value!r}, which is not a valid XNAT label: "
        "use only letters, digits, '_' and '-' (XNAT's XftStringUtils.isValidId)"
    )


def _names(columns: Iterable[str]) -> str:
    return "columns: " + ", ".join(repr(c) for c in columns)
