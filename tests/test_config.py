"""Pipeline validation: every problem is refused before work starts, with file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimline.config import load_pipeline, pipeline_json_schema, topological_order
from slimline.errors import ConfigError

pytestmark = pytest.mark.unit

GOOD = """\
name: demo
model: builtin:stdlib-coder
stages:
  - id: tuned
    kind: lora
    params: {rank: 4, steps: 2}
  - id: sparse
    kind: prune.magnitude
    params:
      sparsity: 0.5
  - id: other
    kind: prune.magnitude
    from: tuned
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def test_good_pipeline_resolves_parents_in_order(tmp_path: Path) -> None:
    pipeline = load_pipeline(write(tmp_path, GOOD))
    assert pipeline.parents == {"tuned": "input", "sparse": "tuned", "other": "tuned"}
    assert topological_order(pipeline) == ["tuned", "sparse", "other"]
    assert pipeline.params["tuned"].rank == 4
    assert pipeline.params["sparse"].sparsity == 0.5


@pytest.mark.parametrize(
    ("old", "new", "line", "field", "expected"),
    [
        # unknown keys, at every level
        ("name: demo", "name: demo\nstagez: []", 2, "stagez", "unknown field"),
        ("    kind: lora\n", "    kind: lora\n    parms: {}\n", 6, "stages[0].parms", "unknown field"),
        ("{rank: 4, steps: 2}", "{rank: 4, stepz: 2}", 6, "stages[0].params.stepz", "unknown field"),
        # wrong types and ranges in stage params
        ("{rank: 4, steps: 2}", "{rank: 0, steps: 2}", 6, "stages[0].params.rank", "greater than or equal to 1"),
        ("{rank: 4, steps: 2}", "{rank: four, steps: 2}", 6, "stages[0].params.rank", "valid integer"),
        ("sparsity: 0.5", "sparsity: 1.5", 10, "stages[1].params.sparsity", "less than 1"),
        # unknown kinds, dangling and circular references, duplicate ids
        ("kind: lora", "kind: loraa", 5, "stages[0].kind", "unknown kind 'loraa'"),
        ("from: tuned", "from: tunned", 13, "stages[2].from", "no stage with id 'tunned'"),
        ("id: other", "id: tuned", 11, "stages[2].id", "duplicate stage id 'tuned'"),
        ("id: tuned\n    kind: lora", "id: tuned\n    from: other\n    kind: lora", 3, "stages", "cycle"),
        # top-level fields
        ("name: demo\n", "", 1, "name", "required field is missing"),
        ("name: demo", "name: demo\nseed: abc", 2, "seed", "valid integer"),
        ("name: demo", "name: demo\ndata: {train: wikitext}", 2, "data.train", "builtin:stdlib"),
        ("name: demo", "name: demo\nrelease: {candidate: nope}", 2, "release.candidate", "no stage with id 'nope'"),
        # the release gate: one existing candidate, known limits, at least one of them
        ("name: demo", "name: demo\nrelease: {candidate: tuned}", 2, "release", "no limits set"),
        ("name: demo", "name: demo\nrelease: {candidate: tuned, max_kll: 1}", 2, "release.max_kll", "unknown field"),
        (
            "name: demo",
            "name: demo\nrelease: {candidate: tuned, max_kl: -1}",
            2,
            "release.max_kl",
            "greater than or equal",
        ),
        (
            "name: demo",
            "name: demo\nevaluate: {latency: {repeats: 0}}",
            2,
            "evaluate.latency.repeats",
            "greater than 0",
        ),
        ("builtin:stdlib-coder", "builtin:stdlib-codr", 2, "model", "unknown built-in model 'stdlib-codr'"),
        # params that cannot fit the model they will meet
        (
            "{rank: 4, steps: 2}",
            "{rank: 4, target_modules: [q_proj, qkv]}",
            6,
            "stages[0].params.target_modules",
            "['qkv'] match no linear",
        ),
        (
            "kind: lora\n    params: {rank: 4, steps: 2}",
            "kind: distill\n    params: {student: {layers: 9}}",
            6,
            "stages[0].params.student",
            "larger than its teacher",
        ),
        (
            "kind: lora\n    params: {rank: 4, steps: 2}",
            "kind: distill\n    params: {student: {layers: 2, hidden_size: 256}}",
            6,
            "stages[0].params.student.init",
            "use init: fresh",
        ),
        (
            "kind: lora\n    params: {rank: 4, steps: 2}",
            "kind: prune.structured\n    params: {drop_layers: 8}",
            6,
            "stages[0].params.drop_layers",
            "would remove all 8 layers",
        ),
        ("builtin:stdlib-coder", "./no/such/folder", 2, "model", "has no config.json"),
    ],
)
def test_bad_pipeline_names_file_line_and_field(
    tmp_path: Path, old: str, new: str, line: int, field: str, expected: str
) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as caught:
        load_pipeline(path)
    message = str(caught.value)
    assert f"{path}:{line}: {field}:" in message, message
    assert expected in message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("{rank: 4, steps: 2}", "{rank: 0, steps: 2}").replace("kind: prune.magnitude", "kind: nope", 1)
    with pytest.raises(ConfigError) as caught:
        load_pipeline(write(tmp_path, text))
    assert "2 problems" in str(caught.value)


