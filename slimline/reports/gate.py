"""The release gate: one candidate artifact against the limits of the pipeline's ``release:`` block.

``gate_run(run_dir)`` reads the run folder only (the release block is recorded in its
``summary.json``) and returns a ``Verdict``: each set limit becomes one ``Check`` with the
measured value and the limit. Relative checks compare the candidate with the input model
measured in the same run. A candidate that was skipped or failed fails every check with that
reason. ``write_junit`` writes the verdict as JUnit XML for CI test reporters.

```yaml
release:
  candidate: sparse
  max_perplexity_increase: 0.05   # relative to the input model
  min_decode_speedup: 1.2
  max_size_mb: 80                 # absolute
```
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slimline.config import ReleaseConfig
from slimline.errors import ReportError
from slimline.reports.rows import Row, read_summary, rows_from_summary
from slimline.reports.tables import Column, cell, markdown_table


@dataclass(frozen=True)
class CheckSpec:
    """How one limit is measured: what it means, how to read it from the rows, its direction and format."""

    description: str
    value: Callable[[Row, Row], float | None]  # (candidate, input) -> measured value
    bound: str  # "max" | "min"
    spec: str  # format spec of value and limit
    relative: bool


def ratio(new: float | None, old: float | None) -> float | None:
    """``new / old``, or None when either is missing or ``old`` is zero."""
    return new / old if new is not None and old else None


def increase(new: float | None, old: float | None) -> float | None:
    """Relative increase ``new / old - 1``, or None."""
    value = ratio(new, old)
    return None if value is None else value - 1


# One entry per limit field of ReleaseConfig, in the same order.
CHECKS: dict[str, CheckSpec] = {
    "max_perplexity_increase": CheckSpec(
        "perplexity increase vs input", lambda c, i: increase(c.perplexity, i.perplexity), "max", "+.2%", True
    ),
    # KL is measured against the input model inside the candidate's own evaluation.
    "max_kl": CheckSpec("KL vs input (nats/token)", lambda c, i: c.kl_vs_input, "max", ".4g", False),
    "min_decode_speedup": CheckSpec(
        "decode speedup vs input", lambda c, i: ratio(c.decode_tokens_per_s, i.decode_tokens_per_s), "min", ".2f", True
    ),
    "max_size_ratio": CheckSpec("size vs input", lambda c, i: ratio(c.size_mb, i.size_mb), "max", ".3f", True),
    "max_perplexity": CheckSpec("perplexity", lambda c, i: c.perplexity, "max", ".4g", False),
    "min_top1_accuracy": CheckSpec("top-1 accuracy", lambda c, i: c.top1_accuracy, "min", ".4f", False),
    "min_decode_tokens_per_s": CheckSpec("decode tokens/s", lambda c, i: c.decode_tokens_per_s, "min", ".1f", False),
    "max_token_p95_ms": CheckSpec("per-token p95 (ms)", lambda c, i: c.token_p95_ms, "max", ".2f", False),
    "max_peak_memory_mb": CheckSpec("peak memory (MB)", lambda c, i: c.peak_memory_mb, "max", ".1f", False),
    "max_size_mb": CheckSpec("size on disk (MB)", lambda c, i: c.size_mb, "max", ".1f", False),
}


@dataclass(frozen=True)
class Check:
    """One limit, the value measured against it, and whether it holds."""

    name: str
    description: str
    value: float | None
    limit: float
    bound: str
    spec: str
    passed: bool
    note: str = ""  # why there is no value

    def shown(self, number: float | None) -> str:
        """A value or limit in this check's format."""
        return cell(number, self.spec)

    @property
    def condition(self) -> str:
        """``<= limit`` or ``>= limit``."""
        return f"{'<=' if self.bound == 'max' else '>='} {self.shown(self.limit)}"


@dataclass(frozen=True)
class Verdict:
    """The gate's answer for one run: the candidate and every check."""

    run: str
    pipeline: str
    candidate: str
    candidate_kind: str
    candidate_status: str
    reason: str  # why the candidate has no figures, '' when it was measured
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        """True when every check holds (a gate always has at least one)."""
        return bool(self.checks) and all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[str]:
        """Names of the checks that do not hold."""
        return [check.name for check in self.checks if not check.passed]


def missing_figures(candidate: Row, base: Row, relative: bool) -> str:
    """Why a check cannot be measured, or '' when it can."""
    if candidate.status in ("skipped", "failed"):
        return f"candidate {candidate.stage!r} {candidate.status}: {candidate.reason}"
    if not candidate.measured:
        return f"candidate {candidate.stage!r} was not measured"
    if relative and not base.measured:
        return f"the input model was not measured ({base.status}: {base.reason})"
    return ""


