"""Parallel branches: ``slimline run --jobs N`` produces independent stages at once in worker processes.

The process that runs the pipeline stays the coordinator (``ParallelRunner``). It decides which stages
are ready (every input finished), skips or reuses what it can itself (``Runner.plan_stage``), and
hands each stage that must run to one of at most N worker processes (``parallel_worker.py``),
started with multiprocessing's ``spawn`` context: no forked copy of the coordinator's threads or
CUDA state. A worker runs ``Runner.execute_plan`` (the stage into a temporary folder, its output
check, atomic publishing); the coordinator reads the published ``artifact.json`` back.

Each worker gets its share of the machine: ``cores // N`` CPU threads (``torch.set_num_threads``
and ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``), its own cores where there are at least N, and where
CUDA devices are visible its own device by ``CUDA_VISIBLE_DEVICES`` (round robin: N above the
device count shares devices). Workers' log records reach the coordinator's handlers (run.log, the
terminal) through their pipes. A failing stage fails only itself. SIGTERM or Ctrl-C of the
coordinator stops every worker (SIGTERM, then SIGKILL after a grace period); a worker removes its
temporary folder as it stops, the coordinator what a killed one left. A worker also gets SIGTERM
when the coordinator dies (Linux ``PR_SET_PDEATHSIG``), so none is orphaned.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_any
from pathlib import Path
from typing import Any

from slimline.artifacts import read_artifact
from slimline.config import INPUT_ID, Pipeline, topological_order
from slimline.errors import ArtifactError, ConfigError
from slimline.parallel_worker import worker_main
from slimline.progress import Progress
from slimline.runner import Runner, StagePlan, StageResult, log_outcome

log = logging.getLogger(__name__)
# The per-stage lines the terminal shows (``cli.SUMMARY_LOGGERS``): a stage's start in a worker is one.
stage_log = logging.getLogger("slimline.runner")

# Seconds a stopping worker gets to remove its temporary folder before it is killed.
STOP_GRACE_SECONDS = 10.0
# Seconds an idle worker gets to exit after it is told to.
CLOSE_SECONDS = 30.0
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class ParallelRunner(Runner):
    """A runner that produces independent stages at once in up to ``jobs`` worker processes."""

    def __init__(
        self, pipeline: Pipeline, run_dir: Path | None = None, progress: Progress | None = None, jobs: int = 2
    ) -> None:
        """As ``Runner``; ``jobs``: the most stages produced at once (1: one after another, in this process)."""
        if jobs < 1:
            raise ConfigError(f"jobs must be at least 1, got {jobs}")
        super().__init__(pipeline, run_dir, progress)
        self.jobs = jobs

    def produce_stages(self, skips: dict[str, str]) -> None:
        """Produce every stage, in worker processes unless ``jobs`` is 1."""
        if self.jobs == 1:
            super().produce_stages(skips)
        else:
            produce_in_parallel(self, skips)


def produce_in_parallel(runner: Runner, skips: dict[str, str]) -> None:
    """Produce every stage of ``runner``'s pipeline with up to ``runner.jobs`` workers.

    A stage is planned once its inputs are finished; plans wait for a free worker in the order
    ``topological_order`` gives. Results are kept in that order too, whatever order workers finish in.
    """
    order = topological_order(runner.pipeline)
    waiting: list[str] = list(order)
    queued: list[StagePlan] = []
    with stop_on_sigterm(), WorkerPool(runner.jobs, worker_setup(runner)) as pool:
        while True:
            queued += plan_ready(runner, waiting, skips)
            queued.sort(key=lambda plan: order.index(plan.stage_id))
            while queued and pool.has_free_slot():
                pool.submit(queued.pop(0))
            if not pool.busy():
                break
            for plan, outcome in pool.wait():
                finish(runner, worker_result(plan, outcome))
    runner.results = {INPUT_ID: runner.results[INPUT_ID], **{stage_id: runner.results[stage_id] for stage_id in order}}


def plan_ready(runner: Runner, waiting: list[str], skips: dict[str, str]) -> list[StagePlan]:
    """Plan each waiting stage whose inputs are finished (taking it off ``waiting``); record skips and reuses."""
    plans, progressed = [], True
    while progressed:  # a reused or skipped stage can make its dependents ready at once
        progressed = False
        for stage_id in list(waiting):
            needs = [runner.pipeline.parents[stage_id], *runner.pipeline.extra_inputs.get(stage_id, [])]
            if any(need not in runner.results for need in needs):
                continue
            waiting.remove(stage_id)
            plan = runner.plan_stage(stage_id, skips.get(stage_id))
            if isinstance(plan, StagePlan):
                plans.append(plan)
            else:
                finish(runner, plan)
                progressed = True
    return plans


def finish(runner: Runner, result: StageResult) -> None:
    """Record how a stage ended and print its line."""
    runner.results[result.stage_id] = result
    log_outcome(result)


def worker_result(plan: StagePlan, outcome: dict[str, Any]) -> StageResult:
    """A worker's report on a stage, with the artifact it published read back from disk."""
    if outcome["status"] != "ran":
        return StageResult(plan.stage_id, plan.kind, "failed", reason=outcome["reason"])
    try:
        artifact = read_artifact(plan.folder)
    except ArtifactError as error:
        return StageResult(plan.stage_id, plan.kind, "failed", reason=f"reading what its worker published: {error}")
    if artifact.key != plan.key:
        reason = f"{plan.folder} holds an artifact with another key than its worker was asked to make"
        return StageResult(plan.stage_id, plan.kind, "failed", reason=reason)
    return StageResult(plan.stage_id, plan.kind, "ran", artifact=artifact, run_seconds=outcome["run_seconds"])


