"""An engine request's timeline as spans under the worker's server span.

vLLM stamps each request when its engine queued it, first scheduled it, and
produced its first and last tokens (``RequestStateStats``, monotonic
seconds, kept while stats are collected: the workers' load logger keeps
them so). Spans are recorded once the request is over, at those instants;
the KV load between scheduling and the first token is the connector's own
span, from the engine's process."""

from __future__ import annotations

from opentelemetry import trace

from baton.telemetry import record_span, tracer, wall_ns

_tracer = tracer("baton.engine")


def trace_prefill(stats, prompt_tokens: int, cached_tokens: int) -> None:
    if stats is None:
        return
    record_span(_tracer, "engine.queue", stats.queued_ts, stats.scheduled_ts)
    record_span(_tracer, "engine.prefill", stats.scheduled_ts, stats.first_token_ts,
                {"baton.prompt_tokens": prompt_tokens, "baton.cached_tokens": cached_tokens})


def trace_decode(stats, generated_tokens: int, finish_reason: str) -> None:
    """Queue wait and decoding as spans, the first token and the end as
    events of the current (server) span."""
    if stats is None:
        return
    span = trace.get_current_span()
    record_span(_tracer, "engine.queue", stats.queued_ts, stats.scheduled_ts)
    if stats.first_token_ts:
        span.add_event("first token", timestamp=wall_ns(stats.first_token_ts))
        record_span(_tracer, "engine.decode", stats.first_token_ts, stats.last_token_ts,
                    {"baton.generated_tokens": generated_tokens, "baton.preemptions": stats.num_preemptions})
    if finish_reason:
        span.add_event("finish", {"baton.finish_reason": finish_reason, "baton.generated_tokens": generated_tokens},
                       timestamp=wall_ns(stats.last_token_ts) if stats.last_token_ts else None)
