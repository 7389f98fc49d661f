"""bitsandbytes int8 and NF4/FP4: quantized tensors in the artifact, reload through transformers, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from slimline.config import load_pipeline
from slimline.errors import ConfigError
from slimline.models import load_causal_lm
from slimline.runner import Runner
from tests.conftest import write_pipeline

bnb = pytest.importorskip("bitsandbytes")

BNB_STAGES = """\
  - id: int8
    kind: quantize.bnb
    params: {mode: int8}
  - id: nf4
    kind: quantize.bnb
    from: input
    params: {mode: nf4, double_quant: true}
  - id: fp4
    kind: quantize.bnb
    from: input
    params: {mode: fp4, double_quant: false}
"""


@pytest.fixture(scope="module")
def bnb_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bnb")
    outcome = Runner(load_pipeline(write_pipeline(folder, tiny_model, BNB_STAGES)), folder / "run").run()
    assert outcome.ok, [r.reason for r in outcome.results]
    return folder / "run"


@pytest.mark.stage
@pytest.mark.parametrize(
    ("stage", "dtype", "layer_type"),
    [("int8", torch.int8, "Linear8bitLt"), ("nf4", torch.uint8, "Linear4bit"), ("fp4", torch.uint8, "Linear4bit")],
)
def test_quantized_checkpoint_reloads_close_to_full_precision(
    bnb_run: Path, tiny_model: Path, stage: str, dtype: torch.dtype, layer_type: str
) -> None:
    folder = bnb_run / "stages" / stage
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes"
    with safe_open(folder / "model.safetensors", "pt") as weights:
        stored = weights.get_tensor("model.layers.0.mlp.up_proj.weight")  # [128, 64] in full precision
    assert stored.dtype == dtype
    assert stored.numel() == (128 * 64 if stage == "int8" else 128 * 64 // 2)  # 4-bit: two weights per byte
    model = load_causal_lm(folder)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == layer_type
    ids = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = load_causal_lm(tiny_model)(input_ids=ids).logits, model(input_ids=ids).logits
    error = (got - want).abs().max().item()
    assert 0 < error < 0.3 * want.abs().max().item()


@pytest.mark.stage
def test_double_quantization_stores_nested_scales(bnb_run: Path) -> None:
    def keys(stage: str) -> list[str]:
        with safe_open(bnb_run / "stages" / stage / "model.safetensors", "pt") as weights:
            return list(weights.keys())

    assert any("nested_absmax" in k for k in keys("nf4"))
    assert not any("nested_absmax" in k for k in keys("fp4"))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("{mode: int4}", "mode"),
        ("{mode: int8, double_quant: true}", "double_quant"),
        ("{mode: nf4, int8_threshold: 4.0}", "int8_threshold"),
        ("{mode: int8, int8_threshold: 0}", "int8_threshold"),
    ],
)
def test_bad_params_are_refused_at_validation(tiny_model: Path, tmp_path: Path, params: str, message: str) -> None:
    stages = f"  - id: q\n    kind: quantize.bnb\n    params: {params}\n"
    with pytest.raises(ConfigError, match=message):
        load_pipeline(write_pipeline(tmp_path, tiny_model, stages))
