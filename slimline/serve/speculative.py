"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023) on per-request sequences.

Each round the draft proposes ``k`` tokens one at a time; the target scores the pending token
and all ``k`` proposals in one forward pass; proposals are accepted left to right. Greedy: a
proposal is accepted when it is the target's argmax, and the first mismatch is replaced by the
target's argmax, so the output is exactly target-only greedy decoding. Sampling: proposal ``x``
is accepted with probability ``min(1, p(x) / q(x))``; on rejection a token is drawn from the
normalised residual ``max(0, p - q)``, which makes every emitted token distributed as the
target's ``p``. When all ``k`` are accepted the target's last distribution gives one more token.

Both caches only ever hold a prefix of the accepted tokens: after a round each is cut back to
what was accepted, and the next round first feeds whatever each one has not seen.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from slimline.serve.models import LanguageModel
from slimline.serve.sampling import SamplingParams, distribution, sample


@dataclass
class DecodeStats:
    """What one request's decoding cost and how well the draft did."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    target_seconds: float = 0.0
    draft_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed draft tokens (None without a draft)."""
        return self.accepted / self.proposed if self.proposed else None


def expected_tokens_per_round(acceptance: float, k: int) -> float:
    """Expected tokens a round yields with per-token acceptance ``acceptance`` (geometric, + the extra token)."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


class DraftLength:
    """Chooses ``k`` per round: fixed, or the k that maximises the expected tokens per second.

    Adaptive mode models a round as in Leviathan et al.: each proposal is accepted with
    probability ``a`` (estimated from decayed counts of accepted and rejected proposals), so a
    round yields ``E[tokens](a, k)``; it costs ``k`` draft steps (moving average ``d``) plus one
    target pass over ``k + 1`` tokens, ``v(k)``: a line fitted to the average measured pass time
    for each pass length seen, because a longer verification costs more. k = 0 (target only)
    is picked when no draft length pays for itself; then every ``probe_every`` rounds a k = 1
    round re-measures the acceptance, so a draft that starts agreeing again is used again.
    """

    def __init__(
        self,
        k: int,
        adaptive: bool,
        max_k: int = 8,
        decay: float = 0.9,
        smoothing: float = 0.2,
        probe_every: int = 16,
    ) -> None:
        self.k = k
        self.adaptive = adaptive
        self.max_k = max(max_k, k)
        self.decay = decay
        self.smoothing = smoothing
        self.probe_every = probe_every
        self.accepted, self.rejected = 1.4, 0.6  # a prior worth two proposals at a = 0.7
        self.draft_step_seconds: float | None = None
        self.pass_seconds: dict[int, float] = {}  # tokens in one target pass -> moving average seconds
        self.rounds_without_draft = 0

    @property
    def acceptance(self) -> float:
        """Estimated probability that one proposal is accepted."""
        return min(self.accepted / (self.accepted + self.rejected), 0.99)

    def update(
        self, proposed: int, accepted: int, draft_step_seconds: float | None, target_pass_seconds: float | None
    ) -> None:
        """Fold one round's outcome (``proposed`` 0: a target-only step) into the estimates and re-pick k.

        A time is None when that call also caught up on a prompt or on tokens it skipped: such
        calls say nothing about the cost of a steady round.
        """
        if target_pass_seconds is not None:
            self.observe_pass(proposed + 1, target_pass_seconds)
        if proposed:
            self.accepted = self.decay * self.accepted + accepted
            self.rejected = self.decay * self.rejected + (1 if accepted < proposed else 0)
            if draft_step_seconds is not None:
                self.draft_step_seconds = self.moving_average(self.draft_step_seconds, draft_step_seconds)
            self.rounds_without_draft = 0
        else:
            self.rounds_without_draft += 1
        if self.adaptive:
            self.k = self.best_k()

    def observe_pass(self, tokens: int, seconds: float) -> None:
        """Average one target pass's time by how many tokens it scored."""
        self.pass_seconds[tokens] = self.moving_average(self.pass_seconds.get(tokens), seconds)

    def moving_average(self, average: float | None, value: float) -> float:
        """Exponential moving average; the first value starts it."""
        return value if average is None else average + self.smoothing * (value - average)

    def pass_cost(self, tokens: int) -> float:
        """Seconds of one target pass over ``tokens`` tokens: least squares through the averages seen."""
        seen = sorted(self.pass_seconds.items())
        if len(seen) == 1:
            return seen[0][1]  # one length seen: assume flat until another length is measured
        mean_x = sum(x for x, _ in seen) / len(seen)
        mean_y = sum(y for _, y in seen) / len(seen)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in seen) / sum((x - mean_x) ** 2 for x, _ in seen)
        return max(mean_y + max(slope, 0.0) * (tokens - mean_x), 1e-9)

    def tokens_per_second(self, k: int) -> float:
        """The model's expected decode rate with ``k`` proposals per round."""
        seconds = k * (self.draft_step_seconds or 0.0) + self.pass_cost(k + 1)
        return expected_tokens_per_round(self.acceptance, k) / seconds

    def best_k(self) -> int:
        """The k the model expects to decode fastest (0: target only, with a periodic probe)."""
        if self.draft_step_seconds is None or not self.pass_seconds:
            return self.k  # nothing measured yet
        best = max(range(self.max_k + 1), key=self.tokens_per_second)
        if best == 0 and self.rounds_without_draft >= self.probe_every:
            return 1  # re-measure the draft now and then
        return best

    def fork(self) -> DraftLength:
        """A copy carrying these estimates, for the next request on the same pair."""
        copy = DraftLength(self.k, self.adaptive, self.max_k, self.decay, self.smoothing, self.probe_every)
        copy.accepted, copy.rejected = self.accepted, self.rejected
        copy.draft_step_seconds, copy.pass_seconds = self.draft_step_seconds, dict(self.pass_seconds)
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
class Round:
    """One speculative round: what the draft proposed, what the target kept, what each side cost."""

    drafts: list[int]
    accepted: int
    following: int
    target_logits: torch.Tensor  # [proposals + 1, vocab]: after the pending token and after each proposal
    draft_seconds: float
    target_seconds: float
    draft_fed: int  # tokens the draft's first call fed: 1 or 2 in a steady round, more after a prompt or a pause
    target_fed: int  # tokens the target's pass fed: proposals + 1 in a steady round

    @property
    def new_tokens(self) -> list[int]:
        """The accepted proposals and the target's token after them."""
        return [*self.drafts[: self.accepted], self.following]


