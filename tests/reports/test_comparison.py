"""The run's comparison report (report.md, report.html, summary.json) on a tiny run with a failed stage."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimline.cli import app
from slimline.config import load_pipeline
from slimline.reports.comparison import COLUMNS
from slimline.runner import Runner
from tests.conftest import write_pipeline
from tests.headless import decoded_image_sizes, find_chromium

pytestmark = pytest.mark.stage

STAGES = """\
  - id: sparse
    kind: prune.magnitude
    params: {sparsity: 0.5}
  - id: broken
    kind: prune.magnitude
    from: input
    params: {pattern: "n:m", n: 1, m: 3}
release:
  candidate: broken
  max_kl: 1.0
"""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("comparison")
    outcome = Runner(load_pipeline(write_pipeline(folder, tiny_model, STAGES, name="side")), folder / "run").run()
    assert not outcome.ok, "the 'broken' stage fails on purpose"
    return folder / "run"


def test_summary_holds_every_figure_the_report_shows(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = {row["stage"]: row for row in summary["stages"]}
    assert summary["release"]["candidate"] == "broken" and summary["seed"] == 0
    assert rows["sparse"]["format"] == "hf" and rows["sparse"]["parent"] == "input"
    assert rows["sparse"]["key"] and rows["sparse"]["params"]["sparsity"] == 0.5
    assert rows["broken"]["status"] == "failed" and rows["broken"]["key"] is None


def test_markdown_shows_every_artifact_side_by_side_and_the_failure_reason(run_dir: Path) -> None:
    text = (run_dir / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| stage |"))
    assert header == "| " + " | ".join(column.header for column in COLUMNS) + " |"
    table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0] for line in table[:3]] == ["| input", "| sparse", "| broken"]
    sparse = next(line for line in table if line.startswith("| sparse "))
    summary = json.loads((run_dir / "summary.json").read_text())
    ppl = next(row for row in summary["stages"] if row["stage"] == "sparse")["metrics"]["accuracy"]["perplexity"]
    assert f" {ppl:.3f} " in sparse
    broken = next(line for line in table if line.startswith("| broken "))
    assert "failed: " in broken and "not a multiple of m=3" in broken
    assert "## Release gate: **FAIL**" in text and "candidate 'broken' failed" in text
    assert len(text) < 65_000, "a pull-request comment holds at most 65,536 characters"


def test_html_is_self_contained_with_three_png_plots(run_dir: Path) -> None:
    html = (run_dir / "report.html").read_text()
    sources = re.findall(r'<img class="plot" src="([^"]+)"', html)
    assert len(sources) == 3
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(PNG_SIGNATURE)
    assert "Pareto front" in html and "not a multiple of m=3" in html
    assert not re.search(r'(src|href)="(?!data:)', html), "every resource is embedded"


def test_html_plots_decode_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    browser = find_chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium; .ci/run installs it)")
    sizes = decoded_image_sizes(run_dir / "report.html", browser, tmp_path)
    plots = [(width, height) for cls, width, height in sizes if cls == "plot"]
    assert len(plots) == 3
    assert all(width > 200 and height > 200 for width, height in plots), plots


def test_report_command_rewrites_the_reports(run_dir: Path) -> None:
    (run_dir / "report.md").unlink()
    (run_dir / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "report.md").exists() and (run_dir / "report.html").exists()
    assert "sparse" in result.output and "broken" in result.output
