"""GPTQ and round-to-nearest through gptqmodel on a tiny model: packed weights, reload, closeness, refusals."""

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

pytest.importorskip("gptqmodel")

GPTQ_STAGES = """\
  - id: gptq
    kind: quantize.gptq
    params: {bits: 4, group_size: 32, calibration_samples: 8, calibration_length: 64}
  - id: rtn
    kind: quantize.gptq
    from: input
    params: {method: rtn, bits: 4, group_size: 32}
"""


@pytest.fixture(scope="module")
def gptq_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gptq")
    outcome = Runner(load_pipeline(write_pipeline(folder, tiny_model, GPTQ_STAGES)), folder / "run").run()
    assert outcome.ok, [r.reason for r in outcome.results]
    return folder / "run"


@pytest.mark.stage
@pytest.mark.parametrize("stage", ["gptq", "rtn"])
def test_weights_are_packed_4bit_groups(gptq_run: Path, tiny_model: Path, stage: str) -> None:
    folder = gptq_run / "stages" / stage
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"]) == ("gptq", 4, 32)
    with safe_open(folder / "model.safetensors", "pt") as weights:
        qweight = weights.get_tensor("model.layers.0.mlp.down_proj.qweight")  # in 128, out 64
        scales = weights.get_tensor("model.layers.0.mlp.down_proj.scales")
        assert "model.layers.0.mlp.down_proj.weight" not in weights.keys()
    assert qweight.dtype == torch.int32 and qweight.shape == (128 * 4 // 32, 64)  # 8 nibbles per int32
    assert scales.shape == (128 // 32, 64)  # one scale per group of 32 inputs per output


@pytest.mark.stage
@pytest.mark.parametrize("stage", ["gptq", "rtn"])
def test_quantized_checkpoint_reloads_close_to_full_precision(gptq_run: Path, tiny_model: Path, stage: str) -> None:
    reference = load_causal_lm(tiny_model)
    quantized = load_causal_lm(gptq_run / "stages" / stage)
    ids = torch.randint(0, reference.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = reference(input_ids=ids).logits, quantized(input_ids=ids).logits
    error = (got - want).abs().max().item()
    assert 0 < error < 0.5 * want.abs().max().item()  # changed (really quantized), yet close


@pytest.mark.stage
def test_tokenizer_and_generation_defaults_are_the_parents(gptq_run: Path, tiny_model: Path) -> None:
    folder = gptq_run / "stages" / "gptq"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / name).read_bytes() == (tiny_model / name).read_bytes(), name


@pytest.mark.stage
def test_reports_measure_both_on_the_same_yardstick(gptq_run: Path) -> None:
    reports = {s: json.loads((gptq_run / "stages" / s / "report.json").read_text()) for s in ("gptq", "rtn")}
    gptq, rtn = (reports[s]["stage_metrics"]["mean_layer_loss"] for s in ("gptq", "rtn"))
    assert 0 < gptq < rtn  # GPTQ's error correction lowers every layer's output error on average
    for report in reports.values():
        assert report["backend"] == "pytorch" and report["metrics"]["accuracy"]["kl_vs_input"] > 0


@pytest.mark.unit
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("{bits: 5}", "bits"),  # gptq: 3 or 4 bits only
        ("{bits: 8}", "bits"),
        ("{group_size: 48}", "group_size"),  # not one of 32/64/128/256
        ("{group_size: 256}", "does not divide"),  # tiny model widths are 64 and 128
        ("{method: rtn, act_order: true}", "act_order"),
        ("{calibration_length: 1024}", "context"),
        ("{method: awq}", "method"),
    ],
)
def test_bad_params_are_refused_at_validation(tiny_model: Path, tmp_path: Path, params: str, message: str) -> None:
    stages = f"  - id: q\n    kind: quantize.gptq\n    params: {params}\n"
    with pytest.raises(ConfigError, match=message):
        load_pipeline(write_pipeline(tmp_path, tiny_model, stages))


@pytest.mark.unit
def test_quantizing_a_quantized_model_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    stages = GPTQ_STAGES + "  - id: twice\n    kind: quantize.gptq\n    from: gptq\n    params: {method: rtn}\n"
    with pytest.raises(ConfigError, match="already quantized"):
        load_pipeline(write_pipeline(tmp_path, tiny_model, stages))


@pytest.mark.stage
def test_an_already_quantized_input_model_is_refused(gptq_run: Path, tmp_path: Path) -> None:
    stages = "  - id: again\n    kind: quantize.ptq\n    params: {mode: dynamic}\n"
    with pytest.raises(ConfigError, match="already quantized"):
        load_pipeline(write_pipeline(tmp_path, gptq_run / "stages" / "gptq", stages))


@pytest.mark.stage
def test_run_time_check_refuses_a_quantized_parent(gptq_run: Path) -> None:
    # the runner calls the stage's check_shape on the real parent before run: the same rule as validation
    from slimline.artifacts import Artifact
    from slimline.errors import StageError
    from slimline.quantize import bnb
    from slimline.runner import check_parent_shape

    folder = gptq_run / "stages" / "gptq"
    parent = Artifact(folder, json.loads((folder / "artifact.json").read_text()))
    with pytest.raises(StageError, match=r"does not fit quantize.bnb: .*already quantized \(gptq\)"):
        check_parent_shape("quantize.bnb", bnb.Params(), parent)


@pytest.mark.slow
def test_three_bit_asymmetric_act_order(tiny_model: Path, tmp_path: Path) -> None:
    stages = """\
  - id: g3
    kind: quantize.gptq
    params: {bits: 3, group_size: 32, act_order: true, sym: false, calibration_samples: 8, calibration_length: 64}
"""
    outcome = Runner(load_pipeline(write_pipeline(tmp_path, tiny_model, stages)), tmp_path / "run").run()
    assert outcome.ok, [r.reason for r in outcome.results]
    folder = tmp_path / "run" / "stages" / "g3"
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["desc_act"], config["sym"]) == (3, True, False)
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("model.layers.0.mlp.down_proj.qweight").shape == (128 * 3 // 32, 64)
        g_idx = weights.get_tensor("model.layers.0.mlp.down_proj.g_idx")
    assert not torch.equal(g_idx, torch.arange(128) // 32)  # act-order permutes columns across groups
    report = json.loads((folder / "report.json").read_text())
    assert report["metrics"]["accuracy"]["top1_agreement_with_input"] > 0.8
