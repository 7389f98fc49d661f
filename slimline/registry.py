"""The explicit registry: stage kind -> the module that implements it.

Each stage module defines ``KIND``, ``REQUIRES`` (optional packages, checked by preflight),
``DEVICE`` ('cpu', 'any' or 'cuda'), a frozen pydantic ``Params`` model and
``run(params, inputs, ctx) -> StageOutput``. Modules import their heavy optional packages
inside ``run``, so listing them here never fails for a missing backend; an import error in
our own code is never swallowed.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGES: dict[str, str] = {
    "lora": "slimline.finetune.lora",
    "distill": "slimline.distill.distill",
    "prune.magnitude": "slimline.prune.magnitude",
    "prune.structured": "slimline.prune.structured",
    "quantize.qat": "slimline.quantize.qat",
    "quantize.bnb": "slimline.quantize.bnb",
    "quantize.ptq": "slimline.quantize.ptq",
    "quantize.gptq": "slimline.quantize.gptq",
    "quantize.gguf": "slimline.quantize.gguf",
    "export.onnx": "slimline.export.onnx",
    "export.tensorrt": "slimline.export.tensorrt",
    "serve": "slimline.serve.stage",
}


def stage_module(kind: str) -> ModuleType:
    """The module registered for ``kind``."""
    module = importlib.import_module(STAGES[kind])
    assert module.KIND == kind, f"{STAGES[kind]} declares KIND={module.KIND!r}, registered as {kind!r}"
    return module
