"""Serving v2: continuous batching with speculative decoding on every backend, against llama-server.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serving.py [--run-dir runs/real-model] [--quick]

Needs a run with a target, its distilled draft and both exported to ONNX (default
``runs/real-model``: ``tuned``, ``draft``, ``onnx``, ``draft-onnx``; the stage ids are options).
The PyTorch pair is also converted to GGUF (f16, or ``--gguf-type``; llama.cpp's converter, once,
kept in the run folder) and each GGUF is put in a folder with its checkpoint's tokenizer, so
``slimline serve`` opens it through its llama.cpp runtime. In one invocation, on the same held-out
code prompts, greedy, each server a subprocess on 127.0.0.1 measured by concurrent streaming
OpenAI clients:

1. ``llama-server -np N`` (its continuous batching), and with the draft
   (``-md draft.gguf --spec-type draft-simple``), when its binary is built
   (``scripts/build_llama_server.sh``; skipped with the reason otherwise);
2. ``slimline serve TARGET --draft DRAFT`` on the ONNX, GGUF and PyTorch pairs, each with
   ``--max-batch 1`` (the interleaved engine: one request per forward pass, round-robin) and
   batched (``--max-batch`` = clients);
3. for 1, 4 and 16 clients (a fresh server per count, ``-np``/``--max-active`` = clients), each
   client sending ``--requests-per-client`` requests: aggregate generated tokens/s, time to
   first token and per-request latency (p50, p95), errors, and outputs that differ from the
   prompt's greedy completion alone. With one client every prompt is sent, one at a time; the
   first configuration of each group (llama-server, each slimline backend) gives the group's
   references that way. With one client ``--max-batch`` is 1 either way, so the slimline
   interleaved and batched rows share that measurement.

Writes serving.json and serving.md with the machine, the load average at start and end, every
figure and the issue's acceptance checks. ``--quick`` checks the script in a few minutes (1 and 4
clients, fewer and shorter requests, no PyTorch pair) without supporting any claim.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script

from gguf_pair import gguf_pair
from speculative import free_port, held_out_prompts, llama_server_binary, wait_until_up

from slimline.evaluate.latency import percentile
from slimline.hardware import machine_description
from slimline.models import load_tokenizer
from slimline.reports.tables import checks_table, keyed, markdown_table, write_results

ROOT = Path(__file__).resolve().parents[1]
FAST_GGUF = "not batch-invariant"  # slimline serve --no-batch-invariant on the GGUF pair
PROMPT_TOKENS = 64
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


class Config(NamedTuple):
    """One server configuration: which group's references it is checked against, and how to start it."""

    name: str
    group: str  # 'llama-server', or the slimline backend: its outputs are checked against the group's references
    server: str  # 'llama-server' or 'slimline'
    target: Path
    draft: Path | None
    batched: bool = True  # slimline: --max-batch = clients (False: 1, the interleaved engine)
    options: tuple[str, ...] = ()  # slimline: more command-line options

    def command(self, clients: int, port: int, binary: Path | None, slot_tokens: int) -> list[str]:
        """The server's command line for ``clients`` concurrent clients."""
        if self.server == "llama-server":
            command = [str(binary), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads())]
            command += ["-m", str(self.target), "-np", str(clients), "-c", str(clients * slot_tokens), "--no-webui"]
            if self.draft is not None:  # without --spec-type draft-simple, llama-server never uses the draft
                command += ["-md", str(self.draft), "--spec-type", "draft-simple"]
            return command
        command = [sys.executable, "-m", "slimline.cli", "serve", str(self.target), "--port", str(port)]
        if self.draft is not None:
            command += ["--draft", str(self.draft)]
        command += ["--max-active", str(clients), "--max-batch", str(clients if self.batched else 1)]
        return [*command, *self.options]


def threads() -> int:
    """CPU threads a server may use (what torch and ONNX Runtime take by default)."""
    return len(os.sched_getaffinity(0))


