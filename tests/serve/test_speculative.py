"""Speculative decoding: greedy output equals the target's, sampling follows the target's distribution."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from slimline.serve.models import LanguageModel, Sequence, TorchModel
from slimline.serve.sampling import SamplingParams, distribution
from slimline.serve.speculative import (
    DecodeStats,
    DraftLength,
    Round,
    expected_tokens_per_round,
    generate_tokens,
    record_round,
)
from tests.conftest import build_tiny_model

pytestmark = pytest.mark.unit


class TableSequence(Sequence):
    """A sequence on a fixed bigram table: next-token logits depend on the last token only."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table, self.tokens = table, []

    @property
    def length(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: list[int]) -> torch.Tensor:
        self.tokens += tokens
        return self.table[torch.tensor(tokens)]

    def truncate(self, length: int) -> None:
        self.tokens = self.tokens[:length]


class TableModel(LanguageModel):
    """A bigram language model over a tiny vocabulary: exact distributions to test sampling against."""

    backend, name, context_length = "table", "table", 64

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def new_sequence(self) -> Sequence:
        return TableSequence(self.table)


def first_tokens(target, draft, prompt, params, k, count, seed=0, stats=None) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    rounds = generate_tokens(
        target,
        draft,
        prompt,
        params,
        DraftLength(k, adaptive=False) if draft else None,
        generator,
        stats or DecodeStats(),
    )
    tokens = []
    for new in rounds:
        tokens += new
        if len(tokens) >= count:
            return tokens[:count]
    return tokens


def test_sampling_follows_the_target_distribution_chi_square() -> None:
    vocab = 4
    generator = torch.Generator().manual_seed(0)
    target_table = torch.randn(vocab, vocab, generator=generator) * 1.5
    draft_table = torch.randn(vocab, vocab, generator=generator) * 1.5  # a poor draft: many rejections
    target, draft = TableModel(target_table), TableModel(draft_table)
    params = SamplingParams(temperature=1.0)
    # exact joint distribution of the first two generated tokens after prompt [0]
    p = torch.softmax(target_table.double(), dim=-1)
    expected = {(a, b): float(p[0, a] * p[a, b]) for a, b in itertools.product(range(vocab), repeat=2)}
    draws = 6000
    counts = dict.fromkeys(expected, 0)
    stats = DecodeStats()
    for seed in range(draws):
        a, b = first_tokens(target, draft, [0], params, k=3, count=2, seed=seed, stats=stats)
        counts[(a, b)] += 1
    chi_square = sum((counts[c] - draws * e) ** 2 / (draws * e) for c, e in expected.items())
    # 15 degrees of freedom: the 99.9% quantile is 37.7
    assert chi_square < 37.7, (chi_square, counts)
    assert 0.05 < stats.acceptance_rate < 0.95  # both the accept and the residual paths were taken


def test_draft_distribution_alone_would_fail_the_same_test() -> None:
    """The chi-square test has power: tokens from the draft's own distribution are rejected by it."""
    vocab = 4
    generator = torch.Generator().manual_seed(0)
    target_table = torch.randn(vocab, vocab, generator=generator) * 1.5
    draft_table = torch.randn(vocab, vocab, generator=generator) * 1.5
    p = torch.softmax(target_table.double(), dim=-1)
    draft = TableModel(draft_table)
    draws, counts = 6000, {}
    for seed in range(draws):
        pair = tuple(first_tokens(draft, None, [0], SamplingParams(temperature=1.0), 0, 2, seed=seed))
        counts[pair] = counts.get(pair, 0) + 1
    expected = {(a, b): float(p[0, a] * p[a, b]) for a, b in itertools.product(range(vocab), repeat=2)}
    chi_square = sum((counts.get(c, 0) - draws * e) ** 2 / (draws * e) for c, e in expected.items())
    assert chi_square > 37.7


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[TorchModel, TorchModel]:
    """A 2-layer target and a different 1-layer draft sharing its tokenizer (real transformers models)."""
    folder = tmp_path_factory.mktemp("pair")
    target = TorchModel(build_tiny_model(folder / "target", layers=2, seed=0))
    draft = TorchModel(build_tiny_model(folder / "draft", layers=1, seed=1))
    return target, draft


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_speculative_equals_target_only_greedy(tiny_pair, k: int) -> None:
    target, draft = tiny_pair
    generator = torch.Generator().manual_seed(2)
    for length in (1, 7, 30):
        prompt = torch.randint(1, 500, (length,), generator=generator).tolist()
        expected = first_tokens(target, None, prompt, SamplingParams(), 0, 40)
        assert first_tokens(target, draft, prompt, SamplingParams(), k, 40) == expected
        # the target as its own draft accepts everything: the all-accepted path and its extra token
        stats = DecodeStats()
        assert first_tokens(target, target, prompt, SamplingParams(), k, 40, stats=stats) == expected
        assert stats.acceptance_rate == 1.0


