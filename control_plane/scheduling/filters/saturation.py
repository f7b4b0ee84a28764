"""Workers whose engine reports its KV cache full, or a queue of its own,
are passed over while others are not. If every worker is saturated, all
stay candidates (``soft``): better a queue than a refusal."""

from __future__ import annotations

from collections.abc import Sequence

from control_plane.scheduling.request import Candidate, SchedulingRequest


class NotSaturated:
    name = "not-saturated"
    client_error = False
    soft = True

    def __init__(self, max_kv_cache_usage: float = 0.95, max_waiting: int = 8):
        self.max_kv_cache_usage = max_kv_cache_usage
        self.max_waiting = max_waiting

    def keep(self, request: SchedulingRequest, candidate: Candidate, pool: Sequence[Candidate]) -> bool:
        engine = candidate.engine
        return engine is None or (engine.kv_cache_usage < self.max_kv_cache_usage
                                  and engine.waiting <= self.max_waiting)

    def why_none(self, request: SchedulingRequest) -> str:
        return "every worker is saturated"
