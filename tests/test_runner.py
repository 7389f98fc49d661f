"""The runner on a tiny model: artifacts, manifests, reports, caching and selective re-runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimline.artifacts import read_artifact, verify_files
from slimline.config import load_pipeline
from slimline.runner import Runner
from tests.conftest import write_pipeline

pytestmark = pytest.mark.stage

STAGES = """\
  - id: tuned
    kind: lora
    params: {rank: 2, steps: 3, batch_size: 2, sequence_length: 32}
  - id: sparse
    kind: prune.magnitude
    params: {sparsity: 0.5}
  - id: half
    kind: prune.magnitude
    from: input
    params: {sparsity: 0.25, scope: global}
"""


def run(path: Path, run_dir: Path, overrides: list[str] | None = None) -> dict[str, str]:
    outcome = Runner(load_pipeline(path, overrides), run_dir).run()
    assert outcome.ok
    return {r.stage_id: r.status for r in outcome.results}


@pytest.fixture(scope="module")
def first_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("runner")
    path = write_pipeline(folder, tiny_model, STAGES)
    statuses = run(path, folder / "run")
    return path, folder / "run", statuses


def test_first_run_produces_every_artifact_with_manifest_and_report(
    first_run: tuple[Path, Path, dict[str, str]],
) -> None:
    _, run_dir, statuses = first_run
    assert statuses == {"input": "ran", "tuned": "ran", "sparse": "ran", "half": "ran"}
    sparse = read_artifact(run_dir / "stages" / "sparse")
    assert sparse.format == "hf"
    assert sparse.manifest["parents"][0]["stage"] == "tuned"
    assert "model.safetensors" in sparse.manifest["files"] and "tokenizer.json" in sparse.manifest["files"]
    assert verify_files(sparse) == []
    report = json.loads((run_dir / "stages" / "sparse" / "report.json").read_text())
    assert report["status"] == "ok" and report["backend"] == "pytorch"
    assert report["stage_metrics"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert report["metrics"]["accuracy"]["scored_tokens"] == 256
    assert report["metrics"]["accuracy"]["kl_vs_input"] > 0
    assert report["metrics"]["latency"]["decode_tokens_per_s"] > 0
    assert set(report["deltas"]) == {"input", "parent"}
    assert "## Measurements" in (run_dir / "stages" / "sparse" / "report.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [row["stage"] for row in summary["stages"]] == ["input", "tuned", "sparse", "half"]


def test_input_model_scores_zero_kl_against_itself(first_run: tuple[Path, Path, dict[str, str]]) -> None:
    _, run_dir, _ = first_run
    report = json.loads((run_dir / "input" / "report.json").read_text())
    assert report["metrics"]["accuracy"]["kl_vs_input"] == 0
    assert report["metrics"]["accuracy"]["top1_agreement_with_input"] == 1


def test_rerun_reuses_everything(first_run: tuple[Path, Path, dict[str, str]]) -> None:
    path, run_dir, _ = first_run
    assert set(run(path, run_dir).values()) == {"reused"}


def test_changed_param_reruns_that_stage_and_its_dependents_only(first_run: tuple[Path, Path, dict[str, str]]) -> None:
    path, run_dir, _ = first_run
    before = (run_dir / "stages" / "half" / "artifact.json").read_text()
    statuses = run(path, run_dir, ["stages.tuned.params.steps=4"])
    assert statuses == {"input": "reused", "tuned": "ran", "sparse": "ran", "half": "reused"}
    assert (run_dir / "stages" / "half" / "artifact.json").read_text() == before
    statuses = run(path, run_dir, ["stages.tuned.params.steps=4", "stages.sparse.params.sparsity=0.3"])
    assert statuses == {"input": "reused", "tuned": "reused", "sparse": "ran", "half": "reused"}


def test_changed_evaluation_settings_remeasure_without_rerunning(first_run: tuple[Path, Path, dict[str, str]]) -> None:
    path, run_dir, _ = first_run
    run(path, run_dir)  # back to the file's own params
    outcome = Runner(load_pipeline(path, ["evaluate.accuracy.max_tokens=128"]), run_dir).run()
    assert {r.status for r in outcome.results} == {"reused"}
    assert all(r.report["metrics"]["accuracy"]["scored_tokens"] == 128 for r in outcome.results)


def test_tampered_artifact_is_rebuilt(first_run: tuple[Path, Path, dict[str, str]]) -> None:
    path, run_dir, _ = first_run
    (run_dir / "stages" / "half" / "model.safetensors").write_bytes(b"corrupt")
    statuses = run(path, run_dir)
    assert statuses["half"] == "ran"
    assert verify_files(read_artifact(run_dir / "stages" / "half")) == []


def test_failed_stage_is_reported_and_dependents_skipped(tiny_model: Path, tmp_path: Path) -> None:
    stages = """\
  - id: broken
    kind: prune.magnitude
    params: {pattern: "n:m", n: 1, m: 3}
  - id: after
    kind: prune.magnitude
  - id: sibling
    kind: prune.magnitude
    from: input
"""
    outcome = Runner(load_pipeline(write_pipeline(tmp_path, tiny_model, stages)), tmp_path / "run").run()
    statuses = {r.stage_id: (r.status, r.reason) for r in outcome.results}
    assert not outcome.ok
    assert statuses["broken"][0] == "failed" and "not a multiple of m=3" in statuses["broken"][1]
    assert statuses["after"] == ("skipped", "its input 'broken' failed")
    assert statuses["sibling"][0] == "ran"
    assert not (tmp_path / "run" / "stages" / "broken" / "artifact.json").exists()
    report = json.loads((tmp_path / "run" / "stages" / "broken" / "report.json").read_text())
    assert report["status"] == "failed" and "not a multiple of m=3" in report["reason"]
