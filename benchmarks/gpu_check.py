"""The GPU check: slimline's CUDA paths on a GPU machine, in one invocation, with the figures.

    HF_HUB_OFFLINE=1 python benchmarks/gpu_check.py [--out benchmarks/results] [--run-dir runs/gpu-check]

1. ``pytest -m gpu tests/gpu``: the CUDA tests (they skip on a machine without a GPU);
2. ``slimline run benchmarks/gpu_check.yaml``: LoRA, a 1500-step distilled draft, structured
   pruning with distilled recovery, QAT (where torchao is installed) and the serve stage on the
   GPU (``device: auto``), every artifact evaluated there: time per stage, device and training
   precision as the reports record them, perplexity and decode tokens/s;
3. ``slimline serve`` on that pair (target ``tuned``, draft ``draft``) on the GPU in bf16 and in
   float32, batched (``--max-batch 16``) and interleaved (``--max-batch 1``): 16 held-out code
   prompts sent one at a time (one client's tokens/s, and each prompt's reference output), then
   all 16 at once by 16 clients, greedy; aggregate tokens/s, and the outputs that differ from the
   same prompt's completion alone on the same server.

It needs only what a GPU machine's PyTorch image has besides slimline's own small dependencies
(pydantic, fastapi, starlette, uvicorn: carried as wheels), and keeps going past a failed part,
so one run gives every figure it can. Writes gpu_check.json and gpu_check.md into ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402 - after the path: slimline is imported from this checkout

from slimline.data import load_texts  # noqa: E402
from slimline.hardware import machine_description  # noqa: E402
from slimline.reports.tables import write_results  # noqa: E402

CLIENTS = 16
NEW_TOKENS = 64
PROMPTS = 16  # one request per client at once; each is also sent alone first
SERVE_FIGURES = (
    "speculative_tokens_per_s",
    "target_only_tokens_per_s",
    "acceptance_rate",
    "identical_prompts",
    "identical_prompts_bfloat16",
    "dtype",
)
STAGE_FIGURES = ("device", "precision", "loss_curve", "final_loss", "top1_agreement_with_teacher")


def environment() -> dict:
    """The GPU, the CPU and the library versions this run used."""
    import peft
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "gpu": gpu,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None,
        "bf16": torch.cuda.is_bf16_supported() if gpu else None,
        "cpu": machine_description(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def run_tests(out: Path, timeout: int) -> dict:
    """The gpu-marked tests, with pytest's own summary line."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "tests/gpu",
        "-q",
        "-rA",
        "--durations=0",
        "-p",
        "no:cacheprovider",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    (out / "gpu_tests.log").write_text(done.stdout + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {
        "command": " ".join(command[2:]),
        "returncode": done.returncode,
        "summary": lines[-1] if lines else "",
        "results": [line for line in lines if line.startswith(("PASSED", "FAILED", "ERROR", "SKIPPED"))],
        "seconds": round(time.perf_counter() - started, 1),
    }


def run_pipeline(pipeline: Path, run_dir: Path, out: Path, timeout: int) -> dict:
    """``slimline run`` of the GPU pipeline; each stage's status, time, device, precision and figures."""
    command = [sys.executable, "-m", "slimline.cli", "run", str(pipeline), "--out", str(run_dir)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    (out / "gpu_pipeline.log").write_text(done.stdout[-20000:] + done.stderr[-20000:])
    stages = {}
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"stages": []}
    for entry in summary["stages"]:
        stage_metrics = {}
        report = run_dir / "stages" / entry["stage"] / "report.json"
        if report.exists():
            recorded = json.loads(report.read_text()).get("stage_metrics", {})
            stage_metrics = {name: recorded[name] for name in (*STAGE_FIGURES, *SERVE_FIGURES) if name in recorded}
            if "loss_curve" in stage_metrics:
                curve = stage_metrics.pop("loss_curve")
                stage_metrics["loss_first_last"] = [curve[0], curve[-1]] if curve else None
        metrics = entry.get("metrics") or {}
        stages[entry["stage"]] = {
            "status": entry["status"],
            "reason": entry.get("reason", ""),
            "produce_seconds": entry.get("produce_seconds"),
            "evaluated_on": metrics.get("device"),
            "perplexity": (metrics.get("accuracy") or {}).get("perplexity"),
            "decode_tokens_per_s": (metrics.get("latency") or {}).get("decode_tokens_per_s"),
            "gpu_peak_memory_mb": (metrics.get("latency") or {}).get("gpu_peak_memory_mb"),
            **stage_metrics,
        }
    return {
        "command": " ".join(command[2:]),
        "returncode": done.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "stages": stages,
    }


def prompts() -> list[str]:
    """Held-out code prefixes of about 300 characters, spread over the eval split."""
    texts = [text for text in load_texts("builtin:stdlib/eval", ROOT) if len(text) > 400]
    step = max(1, len(texts) // PROMPTS)
    return [texts[i * step][:300] for i in range(PROMPTS)][:PROMPTS]


def serve_load(run_dir: Path, out: Path, device: str, dtype: str, max_batch: int, texts: list[str]) -> dict:
    """One server configuration: every prompt alone first (the references), then 16 clients at once."""
    port = 8000 + max_batch + (100 if dtype == "float32" else 0)
    stages = run_dir / "stages"
    command = [sys.executable, "-m", "slimline.cli", "serve", str(stages / "tuned"), "--draft", str(stages / "draft")]
    command += ["--device", device, "--dtype", dtype, "--max-active", str(CLIENTS), "--max-batch", str(max_batch)]
    command += ["--port", str(port)]
    log = out / f"serve_{dtype}_{max_batch}.log"
    server = subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, server)

        def complete(prompt: str) -> tuple[str, int]:
            body = {"model": "tuned", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
            answer = json.loads(http(f"{url}/v1/completions", body))
            return answer["choices"][0]["text"], answer["usage"]["completion_tokens"]

        complete(texts[0])  # warm-up: CUDA kernels and allocator
        started = time.perf_counter()
        alone = [complete(prompt) for prompt in texts]
        one_client = sum(tokens for _, tokens in alone) / (time.perf_counter() - started)
        references = [text for text, _ in alone]
        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            loaded = list(pool.map(complete, texts))
        wall = time.perf_counter() - started
        metrics = http(f"{url}/metrics")
        return {
            "dtype": dtype,
            "max_batch": max_batch,
            "one_client_tokens_per_s": round(one_client, 1),
            "clients": CLIENTS,
            "requests": len(texts),
            "tokens_per_s": round(sum(tokens for _, tokens in loaded) / wall, 1),
            "differing_outputs": sum(a[0] != b for a, b in zip(loaded, references, strict=True)),
            "acceptance": acceptance_from(metrics),
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def http(url: str, body: dict | None = None, timeout: float = 120) -> str:
    """GET ``url``, or POST ``body`` as JSON; the response text (HTTPError, an OSError, on a 4xx/5xx)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode()


def wait_until_up(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    """Until the server's /health answers 200; RuntimeError if it exits or never does."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"slimline serve exited with {server.returncode}")
        try:
            http(f"{url}/health", timeout=2)
            return
        except OSError:  # not listening yet
            time.sleep(0.5)
    raise RuntimeError(f"slimline serve did not come up in {seconds:.0f}s")


def acceptance_from(metrics: str) -> float | None:
    """The draft acceptance rate the server exports at /metrics, if any."""
    for line in metrics.splitlines():
        if line.startswith("slimline_draft_acceptance_rate "):
            return round(float(line.split()[1]), 3)
    return None


def part(result: dict, name: str, work) -> None:
    """Run one part; a failure is recorded and the next part still runs."""
    started = time.perf_counter()
    try:
        result[name] = work()
    except Exception as error:  # a broken part must not lose the figures of the others
        result[name] = {"error": f"{type(error).__name__}: {error}", "seconds": round(time.perf_counter() - started, 1)}
    print(f"{name}: {json.dumps(result[name], default=str)[:2000]}", flush=True)


def markdown(result: dict) -> str:
    """The figures as Markdown."""
    env = result["environment"]
    lines = [
        "# GPU check",
        "",
        f"GPU: {env['gpu']} ({env['gpu_memory_gib']} GiB, bf16 {env['bf16']}); CPU: {env['cpu']}.",
    ]
    lines += [f"torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, peft {env['peft']}.", ""]
    tests = result.get("tests", {})
    lines += [
        "## gpu-marked tests",
        "",
        f"`{tests.get('command', '')}`: {tests.get('summary') or tests.get('error')}",
        "",
    ]
    lines += [f"- {line}" for line in tests.get("results", [])] + [""]
    pipeline = result.get("pipeline", {})
    lines += ["## Pipeline on the GPU", "", f"`{pipeline.get('command', '')}` in {pipeline.get('seconds')} s"]
    lines += ["", "| stage | status | produce s | device | precision | ppl | decode tok/s (eval) | figures |"]
    lines += ["| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for stage, row in pipeline.get("stages", {}).items():
        precision = (row.get("precision") or {}).get("chosen", "-")
        shown = ("loss_first_last", "top1_agreement_with_teacher", *SERVE_FIGURES)
        extra = {name: value for name, value in row.items() if name in shown}
        lines.append(
            f"| {stage} | {row['status']} {row.get('reason', '')} | {row.get('produce_seconds')} | {row.get('device', '-')} "
            f"| {precision} | {fmt(row.get('perplexity'))} | {fmt(row.get('decode_tokens_per_s'))} | {json.dumps(extra)} |"
        )
    lines += ["", "## slimline serve on the GPU (16 clients)", ""]
    lines += ["| dtype | --max-batch | 1 client tok/s | 16 clients tok/s | outputs differing from alone | acceptance |"]
    lines += ["| --- | --- | --- | --- | --- | --- |"]
    for row in result.get("serving", []):
        if "error" in row:
            lines.append(f"| {row.get('dtype')} | {row.get('max_batch')} | error: {row['error']} | | | |")
            continue
        lines.append(
            f"| {row['dtype']} | {row['max_batch']} | {row['one_client_tokens_per_s']} | {row['tokens_per_s']} "
            f"| {row['differing_outputs']} of {row['requests']} | {row['acceptance']} |"
        )
    return "\n".join(lines) + "\n"


def fmt(value) -> str:
    """A figure for the table: '-' when missing, three decimals below 100."""
    return "-" if value is None else f"{value:.3f}" if value < 100 else f"{value:.1f}"


def main() -> None:
    """Run the parts and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "gpu-check")
    parser.add_argument("--pipeline", type=Path, default=ROOT / "benchmarks" / "gpu_check.yaml")
    parser.add_argument("--device", default="cuda", help="the server's --device (cpu: a dry run of this script)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("tests", "pipeline", "serving"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    result: dict = {"environment": environment(), "serving": []}

    def save() -> None:  # after every part: a run stopped at its time limit keeps what it measured
        result["seconds"] = round(time.perf_counter() - started, 1)
        write_results(args.out, "gpu_check", result, markdown(result))

    if "tests" not in args.skip:
        part(result, "tests", lambda: run_tests(args.out, timeout=200))
        save()
    if "pipeline" not in args.skip:
        part(result, "pipeline", lambda: run_pipeline(args.pipeline, args.run_dir, args.out, timeout=240))
        save()
    if "serving" not in args.skip:
        texts = prompts()
        for dtype, max_batch in (("bfloat16", CLIENTS), ("float32", CLIENTS), ("bfloat16", 1)):
            holder: dict = {}
            load = functools.partial(serve_load, args.run_dir, args.out, args.device, dtype, max_batch, texts)
            part(holder, "row", load)
            result["serving"].append({"dtype": dtype, "max_batch": max_batch, **holder["row"]})
            save()


if __name__ == "__main__":
    main()
