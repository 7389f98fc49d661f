"""Data-parallel training of a stage under ``torchrun`` (docs/scale.md, "Distributed training").

The runner stays one process. A training stage whose params carry a ``launch:`` block describes
its training as JSON in its work folder (kind, params, the folders of its inputs, the token
stream as safetensors) and starts ``python -m torch.distributed.run ... -m slimline.distributed
job.json``. Every rank rebuilds the same model from that description (the stage module's
``build_training``), wraps it (DDP, or FSDP2 ``fully_shard`` per decoder layer and the root),
draws the same global batch as one process would and trains on its rows (``training.Shard``).
Rank 0 writes the trained parameters as safetensors and a result file; the stage loads them
into its own copy of the model and goes on as without a launch (merge, save); the runner then
publishes as always. Nothing a rank reads is a pickle.

Rank 0 sends its log records and progress to the stage through an events file, so the terminal
and run.log show the training as usual. A failing rank fails the stage with torchrun's exit
status and the tail of that rank's log; a killed stage leaves no rank behind (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from slimline.artifacts import Artifact, read_artifact, write_json_atomic
from slimline.config import LaunchConfig, Pipeline, StageConfig, attach_launches
from slimline.errors import ConfigError, StageError
from slimline.progress import Advance, Progress
from slimline.registry import stage_module

if TYPE_CHECKING:  # torch loads in the functions that train: a launch's wrapper process needs none of it
    import torch

    from slimline.stage import StageContext
    from slimline.training import Training, TrainSettings

log = logging.getLogger(__name__)

JOB_FOLDER = ".launch"  # inside the stage's work folder; removed before the stage returns
JOB_FILE, EVENTS_FILE, RESULT_FILE, STATE_FILE, STREAM_FILE = (
    "job.json",
    "events.jsonl",
    "result.json",
    "state.safetensors",
    "train.safetensors",
)
POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 20.0  # torchrun gets this long after SIGTERM to stop its ranks
LOG_TAIL_LINES = 12
PR_SET_PDEATHSIG = 1  # linux/prctl.h
DEVICE_LABEL_BYTES = 128
# Runs torchrun so that it gets SIGTERM (and stops its ranks) when the stage's process dies, even by SIGKILL.
EXEC_WITH_PARENT_DEATH_SIGNAL = """\
import ctypes, os, signal, sys
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    if os.getppid() != int(sys.argv[1]):
        sys.exit("the stage that launched this training is gone")
os.environ["SLIMLINE_TORCHRUN_PID"] = str(os.getpid())  # exec keeps the pid: the ranks' parent
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


# --- which stages launch -------------------------------------------------------------------


def launch_of(params: BaseModel) -> LaunchConfig | None:
    """The ``launch:`` block validation handed to a stage's params, or None (train in this process)."""
    return getattr(params, "_launch", None)


def train_settings_of(kind: str, params: BaseModel) -> TrainSettings | None:
    """The optimisation settings inside a training stage's params (None: this configuration trains nothing)."""
    settings: Any = params
    for name in stage_module(kind).TRAIN_SETTINGS:
        settings = getattr(settings, name)
    return settings


def apply_launch_override(
    pipeline: Pipeline,
    nproc_per_node: int,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    strategy: str = "ddp",
) -> Pipeline:
    """``slimline run --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT]``: launch every training stage.

    Sets ``launch`` on every stage that trains (lora, distill, quantize.qat, prune.structured with a
    recovery) and has no ``launch:`` block of its own; a stage's own block wins. One process in all
    (N = M = 1) changes nothing. The stage keys do not change: the world size does not change the
    result (see docs/scale.md). Raises ConfigError, naming the stages, where a batch does not divide.
    """
    try:
        launch = LaunchConfig(
            nproc_per_node=nproc_per_node, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint, strategy=strategy
        )
    except ValueError as error:  # pydantic's ValidationError
        raise ConfigError(f"--nproc-per-node/--nnodes/--rdzv-endpoint: {error}") from error
    if launch.world_size == 1:
        return pipeline
    stages = [launched_stage(stage, pipeline, launch) for stage in pipeline.config.stages]
    config = pipeline.config.model_copy(update={"stages": stages})
    params = {stage_id: value.model_copy() for stage_id, value in pipeline.params.items()}
    problems = attach_launches(config, params)
    if problems:
        found = "; ".join(f"stage {stages[problem.loc[1]].id!r}: {problem.message}" for problem in problems)
        raise ConfigError(f"--nproc-per-node {nproc_per_node} x --nnodes {nnodes}: {found}")
    return dataclasses.replace(pipeline, config=config, params=params)


