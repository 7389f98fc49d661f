"""What changed between two runs (``slimline compare RUN_A RUN_B``), e.g. the last release and a candidate.

Stages are matched by id. A stage *changed* when its artifact key differs (its kind, params,
seed, data or input changed), or, for a stage with no artifact in one run, when its status or
params differ; stages only in one run are *added* or *removed*. Each changed stage says why
(``params.steps: 60 -> 100``, ``its input 'tuned' changed``). Every stage present in both runs
shows its metric deltas; differences outside the stages (seed, evaluation settings, library
versions, hardware, data) are listed from the runs' ``manifest.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimline.reports.rows import Row, read_run_manifest, read_summary, rows_from_summary
from slimline.reports.tables import Column, cell, markdown_table


@dataclass(frozen=True)
class Metric:
    """A compared figure: the Row field, its label, and which direction is better."""

    field: str
    label: str
    higher_is_better: bool
    spec: str


METRICS = (
    Metric("perplexity", "ppl", False, ".3f"),
    Metric("top1_accuracy", "top-1", True, ".4f"),
    Metric("kl_vs_input", "KL vs input", False, ".4g"),
    Metric("decode_tokens_per_s", "decode tok/s", True, ".1f"),
    Metric("prefill_ms", "prefill ms", False, ".1f"),
    Metric("size_mb", "size MB", False, ".1f"),
)
# A relative change at least this large is highlighted.
HIGHLIGHT = 0.01


@dataclass(frozen=True)
class Delta:
    """One metric of one stage in both runs."""

    metric: Metric
    a: float | None
    b: float | None

    @property
    def relative(self) -> float | None:
        """``b / a - 1``; None when either is missing or ``a`` is zero."""
        return self.b / self.a - 1 if self.a and self.b is not None else None

    @property
    def direction(self) -> str:
        """``better``, ``worse`` or ``same`` (below the highlight threshold, or not comparable)."""
        rel = self.relative
        if rel is None or abs(rel) < HIGHLIGHT:
            return "same"
        return "better" if (rel > 0) == self.metric.higher_is_better else "worse"

    def text(self) -> str:
        """``a -> b (+x.x%)``."""
        rel = self.relative
        change = "" if rel is None else f" ({rel:+.1%})"
        return f"{cell(self.a, self.metric.spec)} -> {cell(self.b, self.metric.spec)}{change}"


@dataclass(frozen=True)
class StageDiff:
    """One stage across the two runs."""

    stage: str
    change: str  # added | removed | changed | unchanged
    why: str
    a: Row | None
    b: Row | None

    @property
    def deltas(self) -> list[Delta]:
        """Every metric's pair of values when the stage is in both runs."""
        if self.a is None or self.b is None:
            return []
        return [Delta(m, getattr(self.a, m.field), getattr(self.b, m.field)) for m in METRICS]


@dataclass(frozen=True)
class RunDiff:
    """Two runs side by side."""

    run_a: str
    run_b: str
    stages: tuple[StageDiff, ...]
    context: tuple[str, ...]  # differences outside the stages

    @property
    def changed(self) -> list[str]:
        """Ids of the stages that are added, removed or changed."""
        return [diff.stage for diff in self.stages if diff.change != "unchanged"]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": leaf}``."""
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat |= flatten(inner, f"{prefix}.{key}" if prefix else str(key))
        return flat
    return {prefix: value}


def dict_changes(a: Any, b: Any, prefix: str) -> list[str]:
    """``prefix.key: old -> new`` for every leaf that differs."""
    flat_a, flat_b = flatten(a, prefix), flatten(b, prefix)
    return [
        f"{key}: {flat_a.get(key, '(absent)')} -> {flat_b.get(key, '(absent)')}"
        for key in sorted(set(flat_a) | set(flat_b))
        if flat_a.get(key) != flat_b.get(key)
    ]


def why_changed(a: Row, b: Row, changed_so_far: set[str]) -> str:
    """Why a stage whose key or outcome differs changed; '' when it did not."""
    if a.kind != b.kind:
        return f"kind: {a.kind} -> {b.kind}"
    if a.parent != b.parent:
        return f"reads from: {a.parent} -> {b.parent}"
    if a.params != b.params:
        return "; ".join(dict_changes(a.params, b.params, "params"))
    if a.key is not None and b.key is not None:
        if a.key == b.key:
            return ""
        if a.parent in changed_so_far:
            return f"its input {a.parent!r} changed"
        return "model files changed" if a.stage == "input" else "seed, data or versions changed (see below)"
    if a.status != b.status:
        return f"status: {a.status} -> {b.status}" + (f" ({b.reason})" if b.reason else "")
    return ""


