"""Building a student model from its teacher: a smaller config, optionally initialised from teacher layers."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel


def student_config(
    teacher: PretrainedConfig,
    layers: int,
    hidden_size: int | None,
    intermediate_size: int | None,
    attention_heads: int | None,
) -> PretrainedConfig:
    """The teacher's config with fewer layers and, optionally, a smaller width (head size kept)."""
    config = teacher.__class__.from_dict(teacher.to_dict())
    head_dim = teacher.hidden_size // teacher.num_attention_heads
    hidden = hidden_size or teacher.hidden_size
    config.num_hidden_layers = layers
    config.hidden_size = hidden
    config.intermediate_size = intermediate_size or teacher.intermediate_size * hidden // teacher.hidden_size
    config.num_attention_heads = attention_heads or max(1, hidden // head_dim)
    kv_ratio = teacher.num_attention_heads // teacher.num_key_value_heads
    config.num_key_value_heads = max(1, config.num_attention_heads // kv_ratio)
    if hasattr(config, "head_dim"):
        config.head_dim = hidden // config.num_attention_heads
    return config


def spaced_layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, first and last included: 8 -> 3 gives [0, 4, 7]."""
    if student_layers == 1:
        return [0]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def build_student(teacher: PreTrainedModel, config: PretrainedConfig, init_from_teacher: bool) -> PreTrainedModel:
    """A fresh student; with ``init_from_teacher`` and equal widths, copy embeddings, norms and spaced layers."""
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if not init_from_teacher:
        return student
    indices = spaced_layer_indices(teacher.config.num_hidden_layers, config.num_hidden_layers)
    teacher_state = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        source = name
        if ".layers." in name:
            prefix, rest = name.split(".layers.", 1)
            index, suffix = rest.split(".", 1)
            source = f"{prefix}.layers.{indices[int(index)]}.{suffix}"
        state[name] = teacher_state[source]
    student.load_state_dict(state)
    return student
