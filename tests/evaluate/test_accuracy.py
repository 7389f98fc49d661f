"""The accuracy yardstick on backends whose answers are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from slimline.config import LatencySettings
from slimline.evaluate.accuracy import measure_accuracy, token_windows
from slimline.evaluate.backends.base import Backend
from slimline.evaluate.latency import measure_latency, percentile

pytestmark = pytest.mark.unit

VOCAB = 16


class FixedBackend(Backend):
    """Predicts the same distribution everywhere: uniform, or peaked on token 3."""

    name = "fixed"

    def __init__(self, peak: float = 0.0) -> None:
        self.row = torch.zeros(VOCAB)
        self.row[3] = peak

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.row.repeat(input_ids.numel(), 1)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.row

    def decode(self, token: int) -> torch.Tensor:
        return self.row


def test_windows_score_exactly_max_tokens() -> None:
    windows = token_windows(torch.arange(1000), max_tokens=100, window=32)
    assert sum(w.numel() - 1 for w in windows) == 100
    assert windows[1][0] == 32


def test_uniform_model_has_vocabulary_sized_perplexity_and_zero_kl_to_itself() -> None:
    windows = token_windows(torch.randint(0, VOCAB, (500,)), 200, 50)
    result = measure_accuracy(FixedBackend(), FixedBackend(), windows)
    assert result["perplexity"] == pytest.approx(VOCAB)
    assert result["kl_vs_input"] == pytest.approx(0, abs=1e-12)
    assert result["scored_tokens"] == 200


def test_kl_and_top1_against_a_peaked_reference() -> None:
    windows = token_windows(torch.full((101,), 3), 100, 50)
    peaked, uniform = FixedBackend(peak=5.0), FixedBackend()
    result = measure_accuracy(peaked, uniform, windows)
    p = torch.softmax(peaked.row.double(), 0)
    expected_kl = float((torch.full((VOCAB,), 1 / VOCAB, dtype=torch.double) * (math.log(1 / VOCAB) - p.log())).sum())
    assert result["kl_vs_input"] == pytest.approx(expected_kl)
    assert result["top1_accuracy"] == 1.0
    assert result["perplexity"] == pytest.approx(1 / float(p[3]))


def test_latency_reports_medians_and_percentiles() -> None:
    result = measure_latency(
        FixedBackend(), torch.arange(8), LatencySettings(prompt_tokens=8, new_tokens=5, repeats=3, warmup=0)
    )
    assert result["decode_tokens_per_s"] > 0 and result["prefill_ms"] >= 0
    assert result["token_p95_ms"] >= result["token_p50_ms"]
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.95) == 4.0
