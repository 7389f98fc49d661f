"""Per-stage reports: ``report.json`` (machine-readable) and ``report.md`` (for people).

A report holds the stage's params, its own figures (loss curve, sparsity...), the yardstick
metrics of its artifact, the deltas against the input model and against its parent, the time
taken, and for a skipped or failed stage the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimline.artifacts import Artifact, hash_json, write_json_atomic, write_text_atomic
from slimline.config import EvaluateConfig
from slimline.reports.tables import Column, cell, markdown_table

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def evaluation_key(artifact: Artifact, settings: EvaluateConfig, eval_data: str, device: str = "cpu") -> str:
    """What an evaluation depends on: the artifact, the yardstick settings, the eval data and the device."""
    return hash_json(
        {"artifact": artifact.key, "settings": settings.model_dump(mode="json"), "data": eval_data, "device": device}
    )


def read_report(folder: Path) -> dict[str, Any] | None:
    """A stage's report.json, or None if it has none."""
    path = folder / REPORT_JSON
    return json.loads(path.read_text()) if path.exists() else None


def compute_deltas(metrics: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float | None]:
    """Relative changes against a baseline report's metrics (None where either side is missing)."""
    if not metrics or not baseline.get("metrics"):
        return {}
    base = baseline["metrics"]

    def ratio(section: str, name: str) -> float | None:
        new, old = metrics.get(section, {}).get(name), base.get(section, {}).get(name)
        return new / old if new is not None and old else None

    size = metrics["size_mb"] / base["size_mb"] if base.get("size_mb") else None
    ppl = ratio("accuracy", "perplexity")
    return {
        "perplexity_change": None if ppl is None else ppl - 1,
        "top1_accuracy_change": metrics["accuracy"]["top1_accuracy"] - base["accuracy"]["top1_accuracy"],
        "decode_speedup": ratio("latency", "decode_tokens_per_s"),
        "prefill_speedup": None if ratio("latency", "prefill_ms") is None else 1 / ratio("latency", "prefill_ms"),
        "size_ratio": size,
    }


def write_stage_report(
    folder: Path, fields: dict[str, Any], metrics: dict[str, Any], baselines: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Write report.json and report.md for one stage; return the report."""
    folder.mkdir(parents=True, exist_ok=True)
    report = dict(fields)
    report["backend"] = metrics.pop("backend", None)
    report["evaluate_seconds"] = metrics.pop("evaluate_seconds", None)
    report["metrics"] = metrics
    report["deltas"] = {name: compute_deltas(metrics, base) for name, base in (baselines or {}).items()}
    write_json_atomic(folder / REPORT_JSON, report)
    write_text_atomic(folder / REPORT_MD, render_markdown(report))
    return report


def name_value_table(header: str, pairs: list[tuple[str, Any]]) -> list[str]:
    """A two-column Markdown table: ``header`` | value, numbers to four significant digits."""
    columns: list[Column[tuple[str, Any]]] = [
        Column(header, lambda pair: pair[0]),
        Column("value", lambda pair: cell(pair[1], ".4g")),
    ]
    return markdown_table(columns, pairs)


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report of one stage."""
    lines = [f"# Stage `{report['stage']}` ({report['kind']})", ""]
    lines.append(f"**Status:** {report['status']}" + (f": {report['reason']}" if report.get("reason") else ""))
    if report.get("parent"):
        lines.append(f"**Input:** `{report['parent']}`  ")
    if report.get("format"):
        lines.append(f"**Format:** {report['format']}, measured with the **{report['backend']}** backend  ")
    lines.append(
        f"**Time:** to produce {cell(report.get('produce_seconds'), '.1f')} s, evaluation {cell(report.get('evaluate_seconds'), '.1f')} s"
    )
    if report.get("params"):
        lines += ["", "## Params", "", "```json", json.dumps(report["params"], indent=2), "```"]
    metrics = report.get("metrics") or {}
    if metrics:
        accuracy, latency = metrics["accuracy"], metrics["latency"]
        lines += ["", "## Measurements", ""]
        rows = [
            ("perplexity", accuracy["perplexity"]),
            ("top-1 accuracy", accuracy["top1_accuracy"]),
            ("KL vs input (nats/token)", accuracy["kl_vs_input"]),
            ("top-1 agreement with input", accuracy["top1_agreement_with_input"]),
            ("scored tokens", accuracy["scored_tokens"]),
            ("prefill (ms)", latency["prefill_ms"]),
            ("decode (tokens/s)", latency["decode_tokens_per_s"]),
            ("per-token p50 / p95 (ms)", f"{latency['token_p50_ms']:.2f} / {latency['token_p95_ms']:.2f}"),
            ("peak memory (MB)", latency["peak_memory_mb"]),
            ("size on disk (MB)", metrics["size_mb"]),
            ("parameters", metrics["parameters"]),
        ]
        lines += name_value_table("metric", rows)
        lines.append(
            f"\nLatency: {latency['prompt_tokens']}-token prompt, {latency['new_tokens']} greedy tokens, "
            f"median of {latency['repeats']} repeats, {latency['threads']} threads."
        )
    for name, deltas in report.get("deltas", {}).items():
        if deltas:
            lines += ["", f"## Against the {name} model", ""]
            lines += name_value_table("change", [(key.replace("_", " "), value) for key, value in deltas.items()])
    if report.get("stage_metrics"):
        lines += ["", "## Stage figures", "", "```json", json.dumps(report["stage_metrics"], indent=2), "```"]
    return "\n".join(lines) + "\n"
