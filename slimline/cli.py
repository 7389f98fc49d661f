"""The ``slimline`` command line: run, validate, schema, report, compare, gate.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichBars
from rich.table import Table

from slimline.config import load_pipeline, pipeline_json_schema
from slimline.devices import check_device_name, check_dtype_name
from slimline.errors import SlimlineError
from slimline.progress import Progress
from slimline.runlog import RUN_LOG, TerminalStream, captured_output, run_folder, run_log
from slimline.serve.bundle import ServeBundle

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Compress, export, measure and serve causal LMs from one YAML file.",
)
# slimline's own terminal output: stderr, which stays the terminal while third-party output is captured.
console = Console(file=TerminalStream())
# Loggers whose INFO lines the terminal shows during `slimline run` (one line per stage, the run's end);
# every other INFO line goes to run.log only, unless --ci asks for the detail.
SUMMARY_LOGGERS = ("slimline.runner", "slimline.cli", "slimline.run")


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
            # Python's stdout/stderr stay as they are, so third-party prints reach the capture, not the bars.
            redirect_stdout=False,
            redirect_stderr=False,
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


class JsonLineFormatter(logging.Formatter):
    """One JSON object per log record (``time``, ``level``, ``logger``, ``message``), for CI log parsers."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single line of JSON; a traceback goes into ``exception``."""
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TerminalFilter(logging.Filter):
    """What reaches the terminal: slimline's records and other libraries' errors; the rest is in the run log.

    Of slimline's INFO lines only those of ``SUMMARY_LOGGERS`` pass, unless ``detail`` is set.
    """

    def __init__(self, detail: bool) -> None:
        """``detail``: every slimline INFO line (CI logs, the server), not just one line per stage."""
        super().__init__()
        self.detail = detail

    def filter(self, record: logging.LogRecord) -> bool:
        """True for records the terminal shows."""
        if record.name != "slimline" and not record.name.startswith("slimline."):
            return record.levelno >= logging.ERROR
        return self.detail or record.levelno >= logging.WARNING or record.name in SUMMARY_LOGGERS


def setup_logging(quiet: bool, ci: bool, detail: bool = True) -> None:
    """Rich log lines for people; JSON lines on stderr for CI; plain timestamped lines for --quiet.

    The terminal handler filters (``TerminalFilter``); the loggers pass slimline's DEBUG records and
    other libraries' INFO records on, for the run log (``runlog.run_log``) to keep.
    """
    if ci:
        handler: logging.Handler = logging.StreamHandler(TerminalStream())
        handler.setFormatter(JsonLineFormatter())
    elif quiet:
        handler = logging.StreamHandler(TerminalStream())
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler = RichHandler(console=console, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    handler.addFilter(TerminalFilter(detail or ci))
    root = logging.getLogger()
    for previous in [h for h in root.handlers if any(isinstance(f, TerminalFilter) for f in h.filters)]:
        root.removeHandler(previous)  # a second command in the same process (tests) replaces the first's handler
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("slimline").setLevel(logging.DEBUG)
    logging.captureWarnings(True)  # Python warnings become records: in the run log, not on the terminal
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    # transformers' own bars and per-load notices would drown slimline's one line per step.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def checked_option(value: str, check: Callable[[str], str]) -> str:
    """An option's value through a check that raises ValueError, as a usage error naming the option."""
    try:
        return check(value)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


def fail(error: SlimlineError, ci: bool = False) -> None:
    """Print a refusal (a JSON log record with ``--ci``) and exit 2 (bad input) without a traceback."""
    if ci:
        logging.getLogger("slimline.cli").error("%s", error)
    else:
        console.print(f"[bold red]error:[/] {escape(str(error))}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def write_output(path: Path, write: Callable[[], Any]) -> None:
    """Call ``write`` (which writes ``path``); a path that cannot be written is a refusal (exit 2), not a traceback."""
    try:
        write()
    except OSError as error:
        fail(SlimlineError(f"{path}: cannot write: {error.strerror or error}"))


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
        bool, typer.Option("--ci", help="No bars, JSON log lines on stderr, non-zero exit on any failed stage.")
    ] = False,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            help="Stages produced at once, in worker processes, where no path joins them; evaluation stays one at a time.",
        ),
    ] = 1,
    nproc_per_node: Annotated[
        int,
        typer.Option(
            min=1, help="Train every training stage data-parallel on this many processes per node (torchrun)."
        ),
    ] = 1,
    nnodes: Annotated[int, typer.Option(min=1, help="Nodes taking part in each distributed training stage.")] = 1,
    rdzv_endpoint: Annotated[
        str | None, typer.Option(help="HOST:PORT where the nodes of a distributed stage meet (needed with --nnodes).")
    ] = None,
) -> None:
    """Run a pipeline: every stage, its evaluation and its report, reusing finished work; the log is in run.log."""
    ci = ci or os.environ.get("CI") == "true"
    setup_logging(quiet, ci, detail=ci)
    launch = LaunchRequest(nproc_per_node, nnodes, rdzv_endpoint)
    try:
        progress = Progress() if (quiet or ci) else BarProgress()
        outcome = run_pipeline(pipeline, overrides, out, progress, jobs, launch)
    except SlimlineError as error:
        fail(error, ci)
    except Exception:
        if not ci:
            raise
        logging.getLogger("slimline.cli").exception("slimline failed unexpectedly")  # a JSON record, not a traceback
        raise typer.Exit(1) from None
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    print_summary(summary)
    if ci:
        log_run_outcome(summary, outcome.run_dir)
    if not outcome.ok:
        raise typer.Exit(1)


