"""Distillation on a tiny teacher: a smaller student that loads with plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from slimline.config import load_pipeline
from slimline.distill.student import build_student, spaced_layer_indices, student_config
from slimline.runner import Runner
from tests.conftest import write_pipeline


@pytest.mark.unit
def test_spaced_layers_keep_first_and_last() -> None:
    assert spaced_layer_indices(8, 3) == [0, 4, 7]
    assert spaced_layer_indices(8, 1) == [0]
    assert spaced_layer_indices(4, 4) == [0, 1, 2, 3]


@pytest.mark.unit
def test_teacher_initialised_student_copies_spaced_layers() -> None:
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    )
    student = build_student(teacher, student_config(teacher.config, 2, None, None, None), init_from_teacher=True)
    assert student.config.num_hidden_layers == 2
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    narrow = student_config(teacher.config, 2, 16, None, None)
    assert (narrow.hidden_size, narrow.intermediate_size, narrow.num_attention_heads) == (16, 32, 2)


@pytest.mark.stage
def test_distill_stage_writes_a_smaller_loadable_student(tiny_model: Path, tmp_path: Path) -> None:
    stages = """\
  - id: student
    kind: distill
    params: {student: {layers: 1}, steps: 4, batch_size: 2, sequence_length: 32, hidden_weight: 0.5}
"""
    outcome = Runner(load_pipeline(write_pipeline(tmp_path, tiny_model, stages)), tmp_path / "run").run()
    results = {r.stage_id: r for r in outcome.results}
    assert results["student"].status == "ran"
    report = json.loads((tmp_path / "run" / "stages" / "student" / "report.json").read_text())
    metrics = report["stage_metrics"]
    assert metrics["student_parameters"] < metrics["teacher_parameters"]
    assert 0 <= metrics["top1_agreement_with_teacher"] <= 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "stages" / "student")
    assert reloaded.config.num_hidden_layers == 1
    assert report["metrics"]["parameters"] == metrics["student_parameters"]
