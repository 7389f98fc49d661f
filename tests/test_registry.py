"""The stage contract: every registered module has a SPEC, Params, check_shape and run, and the registry checks it."""

from __future__ import annotations

import re
import sys
import tomllib
from dataclasses import FrozenInstanceError
from pathlib import Path
from types import ModuleType

import pytest

from slimline.registry import STAGES, StageContractError, stage_module, stage_spec
from slimline.stage import StageParams, StageSpec, same_shape

pytestmark = pytest.mark.unit

PYPROJECT = tomllib.loads(Path("pyproject.toml").read_text())["project"]


def distribution(requirement: str) -> str:
    """'llama-cpp-python>=0.3.36' -> 'llama-cpp-python'."""
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def provided_by(package: str, requirements: list[str]) -> bool:
    """An import name ('llama_cpp') is brought by one of the requirements ('llama-cpp-python>=...')."""
    name = package.lower().replace("_", "-")
    return any(distribution(r) == name or distribution(r).startswith(f"{name}-") for r in requirements)


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_every_registered_module_keeps_the_contract(kind: str) -> None:
    module = stage_module(kind)
    assert isinstance(module.SPEC, StageSpec) and module.SPEC.kind == kind
    assert issubclass(module.Params, StageParams) and callable(module.check_shape) and callable(module.run)
    for old in ("KIND", "REQUIRES", "EXTRA", "DEVICE", "DATA", "EXTRA_INPUTS", "SKIP_HINT", "missing_tools"):
        assert not hasattr(module, old), f"{module.__name__} still defines {old}: it belongs in SPEC"


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_a_spec_names_the_extra_that_brings_its_packages_and_no_core_one(kind: str) -> None:
    spec = stage_spec(kind)
    core = PYPROJECT["dependencies"]
    assert not [package for package in spec.requires if provided_by(package, core)], "core dependencies need no extra"
    if spec.requires:
        extra = PYPROJECT["optional-dependencies"][spec.extra]
        assert all(provided_by(package, extra) for package in spec.requires), (spec.requires, spec.extra, extra)
    else:
        assert spec.extra is None


def test_lora_and_the_plain_torch_stages_need_no_extra() -> None:
    for kind in ("lora", "prune.magnitude", "prune.structured", "distill", "quantize.ptq", "serve"):
        assert stage_spec(kind).requires == () and stage_spec(kind).extra is None


def contract_module(name: str, **names: object) -> ModuleType:
    module = ModuleType(name)
    module.__dict__.update(names)
    return module


class NoParams(StageParams):
    """No params."""

    draft: str = "x"


def run(params, inputs, ctx):
    raise AssertionError("never run")


GOOD = {
    "SPEC": StageSpec(kind="test.kind", requires=(), extra=None, device="cpu", data=()),
    "Params": NoParams,
    "check_shape": same_shape,
    "run": run,
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # a missing name
        ({"SPEC": None}, "SPEC must be a slimline.stage.StageSpec"),
        ({"Params": None}, "Params must be a subclass of slimline.stage.StageParams"),
        ({"check_shape": None}, "defines no function check_shape()"),
        ({"run": None}, "defines no function run()"),
        # a wrong one
        (
            {"SPEC": StageSpec(kind="other", requires=(), extra=None, device="cpu", data=())},
            "registered as 'test.kind'",
        ),
        ({"Params": dict}, "Params must be a subclass"),
        (
            {
                "SPEC": StageSpec(
                    kind="test.kind", requires=(), extra=None, device="cpu", data=(), extra_inputs=("nope",)
                )
            },
            "SPEC.extra_inputs ['nope'] are not fields of Params",
        ),
    ],
)
def test_a_module_breaking_the_contract_fails_with_its_name(
    change: dict, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = {name: value for name, value in {**GOOD, **change}.items() if value is not None}
    monkeypatch.setitem(sys.modules, "tests.fake_stage", contract_module("tests.fake_stage", **names))
    monkeypatch.setitem(STAGES, "test.kind", "tests.fake_stage")
    with pytest.raises(StageContractError) as caught:
        stage_module("test.kind")
    assert "tests.fake_stage" in str(caught.value) and expected in str(caught.value)


def test_a_complete_module_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tests.fake_stage", contract_module("tests.fake_stage", **GOOD))
    monkeypatch.setitem(STAGES, "test.kind", "tests.fake_stage")
    assert stage_spec("test.kind").kind == "test.kind"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"device": "tpu"}, "device 'tpu' is not one of"),
        ({"data": ("train", "test")}, "data splits ['test'] are not among"),
        ({"requires": ("onnx",), "extra": None}, "extra names the pip extra"),
        ({"requires": (), "extra": "dev"}, "extra names the pip extra"),
    ],
)
def test_a_spec_that_contradicts_itself_is_refused(fields: dict, expected: str) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)):
        StageSpec(**{"kind": "k", "requires": (), "extra": None, "device": "cpu", "data": (), **fields})


def test_a_spec_has_no_default_for_its_core_fields_and_is_frozen() -> None:
    with pytest.raises(TypeError, match="data"):
        StageSpec(kind="k", requires=(), extra=None, device="cpu")  # type: ignore[call-arg]
    with pytest.raises(FrozenInstanceError):
        stage_spec("lora").kind = "other"  # type: ignore[misc]
