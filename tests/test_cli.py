"""The command line: validate, schema, run and report, through typer's real app."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimline.cli import app
from tests.conftest import write_pipeline

runner = CliRunner()


@pytest.mark.unit
def test_validate_accepts_the_shipped_pipelines() -> None:
    for path in sorted(Path("pipelines").glob("*.yaml")):
        result = runner.invoke(app, ["validate", str(path), *model_override(path)])
        assert result.exit_code == 0, result.output
        assert "valid pipeline" in result.output


def model_override(path: Path) -> list[str]:
    """real-model.yaml's GGUF is fetched by its benchmark, not shipped: without it, check its stages on the example model."""
    model = Path("pipelines/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    if path.name == "real-model.yaml" and not model.exists():
        return ["--set", "model=builtin:stdlib-coder"]
    return []


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


def run_ci(path: Path, run_dir: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "slimline.cli", "run", str(path), "--out", str(run_dir), "--ci"]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.e2e
def test_ci_stderr_is_json_lines_only_and_the_chatter_is_in_the_run_log(tiny_model: Path, tmp_path: Path) -> None:
    # lora imports peft, which imports torchao and gptqmodel: both print as they load
    stages = (
        "  - id: sparse\n    kind: prune.magnitude\n    params: {sparsity: 0.4}\n"
        "  - id: tuned\n    kind: lora\n    params: {rank: 2, steps: 2, batch_size: 2, sequence_length: 32}\n"
    )
    result = run_ci(write_pipeline(tmp_path, tiny_model, stages), tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line is one JSON object
    assert records and all({"time", "level", "logger", "message"} <= set(record) for record in records)
    assert not [r for r in records if not r["logger"].startswith("slimline")]  # other libraries: run.log only
    ran = [r["message"] for r in records if r["logger"] == "slimline.runner" and "ran in" in r["message"]]
    assert [message.split(":")[0] for message in ran] == ["sparse (prune.magnitude)", "tuned (lora)"]
    finished = json.loads(records[-1]["message"].removeprefix("run finished: "))
    assert finished["ok"] and finished["log"] == str(tmp_path / "run" / "run.log")
    log = (tmp_path / "run" / "run.log").read_text()
    assert "DEBUG slimline.runner" in log and "INFO slimline.runner: tuned (lora): ran in" in log


@pytest.mark.e2e
def test_a_refused_pipeline_under_ci_is_a_json_error_record(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: builtin:stdlib-coder\nstages:\n  - id: a\n    kind: lora\n    params: {rnak: 4}\n")
    result = run_ci(path, tmp_path / "run")
    assert result.returncode == 2
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert len(records) == 1 and records[0]["level"] == "ERROR" and "unknown field" in records[0]["message"]
