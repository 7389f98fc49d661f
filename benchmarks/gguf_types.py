"""GGUF types of the built-in example model through llama.cpp: accuracy against the F16 GGUF, size, speed.

    python benchmarks/gguf_types.py [--out benchmarks/results]

(Not named gguf.py: the script's folder comes first on sys.path and would shadow the gguf package.)

Runs ``pipelines/gguf.yaml`` through the real runner (F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M and Q4_K_M
with an importance matrix, each converted by llama.cpp's converter and quantized by
``llama_model_quantize``), then times decoding of PyTorch and every GGUF interleaved in one
process (each repeat runs every backend once, in turn, so load on the machine hits all alike).

Writes gguf.json and gguf.md: per artifact perplexity (and its ratio to the F16 GGUF), KL vs the
input model, top-1 agreement, decode tok/s, size, bits per weight, the tokenizer round-trip,
and the issue's acceptance checks: Q8_0 within 0.5% of F16, Q4_K_M within 5%.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

import torch
import transformers

from slimline.config import load_pipeline
from slimline.evaluate.backends import open_backend
from slimline.evaluate.latency import time_one_decode
from slimline.hardware import machine_description
from slimline.reports.tables import Column, cell, checks_table, keyed, markdown_table, write_results
from slimline.runner import Runner

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "gguf.yaml"
GGUF_STAGES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_m-imatrix")
LIMITS = {"q8_0": 0.005, "q4_k_m": 0.05}  # relative perplexity increase over the F16 GGUF


def interleaved_decode(artifacts: dict, prompt: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median decode tokens/s (64 new tokens after ``prompt``) of PyTorch and each GGUF, interleaved."""
    backends = {stage: open_backend(artifacts[stage]) for stage in ("input", *GGUF_STAGES)}
    rates: dict[str, list[float]] = {stage: [] for stage in backends}
    for backend in backends.values():  # warm-up
        time_one_decode(backend, prompt, 8)
    for _ in range(repeats):
        for stage, backend in backends.items():
            _, steps = time_one_decode(backend, prompt, 64)
            rates[stage].append(len(steps) / sum(steps))
    for backend in backends.values():
        backend.close()
    return {stage: statistics.median(values) for stage, values in rates.items()}


def rows(reports: dict, metrics: dict, speed: dict) -> dict[str, dict]:
    """One row of figures per artifact; perplexity also relative to the F16 GGUF."""
    f16 = reports["f16"]["metrics"]["accuracy"]["perplexity"]
    table = {}
    for stage in ("input", *GGUF_STAGES):
        accuracy = reports[stage]["metrics"]["accuracy"]
        stage_figures = metrics.get(stage, {})
        table[stage] = {
            "backend": reports[stage]["backend"],
            "perplexity": accuracy["perplexity"],
            "perplexity_vs_f16": accuracy["perplexity"] / f16 - 1,
            "kl_vs_input": accuracy["kl_vs_input"],
            "top1_agreement_with_input": accuracy["top1_agreement_with_input"],
            "decode_tokens_per_s_report": reports[stage]["metrics"]["latency"]["decode_tokens_per_s"],
            "decode_tokens_per_s_interleaved": speed[stage],
            "size_mb": reports[stage]["metrics"]["size_mb"],
            "gguf_file_mb": stage_figures.get("file_mb"),
            "bits_per_weight": stage_figures.get("bits_per_weight"),
            "tokenizer_roundtrip_identical": stage_figures.get("tokenizer_roundtrip_identical"),
        }
    return table


def checks(table: dict) -> dict:
    """The issue's acceptance checks, with the sizes stated."""
    result = {}
    for stage, limit in LIMITS.items():
        increase = table[stage]["perplexity_vs_f16"]
        result[f"{stage}_perplexity_within_{limit:.1%}_of_f16"] = {
            "f16_perplexity": table["f16"]["perplexity"],
            "perplexity": table[stage]["perplexity"],
            "relative_change": increase,
            "size_mb": table[stage]["gguf_file_mb"],
            "f16_size_mb": table["f16"]["gguf_file_mb"],
            "pass": abs(increase) <= limit,
        }
    result["tokenizer_roundtrip_identical_everywhere"] = {
        "pass": all(table[stage]["tokenizer_roundtrip_identical"] == 1.0 for stage in GGUF_STAGES)
    }
    return result


ARTIFACT_COLUMNS = (
    keyed("artifact", "stage"),
    keyed("backend", "backend"),
    keyed("perplexity", "perplexity", ".3f"),
    keyed("vs F16 GGUF", "perplexity_vs_f16", "+.2%"),
    keyed("KL vs input", "kl_vs_input", ".5f"),
    keyed("top-1 agreement", "top1_agreement_with_input", ".4f"),
    keyed("decode tok/s (report)", "decode_tokens_per_s_report", ".1f"),
    keyed("decode tok/s (interleaved)", "decode_tokens_per_s_interleaved", ".1f"),
    keyed("size MB", "size_mb", ".1f"),
    Column(
        "bits/weight",
        lambda row: cell(row["bits_per_weight"], ".2f") if row["bits_per_weight"] else "16 (fp16 safetensors)",
    ),
)


def markdown(result: dict) -> str:
    """The benchmark as Markdown."""
    lines = ["# GGUF types of the built-in example model through llama.cpp", "", f"Machine: {result['machine']}.", ""]
    lines += [f"Command: `{result['command']}`; {result['seconds']:.0f} s in all. {result['converter']}", ""]
    before, after = result["load_average_1_5_15_before_and_after"]
    lines += [f"Load average (1 min) before and after: {before[0]:.2f}, {after[0]:.2f}.", ""]
    lines += checks_table(result["checks"])
    lines += ["", "Same held-out tokens for every artifact (8192 predictions, windows of 256); decode tok/s from the"]
    lines += ["runner's report and from the interleaved timing in one process (medians):", ""]
    lines += markdown_table(ARTIFACT_COLUMNS, [{"stage": stage, **row} for stage, row in result["table"].items()])
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the GGUF pipeline and the interleaved decode timing; write JSON + Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "gguf")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    started, load_before = time.perf_counter(), os.getloadavg()
    runner = Runner(load_pipeline(PIPELINE), args.run_dir)
    outcome = runner.run()
    failed = [f"{r.stage_id}: {r.reason}" for r in outcome.results if r.status != "ran" and r.status != "reused"]
    if failed:
        raise SystemExit(f"stages did not run: {failed}")
    artifacts = {r.stage_id: r.artifact for r in outcome.results}
    reports = {r.stage_id: r.report for r in outcome.results}
    metrics = {stage: artifacts[stage].manifest["stage_metrics"] for stage in GGUF_STAGES}
    speed = interleaved_decode(artifacts, runner.data.stream("eval")[:128], args.repeats)
    table = rows(reports, metrics, speed)
    converter = metrics["f16"]["converter"]
    result = {
        "machine": machine_description(),
        "command": "python benchmarks/gguf_types.py",
        "converter": f"Converter: llama-cpp-python {converter['llama_cpp_python']}, llama.cpp "
        f"{converter['llama_cpp_commit'][:12]}.",
        "seconds": round(time.perf_counter() - started, 1),
        # llama.cpp's threads spin at barriers: other load on the cores distorts its timings far more than PyTorch's
        "load_average_1_5_15_before_and_after": [load_before, os.getloadavg()],
        "checks": checks(table),
        "table": table,
        "stage_metrics": metrics,
        "reports": reports,
    }
    write_results(args.out, "gguf", result, markdown(result))


if __name__ == "__main__":
    main()
