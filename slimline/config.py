"""The pipeline file: pydantic models of the YAML, validation with file/line/field, JSON Schema.

Validation happens in one pass before any work starts and reports every problem at once:
unknown keys, wrong types, unknown stage kinds, bad stage params, dangling ``from:``
references, duplicate ids and cycles. Each problem names the file, the line and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimline.devices import DEVICE_HELP, check_device_name
from slimline.errors import ConfigError
from slimline.registry import STAGES, stage_module, stage_spec
from slimline.sources import DATA_PREFIXES, DataSource
from slimline.sources import LocalData as LocalData  # re-exported: the pipeline file's local data type
from slimline.stage import ModelShape, ShapeProblems
from slimline.untrusted import (
    UntrustedInputError,
    decode_utf8,
    load_yaml_bounded,
    read_bytes_bounded,
    short_repr,
    yaml_problem,
)

STAGE_ID = re.compile(r"^[a-z][a-z0-9_-]*$")
# The implicit artifact every pipeline starts from: the model named by ``model:``.
INPUT_ID = "input"
# Bounds on the pipeline file and --set overrides (docs/stages.md, "Limits"), checked before anything is expanded.
MAX_PIPELINE_BYTES = 1_048_576
MAX_YAML_DEPTH = 32  # nesting, aliases expanded; a real pipeline nests under 10 deep
MAX_YAML_NODES = 50_000  # values, aliases expanded; a real pipeline has a few hundred
MAX_OVERRIDE_CHARS = 65_536


# auto, cpu, cuda or cuda:N (a stage's ``device:``, evaluation's ``device:``)
DeviceName = Annotated[str, AfterValidator(check_device_name)]


class Strict(BaseModel):
    """Base of every pipeline model: frozen, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Strict):
    """Where the train, eval and calibration texts come from."""

    train: DataSource = Field("builtin:stdlib/train", description="Text for training stages (LoRA, distillation).")
    eval: DataSource = Field("builtin:stdlib/eval", description="Held-out text every artifact is measured on.")
    calibration: DataSource | None = Field(
        None, description="Text for calibrating quantization and pruning; default: the train source."
    )

    @field_validator("train", "eval", "calibration")
    @classmethod
    def check_source_string(cls, value: DataSource | None) -> DataSource | None:
        """A string source must be ``builtin:...`` or ``hf:...``."""
        if isinstance(value, str) and not value.startswith(DATA_PREFIXES):
            raise ValueError(f"expected 'builtin:stdlib/<split>', 'hf:<dataset>' or {{path: ...}}, got {value!r}")
        return value


class AccuracySettings(Strict):
    """Perplexity, top-1 accuracy and KL divergence from the input model on held-out tokens."""

    max_tokens: int = Field(20_000, gt=0, description="Held-out tokens scored; more is steadier and slower.")
    window: int = Field(256, ge=16, description="Tokens per scored window; must fit the model's context.")


class LatencySettings(Strict):
    """Prefill and greedy decode timing at batch size 1."""

    prompt_tokens: int = Field(128, gt=0, description="Prompt length for the prefill measurement.")
    new_tokens: int = Field(64, gt=0, description="Tokens decoded per repeat.")
    repeats: int = Field(5, gt=0, description="Timed repeats; medians are reported.")
    warmup: int = Field(1, ge=0, description="Untimed repeats first, to warm caches and kernels.")


class EvaluateConfig(Strict):
    """The one yardstick every artifact is measured on."""

    accuracy: AccuracySettings = AccuracySettings()
    latency: LatencySettings = LatencySettings()
    device: DeviceName = Field(
        "auto",
        description=f"Where PyTorch artifacts are measured: {DEVICE_HELP}. ONNX and GGUF artifacts run on the CPU; "
        "the report names each artifact's device.",
    )


class OutputCheckConfig(Strict):
    """The check of a stage's output against its parent before publishing (see evaluate/output_check.py)."""

    enabled: bool = Field(True, description="false publishes without the check (not recommended).")
    min_top1_agreement: float | None = Field(
        None, ge=0, le=1, description="Least top-1 agreement with the parent, 0..1; default: the kind's floor."
    )
    max_kl: float | None = Field(
        None, ge=0, description="Most KL divergence from the parent, nats/token; default: the kind's floor."
    )
    tokens: int = Field(2048, ge=16, description="Calibration tokens scored by both the output and its parent.")