def worker_setup(runner: Runner) -> dict[str, Any]:
    """What a worker needs to rebuild the runner: the validated pipeline as data, the folders, the log levels."""
    return {
        "pipeline": runner.config.model_dump(mode="json", by_alias=True),
        "source": str(runner.pipeline.source),
        "run_dir": str(runner.run_dir),
        "model_source": str(runner.model_source),
        "log_levels": logger_levels(),
        "progress_bars": transformers_progress_bars(),
        "coordinator": os.getpid(),
    }


def transformers_progress_bars() -> bool:
    """Whether transformers draws its progress bars here (the CLI turns them off; workers follow)."""
    import transformers

    return transformers.utils.logging.is_progress_bar_enabled()


def logger_levels() -> dict[str, int]:
    """The levels set on this process's loggers (root as ''), so a worker filters its records the same way."""
    levels = {"": logging.getLogger().level}
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


@dataclass
class Share:
    """One worker's share of the machine: CPU threads, the cores it runs on, its CUDA device."""

    threads: int
    cores: list[int] | None  # None: not pinned (fewer cores than workers)
    device: str | None  # a CUDA_VISIBLE_DEVICES entry; None: no CUDA device visible

    def environment(self) -> dict[str, str]:
        """The environment variables that carry the share into a worker (read before torch loads)."""
        env = dict.fromkeys(THREAD_VARIABLES, str(self.threads))
        if self.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.device
        return env

    def describe(self) -> str:
        """'1 CPU thread', '4 CPU threads on cores 0,1,2,3, CUDA device 1'."""
        text = f"{self.threads} CPU thread{'s' if self.threads > 1 else ''}"
        if self.cores:
            text += f" on core{'s' if len(self.cores) > 1 else ''} {','.join(map(str, self.cores))}"
        return text + (f", CUDA device {self.device}" if self.device is not None else "")


