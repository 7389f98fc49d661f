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
from slimline.runtime import open_model
from slimline.serve.bundle import read_bundle
from slimline.serve.sampling import SamplingParams
from slimline.serve.speculative import DraftLength, Lane, open_lane, prefill, speculative_round

GREEDY = SamplingParams()


class SpeculativeBackend(Backend):
    """Greedy speculative decoding behind the one-token-at-a-time backend interface."""

    name = "speculative"

    def __init__(self, folder: Path, device: str = "cpu") -> None:
        """Open the target and draft a serve artifact names (they take turns on the same cores or GPU)."""
        bundle = read_bundle(folder)
        if bundle.draft is None:
            raise ArtifactError(f"{folder} names no draft model: a speculative backend needs one")
        # two sequences each: the latency lane, and the scoring of windows while it is open
        self.target = open_model(bundle.target, max_sequences=2, device=device)
        self.draft = open_model(bundle.draft, max_sequences=2, shares_cores=True, device=device)
        self.device = self.target.device
        self.name = f"speculative ({self.target.backend})"
        self.draft_length = DraftLength(bundle.k, bundle.adaptive)
        self.lane: Lane | None = None
        self.verified: list[tuple[int, torch.Tensor]] = []  # (accepted draft token, target logits after it)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The target's logits for every position."""
        return self.target.logits(input_ids)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Start a lane on both models; the target scores the prompt."""
        self._close_lane()
        prompt = input_ids.tolist()
        self.lane = open_lane(self.target, self.draft, prompt, GREEDY, torch.Generator())
        prefill([self.lane], len(prompt))
        return self.lane.target.extend(prompt[-1:], all_logits=False)[-1]

    def decode(self, token: int) -> torch.Tensor:
        """Next-token logits after ``token``: kept from the last verification, or from a new round."""
        lane = self.lane
        lane.tokens.append(token)
        if self.verified and self.verified[0][0] == token:
            return self.verified.pop(0)[1]
        self.verified = []
        lane.target.truncate(min(lane.target.length, len(lane.tokens) - 1))
        lane.draft.truncate(min(lane.draft.length, len(lane.tokens) - 1))
        before = len(lane.tokens)
        new = speculative_round(self.target, self.draft, [lane], self.draft_length.k, self.draft_length)[0]
        accepted = len(new) - 1
        # The evaluator feeds the accepted tokens itself, one decode call each.
        self.verified = [(new[i], lane.verified_logits[i + 1]) for i in range(accepted)]
        del lane.tokens[before:]
        return lane.verified_logits[0]

    def _close_lane(self) -> None:
        if self.lane is not None:
            self.lane.close()
            self.lane = None
        self.verified = []

    def close(self) -> None:
        """Drop both models."""
        self._close_lane()
        self.target.close()
        self.draft.close()
