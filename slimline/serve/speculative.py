"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023) for a batch of requests at once.

Each request is a ``Lane``: its tokens so far, a sequence on the target and one on the draft,
its sampling parameters and its own random generator. A round runs every lane of a batch
together: the draft proposes up to ``k`` tokens for every lane in ``k`` batched draft passes;
the target scores each lane's pending token and proposals in ONE batched pass (ragged: lanes
differ in length and in how many they propose); then each lane accepts its own prefix. Greedy:
a proposal is accepted when it is the target's argmax, and the first mismatch is replaced by the
target's argmax, so every lane's output is exactly target-only greedy decoding. Sampling:
proposal ``x`` is accepted with probability ``min(1, p(x) / q(x))``; on rejection a token is
drawn from the normalised residual ``max(0, p - q)``, which makes every emitted token
distributed as the target's ``p``. When all proposals are accepted the target's last
distribution gives one more token.

Both caches only ever hold a prefix of the lane's accepted tokens: after a round each is cut
back to what was accepted, and the next round first feeds whatever each one has not seen.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from slimline.runtime import Feed, RuntimeModel, Sequence
from slimline.serve.sampling import SamplingParams, distribution, sample

# While k is 0 the draft sees nothing (its prompt is not even prefilled): a lane that proposes
# again first feeds its draft what it missed, in its first draft pass, when that is at most this
# many tokens; a lane further behind decodes target-only while ``prefill`` catches its draft up.
CATCH_UP_TOKENS = 512


@dataclass
class DecodeStats:
    """What one request's decoding cost and how well the draft did."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    target_calls: int = 0
    guesses: int = 0  # prompt-lookup guesses riding in a free slot (see ``lookup_guess``)
    guesses_accepted: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed draft tokens (None without a draft)."""
        return self.accepted / self.proposed if self.proposed else None


