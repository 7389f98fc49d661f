"""PyTorch runtime: HF checkpoints (float, torch-int8, GPTQ) and peft adapters through transformers.

Each sequence keeps its own keys/values per layer. A batched pass pads the rows' caches into
one transformers ``DynamicCache`` with an attention mask and per-row position ids
(``slimline/runtime/ragged.py``), and hands each row back its own part.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import DynamicCache

from slimline.models import cache_keyword
from slimline.runtime.base import Feed, RuntimeModel, Sequence, check_feeds
from slimline.runtime.ragged import pad_caches, ragged_batch, row_cache, row_logits


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


def cpu_only_checkpoint(path: Path) -> bool:
    """True for torch.ao int8 checkpoints and library-quantized ones (GPTQ, bitsandbytes): run on the CPU."""
    if (path / "int8_recipe.json").exists():
        return True
    config = path / "config.json"
    return config.exists() and "quantization_config" in json.loads(config.read_text())


class TorchSequence(Sequence):
    """A sequence's keys and values, layer by layer (key then value), each [1, kv_heads, length, head_dim]."""

    def __init__(self, model: TorchModel) -> None:
        self.model = model
        self.past: list[torch.Tensor] = []
        self.length = 0

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions of every layer's keys and values."""
        if length < self.length:
            self.past = [cache[:, :, :length] for cache in self.past] if length else []
        self.length = min(length, self.length)


class TorchModel(RuntimeModel):
    """An HF causal LM (or base + peft adapter) run by PyTorch: float32 on the CPU, or on a CUDA device.

    torch.ao int8 layers and library-quantized checkpoints (GPTQ, bitsandbytes) stay on the CPU,
    where their kernels are the ones this project tests; ``device`` says where the model ended up.
    """

    backend = "pytorch"

    def __init__(
        self,
        model_path: Path,
        adapter_path: Path | None = None,
        name: str | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Load the model, and the adapter on top of it when one is given, onto ``device`` in ``dtype``."""
        from slimline.models import load_causal_lm

        self.device = "cpu" if cpu_only_checkpoint(model_path) else device
        model = load_causal_lm(model_path, dtype=dtype if self.device != "cpu" else torch.float32)
        if adapter_path is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_path).eval()
        self.model = model.to(self.device)
        self.name = name or model_path.name
        self.context_length = model.config.max_position_embeddings

    def new_sequence(self) -> TorchSequence:
        """A sequence with an empty cache."""
        return TorchSequence(self)

    @torch.inference_mode()
    def forward(self, feeds: list[Feed]) -> list[torch.Tensor]:
        """One transformers forward over the padded batch; each row keeps its own new keys/values."""
        check_feeds(feeds, self.context_length)
        sequences = [feed.sequence for feed in feeds]
        batch = ragged_batch([s.length for s in sequences], [feed.tokens for feed in feeds])
        device = torch.device(self.device)
        cache = DynamicCache()
        if batch.padded_past:
            template = next(s.past for s in sequences if s.past)
            pasts = [s.past or [t[:, :, :0] for t in template] for s in sequences]
            for layer in range(len(template) // 2):
                keys, values = (pad_caches([p[2 * layer + kv] for p in pasts], batch.padded_past) for kv in (0, 1))
                cache.update(keys, values, layer)
        output = self.model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            position_ids=batch.position_ids.to(device),
            use_cache=True,
            **{cache_keyword(self.model): cache},
        )
        presents = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
        for row, sequence in enumerate(sequences):
            old = sequence.past or [present[:1, :, :0] for present in presents]
            sequence.past = [row_cache(o, present, batch, row) for o, present in zip(old, presents, strict=True)]
            sequence.length += batch.new_lengths[row]
        # Logits come back to the CPU, as every runtime's do: sampling and scoring run there.
        return [row_logits(output.logits, batch, row, feed.all_logits).cpu() for row, feed in enumerate(feeds)]

    def parameter_count(self) -> int | None:
        """Logical parameters of the loaded module, quantized layers included (a peft model counts its adapter too)."""
        return logical_parameter_count(self.model)

    def close(self) -> None:
        """Drop the model."""
        self.model = None
