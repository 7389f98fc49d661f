"""Turning logits into tokens: greedy, or sampling with temperature, top-k and top-p.

The same warping is applied to the target's and the draft's logits, so speculative sampling
reproduces sampling from the *warped* target distribution, as plain sampling would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. ``temperature == 0`` is greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        """Whether tokens are the argmax (no randomness)."""
        return self.temperature == 0


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities over the vocabulary after temperature, top-k and top-p (float64 for exact ratios)."""
    scores = logits.double() / params.temperature
    if 0 < params.top_k < scores.numel():
        threshold = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        ordered, order = torch.sort(probabilities, descending=True)
        before = torch.cumsum(ordered, dim=-1) - ordered  # mass of the strictly more likely tokens
        ordered = ordered.masked_fill(before >= params.top_p, 0.0)  # the top token always stays
        probabilities = torch.zeros_like(probabilities).scatter(0, order, ordered)
        probabilities /= probabilities.sum()
    return probabilities


def sample(probabilities: torch.Tensor, generator: torch.Generator) -> int:
    """One token drawn from ``probabilities``."""
    return int(torch.multinomial(probabilities, 1, generator=generator))