def expected_tokens_per_round(acceptance: float, k: int) -> float:
    """Expected tokens a round yields with per-token acceptance ``acceptance`` (geometric, + the extra token)."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


def line_through(points: dict[int, float], x: int) -> float:
    """Least-squares line through averaged (size, seconds) points, at ``x`` (flat while one size is known)."""
    seen = sorted(points.items())
    if len(seen) == 1:
        return seen[0][1]
    mean_x = sum(a for a, _ in seen) / len(seen)
    mean_y = sum(b for _, b in seen) / len(seen)
    slope = sum((a - mean_x) * (b - mean_y) for a, b in seen) / sum((a - mean_x) ** 2 for a, _ in seen)
    return max(mean_y + max(slope, 0.0) * (x - mean_x), 1e-9)


class DraftLength:
    """Chooses ``k`` per round for a batch: fixed, or the k that maximises expected tokens per second.

    Adaptive mode models a round as in Leviathan et al.: each proposal is accepted with
    probability ``a`` (estimated from decayed counts of accepted and rejected proposals), so a
    lane yields ``E[tokens](a, k)`` per round. A round over ``rows`` lanes costs ``k`` draft
    passes of ``rows`` rows, ``d(rows)``, plus one target pass over ``rows * (k + 1)`` tokens,
    ``v``; both are lines fitted to the average measured time of each size seen, because a
    batched pass over more rows or tokens costs more, but far less than proportionally. k = 0
    (target only) is picked when no draft length pays for itself; then after ``probe_every``
    rounds one lane of the batch proposes one token (``probe_due``), which re-measures the
    acceptance at the cost of a single draft row, so a draft that starts agreeing again is used
    again. A probe that leaves k at 0 doubles the wait for the next, up to ``max_probe_every``
    rounds (exponential backoff): on a batch it is not cheap (a draft pass that catches the
    lane's draft up, and a verification pass of rows of unequal length, which llama.cpp cuts into
    one ubatch more: measured on the SmolLM2 pair at 16 clients, 8 probes in 128 rounds cost about
    6 decoding passes). Once the draft is used again the wait starts over at ``probe_every``.
    """

    def __init__(
        self,
        k: int,
        adaptive: bool,
        max_k: int = 8,
        decay: float = 0.9,
        smoothing: float = 0.2,
        probe_every: int = 16,
        max_probe_every: int = 256,
    ) -> None:
        self.k = k
        self.adaptive = adaptive
        self.max_k = max(max_k, k)
        self.decay = decay
        self.smoothing = smoothing
        self.probe_every = probe_every
        self.max_probe_every = max(max_probe_every, probe_every)
        self.probe_wait = probe_every  # rounds without the draft before the next probe
        self.accepted, self.rejected = 1.4, 0.6  # a prior worth two proposals at a = 0.7
        self.draft_seconds: dict[int, float] = {}  # rows in one draft pass -> moving average seconds
        self.pass_seconds: dict[int, float] = {}  # tokens in one target pass -> moving average seconds
        self.rounds_without_draft = 0
        self.probes = 0  # probe rounds so far: which lane of a batch probes next
        self.guesses_accepted, self.guesses_rejected = 1.0, 1.0  # prompt-lookup guesses: a prior at 0.5

    @property
    def acceptance(self) -> float:
        """Estimated probability that one proposal is accepted."""
        return min(self.accepted / (self.accepted + self.rejected), 0.99)

    def observe_acceptance(self, proposed: int, accepted: int) -> None:
        """Fold one lane's round into the acceptance estimate."""
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (1 if accepted < proposed else 0)

    def observe_draft(self, rows: int, seconds: float) -> None:
        """Average one draft pass's time by how many rows it ran."""
        self.draft_seconds[rows] = self.moving_average(self.draft_seconds.get(rows), seconds)

    def observe_pass(self, tokens: int, seconds: float) -> None:
        """Average one target pass's time by how many tokens it scored."""
        self.pass_seconds[tokens] = self.moving_average(self.pass_seconds.get(tokens), seconds)

    def moving_average(self, average: float | None, value: float) -> float:
        """Exponential moving average; the first value starts it."""
        return value if average is None else average + self.smoothing * (value - average)

    def pass_cost(self, tokens: int) -> float:
        """Seconds of one target pass over ``tokens`` tokens."""
        return line_through(self.pass_seconds, tokens)

    def draft_cost(self, rows: int) -> float:
        """Seconds of one draft pass over ``rows`` rows (0 before any was measured)."""
        return line_through(self.draft_seconds, rows) if self.draft_seconds else 0.0

    def tokens_per_second(self, k: int, rows: int = 1) -> float:
        """The batch's expected decode rate with ``k`` proposals per lane per round."""
        seconds = k * self.draft_cost(rows) + self.pass_cost(rows * (k + 1))
        return rows * expected_tokens_per_round(self.acceptance, k) / seconds

    def best_k(self, rows: int = 1) -> int:
        """The k the model expects to decode fastest (0: target only)."""
        if not self.draft_seconds or not self.pass_seconds:
            return self.k  # nothing measured yet
        return max(range(self.max_k + 1), key=lambda k: self.tokens_per_second(k, rows))

    def observe_guess(self, accepted: bool) -> None:
        """Fold one prompt-lookup guess into its acceptance estimate."""
        self.guesses_accepted = self.decay * self.guesses_accepted + accepted
        self.guesses_rejected = self.decay * self.guesses_rejected + (not accepted)

    def guessing_pays(self, rows: int) -> bool:
        """Whether ``rows`` lanes decode faster each feeding a lookup guess (a pass twice as long, free proposals)."""
        if not self.pass_seconds:
            return False
        acceptance = self.guesses_accepted / (self.guesses_accepted + self.guesses_rejected)
        return (1 + acceptance) / self.pass_cost(2 * rows) > 1 / self.pass_cost(rows)

    @property
    def probe_due(self) -> bool:
        """The draft has been off for ``probe_wait`` rounds: one lane should propose once to re-measure it."""
        return self.adaptive and self.k == 0 and self.rounds_without_draft >= self.probe_wait

    def finish_round(self, drafted: bool, rows: int) -> None:
        """Count a round (``drafted``: proposals were made) and re-pick k for a batch of ``rows`` lanes."""
        self.rounds_without_draft = 0 if drafted else self.rounds_without_draft + 1
        if not self.adaptive:
            return
        probed = drafted and self.k == 0  # proposals while k was 0: a probe round
        self.k = self.best_k(max(rows, 1))
        if probed and self.k == 0:  # the draft still does not pay: probe half as often
            self.probe_wait = min(2 * self.probe_wait, self.max_probe_every)
        elif self.k > 0:
            self.probe_wait = self.probe_every

    def fork(self) -> DraftLength:
        """A copy carrying these estimates."""
        copy = DraftLength(
            self.k, self.adaptive, self.max_k, self.decay, self.smoothing, self.probe_every, self.max_probe_every
        )
        copy.probe_wait = self.probe_wait
        copy.accepted, copy.rejected = self.accepted, self.rejected
        copy.draft_seconds, copy.pass_seconds = dict(self.draft_seconds), dict(self.pass_seconds)
        copy.rounds_without_draft, copy.probes = self.rounds_without_draft, self.probes
        copy.guesses_accepted, copy.guesses_rejected = self.guesses_accepted, self.guesses_rejected
        return copy


def pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token from one position's logits."""
    if params.greedy:
        return int(logits.argmax())
    return sample(distribution(logits, params), generator)


def verify(
    drafts: list[int],
    draft_probabilities: list[torch.Tensor | None],
    target_logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
) -> tuple[int, int]:
    """(number of accepted proposals, the token that follows them) by the acceptance rule."""
    for index, token in enumerate(drafts):
        if params.greedy:
            best = int(target_logits[index].argmax())
            if token != best:
                return index, best
            continue
        p = distribution(target_logits[index], params)
        q = draft_probabilities[index]
        if float(torch.rand((), generator=generator, dtype=torch.float64)) < min(1.0, float(p[token] / q[token])):
            continue
        residual = torch.clamp(p - q, min=0.0)
        total = float(residual.sum())
        return index, sample(residual / total if total > 0 else p, generator)
    return len(drafts), pick(target_logits[len(drafts)], params, generator)


@dataclass
class Lane:
    """One request's decoding state: its tokens, its sequences on both models, how it picks tokens."""

    tokens: list[int]  # the prompt, then every accepted token
    target: Sequence
    draft: Sequence | None
    params: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator = field(default_factory=torch.Generator)
    stats: DecodeStats = field(default_factory=DecodeStats)
    # Filled by each round: the proposals made, how many were accepted, and the target's logits for them.
    drafts: list[int] = field(default_factory=list)
    draft_probabilities: list[torch.Tensor | None] = field(default_factory=list)
    verified_logits: torch.Tensor | None = None  # the target's, after the pending token and each proposal
    guessed: bool = False  # this round's proposal is a prompt-lookup guess, not the draft model's

    @property
    def prefilled(self) -> bool:
        """The target has cached everything but the last token (which the next round feeds)."""
        return self.target.length >= len(self.tokens) - 1

    @property
    def draft_lag(self) -> int:
        """Tokens the draft must feed before it can propose (the last token is fed with each round)."""
        return len(self.tokens) - self.draft.length if self.draft is not None else 0

    def behind(self, drafting: bool) -> bool:
        """Needs prefilling: the target's cache is not caught up, or (``drafting``) the draft is far behind."""
        return not self.prefilled or (drafting and self.draft_lag > CATCH_UP_TOKENS)

    @property
    def room(self) -> int:
        """Tokens the lane may still add before the target's context is full."""
        return self.target.model.context_length - len(self.tokens)

    def close(self) -> None:
        """Release both sequences."""
        self.target.close()
        if self.draft is not None:
            self.draft.close()


def prefill(lanes: list[Lane], budget: int, drafting: bool = True) -> int:
    """Feed the prompts of lanes not yet prefilled, at most ``budget`` tokens in all; the tokens fed.

    Each model runs one batched pass per call, so a long prompt is taken in chunks over several
    calls while the other lanes keep decoding in between (a long prompt does not stall the batch).
    ``drafting=False`` (the draft is off: k is 0) feeds only the target; the draft catches up when
    it is used again.
    """
    target_rows, draft_rows, used = prefill_rows(lanes, budget, drafting)
    for rows in (target_rows, draft_rows):
        if rows:
            rows[0].sequence.model.forward(rows)
    return used


def prefill_rows(lanes: list[Lane], budget: int, drafting: bool = True) -> tuple[list[Feed], list[Feed], int]:
    """``prefill``'s rows for the target and for the draft, and the target tokens they feed."""
    rows: tuple[list[Feed], list[Feed]] = ([], [])
    used = 0
    for lane in lanes:
        for sequence, into in ((lane.target, rows[0]), (lane.draft if drafting else None, rows[1])):
            if sequence is None or budget - used <= 0:
                continue
            missing = len(lane.tokens) - 1 - sequence.length
            if missing <= 0:
                continue
            chunk = lane.tokens[sequence.length : sequence.length + min(missing, budget - used)]
            used += len(chunk) if sequence is lane.target else 0  # the budget bounds the target's work
            into.append(Feed(sequence, chunk, all_logits=False))
    return rows[0], rows[1], used


