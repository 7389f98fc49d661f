"""What the runner hands a stage and what a stage hands back.

A stage's ``run(params, inputs, ctx)`` reads its parent artifact(s), writes model files into
``ctx.work_dir`` and returns a ``StageOutput``. The runner owns everything else: the manifest,
atomic publishing, tokenizer files, caching and reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from slimline.progress import Progress


class StageParams(BaseModel):
    """Base of every stage's ``Params``: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class StageContext:
    """Everything a stage may use besides its params and inputs."""

    stage_id: str
    work_dir: Path
    seed: int
    data: DataAccess
    progress: Progress = field(default_factory=Progress)


@dataclass
class StageOutput:
    """What a stage produced: its format and the figures only it can measure (loss curve, sparsity)."""

    format: str
    metrics: dict[str, Any] = field(default_factory=dict)
    base_model_path: Path | None = None  # peft adapters: the model they apply to


@dataclass(frozen=True)
class ModelShape:
    """What validation knows of a model before any weights load: its config and linear-layer names."""

    config: dict[str, Any]
    linear_names: frozenset[str]

    def changed(self, **config_changes: Any) -> ModelShape:
        """The same model with some config fields changed (a stage's output)."""
        return ModelShape({**self.config, **config_changes}, self.linear_names)


ShapeProblems = list[tuple[tuple[str, ...], str]]


def same_shape(params: StageParams, shape: ModelShape) -> tuple[ShapeProblems, ModelShape]:
    """``check_shape`` for stages that neither need nor change anything of the model's shape."""
    return [], shape


class DataAccess:
    """Tokenized data for stages, loaded on first use and shared within a run."""

    def __init__(self, loader: Callable[[str], torch.Tensor]) -> None:
        """``loader(split)`` returns the token stream of a split."""
        self._loader = loader
        self._streams: dict[str, torch.Tensor] = {}

    def stream(self, split: str) -> torch.Tensor:
        """The packed token stream of ``train``, ``eval`` or ``calibration``."""
        if split not in self._streams:
            self._streams[split] = self._loader(split)
        return self._streams[split]
