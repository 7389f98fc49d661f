"""The runner: preflight, then walk the stage graph, reusing what is cached, then evaluate and report.

Run folder layout::

    runs/<name>/
      input/artifact.json          the input model (format 'source': hashes of its files, not a copy)
      input/report.{json,md}       its evaluation: the baseline every delta refers to
      stages/<id>/                 one artifact per stage: model files, artifact.json, report.{json,md}
      summary.json                 every stage's status and figures, and the release block
      manifest.json                seeds, library versions, hardware, data hashes (reproducibility)
      report.md, report.html       the comparison report: every artifact side by side, plots, gate
      run.log                      the run's DEBUG log: tracebacks, and third-party output by stage id

Caching: a stage's key hashes its kind, params, seed, the data it reads and its parent's key.
A finished artifact with the same key is reused; a changed parameter changes that stage's key
and so every dependent's key, and nothing else. An evaluation is cached by the artifact key
plus the evaluation settings, so changing only the yardstick re-measures without re-running.

Parallel branches: ``parallel.ParallelRunner`` (``slimline run --jobs N``) overrides
``produce_stages`` only. It stays the coordinator: it plans stages here (``plan_stage``) and hands
those that must run to worker processes, which run ``execute_plan`` as this class does. Evaluation
stays here, after production, one artifact at a time, so every latency figure has one yardstick.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from pydantic import BaseModel

from slimline.artifacts import (
    Artifact,
    find_reusable,
    hash_files,
    hash_json,
    new_work_folder,
    publish,
    remove_leftovers,
    write_json_atomic,
)
from slimline.config import INPUT_ID, DataSource, Pipeline, StageConfig, check_stage_shape, topological_order
from slimline.data import cached_token_stream, load_texts, source_fingerprint
from slimline.devices import describe_device, resolve_device
from slimline.errors import StageError
from slimline.evaluate import Evaluator
from slimline.evaluate.backends import open_backend
from slimline.evaluate.output_check import check_windows, floor_for, judge, measure_output
from slimline.models import checkpoint_shape, copy_tokenizer_files, load_tokenizer, resolve_model_source
from slimline.preflight import run_preflight
from slimline.progress import Progress
from slimline.registry import stage_module, stage_spec
from slimline.reports.comparison import write_run_reports
from slimline.reports.stage import evaluation_key, read_report, write_stage_report
from slimline.reproducibility import library_versions, write_manifest
from slimline.runlog import RUN_LOG, captured_output, run_folder, run_log
from slimline.runtime.checkpoint import checkpoint_context
from slimline.stage import DataAccess, StageContext

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """How one stage (or the input) ended in this run."""

    stage_id: str
    kind: str
    status: str  # ran | reused | skipped | failed
    reason: str = ""
    artifact: Artifact | None = None
    report: dict[str, Any] = field(default_factory=dict)
    run_seconds: float = 0.0  # spent producing it in this run (0 when reused or skipped)


@dataclass
class StagePlan:
    """A stage that has to run: its inputs are finished, and no artifact with its key exists."""

    stage_id: str
    kind: str
    key: str
    inputs: list[Artifact]
    folder: Path


@dataclass
class RunResult:
    """Every stage's result plus where the run lives."""

    run_dir: Path
    results: list[StageResult]
    seconds: float
    jobs: int = 1  # worker processes that produced artifacts at once (1: in this process)

    @property
    def ok(self) -> bool:
        """True when no stage failed (skipped stages do not fail a run)."""
        return all(r.status != "failed" for r in self.results)


