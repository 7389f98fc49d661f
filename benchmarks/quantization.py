"""Measure the PyTorch-side quantization stages on the built-in example model, side by side.

    python benchmarks/quantization.py [--out benchmarks/results] [--run-dir DIR]

Runs ``pipelines/quantization.yaml`` through the real runner: torch.ao int8 dynamic and static,
GPTQ 4-bit g128 and round-to-nearest 4-bit g128 (same grid, same checkpoint format, same kernel),
bitsandbytes int8 and NF4, and int4-weight/int8-activation PTQ against QAT for that same scheme
(same torch.ao kernels and artifact format), each from the same input and evaluated on the same held-out tokens
against the fp32 input model on the same PyTorch backend. Then checks the acceptance criteria of
the quantization issue and tries the refusals (bad params must be refused at validation; no
half-finished artifact may remain). Writes quantization.json and quantization.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from slimline.config import load_pipeline
from slimline.errors import ConfigError
from slimline.runner import Runner

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "quantization.yaml"
# (kind, params YAML) that each stage must refuse when the pipeline is validated.
BAD_REQUESTS = [
    ("quantize.gptq", "{bits: 5}"),
    ("quantize.gptq", "{bits: 4, group_size: 48}"),
    ("quantize.gptq", "{method: rtn, act_order: true}"),
    ("quantize.gptq", "{calibration_length: 4096}"),
    ("quantize.ptq", "{mode: int4}"),
    ("quantize.ptq", "{mode: dynamic, observer: histogram}"),
    ("quantize.ptq", "{mode: static, observer: entropy}"),
    ("quantize.bnb", "{mode: int4}"),
    ("quantize.bnb", "{mode: int8, double_quant: true}"),
    ("quantize.qat", "{weight_bits: 2}"),
    ("quantize.qat", "{sequence_length: 4096}"),
]


def run_pipeline(run_dir: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Run the quantization pipeline; return each stage's report and status (ran or reused)."""
    outcome = Runner(load_pipeline(PIPELINE), run_dir).run()
    failed = [f"{r.stage_id}: {r.reason}" for r in outcome.results if r.status == "failed"]
    if failed:
        raise SystemExit(f"stages failed: {failed}")
    return {r.stage_id: r.report for r in outcome.results}, {r.stage_id: r.status for r in outcome.results}


def try_refusals(folder: Path) -> list[dict[str, str]]:
    """Each bad request, validated in a pipeline after the same input: refused with which message."""
    rows = []
    for index, (kind, params) in enumerate(BAD_REQUESTS):
        path = folder / f"bad-{index}.yaml"
        path.write_text(
            f"name: bad\nmodel: builtin:stdlib-coder\nstages:\n  - id: q\n    kind: {kind}\n    params: {params}\n"
        )
        try:
            load_pipeline(path)
            message, refused = "accepted", False
        except ConfigError as error:
            message, refused = str(error).splitlines()[-1].strip().replace(f"{folder}/", ""), True
        rows.append({"kind": kind, "params": params, "refused": refused, "message": message})
    return rows


def partial_artifacts(run_dir: Path) -> list[str]:
    """Temporary or manifest-less folders left in the run (there must be none)."""
    stages = run_dir / "stages"
    leftovers = [p.name for p in stages.iterdir() if p.name.startswith((".tmp-", ".stale-"))]
    return leftovers + [p.name for p in stages.iterdir() if p.is_dir() and not (p / "artifact.json").exists()]


def accuracy(report: dict, name: str) -> float:
    """One accuracy figure of a stage report."""
    return report["metrics"]["accuracy"][name]


