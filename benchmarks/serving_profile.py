"""Where the serving engine's time goes under load: its passes timed in process, no HTTP.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serving_profile.py [--backend gguf] [--gguf-type f16]

Opens the pair as ``slimline serve`` does (``build_engine``: the GGUF pair ``benchmarks/serving.py``
makes, or the ONNX pair) and runs ``--clients`` client threads, each generating
``--requests-per-client`` greedy completions of held-out code prompts (64 tokens in, ``--new-tokens``
out) through ``Engine.generate``. Every target and draft pass is timed where the engine calls it
(the models' ``forward``, wrapped on the instance), so the wall time splits into target passes,
draft passes and the rest (scheduling, sampling, detokenising, Python). Target passes are told
apart by what they carry: decoding passes (every row one or two tokens) by rows and tokens, and
passes carrying prompt tokens. ``--rounds`` repeats the load on the same engine; figures are medians.
Writes serving_profile.json and serving_profile.md (``--name``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script

from gguf_pair import gguf_pair
from serving import PROMPT_TOKENS, gguf_serving_pair
from speculative import held_out_prompts

from slimline.hardware import machine_description
from slimline.models import load_tokenizer
from slimline.reports.tables import write_results
from slimline.serve.engine import GenerationRequest
from slimline.serve.server import build_engine, resolve_pair

ROOT = Path(__file__).resolve().parent.parent


class PassLog:
    """Each pass of one model: seconds, rows and tokens per row, in the order the engine ran them."""

    def __init__(self, model) -> None:
        self.passes: list[tuple[float, list[int]]] = []
        forward = model.forward

        def timed(feeds):
            started = time.perf_counter()
            logits = forward(feeds)
            self.passes.append((time.perf_counter() - started, [len(feed.tokens) for feed in feeds]))
            return logits

        model.forward = timed  # on the instance: the engine's calls go through it, the class is untouched


def pair_folders(args: argparse.Namespace) -> tuple[Path, Path]:
    """The target and draft folders ``slimline serve`` would be given."""
    stages = args.run_dir / "stages"
    if args.backend == "onnx":
        return stages / args.target_onnx, stages / args.draft_onnx
    target, draft = gguf_pair(stages, args.run_dir / "llama-server", (args.target, args.draft), args.gguf_type)
    return gguf_serving_pair(args, target, draft)


def load(engine, prompts: list[list[int]], clients: int, new_tokens: int) -> tuple[float, int]:
    """``clients`` threads sharing ``prompts`` (one after another each); wall seconds and tokens generated."""
    generated = [0] * clients

    def client(index: int) -> None:
        for prompt in prompts[index::clients]:
            _, final = engine.generate(GenerationRequest(prompt, new_tokens), timeout=600)
            generated[index] += final.usage["completion_tokens"]

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, sum(generated)


def summary(wall: float, tokens: int, target: list[tuple[float, list[int]]], draft: list[tuple[float, list[int]]]):
    """One load's figures: shares of the wall time and the target's passes by kind."""
    decoding: dict[tuple[int, int], list[float]] = defaultdict(list)  # (rows, tokens) -> seconds
    prompt_passes, prompt_seconds = 0, 0.0
    for seconds, rows in target:
        if max(rows) <= 2:
            decoding[len(rows), sum(rows)].append(seconds)
        else:
            prompt_passes, prompt_seconds = prompt_passes + 1, prompt_seconds + seconds
    target_seconds, draft_seconds = sum(s for s, _ in target), sum(s for s, _ in draft)
    return {
        "wall_s": round(wall, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "target_share": round(target_seconds / wall, 3),
        "draft_share": round(draft_seconds / wall, 3),
        "rest_share": round(1 - (target_seconds + draft_seconds) / wall, 3),
        "target_passes": len(target),
        "draft_passes": len(draft),
        "passes_with_prompt_tokens": prompt_passes,
        "prompt_pass_seconds": round(prompt_seconds, 2),
        "decoding_passes": {
            f"{rows} rows, {tokens} tokens": {
                "passes": len(times),
                "median_ms": round(1e3 * statistics.median(times), 1),
            }
            for (rows, tokens), times in sorted(decoding.items())
        },
    }


def main() -> None:
    """Run the load ``--rounds`` times on one engine; write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "real-model")
    parser.add_argument("--backend", choices=["gguf", "onnx"], default="gguf")
    parser.add_argument("--gguf-type", default="f16", help="The converter's outtype for the GGUF pair.")
    parser.add_argument("--target", default="tuned")
    parser.add_argument("--draft", default="draft")
    parser.add_argument("--target-onnx", default="onnx")
    parser.add_argument("--draft-onnx", default="draft-onnx")
    parser.add_argument(
        "--no-batch-invariant", action="store_true", help="As `slimline serve --no-batch-invariant` (llama.cpp)."
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="serving_profile", help="The results' file name, without suffix.")
    args = parser.parse_args()
    if not (args.run_dir / "stages" / args.target).is_dir():
        raise SystemExit(f"no stage {args.target} in {args.run_dir}: run the pipeline first (see serving.py)")
    target_folder, draft_folder = pair_folders(args)
    pair = resolve_pair(target_folder, draft_folder, None, None)
    engine = build_engine(pair, max_active=args.clients, batch_invariant=not args.no_batch_invariant)
    target_log, draft_log = PassLog(engine.target), PassLog(engine.draft)
    tokenizer = load_tokenizer(args.run_dir / "stages" / args.target)
    prompts = held_out_prompts(tokenizer, args.clients * args.requests_per_client, PROMPT_TOKENS)
    rounds = []
    for _ in range(args.rounds):
        target_log.passes.clear()
        draft_log.passes.clear()
        wall, tokens = load(engine, prompts, args.clients, args.new_tokens)
        rounds.append(summary(wall, tokens, list(target_log.passes), list(draft_log.passes)))
    engine.shutdown()
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key != "decoding_passes"}
    result = {
        "machine": machine_description(),
        "command": " ".join(["python benchmarks/serving_profile.py", *sys.argv[1:]]),
        "target": str(target_folder),
        "draft": str(draft_folder),
        "clients": args.clients,
        "requests": len(prompts),
        "median": median,
        "rounds": rounds,
    }
    lines = [
        "# Where the serving engine's time goes: passes timed in process",
        "",
        f"Machine: {result['machine']}.",
        "",
        f"Command: `{result['command']}`. Pair `{target_folder}` / `{draft_folder}`, opened by `build_engine`",
        f"as `slimline serve` opens it; {args.clients} client threads, {len(prompts)} greedy requests of",
        f"{PROMPT_TOKENS} prompt tokens and up to {args.new_tokens} new tokens, no HTTP; {args.rounds} rounds on one engine.",
        "",
        "| round | wall s | tok/s | target passes | draft passes | rest | target passes (prompt ones) | "
        "prompt passes s | decoding passes: count x (rows, tokens) @ median ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for number, r in enumerate(rounds, 1):
        decoding = ", ".join(
            f"{d['passes']} x ({shape}) @ {d['median_ms']}" for shape, d in r["decoding_passes"].items()
        )
        lines.append(
            f"| {number} | {r['wall_s']} | {r['tokens_per_s']} | {r['target_share']:.1%} | {r['draft_share']:.1%} "
            f"| {r['rest_share']:.1%} | {r['target_passes']} ({r['passes_with_prompt_tokens']}) "
            f"| {r['prompt_pass_seconds']} | {decoding} |"
        )
    write_results(args.out, args.name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
