"""The example CI model-release workflow parses and calls only commands and options the CLI has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

from slimline.cli import app

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[1]
WORKFLOW = ROOT / "examples" / "ci" / "model-release.yml"


def workflow_steps() -> list[dict]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def slimline_calls() -> list[list[str]]:
    """Every `slimline ...` command line in the workflow's run steps, split into words."""
    calls = []
    for step in workflow_steps():
        for line in step.get("run", "").splitlines():
            found = re.search(r"(?:\.venv/bin/)?slimline (.+)$", line.strip())
            if found:
                calls.append(shlex.split(found.group(1)))
    return calls


def test_workflow_is_a_github_actions_job_with_the_release_steps() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert {"on", "jobs"} <= set(workflow) or {True, "jobs"} <= set(workflow)  # YAML reads `on:` as True
    uses = [step.get("uses", "") for step in workflow_steps()]
    assert any(u.startswith("actions/checkout@") for u in uses)
    assert any(u.startswith("actions/upload-artifact@") for u in uses)
    runs = "\n".join(step.get("run", "") for step in workflow_steps())
    assert "make install" in runs
    assert "gh pr comment" in runs and "--body-file" in runs and "report.md" in runs
    commands = [call[0] for call in slimline_calls()]
    assert commands == ["run", "gate"]


def test_every_slimline_call_names_a_real_command_and_real_options() -> None:
    group = typer.main.get_command(app)
    for call in slimline_calls():
        command = group.commands.get(call[0])
        assert command is not None, f"`slimline {call[0]}` is not a command"
        options = {name for param in command.params for name in getattr(param, "opts", [])}
        used = {word for word in call[1:] if word.startswith("--")}
        assert used <= options, f"`slimline {call[0]}` has no {sorted(used - options)}"
        ctx = command.make_context(f"slimline {call[0]}", [w.replace("$", "") for w in call[1:]])
        assert ctx.params, "the arguments parse"


def test_pipeline_the_workflow_runs_has_a_release_block() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    pipeline = yaml.safe_load((ROOT / workflow["env"]["PIPELINE"]).read_text())
    assert pipeline["release"]["candidate"] in {stage["id"] for stage in pipeline["stages"]}
    assert workflow["env"]["RUN_DIR"] == f"runs/{pipeline['name']}"
