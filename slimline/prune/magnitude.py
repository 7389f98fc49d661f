"""Unstructured magnitude pruning: zero the smallest weights of every decoder linear layer.

Pruning by weight magnitude (Han et al., 2015, "Learning both Weights and Connections"),
either to a sparsity per layer, globally across layers, or as N:M semi-structured masks
(2:4, Mishra et al., 2021). Embeddings and the LM head are left dense. The result is a plain
HF checkpoint whose zeros compress and which sparse kernels can exploit.

```yaml
- id: sparse
  kind: prune.magnitude
  params: {sparsity: 0.5, scope: per_layer}
```
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, model_validator
from transformers.pytorch_utils import Conv1D

from slimline.artifacts import Artifact
from slimline.errors import StageError
from slimline.models import decoder_layers_name, load_parent_model, save_like_parent
from slimline.prune.masks import global_magnitude_masks, layer_magnitude_mask, n_m_mask
from slimline.stage import StageContext, StageOutput, StageParams, StageSpec, same_shape

log = logging.getLogger(__name__)

SPEC = StageSpec(kind="prune.magnitude", requires=(), extra=None, device="cpu", data=())
check_shape = same_shape


class Params(StageParams):
    """What to prune and how much."""

    sparsity: float = Field(0.5, gt=0, lt=1, description="Fraction of weights set to zero (ignored for 'n:m').")
    scope: Literal["per_layer", "global"] = Field(
        "per_layer",
        description="per_layer prunes each layer equally; global ranks all layers together, sparing sensitive ones.",
    )
    pattern: Literal["unstructured", "n:m"] = Field(
        "unstructured", description="'n:m' keeps n of every m weights along a row."
    )
    n: int = Field(2, ge=1, description="For 'n:m': weights kept per group.")
    m: int = Field(4, ge=2, description="For 'n:m': group size along the input dimension.")

    @model_validator(mode="after")
    def check_n_m(self) -> Params:
        """N must be smaller than m."""
        if self.pattern == "n:m" and self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be smaller than m ({self.m}) for the 'n:m' pattern")
        return self


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear layers inside the decoder blocks (not embeddings, not the LM head); GPT-2's Conv1D counts."""
    container = decoder_layers_name(model)
    if container is None:
        return {}
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D) and name.startswith(f"{container}.")
    }


def oriented_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as [out, in] (a view for Conv1D, which stores [in, out]), so N:M groups run along inputs."""
    return layer.weight.data.T if isinstance(layer, Conv1D) else layer.weight.data


def run(params: Params, inputs: list[Artifact], ctx: StageContext) -> StageOutput:
    """Zero weights by magnitude and save the sparse checkpoint."""
    parent = inputs[0]
    model = load_parent_model(parent, SPEC.kind)
    layers = decoder_linears(model)
    if not layers:
        raise StageError(f"found no linear layers inside the decoder blocks of {type(model).__name__} to prune")
    weights = {name: oriented_weight(layer) for name, layer in layers.items()}
    if params.pattern == "n:m":
        masks = {name: n_m_mask(W, params.n, params.m) for name, W in weights.items()}
    elif params.scope == "global":
        masks = global_magnitude_masks(weights, params.sparsity)
    else:
        masks = {name: layer_magnitude_mask(W, params.sparsity) for name, W in weights.items()}
    with torch.no_grad():
        for name, mask in masks.items():
            weights[name].mul_(mask)
    zeros = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    log.info("%s: %.1f%% of %d decoder weights are zero", ctx.stage_id, 100 * zeros / total, total)
    save_like_parent(model, ctx.work_dir, parent)
    per_layer = {name: round(float((~m).float().mean()), 4) for name, m in masks.items()}
    return StageOutput(
        format="hf", metrics={"sparsity": zeros / total, "pruned_weights": zeros, "layer_sparsity": per_layer}
    )
