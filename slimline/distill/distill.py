"""Knowledge distillation into a smaller student (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network").

The student (fewer layers, optionally narrower) learns the teacher's softened next-token
distribution: KL(teacher_T || student_T) scaled by T^2, mixed with cross-entropy on the hard
labels (weight ``alpha``), plus an optional last-hidden-state MSE through a learned projection.
It keeps the teacher's tokenizer, so it can serve as a speculative-decoding draft.

```yaml
- id: draft
  kind: distill
  from: tuned
  params: {student: {layers: 2}, temperature: 2.0, alpha: 0.5, steps: 600}
```
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from pydantic import BaseModel, ConfigDict, Field

from slimline.artifacts import Artifact
from slimline.distill.student import build_student, student_config
from slimline.distributed import fit
from slimline.evaluate.accuracy import token_windows
from slimline.models import count_parameters, load_parent_model, save_like_parent
from slimline.stage import ModelShape, ShapeProblems, StageContext, StageOutput, StageParams, StageSpec
from slimline.training import Training, TrainSettings

log = logging.getLogger(__name__)

SPEC = StageSpec(kind="distill", requires=(), extra=None, device="any", data=("train", "eval"))
# Where Params keeps its training settings (a ``launch:`` block trains under torchrun: slimline/distributed.py).
TRAIN_SETTINGS: tuple[str, ...] = ()

# Held-out tokens on which the stage measures the student's top-1 agreement with its teacher.
AGREEMENT_TOKENS = 4096


class StudentSpec(BaseModel):
    """The student's shape, relative to the teacher."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: int = Field(ge=1, description="Decoder layers; fewer than the teacher's.")
    hidden_size: int | None = Field(None, ge=64, description="Width; default the teacher's. Keep it a multiple of 256.")
    intermediate_size: int | None = Field(None, ge=64, description="FFN width; default scaled with hidden_size.")
    attention_heads: int | None = Field(None, ge=1, description="Heads; default keeps the teacher's head size.")
    init: Literal["teacher", "fresh"] = Field(
        "teacher",
        description="'teacher' copies embeddings and evenly spaced layers (same width only); 'fresh' is random.",
    )