def launched_stage(stage: StageConfig, pipeline: Pipeline, launch: LaunchConfig) -> StageConfig:
    """The stage with ``launch`` where it trains and has no block of its own; else unchanged."""
    if stage.launch is not None or stage.id not in pipeline.params:
        return stage
    if not hasattr(stage_module(stage.kind), "build_training"):
        return stage
    if train_settings_of(stage.kind, pipeline.params[stage.id]) is None:
        return stage
    return stage.model_copy(update={"launch": launch})


# --- the stage's side ----------------------------------------------------------------------


def prepared_folder(ctx: StageContext) -> Path:
    """Where a stage saves what its ranks load besides its inputs (a pruned model); removed with the job."""
    return ctx.work_dir / JOB_FOLDER / "prepared"


def fit(
    kind: str,
    params: BaseModel,
    inputs: list[Artifact],
    ctx: StageContext,
    build: Callable[[], Training],
    prepared: Path | None = None,
) -> tuple[Training, list[float]]:
    """Build the stage's training and train it: here, or under torchrun when its params carry a launch.

    ``build`` makes the model in this process, exactly as the stage module's ``build_training``
    does in a rank (same seed first); ``prepared`` is a folder the stage wrote for its ranks to
    load (a pruned model). Returns the trained ``Training``, its model on ``ctx.device``, and the
    loss curve.
    """
    import torch

    from slimline.training import train_steps

    launch = launch_of(params)
    if launch is None:
        torch.manual_seed(ctx.seed)
        training = build()
        training.model.to(ctx.device)
        curve = train_steps(training.model, ctx.data.stream("train"), training.settings, ctx, training.loss_fn)
        return training, curve
    job_dir = ctx.work_dir / JOB_FOLDER
    try:
        write_job(job_dir, kind, params, inputs, ctx, launch, prepared)
        result = run_torchrun(job_dir, launch, ctx)
        torch.manual_seed(ctx.seed)
        training = build()
        load_trained_state(training.model, job_dir / STATE_FILE)
        training.model.to(ctx.device)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)  # never part of the published artifact
    ctx.records.update(result["records"])
    ctx.records["distributed"] = result["distributed"]
    return training, result["curve"]


def write_job(
    job_dir: Path,
    kind: str,
    params: BaseModel,
    inputs: list[Artifact],
    ctx: StageContext,
    launch: LaunchConfig,
    prepared: Path | None,
) -> Path:
    """Write the job the ranks read: JSON and the train split's tokens as safetensors; return the JSON's path."""
    from safetensors.torch import save_file

    from slimline.hardware import measured_bf16_slowdown

    job_dir.mkdir(parents=True, exist_ok=True)
    settings = train_settings_of(kind, params)
    assert settings is not None  # validation refused a launch on a stage that does not train
    if settings.precision != "fp32" and ctx.device == "cpu":
        measured_bf16_slowdown()  # measured (and cached) once here, not by every rank at once
    save_file({"tokens": ctx.data.stream("train").contiguous()}, job_dir / STREAM_FILE)
    job = {
        "kind": kind,
        "stage_id": ctx.stage_id,
        "seed": ctx.seed,
        "params": params.model_dump(mode="json"),
        "inputs": [str(artifact.path.resolve()) for artifact in inputs],
        "prepared": str(prepared.resolve()) if prepared else None,
        "launch": launch.model_dump(mode="json"),
        "threads_per_rank": threads_per_rank(launch.nproc_per_node),
        "device_type": "cpu" if ctx.device == "cpu" else "cuda",  # each rank takes the CUDA device of its local rank
    }
    write_json_atomic(job_dir / JOB_FILE, job)
    return job_dir / JOB_FILE


