"""Pruning masks as plain tensor maths: True keeps a weight, False zeroes it."""

from __future__ import annotations

import torch


def layer_magnitude_mask(W: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest-magnitude (1 - sparsity) of W's entries. W: [out, in]."""
    prune_count = round(sparsity * W.numel())
    if prune_count == 0:
        return torch.ones_like(W, dtype=torch.bool)
    threshold = W.abs().flatten().kthvalue(prune_count).values
    return W.abs() > threshold


def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One magnitude threshold across all layers, so layers with large weights keep more."""
    magnitudes = torch.cat([W.abs().flatten() for W in weights.values()])
    prune_count = round(sparsity * magnitudes.numel())
    threshold = magnitudes.kthvalue(max(1, prune_count)).values
    return {name: W.abs() > threshold for name, W in weights.items()}


def n_m_mask(W: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest of every m consecutive weights along each row. W: [out, in], in % m == 0."""
    out_features, in_features = W.shape
    if in_features % m:
        raise ValueError(f"input dimension {in_features} is not a multiple of m={m}")
    groups = W.abs().reshape(out_features, in_features // m, m)
    keep = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_features, in_features)
