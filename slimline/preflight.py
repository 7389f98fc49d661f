"""Preflight: refuse up front what cannot run here, with the fix, before any work starts.

Checks every stage's optional packages (``SPEC.requires``), its other tools (``SPEC.missing_tools``),
its device (``SPEC.device == 'cuda'``), the free disk space, and its memory: the estimate of
``slimline.memory`` (weights, gradients, optimizer state, activations, calibration, KV cache)
against the free memory of the device it runs on. A stage marked ``allow_skip: true`` that cannot
run is skipped with the reason instead of refusing the whole run.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from slimline.config import INPUT_ID, Pipeline, StageConfig
from slimline.devices import device_problem, resolve_device
from slimline.errors import PreflightError
from slimline.memory import (
    MMAP_ENV,
    WARN_FRACTION,
    MemoryEstimate,
    free_memory,
    gb,
    pipeline_estimates,
)
from slimline.registry import stage_spec

log = logging.getLogger(__name__)

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


def unusable_device(stage: StageConfig) -> list[str]:
    """Why the device a stage asked for is not here ('cuda' with no GPU visible), beyond its kind's needs."""
    spec = stage_spec(stage.kind)
    if spec.device == "cuda":  # missing_requirements already says the kind needs a GPU
        return []
    problem = device_problem(resolve_device(stage.device, spec.device))
    return [f"{problem}; set device: auto to run where it can"] if problem else []


