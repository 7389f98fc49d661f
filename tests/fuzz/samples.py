"""Valid inputs for every entry point, small and built without running a model, for the hostile and fuzz tests."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

VALID_PIPELINE = """\
name: demo
model: builtin:stdlib-coder
seed: 3
evaluate:
  accuracy: {max_tokens: 2048, window: 128}
  latency: {prompt_tokens: 32, new_tokens: 8, repeats: 2, warmup: 0}
stages:
  - id: tuned
    kind: lora
    params: {rank: 4, steps: 2}
  - id: sparse
    kind: prune.magnitude
    params:
      sparsity: 0.5
release:
  candidate: sparse
  max_perplexity_increase: 0.5
"""


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The 'billion laughs' shape: each anchor repeats the previous one ``width`` times, ``levels`` deep."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join([*lines, "name: bomb", "model: builtin:stdlib-coder"]) + "\n"


def stage_entry(stage: str, kind: str, parent: str | None, perplexity: float, speed: float, size: float) -> dict:
    """One measured entry of summary.json."""
    return {
        "stage": stage,
        "kind": kind,
        "status": "ran",
        "reason": "",
        "parent": parent,
        "format": "hf" if kind != "input" else "source",
        "backend": "pytorch",
        "key": f"key-{stage}",
        "params": {} if kind == "input" else {"sparsity": 0.5},
        "metrics": {
            "accuracy": {"perplexity": perplexity, "top1_accuracy": 0.4, "kl_vs_input": 0.01},
            "latency": {"prefill_ms": 5.0, "decode_tokens_per_s": speed, "token_p95_ms": 9.0, "peak_memory_mb": 80.0},
            "size_mb": size,
            "parameters": 1000,
        },
        "deltas": {"input": {"perplexity_change": 0.01, "decode_speedup": 1.1, "size_ratio": 0.9}},
        "stage_seconds": 1.0,
        "produce_seconds": 1.0,
        "evaluate_seconds": 1.0,
    }


def valid_summary() -> dict[str, Any]:
    """A finished run's summary.json: the input model and one candidate, with a release block."""
    return {
        "pipeline": "demo",
        "source": "/tmp/demo.yaml",
        "ok": True,
        "seconds": 12.5,
        "seed": 0,
        "release": {"candidate": "sparse", "max_perplexity_increase": 0.5, "max_size_mb": 100.0},
        "stages": [
            stage_entry("input", "input", None, 10.0, 100.0, 40.0),
            stage_entry("sparse", "prune.magnitude", "input", 10.1, 110.0, 36.0),
        ],
    }


def valid_manifest() -> dict[str, Any]:
    """A run's manifest.json with the fields compare and the HTML report read."""
    return {
        "created": "2026-01-01T00:00:00+00:00",
        "seed": 0,
        "pipeline": {"path": "/tmp/demo.yaml", "sha256": "0" * 64, "config": {"evaluate": {"accuracy": {}}}},
        "model": "builtin:stdlib-coder",
        "python": "3.11.7",
        "platform": "Linux",
        "libraries": {"torch": "2.13.0"},
        "hardware": {"cpu": "CPU", "cpu_count": 2, "torch_threads": 2, "gpus": []},
        "data": {"eval": {"source": "builtin:stdlib/eval", "sha256": "1" * 64}},
    }


def write_run(folder: Path, summary: Any = None, manifest: Any = None) -> Path:
    """A run folder holding the given (default: valid) summary.json and manifest.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in (("summary.json", summary), ("manifest.json", manifest)):
        value = (
            copy.deepcopy(value)
            if value is not None
            else (valid_summary if name == "summary.json" else valid_manifest)()
        )
        if isinstance(value, bytes):
            (folder / name).write_bytes(value)
        else:
            (folder / name).write_text(value if isinstance(value, str) else json.dumps(value))
    return folder
