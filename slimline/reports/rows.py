"""One row per artifact of a run, read from its ``summary.json``: the shared input of every run-level report.

The comparison report, the release gate, ``slimline compare`` and the CLI's summary table all
read a run through ``read_summary`` and ``rows_from_summary``, so they agree on every number.

Each row has a *role*: ``input`` (the model the run starts from), ``candidate`` (an artifact that
could be released), ``draft`` (a helper for speculative decoding: a ``distill`` output, a stage a
``serve`` stage names as its ``draft``, and what is exported or quantized from them) or
``off-scale`` (a collapsed artifact: perplexity more than ``OFF_SCALE`` times the input's, or not
finite). Only the input and candidates compete on the Pareto fronts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from slimline.errors import ReportError
from slimline.reports.run_files import ManifestFile, SummaryFile, check_summary, read_run_json

SUMMARY_JSON = "summary.json"
MANIFEST_JSON = "manifest.json"
DRAFT_KINDS = ("distill",)
# An artifact whose perplexity is more than this many times the input model's has collapsed.
OFF_SCALE = 10.0


@dataclass(frozen=True)
class Row:
    """One artifact (or the stage that should have made it): identity, status and figures."""

    stage: str
    kind: str
    status: str  # ran | reused | skipped | failed
    reason: str = ""
    parent: str | None = None
    format: str | None = None
    backend: str | None = None
    key: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    size_mb: float | None = None
    parameters: int | None = None
    perplexity: float | None = None
    top1_accuracy: float | None = None
    kl_vs_input: float | None = None
    prefill_ms: float | None = None
    decode_tokens_per_s: float | None = None
    token_p95_ms: float | None = None
    peak_memory_mb: float | None = None
    produce_seconds: float | None = None
    evaluate_seconds: float | None = None
    perplexity_change: float | None = None  # vs the input model, 0.03 = +3%
    decode_speedup: float | None = None  # vs the input model
    size_ratio: float | None = None  # vs the input model
    role: str = "candidate"  # input | candidate | draft | off-scale

    @property
    def measured(self) -> bool:
        """True when the artifact exists and was measured."""
        return self.perplexity is not None and self.decode_tokens_per_s is not None

    @property
    def note(self) -> str:
        """``skipped: why`` / ``failed: why`` for an artifact that does not exist, else ''."""
        return f"{self.status}: {self.reason}" if self.status in ("skipped", "failed") else ""

    @property
    def competes(self) -> bool:
        """True when the artifact was measured and may be on a Pareto front (the input or a candidate)."""
        return self.measured and self.role in ("input", "candidate")

    @property
    def sized(self) -> bool:
        """True when size_mb is the artifact's own model size (a serve artifact holds only a bundle pointing at two)."""
        return self.size_mb is not None and self.kind != "serve"


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A run folder's summary.json, checked (see ``run_files``); ReportError when it is missing or malformed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: {'not a folder' if run_dir.exists() else 'no such run folder'}")
    path = run_dir / SUMMARY_JSON
    if not path.exists():
        raise ReportError(f"{path} not found: is {run_dir} a finished run folder (runs/<name>)?")
    summary = read_run_json(path, SummaryFile)
    check_summary(summary, path)
    return summary


def read_run_manifest(run_dir: Path) -> dict[str, Any]:
    """A run folder's manifest.json, checked (see ``run_files``); {} when it has none, ReportError when malformed."""
    path = Path(run_dir) / MANIFEST_JSON
    return read_run_json(path, ManifestFile) if path.exists() else {}


def backend_on_device(backend: str | None, device: str | None) -> str | None:
    """'pytorch', or 'pytorch on cuda:0' where the artifact was measured on a GPU (the device's name dropped)."""
    if backend is None or not device or device == "cpu":
        return backend
    return f"{backend} on {device.split()[0]}"


def row_from_summary(entry: dict[str, Any]) -> Row:
    """A Row from one entry of summary.json's ``stages``, with the role its kind alone decides."""
    metrics = entry.get("metrics") or {}
    accuracy, latency = metrics.get("accuracy", {}), metrics.get("latency", {})
    deltas = (entry.get("deltas") or {}).get("input", {})
    return Row(
        stage=entry["stage"],
        kind=entry["kind"],
        status=entry["status"],
        reason=entry.get("reason", ""),
        parent=entry.get("parent"),
        format=entry.get("format"),
        backend=backend_on_device(entry.get("backend"), metrics.get("device")),
        key=entry.get("key"),
        params=entry.get("params") or {},
        size_mb=metrics.get("size_mb"),
        parameters=metrics.get("parameters"),
        perplexity=accuracy.get("perplexity"),
        top1_accuracy=accuracy.get("top1_accuracy"),
        kl_vs_input=accuracy.get("kl_vs_input"),
        prefill_ms=latency.get("prefill_ms"),
        decode_tokens_per_s=latency.get("decode_tokens_per_s"),
        token_p95_ms=latency.get("token_p95_ms"),
        peak_memory_mb=latency.get("peak_memory_mb"),
        produce_seconds=entry.get("produce_seconds"),
        evaluate_seconds=entry.get("evaluate_seconds"),
        perplexity_change=deltas.get("perplexity_change"),
        decode_speedup=deltas.get("decode_speedup"),
        size_ratio=deltas.get("size_ratio"),
        role=kind_role(entry["kind"]),
    )


def kind_role(kind: str) -> str:
    """The role a stage's kind alone decides: ``input``, ``draft`` or ``candidate``."""
    return "input" if kind == "input" else "draft" if kind in DRAFT_KINDS else "candidate"


def draft_stages(entries: list[dict[str, Any]]) -> set[str]:
    """Stages whose artifacts are drafts: distill outputs, those a serve stage drafts with, and their descendants.

    A serve stage itself pairs a target with a draft: it is never a draft.
    """
    drafts = {e["stage"] for e in entries if e["kind"] in DRAFT_KINDS}
    drafts |= {e["params"]["draft"] for e in entries if e["kind"] == "serve" and (e.get("params") or {}).get("draft")}
    for entry in entries:  # run order puts every parent first
        if entry["kind"] != "serve" and entry.get("parent") in drafts:
            drafts.add(entry["stage"])
    return drafts


def off_scale(perplexity: float | None, input_perplexity: float | None) -> bool:
    """True when a perplexity is not finite or more than OFF_SCALE times the input model's."""
    if perplexity is None:
        return False
    if not math.isfinite(perplexity):
        return True
    return input_perplexity is not None and perplexity > OFF_SCALE * input_perplexity


def rows_from_summary(summary: dict[str, Any]) -> list[Row]:
    """Every artifact of a run, in run order (the input model first), each with its role in the run."""
    rows = [row_from_summary(entry) for entry in summary["stages"]]
    drafts = draft_stages(summary["stages"])
    base = next((row.perplexity for row in rows if row.stage == "input"), None)
    return [replace(row, role=run_role(row, drafts, base)) for row in rows]


def run_role(row: Row, drafts: set[str], input_perplexity: float | None) -> str:
    """A row's role within its run: a draft stays a draft, any other collapsed artifact is off-scale.

    A draft is a small student, expected to score far worse than the input.
    """
    if row.role == "input":
        return "input"
    if row.stage in drafts:
        return "draft"
    return "off-scale" if off_scale(row.perplexity, input_perplexity) else "candidate"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both minimised), sorted by x.

    A point is dominated when another is no worse on both coordinates and better on one.
    """
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((ox <= x and oy <= y) and (ox < x or oy < y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])
