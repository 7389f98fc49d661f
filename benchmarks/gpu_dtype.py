"""float32 against bf16 for decoding through slimline's PyTorch runtime on a GPU, by model size.

    HF_HUB_OFFLINE=1 python benchmarks/gpu_dtype.py [--out benchmarks/results]

``slimline serve --dtype auto`` has to pick a dtype for PyTorch models on a GPU. bf16 halves the
bytes a decode step reads, which pays where decoding is bound by memory bandwidth (large
models); where it is bound by kernel launches (small models), bf16 adds cast kernels (RMSNorm
and softmax upcast to float32) and can be slower. This measures both, side by side in one
process, on random-weight Llama models of four real shapes (the example model, SmolLM2-135M,
a 1.5B and a 7B shape), through ``TorchModel.forward`` exactly as the server calls it: one row
(a 128-token prompt, then 64 one-token steps) and 16 rows (16 prompts, then 32 steps of all
rows at once). And ``precision: auto`` for the training stages: full fine-tuning steps through
``slimline.training.train_steps`` (batch 4 x 256 tokens, AdamW) in fp32 and in bf16 autocast on
the first three shapes. Writes gpu_dtype.json and gpu_dtype.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402 - after the path: slimline is imported from this checkout
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from slimline.reports.tables import write_results  # noqa: E402
from slimline.runtime.base import Feed  # noqa: E402
from slimline.runtime.torch_model import TorchModel  # noqa: E402

SHAPES = {  # name: (hidden, layers, heads, kv heads, intermediate, vocab)
    "example model (31.5M)": (512, 8, 8, 8, 1536, 8192),
    "SmolLM2-135M shape": (576, 30, 9, 3, 1536, 49152),
    "1.5B shape (Qwen2.5-1.5B widths)": (1536, 28, 12, 2, 8960, 151936),
    "7B shape (Llama-2-7B widths)": (4096, 32, 32, 32, 11008, 32000),
}
PROMPT, STEPS, ROWS, BATCH_STEPS = 128, 64, 16, 32


def runtime_model(shape: tuple[int, ...], dtype: torch.dtype) -> TorchModel:
    """A random-weight Llama of ``shape`` on the GPU in ``dtype``, inside slimline's PyTorch runtime."""
    hidden, layers, heads, kv_heads, intermediate, vocab = shape
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=1024,
    )
    with torch.device("cuda"):
        module = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model = TorchModel.__new__(TorchModel)  # the runtime without a checkpoint on disk: same forward
    model.model, model.device, model.name, model.context_length = module, "cuda:0", "random", 1024
    return model


def decode_rate(model: TorchModel, rows: int, steps: int) -> float:
    """Tokens/s of ``steps`` one-token passes over ``rows`` sequences after a 128-token prompt each."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.model.config.vocab_size
    sequences = [model.new_sequence() for _ in range(rows)]
    model.forward([Feed(s, torch.randint(vocab, (PROMPT,), generator=generator).tolist(), False) for s in sequences])
    tokens = [0] * rows
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        logits = model.forward([Feed(s, [t], False) for s, t in zip(sequences, tokens, strict=True)])
        tokens = [int(row[-1].argmax()) for row in logits]
    return rows * steps / (time.perf_counter() - started)


def training_rate(shape: tuple[int, ...], precision: str) -> float:
    """Training tokens/s of ``train_steps`` (full fine-tuning) after two warm-up steps."""
    from slimline.stage import DataAccess, StageContext
    from slimline.training import TrainSettings, train_steps

    model = runtime_model(shape, torch.float32).model
    stream = torch.randint(model.config.vocab_size, (100_000,), generator=torch.Generator().manual_seed(0))
    ctx = StageContext("bench", Path("/tmp"), 0, DataAccess(lambda split: stream))
    rates = []
    for steps in (2, 8):
        settings = TrainSettings(steps=steps, batch_size=4, sequence_length=256, precision=precision)
        torch.cuda.synchronize()
        started = time.perf_counter()
        train_steps(model, stream, settings, ctx)
        torch.cuda.synchronize()
        rates.append(steps * 4 * 256 / (time.perf_counter() - started))
    del model
    torch.cuda.empty_cache()
    return round(rates[-1], 1)


def measure(shape: tuple[int, ...], train: bool) -> dict:
    """Median of three runs of each, float32 and bf16, one row and 16 rows."""
    figures = {"parameters_m": None}
    for dtype in (torch.float32, torch.bfloat16):
        model = runtime_model(shape, dtype)
        figures["parameters_m"] = round(sum(p.numel() for p in model.model.parameters()) / 1e6, 1)
        decode_rate(model, 1, 8)  # warm-up: kernels, allocator
        name = str(dtype).removeprefix("torch.")
        figures[f"{name}_1_row"] = round(statistics.median(decode_rate(model, 1, STEPS) for _ in range(3)), 1)
        figures[f"{name}_16_rows"] = round(
            statistics.median(decode_rate(model, ROWS, BATCH_STEPS) for _ in range(3)), 1
        )
        del model
        torch.cuda.empty_cache()
    figures["bf16_over_fp32_1_row"] = round(figures["bfloat16_1_row"] / figures["float32_1_row"], 2)
    figures["bf16_over_fp32_16_rows"] = round(figures["bfloat16_16_rows"] / figures["float32_16_rows"], 2)
    if train:
        figures["train_fp32_tokens_per_s"] = training_rate(shape, "fp32")
        figures["train_bf16_tokens_per_s"] = training_rate(shape, "bf16")
        figures["train_bf16_over_fp32"] = round(
            figures["train_bf16_tokens_per_s"] / figures["train_fp32_tokens_per_s"], 2
        )
    return figures


def markdown(result: dict) -> str:
    """The table."""
    lines = [
        "# float32 vs bf16 decoding on a GPU (slimline's PyTorch runtime)",
        "",
        f"GPU: {result['gpu']}; torch {result['torch']}.",
        "",
    ]
    lines += [
        "| shape | params (M) | fp32 1 row tok/s | bf16 1 row | bf16/fp32 | fp32 16 rows tok/s | bf16 16 rows | bf16/fp32 |"
    ]
    lines += ["| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in result["shapes"].items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error']} | | | | | | |")
            continue
        lines.append(
            f"| {name} | {row['parameters_m']} | {row['float32_1_row']} | {row['bfloat16_1_row']} | {row['bf16_over_fp32_1_row']}x "
            f"| {row['float32_16_rows']} | {row['bfloat16_16_rows']} | {row['bf16_over_fp32_16_rows']}x |"
        )
    lines += ["", "Training (full fine-tuning, batch 4 x 256, AdamW, through train_steps):", ""]
    lines += ["| shape | fp32 tokens/s | bf16 autocast tokens/s | bf16/fp32 |", "| --- | --- | --- | --- |"]
    for name, row in result["shapes"].items():
        if "train_fp32_tokens_per_s" in row:
            lines.append(
                f"| {name} | {row['train_fp32_tokens_per_s']} | {row['train_bf16_tokens_per_s']} | {row['train_bf16_over_fp32']}x |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Measure every shape; a shape that fails is recorded and the next one still runs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "shapes": {}}
    for index, (name, shape) in enumerate(SHAPES.items()):
        try:
            result["shapes"][name] = measure(shape, train=index < 3)
        except Exception as error:  # out of memory, say: the other shapes still count
            result["shapes"][name] = {"error": f"{type(error).__name__}: {error}"[:300]}
        write_results(args.out, "gpu_dtype", result, markdown(result))


if __name__ == "__main__":
    main()