def run_check(name: str, limit: float, candidate: Row, base: Row) -> Check:
    """Measure one limit on the candidate."""
    spec = CHECKS[name]
    note = missing_figures(candidate, base, spec.relative)
    value = None if note else spec.value(candidate, base)
    if value is None and not note:
        note = "value not available in the candidate's report"
    holds = value is not None and (value <= limit if spec.bound == "max" else value >= limit)
    return Check(name, spec.description, value, limit, spec.bound, spec.spec, holds, note)


def judge(release: ReleaseConfig, rows: list[Row], run: str, pipeline: str) -> Verdict:
    """The verdict for ``release`` over a run's rows; ReportError when the candidate is not in the run."""
    by_stage = {row.stage: row for row in rows}
    if release.candidate not in by_stage:
        raise ReportError(f"release candidate {release.candidate!r} is not a stage of run {run}: {sorted(by_stage)}")
    if "input" not in by_stage:
        raise ReportError(f"run {run} has no input model row in its summary.json")
    candidate = by_stage[release.candidate]
    checks = tuple(run_check(name, limit, candidate, by_stage["input"]) for name, limit in release.limits().items())
    return Verdict(run, pipeline, candidate.stage, candidate.kind, candidate.status, candidate.note, checks)


def gate_run(run_dir: Path) -> Verdict:
    """The verdict for a finished run folder; ReportError for a missing run or release block."""
    summary = read_summary(run_dir)
    if not summary.get("release"):
        raise ReportError(
            f"run {run_dir} has no release block: add `release: {{candidate: <stage>, ...limits}}` "
            "to the pipeline and run it again (see docs/release.md)"
        )
    release = ReleaseConfig.model_validate(summary["release"])
    return judge(release, rows_from_summary(summary), str(run_dir), summary["pipeline"])


def render_verdict_text(verdict: Verdict) -> str:
    """The verdict for a terminal or CI log: one line per check, then PASS or FAIL."""
    lines = [
        f"release gate of {verdict.pipeline} ({verdict.run}): "
        f"candidate {verdict.candidate!r} ({verdict.candidate_kind}, {verdict.candidate_status})"
    ]
    width = max(len(check.name) for check in verdict.checks)
    for check in verdict.checks:
        outcome = "PASS" if check.passed else "FAIL"
        detail = f"  ({check.note})" if check.note else ""
        lines.append(
            f"  {outcome}  {check.name:<{width}}  {check.description}: {check.shown(check.value)} {check.condition}{detail}"
        )
    if verdict.passed:
        lines.append(f"PASS: {verdict.candidate!r} meets all {len(verdict.checks)} limits")
    else:
        lines.append(f"FAIL: {len(verdict.failed)} of {len(verdict.checks)} checks failed: {', '.join(verdict.failed)}")
    return "\n".join(lines)


VERDICT_COLUMNS: tuple[Column[Check], ...] = (
    Column("check", lambda check: f"{check.description} (`{check.name}`)"),
    Column("measured", lambda check: check.shown(check.value)),
    Column("limit", lambda check: check.condition),
    Column("result", lambda check: "pass" if check.passed else f"**FAIL**{': ' + check.note if check.note else ''}"),
)


def render_verdict_markdown(verdict: Verdict) -> str:
    """The verdict as a Markdown section (for report.md and PR comments)."""
    outcome = "PASS" if verdict.passed else "FAIL"
    lines = [f"## Release gate: **{outcome}**", ""]
    lines.append(f"Candidate `{verdict.candidate}` ({verdict.candidate_kind}, {verdict.candidate_status}).")
    if verdict.reason:
        lines.append(f"It has no figures: {verdict.reason}.")
    lines += ["", *markdown_table(VERDICT_COLUMNS, verdict.checks)]
    return "\n".join(lines) + "\n"


def junit_xml(verdict: Verdict) -> ET.ElementTree:
    """The verdict as JUnit XML: one test suite, one test case per check."""
    suites = ET.Element("testsuites", name="slimline release gate")
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"release-gate.{verdict.pipeline}",
        tests=str(len(verdict.checks)),
        failures=str(len(verdict.failed)),
        errors="0",
        skipped="0",
    )
    properties = ET.SubElement(suite, "properties")
    for name, value in (("run", verdict.run), ("candidate", verdict.candidate), ("status", verdict.candidate_status)):
        ET.SubElement(properties, "property", name=name, value=value)
    for check in verdict.checks:
        case = ET.SubElement(suite, "testcase", classname=f"release-gate.{verdict.candidate}", name=check.name)
        if not check.passed:
            message = f"{check.description}: {check.shown(check.value)}, limit {check.condition}"
            failure = ET.SubElement(case, "failure", message=check.note or message, type="limit")
            failure.text = message + (f" ({check.note})" if check.note else "")
    return ET.ElementTree(suites)


def write_junit(verdict: Verdict, path: Path) -> None:
    """Write the verdict's JUnit XML to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    junit_xml(verdict).write(path, encoding="utf-8", xml_declaration=True)
