"""The PyTorch runtime's parameter count: quantized layers count their logical weights, as the float model does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimline.config import load_pipeline
from slimline.models import load_causal_lm
from slimline.quantize import int8
from slimline.runner import Runner
from slimline.runtime.torch_model import TorchModel, logical_parameter_count
from tests.conftest import write_pipeline

QUANTIZED_STAGES = """\
  - id: dynamic
    kind: quantize.ptq
    params: {mode: dynamic}
  - id: static
    kind: quantize.ptq
    from: input
    params: {mode: static, observer: minmax, include_lm_head: false, calibration_samples: 2, calibration_length: 32}
"""
RTN_STAGE = """\
  - id: rtn
    kind: quantize.gptq
    params: {method: rtn, bits: 4, group_size: 32}
"""


def float_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.unit
def test_int8_linear_counts_its_packed_weight_and_bias() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4, bias=False))
    expected = float_count(model)
    int8.quantize_dynamic_layers(model, ["0", "2"], int8.dynamic_qconfig("per_channel", True))
    assert float_count(model) == 0, "torch.ao's packed weights are not parameters"
    assert logical_parameter_count(model) == expected == 8 * 6 + 6 + 6 * 4


@pytest.mark.unit
def test_tied_lm_head_quantized_to_int8_is_counted_once(tiny_model: Path) -> None:
    model = load_causal_lm(tiny_model)
    expected = float_count(model)
    assert logical_parameter_count(model) == expected
    int8.quantize_dynamic_layers(
        model, int8.quantizable_linears(model, True), int8.dynamic_qconfig("per_channel", True)
    )
    assert float_count(model) < expected / 2
    assert logical_parameter_count(model) == expected


@pytest.mark.stage
def test_ptq_artifacts_report_the_float_models_parameter_count(tiny_model: Path, tmp_path: Path) -> None:
    outcome = Runner(load_pipeline(write_pipeline(tmp_path, tiny_model, QUANTIZED_STAGES)), tmp_path / "run").run()
    assert outcome.ok, [r.reason for r in outcome.results]
    expected = float_count(load_causal_lm(tiny_model))
    for stage in ("input", "dynamic", "static"):
        report = json.loads(
            (tmp_path / "run" / ("input" if stage == "input" else f"stages/{stage}") / "report.json").read_text()
        )
        assert report["metrics"]["parameters"] == expected, stage
    backend = TorchModel(tmp_path / "run" / "stages" / "static")
    assert backend.parameter_count() == expected


@pytest.mark.stage
def test_gptq_packed_qweight_counts_as_in_times_out(tiny_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("gptqmodel")
    outcome = Runner(load_pipeline(write_pipeline(tmp_path, tiny_model, RTN_STAGE)), tmp_path / "run").run()
    assert outcome.ok, [r.reason for r in outcome.results]
    quantized = load_causal_lm(tmp_path / "run" / "stages" / "rtn")
    assert float_count(quantized) < float_count(load_causal_lm(tiny_model))
    assert logical_parameter_count(quantized) == float_count(load_causal_lm(tiny_model))
