"""Training stages launched data-parallel under torchrun (2 processes, gloo) give one process's weights."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from slimline.artifacts import read_artifact, verify_files
from slimline.config import load_pipeline
from slimline.distributed import JOB_FILE, apply_launch_override, launch_of, run_torchrun
from slimline.errors import ConfigError, StageError
from slimline.progress import Progress
from slimline.runner import Runner
from slimline.stage import DataAccess, StageContext
from slimline.training import BatchDropout, Shard
from tests.conftest import write_pipeline

# Two micro-batches per step (DDP's no_sync path), dropout on (lora's default 0.05): still one process's weights.
TRAIN = "steps: 4, batch_size: 4, gradient_accumulation: 2, sequence_length: 32, precision: fp32"
LORA = f"{{rank: 4, {TRAIN}}}"
DISTILL = f"{{student: {{layers: 1}}, hidden_weight: 0.5, {TRAIN}}}"
# Measured max |difference| of any weight, one process against two: about 1e-8 (float32 rounding).
SAME_WEIGHTS = 1e-5


def stage(stage_id: str, kind: str, params: str, launch: str | None = None) -> str:
    """A stage entry reading the input model; ``launch`` is the strategy of a 2-process launch."""
    entry = f"  - id: {stage_id}\n    kind: {kind}\n    from: input\n    params: {params}\n"
    return entry + (f"    launch: {{nproc_per_node: 2, strategy: {launch}}}\n" if launch else "")


def max_difference(first: Path, second: Path) -> float:
    """The largest |difference| between two artifacts' weights."""
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    return max((a[name].float() - b[name].float()).abs().max().item() for name in a)


def stage_metrics(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())["stage_metrics"]


