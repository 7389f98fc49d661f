"""Structured-pruning maths for Llama-style decoders: importance scores and slicing of linear layers.

Shapes (per layer): q_proj [nH*hd, H], k_proj/v_proj [nKV*hd, H], o_proj [H, nH*hd],
gate_proj/up_proj [I, H], down_proj [H, I].
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from slimline.stage import select_layers

# Calibration sequences per forward pass: bounds activation memory.
CALIBRATION_BATCH = 8


def keep_count(total: int, fraction: float, round_to: int) -> int:
    """Units kept after removing ``fraction`` of ``total``, rounded to a multiple of ``round_to``."""
    kept = round(total * (1 - fraction) / round_to) * round_to
    return min(total, max(round_to, kept))


def sliced_linear(
    linear: torch.nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> torch.nn.Linear:
    """A new Linear holding only the given output rows and/or input columns of ``linear``."""
    W = linear.weight.data
    W = W[rows] if rows is not None else W
    W = W[:, cols] if cols is not None else W
    bias = linear.bias is not None
    new = torch.nn.Linear(W.shape[1], W.shape[0], bias=bias, dtype=W.dtype)
    new.weight.data = W.clone()
    if bias:
        new.bias.data = (linear.bias.data[rows] if rows is not None else linear.bias.data).clone()
    return new


def slice_ffn(mlp: torch.nn.Module, kept: torch.Tensor) -> None:
    """Keep FFN channels ``kept``: rows of gate/up, columns of down."""
    mlp.gate_proj = sliced_linear(mlp.gate_proj, rows=kept)
    mlp.up_proj = sliced_linear(mlp.up_proj, rows=kept)
    mlp.down_proj = sliced_linear(mlp.down_proj, cols=kept)


def head_dim_of(config: object) -> int:
    """Width of one attention head: the config's ``head_dim``, else hidden_size / heads (Qwen2 has no field)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the given heads in a [n*hd, H] projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def slice_heads(attn: torch.nn.Module, kept_groups: torch.Tensor, config: object) -> None:
    """Keep KV groups ``kept_groups`` and the query heads that read them."""
    per_group = config.num_attention_heads // config.num_key_value_heads
    q_heads = (kept_groups[:, None] * per_group + torch.arange(per_group)).flatten()
    head_dim = head_dim_of(config)
    q_rows, kv_rows = head_rows(q_heads, head_dim), head_rows(kept_groups, head_dim)
    attn.q_proj = sliced_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = sliced_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = sliced_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = sliced_linear(attn.o_proj, cols=q_rows)


def drop_layers(model: torch.nn.Module, removed: list[int]) -> None:
    """Remove decoder layers and renumber the rest (the KV cache is indexed by layer_idx)."""
    kept = [layer for index, layer in enumerate(model.model.layers) if index not in removed]
    for index, layer in enumerate(kept):
        layer.self_attn.layer_idx = index
    model.model.layers = torch.nn.ModuleList(kept)
    config = model.config
    # Some configs carry per-layer fields (layer_types: sliding vs full attention); keep the kept layers' entries.
    survivors = [index for index in range(config.num_hidden_layers) if index not in removed]
    for name, values in select_layers(config.to_dict(), config.num_hidden_layers, survivors).items():
        setattr(config, name, values)
    config.num_hidden_layers = len(kept)


def ffn_magnitude_importance(model: torch.nn.Module) -> list[torch.Tensor]:
    """Per layer [I]: product of the L2 norms of a channel's gate row, up row and down column."""
    return [
        layer.mlp.gate_proj.weight.norm(dim=1)
        * layer.mlp.up_proj.weight.norm(dim=1)
        * layer.mlp.down_proj.weight.norm(dim=0)
        for layer in model.model.layers
    ]


def head_magnitude_importance(model: torch.nn.Module) -> list[torch.Tensor]:
    """Per layer [nKV]: norm of each group's value rows times the norm of its output columns."""
    config = model.config
    per_group = config.num_attention_heads // config.num_key_value_heads
    scores = []
    for layer in model.model.layers:
        attn = layer.self_attn
        v = attn.v_proj.weight.reshape(config.num_key_value_heads, -1).norm(dim=1)
        o = (
            attn.o_proj.weight.T.reshape(config.num_key_value_heads, per_group * head_dim_of(config), -1)
            .flatten(1)
            .norm(dim=1)
        )
        scores.append(v * o)
    return scores


@contextmanager
def input_hooks(modules: list[torch.nn.Module], record: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Call ``record(index, input)`` on every forward of each module."""
    handles = [
        m.register_forward_pre_hook(lambda _, args, i=i: record(i, args[0].detach())) for i, m in enumerate(modules)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def run_calibration(model: torch.nn.Module, calibration: torch.Tensor) -> None:
    """Forward the calibration windows in small batches."""
    for start in range(0, calibration.shape[0], CALIBRATION_BATCH):
        model(input_ids=calibration[start : start + CALIBRATION_BATCH], use_cache=False)


def ffn_activation_importance(model: torch.nn.Module, calibration: torch.Tensor) -> list[torch.Tensor]:
    """Per layer [I]: mean |activation| entering down_proj, times the channel's down column norm (Wanda-style)."""
    layers = model.model.layers
    sums = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]

    def record(index: int, x: torch.Tensor) -> None:
        sums[index] += x.abs().flatten(0, -2).float().sum(0)

    with input_hooks([layer.mlp.down_proj for layer in layers], record):
        run_calibration(model, calibration)
    return [s * layer.mlp.down_proj.weight.norm(dim=0) for s, layer in zip(sums, layers, strict=True)]


def head_activation_importance(model: torch.nn.Module, calibration: torch.Tensor) -> list[torch.Tensor]:
    """Per layer [nKV]: summed norm of each group's attention output entering o_proj, times its o_proj columns' norm."""
    config = model.config
    per_group = config.num_attention_heads // config.num_key_value_heads
    layers = model.model.layers
    sums = [torch.zeros(config.num_key_value_heads) for _ in layers]

    def record(index: int, x: torch.Tensor) -> None:
        heads = x.float().reshape(*x.shape[:-1], config.num_key_value_heads, per_group * head_dim_of(config))
        sums[index] += heads.norm(dim=-1).flatten(0, -2).sum(0)

    with input_hooks([layer.self_attn.o_proj for layer in layers], record):
        run_calibration(model, calibration)
    scores = []
    for s, layer in zip(sums, layers, strict=True):
        o = layer.self_attn.o_proj.weight.T.reshape(config.num_key_value_heads, -1).norm(dim=1)
        scores.append(s * o)
    return scores


def block_influence(model: torch.nn.Module, calibration: torch.Tensor) -> torch.Tensor:
    """Per layer: 1 - mean cosine similarity between the layer's input and output hidden states (ShortGPT)."""
    layers = model.model.layers
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}

    def record_output(index: int) -> Callable:
        def hook(_: torch.nn.Module, __: tuple, output: torch.Tensor | tuple) -> None:
            outputs[index].append((output[0] if isinstance(output, tuple) else output).detach().float())

        return hook

    handles = [layer.register_forward_hook(record_output(i)) for i, layer in enumerate(layers)]
    try:
        with input_hooks(list(layers), lambda i, x: inputs[i].append(x.float())):
            run_calibration(model, calibration)
    finally:
        for handle in handles:
            handle.remove()
    influence = []
    for i in range(len(layers)):
        x, y = torch.cat(inputs[i]).flatten(0, -2), torch.cat(outputs[i]).flatten(0, -2)
        influence.append(1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).mean())
    return torch.stack(influence)
