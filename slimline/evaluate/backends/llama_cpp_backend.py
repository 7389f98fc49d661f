"""llama.cpp backend (llama-cpp-python): a GGUF file with llama.cpp's KV cache, on the CPU.

Token ids go in directly (the GGUF carries the same vocabulary as the HF tokenizer, which the
``quantize.gguf`` stage checks), so perplexity is scored on exactly the eval tokens every other
artifact is scored on. Batches are built with llama.cpp's own ``llama_batch``: every position
asks for logits when scoring a window, only the last one when prefilling a prompt, as a
deployment would.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from slimline.errors import ArtifactError
from slimline.evaluate.backends import llama_cpp_log
from slimline.evaluate.backends.base import Backend
from slimline.evaluate.backends.llama_cpp_log import capture_llama_cpp_log, take_recent_messages

log = logging.getLogger(__name__)

MODEL_FILE = "model.gguf"
# A tokenizer-only load still makes a context; llama-cpp-python sizes its batch from n_ctx, which must not be 0.
VOCAB_ONLY_CONTEXT = 512


def open_gguf(path: Path, vocab_only: bool = False):
    """A ``llama_cpp.Llama`` over a GGUF file: the model's own context, the CPU threads torch uses."""
    from llama_cpp import Llama

    capture_llama_cpp_log()
    take_recent_messages()  # only what this load says
    threads = torch.get_num_threads()
    try:
        return Llama(
            model_path=str(path),
            n_ctx=VOCAB_ONLY_CONTEXT if vocab_only else 0,  # 0: the context the model was trained for
            n_threads=threads,
            n_threads_batch=threads,
            vocab_only=vocab_only,
            verbose=False,
        )
    except ValueError as error:
        raise ArtifactError(f"llama.cpp cannot load {path}: {take_recent_messages()}") from error


@contextmanager
def collect_llama_cpp_log() -> Iterator[list[str]]:
    """Every piece of text llama.cpp logs while the block runs, in order (it still reaches slimline's logger)."""
    import llama_cpp

    capture_llama_cpp_log()
    pieces: list[str] = []

    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        pieces.append(text.decode("utf-8", errors="replace"))
        llama_cpp_log.forward(level, text, user_data)

    callback = llama_cpp.llama_log_callback(collect)  # kept alive by this frame until the block ends
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield pieces
    finally:
        llama_cpp.llama_log_set(llama_cpp_log.state["callback"], ctypes.c_void_p(0))


class LlamaCppSequence:
    """One sequence on a llama.cpp context: positions fed so far, and batches with chosen logits."""

    def __init__(self, llama) -> None:
        import llama_cpp

        self.api = llama_cpp
        self.llama = llama
        self.n_ctx = llama.n_ctx()
        self.n_vocab = llama.n_vocab()
        self.n_batch = llama.n_batch
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.length = 0

    def reset(self) -> None:
        """Forget the sequence: clear the KV cache."""
        self.api.llama_memory_clear(self.api.llama_get_memory(self.llama.ctx), True)
        self.length = 0

    def step(self, tokens: list[int], all_logits: bool) -> np.ndarray:
        """Feed ``tokens`` after the cached ones; logits [len, vocab] for every position, or [1, vocab] for the last."""
        if self.length + len(tokens) > self.n_ctx:
            raise ValueError(f"{self.length + len(tokens)} tokens exceed the context of {self.n_ctx}")
        chunks = [tokens[i : i + self.n_batch] for i in range(0, len(tokens), self.n_batch)]
        logits = [
            self.decode_chunk(chunk, all_logits or i == len(chunks) - 1, all_logits) for i, chunk in enumerate(chunks)
        ]
        return np.concatenate([rows for rows in logits if rows is not None])

    def decode_chunk(self, tokens: list[int], wants_logits: bool, all_positions: bool) -> np.ndarray | None:
        """One ``llama_decode`` of at most n_batch tokens; the logits asked for ([len or 1, vocab]) or None."""
        batch, count = self.batch, len(tokens)
        batch.n_tokens = count
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = self.length + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = wants_logits and (all_positions or i == count - 1)
        code = self.api.llama_decode(self.llama.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        self.length += count
        if not wants_logits:
            return None
        rows = count if all_positions else 1
        pointer = self.api.llama_get_logits(self.llama.ctx)
        return np.ctypeslib.as_array(pointer, shape=(rows, self.n_vocab)).copy()

    def close(self) -> None:
        """Free the batch."""
        if self.batch is not None:
            self.api.llama_batch_free(self.batch)
            self.batch = None


class LlamaCppBackend(Backend):
    """Scores and times a GGUF artifact with llama.cpp."""

    name = "llama.cpp"

    def __init__(self, folder: Path) -> None:
        """Load ``folder/model.gguf`` with the model's full context."""
        self.llama = open_gguf(folder / MODEL_FILE)
        self.sequence = LlamaCppSequence(self.llama)
        log.info(
            "llama.cpp: %s, context %d, %d threads", folder / MODEL_FILE, self.sequence.n_ctx, torch.get_num_threads()
        )

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits from an empty cache."""
        self.sequence.reset()
        logits = self.sequence.step(input_ids.tolist(), all_logits=True)
        self.sequence.reset()
        return torch.from_numpy(logits)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start a new sequence from the prompt; only the last position's logits are computed."""
        self.sequence.reset()
        return torch.from_numpy(self.sequence.step(input_ids.tolist(), all_logits=False)[-1])

    def decode(self, token: int) -> torch.Tensor:
        """One token on the kept cache."""
        return torch.from_numpy(self.sequence.step([token], all_logits=False)[-1])

    def parameter_count(self) -> int | None:
        """llama.cpp's count of the model's parameters (``llama_model_n_params``; a tied embedding once)."""
        return int(self.sequence.api.llama_model_n_params(self.llama.model))

    def close(self) -> None:
        """Free the batch and the model."""
        if self.sequence is not None:
            self.sequence.close()
            self.sequence = None
        if self.llama is not None:
            self.llama.close()
            self.llama = None
