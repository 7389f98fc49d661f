"""Where work runs: per-stage ``device:``, evaluation's device, and ``slimline serve --device``, on a CPU machine.

The CUDA side of each is in tests/gpu (marked ``gpu``); these check the choices and the refusals
that a machine without a GPU must make, before any work starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimline.config import load_pipeline
from slimline.devices import device_problem, float32_weight_bytes, inference_dtype, resolve_device
from slimline.errors import ConfigError, PreflightError
from slimline.runner import Runner
from tests.conftest import write_pipeline

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("requested", "runs_on", "expected"),
    [
        ("cpu", "any", "cpu"),
        ("cuda", "cpu", "cpu"),  # CPU-only kinds stay there (validation refuses an explicit request)
        ("auto", "cpu", "cpu"),
        ("cuda", "any", "cuda:0"),
        ("cuda:1", "any", "cuda:1"),
        ("auto", "cuda", "cuda:0"),  # TensorRT: a GPU or nothing
    ],
)
def test_a_request_resolves_by_what_the_work_can_run_on(requested: str, runs_on: str, expected: str) -> None:
    assert resolve_device(requested, runs_on) == expected


@pytest.mark.unit
@needs_no_gpu
def test_auto_is_the_cpu_here_and_cuda_is_refused_with_the_reason() -> None:
    assert resolve_device("auto", "any") == "cpu"
    assert device_problem("cpu") is None
    assert "no CUDA GPU is visible" in device_problem("cuda:0")
    assert inference_dtype("auto", "cpu", 10**12) == torch.float32
    assert inference_dtype("bfloat16", "cpu") == torch.bfloat16


@pytest.mark.unit
def test_float32_weight_bytes_reads_the_stored_dtype(tiny_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    stored = sum(file.stat().st_size for file in tiny_model.glob("*.safetensors"))
    assert float32_weight_bytes(tiny_model) == stored  # saved in float32
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text('{"dtype": "bfloat16"}')
    save_file({"w": torch.zeros(1000, dtype=torch.bfloat16)}, half / "model.safetensors")
    assert float32_weight_bytes(half) == (half / "model.safetensors").stat().st_size * 2
    assert float32_weight_bytes(tmp_path) is None


@pytest.mark.unit
def test_a_bad_device_names_the_file_line_and_field(tiny_model: Path, tmp_path: Path) -> None:
    def problem(stages: str) -> str:
        with pytest.raises(ConfigError) as caught:
            load_pipeline(write_pipeline(tmp_path, tiny_model, stages))
        return str(caught.value)

    unknown = problem("  - id: tuned\n    kind: lora\n    device: gpu\n")
    assert "tiny.yaml:9: stages[0].device:" in unknown and "expected auto" in unknown and "(got 'gpu')" in unknown
    cpu_only = problem("  - id: int8\n    kind: quantize.ptq\n    device: cuda\n")
    assert "tiny.yaml:9: stages[0].device: quantize.ptq runs on the CPU only" in cpu_only


@pytest.mark.stage
@needs_no_gpu
def test_a_stage_that_asks_for_cuda_is_refused_before_any_work(tiny_model: Path, tmp_path: Path) -> None:
    stages = "  - id: tuned\n    kind: lora\n    device: cuda\n    params: {steps: 1}\n"
    with pytest.raises(PreflightError) as caught:
        Runner(load_pipeline(write_pipeline(tmp_path, tiny_model, stages)), tmp_path / "run").run()
    assert "stage 'tuned' (lora)" in str(caught.value) and "no CUDA GPU is visible" in str(caught.value)
    assert not (tmp_path / "run" / "stages").exists()


@pytest.mark.stage
@needs_no_gpu
def test_allow_skip_skips_a_cuda_stage_and_the_others_run_on_the_cpu(tiny_model: Path, tmp_path: Path) -> None:
    stages = """\
  - id: tuned
    kind: lora
    device: cuda
    allow_skip: true
    params: {steps: 1}
  - id: pruned
    kind: prune.magnitude
    from: input
"""
    outcome = Runner(load_pipeline(write_pipeline(tmp_path, tiny_model, stages)), tmp_path / "run").run()
    results = {result.stage_id: result for result in outcome.results}
    assert outcome.ok and results["tuned"].status == "skipped"
    assert "no CUDA GPU is visible" in results["tuned"].reason
    assert results["pruned"].status == "ran"
    assert results["pruned"].artifact.manifest["stage_metrics"]["device"] == "cpu"
    assert results["pruned"].report["metrics"]["device"] == "cpu"  # evaluation: auto is the CPU here


@pytest.mark.e2e
@needs_no_gpu
def test_slimline_serve_refuses_a_device_it_does_not_have(tiny_model: Path) -> None:
    def serve(*options: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "slimline.cli", "serve", str(tiny_model), *options]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    unknown = serve("--device", "gpu")
    assert unknown.returncode == 2 and "expected auto" in unknown.stderr and "Traceback" not in unknown.stderr
    missing = serve("--device", "cuda")
    assert missing.returncode == 2 and "no CUDA GPU is visible" in missing.stderr + missing.stdout
    assert "Traceback" not in missing.stderr


@pytest.mark.unit
def test_serving_memory_counts_float32_weights_and_both_caches(tiny_model: Path) -> None:
    from transformers import AutoConfig

    from slimline.memory import serving_memory

    estimate = serving_memory([tiny_model, tiny_model], max_active=4, context=256)
    stored = sum(file.stat().st_size for file in tiny_model.glob("*.safetensors"))
    assert estimate.weights == 2 * stored  # two float32 checkpoints
    config = AutoConfig.from_pretrained(tiny_model)
    head_dim = config.hidden_size // config.num_attention_heads
    per_model = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # keys and values, fp32
    assert estimate.cache_per_token == 2 * per_model
    assert estimate.one_request() == 2 * stored + 2 * per_model * 256
    assert estimate.all_requests() == 2 * stored + 2 * per_model * 256 * 4


@pytest.mark.e2e
def test_slimline_serve_refuses_a_pair_that_cannot_fit_before_loading(tiny_model: Path) -> None:
    command = [sys.executable, "-m", "slimline.cli", "serve", str(tiny_model), "--device", "cpu"]
    env = {**os.environ, "SLIMLINE_MEMORY_BYTES": "100000", "HF_HUB_OFFLINE": "1"}
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    output = refused.stderr + refused.stdout
    assert refused.returncode == 2 and "Traceback" not in output
    assert "serving needs about" in output and "one 256-token request" in output and "0.00 GB is available" in output
