"""PyTorch backend: HF checkpoints and peft adapters through transformers, with its KV cache."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DynamicCache

from slimline.evaluate.backends.base import Backend
from slimline.models import load_causal_lm


def packed_linear(module: torch.nn.Module) -> bool:
    """True for a linear layer whose weights are not one float ``(out, in)`` parameter.

    torch.ao's int8 ``nnq.Linear``/``nnqd.Linear`` keep theirs packed (``module.weight()``), gptqmodel's
    quant-linear layers in ``qweight`` buffers, bitsandbytes' 4-bit layers in half-size packed
    parameters. Wrappers that hold linear layers (peft's LoRA layers) are not packed themselves.
    """
    features = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if not all(isinstance(n, int) for n in features):
        return False
    if any(hasattr(child, "in_features") for _, child in module.named_modules() if child is not module):
        return False
    weight = module._parameters.get("weight")
    return weight is None or weight.numel() != features[0] * features[1]


def bias_count(module: torch.nn.Module) -> int:
    """Elements of a layer's bias: a parameter, a buffer, or torch.ao's ``bias()`` method; 0 when it has none."""
    bias = getattr(module, "bias", None)
    if callable(bias) and not isinstance(bias, torch.Tensor):
        bias = bias()
    return bias.numel() if isinstance(bias, torch.Tensor) else 0


def shares_input_embeddings(model: torch.nn.Module, module: torch.nn.Module) -> bool:
    """True when ``module`` is the LM head of a model whose config ties it to its input embeddings.

    Quantizing a tied LM head stores a packed copy of the embedding matrix; it is still one
    logical matrix, counted once, as in the float model.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return False
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    head = getattr(head, "linear", head)  # slimline's static int8 wrapper
    shape = getattr(getattr(embeddings, "weight", None), "shape", None)
    return head is module and shape == (module.out_features, module.in_features)


def logical_parameter_count(model: torch.nn.Module) -> int:
    """Parameters as the float model has them: a packed (quantized) linear layer counts ``in x out`` + bias.

    ``model.parameters()`` alone misses quantized weights held in packed params or buffers, so an
    int8 or GPTQ model would seem to have little more than its embeddings.
    """
    packed = {name: module for name, module in model.named_modules() if name and packed_linear(module)}
    total = sum(
        parameter.numel()
        for name, parameter in model.named_parameters()
        if not any(name.startswith(prefix + ".") for prefix in packed)
    )
    for module in packed.values():
        if not shares_input_embeddings(model, module):
            total += module.in_features * module.out_features + bias_count(module)
    return total


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

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits, no cache kept."""
        return self.model(input_ids=input_ids[None], use_cache=False).logits[0].float()

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Fresh KV cache filled with the prompt."""
        self.cache = DynamicCache()
        output = self.model(input_ids=input_ids[None], past_key_values=self.cache, use_cache=True)
        return output.logits[0, -1].float()

    @torch.inference_mode()
    def decode(self, token: int) -> torch.Tensor:
        """One step on the KV cache."""
        output = self.model(input_ids=torch.tensor([[token]]), past_key_values=self.cache, use_cache=True)
        return output.logits[0, -1].float()

    def parameter_count(self) -> int | None:
        """Logical parameters of the loaded module, quantized layers included (a peft model counts its adapter too)."""
        return logical_parameter_count(self.model)

    def close(self) -> None:
        """Drop the model and cache."""
        self.model = None
        self.cache = None
