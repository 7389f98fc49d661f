"""Measure the training-side stages (LoRA, distillation, structured pruning) on the built-in example model.

    python benchmarks/training_stages.py [--out benchmarks/results] [--quick]

Two pipelines run through the real runner, side by side in one process:

1. *domain*: LoRA on a domain the example model never saw (the installed ``transformers``
   package's own Python sources, split by file hash), measured on that domain's held-out files.
2. *stdlib*: a distilled 2-layer student against the same student trained on hard labels only
   (``alpha: 1``), same steps and init; and structured pruning of 30% of FFN channels with a
   distilled recovery, measured on the stdlib's held-out files.

Writes training_stages.json and training_stages.md with every figure and the pass/fail of each
acceptance check of the training-stages issue.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import transformers
import yaml

from slimline.config import load_pipeline
from slimline.hardware import machine_description
from slimline.reports.tables import Column, cell, checks_table, markdown_table, write_results
from slimline.runner import Runner

ROOT = Path(__file__).resolve().parents[1]
EVALUATE = {
    "accuracy": {"max_tokens": 8192, "window": 256},
    "latency": {"prompt_tokens": 128, "new_tokens": 64, "repeats": 10},
}


def domain_pipeline(steps: int) -> dict:
    """LoRA on transformers' sources, evaluated on held-out transformers files."""
    source = Path(transformers.__file__).parent
    data = {
        "train": {"path": str(source), "glob": "**/*.py", "split": "train"},
        "eval": {"path": str(source), "glob": "**/*.py", "split": "eval"},
    }
    stage = {"id": "tuned", "kind": "lora", "params": {"steps": steps, "learning_rate": 5e-4}}
    return {"name": "domain", "model": "builtin:stdlib-coder", "data": data, "evaluate": EVALUATE, "stages": [stage]}