def gguf_serving_folder(gguf: Path, checkpoint: Path, folder: Path) -> Path:
    """A folder ``slimline serve`` opens with llama.cpp: ``model.gguf`` and the checkpoint's tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model.gguf"
    if not model.exists() or model.stat().st_ino != gguf.stat().st_ino:
        model.unlink(missing_ok=True)
        os.link(gguf, model)  # the same file, not a second 270 MB copy
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, folder / name)
    return folder


def gguf_serving_pair(args: argparse.Namespace, target_gguf: Path, draft_gguf: Path) -> tuple[Path, Path]:
    """The GGUF pair's folders for ``slimline serve`` in the run's ``llama-server`` folder (f16: ``<stage>-gguf``)."""
    stages, folder = args.run_dir / "stages", args.run_dir / "llama-server"
    kind = "gguf" if args.gguf_type == "f16" else f"{args.gguf_type}-gguf"
    return (
        gguf_serving_folder(target_gguf, stages / args.target, folder / f"{args.target}-{kind}"),
        gguf_serving_folder(draft_gguf, stages / args.draft, folder / f"{args.draft}-{kind}"),
    )


def configurations(args: argparse.Namespace, binary: Path | None) -> tuple[list[Config], dict[str, str]]:
    """Every configuration to measure, in order (a group's first one gives its references); skipped ones with why."""
    stages = args.run_dir / "stages"
    configs: list[Config] = []
    skipped: dict[str, str] = {}
    needs_gguf = binary is not None or "gguf" in args.backends
    if needs_gguf:
        target_gguf, draft_gguf = gguf_pair(
            stages, args.run_dir / "llama-server", (args.target, args.draft), args.gguf_type
        )
    if binary is None:
        skipped["llama-server"] = (
            "no llama-server binary: run scripts/build_llama_server.sh or set SLIMLINE_LLAMA_SERVER"
        )
    else:
        configs.append(Config("llama-server -np N", "llama-server", "llama-server", target_gguf, None))
        configs.append(Config("llama-server -np N -md", "llama-server", "llama-server", target_gguf, draft_gguf))
    pairs = {
        "onnx": (stages / args.target_onnx, stages / args.draft_onnx),
        "pytorch": (stages / args.target, stages / args.draft),
    }
    if "gguf" in args.backends:
        pairs["gguf"] = gguf_serving_pair(args, target_gguf, draft_gguf)
    for backend in ("onnx", "gguf", "pytorch"):
        if backend not in args.backends:
            skipped[f"slimline {backend}"] = "not asked for (--backends)"
            continue
        target, draft = pairs[backend]
        group = f"slimline {backend}"
        configs.append(Config(f"{group} interleaved", group, "slimline", target, draft, batched=False))
        configs.append(Config(f"{group} batched", group, "slimline", target, draft, batched=True))
        if backend == "gguf":  # the price of batch invariance: llama.cpp as fast as it goes, outputs may differ
            fast, options = f"{group} {FAST_GGUF}", ("--no-batch-invariant",)
            configs.append(Config(f"{fast} interleaved", fast, "slimline", target, draft, False, options))
            configs.append(Config(f"{fast} batched", fast, "slimline", target, draft, True, options))
    return configs, skipped


@contextmanager
def running(command: list[str], log: Path) -> Iterator[str]:
    """A server subprocess on localhost (its output to ``log``) until the block ends; yields its URL."""
    port = command[command.index("--port") + 1]
    with log.open("w") as log_file:  # a file, not a pipe: a full pipe would stall the server's logging
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, server, timeout=300, log=log)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def stream_completion(client, model: str, prompt: str, max_tokens: int) -> dict:
    """One greedy streaming completion: its text, generated tokens, time to first token and latency (or its error)."""
    started = time.perf_counter()
    pieces, first, tokens, finish, acceptance = [], None, None, None, None
    try:
        stream = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"cache_prompt": False},  # llama-server: no reuse of an earlier request's prompt
        )
        for chunk in stream:
            if chunk.usage is not None:
                tokens, acceptance = chunk.usage.completion_tokens, draft_acceptance(chunk)
            for choice in chunk.choices:
                if choice.text and first is None:
                    first = time.perf_counter() - started
                pieces.append(choice.text or "")
                finish = choice.finish_reason or finish
    except Exception as error:  # counted, not raised: the run measures errors
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    if finish not in ("length", "stop"):
        return {"error": f"finish_reason {finish!r}"}
    latency = time.perf_counter() - started
    text = "".join(pieces)
    return {
        "text": text,
        "tokens": tokens,
        "acceptance": acceptance,
        "first_token_s": first or latency,
        "latency_s": latency,
    }


