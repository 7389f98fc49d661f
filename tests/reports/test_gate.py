"""The release gate: checks on rows, JUnit XML, and `slimline gate` on a real tiny run."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimline.cli import app
from slimline.config import ReleaseConfig, load_pipeline
from slimline.errors import ReportError
from slimline.reports.gate import CHECKS, judge, junit_xml
from slimline.reports.rows import Row
from slimline.runner import Runner
from tests.conftest import write_pipeline

cli = CliRunner()

INPUT = Row(
    "input", "input", "ran", perplexity=10.0, top1_accuracy=0.5, kl_vs_input=0.0, decode_tokens_per_s=100.0,
    token_p95_ms=12.0, peak_memory_mb=200.0, size_mb=60.0,
)  # fmt: skip
CANDIDATE = Row(
    "small", "prune.magnitude", "ran", perplexity=10.5, top1_accuracy=0.48, kl_vs_input=0.02,
    decode_tokens_per_s=150.0, token_p95_ms=8.0, peak_memory_mb=150.0, size_mb=30.0,
)  # fmt: skip


@pytest.mark.unit
def test_every_release_limit_has_a_check() -> None:
    assert list(CHECKS) == [name for name in ReleaseConfig.model_fields if name != "candidate"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("limit", "holds", "breaks", "value"),
    [
        # relative to the input model
        ("max_perplexity_increase", 0.0501, 0.0499, 0.05),
        ("max_kl", 0.02, 0.019, 0.02),
        ("min_decode_speedup", 1.5, 1.51, 1.5),
        ("max_size_ratio", 0.5, 0.49, 0.5),
        # absolute
        ("max_perplexity", 10.5, 10.4, 10.5),
        ("min_top1_accuracy", 0.48, 0.49, 0.48),
        ("min_decode_tokens_per_s", 150.0, 151.0, 150.0),
        ("max_token_p95_ms", 8.0, 7.9, 8.0),
        ("max_peak_memory_mb", 150.0, 149.0, 150.0),
        ("max_size_mb", 30.0, 29.9, 30.0),
    ],
)
def test_each_check_holds_at_its_limit_and_breaks_past_it(
    limit: str, holds: float, breaks: float, value: float
) -> None:
    passing = judge(ReleaseConfig(candidate="small", **{limit: holds}), [INPUT, CANDIDATE], "run", "p")
    assert passing.passed and passing.checks[0].value == pytest.approx(value)
    failing = judge(ReleaseConfig(candidate="small", **{limit: breaks}), [INPUT, CANDIDATE], "run", "p")
    assert not failing.passed and failing.failed == [limit]


@pytest.mark.unit
def test_skipped_candidate_fails_every_check_with_its_reason() -> None:
    skipped = Row("small", "export.tensorrt", "skipped", "needs CUDA; this machine has none")
    verdict = judge(ReleaseConfig(candidate="small", max_size_mb=100, max_kl=1), [INPUT, skipped], "run", "p")
    assert verdict.failed == ["max_kl", "max_size_mb"]
    assert verdict.reason == "skipped: needs CUDA; this machine has none"
    assert all("needs CUDA" in check.note for check in verdict.checks)


@pytest.mark.unit
def test_relative_check_without_a_measured_input_fails_and_absolute_one_still_runs() -> None:
    unmeasured = Row("input", "input", "ran")
    verdict = judge(
        ReleaseConfig(candidate="small", max_kl=1, max_perplexity_increase=1), [unmeasured, CANDIDATE], "r", "p"
    )
    assert verdict.failed == ["max_perplexity_increase"]
    assert "input model was not measured" in verdict.checks[0].note


@pytest.mark.unit
def test_unknown_candidate_is_bad_input() -> None:
    with pytest.raises(ReportError, match="'nope' is not a stage"):
        judge(ReleaseConfig(candidate="nope", max_kl=1), [INPUT, CANDIDATE], "run", "p")


@pytest.mark.unit
def test_junit_names_every_check_and_fails_the_broken_one() -> None:
    verdict = judge(ReleaseConfig(candidate="small", max_kl=0.01, max_size_mb=100), [INPUT, CANDIDATE], "run", "p")
    suite = ET.fromstring(ET.tostring(junit_xml(verdict).getroot())).find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert cases["max_kl"].find("failure") is not None and cases["max_size_mb"].find("failure") is None
    assert "0.02" in cases["max_kl"].find("failure").get("message")


STAGES = """\
  - id: sparse
    kind: prune.magnitude
    params: {sparsity: 0.5}
  - id: deeper
    kind: prune.magnitude
    params: {sparsity: 0.7}
