"""What a llama.cpp pass costs by the ubatches it is cut into: gaps in sequence ids, kept and filled.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llama_cpp_ubatches.py [--gguf-folder runs/real-model/llama-server/tuned-gguf]

With a KV stream per sequence (as the server opens a GGUF), llama.cpp cuts a ``llama_decode`` into
ubatches of consecutive sequence ids, and each ubatch reads every weight again. This opens the
target as the server does (16 sequences, each prefilled with 64 tokens) and times decoding passes
of several layouts, each with ``gap_fillers`` off (``GAP_FILL_TOKENS`` 0) and on, alternating, in
one process: the median of ``--repeats`` passes per layout and setting, over ``--rounds`` rounds.
The folder is the one ``benchmarks/serving.py`` makes (``model.gguf`` of the pair's target).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from slimline.hardware import machine_description
from slimline.reports.tables import write_results
from slimline.runtime import llama_cpp_model
from slimline.runtime.base import Feed

ROOT = Path(__file__).resolve().parent.parent
PROMPT_TOKENS = 64
SEQUENCES = 16


def without(*gaps: int) -> list[int]:
    """Sequence ids 0-15 except ``gaps``."""
    return [seq_id for seq_id in range(SEQUENCES) if seq_id not in gaps]


# name -> (sequence ids, tokens per row)
LAYOUTS = {
    "16 rows": (without(), 1),
    "15 rows, gap at 7": (without(7), 1),
    "14 rows, gap at 6-7": (without(6, 7), 1),
    "13 rows, gaps at 3, 7, 11": (without(3, 7, 11), 1),
    "8 rows, gap at 4": ([0, 1, 2, 3, 5, 6, 7, 8], 1),
    "2 rows, ids 0 and 2": ([0, 2], 1),
    "16 rows of 2 tokens": (without(), 2),
    "1 row": ([0], 1),
}


def opened(folder: Path):
    """The GGUF in ``folder`` as the server opens it, with ``SEQUENCES`` sequences of random prompts prefilled."""
    model = llama_cpp_model.LlamaCppModel(
        folder, max_sequences=SEQUENCES, flash_attention=True, unified_cache=False, steady_shapes=True
    )
    generator = torch.Generator().manual_seed(0)
    sequences = [model.new_sequence() for _ in range(SEQUENCES)]
    for sequence in sequences:
        prompt = torch.randint(1, model.n_vocab, (PROMPT_TOKENS,), generator=generator).tolist()
        model.forward([Feed(sequence, prompt, all_logits=False)])
    return model, sequences


def timed_pass(model, sequences, seq_ids: list[int], tokens: int, fill_tokens: int, repeats: int) -> float:
    """Median seconds of a decoding pass over ``seq_ids`` (each row ``tokens`` tokens), the cache reset after each."""
    llama_cpp_model.GAP_FILL_TOKENS = fill_tokens
    times = []
    for _ in range(repeats):
        feeds = [Feed(sequences[seq_id], [42] * tokens) for seq_id in seq_ids]
        started = time.perf_counter()
        model.forward(feeds)
        times.append(time.perf_counter() - started)
        for seq_id in seq_ids:
            sequences[seq_id].truncate(PROMPT_TOKENS)
    return statistics.median(times)


def main() -> None:
    """Time every layout with gaps kept and filled; write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_folder = ROOT / "runs" / "real-model" / "llama-server" / "tuned-gguf"
    parser.add_argument("--gguf-folder", type=Path, default=default_folder)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if not (args.gguf_folder / llama_cpp_model.MODEL_FILE).exists():
        raise SystemExit(f"no {llama_cpp_model.MODEL_FILE} in {args.gguf_folder}: run benchmarks/serving.py first")
    model, sequences = opened(args.gguf_folder)
    shipped = llama_cpp_model.GAP_FILL_TOKENS
    kept: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    filled: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for _ in range(args.rounds):
        for name, (seq_ids, tokens) in LAYOUTS.items():
            kept[name].append(timed_pass(model, sequences, seq_ids, tokens, 0, args.repeats))
            filled[name].append(timed_pass(model, sequences, seq_ids, tokens, shipped, args.repeats))
    model.close()
    rows = [
        {
            "layout": name,
            "ubatches_kept": len(llama_cpp_model.llama_cpp_ubatches(seq_ids, [tokens] * len(seq_ids), model.n_batch)),
            "kept_ms": round(1e3 * statistics.median(kept[name]), 2),
            "filled_ms": round(1e3 * statistics.median(filled[name]), 2),
            "kept_rounds_ms": [round(1e3 * t, 2) for t in kept[name]],
            "filled_rounds_ms": [round(1e3 * t, 2) for t in filled[name]],
        }
        for name, (seq_ids, tokens) in LAYOUTS.items()
    ]
    result = {"machine": machine_description(), "model": str(args.gguf_folder), "gap_fill_tokens": shipped}
    result |= {"repeats": args.repeats, "rounds": args.rounds, "rows": rows}
    lines = [
        "# llama.cpp passes by their ubatches: gaps in sequence ids kept and filled",
        "",
        f"Machine: {result['machine']}. Model: `{args.gguf_folder}` opened as the server opens it (a KV stream",
        f"per sequence, flash attention, steady shapes), {SEQUENCES} sequences of {PROMPT_TOKENS} prompt tokens.",
        f"Median of {args.repeats} passes per layout, median over {args.rounds} alternating rounds;",
        f"filled: `gap_fillers` with `GAP_FILL_TOKENS` {shipped}.",
        "",
        "| layout | ubatches (gaps kept) | gaps kept | gaps filled | rounds kept / filled |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {row['layout']} | {row['ubatches_kept']} | {row['kept_ms']} ms | {row['filled_ms']} ms "
        f"| {row['kept_rounds_ms']} / {row['filled_rounds_ms']} |"
        for row in rows
    ]
    write_results(args.out, "llama_cpp_ubatches", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
