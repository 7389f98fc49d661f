"""Speculative decoding on the example target/draft pair: speedup, k sweep, baselines, and a load run.

    python benchmarks/speculative.py [--run-dir runs/serving] [--load-seconds 60] [--clients 16]

Needs the artifacts of ``pipelines/serving.yaml`` (run it first: ``slimline run pipelines/serving.yaml``):
the fine-tuned target, the distilled draft, and both exported to ONNX. In this one process:

1. greedy decoding of real held-out code prompts, target-only vs speculative (fixed k = 1..8 and
   adaptive) on the same backend (ONNX Runtime and PyTorch), interleaved prompt by prompt, with
   a token-for-token comparison against target-only output; medians of tokens/s;
2. transformers' assisted generation (``generate(assistant_model=...)``) on the same PyTorch
   pair, against plain ``generate``;
3. ``llama-server`` with a draft, when its binary is on PATH (skipped with the reason otherwise);
4. a load run: ``slimline serve`` as a subprocess on localhost, N concurrent streaming clients
   (the official openai client) for a bounded time; every greedy reply checked against its
   prompt's known output (no crossed streams), malformed requests mixed in (must get 4xx).

Writes speculative.json and speculative.md with every figure and the acceptance checks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import transformers

from slimline.data import load_texts, tokenize_stream
from slimline.evaluate.latency import percentile
from slimline.hardware import machine_description
from slimline.models import load_causal_lm, load_tokenizer
from slimline.reports.tables import checks_table, keyed, markdown_table, write_results
from slimline.runtime import open_model
from slimline.serve.speculative import DraftLength, timed_greedy

ROOT = Path(__file__).resolve().parents[1]
K_SWEEP = (1, 2, 3, 4, 6, 8)


def sweep(target, draft, prompts: list[list[int]], new_tokens: int) -> dict:
    """Target-only vs every k and adaptive, interleaved prompt by prompt; medians and exactness.

    The adaptive controller carries what it learnt from one prompt to the next, as the server does
    from one request to the next; it starts this sweep knowing nothing.
    """
    configs = {"target_only": None, **{f"k={k}": k for k in K_SWEEP}, "adaptive": "adaptive"}
    rows = {name: {"rate": [], "acceptance": [], "mean_k": [], "identical": 0} for name in configs}
    tuning = DraftLength(4, adaptive=True)
    timed_greedy(target, draft, prompts[0], 16, DraftLength(4, adaptive=False))  # warm-up
    for prompt in prompts:
        reference = None
        for name, k in configs.items():
            if k is None:
                length = None
            elif k == "adaptive":
                length = tuning = tuning.fork()
            else:
                length = DraftLength(k, adaptive=False)
            tokens, rate, stats = timed_greedy(
                target, draft if length is not None else None, prompt, new_tokens, length
            )
            reference = reference or tokens
            row = rows[name]
            row["rate"].append(rate)
            row["identical"] += tokens == reference
            if stats.acceptance_rate is not None:
                row["acceptance"].append(stats.acceptance_rate)
                row["mean_k"].append(stats.proposed / stats.rounds)
    base = statistics.median(rows["target_only"]["rate"])
    return {
        name: {
            "tokens_per_s": statistics.median(row["rate"]),
            "speedup": statistics.median(row["rate"]) / base,
            "acceptance_rate": statistics.median(row["acceptance"]) if row["acceptance"] else None,
            "mean_k": statistics.median(row["mean_k"]) if row["mean_k"] else None,
            "identical_to_target_only": f"{row['identical']}/{len(prompts)}",
        }
        for name, row in rows.items()
    }


def assisted_generation(target_path: Path, draft_path: Path, prompts: list[list[int]], new_tokens: int) -> dict:
    """The transformers library's assisted generation vs its plain generate, same PyTorch pair."""
    target, draft = load_causal_lm(target_path), load_causal_lm(draft_path)
    rates = {"generate": [], "assisted": []}
    same = 0
    common = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    for prompt in prompts:
        ids = torch.tensor([prompt])
        outputs = {}
        for name, extra in (("generate", {}), ("assisted", {"assistant_model": draft})):
            started = time.perf_counter()
            with torch.inference_mode():
                output = target.generate(ids, attention_mask=torch.ones_like(ids), **common, **extra)
            rates[name].append(new_tokens / (time.perf_counter() - started))
            outputs[name] = output[0, len(prompt) :].tolist()
        same += outputs["generate"] == outputs["assisted"]
    return {
        "generate_tokens_per_s": statistics.median(rates["generate"]),
        "assisted_tokens_per_s": statistics.median(rates["assisted"]),
        "assisted_speedup": statistics.median(rates["assisted"]) / statistics.median(rates["generate"]),
        "assisted_identical": f"{same}/{len(prompts)}",
    }


