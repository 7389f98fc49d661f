"""The run's comparison report: every artifact side by side, as ``report.md`` and ``report.html``.

``report.md`` is short enough for a pull-request comment: one table row per artifact (role,
format, backend, size, parameters, perplexity, top-1, KL vs input, prefill, decode speed, p95,
peak memory, time to produce, status with the reason for a skipped or failed stage), the Pareto
front, which artifacts are drafts or off-scale, and the release gate's verdict when the pipeline
has a ``release:`` block. Drafts (helpers for speculative decoding) and off-scale (collapsed)
artifacts are never on a Pareto front. The CLI prints ``SUMMARY_COLUMNS``, a subset of the same
columns over the same rows.
``report.html`` is one self-contained file (plots embedded as PNG ``data:`` URIs) with the same
table, the accuracy-vs-latency and accuracy-vs-size scatters and per-stage bars.
Both are rebuilt from ``summary.json`` (and ``manifest.json`` when present) by ``write_run_reports``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from slimline.artifacts import write_text_atomic
from slimline.config import ReleaseConfig
from slimline.reports.gate import Verdict, judge, render_verdict_markdown
from slimline.reports.plots import run_plots
from slimline.reports.rows import OFF_SCALE, Row, pareto_front, read_summary, rows_from_summary
from slimline.reports.tables import Column, cell, markdown_table
from slimline.reproducibility import read_manifest

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
TEMPLATES = Path(__file__).parent / "templates"


COLUMNS: tuple[Column[Row], ...] = (
    Column("stage", lambda r: r.stage),
    Column("kind", lambda r: r.kind),
    Column("role", lambda r: r.role if r.measured or r.role == "input" else "-"),
    Column("format", lambda r: cell(r.format)),
    Column("backend", lambda r: cell(r.backend)),
    Column("size MB", lambda r: cell(r.size_mb, ".1f"), "right"),
    Column("params", lambda r: cell(None if r.parameters is None else r.parameters / 1e6, ".2f", "M"), "right"),
    Column("ppl", lambda r: cell(r.perplexity, ".3f"), "right"),
    Column("ppl vs input", lambda r: cell(r.perplexity_change, "+.2%"), "right"),
    Column("top-1", lambda r: cell(r.top1_accuracy, ".4f"), "right"),
    Column("KL vs input", lambda r: cell(r.kl_vs_input, ".4f"), "right"),
    Column("prefill ms", lambda r: cell(r.prefill_ms, ".1f"), "right"),
    Column("decode tok/s", lambda r: cell(r.decode_tokens_per_s, ".1f"), "right"),
    Column("speedup", lambda r: cell(r.decode_speedup, ".2f", "x"), "right"),
    Column("p95 ms", lambda r: cell(r.token_p95_ms, ".2f"), "right"),
    Column("peak MB", lambda r: cell(r.peak_memory_mb, ".0f"), "right"),
    Column("time s", lambda r: cell(r.produce_seconds, ".1f"), "right"),
    Column("status", lambda r: r.note or r.status),
)
# What `slimline run` and `slimline report` print: the headline columns, narrow enough for a terminal.
SUMMARY_HEADERS = (
    "stage",
    "kind",
    "role",
    "backend",
    "ppl",
    "top-1",
    "KL vs input",
    "decode tok/s",
    "speedup",
    "size MB",
    "status",
)
SUMMARY_COLUMNS = tuple(column for column in COLUMNS if column.header in SUMMARY_HEADERS)


def front_stages(rows: list[Row]) -> dict[str, list[str]]:
    """Stages on the Pareto front of perplexity vs decode speed and of perplexity vs size (input and candidates only)."""
    measured = [row for row in rows if row.competes]
    speed = pareto_front([(-(row.decode_tokens_per_s or 0.0), row.perplexity or 0.0) for row in measured])
    sized = [row for row in measured if row.sized]
    size = pareto_front([(row.size_mb or 0.0, row.perplexity or 0.0) for row in sized])
    return {"speed": [measured[i].stage for i in speed], "size": [sized[i].stage for i in size]}


def run_verdict(summary: dict[str, Any], rows: list[Row], run: str) -> Verdict | None:
    """The release gate's verdict when the run has a release block, else None."""
    if not summary.get("release"):
        return None
    return judge(ReleaseConfig.model_validate(summary["release"]), rows, run, summary["pipeline"])


