"""What an artifact folder says about the checkpoint it holds or came from: its ``config.json``, or a GGUF's metadata."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from slimline.errors import ArtifactError


def checkpoint_context(folder: Path) -> int | None:
    """The context length an HF checkpoint's config.json declares (under any of its families' names), or None."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def folder_context(folder: Path) -> int:
    """The context length of the checkpoint an exported graph came from (its config.json, copied beside it)."""
    context = checkpoint_context(folder)
    if context is None:
        raise ArtifactError(f"{folder / 'config.json'} declares no context length (max_position_embeddings)")
    return context


def gguf_metadata(path: Path) -> dict[str, int | list[int]]:
    """The numbers a GGUF file's metadata declares for its architecture, by key without the architecture prefix.

    Needs the gguf package; {} without it or for a file it cannot read. Keys as llama.cpp names them:
    ``context_length``, ``block_count``, ``attention.head_count_kv``, ``attention.key_length``, ...
    Read once per file as it stands (gguf parses every field, the vocabulary too: 1.8 s for
    SmolLM2-135M), so the server's context and cache figures cost one read.
    """
    try:
        status = path.stat()
    except OSError:
        return {}
    return read_gguf_metadata(path.resolve(), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def read_gguf_metadata(path: Path, size: int, modified_ns: int) -> dict[str, int | list[int]]:
    """``gguf_metadata`` of the file at ``path`` with this size and modification time."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
    except Exception:  # no gguf package, or a file it cannot read: llama.cpp's loader says why when it loads
        return {}
    architecture = reader.get_field("general.architecture")
    if architecture is None:
        return {}
    prefix = f"{architecture.contents()}."
    figures: dict[str, int | list[int]] = {}
    for name, field in reader.fields.items():
        if name.startswith(prefix):
            value = field.contents()
            if isinstance(value, int) or (isinstance(value, list) and all(isinstance(v, int) for v in value)):
                figures[name.removeprefix(prefix)] = value
    return figures


def gguf_context(path: Path) -> int | None:
    """The training context a GGUF file's metadata declares, or None."""
    context = gguf_metadata(path).get("context_length")
    return context if isinstance(context, int) else None


def gguf_cache_bytes_per_token(path: Path, element_bytes: int = 2) -> int | None:
    """Bytes of keys and values one token holds in llama.cpp's cache (f16 by default) for a GGUF model, or None.

    Per layer: KV heads x (key length + value length); the head count may be one per layer (a list),
    and the lengths default to the embedding width over the attention heads, as llama.cpp reads them.
    """
    figures = gguf_metadata(path)
    layers, kv_heads = figures.get("block_count"), figures.get("attention.head_count_kv")
    heads, width = figures.get("attention.head_count"), figures.get("embedding_length")
    if not isinstance(layers, int) or kv_heads is None:
        return None
    per_layer_heads = kv_heads if isinstance(kv_heads, list) else [kv_heads] * layers
    first_heads = heads[0] if isinstance(heads, list) else heads
    default_length = width // first_heads if isinstance(width, int) and first_heads else None
    key = figures.get("attention.key_length", default_length)
    value = figures.get("attention.value_length", default_length)
    if not isinstance(key, int) or not isinstance(value, int):
        return None
    return sum(per_layer_heads) * (key + value) * element_bytes
