"""A run killed with SIGKILL mid-stage resumes: finished stages are reused, nothing half-written is trusted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from slimline.artifacts import read_artifact, verify_files
from tests.conftest import write_pipeline

pytestmark = pytest.mark.e2e

STAGES = """\
  - id: first
    kind: prune.magnitude
    params: {sparsity: 0.3}
  - id: slow
    kind: lora
    params: {rank: 2, steps: 40, batch_size: 2, sequence_length: 32, precision: fp32}
"""


def slimline_command(pipeline: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "slimline.cli", "run", str(pipeline), "--out", str(run_dir), "--ci"]


def run_until_killed(pipeline: Path, run_dir: Path, marker: str) -> list[str]:
    """Start a real run and SIGKILL it as soon as a log line contains ``marker``."""
    process = subprocess.Popen(
        slimline_command(pipeline, run_dir),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    seen = []
    assert process.stderr is not None
    for line in process.stderr:
        seen.append(line)
        if marker in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL, "".join(seen)
    return seen


def statuses(run_dir: Path) -> dict[str, str]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {row["stage"]: row["status"] for row in summary["stages"]}


def test_killed_run_resumes_to_the_same_result(tiny_model: Path, tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, tiny_model, STAGES)
    run_dir = tmp_path / "run"
    run_until_killed(pipeline, run_dir, "slow: step 2/40")

    # The stage in flight left only a temporary folder, never a folder that looks finished.
    stages = run_dir / "stages"
    assert (stages / "first" / "artifact.json").exists()
    assert not (stages / "slow" / "artifact.json").exists()
    assert any(p.name.startswith(".tmp-slow") for p in stages.iterdir())

    resumed = subprocess.run(slimline_command(pipeline, run_dir), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert statuses(run_dir) == {"input": "reused", "first": "reused", "slow": "ran"}
    assert not any(p.name.startswith(".tmp-") for p in stages.iterdir())
    slow = read_artifact(stages / "slow")
    assert verify_files(slow) == []

    # An uninterrupted run of the same pipeline produces the very same weights.
    clean_dir = tmp_path / "clean"
    clean = subprocess.run(slimline_command(pipeline, clean_dir), capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr
    clean_slow = read_artifact(clean_dir / "stages" / "slow")
    assert clean_slow.key == slow.key
    assert clean_slow.manifest["files"]["model.safetensors"] == slow.manifest["files"]["model.safetensors"]


def test_run_killed_during_evaluation_keeps_the_artifact(tiny_model: Path, tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path, tiny_model, STAGES.split("  - id: slow")[0])
    run_dir = tmp_path / "run"
    run_until_killed(pipeline, run_dir, "first: latency")
    assert (run_dir / "stages" / "first" / "artifact.json").exists()
    resumed = subprocess.run(slimline_command(pipeline, run_dir), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert statuses(run_dir) == {"input": "reused", "first": "reused"}
    assert json.loads((run_dir / "stages" / "first" / "report.json").read_text())["status"] == "ok"