def role_notes(rows: list[Row]) -> list[str]:
    """Sentences naming the drafts and the off-scale artifacts, with why they are off the fronts; [] when none."""
    drafts = [f"`{row.stage}`" for row in rows if row.role == "draft"]
    collapsed = [f"`{row.stage}` ({cell(row.perplexity, '.4g')})" for row in rows if row.role == "off-scale"]
    notes = []
    if drafts:
        notes.append(f"Drafts (helpers for speculative decoding, not release candidates): {', '.join(drafts)}.")
    if collapsed:
        notes.append(f"Off-scale (perplexity over {OFF_SCALE:g}x the input's: collapsed): {', '.join(collapsed)}.")
    if notes:
        notes.append("None of them is on a Pareto front.")
    return notes


def render_report_markdown(summary: dict[str, Any], rows: list[Row], verdict: Verdict | None) -> str:
    """report.md: the run's header, the side-by-side table, the Pareto front and the gate."""
    state = "ok" if summary["ok"] else "**FAILED**"
    lines = [f"# slimline run `{summary['pipeline']}`: {state} in {summary['seconds']:.1f} s", ""]
    lines += markdown_table(COLUMNS, rows)
    fronts = front_stages(rows)
    lines += [
        "",
        f"Pareto front, perplexity vs decode speed: {', '.join(f'`{s}`' for s in fronts['speed']) or '-'}; "
        f"perplexity vs size: {', '.join(f'`{s}`' for s in fronts['size']) or '-'}.",
    ]
    lines += role_notes(rows)
    lines.append(
        "Ratios and changes are against the input model measured in this run; "
        "time is what producing the artifact took when it ran. Plots: `report.html`."
    )
    if verdict is not None:
        lines += ["", render_verdict_markdown(verdict).rstrip()]
    return "\n".join(lines) + "\n"


def environment(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """The reproducibility facts shown in the HTML header."""
    if not manifest:
        return []
    hardware = manifest["hardware"]
    gpus = ", ".join(f"{g['name']} (driver {g['driver']})" for g in hardware["gpus"]) or "none"
    libraries = ", ".join(f"{name} {version}" for name, version in manifest["libraries"].items())
    return [
        ("seed", str(manifest["seed"])),
        ("CPU", f"{hardware['cpu']} ({hardware['cpu_count']} cores, {hardware['torch_threads']} torch threads)"),
        ("GPU", gpus),
        ("Python", f"{manifest['python']} on {manifest['platform']}"),
        ("libraries", libraries),
        ("pipeline sha256", manifest["pipeline"]["sha256"]),
    ]


def render_report_html(
    summary: dict[str, Any], rows: list[Row], verdict: Verdict | None, manifest: dict[str, Any]
) -> str:
    """report.html: one self-contained page with the table, the plots and the gate."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )
    return env.get_template("report.html.j2").render(
        summary=summary,
        columns=COLUMNS,
        rows=rows,
        fronts=front_stages(rows),
        role_notes=role_notes(rows),
        plots=run_plots(rows),
        verdict=verdict,
        environment=environment(manifest),
    )


def write_run_reports(run_dir: Path) -> dict[str, Path]:
    """(Re)write report.md and report.html at the run folder's root from its summary.json."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    rows = rows_from_summary(summary)
    verdict = run_verdict(summary, rows, str(run_dir))
    paths = {"md": run_dir / REPORT_MD, "html": run_dir / REPORT_HTML}
    write_text_atomic(paths["md"], render_report_markdown(summary, rows, verdict))
    write_text_atomic(paths["html"], render_report_html(summary, rows, verdict, read_manifest(run_dir)))
    return paths
