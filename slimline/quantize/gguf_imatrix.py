"""Importance matrix for llama.cpp's quantizer, measured in PyTorch on calibration data.

llama.cpp's imatrix is, per weight tensor, the mean squared input activation of each input
channel; the quantizer weights each weight's rounding error by it, so the channels that carry
large activations are kept more precisely. llama-cpp-python ships no ``llama-imatrix`` tool,
but ``llama_model_quantize`` takes the matrix itself (``llama_model_imatrix_data``), so the
same statistic is collected here with forward hooks on the HF model's linear layers and handed
over under the GGUF's tensor names (mapped with the ``gguf`` package's tensor-name tables).
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slimline.models import load_causal_lm

log = logging.getLogger(__name__)


def gguf_tensor_names(model: torch.nn.Module, gguf_path: Path) -> dict[str, str]:
    """HF linear-layer module name -> the GGUF tensor holding its weight (only those in the file)."""
    from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map

    reader = GGUFReader(gguf_path)
    architecture = reader.get_field("general.architecture").contents()
    arch = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}[architecture]
    mapping = get_tensor_name_map(arch, model.config.num_hidden_layers)
    present = {tensor.name for tensor in reader.tensors}
    names = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        tensor = mapping.get_name(name + ".weight", try_suffixes=(".weight",))
        if tensor in present:
            names[name] = tensor
    return names


@torch.inference_mode()
def importance_matrix(model_path: Path, gguf_path: Path, windows: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean squared input activation per input channel of every quantized linear layer, by GGUF tensor name.

    windows: [N, T] token ids of the calibration split.
    """
    model = load_causal_lm(model_path)
    names = gguf_tensor_names(model, gguf_path)
    modules = dict(model.named_modules())
    sums = {name: torch.zeros(modules[name].in_features, dtype=torch.float64) for name in names}
    counts = dict.fromkeys(names, 0)

    def record(name: str):
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, module.in_features)  # [tokens, in_features]
            sums[name] += x.double().square().sum(0)
            counts[name] += x.shape[0]

        return hook

    handles = [modules[name].register_forward_pre_hook(record(name)) for name in names]
    try:
        for window in windows:
            model(input_ids=window[None])
    finally:
        for handle in handles:
            handle.remove()
    log.info("importance matrix: %d tensors from %d calibration windows", len(names), len(windows))
    return {names[name]: (sums[name] / counts[name]).float().numpy() for name in names}


@dataclass
class ImatrixData:
    """A NULL-terminated ``llama_model_imatrix_data`` array and the buffers it points into (kept alive)."""

    entries: ctypes.Array
    buffers: list[np.ndarray]
    names: list[bytes]


def imatrix_array(importance: dict[str, np.ndarray]) -> ImatrixData:
    """The importance matrix as llama.cpp's C array (one entry per tensor, then a NULL name)."""
    import llama_cpp

    entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
    buffers = [np.ascontiguousarray(values, dtype=np.float32) for values in importance.values()]
    names = [name.encode() for name in importance]
    for entry, name, values in zip(entries, names, buffers, strict=False):
        entry.name = name
        entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = values.size
    entries[len(importance)].name = None
    return ImatrixData(entries, buffers, names)