def folder_size(path: Path) -> int:
    """Bytes under a folder."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_preflight(pipeline: Pipeline, run_dir: Path, model_source: Path) -> dict[str, str]:
    """Raise PreflightError for what cannot run; return {stage id: reason} for stages to skip."""
    problems, skips, refused = [], {}, set()
    for stage in pipeline.config.stages:
        reasons = missing_requirements(stage.kind) + unusable_device(stage)
        if reasons and stage.allow_skip:
            skips[stage.id] = "; ".join(reasons)
        elif reasons:
            fix = "install what is missing, or set 'allow_skip: true' on the stage"
            problems.append(f"stage {stage.id!r} ({stage.kind}) {'; '.join(reasons)}; fix: {fix}")
            refused.add(stage.id)
    for stage_id, reason in check_memory(pipeline, model_source, runnable_stages(pipeline, skips.keys() | refused)):
        if next(stage for stage in pipeline.config.stages if stage.id == stage_id).allow_skip:
            skips[stage_id] = reason
        else:
            problems.append(reason)
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


def runnable_stages(pipeline: Pipeline, out: set[str]) -> list[str]:
    """Stages that will run: not skipped or refused, nor reading (at any remove) from one that is."""
    runnable: list[str] = []
    for stage in pipeline.config.stages:  # parents come first: validation refused forward references
        needs = [pipeline.parents[stage.id], *pipeline.extra_inputs.get(stage.id, [])]
        if stage.id not in out and all(need == INPUT_ID or need in runnable for need in needs):
            runnable.append(stage.id)
    return runnable


def check_memory(pipeline: Pipeline, model_source: Path, stage_ids: list[str]) -> list[tuple[str, str]]:
    """(stage id, refusal) for each stage whose memory estimate exceeds its device's free memory.

    Each estimate is logged (INFO; WARNING above ``WARN_FRACTION`` of the free memory). A model whose
    shape cannot be read here is not checked (the stage checks its input when it runs).
    """
    try:
        estimates = pipeline_estimates(pipeline, model_source, stage_ids)
    except Exception as error:  # an architecture the meta build cannot handle: said, not fatal
        log.warning(
            "memory preflight skipped: cannot estimate from %s: %s: %s", model_source, type(error).__name__, error
        )
        return []
    refusals = []
    for stage_id, estimate in estimates.items():
        free = free_memory(estimate.device)
        if free is None:
            log.info(
                "memory: %s (%s) %s; free %s memory unknown",
                stage_id,
                estimate.kind,
                estimate.describe(),
                estimate.device,
            )
            continue
        problem = memory_problem(estimate, free, pipeline.params[stage_id])
        if problem:
            refusals.append((stage_id, problem))
        else:
            log_estimate(estimate, free)
    return refusals


def log_estimate(estimate: MemoryEstimate, free: int) -> None:
    """One line per stage that fits: its estimate against the free memory, a warning when it is tight."""
    level = logging.WARNING if estimate.total > WARN_FRACTION * free else logging.INFO
    log.log(
        level,
        "memory: %s (%s) needs %s of %.1f GB free (%s)%s",
        estimate.stage_id,
        estimate.kind,
        estimate.describe(),
        free / 1e9,
        estimate.device,
        "; tight: above 80%, the estimate is approximate" if level == logging.WARNING else "",
    )


# --- a memory refusal and its fix -------------------------------------------------------------


def memory_problem(estimate: MemoryEstimate, free: int, params: Any) -> str | None:
    """The refusal for a stage whose estimate exceeds the free memory, with the fix; None when it fits."""
    if estimate.total <= free:
        return None
    where = "on each CUDA device" if estimate.device == "cuda" else "in this machine's memory"
    return (
        f"stage {estimate.stage_id!r} ({estimate.kind}) needs {estimate.describe()} and {gb(free)} GB are "
        f"free {where}; fix: {'; or '.join(fixes(estimate, free, params))} (an estimate: docs/scale.md, 'Memory preflight')"
    )


def fixes(estimate: MemoryEstimate, free: int, params: Any) -> list[str]:
    """What would bring the stage under ``free``, for its kind and for the part that dominates."""
    parts, train, found = estimate.parts, estimate.training, []
    if train is not None and parts.get("activations", 0) > 0.25 * estimate.per_process:
        found.append(smaller_batch(estimate, free))
    if estimate.kind == "lora" and params.quantize_base == "none" and parts.get("weights", 0) > 0.25 * free:
        found.append("QLoRA: quantize_base: nf4 trains over a frozen 4-bit base (weights about 1/7 of float32)")
    if train is not None and (fsdp := fsdp_fix(estimate, free)):
        found.append(fsdp)
    if parts.get("allocator", 0) > 0.25 * estimate.per_process:
        found.append(
            f"{MMAP_ENV}=131072 in the environment: glibc then returns freed activations at once and the allocator "
            "part goes (training steps measured 1.7x slower)"
        )
    if parts.get("output_check", 0) > 0.25 * estimate.per_process:
        found.append(
            "check: {enabled: false} on the stage skips the output check, which loads the output beside its parent"
        )
    if estimate.kind == "quantize.gptq" and parts.get("calibration", 0) > 0.25 * estimate.per_process:
        found.append("fewer calibration_samples or a shorter calibration_length")
    found.append("run it on a machine with more free memory")
    return found


def smaller_batch(estimate: MemoryEstimate, free: int) -> str:
    """Fewer rows (or tokens) per micro-batch, to within ``WARN_FRACTION`` of ``free``, and the accumulation keeping the batch."""
    train = estimate.training
    assert train is not None
    activations = estimate.parts["activations"] + estimate.parts.get("allocator", 0)  # both scale with the batch
    room = WARN_FRACTION * free / estimate.processes - (estimate.per_process - activations)
    if room <= 0:
        return "a smaller batch_size or sequence_length, once the rest fits: the rest alone does not"
    scale = room / activations
    batch = train.batch_size * train.world  # the stage's batch_size: every rank's rows
    rows = math.floor(batch * scale) // train.world * train.world
    if rows >= train.world:
        accumulation = math.ceil(batch * train.accumulation / rows)
        return (
            f"batch_size {batch} -> {rows} with gradient_accumulation {train.accumulation} -> {accumulation} "
            "(activations scale with batch_size; batch_size x gradient_accumulation keeps the effective batch)"
        )
    length = max(8, math.floor(train.sequence_length * batch * scale / train.world))
    return f"batch_size {batch} -> {train.world} and sequence_length {train.sequence_length} -> {length}"


def fsdp_fix(estimate: MemoryEstimate, free: int) -> str | None:
    """FSDP across the fewest devices whose shards fit, unless the whole model cannot be loaded once."""
    train = estimate.training
    assert train is not None
    if train.strategy == "fsdp" or estimate.load_peak > free:
        return None
    whole = sum(estimate.parts.get(name, 0) for name in ("weights", "teacher", "fake_quant"))
    if whole > free:
        return None  # each rank loads the whole model before sharding it
    sharded = sum(
        estimate.parts.get(name, 0) for name in ("weights", "teacher", "fake_quant", "gradients", "optimizer_state")
    )
    rest = estimate.per_process - sharded
    for world in (2, 4, 8, 16, 32, 64):
        if sharded / world + rest <= free:
            machines = (
                "GPUs" if estimate.device == "cuda" else "machines (nnodes; ranks on one machine share its memory)"
            )
            return f"launch: {{strategy: fsdp}} across {world} {machines} shards weights, gradients and optimizer state"
    return None
