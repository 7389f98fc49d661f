"""Accuracy on held-out tokens: perplexity, top-1 next-token accuracy, KL divergence from the input model.

Every artifact is scored on the same token windows, so the figures compare across formats and
backends. KL is KL(input || artifact), averaged over scored tokens, in nats.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from slimline.evaluate.backends.base import Backend


def token_windows(stream: torch.Tensor, max_tokens: int, window: int) -> list[torch.Tensor]:
    """Windows of ``window + 1`` tokens, stepping by ``window``, that score ``max_tokens`` predictions."""
    tokens = stream[: max_tokens + 1]
    return [
        tokens[s : s + window + 1]
        for s in range(0, tokens.numel() - 1, window)
        if tokens[s : s + window + 1].numel() > 1
    ]


def window_statistics(logits: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None) -> dict[str, float]:
    """Summed loss, correct predictions, KL and top-1 agreement for one window.

    logits, reference: [T, V] float32; targets: [T].
    """
    vocab = min(logits.shape[-1], reference.shape[-1]) if reference is not None else logits.shape[-1]
    log_probs = torch.log_softmax(logits[:, :vocab].double(), dim=-1)
    stats = {
        "loss": -log_probs.gather(1, targets[:, None]).sum().item(),
        "correct": (log_probs.argmax(-1) == targets).sum().item(),
        "kl": 0.0,
        "agree": float(targets.numel()),
    }
    if reference is not None:
        ref_log_probs = torch.log_softmax(reference[:, :vocab].double(), dim=-1)
        stats["kl"] = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum().item()
        stats["agree"] = (ref_log_probs.argmax(-1) == log_probs.argmax(-1)).sum().item()
    return stats


def measure_accuracy(
    backend: Backend,
    reference: Backend | None,
    windows: list[torch.Tensor],
    advance: Callable[[int], None] = lambda n: None,
) -> dict[str, float]:
    """Score ``backend`` on ``windows``; ``reference`` None means the artifact is the input model."""
    totals = {"loss": 0.0, "correct": 0.0, "kl": 0.0, "agree": 0.0}
    count = 0
    for window in windows:
        inputs, targets = window[:-1], window[1:]
        ref_logits = reference.logits(inputs) if reference is not None else None
        for name, value in window_statistics(backend.logits(inputs), targets, ref_logits).items():
            totals[name] += value
        count += targets.numel()
        advance(1)
    return {
        "perplexity": math.exp(totals["loss"] / count),
        "top1_accuracy": totals["correct"] / count,
        "kl_vs_input": totals["kl"] / count,
        "top1_agreement_with_input": totals["agree"] / count,
        "scored_tokens": count,
    }
