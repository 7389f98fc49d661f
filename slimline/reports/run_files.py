"""The run folder's JSON files as ``slimline report``, ``compare`` and ``gate`` expect them, checked on reading.

A run folder may come from elsewhere (a CI artifact, a colleague's upload) and may be truncated
or edited by hand. ``read_run_json`` reads ``summary.json`` or ``manifest.json`` within size and
nesting bounds and checks the fields the reports use against the models below (strict types,
unknown fields allowed), so every later step can index them without a ``KeyError`` or a
``TypeError``. Every problem is a ``ReportError`` of one line: ``file: where: what is wrong``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slimline.config import ReleaseConfig
from slimline.errors import ReportError
from slimline.untrusted import UntrustedInputError, read_json_file, short_repr

# summary.json holds one entry per stage; manifest.json the resolved pipeline and versions.
MAX_RUN_JSON_BYTES = 64 * 1024 * 1024
MAX_RUN_JSON_DEPTH = 64


class Loose(BaseModel):
    """Strict types for the fields the reports read; other fields are kept as they are."""

    model_config = ConfigDict(strict=True, extra="allow")


class AccuracyFigures(Loose):
    """``metrics.accuracy`` of a stage."""

    perplexity: float | None = Field(None, description="Perplexity on the eval split.")
    top1_accuracy: float | None = Field(None, description="Top-1 next-token accuracy.")
    kl_vs_input: float | None = Field(None, description="KL divergence from the input model, nats/token.")


class LatencyFigures(Loose):
    """``metrics.latency`` of a stage."""

    prefill_ms: float | None = Field(None, description="Prefill time of the prompt, ms.")
    decode_tokens_per_s: float | None = Field(None, description="Greedy decode rate.")
    token_p95_ms: float | None = Field(None, description="95th percentile per-token latency, ms.")
    peak_memory_mb: float | None = Field(None, description="Peak memory growth, MB.")


class StageMetrics(Loose):
    """``metrics`` of a stage: empty for a stage that has no artifact."""

    accuracy: AccuracyFigures = Field(AccuracyFigures(), description="Accuracy figures.")
    latency: LatencyFigures = Field(LatencyFigures(), description="Latency figures.")
    size_mb: float | None = Field(None, description="Size on disk, MB.")
    parameters: int | None = Field(None, description="Parameter count.")


class InputDeltas(Loose):
    """``deltas.input`` of a stage: ratios against the input model."""

    perplexity_change: float | None = Field(None, description="Relative perplexity change.")
    decode_speedup: float | None = Field(None, description="Decode rate ratio.")
    size_ratio: float | None = Field(None, description="Size ratio.")


class StageDeltas(Loose):
    """``deltas`` of a stage."""

    input: InputDeltas = Field(InputDeltas(), description="Against the input model.")


class StageEntry(Loose):
    """One entry of ``summary.json``'s ``stages``."""

    stage: str = Field(description="Stage id ('input' for the input model).")
    kind: str = Field(description="Stage kind.")
    status: str = Field(description="ran | reused | skipped | failed.")
    reason: str = Field("", description="Why a stage was skipped or failed.")
    parent: str | None = Field(None, description="The stage it read from.")
    format: str | None = Field(None, description="Artifact format.")
    backend: str | None = Field(None, description="Evaluation backend.")
    key: str | None = Field(None, description="Artifact key.")
    params: dict[str, Any] | None = Field(None, description="Validated params.")
    metrics: StageMetrics | None = Field(None, description="Measured figures.")
    deltas: StageDeltas | None = Field(None, description="Ratios against other artifacts.")
    produce_seconds: float | None = Field(None, description="Time the artifact took to produce.")
    evaluate_seconds: float | None = Field(None, description="Time its evaluation took.")


class SummaryFile(Loose):
    """``summary.json``: the run's outcome."""

    pipeline: str = Field(description="Pipeline name.")
    ok: bool = Field(description="Whether every stage succeeded.")
    seconds: float = Field(description="Wall time of the run.")
    release: dict[str, Any] | None = Field(None, description="The pipeline's release block.")
    stages: list[StageEntry] = Field(description="Every stage in run order.")


class ResolvedConfig(Loose):
    """The resolved pipeline config in ``manifest.json``; ``compare`` reads its evaluation settings."""

    evaluate: dict[str, Any] = Field(description="The evaluation settings.")


class PipelineRecord(Loose):
    """``manifest.json``'s ``pipeline``."""

    sha256: str = Field(description="sha256 of the pipeline file.")
    config: ResolvedConfig = Field(description="The resolved pipeline config.")


class GpuRecord(Loose):
    """One GPU in ``manifest.json``'s hardware."""

    name: str = Field(description="GPU name.")
    driver: str = Field(description="Driver version.")


class HardwareRecord(Loose):
    """``manifest.json``'s ``hardware``."""

    cpu: str = Field(description="CPU model.")
    cpu_count: int | None = Field(description="Logical CPUs.")
    torch_threads: int = Field(description="torch's thread count.")
    gpus: list[GpuRecord] = Field(description="GPUs seen.")


class ManifestFile(Loose):
    """``manifest.json``: what two runs must share to be compared."""

    seed: int = Field(description="The run's seed.")
    pipeline: PipelineRecord = Field(description="The pipeline file.")
    python: str = Field(description="Python version.")
    platform: str = Field(description="Platform string.")
    libraries: dict[str, str] = Field(description="Library versions.")
    hardware: HardwareRecord = Field(description="The machine.")
    data: dict[str, dict[str, Any]] = Field(description="Fingerprint of each data split read.")


def read_run_json(path: Path, shape: type[Loose]) -> dict[str, Any]:
    """A run folder's JSON file checked against ``shape``; ReportError of one line when it does not fit."""
    try:
        value = read_json_file(path, MAX_RUN_JSON_BYTES, MAX_RUN_JSON_DEPTH, "run file")
    except UntrustedInputError as error:
        raise ReportError(str(error)) from error
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(value).__name__} (truncated or hand-edited?)")
    try:
        shape.model_validate(value)
    except ValidationError as error:
        raise ReportError(f"{path}: {validation_problem(error)} (truncated or hand-edited?)") from error
    return value


def validation_problem(error: ValidationError) -> str:
    """The first problem of a validation error as ``field.path: message (got value)``, with the count of others."""
    problems = error.errors()
    first = problems[0]
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
    more = f"; and {len(problems) - 1} more problem(s)" if len(problems) > 1 else ""
    got = "" if first["type"] == "missing" else f" (got {short_repr(first.get('input'), 60)})"
    return f"{where or '(top level)'}: {first['msg']}{got}{more}"


def check_summary(summary: dict[str, Any], path: Path) -> None:
    """Cross-field checks the types cannot express: unique stage ids and a valid release block."""
    counts = Counter(entry["stage"] for entry in summary["stages"])
    duplicates = sorted(stage for stage, count in counts.items() if count > 1)
    if duplicates:
        raise ReportError(f"{path}: stages: duplicate stage ids {duplicates} (hand-edited?)")
    serve_drafts = [(entry.get("params") or {}).get("draft") for entry in summary["stages"] if entry["kind"] == "serve"]
    if any(draft is not None and not isinstance(draft, str) for draft in serve_drafts):
        raise ReportError(f"{path}: stages: a serve stage's params.draft is not a stage id (hand-edited?)")
    if summary.get("release"):
        try:
            ReleaseConfig.model_validate(summary["release"])
        except ValidationError as error:
            raise ReportError(f"{path}: release.{validation_problem(error)} (hand-edited?)") from error
