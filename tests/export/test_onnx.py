"""export.onnx on a tiny model: the graph matches PyTorch, int8 shrinks it, external data loads back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

from slimline.artifacts import read_artifact
from slimline.config import load_pipeline
from slimline.errors import ConfigError
from slimline.evaluate.backends import open_backend
from slimline.export.decoder_graph import GROUPED_ATTENTION, GROUPED_FAMILIES, export_attention
from slimline.export.onnx import greedy_torch
from slimline.models import load_causal_lm
from slimline.runner import Runner
from tests.conftest import write_pipeline

pytestmark = pytest.mark.stage

STAGES = """\
  - id: onnx
    kind: export.onnx
  - id: onnx-int8
    kind: export.onnx
    from: input
    params: {quantize: dynamic}
  - id: onnx-static
    kind: export.onnx
    from: input
    params: {quantize: static, calibration_samples: 2, calibration_length: 32, check_prompts: 0}
  - id: onnx-external
    kind: export.onnx
    from: input
    params: {external_data: always, optimize: false, check_prompts: 0}
  - id: engine
    kind: export.tensorrt
    from: onnx
    allow_skip: true
"""


@pytest.fixture(scope="module")
def onnx_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("onnx")
    outcome = Runner(load_pipeline(write_pipeline(folder, tiny_model, STAGES)), folder / "run").run()
    return outcome, {result.stage_id: result for result in outcome.results}


def test_fp32_graph_matches_pytorch_logits_and_greedy_tokens(onnx_run, tiny_model: Path) -> None:
    _, results = onnx_run
    assert results["onnx"].status == "ran"
    artifact = read_artifact(results["onnx"].artifact.path)
    assert artifact.format == "onnx" and (artifact.path / "model.onnx").exists()
    checks = artifact.manifest["stage_metrics"]
    assert checks["max_abs_logit_difference"] < 1e-4
    assert checks["greedy_prompts_identical"] == checks["greedy_prompts"] == 4

    # independently of the stage's own check: the backend's cached decode equals PyTorch's greedy tokens
    model = load_causal_lm(tiny_model)
    backend = open_backend(artifact)
    generator = torch.Generator().manual_seed(1)
    for length in (5, 17, 40):
        prompt = torch.randint(1, model.config.vocab_size, (length,), generator=generator)
        tokens = [int(backend.prefill(prompt).argmax())]
        for _ in range(11):
            tokens.append(int(backend.decode(tokens[-1]).argmax()))
        assert tokens == greedy_torch(model, prompt, 12)
        with torch.inference_mode():
            expected = model(input_ids=prompt[None]).logits[0]
        assert torch.allclose(backend.logits(prompt), expected, atol=1e-4)
    backend.close()


def test_report_measures_the_graph_through_onnxruntime(onnx_run) -> None:
    _, results = onnx_run
    report = results["onnx"].report
    assert report["backend"] == "onnxruntime"
    accuracy = report["metrics"]["accuracy"]
    assert accuracy["kl_vs_input"] < 1e-6 and accuracy["top1_agreement_with_input"] == 1.0
    assert report["metrics"]["latency"]["decode_tokens_per_s"] > 0


def test_dynamic_int8_quantizes_the_matmuls_and_stays_close(onnx_run) -> None:
    _, results = onnx_run
    fp32, int8 = results["onnx"].artifact, results["onnx-int8"].artifact
    ops = {node.op_type for node in onnx.load(str(int8.path / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert (int8.path / "model.onnx").stat().st_size < 0.75 * (fp32.path / "model.onnx").stat().st_size
    perplexity = {stage: results[stage].report["metrics"]["accuracy"]["perplexity"] for stage in ("onnx", "onnx-int8")}
    assert abs(perplexity["onnx-int8"] / perplexity["onnx"] - 1) < 0.02


def test_static_int8_inserts_calibrated_quantize_nodes(onnx_run) -> None:
    _, results = onnx_run
    graph = onnx.load(str(results["onnx-static"].artifact.path / "model.onnx")).graph
    assert sum(node.op_type == "QuantizeLinear" for node in graph.node) > 0
    assert results["onnx-static"].report["metrics"]["accuracy"]["top1_agreement_with_input"] > 0.9


def test_external_data_is_written_beside_the_graph_and_loads_back(onnx_run) -> None:
    _, results = onnx_run
    folder = results["onnx-external"].artifact.path
    assert (folder / "model.onnx.data").stat().st_size > (folder / "model.onnx").stat().st_size
    assert "model.onnx.data" in read_artifact(folder).manifest["files"]
    external = open_backend(read_artifact(folder))
    inline = open_backend(results["onnx"].artifact)
    tokens = torch.arange(1, 30)
    assert np.allclose(external.logits(tokens), inline.logits(tokens), atol=1e-4)


def test_tensorrt_without_tensorrt_is_skipped_with_the_reason(onnx_run) -> None:
    outcome, results = onnx_run
    if results["engine"].status != "skipped":
        pytest.skip("TensorRT and CUDA are present here: tests/export/test_tensorrt.py covers the engine")
    assert outcome.ok
    reason = results["engine"].reason
    assert "tensorrt" in reason and "precision: fp16" in reason
    summary = json.loads((results["onnx"].artifact.path.parents[1] / "summary.json").read_text())
    row = next(row for row in summary["stages"] if row["stage"] == "engine")
    assert row["status"] == "skipped" and "tensorrt" in row["reason"]


def test_fp16_with_int8_is_refused_when_the_pipeline_loads(tiny_model: Path, tmp_path: Path) -> None:
    stages = "  - id: bad\n    kind: export.onnx\n    params: {precision: fp16, quantize: dynamic}\n"
    with pytest.raises(ConfigError) as caught:
        load_pipeline(write_pipeline(tmp_path, tiny_model, stages))
    assert "tiny.yaml:" in str(caught.value) and "int8 quantization applies to an fp32 graph" in str(caught.value)


GQA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.mark.unit
@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(num_key_value_heads=2, **GQA),
        MistralConfig(num_key_value_heads=1, sliding_window=6, **GQA),
        Qwen2Config(num_key_value_heads=2, **GQA),
        Phi3Config(num_key_value_heads=2, **GQA),
        GemmaConfig(num_key_value_heads=1, head_dim=32, **GQA),
    ],
    ids=lambda config: config.model_type,
)
def test_grouped_attention_computes_what_each_family_computes(config) -> None:
    """The attention graphs are traced with gives each family's own logits, ragged padding and sliding windows included."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.config.model_type in GROUPED_FAMILIES
    input_ids = torch.randint(0, config.vocab_size, (2, 12))
    attention_mask = torch.ones(2, 12, dtype=torch.int64)
    attention_mask[1, :3] = 0  # a left-padded row
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with export_attention(model):
            assert model.config._attn_implementation == GROUPED_ATTENTION
            grouped = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert model.config._attn_implementation != GROUPED_ATTENTION  # restored after the block
    real = attention_mask.bool()
    assert torch.allclose(grouped[real], expected[real], atol=1e-5)
