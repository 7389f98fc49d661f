"""LoRA and QLoRA on a tiny model: adapters, merging, and what the stage refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from slimline.config import load_pipeline
from slimline.runner import Runner
from tests.conftest import write_pipeline

pytestmark = pytest.mark.stage

TRAIN = "steps: 3, batch_size: 2, sequence_length: 32, precision: fp32"


def test_merged_and_unmerged_outputs_agree(tiny_model: Path, tmp_path: Path) -> None:
    stages = f"""\
  - id: merged
    kind: lora
    params: {{rank: 4, {TRAIN}, merge: true, dropout: 0.0}}
  - id: adapter
    kind: lora
    from: input
    params: {{rank: 4, {TRAIN}, merge: false, dropout: 0.0}}
"""
    outcome = Runner(load_pipeline(write_pipeline(tmp_path, tiny_model, stages)), tmp_path / "run").run()
    assert outcome.ok
    stages_dir = tmp_path / "run" / "stages"
    merged = AutoModelForCausalLM.from_pretrained(stages_dir / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, stages_dir / "adapter").eval()
    ids = torch.randint(0, 500, (1, 24))
    with torch.no_grad():
        difference = (merged(input_ids=ids).logits - adapter(input_ids=ids).logits).abs().max().item()
    assert difference < 1e-4
    assert (
        json.loads((stages_dir / "merged" / "report.json").read_text())["stage_metrics"]["merge_max_logit_difference"]
        < 1e-4
    )
    report = json.loads((stages_dir / "adapter" / "report.json").read_text())
    assert report["format"] == "peft" and report["metrics"]["accuracy"]["kl_vs_input"] > 0


def test_qlora_trains_over_an_nf4_base_and_merges_in_full_precision(tiny_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the [qlora] extra)")
    stages = f"  - id: qlora\n    kind: lora\n    params: {{rank: 4, {TRAIN}, quantize_base: nf4}}\n"
    outcome = Runner(load_pipeline(write_pipeline(tmp_path, tiny_model, stages)), tmp_path / "run").run()
    assert outcome.ok, [r.reason for r in outcome.results]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "stages" / "qlora")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    report = json.loads((tmp_path / "run" / "stages" / "qlora" / "report.json").read_text())
    assert report["metrics"]["accuracy"]["kl_vs_input"] > 0
    assert len(report["stage_metrics"]["loss_curve"]) == 3