def draft_pass_rows(lanes: list[Lane], index: int, ks: list[int]) -> list[tuple[Lane, list[int]]]:
    """The lanes still proposing at step ``index`` and what each feeds its draft sequence."""
    rows = []
    for lane, k in zip(lanes, ks, strict=True):
        if index >= k:
            continue
        pending = lane.tokens[lane.draft.length :] if index == 0 else [lane.drafts[-1]]
        rows.append((lane, pending))
    return rows


def propose(draft: RuntimeModel, lanes: list[Lane], ks: list[int], length: DraftLength | None) -> None:
    """Up to ``max(ks)`` batched draft passes: each lane proposes its ``k`` tokens (greedy or sampled)."""
    for lane in lanes:
        lane.drafts, lane.draft_probabilities = [], []
    for index in range(max(ks, default=0)):
        rows = draft_pass_rows(lanes, index, ks)
        started = time.perf_counter()
        logits = draft.forward([Feed(lane.draft, tokens, all_logits=False) for lane, tokens in rows])
        if length is not None and all(len(tokens) <= 2 for _, tokens in rows):  # a steady pass, no catch-up
            length.observe_draft(len(rows), time.perf_counter() - started)
        for (lane, _), row in zip(rows, logits, strict=True):
            if lane.params.greedy:
                lane.drafts.append(int(row[-1].argmax()))
                lane.draft_probabilities.append(None)
            else:
                q = distribution(row[-1], lane.params)
                lane.drafts.append(sample(q, lane.generator))
                lane.draft_probabilities.append(q)


def speculative_round(
    target: RuntimeModel,
    draft: RuntimeModel | None,
    lanes: list[Lane],
    k: int,
    length: DraftLength | None = None,
    prompt_rows: list[Feed] | None = None,
) -> list[list[int]]:
    """One round for every lane (prefilled): proposals, one batched verification; each lane's new tokens.

    Lanes without a draft sequence, and ``k`` 0, make a plain target step. ``length`` (when
    given) learns the acceptance and the pass costs and re-picks k for the next round.
    ``prompt_rows`` (target rows of ``prefill_rows``, for other lanes) ride in the verification
    pass: prompts are prefilled without a pass of their own.
    """
    ks = [max(0, min(k, lane.room - 1)) if lane.draft is not None and draft is not None else 0 for lane in lanes]
    ks = [k_i if lane.draft_lag <= CATCH_UP_TOKENS else 0 for lane, k_i in zip(lanes, ks, strict=True)]
    if length is not None and length.probe_due and draft is not None:
        probe(lanes, ks, length)
    drafting = [(lane, k_i) for lane, k_i in zip(lanes, ks, strict=True) if k_i]
    if drafting:
        propose(draft, [lane for lane, _ in drafting], [k_i for _, k_i in drafting], length)
    for lane, k_i in zip(lanes, ks, strict=True):
        if not k_i:
            lane.drafts, lane.draft_probabilities = [], []
        lane.guessed = False
    free_slot = target.free_second_token and len(lanes) == 1  # the pass would carry a throwaway token
    if free_slot or (length is not None and length.guessing_pays(len(lanes))):
        guess_ahead(lanes)
    feeds = [Feed(lane.target, lane.tokens[lane.target.length :] + lane.drafts) for lane in lanes]
    started = time.perf_counter()
    logits = target.forward(feeds + (prompt_rows or []))[: len(lanes)]
    steady = not prompt_rows and all(
        len(f.tokens) == len(lane.drafts) + 1 for f, lane in zip(feeds, lanes, strict=True)
    )
    if length is not None and steady:
        length.observe_pass(sum(len(f.tokens) for f in feeds), time.perf_counter() - started)
    new_tokens = [accept(lane, row[-(len(lane.drafts) + 1) :], length) for lane, row in zip(lanes, logits, strict=True)]
    if length is not None:
        length.finish_round(bool(drafting), sum(1 for lane in lanes if lane.draft is not None))
    return new_tokens


def guess_ahead(lanes: list[Lane]) -> None:
    """Each greedy lane the draft left without proposals proposes its prompt-lookup guess, if it has one.

    Greedy only: a sampled request's random numbers must not depend on what else runs with it.
    """
    for lane in lanes:
        if lane.drafts or not lane.params.greedy or lane.room <= 1:
            continue
        guess = lookup_guess(lane.tokens)
        if guess is not None:
            lane.drafts, lane.draft_probabilities, lane.guessed = [guess], [None], True


