"""Train the built-in example model ``stdlib-coder`` from scratch, reproducibly.

A Llama-architecture causal LM with its own byte-level BPE tokenizer, trained on the train
split of the Python standard library's source files (``slimline.data``; the eval and
calibration splits are held out by a hash of each file's path). Writes an HF checkpoint
(fp16 safetensors) plus ``training.json`` with the held-out perplexity.

    python scripts/train_example_model.py --out slimline/models/stdlib_coder

Same seed, same Python version (so the same stdlib) and same torch give the same weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from slimline.data import pack_tokens, sample_windows, stdlib_documents

log = logging.getLogger("train_example_model")

EOS = "<|endoftext|>"
VOCAB_SIZE = 8192
CONTEXT = 512
# Chat turns for the server's /v1/chat/completions: plain-text role markers the model can learn.
CHAT_TEMPLATE = (
    "{% for message in messages %}### {{ message['role'] }}:\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)


def model_config() -> LlamaConfig:
    """Sizes are multiples of 256 so NF4, K-quants and int4 kernels all apply."""
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=CONTEXT,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE (the pre-tokenizer llama.cpp knows as ``gpt-2``)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=CONTEXT,
        chat_template=CHAT_TEMPLATE,
    )


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_perplexity(model: LlamaForCausalLM, stream: torch.Tensor, max_tokens: int) -> float:
    """Perplexity over non-overlapping context-sized windows of the held-out stream."""
    model.eval()
    tokens = stream[: max_tokens + 1]
    total_loss, total_count = 0.0, 0
    for start in range(0, tokens.numel() - 1, CONTEXT):
        window = tokens[start : start + CONTEXT + 1]
        if window.numel() < 2:
            break
        logits = model(input_ids=window[None, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0], window[1:], reduction="sum")
        total_loss += loss.item()
        total_count += window.numel() - 1
    model.train()
    return math.exp(total_loss / total_count)


def main() -> None:
    """Train tokenizer and model, then save both with the training record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    started = time.time()

    train_docs = [text for _, text in stdlib_documents("train")]
    eval_docs = [text for _, text in stdlib_documents("eval")]
    log.info("corpus: %d train files, %d eval files", len(train_docs), len(eval_docs))
    tokenizer = train_tokenizer(train_docs)
    eos = tokenizer.eos_token_id
    train_stream = pack_tokens(tokenizer(train_docs)["input_ids"], eos)
    eval_stream = pack_tokens(tokenizer(eval_docs)["input_ids"], eos)
    log.info("tokens: %d train, %d eval", train_stream.numel(), eval_stream.numel())

    model = LlamaForCausalLM(model_config())
    params = sum(p.numel() for p in model.parameters())
    log.info("model: %.1fM parameters", params / 1e6)
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(args.seed)
    warmup = max(1, args.steps // 20)
    losses = []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, warmup)
        batch = sample_windows(train_stream, args.batch, CONTEXT + 1, generator)
        # bf16 autocast roughly doubles CPU training speed on AVX512-BF16 machines.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            log.info("step %d/%d loss %.3f (%.0fs)", step, args.steps, loss.item(), time.time() - started)

    perplexity = held_out_perplexity(model, eval_stream, max_tokens=50_000)
    log.info("held-out perplexity %.2f", perplexity)
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    record = {
        "steps": args.steps,
        "batch": args.batch,
        "context": CONTEXT,
        "tokens_seen": args.steps * args.batch * CONTEXT,
        "train_tokens_available": train_stream.numel(),
        "parameters": params,
        "final_train_loss_mean_last_50": sum(losses[-50:]) / len(losses[-50:]),
        "held_out_perplexity_fp32": perplexity,
        "held_out_tokens": min(50_000, eval_stream.numel() - 1),
        "seconds": round(time.time() - started, 1),
        "seed": args.seed,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