class LaunchConfig(Strict):
    """Data-parallel training of a training stage under ``torchrun`` (docs/scale.md, "Distributed training")."""

    nproc_per_node: int = Field(1, ge=1, description="Training processes on this machine (one per GPU on CUDA).")
    nnodes: int = Field(
        1, ge=1, description="Machines; above 1 each other machine runs the same torchrun command (untested)."
    )
    rdzv_endpoint: str | None = Field(
        None, description="HOST:PORT of torchrun's c10d rendezvous; required when nnodes > 1."
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp replicates the model in every process; fsdp (FSDP2 fully_shard per decoder layer) shards "
        "weights, gradients and optimizer state, for models that do not fit one device.",
    )

    @property
    def world_size(self) -> int:
        """Processes in all: nproc_per_node x nnodes."""
        return self.nproc_per_node * self.nnodes

    @model_validator(mode="after")
    def check_rendezvous(self) -> LaunchConfig:
        """Several machines meet at a rendezvous endpoint, given as HOST:PORT."""
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint: HOST:PORT that every machine reaches")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"rdzv_endpoint: expected HOST:PORT, got {self.rdzv_endpoint!r}")
        return self


class StageConfig(Strict):
    """One stage: a registered kind, its params, and the stage(s) it reads from."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    id: str = Field(description="Unique name; also the artifact folder name.")
    kind: str = Field(description="Registered stage kind, e.g. 'lora'.")
    from_: str | None = Field(
        None, alias="from", description="Stage id this stage reads; default: the previous stage ('input' first)."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="The kind's parameters (see docs/stages.md).")
    allow_skip: bool = Field(
        False,
        description="If the stage cannot run here (no CUDA, missing package), mark it skipped instead of refusing.",
    )
    check: OutputCheckConfig = Field(
        OutputCheckConfig(),
        description="Floors the output must meet against its parent on calibration tokens before it is published.",
    )
    device: DeviceName = Field(
        "auto",
        description=f"Where the stage runs: {DEVICE_HELP}. Kinds that run on the CPU only (quantize.ptq, "
        "quantize.gguf, ...) refuse cuda.",
    )
    launch: LaunchConfig | None = Field(
        None,
        description="Train data-parallel under torchrun (lora, distill, quantize.qat, prune.structured's recovery); "
        "the result is the same at any world size, so it is not part of the stage's cache key.",
    )

    @field_validator("id")
    @classmethod
    def check_id(cls, value: str) -> str:
        """Ids become folder names: lowercase letters, digits, '-' and '_'."""
        if not STAGE_ID.match(value) or value == INPUT_ID:
            raise ValueError(f"expected lowercase letters, digits, '-', '_' (not {INPUT_ID!r}), got {value!r}")
        return value


class ReleaseConfig(Strict):
    """The release gate: one candidate artifact and the limits it must meet (``slimline gate``).

    Relative limits compare the candidate with the input model measured in the same run;
    absolute limits compare it with a fixed number. Unset limits are not checked; at least one
    must be set.
    """

    candidate: str = Field(description="Stage id of the one artifact to release.")
    # relative to the input model, measured in the same run
    max_perplexity_increase: float | None = Field(
        None, ge=0, description="Perplexity increase over the input model, 0.03 = 3%."
    )
    max_kl: float | None = Field(None, ge=0, description="Mean KL divergence from the input model, nats/token.")
    min_decode_speedup: float | None = Field(None, gt=0, description="Decode tokens/s ratio over the input model.")
    max_size_ratio: float | None = Field(None, gt=0, description="Size on disk over the input model's, 0.5 = half.")
    # absolute
    max_perplexity: float | None = Field(None, gt=0, description="Perplexity on the eval split.")
    min_top1_accuracy: float | None = Field(None, ge=0, le=1, description="Top-1 next-token accuracy, 0..1.")
    min_decode_tokens_per_s: float | None = Field(None, gt=0, description="Greedy decode tokens/s at batch 1.")
    max_token_p95_ms: float | None = Field(None, gt=0, description="95th percentile per-token decode latency, ms.")
    max_peak_memory_mb: float | None = Field(None, gt=0, description="Peak memory growth while loading and decoding.")
    max_size_mb: float | None = Field(None, gt=0, description="Artifact size on disk, MB.")

    def limits(self) -> dict[str, float]:
        """The limits that are set, by field name, in declaration order."""
        return {name: value for name, value in self.model_dump(exclude={"candidate"}).items() if value is not None}


class PipelineConfig(Strict):
    """A whole pipeline file."""

    name: str = Field(description="Run name; the default output folder is runs/<name>.")
    model: str = Field(description="'builtin:stdlib-coder', 'hf:<org>/<name>' or a local checkpoint folder.")
    seed: int = Field(0, description="Seed for every stage and data sample.")
    data: DataConfig = DataConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    stages: list[StageConfig] = Field(default_factory=list)
    release: ReleaseConfig | None = None


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline: the config, each stage's typed params and parent, and where it came from."""

    config: PipelineConfig
    params: dict[str, BaseModel]
    parents: dict[str, str]
    source: Path
    extra_inputs: dict[str, list[str]] = field(default_factory=dict)  # e.g. a serve stage's draft