def test_generation_stops_at_the_context_limit(tiny_pair) -> None:
    target, draft = tiny_pair
    prompt = list(range(1, target.context_length - 5))
    tokens = first_tokens(target, draft, prompt, SamplingParams(), 4, 100)
    assert len(prompt) + len(tokens) == target.context_length  # never past it, even with drafts pending


def test_warping_applies_top_k_and_top_p() -> None:
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert torch.count_nonzero(distribution(logits, SamplingParams(temperature=1.0, top_k=2))) == 2
    top_p = distribution(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert torch.count_nonzero(top_p) == 1 and float(top_p[0]) == 1.0
    assert torch.isclose(
        distribution(logits, SamplingParams(temperature=1.0)).sum(), torch.tensor(1.0, dtype=torch.float64)
    )


def run_rounds(length: DraftLength, rounds: int, acceptance: float, draft_step: float) -> list[int]:
    """Feed a controller rounds with a fixed per-proposal acceptance; passes cost 1 s + 0.05 s per token."""
    chosen = []
    for _ in range(rounds):
        k = length.k
        chosen.append(k)
        accepted = min(k, round(acceptance * k)) if acceptance < 1 else k
        length.update(k, accepted, draft_step, 1.0 + 0.05 * (k + 1))
    return chosen


def test_adaptive_draft_length_follows_acceptance_and_cost() -> None:
    good = DraftLength(4, adaptive=True)
    run_rounds(good, 30, acceptance=1.0, draft_step=0.05)
    assert good.k > 4  # every proposal accepted and drafting is cheap: propose more
    assert 0.9 < good.acceptance <= 0.99
    # a pass over more tokens was measured to cost more, and the line through the lengths seen says so
    assert good.pass_cost(9) > good.pass_cost(2)
    poor = DraftLength(4, adaptive=True)
    chosen = run_rounds(poor, 40, acceptance=0.0, draft_step=0.3)
    assert poor.acceptance < 0.3 and 0 in chosen  # a draft that never agrees is switched off ...
    assert chosen[-20:].count(1) >= 1  # ... and probed now and then
    assert poor.tokens_per_second(0) > poor.tokens_per_second(4)
    carried = good.fork()
    assert carried.acceptance == good.acceptance and carried.k == good.k and carried.pass_seconds == good.pass_seconds
    fixed = DraftLength(3, adaptive=False)
    fixed.update(3, 0, 0.1, 1.0)
    assert fixed.k == 3


def test_catch_up_calls_do_not_count_as_round_costs() -> None:
    """A round that also fed a prompt (or tokens skipped while the draft was off) is slower, not typical."""
    length, stats = DraftLength(4, adaptive=True), DecodeStats()
    logits = torch.zeros(5, 8)
    prefill = Round([1, 2, 3, 4], 2, 5, logits, draft_seconds=0.4, target_seconds=3.0, draft_fed=64, target_fed=68)
    record_round(stats, length, prefill)
    assert length.draft_step_seconds is None and length.pass_seconds == {}
    assert stats.proposed == 4 and stats.accepted == 2  # the outcome still counts
    steady = Round([1, 2, 3, 4], 4, 5, logits, draft_seconds=0.04, target_seconds=0.5, draft_fed=2, target_fed=5)
    record_round(stats, length, steady)
    assert length.draft_step_seconds == 0.01 and length.pass_seconds == {5: 0.5}
    assert expected_tokens_per_round(0.0, 5) == 1.0 and expected_tokens_per_round(1.0, 5) == 6.0


def test_model_sequences_are_independent(tiny_pair, tmp_path: Path) -> None:
    target, _ = tiny_pair
    first, second = target.new_sequence(), target.new_sequence()
    alone = target.new_sequence().extend([5, 6, 7])
    first.extend([9, 9, 9, 9])
    assert torch.equal(second.extend([5, 6, 7]), alone)
