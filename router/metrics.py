"""Router metrics; served at /metrics beside vLLM's own frontend metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.ttft = Histogram("baton_time_to_first_token_seconds", "Time to first token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=self.registry)
        self.first_token_mismatches = Counter(
            "baton_first_token_mismatches",
            "Decode sampled another first token than prefill; decoding resumed after prefill's",
            registry=self.registry)
        self.prefill_retries = Counter(
            "baton_prefill_retries", "Prefills placed again after their prefill worker failed", registry=self.registry)
        self.decode_moves = Counter(
            "baton_decode_moves",
            "Requests moved to another decode worker mid-answer after theirs failed", registry=self.registry)
        self.decode_handoffs = Counter(
            "baton_decode_handoffs",
            "Answers a draining decode worker handed, with their KV, to another decode worker mid-answer",
            registry=self.registry)
        self.local_placements = Counter(
            "baton_local_placements",
            "Requests the router placed by itself (control plane unreachable), over its last known membership",
            registry=self.registry)
        self.refused = Counter(
            "baton_requests_refused",
            "Generation requests refused at admission (HTTP 429, gRPC RESOURCE_EXHAUSTED): the router was at capacity",
            registry=self.registry)
        self.admitted = Gauge("baton_requests_in_flight", "Generation requests admitted and not yet answered",
                              registry=self.registry)
