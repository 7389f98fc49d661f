"""llama.cpp runtime (llama-cpp-python): a GGUF file, many sequences in one llama.cpp context, on the CPU.

Token ids go in directly (the GGUF carries the same vocabulary as the HF tokenizer, which the
``quantize.gguf`` stage checks), so perplexity is scored on exactly the eval tokens every other
artifact is scored on.

One context serves every sequence: each ``Sequence`` is a llama.cpp sequence id, and a batched
``forward`` is one ``llama_batch`` whose rows carry their own ids and positions (split into several
``llama_decode`` calls past ``n_batch`` tokens). The KV cache is *unified*: all sequences share its
cells, so one long request can use what idle or short ones leave. Its default size is the
model's training context per sequence, capped at ``CACHE_CELLS_CAP`` cells but never below one
training context (one sequence can always reach the context the model was trained for; the cap
bounds memory: a SmolLM2-135M cell holds 23 KB of f16 keys and values, so 32768 cells are 0.75 GB).
llama.cpp rounds the cache up to a multiple of 256 cells. When the shared cache is full,
``forward`` raises ``CacheFullError`` and leaves every sequence as it was.

The server asks for a *split* cache instead (``unified_cache=False``, llama-server's default):
each sequence has its own stream of ``cells / max_sequences`` cells, which bounds its context,
but its cells always sit in order from position 0, so its attention sums in the same order
whatever the other sequences hold, and a request's greedy output is the same batched as alone.
In a unified cache a sequence's cells land wherever there is room, and a near tie can flip.

A one-token pass rounds differently from every other: llama.cpp's matrix-vector path for one
token sums in another order than its matrix-matrix path, which gives a decoding row bit-identical
logits whatever else is in a pass of two or more tokens (measured on SmolLM2: max |diff| 0.029
between a row decoded alone and the same row in any larger pass, 0 among larger passes; a prompt
prefilled among other prompts may still differ in the last bits, 3e-8 on a tiny model). What
counts is the *ubatch*, the unit llama.cpp computes, not the ``llama_decode`` call: with a split
cache llama.cpp cuts a call into ubatches that each take a run of consecutive sequence ids and
the same number of tokens from each (``llama_cpp_ubatches``), so rows of unequal length, or
sequence ids with gaps, leave lone one-token ubatches inside a call of many tokens (measured on
the SmolLM2 target, AVX2: rows of 4 and 3 tokens on sequences 0 and 1 give sequence 0 a one-token
ubatch and logits 0.0145 off its own; 1 of 32 greedy replies differed at 16 clients). So with
``steady_shapes`` (the server's setting) rows run in ascending sequence id, a call holds whole
rows, and a row whose piece of a ubatch would be its lone token gets a throwaway token after its
own (its cell dropped at once, ``steady_padding``); a ubatch that returns one row of logits
returns a second, thrown away (the output layer runs only on the rows returned). A row at the
very end of its context has no room for one and may round differently. A gap in sequence ids
between rows of equal length (a finished request's id) would cost a ubatch of its own, which
takes as long as several decoding tokens, so throwaway rows fill it (``gap_fillers``),
wherever the cache is split (a unified cache is cut into ubatches by token count only).
Then a greedy request gives the same tokens alone, batched, and verified in speculative rounds.

Flash attention stays off and weights stay on the CPU, as llama-cpp-python's ``Llama`` (the old
scoring path) had them, so a window's logits are those the evaluator always measured. A model is
not thread-safe: one thread runs its passes.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slimline.errors import ArtifactError, SlimlineError
from slimline.runtime import llama_cpp_log
from slimline.runtime.base import Feed, RuntimeModel, Sequence, check_feeds
from slimline.runtime.llama_cpp_log import capture_llama_cpp_log, take_recent_messages

log = logging.getLogger(__name__)

MODEL_FILE = "model.gguf"
# A tokenizer-only load still makes a context; llama-cpp-python sizes its batch from n_ctx, which must not be 0.
VOCAB_ONLY_CONTEXT = 512
CACHE_CELLS_CAP = 32768
# Tokens per llama_decode (and per compute ubatch), as the old Llama-based scoring used; llama.cpp keeps
# a logits buffer of this many rows, so a larger value costs n_batch x vocab x 4 bytes.
BATCH_TOKENS = 512
NO_KV_SLOT = 1  # llama_decode's code when the cache has no room for the batch
# The most throwaway tokens that fill one gap in sequence ids (see LlamaCppModel.gap_fillers). On the
# SmolLM2 target (2 cores, AVX512) an extra ubatch cost 13 ms, a filler token about 1 ms: 15 decoding
# rows with a gap took 45.6 ms, filled 32.5 ms; gaps at 3, 7 and 11 took 59.9 ms, filled 29.5 ms.
# benchmarks/llama_cpp_ubatches.py measures it.
GAP_FILL_TOKENS = 6


class CacheFullError(SlimlineError):
    """The shared KV cache has no room for a pass; nothing of the pass was kept."""


class SequencesExhaustedError(SlimlineError):
    """Every sequence slot of a model is open."""


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


def default_cache_tokens(n_ctx_train: int, max_sequences: int) -> int:
    """Cells of the shared cache: a training context per sequence, capped, never below one training context."""
    return max(n_ctx_train, min(n_ctx_train * max_sequences, CACHE_CELLS_CAP))


@dataclass
class FlatBatch:
    """Every row of a pass laid end to end, in the arrays a ``llama_batch`` points at."""

    tokens: np.ndarray  # int32 [total]
    positions: np.ndarray  # int32 [total]
    seq_pointers: np.ndarray  # uintp [total]: the address of each token's seq id (llama_seq_id *)
    outputs: np.ndarray  # int8 [total]: 1 where the caller wants logits
    returned: np.ndarray  # int8 [total]: 1 where llama.cpp returns logits (outputs, and spare rows)
    row_starts: np.ndarray  # int64 [rows]: each row's first index
    counts: np.ndarray  # int64 [rows]: each row's tokens, padding included
    row_outputs: list[int]  # logits rows per feed


def flatten_feeds(
    feeds: list[Feed],
    seq_ids: np.ndarray,
    seq_table: np.ndarray,
    padding: list[int] | None = None,
    silent: list[bool] | None = None,
) -> FlatBatch:
    """Tokens, positions, seq ids and output flags of all rows, built with whole-array numpy operations.

    ``padding``: throwaway tokens after each row's own (copies of its last token), which return no
    logits; ``silent``: rows that return none at all (throwaway rows).
    """
    rows = np.array([(len(f.tokens), f.sequence.length, f.all_logits) for f in feeds], dtype=np.int64)
    real, starts, every = rows[:, 0], rows[:, 1], rows[:, 2]
    counts = real + np.asarray(padding if padding is not None else np.zeros(len(feeds)), dtype=np.int64)
    ends = np.cumsum(counts)
    row_starts = ends - counts
    total = int(ends[-1])
    own = itertools.chain.from_iterable(
        f.tokens + f.tokens[-1:] * int(extra) for f, extra in zip(feeds, counts - real, strict=True)
    )
    tokens = np.fromiter(own, dtype=np.int32, count=total)
    offsets = np.arange(total) - np.repeat(row_starts, counts)  # index within its row
    positions = (offsets + np.repeat(starts, counts)).astype(np.int32)
    # each token points at its sequence's id in seq_table (all uintp: a signed operand would make float64)
    seq_pointers = np.repeat(seq_ids.astype(np.uintp), counts) * np.uintp(seq_table.itemsize)
    seq_pointers += np.uintp(seq_table.ctypes.data)
    outputs = ((np.repeat(every, counts) == 1) & (offsets < np.repeat(real, counts))).astype(np.int8)
    outputs[row_starts + real - 1] = 1  # every row returns at least its last own position
    row_outputs = np.where(every == 1, real, 1)
    if silent is not None:
        quiet = np.asarray(silent, dtype=bool)
        outputs[np.repeat(quiet, counts)] = 0
        row_outputs[quiet] = 0
    return FlatBatch(tokens, positions, seq_pointers, outputs, outputs.copy(), row_starts, counts, row_outputs.tolist())


def llama_cpp_ubatches(seq_ids: list[int], counts: list[int], n_ubatch: int) -> list[list[tuple[int, int, int]]]:
    """The ubatches llama.cpp cuts one ``llama_decode`` into with a split cache: (row, first token, tokens).

    Rows in ascending sequence id, as ``forward`` lays them out. This is llama.cpp's
    ``llama_batch_allocr::split_equal`` with ``sequential`` (each sequence its own cache stream): a
    ubatch takes a run of rows with consecutive sequence ids and the same number of tokens from
    each, the fewest any of them has left (fewer where the run would pass ``n_ubatch``).
    """
    left, done = list(counts), [0] * len(counts)
    ubatches = []
    while any(left):
        run = [next(row for row, n in enumerate(left) if n)]
        for row in range(run[0] + 1, len(left)):
            if not left[row]:
                continue
            if seq_ids[row] != seq_ids[run[-1]] + 1:
                break
            run.append(row)
        take = min(min(left[row] for row in run), max(1, n_ubatch // len(run)))
        ubatches.append([(row, done[row], take) for row in run])
        for row in run:
            left[row] -= take
            done[row] += take
    return ubatches


def steady_padding(seq_ids: list[int], counts: list[int], rooms: list[int], n_ubatch: int, spare: int) -> list[int]:
    """Throwaway tokens per row so that no ubatch of the call is one token (where a row has room for them).

    ``rooms``: the most each row may take (its context ends); ``spare``: the most in all (``n_batch``).
    A row padded by one turns its lone one-token piece into two tokens; re-cutting finds the next.
    """
    padding, stuck = [0] * len(counts), set()
    for _ in range(4 * len(counts) + 4):  # each turn pads or gives up on a row: a few turns per row at most
        padded = [count + extra for count, extra in zip(counts, padding, strict=True)]
        lone = [
            ubatch[0][0]
            for ubatch in llama_cpp_ubatches(seq_ids, padded, n_ubatch)
            if len(ubatch) == 1 and ubatch[0][2] == 1 and ubatch[0][0] not in stuck
        ]
        if not lone:
            break
        row = lone[0]
        if padding[row] < rooms[row] and sum(padding) < spare:
            padding[row] += 1
        else:
            stuck.add(row)  # the end of its context: this piece stays one token (it may round differently)
    return padding


def chunks(total: int, size: int, steady: bool = False) -> list[tuple[int, int]]:
    """(start, count) of each ``llama_decode`` call; ``steady``: no call of one token (unless there is one)."""
    bounds = [(start, min(size, total - start)) for start in range(0, total, size)]
    if steady and len(bounds) > 1 and bounds[-1][1] == 1:
        bounds[-2:] = [(bounds[-2][0], size - 1), (total - 2, 2)]
    return bounds


class BatchBuffers:
    """A ``llama_batch`` over arrays of ``n_batch`` entries held for the model's life (so nothing to free)."""

    def __init__(self, api, n_batch: int) -> None:
        self.tokens = np.zeros(n_batch, dtype=np.int32)
        self.positions = np.zeros(n_batch, dtype=np.int32)
        self.seq_pointers = np.zeros(n_batch, dtype=np.uintp)
        self.outputs = np.zeros(n_batch, dtype=np.int8)
        self.n_seq_id = np.ones(n_batch, dtype=np.int32)  # one sequence per token
        batch = self.batch = api.llama_batch()
        batch.token = self.tokens.ctypes.data_as(ctypes.POINTER(api.llama_token))
        batch.pos = self.positions.ctypes.data_as(ctypes.POINTER(api.llama_pos))
        batch.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        batch.seq_id = self.seq_pointers.ctypes.data_as(ctypes.POINTER(ctypes.POINTER(api.llama_seq_id)))
        batch.logits = self.outputs.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    def load(self, flat: FlatBatch, start: int, count: int):
        """The batch holding ``count`` tokens of ``flat`` from ``start`` (one copy per array, no Python loop)."""
        end = start + count
        self.tokens[:count] = flat.tokens[start:end]
        self.positions[:count] = flat.positions[start:end]
        self.seq_pointers[:count] = flat.seq_pointers[start:end]
        self.outputs[:count] = flat.returned[start:end]
        self.batch.n_tokens = count
        return self.batch


