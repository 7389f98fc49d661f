"""The comparison report's plots, drawn with matplotlib to PNG bytes (Figure objects, no pyplot state).

Two trade-off scatters with the Pareto front marked and joined (perplexity against decode
speed, perplexity against size on disk) and a grid of per-stage bars. Every artifact of the run
has a number (its place in the run); a scatter labels its points with these numbers, placed so
they do not overprint, and lists number, stage and role beside the plot, skipped and failed
stages included ("not plotted").

Roles keep the plots honest when a run goes wrong: drafts (helpers for speculative decoding) are
hollow diamonds and never on the front; an off-scale artifact (collapsed: perplexity more than
10x the input's) is drawn in a band at the top edge with its perplexity in its label, so it does
not flatten every other point onto the axis. The perplexity axis turns logarithmic when the
plotted perplexities span more than ``LOG_SPAN``.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter, ScalarFormatter

from slimline.reports.rows import Row, pareto_front

FRONT_COLOR = "#d62728"
POINT_COLOR = "#1f77b4"
INPUT_COLOR = "#2ca02c"
DRAFT_COLOR = "#7f7f7f"
OFF_SCALE_COLOR = "#ff7f0e"
BAND_COLOR = "#fbe3cf"
LOG_SPAN = 3.0  # plotted perplexities spanning more than this ratio get a log axis
LOG_SPAN_X = 8.0  # and speeds or sizes spanning more than this (a crowd of close points spreads out)
BAND = 0.12  # height of the off-scale band, as a fraction of the plotted range
LABEL_SIZE = 8  # points
MARKER_RADIUS = 5  # pixels, a little over the scatter markers' radius
LABEL_RADII = (4, 10, 17, 25, 34, 45, 58, 75, 95)  # pixels from the point's edge, tried in turn
LABEL_ANGLES = (45, 135, -45, -135, 0, 180, 90, -90)  # degrees, tried in turn at each radius


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


def short_number(value: float) -> str:
    """A perplexity in a few characters: ``12.3``, ``45.6k``, ``9.4M``, ``inf``."""
    if not math.isfinite(value):
        return str(value)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def plottable(row: Row) -> bool:
    """True when a measured row's perplexity goes on the perplexity axis (finite and not off-scale)."""
    return row.role != "off-scale" and math.isfinite(row.perplexity if row.perplexity is not None else math.nan)


def numbers(rows: list[Row]) -> dict[str, int]:
    """Each stage's number: its place in the run, the input first (1)."""
    return {row.stage: index for index, row in enumerate(rows, 1)}


def legend_line(number: int, row: Row) -> str:
    """One entry of the list beside a plot: number, stage, and what it is when it is not a candidate."""
    name = row.stage if len(row.stage) <= 26 else row.stage[:25] + "…"
    if not row.measured:
        return f"{number:>2}  {name}: {row.status}, not plotted"
    if row.role == "off-scale":
        return f"{number:>2}  {name} (off-scale, ppl {short_number(row.perplexity or math.nan)})"
    return f"{number:>2}  {name}" + ("" if row.role == "candidate" else f" ({row.role})")


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels."""

    x0: float
    y0: float
    x1: float
    y1: float

    def overlaps(self, other: Box) -> bool:
        """True when the two boxes share any area."""
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1

    def inside(self, other: Box) -> bool:
        """True when this box lies within ``other``."""
        return self.x0 >= other.x0 and self.x1 <= other.x1 and self.y0 >= other.y0 and self.y1 <= other.y1


def label_box(point: tuple[float, float], size: tuple[float, float], radius: float, angle: float) -> Box:
    """Where a label of ``size`` goes at ``radius`` pixels beyond the marker's edge, in direction ``angle``."""
    dx, dy = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    width, height = size
    cx = point[0] + dx * (MARKER_RADIUS + radius + width / 2)
    cy = point[1] + dy * (MARKER_RADIUS + radius + height / 2)
    return Box(cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2)