def checks(reports: dict[str, dict], refusals: list[dict], leftovers: list[str]) -> dict[str, dict[str, Any]]:
    """Each acceptance check: the measured values and whether they pass."""
    gptq, rtn, dynamic = reports["gptq-4bit"], reports["rtn-4bit"], reports["int8-dynamic"]
    qat, ptq_w4 = reports["qat-w4"], reports["w4-dynamic"]
    increase = dynamic["deltas"]["input"]["perplexity_change"]
    return {
        "gptq_4bit_beats_rtn_4bit_g128": {
            "gptq_perplexity": accuracy(gptq, "perplexity"),
            "rtn_perplexity": accuracy(rtn, "perplexity"),
            "gptq_kl_vs_input": accuracy(gptq, "kl_vs_input"),
            "rtn_kl_vs_input": accuracy(rtn, "kl_vs_input"),
            "pass": accuracy(gptq, "perplexity") < accuracy(rtn, "perplexity")
            and accuracy(gptq, "kl_vs_input") < accuracy(rtn, "kl_vs_input"),
        },
        "qat_beats_ptq_same_scheme_int4_weights_int8_activations": {
            "qat_perplexity": accuracy(qat, "perplexity"),
            "ptq_perplexity": accuracy(ptq_w4, "perplexity"),
            "qat_kl_vs_input": accuracy(qat, "kl_vs_input"),
            "ptq_kl_vs_input": accuracy(ptq_w4, "kl_vs_input"),
            "pass": accuracy(qat, "perplexity") < accuracy(ptq_w4, "perplexity"),
        },
        "int8_dynamic_cpu_under_1pct_ppl_and_faster": {
            "perplexity_increase": increase,
            "decode_speedup": dynamic["deltas"]["input"]["decode_speedup"],
            "prefill_speedup": dynamic["deltas"]["input"]["prefill_speedup"],
            "pass": increase < 0.01
            and max(dynamic["deltas"]["input"]["decode_speedup"], dynamic["deltas"]["input"]["prefill_speedup"]) > 1,
        },
        "supplementary_gptq_3bit_beats_rtn_3bit_g128": {
            "gptq_perplexity": accuracy(reports["gptq-3bit"], "perplexity"),
            "rtn_perplexity": accuracy(reports["rtn-3bit"], "perplexity"),
            "gptq_kl_vs_input": accuracy(reports["gptq-3bit"], "kl_vs_input"),
            "rtn_kl_vs_input": accuracy(reports["rtn-3bit"], "kl_vs_input"),
            "pass": accuracy(reports["gptq-3bit"], "perplexity") < accuracy(reports["rtn-3bit"], "perplexity")
            and accuracy(reports["gptq-3bit"], "kl_vs_input") < accuracy(reports["rtn-3bit"], "kl_vs_input"),
        },
        "bad_requests_refused_at_validation": {
            "refused": sum(r["refused"] for r in refusals),
            "tried": len(refusals),
            "pass": all(r["refused"] for r in refusals),
        },
        "no_half_finished_artifacts": {"leftovers": len(leftovers), "pass": not leftovers},
    }


def verdict(value: bool | None) -> str:
    """A check's pass/fail as a word."""
    return {True: "PASS", False: "FAIL", None: "NOT RUN"}[value]


def markdown(result: dict) -> str:
    """The benchmark as Markdown."""
    lines = ["# Quantization stages on the built-in example model", "", f"Machine: {result['machine']}.", ""]
    lines += [
        f"Command: `{result['command']}`; {result['seconds']:.0f} s in all. Pipeline: `{result['pipeline']}`.",
        "",
    ]
    lines += ["## Acceptance checks", ""]
    for name, check in result["checks"].items():
        figures = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items() if k != "pass"
        )
        lines.append(f"- **{verdict(check['pass'])}** {name}: {figures}")
    lines += ["", "## Every artifact (same eval tokens, same PyTorch backend; deltas vs the fp32 input)", ""]
    lines += [
        "Stages marked `reused` were produced (and evaluated) by an earlier invocation into the same run folder with "
        "identical keys; `stage s` is the time the stage took when it ran.",
        "",
        "| stage | status | kind | format | perplexity | ppl change | KL vs input | top-1 | agreement | decode tok/s | decode speedup | prefill ms | size MB | stage s |",
    ]
    lines += ["| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for stage, report in result["reports"].items():
        m, d = report["metrics"], report.get("deltas", {}).get("input", {})
        a, lat = m["accuracy"], m["latency"]
        change = f"{100 * d['perplexity_change']:+.2f}%" if d else "-"
        speedup = f"{d['decode_speedup']:.2f}x" if d else "-"
        lines.append(
            f"| {stage} | {result['statuses'][stage]} | {report['kind']} | {report['format']} | {a['perplexity']:.3f} | {change} | {a['kl_vs_input']:.5f} | "
            f"{a['top1_accuracy']:.4f} | {a['top1_agreement_with_input']:.4f} | {lat['decode_tokens_per_s']:.1f} | {speedup} | "
            f"{lat['prefill_ms']:.1f} | {m['size_mb']:.1f} | {report.get('stage_seconds', 0):.0f} |"
        )
    lines += ["", "## Refusals (validated, before any work)", "", "| kind | params | refused | message |"]
    lines += ["| --- | --- | --- | --- |"]
    for row in result["refusals"]:
        lines.append(f"| {row['kind']} | `{row['params']}` | {row['refused']} | {row['message'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the pipeline, the refusals and the checks; write JSON + Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--run-dir", type=Path, default=None, help="Keep the run here (default: a temporary folder).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        run_dir = args.run_dir or Path(folder) / "run"
        reports, statuses = run_pipeline(run_dir)
        leftovers = partial_artifacts(run_dir)
        refusals = try_refusals(Path(folder))
    result = {
        "machine": f"{platform.machine()}, {platform.system()}, python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "command": "python benchmarks/quantization.py",
        "pipeline": str(PIPELINE.relative_to(ROOT)),
        "seconds": round(time.perf_counter() - started, 1),
        "checks": checks(reports, refusals, leftovers),
        "statuses": statuses,
        "reports": reports,
        "refusals": refusals,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantization.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "quantization.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
