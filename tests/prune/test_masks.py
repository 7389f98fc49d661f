"""Pruning masks on small weight matrices, without the framework."""

from __future__ import annotations

import pytest
import torch

from slimline.prune.masks import global_magnitude_masks, layer_magnitude_mask, n_m_mask

pytestmark = pytest.mark.unit


def test_layer_mask_prunes_the_smallest_fraction() -> None:
    W = torch.arange(1, 49, dtype=torch.float32).reshape(8, 6) * torch.tensor([1.0, -1.0]).repeat(24).reshape(8, 6)
    mask = layer_magnitude_mask(W, 0.25)
    assert (~mask).sum() == 12
    assert W.abs()[~mask].max() < W.abs()[mask].min()


def test_global_mask_spares_the_layer_with_larger_weights() -> None:
    small, large = torch.randn(8, 6) * 0.01, torch.randn(8, 6)
    masks = global_magnitude_masks({"small": small, "large": large}, 0.5)
    assert (~masks["small"]).sum() > (~masks["large"]).sum()
    assert int((~masks["small"]).sum() + (~masks["large"]).sum()) == 48


def test_two_four_mask_keeps_two_of_every_four() -> None:
    W = torch.randn(8, 8)
    mask = n_m_mask(W, 2, 4)
    assert (mask.reshape(8, 2, 4).sum(-1) == 2).all()
    kept = W.abs().reshape(8, 2, 4)[mask.reshape(8, 2, 4)].reshape(8, 2, 2)
    dropped = W.abs().reshape(8, 2, 4)[~mask.reshape(8, 2, 4)].reshape(8, 2, 2)
    assert (kept.min(-1).values >= dropped.max(-1).values).all()
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        n_m_mask(torch.randn(8, 6), 2, 4)
