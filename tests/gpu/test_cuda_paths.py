"""The CUDA paths: training stages, evaluation, the runtime and the speculative server on a GPU.

Marked ``gpu`` and skipped where no CUDA device is visible (every CI machine of this project);
``benchmarks/gpu_check.py`` runs them on a GPU machine with the figures it records. They use
only what such a machine has besides slimline (PyTorch with CUDA, transformers, peft), so the
HTTP checks speak plain urllib, not the openai client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimline.config import load_pipeline
from slimline.runner import Runner
from tests.conftest import build_tiny_model, write_pipeline

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU and none is visible (benchmarks/gpu_check.py runs these on a GPU machine)",
    ),
]

LR = 1e-4
STEPS = 4
TRAIN = f"steps: {STEPS}, batch_size: 2, sequence_length: 32, learning_rate: {LR}, warmup_steps: 0"


def run(tmp_path: Path, model: Path, stages: str, evaluate_device: str = "auto") -> Path:
    """Run a pipeline of ``stages`` over ``model``; return its stages folder (every stage must succeed)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    pipeline = write_pipeline(tmp_path, model, stages)
    text = pipeline.read_text().replace("evaluate:\n", f"evaluate:\n  device: {evaluate_device}\n", 1)
    pipeline.write_text(text)
    outcome = Runner(load_pipeline(pipeline), tmp_path / "run").run()
    assert outcome.ok, [(r.stage_id, r.status, r.reason) for r in outcome.results]
    return tmp_path / "run" / "stages"


def report(stages: Path, stage_id: str) -> dict:
    return json.loads((stages / stage_id / "report.json").read_text())


def max_weight_difference(a: Path, b: Path) -> float:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    return max((first[name].float() - second[name].float()).abs().max().item() for name in first)


def test_lora_on_cuda_trains_to_the_cpu_weights(tiny_model: Path, tmp_path: Path) -> None:
    """fp32 on both devices: the merged weights differ by rounding, far below one Adam step (about lr)."""
    params = f"{{rank: 4, {TRAIN}, precision: fp32, dropout: 0.0}}"
    stages = run(
        tmp_path,
        tiny_model,
        f"""\
  - id: on-gpu
    kind: lora
    device: cuda
    params: {params}
  - id: on-cpu
    kind: lora
    from: input
    device: cpu
    params: {params}
""",
    )
    gpu, cpu = report(stages, "on-gpu"), report(stages, "on-cpu")
    assert gpu["stage_metrics"]["device"].startswith("cuda:0 (")
    assert cpu["stage_metrics"]["device"] == "cpu"
    difference = max_weight_difference(stages / "on-gpu", stages / "on-cpu")
    assert difference < LR, difference
    assert abs(gpu["stage_metrics"]["final_loss"] - cpu["stage_metrics"]["final_loss"]) < 1e-3


def test_distill_on_cuda_trains_in_bf16_where_asked_and_auto_keeps_fp32_for_a_tiny_step(
    tiny_model: Path, tmp_path: Path
) -> None:
    student = "student: {layers: 1}, steps: 30, batch_size: 4, sequence_length: 32, learning_rate: 1.0e-3"
    stages = run(
        tmp_path,
        tiny_model,
        f"""\
  - id: bf16
    kind: distill
    params: {{{student}, precision: bf16}}
    check: {{enabled: false}}
  - id: auto
    kind: distill
    from: input
    params: {{{student}}}
    check: {{enabled: false}}
""",
    )
    bf16 = report(stages, "bf16")["stage_metrics"]
    assert bf16["device"].startswith("cuda:0") and bf16["precision"]["chosen"] == "bf16"
    curve = bf16["loss_curve"]
    assert all(value == value for value in curve)  # no NaN
    assert sum(curve[-5:]) < sum(curve[:5])  # falling
    assert 0 <= bf16["top1_agreement_with_teacher"] <= 1
    auto = report(stages, "auto")["stage_metrics"]["precision"]  # a 0.3M-parameter model x 128 tokens
    assert auto["chosen"] == "fp32" and "bound by kernel launches" in auto["reason"]


def test_structured_recovery_and_qat_train_on_cuda(tiny_model: Path, tmp_path: Path) -> None:
    qat = ""
    try:
        import torchao  # noqa: F401

        qat = f"""\
  - id: qat
    kind: quantize.qat
    from: input
    params: {{{TRAIN}}}
    check: {{enabled: false}}
"""
    except ImportError:  # a GPU machine without torchao: the recovery alone
        pass
    stages = run(
        tmp_path,
        tiny_model,
        f"""\
  - id: pruned
    kind: prune.structured
    params: {{ffn_fraction: 0.5, round_to: 8, recovery: {{{TRAIN}}}}}
    check: {{enabled: false}}
{qat}""",
    )
    assert report(stages, "pruned")["stage_metrics"]["device"].startswith("cuda:0")
    assert len(report(stages, "pruned")["stage_metrics"]["recovery_loss_curve"]) == STEPS
    if qat:
        metrics = report(stages, "qat")["stage_metrics"]
        assert metrics["device"].startswith("cuda:0") and len(metrics["loss_curve"]) == STEPS
        assert report(stages, "qat")["metrics"]["device"] == "cpu"  # torch.ao int8 kernels run on the CPU