def outward_angles(point: tuple[float, float], points: list[tuple[float, float]]) -> list[float]:
    """LABEL_ANGLES, those pointing away from the point's crowded neighbours first (fewer crossing leader lines)."""
    near = [(point[0] - x, point[1] - y) for x, y in points if 0 < math.hypot(point[0] - x, point[1] - y) < 60]
    dx, dy = sum(v[0] for v in near), sum(v[1] for v in near)
    if not near or math.hypot(dx, dy) < 1e-9:
        return list(LABEL_ANGLES)
    away = math.degrees(math.atan2(dy, dx))
    return sorted(LABEL_ANGLES, key=lambda angle: abs((angle - away + 180) % 360 - 180))


def nearer_to_another(box: Box, point: tuple[float, float], points: list[tuple[float, float]]) -> bool:
    """True unless the label's centre is clearly nearest its own point (another is not within 1.5x as far)."""
    cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    own = math.hypot(cx - point[0], cy - point[1])
    return any(math.hypot(cx - x, cy - y) < 1.5 * own for x, y in points if (x, y) != point)


def label_cost(box: Box, point: tuple[float, float], points: list[tuple[float, float]], taken: list[Box],
               markers: list[Box], area: Box) -> float:  # fmt: skip
    """How bad a spot is for a label: overprinted text worst, then covered markers, leaving the plot, ambiguity."""
    return (
        4 * sum(box.overlaps(other) for other in taken)
        + 3 * sum(box.overlaps(other) for other in markers)
        + 3 * (not box.inside(area))
        + 2.5 * nearer_to_another(box, point, points)  # in a crowd unavoidable: the leader line tells
    )


def place_labels(points: list[tuple[float, float]], sizes: list[tuple[float, float]], area: Box) -> list[Box]:
    """A box per label, near its point, overlapping no other label or marker where the area allows it.

    Greedy, the most isolated points first (they keep the spots next to them): each label takes
    the cheapest spot (``label_cost``) on rings of growing radius, the nearer ring and the
    direction away from its neighbours first on a tie.
    """
    markers = [Box(x - MARKER_RADIUS, y - MARKER_RADIUS, x + MARKER_RADIUS, y + MARKER_RADIUS) for x, y in points]
    placed: dict[int, Box] = {}
    for index in sorted(range(len(points)), key=lambda i: crowd(points[i], points)):
        point, size = points[index], sizes[index]
        spots = [label_box(point, size, r, a) for r in LABEL_RADII for a in outward_angles(point, points)]
        costs = [label_cost(box, point, points, list(placed.values()), markers, area) for box in spots]
        placed[index] = spots[costs.index(min(costs))]
    return [placed[index] for index in range(len(points))]


def crowd(point: tuple[float, float], points: list[tuple[float, float]]) -> int:
    """How many other points lie within 60 pixels."""
    return sum(0 < math.hypot(point[0] - x, point[1] - y) < 60 for x, y in points)


def text_size(text: str, fig: Figure) -> tuple[float, float]:
    """Approximate pixel width and height of ``text`` at LABEL_SIZE (a little generous)."""
    pixels = LABEL_SIZE * fig.dpi / 72
    return 0.62 * pixels * len(text) + 4, 1.25 * pixels + 2


def label_points(ax, fig: Figure, points: list[tuple[float, float]], texts: list[str]) -> None:
    """Write each text near its data point without overprinting; a thin leader line when it sits away."""
    ax.get_xlim(), ax.get_ylim()  # settle pending autoscaling before reading positions
    pixels = [tuple(ax.transData.transform(point)) for point in points]
    area = Box(*ax.bbox.extents)
    boxes = place_labels(pixels, [text_size(text, fig) for text in texts], area)
    to_points = 72 / fig.dpi
    for text, (x, y), box in zip(texts, pixels, boxes, strict=True):
        cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
        far = math.hypot(cx - x, cy - y) > MARKER_RADIUS + LABEL_RADII[1] + (box.x1 - box.x0) / 2
        ax.annotate(
            text,
            ax.transData.inverted().transform((x, y)),
            xytext=((cx - x) * to_points, (cy - y) * to_points),
            textcoords="offset points",
            ha="center",
            va="center",
            fontsize=LABEL_SIZE,
            arrowprops={"arrowstyle": "-", "color": "#666666", "lw": 0.6, "shrinkA": 0, "shrinkB": 3} if far else None,
            annotation_clip=False,
        )


