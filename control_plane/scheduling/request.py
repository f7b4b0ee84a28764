"""What the pipeline sees: the request, and each worker it may go to."""

from __future__ import annotations

from dataclasses import dataclass, field

from baton.registry import WorkerRecord


@dataclass(frozen=True)
class SchedulingRequest:
    model: str = ""  # served model name; empty: any
    prompt_tokens: int = 0
    required_labels: dict[str, str] = field(default_factory=dict)  # every one must match the worker's
    max_tokens: int = 0  # of the answer


@dataclass(frozen=True)
class EngineReport:
    """A worker's engine, as it last reported itself."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of its KV blocks in use


@dataclass(frozen=True)
class Candidate:
    worker_id: str
    model: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    in_flight: int = 0  # placements handed out and not yet reported back
    cached_tokens: int = 0  # of this request's prompt, in the worker's prefix cache (the index says)
    queued_prefill_tokens: int = 0  # prefill: uncached prompt tokens placed and not yet prefilled
    running: int = 0  # decode: sequences placed and not yet ended
    decoding: int = 0  # decode: of those, the ones whose prompt is in (not still on a prefill worker)
    decode_tokens: int = 0  # decode: their prompt + answer tokens, the KV they hold
    engine: EngineReport | None = None  # None: the engine never reported
    state: str = "ready"  # "draining" or "suspect": takes no new work

    @classmethod
    def of(cls, worker: WorkerRecord, in_flight: int = 0, state: str = "", **load) -> Candidate:
        """``state``: what the caller knows beyond the registry (a suspect)."""
        return cls(worker.worker_id, worker.model, dict(worker.labels), in_flight, state=state or worker.state,
                   **load)

    def uncached_tokens(self, request: SchedulingRequest) -> int:
        return max(0, request.prompt_tokens - self.cached_tokens)
