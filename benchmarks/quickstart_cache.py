"""Time the quickstart pipeline cold and fully cached, side by side in one invocation.

    python benchmarks/quickstart_cache.py [--out benchmarks/results]

Writes quickstart_cache.json and quickstart_cache.md: wall time of each run of
`slimline run pipelines/quickstart.yaml` (a fresh run folder, then the same folder again), each
stage's status, and the headline figures of every artifact from the first run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slimline.hardware import machine_description
from slimline.reports.rows import Row, rows_from_summary
from slimline.reports.tables import Column, cell, markdown_table, write_results

ROOT = Path(__file__).resolve().parents[1]
COLUMNS: tuple[Column[Row], ...] = (
    Column("stage", lambda r: r.stage),
    Column("perplexity", lambda r: cell(r.perplexity, ".3f")),
    Column("top-1", lambda r: cell(r.top1_accuracy, ".3f")),
    Column("KL vs input", lambda r: cell(r.kl_vs_input, ".4f")),
    Column("decode tok/s", lambda r: cell(r.decode_tokens_per_s, ".1f")),
    Column("p95 ms", lambda r: cell(r.token_p95_ms, ".1f")),
    Column("size MB", lambda r: cell(r.size_mb, ".1f")),
    Column("peak MB", lambda r: cell(r.peak_memory_mb, ".0f")),
)


def timed_run(run_dir: Path) -> tuple[float, dict]:
    """Wall seconds of one `slimline run` subprocess and its summary.json."""
    started = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "slimline.cli",
        "run",
        str(ROOT / "pipelines" / "quickstart.yaml"),
        "--out",
        str(run_dir),
        "--ci",
    ]
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started, json.loads((run_dir / "summary.json").read_text())


def markdown(result: dict) -> str:
    """The benchmark as a Markdown table."""
    lines = [
        "# Quickstart: cold run vs cached re-run",
        "",
        f"Machine: {result['machine']}. Command: `python benchmarks/quickstart_cache.py`.",
        "",
        f"- cold run: **{result['cold_seconds']:.1f} s** (statuses: {result['cold_statuses']})",
        f"- cached re-run: **{result['warm_seconds']:.1f} s** (statuses: {result['warm_statuses']})",
        "",
    ]
    lines += markdown_table(COLUMNS, rows_from_summary({"stages": result["stages"]}))
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run cold, then warm, and write JSON + Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        cold_seconds, cold = timed_run(run_dir)
        warm_seconds, warm = timed_run(run_dir)
    result = {
        "machine": machine_description(),
        "cold_seconds": round(cold_seconds, 2),
        "warm_seconds": round(warm_seconds, 2),
        "cold_statuses": {row["stage"]: row["status"] for row in cold["stages"]},
        "warm_statuses": {row["stage"]: row["status"] for row in warm["stages"]},
        "stages": cold["stages"],
    }
    write_results(args.out, "quickstart_cache", result, markdown(result))


if __name__ == "__main__":
    main()
