"""Structured pruning: slicing maths on small layers, and the stage on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from slimline.config import load_pipeline
from slimline.prune.slicing import block_influence, drop_layers, keep_count, slice_ffn, slice_heads
from slimline.runner import Runner
from tests.conftest import write_pipeline


def tiny_llama(layers: int = 3, kv_heads: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.unit
def test_keep_count_rounds_to_kernel_friendly_widths() -> None:
    assert keep_count(1536, 0.3, 256) == 1024
    assert keep_count(1536, 0.3, 1) == 1075
    assert keep_count(256, 0.9, 256) == 256


@pytest.mark.unit
def test_slicing_ffn_channels_equals_zeroing_them() -> None:
    model = tiny_llama()
    mlp = model.model.layers[0].mlp
    x = torch.randn(5, 32)
    kept = torch.arange(0, 64, 2)
    with torch.no_grad():
        mlp.down_proj.weight[:, 1::2] = 0
        expected = mlp(x)
        slice_ffn(mlp, kept)
        assert mlp.gate_proj.weight.shape == (32, 32) and mlp.down_proj.weight.shape == (32, 32)
        torch.testing.assert_close(mlp(x), expected)


@pytest.mark.unit
@pytest.mark.parametrize("kv_heads", [4, 2])  # plain multi-head, grouped-query
def test_slicing_heads_equals_zeroing_their_output(kv_heads: int) -> None:
    model = tiny_llama(kv_heads=kv_heads)
    config, attn = model.config, model.model.layers[0].self_attn
    ids = torch.randint(0, 64, (1, 7))
    kept_groups = torch.tensor([1])
    per_group = 4 // kv_heads
    with torch.no_grad():
        dropped = [g for g in range(kv_heads) if g != 1]
        for g in dropped:
            cols = slice(g * per_group * 8, (g + 1) * per_group * 8)
            attn.o_proj.weight[:, cols] = 0
        expected = model(input_ids=ids).logits
        slice_heads(attn, kept_groups, config)
        assert attn.q_proj.weight.shape == (per_group * 8, 32)
        assert attn.k_proj.weight.shape == (8, 32)
        torch.testing.assert_close(model(input_ids=ids).logits, expected)


@pytest.mark.unit
def test_dropping_layers_renumbers_the_cache_and_generates() -> None:
    model = tiny_llama(layers=3)
    influence = block_influence(model, torch.randint(0, 64, (2, 12)))
    assert influence.shape == (3,) and (influence >= 0).all()
    drop_layers(model, [1])
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    output = model.generate(torch.randint(0, 64, (1, 5)), max_new_tokens=4, do_sample=False)
    assert output.shape == (1, 9)


@pytest.mark.stage
def test_structured_stage_shrinks_and_reloads(tiny_model: Path, tmp_path: Path) -> None:
    stages = """\
  - id: slim
    kind: prune.structured
    params:
      ffn_fraction: 0.5
      head_fraction: 0.5
      drop_layers: 1
      round_to: 32
      calibration_samples: 4
      calibration_length: 32
      recovery: {steps: 2, batch_size: 2, sequence_length: 32}
"""
    outcome = Runner(load_pipeline(write_pipeline(tmp_path, tiny_model, stages)), tmp_path / "run").run()
    assert outcome.ok, [r.reason for r in outcome.results]
    folder = tmp_path / "run" / "stages" / "slim"
    metrics = json.loads((folder / "report.json").read_text())["stage_metrics"]
    assert (metrics["layers"], metrics["attention_heads"], metrics["intermediate_size"]) == (1, 2, 64)
    assert metrics["parameters_after"] < metrics["parameters_before"]
    assert len(metrics["recovery_loss_curve"]) == 2
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in reloaded.parameters()) == metrics["parameters_after"]
    assert reloaded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
