"""Preflight refuses what cannot run, before any work, or skips it when the stage allows."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimline.config import load_pipeline
from slimline.errors import PreflightError
from slimline.registry import STAGES
from slimline.runner import Runner
from tests.conftest import write_pipeline

pytestmark = pytest.mark.stage


@pytest.fixture
def missing_backend_kind(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(STAGES, "test.missing-backend", "tests.missing_backend_stage")
    return "test.missing-backend"


def test_missing_package_refuses_the_run_before_any_work(
    tiny_model: Path, tmp_path: Path, missing_backend_kind: str
) -> None:
    stages = f"  - id: fast\n    kind: prune.magnitude\n  - id: gpu-only\n    kind: {missing_backend_kind}\n"
    pipeline = load_pipeline(write_pipeline(tmp_path, tiny_model, stages))
    with pytest.raises(PreflightError) as caught:
        Runner(pipeline, tmp_path / "run").run()
    message = str(caught.value)
    assert "stage 'gpu-only'" in message and "slimline_no_such_backend" in message
    assert "pip install 'slimline[gpu]'" in message and "allow_skip" in message
    assert not (tmp_path / "run" / "stages").exists()


def test_allow_skip_marks_the_stage_skipped_with_its_reason(
    tiny_model: Path, tmp_path: Path, missing_backend_kind: str
) -> None:
    stages = f"  - id: gpu-only\n    kind: {missing_backend_kind}\n    allow_skip: true\n  - id: after\n    kind: prune.magnitude\n"
    outcome = Runner(load_pipeline(write_pipeline(tmp_path, tiny_model, stages)), tmp_path / "run").run()
    results = {r.stage_id: r for r in outcome.results}
    assert outcome.ok
    assert results["gpu-only"].status == "skipped" and "slimline_no_such_backend" in results["gpu-only"].reason
    assert results["after"].status == "skipped" and results["after"].reason == "its input 'gpu-only' skipped"
    assert (tmp_path / "run" / "stages" / "gpu-only" / "report.md").read_text().count("skipped") >= 1
