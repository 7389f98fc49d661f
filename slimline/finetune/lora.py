"""LoRA fine-tuning through peft (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Trains low-rank adapters on the attention and MLP projections with the pipeline's train split,
then either merges them into the weights (format ``hf``) or saves the adapter alone (``peft``).

```yaml
- id: tuned
  kind: lora
  params: {rank: 8, alpha: 16, steps: 200, merge: true}
```
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from slimline.artifacts import Artifact
from slimline.distributed import fit
from slimline.models import count_parameters, load_parent_model, save_like_parent
from slimline.stage import ModelShape, ShapeProblems, StageContext, StageOutput, StageParams, StageSpec
from slimline.training import Training, TrainSettings, causal_lm_loss

log = logging.getLogger(__name__)

# peft is a core dependency; QLoRA's bitsandbytes is checked by Params (the 'qlora' extra).
SPEC = StageSpec(kind="lora", requires=(), extra=None, device="any", data=("train", "eval"))
# Where Params keeps its training settings (a ``launch:`` block trains under torchrun: slimline/distributed.py).
TRAIN_SETTINGS: tuple[str, ...] = ()
# Held-out tokens on which a merged model is checked against adapter + base.
MERGE_CHECK_TOKENS = 128

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Params(StageParams, TrainSettings):
    """LoRA settings; training settings (steps, learning rate, batch) come from TrainSettings."""

    rank: int = Field(
        4,
        ge=1,
        description="Adapter rank r; higher adapts more and trains more parameters (r=4 on all projections is ~1% of the example model).",
    )
    alpha: float = Field(8.0, gt=0, description="Scale alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input during training.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LLAMA_PROJECTIONS),
        min_length=1,
        description="Module names to adapt; default: every attention and MLP projection.",
    )
    merge: bool = Field(True, description="Merge the adapter into the weights (hf) or save it alone (peft).")
    quantize_base: Literal["none", "nf4"] = Field(
        "none",
        description="QLoRA: train over a frozen NF4 base (bitsandbytes, double quantization); a merged output is full precision.",
    )
    learning_rate: float = Field(
        5e-4, gt=0, description="Peak learning rate; adapters tolerate higher rates than full fine-tuning."
    )

    @field_validator("target_modules")
    @classmethod
    def check_names(cls, value: list[str]) -> list[str]:
        """Module names are plain identifiers such as 'q_proj'."""
        bad = [name for name in value if not name.replace("_", "").isalnum()]
        if bad:
            raise ValueError(f"expected module names such as 'q_proj', got {bad}")
        return value

    @model_validator(mode="after")
    def check_qlora_backend(self) -> Params:
        """QLoRA needs bitsandbytes; say so before any work starts."""
        if self.quantize_base == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("quantize_base 'nf4' needs bitsandbytes: pip install 'slimline[qlora]'")
        return self


def check_shape(params: Params, shape: ModelShape) -> tuple[ShapeProblems, ModelShape]:
    """Every target module must name layers peft can adapt (Linear, GPT-2's Conv1D) of the model."""
    unknown = sorted(set(params.target_modules) - shape.linear_names)
    if unknown:
        return [(("target_modules",), unknown_targets_message(shape.architecture, unknown, shape.linear_names))], shape
    return [], shape


def unknown_targets_message(architecture: str, unknown: list[str], names: frozenset[str] | set[str]) -> str:
    """Why the targets cannot be adapted, and which names this architecture does have."""
    return (
        f"{unknown} match no linear layer of this {architecture}; it has {sorted(names)} "
        f"(the default targets are Llama-style projection names)"
    )


def lora_config(params: Params) -> Any:
    """The LoraConfig (peft) of the params."""
    from peft import LoraConfig

    return LoraConfig(
        r=params.rank,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=params.target_modules,
        task_type="CAUSAL_LM",
    )


def build_training(params: Params, inputs: list[Artifact], prepared: Path | None = None) -> Training:
    """The parent with adapters attached, and its loss: as ``run`` builds it, and as every launched rank does."""
    from peft import get_peft_model

    return Training(
        get_peft_model(load_base(inputs[0], params.quantize_base), lora_config(params)), params, causal_lm_loss
    )


def run(params: Params, inputs: list[Artifact], ctx: StageContext) -> StageOutput:
    """Load the parent, attach adapters, train on the train split, merge or save the adapter."""
    parent = inputs[0]
    training, losses = fit(SPEC.kind, params, inputs, ctx, lambda: build_training(params, inputs))
    peft_model, config = training.model, lora_config(params)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = count_parameters(peft_model)
    log.info("lora: %d trainable parameters (%.2f%%)", trainable, 100 * trainable / total)
    peft_model.eval()
    metrics: dict[str, object] = {}
    if params.merge and params.quantize_base == "nf4":
        save_like_parent(merge_into_full_precision(peft_model, config, parent), ctx.work_dir, parent)
    elif params.merge:
        probe = ctx.data.stream("eval")[None, :MERGE_CHECK_TOKENS].to(ctx.device)
        with torch.inference_mode():
            adapter_logits = peft_model(input_ids=probe).logits
            merged = peft_model.merge_and_unload()
            # Merging must not change the function: checked in float32, before saving in the parent's dtype.
            metrics["merge_max_logit_difference"] = (merged(input_ids=probe).logits - adapter_logits).abs().max().item()
        save_like_parent(merged, ctx.work_dir, parent)
    else:
        peft_model.save_pretrained(ctx.work_dir, safe_serialization=True)
    return StageOutput(
        format="hf" if params.merge else "peft",
        metrics=metrics
        | {
            "trainable_parameters": trainable,
            "trainable_fraction": trainable / total,
            "loss_curve": losses,
            "final_loss": math.fsum(losses[-10:]) / len(losses[-10:]),
        },
        base_model_path=None if params.merge else parent.model_path,
    )


def load_base(parent: Artifact, quantize_base: str) -> torch.nn.Module:
    """The model to adapt: full precision, or NF4-quantized and prepared for k-bit training (QLoRA)."""
    if quantize_base == "none":
        return load_parent_model(parent, SPEC.kind)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = load_parent_model(parent, SPEC.kind, quantization_config=quantization)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def merge_into_full_precision(peft_model: torch.nn.Module, config: object, parent: Artifact) -> torch.nn.Module:
    """QLoRA merge: apply the trained adapter to the full-precision base, not to its NF4 copy."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapter = get_peft_model_state_dict(peft_model)
    full = get_peft_model(load_parent_model(parent, SPEC.kind), config)
    set_peft_model_state_dict(full, adapter)
    return full.merge_and_unload()
