"""The table toolkit: one cell formatter, Markdown and rich from the same columns, and the benchmarks on it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from rich.console import Console

from slimline.reports.tables import Column, cell, checks_table, figures, keyed, markdown_table, rich_table

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
# benchmark script -> its committed result (benchmarks/results/<name>.json and .md)
BENCHMARKS = {
    "gguf_types": "gguf",
    "onnx_export": "onnx_export",
    "training_stages": "training_stages",
    "quantization": "quantization",
    "speculative": "speculative",
    "quickstart_cache": "quickstart_cache",
    "serving": "serving",
}


@pytest.mark.parametrize(
    ("value", "spec", "suffix", "text"),
    [
        (None, ".3f", "", "-"),
        (1.23456, ".3f", "", "1.235"),
        (0.0123, "+.2%", "", "+1.23%"),
        (1.5, ".2f", "x", "1.50x"),
        (None, ".2f", "x", "-"),
        (134_515_008, ".4g", "", "1.345e+08"),
        (7, "", "", "7"),
        (True, ".4g", "", "True"),
        ("8/8", ".4g", "", "8/8"),
    ],
)
def test_cell(value: object, spec: str, suffix: str, text: str) -> None:
    assert cell(value, spec, suffix) == text


ROWS = [{"name": "a|b", "ppl": 10.0, "note": ""}, {"name": "c", "ppl": None, "note": "line\nbreak [red]x[/]"}]
COLUMNS = [keyed("name", "name"), keyed("ppl", "ppl", ".2f", justify="right"), keyed("note", "note")]


def test_markdown_table_escapes_pipes_and_newlines_and_keeps_empty_cells() -> None:
    assert markdown_table(COLUMNS, ROWS) == [
        "| name | ppl | note |",
        "| --- | --- | --- |",
        "| a\\|b | 10.00 | |",
        "| c | - | line break [red]x[/] |",
    ]


def test_rich_table_shows_the_same_cells_as_plain_text() -> None:
    console = Console(width=120, record=True)
    console.print(rich_table(COLUMNS, ROWS, title="t"))
    text = console.export_text()
    assert "a|b" in text and "10.00" in text and "[red]x[/]" in text, "cells are not rich markup"
    assert rich_table(COLUMNS, ROWS).columns[1].justify == "right"


def test_checks_table_shows_floats_with_the_spec_and_counts_whole() -> None:
    checks = {"fast": {"speedup": 1.23456, "prompts": 12345, "identical": "8/8", "pass": True}, "none": {"pass": False}}
    assert figures(checks["fast"]) == "speedup 1.235, prompts 12345, identical 8/8"
    assert checks_table(checks)[2:] == [
        "| fast | speedup 1.235, prompts 12345, identical 8/8 | yes |",
        "| none | | NO |",
    ]


def test_column_cells_read_any_row_type() -> None:
    column: Column[tuple[str, int]] = Column("n", lambda row: cell(row[1], "03d"))
    assert markdown_table([column], [("x", 7)])[2] == "| 007 |"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", sorted(BENCHMARKS))
def test_benchmark_markdown_renders_the_committed_results_unchanged(script: str) -> None:
    results = ROOT / "benchmarks" / "results"
    result = json.loads((results / f"{BENCHMARKS[script]}.json").read_text())
    rendered = load_script(script).markdown(result)
    committed = (results / f"{BENCHMARKS[script]}.md").read_text()
    # an empty cell is `| |` everywhere now; a script that wrote `|  |` differs by that space only
    assert rendered == committed.replace("|  |", "| |")
