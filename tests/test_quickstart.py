"""The quickstart pipeline end to end on the built-in example model, as `make demo` runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimline.cli import app
from tests.headless import decoded_image_sizes, find_chromium

pytestmark = pytest.mark.e2e

QUICKSTART = Path(__file__).parents[1] / "pipelines" / "quickstart.yaml"


def run_quickstart(run_dir: Path) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    command = [sys.executable, "-m", "slimline.cli", "run", str(QUICKSTART), "--out", str(run_dir), "--ci"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    return result, time.perf_counter() - started


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    result, _ = run_quickstart(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir.parent / "first-run.stderr").write_text(result.stderr)
    return run_dir


def test_every_stage_ran_and_reported_real_figures(quickstart: Path) -> None:
    summary = json.loads((quickstart / "summary.json").read_text())
    assert summary["ok"]
    rows = {row["stage"]: row for row in summary["stages"]}
    assert set(rows) == {"input", "tuned", "sparse", "two-four"}
    for row in rows.values():
        assert row["status"] == "ran" and row["backend"] == "pytorch"
        accuracy, latency = row["metrics"]["accuracy"], row["metrics"]["latency"]
        assert 1 < accuracy["perplexity"] < 100, "the example model is trained: perplexity far below its vocabulary"
        assert accuracy["scored_tokens"] == 8192
        assert latency["decode_tokens_per_s"] > 0 and latency["token_p95_ms"] >= latency["token_p50_ms"]
        assert row["metrics"]["size_mb"] > 10
    assert rows["input"]["metrics"]["accuracy"]["kl_vs_input"] == 0
    assert rows["sparse"]["metrics"]["accuracy"]["kl_vs_input"] > 0
    two_four = json.loads((quickstart / "stages" / "two-four" / "report.json").read_text())
    assert two_four["stage_metrics"]["sparsity"] == pytest.approx(0.5)
    assert two_four["deltas"]["parent"]["perplexity_change"] > 0, "2:4 pruning without recovery costs accuracy"
    tuned = json.loads((quickstart / "stages" / "tuned" / "report.json").read_text())
    assert 0 < tuned["stage_metrics"]["trainable_fraction"] < 0.03


def test_second_run_reuses_every_stage_in_seconds(quickstart: Path) -> None:
    result, seconds = run_quickstart(quickstart)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((quickstart / "summary.json").read_text())
    assert {row["status"] for row in summary["stages"]} == {"reused"}
    assert seconds < 60, f"a fully cached re-run took {seconds:.1f}s"


def test_run_writes_the_three_report_forms_and_the_manifest(quickstart: Path, tmp_path: Path) -> None:
    for name in ("report.md", "report.html", "summary.json", "manifest.json"):
        assert (quickstart / name).stat().st_size > 0, name
    report = (quickstart / "report.md").read_text()
    for stage in ("input", "tuned", "sparse", "two-four"):
        assert f"| {stage} | " in report
    assert "## Release gate: **PASS**" in report
    manifest = json.loads((quickstart / "manifest.json").read_text())
    assert manifest["seed"] == 0 and {"eval", "train"} <= set(manifest["data"])
    browser = find_chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium; .ci/run installs it)")
    plots = [size for size in decoded_image_sizes(quickstart / "report.html", browser, tmp_path) if size[0] == "plot"]
    assert len(plots) == 3 and all(width > 200 and height > 200 for _, width, height in plots), plots


def test_ci_logs_are_json_lines_ending_with_the_outcome(quickstart: Path) -> None:
    lines = (quickstart.parent / "first-run.stderr").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith('{"time"')]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(record["logger"] == "slimline.training" for record in records)
    finished = json.loads(records[-1]["message"].removeprefix("run finished: "))
    assert finished["ok"] and finished["stages"]["sparse"] == "ran"


def test_gate_passes_the_quickstart_candidate(quickstart: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["gate", str(quickstart), "--junit", str(tmp_path / "gate.xml")])
    assert result.exit_code == 0, result.output
    assert "candidate 'sparse'" in result.output and "PASS: 'sparse' meets all 4 limits" in result.output
