"""Speculative backend: a ``serve`` artifact (target + draft) measured on the common yardstick.

Accuracy is the target's own (full-sequence target logits). For latency, every ``decode`` that
starts a new round lets the draft propose ``k`` tokens and the target verify them in one pass;
the target's logits for the accepted positions are kept, and the following ``decode`` calls
that feed exactly those tokens (the evaluator decodes greedily) return them without any work.
So decode tokens/s is the pair's real greedy throughput, and per-token p95 shows the round cost.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimline.errors import ArtifactError
from slimline.evaluate.backends.base import Backend
from slimline.serve.models import load_language_model
from slimline.serve.sampling import SamplingParams
from slimline.serve.speculative import DecodeStats, DraftLength, record_round, speculative_round

GREEDY = SamplingParams()


class SpeculativeBackend(Backend):
    """Greedy speculative decoding behind the one-token-at-a-time backend interface."""

    name = "speculative"

    def __init__(self, folder: Path) -> None:
        """Open the target and draft a serve artifact names."""
        from slimline.serve.bundle import read_bundle

        bundle = read_bundle(folder)
        if bundle.draft is None:
            raise ArtifactError(f"{folder} names no draft model: a speculative backend needs one")
        self.target = load_language_model(bundle.target)
        self.draft = load_language_model(bundle.draft)
        self.name = f"speculative ({self.target.backend})"
        self.draft_length = DraftLength(bundle.k, bundle.adaptive)
        self._start([])

    def _start(self, tokens: list[int]) -> None:
        self.target_sequence = self.target.new_sequence()
        self.draft_sequence = self.draft.new_sequence()
        self.draft_length = self.draft_length.fork()  # what the last sequence learnt about the pair
        self.stats = DecodeStats()
        self.tokens = list(tokens)
        self.verified: list[tuple[int, torch.Tensor]] = []  # (accepted draft token, target logits after it)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The target's logits for every position."""
        return self.target.new_sequence().extend(input_ids.tolist())

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start a sequence on both models; the target scores the prompt."""
        self._start(input_ids.tolist())
        return self.target_sequence.extend(self.tokens)[-1]

    def decode(self, token: int) -> torch.Tensor:
        """Next-token logits after ``token``: kept from the last verification, or from a new round."""
        self.tokens.append(token)
        if self.verified and self.verified[0][0] == token:
            return self.verified.pop(0)[1]
        self.verified = []
        self.target_sequence.truncate(min(self.target_sequence.length, len(self.tokens) - 1))
        self.draft_sequence.truncate(min(self.draft_sequence.length, len(self.tokens) - 1))
        room = self.target.context_length - len(self.tokens)
        k = max(0, min(self.draft_length.k, room - 1))
        outcome = speculative_round(
            self.target_sequence, self.draft_sequence, self.tokens, k, GREEDY, torch.Generator()
        )
        self.verified = [(outcome.drafts[i], outcome.target_logits[i + 1]) for i in range(outcome.accepted)]
        record_round(self.stats, self.draft_length, outcome)
        return outcome.target_logits[0]

    def close(self) -> None:
        """Drop both models."""
        self.target = self.draft = None
