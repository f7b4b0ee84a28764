"""Router metrics, measured where the user feels them (from the request's
arrival at the router to the tokens leaving it); served at /metrics beside
vLLM's own frontend metrics."""

from __future__ import annotations

import time
from contextvars import ContextVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# When the request being served reached the router (time.monotonic()); set
# by the HTTP entry, before templating and tokenizing. Unset: the request
# came another way, and its clock starts where generation does.
arrival_s: ContextVar[float | None] = ContextVar("arrival_s", default=None)


def arrived_s() -> float:
    return arrival_s.get() or time.monotonic()


# vLLM's own buckets for these, so dashboards read alike.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.ttft = Histogram("baton_time_to_first_token_seconds",
                              "From the request's arrival at the router to its first token leaving it", ["model"],
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("baton_inter_token_latency_seconds", "Between successive tokens leaving the router",
                             ["model"], buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("baton_e2e_request_latency_seconds",
                             "From the request's arrival at the router to its last token, for answers that ended "
                             "normally", ["model"], buckets=_E2E_BUCKETS, registry=self.registry)
        self.requests = Counter("baton_requests", "Engine requests (one per answer: n > 1 makes several) by how "
                                "they ended: ok, cancelled (the client left), client_error, server_error",
                                ["status", "model"], registry=self.registry)
        self.prompt_tokens = Counter("baton_prompt_tokens", "Prompt tokens of the engine requests that ended",
                                     ["model"], registry=self.registry)
        self.generation_tokens = Counter("baton_generation_tokens", "Tokens generated and streamed to clients",
                                         ["model"], registry=self.registry)
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
