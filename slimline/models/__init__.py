"""Loading and saving HF models and tokenizers; resolving model sources.

Sources: ``builtin:stdlib-coder`` (the example model shipped in this package),
``hf:<org>/<name>[@revision]`` (hub ids, through the local cache when HF_HUB_OFFLINE=1) and
local checkpoint folders. Weights load from safetensors only: pickled ``.bin`` files are
refused, since unpickling runs arbitrary code.
"""

from __future__ import annotations

import functools
import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from slimline.artifacts import Artifact, require_full_model
from slimline.errors import ArtifactError, ConfigError
from slimline.models.checkpoint_checks import (
    config_size_problem,
    read_model_config,
    tokenizer_problem,
    weights_problem,
)
from slimline.stage import ModelShape
from slimline.untrusted import UntrustedInputError

BUILTIN_MODELS = {"stdlib-coder": Path(__file__).parent / "stdlib_coder"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def check_model_source(spec: str, base: Path) -> str | None:
    """What is wrong with a built-in or local model source (hub ids are checked when fetched)."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        return None if name in BUILTIN_MODELS else f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}"
    if spec.startswith("hf:"):
        return None
    try:
        folder = Path(spec) if Path(spec).is_absolute() else base / spec
        if folder.suffix == ".gguf":  # a GGUF file, converted into a checkpoint folder by resolve_model_source
            return None if folder.is_file() else f"GGUF file {folder} does not exist"
        has_config = (folder / "config.json").is_file()
    except (OSError, ValueError) as error:  # a path the OS cannot look up: too long, a NUL byte
        return f"not a usable path ({error})"
    if not has_config:
        return (
            f"expected 'builtin:<name>', 'hf:<org>/<name>', a checkpoint folder or a .gguf file; "
            f"{folder} has no config.json"
        )
    return None


def resolve_model_source(spec: str, base: Path) -> Path:
    """The local folder holding the checkpoint named by ``spec`` (for a ``.gguf`` file: its converted copy)."""
    problem = check_model_source(spec, base)
    if problem:
        raise ConfigError(f"model {spec!r}: {problem}")
    if spec.startswith("builtin:"):
        return BUILTIN_MODELS[spec.removeprefix("builtin:")]
    if spec.startswith("hf:"):
        return download_hub_model(spec.removeprefix("hf:"))
    path = Path(spec) if Path(spec).is_absolute() else (base / spec).resolve()
    if path.suffix == ".gguf":  # dequantized once into an HF checkpoint folder, cached by the file's sha256
        from slimline.models.gguf_source import convert_gguf_source

        return convert_gguf_source(path)
    return path


def download_hub_model(repo: str) -> Path:
    """Fetch (or find in the cache) a hub checkpoint's config, tokenizer and safetensors weights."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except LocalEntryNotFoundError as error:
        raise ConfigError(
            f"model 'hf:{repo}' is not in the local cache and the hub is unreachable or HF_HUB_OFFLINE=1 is set"
        ) from error
    return Path(folder)


def load_causal_lm(path: Path, dtype: torch.dtype = torch.float32, quantization_config: Any = None) -> PreTrainedModel:
    """A causal LM from safetensors weights, in eval mode, optionally quantized on load (bitsandbytes)."""
    problem = weights_problem(path)
    if problem:
        raise ConfigError(problem)
    if (path / "int8_recipe.json").exists():  # torch.ao int8 layers, rebuilt from their stored tensors
        from slimline.quantize.int8 import load_int8_model

        return load_int8_model(path)
    extra = {"quantization_config": quantization_config, "device_map": "cpu"} if quantization_config else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **extra)
    except (OSError, ValueError, SafetensorError) as error:  # garbage config.json, a truncated weights file
        raise ArtifactError(f"{path}: cannot load the model: {one_line(error)}") from error
    return model.eval()


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a checkpoint; ArtifactError (with the reason) when there is none or it is broken."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as error:
        problem = tokenizer_problem(path) or f"{path}: cannot load the tokenizer: {one_line(error)}"
        raise ArtifactError(problem) from error


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """Copy tokenizer files forward into a new artifact unless the stage wrote its own."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).exists() and not (destination / name).exists():
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    return copied


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword a causal LM's forward takes its KV cache by.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in
    5.40); earlier 5.x releases know only ``past_key_values``. A PEFT wrapper passes keywords on
    to its base model, whose signature decides.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return forward_cache_keyword(type(base))


@functools.cache
def forward_cache_keyword(model_class: type) -> str:
    """``cache_keyword`` of a model class, read once: a runtime asks on every pass."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def stored_dtype(path: Path) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in, from its config (float32 if unstated)."""
    config = json.loads((path / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def save_causal_lm(model: PreTrainedModel, folder: Path, dtype: torch.dtype) -> None:
    """Save as safetensors in ``dtype`` (the parent's storage dtype, so sizes compare fairly)."""
    model.to(dtype).save_pretrained(folder, safe_serialization=True)


def load_parent_model(parent: Artifact, kind: str, quantization_config: Any = None) -> PreTrainedModel:
    """The parent artifact's model in float32 for stage ``kind`` to transform (adapters and graphs are refused)."""
    require_full_model(parent, kind)
    return load_causal_lm(parent.model_path, quantization_config=quantization_config)


def save_like_parent(model: PreTrainedModel, folder: Path, parent: Artifact) -> None:
    """Save a stage's model as safetensors in the parent's storage dtype (so sizes compare fairly)."""
    save_causal_lm(model, folder, stored_dtype(parent.model_path))


def read_model_shape(spec: str, base: Path) -> ModelShape | None:
    """Config and linear-layer names of a built-in or local model, built on the meta device (no weights).

    A config transformers cannot build a causal LM from is refused with the reason (never a traceback).
    """
    if spec.startswith("hf:"):
        return None
    path = resolve_model_source(spec, base)
    try:
        size_problem = config_size_problem(read_model_config(path))
    except UntrustedInputError as error:
        raise ConfigError(f"model {spec!r}: {error}") from error
    if size_problem:
        raise ConfigError(f"model {spec!r}: {size_problem}")
    try:
        shape = checkpoint_shape(path)
    except (ValueError, KeyError, TypeError, AttributeError, OSError, StrictDataclassError) as error:
        raise ConfigError(
            f"model {spec!r}: transformers cannot build a causal LM from {path / 'config.json'}: {one_line(error)}"
        ) from error
    problem = weights_problem(path) or tokenizer_problem(path)
    if problem:
        raise ConfigError(f"model {spec!r}: {problem}")
    return shape


def checkpoint_shape(path: Path) -> ModelShape:
    """The shape of the checkpoint in ``path`` (its ``config.json``), built on the meta device: no weights load."""
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return ModelShape(config.to_dict(), frozenset(linear_layer_names(model)), frozenset(layer_names(model, (Conv1D,))))


def linear_layer_names(model: torch.nn.Module) -> set[str]:
    """Short names of the layers peft can adapt ('q_proj', GPT-2's Conv1D 'c_attn'); bitsandbytes' Linear4bit counts too."""
    return layer_names(model, (torch.nn.Linear, Conv1D))


def layer_names(model: torch.nn.Module, types: tuple[type, ...]) -> set[str]:
    """Short names of the model's modules of the given types."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, types)}


def decoder_layers_name(model: torch.nn.Module) -> str | None:
    """Dotted name of the ModuleList holding the decoder blocks ('model.layers', GPT-2's 'transformer.h').

    The first ModuleList (in module order) with one entry per hidden layer; None if there is none.
    """
    layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return name
    return None