def test_not_yaml_and_missing_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline(write(tmp_path, "name: [unclosed"))
    with pytest.raises(ConfigError, match="no such pipeline file"):
        load_pipeline(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_pipeline(write(tmp_path, "- just a list"))


def test_overrides_address_stages_by_id(tmp_path: Path) -> None:
    pipeline = load_pipeline(write(tmp_path, GOOD), ["stages.tuned.params.rank=16", "seed=7"])
    assert pipeline.params["tuned"].rank == 16
    assert pipeline.config.seed == 7
    with pytest.raises(ConfigError, match="no stage with id 'missing'"):
        load_pipeline(write(tmp_path, GOOD), ["stages.missing.params.rank=1"])
    with pytest.raises(ConfigError, match=r"stages\[0\].params.rank"):
        load_pipeline(write(tmp_path, GOOD), ["stages.tuned.params.rank=0"])


def test_schema_lists_kinds_and_their_params() -> None:
    schema = pipeline_json_schema()
    stage = schema["$defs"]["StageConfig"]
    assert {"lora", "prune.magnitude"} <= set(stage["properties"]["kind"]["enum"])
    lora = next(b for b in stage["allOf"] if b["if"]["properties"]["kind"]["const"] == "lora")
    assert "rank" in lora["then"]["properties"]["params"]["properties"]
    assert schema["additionalProperties"] is False


# --- stage order and the stages' own shape checks -----------------------------------------------------


def stage_list(*stages: str) -> str:
    return "name: order\nmodel: builtin:stdlib-coder\nstages:\n" + "".join(stages)


def magnitude(stage_id: str, parent: str | None = None) -> str:
    source = f"    from: {parent}\n" if parent else ""
    return f"  - id: {stage_id}\n    kind: prune.magnitude\n{source}"


@pytest.mark.parametrize(
    ("stages", "order"),
    [
        # a chain in file order runs in file order
        ((magnitude("a"), magnitude("b"), magnitude("c")), ["a", "b", "c"]),
        # a stage that reads a later one waits for it, then runs as soon as it is ready (before later siblings)
        ((magnitude("a", "b"), magnitude("b", "input"), magnitude("c", "input")), ["b", "a", "c"]),
        # siblings ready at the same time keep the file's order
        ((magnitude("x", "input"), magnitude("y", "input"), magnitude("z", "x")), ["x", "y", "z"]),
    ],
)
def test_stages_run_parents_first_and_otherwise_in_file_order(
    stages: tuple[str, ...], order: list[str], tmp_path: Path
) -> None:
    assert topological_order(load_pipeline(write(tmp_path, stage_list(*stages)))) == order


def test_a_serve_stage_runs_after_its_draft(tmp_path: Path) -> None:
    text = stage_list(
        magnitude("draft"), "  - id: pair\n    kind: serve\n    from: input\n    params: {draft: draft}\n"
    )
    pipeline = load_pipeline(write(tmp_path, text))
    assert pipeline.extra_inputs == {"pair": ["draft"]} and topological_order(pipeline) == ["draft", "pair"]


def test_a_check_shape_that_raises_becomes_a_problem_naming_stage_kind_and_architecture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slimline.prune import magnitude as module

    def broken_check(params, shape):
        raise KeyError("n_inner")

    monkeypatch.setattr(module, "check_shape", broken_check)
    with pytest.raises(ConfigError) as caught:
        load_pipeline(write(tmp_path, stage_list(magnitude("first"))))
    message = str(caught.value)
    assert "stages[0].params" in message and "prune.magnitude" in message and "LlamaForCausalLM" in message
    assert "KeyError: 'n_inner'" in message and "Traceback" not in message
