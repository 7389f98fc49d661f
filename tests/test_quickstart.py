"""The quickstart pipeline end to end on the built-in example model, as `make demo` runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
