"""The runtime interface every format implements: sequences with their own KV cache, run in batches.

A ``RuntimeModel`` holds the weights once and opens independent ``Sequence`` objects, one per
request (or per evaluation). ``forward`` runs a *batch* of sequences in one pass: each row
(``Feed``) appends its own tokens to its own sequence, and rows may differ in cached length and
in how many tokens they feed (ragged). Nothing but the weights is shared between sequences, so
one request's cache is never visible to another. A sequence can be cut back to a shorter length
(speculative decoding drops rejected draft tokens that way).

The evaluator (``slimline/evaluate``) and the server (``slimline/serve``) both run models
through this layer; nothing here imports either of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


class Sequence(ABC):
    """One token sequence on a model: how many tokens its cache holds, and a way to cut it back."""

    model: RuntimeModel
    length: int

    @abstractmethod
    def truncate(self, length: int) -> None:
        """Forget every token after the first ``length``."""

    def close(self) -> None:  # noqa: B027 - optional hook, most sequences hold nothing outside Python
        """Release what the sequence holds in the runtime (llama.cpp's cache cells)."""

    def extend(self, tokens: list[int], all_logits: bool = True) -> torch.Tensor:
        """Append ``tokens`` alone (a batch of one): logits [len(tokens), vocab], or [1, vocab] for the last."""
        return self.model.forward([Feed(self, tokens, all_logits)])[0]


@dataclass
class Feed:
    """One row of a batched pass: tokens to append to a sequence, and which logits to return."""

    sequence: Sequence
    tokens: list[int]
    all_logits: bool = True  # False: only the last position's logits (a prompt prefill)


class RuntimeModel(ABC):
    """Weights loaded once; sequences opened per request; a batch of sequences run in one pass."""

    name: str
    backend: str  # 'pytorch', 'onnxruntime', 'llama.cpp', 'tensorrt'
    context_length: int
    device: str = "cpu"  # where the weights are: 'cpu' or 'cuda:N' (logits always come back on the CPU)
    max_batch: int | None = None  # rows one pass can take (None: no limit of the runtime's own)
    # Rows are padded to the longest feed (dense caches): a 64-token prompt row makes every row of
    # its pass 64 tokens long, so prompts should not share a pass with decoding rows.
    pads_rows: bool = True
    # A one-token pass costs what a two-token one does (llama.cpp with steady shapes): a guessed
    # second token rides free.
    free_second_token: bool = False

    @abstractmethod
    def new_sequence(self) -> Sequence:
        """A fresh, empty sequence."""

    @abstractmethod
    def forward(self, feeds: list[Feed]) -> list[torch.Tensor]:
        """Run every row in one pass; per row its float32 logits ([len(tokens) or 1, vocab]).

        Each row's tokens are appended to its sequence's cache. A row must feed at least one
        token, and a sequence may appear in at most one row.
        """

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for every position of ``input_ids`` [T] from an empty cache (nothing is kept)."""
        sequence = self.new_sequence()
        try:
            return sequence.extend(input_ids.tolist())
        finally:
            sequence.close()

    def parameter_count(self) -> int | None:
        """Number of model parameters, where the runtime can tell."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the weights."""


def check_feeds(feeds: list[Feed], context_length: int) -> None:
    """Every row feeds tokens, no sequence twice, and nothing passes the context."""
    seen = set()
    for feed in feeds:
        if not feed.tokens:
            raise ValueError("a batch row must feed at least one token")
        if id(feed.sequence) in seen:
            raise ValueError("a sequence may appear in only one row of a batch")
        seen.add(id(feed.sequence))
        if feed.sequence.length + len(feed.tokens) > context_length:
            raise ValueError(f"{feed.sequence.length + len(feed.tokens)} tokens exceed the context of {context_length}")