def speculative_round(
    target_sequence,
    draft_sequence,
    tokens: list[int],
    k: int,
    params: SamplingParams,
    generator: torch.Generator,
) -> Round:
    """The draft proposes ``k`` tokens (0: a plain target step), the target scores them in one pass.

    Each sequence is first fed the tokens it has not seen; cutting the caches back to what was
    accepted is the caller's job.
    """
    draft_fed = len(tokens) - draft_sequence.length if k else 0
    started = time.perf_counter()
    drafts, draft_probabilities = propose(draft_sequence, tokens, k, params, generator) if k else ([], [])
    drafted = time.perf_counter()
    fed = tokens[target_sequence.length :] + drafts
    target_logits = target_sequence.extend(fed)[-(len(drafts) + 1) :]
    verified = time.perf_counter()
    accepted, following = verify(drafts, draft_probabilities, target_logits, params, generator)
    return Round(drafts, accepted, following, target_logits, drafted - started, verified - drafted, draft_fed, len(fed))


def generate_tokens(
    target: LanguageModel,
    draft: LanguageModel | None,
    prompt: list[int],
    params: SamplingParams,
    draft_length: DraftLength | None,
    generator: torch.Generator,
    stats: DecodeStats,
) -> Iterator[list[int]]:
    """Yield the new tokens of each round until the context is full; the caller stops earlier as it needs."""
    tokens = list(prompt)
    target_sequence = target.new_sequence()
    draft_sequence = draft.new_sequence() if draft is not None else None
    while len(tokens) < target.context_length:
        room = target.context_length - len(tokens)  # the verify pass may cache up to k tokens past the end
        k = min(draft_length.k, room - 1) if draft_sequence is not None and draft_length else 0
        outcome = speculative_round(target_sequence, draft_sequence, tokens, k, params, generator)
        tokens += outcome.new_tokens
        target_sequence.truncate(len(tokens) - 1)  # the last token is fed with the next round
        if draft_sequence is not None:
            draft_sequence.truncate(min(draft_sequence.length, len(tokens) - 1))
        record_round(stats, draft_length, outcome)
        yield outcome.new_tokens


def timed_greedy(
    target: LanguageModel,
    draft: LanguageModel | None,
    prompt: list[int],
    new_tokens: int,
    draft_length: DraftLength | None,
) -> tuple[list[int], float, DecodeStats]:
    """Greedy-decode ``new_tokens`` tokens after ``prompt``: (the tokens, tokens per second, the stats)."""
    stats = DecodeStats()
    started = time.perf_counter()
    tokens: list[int] = []
    for new in generate_tokens(target, draft, prompt, SamplingParams(), draft_length, torch.Generator(), stats):
        tokens += new
        if len(tokens) >= new_tokens:
            break
    return tokens[:new_tokens], new_tokens / (time.perf_counter() - started), stats


def propose(
    sequence, tokens: list[int], k: int, params: SamplingParams, generator: torch.Generator
) -> tuple[list[int], list[torch.Tensor | None]]:
    """The draft's k proposals and (when sampling) the distributions they were drawn from."""
    logits = sequence.extend(tokens[sequence.length :])[-1]
    drafts, probabilities = [], []
    for index in range(k):
        if params.greedy:
            drafts.append(int(logits.argmax()))
            probabilities.append(None)
        else:
            q = distribution(logits, params)
            drafts.append(sample(q, generator))
            probabilities.append(q)
        if index < k - 1:
            logits = sequence.extend([drafts[-1]])[-1]
    return drafts, probabilities


def record_round(stats: DecodeStats, draft_length: DraftLength | None, outcome: Round) -> None:
    """Count one round (no proposals: a target-only step) and let the draft length adapt."""
    k = len(outcome.drafts)
    stats.target_calls += 1
    stats.target_seconds += outcome.target_seconds
    if k:
        stats.rounds += 1
        stats.proposed += k
        stats.accepted += outcome.accepted
        stats.draft_calls += k
        stats.draft_seconds += outcome.draft_seconds
    if draft_length is not None:
        steady_draft = k and outcome.draft_fed <= 2
        steady_target = outcome.target_fed == k + 1
        draft_length.update(
            k,
            outcome.accepted,
            outcome.draft_seconds / k if steady_draft else None,
            outcome.target_seconds if steady_target else None,
        )


def seeded_generator(seed: int | None) -> torch.Generator:
    """A private random stream per request (seeded when the request asks for reproducibility)."""
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(time.time_ns() % (2**63)))
    return generator