def perplexity_axis(ax, values: list[float], band: bool) -> float | None:
    """Scale and limits of the perplexity axis for ``values``; with ``band``, a band on top and its middle.

    The band takes the top BAND of the axis, above every plotted value, for off-scale points.
    """
    low, high = min(values), max(values)
    log = low > 0 and high / low > LOG_SPAN
    forward, back = (math.log, math.exp) if log else (float, float)
    lo, hi = forward(low), forward(high)
    pad = (hi - lo) * 0.08 or 0.05 * (abs(hi) or 1.0)
    lo, hi = lo - 2 * pad, hi + pad  # the best (lowest) points get room for their labels below them
    top = hi + (hi - lo) * BAND / (1 - BAND) if band else hi
    if log:
        ax.set_yscale("log")
        major = ScalarFormatter()
        major.set_scientific(False)
        ax.yaxis.set_major_formatter(major)
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
    ax.set_ylim(back(lo), back(top))
    if not band:
        return None
    ax.axhspan(back(hi), back(top), color=BAND_COLOR, zorder=0)
    ax.text(0.01, 1 - BAND / 2, "off scale", transform=ax.transAxes, fontsize=7, color="#a0522d", va="center")
    return back((hi + top) / 2)


def side_list(side, rows: list[Row], handles: list[Line2D]) -> None:
    """The numbered list of every artifact and the marker legend, in the panel beside a scatter."""
    side.axis("off")
    number = numbers(rows)
    lines = ["#   artifact"] + [legend_line(number[row.stage], row) for row in rows]
    side.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=LABEL_SIZE, family="monospace",
              transform=side.transAxes)  # fmt: skip
    side.legend(handles=handles, loc="lower left", fontsize=LABEL_SIZE, frameon=False, borderaxespad=0)


def marker_handles(roles: set[str], front: bool) -> list[Line2D]:
    """Legend entries for the markers a scatter uses."""
    entries = [
        ("input", "input model", {"marker": "s", "color": INPUT_COLOR}),
        ("candidate", "artifact", {"marker": "o", "color": POINT_COLOR}),
        ("draft", "draft (helper)", {"marker": "D", "markerfacecolor": "none", "color": DRAFT_COLOR}),
        ("off-scale", "off-scale (collapsed)", {"marker": "^", "color": OFF_SCALE_COLOR}),
    ]
    handles = [
        Line2D([], [], linestyle="none", label=label, **style) for role, label, style in entries if role in roles
    ]
    if front:
        handles.append(Line2D([], [], color=FRONT_COLOR, marker="o", markerfacecolor="none", label="Pareto front"))
    return handles


def draw_points(ax, rows: list[Row], xs: list[float], ys: list[float]) -> None:
    """One marker per artifact, styled by its role."""
    for row, x, y in zip(rows, xs, ys, strict=True):
        if row.role == "draft":
            ax.scatter([x], [y], marker="D", facecolors="none", edgecolors=DRAFT_COLOR, zorder=2)
        elif row.role == "off-scale":
            ax.scatter([x], [y], marker="^", color=OFF_SCALE_COLOR, zorder=3, clip_on=False)
        else:
            ax.scatter([x], [y], marker="s" if row.role == "input" else "o",
                       color=INPUT_COLOR if row.role == "input" else POINT_COLOR, zorder=2)  # fmt: skip


