"""The interface every evaluation backend implements, whatever runs the artifact."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Backend(ABC):
    """Runs one artifact: full-sequence logits for accuracy, prefill + decode steps for latency."""

    name: str
    device: str = "cpu"  # where the model runs: 'cpu' or 'cuda:N'

    @abstractmethod
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for every position of ``input_ids`` (shape [T]) as float32, shape [T, vocab]."""

    @abstractmethod
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start a new sequence from a prompt (shape [T]); return the last position's logits [vocab]."""

    @abstractmethod
    def decode(self, token: int) -> torch.Tensor:
        """Append one token to the current sequence; return the next-token logits [vocab]."""

    def parameter_count(self) -> int | None:
        """Number of model parameters, where the backend can tell."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing to release
        """Release what the backend holds."""
