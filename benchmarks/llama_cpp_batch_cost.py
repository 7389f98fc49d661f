"""What batching can gain on llama.cpp on this CPU: pass cost by rows, for each GGUF type of the target.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llama_cpp_batch_cost.py [--run-dir runs/real-model] [--types f16 q8_0]

Converts the run's PyTorch target (``--target``, default ``tuned``) to each GGUF type once (kept
beside the pair ``benchmarks/serving.py`` makes), opens each as the server opens it (a KV stream
per sequence, flash attention, steady shapes; 16 sequences of 64 prompt tokens) and times decoding
passes of 1, 4 and 16 rows of one token (16 also over 96 and 128 cached tokens a row), 16 rows of
two tokens and 8 rows of 64 tokens (a prompt call of 512 tokens, as the engine prefills), the
types alternating round by round in one process. ``16-row gain`` is 16 one-row passes' time over
one 16-row pass: the most continuous batching can add to a single stream's tokens/s on this
runtime, CPU and type, which bounds the serving check "batched >= 4x interleaved" on llama.cpp.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script

from gguf_pair import gguf_pair
from llama_cpp_ubatches import PROMPT_TOKENS, SEQUENCES, opened
from serving import gguf_serving_folder

from slimline.hardware import machine_description
from slimline.reports.tables import write_results
from slimline.runtime.base import Feed

ROOT = Path(__file__).resolve().parent.parent
# name -> (rows, tokens per row, tokens cached per row); 8 rows of 64 tokens is one 512-token prompt
# call, as the engine prefills; the cached lengths are a 16-client level's replies half and all done
LAYOUTS = {
    "1 row": (1, 1, PROMPT_TOKENS),
    "4 rows": (4, 1, PROMPT_TOKENS),
    "16 rows": (16, 1, PROMPT_TOKENS),
    "16 rows, 96 cached": (16, 1, 96),
    "16 rows, 128 cached": (16, 1, 128),
    "16 rows of 2 tokens": (16, 2, PROMPT_TOKENS),
    "8 rows of 64 tokens": (8, 64, PROMPT_TOKENS),
}


def timed_pass(model, sequences, rows: int, tokens: int, cached: int, repeats: int) -> float:
    """Median seconds of a pass of ``rows`` rows of ``tokens`` tokens over ``cached`` tokens a row.

    The rows grow to ``cached`` tokens first and are cut back to the prompt afterwards.
    """
    if cached > PROMPT_TOKENS:
        model.forward([Feed(sequence, [42] * (cached - PROMPT_TOKENS), False) for sequence in sequences[:rows]])
    times = []
    for _ in range(repeats):
        feeds = [Feed(sequence, [42] * tokens) for sequence in sequences[:rows]]
        started = time.perf_counter()
        model.forward(feeds)
        times.append(time.perf_counter() - started)
        for sequence in sequences[:rows]:
            sequence.truncate(cached)
    for sequence in sequences[:rows]:
        sequence.truncate(PROMPT_TOKENS)
    return statistics.median(times)


def main() -> None:
    """Time every layout on every type, alternating; write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "real-model")
    parser.add_argument("--target", default="tuned", help="Stage id of the PyTorch target.")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"], help="The converter's outtypes.")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    stages, folder = args.run_dir / "stages", args.run_dir / "llama-server"
    if not (stages / args.target).is_dir():
        raise SystemExit(f"no stage {args.target} in {stages}: run the pipeline first (see benchmarks/serving.py)")
    models = {}
    for outtype in args.types:
        gguf, _ = gguf_pair(stages, folder, (args.target, args.target), outtype)
        models[outtype] = opened(gguf_serving_folder(gguf, stages / args.target, folder / f"cost-{outtype}"))
    times: dict[tuple[str, str], list[float]] = {(t, name): [] for t in args.types for name in LAYOUTS}
    for _ in range(args.rounds):
        for outtype, (model, sequences) in models.items():
            for name, (rows, tokens, cached) in LAYOUTS.items():
                times[outtype, name].append(timed_pass(model, sequences, rows, tokens, cached, args.repeats))
    for model, _ in models.values():
        model.close()
    rows = []
    for outtype in args.types:
        ms = {name: 1e3 * statistics.median(times[outtype, name]) for name in LAYOUTS}
        rows.append(
            {"type": outtype}
            | {f"{name} ms": round(value, 2) for name, value in ms.items()}
            | {
                "1-row tok/s": round(1e3 / ms["1 row"], 1),
                "16-row tok/s": round(16e3 / ms["16 rows"], 1),
                "16-row gain": round(16 * ms["1 row"] / ms["16 rows"], 2),
                "prompt ms/token": round(ms["8 rows of 64 tokens"] / 512, 2),
                "rounds ms": {name: [round(1e3 * t, 2) for t in times[outtype, name]] for name in LAYOUTS},
            }
        )
    result = {"machine": machine_description(), "target": str(stages / args.target), "rows": rows}
    result |= {"command": " ".join(["python benchmarks/llama_cpp_batch_cost.py", *sys.argv[1:]])}
    result |= {"repeats": args.repeats, "rounds": args.rounds}
    columns = [*(f"{name} ms" for name in LAYOUTS), "1-row tok/s", "16-row tok/s", "16-row gain", "prompt ms/token"]
    lines = [
        "# llama.cpp pass cost by rows, per GGUF type of the target",
        "",
        f"Machine: {result['machine']}.",
        "",
        f"Command: `{result['command']}`. Target `{stages / args.target}`, opened as the server opens it;",
        f"{SEQUENCES} sequences of {PROMPT_TOKENS} prompt tokens. Median of {args.repeats} passes per layout,",
        f"median over {args.rounds} rounds, the types alternating. 16-row gain: 16 one-row passes over one",
        "16-row pass, the most batching adds to one stream's tokens/s here.",
        "",
        "| type | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    lines += ["| " + row["type"] + " | " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    write_results(args.out, "llama_cpp_batch_cost", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