def diff_stages(rows_a: list[Row], rows_b: list[Row]) -> list[StageDiff]:
    """Match stages by id, in run B's order, then those only in run A."""
    by_a, by_b = {r.stage: r for r in rows_a}, {r.stage: r for r in rows_b}
    diffs: list[StageDiff] = []
    changed: set[str] = set()
    for b in rows_b:  # run order puts every parent before its children
        a = by_a.get(b.stage)
        if a is None:
            diffs.append(StageDiff(b.stage, "added", f"new {b.kind} stage", None, b))
            changed.add(b.stage)
            continue
        why = why_changed(a, b, changed)
        if why:
            changed.add(b.stage)
        diffs.append(StageDiff(b.stage, "changed" if why else "unchanged", why, a, b))
    diffs += [StageDiff(a.stage, "removed", "not in run B", a, None) for a in rows_a if a.stage not in by_b]
    return diffs


def context_changes(manifest_a: dict[str, Any], manifest_b: dict[str, Any]) -> list[str]:
    """Differences between the runs' manifests that can move every figure (stage configs excluded)."""
    if not manifest_a or not manifest_b:
        return ["a run has no manifest.json: seed, versions, hardware and data cannot be compared"]
    changes = (
        [f"seed: {manifest_a['seed']} -> {manifest_b['seed']}"] if manifest_a["seed"] != manifest_b["seed"] else []
    )
    config_a, config_b = manifest_a["pipeline"]["config"], manifest_b["pipeline"]["config"]
    changes += dict_changes(config_a["evaluate"], config_b["evaluate"], "evaluate")
    changes += dict_changes(manifest_a["libraries"], manifest_b["libraries"], "libraries")
    changes += dict_changes(manifest_a["hardware"], manifest_b["hardware"], "hardware")
    hashes_a = {split: entry.get("sha256") for split, entry in manifest_a["data"].items()}
    hashes_b = {split: entry.get("sha256") for split, entry in manifest_b["data"].items()}
    changes += dict_changes(hashes_a, hashes_b, "data")
    return changes


def compare_runs(run_a: Path, run_b: Path) -> RunDiff:
    """Compare two finished run folders; ReportError when one is not a run folder."""
    rows_a, rows_b = rows_from_summary(read_summary(run_a)), rows_from_summary(read_summary(run_b))
    context = context_changes(read_run_manifest(Path(run_a)), read_run_manifest(Path(run_b)))
    return RunDiff(str(run_a), str(run_b), tuple(diff_stages(rows_a, rows_b)), tuple(context))


def delta_markdown(delta: Delta) -> str:
    """A delta cell; highlighted in bold with its direction when it moved by HIGHLIGHT or more."""
    if delta.direction == "same":
        return delta.text()
    return f"**{delta.text()}** {delta.direction}"


def metric_column(index: int, metric: Metric) -> Column[StageDiff]:
    """The column of one metric's delta; '-' for a stage in only one run."""
    return Column(metric.label, lambda stage: delta_markdown(stage.deltas[index]) if stage.deltas else "-")


DIFF_COLUMNS: tuple[Column[StageDiff], ...] = (
    Column("stage", lambda stage: f"**{stage.stage}**" if stage.change != "unchanged" else stage.stage),
    Column("change", lambda stage: stage.change),
    Column("why", lambda stage: stage.why or "-"),
    *(metric_column(index, metric) for index, metric in enumerate(METRICS)),
)


def render_diff_markdown(diff: RunDiff) -> str:
    """The comparison as Markdown: changed stages first in words, then every stage's deltas."""
    lines = [f"# Compare `{diff.run_a}` (A) -> `{diff.run_b}` (B)", ""]
    if diff.changed:
        lines.append(f"**Changed stages ({len(diff.changed)}):** " + ", ".join(f"`{s}`" for s in diff.changed))
    else:
        lines.append("**No stage changed.**")
    lines += ["", *markdown_table(DIFF_COLUMNS, diff.stages)]
    lines += ["", f"Deltas of {HIGHLIGHT:.0%} or more are in bold with their direction (better/worse)."]
    if diff.context:
        lines += ["", "## Outside the stages", ""] + [f"- {change}" for change in diff.context]
    return "\n".join(lines) + "\n"