def machine_shares(jobs: int) -> list[Share]:
    """Split this process's cores and visible CUDA devices among ``jobs`` workers."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    threads = max(1, len(cores) // jobs)
    devices = visible_cuda_devices()
    return [
        Share(
            threads=threads,
            cores=cores[slot * threads : (slot + 1) * threads] if len(cores) >= jobs else None,
            device=devices[slot % len(devices)] if devices else None,
        )
        for slot in range(jobs)
    ]


def visible_cuda_devices() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


@dataclass
class Slot:
    """One worker place: its share of the machine, its process (started on first use) and its stage."""

    index: int
    share: Share
    process: Any = None  # multiprocessing's SpawnProcess
    conn: Connection | None = None
    plan: StagePlan | None = None


class WorkerPool:
    """Up to ``jobs`` worker processes, each producing one stage at a time; a context manager that stops them."""

    def __init__(self, jobs: int, setup: dict[str, Any]) -> None:
        """Nothing starts until the first ``submit``."""
        self.context = multiprocessing.get_context("spawn")
        self.setup = setup
        self.slots = [Slot(index, share) for index, share in enumerate(machine_shares(jobs))]

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        self.close(abort=kind is not None)

    def has_free_slot(self) -> bool:
        """Whether a stage could start now."""
        return any(slot.plan is None for slot in self.slots)

    def busy(self) -> bool:
        """Whether a stage is running."""
        return any(slot.plan is not None for slot in self.slots)

    def submit(self, plan: StagePlan) -> None:
        """Send a planned stage to a free worker (a started one first), starting its process if needed."""
        slot = min((slot for slot in self.slots if slot.plan is None), key=lambda slot: slot.process is None)
        if slot.process is None or not slot.process.is_alive():
            self.release(slot)  # a worker that died while idle
            self.start(slot)
        job = {
            "stage_id": plan.stage_id,
            "kind": plan.kind,
            "key": plan.key,
            "inputs": [str(artifact.path) for artifact in plan.inputs],
            "folder": str(plan.folder),
        }
        assert slot.conn is not None
        slot.conn.send(job)
        slot.plan = plan
        stage_log.info(
            "%s (%s): started in worker %d (pid %d, %s)",
            plan.stage_id,
            plan.kind,
            slot.index + 1,
            slot.process.pid,
            slot.share.describe(),
        )

    def start(self, slot: Slot) -> None:
        """Start a worker process for ``slot``; its environment carries the slot's share of the machine."""
        ours, theirs = self.context.Pipe()
        process = self.context.Process(
            target=worker_main,
            args=(theirs, self.setup, slot.share.threads, slot.share.cores, slot.index + 1),
            name=f"slimline-worker-{slot.index + 1}",
        )
        with temporary_environment(slot.share.environment()):  # a spawned child reads it as it starts
            process.start()
        theirs.close()
        slot.process, slot.conn = process, ours

    def wait(self) -> list[tuple[StagePlan, dict[str, Any]]]:
        """Block until at least one running stage ends; pass workers' log records on meanwhile."""
        finished: list[tuple[StagePlan, dict[str, Any]]] = []
        while not finished:
            running = [slot for slot in self.slots if slot.plan is not None]
            wait_for_any([slot.conn for slot in running] + [slot.process.sentinel for slot in running])
            for slot in running:
                finished += self.receive(slot)
                if slot.plan is not None and not slot.process.is_alive():
                    finished.append(self.lost(slot))
        return finished

    def receive(self, slot: Slot) -> list[tuple[StagePlan, dict[str, Any]]]:
        """Handle every message waiting on ``slot``'s pipe: log records, and the end of its stage."""
        finished = []
        with contextlib.suppress(EOFError, OSError):  # the worker has gone: ``wait`` notices by its sentinel
            while slot.conn is not None and slot.conn.poll():
                kind, body = slot.conn.recv()
                if kind == "log":
                    dispatch_record(body)
                elif kind == "done" and slot.plan is not None:
                    finished.append((slot.plan, body))
                    slot.plan = None
        return finished

    def lost(self, slot: Slot) -> tuple[StagePlan, dict[str, Any]]:
        """A worker that died mid-stage (killed, out of memory, a crash in C): its stage fails, its leftovers go."""
        plan, code = slot.plan, slot.process.exitcode
        assert plan is not None
        remove_unfinished(plan, slot.process.pid)
        cause = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        reason = (
            f"its worker process (pid {slot.process.pid}) ended before the stage did: {cause} "
            "(signal 9: out of memory, or killed by hand); nothing was published"
        )
        slot.plan = None
        self.release(slot)
        return plan, {"status": "failed", "reason": reason}

    def release(self, slot: Slot) -> None:
        """Forget a finished worker process; the slot starts a new one when it is next used."""
        if slot.conn is not None:
            slot.conn.close()
        if slot.process is not None:
            slot.process.join(timeout=1)
            if slot.process.exitcode is not None:
                slot.process.close()
        slot.process, slot.conn = None, None

    def close(self, abort: bool) -> None:
        """Stop every worker: idle ones are told to exit; on ``abort`` (Ctrl-C, SIGTERM, an error) running ones too."""
        alive = [slot for slot in self.slots if slot.process is not None]
        if abort and any(slot.plan is not None for slot in alive):
            running = ", ".join(slot.plan.stage_id for slot in alive if slot.plan is not None)
            log.warning("stopping the workers; unfinished stages leave nothing behind: %s", running)
        for slot in alive:
            with contextlib.suppress(OSError, ValueError):
                if abort:
                    slot.process.terminate()  # SIGTERM: the worker removes its temporary folder and exits
                else:
                    slot.conn.send(None)
        deadline = time.monotonic() + (STOP_GRACE_SECONDS if abort else CLOSE_SECONDS)
        for slot in alive:
            self.drain_until_exit(slot, deadline)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            if slot.plan is not None:
                remove_unfinished(slot.plan, slot.process.pid)
                slot.plan = None
            self.release(slot)

    def drain_until_exit(self, slot: Slot, deadline: float) -> None:
        """Pass on the worker's last log records until it exits or ``deadline`` passes."""
        while slot.process.is_alive() and time.monotonic() < deadline:
            wait_for_any([slot.conn, slot.process.sentinel], timeout=max(0.0, deadline - time.monotonic()))
            for plan, _ in self.receive(slot):  # a stage that ended as we stopped: its artifact is complete
                log.info("%s finished while the workers were stopping", plan.stage_id)
        self.receive(slot)


def dispatch_record(record: logging.LogRecord) -> None:
    """Hand a worker's log record to this process's handlers (run.log, the terminal) as if logged here."""
    logger = logging.getLogger(record.name)
    if not logger.disabled:
        logger.handle(record)


def remove_unfinished(plan: StagePlan, pid: int) -> None:
    """Delete the temporary folders a stopped worker left for ``plan`` (``new_work_folder`` names them by pid)."""
    for leftover in plan.folder.parent.glob(f".tmp-{plan.stage_id}-{pid}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
        log.info("removed %s, left by the worker that was making %s", leftover.name, plan.stage_id)


@contextlib.contextmanager
def temporary_environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then put back what was there."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit(143) for the block, so the pool's cleanup runs (Python's default just dies).

    Only the main thread can set signal handlers; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_now(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
