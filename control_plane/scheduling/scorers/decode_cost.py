"""Decode load, in tokens: the KV its running sequences hold (prompt +
answer of each) plus this prompt's part the worker lacks (moved to it, or
computed there). The lowest cost scores 1."""

from __future__ import annotations

from collections.abc import Sequence

from control_plane.scheduling.request import Candidate, SchedulingRequest


class DecodeCost:
    name = "decode-cost"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> dict[str, float]:
        costs = {c.worker_id: c.decode_tokens + c.uncached_tokens(request) for c in candidates}
        lowest = min(costs.values())
        return {worker_id: (1 + lowest) / (1 + cost) for worker_id, cost in costs.items()}
