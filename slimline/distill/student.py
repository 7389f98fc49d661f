"""Building a student model from its teacher: a smaller config, optionally initialised from teacher layers."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from slimline.errors import StageError
from slimline.models import decoder_layers_name
from slimline.stage import select_layers


def student_config(
    teacher: PretrainedConfig,
    layers: int,
    hidden_size: int | None,
    intermediate_size: int | None,
    attention_heads: int | None,
) -> PretrainedConfig:
    """The teacher's config with fewer layers and, optionally, a smaller width (head size kept).

    Works through the config's aliases (GPT-2's ``n_layer``, ``n_embd``), keeps per-layer fields such
    as ``layer_types`` for the teacher layers the student copies, and leaves fields a family lacks
    (GPT-NeoX has no ``num_key_value_heads``, Qwen2 no ``head_dim``) absent.
    """
    fields = teacher.to_dict()
    heads, head_dim = student_heads(teacher, hidden_size, attention_heads)
    hidden = hidden_size or teacher.hidden_size
    kept = spaced_layer_indices(teacher.num_hidden_layers, layers)
    fields |= select_layers(fields, teacher.num_hidden_layers, kept)
    changes: dict[str, Any] = {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads}
    if getattr(teacher, "num_key_value_heads", None):
        kv_ratio = teacher.num_attention_heads // teacher.num_key_value_heads
        changes["num_key_value_heads"] = max(1, heads // kv_ratio)
    if "head_dim" in fields:
        changes["head_dim"] = head_dim
    ffn_field = "intermediate_size" if "intermediate_size" in fields else "n_inner" if "n_inner" in fields else None
    if ffn_field is not None and (intermediate_size or fields[ffn_field]):
        changes[ffn_field] = intermediate_size or fields[ffn_field] * hidden // teacher.hidden_size
    for name, value in changes.items():
        fields[teacher.attribute_map.get(name, name)] = value
    return teacher.__class__.from_dict(fields)


def student_heads(teacher: PretrainedConfig, hidden_size: int | None, attention_heads: int | None) -> tuple[int, int]:
    """The student's attention heads and head size: the teacher's at its width, else the teacher's head size."""
    teacher_head_dim = getattr(teacher, "head_dim", None) or teacher.hidden_size // teacher.num_attention_heads
    hidden = hidden_size or teacher.hidden_size
    if hidden == teacher.hidden_size and attention_heads is None:
        return teacher.num_attention_heads, teacher_head_dim
    heads = attention_heads or max(1, hidden // teacher_head_dim)
    return heads, hidden // heads


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
    container = decoder_layers_name(teacher)
    if container is None:
        raise StageError(f"found no decoder layer list in {type(teacher).__name__} to copy layers from")
    indices = spaced_layer_indices(teacher.config.num_hidden_layers, config.num_hidden_layers)
    teacher_state = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        source = name
        if name.startswith(f"{container}."):
            index, suffix = name.removeprefix(f"{container}.").split(".", 1)
            source = f"{container}.{indices[int(index)]}.{suffix}"
        state[name] = teacher_state[source]
    student.load_state_dict(state)
    return student
