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
    """Chooses ``k`` per round: fixed, or adapted to the running acceptance rate and the measured cost ratio.

    Adaptive mode keeps moving averages of the per-token acceptance rate ``a`` and of the cost of
    one draft step relative to one target pass ``c``, and picks the k in ``1..max_k`` that
    maximises the expected speedup ``E[tokens](a, k) / (1 + k c)``.
    """

    def __init__(self, k: int, adaptive: bool, max_k: int = 8, smoothing: float = 0.2) -> None:
        self.k = k
        self.adaptive = adaptive
        self.max_k = max(max_k, k)
        self.smoothing = smoothing
        self.acceptance = 0.7  # prior until rounds are measured
        self.cost_ratio = 0.25

    def update(self, proposed: int, accepted: int, draft_step_seconds: float, target_call_seconds: float) -> None:
        """Fold one round's outcome into the averages and re-pick k."""
        rejected = 1 if accepted < proposed else 0
        rate = accepted / (accepted + rejected) if accepted + rejected else self.acceptance
        self.acceptance += self.smoothing * (rate - self.acceptance)
        if target_call_seconds > 0:
            self.cost_ratio += self.smoothing * (draft_step_seconds / target_call_seconds - self.cost_ratio)
        if self.adaptive:
            self.k = max(
                range(1, self.max_k + 1),
                key=lambda k: expected_tokens_per_round(self.acceptance, k) / (1 + k * self.cost_ratio),
            )


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
        if k <= 0:
            started = time.perf_counter()
            token = pick(target_sequence.extend(tokens[target_sequence.length :])[-1], params, generator)
            stats.target_calls += 1
            stats.target_seconds += time.perf_counter() - started
            tokens.append(token)
            yield [token]
            continue
        started = time.perf_counter()
        drafts, draft_probabilities = propose(draft_sequence, tokens, k, params, generator)
        drafted = time.perf_counter()
        target_logits = target_sequence.extend(tokens[target_sequence.length :] + drafts)[-(k + 1) :]
        verified = time.perf_counter()
        accepted, following = verify(drafts, draft_probabilities, target_logits, params, generator)
        new_tokens = [*drafts[:accepted], following]
        tokens += new_tokens
        target_sequence.truncate(len(tokens) - 1)  # the last token is fed with the next round
        draft_sequence.truncate(min(draft_sequence.length, len(tokens) - 1))
        record_round(stats, draft_length, k, accepted, drafted - started, verified - drafted)
        yield new_tokens


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


def record_round(
    stats: DecodeStats, draft_length: DraftLength, k: int, accepted: int, draft_seconds: float, target_seconds: float
) -> None:
    """Count one round and let the draft length adapt."""
    stats.rounds += 1
    stats.proposed += k
    stats.accepted += accepted
    stats.draft_calls += k
    stats.target_calls += 1
    stats.draft_seconds += draft_seconds
    stats.target_seconds += target_seconds
    draft_length.update(k, accepted, draft_seconds / k, target_seconds)


def seeded_generator(seed: int | None) -> torch.Generator:
    """A private random stream per request (seeded when the request asks for reproducibility)."""
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(time.time_ns() % (2**63)))
    return generator
