"""Latency at batch size 1: prefill time, greedy decode tokens/s, per-token p50/p95, peak memory.

Each repeat prefills the same real prompt and decodes ``new_tokens`` greedily on the backend's
KV cache; medians over repeats are reported. Peak memory is the growth of the process's peak
resident set (Linux ``VmHWM``, reset before loading) while loading and decoding the artifact;
on a CUDA device also the growth of the device's peak allocation. Every backend returns its
logits on the CPU, so a timed step includes the device's work (no separate synchronisation).
"""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from slimline.config import LatencySettings
from slimline.evaluate.backends.base import Backend

PROC_STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def resident_kib(field: str) -> int | None:
    """A memory field (``VmRSS``, ``VmHWM``) of this process in KiB, where /proc exposes it."""
    if not PROC_STATUS.exists():
        return None
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS growth is real."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak_memory() -> int | None:
    """Reset the peak-RSS mark (Linux) and return the current RSS in KiB as the baseline."""
    release_free_memory()
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return None
    return resident_kib("VmRSS")


def peak_memory_mb(baseline_kib: int | None) -> float | None:
    """Peak RSS growth since ``reset_peak_memory``, in MB (None where not measurable)."""
    peak = resident_kib("VmHWM")
    if baseline_kib is None or peak is None:
        return None
    return max(0, peak - baseline_kib) / 1024


def reset_gpu_peak_memory(device: str) -> int | None:
    """Reset a CUDA device's peak-allocation mark; return its bytes allocated now (None on the CPU)."""
    if device == "cpu":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def gpu_peak_memory_mb(device: str, baseline_bytes: int | None) -> float | None:
    """Peak CUDA allocation growth since ``reset_gpu_peak_memory``, in MB (the model's weights included)."""
    if baseline_bytes is None:
        return None
    return max(0, torch.cuda.max_memory_allocated(device) - baseline_bytes) / 2**20


def time_one_decode(backend: Backend, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
    """Prefill time and per-token decode times (seconds) of one greedy generation."""
    started = time.perf_counter()
    logits = backend.prefill(prompt)
    prefill = time.perf_counter() - started
    steps = []
    for _ in range(new_tokens):
        token = int(logits.argmax())
        started = time.perf_counter()
        logits = backend.decode(token)
        steps.append(time.perf_counter() - started)
    return prefill, steps


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values``: the smallest value with at least ``fraction`` of them at or below it.

    The one percentile of the project (latency here, the serving benchmark's load run); ``fraction``
    is in [0, 1], ``values`` must not be empty.
    """
    ordered = sorted(values)
    rank = math.ceil(fraction * len(ordered) - 1e-9)  # 1-based; the epsilon absorbs float error in the product
    return ordered[min(len(ordered), max(1, rank)) - 1]


def measure_latency(
    backend: Backend,
    prompt: torch.Tensor,
    settings: LatencySettings,
    advance: Callable[[int], None] = lambda n: None,
) -> dict[str, float]:
    """Median prefill ms and decode tokens/s over the repeats, with per-token percentiles."""
    for _ in range(settings.warmup):
        time_one_decode(backend, prompt, settings.new_tokens)
    prefills, rates, all_steps = [], [], []
    for _ in range(settings.repeats):
        prefill, steps = time_one_decode(backend, prompt, settings.new_tokens)
        prefills.append(prefill)
        rates.append(len(steps) / sum(steps))
        all_steps += steps
        advance(1)
    return {
        "prefill_ms": statistics.median(prefills) * 1000,
        "decode_tokens_per_s": statistics.median(rates),
        "token_p50_ms": percentile(all_steps, 0.50) * 1000,
        "token_p95_ms": percentile(all_steps, 0.95) * 1000,
        "prompt_tokens": prompt.numel(),
        "new_tokens": settings.new_tokens,
        "repeats": settings.repeats,
        "threads": torch.get_num_threads(),
    }
