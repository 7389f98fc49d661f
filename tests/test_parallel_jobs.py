"""``slimline run --jobs N``: independent branches produced at once in worker processes, same artifacts as one job."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimline.artifacts import read_artifact
from slimline.cli import app
from slimline.config import load_pipeline
from slimline.errors import ConfigError
from slimline.parallel import ParallelRunner, machine_shares
from slimline.parallel_worker import PipeHandler
from tests.conftest import TINY_EVALUATE

# Two branches from the input with no path between them; small data splits keep tokenizing short.
BRANCHES = """\
  - id: sparse_a
    kind: prune.magnitude
    from: input
    params: {sparsity: 0.3}
  - id: int8_a
    kind: quantize.ptq
  - id: sparse_b
    kind: prune.magnitude
    from: input
    params: {sparsity: 0.5, scope: global}
  - id: int8_b
    kind: quantize.ptq
    params: {weight_granularity: per_tensor}
"""

# A branch that fails at once (its dependent is skipped) beside one that trains for a long time.
FAILING_AND_SLOW = """\
  - id: broken
    kind: prune.magnitude
    from: input
    params: {pattern: "n:m", n: 1, m: 3}
  - id: after_broken
    kind: prune.magnitude
  - id: slow
    kind: lora
    from: input
    params: {rank: 2, steps: 20000, batch_size: 2, sequence_length: 32, precision: fp32}
"""

WORKER_START = re.compile(r"(\S+) \(\S+\): started in worker (\d+) \(pid (\d+),")


def write_branch_pipeline(folder: Path, model: Path, stages: str) -> Path:
    """A pipeline over ``model`` whose train and calibration text is the small calibration split."""
    path = folder / "branches.yaml"
    data = "data:\n  train: builtin:stdlib/calibration\n  calibration: builtin:stdlib/calibration\n"
    path.write_text(f"name: branches\nmodel: {model}\n{TINY_EVALUATE}{data}stages:\n{stages}")
    return path


def slimline_run(path: Path, run_dir: Path, jobs: int) -> tuple[dict, float]:
    """``slimline run --jobs N`` in this process; its summary.json and wall time."""
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(run_dir), "--quiet", "--jobs", str(jobs)])
    seconds = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    return json.loads((run_dir / "summary.json").read_text()), seconds


def worker_starts(run_log: str) -> dict[str, tuple[int, int]]:
    """{stage id: (worker number, pid)} from the coordinator's 'started in worker' lines."""
    return {stage: (int(number), int(pid)) for stage, number, pid in WORKER_START.findall(run_log)}