@dataclass(frozen=True)
class LaunchRequest:
    """``--nproc-per-node``/``--nnodes``/``--rdzv-endpoint``: distributed training for every training stage."""

    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None


def run_pipeline(
    pipeline: Path,
    overrides: list[str] | None,
    out: Path | None,
    progress: Progress,
    jobs: int = 1,
    launch: LaunchRequest | None = None,
) -> Any:
    """Validate and run a pipeline with third-party output captured: the run's into run.log, the start's too.

    Validating and importing the runner load transformers, peft and torchao, which print as they load;
    that output is kept aside until the run log exists, then written into it.
    """
    with captured_output("startup", log_now=False) as startup:
        loaded = load_pipeline(pipeline, overrides)
        if launch is not None:
            from slimline.distributed import apply_launch_override

            loaded = apply_launch_override(loaded, launch.nproc_per_node, launch.nnodes, launch.rdzv_endpoint)
        from slimline.parallel import ParallelRunner
        from slimline.runner import Runner
    run_dir = run_folder(loaded.config.name, out)
    with run_log(run_dir / RUN_LOG):
        startup.log()
        if jobs == 1:  # stages one after another in this process, as always
            return Runner(loaded, run_dir, progress=progress).run()
        return ParallelRunner(loaded, run_dir, progress=progress, jobs=jobs).run()


def log_run_outcome(summary: dict[str, Any], run_dir: Path) -> None:
    """One machine-readable record of the run's end: status per stage and where the reports are."""
    logging.getLogger("slimline.run").log(
        logging.INFO if summary["ok"] else logging.ERROR,
        "run finished: %s",
        json.dumps(
            {
                "ok": summary["ok"],
                "run_dir": str(run_dir),
                "stages": {row["stage"]: row["status"] for row in summary["stages"]},
                "failed": {row["stage"]: row["reason"] for row in summary["stages"] if row["status"] == "failed"},
                "reports": [str(run_dir / name) for name in ("report.md", "report.html", "summary.json")],
                "log": str(run_dir / RUN_LOG),
            }
        ),
    )


@app.command()
def validate(pipeline: PipelineArg, overrides: OverrideOpt = None) -> None:
    """Check a pipeline file without running anything."""
    try:
        with captured_output("validate", log_now=False):  # what libraries print as they load (torchao)
            loaded = load_pipeline(pipeline, overrides)
    except SlimlineError as error:
        fail(error)
    stages = ", ".join(f"{s.id} ({s.kind})" for s in loaded.config.stages) or "no stages"
    console.print(f"{pipeline}: valid pipeline {loaded.config.name!r}: {stages}", highlight=False, soft_wrap=True)


@app.command()
def schema() -> None:
    """Print the JSON Schema of pipeline files (for editor completion)."""
    typer.echo(json.dumps(pipeline_json_schema(), indent=2))


RunArg = Annotated[Path, typer.Argument(help="A run folder, e.g. runs/quickstart.")]


@app.command()
def report(run_dir: RunArg) -> None:
    """Rewrite a finished run's report.md and report.html from its summary.json and print the table."""
    from slimline.reports.comparison import write_run_reports
    from slimline.reports.rows import read_run_manifest, read_summary

    try:
        summary = read_summary(run_dir)
        read_run_manifest(run_dir)  # checked here, so the HTML header can read it as it is
        paths = write_run_reports(run_dir)
    except SlimlineError as error:
        fail(error)
    except OSError as error:
        fail(SlimlineError(f"{run_dir}: cannot write the reports: {error.strerror or error}"))
    print_summary(summary)
    console.print(f"reports: {paths['md']}, {paths['html']}", highlight=False, soft_wrap=True)


@app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(help="The reference run folder, e.g. the last release.")],
    run_b: Annotated[Path, typer.Argument(help="The run folder to compare with it, e.g. the candidate.")],
    markdown: Annotated[Path | None, typer.Option("--md", help="Also write the comparison as Markdown here.")] = None,
) -> None:
    """Show what changed between two runs: changed, added and removed stages and every metric's delta."""
    from slimline.reports.compare import compare_runs, render_diff_markdown

    try:
        diff = compare_runs(run_a, run_b)
    except SlimlineError as error:
        fail(error)
    print_diff(diff)
    if markdown is not None:
        write_output(markdown, lambda: markdown.write_text(render_diff_markdown(diff)))