def llama_server_binary() -> Path | None:
    """$SLIMLINE_LLAMA_SERVER, llama-server on PATH, or the one scripts/build_llama_server.sh built."""
    import llama_cpp

    from slimline.quantize.gguf_converter import converter_home

    for candidate in (
        os.environ.get("SLIMLINE_LLAMA_SERVER"),
        shutil.which("llama-server"),
        converter_home(llama_cpp.__version__) / "bin" / "llama-server",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def llama_server_completions(binary: Path, arguments: list[str], prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy completions of ``prompts`` from one llama-server process; its own timings per request."""
    import httpx2

    port = free_port()
    command = [str(binary), "--host", "127.0.0.1", "--port", str(port), "-t", str(torch.get_num_threads())]
    command += ["-c", "512", "--parallel", "1", "--no-webui", *arguments]
    log = binary.parent / "llama-server.log"  # a file, not a pipe: a full pipe would stall its logging
    with log.open("w") as log_file:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, server, log=log)
        request = {"n_predict": new_tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
        request["return_tokens"] = True
        httpx2.post(f"{url}/completion", json={**request, "prompt": prompts[0], "n_predict": 16}, timeout=120)
        rates, tokens, drafted, accepted = [], [], 0, 0
        for prompt in prompts:
            answer = httpx2.post(f"{url}/completion", json={**request, "prompt": prompt}, timeout=300).json()
            timings = answer["timings"]
            rates.append(timings["predicted_per_second"])
            tokens.append(answer["tokens"][:new_tokens])
            drafted += timings.get("draft_n", 0)
            accepted += timings.get("draft_n_accepted", 0)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {"rates": rates, "tokens": tokens, "acceptance_rate": accepted / drafted if drafted else None}


def llama_server_baseline(stages: Path, prompts: list[list[int]], new_tokens: int) -> dict:
    """llama-server on the same pair as GGUF: target-only vs ``-md`` draft, greedy, its own decode timings."""
    binary = llama_server_binary()
    if binary is None:
        return {
            "skipped": "no llama-server binary (llama-cpp-python ships the library only): "
            "run scripts/build_llama_server.sh or set SLIMLINE_LLAMA_SERVER"
        }
    from gguf_pair import gguf_pair  # benchmarks/gguf_pair.py, beside this script

    target, draft = gguf_pair(stages, stages.parent / "llama-server")
    plain = llama_server_completions(binary, ["-m", str(target)], prompts, new_tokens)
    # without --spec-type draft-simple, llama-server loads the draft and never uses it
    speculative_arguments = ["-m", str(target), "-md", str(draft), "--spec-type", "draft-simple"]
    speculative = llama_server_completions(binary, speculative_arguments, prompts, new_tokens)
    plain_rate, speculative_rate = statistics.median(plain["rates"]), statistics.median(speculative["rates"])
    identical = sum(a == b for a, b in zip(plain["tokens"], speculative["tokens"], strict=True))
    return {
        "binary": str(binary),
        "models": f"{target.name}, {draft.name}",
        "target_only_tokens_per_s": plain_rate,
        "speculative_tokens_per_s": speculative_rate,
        "speculative_speedup": speculative_rate / plain_rate,
        "acceptance_rate": speculative["acceptance_rate"],
        "identical_to_its_target_only": f"{identical}/{len(prompts)}",
        "note": "tokens/s is llama-server's own predicted_per_second (decode only), medians over the prompts",
    }


def free_port() -> int:
    """An unused localhost port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_run(target: Path, draft: Path, prompts: list[str], clients: int, seconds: float, max_tokens: int) -> dict:
    """N streaming clients against ``slimline serve`` on localhost for a bounded time."""
    import httpx2
    import openai

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "slimline.cli", "serve", str(target), "--draft", str(draft), "--port", str(port)],
        env={**os.environ, "SLIMLINE_API_KEY": "bench"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, server)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        expected = {
            p: client.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0).choices[0].text
            for p in prompts
        }
        latencies, first_tokens, errors, crossed, bad_ok = [], [], [], 0, 0
        completed = [0]
        lock = threading.Lock()
        deadline = time.monotonic() + seconds

        def worker(index: int) -> None:
            nonlocal crossed, bad_ok
            turn = 0
            while time.monotonic() < deadline:
                prompt = prompts[(index + turn) % len(prompts)]
                turn += 1
                if turn % 5 == 0:  # a malformed request now and then: must be refused, not break anything
                    response = httpx2.post(
                        f"{url}/v1/completions",
                        json={"model": model, "prompt": prompt, "temperature": -1},
                        headers={"Authorization": "Bearer bench"},
                        timeout=60,
                    )
                    with lock:
                        bad_ok += 400 <= response.status_code < 500
                    continue
                started = time.perf_counter()
                try:
                    pieces, first = [], None
                    stream = client.completions.create(
                        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
                    )
                    for chunk in stream:
                        if first is None and chunk.choices[0].text:
                            first = time.perf_counter() - started
                        pieces.append(chunk.choices[0].text)
                    with lock:
                        latencies.append(time.perf_counter() - started)
                        first_tokens.append(first or 0.0)
                        crossed += "".join(pieces) != expected[prompt]
                        completed[0] += 1
                except Exception as error:  # counted, not raised: the run measures errors
                    with lock:
                        errors.append(f"{type(error).__name__}: {error}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        metrics = httpx2.get(f"{url}/metrics", timeout=30).text
        health = httpx2.get(f"{url}/health", timeout=30).json()
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {
        "clients": clients,
        "seconds": seconds,
        "completed_streams": completed[0],
        "errors": len(errors),
        "error_samples": errors[:5],
        "crossed_outputs": crossed,
        "malformed_requests_refused_4xx": bad_ok,
        "latency_p50_s": percentile(latencies, 0.50) if latencies else None,
        "latency_p95_s": percentile(latencies, 0.95) if latencies else None,
        "time_to_first_token_p50_s": percentile(first_tokens, 0.50) if first_tokens else None,
        "server_health_after": health["status"],
        "acceptance_rate_metric": next(
            (
                float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith("slimline_draft_acceptance_rate ")
            ),
            None,
        ),
    }


def wait_until_up(url: str, server: subprocess.Popen, timeout: float = 120, log: Path | None = None) -> None:
    """Poll /health until the server answers; if it exits, show its stderr (or the end of its ``log``)."""
    import httpx2

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            output = log.read_text()[-2000:] if log else server.stderr.read()
            raise SystemExit(f"the server exited: {output}")
        try:
            if httpx2.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx2.HTTPError:
            time.sleep(0.5)
    raise SystemExit("the server did not come up")


def held_out_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """Real code prefixes from the held-out split, spread over it."""
    stream = tokenize_stream(tokenizer, load_texts("builtin:stdlib/eval", ROOT))
    step = (stream.numel() - length) // count
    return [stream[i * step : i * step + length].tolist() for i in range(count)]


SWEEP_COLUMNS = (
    keyed("decoding", "decoding"),
    keyed("tokens/s", "tokens_per_s", ".1f"),
    keyed("speedup", "speedup", ".2f", "x"),
    keyed("acceptance", "acceptance_rate", ".3f"),
    keyed("mean k", "mean_k", ".2f"),
    keyed("identical to target-only", "identical_to_target_only"),
)


def markdown(result: dict) -> str:
    """The benchmark as Markdown."""
    lines = ["# Speculative decoding on the example pair", "", f"Machine: {result['machine']}.", ""]
    lines += [f"Command: `{result['command']}`; {result['seconds']:.0f} s in all.", ""]
    lines += checks_table(result["checks"])
    for backend, table in result["sweep"].items():
        lines += [
            "",
            f"Greedy, {backend} backend, medians over {result['prompts']} prompts x {result['new_tokens']} tokens:",
            "",
        ]
        lines += markdown_table(SWEEP_COLUMNS, [{"decoding": name, **row} for name, row in table.items()])
    lines += [
        "",
        "transformers assisted generation (PyTorch):",
        "",
        "```",
        json.dumps(result["assisted"], indent=2),
        "```",
    ]
    lines += ["", "llama-server:", "", "```", json.dumps(result["llama_server"], indent=2), "```"]
    lines += ["", "Load run:", "", "```", json.dumps(result["load"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def checks(result: dict) -> dict:
    """The serving issue's acceptance checks."""
    onnx, torch_sweep = result["sweep"]["onnxruntime"], result["sweep"]["pytorch"]
    best_onnx = max((row for name, row in onnx.items() if name != "target_only"), key=lambda r: r["speedup"])
    load = result["load"]
    return {
        "speculative_speedup_at_least_1.8x_onnxruntime": {
            "adaptive_speedup": onnx["adaptive"]["speedup"],
            "best_fixed_or_adaptive": best_onnx["speedup"],
            "pass": onnx["adaptive"]["speedup"] >= 1.8,
        },
        "faster_than_transformers_assisted_generation": {
            "slimline_pytorch_adaptive_tokens_per_s": torch_sweep["adaptive"]["tokens_per_s"],
            "transformers_assisted_tokens_per_s": result["assisted"]["assisted_tokens_per_s"],
            "slimline_onnx_adaptive_tokens_per_s": onnx["adaptive"]["tokens_per_s"],
            "pass": torch_sweep["adaptive"]["tokens_per_s"] > result["assisted"]["assisted_tokens_per_s"],
        },
        "greedy_outputs_identical": {
            "onnxruntime": onnx["adaptive"]["identical_to_target_only"],
            "pytorch": torch_sweep["adaptive"]["identical_to_target_only"],
            "pass": all(
                row["identical_to_target_only"].split("/")[0] == row["identical_to_target_only"].split("/")[1]
                for table in result["sweep"].values()
                for row in table.values()
            ),
        },
        "load_run_clean": {
            "clients": load["clients"],
            "completed_streams": load["completed_streams"],
            "errors": load["errors"],
            "crossed_outputs": load["crossed_outputs"],
            "latency_p95_s": load["latency_p95_s"],
            "pass": load["errors"] == 0 and load["crossed_outputs"] == 0 and load["completed_streams"] > 0,
        },
    }


def main() -> None:
    """Measure and write JSON + Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "serving")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--load-seconds", type=float, default=60)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    stages = args.run_dir / "stages"
    missing = [
        s for s in ("tuned", "draft", "target-onnx", "draft-onnx") if not (stages / s / "artifact.json").exists()
    ]
    if missing:
        raise SystemExit(f"missing artifacts {missing} in {stages}: run `slimline run pipelines/serving.yaml` first")
    started = time.perf_counter()
    tokenizer = load_tokenizer(stages / "tuned")
    prompts = held_out_prompts(tokenizer, args.prompts, 64)
    sweeps = {}
    for backend, (target_stage, draft_stage) in {
        "onnxruntime": ("target-onnx", "draft-onnx"),
        "pytorch": ("tuned", "draft"),
    }.items():
        target, draft = (
            open_model(stages / target_stage),
            open_model(stages / draft_stage, shares_cores=True),
        )
        print(f"sweeping {backend} ...", flush=True)
        sweeps[backend] = sweep(target, draft, prompts, args.new_tokens)
        del target, draft
    print("transformers assisted generation ...", flush=True)
    assisted = assisted_generation(stages / "tuned", stages / "draft", prompts, args.new_tokens)
    print("llama-server baseline ...", flush=True)
    llama_server = llama_server_baseline(stages, prompts, args.new_tokens)
    print(f"load run: {args.clients} clients for {args.load_seconds:.0f} s ...", flush=True)
    text_prompts = [tokenizer.decode(p) for p in prompts]
    load = load_run(stages / "target-onnx", stages / "draft-onnx", text_prompts, args.clients, args.load_seconds, 48)
    result = {
        "machine": machine_description(),
        "command": "python benchmarks/speculative.py " + " ".join(sys.argv[1:]),
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "sweep": sweeps,
        "assisted": assisted,
        "llama_server": llama_server,
        "load": load,
    }
    result["checks"] = checks(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_results(args.out, "speculative", result, markdown(result))


if __name__ == "__main__":
    main()
