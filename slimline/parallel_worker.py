"""A worker process of ``slimline run --jobs N`` (see ``slimline/parallel.py``): it produces the stages it is sent.

It is started by multiprocessing's ``spawn`` context with its share of the machine in its
environment, rebuilds the coordinator's runner from the validated pipeline (as data, validated
again here), and for each stage it is sent runs ``Runner.execute_plan``: the stage into a temporary
folder, the output check, atomic publishing. Every log record goes to the coordinator over the pipe,
prefixed with the stage id. SIGTERM (from the coordinator, or from the kernel when the coordinator
dies) unwinds the stage in hand, which removes its temporary folder, and ends the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import logging.handlers
import os
import signal
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from slimline.artifacts import read_artifact
from slimline.config import validate_data
from slimline.errors import SlimlineError
from slimline.progress import Progress
from slimline.runlog import captured_output, flush_output
from slimline.runner import Runner, StagePlan

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class PipeHandler(logging.handlers.QueueHandler):
    """Sends log records to the coordinator over the worker's pipe, prefixed with the stage being made."""

    def __init__(self, conn: Connection, lock: threading.Lock) -> None:
        """``lock`` serialises every send on ``conn`` (records may come from library threads)."""
        super().__init__(None)  # type: ignore[arg-type]  # enqueue is overridden: no queue
        self.conn = conn
        self.send_lock = lock
        self.label = ""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """The record with its message formatted (tracebacks included) and the stage id in front."""
        record = super().prepare(record)
        if self.label and not record.msg.startswith((f"{self.label}:", f"{self.label} ")):
            record.msg = record.message = f"[{self.label}] {record.msg}"
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        """Send the record; a coordinator that has gone takes nothing."""
        with self.send_lock, contextlib.suppress(OSError, ValueError):
            self.conn.send(("log", record))


def worker_main(conn: Connection, setup: dict[str, Any], threads: int, cores: list[int] | None, number: int) -> None:
    """A worker process: take stages from ``conn`` until told to stop, produce each, report how it ended."""
    follow_coordinator(setup["coordinator"])
    lock = threading.Lock()
    handler = configure_worker_logging(conn, lock, setup["log_levels"])
    code = 0
    try:
        configure_threads(threads, cores)
        runner, problem = start_runner(setup, number)
        while (job := conn.recv()) is not None:
            handler.label = job["stage_id"]
            outcome = run_job(runner, job) if runner else {"status": "failed", "reason": problem, "run_seconds": 0.0}
            handler.label = ""
            with lock:
                conn.send(("done", outcome))
    except (EOFError, KeyboardInterrupt):  # the coordinator has gone (its end of the pipe closed)
        code = 1
    except SystemExit as stop:  # SIGTERM: the stage in hand has removed its temporary folder
        code = stop.code if isinstance(stop.code, int) else 1
    # Tearing down an interpreter that loaded torch and transformers takes seconds; nothing here needs it.
    flush_output()
    os._exit(code)


def follow_coordinator(coordinator: int) -> None:
    """Stop with the coordinator: SIGTERM when it dies (Linux), and no Ctrl-C of our own (it decides)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: exit_worker(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: None)  # a handler, not SIG_IGN: children still get Ctrl-C
    with contextlib.suppress(AttributeError, OSError, TypeError):  # not Linux: the coordinator's cleanup has to do
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != coordinator:  # it died before the line above took effect
        os._exit(1)


def exit_worker(signum: int) -> None:
    """SIGTERM in a worker: unwind (``run_stage`` removes its temporary folder), then exit."""
    raise SystemExit(128 + signum)


def configure_worker_logging(conn: Connection, lock: threading.Lock, levels: dict[str, int]) -> PipeHandler:
    """Every record goes to the coordinator; loggers filter as the coordinator's do; warnings become records."""
    handler = PipeHandler(conn, lock)
    root = logging.getLogger()
    for previous in list(root.handlers):
        root.removeHandler(previous)
    root.addHandler(handler)
    apply_levels(levels)
    logging.captureWarnings(True)
    return handler


def apply_levels(levels: dict[str, int]) -> None:
    """Set the coordinator's logger levels here (again after imports: transformers sets its own on load)."""
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)


def configure_threads(threads: int, cores: list[int] | None) -> None:
    """Keep to this worker's share of the CPU."""
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    import torch

    torch.set_num_threads(threads)


def start_runner(setup: dict[str, Any], number: int) -> tuple[Runner | None, str]:
    """The coordinator's runner rebuilt here, or None and why not (every stage sent here then fails with it)."""
    try:
        runner = rebuild_runner(setup, number)
    except Exception as error:  # reported per stage; the coordinator and the other workers go on
        log.debug("worker %d could not start", number, exc_info=True)
        return None, f"its worker could not start: {type(error).__name__}: {error}"
    log.debug("worker %d (pid %d) ready", number, os.getpid())
    return runner, ""


def rebuild_runner(setup: dict[str, Any], number: int) -> Runner:
    """The coordinator's runner from its validated pipeline; SlimlineError unless it validates to the same config."""
    with captured_output(f"worker {number} startup"):  # what validation's imports print
        pipeline, problems = validate_data(setup["pipeline"], Path(setup["source"]))
    apply_levels(setup["log_levels"])
    if not setup["progress_bars"]:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if problems or pipeline is None:
        raise SlimlineError(f"the pipeline does not validate here: {'; '.join(p.message for p in problems[:3])}")
    if pipeline.config.model_dump(mode="json", by_alias=True) != setup["pipeline"]:
        raise SlimlineError("the pipeline validates to another configuration here than in the coordinator")
    return Runner(pipeline, Path(setup["run_dir"]), progress=Progress(), model_source=Path(setup["model_source"]))


def run_job(runner: Runner, job: dict[str, Any]) -> dict[str, Any]:
    """Produce one stage as ``Runner.produce_stage`` would; never raises (but on SIGTERM)."""
    try:
        inputs = [read_artifact(Path(folder)) for folder in job["inputs"]]
        plan = StagePlan(job["stage_id"], job["kind"], job["key"], inputs, Path(job["folder"]))
        result = runner.execute_plan(plan)
    except Exception as error:  # reading the inputs; execute_plan catches the stage's own errors
        log.debug("%s failed in its worker", job["stage_id"], exc_info=True)
        return {"status": "failed", "reason": f"{type(error).__name__}: {error}", "run_seconds": 0.0}
    return {"status": result.status, "reason": result.reason, "run_seconds": result.run_seconds}
