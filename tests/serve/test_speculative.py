"""Speculative decoding: greedy output equals the target's, sampling follows the target's distribution,
alone and in batched rounds where requests join and leave."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from slimline.runtime import Feed, RuntimeModel, Sequence
from slimline.runtime.torch_model import TorchModel
from slimline.serve import speculative
from slimline.serve.sampling import SamplingParams, distribution
from slimline.serve.speculative import (
    DecodeStats,
    DraftLength,
    Lane,
    expected_tokens_per_round,
    generate_tokens,
    lookup_guess,
    open_lane,
    prefill,
    speculative_round,
)
from tests.conftest import build_tiny_model

pytestmark = pytest.mark.unit


class TableSequence(Sequence):
    """A sequence on a fixed bigram table: next-token logits depend on the last token only."""

    def __init__(self, model: TableModel) -> None:
        self.model, self.tokens = model, []

    @property
    def length(self) -> int:
        return len(self.tokens)

    def truncate(self, length: int) -> None:
        self.tokens = self.tokens[:length]


class TableModel(RuntimeModel):
    """A bigram language model over a tiny vocabulary: exact distributions to test sampling against."""

    backend, name, context_length = "table", "table", 64

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def new_sequence(self) -> Sequence:
        return TableSequence(self)

    def forward(self, feeds: list[Feed]) -> list[torch.Tensor]:
        rows = []
        for feed in feeds:
            feed.sequence.tokens += feed.tokens
            logits = self.table[torch.tensor(feed.tokens)]
            rows.append(logits if feed.all_logits else logits[-1:])
        return rows


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


def first_two_tokens_batched(target, draft, params, k: int, lanes: int, seed: int) -> tuple[list, DecodeStats]:
    """The first two tokens after prompt [0] of ``lanes`` requests decoded together in batched rounds."""
    batch = [
        open_lane(target, draft, [0], params, torch.Generator().manual_seed(seed * lanes + i)) for i in range(lanes)
    ]
    length = DraftLength(k, adaptive=False)
    while any(len(lane.tokens) < 3 for lane in batch):
        speculative_round(target, draft, [lane for lane in batch if len(lane.tokens) < 3], k, length)
    stats = DecodeStats()
    for lane in batch:
        stats.proposed += lane.stats.proposed
        stats.accepted += lane.stats.accepted
    return [tuple(lane.tokens[1:3]) for lane in batch], stats


def test_batched_sampling_follows_the_target_distribution_chi_square() -> None:
    """Lanes verified in one batched pass, each with its own generator, still sample from the target."""
    vocab = 4
    generator = torch.Generator().manual_seed(0)
    target_table = torch.randn(vocab, vocab, generator=generator) * 1.5
    draft_table = torch.randn(vocab, vocab, generator=generator) * 1.5
    target, draft = TableModel(target_table), TableModel(draft_table)
    p = torch.softmax(target_table.double(), dim=-1)
    expected = {(a, b): float(p[0, a] * p[a, b]) for a, b in itertools.product(range(vocab), repeat=2)}
    counts, proposed, accepted = dict.fromkeys(expected, 0), 0, 0
    for seed in range(750):
        pairs, stats = first_two_tokens_batched(target, draft, SamplingParams(temperature=1.0), 3, 8, seed)
        proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
        for pair in pairs:
            counts[pair] += 1
    draws = sum(counts.values())
    assert draws == 6000
    chi_square = sum((counts[c] - draws * e) ** 2 / (draws * e) for c, e in expected.items())
    assert chi_square < 37.7, (chi_square, counts)  # 15 degrees of freedom, 99.9% quantile
    assert 0.05 < accepted / proposed < 0.95


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


def decode_batch(target, draft, prompts, count: int, k: int, joins: dict[int, int] | None = None) -> list[list[int]]:
    """Greedy-decode ``prompts`` together; lane i joins at round ``joins[i]`` (default 0) and leaves after ``count``.

    Prompts are prefilled in small chunks, so a long prompt spans several steps while others decode.
    """
    joins = joins or {}
    lanes = [open_lane(target, draft, p, SamplingParams(), torch.Generator()) for p in prompts]
    done: dict[int, list[int]] = {}
    length = DraftLength(k, adaptive=False)
    step = 0
    while len(done) < len(lanes):
        active = [i for i, _ in enumerate(lanes) if i not in done and joins.get(i, 0) <= step]
        prefill([lanes[i] for i in active], 16)
        ready = [i for i in active if lanes[i].prefilled]
        if ready:
            speculative_round(target, draft, [lanes[i] for i in ready], k, length)
        for i in ready:
            generated = lanes[i].tokens[len(prompts[i]) :]
            if len(generated) >= count:
                done[i] = generated[:count]
                lanes[i].close()
        step += 1
    return [done[i] for i in range(len(lanes))]


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_batched_greedy_equals_each_prompt_alone(tiny_pair, batch: int) -> None:
    """Ragged prompts (1 to 45 tokens) decoded together give each prompt's greedy completion alone."""
    target, draft = tiny_pair
    generator = torch.Generator().manual_seed(batch)
    lengths = [1, 45, 7, 12, 30, 3, 20, 9][:batch]
    prompts = [torch.randint(1, 500, (n,), generator=generator).tolist() for n in lengths]
    expected = [first_tokens(target, None, p, SamplingParams(), 0, 24) for p in prompts]
    assert decode_batch(target, None, prompts, 24, 0) == expected  # batched target-only
    assert decode_batch(target, draft, prompts, 24, 3) == expected  # batched speculative
    assert decode_batch(target, target, prompts, 24, 4) == expected  # all accepted: the extra token path


