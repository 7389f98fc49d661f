"""Ragged batches for runtimes whose caches are dense tensors (PyTorch, ONNX Runtime, TensorRT).

Rows of a batch differ in how many tokens their caches hold (``past``) and how many they feed
(``new``). The batch pads both to the longest: row ``i``'s cache fills the first ``past_i`` of
``P`` positions, its tokens the first ``new_i`` of ``N``; the attention mask is 0 on every
padded position, so no real token attends to padding, and position ids count each row's own
tokens. After the pass, each row keeps its old cache plus the ``new_i`` keys/values at
``P .. P + new_i`` of the batch's presents. A batch of one has no padding and no copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slimline.runtime.base import RuntimeModel, Sequence


@dataclass
class RaggedBatch:
    """The padded inputs of one pass and the sizes needed to take rows apart again."""

    input_ids: torch.Tensor  # [B, N] int64
    attention_mask: torch.Tensor  # [B, P + N] int64
    position_ids: torch.Tensor  # [B, N] int64
    past_lengths: list[int]
    new_lengths: list[int]
    # [K] int64, ascending: the fed positions whose logits a graph with ``LOGIT_POSITIONS`` returns,
    # for every row: each row's positions (all of its tokens, or only its last), merged.
    logit_positions: torch.Tensor

    @property
    def padded_past(self) -> int:
        """P: the longest cache in the batch."""
        return max(self.past_lengths)

    @property
    def single(self) -> bool:
        """One row: nothing is padded."""
        return len(self.past_lengths) == 1


def ragged_batch(past_lengths: list[int], rows: list[list[int]], all_logits: list[bool] | None = None) -> RaggedBatch:
    """Padded ids, attention mask, position ids and logit positions for rows of tokens after caches of these lengths.

    ``all_logits[i]``: row ``i`` needs the logits of every token it feeds, not only its last (default: every row).
    """
    batch, padded_past, padded_new = len(rows), max(past_lengths), max(len(row) for row in rows)
    input_ids = torch.zeros(batch, padded_new, dtype=torch.int64)
    attention_mask = torch.zeros(batch, padded_past + padded_new, dtype=torch.int64)
    position_ids = torch.zeros(batch, padded_new, dtype=torch.int64)
    for i, (past, row) in enumerate(zip(past_lengths, rows, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        attention_mask[i, :past] = 1
        attention_mask[i, padded_past : padded_past + len(row)] = 1
        # Padded positions continue the count so every position id stays within the model's range.
        position_ids[i] = torch.arange(past, past + padded_new)
    new_lengths = [len(row) for row in rows]
    positions = logit_positions(new_lengths, all_logits or [True] * batch)
    return RaggedBatch(input_ids, attention_mask, position_ids, list(past_lengths), new_lengths, positions)


def logit_positions(new_lengths: list[int], all_logits: list[bool]) -> torch.Tensor:
    """[K]: the positions any row needs: 0..n-1 for a row wanting all its logits, n-1 for one wanting its last."""
    wanted = set()
    for n, every in zip(new_lengths, all_logits, strict=True):
        wanted.update(range(n) if every else (n - 1,))
    return torch.tensor(sorted(wanted), dtype=torch.int64)


def pad_caches(caches: list[torch.Tensor], padded_past: int) -> torch.Tensor:
    """Stack per-row caches [1, heads, past_i, dim] into [B, heads, P, dim], zeros after each row's end.

    On the CPU the copy is done by numpy: torch would hand these small fills to its OpenMP pool,
    whose wake-ups cost tens of milliseconds when another runtime's threads hold the cores.
    """
    if len(caches) == 1:
        return caches[0]
    first = caches[0]
    shape = (len(caches), first.shape[1], padded_past, first.shape[3])
    if first.device.type != "cpu":
        batch = first.new_zeros(shape)
        for i, cache in enumerate(caches):
            batch[i, :, : cache.shape[2]] = cache[0]
        return batch
    padded = np.zeros(shape, dtype=first.numpy().dtype)
    for i, cache in enumerate(caches):
        padded[i, :, : cache.shape[2]] = cache[0].numpy()
    return torch.from_numpy(padded)


def row_cache(old: torch.Tensor, present: torch.Tensor, batch: RaggedBatch, row: int) -> torch.Tensor:
    """Row ``row``'s cache after the pass: its old cache and its new keys/values, [1, heads, past + new, dim]."""
    if batch.single:
        return present
    start = batch.padded_past
    new = present[row : row + 1, :, start : start + batch.new_lengths[row]]
    if present.device.type != "cpu" or present.requires_grad:
        return torch.cat([old, new], dim=2)
    return torch.from_numpy(np.concatenate([old.numpy(), new.numpy()], axis=2))  # numpy: see pad_caches