@dataclass(frozen=True)
class Problem:
    """One validation problem, located in the file."""

    loc: tuple[str | int, ...]
    message: str


def load_pipeline(path: Path, overrides: list[str] | None = None) -> Pipeline:
    """Read, override and validate a pipeline file; raise ConfigError listing every problem."""
    path = Path(path)
    data, lines = read_pipeline_file(path)
    for override in overrides or []:
        apply_override(data, override)
    pipeline, problems = validate_data(data, path)
    if problems:
        raise ConfigError(format_problems(path, problems, lines))
    assert pipeline is not None
    return pipeline


def read_pipeline_file(path: Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    """The pipeline file's top-level mapping and its line index, read within the ``MAX_PIPELINE_*`` bounds.

    Every way the file can be unreadable (a folder, binary bytes, too large, not YAML, an alias
    bomb, nesting past the bound) is a ConfigError of one line: ``file[:line:column]: what is wrong``.
    """
    try:
        text = decode_utf8(read_bytes_bounded(path, MAX_PIPELINE_BYTES, "pipeline file"), str(path))
    except UntrustedInputError as error:
        raise ConfigError(str(error)) from error
    try:
        data, root = load_yaml_bounded(text, MAX_YAML_DEPTH, MAX_YAML_NODES)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}:{yaml_problem(error)}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping of pipeline fields, got {type(data).__name__}")
    return data, node_line_index(root)


def validate_data(data: dict[str, Any], path: Path) -> tuple[Pipeline | None, list[Problem]]:
    """Validate parsed YAML; return the pipeline or the problems found."""
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as error:
        return None, [Problem(tuple(e["loc"]), describe_error(e)) for e in error.errors()]
    problems: list[Problem] = []
    params = validate_stage_params(config, problems)
    problems += attach_launches(config, params)
    problems += device_problems(config)
    parents = resolve_parents(config, problems)
    problems += find_cycles(parents)
    extra_inputs = resolve_extra_inputs(config, params, problems)
    from slimline.models import check_model_source  # transformers loads only when a pipeline is validated

    model_problem = check_model_source(config.model, path.resolve().parent)
    if model_problem:
        problems.append(Problem(("model",), model_problem))
    elif not problems:
        problems += check_stages_against_model(config, params, parents, path.resolve().parent)
    if config.release:
        problems += check_release(config.release, parents)
    return Pipeline(config, params, parents, path.resolve(), extra_inputs), problems


def check_release(release: ReleaseConfig, parents: dict[str, str]) -> list[Problem]:
    """A release block names one existing stage and sets at least one limit."""
    problems = []
    if release.candidate not in parents:
        problems.append(
            Problem(("release", "candidate"), f"no stage with id {release.candidate!r}; stages: {sorted(parents)}")
        )
    if not release.limits():
        names = [name for name in ReleaseConfig.model_fields if name != "candidate"]
        problems.append(Problem(("release",), f"no limits set; a gate needs at least one of {names}"))
    return problems


