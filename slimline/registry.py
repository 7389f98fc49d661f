"""The explicit registry: stage kind -> the module that implements it, and the stage contract it checks.

A stage module defines four names, and the registry checks all of them the first time it imports
the module (``stage_module``), so a module that breaks the contract fails at once with its name:

- ``SPEC``: a ``slimline.stage.StageSpec`` (kind, optional packages and their pip extra, device,
  data splits, extra inputs, skip hint, missing-tools hook); ``SPEC.kind`` equals the registered kind;
- ``Params``: a frozen pydantic model, subclass of ``StageParams``;
- ``check_shape(params, shape) -> (problems, output shape)``: validation against the model the
  stage will meet, called on the predicted shape when the pipeline is validated and on the real
  parent's shape by the runner before ``run``;
- ``run(params, inputs, ctx) -> StageOutput``.

Modules import their heavy optional packages inside ``run``, so listing them here never fails
for a missing backend; an import error in our own code is never swallowed.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from slimline.stage import StageParams, StageSpec

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


class StageContractError(TypeError):
    """A registered stage module does not define what the stage contract asks for (a bug, not bad input)."""


def stage_module(kind: str) -> ModuleType:
    """The module registered for ``kind``, checked against the stage contract."""
    module = importlib.import_module(STAGES[kind])
    problems = contract_problems(module, kind)
    if problems:
        raise StageContractError(f"stage module {module.__name__} (kind {kind!r}): {'; '.join(problems)}")
    return module


def stage_spec(kind: str) -> StageSpec:
    """The ``SPEC`` of the module registered for ``kind``."""
    return stage_module(kind).SPEC


def contract_problems(module: ModuleType, kind: str) -> list[str]:
    """What ``module`` lacks of the stage contract, registered as ``kind`` (empty when it complies)."""
    problems = []
    spec = getattr(module, "SPEC", None)
    if not isinstance(spec, StageSpec):
        problems.append(f"SPEC must be a slimline.stage.StageSpec, found {type(spec).__name__}")
    elif spec.kind != kind:
        problems.append(f"SPEC.kind is {spec.kind!r}, registered as {kind!r}")
    params = getattr(module, "Params", None)
    if not (isinstance(params, type) and issubclass(params, StageParams)):
        problems.append("Params must be a subclass of slimline.stage.StageParams")
    elif isinstance(spec, StageSpec):
        unknown = [name for name in spec.extra_inputs if name not in params.model_fields]
        if unknown:
            problems.append(f"SPEC.extra_inputs {unknown} are not fields of Params")
    for name in ("check_shape", "run"):
        if not callable(getattr(module, name, None)):
            problems.append(f"defines no function {name}()")
    return problems
