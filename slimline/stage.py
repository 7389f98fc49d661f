"""What the runner hands a stage and what a stage hands back.

A stage's ``run(params, inputs, ctx)`` reads its parent artifact(s), writes model files into
``ctx.work_dir`` and returns a ``StageOutput``. The runner owns everything else: the manifest,
atomic publishing, tokenizer files, caching and reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from slimline.progress import Progress

if TYPE_CHECKING:  # annotations only: the registry imports this module, and listing stages loads no torch
    import torch


class StageParams(BaseModel):
    """Base of every stage's ``Params``: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Device = Literal["cpu", "any", "cuda"]
DEVICES = ("cpu", "any", "cuda")
# The data splits a stage may read through ``ctx.data.stream(split)``.
SPLITS = ("train", "eval", "calibration")


@dataclass(frozen=True)
class StageSpec:
    """What the rest of slimline needs to know about a stage kind besides its params, in one place.

    Every stage module defines ``SPEC = StageSpec(...)`` next to ``Params``, ``check_shape`` and
    ``run``; the registry checks all four when it imports the module. The first five fields have no
    default, so a spec that forgets one fails where it is written.
    """

    kind: str  # equal to the YAML ``kind``
    requires: tuple[str, ...]  # import names of the optional packages ``run`` needs (checked by preflight)
    extra: str | None  # the pip extra that brings ``requires`` (``slimline[<extra>]``); None when it is empty
    device: Device  # 'cpu' (runs on the CPU only), 'any' (where ``device:`` says; slimline/devices.py) or 'cuda'
    data: tuple[str, ...]  # the splits the stage reads; part of its cache key
    # Params fields naming other stages whose artifacts ``run`` reads after its parent (serve's draft).
    extra_inputs: tuple[str, ...] = ()
    skip_hint: str = ""  # added to preflight's reasons when the stage cannot run here (what to use instead)
    # Preflight check for needs beyond packages (llama.cpp's converter): the reasons it cannot run, or [].
    missing_tools: Callable[[], list[str]] | None = None

    def __post_init__(self) -> None:
        """Refuse a spec that contradicts itself (raised at import of the stage module)."""
        if self.device not in DEVICES:
            raise ValueError(f"StageSpec {self.kind!r}: device {self.device!r} is not one of {DEVICES}")
        unknown = sorted(set(self.data) - set(SPLITS))
        if unknown:
            raise ValueError(f"StageSpec {self.kind!r}: data splits {unknown} are not among {SPLITS}")
        if bool(self.requires) != (self.extra is not None):
            raise ValueError(
                f"StageSpec {self.kind!r}: extra names the pip extra of the optional packages in requires; "
                f"got requires={self.requires} with extra={self.extra!r}"
            )


@dataclass
class StageContext:
    """Everything a stage may use besides its params and inputs."""

    stage_id: str
    work_dir: Path
    seed: int
    data: DataAccess
    progress: Progress = field(default_factory=Progress)
    device: str = "cpu"  # where the stage runs: 'cpu' or 'cuda:N' (slimline/devices.py resolved its request)
    # Figures the shared helpers record on the stage's behalf (the training precision chosen, say);
    # the runner adds them to the stage's metrics.
    records: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageOutput:
    """What a stage produced: its format and the figures only it can measure (loss curve, sparsity)."""

    format: str
    metrics: dict[str, Any] = field(default_factory=dict)
    base_model_path: Path | None = None  # peft adapters: the model they apply to


# Per-layer fields whose names do not end in 'layer_types'.
PER_LAYER_FIELDS = ("no_rope_layers",)


def per_layer_fields(config: Mapping[str, Any], layers: int) -> list[str]:
    """Config fields holding one entry per decoder layer (``layer_types``, ``mlp_layer_types``, ...)."""
    return [
        name
        for name, value in config.items()
        if (name.endswith("layer_types") or name in PER_LAYER_FIELDS)
        and isinstance(value, list)
        and len(value) == layers
    ]


