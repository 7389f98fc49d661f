"""The run's reproducibility manifest (``manifest.json``): what two runs must share to be compared.

It records the seed, the pipeline file (sha256 and the resolved config), the versions of every
library that can shape an artifact or a measurement (optional ones when installed), the Python
and platform, the hardware (CPU model and count, GPU name and driver when present) and a content
hash of each data split the run reads. ``slimline compare`` reads it to say what differs besides
the stages.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from slimline.artifacts import sha256_file, write_json_atomic
from slimline.config import DataSource, Pipeline
from slimline.data import load_texts, source_fingerprint

MANIFEST_JSON = "manifest.json"
# Distributions that shape an artifact or a measurement; optional ones are listed when installed.
LIBRARIES = (
    "slimline",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "peft",
    "accelerate",
    "numpy",
    "pydantic",
    "datasets",
    "bitsandbytes",
    "torchao",
    "gptqmodel",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "llama_cpp_python",
    "tensorrt",
)


def library_versions() -> dict[str, str]:
    """Installed versions of ``LIBRARIES`` (absent optional ones are left out), read without importing them.

    The one source of versions: ``manifest.json`` records them for the run, and every artifact's
    ``artifact.json`` for the libraries that made it.
    """
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu_info() -> list[dict[str, str]]:
    """Name, driver and memory of each NVIDIA GPU from nvidia-smi; torch's view when nvidia-smi is absent."""
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        result = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
        if result.returncode == 0:
            rows = [line.split(", ") for line in result.stdout.strip().splitlines() if line.strip()]
            return [{"name": r[0], "driver": r[1], "memory": r[2]} for r in rows if len(r) == 3]
    import torch

    if not torch.cuda.is_available():
        return []
    return [
        {"name": torch.cuda.get_device_name(i), "driver": "unknown (no nvidia-smi)", "cuda": str(torch.version.cuda)}
        for i in range(torch.cuda.device_count())
    ]


def hardware() -> dict[str, Any]:
    """The machine the run measured on."""
    import torch

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpu_info(),
    }


def documents_sha256(texts: list[str]) -> str:
    """sha256 over a split's documents in order (each followed by a NUL byte)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


@lru_cache(maxsize=32)
def hash_documents(source: DataSource, base: Path, fingerprint: str) -> tuple[str, int]:
    """sha256 and count of a source's documents, once per process for each fingerprint.

    The fingerprint is part of the cache key: a local file whose bytes changed is read again.
    """
    texts = load_texts(source, base)
    return documents_sha256(texts), len(texts)


def data_fingerprint(source: DataSource, base: Path, known: dict[str, Any] | None) -> dict[str, Any]:
    """A split's source, its cache fingerprint and a hash of its documents.

    Hub datasets are identified by name only (hashing them would fetch them); a hash computed
    by an earlier run with the same fingerprint is reused instead of reading the files again.
    """
    spec = source if isinstance(source, str) else source.model_dump(mode="json")
    fingerprint = source_fingerprint(source, base)
    if known and known.get("fingerprint") == fingerprint and known.get("sha256"):
        return known
    if isinstance(source, str) and source.startswith("hf:"):
        return {"source": spec, "fingerprint": fingerprint, "sha256": None, "note": "hub dataset: named, not hashed"}
    sha256, documents = hash_documents(source, base, fingerprint)
    return {"source": spec, "fingerprint": fingerprint, "sha256": sha256, "documents": documents}


def data_fingerprints(pipeline: Pipeline, splits: list[str], previous: dict[str, Any]) -> dict[str, Any]:
    """Fingerprints of the splits the run reads (``eval`` always); calibration falls back to train."""
    data = pipeline.config.data
    sources = {"train": data.train, "eval": data.eval, "calibration": data.calibration or data.train}
    known = previous.get("data", {})
    return {
        split: data_fingerprint(sources[split], pipeline.source.parent, known.get(split))
        for split in sorted({"eval", *splits})
    }


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """A run folder's manifest.json, or {} when it has none."""
    path = run_dir / MANIFEST_JSON
    return json.loads(path.read_text()) if path.exists() else {}


def write_manifest(run_dir: Path, pipeline: Pipeline, splits: list[str]) -> dict[str, Any]:
    """Write ``manifest.json`` at the run folder's root; return it."""
    manifest = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": pipeline.config.seed,
        "pipeline": {
            "path": str(pipeline.source),
            "sha256": sha256_file(pipeline.source),
            "config": pipeline.config.model_dump(mode="json", by_alias=True),
        },
        "model": pipeline.config.model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(),
        "hardware": hardware(),
        "data": data_fingerprints(pipeline, splits, read_manifest(run_dir)),
    }
    write_json_atomic(run_dir / MANIFEST_JSON, manifest)
    return manifest