def tradeoff_plot(rows: list[Row], x_field: str, x_label: str, maximize_x: bool) -> Plot:
    """Perplexity (lower is better) against ``x_field``; the Pareto front of input and candidates in red."""
    measured = [row for row in rows if row.measured and getattr(row, x_field) is not None]
    in_scale = [row for row in measured if plottable(row)]
    collapsed = [row for row in measured if not plottable(row)]
    listed = len(rows) + 1
    fig = Figure(figsize=(9.6, max(4.4, 0.17 * listed + 1.6)))
    ax, side = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.5, 1.15], "wspace": 0.05})
    band = perplexity_axis(ax, [float(row.perplexity) for row in in_scale], band=bool(collapsed))
    plotted = in_scale + collapsed
    xs = [float(getattr(row, x_field)) for row in plotted]
    ys = [float(row.perplexity) for row in in_scale] + [band or 0.0] * len(collapsed)
    draw_points(ax, plotted, xs, ys)
    competing = [i for i, row in enumerate(plotted) if row.competes and (x_field != "size_mb" or row.sized)]
    front = [competing[i] for i in pareto_front([(-xs[i] if maximize_x else xs[i], ys[i]) for i in competing])]
    if front:
        front_points = sorted((xs[i], ys[i]) for i in front)
        ax.plot(*zip(*front_points, strict=True), color=FRONT_COLOR, marker="o", markersize=11,
                markerfacecolor="none", zorder=3)  # fmt: skip
    better = "higher" if maximize_x else "lower"
    ax.set(xlabel=f"{x_label} ({better} is better)", ylabel="perplexity (lower is better)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.08)
    if min(xs) > 0 and max(xs) / min(xs) > LOG_SPAN_X:
        ax.set_xscale("log")
        major = ScalarFormatter()
        major.set_scientific(False)
        ax.xaxis.set_major_formatter(major)
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
    number = numbers(rows)
    texts = [str(number[row.stage]) for row in in_scale]
    texts += [f"{number[row.stage]}: {short_number(float(row.perplexity or math.nan))}" for row in collapsed]
    label_points(ax, fig, list(zip(xs, ys, strict=True)), texts)
    side_list(side, rows, marker_handles({row.role for row in plotted}, bool(front)))
    title = f"Accuracy vs {x_label}"
    names = ", ".join(plotted[i].stage for i in front)
    off = f"; off-scale: {', '.join(row.stage for row in collapsed)}" if collapsed else ""
    return Plot(title, f"{title}: perplexity against {x_label}; Pareto front: {names}{off}", figure_png(fig))


BARS = (
    ("perplexity", "perplexity"),
    ("decode_tokens_per_s", "decode tokens/s"),
    ("size_mb", "size on disk (MB)"),
    ("produce_seconds", "time to produce (s)"),
)
BAR_COLORS = {"input": INPUT_COLOR, "candidate": POINT_COLOR, "draft": DRAFT_COLOR, "off-scale": OFF_SCALE_COLOR}


def perplexity_cap(measured: list[Row]) -> float | None:
    """Where the perplexity bars are cut: above every in-scale bar; None when nothing is off-scale."""
    if all(plottable(row) for row in measured):
        return None
    in_scale = [float(row.perplexity or 0.0) for row in measured if plottable(row)]
    return 1.25 * max(in_scale, default=1.0)


def stage_bars_plot(rows: list[Row]) -> Plot:
    """One bar per measured artifact for each of ``BARS``, coloured by role; off-scale perplexities cut with their value."""
    measured = [row for row in rows if row.measured]
    fig = Figure(figsize=(9, 6.4))
    axes = fig.subplots(2, 2)
    names = [row.stage for row in measured]
    colors = [BAR_COLORS[row.role] for row in measured]
    cap = perplexity_cap(measured)
    for ax, (field_name, label) in zip(axes.flat, BARS, strict=True):
        values = [float(getattr(row, field_name) or 0.0) for row in measured]
        if field_name == "perplexity" and cap is not None:
            for index, value in enumerate(values):
                if not value <= cap:  # NaN too
                    ax.text(index, cap, short_number(value), ha="center", va="bottom", fontsize=7,
                            color=OFF_SCALE_COLOR)  # fmt: skip
            values = [value if value <= cap else cap for value in values]
            ax.set_ylim(0, cap * 1.12)
        bars = ax.bar(names, values, color=colors)
        for bar, row in zip(bars, measured, strict=True):
            if row.role == "draft":
                bar.set_hatch("//")
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
        ax.grid(axis="y", alpha=0.3)
    roles = [role for role in BAR_COLORS if any(row.role == role for row in measured)]
    handles = [Line2D([], [], linestyle="none", marker="s", color=BAR_COLORS[role], label=role) for role in roles]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return Plot(
        "Per stage", "Bars per stage: perplexity, decode tokens/s, size on disk, time to produce", figure_png(fig)
    )


def run_plots(rows: list[Row]) -> list[Plot]:
    """Every plot of the comparison report; none when nothing was measured with a finite perplexity."""
    if not any(row.measured and plottable(row) for row in rows):
        return []
    return [
        tradeoff_plot(rows, "decode_tokens_per_s", "decode tokens/s", maximize_x=True),
        tradeoff_plot(rows, "size_mb", "size on disk (MB)", maximize_x=False),
        stage_bars_plot(rows),
    ]
