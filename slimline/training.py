"""The plain training loop the training-type stages share (LoRA now; distillation and QAT later)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from slimline.data import sample_windows
from slimline.hardware import Precision, choose_precision
from slimline.stage import StageContext

log = logging.getLogger(__name__)

# Points kept in a report's loss curve, whatever the number of steps.
LOSS_CURVE_POINTS = 50


class TrainSettings(BaseModel):
    """Optimisation settings shared by every stage that trains."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Sequences per micro-batch.")
    sequence_length: int = Field(256, ge=8, description="Tokens per training sequence; must fit the model's context.")
    gradient_accumulation: int = Field(
        1, ge=1, description="Micro-batches per optimizer step (effective batch = batch_size x this)."
    )
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps before the schedule.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warm-up, to 10% of the peak."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    precision: Precision = Field(
        "auto",
        description="auto: bf16 autocast where the hardware runs it natively (CUDA bf16, CPUs with AMX or "
        "AVX512-BF16, confirmed by a cached micro-benchmark), else fp32; bf16 forces it (emulated bf16 can be "
        "tens of times slower); fp32 is exact.",
    )


def learning_rate_at(step: int, settings: TrainSettings) -> float:
    """Warm-up, then the chosen decay to a tenth of the peak."""
    peak = settings.learning_rate
    if step < settings.warmup_steps:
        return peak * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    if settings.schedule == "constant":
        return peak
    if settings.schedule == "linear":
        return peak * (1 - 0.9 * progress)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def causal_lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a batch of token windows [B, T+1]."""
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


def train_steps(
    model: torch.nn.Module,
    stream: torch.Tensor,
    settings: TrainSettings,
    ctx: StageContext,
    loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = causal_lm_loss,
) -> list[float]:
    """Train the model's trainable parameters on random windows of ``stream``; return the loss curve."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(ctx.seed)
    every = max(1, settings.steps // LOSS_CURVE_POINTS)
    precision = choose_precision(settings.precision)
    ctx.records["precision"] = precision.as_record()
    curve, window = [], []
    model.train()
    with ctx.progress.task(f"{ctx.stage_id}: training", settings.steps) as advance:
        for step in range(settings.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, settings)
            for _ in range(settings.gradient_accumulation):
                batch = sample_windows(stream, settings.batch_size, settings.sequence_length + 1, generator)
                with torch.autocast(device_type(model), dtype=torch.bfloat16, enabled=precision.chosen == "bf16"):
                    loss = loss_fn(model, batch) / settings.gradient_accumulation
                loss.backward()
                window.append(loss.item() * settings.gradient_accumulation)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % every == 0 or step == settings.steps - 1:
                curve.append(round(sum(window) / len(window), 4))
                log.info("%s: step %d/%d loss %.3f", ctx.stage_id, step + 1, settings.steps, curve[-1])
                window = []
            advance(1)
    model.eval()
    return curve


def device_type(model: torch.nn.Module) -> str:
    """'cuda' or 'cpu': where the model's parameters live, for autocast."""
    return next(model.parameters()).device.type