class Runner:
    """Runs one validated pipeline into one run folder."""

    def __init__(
        self,
        pipeline: Pipeline,
        run_dir: Path | None = None,
        progress: Progress | None = None,
        model_source: Path | None = None,
    ) -> None:
        """Set up paths; nothing is loaded until ``run``.

        ``model_source``: the input checkpoint's folder when the caller has resolved it already (a
        worker process of a parallel run).
        """
        self.pipeline = pipeline
        self.config = pipeline.config
        self.run_dir = run_folder(self.config.name, run_dir)
        self.progress = progress or Progress()
        self.jobs = 1  # stages produced at once (``parallel.ParallelRunner`` sets more)
        self.base = pipeline.source.parent
        self.model_source = model_source or resolve_model_source(self.config.model, self.base)
        self.data = DataAccess(self.load_stream)
        self.results: dict[str, StageResult] = {}

    def run(self) -> RunResult:
        """Preflight, produce every artifact, evaluate and report each, write the summary; log into run.log."""
        with run_log(self.run_dir / RUN_LOG):
            log.debug("run %s: %s into %s", self.config.name, self.pipeline.source, self.run_dir)
            return self.run_logged()

    def run_logged(self) -> RunResult:
        """``run``'s work, inside the run log."""
        started = time.perf_counter()
        skips = run_preflight(self.pipeline, self.run_dir, self.model_source)
        (self.run_dir / "stages").mkdir(parents=True, exist_ok=True)
        for leftover in remove_leftovers(self.run_dir / "stages") + remove_leftovers(self.run_dir):
            log.info("removed %s left by an interrupted run", leftover.name)
        torch.manual_seed(self.config.seed)
        self.results[INPUT_ID] = self.produce_input()
        self.produce_stages(skips)
        evaluator = Evaluator(self.config.evaluate, self.data, self.results[INPUT_ID].artifact, self.progress)
        try:
            for stage_id, result in self.results.items():
                if result.artifact is not None and result.status != "failed":
                    self.evaluate_or_fail(stage_id, result, evaluator)
                else:
                    result.report = write_stage_report(
                        self.stage_dir(stage_id), self.report_fields(stage_id, result), {}
                    )
        finally:
            evaluator.close()
        outcome = RunResult(self.run_dir, list(self.results.values()), time.perf_counter() - started, self.jobs)
        write_json_atomic(self.run_dir / "summary.json", summarize(outcome, self.pipeline))
        write_manifest(self.run_dir, self.pipeline, self.splits_read())
        write_run_reports(self.run_dir)
        return outcome

    # --- producing artifacts -------------------------------------------------------------

    def stage_dir(self, stage_id: str) -> Path:
        """Where a stage's artifact (or the input's record) lives."""
        return self.run_dir / INPUT_ID if stage_id == INPUT_ID else self.run_dir / "stages" / stage_id

    def produce_input(self) -> StageResult:
        """Record the input model: a 'source' artifact that hashes the checkpoint's files in place."""
        files = hash_files(self.model_source)
        key = hash_json({"model": self.config.model, "files": files})
        folder = self.stage_dir(INPUT_ID)
        reused = find_reusable(folder, key)
        if reused:
            return StageResult(INPUT_ID, "input", "reused", artifact=reused)
        work = new_work_folder(folder)
        manifest = self.manifest(INPUT_ID, "input", "source", key, {}, [])
        manifest.update(files=files, model_path=str(self.model_source))
        return StageResult(INPUT_ID, "input", "ran", artifact=publish(work, folder, manifest))

    def produce_stages(self, skips: dict[str, str]) -> None:
        """Produce every stage in topological order, one after another, in this process."""
        for stage_id in topological_order(self.pipeline):
            self.results[stage_id] = self.produce_stage(stage_id, skips.get(stage_id))
            log_outcome(self.results[stage_id])

    def produce_stage(self, stage_id: str, preflight_skip: str | None) -> StageResult:
        """Reuse, run, or skip one stage."""
        plan = self.plan_stage(stage_id, preflight_skip)
        return plan if isinstance(plan, StageResult) else self.execute_plan(plan)

    def plan_stage(self, stage_id: str, preflight_skip: str | None) -> StageResult | StagePlan:
        """How a stage whose inputs are finished ends without running (skipped, reused), or the plan to run it."""
        stage = self.stage_config(stage_id)
        parent = self.results[self.pipeline.parents[stage_id]]
        if preflight_skip:
            return StageResult(stage_id, stage.kind, "skipped", reason=preflight_skip)
        extras = [self.results[other] for other in self.pipeline.extra_inputs.get(stage_id, [])]
        for needed in (parent, *extras):
            if needed.artifact is None:
                return StageResult(
                    stage_id, stage.kind, "skipped", reason=f"its input {needed.stage_id!r} {needed.status}"
                )
        inputs = [parent.artifact, *(extra.artifact for extra in extras)]
        key = self.stage_key(stage_id, inputs)
        folder = self.stage_dir(stage_id)
        reused = find_reusable(folder, key)
        if reused:
            problems = self.rejudge_output(stage, reused)
            if problems:
                return StageResult(stage_id, stage.kind, "failed", reason=problems)
            return StageResult(stage_id, stage.kind, "reused", artifact=reused)
        return StagePlan(stage_id, stage.kind, key, inputs, folder)

    def execute_plan(self, plan: StagePlan) -> StageResult:
        """Run a planned stage in this process; an exception fails the stage, not the run."""
        started = time.perf_counter()
        try:
            with captured_output(plan.stage_id):  # gptqmodel's banner and layer tables, torchao's import lines, ...
                artifact = self.run_stage(plan.stage_id, plan.kind, plan.key, plan.inputs, plan.folder)
        except Exception as error:  # a failed stage is reported; its siblings still run
            log.debug("%s failed:\n%s", plan.stage_id, traceback.format_exc())  # into run.log, not the terminal
            return StageResult(plan.stage_id, plan.kind, "failed", reason=f"{type(error).__name__}: {error}")
        return StageResult(
            plan.stage_id, plan.kind, "ran", artifact=artifact, run_seconds=time.perf_counter() - started
        )

    def run_stage(self, stage_id: str, kind: str, key: str, inputs: list[Artifact], folder: Path) -> Artifact:
        """Run a stage into a temporary folder and publish it; the temporary folder goes on failure."""
        module = stage_module(kind)
        parent = inputs[0]
        params = self.pipeline.params[stage_id]
        check_parent_shape(kind, params, parent)
        work = new_work_folder(folder)
        try:
            torch.manual_seed(self.config.seed)
            device = self.stage_device(stage_id)
            ctx = StageContext(stage_id, work, self.config.seed, self.data, self.progress, device)
            ctx.records["device"] = describe_device(device)
            started = time.perf_counter()
            output = module.run(params, inputs, ctx)
            seconds = time.perf_counter() - started
            copy_tokenizer_files(parent.model_path, work)
            manifest = self.manifest(stage_id, kind, output.format, key, params.model_dump(mode="json"), inputs)
            manifest["stage_metrics"] = {**output.metrics, **ctx.records}
            manifest["produce_seconds"] = round(seconds, 2)
            if output.base_model_path is not None:
                manifest["base_model_path"] = str(output.base_model_path)
            check = self.check_output(self.stage_config(stage_id), Artifact(work, manifest), parent, device)
            if check is not None:
                manifest["stage_metrics"]["output_check"] = check
            return publish(work, folder, manifest)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    def stage_device(self, stage_id: str) -> str:
        """Where a stage runs: its ``device:`` request, resolved against what its kind can run on."""
        stage = self.stage_config(stage_id)
        return resolve_device(stage.device, stage_spec(stage.kind).device)

    def check_output(
        self, stage: StageConfig, output: Artifact, parent: Artifact, device: str = "cpu"
    ) -> dict[str, Any] | None:
        """Score the unpublished output against its parent; raise StageError with the figures if it collapsed."""
        floor = floor_for(stage.kind, stage.check.min_top1_agreement, stage.check.max_kl)
        if floor is None or not stage.check.enabled:
            return None
        windows = check_windows(
            self.data.stream("calibration"), stage.check.tokens, checkpoint_context(parent.model_path)
        )
        with self.progress.task(f"{stage.id}: output check", 1) as advance:
            parent_backend = open_backend(parent, device)
            try:
                output_backend = open_backend(output, device)
                try:
                    figures = measure_output(output_backend, parent_backend, windows)
                finally:
                    output_backend.close()
            finally:
                parent_backend.close()
            advance(1)
        check = {**figures, "min_top1_agreement": floor.min_top1_agreement, "max_kl": floor.max_kl}
        problems = judge(figures, floor)
        log.debug(
            "%s: output check vs parent: top-1 agreement %.3f, KL %.4f%s",
            stage.id,
            figures["top1_agreement"],
            figures["kl"],
            f" -> FAILED: {'; '.join(problems)}" if problems else "",
        )
        if problems:
            raise StageError(
                f"output check failed on {figures['tokens']} calibration tokens: {'; '.join(problems)} "
                f"(measured: top-1 agreement {figures['top1_agreement']:.3f}, KL {figures['kl']:.4f}, "
                f"perplexity {figures['perplexity']:.4g}); nothing was published. Set the floor per stage with "
                "check: {min_top1_agreement: ..., max_kl: ...}"
            )
        return check

    def rejudge_output(self, stage: StageConfig, artifact: Artifact) -> str:
        """A reused artifact meets today's floor too, judged on the figures measured when it was made."""
        recorded = artifact.manifest.get("stage_metrics", {}).get("output_check")
        floor = floor_for(stage.kind, stage.check.min_top1_agreement, stage.check.max_kl)
        if recorded is None or floor is None or not stage.check.enabled:
            return ""
        problems = judge(recorded, floor)
        return (
            f"output check failed (figures recorded when the artifact was made): {'; '.join(problems)}"
            if problems
            else ""
        )

    def stage_key(self, stage_id: str, inputs: list[Artifact]) -> str:
        """Hash of everything that determines the stage's artifact."""
        spec = stage_spec(self.stage_config(stage_id).kind)
        data = {split: source_fingerprint(self.data_source(split), self.base) for split in spec.data}
        return hash_json(
            {
                "kind": spec.kind,
                "params": self.pipeline.params[stage_id].model_dump(mode="json"),
                "parent": inputs[0].key,
                **({"extra_inputs": [artifact.key for artifact in inputs[1:]]} if len(inputs) > 1 else {}),
                "seed": self.config.seed,
                "data": data,
            }
        )

    def stage_config(self, stage_id: str) -> StageConfig:
        """The pipeline file's entry for a stage."""
        return next(stage for stage in self.config.stages if stage.id == stage_id)

    def manifest(
        self, stage_id: str, kind: str, fmt: str, key: str, params: dict[str, Any], parents: list[Artifact]
    ) -> dict[str, Any]:
        """The manifest fields the runner owns (files are added by ``publish``)."""
        return {
            "format": fmt,
            "stage": stage_id,
            "kind": kind,
            "key": key,
            "params": params,
            "parents": [{"stage": p.manifest["stage"], "key": p.key, "path": str(p.path)} for p in parents],
            "seed": self.config.seed,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "versions": {"python": platform.python_version(), **library_versions()},
        }

    # --- data ----------------------------------------------------------------------------

    def data_source(self, split: str) -> DataSource:
        """The configured source of a split; calibration falls back to train."""
        data = self.config.data
        return {"train": data.train, "eval": data.eval, "calibration": data.calibration or data.train}[split]

    def splits_read(self) -> list[str]:
        """The data splits the pipeline's stages read (evaluation reads ``eval`` besides)."""
        return sorted({split for stage in self.config.stages for split in stage_spec(stage.kind).data})

    def load_stream(self, split: str) -> torch.Tensor:
        """Tokenize a split with the input model's tokenizer (through the token cache)."""
        texts = load_texts(self.data_source(split), self.base)
        return cached_token_stream(load_tokenizer(self.model_source), texts)

    # --- evaluation and reports ----------------------------------------------------------

    def evaluate_or_fail(self, stage_id: str, result: StageResult, evaluator: Evaluator) -> None:
        """Evaluate and report one artifact; a failure marks that artifact failed and the run goes on."""
        try:
            with captured_output(f"{stage_id} evaluation"):  # loading a GPTQ checkpoint imports gptqmodel, ...
                self.evaluate_and_report(stage_id, result, evaluator)
        except Exception as error:  # one artifact's broken evaluation must not lose the others' reports
            log.error("%s: evaluation failed: %s", stage_id, error)
            log.debug("%s: evaluation failed:\n%s", stage_id, traceback.format_exc())
            result.status = "failed"
            result.reason = f"evaluation failed: {type(error).__name__}: {error}"
            result.report = write_stage_report(self.stage_dir(stage_id), self.report_fields(stage_id, result), {})

    def evaluate_and_report(self, stage_id: str, result: StageResult, evaluator: Evaluator) -> None:
        """Measure the artifact unless an up-to-date report exists, then write its report."""
        folder = self.stage_dir(stage_id)
        key = evaluation_key(
            result.artifact,
            self.config.evaluate,
            source_fingerprint(self.config.data.eval, self.base),
            evaluator.device,
        )
        cached = read_report(folder)
        if cached and cached.get("evaluation_key") == key and cached.get("status") == "ok":
            result.report = cached
            return
        started = time.perf_counter()
        metrics = evaluator.evaluate(result.artifact, stage_id)
        metrics["evaluate_seconds"] = round(time.perf_counter() - started, 2)
        fields = self.report_fields(stage_id, result) | {"evaluation_key": key}
        result.report = write_stage_report(folder, fields, metrics, self.baselines(stage_id))

    def baselines(self, stage_id: str) -> dict[str, dict[str, Any]]:
        """The reports deltas are taken against: the input model and the stage's parent."""
        if stage_id == INPUT_ID:
            return {}
        parent_id = self.pipeline.parents[stage_id]
        return {"input": self.results[INPUT_ID].report, "parent": self.results[parent_id].report}

    def report_fields(self, stage_id: str, result: StageResult) -> dict[str, Any]:
        """Report fields that come from the run rather than from measuring."""
        manifest = result.artifact.manifest if result.artifact else {}
        stage = None if stage_id == INPUT_ID else self.stage_config(stage_id)
        return {
            "stage": stage_id,
            "kind": result.kind,
            "status": "ok" if result.artifact and result.status != "failed" else result.status,
            "reason": result.reason,
            "parent": None if stage is None else self.pipeline.parents[stage_id],
            "params": manifest.get("params", stage.params if stage else {}),
            "format": manifest.get("format"),
            "stage_metrics": manifest.get("stage_metrics", {}),
            # the artifact's production time (manifests written before the rename call it stage_seconds)
            "produce_seconds": manifest.get("produce_seconds", manifest.get("stage_seconds")),
            "artifact": str(result.artifact.path) if result.artifact else None,
        }