def draft_acceptance(chunk) -> float | None:
    """Accepted / proposed draft tokens of a request, from its last chunk (slimline's usage, llama-server's timings)."""
    usage = chunk.usage.model_extra or {}
    if usage.get("acceptance_rate") is not None:
        return usage["acceptance_rate"]
    timings = (chunk.model_extra or {}).get("timings") or {}
    return timings["draft_n_accepted"] / timings["draft_n"] if timings.get("draft_n") else None


def run_level(url: str, assignments: list[list[int]], prompts: list[str], max_tokens: int) -> tuple[dict, float]:
    """Every client (one thread each) streams its prompts one after another, all starting together.

    ``assignments[i]`` are client i's prompt indices; returns (prompt index -> result, wall seconds).
    """
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    stream_completion(client, model, prompts[0], 8)  # warm-up: first-run allocations are not measured
    results: dict[int, dict] = {}
    lock = threading.Lock()
    start = threading.Barrier(len(assignments) + 1)

    def work(indices: list[int]) -> None:
        start.wait()
        for index in indices:
            result = stream_completion(client, model, prompts[index], max_tokens)
            with lock:
                results[index] = result

    workers = [threading.Thread(target=work, args=(indices,)) for indices in assignments]
    for worker in workers:
        worker.start()
    start.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    return results, time.perf_counter() - started


def summary(results: dict[int, dict], wall: float, references: dict[int, str], tokenizer) -> dict:
    """A level's figures: aggregate tokens/s, first-token and latency percentiles, errors, mismatches."""
    done = {index: result for index, result in results.items() if "error" not in result}
    errors = [result["error"] for result in results.values() if "error" in result]
    for result in done.values():  # a server that sends no usage: count the text's tokens
        if result["tokens"] is None:
            result["tokens"] = len(tokenizer.encode(result["text"], add_special_tokens=False))
    mismatched = sorted(index for index, result in done.items() if result["text"] != references.get(index))
    first = [result["first_token_s"] for result in done.values()]
    latency = [result["latency_s"] for result in done.values()]
    tokens = sum(result["tokens"] for result in done.values())
    acceptance = [result["acceptance"] for result in done.values() if result["acceptance"] is not None]
    return {
        "requests": len(results),
        "completed": len(done),
        "generated_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "first_token_p50_s": percentile(first, 0.50) if first else None,
        "first_token_p95_s": percentile(first, 0.95) if first else None,
        "latency_p50_s": percentile(latency, 0.50) if latency else None,
        "latency_p95_s": percentile(latency, 0.95) if latency else None,
        "draft_acceptance_p50": percentile(acceptance, 0.50) if acceptance else None,
        "errors": len(errors),
        "error_samples": errors[:3],
        "mismatches": len(mismatched),
        "mismatched_prompts": mismatched[:8],
    }