def check_stages_against_model(
    config: PipelineConfig, params: dict[str, BaseModel], parents: dict[str, str], base: Path
) -> list[Problem]:
    """Walk the stages with the shape each one's input will have; collect what cannot fit (student > teacher...)."""
    from slimline.models import read_model_shape

    shape = read_model_shape(config.model, base)
    if shape is None:  # a hub model not fetched yet: the stages check themselves when they run
        return []
    shapes = {INPUT_ID: shape}
    problems = []
    pipeline = Pipeline(config, params, parents, base)
    indices = {stage.id: index for index, stage in enumerate(config.stages)}
    for stage_id in topological_order(pipeline):
        index = indices[stage_id]
        found, shapes[stage_id] = check_stage_shape(
            config.stages[index].kind, params[stage_id], shapes[parents[stage_id]]
        )
        problems += [Problem(("stages", index, "params", *loc), message) for loc, message in found]
    return problems


def check_stage_shape(kind: str, params: BaseModel, shape: ModelShape) -> tuple[ShapeProblems, ModelShape]:
    """A stage's ``check_shape``; an exception it raises becomes a problem naming the kind and architecture.

    ``check_shape`` returns problems for what it recognises; anything it raises is a case it did not
    foresee (an odd config field, say), which must read as a validation problem, never as a traceback.
    """
    try:
        return stage_module(kind).check_shape(params, shape)
    except Exception as error:  # a check_shape bug or an unforeseen config: reported, validation goes on
        message = (
            f"{kind} could not check this {shape.architecture}: {type(error).__name__}: {error} "
            "(a gap in the stage's validation; please report it)"
        )
        return [((), message)], shape


def validate_stage_params(config: PipelineConfig, problems: list[Problem]) -> dict[str, BaseModel]:
    """Check each stage's kind and params against the registered kind's Params model."""
    params: dict[str, BaseModel] = {}
    for index, stage in enumerate(config.stages):
        if stage.kind not in STAGES:
            problems.append(Problem(("stages", index, "kind"), f"unknown kind {stage.kind!r}; known: {sorted(STAGES)}"))
            continue
        try:
            params[stage.id] = stage_module(stage.kind).Params.model_validate(stage.params)
        except ValidationError as error:
            for e in error.errors():
                problems.append(Problem(("stages", index, "params", *e["loc"]), describe_error(e)))
    return params


def attach_launches(config: PipelineConfig, params: dict[str, BaseModel]) -> list[Problem]:
    """Hand each ``launch:`` block to its stage's params (``params._launch``); problems where it cannot apply.

    Only stages that train take one (their module defines ``build_training``), and each of the
    world's processes takes ``batch_size / world`` rows of every micro-batch, so the batch must
    divide evenly.
    """
    problems = []
    for index, stage in enumerate(config.stages):
        if stage.launch is None or stage.id not in params:
            continue
        problem = launch_problem(stage, params[stage.id], stage.launch)
        if problem:
            problems.append(Problem(("stages", index, *problem.loc), problem.message))
        else:
            params[stage.id]._launch = stage.launch  # a private attribute: not a param, not in the cache key
    return problems


def device_problems(config: PipelineConfig) -> list[Problem]:
    """An explicit CUDA device on a stage kind that runs on the CPU only."""
    problems = []
    cuda_kinds = sorted(kind for kind in STAGES if stage_spec(kind).device != "cpu")
    for index, stage in enumerate(config.stages):
        if stage.kind in STAGES and stage.device.startswith("cuda") and stage_spec(stage.kind).device == "cpu":
            problems.append(
                Problem(
                    ("stages", index, "device"),
                    f"{stage.kind} runs on the CPU only (its output is a CPU format or its library has no CUDA "
                    f"path here); device: cuda applies to {cuda_kinds}",
                )
            )
    return problems