def test_evaluation_on_cuda_matches_the_cpu_yardstick(tiny_model: Path, tmp_path: Path) -> None:
    stage = "  - id: pruned\n    kind: prune.magnitude\n    params: {sparsity: 0.3}\n"
    on_gpu = report(run(tmp_path / "gpu", tiny_model, stage, evaluate_device="cuda"), "pruned")
    on_cpu = report(run(tmp_path / "cpu", tiny_model, stage, evaluate_device="cpu"), "pruned")
    assert on_gpu["metrics"]["device"].startswith("cuda:0") and on_cpu["metrics"]["device"] == "cpu"
    for name in ("perplexity", "kl_vs_input", "top1_accuracy"):
        gpu, cpu = on_gpu["metrics"]["accuracy"][name], on_cpu["metrics"]["accuracy"][name]
        assert abs(gpu - cpu) <= 1e-4 * max(1.0, abs(cpu)), (name, gpu, cpu)
    assert on_gpu["metrics"]["latency"]["gpu_peak_memory_mb"] > 0


def test_a_ragged_batch_on_cuda_equals_its_rows_alone(tiny_model: Path) -> None:
    from slimline.runtime import Feed, open_model

    model = open_model(tiny_model, device="cuda:0")
    assert model.device == "cuda:0" and next(model.model.parameters()).is_cuda
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    alone = [model.logits(torch.tensor(prompt)) for prompt in prompts]
    sequences = [model.new_sequence() for _ in prompts]
    model.forward([Feed(s, p[:1]) for s, p in zip(sequences, prompts, strict=True)])
    batched = model.forward([Feed(s, p[1:]) for s, p in zip(sequences, prompts, strict=True)])
    for logits, reference in zip(batched, alone, strict=True):
        assert logits.device.type == "cpu"
        assert (logits - reference[1:]).abs().max().item() < 1e-4
    half = open_model(tiny_model, device="cuda:0", dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.logits(torch.tensor(prompts[0])).dtype == torch.float32


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pair")
    return build_tiny_model(folder / "target", layers=2, seed=0), build_tiny_model(folder / "draft", layers=1, seed=1)


def post_json(url: str, body: dict) -> dict:
    """POST ``body`` as JSON; the JSON answer (urllib raises on a 4xx/5xx)."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def greedy_texts(engine, prompts: list[str]) -> list[str]:
    """Greedy completions of ``prompts`` over real HTTP, four at a time."""
    from slimline.serve.app import create_app
    from tests.serve.server_helpers import RunningServer

    server = RunningServer(create_app(engine, "tiny", api_key=None, shutdown_grace_seconds=2))
    try:
        from concurrent.futures import ThreadPoolExecutor

        def complete(prompt: str) -> str:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0}
            return post_json(f"{server.url}/v1/completions", body)["choices"][0]["text"]

        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(complete, prompts))
    finally:
        server.stop()


def test_the_speculative_server_on_cuda_gives_the_target_greedy_text(pair: tuple[Path, Path]) -> None:
    from slimline.serve.bundle import ServeBundle
    from slimline.serve.server import build_engine

    target, draft = pair
    prompts = [f"def f{i}(x):\n    return x * {i}" for i in range(8)]
    plain = build_engine(ServeBundle(target), max_active=4, device="cuda:0", dtype="float32")
    speculative = build_engine(
        ServeBundle(target, draft, k=3, adaptive=False), max_active=4, device="cuda:0", dtype="float32"
    )
    assert speculative.target.device == "cuda:0" and speculative.draft.device == "cuda:0"
    assert greedy_texts(speculative, prompts) == greedy_texts(plain, prompts)


def test_slimline_serve_with_device_cuda_answers_over_http(pair: tuple[Path, Path]) -> None:
    from tests.serve.server_helpers import free_port

    target, draft = pair
    port = free_port()
    command = [sys.executable, "-m", "slimline.cli", "serve", str(target), "--draft", str(draft), "--port", str(port)]
    server = subprocess.Popen([*command, "--device", "cuda"], env=os.environ | {"HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "slimline serve exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:  # not listening yet
                pass
            assert time.monotonic() < deadline, "slimline serve did not start"
            time.sleep(0.5)
        body = {"model": target.name, "prompt": "def main(", "max_tokens": 8, "temperature": 0}
        assert post_json(f"http://127.0.0.1:{port}/v1/completions", body)["usage"]["completion_tokens"] > 0
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_launched_stage_trains_on_cuda_over_nccl(tiny_model: Path, tmp_path: Path) -> None:
    stages = run(
        tmp_path,
        tiny_model,
        f"""\
  - id: launched
    kind: lora
    launch: {{nproc_per_node: 1}}
    params: {{rank: 4, {TRAIN}, precision: fp32, dropout: 0.0}}
""",
    )
    distributed = report(stages, "launched")["stage_metrics"]["distributed"]
    assert distributed["backend"] == "nccl" and distributed["devices"][0].endswith("cuda:0")
