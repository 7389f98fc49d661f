"""Evaluation backends: any artifact's runtime model (``slimline/runtime``), or a speculative pair.

The evaluator asks three things of a model (full-sequence logits, a prompt prefill, one-token
decode steps); ``RuntimeBackend`` answers them with a ``RuntimeModel`` of the artifact's format,
so the evaluator and the server run every format through the same code.
"""

from __future__ import annotations

import torch

from slimline.artifacts import Artifact
from slimline.errors import ArtifactError
from slimline.evaluate.backends.base import Backend
from slimline.runtime import RUNTIME_BY_FORMAT, RuntimeModel, open_model

BACKEND_BY_FORMAT = {**RUNTIME_BY_FORMAT, "serve": "speculative"}


def backend_name(artifact: Artifact) -> str:
    """The backend that runs this artifact's format."""
    if artifact.format not in BACKEND_BY_FORMAT:
        raise ArtifactError(f"no evaluation backend for format {artifact.format!r} ({artifact.path})")
    return BACKEND_BY_FORMAT[artifact.format]


class RuntimeBackend(Backend):
    """The evaluator's interface over one runtime model and one sequence on it."""

    def __init__(self, model: RuntimeModel) -> None:
        self.model = model
        self.name = model.backend
        self.device = model.device
        self.sequence = None

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for every position, from an empty cache (nothing kept; a decoding sequence ends first)."""
        self._close_sequence()
        return self.model.logits(input_ids)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """A new sequence from the prompt; the last position's logits."""
        self._close_sequence()
        self.sequence = self.model.new_sequence()
        return self.sequence.extend(input_ids.tolist(), all_logits=False)[-1]

    def decode(self, token: int) -> torch.Tensor:
        """One token on the current sequence."""
        return self.sequence.extend([token], all_logits=False)[-1]

    def parameter_count(self) -> int | None:
        """What the runtime counts."""
        return self.model.parameter_count()

    def close(self) -> None:
        """Release the sequence and the model."""
        self._close_sequence()
        self.model.close()

    def _close_sequence(self) -> None:
        if self.sequence is not None:
            self.sequence.close()
            self.sequence = None


def open_backend(artifact: Artifact, device: str = "cpu") -> Backend:
    """Load the artifact into the backend that runs its format (PyTorch models onto ``device``)."""
    backend_name(artifact)
    if artifact.format == "serve":
        from slimline.evaluate.backends.speculative_backend import SpeculativeBackend

        return SpeculativeBackend(artifact.path, device)
    return RuntimeBackend(open_model(artifact.path, device=device))