def launch_problem(stage: StageConfig, params: BaseModel, launch: LaunchConfig) -> Problem | None:
    """Why ``launch`` cannot run this stage (loc relative to the stage), or None."""
    module = stage_module(stage.kind)
    if not hasattr(module, "build_training"):
        trainers = sorted(kind for kind in STAGES if hasattr(stage_module(kind), "build_training"))
        return Problem(("launch",), f"{stage.kind} does not train; launch: applies to {trainers}")
    path = module.TRAIN_SETTINGS
    settings: Any = params
    for name in path:
        settings = getattr(settings, name)
    if settings is None:
        return Problem(("launch",), f"{stage.kind} trains only in params.{'.'.join(path)}, which is not set")
    if settings.batch_size % launch.world_size:
        raw: Any = stage.params
        for name in path:
            raw = raw.get(name, {}) if isinstance(raw, dict) else {}
        loc = (
            ("params", *path, "batch_size")
            if isinstance(raw, dict) and "batch_size" in raw
            else ("launch", "nproc_per_node")
        )
        return Problem(
            loc,
            f"batch_size {settings.batch_size} does not divide among the launch's {launch.world_size} processes "
            "(nproc_per_node x nnodes); each takes batch_size / processes rows of every micro-batch",
        )
    return None


def resolve_parents(config: PipelineConfig, problems: list[Problem]) -> dict[str, str]:
    """Each stage's parent id: its ``from:``, else the previous stage, else the input model."""
    parents: dict[str, str] = {}
    ids = [stage.id for stage in config.stages]
    previous = INPUT_ID
    for index, stage in enumerate(config.stages):
        if stage.id in parents:
            problems.append(Problem(("stages", index, "id"), f"duplicate stage id {stage.id!r}"))
        parent = stage.from_ or previous
        if parent != INPUT_ID and parent not in ids:
            problems.append(
                Problem(("stages", index, "from"), f"no stage with id {parent!r}; expected one of {[INPUT_ID, *ids]}")
            )
        elif parent == stage.id:
            problems.append(Problem(("stages", index, "from"), f"stage {stage.id!r} reads from itself"))
        parents[stage.id] = parent
        previous = stage.id
    return parents


def resolve_extra_inputs(
    config: PipelineConfig, params: dict[str, BaseModel], problems: list[Problem]
) -> dict[str, list[str]]:
    """Stages a stage reads besides its parent (the params its ``SPEC.extra_inputs`` names); each must come earlier."""
    extra: dict[str, list[str]] = {}
    earlier: list[str] = []
    for index, stage in enumerate(config.stages):
        if stage.id in params:
            for name in stage_spec(stage.kind).extra_inputs:
                other = getattr(params[stage.id], name)
                if other not in earlier:
                    problems.append(
                        Problem(
                            ("stages", index, "params", name),
                            f"{other!r} is not a stage defined before {stage.id!r}; expected one of {earlier}",
                        )
                    )
                extra.setdefault(stage.id, []).append(other)
        earlier.append(stage.id)
    return extra


def find_cycles(parents: dict[str, str]) -> list[Problem]:
    """A stage whose chain of parents comes back to itself is a cycle."""
    problems = []
    for start in parents:
        seen = [start]
        node = parents[start]
        while node in parents and node not in seen:
            seen.append(node)
            node = parents[node]
        if node == start and len(seen) > 1:
            problems.append(Problem(("stages",), f"cycle in 'from:' references: {' -> '.join([*seen, start])}"))
    return problems[:1]


def topological_order(pipeline: Pipeline) -> list[str]:
    """The order stages run in: parents (and extra inputs) first; of the stages ready to run, the first in the file.

    Stages run one at a time: after each one, every stage whose inputs are all done is ready
    (``graphlib.TopologicalSorter``), and the earliest of those in the file runs next, so the file's
    order is kept wherever the graph allows it. Raises ``graphlib.CycleError`` on a cycle (validation
    reports cycles before any caller gets here).
    """
    position = {stage.id: index for index, stage in enumerate(pipeline.config.stages)}
    sorter: TopologicalSorter[str] = TopologicalSorter()
    for stage_id in position:
        needs = [pipeline.parents[stage_id], *pipeline.extra_inputs.get(stage_id, [])]
        sorter.add(stage_id, *(need for need in needs if need != INPUT_ID))
    sorter.prepare()
    order: list[str] = []
    ready: set[str] = set()
    while sorter.is_active():
        ready.update(sorter.get_ready())
        next_stage = min(ready, key=position.__getitem__)
        ready.remove(next_stage)
        order.append(next_stage)
        sorter.done(next_stage)
    return order


