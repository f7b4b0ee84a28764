"""Router metrics in Prometheus text format, served at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("baton_requests", "Requests by API and outcome",
                                ["api", "outcome"], registry=self.registry)
        self.prompt_tokens = Counter("baton_prompt_tokens", "Prompt tokens accepted", registry=self.registry)
        self.completion_tokens = Counter("baton_completion_tokens", "Tokens generated", registry=self.registry)
        self.ttft = Histogram("baton_time_to_first_token_seconds", "Time to first token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
