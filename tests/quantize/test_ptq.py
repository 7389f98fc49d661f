"""torch.ao int8 PTQ: int8 values in the artifact, exact rebuild on load, closeness to fp32, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from slimline.config import load_pipeline
from slimline.errors import ConfigError
from slimline.models import load_causal_lm
from slimline.quantize import int8
from slimline.runner import Runner
from tests.conftest import write_pipeline

PTQ_STAGES = """\
  - id: dynamic
    kind: quantize.ptq
    params: {mode: dynamic}
  - id: static
    kind: quantize.ptq
    from: input
    params: {mode: static, observer: minmax, calibration_samples: 4, calibration_length: 64}
  - id: static-tensor
    kind: quantize.ptq
    from: input
    params:
      mode: static
      weight_granularity: per_tensor
      weight_symmetric: false
      activation_symmetric: true
      observer: histogram
      include_lm_head: false
      calibration_samples: 4
      calibration_length: 64
"""


@pytest.fixture(scope="module")
def ptq_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ptq")
    outcome = Runner(load_pipeline(write_pipeline(folder, tiny_model, PTQ_STAGES)), folder / "run").run()
    assert outcome.ok, [r.reason for r in outcome.results]
    return folder / "run"


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.unit
@pytest.mark.parametrize(
    ("granularity", "symmetric"), [("per_channel", True), ("per_channel", False), ("per_tensor", True)]
)
def test_dynamic_int8_weights_are_rounded_int8(granularity: str, symmetric: bool) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6))
    W = model[0].weight.detach().clone()  # [6, 8]
    int8.quantize_dynamic_layers(model, ["0"], int8.dynamic_qconfig(granularity, symmetric))
    tensors = int8.layer_tensors("0", model[0])
    q, scale, zero = tensors["0.qweight"], tensors["0.weight_scale"], tensors["0.weight_zero_point"]
    assert q.dtype == torch.int8 and q.shape == (6, 8)
    assert scale.numel() == (6 if granularity == "per_channel" else 1)
    if symmetric:
        assert (zero == 0).all()
    dequantized = (q.double() - zero[:, None]) * scale[:, None] if scale.numel() == 6 else (q.double() - zero) * scale
    assert (dequantized - W).abs().max() <= scale.max() / 2 + 1e-6  # within half a step of the float weight


@pytest.mark.stage
@pytest.mark.parametrize("stage", ["dynamic", "static", "static-tensor"])
def test_artifact_stores_int8_and_reloads_exactly(ptq_run: Path, tiny_model: Path, stage: str) -> None:
    folder = ptq_run / "stages" / stage
    manifest = json.loads((folder / "artifact.json").read_text())
    assert manifest["format"] == "torch-int8"
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("model.layers.0.mlp.up_proj.qweight").dtype == torch.int8
        assert "model.layers.0.mlp.up_proj.weight" not in weights.keys()
    ids = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(1))
    first, second = load_causal_lm(folder), load_causal_lm(folder)
    torch.testing.assert_close(logits(first, ids), logits(second, ids), rtol=0, atol=0)  # deterministic rebuild
    reference = logits(load_causal_lm(tiny_model), ids)
    error = (logits(first, ids) - reference).abs().max().item()
    assert 0 < error < 0.1 * reference.abs().max().item()


@pytest.mark.stage
def test_int8_artifact_is_smaller_and_evaluated_through_pytorch(ptq_run: Path) -> None:
    input_size = json.loads((ptq_run / "input" / "report.json").read_text())["metrics"]["size_mb"]
    report = json.loads((ptq_run / "stages" / "dynamic" / "report.json").read_text())
    assert report["backend"] == "pytorch" and report["metrics"]["size_mb"] < input_size
    assert report["metrics"]["accuracy"]["top1_agreement_with_input"] > 0.8


@pytest.mark.stage
def test_static_modules_hold_calibrated_activation_ranges(ptq_run: Path) -> None:
    model = load_causal_lm(ptq_run / "stages" / "static")
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, int8.StaticInt8Linear) and float(layer.quant.scale) > 0
    assert isinstance(model.lm_head, int8.StaticInt8Linear)
    unquantized_head = load_causal_lm(ptq_run / "stages" / "static-tensor").lm_head
    assert isinstance(unquantized_head, torch.nn.Linear)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("{mode: static_int4}", "mode"),
        ("{mode: dynamic, observer: histogram}", "static"),  # calibration settings with dynamic
        ("{observer: entropy, mode: static}", "observer"),  # not a torch.ao observer
        ("{mode: static, calibration_length: 4096}", "context"),
        ("{weight_granularity: per_group}", "weight_granularity"),
    ],
)
def test_bad_params_are_refused_at_validation(tiny_model: Path, tmp_path: Path, params: str, message: str) -> None:
    stages = f"  - id: q\n    kind: quantize.ptq\n    params: {params}\n"
    with pytest.raises(ConfigError, match=message):
        load_pipeline(write_pipeline(tmp_path, tiny_model, stages))