def select_layers(config: Mapping[str, Any], layers: int, kept: list[int]) -> dict[str, Any]:
    """Per-layer config fields of a ``layers``-layer model, restricted to the layers ``kept``."""
    return {name: [config[name][index] for index in kept] for name in per_layer_fields(config, layers)}


@dataclass(frozen=True)
class ModelShape:
    """What validation knows of a model before any weights load: its config and layer names.

    ``config`` is the raw ``config.json`` dict; read values through ``setting``, which goes through
    the transformers config class, so its aliases apply (GPT-2's ``n_layer`` is ``num_hidden_layers``)
    and values its constructor derives (Qwen2's ``num_key_value_heads``) are there.
    """

    config: dict[str, Any]
    # Short names of the linear layers a stage may address ('q_proj', GPT-2's Conv1D 'c_attn', ...).
    linear_names: frozenset[str]
    # Of those, the ones that are transformers' Conv1D (GPT-2 style: weight stored [in, out]).
    conv1d_names: frozenset[str] = frozenset()

    @property
    def architecture(self) -> str:
        """The model class named in the config ('GPT2LMHeadModel'), else its model_type."""
        architectures = self.config.get("architectures") or []
        return architectures[0] if architectures else str(self.config.get("model_type", "unknown architecture"))

    @property
    def model_type(self) -> str:
        """The config's model_type ('gpt2', 'llama', ...)."""
        return str(self.config.get("model_type", ""))

    @cached_property
    def config_object(self) -> Any:
        """The transformers config object of ``config``, or None where it cannot be built."""
        return config_object(self.config)

    def setting(self, name: str, default: Any = None) -> Any:
        """A config value read through the transformers config object (aliases and derived values apply)."""
        value = getattr(self.config_object, name, None) if self.config_object is not None else None
        if value is None:
            value = self.config.get(canonical_name(self.config, name))
        return default if value is None else value

    def changed(self, **config_changes: Any) -> ModelShape:
        """The same model with some config fields changed (a stage's output).

        Names go through the config class's aliases (``num_hidden_layers`` sets GPT-2's ``n_layer``); a
        new layer count keeps the first layers' entries of per-layer fields such as ``layer_types``.
        """
        changes = {canonical_name(self.config, name): value for name, value in config_changes.items()}
        layers_key = canonical_name(self.config, "num_hidden_layers")
        layers = changes.get(layers_key)
        current = self.config.get(layers_key)
        if isinstance(layers, int) and isinstance(current, int) and layers < current:
            changes = select_layers(self.config, current, list(range(layers))) | changes
        return ModelShape({**self.config, **changes}, self.linear_names, self.conv1d_names)


def canonical_name(config: Mapping[str, Any], name: str) -> str:
    """The key under which the model's config class stores ``name`` (GPT-2: num_hidden_layers -> n_layer)."""
    config_class = config_class_of(config)
    return config_class.attribute_map.get(name, name) if config_class is not None else name


def config_class_of(config: Mapping[str, Any]) -> Any:
    """The transformers config class registered for the config's model_type, or None."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    return CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None


def config_object(config: Mapping[str, Any]) -> Any:
    """The transformers config object built from a config dict, or None when it cannot be built."""
    config_class = config_class_of(config)
    if config_class is None:
        return None
    try:
        return config_class.from_dict(dict(config))
    except Exception:  # an inconsistent config: callers fall back to the raw dict
        return None


ShapeProblems = list[tuple[tuple[str, ...], str]]


def same_shape(params: StageParams, shape: ModelShape) -> tuple[ShapeProblems, ModelShape]:
    """``check_shape`` for stages that neither need nor change anything of the model's shape."""
    return [], shape


class DataAccess:
    """Tokenized data for stages, loaded on first use and shared within a run."""

    def __init__(self, loader: Callable[[str], torch.Tensor]) -> None:
        """``loader(split)`` returns the token stream of a split."""
        self._loader = loader
        self._streams: dict[str, torch.Tensor] = {}

    def stream(self, split: str) -> torch.Tensor:
        """The packed token stream of ``train``, ``eval`` or ``calibration``."""
        if split not in self._streams:
            self._streams[split] = self._loader(split)
        return self._streams[split]
