"""Evaluation: the one yardstick (accuracy + latency + size) for every artifact, through its backend."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from slimline.artifacts import Artifact
from slimline.config import EvaluateConfig
from slimline.devices import describe_device, resolve_device
from slimline.evaluate.accuracy import measure_accuracy, token_windows
from slimline.evaluate.backends import backend_name, open_backend
from slimline.evaluate.backends.base import Backend
from slimline.evaluate.latency import (
    gpu_peak_memory_mb,
    measure_latency,
    peak_memory_mb,
    reset_gpu_peak_memory,
    reset_peak_memory,
)
from slimline.progress import Progress
from slimline.stage import DataAccess

log = logging.getLogger(__name__)


@dataclass
class Evaluator:
    """Measures artifacts against the input model on fixed held-out tokens."""

    settings: EvaluateConfig
    data: DataAccess
    reference_artifact: Artifact
    progress: Progress = field(default_factory=Progress)
    _reference: Backend | None = None

    @property
    def device(self) -> str:
        """Where PyTorch artifacts are measured: the settings' device, resolved on this machine."""
        return resolve_device(self.settings.device)

    def windows(self) -> list[torch.Tensor]:
        """The held-out windows every artifact is scored on."""
        stream = self.data.stream("eval")
        return token_windows(stream, self.settings.accuracy.max_tokens, self.settings.accuracy.window)

    def prompt(self) -> torch.Tensor:
        """The real-text prompt every latency measurement starts from."""
        return self.data.stream("eval")[: self.settings.latency.prompt_tokens]

    def reference(self) -> Backend:
        """The input model, loaded once per run, for KL divergence and agreement."""
        if self._reference is None:
            self._reference = open_backend(self.reference_artifact, self.device)
        return self._reference

    def evaluate(self, artifact: Artifact, label: str) -> dict[str, Any]:
        """Accuracy, latency, memory and size of one artifact."""
        is_reference = artifact.key == self.reference_artifact.key
        prompt = self.prompt()  # tokenize before the memory baseline is taken
        baseline = reset_peak_memory()
        gpu_baseline = reset_gpu_peak_memory(self.device)
        backend = open_backend(artifact, self.device)
        try:
            with self.progress.task(f"{label}: latency", self.settings.latency.repeats) as advance:
                latency = measure_latency(backend, prompt, self.settings.latency, advance)
            latency["peak_memory_mb"] = peak_memory_mb(baseline)
            if backend.device != "cpu":
                latency["gpu_peak_memory_mb"] = gpu_peak_memory_mb(backend.device, gpu_baseline)
            windows = self.windows()
            reference = None if is_reference else self.reference()
            with self.progress.task(f"{label}: accuracy", len(windows)) as advance:
                accuracy = measure_accuracy(backend, reference, windows, advance)
            parameters = backend.parameter_count()
        finally:
            backend.close()
        return {
            "backend": backend_name(artifact),
            "device": describe_device(backend.device),
            "accuracy": accuracy,
            "latency": latency,
            "size_mb": artifact.size_bytes() / 1e6,
            "parameters": parameters,
        }

    def close(self) -> None:
        """Release the reference model."""
        if self._reference is not None:
            self._reference.close()
            self._reference = None
