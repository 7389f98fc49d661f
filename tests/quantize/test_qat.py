"""torchao QAT: fake-quantized training, converted to the same int8 artifact PTQ writes."""

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

pytest.importorskip("torchao")

QAT_STAGES = """\
  - id: qat
    kind: quantize.qat
    params: {weight_bits: 4, steps: 3, batch_size: 2, sequence_length: 32, warmup_steps: 1}
  - id: ptq
    kind: quantize.ptq
    from: input
    params: {mode: dynamic, weight_bits: 4}
"""


@pytest.fixture(scope="module")
def qat_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qat")
    outcome = Runner(load_pipeline(write_pipeline(folder, tiny_model, QAT_STAGES)), folder / "run").run()
    assert outcome.ok, [r.reason for r in outcome.results]
    return folder / "run"


@pytest.mark.stage
@pytest.mark.parametrize("stage", ["qat", "ptq"])
def test_int4_weights_sit_on_the_int4_grid_and_reload(qat_run: Path, tiny_model: Path, stage: str) -> None:
    folder = qat_run / "stages" / stage
    assert json.loads((folder / "artifact.json").read_text())["format"] == "torch-int8"
    with safe_open(folder / "model.safetensors", "pt") as weights:
        q = weights.get_tensor("model.layers.1.mlp.down_proj.qweight")
    assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7 and q.unique().numel() > 8
    model = load_causal_lm(folder)
    assert isinstance(model.model.layers[1].mlp.down_proj, int8.PerTokenInt8Linear)
    ids = torch.randint(0, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.stage
def test_training_ran_with_fake_quantization(qat_run: Path) -> None:
    report = json.loads((qat_run / "stages" / "qat" / "report.json").read_text())
    assert len(report["stage_metrics"]["loss_curve"]) == 3
    assert report["stage_metrics"]["weight_bits"] == 4


@pytest.mark.unit
def test_prepare_fake_quantizes_and_convert_restores_linears() -> None:
    from slimline.quantize import qat

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6))
    params = qat.Params(weight_bits=4)
    qat.prepare(model, ["0"], params)
    assert type(model[0]).__name__ == "FakeQuantizedLinear"
    x = torch.randn(2, 8)
    fake = model(x)
    W = model[0].weight.detach()
    scale = W.abs().amax(dim=1, keepdim=True) / 7.5
    assert not torch.allclose(fake, torch.nn.functional.linear(x, W, model[0].bias))  # really rounded
    qat.convert(model)
    assert type(model[0]) is torch.nn.Linear and torch.equal(model[0].weight, W)
    assert scale.min() > 0
    int8.quantize_dynamic_layers(model, ["0"], int8.dynamic_qconfig("per_channel", True, 4))
    assert int8.layer_tensors("0", model[0])["0.qweight"].abs().max() <= 8


@pytest.mark.unit
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("{weight_bits: 2}", "weight_bits"),
        ("{sequence_length: 4096}", "context"),
        ("{steps: 0}", "steps"),
    ],
)
def test_bad_params_are_refused_at_validation(tiny_model: Path, tmp_path: Path, params: str, message: str) -> None:
    stages = f"  - id: q\n    kind: quantize.qat\n    params: {params}\n"
    with pytest.raises(ConfigError, match=message):
        load_pipeline(write_pipeline(tmp_path, tiny_model, stages))