def check_parent_shape(kind: str, params: BaseModel, parent: Artifact) -> None:
    """The stage's ``check_shape`` on the real parent (validation checked a predicted shape); StageError if it fails.

    Artifacts without an HF ``config.json`` (a peft adapter, a GGUF file) have no shape to check: the
    stage's own input checks refuse what it cannot read.
    """
    if not (parent.model_path / "config.json").is_file():
        return
    try:
        shape = checkpoint_shape(parent.model_path)
    except (ValueError, KeyError, TypeError, AttributeError, OSError, StrictDataclassError) as error:
        raise StageError(
            f"cannot read the shape of {parent.manifest['stage']!r} ({parent.model_path}): {error}"
        ) from error
    problems, _ = check_stage_shape(kind, params, shape)
    if problems:
        found = "; ".join(f"{'.'.join(map(str, loc)) or 'input'}: {message}" for loc, message in problems)
        raise StageError(f"the input {parent.manifest['stage']!r} does not fit {kind}: {found}")


def log_outcome(result: StageResult) -> None:
    """The one terminal line per stage: how it ended, in how long, and its output check's figures."""
    label = f"{result.stage_id} ({result.kind})"
    if result.status == "failed":
        log.error("%s failed: %s (details in %s)", label, result.reason, RUN_LOG)
    elif result.status == "skipped":
        log.info("%s skipped: %s", label, result.reason)
    elif result.status == "reused":
        log.info("%s: reused the cached artifact", label)
    else:
        check = result.artifact.manifest.get("stage_metrics", {}).get("output_check") if result.artifact else None
        figures = (
            f"; output check: top-1 agreement {check['top1_agreement']:.3f}, KL {check['kl']:.4f}" if check else ""
        )
        log.info("%s: ran in %.1fs%s", label, result.run_seconds, figures)