release:
  candidate: sparse
  max_perplexity_increase: 0.5
  max_kl: 1.0
  max_size_ratio: 1.01
  min_decode_tokens_per_s: 1
  max_size_mb: 100
"""


@pytest.fixture(scope="module")
def gated(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("gate")
    path = write_pipeline(folder, tiny_model, STAGES, name="gated")
    assert Runner(load_pipeline(path), folder / "run").run().ok
    return path, folder / "run"


@pytest.mark.stage
def test_gate_passes_a_candidate_within_its_limits(gated: tuple[Path, Path], tmp_path: Path) -> None:
    _, run_dir = gated
    result = cli.invoke(app, ["gate", str(run_dir), "--junit", str(tmp_path / "gate.xml")])
    assert result.exit_code == 0, result.output
    assert "PASS: 'sparse' meets all 5 limits" in result.output
    suite = ET.parse(tmp_path / "gate.xml").getroot().find("testsuite")
    assert suite.get("tests") == "5" and suite.get("failures") == "0"


@pytest.mark.stage
def test_tightening_one_limit_fails_the_gate_and_names_that_check(gated: tuple[Path, Path], tmp_path: Path) -> None:
    path, run_dir = gated
    summary = json.loads((run_dir / "summary.json").read_text())
    kl = next(row for row in summary["stages"] if row["stage"] == "sparse")["metrics"]["accuracy"]["kl_vs_input"]
    assert kl > 0
    try:
        outcome = Runner(load_pipeline(path, [f"release.max_kl={kl / 2}"]), run_dir).run()
        assert {r.status for r in outcome.results} == {"reused"}, "the release block is not part of any stage's key"
        result = cli.invoke(app, ["gate", str(run_dir), "--junit", str(tmp_path / "gate.xml")])
        assert result.exit_code == 1, result.output
        assert "FAIL: 1 of 5 checks failed: max_kl" in result.output
        assert "FAIL  max_kl" in result.output
        cases = {c.get("name"): c for c in ET.parse(tmp_path / "gate.xml").getroot().iter("testcase")}
        assert cases["max_kl"].find("failure") is not None
        assert [name for name, case in cases.items() if case.find("failure") is not None] == ["max_kl"]
        assert "## Release gate: **FAIL**" in (run_dir / "report.md").read_text()
    finally:
        Runner(load_pipeline(path), run_dir).run()  # the module's run is back to its own limits


@pytest.mark.stage
def test_gate_refuses_bad_input_with_exit_code_2(tiny_model: Path, tmp_path: Path) -> None:
    missing = cli.invoke(app, ["gate", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no such run folder" in missing.output
    not_a_run = cli.invoke(app, ["gate", str(tmp_path)])
    assert not_a_run.exit_code == 2 and "summary.json not found" in not_a_run.output
    path = write_pipeline(tmp_path, tiny_model, "  - id: sparse\n    kind: prune.magnitude\n", name="ungated")
    assert Runner(load_pipeline(path), tmp_path / "run").run().ok
    no_release = cli.invoke(app, ["gate", str(tmp_path / "run")])
    assert no_release.exit_code == 2 and "has no release block" in " ".join(no_release.output.split())


@pytest.mark.unit
def test_every_limit_is_documented() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "release.md").read_text()
    for name in CHECKS:
        assert f"| `{name}` |" in doc, f"docs/release.md does not document {name}"
