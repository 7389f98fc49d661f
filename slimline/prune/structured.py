"""Structured pruning: physically remove FFN channels, attention heads and whole decoder layers.

The result is a smaller dense HF checkpoint (its config updated) that plain ``transformers``
loads and that runs faster in every backend. Channel and head importance comes from weight
magnitude or from activations on calibration data (as in LLM-Pruner, Ma et al., 2023, and
Wanda, Sun et al., 2023); layer importance from how much a layer changes its input on
calibration data (ShortGPT's block influence, Men et al., 2024). An optional recovery fine-tune,
plain or distilled from the unpruned model, wins back accuracy.

```yaml
- id: slim
  kind: prune.structured
  params: {ffn_fraction: 0.3, importance: activation, recovery: {steps: 100, mode: distill}}
```
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from slimline.artifacts import Artifact
from slimline.data import sample_windows
from slimline.distill.distill import DistillationPair, LossWeights, distillation_loss
from slimline.distributed import fit, launch_of, prepared_folder
from slimline.models import count_parameters, load_causal_lm, load_parent_model, save_like_parent
from slimline.prune.slicing import (
    block_influence,
    drop_layers,
    ffn_activation_importance,
    ffn_magnitude_importance,
    head_activation_importance,
    head_dim_of,
    head_magnitude_importance,
    keep_count,
    slice_ffn,
    slice_heads,
)
from slimline.stage import ModelShape, ShapeProblems, StageContext, StageOutput, StageParams, StageSpec
from slimline.training import Launchable, Training, TrainSettings, causal_lm_loss

log = logging.getLogger(__name__)

# Ranks and slices on the CPU; its recovery fine-tune trains where the stage runs.
SPEC = StageSpec(kind="prune.structured", requires=(), extra=None, device="any", data=("train", "calibration"))
# Where Params keeps its training settings (a ``launch:`` block trains the recovery under torchrun).
TRAIN_SETTINGS = ("recovery",)


class Recovery(TrainSettings):
    """A short fine-tune after pruning to win back accuracy."""

    mode: Literal["plain", "distill"] = Field(
        "distill", description="'distill' learns from the unpruned model's soft targets."
    )
    temperature: float = Field(2.0, gt=0, description="Distillation temperature (mode 'distill').")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of hard-label cross-entropy (mode 'distill').")
    steps: int = Field(100, ge=1, description="Recovery optimizer steps.")
    learning_rate: float = Field(
        2e-4, gt=0, description="Peak learning rate; lower than pre-training to keep what survived."
    )


class Params(StageParams, Launchable):
    """What to remove and how to rank it."""

    ffn_fraction: float = Field(0.0, ge=0, lt=1, description="Share of FFN channels removed in every layer.")
    head_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of attention heads (KV groups) removed in every layer."
    )
    drop_layers: int = Field(
        0, ge=0, description="Whole decoder layers removed, the least influential on calibration data."
    )
    importance: Literal["magnitude", "activation"] = Field(
        "activation",
        description="Rank channels/heads by weight norms, or by activations on calibration data (better, slower).",
    )
    round_to: int = Field(
        256, ge=1, description="Kept FFN width is a multiple of this (256 suits NF4, K-quants, int4 kernels)."
    )
    calibration_samples: int = Field(32, ge=1, description="Calibration sequences for activation and layer importance.")
    calibration_length: int = Field(256, ge=16, description="Tokens per calibration sequence.")
    recovery: Recovery | None = Field(None, description="Optional recovery fine-tune; none by default.")

    @model_validator(mode="after")
    def check_something_to_prune(self) -> Params:
        """A stage that removes nothing is a mistake in the file."""
        if self.ffn_fraction == 0 and self.head_fraction == 0 and self.drop_layers == 0:
            raise ValueError("nothing to prune: set ffn_fraction, head_fraction or drop_layers")
        return self


# The projections slicing works on: separate q/k/v/o attention and gate/up/down MLP (Llama-style blocks).
LLAMA_STYLE_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


def check_shape(params: Params, shape: ModelShape) -> tuple[ShapeProblems, ModelShape]:
    """Refuse removing every layer or pruning a model without Llama-style projections."""
    problems: ShapeProblems = []
    missing = LLAMA_STYLE_PROJECTIONS - shape.linear_names
    if missing:
        problems.append(((), unsupported_architecture(shape.architecture, missing, shape.linear_names)))
    layers = shape.setting("num_hidden_layers")
    if not isinstance(layers, int):
        problems.append(((), f"{shape.architecture}: the config names no num_hidden_layers to prune"))
    elif params.drop_layers >= layers:
        problems.append((("drop_layers",), f"{params.drop_layers} would remove all {layers} layers"))
    if problems:
        return problems, shape
    changes = {"num_hidden_layers": layers - params.drop_layers}
    if params.ffn_fraction > 0:
        changes["intermediate_size"] = keep_count(
            shape.setting("intermediate_size"), params.ffn_fraction, params.round_to
        )
    if params.head_fraction > 0:
        changes |= pruned_heads(shape, params.head_fraction)
    return [], shape.changed(**changes)


def unsupported_architecture(architecture: str, missing: set[str] | frozenset[str], names: frozenset[str]) -> str:
    """Why slicing cannot handle this architecture: the projections it lacks, and what it has instead."""
    found = sorted(names - {"lm_head"})
    return (
        f"{architecture} is not supported: prune.structured slices Llama-style decoders with separate "
        f"q/k/v/o and gate/up/down projections; it lacks {sorted(missing)} (found {found}, fused or named otherwise)"
    )


def pruned_heads(shape: ModelShape, head_fraction: float) -> dict[str, int]:
    """Config fields after keeping ``1 - head_fraction`` of the KV groups (the same rule as ``prune_heads``)."""
    heads = shape.setting("num_attention_heads")
    groups = shape.setting("num_key_value_heads", heads)
    head_dim = shape.setting("head_dim") or shape.setting("hidden_size") // heads
    kept = max(1, round(groups * (1 - head_fraction)))
    return {"num_attention_heads": heads * kept // groups, "num_key_value_heads": kept, "head_dim": head_dim}


def run(params: Params, inputs: list[Artifact], ctx: StageContext) -> StageOutput:
    """Rank, slice, optionally recover, save."""
    parent = inputs[0]
    model = load_parent_model(parent, SPEC.kind)
    original = copy.deepcopy(model) if params.recovery and params.recovery.mode == "distill" else None
    before = count_parameters(model)
    calibration = sample_windows(
        ctx.data.stream("calibration"),
        params.calibration_samples,
        params.calibration_length,
        torch.Generator().manual_seed(ctx.seed),
    )
    removed_layers = prune_layers(model, params, calibration)
    if params.head_fraction > 0:
        prune_heads(model, params, calibration)
    if params.ffn_fraction > 0:
        prune_ffn(model, params, calibration)
    after = count_parameters(model)
    log.info("%s: %.2fM -> %.2fM parameters", ctx.stage_id, before / 1e6, after / 1e6)
    curve = recover(model, original, params, inputs, ctx) if params.recovery else []
    save_like_parent(model, ctx.work_dir, parent)
    config = model.config
    return StageOutput(
        format="hf",
        metrics={
            "parameters_before": before,
            "parameters_after": after,
            "parameter_ratio": after / before,
            "removed_layers": removed_layers,
            "layers": config.num_hidden_layers,
            "attention_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size,
            "recovery_loss_curve": curve,
        },
    )


def prune_layers(model: torch.nn.Module, params: Params, calibration: torch.Tensor) -> list[int]:
    """Remove the ``drop_layers`` layers whose output is most similar to their input."""
    if params.drop_layers == 0:
        return []
    influence = block_influence(model, calibration)
    removed = sorted(influence.argsort()[: params.drop_layers].tolist())
    drop_layers(model, removed)
    return removed


def prune_heads(model: torch.nn.Module, params: Params, calibration: torch.Tensor) -> None:
    """Keep the most important KV groups (with their query heads) in every layer."""
    config = model.config
    groups = config.num_key_value_heads
    kept = max(1, round(groups * (1 - params.head_fraction)))
    scores = (
        head_activation_importance(model, calibration)
        if params.importance == "activation"
        else head_magnitude_importance(model)
    )
    for layer, layer_scores in zip(model.model.layers, scores, strict=True):
        slice_heads(layer.self_attn, layer_scores.topk(kept).indices.sort().values, config)
    config.head_dim = head_dim_of(config)  # explicit from here on: the heads no longer span hidden_size
    config.num_attention_heads = config.num_attention_heads * kept // groups
    config.num_key_value_heads = kept


def prune_ffn(model: torch.nn.Module, params: Params, calibration: torch.Tensor) -> None:
    """Keep the most important FFN channels, the same count in every layer."""
    config = model.config
    kept = keep_count(config.intermediate_size, params.ffn_fraction, params.round_to)
    scores = (
        ffn_activation_importance(model, calibration)
        if params.importance == "activation"
        else ffn_magnitude_importance(model)
    )
    for layer, layer_scores in zip(model.model.layers, scores, strict=True):
        slice_ffn(layer.mlp, layer_scores.topk(kept).indices.sort().values)
    config.intermediate_size = kept


def recover(
    model: torch.nn.Module, original: torch.nn.Module | None, params: Params, inputs: list[Artifact], ctx: StageContext
) -> list[float]:
    """Fine-tune the pruned model in place, from hard labels or from the unpruned model's soft targets.

    Under a ``launch:`` block the pruned model is saved for the ranks to load (pruning again in
    every rank would repeat the calibration passes); the trained weights come back into ``model``.
    """
    assert params.recovery is not None
    settings = params.recovery
    prepared = None
    if launch_of(params) is not None:
        prepared = prepared_folder(ctx)
        model.save_pretrained(prepared, safe_serialization=True)  # float32, as it is here
    _, curve = fit(SPEC.kind, params, inputs, ctx, lambda: recovery_training(model, original, settings), prepared)
    return curve


def recovery_training(model: torch.nn.Module, original: torch.nn.Module | None, settings: Recovery) -> Training:
    """The recovery fine-tune of a pruned model: plain, or distilled from the unpruned ``original``."""
    if original is None:
        return Training(model, settings, causal_lm_loss)
    return Training(
        DistillationPair(model, original, LossWeights(settings.temperature, settings.alpha)),
        settings,
        distillation_loss,
    )


def build_training(params: Params, inputs: list[Artifact], prepared: Path | None = None) -> Training:
    """A launched rank's recovery: the pruned model the stage saved in ``prepared``, beside the unpruned parent."""
    assert params.recovery is not None and prepared is not None
    model = load_causal_lm(prepared)
    original = load_parent_model(inputs[0], SPEC.kind) if params.recovery.mode == "distill" else None
    return recovery_training(model, original, params.recovery)