class LlamaCppSequence(Sequence):
    """A llama.cpp sequence id in the model's shared context; its cells are freed by ``close``."""

    def __init__(self, model: LlamaCppModel, seq_id: int) -> None:
        self.model = model
        self.seq_id: int | None = seq_id
        self.length = 0

    def truncate(self, length: int) -> None:
        """Forget every token after the first ``length`` (their cache cells become free)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a sequence of {self.length} tokens to {length}")
        self.model.remove_cells(self.open_id(), length)
        self.length = length

    def close(self) -> None:
        """Free the sequence's cells and return its id to the model (closing twice does nothing)."""
        if self.seq_id is not None:
            self.model.release(self)
            self.seq_id = None

    def open_id(self) -> int:
        """The llama.cpp sequence id; ValueError once the sequence is closed."""
        if self.seq_id is None:
            raise ValueError("the sequence is closed")
        return self.seq_id


class LlamaCppModel(RuntimeModel):
    """A GGUF model in one llama.cpp context whose unified KV cache holds up to ``max_sequences`` sequences."""

    backend = "llama.cpp"
    pads_rows = False  # one flat llama_batch: a row costs its own tokens only

    def __init__(
        self,
        folder: Path,
        max_sequences: int = 1,
        cache_tokens: int | None = None,
        flash_attention: bool = False,
        unified_cache: bool = True,
        steady_shapes: bool = False,
    ) -> None:
        """Load ``folder/model.gguf``; ``cache_tokens`` cells for all sequences (default: see the module).

        ``unified_cache``: all sequences share the cells (see the module), or each has its own
        ``cells / max_sequences`` (what the server uses: batched output equals output alone).

        ``flash_attention``: llama.cpp's fused attention, what ``llama-server`` uses by default; faster
        over many sequences, with slightly different rounding, so the evaluator keeps it off and its
        scores match llama.cpp's reference scoring (``open_gguf``) bit for bit.
        """
        import llama_cpp

        self.api = llama_cpp
        if not 1 <= max_sequences <= llama_cpp.llama_max_parallel_sequences():
            raise ValueError(
                f"max_sequences must be 1..{llama_cpp.llama_max_parallel_sequences()}, not {max_sequences}"
            )
        if cache_tokens is not None and cache_tokens < 1:
            raise ValueError(f"cache_tokens must be at least 1, not {cache_tokens}")
        self.name, self.folder = folder.name, folder
        self.max_batch = max_sequences
        self.flash_attention = flash_attention
        self.unified_cache = unified_cache
        self.steady_shapes = steady_shapes
        self.model = self.load_model(folder / MODEL_FILE)
        n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self.model))
        cells = cache_tokens if cache_tokens is not None else default_cache_tokens(n_ctx_train, max_sequences)
        self.ctx = self.new_context(folder / MODEL_FILE, cells, max_sequences)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.cache_cells = int(llama_cpp.llama_n_ctx(self.ctx))
        per_sequence = self.cache_cells if unified_cache else self.cache_cells // max_sequences
        self.context_length = min(n_ctx_train, per_sequence)
        self.n_batch = int(llama_cpp.llama_n_batch(self.ctx))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model)))
        self.seq_table = np.arange(max_sequences, dtype=np.int32)  # what every token's seq_id pointer points into
        self.buffers = BatchBuffers(llama_cpp, self.n_batch)
        self.free_ids = list(range(max_sequences))
        self.open: dict[int, LlamaCppSequence] = {}
        log.info(
            "llama.cpp: %s, %d sequences sharing %d cache cells, context %d, %d threads",
            folder / MODEL_FILE,
            max_sequences,
            self.cache_cells,
            self.context_length,
            torch.get_num_threads(),
        )

    # --- loading -------------------------------------------------------------------------------

    def load_model(self, path: Path):
        """llama.cpp's model (weights on the CPU); ArtifactError with llama.cpp's reason on failure."""
        if not path.is_file():
            raise ArtifactError(f"no {MODEL_FILE} in {path.parent}")
        self.api.llama_backend_init()
        capture_llama_cpp_log()
        take_recent_messages()  # only what this load says
        params = self.api.llama_model_default_params()
        params.n_gpu_layers = 0  # as the Llama-based path had it: this runtime is the CPU one
        model = self.api.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise ArtifactError(f"llama.cpp cannot load {path}: {take_recent_messages()}")
        return model

    def new_context(self, path: Path, cells: int, max_sequences: int):
        """One context: ``max_sequences`` sequences over a unified cache of ``cells`` cells."""
        api, threads = self.api, torch.get_num_threads()
        params = api.llama_context_default_params()
        params.n_ctx = cells
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = max_sequences
        params.kv_unified = self.unified_cache
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = (
            api.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attention else api.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        ctx = api.llama_init_from_model(self.model, params)
        if not ctx:
            reason = take_recent_messages()
            api.llama_model_free(self.model)
            self.model = None
            raise ArtifactError(f"llama.cpp cannot make a context of {cells} cells for {path}: {reason}")
        return ctx

    # --- sequences -----------------------------------------------------------------------------

    def new_sequence(self) -> LlamaCppSequence:
        """A fresh sequence on a free llama.cpp sequence id."""
        if self.ctx is None:
            raise ValueError(f"the model {self.name} is closed")
        if not self.free_ids:
            raise SequencesExhaustedError(
                f"all {self.max_batch} sequences of {self.name} are open: close one, or open the model "
                "with a larger max_sequences"
            )
        sequence = LlamaCppSequence(self, self.free_ids.pop(0))
        self.open[sequence.seq_id] = sequence
        return sequence

    def release(self, sequence: LlamaCppSequence) -> None:
        """Free a closing sequence's cells and its id."""
        if self.open.pop(sequence.seq_id, None) is None:
            return  # the model was closed first
        self.remove_cells(sequence.seq_id, 0)
        self.free_ids.append(sequence.seq_id)
        self.free_ids.sort()

    def remove_cells(self, seq_id: int, start: int) -> None:
        """Drop the sequence's cells from position ``start`` on."""
        self.api.llama_memory_seq_rm(self.memory, seq_id, start, -1)

    # --- passes --------------------------------------------------------------------------------

    def forward(self, feeds: list[Feed]) -> list[torch.Tensor]:
        """Run every row in one batch (several ``llama_decode`` calls past ``n_batch`` tokens); logits per row."""
        check_feeds(feeds, self.context_length)
        if not feeds:
            return []
        # Rows in ascending sequence id: with a split cache llama.cpp puts consecutive ids in one ubatch.
        order = sorted(range(len(feeds)), key=lambda index: self.seq_id_of(feeds[index]))
        ordered = [feeds[index] for index in order]
        logits: list[torch.Tensor] = []
        try:
            calls = self.calls(ordered)
            for rows in calls:
                logits += self.run(rows, fill_gaps=len(calls) == 1)  # no filler on a row of another call
        except BaseException:
            for feed in feeds:  # a failed pass keeps nothing: each cache holds what its length says
                self.remove_cells(feed.sequence.seq_id, feed.sequence.length)
            raise
        for feed in feeds:
            feed.sequence.length += len(feed.tokens)
        in_feed_order: list[torch.Tensor] = [torch.empty(0)] * len(feeds)
        for index, row in zip(order, logits, strict=True):
            in_feed_order[index] = row
        return in_feed_order

    @property
    def free_second_token(self) -> bool:
        """With steady shapes a one-token pass carries a throwaway token: a guess may take its place."""
        return self.steady_shapes

    def calls(self, ordered: list[Feed]) -> list[list[Feed]]:
        """The rows of each ``llama_decode`` call: all of them, or with ``steady_shapes`` whole rows per call.

        A steady call holds whole rows of at most ``n_batch`` tokens (with a token of room per row for
        padding), so the ubatches llama.cpp cuts it into are known; a longer row is a call of its own.
        """
        if not self.steady_shapes:
            return [ordered]
        calls: list[list[Feed]] = [[]]
        used = 0
        for feed in ordered:
            count = len(feed.tokens)
            if calls[-1] and (count + 1 > self.n_batch - used - len(calls[-1]) or count >= self.n_batch - 1):
                calls.append([])
                used = 0
            calls[-1].append(feed)
            used += count
        return calls

    def run(self, rows: list[Feed], fill_gaps: bool = True) -> list[torch.Tensor]:
        """One call's rows (ascending sequence ids), padded with ``steady_shapes``: each row's logits."""
        fillers = self.gap_fillers(rows) if fill_gaps else []
        if fillers:
            rows = sorted(rows + fillers, key=self.seq_id_of)
        is_filler = [any(feed is filler for filler in fillers) for feed in rows]
        seq_ids = [self.seq_id_of(feed) for feed in rows]
        padding = self.throwaway_padding(rows, seq_ids) if self.steady_shapes else None
        flat = flatten_feeds(rows, np.array(seq_ids, dtype=np.int64), self.seq_table, padding, is_filler)
        spans = chunks(len(flat.tokens), self.n_batch, self.steady_shapes)
        if self.steady_shapes:
            self.mark_spare_rows(flat, seq_ids, spans)
        try:
            logits = self.decode(flat, spans)
        finally:
            for feed in fillers:  # their cells, padding included
                self.remove_cells(feed.sequence.seq_id, feed.sequence.length)
        for feed, extra, filler in zip(rows, padding or [], is_filler, strict=False):
            if extra and not filler:  # the throwaway tokens' cells
                self.remove_cells(feed.sequence.seq_id, feed.sequence.length + len(feed.tokens))
        per_row = torch.split(logits, flat.row_outputs)
        return [row for row, filler in zip(per_row, is_filler, strict=True) if not filler]

    def throwaway_padding(self, rows: list[Feed], seq_ids: list[int]) -> list[int] | None:
        """``steady_padding`` for one call's rows; None for a call past ``n_batch`` (a long row's chunks)."""
        counts = [len(feed.tokens) for feed in rows]
        if sum(counts) > self.n_batch:
            return None
        rooms = [self.context_length - feed.sequence.length - count for feed, count in zip(rows, counts, strict=True)]
        return steady_padding(seq_ids, counts, rooms, self.n_batch, self.n_batch - sum(counts))

    def gap_fillers(self, rows: list[Feed]) -> list[Feed]:
        """Throwaway rows on the sequence ids missing between a split cache's rows of equal length.

        llama.cpp's ubatch takes a run of consecutive sequence ids (see the module), so a gap costs
        a ubatch, whose fixed cost (every weight read again) is more than a few filler tokens'
        (``GAP_FILL_TOKENS``). A filler copies the first row's tokens and returns no logits; its
        cells are dropped after the pass.
        """
        count = len(rows[0].tokens) if rows else 0
        if self.unified_cache or len(rows) < 2 or any(len(feed.tokens) != count for feed in rows):
            return []
        ids = [self.seq_id_of(feed) for feed in rows]
        fillers = []
        for before, after in itertools.pairwise(ids):
            missing = range(before + 1, after)
            if not missing or len(missing) * count > GAP_FILL_TOKENS:
                continue
            # an open sequence not in this pass takes the filler after its own cells, a free id at position 0
            sequences = [self.open.get(seq_id) or LlamaCppSequence(self, seq_id) for seq_id in missing]
            if all(sequence.length + count <= self.context_length for sequence in sequences):
                fillers += [Feed(sequence, rows[0].tokens, all_logits=False) for sequence in sequences]
        return fillers if count * (len(rows) + len(fillers)) <= self.n_batch else []

    def mark_spare_rows(self, flat: FlatBatch, seq_ids: list[int], spans: list[tuple[int, int]]) -> None:
        """Ask for a second logits row in each ubatch that returns one (its output layer would be a vector pass)."""
        if len(spans) == 1:
            ubatches = [
                np.concatenate([flat.row_starts[row] + first + np.arange(take) for row, first, take in ubatch])
                for ubatch in llama_cpp_ubatches(seq_ids, flat.counts.tolist(), self.n_batch)
            ]
        else:  # one long row in several calls: each call is one ubatch
            ubatches = [np.arange(start, start + count) for start, count in spans]
        for indexes in ubatches:
            if len(indexes) > 1 and int(flat.returned[indexes].sum()) == 1:
                flat.returned[indexes[flat.returned[indexes] == 0][0]] = 1

    def seq_id_of(self, feed: Feed) -> int:
        """The row's llama.cpp sequence id, after checking the sequence is an open one of this model."""
        sequence = feed.sequence
        if not isinstance(sequence, LlamaCppSequence) or sequence.model is not self:
            raise ValueError(f"a batch row holds a sequence of another model than {self.name}")
        return sequence.open_id()

    def decode(self, flat: FlatBatch, spans: list[tuple[int, int]]) -> torch.Tensor:
        """``llama_decode`` each (start, count) span of the flat batch; the logits asked for, in row order."""
        logits = torch.empty(int(flat.outputs.sum(dtype=np.int64)), self.n_vocab, dtype=torch.float32)
        rows, done = logits.numpy(), 0
        for start, count in spans:
            batch = self.buffers.load(flat, start, count)
            code = self.api.llama_decode(self.ctx, batch)
            if code != 0:
                raise self.decode_error(code, len(flat.tokens))
            returned = flat.returned[start : start + count] == 1
            if returned.any():
                block = np.ctypeslib.as_array(
                    self.api.llama_get_logits(self.ctx), shape=(int(returned.sum()), self.n_vocab)
                )
                wanted = block[flat.outputs[start : start + count][returned] == 1]  # rows come in token order
                rows[done : done + len(wanted)] = wanted
                done += len(wanted)
        return logits

    def decode_error(self, code: int, needed: int) -> Exception:
        """The error for a failed ``llama_decode``: a full cache says how to make it larger."""
        if code == NO_KV_SLOT:
            take_recent_messages()  # llama.cpp's "failed to find a memory slot": this message says more
            held = sum(sequence.length for sequence in self.open.values())
            return CacheFullError(
                f"llama.cpp's KV cache of {self.name} is full: its {self.cache_cells} cells are shared by "
                f"{len(self.open)} open sequences holding {held} tokens, and this pass needed {needed} more; "
                "open the model with a larger cache_tokens, or run fewer or shorter sequences at once"
            )
        return RuntimeError(f"llama_decode returned {code}: {take_recent_messages()}")

    # --- the rest ------------------------------------------------------------------------------

    def parameter_count(self) -> int | None:
        """llama.cpp's count of the model's parameters (``llama_model_n_params``; a tied embedding once)."""
        return int(self.api.llama_model_n_params(self.model))

    def close(self) -> None:
        """Free the context and the weights; open sequences become unusable."""
        for sequence in self.open.values():
            sequence.seq_id = None
        self.open.clear()
        if self.ctx is not None:
            self.api.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            self.api.llama_model_free(self.model)
            self.model = None
