"""Where work runs: the CPU or a CUDA device, per stage, for evaluation and for the server.

A pipeline asks per stage with ``device:`` (and for evaluation with ``evaluate: {device: ...}``):
``auto`` (the default) is the first visible CUDA device where there is one and the work can run
on it, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` are taken as given. A stage kind says in its
``StageSpec.device`` where it can run: ``cpu`` kinds (torch.ao int8, llama.cpp's converter, ...)
always run on the CPU, ``any`` kinds follow the request, ``cuda`` kinds need a GPU.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # validation imports this module; torch loads only when a device is resolved
    import torch

DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DEVICE_HELP = "auto (a CUDA GPU where one is visible, else the CPU), cpu, cuda or cuda:N"
DTYPES = ("auto", "float32", "bfloat16", "float16")
# ``--dtype auto`` serves in float32 while the float32 weights take at most this share of the GPU's free memory.
FLOAT32_SHARE_OF_FREE_GPU = 0.5


def check_device_name(value: str) -> str:
    """A pydantic validator's check: one of auto, cpu, cuda, cuda:N."""
    if not DEVICE_NAME.match(value):
        raise ValueError(f"expected {DEVICE_HELP}")
    return value


def check_dtype_name(value: str) -> str:
    """One of DTYPES."""
    if value not in DTYPES:
        raise ValueError(f"expected one of {', '.join(DTYPES)}, got {value!r}")
    return value


def cuda_devices() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(requested: str, runs_on: str = "any") -> str:
    """The device a piece of work runs on: 'cpu', 'cuda:N'.

    ``runs_on`` is where the work can run (a StageSpec's device): 'cpu' work stays on the CPU
    whatever was asked (validation refuses an explicit CUDA request for it), 'cuda' work needs a GPU.
    """
    if runs_on == "cpu" or requested == "cpu":
        return "cpu"
    if requested == "auto" and runs_on != "cuda":
        return "cuda:0" if cuda_devices() else "cpu"
    return "cuda:0" if requested in ("auto", "cuda") else requested


def device_problem(device: str) -> str | None:
    """Why ``device`` (a resolved name) cannot be used here, or None."""
    if device == "cpu":
        return None
    count = cuda_devices()
    index = int(device.partition(":")[2] or 0)
    if count == 0:
        return f"{device} was asked for and no CUDA GPU is visible"
    if index >= count:
        return f"{device} was asked for and this process sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
    return None


def describe_device(device: str) -> str:
    """'cuda:0 (NVIDIA H200)', or 'cpu'."""
    if device == "cpu":
        return "cpu"
    import torch

    return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"


def inference_dtype(requested: str, device: str, float32_bytes: int | None = None) -> torch.dtype:
    """The dtype PyTorch models are served in; ``auto`` is float32 unless its weights crowd the GPU.

    Measured on an H200 (benchmarks/results/gpu_dtype.md): slimline's eager PyTorch decoding ran
    bf16 at 0.79-1.15x the float32 speed, from 36M to 6.7B parameters, one row or 16: it is bound
    by kernel launches, not by the bytes it reads, so bf16 buys memory and costs exactness (a
    near tie can flip between pass shapes). So ``auto`` keeps float32 (and the CPU always) and
    takes bf16 (fp16 on a GPU without bf16) only where the float32 weights (``float32_bytes``)
    would take more than half the device's free memory.
    """
    import torch

    if requested != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
    if device == "cpu" or float32_bytes is None:
        return torch.float32
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    if float32_bytes <= FLOAT32_SHARE_OF_FREE_GPU * free:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def float32_weight_bytes(folder: Path) -> int | None:
    """What a checkpoint folder's safetensors weights take in float32 (None: no such weights)."""
    from slimline.models import stored_dtype

    files = list(folder.glob("*.safetensors"))
    if not files or not (folder / "config.json").exists():
        return None
    return sum(file.stat().st_size for file in files) * 4 // stored_dtype(folder).itemsize
