"""Prometheus metrics of the server: requests, tokens, draft acceptance, latencies."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    """One registry per server (not the process-global one), so several servers can coexist in tests."""

    def __init__(self, engine) -> None:
        self.registry = CollectorRegistry()
        self.http = Counter(
            "slimline_http_requests", "HTTP requests by path and status", ["path", "status"], registry=self.registry
        )
        self.http_seconds = Histogram(
            "slimline_http_request_seconds",
            "Time to the response's start",
            ["path"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.generations = Counter(
            "slimline_generations", "Finished generations by finish reason", ["finish_reason"], registry=self.registry
        )
        self.prompt_tokens = Counter("slimline_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.completion_tokens = Counter("slimline_completion_tokens", "Tokens generated", registry=self.registry)
        self.proposed = Counter("slimline_draft_tokens_proposed", "Draft tokens proposed", registry=self.registry)
        self.accepted = Counter("slimline_draft_tokens_accepted", "Draft tokens accepted", registry=self.registry)
        self.acceptance = Gauge(
            "slimline_draft_acceptance_rate", "Accepted / proposed draft tokens since start", registry=self.registry
        )
        self.generation_seconds = Histogram(
            "slimline_generation_seconds", "Whole generation time", registry=self.registry, buckets=LATENCY_BUCKETS
        )
        self.first_token_seconds = Histogram(
            "slimline_time_to_first_token_seconds",
            "Submission to first token",
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.active = Gauge("slimline_requests_active", "Requests decoding now", registry=self.registry)
        self.waiting = Gauge("slimline_requests_waiting", "Requests waiting for a slot", registry=self.registry)
        self.batch_size = Gauge(
            "slimline_batch_size", "Mean requests per batched decoding step (recent steps)", registry=self.registry
        )
        self.draft_length = Gauge("slimline_draft_length", "Draft tokens per round (k) now", registry=self.registry)
        self.engine = engine

    def observe_http(self, path: str, status: int, seconds: float) -> None:
        """Count one HTTP response (paths outside the API are folded into 'other' to bound cardinality)."""
        known = (
            path
            if path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
            else "other"
        )
        self.http.labels(known, str(status)).inc()
        self.http_seconds.labels(known).observe(seconds)

    def observe_request(self, usage: dict[str, Any] | None, finish_reason: str) -> None:
        """Fold a finished generation's figures in."""
        self.generations.labels(finish_reason.split(":")[0]).inc()
        if not usage:
            return
        self.prompt_tokens.inc(usage["prompt_tokens"])
        self.completion_tokens.inc(usage["completion_tokens"])
        self.proposed.inc(usage["draft_tokens_proposed"])
        self.accepted.inc(usage["draft_tokens_accepted"])
        self.generation_seconds.observe(usage["seconds"])
        if usage.get("time_to_first_token") is not None:
            self.first_token_seconds.observe(usage["time_to_first_token"])

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        totals = self.engine.totals
        if totals.proposed:
            self.acceptance.set(totals.accepted / totals.proposed)
        load = self.engine.load()
        self.active.set(load["active"])
        self.waiting.set(load["waiting"])
        sizes = list(self.engine.batch_sizes)
        self.batch_size.set(sum(sizes) / len(sizes) if sizes else 0)
        self.draft_length.set(self.engine.draft_length.k if self.engine.draft is not None else 0)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