def threads_per_rank(processes: int) -> int:
    """This machine's cores (those this process may use) shared among its ranks, at least one each."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // processes)


def torchrun_command(job_file: Path, launch: LaunchConfig) -> list[str]:
    """The torchrun command line: this interpreter, under a wrapper that ties its life to this process."""
    rendezvous = (
        ["--standalone"]
        if launch.nnodes == 1
        else ["--rdzv-backend", "c10d", "--rdzv-endpoint", str(launch.rdzv_endpoint), "--rdzv-id", "slimline"]
    )
    return [
        sys.executable,
        "-c",
        EXEC_WITH_PARENT_DEATH_SIGNAL,
        str(os.getpid()),
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(launch.nproc_per_node),
        "--nnodes",
        str(launch.nnodes),
        *rendezvous,
        "--max-restarts",
        "0",
        "--monitor-interval",
        "0.2",
        "-m",
        "slimline.distributed",
        str(job_file),
    ]


def rank_environment(threads: int) -> dict[str, str]:
    """The ranks' environment: their thread count, unbuffered output, this checkout importable."""
    package_root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": package_root + (os.pathsep + path if path else ""),
    }


def run_torchrun(job_dir: Path, launch: LaunchConfig, ctx: StageContext) -> dict[str, Any]:
    """Run the job under torchrun, relaying rank 0's progress; the result, or StageError with the failing rank's log."""
    job = json.loads((job_dir / JOB_FILE).read_text())
    command = torchrun_command(job_dir / JOB_FILE, launch)
    log.info(
        "%s: training on %d processes (%s) under torchrun",
        ctx.stage_id,
        launch.world_size,
        launch.strategy,
    )
    if launch.nnodes > 1:
        log.info("%s: on every other machine run: %s", ctx.stage_id, " ".join(command[4:]))
    relay = EventRelay(job_dir / EVENTS_FILE, ctx.progress)
    with (job_dir / "torchrun.log").open("wb") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=rank_environment(job["threads_per_rank"])
        )
    try:
        while process.poll() is None:
            relay.poll()
            time.sleep(POLL_SECONDS)
        relay.poll()
    finally:
        relay.close()
        stop(process)
    if process.returncode != 0 or not (job_dir / RESULT_FILE).exists():
        raise StageError(failure_message(job_dir, process.returncode))
    return json.loads((job_dir / RESULT_FILE).read_text())


def stop(process: subprocess.Popen) -> None:
    """Stop torchrun if it still runs (this process is being interrupted): SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    process.terminate()  # torchrun passes it on to its ranks
    try:
        process.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def failure_message(job_dir: Path, returncode: int) -> str:
    """What failed: torchrun's exit status, the first failing rank's error and its log's tail (all logs to run.log)."""
    for path in [*sorted(job_dir.glob("rank*.log")), job_dir / "torchrun.log"]:
        if path.exists():
            log.debug("%s:\n%s", path.name, path.read_text(errors="replace"))
    # the first error written is the cause; a peer's lost connection comes after it
    errors = sorted(job_dir.glob("rank*.error"), key=lambda path: path.stat().st_mtime_ns)
    if errors:
        rank = errors[0].stem.removeprefix("rank")
        what = f"rank {rank}: {errors[0].read_text(errors='replace').strip()}"
        tail = log_tail(job_dir / f"rank{rank}.log")
    else:
        what, tail = "no rank reported an error (killed?)", log_tail(job_dir / "torchrun.log")
    return f"distributed training failed (torchrun exit status {returncode}); {what}\n{tail}"


def log_tail(path: Path) -> str:
    """The last lines of a log, indented, or a note that there is none."""
    if not path.exists():
        return f"  ({path.name} was not written)"
    lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    return "\n".join(f"  | {line}" for line in lines)


