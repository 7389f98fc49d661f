"""The serve stage: a target/draft pair checked, measured on the yardstick, and servable as one artifact."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimline.config import load_pipeline
from slimline.errors import ConfigError
from slimline.runner import Runner
from slimline.serve.server import resolve_pair
from tests.conftest import write_pipeline

pytestmark = pytest.mark.stage

STAGES = """\
  - id: draft
    kind: distill
    params: {student: {layers: 1}, steps: 3, batch_size: 2, sequence_length: 32}
  - id: server
    kind: serve
    from: input
    params: {draft: draft, k: 3, check_prompts: 2, check_new_tokens: 12}
"""


def test_serve_stage_pairs_checks_and_measures(tiny_model: Path, tmp_path: Path) -> None:
    outcome = Runner(load_pipeline(write_pipeline(tmp_path, tiny_model, STAGES)), tmp_path / "run").run()
    result = next(r for r in outcome.results if r.stage_id == "server")
    assert result.status == "ran", result.reason
    manifest = result.artifact.manifest
    assert manifest["format"] == "serve"
    assert [p["stage"] for p in manifest["parents"]] == ["input", "draft"]
    checks = manifest["stage_metrics"]
    assert checks["identical_prompts"] == checks["check_prompts"] == 2
    assert checks["speculative_tokens_per_s"] > 0 and 0 <= checks["acceptance_rate"] <= 1
    report = result.report
    assert report["backend"] == "speculative"
    accuracy = report["metrics"]["accuracy"]
    assert accuracy["kl_vs_input"] < 1e-9 and accuracy["top1_agreement_with_input"] == 1.0  # the target's own logits
    pair = resolve_pair(result.artifact.path, None, None, None)
    assert pair.target == (tmp_path / "run" / "input").resolve()  # the input artifact, which points at the checkpoint
    assert pair.draft is not None and pair.draft.name == "draft" and pair.k == 3 and pair.adaptive is True
    assert resolve_pair(result.artifact.path, None, 5, False).k == 5  # explicit options win over the bundle

    # a changed draft re-runs the serve stage; an unchanged pipeline reuses it
    again = Runner(load_pipeline(write_pipeline(tmp_path, tiny_model, STAGES)), tmp_path / "run").run()
    assert {r.stage_id: r.status for r in again.results}["server"] == "reused"
    changed = STAGES.replace("steps: 3", "steps: 4")
    third = Runner(load_pipeline(write_pipeline(tmp_path, tiny_model, changed)), tmp_path / "run").run()
    assert {r.stage_id: r.status for r in third.results}["server"] == "ran"


def test_a_draft_that_is_not_an_earlier_stage_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    stages = "  - id: server\n    kind: serve\n    params: {draft: later}\n  - id: later\n    kind: prune.magnitude\n"
    with pytest.raises(ConfigError) as caught:
        load_pipeline(write_pipeline(tmp_path, tiny_model, stages))
    assert "tiny.yaml:" in str(caught.value) and "stages[0].params.draft" in str(caught.value)
    assert "'later' is not a stage defined before 'server'" in str(caught.value)