@app.command()
def gate(
    run_dir: RunArg,
    junit: Annotated[Path | None, typer.Option(help="Also write the verdict as JUnit XML here.")] = None,
) -> None:
    """Check a run's release candidate against its pipeline's release limits; exit 1 when a check fails."""
    from slimline.reports.gate import gate_run, render_verdict_text, write_junit

    try:
        verdict = gate_run(run_dir)
    except SlimlineError as error:
        fail(error)
    typer.echo(render_verdict_text(verdict))
    if junit is not None:
        write_output(junit, lambda: write_junit(verdict, junit))
    if not verdict.passed:
        raise typer.Exit(1)


@app.command()
def serve(
    target: Annotated[
        Path, typer.Argument(help="Target artifact folder (hf or onnx), e.g. runs/serving/stages/tuned.")
    ],
    draft: Annotated[Path | None, typer.Option(help="Draft artifact folder for speculative decoding.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; localhost unless you mean otherwise.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="SLIMLINE_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1.")
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="Model id clients send; default the target folder's name.")
    ] = None,
    k: Annotated[
        int | None,
        typer.Option(
            min=1, max=16, help=f"Draft tokens per round (start value when adaptive); default {ServeBundle.k}."
        ),
    ] = None,
    adaptive: Annotated[
        bool | None,
        typer.Option(
            "--adaptive/--no-adaptive",
            help=f"Adapt k to the acceptance rate; default {'on' if ServeBundle.adaptive else 'off'}.",
        ),
    ] = None,
    max_active: Annotated[
        int, typer.Option(min=1, help="Requests holding a slot (decoding or prefilling); more wait in a queue.")
    ] = 16,
    max_batch: Annotated[
        int | None,
        typer.Option(min=1, help="Requests run together in one batched pass; default --max-active (1: interleaved)."),
    ] = None,
    batch_invariant: Annotated[
        bool,
        typer.Option(
            "--batch-invariant/--no-batch-invariant",
            help="llama.cpp targets: a request's greedy tokens never depend on what else runs with it, at a "
            "cost to one-request decoding (docs/serving.md).",
        ),
    ] = True,
    device: Annotated[
        str,
        typer.Option(
            callback=lambda value: checked_option(value, check_device_name),
            help="Where PyTorch models run: auto (a CUDA GPU where one is visible), cpu, cuda, cuda:N.",
        ),
    ] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            callback=lambda value: checked_option(value, check_dtype_name),
            help="PyTorch models' dtype: auto (float32; bf16 where float32 weights would take over half the "
            "GPU's free memory), float32, bfloat16 or float16.",
        ),
    ] = "auto",
    limit: Annotated[
        list[str] | None,
        typer.Option(
            "--limit",
            help="Set a client limit: name=value, e.g. max_body_bytes=4194304 (see docs/serving.md, 'Limits').",
        ),
    ] = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with speculative decoding when a draft is given."""
    from slimline.serve.limits import parse_limits
    from slimline.serve.server import serve as run_server

    setup_logging(quiet=False, ci=False)
    try:
        limits = parse_limits(limit)
        run_server(
            target,
            draft,
            host,
            port,
            api_key,
            model_name,
            k,
            adaptive,
            max_active,
            max_batch,
            limits=limits,
            batch_invariant=batch_invariant,
            device=device,
            dtype=dtype,
        )
    except SlimlineError as error:
        fail(error)


def print_summary(summary: dict[str, Any]) -> None:
    """The end-of-run table: report.md's headline columns over the same rows, one per stage."""
    from slimline.reports.comparison import SUMMARY_COLUMNS
    from slimline.reports.rows import rows_from_summary
    from slimline.reports.tables import rich_table

    title = f"{summary['pipeline']}: {'ok' if summary['ok'] else 'FAILED'} in {summary['seconds']:.1f}s"
    table = rich_table(SUMMARY_COLUMNS, rows_from_summary(summary), title=title)
    # Wide enough for every column when the output is a file or a CI log.
    Console(width=None if sys.stdout.isatty() else 160).print(table)


DIRECTION_STYLE = {"better": "green", "worse": "red", "same": ""}


def print_diff(diff: Any) -> None:
    """The run-vs-run table: changed stages in bold, deltas coloured by direction."""
    from slimline.reports.compare import METRICS

    title = f"{diff.run_a} (A) -> {diff.run_b} (B): " + (
        f"{len(diff.changed)} changed: {', '.join(diff.changed)}" if diff.changed else "no stage changed"
    )
    table = Table(title=title)
    for column in ("stage", "change", "why", *(metric.label for metric in METRICS)):
        table.add_column(column)
    for stage in diff.stages:
        style = "bold" if stage.change != "unchanged" else ""
        cells = [
            f"[{DIRECTION_STYLE[d.direction]}]{d.text()}[/]" if d.direction != "same" else d.text()
            for d in stage.deltas
        ]
        table.add_row(stage.stage, stage.change, stage.why or "-", *(cells or ["-"] * len(METRICS)), style=style)
    out = Console(width=None if sys.stdout.isatty() else 200)
    out.print(table)
    for change in diff.context:
        out.print(f"outside the stages: {change}", highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point of the ``slimline`` script."""
    app()


if __name__ == "__main__":
    main()
