"""Run the long fuzzing profile of every entry point and record what was tried: benchmarks/results/fuzz.{json,md}.

The targets and their properties are the test suite's (``tests/fuzz/targets.py``): generated
pipeline files (valid ones mutated field by field, random YAML, random bytes, ``--set``
overrides), mutated run folders (``gate``, ``compare``, ``report``) and request bodies POSTed to a
real guarded server over a tiny model. A case *escapes* when it raises an uncaught exception,
exits or answers with a code outside the documented set, or takes longer than the per-case
bound. Hypothesis stops a target at its first escape and shrinks it; that example is recorded.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fuzz.py [--scale 1.0]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimline.hardware import machine_description
from tests.fuzz.targets import CASE_SECONDS, CLI_CODES, HTTP_CODES, TARGETS, FuzzEnv, Target

RESULTS = Path(__file__).parent / "results"


def fuzz_target(name: str, target: Target, env: FuzzEnv, examples: int) -> dict:
    """Run one target for ``examples`` cases; its figures and the first escape, if any."""
    timings: list[float] = []
    env.outcomes.clear()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(target.strategy)
    def check(value) -> None:
        started = time.perf_counter()
        try:
            target.check(env, value)
        finally:
            timings.append(time.perf_counter() - started)

    started = time.perf_counter()
    escape = None
    try:
        check()
    except Exception as error:  # the escape hypothesis found and shrank
        escape = f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"
    wall = time.perf_counter() - started
    print(f"{name}: {len(timings)} cases, {'1 escape' if escape else 'no escape'}, {wall:.0f} s", flush=True)
    return {
        "target": name,
        "examples_requested": examples,
        "cases_run": len(timings),
        "escapes": int(escape is not None),
        "escape": escape,
        "max_case_seconds": round(max(timings, default=0.0), 3),
        "mean_case_ms": round(1000 * sum(timings) / max(len(timings), 1), 1),
        "wall_seconds": round(wall, 1),
        "outcomes": dict(sorted(env.outcomes.items())),
    }


def render_markdown(report: dict) -> str:
    """The results as a Markdown page."""
    lines = [
        "# Fuzzing every entry point (long profile)",
        "",
        f"`benchmarks/fuzz.py` on {report['machine']}, {report['date']}; {report['total_cases']:,} cases in "
        f"{report['wall_seconds']:.0f} s, **{report['total_escapes']} escaped**.",
        "",
        "A case escapes when it raises an uncaught exception, ends with a code outside the documented set "
        f"(CLI exit {sorted(CLI_CODES)}, HTTP {sorted(HTTP_CODES)}) or takes longer than {CASE_SECONDS:g} s. "
        "Cases run counts every call of the property, Hypothesis's shrinking included; outcomes count the exit "
        "codes (per command for run folders) and HTTP statuses the cases got, so they show how deep the cases went "
        "(exit 0 / HTTP 200: past every check).",
        "",
        "| target | examples requested | cases run | escapes | slowest case s | mean case ms | wall s | outcomes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in report["targets"]:
        outcomes = ", ".join(f"{name}: {count:,}" for name, count in row["outcomes"].items())
        lines.append(
            f"| {row['target']} | {row['examples_requested']:,} | {row['cases_run']:,} | {row['escapes']} | "
            f"{row['max_case_seconds']:.2f} | {row['mean_case_ms']:.1f} | {row['wall_seconds']:.0f} | {outcomes} |"
        )
    escapes = [row for row in report["targets"] if row["escape"]]
    if escapes:
        lines += ["", "## Escapes", ""] + [f"- {row['target']}: `{row['escape']}`" for row in escapes]
    lines += [
        "",
        "The same targets run in `make test` with fewer examples (`tests/fuzz/test_fuzz.py::test_fuzz_short`) "
        "and with these counts under `pytest -m slow tests/fuzz`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run every target's long profile (scaled) and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply every target's long example count.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    env = FuzzEnv()
    started = time.perf_counter()
    rows = []
    try:
        for name, target in TARGETS.items():
            rows.append(fuzz_target(name, target, env, max(1, round(target.long_examples * args.scale))))
    finally:
        env.close()
    report = {
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
        "scale": args.scale,
        "total_cases": sum(row["cases_run"] for row in rows),
        "total_escapes": sum(row["escapes"] for row in rows),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "targets": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fuzz.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "fuzz.md").write_text(render_markdown(report))
    print(render_markdown(report))


if __name__ == "__main__":
    main()