def measure(config: Config, clients: int, args, prompts: list[str], binary: Path | None, logs: Path) -> tuple:
    """Start the configuration for ``clients`` clients and run its level: (results by prompt, wall s, command)."""
    port = free_port()
    slot_tokens = 256 * -(-(PROMPT_TOKENS + args.new_tokens + 64) // 256)  # prompt, reply, a draft's lookahead
    command = config.command(clients, port, binary, slot_tokens)
    if clients == 1:  # every prompt, one at a time: the greedy completion of each alone
        assignments = [list(range(len(prompts)))]
    else:
        assignments = [[i + clients * turn for turn in range(args.requests_per_client)] for i in range(clients)]
    log = logs / f"{config.name.replace(' ', '_')}-{clients}.log"
    with running(command, log) as url:
        results, wall = run_level(url, assignments, prompts, args.new_tokens)
    return results, wall, command


def measure_all(configs: list[Config], args, prompts: list[str], binary: Path | None, tokenizer) -> list[dict]:
    """Every configuration at every client count: a row of figures each (or why it failed)."""
    references: dict[str, dict[int, str]] = {}
    shared: dict[tuple, tuple] = {}  # identical commands (slimline with one client) run once
    rows = []
    with tempfile.TemporaryDirectory(prefix="slimline-serving-") as scratch:
        for config in configs:
            for clients in args.clients:
                print(f"{config.name}: {clients} client(s) ...", flush=True)
                key = (config.group, config.target, config.draft, clients, config.batched or clients == 1)
                try:
                    if key not in shared:
                        shared[key] = measure(config, clients, args, prompts, binary, Path(scratch))
                    results, wall, command = shared[key]
                except (SystemExit, Exception) as error:  # the server did not come up or died: record why, go on
                    failure = f"{type(error).__name__}: {error}"[-300:]
                    rows.append({"config": config.name, "clients": clients, "failed": failure})
                    continue
                if clients == 1 and config.group not in references:
                    references[config.group] = {i: r["text"] for i, r in results.items() if "error" not in r}
                row = summary(results, wall, references.get(config.group, {}), tokenizer)
                rows.append({"config": config.name, "group": config.group, "clients": clients, **row})
                rows[-1]["command"] = shown(command)
                rows[-1]["texts"] = {i: r.get("text") for i, r in results.items()} if clients == 1 else None
                print(f"  {row['tokens_per_s']:.1f} tok/s, {row['errors']} errors, {row['mismatches']} mismatches")
    return rows


HEAD_TO_HEAD = ("llama-server -np N", "slimline gguf batched")


def head_to_head(
    configs: list[Config], args, prompts: list[str], binary: Path | None, rows: list[dict], tokenizer
) -> dict | None:
    """``--rounds`` more measurements of llama-server and slimline on GGUF at the most clients, taken in turn.

    The two run within a few percent of each other and this machine drifts 10-20% over minutes, so
    one measurement of each, minutes apart, cannot order them: alternating rounds see the same
    drift, and the check compares medians (the grid's measurement is the first round of each).
    """
    clients = max(args.clients)
    pair = [next((c for c in configs if c.name == name), None) for name in HEAD_TO_HEAD]
    first = [find(rows, name, clients) for name in HEAD_TO_HEAD]
    alone = [find(rows, name, 1) for name in HEAD_TO_HEAD]
    if args.rounds < 2 or None in pair or None in first or None in alone:
        return None
    rounds = [{name: row["tokens_per_s"] for name, row in zip(HEAD_TO_HEAD, first, strict=True)}]
    references = {name: row["texts"] for name, row in zip(HEAD_TO_HEAD, alone, strict=True)}  # each prompt alone
    errors = 0
    mismatches = dict.fromkeys(HEAD_TO_HEAD, 0)  # each against its own one-client outputs
    with tempfile.TemporaryDirectory(prefix="slimline-serving-") as scratch:
        for turn in range(1, args.rounds):
            rounds.append({})
            for config in pair if turn % 2 else reversed(pair):  # neither always goes first
                print(f"head to head, round {turn + 1}: {config.name}, {clients} clients ...", flush=True)
                try:
                    results, wall, _ = measure(config, clients, args, prompts, binary, Path(scratch))
                except (SystemExit, Exception) as error:  # as measure_all: keep what was measured, count it
                    print(f"  failed: {type(error).__name__}: {error}"[-300:], flush=True)
                    errors += 1
                    continue
                row = summary(results, wall, references[config.name], tokenizer)
                errors += row["errors"]
                mismatches[config.name] += row["mismatches"]
                rounds[-1][config.name] = row["tokens_per_s"]
                print(f"  {row['tokens_per_s']:.1f} tok/s", flush=True)
    rates = {name: [turn[name] for turn in rounds if name in turn] for name in HEAD_TO_HEAD}
    medians = {name: statistics.median(values) for name, values in rates.items()}
    server, slimline = HEAD_TO_HEAD
    return {
        "clients": clients,
        "tokens_per_s": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        "medians": {name: round(value, 1) for name, value in medians.items()},
        "ratio_of_medians": medians[slimline] / medians[server],
        "round_ratios": [round(turn[slimline] / turn[server], 3) for turn in rounds if len(turn) == 2],
        "errors": errors,
        "mismatches": mismatches,
    }


def shown(command: list[str]) -> str:
    """A server command as the results show it: the program's name, the free port it got as PORT."""
    port = command.index("--port") + 1
    return " ".join([Path(command[0]).name, *command[1:port], "PORT", *command[port + 1 :]])


def find(rows: list[dict], config: str, clients: int) -> dict | None:
    """The measured row of a configuration at a client count (None if it was not measured or failed)."""
    return next((r for r in rows if r["config"] == config and r["clients"] == clients and "failed" not in r), None)


def ratio(a: dict | None, b: dict | None) -> float | None:
    """The aggregate tokens/s of a over that of b, when both were measured."""
    return a["tokens_per_s"] / b["tokens_per_s"] if a and b and b["tokens_per_s"] else None


def batching_check(rows: list[dict], group: str, clients: int) -> dict:
    """(a) batched >= 4x interleaved at the most clients, with no error and no mismatch in either, at any count."""
    batched, interleaved = find(rows, f"{group} batched", clients), find(rows, f"{group} interleaved", clients)
    mine = [r for r in rows if r["config"] in (f"{group} batched", f"{group} interleaved")]
    errors = sum(r.get("errors", 0) for r in mine) + sum("failed" in r for r in mine)
    mismatches = sum(r.get("mismatches", 0) for r in mine)
    speedup = ratio(batched, interleaved)
    return {
        "clients": clients,
        "batched_tokens_per_s": batched and batched["tokens_per_s"],
        "interleaved_tokens_per_s": interleaved and interleaved["tokens_per_s"],
        "speedup": speedup,
        "errors": errors,
        "mismatches": mismatches,
        "pass": speedup is not None and speedup >= 4.0 and errors == 0 and mismatches == 0,
    }


def differing_prompts(slimline: dict | None, speculative: dict | None, plain: dict | None) -> list[dict]:
    """The prompts slimline and ``llama-server -md`` completed differently, with whether -md agreed with plain there.

    llama-server's verification passes and its one-token passes round differently, so its own
    outputs with and without the draft may differ at near ties.
    """
    if not slimline or not speculative or not plain:
        return []
    return [
        {"prompt": index, "llama_server_md_equals_llama_server": text == plain["texts"].get(index)}
        for index, text in speculative["texts"].items()
        if text != slimline["texts"].get(index)
    ]


def identical_outputs(a: dict | None, b: dict | None) -> str | None:
    """How many prompts two one-client rows completed identically, as ``same/total``."""
    if not a or not b:
        return None
    same = sum(text is not None and text == b["texts"].get(index) for index, text in a["texts"].items())
    return f"{same}/{len(a['texts'])}"


def llama_cpp_checks(rows: list[dict], clients: int, rounds: dict | None = None) -> dict:
    """(b) slimline on GGUF: one stream >= 1.3x ``llama-server -md`` (identical output); at most clients >= ``-np``.

    With head-to-head ``rounds``, the second compares the medians of the alternating rounds.
    """
    single, speculative = find(rows, "slimline gguf batched", 1), find(rows, "llama-server -np N -md", 1)
    identical = identical_outputs(single, speculative)
    differing = differing_prompts(single, speculative, find(rows, "llama-server -np N", 1))
    single_ratio = ratio(single, speculative)
    crowd, plain = find(rows, "slimline gguf batched", clients), find(rows, "llama-server -np N", clients)
    crowd_ratio = ratio(crowd, plain)
    crowd_errors = crowd and crowd["errors"]
    if rounds is not None:
        crowd_ratio = rounds["ratio_of_medians"]
        # a slimline output unlike its prompt's alone fails it too; llama-server's own are reported only
        crowd_errors = crowd_errors + rounds["errors"] + rounds["mismatches"][HEAD_TO_HEAD[1]]
        crowd_rate, plain_rate = (rounds["medians"][name] for name in reversed(HEAD_TO_HEAD))
    else:
        crowd_rate, plain_rate = crowd and crowd["tokens_per_s"], plain and plain["tokens_per_s"]
    return {
        "llama_cpp_single_stream_1.3x_llama_server_md": {
            "slimline_tokens_per_s": single and single["tokens_per_s"],
            "llama_server_md_tokens_per_s": speculative and speculative["tokens_per_s"],
            "ratio": single_ratio,
            "identical_outputs": identical,
            **({"differing_prompts": differing} if differing else {}),
            "pass": single_ratio is not None
            and single_ratio >= 1.3
            and identical is not None
            and identical.split("/")[0] == identical.split("/")[1],
        },
        f"llama_cpp_{clients}_clients_at_least_llama_server_np": {
            "clients": clients,
            "slimline_tokens_per_s": crowd_rate,
            "llama_server_np_tokens_per_s": plain_rate,
            "ratio": crowd_ratio,
            **({"rounds": len(rounds["round_ratios"]), "round_ratios": rounds["round_ratios"]} if rounds else {}),
            "errors": crowd_errors,
            "pass": crowd_ratio is not None and crowd_ratio >= 1.0 and crowd_errors == 0,
        },
    }


def checks(rows: list[dict], groups: list[str], rounds: dict | None = None) -> dict:
    """The issue's acceptance checks, measured or not (a missing measurement fails)."""
    clients = max(r["clients"] for r in rows)
    result = {
        f"{group.replace(' ', '_')}_batched_4x_interleaved_at_{clients}_clients": batching_check(rows, group, clients)
        for group in groups
        if group.startswith("slimline") and not group.endswith(FAST_GGUF)  # the fast group is for comparison
    }
    return {**result, **llama_cpp_checks(rows, clients, rounds)}


ROW_COLUMNS = (
    keyed("configuration", "config"),
    keyed("clients", "clients", "d", justify="right"),
    keyed("requests", "requests", "d", justify="right"),
    keyed("tokens/s", "tokens_per_s", ".1f", justify="right"),
    keyed("TTFT p50", "first_token_p50_s", ".2f", " s", "right"),
    keyed("TTFT p95", "first_token_p95_s", ".2f", " s", "right"),
    keyed("latency p50", "latency_p50_s", ".2f", " s", "right"),
    keyed("latency p95", "latency_p95_s", ".2f", " s", "right"),
    keyed("acceptance p50", "draft_acceptance_p50", ".2f", justify="right"),
    keyed("errors", "errors", "d", justify="right"),
    keyed("mismatches", "mismatches", "d", justify="right"),
    keyed("failed", "failed"),
)


def markdown(result: dict) -> str:
    """The benchmark as Markdown."""
    load = result["load_average"]
    lines = ["# Serving v2: continuous batching with speculative decoding, against llama-server", ""]
    lines += [f"Machine: {result['machine']}.", ""]
    lines += [
        f"Load average (1, 5, 15 min) at start {load['start']}, at end {load['end']}; "
        f"{result['seconds']:.0f} s in all. Command: `{result['command']}`.",
        "",
    ]
    lines += [
        f"Pair: `{result['pair']}`. {result['prompts']} held-out code prompts of {PROMPT_TOKENS} tokens, "
        f"greedy, {result['new_tokens']} new tokens each; one client sends every prompt in turn (the "
        f"references), N clients send {result['requests_per_client']} each. Tokens/s is the aggregate: "
        "generated tokens over the wall time of the level. Mismatches: outputs unlike the group's references. "
        "Acceptance: the median request's accepted / proposed draft tokens.",
        "",
    ]
    lines += [*checks_table(result["checks"]), ""]
    rounds = result.get("head_to_head")
    if rounds:
        lines += [
            f"Head to head at {rounds['clients']} clients, fresh servers taken in turn (tokens/s of each round): "
            + "; ".join(
                f"{name} {values} (median {rounds['medians'][name]})" for name, values in rounds["tokens_per_s"].items()
            )
            + f"; slimline / llama-server by round {rounds['round_ratios']}, ratio of medians "
            f"{rounds['ratio_of_medians']:.3f}; outputs unlike the prompt's one-client output {rounds['mismatches']}.",
            "",
        ]
    lines += markdown_table(ROW_COLUMNS, result["rows"])
    if result["skipped"]:
        lines += ["", "Not measured: " + "; ".join(f"{name}: {why}" for name, why in result["skipped"].items()) + "."]
    lines += ["", "Commands (N = clients; a fresh server for each client count):", ""]
    commands = {row["config"]: row["command"] for row in result["rows"] if row.get("clients") == max_clients(result)}
    lines += [f"- {name}: `{command}`" for name, command in commands.items()]
    return "\n".join(lines) + "\n"


def max_clients(result: dict) -> int:
    """The largest client count measured."""
    return max(row["clients"] for row in result["rows"])


def parse_arguments() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "real-model")
    parser.add_argument("--target", default="tuned", help="Stage id of the PyTorch target.")
    parser.add_argument("--draft", default="draft", help="Stage id of the PyTorch draft.")
    parser.add_argument("--target-onnx", default="onnx", help="Stage id of the target exported to ONNX.")
    parser.add_argument("--draft-onnx", default="draft-onnx", help="Stage id of the draft exported to ONNX.")
    parser.add_argument(
        "--backends", nargs="+", default=["onnx", "gguf", "pytorch"], choices=["onnx", "gguf", "pytorch"]
    )
    parser.add_argument(
        "--gguf-type", default="f16", help="The converter's outtype for the GGUF pair (f16, bf16, q8_0)."
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="Measurements each of llama-server -np N and slimline on GGUF at the most clients, taken in turn "
        "(the grid's is the first); 1: the grid's only.",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true", help="A smoke run of a few minutes: supports no claim.")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests_per_client, args.new_tokens, args.rounds = [1, 4], 1, 24, 2
        args.backends = [b for b in args.backends if b != "pytorch"]
    args.clients = sorted(set(args.clients) | {1})  # one client gives the references
    return args


def check_stages(args: argparse.Namespace) -> None:
    """Refuse to start without the pair's artifacts."""
    stages = args.run_dir / "stages"
    ids = (args.target, args.draft, args.target_onnx, args.draft_onnx)
    missing = [s for s in ids if not (stages / s / "artifact.json").exists()]
    if missing:
        raise SystemExit(f"missing artifacts {missing} in {stages}: run the pipeline first, or name the stages")


def main() -> None:
    """Measure every configuration and write JSON + Markdown."""
    args = parse_arguments()
    check_stages(args)
    load_start = os.getloadavg()
    started = time.perf_counter()
    tokenizer = load_tokenizer(args.run_dir / "stages" / args.target)
    count = args.requests_per_client * max(args.clients)
    prompts = [tokenizer.decode(p) for p in held_out_prompts(tokenizer, count, PROMPT_TOKENS)]
    binary = llama_server_binary()
    configs, skipped = configurations(args, binary)
    rows = measure_all(configs, args, prompts, binary, tokenizer)
    rounds = head_to_head(configs, args, prompts, binary, rows, tokenizer)
    result = {
        "machine": machine_description(),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:]),
        "pair": f"{args.run_dir.name}: {args.target}/{args.draft}, ONNX {args.target_onnx}/{args.draft_onnx}, "
        f"GGUF {args.gguf_type}",
        "llama_server": str(binary) if binary else None,
        "prompts": count,
        "new_tokens": args.new_tokens,
        "requests_per_client": args.requests_per_client,
        "skipped": skipped,
        "rows": rows,
        "head_to_head": rounds,
        "checks": checks(rows, list(dict.fromkeys(c.group for c in configs)), rounds),
        "seconds": round(time.perf_counter() - started, 1),
    }
    for row in rows:  # the texts served the identity checks; the JSON keeps figures
        row.pop("texts", None)
    write_results(args.out, "serving", result, markdown(result))


if __name__ == "__main__":
    main()