def load_trained_state(model: torch.nn.Module, state_file: Path) -> None:
    """Copy rank 0's trained parameters into this process's model; StageError if they do not match it."""
    import torch
    from safetensors.torch import load_file

    state = load_file(state_file)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(trainable):
        missing, unexpected = sorted(set(trainable) - set(state)), sorted(set(state) - set(trainable))
        raise StageError(
            f"the launched training returned other parameters than the stage trains: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(state[name])


class EventRelay:
    """Replays rank 0's events in this process: its log records, and its progress on ``progress``."""

    def __init__(self, path: Path, progress: Progress) -> None:
        """Read ``path`` from its start; tasks open on ``progress``."""
        self.path, self.progress, self.offset = path, progress, 0
        self.tasks = contextlib.ExitStack()
        self.advance: Advance | None = None

    def poll(self) -> None:
        """Handle the complete lines written since the last poll."""
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            self.handle(json.loads(line))

    def handle(self, event: dict[str, Any]) -> None:
        """One event: a log record, a task's start or end, or progress."""
        if "log" in event:
            name, level, message = event["log"]
            logging.getLogger(name).log(level, "%s", message)
        elif "task" in event:
            self.close()
            self.advance = self.tasks.enter_context(self.progress.task(event["task"], event["total"]))
        elif "advance" in event and self.advance is not None:
            self.advance(event["advance"])
        elif "end" in event:
            self.close()

    def close(self) -> None:
        """End the open task, if any."""
        self.tasks.close()
        self.tasks, self.advance = contextlib.ExitStack(), None


# --- a rank's side -------------------------------------------------------------------------


class EventWriter:
    """Rank 0's end of the events file: one JSON object per line, flushed as written."""

    def __init__(self, path: Path) -> None:
        """Append to ``path``."""
        self.handle = path.open("a", encoding="utf-8")

    def write(self, event: dict[str, Any]) -> None:
        """Append one event."""
        self.handle.write(json.dumps(event) + "\n")
        self.handle.flush()


class EventProgress(Progress):
    """Rank 0's progress: tasks and steps written as events for the stage's process to show."""

    def __init__(self, events: EventWriter) -> None:
        """Write to ``events``."""
        self.events = events

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        """A task the stage's process shows as its own."""
        self.events.write({"task": description, "total": total})
        try:
            yield lambda n=1: self.events.write({"advance": n})
        finally:
            self.events.write({"end": description})


class EventLogHandler(logging.Handler):
    """Rank 0's slimline log records, sent to the stage's process."""

    def __init__(self, events: EventWriter) -> None:
        """Write to ``events``."""
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        """Send the record's logger, level and message."""
        self.events.write({"log": [record.name, record.levelno, record.getMessage()]})


def main(argv: list[str]) -> int:
    """A rank: ``python -m slimline.distributed job.json`` under torchrun. Exit status 0 on success."""
    die_with_parent(int(os.environ.get("SLIMLINE_TORCHRUN_PID", os.getppid())))
    job_file = Path(argv[0])
    rank = int(os.environ.get("RANK", "0"))
    redirect_output(job_file.parent / f"rank{rank}.log")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank " + str(rank) + " %(name)s: %(message)s")
    try:
        train_rank(json.loads(job_file.read_text()), job_file.parent, rank)
    except BaseException as error:  # reported to the stage through the error file, then torchrun's exit status
        traceback.print_exc()
        (job_file.parent / f"rank{rank}.error").write_text(f"{type(error).__name__}: {error}")
        return 1
    return 0


def die_with_parent(parent: int) -> None:
    """Get SIGKILL when torchrun (pid ``parent``) dies; exit now if it died already.

    torchrun starts its ranks in sessions of their own, where a kill of the stage's process group
    does not reach them; without this a killed stage would leave its ranks training.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)


def redirect_output(path: Path) -> None:
    """Send this process's stdout and stderr (and the C libraries') to ``path``."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)