def lookup_guess(tokens: list[int], longest: int = 3, window: int = 2048) -> int | None:
    """The token that followed the latest earlier occurrence of the last ``n`` tokens (``n`` = ``longest``..1).

    Prompt lookup (Saxena, 2023): text repeats itself, code most of all, so the continuation of an
    earlier match is often the next token. Only the last ``window`` tokens are searched.
    """
    recent = np.asarray(tokens[-window:])
    for n in range(min(longest, len(recent) - 1), 0, -1):
        starts = len(recent) - n  # candidate matches begin before the tail itself
        match = np.ones(starts, dtype=bool)
        for offset in range(n):
            match &= recent[offset : offset + starts] == recent[starts + offset]
        found = np.flatnonzero(match)
        if len(found):
            return int(recent[found[-1] + n])
    return None


def probe(lanes: list[Lane], ks: list[int], length: DraftLength) -> None:
    """Let one lane (in turn) propose one token, if one can catch its draft up cheaply."""
    candidates = [
        index
        for index, lane in enumerate(lanes)
        if lane.draft is not None and lane.room > 1 and lane.draft_lag <= CATCH_UP_TOKENS
    ]
    if candidates:
        ks[candidates[length.probes % len(candidates)]] = 1
        length.probes += 1


def accept(lane: Lane, target_logits: torch.Tensor, length: DraftLength | None) -> list[int]:
    """Apply the acceptance rule to a lane's proposals, cut both caches back; the lane's new tokens."""
    accepted, following = verify(lane.drafts, lane.draft_probabilities, target_logits, lane.params, lane.generator)
    lane.verified_logits = target_logits
    new = [*lane.drafts[:accepted], following]
    lane.tokens += new
    lane.target.truncate(len(lane.tokens) - 1)  # the last token is fed with the next round
    if lane.draft is not None:
        lane.draft.truncate(min(lane.draft.length, len(lane.tokens) - 1))
    lane.stats.target_calls += 1
    if lane.guessed:
        lane.stats.guesses += 1
        lane.stats.guesses_accepted += accepted
        if length is not None:
            length.observe_guess(accepted == 1)
    elif lane.drafts:
        lane.stats.rounds += 1
        lane.stats.proposed += len(lane.drafts)
        lane.stats.accepted += accepted
        if length is not None:
            length.observe_acceptance(len(lane.drafts), accepted)
    return new


def open_lane(
    target: RuntimeModel,
    draft: RuntimeModel | None,
    prompt: list[int],
    params: SamplingParams,
    generator: torch.Generator,
) -> Lane:
    """A lane with fresh sequences on the target (and the draft)."""
    if not prompt:
        raise ValueError("a prompt needs at least one token")
    target_sequence = target.new_sequence()
    try:
        draft_sequence = draft.new_sequence() if draft is not None else None
    except Exception:
        target_sequence.close()
        raise
    return Lane(list(prompt), target_sequence, draft_sequence, params, generator)


def generate_tokens(
    target: RuntimeModel,
    draft: RuntimeModel | None,
    prompt: list[int],
    params: SamplingParams,
    length: DraftLength | None,
    generator: torch.Generator,
    stats: DecodeStats | None = None,
    prefill_chunk: int = 512,
) -> Iterator[list[int]]:
    """One request alone: yield the new tokens of each round until the context is full."""
    lane = open_lane(target, draft if length is not None else None, prompt, params, generator)
    if stats is not None:
        lane.stats = stats
    try:
        while not lane.prefilled:
            prefill([lane], prefill_chunk)
        while lane.room > 0:
            yield speculative_round(target, draft, [lane], length.k if length is not None else 0, length)[0]
    finally:
        lane.close()


def timed_greedy(
    target: RuntimeModel,
    draft: RuntimeModel | None,
    prompt: list[int],
    new_tokens: int,
    length: DraftLength | None,
) -> tuple[list[int], float, DecodeStats]:
    """Greedy-decode ``new_tokens`` tokens after ``prompt``: (the tokens, tokens per second, the stats)."""
    stats = DecodeStats()
    started = time.perf_counter()
    tokens: list[int] = []
    for new in generate_tokens(target, draft, prompt, SamplingParams(), length, torch.Generator(), stats):
        tokens += new
        if len(tokens) >= new_tokens:
            break
    return tokens[:new_tokens], new_tokens / (time.perf_counter() - started), stats


def seeded_generator(seed: int | None) -> torch.Generator:
    """A private random stream per request (seeded when the request asks for reproducibility)."""
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(time.time_ns() % (2**63)))
    return generator