def row_logits(
    logits: torch.Tensor, batch: RaggedBatch, row: int, all_logits: bool, at_logit_positions: bool = False
) -> torch.Tensor:
    """Row ``row``'s logits [new, vocab] (or [1, vocab]: the last real position) as float32.

    ``at_logit_positions``: the pass returned the logits of ``batch.logit_positions`` only (a graph with
    ``LOGIT_POSITIONS``), else of every fed position. Either way a row's positions 0..n-1 come
    first, since every position below n is one of them.
    """
    count = batch.new_lengths[row]
    if all_logits:
        return logits[row, :count].float()
    last = int(torch.searchsorted(batch.logit_positions, count - 1)) if at_logit_positions else count - 1
    return logits[row, last : last + 1].float()


class DenseSequence(Sequence):
    """A sequence whose cache is dense tensors, layer by layer (key then value), each [1, kv_heads, length, dim].

    ``model.empty_cache`` is a [1, kv_heads, 0, dim] tensor of the cache's dtype and device, and
    ``model.layout`` the graph's ``CacheLayout`` (ONNX Runtime, TensorRT). While the sequence is a
    row of its model's ``KeptBatch`` its cache lives there (``kept``, ``row``) and ``past`` is stale.
    """

    def __init__(self, model: RuntimeModel) -> None:
        self.model = model
        self.past = [model.empty_cache] * len(model.layout.past_names())
        self.length = 0
        self.kept: KeptBatch | None = None
        self.row = 0

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` cached positions (drop rejected speculative tokens)."""
        if length < self.length:
            if self.kept is not None:
                self.kept.truncate(self.row, length)
            else:
                self.past = [cache[:, :, :length] for cache in self.past]
        self.length = min(length, self.length)

    def close(self) -> None:
        """Leave the kept batch (its row becomes dead weight until the batch is dissolved)."""
        if self.kept is not None:
            self.kept.sequences[self.row] = None
            self.kept = None


@dataclass
class KeptBatch:
    """The padded caches of a dense runtime's last pass, kept as they are for a next pass over the same rows.

    Decoding runs the same rows step after step: padding every row's cache into a batch and
    cutting the presents back into rows would copy every cache twice a step. Instead the batch's
    presents stay whole: row ``i`` holds a cached token in column ``t`` where ``valid[i, t]``;
    padding, and tokens a row dropped (rejected proposals), are holes that the attention mask
    hides. Rows get their own caches back (``dissolve``) when a pass runs another set of rows, or
    when holes make the batch much wider than its longest row.
    """

    sequences: list[DenseSequence | None]  # None: closed since
    caches: list[np.ndarray]  # per cache tensor: [B, kv_heads, T, dim]
    valid: np.ndarray  # bool [B, T]

    def holds(self, sequences: list) -> bool:
        """Whether a pass over ``sequences`` is a pass over exactly these rows, in this order."""
        return len(sequences) == len(self.sequences) and all(
            a is b for a, b in zip(sequences, self.sequences, strict=True)
        )

    def truncate(self, row: int, length: int) -> None:
        """Hide every cached token of ``row`` after its first ``length``."""
        columns = np.flatnonzero(self.valid[row])
        self.valid[row, columns[length:]] = False

    @property
    def spare_columns(self) -> int:
        """Columns beyond what the longest row holds: the width holes cost every row."""
        return self.valid.shape[1] - int(self.valid.sum(axis=1).max())

    def dissolve(self) -> None:
        """Give each open row's sequence its own cache again: its valid columns (a view when they lead the row)."""
        for row, sequence in enumerate(self.sequences):
            if sequence is None:
                continue
            columns = np.flatnonzero(self.valid[row])
            leading = len(columns) == 0 or columns[-1] == len(columns) - 1
            pick = slice(0, len(columns)) if leading else columns
            sequence.past = [torch.from_numpy(cache[row : row + 1][:, :, pick]) for cache in self.caches]
            sequence.kept = None
        self.sequences = []


def kept_batch_inputs(
    sequences: list[DenseSequence], rows: list[list[int]], kept: KeptBatch | None, all_logits: list[bool]
) -> tuple[RaggedBatch, list[np.ndarray], np.ndarray]:
    """The padded batch (ids, positions), the past caches by index, and the mask of valid columns [B, T + N].

    Over the rows of ``kept``: its caches as they are, with its mask. Otherwise each row's own cache, padded.
    """
    batch = ragged_batch([sequence.length for sequence in sequences], rows, all_logits)
    valid = batch.attention_mask.numpy().astype(bool)
    if kept is None:
        caches = [
            pad_caches([sequence.past[index] for sequence in sequences], batch.padded_past).numpy()
            for index in range(len(sequences[0].past))
        ]
    else:
        caches, valid = kept.caches, np.concatenate([kept.valid, valid[:, batch.padded_past :]], axis=1)
    return batch, [np.ascontiguousarray(cache) for cache in caches], valid


def keep_presents(sequences: list, presents: list[torch.Tensor], batch: RaggedBatch) -> None:
    """Give each row's sequence its old cache plus its new keys/values, and count its new tokens."""
    for row, sequence in enumerate(sequences):
        sequence.past = [row_cache(old, new, batch, row) for old, new in zip(sequence.past, presents, strict=True)]
        sequence.length += batch.new_lengths[row]