def train_rank(job: dict[str, Any], job_dir: Path, rank: int) -> None:
    """Rebuild the training from the job, train this rank's share, and (rank 0) write the result."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from slimline.stage import DataAccess, StageContext
    from slimline.training import Shard, train_steps

    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.set_num_threads(job["threads_per_rank"])
    device = torch.device("cuda", local_rank) if job.get("device_type") == "cuda" else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    try:
        module = stage_module(job["kind"])
        params = module.Params.model_validate(job["params"])
        inputs = [read_artifact(Path(folder)) for folder in job["inputs"]]
        prepared = Path(job["prepared"]) if job["prepared"] else None
        torch.manual_seed(job["seed"])
        training = module.build_training(params, inputs, prepared)
        model = training.model.to(device)
        strategy = job["launch"]["strategy"]
        wrapped = wrap(model, strategy, device, world)
        stream = load_file(job_dir / STREAM_FILE)["tokens"]
        events = EventWriter(job_dir / EVENTS_FILE) if rank == 0 else None
        if events is not None:
            logging.getLogger("slimline").addHandler(EventLogHandler(events))
        progress = EventProgress(events) if events is not None else Progress()
        ctx = StageContext(job["stage_id"], job_dir, job["seed"], DataAccess(lambda split: stream), progress)
        curve = train_steps(wrapped, stream, training.settings, ctx, training.loss_fn, Shard(rank, world))
        state = trained_state(model)
        devices = gather_labels(f"{socket.gethostname()}/{device}", device, world)
        if rank == 0:
            write_result(job_dir, job, curve, ctx.records, state, devices, backend)
    finally:
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, strategy: str, device: torch.device, world: int) -> torch.nn.Module:
    """DDP around the model, or FSDP2: ``fully_shard`` on every decoder layer, then on the root."""
    import torch

    if strategy == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        # every rank loads the same weights and no buffer changes in training: nothing to broadcast per step
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=False, broadcast_buffers=False
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of every transformers model inside ``model`` (a pair holds two), each once."""
    from transformers import PreTrainedModel

    from slimline.models import decoder_layers_name

    layers: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and (name := decoder_layers_name(module)):
            layers.update((id(layer), layer) for layer in module.get_submodule(name))
    return list(layers.values())


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters, whole and on the CPU (FSDP: gathered from every rank; all ranks must call)."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, parameter in model.named_parameters():  # tied weights once
        if parameter.requires_grad:
            whole = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
            state[name] = whole.detach().to("cpu", copy=True).contiguous()
    return state


def gather_labels(label: str, device: torch.device, world: int) -> list[str]:
    """Every rank's label ('host/cpu'), in rank order, through a tensor all-gather (no pickles)."""
    import torch
    import torch.distributed as dist

    encoded = label.encode()[:DEVICE_LABEL_BYTES]
    mine = torch.zeros(DEVICE_LABEL_BYTES, dtype=torch.uint8, device=device)
    mine[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    return [bytes(tensor.cpu().tolist()).rstrip(b"\0").decode(errors="replace") for tensor in gathered]


def write_result(
    job_dir: Path,
    job: dict[str, Any],
    curve: list[float],
    records: dict[str, Any],
    state: dict[str, torch.Tensor],
    devices: list[str],
    backend: str,
) -> None:
    """Rank 0: the trained parameters, then the result file (last: the stage reads it as 'finished')."""
    from safetensors.torch import save_file

    save_file(state, job_dir / STATE_FILE)
    launch = job["launch"]
    distributed = {
        "launcher": "torchrun",
        "world_size": len(devices),
        "nnodes": launch["nnodes"],
        "nproc_per_node": launch["nproc_per_node"],
        "strategy": launch["strategy"],
        "backend": backend,
        "devices": devices,
        "threads_per_rank": job["threads_per_rank"],
    }
    write_json_atomic(job_dir / RESULT_FILE, {"curve": curve, "records": records, "distributed": distributed})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
