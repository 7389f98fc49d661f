"""PyTorch backend: HF checkpoints and peft adapters through transformers, with its KV cache."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DynamicCache

from slimline.evaluate.backends.base import Backend
from slimline.models import load_causal_lm


class TorchBackend(Backend):
    """Runs an HF causal LM (or base + peft adapter) in float32 on the CPU."""

    name = "pytorch"

    def __init__(self, model_path: Path, adapter_path: Path | None = None) -> None:
        """Load the model, and the adapter on top of it when one is given."""
        model = load_causal_lm(model_path)
        if adapter_path is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_path).eval()
        self.model = model
        self.cache: DynamicCache | None = None
        self.position = 0

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits, no cache kept."""
        return self.model(input_ids=input_ids[None], use_cache=False).logits[0].float()

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Fresh KV cache filled with the prompt."""
        self.cache = DynamicCache()
        output = self.model(input_ids=input_ids[None], past_key_values=self.cache, use_cache=True)
        self.position = input_ids.numel()
        return output.logits[0, -1].float()

    @torch.inference_mode()
    def decode(self, token: int) -> torch.Tensor:
        """One step on the KV cache."""
        output = self.model(input_ids=torch.tensor([[token]]), past_key_values=self.cache, use_cache=True)
        self.position += 1
        return output.logits[0, -1].float()

    def parameter_count(self) -> int | None:
        """Parameters of the loaded module (a peft model counts its adapter too)."""
        return sum(p.numel() for p in self.model.parameters())

    def close(self) -> None:
        """Drop the model and cache."""
        self.model = None
        self.cache = None