def test_requests_join_and_leave_mid_batch(tiny_pair) -> None:
    """Lanes joining while others decode, and lanes leaving early, change nobody's output."""
    target, draft = tiny_pair
    generator = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 500, (n,), generator=generator).tolist() for n in (5, 33, 8, 2)]
    expected = [first_tokens(target, None, p, SamplingParams(), 0, 20) for p in prompts]
    outputs = decode_batch(target, draft, prompts, 20, 2, joins={2: 3, 3: 6})
    assert outputs == expected
    short = decode_batch(target, draft, prompts[:2], 6, 2)  # leave after 6 tokens
    assert short == [e[:6] for e in expected[:2]]


def test_lane_caches_hold_only_accepted_tokens(tiny_pair) -> None:
    target, draft = tiny_pair
    lanes = [open_lane(target, draft, [5, 6, 7], SamplingParams(), torch.Generator()) for _ in range(2)]
    prefill(lanes, 64)
    speculative_round(target, draft, lanes, 3, DraftLength(3, adaptive=False))
    for lane in lanes:
        assert isinstance(lane, Lane)
        assert lane.target.length == len(lane.tokens) - 1
        assert lane.draft.length <= len(lane.tokens) - 1


def test_a_probe_round_lets_one_lane_propose_in_turn(tiny_pair) -> None:
    """With the draft switched off, a probe re-measures it on one lane, a different one each time."""
    target, draft = tiny_pair
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    lanes = [open_lane(target, draft, p, SamplingParams(), torch.Generator()) for p in prompts]
    prefill(lanes, 64)
    length = DraftLength(0, adaptive=True)
    probed = []
    for _ in range(2):
        length.k, length.rounds_without_draft = 0, length.probe_wait  # as after rounds where no k paid off
        assert length.probe_due
        speculative_round(target, draft, lanes, 0, length)
        from_draft = [i for i, lane in enumerate(lanes) if lane.drafts and not lane.guessed]  # not lookup guesses
        assert len(from_draft) == 1 and len(lanes[from_draft[0]].drafts) == 1
        probed.append(from_draft[0])
        assert length.rounds_without_draft == 0
    assert probed[0] != probed[1]
    for lane, prompt in zip(lanes, prompts, strict=True):  # an accepted probe gives its lane one token more
        generated = lane.tokens[len(prompt) :]
        assert generated == first_tokens(target, None, prompt, SamplingParams(), 0, len(generated))


def test_an_idle_draft_catches_up_when_it_proposes_again(tiny_pair, monkeypatch) -> None:
    """With k 0 the draft is not prefilled; proposing again, it feeds what it missed (or prefill catches it up)."""
    target, draft = tiny_pair
    monkeypatch.setattr(speculative, "CATCH_UP_TOKENS", 8)
    prompts = [[5, 6, 7], list(range(20, 40))]
    lanes = [open_lane(target, draft, p, SamplingParams(), torch.Generator()) for p in prompts]
    prefill(lanes, 64, drafting=False)
    assert [lane.draft.length for lane in lanes] == [0, 0] and all(lane.prefilled for lane in lanes)
    assert [lane.behind(drafting=True) for lane in lanes] == [False, True]  # 20 tokens behind > 8
    speculative_round(target, draft, lanes, 2, DraftLength(2, adaptive=False))
    assert len(lanes[0].drafts) == 2 and lanes[1].drafts == []  # the short lag caught up in the draft pass
    prefill([lanes[1]], 64)
    assert not lanes[1].behind(drafting=True)
    for _ in range(3):
        speculative_round(target, draft, lanes, 2, DraftLength(2, adaptive=False))
    for lane, prompt in zip(lanes, prompts, strict=True):
        generated = lane.tokens[len(prompt) :]
        assert generated == first_tokens(target, None, prompt, SamplingParams(), 0, len(generated))