@pytest.fixture(scope="module")
def launched(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run: lora and distill in this process and under torchrun (DDP; lora also FSDP)."""
    folder = tmp_path_factory.mktemp("distributed")
    stages = (
        stage("lora-1", "lora", LORA)
        + stage("lora-ddp", "lora", LORA, "ddp")
        + stage("lora-fsdp", "lora", LORA, "fsdp")
        + stage("distill-1", "distill", DISTILL)
        + stage("distill-ddp", "distill", DISTILL, "ddp")
    )
    outcome = Runner(load_pipeline(write_pipeline(folder, tiny_model, stages)), folder / "run").run()
    assert outcome.ok, [(r.stage_id, r.reason) for r in outcome.results]
    return folder / "run" / "stages"


@pytest.mark.stage
@pytest.mark.parametrize(("kind", "strategy"), [("lora", "ddp"), ("lora", "fsdp"), ("distill", "ddp")])
def test_two_processes_train_the_weights_of_one(launched: Path, kind: str, strategy: str) -> None:
    one, two = launched / f"{kind}-1", launched / f"{kind}-{strategy}"
    assert max_difference(one, two) < SAME_WEIGHTS
    assert stage_metrics(two)["loss_curve"] == pytest.approx(stage_metrics(one)["loss_curve"], abs=1e-3)
    ran = stage_metrics(two)["distributed"]
    assert ran["world_size"] == 2 and ran["backend"] == "gloo" and ran["strategy"] == strategy
    assert len(ran["devices"]) == 2 and all(device.endswith("/cpu") for device in ran["devices"])
    assert "distributed" not in stage_metrics(one)
    # the launch's job folder (JSON, tokens, rank logs) is not part of what was published
    artifact = read_artifact(two)
    assert verify_files(artifact) == [] and not any(".launch" in name for name in artifact.manifest["files"])
    assert AutoModelForCausalLM.from_pretrained(two).config.num_hidden_layers >= 1  # it reloads


@pytest.mark.unit
def test_batch_dropout_cuts_the_global_mask_into_rank_rows() -> None:
    x = torch.ones(4, 3, 8)
    whole = BatchDropout(0.5, seed=7, shard=Shard()).train()(x)
    halves = [BatchDropout(0.5, seed=7, shard=Shard(rank, 2)).train()(Shard(rank, 2).rows(x)) for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)
    assert 0 < (whole == 0).float().mean() < 1


@pytest.mark.unit
def test_launch_block_is_validated_with_lines(tiny_model: Path, tmp_path: Path) -> None:
    stages = (
        "  - id: odd\n    kind: lora\n    params: {batch_size: 3, steps: 1}\n"
        "    launch: {nproc_per_node: 2}\n"
        "  - id: sparse\n    kind: prune.magnitude\n    params: {sparsity: 0.3}\n"
        "    launch: {nproc_per_node: 2}\n"
        "  - id: slim\n    kind: prune.structured\n    params: {ffn_fraction: 0.5, round_to: 16}\n"
        "    launch: {nproc_per_node: 2}\n"
    )
    path = write_pipeline(tmp_path, tiny_model, stages)
    text = path.read_text().splitlines()
    with pytest.raises(ConfigError) as error:
        load_pipeline(path)
    problems = str(error.value).splitlines()[1:]
    assert len(problems) == 3
    odd, sparse, slim = problems
    assert f"{path}:{text.index('    params: {batch_size: 3, steps: 1}') + 1}: stages[0].params.batch_size:" in odd
    assert "batch_size 3 does not divide among the launch's 2 processes" in odd
    assert "stages[1].launch: prune.magnitude does not train" in sparse
    assert "stages[2].launch: prune.structured trains only in params.recovery" in slim
    far = write_pipeline(tmp_path, tiny_model, "  - id: far\n    kind: lora\n    launch: {nnodes: 2}\n", "far")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.launch: .*nnodes > 1 needs rdzv_endpoint"):
        load_pipeline(far)


@pytest.mark.unit
def test_override_launches_training_stages_without_changing_their_params(tiny_model: Path, tmp_path: Path) -> None:
    stages = (
        "  - id: tuned\n    kind: lora\n    params: {batch_size: 4}\n"
        "  - id: own\n    kind: lora\n    params: {batch_size: 4}\n    launch: {nproc_per_node: 4, strategy: fsdp}\n"
        "  - id: int8\n    kind: quantize.ptq\n"
    )
    pipeline = load_pipeline(write_pipeline(tmp_path, tiny_model, stages))
    launched = apply_launch_override(pipeline, nproc_per_node=2)
    tuned = launch_of(launched.params["tuned"])
    assert tuned is not None and tuned.world_size == 2 and tuned.strategy == "ddp"
    assert launch_of(launched.params["own"]).nproc_per_node == 4  # a stage's own block wins
    assert launched.config.stages[2].launch is None  # quantize.ptq does not train
    # the params (and so the cache key) are the same: the world size does not change the result
    assert launched.params["tuned"].model_dump() == pipeline.params["tuned"].model_dump()
    assert launch_of(pipeline.params["tuned"]) is None  # the pipeline given is left as it was
    assert apply_launch_override(pipeline, nproc_per_node=1) is pipeline
    with pytest.raises(ConfigError, match=r"'tuned'.*batch_size 4 does not divide among the launch's 3 processes"):
        apply_launch_override(pipeline, nproc_per_node=3)


@pytest.mark.stage
def test_a_failing_rank_fails_the_stage_with_its_error(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    launch = {"nproc_per_node": 2, "nnodes": 1, "rdzv_endpoint": None, "strategy": "ddp"}
    job = {"kind": "no-such-kind", "stage_id": "x", "seed": 0, "params": {}, "inputs": [], "prepared": None}
    (job_dir / JOB_FILE).write_text(json.dumps(job | {"launch": launch, "threads_per_rank": 1}))
    ctx = StageContext("x", tmp_path, 0, DataAccess(lambda split: torch.arange(10)), Progress())
    from slimline.config import LaunchConfig

    started = time.perf_counter()
    with pytest.raises(StageError) as error:
        run_torchrun(job_dir, LaunchConfig(**launch), ctx)
    message = str(error.value)
    # whichever rank fails first is the one reported
    assert "torchrun exit status 1" in message and "no-such-kind" in message
    assert "rank 0:" in message or "rank 1:" in message
    assert time.perf_counter() - started < 120


def processes_mentioning(text: str) -> list[int]:
    """Ids of live processes whose command line contains ``text`` (a killed stage's ranks would)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return found


@pytest.mark.e2e
@pytest.mark.slow  # 70 s on 2 cores: `pytest -m slow tests/test_distributed.py`; the suite stays near its time budget
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; ranks die with their parent on Linux")
def test_killed_distributed_stage_reruns_to_the_same_weights(launched: Path, tiny_model: Path, tmp_path: Path) -> None:
    # the fixture's lora-ddp stage, alone: the same key, so the same weights once it ran uninterrupted
    pipeline = write_pipeline(tmp_path, tiny_model, stage("lora-ddp", "lora", LORA, "ddp"))
    run_dir = tmp_path / "run"
    # a random moment of the distributed stage: while its ranks start, or after a random training step
    marker = random.choice(["lora-ddp: training on 2 processes", *(f"lora-ddp: step {k}/4" for k in (1, 2, 3))])
    process = subprocess.Popen(
        [sys.executable, "-m", "slimline.cli", "run", str(pipeline), "--out", str(run_dir), "--ci"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    seen = []
    assert process.stderr is not None
    for line in process.stderr:
        seen.append(line)
        if marker in line:
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(seen[-20:])

    # no rank outlives the kill (their command lines name the job file inside the run folder)
    deadline = time.monotonic() + 10
    while processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(run_dir)) == [], marker
    stages = run_dir / "stages"
    assert not (stages / "lora-ddp" / "artifact.json").exists(), marker
    assert any(path.name.startswith(".tmp-lora-ddp") for path in stages.iterdir())

    outcome = Runner(load_pipeline(pipeline), run_dir).run()
    assert {r.stage_id: r.status for r in outcome.results} == {"input": "reused", "lora-ddp": "ran"}
    assert not any(path.name.startswith(".tmp-") for path in stages.iterdir())
    assert verify_files(read_artifact(stages / "lora-ddp")) == []
    assert read_artifact(stages / "lora-ddp").key == read_artifact(launched / "lora-ddp").key
    assert max_difference(launched / "lora-ddp", stages / "lora-ddp") == 0.0  # gloo sums in a fixed order
    assert max_difference(launched / "lora-1", stages / "lora-ddp") < SAME_WEIGHTS
