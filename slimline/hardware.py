"""What this machine can run fast: CPU features, and the training precision chosen from them.

bf16 is only a speed-up where the hardware computes it natively: CUDA devices with bf16 (for
steps large enough to be bound by arithmetic), and CPUs with AMX or AVX512-BF16. Elsewhere (an
AVX2-only CPU, say) PyTorch emulates it and a bf16 matmul measured 37x slower than float32. So
``precision: auto`` picks bf16 only where the capability flags say it is native *and* a one-off
micro-benchmark, cached per machine, confirms that it is not slower than float32; otherwise
float32. The choice and its reason go into the stage's report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from slimline import cache_dir

log = logging.getLogger(__name__)

# CPU flags that decide which kernels are fast: bf16 (AMX, AVX512-BF16) and int8 dot products (VNNI).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
VNNI_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
REPORTED_FLAGS = ("avx2", "avx512f", *BF16_FLAGS, *VNNI_FLAGS)
# The micro-benchmark: one [M, K] x [K, N] matmul, small enough to take milliseconds even where bf16 is emulated.
BENCH_SHAPE = (128, 256, 384)
BENCH_REPEATS = 7

Precision = Literal["auto", "bf16", "fp32"]
# On a GPU, bf16 autocast pays once a training step is bound by arithmetic, not by kernel launches.
# Measured on an H200 through train_steps (full fine-tuning, 1024 tokens a step;
# benchmarks/results/gpu_dtype.md): bf16 ran at 0.59x the fp32 speed with 36M parameters, 0.96x
# with 163M and 2.04x with 1.78B. Below this many parameter-tokens per micro-batch, autocast's
# casts only add launches to a launch-bound step.
BF16_MIN_PARAMETER_TOKENS = 2e11


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a training stage runs in, and why."""

    requested: str
    chosen: Literal["bf16", "fp32"]
    reason: str
    bf16_slowdown: float | None = None  # bf16 time / float32 time of the micro-benchmark, where measured

    def as_record(self) -> dict[str, object]:
        """The choice as a report entry."""
        return {key: value for key, value in asdict(self).items() if value is not None}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module knows."""
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read.

    ``SLIMLINE_CPU_FLAGS`` (space-separated) replaces them: it shows what slimline would choose on
    another kind of CPU (say ``avx2 fma`` for an AVX2-only one), for tests and for planning.
    """
    override = os.environ.get("SLIMLINE_CPU_FLAGS")
    if override is not None:
        return frozenset(override.split())
    for line in _cpuinfo_lines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _cpuinfo_lines() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.read_text(errors="replace").splitlines() if cpuinfo.exists() else []


def reported_flags(flags: frozenset[str] | None = None) -> list[str]:
    """The flags that decide kernel speed here, for reports and benchmark results."""
    flags = cpu_flags() if flags is None else flags
    return [flag for flag in REPORTED_FLAGS if flag in flags]


def machine_description() -> str:
    """One line naming the CPU, its core count and the flags that matter, e.g. for a benchmark table."""
    flags = reported_flags()
    return f"{cpu_model()}, {os.cpu_count()} cores, flags: {' '.join(flags) if flags else 'none of ' + ' '.join(REPORTED_FLAGS)}"


def has_native_bf16(flags: frozenset[str]) -> bool:
    """True where the CPU computes bf16 in hardware (AMX or AVX512-BF16)."""
    return any(flag in flags for flag in BF16_FLAGS)


def has_vnni(flags: frozenset[str]) -> bool:
    """True where the CPU has int8 dot-product instructions (VNNI), which int8 GEMM kernels rely on."""
    return any(flag in flags for flag in VNNI_FLAGS)


def safe_int8_weight_bits(flags: frozenset[str] | None = None) -> int:
    """8, or 7 on CPUs without VNNI, whose int8 kernels add pairs of 8-bit products in 16 bits.

    Without VNNI, x86 int8 GEMMs multiply with ``vpmaddubsw``, which saturates at 32767 when two
    products of 255 x 127 are summed; 7-bit weights (-63..63) keep every pair below it.
    """
    return 8 if has_vnni(cpu_flags() if flags is None else flags) else 7


