"""The ``slimline`` command line: run, validate, schema, report.

Options live in the pipeline file; the CLI takes its path and dotted overrides
(``--set stages.tuned.params.steps=10``) and never re-declares stage options.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichBars
from rich.table import Table

from slimline.config import load_pipeline, pipeline_json_schema
from slimline.errors import SlimlineError
from slimline.progress import Progress

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Compress, export, measure and serve causal LMs from one YAML file.",
)
console = Console(stderr=True)


class BarProgress(Progress):
    """Rich progress bars on the terminal, one per running task."""

    def __init__(self) -> None:
        """One shared set of bars for the whole run."""
        self.bars = RichBars(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """Show a bar while the task runs."""
        with self.bars:
            task_id = self.bars.add_task(description, total=total)
            try:
                yield lambda n=1: self.bars.advance(task_id, n)
            finally:
                self.bars.remove_task(task_id)


def setup_logging(quiet: bool, ci: bool) -> None:
    """Rich log lines for people; plain timestamped lines for CI and --quiet."""
    level = logging.WARNING if quiet else logging.INFO
    if ci or quiet:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    else:
        logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    # transformers' own bars and per-load notices would drown slimline's one line per step.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def fail(error: SlimlineError) -> None:
    """Print a refusal and exit 2 (bad input) without a traceback."""
    console.print(f"[bold red]error:[/] {error}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


PipelineArg = Annotated[Path, typer.Argument(help="Pipeline YAML file.")]
OverrideOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a field: dotted.key=value (stages by id).")
]


@app.command()
def run(
    pipeline: PipelineArg,
    overrides: OverrideOpt = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<name>).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, warnings only.")] = False,
    ci: Annotated[
        bool, typer.Option("--ci", help="No bars, plain log lines, non-zero exit on any failed stage.")
    ] = False,
) -> None:
    """Run a pipeline: every stage, its evaluation and its report, reusing finished work."""
    from slimline.runner import Runner

    ci = ci or os.environ.get("CI") == "true"
    setup_logging(quiet, ci)
    try:
        loaded = load_pipeline(pipeline, overrides)
        runner = Runner(loaded, out, progress=Progress() if (quiet or ci) else BarProgress())
        outcome = runner.run()
    except SlimlineError as error:
        fail(error)
    print_summary(json.loads((outcome.run_dir / "summary.json").read_text()))
    if not outcome.ok:
        raise typer.Exit(1)


@app.command()
def validate(pipeline: PipelineArg, overrides: OverrideOpt = None) -> None:
    """Check a pipeline file without running anything."""
    try:
        loaded = load_pipeline(pipeline, overrides)
    except SlimlineError as error:
        fail(error)
    stages = ", ".join(f"{s.id} ({s.kind})" for s in loaded.config.stages) or "no stages"
    console.print(f"{pipeline}: valid pipeline {loaded.config.name!r}: {stages}", highlight=False, soft_wrap=True)


@app.command()
def schema() -> None:
    """Print the JSON Schema of pipeline files (for editor completion)."""
    typer.echo(json.dumps(pipeline_json_schema(), indent=2))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run folder, e.g. runs/quickstart.")]) -> None:
    """Print the summary table of a finished run."""
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        console.print(f"[bold red]error:[/] {summary_path} not found: is {run_dir} a run folder?", soft_wrap=True)
        raise typer.Exit(2)
    print_summary(json.loads(summary_path.read_text()))


def cell(value: Any, spec: str) -> str:
    """A table cell; '-' for missing values."""
    return "-" if value is None else format(value, spec)


def print_summary(summary: dict[str, Any]) -> None:
    """The end-of-run table: one row per stage with its headline figures."""
    table = Table(title=f"{summary['pipeline']}: {'ok' if summary['ok'] else 'FAILED'} in {summary['seconds']:.1f}s")
    for column in (
        "stage",
        "kind",
        "status",
        "backend",
        "ppl",
        "top-1",
        "KL",
        "decode tok/s",
        "speedup",
        "size MB",
        "note",
    ):
        table.add_column(column)
    for row in summary["stages"]:
        metrics, deltas = row["metrics"], row["deltas"].get("input", {})
        accuracy, latency = metrics.get("accuracy", {}), metrics.get("latency", {})
        table.add_row(
            row["stage"],
            row["kind"],
            row["status"],
            row["backend"] or "-",
            cell(accuracy.get("perplexity"), ".3f"),
            cell(accuracy.get("top1_accuracy"), ".3f"),
            cell(accuracy.get("kl_vs_input"), ".4f"),
            cell(latency.get("decode_tokens_per_s"), ".1f"),
            cell(deltas.get("decode_speedup"), ".2f"),
            cell(metrics.get("size_mb"), ".1f"),
            row["reason"],
        )
    # Wide enough for every column when the output is a file or a CI log.
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def main() -> None:
    """Entry point of the ``slimline`` script."""
    app()


if __name__ == "__main__":
    main()