def gone(pid: int) -> bool:
    """Whether no process has this pid (a worker that was stopped and reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.e2e
def test_two_branches_at_once_make_the_same_artifacts_as_one_job(tiny_model: Path, tmp_path: Path) -> None:
    path = write_branch_pipeline(tmp_path, tiny_model, BRANCHES)
    one, one_seconds = slimline_run(path, tmp_path / "one", jobs=1)
    two, two_seconds = slimline_run(path, tmp_path / "two", jobs=2)
    print(f"wall time: --jobs 1 {one_seconds:.1f}s, --jobs 2 {two_seconds:.1f}s")  # noqa: T201

    assert (one["jobs"], two["jobs"]) == (1, 2)
    assert {row["stage"]: row["status"] for row in two["stages"]} == dict.fromkeys(
        ["input", "sparse_a", "int8_a", "sparse_b", "int8_b"], "ran"
    )
    assert [row["stage"] for row in two["stages"]] == [row["stage"] for row in one["stages"]]
    # Identical artifacts: the same keys and the same files with the same sha256 (hf safetensors, torch-int8).
    for stage in ("sparse_a", "int8_a", "sparse_b", "int8_b"):
        alone, parallel = (read_artifact(run / "stages" / stage) for run in (tmp_path / "one", tmp_path / "two"))
        assert parallel.key == alone.key
        assert parallel.manifest["files"] == alone.manifest["files"]
        assert parallel.manifest["stage_metrics"]["output_check"]["tokens"] > 0

    # The branches ran in two worker processes at once, and the workers' own records reached run.log.
    run_log = (tmp_path / "two" / "run.log").read_text()
    starts = worker_starts(run_log)
    assert starts["sparse_a"][1] != starts["sparse_b"][1]
    first_done = min(run_log.index(f"{stage} (prune.magnitude): ran in") for stage in ("sparse_a", "sparse_b"))
    assert run_log.index("sparse_b (prune.magnitude): started in worker") < first_done
    assert "slimline.prune.magnitude: sparse_a: 30.0% of" in run_log
    assert f"slimline.parallel_worker: worker 2 (pid {starts['sparse_b'][1]}) ready" in run_log
    assert all(gone(pid) for _, pid in starts.values())

    # The cache works as with one job: a second run reuses everything and starts no worker.
    again, _ = slimline_run(path, tmp_path / "two", jobs=2)
    assert {row["status"] for row in again["stages"]} == {"reused"}
    assert "started in worker" not in (tmp_path / "two" / "run.log").read_text()


@pytest.mark.e2e
def test_sigterm_stops_every_worker_and_leaves_no_half_made_artifact(tiny_model: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    pipeline = load_pipeline(write_branch_pipeline(tmp_path, tiny_model, FAILING_AND_SLOW))
    runner = ParallelRunner(pipeline, run_dir, jobs=2)
    markers = ("after_broken (prune.magnitude) skipped: its input 'broken' failed", "slow: step ")
    seen: list[str] = []

    def terminate_when_both_are_logged() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(seen) < len(markers):
            log_text = (run_dir / "run.log").read_text() if (run_dir / "run.log").exists() else ""
            seen[:] = [marker for marker in markers if marker in log_text]
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    def not_the_runners(signum: int, frame: object) -> None:
        raise SystemExit(99)  # SIGTERM outside the runner's handler must not end pytest

    previous = signal.signal(signal.SIGTERM, not_the_runners)
    try:
        threading.Thread(target=terminate_when_both_are_logged, daemon=True).start()
        with pytest.raises(SystemExit) as stopped:
            runner.run()
        assert signal.getsignal(signal.SIGTERM) is not_the_runners  # the runner put the handler back
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert seen == list(markers)
    assert stopped.value.code == 128 + signal.SIGTERM
    run_log = (run_dir / "run.log").read_text()
    # The failing branch failed alone; its dependent was skipped while the other branch went on.
    assert "broken failed:\nTraceback (most recent call last)" in run_log and "not a multiple of m=3" in run_log
    assert "stopping the workers; unfinished stages leave nothing behind: slow" in run_log
    starts = worker_starts(run_log)
    assert set(starts) == {"broken", "slow"}
    assert all(gone(pid) for _, pid in starts.values())  # no orphans
    stages = run_dir / "stages"
    assert not (stages / "slow" / "artifact.json").exists()
    assert not [p.name for p in stages.iterdir() if p.name.startswith((".tmp-", ".stale-"))]


@pytest.mark.unit
def test_each_worker_gets_its_share_of_cores_and_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    shares = machine_shares(3)
    assert [share.threads for share in shares] == [2, 2, 2]
    assert [share.cores for share in shares] == [[0, 1], [2, 3], [4, 5]]
    assert [share.device for share in shares] == ["4", "5", "4"]  # round robin over the visible devices
    assert shares[2].environment() == {
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
        "OPENBLAS_NUM_THREADS": "2",
        "CUDA_VISIBLE_DEVICES": "4",
    }
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    crowded = machine_shares(16)  # more workers than cores: one thread each, nobody pinned, no device
    assert {(share.threads, share.cores is None, share.device) for share in crowded} == {(1, True, None)}


@pytest.mark.unit
def test_worker_records_carry_the_stage_id_and_their_traceback() -> None:
    ours, theirs = multiprocessing.Pipe()
    handler = PipeHandler(theirs, threading.Lock())
    logger = logging.getLogger("tests.parallel.worker")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        handler.label = "int8_b"
        logger.warning("calibrating %d layers", 15)
        logger.warning("int8_b: already named")
        try:
            raise ValueError("the library gave up")
        except ValueError:
            logger.exception("quantizing failed")
    finally:
        logger.removeHandler(handler)
    received = [ours.recv() for _ in range(3)]
    assert [kind for kind, _ in received] == ["log"] * 3
    messages = [record.getMessage() for _, record in received]
    assert messages[0] == "[int8_b] calibrating 15 layers"
    assert messages[1] == "int8_b: already named"
    assert messages[2].startswith("[int8_b] quantizing failed\nTraceback (most recent call last)")
    assert "ValueError: the library gave up" in messages[2] and received[2][1].exc_info is None


@pytest.mark.unit
def test_jobs_below_one_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    path = write_branch_pipeline(tmp_path, tiny_model, BRANCHES)
    with pytest.raises(ConfigError, match="jobs must be at least 1, got 0"):
        ParallelRunner(load_pipeline(path), tmp_path / "run", jobs=0)
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run"), "--jobs", "0"])
    assert result.exit_code == 2 and "--jobs" in result.output
    assert not (tmp_path / "run").exists()