def stdlib_pipeline(steps: int) -> dict:
    """Distilled vs hard-label student, and 30% FFN structured pruning with distilled recovery."""
    student = {"student": {"layers": 2}, "steps": steps, "batch_size": 8, "sequence_length": 256}
    stages = [
        {"id": "draft", "kind": "distill", "from": "input", "params": {**student, "alpha": 0.5, "temperature": 2.0}},
        {"id": "draft-hard", "kind": "distill", "from": "input", "params": {**student, "alpha": 1.0}},
        {
            "id": "slim",
            "kind": "prune.structured",
            "from": "input",
            "params": {
                "ffn_fraction": 0.3,
                "round_to": 64,
                "importance": "activation",
                "recovery": {"mode": "distill", "steps": max(1, steps // 3), "batch_size": 8},
            },
        },
    ]
    return {"name": "stdlib", "model": "builtin:stdlib-coder", "evaluate": EVALUATE, "stages": stages}


def run_pipeline(definition: dict, folder: Path) -> dict[str, dict]:
    """Run one pipeline through the runner; return each stage's report."""
    path = folder / f"{definition['name']}.yaml"
    path.write_text(yaml.safe_dump(definition, sort_keys=False))
    outcome = Runner(load_pipeline(path), folder / definition["name"]).run()
    failed = [f"{r.stage_id}: {r.reason}" for r in outcome.results if r.status == "failed"]
    if failed:
        raise SystemExit(f"stages failed: {failed}")
    return {r.stage_id: r.report for r in outcome.results}


def checks(domain: dict[str, dict], stdlib: dict[str, dict]) -> dict[str, dict]:
    """Each acceptance check: the measured values and whether they pass."""
    tuned, base = domain["tuned"], domain["input"]
    draft, hard, teacher = stdlib["draft"], stdlib["draft-hard"], stdlib["input"]
    slim = stdlib["slim"]

    def ppl(report: dict) -> float:
        return report["metrics"]["accuracy"]["perplexity"]

    def agreement(report: dict) -> float:
        return report["metrics"]["accuracy"]["top1_agreement_with_input"]

    slim_params = slim["stage_metrics"]["parameter_ratio"]
    slim_speed = slim["deltas"]["input"]["decode_speedup"]
    return {
        "lora_trainable_fraction_below_2pct": {
            "value": tuned["stage_metrics"]["trainable_fraction"],
            "pass": tuned["stage_metrics"]["trainable_fraction"] < 0.02,
        },
        "lora_domain_perplexity_improves": {
            "input": ppl(base),
            "tuned": ppl(tuned),
            "pass": ppl(tuned) < ppl(base),
        },
        "lora_merge_max_logit_difference_below_1e-4": {
            "value": tuned["stage_metrics"]["merge_max_logit_difference"],
            "pass": tuned["stage_metrics"]["merge_max_logit_difference"] < 1e-4,
        },
        "distilled_student_beats_hard_label_student": {
            "distilled_perplexity": ppl(draft),
            "hard_label_perplexity": ppl(hard),
            "distilled_agreement_with_teacher": agreement(draft),
            "hard_label_agreement_with_teacher": agreement(hard),
            "pass": ppl(draft) < ppl(hard) and agreement(draft) > agreement(hard),
        },
        "structured_prune_shrinks_and_speeds_up": {
            "parameter_ratio": slim_params,
            "decode_speedup": slim_speed,
            "perplexity_change": slim["deltas"]["input"]["perplexity_change"],
            "teacher_perplexity": ppl(teacher),
            "pruned_perplexity": ppl(slim),
            "pass": slim_params < 1 and slim_speed > 1,
        },
    }


def metric(header: str, section: str, name: str, spec: str) -> Column[tuple[str, str, dict]]:
    """A column of one accuracy or latency figure of a (pipeline, stage, report) row."""
    return Column(header, lambda row: cell(row[2]["metrics"][section][name], spec))


REPORT_COLUMNS = (
    Column("pipeline", lambda row: row[0]),
    Column("stage", lambda row: row[1]),
    metric("perplexity", "accuracy", "perplexity", ".3f"),
    metric("top-1", "accuracy", "top1_accuracy", ".3f"),
    metric("KL vs input", "accuracy", "kl_vs_input", ".4f"),
    metric("agreement", "accuracy", "top1_agreement_with_input", ".3f"),
    metric("decode tok/s", "latency", "decode_tokens_per_s", ".1f"),
    Column("params", lambda row: cell(row[2]["metrics"]["parameters"])),
    Column("size MB", lambda row: cell(row[2]["metrics"]["size_mb"], ".1f")),
)


def markdown(result: dict) -> str:
    """The benchmark as Markdown."""
    lines = ["# Training-side stages on the built-in example model", "", f"Machine: {result['machine']}.", ""]
    lines += [f"Command: `{result['command']}`; {result['seconds']:.0f} s in all.", ""]
    lines += checks_table(result["checks"])
    rows = [
        (pipeline, stage, report)
        for pipeline, reports in result["reports"].items()
        for stage, report in reports.items()
    ]
    lines += ["", *markdown_table(REPORT_COLUMNS, rows)]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run both pipelines and write JSON + Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true", help="Few steps: checks the script, not the claims.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    lora_steps, distill_steps = (5, 6) if args.quick else (150, 300)
    with tempfile.TemporaryDirectory() as folder:
        domain = run_pipeline(domain_pipeline(lora_steps), Path(folder))
        stdlib = run_pipeline(stdlib_pipeline(distill_steps), Path(folder))
    result = {
        "machine": machine_description(),
        "command": "python benchmarks/training_stages.py" + (" --quick" if args.quick else ""),
        "seconds": round(time.perf_counter() - started, 1),
        "checks": checks(domain, stdlib),
        "reports": {"domain": domain, "stdlib": stdlib},
    }
    name = "training_stages_quick" if args.quick else "training_stages"
    write_results(args.out, name, result, markdown(result))


if __name__ == "__main__":
    main()
