"""The run's comparison report: every artifact side by side, as ``report.md`` and ``report.html``.

``report.md`` is short enough for a pull-request comment: one table row per artifact (format,
backend, size, parameters, perplexity, top-1, KL vs input, prefill, decode speed, p95, peak
memory, time to produce, status with the reason for a skipped or failed stage), the Pareto
front, and the release gate's verdict when the pipeline has a ``release:`` block.
``report.html`` is one self-contained file (plots embedded as PNG ``data:`` URIs) with the same
table, the accuracy-vs-latency and accuracy-vs-size scatters and per-stage bars.
Both are rebuilt from ``summary.json`` (and ``manifest.json`` when present) by ``write_run_reports``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from slimline.artifacts import write_text_atomic
from slimline.config import ReleaseConfig
from slimline.reports.gate import Verdict, judge, render_verdict_markdown
from slimline.reports.plots import run_plots
from slimline.reports.rows import Row, pareto_front, read_summary, rows_from_summary
from slimline.reproducibility import read_manifest

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
TEMPLATES = Path(__file__).parent / "templates"


def number(value: float | None, spec: str) -> str:
    """A table cell; '-' when missing."""
    return "-" if value is None else format(value, spec)


@dataclass(frozen=True)
class Column:
    """One column of the comparison table: header and how to show a row's cell."""

    header: str
    cell: Callable[[Row], str]


COLUMNS = (
    Column("stage", lambda r: r.stage),
    Column("kind", lambda r: r.kind),
    Column("format", lambda r: r.format or "-"),
    Column("backend", lambda r: r.backend or "-"),
    Column("size MB", lambda r: number(r.size_mb, ".1f")),
    Column(
        "params",
        lambda r: number(None if r.parameters is None else r.parameters / 1e6, ".2f") + "M" * bool(r.parameters),
    ),
    Column("ppl", lambda r: number(r.perplexity, ".3f")),
    Column("ppl vs input", lambda r: number(r.perplexity_change, "+.2%")),
    Column("top-1", lambda r: number(r.top1_accuracy, ".4f")),
    Column("KL vs input", lambda r: number(r.kl_vs_input, ".4f")),
    Column("prefill ms", lambda r: number(r.prefill_ms, ".1f")),
    Column("decode tok/s", lambda r: number(r.decode_tokens_per_s, ".1f")),
    Column("speedup", lambda r: number(r.decode_speedup, ".2f") + "x" * (r.decode_speedup is not None)),
    Column("p95 ms", lambda r: number(r.token_p95_ms, ".2f")),
    Column("peak MB", lambda r: number(r.peak_memory_mb, ".0f")),
    Column("time s", lambda r: number(r.produce_seconds, ".1f")),
    Column("status", lambda r: r.note or r.status),
)


def front_stages(rows: list[Row]) -> dict[str, list[str]]:
    """Stages on the Pareto front of perplexity vs decode speed and of perplexity vs size."""
    measured = [row for row in rows if row.measured]
    speed = pareto_front([(-(row.decode_tokens_per_s or 0.0), row.perplexity or 0.0) for row in measured])
    sized = [row for row in measured if row.size_mb is not None]
    size = pareto_front([(row.size_mb or 0.0, row.perplexity or 0.0) for row in sized])
    return {"speed": [measured[i].stage for i in speed], "size": [sized[i].stage for i in size]}


def run_verdict(summary: dict[str, Any], rows: list[Row], run: str) -> Verdict | None:
    """The release gate's verdict when the run has a release block, else None."""
    if not summary.get("release"):
        return None
    return judge(ReleaseConfig.model_validate(summary["release"]), rows, run, summary["pipeline"])


def markdown_cell(text: str) -> str:
    """Keep a cell on one table row: no pipes or newlines."""
    return text.replace("|", "\\|").replace("\n", " ")


def render_report_markdown(summary: dict[str, Any], rows: list[Row], verdict: Verdict | None) -> str:
    """report.md: the run's header, the side-by-side table, the Pareto front and the gate."""
    state = "ok" if summary["ok"] else "**FAILED**"
    lines = [f"# slimline run `{summary['pipeline']}`: {state} in {summary['seconds']:.1f} s", ""]
    lines.append("| " + " | ".join(column.header for column in COLUMNS) + " |")
    lines.append("|" + " --- |" * len(COLUMNS))
    for row in rows:
        lines.append("| " + " | ".join(markdown_cell(column.cell(row)) for column in COLUMNS) + " |")
    fronts = front_stages(rows)
    lines += [
        "",
        f"Pareto front, perplexity vs decode speed: {', '.join(f'`{s}`' for s in fronts['speed']) or '-'}; "
        f"perplexity vs size: {', '.join(f'`{s}`' for s in fronts['size']) or '-'}.",
    ]
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
