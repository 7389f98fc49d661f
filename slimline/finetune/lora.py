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

import logging
import math

import torch
from pydantic import Field, field_validator

from slimline.artifacts import Artifact
from slimline.errors import StageError
from slimline.models import count_parameters, load_causal_lm, save_causal_lm, stored_dtype
from slimline.stage import StageContext, StageOutput, StageParams
from slimline.training import TrainSettings, train_steps

log = logging.getLogger(__name__)

KIND = "lora"
REQUIRES = ("peft",)
EXTRA = "dev"
DEVICE = "cpu"
DATA = ("train",)

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Params(StageParams, TrainSettings):
    """LoRA settings; training settings (steps, learning rate, batch) come from TrainSettings."""

    rank: int = Field(8, ge=1, description="Adapter rank r; higher adapts more and trains more parameters.")
    alpha: float = Field(16.0, gt=0, description="Scale alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input during training.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LLAMA_PROJECTIONS),
        min_length=1,
        description="Module names to adapt; default: every attention and MLP projection.",
    )
    merge: bool = Field(True, description="Merge the adapter into the weights (hf) or save it alone (peft).")
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


def run(params: Params, inputs: list[Artifact], ctx: StageContext) -> StageOutput:
    """Load the parent, attach adapters, train on the train split, merge or save the adapter."""
    from peft import LoraConfig, get_peft_model

    parent = inputs[0]
    if parent.format not in ("hf", "source"):
        raise StageError(f"lora needs a full model as input; {parent.manifest['stage']!r} is {parent.format!r}")
    model = load_causal_lm(parent.model_path)
    check_target_modules(model, params.target_modules)
    config = LoraConfig(
        r=params.rank,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=params.target_modules,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = count_parameters(peft_model)
    log.info("lora: %d trainable parameters (%.2f%%)", trainable, 100 * trainable / total)
    losses = train_steps(peft_model, ctx.data.stream("train"), params, ctx)
    peft_model.eval()
    if params.merge:
        save_causal_lm(peft_model.merge_and_unload(), ctx.work_dir, stored_dtype(parent.model_path))
    else:
        peft_model.save_pretrained(ctx.work_dir, safe_serialization=True)
    return StageOutput(
        format="hf" if params.merge else "peft",
        metrics={
            "trainable_parameters": trainable,
            "trainable_fraction": trainable / total,
            "loss_curve": losses,
            "final_loss": math.fsum(losses[-10:]) / len(losses[-10:]),
        },
        base_model_path=None if params.merge else parent.model_path,
    )


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """Fail loudly when a target names no module of this model."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    unknown = sorted(set(targets) - names)
    if unknown:
        raise StageError(f"target_modules {unknown} match no linear layer of this model; it has {sorted(names)}")