def decide_precision(
    requested: Precision,
    *,
    cuda_bf16: bool | None,
    native_bf16: bool,
    bf16_slowdown: float | None,
    parameter_tokens: float | None = None,
) -> PrecisionChoice:
    """The precision to train in: the decision alone, from what was detected and measured.

    ``cuda_bf16`` is None on a CPU run; ``bf16_slowdown`` is bf16 time over float32 time of the
    micro-benchmark (None where it was not measured); ``parameter_tokens`` is the model's
    parameters times the tokens of one micro-batch, the size of a step (None: unknown).
    """
    if cuda_bf16 is not None:
        if requested != "auto":
            return PrecisionChoice(requested, requested, "as requested")
        if not cuda_bf16:
            return PrecisionChoice(requested, "fp32", "CUDA device without bf16")
        if parameter_tokens is not None and parameter_tokens < BF16_MIN_PARAMETER_TOKENS:
            return PrecisionChoice(
                requested,
                "fp32",
                f"CUDA device with bf16, but a step of {parameter_tokens:.1e} parameter-tokens is bound by kernel "
                f"launches: bf16 autocast measured slower than fp32 below {BF16_MIN_PARAMETER_TOKENS:.0e}",
            )
        return PrecisionChoice(requested, "bf16", "CUDA device with bf16")
    measured = f"; bf16 matmul measured {bf16_slowdown:.2f}x the float32 time" if bf16_slowdown else ""
    if requested == "fp32":
        return PrecisionChoice(requested, "fp32", "as requested", bf16_slowdown)
    if requested == "bf16":
        reason = "as requested" + ("" if native_bf16 else f" (this CPU has no native bf16{measured})")
        return PrecisionChoice(requested, "bf16", reason, bf16_slowdown)
    if not native_bf16:
        return PrecisionChoice(requested, "fp32", f"this CPU has no AVX512-BF16 or AMX{measured}", bf16_slowdown)
    if bf16_slowdown is not None and bf16_slowdown > 1.0:
        return PrecisionChoice(requested, "fp32", f"native bf16 flags, but{measured}", bf16_slowdown)
    return PrecisionChoice(requested, "bf16", f"native bf16 (AVX512-BF16 or AMX){measured}", bf16_slowdown)


def choose_precision(
    requested: Precision, device: str = "cpu", parameter_tokens: float | None = None
) -> PrecisionChoice:
    """Decide the training precision for ``device`` ('cpu', 'cuda:N'); warn when an explicit bf16 will be slow.

    ``parameter_tokens`` (parameters x tokens per micro-batch) decides ``auto`` on a GPU.
    """
    if device != "cpu":
        return decide_precision(
            requested,
            cuda_bf16=torch.cuda.is_bf16_supported(),
            native_bf16=False,
            bf16_slowdown=None,
            parameter_tokens=parameter_tokens,
        )
    native = has_native_bf16(cpu_flags())
    slowdown = measured_bf16_slowdown() if requested != "fp32" else None
    choice = decide_precision(requested, cuda_bf16=None, native_bf16=native, bf16_slowdown=slowdown)
    if choice.chosen == "bf16" and slowdown is not None and slowdown > 1.0:
        log.warning(
            "precision bf16 on a CPU where a bf16 matmul measured %.1fx slower than float32; "
            "set precision: auto (or fp32) for speed",
            slowdown,
        )
    log.info("training precision %s (%s): %s", choice.chosen, requested, choice.reason)
    return choice


def measured_bf16_slowdown() -> float:
    """bf16 over float32 time of one small matmul: measured once per machine and torch build, then cached."""
    cache = cache_dir() / "hardware.json"
    machine = machine_key()
    cached = _read_json(cache)
    if machine in cached:
        return float(cached[machine])
    slowdown = benchmark_bf16_slowdown()
    cached[machine] = round(slowdown, 3)
    cache.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_suffix(f".tmp-{os.getpid()}")
    temporary.write_text(json.dumps(cached, indent=2) + "\n")
    temporary.replace(cache)
    return slowdown


def benchmark_bf16_slowdown() -> float:
    """Median time of a bf16 matmul over the float32 one, on the threads torch uses."""
    m, k, n = BENCH_SHAPE
    a, b = torch.randn(m, k), torch.randn(k, n)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        torch.mm(x, y)  # warm-up: kernel selection, first-touch
        samples = []
        for _ in range(BENCH_REPEATS):
            started = time.perf_counter()
            torch.mm(x, y)
            samples.append(time.perf_counter() - started)
        times[dtype] = statistics.median(samples)
    return times[torch.bfloat16] / max(times[torch.float32], 1e-9)


def machine_key() -> str:
    """Identifies what the micro-benchmark depends on: CPU model and flags, torch version, threads."""
    text = json.dumps([cpu_model(), sorted(cpu_flags()), torch.__version__, torch.get_num_threads()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
