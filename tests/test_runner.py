"""The runner on a tiny model: artifacts, manifests, reports, caching and selective re-runs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from slimline import registry
from slimline.artifacts import Artifact, read_artifact, verify_files
from slimline.config import load_pipeline
from slimline.errors import StageError
from slimline.finetune import lora
from slimline.runner import Runner, check_parent_shape
from slimline.stage import StageParams, StageSpec, same_shape
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


def test_time_fields_say_whose_time_they_are(first_run: tuple[Path, Path, dict[str, str]]) -> None:
    path, run_dir, _ = first_run
    run(path, run_dir)  # everything reused: no time spent producing in this run
    rows = {row["stage"]: row for row in json.loads((run_dir / "summary.json").read_text())["stages"]}
    manifest = read_artifact(run_dir / "stages" / "sparse").manifest
    report = json.loads((run_dir / "stages" / "sparse" / "report.json").read_text())
    assert rows["sparse"]["run_seconds"] == 0
    assert rows["sparse"]["produce_seconds"] == report["produce_seconds"] == manifest["produce_seconds"] > 0
    assert "stage_seconds" not in rows["sparse"] and "stage_seconds" not in report
    assert "**Time:** to produce" in (run_dir / "stages" / "sparse" / "report.md").read_text()


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
    log = (tmp_path / "run" / "run.log").read_text()
    assert "broken failed:\nTraceback (most recent call last)" in log and "not a multiple of m=3" in log


class NoParams(StageParams):
    """No params."""


def noisy_run(params, inputs, ctx):
    """A stage that talks like gptqmodel (print, raw descriptor writes) and then fails."""
    print("LIBRARY BANNER from print")  # noqa: T201
    sys.stdout.flush()
    os.write(2, b"LIBRARY LAYER TABLE from fd 2\n")
    raise RuntimeError("the library gave up")


@pytest.fixture
def noisy_kind(monkeypatch: pytest.MonkeyPatch) -> str:
    module = ModuleType("tests.noisy_stage")
    module.__dict__.update(
        SPEC=StageSpec(kind="test.noisy", requires=(), extra=None, device="cpu", data=()),
        Params=NoParams,
        check_shape=same_shape,
        run=noisy_run,
    )
    monkeypatch.setitem(sys.modules, "tests.noisy_stage", module)
    monkeypatch.setitem(registry.STAGES, "test.noisy", "tests.noisy_stage")
    return "test.noisy"


def test_third_party_output_and_the_traceback_go_to_the_run_log_only(
    tiny_model: Path, tmp_path: Path, noisy_kind: str, capfd: pytest.CaptureFixture[str]
) -> None:
    pipeline = load_pipeline(write_pipeline(tmp_path, tiny_model, f"  - id: loud\n    kind: {noisy_kind}\n"))
    with capfd.disabled():  # real descriptors, as under `slimline run`
        outcome = Runner(pipeline, tmp_path / "run").run()
    assert {r.stage_id: r.status for r in outcome.results}["loud"] == "failed"
    terminal = capfd.readouterr()
    assert "LIBRARY" not in terminal.out + terminal.err
    log = (tmp_path / "run" / "run.log").read_text()
    assert "[loud] LIBRARY BANNER from print" in log and "[loud] LIBRARY LAYER TABLE from fd 2" in log
    assert "loud failed:\nTraceback (most recent call last)" in log and "RuntimeError: the library gave up" in log


@pytest.mark.unit
def test_check_shape_runs_on_the_real_parent_before_the_stage(tiny_model: Path) -> None:
    parent = Artifact(tiny_model, {"stage": "input", "format": "source", "model_path": str(tiny_model)})
    check_parent_shape("lora", lora.Params(), parent)  # the tiny Llama has every default target
    with pytest.raises(StageError, match=r"does not fit lora: target_modules: \['qkv'\] match no linear layer"):
        check_parent_shape("lora", lora.Params(target_modules=["qkv"]), parent)
