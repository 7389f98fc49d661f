"""GPU paths of the export stages: a TensorRT FP16 engine and ONNX Runtime's CUDA provider in FP16.

They run where TensorRT/onnxruntime-gpu and a CUDA device exist and are skipped with the reason
elsewhere (the CPU-only skip of the stage itself is covered in test_onnx.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from slimline.config import load_pipeline
from slimline.evaluate.backends import open_backend
from slimline.export.onnx import greedy_torch
from slimline.models import load_causal_lm
from slimline.runner import Runner
from tests.conftest import write_pipeline

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
needs_tensorrt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installed (pip install tensorrt)"
)


def ort_has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def greedy_agreement(backend, model, prompts: list[torch.Tensor], new_tokens: int = 12) -> float:
    """Fraction of prompts whose greedy continuation equals PyTorch's."""
    same = 0
    for prompt in prompts:
        tokens = [int(backend.prefill(prompt).argmax())]
        for _ in range(new_tokens - 1):
            tokens.append(int(backend.decode(tokens[-1]).argmax()))
        same += tokens == greedy_torch(model, prompt, new_tokens)
    return same / len(prompts)


def prompts(vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(1, vocab, (length,), generator=generator) for length in (6, 20, 48)]


@needs_cuda
@needs_tensorrt
def test_tensorrt_fp16_engine_matches_pytorch(tiny_model: Path, tmp_path: Path) -> None:
    stages = "  - id: onnx\n    kind: export.onnx\n  - id: engine\n    kind: export.tensorrt\n    params: {max_sequence: 128}\n"
    outcome = Runner(load_pipeline(write_pipeline(tmp_path, tiny_model, stages)), tmp_path / "run").run()
    engine = next(r for r in outcome.results if r.stage_id == "engine")
    assert engine.status == "ran", engine.reason
    binding = engine.artifact.manifest["stage_metrics"]
    assert binding["gpu"] == torch.cuda.get_device_name() and binding["tensorrt"]
    model = load_causal_lm(tiny_model)
    backend = open_backend(engine.artifact)
    tokens = torch.arange(1, 40)
    with torch.inference_mode():
        expected = model(input_ids=tokens[None]).logits[0]
    assert (backend.logits(tokens) - expected).abs().max() < 0.05  # FP16 kernels
    assert greedy_agreement(backend, model, prompts(model.config.vocab_size)) >= 2 / 3
    assert engine.report["backend"] == "tensorrt"


@needs_cuda
def test_onnxruntime_cuda_fp16_is_the_gpu_path_without_tensorrt(tiny_model: Path, tmp_path: Path) -> None:
    if not ort_has_cuda():
        pytest.skip("onnxruntime has no CUDA provider here (pip install onnxruntime-gpu)")
    stages = "  - id: onnx-fp16\n    kind: export.onnx\n    params: {precision: fp16}\n"
    outcome = Runner(load_pipeline(write_pipeline(tmp_path, tiny_model, stages)), tmp_path / "run").run()
    result = outcome.results[-1]
    assert result.status == "ran", result.reason
    assert result.artifact.manifest["stage_metrics"]["providers"].startswith("CUDAExecutionProvider")
    model = load_causal_lm(tiny_model)
    backend = open_backend(result.artifact)
    assert backend.model.providers[0] == "CUDAExecutionProvider"
    assert greedy_agreement(backend, model, prompts(model.config.vocab_size)) >= 2 / 3
