"""Preflight: refuse up front what cannot run here, with the fix, before any work starts.

Checks every stage's optional packages (``SPEC.requires``), its other tools (``SPEC.missing_tools``),
its device (``SPEC.device == 'cuda'``) and the free disk space. A stage marked ``allow_skip: true`` that cannot run is skipped with the
reason instead of refusing the whole run.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

from slimline.config import Pipeline
from slimline.errors import PreflightError
from slimline.registry import stage_spec

# Extra copies of the input model a run may write per stage (weights, temporary folder).
DISK_FACTOR_PER_STAGE = 2


def missing_requirements(kind: str) -> list[str]:
    """Why a stage kind cannot run here: missing packages or device (empty if it can)."""
    spec = stage_spec(kind)
    reasons = [
        f"needs the '{package}' package (pip install 'slimline[{spec.extra}]')"
        for package in spec.requires
        if importlib.util.find_spec(package) is None
    ]
    if spec.missing_tools is not None:  # needs beyond packages (llama.cpp's converter)
        reasons += spec.missing_tools()
    if spec.device == "cuda" and not torch.cuda.is_available():
        reasons.append("needs a CUDA GPU and none is visible")
    if reasons and spec.skip_hint:
        reasons.append(spec.skip_hint)
    return reasons


def folder_size(path: Path) -> int:
    """Bytes under a folder."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_preflight(pipeline: Pipeline, run_dir: Path, model_source: Path) -> dict[str, str]:
    """Raise PreflightError for what cannot run; return {stage id: reason} for stages to skip."""
    problems, skips = [], {}
    for stage in pipeline.config.stages:
        reasons = missing_requirements(stage.kind)
        if reasons and stage.allow_skip:
            skips[stage.id] = "; ".join(reasons)
        elif reasons:
            fix = "install what is missing, or set 'allow_skip: true' on the stage"
            problems.append(f"stage {stage.id!r} ({stage.kind}) {'; '.join(reasons)}; fix: {fix}")
    needed = folder_size(model_source) * DISK_FACTOR_PER_STAGE * len(pipeline.config.stages)
    run_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(run_dir).free
    if needed > free:
        problems.append(
            f"the run may need about {needed / 1e9:.1f} GB in {run_dir} and {free / 1e9:.1f} GB are free; "
            "fix: free disk space or pass --out to a larger disk"
        )
    if problems:
        raise PreflightError("preflight refused the run:\n  " + "\n  ".join(problems))
    return skips