class Params(StageParams, TrainSettings):
    """Distillation settings; optimisation settings come from TrainSettings."""

    student: StudentSpec = Field(description="The student's shape.")
    temperature: float = Field(2.0, gt=0, description="Softening of both distributions; the KL term is scaled by T^2.")
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the hard-label cross-entropy; 1 - alpha goes to the KL term."
    )
    hidden_weight: float = Field(
        0.0, ge=0, description="Weight of the last-hidden-state MSE (learned projection); 0 = off."
    )
    steps: int = Field(600, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate; a small student trains well at 1e-3.")


@dataclass(frozen=True)
class LossWeights:
    """How the distillation loss mixes its terms."""

    temperature: float
    alpha: float
    hidden_weight: float = 0.0


class DistillationPair(torch.nn.Module):
    """Student + projection (trainable) beside a frozen teacher; calling it on a batch gives the loss.

    The loss is the module's forward, so a DDP or FSDP wrapper around the pair sees the student's
    forward and backward, as it must to average the gradients.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, weights: LossWeights) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.requires_grad_(False)
        self.weights = weights
        s_hidden, t_hidden = student.config.hidden_size, teacher.config.hidden_size
        self.projection = torch.nn.Linear(s_hidden, t_hidden, bias=False) if weights.hidden_weight > 0 else None

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """(1 - alpha) T^2 KL(teacher_T || student_T) + alpha CE(labels) + hidden_weight MSE(hidden).

        Every term is a mean over the batch's tokens, so data-parallel ranks with equal rows average
        to one process's loss.
        """
        weights, inputs, labels = self.weights, batch[:, :-1], batch[:, 1:]
        want_hidden = self.projection is not None
        self.teacher.eval()
        with torch.no_grad():
            teacher_out = self.teacher(input_ids=inputs, output_hidden_states=want_hidden)
        student_out = self.student(input_ids=inputs, output_hidden_states=want_hidden)
        s_logits, t_logits = student_out.logits.float().flatten(0, 1), teacher_out.logits.float().flatten(0, 1)
        T = weights.temperature
        kl = F.kl_div(
            F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True, reduction="batchmean"
        )
        loss = (1 - weights.alpha) * T * T * kl + weights.alpha * F.cross_entropy(s_logits, labels.flatten())
        if want_hidden:
            projected = self.projection(student_out.hidden_states[-1].float())
            loss = loss + weights.hidden_weight * F.mse_loss(projected, teacher_out.hidden_states[-1].float())
        return loss


def distillation_loss(pair: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The loss of a DistillationPair (or of its DDP wrapper) on a batch: the pair's forward."""
    return pair(batch)


@torch.inference_mode()
def top1_agreement(student: torch.nn.Module, teacher: torch.nn.Module, stream: torch.Tensor, window: int) -> float:
    """Share of held-out positions where student and teacher predict the same next token."""
    agree = total = 0
    device = next(student.parameters()).device
    for chunk in token_windows(stream, AGREEMENT_TOKENS, window):
        ids = chunk[None, :-1].to(device)
        agree += (student(input_ids=ids).logits.argmax(-1) == teacher(input_ids=ids).logits.argmax(-1)).sum().item()
        total += ids.numel()
    return agree / total


def student_problems(teacher_layers: int, teacher_hidden: int, spec: StudentSpec) -> ShapeProblems:
    """A student must be smaller than its teacher; a teacher init needs the teacher's width."""
    hidden = spec.hidden_size or teacher_hidden
    if spec.layers > teacher_layers or hidden > teacher_hidden:
        message = (
            f"student ({spec.layers} layers, hidden {hidden}) is larger than its teacher "
            f"({teacher_layers} layers, hidden {teacher_hidden})"
        )
        return [(("student",), message)]
    if spec.init == "teacher" and hidden != teacher_hidden:
        return [(("student", "init"), "'teacher' copies layers and needs the teacher's hidden_size; use init: fresh")]
    return []


def check_shape(params: Params, shape: ModelShape) -> tuple[ShapeProblems, ModelShape]:
    """Refuse students that do not fit the teacher; the output has the student's shape."""
    spec = params.student
    layers, hidden = shape.setting("num_hidden_layers"), shape.setting("hidden_size")
    if not isinstance(layers, int) or not isinstance(hidden, int):
        message = (
            f"{shape.architecture} is not supported: distill needs num_hidden_layers and hidden_size in its config"
        )
        return [((), message)], shape
    problems = student_problems(layers, hidden, spec)
    if problems:
        return problems, shape
    try:
        changes = student_shape(shape.config_object, spec)
    except (AttributeError, TypeError, ValueError, StrictDataclassError) as error:
        return [((), f"{shape.architecture} is not supported: distill cannot derive a student config ({error})")], shape
    return [], shape.changed(**changes)


def student_shape(teacher_config: Any, spec: StudentSpec) -> dict[str, Any]:
    """The config fields the student changes (validation's view of ``student_config``)."""
    if teacher_config is None:  # a config transformers cannot build: only the spec's own figures are known
        return {"num_hidden_layers": spec.layers} | ({"hidden_size": spec.hidden_size} if spec.hidden_size else {})
    student = student_config(
        teacher_config, spec.layers, spec.hidden_size, spec.intermediate_size, spec.attention_heads
    ).to_dict()
    return {name: value for name, value in student.items() if teacher_config.to_dict().get(name) != value}


def build_training(params: Params, inputs: list[Artifact], prepared: Path | None = None) -> Training:
    """The student beside its teacher, and the distillation loss: as ``run`` builds it, and every launched rank."""
    teacher = load_parent_model(inputs[0], SPEC.kind)
    spec = params.student
    config = student_config(teacher.config, spec.layers, spec.hidden_size, spec.intermediate_size, spec.attention_heads)
    student = build_student(teacher, config, init_from_teacher=spec.init == "teacher")
    pair = DistillationPair(student, teacher, LossWeights(params.temperature, params.alpha, params.hidden_weight))
    return Training(pair, params, distillation_loss)


def run(params: Params, inputs: list[Artifact], ctx: StageContext) -> StageOutput:
    """Build the student, distill it on the train split, save it with the teacher's tokenizer."""
    parent = inputs[0]
    training, losses = fit(SPEC.kind, params, inputs, ctx, lambda: build_training(params, inputs))
    student, teacher = training.model.student, training.model.teacher
    log.info(
        "%s: student %.1fM parameters, teacher %.1fM",
        ctx.stage_id,
        count_parameters(student) / 1e6,
        count_parameters(teacher) / 1e6,
    )
    agreement = top1_agreement(student, teacher, ctx.data.stream("eval"), params.sequence_length)
    save_like_parent(student, ctx.work_dir, parent)
    return StageOutput(
        format="hf",
        metrics={
            "student_parameters": count_parameters(student),
            "teacher_parameters": count_parameters(teacher),
            "parameter_ratio": count_parameters(student) / count_parameters(teacher),
            "top1_agreement_with_teacher": agreement,
            "loss_curve": losses,
        },
    )
