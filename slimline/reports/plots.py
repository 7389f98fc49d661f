"""The comparison report's plots, drawn with matplotlib to PNG bytes (Figure objects, no pyplot state).

Two trade-off scatters with the Pareto front marked and joined (perplexity against decode
speed, perplexity against size on disk) and a grid of per-stage bars. Only measured artifacts
are drawn; skipped and failed stages are listed in the report's table instead.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from matplotlib.figure import Figure

from slimline.reports.rows import Row, pareto_front

FRONT_COLOR = "#d62728"
POINT_COLOR = "#1f77b4"


@dataclass(frozen=True)
class Plot:
    """One rendered plot: a title for the page, alt text, and its PNG bytes."""

    title: str
    alt: str
    png: bytes

    @property
    def data_uri(self) -> str:
        """The PNG as a ``data:`` URI, so the HTML needs no side files."""
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def figure_png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes (matplotlib's Agg renderer; no display needed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def tradeoff_plot(rows: list[Row], x_field: str, x_label: str, maximize_x: bool) -> Plot:
    """Perplexity (lower is better) against ``x_field``; the Pareto front in red, joined by a line."""
    measured = [row for row in rows if row.measured and getattr(row, x_field) is not None]
    xs = [float(getattr(row, x_field)) for row in measured]
    ys = [float(row.perplexity) for row in measured]
    front = pareto_front([(-x if maximize_x else x, y) for x, y in zip(xs, ys, strict=True)])
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    ax.scatter(xs, ys, color=POINT_COLOR, zorder=2, label="artifact")
    front_points = sorted((xs[i], ys[i]) for i in front)
    ax.plot(*zip(*front_points, strict=True), color=FRONT_COLOR, marker="o", zorder=3, label="Pareto front")
    for row, x, y in zip(measured, xs, ys, strict=True):
        ax.annotate(row.stage, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    better = "higher" if maximize_x else "lower"
    ax.set(xlabel=f"{x_label} ({better} is better)", ylabel="perplexity (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    title = f"Accuracy vs {x_label}"
    names = ", ".join(measured[i].stage for i in front)
    return Plot(title, f"{title}: perplexity against {x_label}; Pareto front: {names}", figure_png(fig))


BARS = (
    ("perplexity", "perplexity"),
    ("decode_tokens_per_s", "decode tokens/s"),
    ("size_mb", "size on disk (MB)"),
    ("produce_seconds", "time to produce (s)"),
)


def stage_bars_plot(rows: list[Row]) -> Plot:
    """One bar per measured artifact for each of ``BARS``."""
    measured = [row for row in rows if row.measured]
    fig = Figure(figsize=(9, 6))
    axes = fig.subplots(2, 2)
    names = [row.stage for row in measured]
    for ax, (field_name, label) in zip(axes.flat, BARS, strict=True):
        values = [float(getattr(row, field_name) or 0.0) for row in measured]
        ax.bar(names, values, color=POINT_COLOR)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return Plot(
        "Per stage", "Bars per stage: perplexity, decode tokens/s, size on disk, time to produce", figure_png(fig)
    )


def run_plots(rows: list[Row]) -> list[Plot]:
    """Every plot of the comparison report; none when nothing was measured."""
    if not any(row.measured for row in rows):
        return []
    return [
        tradeoff_plot(rows, "decode_tokens_per_s", "decode tokens/s", maximize_x=True),
        tradeoff_plot(rows, "size_mb", "size on disk (MB)", maximize_x=False),
        stage_bars_plot(rows),
    ]
