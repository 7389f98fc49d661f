"""The check every weight-changing stage passes before its artifact is published.

The stage's output and its parent both score the same calibration tokens through the backends
that run their formats; the output must agree with its parent's top-1 prediction often enough
and stay close to its distribution (KL(parent || output), nats/token). A quantizer with a
sabotaged scale or saturating int8 kernels produces a model that still loads and runs: only
this check tells it from a good one, so a stage that fails it fails with the figures and
publishes nothing.

The floors are per kind: a quantizer or exporter should barely move the distribution, while
fine-tuning, pruning and distillation change it on purpose (a distilled draft is a much smaller
model), so their floors only catch collapse. A pipeline overrides them per stage:

```yaml
- id: int8
  kind: quantize.ptq
  check: {min_top1_agreement: 0.9, max_kl: 0.1}   # or {enabled: false}
```
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from slimline.evaluate.accuracy import measure_accuracy, token_windows
from slimline.evaluate.backends.base import Backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Floor:
    """The least agreement with the parent, and the most KL from it, an output may show."""

    min_top1_agreement: float
    max_kl: float


# Should barely change the model: a collapse shows as agreement far below 1 and KL far above 0.
NEAR_LOSSLESS = Floor(min_top1_agreement=0.6, max_kl=1.0)
# Change it on purpose (new data, fewer weights, a smaller student): only a collapse is refused.
TRANSFORMING = Floor(min_top1_agreement=0.3, max_kl=3.0)
DISTILLED_STUDENT = Floor(min_top1_agreement=0.15, max_kl=5.0)

# Kind -> default floor; None: the stage changes no weights (serve pairs two checked artifacts).
FLOORS: dict[str, Floor | None] = {
    "lora": TRANSFORMING,
    "prune.magnitude": TRANSFORMING,
    "prune.structured": TRANSFORMING,
    "distill": DISTILLED_STUDENT,
    "quantize.ptq": NEAR_LOSSLESS,
    "quantize.qat": NEAR_LOSSLESS,
    "quantize.gptq": NEAR_LOSSLESS,
    "quantize.bnb": NEAR_LOSSLESS,
    "quantize.gguf": NEAR_LOSSLESS,
    "export.onnx": NEAR_LOSSLESS,
    "export.tensorrt": NEAR_LOSSLESS,
    "serve": None,
}


def floor_for(kind: str, min_top1_agreement: float | None, max_kl: float | None) -> Floor | None:
    """The kind's default floor with the pipeline's overrides applied."""
    default = FLOORS[kind]
    if default is None:
        return None
    return Floor(
        default.min_top1_agreement if min_top1_agreement is None else min_top1_agreement,
        default.max_kl if max_kl is None else max_kl,
    )


def check_windows(stream: torch.Tensor, tokens: int, context: int | None) -> list[torch.Tensor]:
    """Calibration windows the check scores: ``tokens`` predictions in windows that fit the context."""
    window = min(256, (context or 256) - 1)
    return token_windows(stream, tokens, window)


def measure_output(output: Backend, parent: Backend, windows: list[torch.Tensor]) -> dict[str, float]:
    """Agreement with the parent, KL from it, and the output's perplexity on the windows."""
    figures = measure_accuracy(output, parent, windows)
    return {
        "top1_agreement": round(figures["top1_agreement_with_input"], 4),
        "kl": round(figures["kl_vs_input"], 5),
        "perplexity": round(figures["perplexity"], 4),
        "tokens": figures["scored_tokens"],
    }


def judge(figures: dict[str, Any], floor: Floor) -> list[str]:
    """What falls short of the floor, one sentence each (empty: the output passed)."""
    problems = []
    if figures["top1_agreement"] < floor.min_top1_agreement:
        problems.append(f"top-1 agreement with its parent {figures['top1_agreement']:.3f} < {floor.min_top1_agreement}")
    if figures["kl"] > floor.max_kl:
        problems.append(f"KL from its parent {figures['kl']:.4f} > {floor.max_kl} nats/token")
    return problems
