"""The check before publishing: a collapsed output fails with its figures and nothing is published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimline.config import load_pipeline
from slimline.evaluate.output_check import FLOORS, NEAR_LOSSLESS, Floor, judge
from slimline.registry import STAGES
from slimline.runner import Runner

PIPELINE = """\
name: check
model: builtin:stdlib-coder
evaluate:
  accuracy: {max_tokens: 256, window: 128}
  latency: {prompt_tokens: 16, new_tokens: 4, repeats: 1, warmup: 0}
stages:
  - id: good
    kind: quantize.ptq
    params: {mode: dynamic}
  - id: broken
    kind: test.sabotaged-int8
    from: input
    params: {mode: dynamic}
  - id: after-broken
    kind: prune.magnitude
    from: broken
    params: {sparsity: 0.1}
"""


@pytest.mark.unit
@pytest.mark.parametrize(
    ("figures", "failed"),
    [
        ({"top1_agreement": 0.95, "kl": 0.01}, []),
        ({"top1_agreement": 0.30, "kl": 0.01}, ["top-1 agreement"]),
        ({"top1_agreement": 0.95, "kl": 2.5}, ["KL"]),
        ({"top1_agreement": 0.0, "kl": 9.0}, ["top-1 agreement", "KL"]),
    ],
)
def test_judge_names_each_shortfall(figures: dict[str, float], failed: list[str]) -> None:
    problems = judge(figures, Floor(min_top1_agreement=0.6, max_kl=1.0))
    assert len(problems) == len(failed)
    for problem, name in zip(problems, failed, strict=True):
        assert problem.startswith(name)


@pytest.mark.unit
def test_every_registered_kind_has_a_floor_or_says_it_changes_no_weights() -> None:
    assert set(FLOORS) == set(STAGES)


@pytest.mark.stage
def test_sabotaged_scale_fails_with_figures_and_publishes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(STAGES, "test.sabotaged-int8", "tests.sabotaged_int8_stage")
    monkeypatch.setitem(FLOORS, "test.sabotaged-int8", NEAR_LOSSLESS)
    path = tmp_path / "check.yaml"
    path.write_text(PIPELINE)
    outcome = Runner(load_pipeline(path), tmp_path / "run").run()
    results = {r.stage_id: r for r in outcome.results}

    assert results["good"].status == "ran"
    good_check = json.loads((tmp_path / "run/stages/good/report.json").read_text())["stage_metrics"]["output_check"]
    assert good_check["top1_agreement"] >= NEAR_LOSSLESS.min_top1_agreement and good_check["kl"] < 0.1

    broken = results["broken"]
    assert broken.status == "failed" and not outcome.ok
    assert "output check failed" in broken.reason
    assert "top-1 agreement" in broken.reason and "KL" in broken.reason and "perplexity" in broken.reason
    assert not (tmp_path / "run/stages/broken/artifact.json").exists()  # nothing published
    assert not list((tmp_path / "run/stages").glob(".tmp-*"))
    assert results["after-broken"].status == "skipped"
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert {row["stage"]: row["status"] for row in summary["stages"]}["broken"] == "failed"

    # a stricter floor is applied to a reused artifact too, from the figures recorded when it was made
    strict = load_pipeline(path, ["stages.good.check.min_top1_agreement=1.0"])
    again = {r.stage_id: r for r in Runner(strict, tmp_path / "run").run().results}
    assert again["good"].status == "failed" and "recorded" in again["good"].reason
