"""Tables for people, built once from a list of columns: Markdown for reports and benchmarks, rich for the CLI.

A table is a sequence of ``Column(header, cell)``: ``cell`` turns one row (a ``Row``, a dict,
a tuple: whatever the table lists) into the text of that column. ``markdown_table`` and
``rich_table`` render the same columns, so a report and the terminal cannot disagree on a
figure. ``cell`` is the one number formatter: ``-`` for a missing value.

```python
columns = [Column("stage", lambda r: r.stage), Column("ppl", lambda r: cell(r.perplexity, ".3f"), "right")]
lines = markdown_table(columns, rows)
```
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from rich.table import Table
from rich.text import Text

T = TypeVar("T")
MISSING = "-"


def cell(value: Any, spec: str = "", suffix: str = "") -> str:
    """A table cell: ``-`` for None; a number formatted with ``spec`` then ``suffix``; anything else as text.

    Booleans are words (``True``), not numbers.
    """
    if value is None:
        return MISSING
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return format(value, spec) + suffix


@dataclass(frozen=True)
class Column(Generic[T]):
    """One column: its header, how to show a row's cell, and which side its text keeps to."""

    header: str
    cell: Callable[[T], str]
    justify: Literal["left", "right"] = "left"


def keyed(
    header: str, key: str, spec: str = "", suffix: str = "", justify: Literal["left", "right"] = "left"
) -> Column[Mapping[str, Any]]:
    """A column of dict rows: ``row[key]`` through ``cell`` (``-`` when the key is missing or None)."""
    return Column(header, lambda row: cell(row.get(key), spec, suffix), justify)


def markdown_escape(text: str) -> str:
    """Keep a cell on one table row: pipes escaped, newlines as spaces."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_row(cells: Iterable[str]) -> str:
    """``| a | b |``; an empty cell is ``| |``."""
    return "|" + "".join(f" {text} |" if text else " |" for text in cells)


def markdown_table(columns: Sequence[Column[T]], rows: Iterable[T]) -> list[str]:
    """The table as Markdown lines: header, separator, one line per row."""
    lines = [markdown_row(column.header for column in columns), "|" + " --- |" * len(columns)]
    lines += [markdown_row(markdown_escape(column.cell(row)) for column in columns) for row in rows]
    return lines


def rich_table(columns: Sequence[Column[T]], rows: Iterable[T], title: str | None = None) -> Table:
    """The same table for a terminal (cells are plain text: brackets in a reason are not markup)."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column.header, justify=column.justify)
    for row in rows:
        table.add_row(*(Text(column.cell(row)) for column in columns))
    return table


def figures(values: Mapping[str, Any], spec: str = ".4g") -> str:
    """``name value, ...`` of a check's figures (every entry but ``pass``): floats with ``spec``, the rest whole."""
    return ", ".join(
        f"{name} {cell(value, spec) if isinstance(value, float) else cell(value)}"
        for name, value in values.items()
        if name != "pass"
    )


def checks_table(checks: Mapping[str, Mapping[str, Any]], spec: str = ".4g") -> list[str]:
    """Acceptance checks (name -> figures with a ``pass`` entry) as a Markdown table: check, figures, pass."""
    columns: list[Column[tuple[str, Mapping[str, Any]]]] = [
        Column("check", lambda item: item[0]),
        Column("figures", lambda item: figures(item[1], spec)),
        Column("pass", lambda item: "yes" if item[1]["pass"] else "NO"),
    ]
    return markdown_table(columns, checks.items())


def write_results(folder: Path, name: str, result: Mapping[str, Any], markdown: str) -> None:
    """A benchmark's results: ``<name>.json`` (every figure) and ``<name>.md`` (the readable table), printed too."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (folder / f"{name}.md").write_text(markdown)
    print(markdown)  # noqa: T201 - a benchmark script's output
