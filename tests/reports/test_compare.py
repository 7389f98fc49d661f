"""`slimline compare` on two real tiny runs: exactly the changed stages, and why."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimline.cli import app
from slimline.config import load_pipeline
from slimline.reports.compare import compare_runs, dict_changes
from slimline.runner import Runner
from tests.conftest import write_pipeline

STAGES = """\
  - id: sparse
    kind: prune.magnitude
    params: {sparsity: 0.5}
  - id: deeper
    kind: prune.magnitude
    params: {sparsity: 0.7}
  - id: other
    kind: prune.magnitude
    from: input
    params: {sparsity: 0.2}
"""


@pytest.fixture(scope="module")
def two_runs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("compare")
    path = write_pipeline(folder, tiny_model, STAGES, name="cmp")
    assert Runner(load_pipeline(path), folder / "a").run().ok
    assert Runner(load_pipeline(path, ["stages.sparse.params.sparsity=0.6"]), folder / "b").run().ok
    return folder / "a", folder / "b"


@pytest.mark.stage
def test_one_changed_parameter_changes_that_stage_and_its_dependents_only(two_runs: tuple[Path, Path]) -> None:
    diff = compare_runs(*two_runs)
    assert diff.changed == ["sparse", "deeper"]
    stages = {stage.stage: stage for stage in diff.stages}
    assert stages["sparse"].why == "params.sparsity: 0.5 -> 0.6"
    assert stages["deeper"].why == "its input 'sparse' changed"
    assert stages["input"].change == stages["other"].change == "unchanged"
    assert diff.context == (), "same seed, settings, libraries, machine and data"
    kl = next(delta for delta in stages["sparse"].deltas if delta.metric.field == "kl_vs_input")
    assert kl.b > kl.a > 0 and kl.direction == "worse", "more sparsity moves further from the input model"
    same = next(delta for delta in stages["other"].deltas if delta.metric.field == "perplexity")
    assert same.a == same.b and same.direction == "same", "an unchanged artifact scores the same tokens the same"


@pytest.mark.stage
def test_compare_command_prints_and_writes_markdown(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["compare", *map(str, two_runs), "--md", str(tmp_path / "diff.md")])
    assert result.exit_code == 0, result.output
    assert "2 changed: sparse, deeper" in result.output
    text = (tmp_path / "diff.md").read_text()
    assert "**Changed stages (2):** `sparse`, `deeper`" in text
    assert "| **sparse** | changed | params.sparsity: 0.5 -> 0.6 |" in text
    assert "| other | unchanged | - |" in text


@pytest.mark.stage
def test_added_and_removed_stages_and_bad_input(two_runs: tuple[Path, Path], tiny_model: Path, tmp_path: Path) -> None:
    path = write_pipeline(tmp_path, tiny_model, STAGES.replace("id: other", "id: fresh"), name="cmp")
    assert Runner(load_pipeline(path), tmp_path / "c").run().ok
    diff = compare_runs(two_runs[0], tmp_path / "c")
    changes = {stage.stage: stage.change for stage in diff.stages}
    assert changes == {
        "input": "unchanged",
        "sparse": "unchanged",
        "deeper": "unchanged",
        "fresh": "added",
        "other": "removed",
    }
    missing = CliRunner().invoke(app, ["compare", str(two_runs[0]), str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no such run folder" in missing.output


@pytest.mark.unit
def test_dict_changes_lists_each_differing_leaf() -> None:
    a = {"steps": 60, "lr": {"peak": 1e-3}, "gone": 1}
    b = {"steps": 100, "lr": {"peak": 1e-3}, "new": 2}
    assert dict_changes(a, b, "params") == [
        "params.gone: 1 -> (absent)",
        "params.new: (absent) -> 2",
        "params.steps: 60 -> 100",
    ]
