"""The plain training loop the training-type stages share (LoRA, distillation, QAT, pruning's recovery).

It runs in the stage's own process or, under ``torchrun``, in every rank of a data-parallel job
(slimline/distributed.py): each rank draws the same global batch from the same generator and
trains on its rows (``Shard``), so the parameters mean the same at any world size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from slimline.data import sample_windows
from slimline.hardware import Precision, choose_precision
from slimline.stage import StageContext

log = logging.getLogger(__name__)

# Points kept in a report's loss curve, whatever the number of steps.
LOSS_CURVE_POINTS = 50

LossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


class Launchable(BaseModel):
    """Params of a stage that may train under ``torchrun``: they carry the stage's ``launch:`` block.

    The block is a private attribute, set by validation (``slimline.config``) or by
    ``distributed.apply_launch_override``: it is not a param, so it is neither in the params'
    JSON nor in the stage's cache key (the world size does not change the result, by design).
    """

    _launch: Any = PrivateAttr(None)


class TrainSettings(Launchable):
    """Optimisation settings shared by every stage that trains."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(
        4,
        ge=1,
        description="Sequences per micro-batch, over all processes: each of the launch's N processes takes batch_size / N.",
    )
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
        description="auto: bf16 autocast where the hardware runs it natively and it pays (a CUDA GPU with bf16, "
        "for steps of 2e11 parameter-tokens or more; CPUs with AMX or AVX512-BF16, confirmed by a cached "
        "micro-benchmark), else fp32; bf16 forces it (emulated bf16 can be tens of times slower); fp32 is exact.",
    )


@dataclass
class Training:
    """One training job, built the same way in the stage's process and in every launched rank.

    ``model`` is the module whose trainable parameters are trained and which ``loss_fn`` calls
    (a DistillationPair, a peft model); ``settings`` are the optimisation settings.
    """

    model: torch.nn.Module
    settings: TrainSettings
    loss_fn: LossFn


@dataclass(frozen=True)
class Shard:
    """This process's part of a data-parallel job: rank ``rank`` of ``world`` (one process: 0 of 1)."""

    rank: int = 0
    world: int = 1

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global micro-batch (validation made batch_size divisible by the world)."""
        per_rank = batch.shape[0] // self.world
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def mean(self, value: float, device: torch.device) -> float:
        """The mean of ``value`` over all ranks (a loss point of the curve)."""
        if self.world == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)
        return total.item() / self.world


class BatchDropout(torch.nn.Module):
    """Dropout whose mask is drawn for the global batch and cut to this rank's rows.

    With ``torch.nn.Dropout`` each process draws masks for its own rows from its own random state,
    so two processes would train differently from one. Here every rank draws the same global mask
    from a generator seeded alike and keeps its rows: one process and N agree up to rounding.
    """

    def __init__(self, p: float, seed: int, shard: Shard) -> None:
        """``p`` is the drop probability; ``seed`` seeds the per-device mask generators."""
        super().__init__()
        self.p, self.seed, self.shard = p, seed, shard
        self.generators: dict[torch.device, torch.Generator] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity in eval mode; else x * mask / (1 - p), the mask cut from the global batch's."""
        if not self.training or self.p == 0:
            return x
        if x.device not in self.generators:
            self.generators[x.device] = torch.Generator(device=x.device).manual_seed(self.seed)
        rows = x.shape[0]
        full = torch.empty((rows * self.shard.world, *x.shape[1:]), device=x.device, dtype=torch.float32)
        full.bernoulli_(1 - self.p, generator=self.generators[x.device])
        mask = full[self.shard.rank * rows : (self.shard.rank + 1) * rows].to(x.dtype)
        return x * mask / (1 - self.p)


@contextmanager
def batch_consistent_dropout(model: torch.nn.Module, seed: int, shard: Shard) -> Iterator[int]:
    """Swap every ``nn.Dropout`` (p > 0) for a ``BatchDropout`` for the block; yield how many were swapped.

    Dropout inside attention kernels (``attention_dropout`` of a config) is functional and stays as
    it is: models trained with it differ between world sizes by more than rounding.
    """
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout and child.p > 0:
                setattr(parent, name, BatchDropout(child.p, seed, shard))
                swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


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
    """Next-token cross-entropy of a batch of token windows [B, T+1] (the mean over its tokens)."""
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


def train_steps(
    model: torch.nn.Module,
    stream: torch.Tensor,
    settings: TrainSettings,
    ctx: StageContext,
    loss_fn: LossFn = causal_lm_loss,
    shard: Shard = Shard(),
) -> list[float]:
    """Train the model's trainable parameters on random windows of ``stream``; return the loss curve.

    Under ``torchrun`` (``shard.world`` > 1) ``model`` is the DDP- or FSDP-wrapped model: every rank
    samples the same global micro-batch and trains on its rows; the wrapper averages the gradients,
    which equals one process's gradient of the global batch since every rank has as many rows.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(ctx.seed)
    every = max(1, settings.steps // LOSS_CURVE_POINTS)
    device = next(model.parameters()).device
    step_size = (
        sum(p.numel() for p in model.parameters()) * settings.batch_size // shard.world * settings.sequence_length
    )
    precision = choose_precision(settings.precision, str(device), step_size)
    ctx.records["precision"] = precision.as_record()
    curve, window = [], []
    model.train()
    with (
        batch_consistent_dropout(model, ctx.seed + 1, shard),
        ctx.progress.task(f"{ctx.stage_id}: training", settings.steps) as advance,
    ):
        for step in range(settings.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, settings)
            for micro in range(settings.gradient_accumulation):
                batch = sample_windows(stream, settings.batch_size, settings.sequence_length + 1, generator)
                batch = shard.rows(batch).to(device)
                with gradient_sync(model, micro == settings.gradient_accumulation - 1):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.chosen == "bf16"):
                        loss = loss_fn(model, batch) / settings.gradient_accumulation
                    loss.backward()
                window.append(loss.item() * settings.gradient_accumulation)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % every == 0 or step == settings.steps - 1:
                curve.append(round(shard.mean(sum(window) / len(window), device), 4))
                log.info("%s: step %d/%d loss %.3f", ctx.stage_id, step + 1, settings.steps, curve[-1])
                window = []
            advance(1)
    model.eval()
    return curve


def gradient_sync(model: torch.nn.Module, last_micro_batch: bool) -> Any:
    """DDP's ``no_sync`` on all but the last micro-batch of a step (one all-reduce per step); else nothing."""
    if not last_micro_batch and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return nullcontext()
