"""The command line: validate, schema, run and report, through typer's real app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimline.cli import app
from tests.conftest import write_pipeline

runner = CliRunner()


@pytest.mark.unit
def test_validate_accepts_the_shipped_pipelines() -> None:
    for path in sorted(Path("pipelines").glob("*.yaml")):
        result = runner.invoke(app, ["validate", str(path)])
        assert result.exit_code == 0, result.output
        assert "valid pipeline" in result.output


@pytest.mark.unit
def test_validate_refuses_a_typo_with_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: builtin:stdlib-coder\nstages:\n  - id: a\n    kind: lora\n    params: {rnak: 4}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert f"{path}:6: stages[0].params.rnak: unknown field" in " ".join(result.output.split())


@pytest.mark.unit
def test_schema_is_json_with_the_stage_kinds() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    assert "lora" in json.loads(result.output)["$defs"]["StageConfig"]["properties"]["kind"]["enum"]


@pytest.mark.stage
def test_run_prints_the_summary_table_and_report_reprints_it(tiny_model: Path, tmp_path: Path) -> None:
    stages = "  - id: sparse\n    kind: prune.magnitude\n    params: {sparsity: 0.4}\n"
    path = write_pipeline(tmp_path, tiny_model, stages)
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "sparse" in result.output and "prune.magnitude" in result.output and "ran" in result.output
    again = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert again.exit_code == 0 and "sparse" in again.output
    missing = runner.invoke(app, ["report", str(tmp_path)])
    assert missing.exit_code == 2 and "not found" in missing.output