def test_guesses_are_made_where_a_longer_pass_costs_little() -> None:
    """A lookup guess doubles a pass's tokens: worth it where passes are memory-bound, not where compute-bound."""
    length = DraftLength(0, adaptive=True)
    assert not length.guessing_pays(1)  # nothing measured yet
    for tokens, seconds in ((1, 0.010), (2, 0.011), (16, 0.030), (32, 0.055)):
        length.observe_pass(tokens, seconds)
    assert length.guessing_pays(1)  # 1.5 expected tokens for 10% more time
    assert not length.guessing_pays(16)  # 1.5 expected tokens for 83% more time
    for _ in range(20):
        length.observe_guess(False)
    assert not length.guessing_pays(1)  # guesses that never land are not worth even 10%


def test_lookup_guess_continues_the_latest_earlier_match() -> None:
    assert lookup_guess([1, 2, 3, 4, 1, 2]) == 3  # "1 2" was followed by 3
    assert lookup_guess([1, 2, 3, 9, 9, 1, 2, 3]) == 9  # the longest tail that occurred before wins
    assert lookup_guess([7, 1, 7, 2, 7]) == 2  # the latest occurrence
    assert lookup_guess([5, 6, 7]) is None and lookup_guess([4]) is None


def test_warping_applies_top_k_and_top_p() -> None:
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert torch.count_nonzero(distribution(logits, SamplingParams(temperature=1.0, top_k=2))) == 2
    top_p = distribution(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert torch.count_nonzero(top_p) == 1 and float(top_p[0]) == 1.0
    assert torch.isclose(
        distribution(logits, SamplingParams(temperature=1.0)).sum(), torch.tensor(1.0, dtype=torch.float64)
    )


def test_probes_back_off_while_the_draft_does_not_pay_and_start_over_when_it_does() -> None:
    """A probe that leaves k at 0 doubles the wait for the next (up to a cap); a draft in use again resets it."""
    length = DraftLength(4, adaptive=True, probe_every=4, max_probe_every=16)
    length.observe_pass(1, 1.0)
    length.observe_pass(2, 3.0)  # a second token doubles the pass's cost: no k pays for itself
    length.observe_draft(1, 0.5)
    waits = []
    for _ in range(60):
        if length.probe_due:
            waits.append(length.rounds_without_draft)
            length.observe_acceptance(1, 0)
            length.finish_round(True, 1)
        else:
            length.finish_round(False, 1)
    assert length.k == 0 and waits[:4] == [4, 8, 16, 16]  # doubled, then capped
    for _ in range(30):  # the draft agrees again and the passes grow cheap: k > 0 is picked ...
        length.observe_acceptance(4, 4)
        length.observe_pass(2, 1.01)
    length.finish_round(True, 1)
    assert length.k > 0 and length.probe_wait == 4  # ... and the next spell without it probes soon again
    assert length.fork().probe_wait == 4


def run_rounds(length: DraftLength, rounds: int, acceptance: float, draft_step: float, rows: int = 1) -> list[int]:
    """Feed a controller rounds with a fixed per-proposal acceptance; passes cost 1 s + 0.05 s per token."""
    chosen = []
    for _ in range(rounds):
        k, drafting = (1, 1) if length.probe_due else (length.k, rows)  # a probe: one lane proposes one token
        chosen.append(k)
        accepted = min(k, round(acceptance * k)) if acceptance < 1 else k
        if k:
            length.observe_draft(drafting, draft_step)
            for _ in range(drafting):
                length.observe_acceptance(k, accepted)
        tokens = rows + drafting * k
        length.observe_pass(tokens, 1.0 + 0.05 * tokens)
        length.finish_round(bool(k), rows)
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
    assert chosen[10:].count(1) >= 1  # ... and probed now and then
    assert poor.tokens_per_second(0) > poor.tokens_per_second(4)
    carried = good.fork()
    assert carried.acceptance == good.acceptance and carried.k == good.k and carried.pass_seconds == good.pass_seconds
    fixed = DraftLength(3, adaptive=False)
    fixed.observe_acceptance(3, 0)
    fixed.finish_round(True, 1)
    assert fixed.k == 3


def test_a_batched_pass_has_its_own_cost_curve() -> None:
    """k is chosen for the batch: the target pass is costed by the tokens of all rows together."""
    length = DraftLength(2, adaptive=True)
    for rows, k in ((1, 1), (1, 3), (8, 1), (8, 3)):
        length.observe_pass(rows * (k + 1), 0.01 + 0.001 * rows * (k + 1))
        length.observe_draft(rows, 0.001 + 0.0001 * rows)
    assert length.pass_cost(32) > length.pass_cost(16) > length.pass_cost(2)
    assert length.tokens_per_second(2, rows=8) > length.tokens_per_second(2, rows=1)
    assert expected_tokens_per_round(0.0, 5) == 1.0 and expected_tokens_per_round(1.0, 5) == 6.0


def test_model_sequences_are_independent(tiny_pair, tmp_path: Path) -> None:
    target, _ = tiny_pair
    first, second = target.new_sequence(), target.new_sequence()
    alone = target.new_sequence().extend([5, 6, 7])
    first.extend([9, 9, 9, 9])
    assert torch.equal(second.extend([5, 6, 7]), alone)