def describe_error(error: dict[str, Any]) -> str:
    """Pydantic's message, phrased as what was expected and what was found."""
    if error["type"] == "extra_forbidden":
        return "unknown field (check the spelling; see `slimline schema`)"
    if error["type"] == "missing":
        return "required field is missing"
    return f"{error['msg']} (got {short_repr(error.get('input'))})"


def format_problems(path: Path, problems: list[Problem], lines: dict[tuple, int]) -> str:
    """One line per problem: ``file:line: field: message``."""
    rendered = [f"{path} is not a valid pipeline ({len(problems)} problem{'s' * (len(problems) > 1)}):"]
    for problem in problems:
        rendered.append(f"  {path}:{line_of(problem.loc, lines)}: {dotted(problem.loc)}: {problem.message}")
    return "\n".join(rendered)


def dotted(loc: tuple[str | int, ...]) -> str:
    """``('stages', 0, 'params', 'rank')`` -> ``stages[0].params.rank``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def line_of(loc: tuple[str | int, ...], lines: dict[tuple, int]) -> int:
    """The line of the deepest part of ``loc`` that exists in the file."""
    loc = tuple("from" if part == "from_" else part for part in loc)
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return 1


def yaml_line_index(text: str) -> dict[tuple, int]:
    """Map every key path in a YAML document to its 1-based line number."""
    return node_line_index(load_yaml_bounded(text, MAX_YAML_DEPTH, MAX_YAML_NODES)[1])


def node_line_index(root: yaml.Node | None) -> dict[tuple, int]:
    """Map every key path under a composed YAML node to its 1-based line number (scalar keys only)."""
    index: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        index.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    index[(*path, key.value)] = key.start_mark.line + 1
                    walk(value, (*path, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for position, item in enumerate(node.value):
                walk(item, (*path, position))

    if root is not None:
        walk(root, ())
    return index


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` (YAML value); a stage is addressed by id: ``stages.tuned.params.steps=10``."""
    if len(override) > MAX_OVERRIDE_CHARS:
        raise ConfigError(f"override {override[:40]!r}...: longer than {MAX_OVERRIDE_CHARS:,} characters")
    key, sep, raw = override.partition("=")
    if not sep:
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    parts = key.split(".")
    if len(parts) > MAX_YAML_DEPTH:
        raise ConfigError(f"override {key[:40]!r}...: more than {MAX_YAML_DEPTH} dotted parts")
    target: Any = data
    for depth, part in enumerate(parts[:-1]):
        if isinstance(target, list):
            matches = [item for item in target if isinstance(item, dict) and item.get("id") == part]
            if not matches:
                raise ConfigError(f"override {override!r}: no stage with id {part!r}")
            target = matches[0]
        else:
            target = target.setdefault(part, {})
        if not isinstance(target, dict | list):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: depth + 1])} is not a mapping")
    if isinstance(target, list):
        raise ConfigError(f"override {override!r}: address a stage by its id, e.g. stages.<id>.params.<name>=value")
    try:
        target[parts[-1]] = load_yaml_bounded(raw, MAX_YAML_DEPTH, MAX_YAML_NODES)[0]
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override[:80]!r}: value {yaml_problem(error)}") from error


def pipeline_json_schema() -> dict[str, Any]:
    """JSON Schema of the pipeline file, with each kind's params schema attached to its ``kind``."""
    schema = PipelineConfig.model_json_schema(by_alias=True)
    stage_schema = schema["$defs"]["StageConfig"]
    stage_schema["properties"]["kind"]["enum"] = sorted(STAGES)
    branches = []
    for kind in sorted(STAGES):
        params_schema = stage_module(kind).Params.model_json_schema()
        schema["$defs"].update(params_schema.pop("$defs", {}))
        branches.append(
            {"if": {"properties": {"kind": {"const": kind}}}, "then": {"properties": {"params": params_schema}}}
        )
    stage_schema["allOf"] = branches
    return schema