def summarize(outcome: RunResult, pipeline: Pipeline) -> dict[str, Any]:
    """summary.json: each stage's status and headline figures, in run order."""
    rows = []
    for result in outcome.results:
        report = result.report
        rows.append(
            {
                "stage": result.stage_id,
                "kind": result.kind,
                "status": result.status,
                "reason": result.reason,
                "parent": report.get("parent"),
                "format": report.get("format"),
                "backend": report.get("backend"),
                "key": result.artifact.key if result.artifact else None,
                "params": report.get("params", {}),
                "metrics": report.get("metrics", {}),
                "deltas": report.get("deltas", {}),
                "run_seconds": round(result.run_seconds, 2),  # spent producing it in this run (0 when reused)
                "produce_seconds": report.get(
                    "produce_seconds"
                ),  # the artifact's own production time, when it was made
                "evaluate_seconds": report.get("evaluate_seconds"),  # its latest evaluation
            }
        )
    release = pipeline.config.release
    return {
        "pipeline": pipeline.config.name,
        "source": str(pipeline.source),
        "ok": outcome.ok,
        "seconds": round(outcome.seconds, 2),
        "seed": pipeline.config.seed,
        "jobs": outcome.jobs,  # stages produced at once; evaluation always ran one artifact at a time
        "release": release.model_dump(mode="json") if release else None,
        "stages": rows,
    }
