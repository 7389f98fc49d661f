"""Reports that survive real runs: a collapsed artifact, a draft, failed and skipped stages, crowded points.

The summary is synthetic (built here, no model runs) but shaped like the runner's: the input,
eight quantized artifacts within a few percent of each other, an ONNX int8 export that collapsed
(perplexity 9.4M), a distilled draft and its ONNX export paired by a serve stage, a failed and a
skipped stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from slimline.cli import app
from slimline.reports.comparison import COLUMNS, SUMMARY_COLUMNS, front_stages, render_report_markdown
from slimline.reports.plots import Box, place_labels, run_plots, short_number
from slimline.reports.rows import rows_from_summary
from slimline.reports.tables import markdown_table
from tests.headless import decoded_image_sizes, find_chromium

INPUT_PPL = 20.0
# (stage, kind, parent, perplexity, decode tok/s, size MB): eight artifacts crowded near the input
CLOSE = [
    ("int8-dynamic", "quantize.ptq", 20.3, 71.0, 140.0),
    ("int8-static", "quantize.ptq", 20.5, 72.5, 140.5),
    ("gptq-4bit", "quantize.gptq", 20.6, 70.2, 95.0),
    ("rtn-4bit", "quantize.gptq", 20.7, 70.4, 95.0),
    ("gptq-4bit-g256", "quantize.gptq", 20.65, 71.3, 93.0),
    ("rtn-4bit-g256", "quantize.gptq", 20.8, 71.1, 93.0),
    ("bnb-int8", "quantize.bnb", 20.2, 40.0, 150.0),
    ("bnb-nf4", "quantize.bnb", 21.0, 38.0, 90.0),
]


def entry(stage: str, kind: str, parent: str | None, ppl: float | None, speed: float | None, size: float | None,
          status: str = "ran", reason: str = "", params: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """One summary.json stage entry, the way the runner writes it."""
    metrics: dict[str, Any] = {}
    deltas: dict[str, Any] = {}
    if ppl is not None:
        metrics = {
            "accuracy": {"perplexity": ppl, "top1_accuracy": 0.4, "kl_vs_input": 0.01},
            "latency": {"prefill_ms": 20.0, "decode_tokens_per_s": speed, "token_p95_ms": 15.0, "peak_memory_mb": 300},
            "size_mb": size,
            "parameters": 134_515_008,
        }
        deltas = {"input": {"perplexity_change": ppl / INPUT_PPL - 1, "decode_speedup": speed / 50.0}}
    return {
        "stage": stage,
        "kind": kind,
        "status": status,
        "reason": reason,
        "parent": parent,
        "format": None if ppl is None else "hf",
        "backend": None if ppl is None else "pytorch",
        "key": None if ppl is None else stage * 2,
        "params": params or {},
        "metrics": metrics,
        "deltas": deltas,
        "produce_seconds": 12.0,
        "evaluate_seconds": 3.0,
    }


def real_run_summary() -> dict[str, Any]:
    """A run with everything that went wrong in the real-models runs at once."""
    stages = [entry("input", "input", None, INPUT_PPL, 50.0, 269.0)]
    stages += [entry(stage, kind, "input", ppl, speed, size) for stage, kind, ppl, speed, size in CLOSE]
    stages += [
        entry("onnx-int8", "export.onnx", "input", 9.4e6, 90.0, 70.0),
        entry("draft", "distill", "input", 60.0, 400.0, 20.0),
        entry("draft-onnx", "export.onnx", "draft", 60.1, 520.0, 21.0),
        entry("target-onnx", "export.onnx", "input", 20.0, 62.0, 270.0),
        entry("server", "serve", "target-onnx", 20.0, 110.0, 291.0, params={"draft": "draft-onnx", "k": 4}),
        entry("broken", "prune.magnitude", "input", None, None, None, "failed", "n=1 is not a multiple of m=3"),
        entry("trt", "export.tensorrt", "input", None, None, None, "skipped", "needs CUDA; this machine has none"),
    ]
    return {"pipeline": "real", "source": "real.yaml", "ok": False, "seconds": 100.0, "seed": 0, "release": None,
            "stages": stages}  # fmt: skip


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    (tmp_path / "summary.json").write_text(json.dumps(real_run_summary()))
    return tmp_path


@pytest.mark.unit
def test_roles_mark_drafts_and_the_collapsed_artifact() -> None:
    roles = {row.stage: row.role for row in rows_from_summary(real_run_summary())}
    assert roles["input"] == "input"
    assert roles["draft"] == roles["draft-onnx"] == "draft", "a distill output and the serve stage's draft"
    assert roles["onnx-int8"] == "off-scale"
    assert roles["server"] == roles["target-onnx"] == roles["int8-static"] == "candidate"
    assert roles["broken"] == roles["trt"] == "candidate", "failed and skipped are statuses, shown in the status column"


@pytest.mark.unit
def test_drafts_and_off_scale_artifacts_are_never_on_a_pareto_front() -> None:
    fronts = front_stages(rows_from_summary(real_run_summary()))
    for front in fronts.values():
        assert not {"draft", "draft-onnx", "onnx-int8"} & set(front), front
    assert "server" in fronts["speed"], "without the draft, the served pair is the fastest candidate"


@pytest.mark.unit
def test_markdown_names_roles_and_says_why_they_are_off_the_fronts() -> None:
    summary = real_run_summary()
    text = render_report_markdown(summary, rows_from_summary(summary), None)
    assert "| role |" in text.splitlines()[2]
    assert "`draft`, `draft-onnx`" in text and "`onnx-int8` (9.4e+06)" in text
    assert "None of them is on a Pareto front." in text


@pytest.mark.unit
def test_cli_summary_columns_are_the_reports_columns() -> None:
    headers = [column.header for column in COLUMNS]
    assert all(column in COLUMNS for column in SUMMARY_COLUMNS)
    assert [c.header for c in SUMMARY_COLUMNS] == [h for h in headers if h in {c.header for c in SUMMARY_COLUMNS}]
    rows = rows_from_summary(real_run_summary())
    full = markdown_table(COLUMNS, rows)
    short = markdown_table(SUMMARY_COLUMNS, rows)
    for full_line, short_line in zip(full[2:], short[2:], strict=True):
        cells = [cell.strip() for cell in full_line.strip("|").split(" | ")]
        assert all(cell in cells for cell in (c.strip() for c in short_line.strip("|").split(" | ")))


@pytest.mark.unit
def test_report_command_prints_the_same_figures_as_report_md(run_dir: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    text = (run_dir / "report.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("| int8-static "))
    ppl, top1, speedup = line.split(" | ")[7], line.split(" | ")[9], line.split(" | ")[13]
    assert (ppl, top1, speedup) == ("20.500", "0.4000", "1.45x")
    printed = next(line for line in result.output.splitlines() if "int8-static" in line)
    assert ppl in printed and top1 in printed and speedup in printed


@pytest.mark.unit
def test_labels_of_crowded_points_do_not_overlap() -> None:
    points = [(100.0 + i % 3, 100.0 + i // 3) for i in range(8)]  # eight points within 3 pixels
    sizes = [(12.0, 14.0)] * 8
    boxes = place_labels(points, sizes, Box(0, 0, 400, 300))
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert all(box.inside(Box(0, 0, 400, 300)) for box in boxes)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "text"), [(9.4e6, "9.4M"), (12345.0, "12.3k"), (20.25, "20.2"), (float("inf"), "inf")]
)
def test_short_number(value: float, text: str) -> None:
    assert short_number(value) == text


@pytest.mark.unit
def test_html_plots_render_with_an_off_scale_artifact(run_dir: Path, tmp_path: Path) -> None:
    from slimline.reports.comparison import write_run_reports

    html = write_run_reports(run_dir)["html"].read_text()
    assert 'class="ran off-scale"' in html and 'class="ran draft"' in html
    assert "off-scale: onnx-int8" in html, "the scatter's alt text names the collapsed artifact"
    browser = find_chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium)")
    sizes = decoded_image_sizes(run_dir / "report.html", browser, tmp_path)
    assert len([size for size in sizes if size[0] == "plot"]) == 3


@pytest.mark.unit
@pytest.mark.parametrize("broken", [float("inf"), float("nan")])
def test_plots_survive_a_non_finite_perplexity_and_an_unmeasured_input(broken: float) -> None:
    summary = real_run_summary()
    summary["stages"][0] = entry("input", "input", None, None, None, None, "failed", "out of memory")
    summary["stages"][1]["metrics"]["accuracy"]["perplexity"] = broken
    rows = rows_from_summary(summary)
    assert {row.stage: row.role for row in rows}["int8-dynamic"] == "off-scale", "not finite: collapsed"
    assert {row.stage: row.role for row in rows}["onnx-int8"] == "candidate", "no input to compare with"
    plots = run_plots(rows)
    assert len(plots) == 3 and all(plot.png.startswith(b"\x89PNG") for plot in plots)
    assert "off-scale: int8-dynamic" in plots[0].alt


@pytest.mark.unit
def test_no_plots_when_nothing_has_a_finite_perplexity() -> None:
    summary = real_run_summary()
    summary["stages"] = [entry("input", "input", None, float("inf"), 50.0, 269.0)]
    assert run_plots(rows_from_summary(summary)) == []
